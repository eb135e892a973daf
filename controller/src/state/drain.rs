//! Drains and restores of a node, as Raft records the leader drives.
//!
//! A drain cordons its node and lists every VPS there as an item; the
//! leader's driver (`leader::drain`) starts their migrations, at most
//! `parallel` at a time. Everything that settles an item happens here, in
//! the state machine, so every replica agrees and a new leader carries on
//! from the record:
//! - a migration started for an item names the drain in its
//!   [`MigrationCmd::Begin`](super::MigrationCmd::Begin), which marks the
//!   item moving in the same entry (a Begin for an item that is not pending
//!   is refused: nothing is started twice);
//! - that migration's own decision ([`on_decided`]) settles the item: moved,
//!   or back to pending for another target, or failed after
//!   [`MAX_ATTEMPTS`] with every attempt's reason;
//! - [`DrainCmd::Tick`] does the rest from the state alone ([`housekeep`]):
//!   it adds VPSes that appeared on the node, settles items whose VPS went
//!   away or moved by other means, pauses while the node is down, applies
//!   the deadline, and ends the drain once nothing is pending or moving:
//!   `complete` only when every item moved and no VPS is left on the node.
//!
//! A restore is the same record with the other direction: its items are the
//! VPSes the node's last drain moved away that are still where it put them,
//! each going back home.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{reject, ClusterState, RejectCode, Response};

/// The longest reason an item keeps. Reasons come from agents (a node's
/// error text) and from the scheduler (one clause per node): a record in
/// Raft must not grow with either.
pub const REASON_MAX: usize = 1024;

