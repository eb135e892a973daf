//! The host firewall: VPSes may not reach the host's own addresses.
//!
//! A VPS is a tenant's machine; the host's daemons (agent, controller, sshd,
//! anything listening on a wildcard address) are not its business, and
//! neither are its neighbours' addresses. The agent keeps one nftables table
//! pair per bridge, set at every start in one `nft -f` transaction, and left
//! in place when it stops, since the VPSes keep running without it:
//!
//! 0. **Network identity** (bridge table, per VPS port). A frame from a VPS's
//!    veth passes only with the VPS's own MAC as source, ARP only with its
//!    own MAC and IPv4 address as sender, IPv4 only from its address, IPv6
//!    only from link-local or unspecified addresses and never as a router
//!    (RA, redirect); other ethertypes (VLAN tags included) are dropped. Each
//!    port has its own chain, reached through the `ports` verdict map; a VPS
//!    port the map does not know passes nothing. The port's rules are made
//!    with its veth, so they follow the VPS to whichever node runs it. The
//!    bridge table is never replaced whole (that would drop the running VPSes'
//!    ports): its base chain is flushed and refilled, and
//!    [`sync_ports`] makes the port chains match the VPSes found at start.
//! 1. **Local VPSes.** A bridge-family rule marks every frame that enters the
//!    bridge from a VPS's veth (`fv…`); the IP input hook sends marked
//!    packets to [`FROM_VPS`], whatever host address they were sent to.
//! 2. **VPSes on other nodes** reach this node over the shared VPS LAN, through
//!    the uplink port, where they look like any host. Of this node's
//!    addresses they may reach only the bridge's own (the VPS gateway and the
//!    CRIU page server's fallback address): a packet that arrives on the
//!    bridge for any other local address, the management address included (a
//!    VPS can route to it via our bridge address: Linux accepts any local
//!    address on any interface), goes to [`FROM_VPS`] too.
//! 3. **Forwarding.** When the host routes, nothing from the bridge is
//!    forwarded into the management network.
//! 4. **Page servers.** A post-copy's CRIU page server listens on
//!    127.77.0.1 for its agent's relay: no host user but root connects there.
//!
//! [`FROM_VPS`] lets through replies to connections the host opened, ping,
//! the ICMP a path needs, IPv6 neighbour discovery, and what the operator
//! allows (`--vps-host-allow tcp:53`); everything else is dropped and counted.
//!
//! The daemons should listen on a management address that is not the bridge
//! address: the agent warns when they do not (rule 2 cannot tell a VPS on
//! another node from a host when both share one address).
//!
//! We run the `nft` binary with a ruleset text, as Incus does: the netlink
//! crates for nftables are young, and nft's own parser gives the atomic
//! whole-table replace and readable errors for free.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::error::{AgentError, Result};

/// The chain every packet from a VPS to a host address is judged in.
pub const FROM_VPS: &str = "from_vps";

/// Where post-copy page servers listen (loopback): only root may connect.
const PAGE_SERVERS: &str = "127.77.0.1";

/// The packet mark bit that says "entered the bridge from a VPS's veth".
pub const VPS_MARK: u32 = 0x0020_0000;

/// The prefix of every VPS's host-side veth (see [`super::host_veth_name`]).
const VPS_PORTS: &str = "fv*";

/// The verdict map from a VPS port's name to its chain.
const PORTS_MAP: &str = "ports";

/// The filter chain of one VPS port.
fn port_chain(port: &str) -> String {
    format!("port_{port}")
}

/// The identity a VPS's port enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// The host-side veth.
    pub name: String,
    pub mac: [u8; 6],
    pub ip: std::net::Ipv4Addr,
}

/// A port on the host that VPSes may reach (`--vps-host-allow tcp:53`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allow {
    pub proto: Proto,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl std::str::FromStr for Allow {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (proto, port) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: use PROTO:PORT, e.g. tcp:53 or udp:53"))?;
        let proto = match proto {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            p => return Err(format!("{p:?}: the protocol is tcp or udp")),
        };
        let port = match port.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(format!("{port:?}: the port is 1-65535")),
        };
        Ok(Allow { proto, port })
    }
}

