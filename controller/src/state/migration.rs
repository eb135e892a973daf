//! Live migrations in the cluster state: a migration is a record on its VPS
//! with the phase its source agent last reported. Its single decision point
//! is [`MigrationCmd::Decide`]: one Raft commit either moves the VPS to the
//! target (a new generation, so the old node's copy is fenced off) or cancels
//! the migration. Whichever is applied first stands; every later call for the
//! same migration gets that outcome back, so agents can ask again after a
//! crash, a timeout or a controller failover.
//!
//! While a VPS migrates, the commands that would give its node new work
//! (desired state, limits, delete) are refused, and the target's capacity
//! holds the VPS too, so nothing else is placed into the room it needs.

use serde::{Deserialize, Serialize};

use super::drain::DrainRef;
use super::{reject, ClusterState, RejectCode, Response, VpsRecord};
use crate::scheduler::{self, PlacementReq};

/// A migration in flight.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Migration {
    pub id: String,
    pub target: String,
    pub mode: String,
    pub phase: String,
    pub started_ms: i64,
    /// The drain or restore it was started for.
    #[serde(default)]
    pub drain: Option<DrainRef>,
}

/// How many moves a VPS's history keeps.
pub const HISTORY: usize = 10;

/// One move of a VPS as an operator follows it: from its start through its
/// decision to the end of its post-copy window and cleanup.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MoveRecord {
    pub id: String,
    pub source: String,
    pub target: String,
    pub mode: String,
    pub phase: String,
    pub started_ms: i64,
    /// 0 while undecided.
    pub decided_ms: i64,
    /// Set at the decision.
    pub moved: Option<bool>,
    pub reason: String,
    /// 0 until the source reported its end.
    pub ended_ms: i64,
    pub downtime_ms: u64,
    pub total_ms: u64,
    /// (phase, milliseconds, bytes), in order.
    pub phases: Vec<(String, u64, u64)>,
    pub error: String,
}

/// The source's report of a migration's end (its last event).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Finished {
    pub mode: String,
    pub downtime_ms: u64,
    pub total_ms: u64,
    pub phases: Vec<(String, u64, u64)>,
    pub error: String,
}

impl Finished {
    /// The report as the source agent's last event carries it.
    pub fn from_event(ev: &ferry_proto::agent::v1::MigrationEvent) -> Self {
        Finished {
            mode: ev.mode.clone(),
            downtime_ms: ev.downtime_ms,
            total_ms: ev.total_ms,
            phases: ev
                .phases
                .iter()
                .map(|p| (p.phase.clone(), p.millis, p.bytes))
                .collect(),
            error: ev.error.clone(),
        }
    }
}

/// How the last migration of a VPS ended (the decision, kept for retries).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Outcome {
    pub id: String,
    pub moved: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum MigrationCmd {
    /// Records a migration; `target` empty lets the scheduler choose.
    Begin {
        name: String,
        id: String,
        target: String,
        mode: String,
        now_ms: i64,
        /// Started for this drain's item of the VPS: refused unless that item
        /// is pending, and marks it moving.
        #[serde(default)]
        drain: Option<DrainRef>,
    },
    /// Progress, for operators (no new generation).
    Phase {
        name: String,
        id: String,
        phase: String,
    },
    /// The decision: `commit` moves the VPS, otherwise the migration ends
    /// with the VPS where it was.
    Decide {
        name: String,
        id: String,
        commit: bool,
        reason: String,
        now_ms: i64,
    },
    /// The source's report that the migration ended (after the decision,
    /// its post-copy window and cleanup): figures for the history. The
    /// first report stands.
    Finish {
        name: String,
        id: String,
        report: Finished,
        now_ms: i64,
    },
}

