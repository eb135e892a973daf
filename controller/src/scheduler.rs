//! Placement: which node a VPS goes to, and why.
//!
//! Filters, in order: the node is ready (not down, not cordoned); it has the
//! VPS's template (once it has reported its templates); its disk is not 95%
//! full (VPSes have no disk quota yet to fit more exactly); it is the
//! pinned node if one is given; it carries every label of the selector; it holds
//! no VPS of the same anti-affinity group; the VPS's CPU and memory fit within
//! the node's capacity times the overcommit factors, counting the limits of the
//! VPSes already there. Scoring: `binpack` prefers the node that is fullest after
//! placement (fewer nodes busy, big holes kept free), `spread` the emptiest
//! (load evened out). Fullness is the mean of the CPU and memory fractions.
//! Ties go to the node whose name sorts first, so every replica decides alike.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::state::{ClusterState, NodeAlloc, NodeRecord};

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
    /// Migrations one node takes part in at once, as source or target: a
    /// drain never swamps a node.
    #[serde(default = "default_max_migrations")]
    pub max_migrations_per_node: u32,
}

fn default_max_migrations() -> u32 {
    4
}

impl Default for SchedConfig {
    fn default() -> Self {
        Self {
            policy: Policy::Binpack,
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
            max_migrations_per_node: default_max_migrations(),
        }
    }
}

/// Disk use (of the node's reported capacity) above which it takes no new VPS.
pub const DISK_FULL: f64 = 0.95;

pub struct PlacementReq<'a> {
    /// The VPS's template: a node known not to have it is refused.
    pub template: &'a str,
    pub cpu_millicores: u64,
    pub memory_bytes: u64,
    /// Its disk quota (0: none).
    pub disk_bytes: u64,
    pub pin_node: &'a str,
    /// A node that may not take it (a migrating VPS's own).
    pub exclude_node: &'a str,
    pub node_selector: &'a BTreeMap<String, String>,
    pub anti_affinity_group: &'a str,
    /// Nodes not to choose (a drain's earlier failed targets).
    pub avoid: &'a [String],
    /// A migration: a node with [`SchedConfig::max_migrations_per_node`]
    /// migrations in flight (in or out) takes no more for now.
    pub migration: bool,
}

/// Why a node cannot take the VPS, or None.
fn reject_reason(
    s: &ClusterState,
    n: &NodeRecord,
    a: Option<&NodeAlloc>,
    r: &PlacementReq,
) -> Option<String> {
    if n.down {
        return Some("down".into());
    }
    if n.cordoned {
        return Some("cordoned".into());
    }
    // VPSes have no disk quota yet, so there is no per-VPS demand to fit;
    // a node whose disk is nearly full takes nothing new.
    if n.capacity.disk_bytes > 0
        && n.usage.disk_bytes as f64 >= n.capacity.disk_bytes as f64 * DISK_FULL
    {
        return Some(format!(
            "disk {:.0}% full (no new VPS above {:.0}%)",
            n.usage.disk_bytes as f64 * 100.0 / n.capacity.disk_bytes as f64,
            DISK_FULL * 100.0
        ));
    }
    if let Some(t) = &n.templates {
        if !r.template.is_empty()
            && !t.contains(r.template)
            && !s.templates.contains_key(r.template)
        {
            return Some(format!(
                "template {} missing (and not a cluster template it could fetch)",
                r.template
            ));
        }
    }
    if !r.pin_node.is_empty() && r.pin_node != n.name {
        return Some(format!("not the requested node {}", r.pin_node));
    }
    if r.exclude_node == n.name {
        return Some("the VPS is there already".into());
    }
    if r.avoid.contains(&n.name) {
        return Some("a move there failed before".into());
    }
    if r.migration {
        let busy = a.map(|a| a.migrations).unwrap_or(0);
        if busy >= s.sched.max_migrations_per_node {
            return Some(format!(
                "busy: {busy} migrations in flight (limit {})",
                s.sched.max_migrations_per_node
            ));
        }
    }
    for (k, v) in r.node_selector {
        if n.labels.get(k) != Some(v) {
            return Some(format!("label {k}={v} missing"));
        }
    }
    if !r.anti_affinity_group.is_empty()
        && a.is_some_and(|a| a.groups.contains_key(r.anti_affinity_group))
    {
        return Some(format!(
            "already holds a VPS of anti-affinity group {}",
            r.anti_affinity_group
        ));
    }
    let (cpu, mem) = a
        .map(|a| (a.cpu_millicores, a.memory_bytes))
        .unwrap_or((0, 0));
    let cpu_cap = (n.capacity.cpu_millicores as f64 * s.sched.cpu_overcommit) as u64;
    if cpu + r.cpu_millicores > cpu_cap {
        return Some(format!(
            "cpu {}m allocated + {}m asked > {}m ({}x overcommit)",
            cpu, r.cpu_millicores, cpu_cap, s.sched.cpu_overcommit
        ));
    }
    let mem_cap = (n.capacity.memory_bytes as f64 * s.sched.memory_overcommit) as u64;
    if mem + r.memory_bytes > mem_cap {
        return Some(format!(
            "memory {} MiB allocated + {} MiB asked > {} MiB",
            mem >> 20,
            r.memory_bytes >> 20,
            mem_cap >> 20
        ));
    }
    let disk = a.map(|a| a.disk_bytes).unwrap_or(0);
    if r.disk_bytes > 0 && disk + r.disk_bytes > n.capacity.disk_bytes {
        return Some(format!(
            "disk quotas {} MiB given + {} MiB asked > {} MiB",
            disk >> 20,
            r.disk_bytes >> 20,
            n.capacity.disk_bytes >> 20
        ));
    }
    None
}

