//! Validation of a VPS spec from the wire into the agent's own [`VpsConfig`],
//! which is what `config.json` stores.

use std::net::Ipv4Addr;

use ferry_proto::agent::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::error::{AgentError, Result};

pub const DEFAULT_INIT: &str = "/sbin/init";
pub const DEFAULT_PIDS: u32 = 4096;
pub const DEFAULT_CPU_WEIGHT: u32 = 100;
/// A VPS needs room for init, a shell and the kernel's own per-cgroup overhead.
pub const MIN_MEMORY: u64 = 8 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LimitsConfig {
    pub cpu_millicores: u32,
    pub cpu_weight: u32,
    pub memory_bytes: u64,
    pub swap_bytes: u64,
    pub pids: u32,
    /// Disk quota (0: none); see [`crate::vps::disk`].
    #[serde(default)]
    pub disk_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetConfig {
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub mac: [u8; 6],
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VpsConfig {
    pub name: String,
    pub template: String,
    pub hostname: String,
    pub limits: LimitsConfig,
    pub net: Option<NetConfig>,
    pub init: Vec<String>,
    pub autostart: bool,
    pub generation: u64,
    /// Signal number that asks init to shut down.
    #[serde(default = "default_stop_signal")]
    pub stop_signal: i32,
    /// First host id of the VPS's user namespace ([`ferry_proto::ids`]);
    /// None: a privileged VPS, without one. Configs written before user
    /// namespaces existed read as None, which is what those VPSes were.
    /// `Some(0)` only between validation and create, which picks the range.
    #[serde(default)]
    pub id_base: Option<u32>,
}

impl VpsConfig {
    pub fn privileged(&self) -> bool {
        self.id_base.is_none()
    }
}

fn default_stop_signal() -> i32 {
    libc::SIGTERM
}

/// "SIGTERM", "TERM", "15", "SIGRTMIN+3" → a signal number a stop may use.
pub fn parse_stop_signal(s: &str) -> Result<i32> {
    if s.is_empty() {
        return Ok(libc::SIGTERM);
    }
    let t = s.trim().to_ascii_uppercase();
    let t = t.strip_prefix("SIG").unwrap_or(&t);
    let n = if let Ok(n) = t.parse::<i32>() {
        n
    } else if let Some(off) = t.strip_prefix("RTMIN+") {
        let off: i32 = off
            .parse()
            .map_err(|_| AgentError::invalid("stop_signal", format!("{s:?} is not a signal")))?;
        libc::SIGRTMIN() + off
    } else {
        match t {
            "TERM" => libc::SIGTERM,
            "PWR" => libc::SIGPWR,
            "INT" => libc::SIGINT,
            "QUIT" => libc::SIGQUIT,
            "HUP" => libc::SIGHUP,
            "USR1" => libc::SIGUSR1,
            "USR2" => libc::SIGUSR2,
            _ => {
                return Err(AgentError::invalid(
                    "stop_signal",
                    format!("{s:?} is not a signal name like SIGTERM"),
                ))
            }
        }
    };
    if n <= 0 || n > libc::SIGRTMAX() || n == libc::SIGKILL || n == libc::SIGSTOP {
        return Err(AgentError::invalid(
            "stop_signal",
            format!("{s:?} cannot ask init to stop"),
        ));
    }
    Ok(n)
}

pub fn format_signal(n: i32) -> String {
    match n {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGPWR => "SIGPWR".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGQUIT => "SIGQUIT".into(),
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGUSR1 => "SIGUSR1".into(),
        libc::SIGUSR2 => "SIGUSR2".into(),
        n if n >= libc::SIGRTMIN() => format!("SIGRTMIN+{}", n - libc::SIGRTMIN()),
        n => n.to_string(),
    }
}

/// Checks a name against DNS label rules (RFC 1123): 1-63 of `a-z0-9-`, not
/// starting or ending with `-`. Used for VPS and template names alike.
pub fn validate_name(field: &'static str, name: &str) -> Result<()> {
    ferry_proto::names::check_dns_label(name).map_err(|reason| AgentError::invalid(field, reason))
}

fn validate_hostname(h: &str) -> Result<()> {
    if h.len() > 64 {
        return Err(AgentError::invalid("hostname", "longer than 64 characters"));
    }
    for label in h.split('.') {
        validate_name("hostname", label)?;
    }
    Ok(())
}

/// A stable, locally administered unicast MAC derived from the VPS name.
pub fn mac_from_name(name: &str) -> [u8; 6] {
    use sha2::Digest;
    let h = sha2::Sha256::digest(name.as_bytes());
    [0x02, 0xfe, h[0], h[1], h[2], h[3]]
}

pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || {
        AgentError::invalid(
            "net.mac",
            format!("{s:?} is not a MAC like 02:00:00:00:00:01"),
        )
    };
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return Err(bad());
        }
        mac[i] = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 == 1 {
        return Err(AgentError::invalid(
            "net.mac",
            format!("{s} is a multicast address"),
        ));
    }
    if mac == [0; 6] {
        return Err(AgentError::invalid("net.mac", "all-zero MAC"));
    }
    Ok(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What the node can offer; a single VPS may not ask for more.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    pub cpu_millicores: u32,
    pub memory_bytes: u64,
}

/// The kernel's largest `pid_max`: no VPS can have more tasks.
pub const MAX_PIDS: u32 = 4 << 20;
/// Swap beyond this many times the node's memory is a typo, not a plan.
pub const MAX_SWAP_FACTOR: u64 = 4;

pub fn validate_limits(l: &LimitsConfig, cap: Capacity) -> Result<()> {
    if l.memory_bytes < MIN_MEMORY {
        return Err(AgentError::invalid(
            "limits.memory_bytes",
            format!(
                "{} is below the minimum of {} bytes",
                l.memory_bytes, MIN_MEMORY
            ),
        ));
    }
    if l.memory_bytes > cap.memory_bytes {
        return Err(AgentError::ResourceExhausted(format!(
            "limits.memory_bytes {} exceeds the node's memory ({} bytes)",
            l.memory_bytes, cap.memory_bytes
        )));
    }
    if l.cpu_millicores > cap.cpu_millicores {
        return Err(AgentError::ResourceExhausted(format!(
            "limits.cpu_millicores {} exceeds the node's {} millicores",
            l.cpu_millicores, cap.cpu_millicores
        )));
    }
    if l.cpu_millicores != 0 && l.cpu_millicores < 10 {
        return Err(AgentError::invalid(
            "limits.cpu_millicores",
            "at least 10 (or 0 for no quota)",
        ));
    }
    if !(1..=10000).contains(&l.cpu_weight) {
        return Err(AgentError::invalid(
            "limits.cpu_weight",
            "must be 1 to 10000",
        ));
    }
    if l.pids < 8 {
        return Err(AgentError::invalid("limits.pids", "at least 8 tasks"));
    }
    if l.pids > MAX_PIDS {
        return Err(AgentError::invalid(
            "limits.pids",
            format!("{} is over the kernel's most ({MAX_PIDS})", l.pids),
        ));
    }
    if l.disk_bytes != 0 {
        crate::vps::disk::check_size(l.disk_bytes)?;
    }
    let max_swap = cap.memory_bytes.saturating_mul(MAX_SWAP_FACTOR);
    if l.swap_bytes > max_swap {
        return Err(AgentError::invalid(
            "limits.swap_bytes",
            format!(
                "{} is over {MAX_SWAP_FACTOR} times the node's memory ({max_swap} bytes)",
                l.swap_bytes
            ),
        ));
    }
    Ok(())
}

pub fn limits_from_pb(l: Option<&pb::Limits>) -> Result<LimitsConfig> {
    let l = l.ok_or_else(|| {
        AgentError::invalid("limits", "missing (limits.memory_bytes is required)")
    })?;
    Ok(LimitsConfig {
        cpu_millicores: l.cpu_millicores,
        cpu_weight: if l.cpu_weight == 0 {
            DEFAULT_CPU_WEIGHT
        } else {
            l.cpu_weight
        },
        memory_bytes: l.memory_bytes,
        swap_bytes: l.swap_bytes,
        pids: if l.pids == 0 { DEFAULT_PIDS } else { l.pids },
        disk_bytes: l.disk_bytes,
    })
}

/// Turns a wire spec into a checked config. `bridge` is the node bridge's
/// network, used for the default gateway and to check the address fits.
pub fn validate_spec(
    spec: &pb::VpsSpec,
    cap: Capacity,
    bridge: ipnet::Ipv4Net,
) -> Result<VpsConfig> {
    validate_name("name", &spec.name)?;
    validate_name("template", &spec.template)?;
    let hostname = if spec.hostname.is_empty() {
        spec.name.clone()
    } else {
        spec.hostname.clone()
    };
    validate_hostname(&hostname)?;
    let limits = limits_from_pb(spec.limits.as_ref())?;
    validate_limits(&limits, cap)?;
    let net = match &spec.net {
        Some(n) if !n.ip.is_empty() => Some(validate_net(&spec.name, n, bridge)?),
        _ => None,
    };
    let init = if spec.init.is_empty() {
        vec![DEFAULT_INIT.to_string()]
    } else {
        spec.init.clone()
    };
    if !init[0].starts_with('/') {
        return Err(AgentError::invalid(
            "init",
            format!("{:?} must be an absolute path", init[0]),
        ));
    }
    if init.iter().any(|a| a.contains('\0')) {
        return Err(AgentError::invalid("init", "contains a NUL byte"));
    }
    Ok(VpsConfig {
        name: spec.name.clone(),
        template: spec.template.clone(),
        hostname,
        limits,
        net,
        init,
        autostart: spec.autostart,
        generation: spec.generation,
        stop_signal: parse_stop_signal(&spec.stop_signal)?,
        id_base: id_base_from_pb(spec)?,
    })
}

/// None for a privileged VPS; Some(0) when the agent is to pick the range.
fn id_base_from_pb(spec: &pb::VpsSpec) -> Result<Option<u32>> {
    if spec.privileged {
        if spec.id_base != 0 {
            return Err(AgentError::invalid(
                "id_base",
                "a privileged VPS has no id range (drop id_base or privileged)",
            ));
        }
        return Ok(None);
    }
    if spec.id_base != 0 {
        ferry_proto::ids::check_base(spec.id_base)
            .map_err(|reason| AgentError::invalid("id_base", reason))?;
    }
    Ok(Some(spec.id_base))
}

fn validate_net(name: &str, n: &pb::NetConfig, bridge: ipnet::Ipv4Net) -> Result<NetConfig> {
    let ip: Ipv4Addr = n
        .ip
        .parse()
        .map_err(|_| AgentError::invalid("net.ip", format!("{:?} is not an IPv4 address", n.ip)))?;
    let prefix_len = if n.prefix_len == 0 {
        bridge.prefix_len() as u32
    } else {
        n.prefix_len
    };
    if !(8..=30).contains(&prefix_len) {
        return Err(AgentError::invalid(
            "net.prefix_len",
            format!("{prefix_len} is not within 8..=30"),
        ));
    }
    let net = ipnet::Ipv4Net::new(ip, prefix_len as u8)
        .map_err(|e| AgentError::invalid("net.prefix_len", e.to_string()))?;
    if ip == net.network()
        || ip == net.broadcast()
        || ip.is_loopback()
        || ip.is_multicast()
        || ip.is_unspecified()
    {
        return Err(AgentError::invalid(
            "net.ip",
            format!("{ip} is not a usable host address in {net}"),
        ));
    }
    if ip == bridge.addr() {
        return Err(AgentError::invalid(
            "net.ip",
            format!("{ip} is the node bridge's own address"),
        ));
    }
    // Only the node network's addresses: an address outside it (the host's
    // own, another network's) is not the VPS's to claim.
    if !bridge.contains(&ip) {
        return Err(AgentError::invalid(
            "net.ip",
            format!("{ip} is outside this node's VPS network {bridge}"),
        ));
    }
    let gateway = if n.gateway.is_empty() {
        bridge.addr()
    } else {
        n.gateway.parse().map_err(|_| {
            AgentError::invalid(
                "net.gateway",
                format!("{:?} is not an IPv4 address", n.gateway),
            )
        })?
    };
    if !net.contains(&gateway) || gateway == ip {
        return Err(AgentError::invalid(
            "net.gateway",
            format!("{gateway} is not another address in {net}"),
        ));
    }
    let mac = if n.mac.is_empty() {
        mac_from_name(name)
    } else {
        parse_mac(&n.mac)?
    };
    Ok(NetConfig {
        ip,
        prefix_len: prefix_len as u8,
        gateway,
        mac,
    })
}

impl VpsConfig {
    pub fn to_pb(&self) -> pb::VpsSpec {
        pb::VpsSpec {
            name: self.name.clone(),
            template: self.template.clone(),
            hostname: self.hostname.clone(),
            limits: Some(pb::Limits {
                cpu_millicores: self.limits.cpu_millicores,
                cpu_weight: self.limits.cpu_weight,
                memory_bytes: self.limits.memory_bytes,
                swap_bytes: self.limits.swap_bytes,
                pids: self.limits.pids,
                disk_bytes: self.limits.disk_bytes,
            }),
            net: self.net.as_ref().map(|n| pb::NetConfig {
                ip: n.ip.to_string(),
                prefix_len: n.prefix_len as u32,
                gateway: n.gateway.to_string(),
                mac: format_mac(&n.mac),
            }),
            init: self.init.clone(),
            autostart: self.autostart,
            generation: self.generation,
            stop_signal: format_signal(self.stop_signal),
            privileged: self.privileged(),
            id_base: self.id_base.unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap() -> Capacity {
        Capacity {
            cpu_millicores: 2000,
            memory_bytes: 1 << 30,
        }
    }
    fn bridge() -> ipnet::Ipv4Net {
        "10.77.0.1/16".parse().unwrap()
    }
    fn spec(name: &str) -> pb::VpsSpec {
        pb::VpsSpec {
            name: name.into(),
            template: "busybox".into(),
            limits: Some(pb::Limits {
                memory_bytes: 64 << 20,
                ..Default::default()
            }),
            net: Some(pb::NetConfig {
                ip: "10.77.0.5".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn names_follow_dns_label_rules() {
        for ok in ["a", "web1", "a-b", &"x".repeat(63)] {
            assert!(validate_name("name", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "../x",
            &"x".repeat(64),
            "a b",
        ] {
            let e = validate_name("name", bad).unwrap_err().to_string();
            assert!(e.contains("invalid name"), "{bad}: {e}");
        }
    }

    #[test]
    fn defaults_fill_in() {
        let c = validate_spec(&spec("web1"), cap(), bridge()).unwrap();
        assert_eq!(c.hostname, "web1");
        assert_eq!(c.init, vec!["/sbin/init"]);
        assert_eq!(c.limits.pids, DEFAULT_PIDS);
        let n = c.net.unwrap();
        assert_eq!(n.prefix_len, 16);
        assert_eq!(n.gateway, Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(n.mac, mac_from_name("web1"));
        assert_eq!(mac_from_name("web1"), mac_from_name("web1"));
        assert_eq!(c.stop_signal, libc::SIGTERM);
        for (name, n) in [
            ("SIGPWR", libc::SIGPWR),
            ("pwr", libc::SIGPWR),
            ("SIGRTMIN+3", libc::SIGRTMIN() + 3),
            ("15", 15),
        ] {
            assert_eq!(parse_stop_signal(name).unwrap(), n, "{name}");
            assert_eq!(parse_stop_signal(&format_signal(n)).unwrap(), n);
        }
        assert_ne!(mac_from_name("web1"), mac_from_name("web2"));
    }

    #[test]
    fn rejects_bad_fields_naming_them() {
        type Mutate = Box<dyn Fn(&mut pb::VpsSpec)>;
        let cases: Vec<(Mutate, &str)> = vec![
            (
                Box::new(|s| s.net.as_mut().unwrap().ip = "10.77.0.300".into()),
                "net.ip",
            ),
            (
                Box::new(|s| s.net.as_mut().unwrap().ip = "10.77.0.1".into()),
                "net.ip",
            ),
            (
                Box::new(|s| s.net.as_mut().unwrap().ip = "10.77.255.255".into()),
                "net.ip",
            ),
            (
                Box::new(|s| s.net.as_mut().unwrap().ip = "192.168.9.9".into()),
                "net.ip",
            ),
            // Outside the node network even with a gateway of its own.
            (
                Box::new(|s| {
                    let n = s.net.as_mut().unwrap();
                    n.ip = "192.168.9.9".into();
                    n.prefix_len = 24;
                    n.gateway = "192.168.9.1".into();
                }),
                "net.ip",
            ),
            (
                Box::new(|s| s.limits.as_mut().unwrap().pids = u32::MAX),
                "limits.pids",
            ),
            (
                Box::new(|s| s.limits.as_mut().unwrap().swap_bytes = u64::MAX),
                "limits.swap_bytes",
            ),
            (
                Box::new(|s| s.net.as_mut().unwrap().mac = "01:00:00:00:00:01".into()),
                "net.mac",
            ),
            (
                Box::new(|s| s.net.as_mut().unwrap().mac = "zz".into()),
                "net.mac",
            ),
            (Box::new(|s| s.limits = None), "limits"),
            (
                Box::new(|s| s.limits.as_mut().unwrap().memory_bytes = 1024),
                "limits.memory_bytes",
            ),
            (
                Box::new(|s| s.limits.as_mut().unwrap().memory_bytes = 4 << 30),
                "limits.memory_bytes",
            ),
            (
                Box::new(|s| s.limits.as_mut().unwrap().cpu_millicores = 64000),
                "limits.cpu_millicores",
            ),
            (
                Box::new(|s| s.limits.as_mut().unwrap().cpu_weight = 20000),
                "limits.cpu_weight",
            ),
            (Box::new(|s| s.template = "../etc".into()), "template"),
            (Box::new(|s| s.hostname = "bad_host".into()), "hostname"),
            (Box::new(|s| s.init = vec!["sbin/init".into()]), "init"),
            (
                Box::new(|s| s.stop_signal = "SIGKILL".into()),
                "stop_signal",
            ),
            (Box::new(|s| s.stop_signal = "NOPE".into()), "stop_signal"),
        ];
        for (mutate, field) in cases {
            let mut s = spec("web1");
            mutate(&mut s);
            let e = validate_spec(&s, cap(), bridge()).unwrap_err().to_string();
            assert!(e.contains(field), "expected {field} in {e:?}");
        }
    }
}