/// Why a migration may not begin, or the node it goes to and why there.
pub fn check_begin(
    s: &ClusterState,
    name: &str,
    target: &str,
) -> Result<(String, String), (RejectCode, String)> {
    let v = s
        .vps
        .get(name)
        .ok_or_else(|| (RejectCode::NotFound, format!("VPS {name:?} not found")))?;
    if let Some(m) = &v.migration {
        return Err((
            RejectCode::FailedPrecondition,
            format!("VPS {name} is already migrating to {} ({})", m.target, m.id),
        ));
    }
    if !target.is_empty() && !s.nodes.contains_key(target) {
        return Err((
            RejectCode::NotFound,
            format!("to_node: node {target:?} not found"),
        ));
    }
    if target == v.node {
        return Err((
            RejectCode::FailedPrecondition,
            format!("to_node: VPS {name} is on {target} already"),
        ));
    }
    match s.nodes.get(&v.node) {
        Some(n) if n.down => {
            return Err((
                RejectCode::FailedPrecondition,
                format!(
                    "node {} (where VPS {name} is) is down: a live migration needs its agent",
                    v.node
                ),
            ))
        }
        _ => {}
    }
    match s.nodes.get(target) {
        Some(n) if n.down => {
            return Err((
                RejectCode::FailedPrecondition,
                format!(
                "to_node: node {target} is down (its agent stopped reporting); nothing was started"
            ),
            ))
        }
        Some(n) if n.cordoned => {
            return Err((
                RejectCode::FailedPrecondition,
                format!("to_node: node {target} is cordoned: it takes no VPS"),
            ))
        }
        _ => {}
    }
    if target.is_empty() && !v.pin_node.is_empty() {
        return Err((
            RejectCode::FailedPrecondition,
            format!(
                "VPS {name} is pinned to node {} (created with that node named): the \
                 scheduler does not move it; name the node to move it to (the pin follows)",
                v.pin_node
            ),
        ));
    }
    // Its selector and anti-affinity hold for every move, a named target's too.
    let req = PlacementReq {
        template: &v.spec.template,
        cpu_millicores: v.spec.cpu_millicores as u64,
        memory_bytes: v.spec.memory_bytes,
        disk_bytes: v.spec.disk_bytes,
        pin_node: target,
        exclude_node: &v.node,
        node_selector: &v.node_selector,
        anti_affinity_group: &v.anti_affinity_group,
        avoid: &[],
        migration: true,
    };
    let limit = s.sched.max_migrations_per_node;
    let busy = s.alloc.get(&v.node).map(|a| a.migrations).unwrap_or(0);
    if busy >= limit {
        return Err((
            RejectCode::ResourceExhausted,
            format!(
                "node {} (where VPS {name} is) has {busy} migrations in flight (limit {limit}); \
                 try again when one ends",
                v.node
            ),
        ));
    }
    scheduler::place(s, &req).map_err(|why| (RejectCode::ResourceExhausted, why))
}

