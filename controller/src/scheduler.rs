//! Placement: which node a VPS goes to, and why.
//!
//! Filters, in order: the node is ready (not down, not cordoned); it is the
//! pinned node if one is given; it carries every label of the selector; it holds
//! no VPS of the same anti-affinity group; the VPS's CPU and memory fit within
//! the node's capacity times the overcommit factors, counting the limits of the
//! VPSes already there. Scoring: `binpack` prefers the node that is fullest after
//! placement (fewer nodes busy, big holes kept free), `spread` the emptiest
//! (load evened out). Fullness is the mean of the CPU and memory fractions.
//! Ties go to the node whose name sorts first, so every replica decides alike.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::state::{ClusterState, NodeRecord};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum Policy {
    #[default]
    Binpack,
    Spread,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SchedConfig {
    pub policy: Policy,
    /// Allowed sum of CPU limits as a multiple of the node's CPUs.
    pub cpu_overcommit: f64,
    /// Allowed sum of memory limits as a multiple of the node's memory.
    pub memory_overcommit: f64,
}

impl Default for SchedConfig {
    fn default() -> Self {
        Self {
            policy: Policy::Binpack,
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
        }
    }
}

pub struct PlacementReq<'a> {
    pub cpu_millicores: u64,
    pub memory_bytes: u64,
    pub pin_node: &'a str,
    pub node_selector: &'a BTreeMap<String, String>,
    pub anti_affinity_group: &'a str,
}

/// Why a node cannot take the VPS, or None.
fn reject_reason(s: &ClusterState, n: &NodeRecord, r: &PlacementReq) -> Option<String> {
    if n.down {
        return Some("down".into());
    }
    if n.cordoned {
        return Some("cordoned".into());
    }
    if !r.pin_node.is_empty() && r.pin_node != n.name {
        return Some(format!("not the requested node {}", r.pin_node));
    }
    for (k, v) in r.node_selector {
        if n.labels.get(k) != Some(v) {
            return Some(format!("label {k}={v} missing"));
        }
    }
    if !r.anti_affinity_group.is_empty()
        && s.vps
            .values()
            .any(|v| v.node == n.name && v.anti_affinity_group == r.anti_affinity_group)
    {
        return Some(format!(
            "already holds a VPS of anti-affinity group {}",
            r.anti_affinity_group
        ));
    }
    let (alloc, _) = s.allocated(&n.name);
    let cpu_cap = (n.capacity.cpu_millicores as f64 * s.sched.cpu_overcommit) as u64;
    if alloc.cpu_millicores + r.cpu_millicores > cpu_cap {
        return Some(format!(
            "cpu {}m allocated + {}m asked > {}m ({}x overcommit)",
            alloc.cpu_millicores, r.cpu_millicores, cpu_cap, s.sched.cpu_overcommit
        ));
    }
    let mem_cap = (n.capacity.memory_bytes as f64 * s.sched.memory_overcommit) as u64;
    if alloc.memory_bytes + r.memory_bytes > mem_cap {
        return Some(format!(
            "memory {} MiB allocated + {} MiB asked > {} MiB",
            alloc.memory_bytes >> 20,
            r.memory_bytes >> 20,
            mem_cap >> 20
        ));
    }
    None
}

/// Fullness after placement, 0..=1 (more when overcommitted).
fn fullness(s: &ClusterState, n: &NodeRecord, r: &PlacementReq) -> f64 {
    let (alloc, _) = s.allocated(&n.name);
    let frac = |used: u64, cap: u64| {
        if cap == 0 {
            1.0
        } else {
            used as f64 / cap as f64
        }
    };
    (frac(
        alloc.cpu_millicores + r.cpu_millicores,
        n.capacity.cpu_millicores,
    ) + frac(alloc.memory_bytes + r.memory_bytes, n.capacity.memory_bytes))
        / 2.0
}

/// Chooses a node: Ok((node, why)) or Err(why each node was rejected).
pub fn place(s: &ClusterState, r: &PlacementReq) -> Result<(String, String), String> {
    if s.nodes.is_empty() {
        return Err("no nodes are registered".into());
    }
    let mut fits = Vec::new();
    let mut rejected = Vec::new();
    for n in s.nodes.values() {
        match reject_reason(s, n, r) {
            Some(why) => rejected.push(format!("{}: {why}", n.name)),
            None => fits.push((fullness(s, n, r), n)),
        }
    }
    // Nodes iterate in name order and the sort is stable: ties keep name order.
    match s.sched.policy {
        Policy::Binpack => fits.sort_by(|a, b| b.0.total_cmp(&a.0)),
        Policy::Spread => fits.sort_by(|a, b| a.0.total_cmp(&b.0)),
    }
    let Some((score, best)) = fits.first() else {
        return Err(format!("no node can take it: {}", rejected.join("; ")));
    };
    let policy = match s.sched.policy {
        Policy::Binpack => "binpack",
        Policy::Spread => "spread",
    };
    let mut why = format!(
        "{policy}: {} is {:.0}% full after placement",
        best.name,
        score * 100.0
    );
    if fits.len() > 1 {
        why.push_str(&format!(" (best of {} that fit)", fits.len()));
    }
    if !rejected.is_empty() {
        why.push_str(&format!("; rejected {}", rejected.join("; ")));
    }
    Ok((best.name.clone(), why))
}