/// Fullness after placement, 0..=1 (more when overcommitted).
fn fullness(n: &NodeRecord, a: Option<&NodeAlloc>, r: &PlacementReq) -> f64 {
    let (cpu, mem) = a
        .map(|a| (a.cpu_millicores, a.memory_bytes))
        .unwrap_or((0, 0));
    let frac = |used: u64, cap: u64| {
        if cap == 0 {
            1.0
        } else {
            used as f64 / cap as f64
        }
    };
    (frac(cpu + r.cpu_millicores, n.capacity.cpu_millicores)
        + frac(mem + r.memory_bytes, n.capacity.memory_bytes))
        / 2.0
}

/// Every node with its allocation, walking both name-sorted maps in step (no
/// lookups: this is the scheduler's hot loop).
fn nodes_with_alloc(s: &ClusterState) -> impl Iterator<Item = (&NodeRecord, Option<&NodeAlloc>)> {
    let mut alloc = s.alloc.iter().peekable();
    s.nodes.iter().map(move |(name, n)| {
        while alloc
            .peek()
            .is_some_and(|(k, _)| k.as_str() < name.as_str())
        {
            alloc.next();
        }
        let a = alloc.peek().filter(|(k, _)| *k == name).map(|(_, a)| *a);
        (n, a)
    })
}

/// Chooses a node: Ok((node, why)) or Err(why each node was rejected).
/// One pass over the nodes in name order; a node replaces the best so far only
/// when strictly better, so ties go to the first name. Reasons are written out
/// only when needed.
pub fn place(s: &ClusterState, r: &PlacementReq) -> Result<(String, String), String> {
    if s.nodes.is_empty() {
        return Err("no nodes are registered".into());
    }
    let mut best: Option<(f64, &NodeRecord)> = None;
    let mut fits = 0usize;
    for (n, a) in nodes_with_alloc(s) {
        if reject_reason(s, n, a, r).is_some() {
            continue;
        }
        fits += 1;
        let f = fullness(n, a, r);
        let better = match (best, s.sched.policy) {
            (None, _) => true,
            (Some((b, _)), Policy::Binpack) => f > b,
            (Some((b, _)), Policy::Spread) => f < b,
        };
        if better {
            best = Some((f, n));
        }
    }
    let rejected = || -> Vec<String> {
        nodes_with_alloc(s)
            .filter_map(|(n, a)| reject_reason(s, n, a, r).map(|why| format!("{}: {why}", n.name)))
            .collect()
    };
    let Some((score, node)) = best else {
        return Err(format!("no node can take it: {}", rejected().join("; ")));
    };
    let policy = match s.sched.policy {
        Policy::Binpack => "binpack",
        Policy::Spread => "spread",
    };
    let mut why = format!(
        "{policy}: {} is {:.0}% full after placement",
        node.name,
        score * 100.0
    );
    if fits > 1 {
        why.push_str(&format!(" (best of {fits} that fit)"));
    }
    let others = s.nodes.len() - fits;
    if others > 0 {
        let list = rejected();
        let shown: Vec<&String> = list.iter().take(5).collect();
        why.push_str(&format!(
            "; rejected {others}: {}",
            shown
                .iter()
                .map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        ));
        if others > 5 {
            why.push_str("; ...");
        }
    }
    Ok((node.name.clone(), why))
}