impl ClusterState {
    pub(super) fn apply_migration(&mut self, c: MigrationCmd) -> Response {
        match c {
            MigrationCmd::Begin {
                name,
                id,
                target,
                mode,
                now_ms,
                drain,
            } => {
                if let Some(r) = &drain {
                    if let Err(why) = super::drain::check_item_begins(self, r, &name) {
                        return reject(RejectCode::FailedPrecondition, why);
                    }
                }
                let (node, why) = match check_begin(self, &name, &target) {
                    Ok(p) => p,
                    Err((code, msg)) => return reject(code, msg),
                };
                let Some(old) = self.vps.get(&name).cloned() else {
                    return reject(RejectCode::NotFound, format!("VPS {name:?} not found"));
                };
                let mut new = old.clone();
                new.migration = Some(Migration {
                    id: id.clone(),
                    target: node.clone(),
                    mode: mode.clone(),
                    phase: "starting".into(),
                    started_ms: now_ms,
                    drain: drain.clone(),
                });
                new.history.push(MoveRecord {
                    id: id.clone(),
                    source: old.node.clone(),
                    target: node.clone(),
                    mode: mode.clone(),
                    phase: "starting".into(),
                    started_ms: now_ms,
                    ..Default::default()
                });
                if new.history.len() > HISTORY {
                    let extra = new.history.len() - HISTORY;
                    new.history.drain(..extra);
                }
                self.replace_vps(&old, new.clone());
                self.events.push(
                    now_ms,
                    "vps",
                    &name,
                    format!("migration {id} to {node} begins ({why})"),
                );
                if let Some(r) = &drain {
                    super::drain::on_begun(self, r, &name, &id, &node, &mode);
                }
                Response::Vps(Box::new(new))
            }
            MigrationCmd::Phase { name, id, phase } => {
                let Some(v) = self.vps.get_mut(&name) else {
                    return reject(RejectCode::NotFound, format!("VPS {name:?} not found"));
                };
                let mut known = false;
                if let Some(m) = v.migration.as_mut().filter(|m| m.id == id) {
                    m.phase = phase.clone();
                    known = true;
                }
                // After the decision too: post-copy, cleanup.
                if let Some(h) = v.history.iter_mut().find(|h| h.id == id && h.ended_ms == 0) {
                    h.phase = phase;
                    known = true;
                }
                if known {
                    Response::Ok
                } else {
                    reject(
                        RejectCode::FailedPrecondition,
                        format!("VPS {name} has no migration {id} under way"),
                    )
                }
            }
            MigrationCmd::Finish {
                name,
                id,
                report,
                now_ms,
            } => {
                let Some(v) = self.vps.get_mut(&name) else {
                    return reject(RejectCode::NotFound, format!("VPS {name:?} not found"));
                };
                let Some(h) = v.history.iter_mut().find(|h| h.id == id) else {
                    return reject(
                        RejectCode::FailedPrecondition,
                        format!("VPS {name} has no migration {id} on record"),
                    );
                };
                if h.ended_ms == 0 {
                    h.ended_ms = now_ms;
                    h.phase = if report.error.is_empty() {
                        "done"
                    } else {
                        "failed"
                    }
                    .into();
                    if !report.mode.is_empty() {
                        h.mode = report.mode;
                    }
                    h.downtime_ms = report.downtime_ms;
                    h.total_ms = report.total_ms;
                    h.phases = report.phases;
                    h.error = report.error;
                }
                Response::Ok
            }
            MigrationCmd::Decide {
                name,
                id,
                commit,
                reason,
                now_ms,
            } => {
                let Some(old) = self.vps.get(&name).cloned() else {
                    return reject(RejectCode::NotFound, format!("VPS {name:?} not found"));
                };
                if old.last_migration.as_ref().is_some_and(|o| o.id == id) {
                    // Decided already: the same answer again.
                    return Response::Vps(Box::new(old));
                }
                let Some(m) = old.migration.clone().filter(|m| m.id == id) else {
                    return reject(
                        RejectCode::FailedPrecondition,
                        format!("VPS {name} has no migration {id} in flight"),
                    );
                };
                let mut new = old.clone();
                new.migration = None;
                if let Some(h) = new.history.iter_mut().find(|h| h.id == id) {
                    h.decided_ms = now_ms;
                    h.moved = Some(commit);
                    h.reason = reason.clone();
                }
                // Nothing else changed the VPS meanwhile (the commands that
                // would are refused while it migrates); the move's new
                // generation fences off the source's copy.
                new.last_migration = Some(Outcome {
                    id: id.clone(),
                    moved: commit,
                });
                let msg = if commit {
                    new.generation += 1;
                    new.node = m.target.clone();
                    if !new.pin_node.is_empty() {
                        // Only a named target moves a pinned VPS: it is the new pin.
                        new.pin_node = m.target.clone();
                    }
                    format!(
                        "migrated from {} to {} ({id}, generation {})",
                        old.node, m.target, new.generation
                    )
                } else if reason.is_empty() {
                    format!(
                        "migration {id} to {} cancelled; it stays on {}",
                        m.target, old.node
                    )
                } else {
                    format!(
                        "migration {id} to {} cancelled ({reason}); it stays on {}",
                        m.target, old.node
                    )
                };
                self.replace_vps(&old, new.clone());
                self.events.push(now_ms, "vps", &name, msg);
                if let Some(r) = &m.drain {
                    super::drain::on_decided(self, r, &name, &id, commit, &reason, now_ms);
                }
                Response::Vps(Box::new(new))
            }
        }
    }

