//! The two networks of a cluster and its hosts' places on them.
//!
//! In the root namespace: a management bridge (`<id>m`, 10.86.0.1/24: this
//! test process reaches the daemons there) and the VPS LAN bridge (`<id>l`,
//! 10.85.0.1/16: this process is a client on the LAN). Host `i` is the
//! namespace `<id>h<i>` with `mgmt` (10.86.0.1<i>/24) on the management
//! bridge and `uplink` plugged into its node bridge `ferrybr0`
//! (10.85.0.1<i>/16) on the LAN. Cutting a host takes both of its root-side
//! veth ends down: it is off both networks, its processes run on.
//! Partitioning a host from some peers drops only their packets (nftables
//! in the host's namespace), so the test can still talk to both sides.

use crate::{run_ok, run_quiet};

pub const MGMT_GW: &str = "10.86.0.1";
pub const LAN_GW: &str = "10.85.0.1";

pub struct Net {
    pub id: String,
}

impl Net {
    pub fn mgmt_bridge(&self) -> String {
        format!("{}m", self.id)
    }
    pub fn lan_bridge(&self) -> String {
        format!("{}l", self.id)
    }
    pub fn netns(&self, i: usize) -> String {
        format!("{}h{i}", self.id)
    }
    pub fn netns_path(&self, i: usize) -> String {
        format!("/run/netns/{}", self.netns(i))
    }
    /// Root-side veth ends of host `i`: management, LAN.
    fn ends(&self, i: usize) -> [String; 2] {
        [format!("{}m{i}", self.id), format!("{}u{i}", self.id)]
    }
    /// Host `i`'s management address.
    pub fn mgmt_ip(i: usize) -> String {
        format!("10.86.0.{}", 10 + i)
    }
    /// Host `i`'s node-bridge address on the LAN (its VPSes' gateway).
    pub fn lan_cidr(i: usize) -> String {
        format!("10.85.0.{}/16", 10 + i)
    }

    pub fn create(id: &str, hosts: usize) -> Net {
        let n = Net { id: id.to_string() };
        for (br, addr) in [
            (n.mgmt_bridge(), format!("{MGMT_GW}/24")),
            (n.lan_bridge(), format!("{LAN_GW}/16")),
        ] {
            run_ok("ip", &["link", "add", &br, "type", "bridge"]);
            run_ok("ip", &["addr", "add", &addr, "dev", &br]);
            run_ok("ip", &["link", "set", &br, "up"]);
        }
        for i in 1..=hosts {
            let ns = n.netns(i);
            let [m, u] = n.ends(i);
            run_ok("ip", &["netns", "add", &ns]);
            run_ok(
                "ip",
                &[
                    "link", "add", &m, "type", "veth", "peer", "name", "mgmt", "netns", &ns,
                ],
            );
            run_ok("ip", &["link", "set", &m, "master", &n.mgmt_bridge(), "up"]);
            let ip = format!("{}/24", Net::mgmt_ip(i));
            run_ok("ip", &["-n", &ns, "addr", "add", &ip, "dev", "mgmt"]);
            run_ok("ip", &["-n", &ns, "link", "set", "mgmt", "up"]);
            run_ok(
                "ip",
                &[
                    "link", "add", &u, "type", "veth", "peer", "name", "uplink", "netns", &ns,
                ],
            );
            run_ok("ip", &["link", "set", &u, "master", &n.lan_bridge(), "up"]);
            run_ok(
                "ip",
                &["-n", &ns, "link", "add", "ferrybr0", "type", "bridge"],
            );
            let lan = Net::lan_cidr(i);
            run_ok("ip", &["-n", &ns, "addr", "add", &lan, "dev", "ferrybr0"]);
            run_ok("ip", &["-n", &ns, "link", "set", "ferrybr0", "up"]);
            run_ok(
                "ip",
                &[
                    "-n", &ns, "link", "set", "uplink", "master", "ferrybr0", "up",
                ],
            );
            run_ok("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        }
        n
    }

    /// Takes host `i` off both networks.
    pub fn cut(&self, i: usize) {
        for e in self.ends(i) {
            run_ok("ip", &["link", "set", &e, "down"]);
        }
    }

    /// Puts host `i` back on both networks.
    pub fn heal(&self, i: usize) {
        for e in self.ends(i) {
            run_ok("ip", &["link", "set", &e, "up"]);
        }
    }

    /// Partitions host `i` from `peers` on the management network (an
    /// nftables table in host i's namespace drops their packets both ways);
    /// this test process and everyone else still reach it.
    pub fn partition(&self, i: usize, peers: &[usize]) {
        let ips: Vec<String> = peers.iter().map(|p| Net::mgmt_ip(*p)).collect();
        let set = ips.join(", ");
        let rules = format!(
            "table inet ferrytest {{\n\
             chain in {{ type filter hook input priority -10; ip saddr {{ {set} }} drop; }}\n\
             chain out {{ type filter hook output priority -10; ip daddr {{ {set} }} drop; }}\n}}\n"
        );
        let path = std::env::temp_dir().join(format!("{}-part{i}.nft", self.id));
        std::fs::write(&path, rules).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let p = path.to_string_lossy().into_owned();
        run_ok("ip", &["netns", "exec", &self.netns(i), "nft", "-f", &p]);
        let _ = std::fs::remove_file(&path);
    }

    /// Ends host `i`'s partition.
    pub fn unpartition(&self, i: usize) {
        run_quiet(
            "ip",
            &[
                "netns",
                "exec",
                &self.netns(i),
                "nft",
                "delete",
                "table",
                "inet",
                "ferrytest",
            ],
        );
    }

    /// Removes the namespaces and bridges (links of `hosts` hosts).
    pub fn remove(&self, hosts: usize) {
        for i in 1..=hosts {
            run_quiet("ip", &["netns", "del", &self.netns(i)]);
            for e in self.ends(i) {
                run_quiet("ip", &["link", "del", &e]);
            }
        }
        run_quiet("ip", &["link", "del", &self.mgmt_bridge()]);
        run_quiet("ip", &["link", "del", &self.lan_bridge()]);
    }
}
