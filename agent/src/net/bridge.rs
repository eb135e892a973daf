//! The node bridge every VPS's host-side veth is plugged into.

use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::{LinkBridge, LinkUnspec};

use super::{is_errno, nl, Netlink};
use crate::error::Result;

/// Creates the bridge if missing, gives it `cidr`'s address if it lacks it, and
/// brings it up. Safe to call on every agent start.
pub async fn ensure_bridge(nl_host: &Netlink, name: &str, cidr: ipnet::Ipv4Net) -> Result<()> {
    let h = &nl_host.handle;
    let index = match nl_host.link_index(name).await? {
        Some(i) => i,
        None => {
            match h.link().add(LinkBridge::new(name).build()).execute().await {
                Ok(()) => {}
                Err(e) if is_errno(&e, libc::EEXIST) => {}
                Err(e) => return Err(nl(format!("creating bridge {name}"), e)),
            }
            nl_host.link_index(name).await?.ok_or_else(|| {
                crate::error::AgentError::Netlink(format!("bridge {name} vanished after creation"))
            })?
        }
    };
    let mut addrs = h.address().get().set_link_index_filter(index).execute();
    let mut has = false;
    while let Some(msg) = addrs
        .try_next()
        .await
        .map_err(|e| nl("listing bridge addresses", e))?
    {
        for a in &msg.attributes {
            if let AddressAttribute::Address(IpAddr::V4(ip)) = a {
                if *ip == cidr.addr() {
                    has = true;
                }
            }
        }
    }
    if !has {
        match h
            .address()
            .add(index, IpAddr::V4(cidr.addr()), cidr.prefix_len())
            .execute()
            .await
        {
            Ok(()) => {}
            Err(e) if is_errno(&e, libc::EEXIST) => {}
            Err(e) => return Err(nl(format!("adding {cidr} to {name}"), e)),
        }
    }
    // A fixed address: left to itself the kernel gives a bridge the lowest
    // MAC among its ports, the VPSes' veths, so it changed with VPS churn,
    // unannounced, and other hosts lost this node's address for seconds.
    h.link()
        .set(
            LinkUnspec::new_with_index(index)
                .address(bridge_mac(name, cidr).to_vec())
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(|e| nl(format!("bringing {name} up"), e))?;
    Ok(())
}

/// The node bridge's MAC: locally administered, unicast, from its name and
/// this node's address on it (so it stays across restarts and differs
/// between nodes).
pub fn bridge_mac(name: &str, cidr: ipnet::Ipv4Net) -> [u8; 6] {
    use sha2::Digest;
    let h = sha2::Sha256::digest(format!("ferry-bridge {name} {}", cidr.addr()).as_bytes());
    [0x02, h[0], h[1], h[2], h[3], h[4]]
}

/// Plugs an existing interface (the node's LAN port) into the bridge, so VPSes
/// share one L2 segment across nodes and keep their address when they move.
pub async fn attach_uplink(nl_host: &Netlink, bridge: &str, iface: &str) -> Result<()> {
    let h = &nl_host.handle;
    let br = nl_host
        .link_index(bridge)
        .await?
        .ok_or_else(|| crate::error::AgentError::Netlink(format!("bridge {bridge} is missing")))?;
    let idx = nl_host.link_index(iface).await?.ok_or_else(|| {
        crate::error::AgentError::invalid("uplink", format!("interface {iface} does not exist"))
    })?;
    h.link()
        .set(LinkUnspec::new_with_index(idx).controller(br).up().build())
        .execute()
        .await
        .map_err(|e| nl(format!("plugging {iface} into {bridge}"), e))?;
    Ok(())
}

/// The interface holding `ip` on this host and the network it is in, or None
/// when no interface has it.
pub async fn find_address(nl_host: &Netlink, ip: IpAddr) -> Result<Option<(u32, ipnet::IpNet)>> {
    let mut addrs = nl_host.handle.address().get().execute();
    while let Some(msg) = addrs
        .try_next()
        .await
        .map_err(|e| nl("listing addresses", e))?
    {
        let has = msg
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Address(a) if *a == ip));
        if has {
            let net = ipnet::IpNet::new(ip, msg.header.prefix_len)
                .map_err(|e| crate::error::AgentError::Netlink(format!("address {ip}: {e}")))?;
            return Ok(Some((msg.header.index, net)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_bridge_mac_is_stable_unicast_local_and_per_node() {
        let a: ipnet::Ipv4Net = "10.77.0.1/16".parse().expect("cidr");
        let b: ipnet::Ipv4Net = "10.77.0.2/16".parse().expect("cidr");
        let m = super::bridge_mac("ferrybr0", a);
        assert_eq!(m, super::bridge_mac("ferrybr0", a));
        assert_ne!(m, super::bridge_mac("ferrybr0", b));
        assert_eq!(m[0] & 0x03, 0x02, "locally administered unicast");
    }
}
