//! The veth pair of a VPS: host end on the node bridge, the other end inside the
//! VPS's netns as `eth0` with its address, MAC and default route.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::{is_errno, nl, Netlink};
use crate::error::{AgentError, Result};
use crate::spec::NetConfig;

/// A host-side veth name: "fv" + 12 hex digits (15 bytes is the kernel limit).
/// It changes with every start, so a VPS restored elsewhere on the same kernel
/// never collides with a name its old copy still holds.
pub fn host_veth_name(instance: &str, vps: &str) -> String {
    use sha2::Digest;
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let h = sha2::Sha256::digest(format!("{instance}/{vps}/{nonce}/{}", std::process::id()));
    format!("fv{}", &hex::encode(h)[..12])
}

/// Creates and wires the pair. On error, whatever was made is removed again.
/// `host_up`: the host end comes up at once; false keeps it down (a VPS
/// restored for a migration, held until the decision: nothing it has, its
/// IPv6 link-local start-up included, may reach the LAN while the VPS still
/// runs on the source; see [`super::lock`]).
pub async fn setup_vps_network(
    host: &Netlink,
    bridge: &str,
    netns: &Path,
    host_name: &str,
    cfg: &NetConfig,
    host_up: bool,
) -> Result<()> {
    let res = wire(host, bridge, netns, host_name, cfg, host_up).await;
    if res.is_err() {
        let _ = remove_veth(host, host_name).await;
    }
    res
}

async fn wire(
    host: &Netlink,
    bridge: &str,
    netns: &Path,
    host_name: &str,
    cfg: &NetConfig,
    host_up: bool,
) -> Result<()> {
    let br = host
        .link_index(bridge)
        .await?
        .ok_or_else(|| AgentError::Netlink(format!("bridge {bridge} is missing")))?;
    let ns = std::fs::File::open(netns)
        .map_err(|e| AgentError::io(format!("opening netns {}", netns.display()), e))?;
    // One request makes the whole pair: the peer is born inside the VPS's netns
    // as eth0 with its MAC, the host end on the bridge and up. Creating the peer
    // elsewhere and moving it costs the kernel an unregister and a register
    // (RCU grace periods), about half the network setup time.
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name("eth0".to_string())
        .address(cfg.mac.to_vec())
        .setns_by_fd(ns.as_raw_fd())
        .build();
    host.handle
        .link()
        .add(pair_message(host_name, br, peer, host_up))
        .execute()
        .await
        .map_err(|e| {
            nl(
                format!("creating veth {host_name} with eth0 in the VPS netns"),
                e,
            )
        })?;

    let inner = Netlink::in_netns(netns).await?;
    let ih = &inner.handle;
    for dev in ["lo", "eth0"] {
        let idx = inner
            .link_index(dev)
            .await?
            .ok_or_else(|| AgentError::Netlink(format!("no {dev} in the VPS netns")))?;
        ih.link()
            .set(LinkUnspec::new_with_index(idx).up().build())
            .execute()
            .await
            .map_err(|e| nl(format!("bringing {dev} up"), e))?;
    }
    let eidx = inner
        .link_index("eth0")
        .await?
        .ok_or_else(|| AgentError::Netlink("eth0 not found in the VPS netns".into()))?;
    ih.address()
        .add(eidx, IpAddr::V4(cfg.ip), cfg.prefix_len)
        .execute()
        .await
        .map_err(|e| nl(format!("adding {}/{} to eth0", cfg.ip, cfg.prefix_len), e))?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .gateway(cfg.gateway)
        .output_interface(eidx)
        .build();
    ih.route()
        .add(route)
        .execute()
        .await
        .map_err(|e| nl(format!("adding default route via {}", cfg.gateway), e))?;
    Ok(())
}

/// The request for a pair: the host end `host_name` on bridge index `br`
/// (up or not), the other end as `peer` describes it.
fn pair_message(
    host_name: &str,
    br: u32,
    peer: rtnetlink::packet_route::link::LinkMessage,
    host_up: bool,
) -> rtnetlink::packet_route::link::LinkMessage {
    let mut pair = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host_name.to_string())
        .controller(br);
    if host_up {
        pair = pair.up();
    }
    pair.set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build()
}

/// The name the VPS end of an unplaced pair has on the host (15 bytes).
pub fn unplaced_peer_name(host_name: &str) -> String {
    format!("{host_name}p")
}

/// The pair for a restore that makes the VPS's netns itself (an unprivileged
/// VPS: CRIU remakes its user namespace, and the netns that namespace owns,
/// from the images): the host end on the bridge as usual, the VPS end left on
/// the host as [`unplaced_peer_name`] with the VPS's MAC, for CRIU to move in
/// as eth0 (its address, routes and rules come from the images).
pub async fn setup_unplaced_veth(
    host: &Netlink,
    bridge: &str,
    host_name: &str,
    cfg: &NetConfig,
    host_up: bool,
) -> Result<()> {
    let res = async {
        let br = host
            .link_index(bridge)
            .await?
            .ok_or_else(|| AgentError::Netlink(format!("bridge {bridge} is missing")))?;
        let peer_name = unplaced_peer_name(host_name);
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer_name.clone())
            .address(cfg.mac.to_vec())
            .build();
        host.handle
            .link()
            .add(pair_message(host_name, br, peer, host_up))
            .execute()
            .await
            .map_err(|e| nl(format!("creating veth {host_name} with {peer_name}"), e))
    }
    .await;
    if res.is_err() {
        let _ = remove_veth(host, host_name).await;
    }
    res
}

/// Deletes a host-side veth (its peer goes with it); a missing one is fine.
pub async fn remove_veth(host: &Netlink, name: &str) -> Result<()> {
    let Some(idx) = host.link_index(name).await? else {
        return Ok(());
    };
    match host.handle.link().del(idx).execute().await {
        Ok(()) => Ok(()),
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(()),
        Err(e) => Err(nl(format!("deleting {name}"), e)),
    }
}