fn clip(s: &str) -> String {
    if s.len() <= REASON_MAX {
        return s.to_string();
    }
    let mut end = REASON_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Migrations tried for one item before it is `failed`.
pub const MAX_ATTEMPTS: usize = 3;
/// Moves at a time when none is given, and the most a drain may ask for.
pub const DEFAULT_PARALLEL: u32 = 2;
pub const MAX_PARALLEL: u32 = 16;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Kind {
    Drain,
    Restore,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Drain => "drain",
            Kind::Restore => "restore",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum DrainState {
    Running,
    Complete,
    Incomplete,
    Cancelled,
}

impl DrainState {
    pub fn name(self) -> &'static str {
        match self {
            DrainState::Running => "running",
            DrainState::Complete => "complete",
            DrainState::Incomplete => "incomplete",
            DrainState::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum ItemStatus {
    Pending,
    Moving,
    Moved,
    Skipped,
    Failed,
}

impl ItemStatus {
    pub fn name(self) -> &'static str {
        match self {
            ItemStatus::Pending => "pending",
            ItemStatus::Moving => "moving",
            ItemStatus::Moved => "moved",
            ItemStatus::Skipped => "skipped",
            ItemStatus::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attempt {
    pub target: String,
    pub migration_id: String,
    /// Empty while it runs or when it moved the VPS.
    pub error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Item {
    pub status: ItemStatus,
    /// Why skipped or failed.
    pub reason: String,
    /// Restore: the node it goes back to. Drain: empty (the scheduler picks).
    pub to: String,
    /// Restore: where the drain put it (it is moved back only from there).
    pub from: String,
    /// Where it is going or went.
    pub target: String,
    pub migration_id: String,
    pub attempts: Vec<Attempt>,
    /// Mode of the move that placed it, and its figures (display only).
    pub mode: String,
    pub downtime_ms: u64,
    pub bytes: u64,
}

impl Item {
    fn pending(to: &str, from: &str) -> Item {
        Item {
            status: ItemStatus::Pending,
            reason: String::new(),
            to: to.to_string(),
            from: from.to_string(),
            target: String::new(),
            migration_id: String::new(),
            attempts: Vec::new(),
            mode: String::new(),
            downtime_ms: 0,
            bytes: 0,
        }
    }

    /// Targets of the attempts that failed (not chosen again; an attempt
    /// refused before it started names none).
    pub fn failed_targets(&self) -> Vec<String> {
        self.attempts
            .iter()
            .filter(|a| !a.error.is_empty() && !a.target.is_empty())
            .map(|a| a.target.clone())
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Drain {
    pub id: String,
    pub node: String,
    pub kind: Kind,
    pub state: DrainState,
    /// How it ended.
    pub reason: String,
    /// Why it waits (its node is down), if it does.
    pub paused: Option<String>,
    /// Migration mode for running VPSes ("auto", "post-copy", ...).
    pub mode: String,
    pub parallel: u32,
    pub started_ms: i64,
    pub ended_ms: i64,
    /// 0: none.
    pub deadline_ms: i64,
    /// By VPS name.
    pub items: BTreeMap<String, Item>,
    /// VPS → node a drain moved it to, kept for the restore (which takes
    /// entries off as VPSes come home).
    pub moved_away: BTreeMap<String, String>,
}

impl Drain {
    pub fn count(&self, st: ItemStatus) -> usize {
        self.items.values().filter(|i| i.status == st).count()
    }

    /// "3 moved, 1 skipped, 1 failed".
    pub fn summary(&self) -> String {
        let parts: Vec<String> = [
            ItemStatus::Moved,
            ItemStatus::Moving,
            ItemStatus::Pending,
            ItemStatus::Skipped,
            ItemStatus::Failed,
        ]
        .iter()
        .filter_map(|st| {
            let n = self.count(*st);
            (n > 0).then(|| format!("{n} {}", st.name()))
        })
        .collect();
        if parts.is_empty() {
            "nothing to move".into()
        } else {
            parts.join(", ")
        }
    }
}

/// A migration started for a drain's item: which drain (by its node and id).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DrainRef {
    pub node: String,
    pub id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum DrainCmd {
    Start {
        node: String,
        id: String,
        kind: Kind,
        mode: String,
        parallel: u32,
        deadline_ms: i64,
        now_ms: i64,
    },
    /// Nothing new starts; moves under way end by their own decision.
    Cancel { node: String, now_ms: i64 },
    /// The leader's housekeeping ([`housekeep`]), computed from the state.
    Tick {
        node: String,
        id: String,
        now_ms: i64,
    },
    /// The item fits nowhere (or may not move): it stays where it is.
    Skip {
        node: String,
        id: String,
        vps: String,
        reason: String,
        now_ms: i64,
    },
    /// A migration for the item could not even be recorded or started
    /// (`attempts`: how many the leader saw, so a stale report is ignored).
    AttemptFailed {
        node: String,
        id: String,
        vps: String,
        attempts: usize,
        target: String,
        reason: String,
        now_ms: i64,
    },
    /// How the item's move went, as its source agent reported (display).
    Figures {
        node: String,
        id: String,
        vps: String,
        migration_id: String,
        mode: String,
        downtime_ms: u64,
        bytes: u64,
        error: String,
    },
}

/// Why an item may begin a migration now under drain `r`, or the refusal.
pub(super) fn check_item_begins(s: &ClusterState, r: &DrainRef, vps: &str) -> Result<(), String> {
    let Some(d) = s.drains.get(&r.node).filter(|d| d.id == r.id) else {
        return Err(format!("drain {} of node {} is not current", r.id, r.node));
    };
    if let Some(why) = &d.paused {
        return Err(format!(
            "drain {} of node {} is paused ({why})",
            r.id, r.node
        ));
    }
    if d.state != DrainState::Running {
        return Err(format!(
            "drain {} of node {} is {}",
            r.id,
            r.node,
            d.state.name()
        ));
    }
    match d.items.get(vps) {
        Some(i) if i.status == ItemStatus::Pending => Ok(()),
        Some(i) => Err(format!(
            "VPS {vps} is {} in drain {} already",
            i.status.name(),
            r.id
        )),
        None => Err(format!("VPS {vps} is not in drain {}", r.id)),
    }
}

/// Marks the item moving (in the same entry as its migration's Begin).
pub(super) fn on_begun(
    s: &mut ClusterState,
    r: &DrainRef,
    vps: &str,
    migration_id: &str,
    target: &str,
    mode: &str,
) {
    if let Some(i) = s
        .drains
        .get_mut(&r.node)
        .filter(|d| d.id == r.id)
        .and_then(|d| d.items.get_mut(vps))
    {
        i.status = ItemStatus::Moving;
        i.target = target.to_string();
        i.migration_id = migration_id.to_string();
        i.mode = mode.to_string();
        i.attempts.push(Attempt {
            target: target.to_string(),
            migration_id: migration_id.to_string(),
            error: String::new(),
        });
    }
}

/// Settles the item a migration was started for, from its decision.
pub(super) fn on_decided(
    s: &mut ClusterState,
    r: &DrainRef,
    vps: &str,
    migration_id: &str,
    moved: bool,
    reason: &str,
    now_ms: i64,
) {
    let Some(d) = s.drains.get_mut(&r.node).filter(|d| d.id == r.id) else {
        return;
    };
    let kind = d.kind;
    let Some(i) = d
        .items
        .get_mut(vps)
        .filter(|i| i.status == ItemStatus::Moving && i.migration_id == migration_id)
    else {
        return;
    };
    let msg = if moved {
        i.status = ItemStatus::Moved;
        i.reason.clear();
        let target = i.target.clone();
        match kind {
            Kind::Drain => {
                d.moved_away.insert(vps.to_string(), target.clone());
            }
            Kind::Restore => {
                d.moved_away.remove(vps);
            }
        }
        format!("{} of {}: {vps} moved to {target}", kind.name(), r.node)
    } else {
        let why = if reason.is_empty() {
            "the migration was cancelled".to_string()
        } else {
            clip(reason)
        };
        if let Some(a) = i.attempts.last_mut() {
            if a.error.is_empty() {
                a.error = why.clone();
            }
        }
        fail_or_retry(i, kind, &r.node, vps)
    };
    s.events.push(now_ms, "node", &r.node, msg);
}

/// After a failed attempt: pending again (another target next time), or
/// failed once [`MAX_ATTEMPTS`] were made. Returns the event's message.
fn fail_or_retry(i: &mut Item, kind: Kind, node: &str, vps: &str) -> String {
    i.migration_id.clear();
    let last = i
        .attempts
        .last()
        .map(|a| format!("to {}: {}", a.target, a.error))
        .unwrap_or_default();
    // A restore has one place to go: its failures are not retried elsewhere.
    if i.attempts.len() >= MAX_ATTEMPTS || kind == Kind::Restore {
        i.status = ItemStatus::Failed;
        i.reason = i
            .attempts
            .iter()
            .enumerate()
            .map(|(n, a)| {
                if a.target.is_empty() {
                    format!("attempt {}: {}", n + 1, a.error)
                } else {
                    format!("attempt {} to {}: {}", n + 1, a.target, a.error)
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
        format!(
            "{} of {node}: {vps} failed after {} attempt(s); it stays where it is ({last})",
            kind.name(),
            i.attempts.len()
        )
    } else {
        i.status = ItemStatus::Pending;
        i.target.clear();
        format!(
            "{} of {node}: moving {vps} failed ({last}); it will be tried on another node",
            kind.name()
        )
    }
}

/// What a [`DrainCmd::Tick`] makes of the drain now: the drain it would
/// become and the events it would log (an unchanged drain: nothing to do).
pub fn housekeep(s: &ClusterState, d: &Drain, now_ms: i64) -> (Drain, Vec<String>) {
    let mut d = d.clone();
    let mut ev = Vec::new();
    if d.state != DrainState::Running {
        return (d, ev);
    }
    let k = d.kind.name();
    let node = d.node.clone();
    // A drain takes every VPS that is (or comes) on its node.
    if d.kind == Kind::Drain {
        for v in s.vps.values().filter(|v| v.node == node) {
            if !d.items.contains_key(&v.spec.name) {
                d.items.insert(v.spec.name.clone(), Item::pending("", ""));
                ev.push(format!("{k} of {node}: {} added", v.spec.name));
            }
        }
    }
    for (name, i) in d.items.iter_mut() {
        if i.status != ItemStatus::Pending {
            continue;
        }
        let Some(v) = s.vps.get(name) else {
            i.status = ItemStatus::Skipped;
            i.reason = "deleted".into();
            ev.push(format!("{k} of {node}: {name} was deleted"));
            continue;
        };
        if v.migration.is_some() {
            continue; // someone else's move: its decision comes first
        }
        match d.kind {
            Kind::Drain if v.node != node => {
                i.status = ItemStatus::Moved;
                i.target = v.node.clone();
                i.reason = "moved by other means".into();
                ev.push(format!("{k} of {node}: {name} is on {} now", v.node));
            }
            Kind::Restore if v.node == i.to => {
                i.status = ItemStatus::Moved;
                i.target = v.node.clone();
                d.moved_away.remove(name);
                ev.push(format!("{k} of {node}: {name} is home already"));
            }
            Kind::Restore if v.node != i.from => {
                i.status = ItemStatus::Skipped;
                i.reason = format!("moved since the drain (now on {})", v.node);
                d.moved_away.remove(name);
                ev.push(format!("{k} of {node}: {name} skipped: {}", i.reason));
            }
            _ => {}
        }
    }
    let down = s.nodes.get(&node).is_none_or(|n| n.down);
    match (&d.paused, down) {
        (None, true) => {
            d.paused = Some(format!("node {node} is down: nothing on it is touched"));
            ev.push(format!(
                "{k} of {node} paused: the node is down (it resumes when the node is back)"
            ));
        }
        (Some(_), false) => {
            d.paused = None;
            ev.push(format!("{k} of {node} resumes: the node is back"));
        }
        _ => {}
    }
    if d.deadline_ms > 0 && now_ms >= d.deadline_ms {
        let mut n = 0;
        for i in d.items.values_mut() {
            if i.status == ItemStatus::Pending {
                i.status = ItemStatus::Skipped;
                i.reason = "the deadline passed first".into();
                n += 1;
            }
        }
        if n > 0 {
            ev.push(format!(
                "{k} of {node}: deadline passed; {n} VPS(es) not moved"
            ));
        }
    }
    let open = d
        .items
        .values()
        .any(|i| matches!(i.status, ItemStatus::Pending | ItemStatus::Moving));
    if !open {
        let all_moved = d.items.values().all(|i| i.status == ItemStatus::Moved);
        let left: Vec<&str> = match d.kind {
            Kind::Drain => s
                .vps
                .values()
                .filter(|v| v.node == node)
                .map(|v| v.spec.name.as_str())
                .collect(),
            Kind::Restore => Vec::new(),
        };
        d.ended_ms = now_ms;
        d.paused = None;
        if all_moved && left.is_empty() {
            d.state = DrainState::Complete;
            d.reason.clear();
        } else {
            d.state = DrainState::Incomplete;
            d.reason = if left.is_empty() {
                "not every VPS moved (see each one's reason)".into()
            } else {
                format!("still on {node}: {}", left.join(", "))
            };
        }
        let mut msg = format!("{k} of {node} {} ({})", d.state.name(), d.summary());
        if !d.reason.is_empty() {
            msg.push_str(&format!(": {}", d.reason));
        }
        ev.push(msg);
    }
    (d, ev)
}

impl ClusterState {
    pub(super) fn apply_drain(&mut self, c: DrainCmd) -> Response {
        match c {
            DrainCmd::Start {
                node,
                id,
                kind,
                mode,
                parallel,
                deadline_ms,
                now_ms,
            } => self.start_drain(node, id, kind, mode, parallel, deadline_ms, now_ms),
            DrainCmd::Cancel { node, now_ms } => {
                let Some(d) = self.drains.get_mut(&node) else {
                    return reject(
                        RejectCode::NotFound,
                        format!("node {node} has no drain or restore"),
                    );
                };
                if d.state != DrainState::Running {
                    return reject(
                        RejectCode::FailedPrecondition,
                        format!(
                            "the {} of {node} has ended ({})",
                            d.kind.name(),
                            d.state.name()
                        ),
                    );
                }
                for i in d.items.values_mut() {
                    if i.status == ItemStatus::Pending {
                        i.status = ItemStatus::Skipped;
                        i.reason = "cancelled".into();
                    }
                }
                d.state = DrainState::Cancelled;
                d.paused = None;
                d.ended_ms = now_ms;
                d.reason = "cancelled by an operator".into();
                let msg = format!(
                    "{} of {node} cancelled ({}); moves under way finish on their own",
                    d.kind.name(),
                    d.summary()
                );
                let out = d.clone();
                self.events.push(now_ms, "node", &node, msg);
                Response::Drain(Box::new(out))
            }
            DrainCmd::Tick { node, id, now_ms } => {
                let Some(d) = self.drains.get(&node).filter(|d| d.id == id) else {
                    return reject(
                        RejectCode::FailedPrecondition,
                        format!("drain {id} of {node} is not current"),
                    );
                };
                let (new, ev) = housekeep(self, d, now_ms);
                for e in ev {
                    self.events.push(now_ms, "node", &node, e);
                }
                self.drains.insert(node, new.clone());
                Response::Drain(Box::new(new))
            }
            DrainCmd::Skip {
                node,
                id,
                vps,
                reason,
                now_ms,
            } => {
                let Some(i) = self.pending_item(&node, &id, &vps) else {
                    return reject(
                        RejectCode::FailedPrecondition,
                        format!("{vps} is not pending in drain {id} of {node}"),
                    );
                };
                i.status = ItemStatus::Skipped;
                i.reason = clip(&reason);
                let msg = format!(
                    "drain of {node}: {vps} skipped, it stays where it is: {}",
                    i.reason
                );
                self.events.push(now_ms, "node", &node, msg);
                Response::Ok
            }
            DrainCmd::AttemptFailed {
                node,
                id,
                vps,
                attempts,
                target,
                reason,
                now_ms,
            } => {
                let Some(kind) = self.drains.get(&node).map(|d| d.kind) else {
                    return reject(RejectCode::NotFound, format!("node {node} has no drain"));
                };
                let Some(i) = self
                    .pending_item(&node, &id, &vps)
                    .filter(|i| i.attempts.len() == attempts)
                else {
                    return reject(
                        RejectCode::FailedPrecondition,
                        format!("{vps} changed in drain {id} of {node} meanwhile"),
                    );
                };
                i.attempts.push(Attempt {
                    target,
                    migration_id: String::new(),
                    error: clip(&reason),
                });
                let msg = fail_or_retry(i, kind, &node, &vps);
                self.events.push(now_ms, "node", &node, msg);
                Response::Ok
            }
            DrainCmd::Figures {
                node,
                id,
                vps,
                migration_id,
                mode,
                downtime_ms,
                bytes,
                error,
            } => {
                if let Some(i) = self
                    .drains
                    .get_mut(&node)
                    .filter(|d| d.id == id)
                    .and_then(|d| d.items.get_mut(&vps))
                {
                    if let Some(a) = i
                        .attempts
                        .iter_mut()
                        .find(|a| a.migration_id == migration_id)
                    {
                        // The agent's own words beat a generic cancellation
                        // (a failed attempt only: a lost progress stream of
                        // a move that succeeded is no error).
                        if !error.is_empty() && !a.error.is_empty() {
                            a.error = clip(&error);
                        }
                    }
                    if i.migration_id == migration_id {
                        i.mode = mode;
                        i.downtime_ms = downtime_ms;
                        i.bytes = bytes;
                    }
                }
                Response::Ok
            }
        }
    }

    /// A pending item of a drain under way and not paused (a move refused
    /// because its drain paused meanwhile costs the item no attempt).
    fn pending_item(&mut self, node: &str, id: &str, vps: &str) -> Option<&mut Item> {
        self.drains
            .get_mut(node)
            .filter(|d| d.id == id && d.state == DrainState::Running && d.paused.is_none())
            .and_then(|d| d.items.get_mut(vps))
            .filter(|i| i.status == ItemStatus::Pending)
    }

    #[allow(clippy::too_many_arguments)]
    fn start_drain(
        &mut self,
        node: String,
        id: String,
        kind: Kind,
        mode: String,
        parallel: u32,
        deadline_ms: i64,
        now_ms: i64,
    ) -> Response {
        let Some(n) = self.nodes.get(&node) else {
            return reject(RejectCode::NotFound, format!("node {node:?} not found"));
        };
        if n.down {
            return reject(
                RejectCode::FailedPrecondition,
                format!(
                    "node {node} is down: its VPSes cannot move live without its agent \
                     (nothing was started)"
                ),
            );
        }
        let prev = self.drains.get(&node);
        if let Some(p) = prev.filter(|p| p.state == DrainState::Running) {
            return reject(
                RejectCode::FailedPrecondition,
                format!(
                    "node {node} has a {} under way ({}): follow it with `ferryctl node \
                     drain-status {node}`, or cancel it first",
                    p.kind.name(),
                    p.id
                ),
            );
        }
        let mut items = BTreeMap::new();
        // What earlier drains moved away and is still where they put it: a
        // drain run again keeps it for the restore; a restore brings it back.
        let mut moved_away = prev.map(|p| p.moved_away.clone()).unwrap_or_default();
        moved_away.retain(|name, at| self.vps.get(name).is_some_and(|v| v.node == *at));
        match kind {
            Kind::Drain => {
                for v in self.vps.values().filter(|v| v.node == node) {
                    items.insert(v.spec.name.clone(), Item::pending("", ""));
                }
            }
            Kind::Restore => {
                for (name, at) in &moved_away {
                    items.insert(name.clone(), Item::pending(&node, at));
                }
            }
        }
        let d = Drain {
            id,
            node: node.clone(),
            kind,
            state: DrainState::Running,
            reason: String::new(),
            paused: None,
            mode,
            parallel: parallel.clamp(1, MAX_PARALLEL),
            started_ms: now_ms,
            ended_ms: 0,
            deadline_ms,
            items,
            moved_away,
        };
        let cordon = kind == Kind::Drain;
        if let Some(n) = self.nodes.get_mut(&node) {
            if n.cordoned != cordon {
                n.cordoned = cordon;
                let what = if cordon { "cordoned" } else { "uncordoned" };
                self.events.push(
                    now_ms,
                    "node",
                    &node,
                    format!("{what} for its {}", kind.name()),
                );
            }
        }
        self.events.push(
            now_ms,
            "node",
            &node,
            format!(
                "{} of {node} starts ({}): {} VPS(es), {} at a time",
                kind.name(),
                d.id,
                d.items.len(),
                d.parallel
            ),
        );
        self.drains.insert(node, d.clone());
        Response::Drain(Box::new(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Capacity, Desired, MigrationCmd, NodeCmd, Request, VpsCmd, VpsSpecData};

    fn node(s: &mut ClusterState, name: &str) {
        s.apply(Request::Node(NodeCmd::Register {
            name: name.into(),
            addr: format!("unix:/{name}.sock"),
            capacity: Capacity {
                cpu_millicores: 4000,
                memory_bytes: 4 << 30,
                disk_bytes: 0,
            },
            labels: Default::default(),
            now_ms: 0,
        }));
    }

    fn vps(s: &mut ClusterState, name: &str, on: &str) {
        let r = s.apply(Request::Vps(VpsCmd::Create {
            spec: Box::new(VpsSpecData {
                name: name.into(),
                memory_bytes: 64 << 20,
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
        s.vps.get_mut(name).unwrap().pin_node.clear();
    }

    fn start(s: &mut ClusterState, node: &str, kind: Kind) -> Response {
        s.apply(Request::Drain(DrainCmd::Start {
            node: node.into(),
            id: format!("{}-{node}", kind.name()),
            kind,
            mode: "auto".into(),
            parallel: 2,
            deadline_ms: 0,
            now_ms: 10,
        }))
    }

    fn begin(
        s: &mut ClusterState,
        node: &str,
        kind: Kind,
        vps: &str,
        mid: &str,
        to: &str,
    ) -> Response {
        s.apply(Request::Migration(MigrationCmd::Begin {
            name: vps.into(),
            id: mid.into(),
            target: to.into(),
            mode: "auto".into(),
            now_ms: 11,
            drain: Some(DrainRef {
                node: node.into(),
                id: format!("{}-{node}", kind.name()),
            }),
        }))
    }

    fn decide(s: &mut ClusterState, vps: &str, mid: &str, commit: bool) {
        s.apply(Request::Migration(MigrationCmd::Decide {
            name: vps.into(),
            id: mid.into(),
            commit,
            reason: if commit { "" } else { "target agent killed" }.into(),
            now_ms: 12,
        }));
    }

    fn tick(s: &mut ClusterState, node: &str, kind: Kind, now_ms: i64) -> Drain {
        match s.apply(Request::Drain(DrainCmd::Tick {
            node: node.into(),
            id: format!("{}-{node}", kind.name()),
            now_ms,
        })) {
            Response::Drain(d) => *d,
            r => panic!("{r:?}"),
        }
    }

    fn cluster() -> ClusterState {
        let mut s = ClusterState::default();
        for n in ["a", "b", "c", "d"] {
            node(&mut s, n);
        }
        vps(&mut s, "v1", "a");
        vps(&mut s, "v2", "a");
        vps(&mut s, "w", "b");
        s
    }

    #[test]
    fn a_drain_cordons_its_node_and_completes_only_when_the_node_is_empty() {
        let mut s = cluster();
        let Response::Drain(d) = start(&mut s, "a", Kind::Drain) else {
            panic!()
        };
        assert!(s.nodes["a"].cordoned);
        assert_eq!(d.items.keys().collect::<Vec<_>>(), ["v1", "v2"]);
        // A second drain of the same node is refused while this one runs.
        assert!(matches!(
            start(&mut s, "a", Kind::Drain),
            Response::Rejected {
                code: RejectCode::FailedPrecondition,
                ..
            }
        ));
        assert!(matches!(
            begin(&mut s, "a", Kind::Drain, "v1", "m1", "c"),
            Response::Vps(_)
        ));
        // Never started twice: the item is moving, a second Begin is refused
        // (v1 already migrates, and the item is not pending).
        assert!(matches!(
            begin(&mut s, "a", Kind::Drain, "v1", "m1b", "d"),
            Response::Rejected { .. }
        ));
        assert_eq!(s.drains["a"].items["v1"].status, ItemStatus::Moving);
        decide(&mut s, "v1", "m1", true);
        assert_eq!(s.drains["a"].items["v1"].status, ItemStatus::Moved);
        assert_eq!(s.drains["a"].moved_away["v1"], "c");
        // A VPS that appears on the node meanwhile (an operator's pinned
        // create) joins the drain: it is never "complete" with it there.
        s.nodes.get_mut("a").unwrap().cordoned = false;
        vps(&mut s, "late", "a");
        s.nodes.get_mut("a").unwrap().cordoned = true;
        let d = tick(&mut s, "a", Kind::Drain, 20);
        assert_eq!(d.items["late"].status, ItemStatus::Pending);
        for (v, m) in [("v2", "m2"), ("late", "m3")] {
            assert!(matches!(
                begin(&mut s, "a", Kind::Drain, v, m, "d"),
                Response::Vps(_)
            ));
            decide(&mut s, v, m, true);
        }
        let d = tick(&mut s, "a", Kind::Drain, 30);
        assert_eq!(d.state, DrainState::Complete, "{d:?}");
        assert_eq!(d.ended_ms, 30);
        assert!(s.nodes["a"].cordoned, "a drained node stays cordoned");
    }

    #[test]
    fn a_failed_move_is_retried_elsewhere_then_failed_with_every_reason() {
        let mut s = cluster();
        start(&mut s, "a", Kind::Drain);
        for (n, to) in ["b", "c", "d"].iter().enumerate() {
            let mid = format!("m{n}");
            assert!(matches!(
                begin(&mut s, "a", Kind::Drain, "v1", &mid, to),
                Response::Vps(_)
            ));
            decide(&mut s, "v1", &mid, false);
        }
        let i = &s.drains["a"].items["v1"];
        assert_eq!(i.status, ItemStatus::Failed);
        assert_eq!(i.failed_targets(), ["b", "c", "d"]);
        assert!(
            i.reason.contains("attempt 3 to d: target agent killed"),
            "{}",
            i.reason
        );
        // The other item fits nowhere: skipped; the drain ends incomplete and
        // says what is still on the node.
        s.apply(Request::Drain(DrainCmd::Skip {
            node: "a".into(),
            id: "drain-a".into(),
            vps: "v2".into(),
            reason: "no node can take it".into(),
            now_ms: 13,
        }));
        let d = tick(&mut s, "a", Kind::Drain, 40);
        assert_eq!(d.state, DrainState::Incomplete);
        assert!(d.reason.contains("still on a: v1, v2"), "{}", d.reason);
    }

    #[test]
    fn a_start_that_never_got_going_counts_once() {
        let mut s = cluster();
        start(&mut s, "a", Kind::Drain);
        let failed = |s: &mut ClusterState, attempts| {
            s.apply(Request::Drain(DrainCmd::AttemptFailed {
                node: "a".into(),
                id: "drain-a".into(),
                vps: "v1".into(),
                attempts,
                target: "b".into(),
                reason: "agent unreachable".into(),
                now_ms: 13,
            }))
        };
        assert_eq!(failed(&mut s, 0), Response::Ok);
        // A second report of the same start (stale count) changes nothing.
        assert!(matches!(failed(&mut s, 0), Response::Rejected { .. }));
        let i = &s.drains["a"].items["v1"];
        assert_eq!((i.status, i.attempts.len()), (ItemStatus::Pending, 1));
    }

    #[test]
    fn a_down_node_pauses_the_drain_and_a_deadline_ends_it() {
        let mut s = cluster();
        s.apply(Request::Drain(DrainCmd::Start {
            node: "a".into(),
            id: "drain-a".into(),
            kind: Kind::Drain,
            mode: "auto".into(),
            parallel: 2,
            deadline_ms: 1000,
            now_ms: 10,
        }));
        s.nodes.get_mut("a").unwrap().down = true;
        let d = tick(&mut s, "a", Kind::Drain, 20);
        assert!(d.paused.is_some());
        assert!(begin(&mut s, "a", Kind::Drain, "v1", "m1", "b") != Response::Ok);
        assert!(
            s.vps["v1"].migration.is_none(),
            "nothing starts while paused"
        );
        s.nodes.get_mut("a").unwrap().down = false;
        let d = tick(&mut s, "a", Kind::Drain, 30);
        assert!(d.paused.is_none());
        let d = tick(&mut s, "a", Kind::Drain, 1000);
        assert_eq!(d.state, DrainState::Incomplete);
        assert_eq!(d.items["v1"].reason, "the deadline passed first");
    }

    #[test]
    fn a_restore_brings_back_what_is_still_where_the_drain_put_it() {
        let mut s = cluster();
        start(&mut s, "a", Kind::Drain);
        for (v, m, to) in [("v1", "m1", "c"), ("v2", "m2", "d")] {
            begin(&mut s, "a", Kind::Drain, v, m, to);
            decide(&mut s, v, m, true);
        }
        assert_eq!(
            tick(&mut s, "a", Kind::Drain, 20).state,
            DrainState::Complete
        );
        // v2 moved on since (an operator's move): it is not the restore's.
        s.apply(Request::Migration(MigrationCmd::Begin {
            name: "v2".into(),
            id: "op".into(),
            target: "b".into(),
            mode: "auto".into(),
            now_ms: 21,
            drain: None,
        }));
        decide(&mut s, "v2", "op", true);
        let Response::Drain(r) = start(&mut s, "a", Kind::Restore) else {
            panic!()
        };
        assert!(!s.nodes["a"].cordoned, "a restore uncordons");
        assert_eq!(r.items.keys().collect::<Vec<_>>(), ["v1"]);
        assert_eq!(
            (r.items["v1"].to.as_str(), r.items["v1"].from.as_str()),
            ("a", "c")
        );
        begin(&mut s, "a", Kind::Restore, "v1", "m9", "a");
        decide(&mut s, "v1", "m9", true);
        let r = tick(&mut s, "a", Kind::Restore, 30);
        assert_eq!(r.state, DrainState::Complete);
        assert_eq!(s.vps["v1"].node, "a");
        assert!(r.moved_away.is_empty());
    }

    #[test]
    fn a_second_drain_keeps_what_the_first_moved_for_the_restore() {
        let mut s = cluster();
        start(&mut s, "a", Kind::Drain);
        begin(&mut s, "a", Kind::Drain, "v1", "m1", "c");
        decide(&mut s, "v1", "m1", true);
        s.apply(Request::Drain(DrainCmd::Skip {
            node: "a".into(),
            id: "drain-a".into(),
            vps: "v2".into(),
            reason: "no room".into(),
            now_ms: 13,
        }));
        assert_eq!(
            tick(&mut s, "a", Kind::Drain, 20).state,
            DrainState::Incomplete
        );
        // Room was made; the operator drains again.
        s.apply(Request::Drain(DrainCmd::Start {
            node: "a".into(),
            id: "drain-a2".into(),
            kind: Kind::Drain,
            mode: "auto".into(),
            parallel: 2,
            deadline_ms: 0,
            now_ms: 30,
        }));
        assert_eq!(s.drains["a"].items.keys().collect::<Vec<_>>(), ["v2"]);
        assert_eq!(s.drains["a"].moved_away["v1"], "c");
        s.apply(Request::Drain(DrainCmd::Cancel {
            node: "a".into(),
            now_ms: 31,
        }));
        let Response::Drain(r) = start(&mut s, "a", Kind::Restore) else {
            panic!()
        };
        assert!(r.items.contains_key("v1"), "{r:?}");
    }

    #[test]
    fn a_move_refused_because_the_drain_paused_costs_no_attempt() {
        let mut s = cluster();
        start(&mut s, "a", Kind::Drain);
        s.nodes.get_mut("a").unwrap().down = true;
        tick(&mut s, "a", Kind::Drain, 20);
        let r = begin(&mut s, "a", Kind::Drain, "v1", "m1", "b");
        assert!(
            matches!(&r, Response::Rejected { message, .. } if message.contains("is paused")),
            "{r:?}"
        );
        // The driver reports the refused start; it is not the target's fault.
        let r = s.apply(Request::Drain(DrainCmd::AttemptFailed {
            node: "a".into(),
            id: "drain-a".into(),
            vps: "v1".into(),
            attempts: 0,
            target: "b".into(),
            reason: "paused".into(),
            now_ms: 21,
        }));
        assert!(matches!(r, Response::Rejected { .. }), "{r:?}");
        assert!(s.drains["a"].items["v1"].attempts.is_empty());
    }

    #[test]
    fn a_reason_from_a_node_is_kept_short() {
        let mut s = cluster();
        start(&mut s, "a", Kind::Drain);
        let long = "é".repeat(5000);
        s.apply(Request::Drain(DrainCmd::Skip {
            node: "a".into(),
            id: "drain-a".into(),
            vps: "v1".into(),
            reason: long,
            now_ms: 13,
        }));
        let r = &s.drains["a"].items["v1"].reason;
        assert!(r.len() <= REASON_MAX + '…'.len_utf8(), "{}", r.len());
        assert!(r.ends_with('…'));
    }

    #[test]
    fn a_cancelled_drain_starts_nothing_more() {
        let mut s = cluster();
        start(&mut s, "a", Kind::Drain);
        begin(&mut s, "a", Kind::Drain, "v1", "m1", "b");
        let Response::Drain(d) = s.apply(Request::Drain(DrainCmd::Cancel {
            node: "a".into(),
            now_ms: 15,
        })) else {
            panic!()
        };
        assert_eq!(d.state, DrainState::Cancelled);
        assert_eq!(d.items["v2"].status, ItemStatus::Skipped);
        assert!(matches!(
            begin(&mut s, "a", Kind::Drain, "v2", "m2", "c"),
            Response::Rejected { .. }
        ));
        // The move under way still settles its item.
        decide(&mut s, "v1", "m1", true);
        assert_eq!(s.drains["a"].items["v1"].status, ItemStatus::Moved);
    }
}
