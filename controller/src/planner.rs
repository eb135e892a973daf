//! Where each VPS of a drain or restore goes, and why: the same filters and
//! scoring as placement ([`crate::scheduler`]), never the drained node, never
//! a node that is cordoned (a draining node is), down, or where a move of
//! this VPS failed before. Pure functions of the state: the leader's driver
//! asks [`choose`] before each move; a dry run asks [`plan`] for all of them.

use crate::scheduler::{self, PlacementReq};
use crate::state::drain::{Drain, DrainCmd, Item, ItemStatus, Kind};
use crate::state::{ClusterState, Desired, RejectCode, Request, Response, VpsRecord};

/// What to do with one pending item now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Move it there, in this mode.
    Move {
        target: String,
        mode: String,
        why: String,
    },
    /// Not now (a node is busy with other migrations, or the VPS is already
    /// migrating): ask again later.
    Wait(String),
    /// It fits nowhere or may not move: it stays where it is.
    Nowhere(String),
}

/// The mode a VPS moves in. A VPS meant to be stopped and reported stopped
/// moves cold. Otherwise its drain's mode, except that a VPS not reported
/// running gets `auto`: what a node last reported can lag (a VPS resumed
/// after a failed move reads as stopped for a moment), and with `auto` the
/// source agent, which knows, moves a running VPS live and a stopped one
/// cold; a named live mode for a stopped VPS, or cold for a running one, is
/// refused.
fn mode_for(v: &VpsRecord, drain_mode: &str) -> String {
    if v.desired == Desired::Stopped && v.observed == "stopped" {
        "cold".into()
    } else if v.observed == "running" {
        drain_mode.to_string()
    } else {
        "auto".into()
    }
}

/// Where the pending item `vps` of drain `d` goes now.
pub fn choose(s: &ClusterState, d: &Drain, vps: &str, item: &Item) -> Choice {
    let Some(v) = s.vps.get(vps) else {
        return Choice::Nowhere("deleted".into());
    };
    if let Some(m) = &v.migration {
        return Choice::Wait(format!("migrating to {} ({})", m.target, m.id));
    }
    if d.kind == Kind::Drain && !v.pin_node.is_empty() {
        return Choice::Nowhere(format!(
            "pinned to node {} (created with it named): the scheduler does not move it; \
             move it with `ferryctl vps migrate {vps} --to NODE`",
            v.pin_node
        ));
    }
    let limit = s.sched.max_migrations_per_node;
    let busy = s.alloc.get(&v.node).map(|a| a.migrations).unwrap_or(0);
    if busy >= limit {
        return Choice::Wait(format!(
            "node {} has {busy} migrations in flight (limit {limit})",
            v.node
        ));
    }
    let avoid = item.failed_targets();
    let mut req = PlacementReq {
        template: &v.spec.template,
        cpu_millicores: v.spec.cpu_millicores as u64,
        memory_bytes: v.spec.memory_bytes,
        disk_bytes: v.spec.disk_bytes,
        pin_node: &item.to,
        exclude_node: &v.node,
        node_selector: &v.node_selector,
        anti_affinity_group: &v.anti_affinity_group,
        avoid: &avoid,
        migration: true,
    };
    match scheduler::place(s, &req) {
        Ok((target, why)) => Choice::Move {
            target,
            mode: mode_for(v, &d.mode),
            why: match d.kind {
                Kind::Drain => why,
                Kind::Restore => "back to where the drain took it from".into(),
            },
        },
        Err(why) => {
            // Room enough once the busy nodes' migrations end: wait for them.
            req.migration = false;
            if scheduler::place(s, &req).is_ok() {
                Choice::Wait(why)
            } else {
                Choice::Nowhere(why)
            }
        }
    }
}

/// One line of a dry run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanItem {
    pub vps: String,
    /// Empty: it stays (see `why`).
    pub target: String,
    pub mode: String,
    pub why: String,
}