    /// Swaps a VPS record, keeping the allocation index in step.
    fn replace_vps(&mut self, old: &VpsRecord, new: VpsRecord) {
        self.index_remove(old);
        self.index_add(&new);
        self.vps.insert(new.spec.name.clone(), new);
    }
}

/// The refusal for commands that would give a migrating VPS's node new work.
pub(super) fn refuse_while_migrating(v: &VpsRecord) -> Option<Response> {
    v.migration.as_ref().map(|m| {
        reject(
            RejectCode::FailedPrecondition,
            format!(
                "VPS {} is migrating to {} ({}, phase {}); try again when it ends",
                v.spec.name, m.target, m.id, m.phase
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Capacity, Desired, NodeCmd, Request, VpsCmd, VpsSpecData};

    fn node(s: &mut ClusterState, name: &str, mem: u64, templates: &[&str]) {
        s.apply(Request::Node(NodeCmd::Register {
            name: name.into(),
            addr: format!("unix:/{name}.sock"),
            capacity: Capacity {
                cpu_millicores: 4000,
                memory_bytes: mem,
                disk_bytes: 0,
            },
            labels: Default::default(),
            now_ms: 0,
        }));
        s.nodes.get_mut(name).unwrap().templates =
            Some(templates.iter().map(|t| t.to_string()).collect());
    }

    fn vps(s: &mut ClusterState, name: &str, on: &str, mem: u64) {
        vps_with(s, name, on, mem, &[]);
    }

    /// `on` pins it ("" lets the scheduler place it); `selector` is
    /// `key=value` labels.
    fn vps_with(s: &mut ClusterState, name: &str, on: &str, mem: u64, selector: &[(&str, &str)]) {
        let spec = VpsSpecData {
            name: name.into(),
            template: "busybox".into(),
            memory_bytes: mem,
            ..Default::default()
        };
        let r = create(s, spec, on, selector);
        assert!(matches!(r, Response::Vps(_)), "{r:?}");
    }

    fn create(
        s: &mut ClusterState,
        spec: VpsSpecData,
        on: &str,
        selector: &[(&str, &str)],
    ) -> Response {
        s.apply(Request::Vps(VpsCmd::Create {
            spec: Box::new(spec),
            pin_node: on.into(),
            node_selector: selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            anti_affinity_group: String::new(),
            desired: Desired::Running,
            allocate_ip: false,
            now_ms: 0,
        }))
    }

    fn begin(s: &mut ClusterState, name: &str, id: &str, target: &str) -> Response {
        s.apply(Request::Migration(MigrationCmd::Begin {
            name: name.into(),
            id: id.into(),
            target: target.into(),
            mode: "auto".into(),
            now_ms: 1,
            drain: None,
        }))
    }

    fn decide(s: &mut ClusterState, name: &str, id: &str, commit: bool) -> Response {
        s.apply(Request::Migration(MigrationCmd::Decide {
            name: name.into(),
            id: id.into(),
            commit,
            reason: String::new(),
            now_ms: 2,
        }))
    }

    fn code(r: &Response) -> Option<RejectCode> {
        match r {
            Response::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }

    #[test]
    fn a_move_is_on_record_through_post_copy_to_its_end() {
        let mut s = ClusterState::default();
        node(&mut s, "a", 1 << 30, &["busybox"]);
        node(&mut s, "b", 1 << 30, &["busybox"]);
        vps(&mut s, "v", "a", 64 << 20);
        assert!(matches!(begin(&mut s, "v", "m1", "b"), Response::Vps(_)));
        let phase = |s: &mut ClusterState, p: &str| {
            s.apply(Request::Migration(MigrationCmd::Phase {
                name: "v".into(),
                id: "m1".into(),
                phase: p.into(),
            }))
        };
        assert_eq!(phase(&mut s, "rootfs"), Response::Ok);
        assert!(matches!(decide(&mut s, "v", "m1", true), Response::Vps(_)));
        // Decided, but the VPS still needs its source: the record stays open.
        assert_eq!(phase(&mut s, "post-copy"), Response::Ok);
        let h = s.vps["v"].history.last().cloned().unwrap();
        assert_eq!(
            (
                h.source.as_str(),
                h.target.as_str(),
                h.moved,
                h.decided_ms,
                h.ended_ms
            ),
            ("a", "b", Some(true), 2, 0)
        );
        assert_eq!(h.phase, "post-copy");
        let finish = |s: &mut ClusterState, downtime: u64| {
            s.apply(Request::Migration(MigrationCmd::Finish {
                name: "v".into(),
                id: "m1".into(),
                report: Finished {
                    mode: "post-copy".into(),
                    downtime_ms: downtime,
                    total_ms: 900,
                    phases: vec![("post-copy".into(), 300, 64 << 20)],
                    error: String::new(),
                },
                now_ms: 3,
            }))
        };
        assert_eq!(finish(&mut s, 120), Response::Ok);
        // The first report stands.
        assert_eq!(finish(&mut s, 999), Response::Ok);
        let h = s.vps["v"].history.last().cloned().unwrap();
        assert_eq!(
            (h.ended_ms, h.downtime_ms, h.phase.as_str()),
            (3, 120, "done")
        );
        assert_eq!(h.phases, vec![("post-copy".to_string(), 300, 64 << 20)]);
        // Nothing is reported for a move that is not on record.
        let r = s.apply(Request::Migration(MigrationCmd::Phase {
            name: "v".into(),
            id: "m9".into(),
            phase: "x".into(),
        }));
        assert_eq!(code(&r), Some(RejectCode::FailedPrecondition));
    }

    #[test]
    fn the_history_keeps_the_last_moves() {
        let mut s = ClusterState::default();
        node(&mut s, "a", 1 << 30, &["busybox"]);
        node(&mut s, "b", 1 << 30, &["busybox"]);
        vps(&mut s, "v", "a", 64 << 20);
        for k in 0..HISTORY + 3 {
            let to = if k % 2 == 0 { "b" } else { "a" };
            let id = format!("m{k}");
            assert!(matches!(begin(&mut s, "v", &id, to), Response::Vps(_)));
            assert!(matches!(decide(&mut s, "v", &id, true), Response::Vps(_)));
        }
        let h = &s.vps["v"].history;
        assert_eq!(h.len(), HISTORY);
        assert_eq!(h[0].id, "m3");
        assert_eq!(h[HISTORY - 1].id, format!("m{}", HISTORY + 2));
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let mut s = ClusterState::default();
        node(&mut s, "a", 1 << 30, &["busybox"]);
        node(&mut s, "b", 1 << 30, &["debian"]);
        node(&mut s, "c", 256 << 20, &["busybox"]);
        vps(&mut s, "v", "a", 512 << 20);
        assert_eq!(
            code(&begin(&mut s, "nope", "m1", "b")),
            Some(RejectCode::NotFound)
        );
        assert_eq!(
            code(&begin(&mut s, "v", "m1", "zz")),
            Some(RejectCode::NotFound)
        );
        assert_eq!(
            code(&begin(&mut s, "v", "m1", "a")),
            Some(RejectCode::FailedPrecondition)
        );
        // b lacks the template, c the memory: both named.
        for t in ["b", "c"] {
            let r = begin(&mut s, "v", "m1", t);
            assert_eq!(code(&r), Some(RejectCode::ResourceExhausted), "{r:?}");
        }
        let Response::Rejected { message, .. } = begin(&mut s, "v", "m1", "b") else {
            panic!()
        };
        assert!(message.contains("template busybox missing"), "{message}");
        // Nothing was recorded by any of them.
        assert!(s.vps["v"].migration.is_none());
    }

    /// Found as an operator: a VPS made with `--selector zone=z1` was moved
    /// by a scheduler-picked migration to a zone=z3 node.
    #[test]
    fn every_move_keeps_the_placement_rules_the_vps_was_made_with() {
        let mut s = ClusterState::default();
        for (n, zone) in [("a", "z1"), ("b", "z3"), ("c", "z1")] {
            node(&mut s, n, 1 << 30, &["busybox"]);
            s.nodes.get_mut(n).unwrap().labels = [("zone".to_string(), zone.to_string())]
                .into_iter()
                .collect();
        }
        vps_with(&mut s, "v", "", 256 << 20, &[("zone", "z1")]);
        let from = s.vps["v"].node.clone();
        assert_ne!(from, "b");
        // The scheduler's pick is the other z1 node, never b.
        let Response::Vps(v) = begin(&mut s, "v", "m1", "") else {
            panic!()
        };
        let to = v.migration.as_ref().unwrap().target.clone();
        assert!(to == "a" || to == "c", "{to}");
        assert_ne!(to, from);
        decide(&mut s, "v", "m1", false);
        // Naming the z3 node is refused, and says why.
        let r = begin(&mut s, "v", "m2", "b");
        assert_eq!(code(&r), Some(RejectCode::ResourceExhausted), "{r:?}");
        let Response::Rejected { message, .. } = r else {
            panic!()
        };
        assert!(message.contains("zone"), "{message}");
        // A named node that is down or cordoned: FailedPrecondition, named.
        s.nodes.get_mut("c").unwrap().down = true;
        let r = begin(&mut s, "v", "m4", "c");
        assert_eq!(code(&r), Some(RejectCode::FailedPrecondition), "{r:?}");
        s.nodes.get_mut("c").unwrap().down = false;
        // With the only other z1 node cordoned, there is nowhere to go.
        s.nodes.get_mut(&to).unwrap().cordoned = true;
        assert_eq!(
            code(&begin(&mut s, "v", "m3", "")),
            Some(RejectCode::ResourceExhausted)
        );
    }

    #[test]
    fn a_pinned_vps_moves_only_where_an_operator_names() {
        let mut s = ClusterState::default();
        node(&mut s, "a", 1 << 30, &["busybox"]);
        node(&mut s, "b", 1 << 30, &["busybox"]);
        vps(&mut s, "v", "a", 256 << 20);
        let r = begin(&mut s, "v", "m1", "");
        assert_eq!(code(&r), Some(RejectCode::FailedPrecondition), "{r:?}");
        let Response::Rejected { message, .. } = r else {
            panic!()
        };
        assert!(message.contains("pinned to node a"), "{message}");
        assert!(matches!(begin(&mut s, "v", "m2", "b"), Response::Vps(_)));
        decide(&mut s, "v", "m2", true);
        assert_eq!(
            (s.vps["v"].node.as_str(), s.vps["v"].pin_node.as_str()),
            ("b", "b")
        );
    }

    /// User-namespace ranges are the cluster's: handed out in the log,
    /// lowest free first, kept through a migration and a snapshot reload,
    /// never given twice, free again after a delete; privileged VPSes get none.
    #[test]
    fn id_ranges_are_handed_out_once_and_move_with_the_vps() {
        use ferry_proto::ids::{FIRST_BASE, RANGE};
        let mut s = ClusterState::default();
        node(&mut s, "a", 1 << 30, &["busybox"]);
        node(&mut s, "b", 1 << 30, &["busybox"]);
        for n in ["v1", "v2", "v3"] {
            vps(&mut s, n, "a", 64 << 20);
        }
        let base = |s: &ClusterState, n: &str| s.vps[n].spec.id_base;
        assert_eq!(
            [base(&s, "v1"), base(&s, "v2"), base(&s, "v3")],
            [FIRST_BASE, FIRST_BASE + RANGE, FIRST_BASE + 2 * RANGE]
        );
        let spec = |name: &str| VpsSpecData {
            name: name.into(),
            template: "busybox".into(),
            memory_bytes: 64 << 20,
            ..Default::default()
        };
        let r = create(
            &mut s,
            VpsSpecData {
                privileged: true,
                ..spec("p")
            },
            "",
            &[],
        );
        assert!(matches!(r, Response::Vps(_)), "{r:?}");
        assert_eq!(base(&s, "p"), 0);
        // A range asked for by number is refused while another VPS holds it.
        let r = create(
            &mut s,
            VpsSpecData {
                id_base: FIRST_BASE + RANGE,
                ..spec("dup")
            },
            "",
            &[],
        );
        assert_eq!(code(&r), Some(RejectCode::AlreadyExists), "{r:?}");
        // A move keeps the range.
        assert!(matches!(begin(&mut s, "v2", "m1", "b"), Response::Vps(_)));
        assert!(matches!(decide(&mut s, "v2", "m1", true), Response::Vps(_)));
        assert_eq!(
            (s.vps["v2"].node.as_str(), base(&s, "v2")),
            ("b", FIRST_BASE + RANGE)
        );
        // After a delete the range is free again, and a reload of the state
        // (the index is derived) gives the same answer as a live replica.
        s.apply(Request::Vps(VpsCmd::Delete {
            name: "v2".into(),
            now_ms: 0,
        }));
        // (Held until its node confirms it gone.)
        s.apply(Request::Vps(VpsCmd::Purge {
            node: "b".into(),
            names: vec!["v2".into()],
            now_ms: 0,
        }));
        let mut reloaded: ClusterState =
            serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        reloaded.rebuild_index();
        vps(&mut s, "v4", "a", 64 << 20);
        vps(&mut reloaded, "v4", "a", 64 << 20);
        assert_eq!(base(&s, "v4"), FIRST_BASE + RANGE);
        assert_eq!(base(&reloaded, "v4"), FIRST_BASE + RANGE);
        vps(&mut s, "v5", "a", 64 << 20);
        assert_eq!(base(&s, "v5"), FIRST_BASE + 3 * RANGE);
    }

    #[test]
    fn one_decision_stands_and_moves_ownership_with_a_new_generation() {
        let mut s = ClusterState::default();
        node(&mut s, "a", 1 << 30, &["busybox"]);
        node(&mut s, "b", 1 << 30, &["busybox"]);
        // Unpinned: binpack's tie goes to a.
        vps(&mut s, "v", "", 512 << 20);
        assert_eq!(s.vps["v"].node, "a");
        // No target given: the scheduler picks the other node.
        let Response::Vps(v) = begin(&mut s, "v", "m1", "") else {
            panic!()
        };
        assert_eq!(v.migration.as_ref().unwrap().target, "b");
        // The target's room is held: a second VPS of the same size does not
        // fit on b while v moves there.
        assert_eq!(s.alloc["b"].memory_bytes, 512 << 20);
        assert_eq!(
            code(&begin(&mut s, "v", "m2", "b")),
            Some(RejectCode::FailedPrecondition)
        );
        // Commands that would give a node new work wait.
        let r = s.apply(Request::Vps(VpsCmd::Delete {
            name: "v".into(),
            now_ms: 0,
        }));
        assert_eq!(code(&r), Some(RejectCode::FailedPrecondition));
        // The move commits once; a late cancel gets the same answer.
        let Response::Vps(v) = decide(&mut s, "v", "m1", true) else {
            panic!()
        };
        assert_eq!((v.node.as_str(), v.generation), ("b", 2));
        let Response::Vps(again) = decide(&mut s, "v", "m1", false) else {
            panic!()
        };
        assert_eq!(again.node, "b");
        assert!(again.last_migration.as_ref().unwrap().moved);
        assert_eq!(s.alloc["a"].memory_bytes, 0);
        assert_eq!(s.alloc["b"].memory_bytes, 512 << 20);

        // Back to a, cancelled first: a later commit cannot move it.
        assert!(matches!(begin(&mut s, "v", "m3", "a"), Response::Vps(_)));
        let Response::Vps(v) = decide(&mut s, "v", "m3", false) else {
            panic!()
        };
        assert_eq!((v.node.as_str(), v.generation), ("b", 2));
        let Response::Vps(v) = decide(&mut s, "v", "m3", true) else {
            panic!()
        };
        assert_eq!(v.node, "b");
        assert_eq!(s.alloc["a"].memory_bytes, 0);
        // An unknown migration gets no answer.
        assert_eq!(
            code(&decide(&mut s, "v", "m9", true)),
            Some(RejectCode::FailedPrecondition)
        );
        // The index matches a rebuild from scratch.
        let mut r = s.clone();
        r.rebuild_index();
        let used = |s: &ClusterState| {
            s.alloc
                .iter()
                .filter(|(_, a)| a.count > 0)
                .map(|(n, a)| (n.clone(), a.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(used(&r), used(&s));
    }
}
