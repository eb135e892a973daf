//! VPSes, cluster-wide: spec, where they run, desired and observed state, and
//! the generation that fences every change an agent is asked to make.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ferry_proto::agent::v1 as apb;
use serde::{Deserialize, Serialize};

use super::migration::{refuse_while_migrating, Migration, Outcome};
use super::{reject, ClusterState, RejectCode, Response};
use crate::scheduler::{self, PlacementReq};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Desired {
    Running,
    Stopped,
}

impl Desired {
    pub fn as_str(&self) -> &'static str {
        match self {
            Desired::Running => "running",
            Desired::Stopped => "stopped",
        }
    }
}

/// The VPS spec as the cluster stores it (the wire type, made serializable).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VpsSpecData {
    pub name: String,
    pub template: String,
    pub hostname: String,
    pub cpu_millicores: u32,
    pub cpu_weight: u32,
    pub memory_bytes: u64,
    pub swap_bytes: u64,
    pub pids: u32,
    pub ip: Option<Ipv4Addr>,
    pub prefix_len: u32,
    pub gateway: String,
    pub mac: String,
    pub init: Vec<String>,
    pub autostart: bool,
    pub stop_signal: String,
    /// No user namespace: root inside is host root.
    #[serde(default)]
    pub privileged: bool,
    /// First host id of the VPS's user-namespace range, handed out by the
    /// cluster at create (0: privileged, or not yet handed out).
    #[serde(default)]
    pub id_base: u32,
    /// Disk quota on its own files (0: none); placement counts it.
    #[serde(default)]
    pub disk_bytes: u64,
}

impl VpsSpecData {
    pub fn from_pb(s: &apb::VpsSpec) -> Result<Self, String> {
        if s.id_base != 0 {
            if s.privileged {
                return Err("invalid id_base: a privileged VPS has no id range".into());
            }
            ferry_proto::ids::check_base(s.id_base).map_err(|e| format!("invalid id_base: {e}"))?;
        }
        let l = s.limits.unwrap_or_default();
        let n = s.net.clone().unwrap_or_default();
        let ip = if n.ip.is_empty() {
            None
        } else {
            Some(
                n.ip.parse()
                    .map_err(|_| format!("invalid net.ip: {:?} is not an IPv4 address", n.ip))?,
            )
        };
        Ok(Self {
            name: s.name.clone(),
            template: s.template.clone(),
            hostname: s.hostname.clone(),
            cpu_millicores: l.cpu_millicores,
            cpu_weight: l.cpu_weight,
            memory_bytes: l.memory_bytes,
            swap_bytes: l.swap_bytes,
            pids: l.pids,
            ip,
            prefix_len: n.prefix_len,
            gateway: n.gateway,
            mac: n.mac,
            init: s.init.clone(),
            autostart: s.autostart,
            stop_signal: s.stop_signal.clone(),
            privileged: s.privileged,
            id_base: s.id_base,
            disk_bytes: l.disk_bytes,
        })
    }