impl std::fmt::Display for Allow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        write!(f, "{p}:{}", self.port)
    }
}

/// What the agent was asked for (`--host-firewall`, `--vps-host-allow`).
#[derive(Debug, Clone, Default)]
pub struct HostFirewall {
    pub allow: Vec<Allow>,
}

/// The rules for one bridge.
#[derive(Debug, Clone)]
pub struct Rules {
    pub bridge: String,
    /// The network of the management address, when it is not on the bridge:
    /// nothing from the bridge is forwarded into it.
    pub management_net: Option<ipnet::IpNet>,
    pub allow: Vec<Allow>,
}

/// The tables' name for a bridge: interface names may hold characters nft
/// identifiers may not, so the name is hex.
pub fn table_name(bridge: &str) -> String {
    format!("ferry_{}", hex::encode(bridge.as_bytes()))
}

/// An interface name we are about to quote inside a ruleset.
fn check_ifname(field: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(AgentError::invalid(
            field,
            format!("{name:?}: use 1-15 letters, digits, '_', '-' or '.'"),
        ))
    }
}

impl Rules {
    /// The nft script that replaces this bridge's tables in one transaction.
    pub fn script(&self) -> Result<String> {
        check_ifname("bridge", &self.bridge)?;
        let t = table_name(&self.bridge);
        let br = &self.bridge;
        let mut s = String::new();
        // The bridge table keeps its port chains and map (running VPSes'
        // ports): made if missing, its base chain emptied and refilled. The
        // inet table holds no state: "add, delete, define" is nft's idiom for
        // an atomic replace that also works when the table does not exist yet.
        let _ = write!(
            s,
            "add table bridge {t}
add map bridge {t} {PORTS_MAP} {{ type ifname : verdict; }}
add chain bridge {t} prerouting {{ type filter hook prerouting priority -300; policy accept; }}
flush chain bridge {t} prerouting
add rule bridge {t} prerouting iifname \"{VPS_PORTS}\" meta mark set meta mark | {VPS_MARK:#010x}
add rule bridge {t} prerouting iifname \"{VPS_PORTS}\" iifname vmap @{PORTS_MAP}
add rule bridge {t} prerouting iifname \"{VPS_PORTS}\" counter drop
table inet {t}
delete table inet {t}
"
        );
        let _ = write!(
            s,
            "table inet {t} {{
  chain {FROM_VPS} {{
    ct state established,related accept
    ct state invalid drop
    icmp type {{ echo-request, destination-unreachable, time-exceeded, parameter-problem }} accept
    icmpv6 type {{ echo-request, destination-unreachable, packet-too-big, time-exceeded, parameter-problem, nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit }} accept
"
        );
        for a in &self.allow {
            let p = match a.proto {
                Proto::Tcp => "tcp",
                Proto::Udp => "udp",
            };
            let _ = writeln!(s, "    {p} dport {} accept", a.port);
        }
        let _ = write!(
            s,
            "    counter drop
  }}
  chain input {{
    type filter hook input priority filter - 10; policy accept;
    meta mark & {VPS_MARK:#010x} == {VPS_MARK:#010x} jump {FROM_VPS}
    iifname \"{br}\" fib daddr . iif type != local jump {FROM_VPS}
  }}
  chain output {{
    type filter hook output priority filter - 10; policy accept;
    ip daddr {PAGE_SERVERS} meta skuid != 0 counter reject
  }}
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
"
        );
        match self.management_net {
            Some(ipnet::IpNet::V4(n)) => {
                let _ = writeln!(
                    s,
                    "    iifname \"{br}\" ip daddr {} counter drop",
                    n.trunc()
                );
            }
            Some(ipnet::IpNet::V6(n)) => {
                let _ = writeln!(
                    s,
                    "    iifname \"{br}\" ip6 daddr {} counter drop",
                    n.trunc()
                );
            }
            None => {}
        }
        s.push_str("  }\n}\n");
        Ok(s)
    }

    /// Installs the rules (blocking: runs `nft`).
    pub fn apply(&self) -> Result<()> {
        let script = self.script()?;
        nft(&script).map_err(|e| {
            AgentError::FailedPrecondition(format!(
                "installing the host firewall for bridge {}: {e}",
                self.bridge
            ))
        })
    }
}

/// Removes a bridge's tables, if any (blocking).
pub fn remove(bridge: &str) -> Result<()> {
    check_ifname("bridge", bridge)?;
    let t = table_name(bridge);
    let mut s = String::new();
    for family in ["bridge", "inet"] {
        let _ = writeln!(s, "table {family} {t}\ndelete table {family} {t}");
    }
    nft(&s).map_err(|e| AgentError::FailedPrecondition(format!("removing {t}: {e}")))
}

impl Port {
    /// The statements that (re)define this port's chain and map entry.
    fn script(&self, table: &str) -> Result<String> {
        check_ifname("host_veth", &self.name)?;
        let c = port_chain(&self.name);
        let mac = self
            .mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let ip = self.ip;
        let mut s = String::new();
        let _ = write!(
            s,
            "add chain bridge {table} {c}
flush chain bridge {table} {c}
add rule bridge {table} {c} ether saddr != {mac} drop
add rule bridge {table} {c} ether type arp arp saddr ether != {mac} drop
add rule bridge {table} {c} ether type arp arp saddr ip != {{ 0.0.0.0, {ip} }} drop
add rule bridge {table} {c} ether type ip ip saddr != {ip} drop
add rule bridge {table} {c} ether type ip6 ip6 saddr != {{ ::, fe80::/10 }} drop
add rule bridge {table} {c} ether type ip6 icmpv6 type {{ nd-router-advert, nd-redirect }} drop
add rule bridge {table} {c} ether type {{ arp, ip, ip6 }} accept
add rule bridge {table} {c} counter drop
add element bridge {table} {PORTS_MAP} {{ \"{}\" : jump {c} }}
",
            self.name
        );
        Ok(s)
    }
}

/// Gives a VPS's new port its identity rules (blocking). Until then the port
/// passes nothing.
pub fn add_port(bridge: &str, port: &Port) -> Result<()> {
    check_ifname("bridge", bridge)?;
    let script = port.script(&table_name(bridge))?;
    nft(&script)
        .map_err(|e| AgentError::FailedPrecondition(format!("filtering port {}: {e}", port.name)))
}

/// Removes a port's rules (blocking); rules already gone are fine.
pub fn remove_port(bridge: &str, port: &str) -> Result<()> {
    check_ifname("bridge", bridge)?;
    check_ifname("host_veth", port)?;
    let t = table_name(bridge);
    let c = port_chain(port);
    // Each its own transaction: either may be gone already.
    let _ = nft(&format!(
        "delete element bridge {t} {PORTS_MAP} {{ \"{port}\" }}\n"
    ));
    match nft(&format!("delete chain bridge {t} {c}\n")) {
        Ok(()) => Ok(()),
        Err(e) if e.contains("No such file or directory") => Ok(()),
        Err(e) => Err(AgentError::FailedPrecondition(format!(
            "removing the filter of port {port}: {e}"
        ))),
    }
}

/// Makes the port chains exactly `ports` (blocking, one transaction): what an
/// agent finds running at start keeps its filter, leftovers of VPSes gone
/// while no agent ran are removed.
pub fn sync_ports(bridge: &str, ports: &[Port]) -> Result<()> {
    check_ifname("bridge", bridge)?;
    let t = table_name(bridge);
    let listing = nft_out(&["list", "table", "bridge", &t])
        .map_err(|e| AgentError::FailedPrecondition(format!("reading the port filters: {e}")))?;
    let mut s = format!("flush map bridge {t} {PORTS_MAP}\n");
    for chain in listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("chain "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| c.starts_with("port_"))
    {
        if !ports.iter().any(|p| port_chain(&p.name) == chain) {
            let _ = writeln!(s, "delete chain bridge {t} {chain}");
        }
    }
    for p in ports {
        s.push_str(&p.script(&t)?);
    }
    nft(&s).map_err(|e| AgentError::FailedPrecondition(format!("syncing the port filters: {e}")))
}

/// Runs nft with `args` and returns what it printed.
fn nft_out(args: &[&str]) -> std::result::Result<String, String> {
    let out = Command::new("nft")
        .args(args)
        .output()
        .map_err(|e| format!("running nft: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `nft -f -` with `script` on its stdin.
fn nft(script: &str) -> std::result::Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "nft is not installed (Debian: apt install \
                nftables), or start the agent with --host-firewall=false"
                .to_string(),
            _ => format!("running nft: {e}"),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("writing to nft: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!("nft failed ({}): {}", out.status, err.trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_parses_and_refuses() {
        assert_eq!(
            "tcp:53".parse::<Allow>(),
            Ok(Allow {
                proto: Proto::Tcp,
                port: 53
            })
        );
        assert_eq!(
            "udp:53".parse::<Allow>().map(|a| a.to_string()),
            Ok("udp:53".into())
        );
        for bad in ["53", "icmp:1", "tcp:0", "tcp:65536", "tcp:", ":53"] {
            assert!(bad.parse::<Allow>().is_err(), "{bad}");
        }
    }

    #[test]
    fn script_covers_the_three_rules() {
        let r = Rules {
            bridge: "ferrybr0".into(),
            management_net: Some("10.87.0.12/24".parse().unwrap()),
            allow: vec!["tcp:53".parse().unwrap()],
        };
        let s = r.script().unwrap();
        let t = table_name("ferrybr0");
        assert!(s.starts_with(&format!("add table bridge {t}\n")));
        assert!(s.contains(&format!("table inet {t}\ndelete table inet {t}\n")));
        assert!(s.contains("iifname \"fv*\" meta mark set meta mark | 0x00200000"));
        assert!(s.contains("iifname \"fv*\" iifname vmap @ports"));
        assert!(s.contains("jump from_vps\n    iifname \"ferrybr0\" fib daddr . iif type != local"));
        assert!(s.contains("tcp dport 53 accept\n    counter drop"));
        assert!(s.contains("iifname \"ferrybr0\" ip daddr 10.87.0.0/24 counter drop"));
        let none = Rules {
            management_net: None,
            allow: Vec::new(),
            ..r
        };
        assert!(!none.script().unwrap().contains("daddr 10.87"));
    }

    #[test]
    fn a_port_passes_only_its_own_identity() {
        let p = Port {
            name: "fv0123456789ab".into(),
            mac: [2, 0xfe, 10, 77, 0, 10],
            ip: "10.77.0.10".parse().unwrap(),
        };
        let s = p.script("ferry_t").unwrap();
        let c = "bridge ferry_t port_fv0123456789ab";
        assert!(s.contains(&format!("{c} ether saddr != 02:fe:0a:4d:00:0a drop")));
        assert!(s.contains(&format!(
            "{c} ether type arp arp saddr ip != {{ 0.0.0.0, 10.77.0.10 }} drop"
        )));
        assert!(s.contains(&format!("{c} ether type ip ip saddr != 10.77.0.10 drop")));
        assert!(s
            .trim_end()
            .ends_with("{ \"fv0123456789ab\" : jump port_fv0123456789ab }"));
        let bad = Port {
            name: "fv\" accept".into(),
            ..p
        };
        assert!(bad.script("ferry_t").is_err());
    }

    #[test]
    fn names_that_would_break_the_script_are_refused() {
        for bad in ["", "br\"0", "br 0", "br;0", "averyveryverylongname"] {
            let r = Rules {
                bridge: bad.into(),
                management_net: None,
                allow: Vec::new(),
            };
            assert!(r.script().is_err(), "{bad:?}");
        }
        assert_eq!(table_name("fbr-0"), "ferry_6662722d30");
    }
}