/// What a drain (or restore) of `node` would do now, VPS by VPS in name
/// order, each placed as if the ones before it had moved. Changes nothing.
pub fn plan(
    s: &ClusterState,
    node: &str,
    kind: Kind,
    mode: &str,
) -> Result<Vec<PlanItem>, (RejectCode, String)> {
    let mut sim = s.clone();
    let start = sim.apply(Request::Drain(DrainCmd::Start {
        node: node.to_string(),
        id: "dry-run".into(),
        kind,
        mode: mode.to_string(),
        parallel: 1,
        deadline_ms: 0,
        now_ms: 0,
    }));
    let d = match start {
        Response::Drain(d) => *d,
        Response::Rejected { code, message } => return Err((code, message)),
        other => {
            return Err((
                RejectCode::FailedPrecondition,
                format!("unexpected {other:?}"),
            ))
        }
    };
    let mut out = Vec::new();
    for (name, item) in &d.items {
        if item.status != ItemStatus::Pending {
            continue;
        }
        let c = choose(&sim, &d, name, item);
        let line = match c {
            Choice::Move { target, mode, why } => {
                sim.simulate_move(name, &target);
                PlanItem {
                    vps: name.clone(),
                    target,
                    mode,
                    why,
                }
            }
            Choice::Wait(why) => PlanItem {
                vps: name.clone(),
                target: String::new(),
                mode: String::new(),
                why: format!("waits: {why}"),
            },
            Choice::Nowhere(why) => PlanItem {
                vps: name.clone(),
                target: String::new(),
                mode: String::new(),
                why: format!("stays: {why}"),
            },
        };
        out.push(line);
    }
    Ok(out)
}