    pub fn to_pb(&self, generation: u64) -> apb::VpsSpec {
        apb::VpsSpec {
            name: self.name.clone(),
            template: self.template.clone(),
            hostname: self.hostname.clone(),
            limits: Some(apb::Limits {
                cpu_millicores: self.cpu_millicores,
                cpu_weight: self.cpu_weight,
                memory_bytes: self.memory_bytes,
                swap_bytes: self.swap_bytes,
                pids: self.pids,
                disk_bytes: self.disk_bytes,
            }),
            net: self.ip.map(|ip| apb::NetConfig {
                ip: ip.to_string(),
                prefix_len: self.prefix_len,
                gateway: self.gateway.clone(),
                mac: self.mac.clone(),
            }),
            init: self.init.clone(),
            autostart: self.autostart,
            generation,
            stop_signal: self.stop_signal.clone(),
            privileged: self.privileged,
            id_base: self.id_base,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VpsRecord {
    pub spec: VpsSpecData,
    pub node: String,
    pub desired: Desired,
    /// What its node last reported ("pending" until it does).
    pub observed: String,
    /// Bumped by every change an agent must carry out; agents refuse older ones.
    pub generation: u64,
    pub placement_reason: String,
    pub anti_affinity_group: String,
    /// Labels every node it runs on must carry: every later placement
    /// (migration, drain, rebalance) honours them.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// The node it is pinned to (created with one named): the scheduler
    /// never moves it; an operator's migration to a named node moves the pin.
    #[serde(default)]
    pub pin_node: String,
    pub created_ms: i64,
    /// The migration in flight, if any.
    #[serde(default)]
    pub migration: Option<Migration>,
    /// How its last migration ended.
    #[serde(default)]
    pub last_migration: Option<Outcome>,
    /// Its last moves, oldest first (at most [`super::migration::HISTORY`]).
    #[serde(default)]
    pub history: Vec<super::migration::MoveRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum VpsCmd {
    Create {
        spec: Box<VpsSpecData>,
        pin_node: String,
        node_selector: BTreeMap<String, String>,
        anti_affinity_group: String,
        desired: Desired,
        allocate_ip: bool,
        now_ms: i64,
    },
    Delete {
        name: String,
        now_ms: i64,
    },
    /// Run or stop: a new generation, so the node must follow.
    SetDesired {
        name: String,
        desired: Desired,
        now_ms: i64,
    },
    /// What nodes reported (no new generation).
    Observe {
        updates: Vec<(String, String)>,
    },
    /// New limits (a new generation: the node must apply them).
    Update {
        name: String,
        limits: LimitsUpdate,
        now_ms: i64,
    },
    /// `node` no longer reports these deleted VPSes: what they held (their
    /// address, their id range, their name) is free now.
    Purge {
        node: String,
        names: Vec<String>,
        now_ms: i64,
    },
}

/// A deleted VPS its node has not confirmed gone yet (it may be down, its
/// VPSes running on): its address, id range and name stay held, or a new
/// VPS could take them while the old one still answers for them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Deleting {
    pub node: String,
    pub ip: Option<Ipv4Addr>,
    pub id_base: u32,
    pub since_ms: i64,
    /// Its template stays in use until the node confirms it gone.
    #[serde(default)]
    pub template: String,
}

/// Limits to change; None keeps the current value.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LimitsUpdate {
    pub cpu_millicores: Option<u32>,
    pub cpu_weight: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub swap_bytes: Option<u64>,
    pub pids: Option<u32>,
    #[serde(default)]
    pub disk_bytes: Option<u64>,
}

impl ClusterState {
    pub(super) fn apply_vps(&mut self, c: VpsCmd) -> Response {
        match c {
            VpsCmd::Create {
                mut spec,
                pin_node,
                node_selector,
                anti_affinity_group,
                desired,
                allocate_ip,
                now_ms,
            } => {
                if self.vps.contains_key(&spec.name) {
                    return reject(
                        RejectCode::AlreadyExists,
                        format!("VPS {:?} already exists", spec.name),
                    );
                }
                if let Some(d) = self.deleting.get(&spec.name) {
                    return reject(
                        RejectCode::AlreadyExists,
                        format!(
                            "VPS {:?} is still being deleted: {} has not confirmed it gone",
                            spec.name, d.node
                        ),
                    );
                }
                if let Some(ip) = spec.ip {
                    if let Some(h) = self.ip_pool.holder(ip) {
                        return reject(
                            RejectCode::AlreadyExists,
                            format!("net.ip {ip} is already held by VPS {h}"),
                        );
                    }
                } else if allocate_ip {
                    match self.ip_pool.next_free() {
                        Some(ip) => spec.ip = Some(ip),
                        None if self.ip_pool.cidr.is_none() => {
                            return reject(
                                RejectCode::FailedPrecondition,
                                "the cluster has no IP pool; give net.ip",
                            )
                        }
                        None => {
                            return reject(
                                RejectCode::ResourceExhausted,
                                "the cluster IP pool is exhausted",
                            )
                        }
                    }
                }
                if spec.privileged {
                    spec.id_base = 0;
                } else if spec.id_base != 0 {
                    if let Some(h) = self.id_bases.get(&spec.id_base) {
                        return reject(
                            RejectCode::AlreadyExists,
                            format!("id_base {} is already held by VPS {h}", spec.id_base),
                        );
                    }
                } else {
                    match lowest_free_base(&self.id_bases) {
                        Some(b) => spec.id_base = b,
                        None => {
                            return reject(
                                RejectCode::ResourceExhausted,
                                "every user-namespace id range is in use",
                            )
                        }
                    }
                }
                let req = PlacementReq {
                    template: &spec.template,
                    cpu_millicores: spec.cpu_millicores as u64,
                    memory_bytes: spec.memory_bytes,
                    disk_bytes: spec.disk_bytes,
                    pin_node: &pin_node,
                    exclude_node: "",
                    node_selector: &node_selector,
                    anti_affinity_group: &anti_affinity_group,
                    avoid: &[],
                    migration: false,
                };
                let (node, reason) = match scheduler::place(self, &req) {
                    Ok(p) => p,
                    Err(why) => return reject(RejectCode::ResourceExhausted, why),
                };
                if let Some(ip) = spec.ip {
                    self.ip_pool.take(ip, &spec.name);
                }
                let rec = VpsRecord {
                    spec: *spec,
                    node: node.clone(),
                    desired,
                    observed: "pending".into(),
                    generation: 1,
                    placement_reason: reason,
                    anti_affinity_group,
                    node_selector,
                    pin_node,
                    created_ms: now_ms,
                    migration: None,
                    last_migration: None,
                    history: Vec::new(),
                };
                self.events.push(
                    now_ms,
                    "vps",
                    &rec.spec.name,
                    format!("placed on {node}: {}", rec.placement_reason),
                );
                self.index_add(&rec);
                self.vps.insert(rec.spec.name.clone(), rec.clone());
                Response::Vps(Box::new(rec))
            }
            VpsCmd::SetDesired {
                name,
                desired,
                now_ms,
            } => match self.vps.get_mut(&name) {
                None => reject(RejectCode::NotFound, format!("VPS {name:?} not found")),
                Some(v) if v.migration.is_some() && v.desired != desired => {
                    refuse_while_migrating(v).unwrap_or(Response::Ok)
                }
                Some(v) => {
                    if v.desired != desired {
                        v.desired = desired;
                        v.generation += 1;
                    }
                    let v = v.clone();
                    self.events.push(
                        now_ms,
                        "vps",
                        &name,
                        format!("desired {} (generation {})", desired.as_str(), v.generation),
                    );
                    Response::Vps(Box::new(v))
                }
            },
            VpsCmd::Update {
                name,
                limits,
                now_ms,
            } => {
                let Some(old) = self.vps.get(&name).cloned() else {
                    return reject(RejectCode::NotFound, format!("VPS {name:?} not found"));
                };
                if let Some(r) = refuse_while_migrating(&old) {
                    return r;
                }
                let mut new = old.clone();
                let sp = &mut new.spec;
                sp.cpu_millicores = limits.cpu_millicores.unwrap_or(sp.cpu_millicores);
                sp.cpu_weight = limits.cpu_weight.unwrap_or(sp.cpu_weight);
                sp.memory_bytes = limits.memory_bytes.unwrap_or(sp.memory_bytes);
                sp.swap_bytes = limits.swap_bytes.unwrap_or(sp.swap_bytes);
                sp.pids = limits.pids.unwrap_or(sp.pids);
                if let Some(d) = limits.disk_bytes {
                    if old.spec.disk_bytes == 0 {
                        return reject(
                            RejectCode::FailedPrecondition,
                            format!("VPS {name} was created without a disk quota; one is given at create"),
                        );
                    }
                    if d < old.spec.disk_bytes {
                        return reject(
                            RejectCode::InvalidArgument,
                            format!(
                                "disk_bytes: a disk only grows ({d} is less than its {})",
                                old.spec.disk_bytes
                            ),
                        );
                    }
                    sp.disk_bytes = d;
                }
                // The node must still hold it, counting everything else there.
                if let Some(n) = self.nodes.get(&old.node) {
                    let (alloc, _) = self.allocated(&old.node);
                    // Saturating: an apply that panicked would stop every replica.
                    let cpu = alloc
                        .cpu_millicores
                        .saturating_sub(old.spec.cpu_millicores as u64)
                        + new.spec.cpu_millicores as u64;
                    let mem = alloc.memory_bytes.saturating_sub(old.spec.memory_bytes)
                        + new.spec.memory_bytes;
                    let disk =
                        alloc.disk_bytes.saturating_sub(old.spec.disk_bytes) + new.spec.disk_bytes;
                    if cpu > (n.capacity.cpu_millicores as f64 * self.sched.cpu_overcommit) as u64
                        || mem
                            > (n.capacity.memory_bytes as f64 * self.sched.memory_overcommit) as u64
                        || (n.capacity.disk_bytes > 0 && disk > n.capacity.disk_bytes)
                    {
                        return reject(
                            RejectCode::ResourceExhausted,
                            format!("node {} cannot hold the new limits", old.node),
                        );
                    }
                }
                new.generation += 1;
                self.index_remove(&old);
                self.index_add(&new);
                self.events.push(
                    now_ms,
                    "vps",
                    &name,
                    format!("limits changed (generation {})", new.generation),
                );
                self.vps.insert(name, new.clone());
                Response::Vps(Box::new(new))
            }
            VpsCmd::Observe { updates } => {
                for (name, observed) in updates {
                    if let Some(v) = self.vps.get_mut(&name) {
                        v.observed = observed;
                    }
                }
                Response::Ok
            }
            VpsCmd::Delete { name, now_ms } => match self.vps.get(&name) {
                None => reject(RejectCode::NotFound, format!("VPS {name:?} not found")),
                Some(v) if v.migration.is_some() => {
                    refuse_while_migrating(v).unwrap_or(Response::Ok)
                }
                Some(_) => {
                    let Some(v) = self.vps.remove(&name) else {
                        return Response::Ok;
                    };
                    self.index_remove(&v);
                    if !self.nodes.contains_key(&v.node) {
                        self.release(&name, v.spec.ip, v.spec.id_base);
                        self.events
                            .push(now_ms, "vps", &name, format!("deleted from {}", v.node));
                        return Response::Ok;
                    }
                    // Held until the node confirms the VPS gone (Purge).
                    if v.spec.id_base != 0 {
                        self.id_bases.insert(v.spec.id_base, name.clone());
                    }
                    self.deleting.insert(
                        name.clone(),
                        Deleting {
                            node: v.node.clone(),
                            ip: v.spec.ip,
                            id_base: v.spec.id_base,
                            since_ms: now_ms,
                            template: v.spec.template.clone(),
                        },
                    );
                    self.events.push(
                        now_ms,
                        "vps",
                        &name,
                        format!(
                            "deleted from {}; its address and ids are held until {} confirms it gone",
                            v.node, v.node
                        ),
                    );
                    Response::Ok
                }
            },
            VpsCmd::Purge {
                node,
                names,
                now_ms,
            } => {
                for name in names {
                    if self.deleting.get(&name).is_some_and(|d| d.node == node) {
                        if let Some(d) = self.deleting.remove(&name) {
                            self.release(&name, d.ip, d.id_base);
                            self.events.push(
                                now_ms,
                                "vps",
                                &name,
                                format!("gone from {node}: its address and ids are free"),
                            );
                        }
                    }
                }
                Response::Ok
            }
        }
    }

    /// Frees what a deleted VPS held.
    fn release(&mut self, name: &str, ip: Option<Ipv4Addr>, id_base: u32) {
        if let Some(ip) = ip {
            if self.ip_pool.holder(ip) == Some(name) {
                self.ip_pool.release(ip);
            }
        }
        if id_base != 0 && self.id_bases.get(&id_base).map(String::as_str) == Some(name) {
            self.id_bases.remove(&id_base);
        }
    }
}

/// The lowest free id range: the first gap in the sorted bases in use
/// (one pass, no per-slot lookups).
fn lowest_free_base(used: &BTreeMap<u32, String>) -> Option<u32> {
    use ferry_proto::ids::{FIRST_BASE, LAST_BASE, RANGE};
    let mut want = FIRST_BASE;
    for &b in used.keys() {
        if b < want {
            continue;
        }
        if b > want {
            break;
        }
        want = want.checked_add(RANGE)?;
    }
    (want <= LAST_BASE).then_some(want)
}
