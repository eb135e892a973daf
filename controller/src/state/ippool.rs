//! The cluster-wide address pool: no address is handed out twice.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct IpPool {
    /// Addresses the controller hands out; None = callers must give addresses.
    pub cidr: Option<ipnet::Ipv4Net>,
    /// Every address in use in the cluster (from the pool or given), and by whom.
    pub used: BTreeMap<Ipv4Addr, String>,
}

impl IpPool {
    /// The lowest free host address of the pool, skipping the network's first
    /// address after the network one (the nodes' bridges take it).
    pub fn next_free(&self) -> Option<Ipv4Addr> {
        let net = self.cidr?;
        let gateway = net.hosts().next();
        net.hosts()
            .find(|a| Some(*a) != gateway && !self.used.contains_key(a))
    }

    pub fn holder(&self, ip: Ipv4Addr) -> Option<&str> {
        self.used.get(&ip).map(String::as_str)
    }

    pub fn take(&mut self, ip: Ipv4Addr, vps: &str) {
        self.used.insert(ip, vps.to_string());
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_lowest_free_and_never_twice() {
        let mut p = IpPool {
            cidr: Some("10.77.0.0/29".parse().unwrap()),
            ..Default::default()
        };
        let mut got = Vec::new();
        while let Some(ip) = p.next_free() {
            p.take(ip, "v");
            got.push(ip.to_string());
        }
        assert_eq!(
            got,
            [
                "10.77.0.2",
                "10.77.0.3",
                "10.77.0.4",
                "10.77.0.5",
                "10.77.0.6"
            ]
        );
        p.release("10.77.0.4".parse().unwrap());
        assert_eq!(p.next_free(), Some("10.77.0.4".parse().unwrap()));
    }
}
