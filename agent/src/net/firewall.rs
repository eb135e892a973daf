//! The host firewall: VPSes may not reach the host's own addresses.
//!
//! A VPS is a tenant's machine; the host's daemons (agent, controller, sshd,
//! anything listening on a wildcard address) are not its business. The agent
//! keeps one nftables table pair per bridge, replaced whole and atomically at
//! every start (one `nft -f` transaction), and left in place when it stops,
//! since the VPSes keep running without it:
//!
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

/// The packet mark bit that says "entered the bridge from a VPS's veth".
pub const VPS_MARK: u32 = 0x0020_0000;

/// The prefix of every VPS's host-side veth (see [`super::host_veth_name`]).
const VPS_PORTS: &str = "fv*";

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
        // "add, delete, define" is nft's idiom for an atomic replace that
        // also works when the table does not exist yet.
        for family in ["bridge", "inet"] {
            let _ = writeln!(s, "table {family} {t}\ndelete table {family} {t}");
        }
        let _ = write!(
            s,
            "table bridge {t} {{
  chain prerouting {{
    type filter hook prerouting priority -300; policy accept;
    iifname \"{VPS_PORTS}\" meta mark set meta mark | {VPS_MARK:#010x}
  }}
}}
table inet {t} {{
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
        assert!(s.starts_with(&format!("table bridge {t}\ndelete table bridge {t}\n")));
        assert!(s.contains("iifname \"fv*\" meta mark set meta mark | 0x00200000"));
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