impl ClusterState {
    /// Puts a VPS on another node in a scratch copy of the state (planning).
    fn simulate_move(&mut self, name: &str, target: &str) {
        if let Some(old) = self.vps.get(name).cloned() {
            let mut new = old.clone();
            new.node = target.to_string();
            self.index_remove(&old);
            self.index_add(&new);
            self.vps.insert(name.to_string(), new);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Capacity, NodeCmd, VpsCmd, VpsSpecData};

    pub(crate) fn node(s: &mut ClusterState, name: &str, mem_mib: u64, labels: &[(&str, &str)]) {
        let r = s.apply(Request::Node(NodeCmd::Register {
            name: name.into(),
            addr: format!("unix:/{name}.sock"),
            capacity: Capacity {
                cpu_millicores: 4000,
                memory_bytes: mem_mib << 20,
                disk_bytes: 0,
            },
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            now_ms: 0,
        }));
        assert!(matches!(r, Response::Node(_)), "{r:?}");
    }

    pub(crate) fn vps(s: &mut ClusterState, name: &str, on: &str, mem_mib: u64) {
        let r = s.apply(Request::Vps(VpsCmd::Create {
            spec: Box::new(VpsSpecData {
                name: name.into(),
                memory_bytes: mem_mib << 20,
                ..Default::default()
            }),
            pin_node: on.into(),
            node_selector: Default::default(),
            anti_affinity_group: String::new(),
            desired: Desired::Running,
            allocate_ip: false,
            now_ms: 0,
        }));
        assert!(matches!(r, Response::Vps(_)), "{r:?}");
        // Created pinned only to put it there: the drain may move it.
        if let Some(v) = s.vps.get_mut(name) {
            v.pin_node.clear();
            v.observed = "running".into();
        }
    }

    #[test]
    fn a_plan_fills_the_other_nodes_in_turn_and_says_what_fits_nowhere() {
        let mut s = ClusterState::default();
        node(&mut s, "a", 4096, &[]);
        node(&mut s, "b", 1024, &[]);
        node(&mut s, "c", 1024, &[]);
        node(&mut s, "d", 4096, &[]);
        s.apply(Request::Node(NodeCmd::Cordon {
            name: "d".into(),
            cordon: true,
            now_ms: 0,
        }));
        vps(&mut s, "v1", "a", 768);
        vps(&mut s, "v2", "a", 768);
        vps(&mut s, "v3", "a", 768);
        let before = s.clone();
        let p = plan(&s, "a", Kind::Drain, "auto").unwrap();
        assert_eq!(s, before, "a dry run changes nothing");
        let targets: Vec<&str> = p.iter().map(|i| i.target.as_str()).collect();
        // b and c take one each (768 of 1024 MiB); the third fits nowhere:
        // d is cordoned, a is the drained node.
        assert_eq!(targets, ["b", "c", ""], "{p:?}");
        assert!(p[2].why.starts_with("stays: no node can take it"), "{p:?}");
        assert!(p[2].why.contains("d: cordoned"), "{p:?}");
        assert_eq!(p[0].mode, "auto");
    }

    #[test]
    fn a_stopped_vps_moves_cold_and_a_pinned_one_stays() {
        let mut s = ClusterState::default();
        node(&mut s, "a", 4096, &[]);
        node(&mut s, "b", 4096, &[]);
        vps(&mut s, "run", "a", 64);
        vps(&mut s, "stop", "a", 64);
        vps(&mut s, "pin", "a", 64);
        s.vps.get_mut("stop").unwrap().observed = "stopped".into();
        s.vps.get_mut("stop").unwrap().desired = Desired::Stopped;
        // Running, but reported otherwise for now: its agent picks the mode.
        vps(&mut s, "lag", "a", 64);
        s.vps.get_mut("lag").unwrap().observed = "stopped".into();
        s.vps.get_mut("pin").unwrap().pin_node = "a".into();
        let p = plan(&s, "a", Kind::Drain, "post-copy").unwrap();
        let by: std::collections::BTreeMap<&str, &PlanItem> =
            p.iter().map(|i| (i.vps.as_str(), i)).collect();
        assert_eq!(by["run"].mode, "post-copy");
        assert_eq!(by["stop"].mode, "cold");
        assert_eq!(by["lag"].mode, "auto");
        assert_eq!(by["pin"].target, "");
        assert!(by["pin"].why.contains("pinned to node a"), "{p:?}");
    }

    #[test]
    fn selectors_hold_and_a_failed_target_is_not_chosen_again() {
        let mut s = ClusterState::default();
        node(&mut s, "a", 4096, &[("zone", "z1")]);
        node(&mut s, "b", 4096, &[("zone", "z1")]);
        node(&mut s, "c", 4096, &[("zone", "z1")]);
        node(&mut s, "z", 8192, &[("zone", "z3")]);
        vps(&mut s, "v", "a", 64);
        s.vps
            .get_mut("v")
            .unwrap()
            .node_selector
            .insert("zone".into(), "z1".into());
        let d = match s.apply(Request::Drain(DrainCmd::Start {
            node: "a".into(),
            id: "d1".into(),
            kind: Kind::Drain,
            mode: "auto".into(),
            parallel: 2,
            deadline_ms: 0,
            now_ms: 0,
        })) {
            Response::Drain(d) => *d,
            r => panic!("{r:?}"),
        };
        let mut item = d.items["v"].clone();
        let Choice::Move { target, .. } = choose(&s, &d, "v", &item) else {
            panic!()
        };
        assert_eq!(target, "b", "binpack ties go to the first name; never z3");
        item.attempts.push(crate::state::drain::Attempt {
            target: "b".into(),
            migration_id: "m1".into(),
            error: "target agent killed".into(),
        });
        let Choice::Move { target, .. } = choose(&s, &d, "v", &item) else {
            panic!()
        };
        assert_eq!(target, "c");
    }

    #[test]
    fn a_busy_node_makes_the_move_wait_not_skip() {
        let mut s = ClusterState::default();
        node(&mut s, "a", 4096, &[]);
        node(&mut s, "b", 4096, &[]);
        s.sched.max_migrations_per_node = 1;
        vps(&mut s, "v1", "a", 64);
        vps(&mut s, "v2", "a", 64);
        let r = s.apply(Request::Drain(DrainCmd::Start {
            node: "a".into(),
            id: "d1".into(),
            kind: Kind::Drain,
            mode: "auto".into(),
            parallel: 2,
            deadline_ms: 0,
            now_ms: 0,
        }));
        assert!(matches!(r, Response::Drain(_)), "{r:?}");
        let r = s.apply(Request::Migration(crate::state::MigrationCmd::Begin {
            name: "v1".into(),
            id: "m1".into(),
            target: "b".into(),
            mode: "auto".into(),
            now_ms: 1,
            drain: Some(crate::state::drain::DrainRef {
                node: "a".into(),
                id: "d1".into(),
            }),
        }));
        assert!(matches!(r, Response::Vps(_)), "{r:?}");
        let d = s.drains["a"].clone();
        assert_eq!(d.items["v1"].status, ItemStatus::Moving);
        let c = choose(&s, &d, "v2", &d.items["v2"]);
        assert!(
            matches!(&c, Choice::Wait(w) if w.contains("limit 1")),
            "{c:?}"
        );
    }
}
