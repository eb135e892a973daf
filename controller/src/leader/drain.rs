//! The leader's drain driver: every tick, for each drain or restore under
//! way, it writes the housekeeping the state calls for
//! ([`housekeep`](crate::state::drain::housekeep)), then starts moves for
//! pending items, up to the drain's `parallel`, through the one migration
//! driver ([`crate::ops::migration`]). Items settle in the state machine from
//! their migrations' decisions, so this holds nothing a new leader needs:
//! it only remembers which starts it has under way (so one is not asked
//! twice while its Begin is on its way) and the last progress of each move
//! (bytes, for the live view).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use ferry_proto::agent::v1 as apb;
use futures::StreamExt;
use tracing::Instrument;

use crate::api::now_ms;
use crate::host::Controller;
use crate::member::Member;
use crate::ops::migration::{self, Move};
use crate::planner::{self, Choice};
use crate::state::drain::{housekeep, Drain, DrainCmd, DrainRef, DrainState, ItemStatus};
use crate::state::Request;

/// What the driver keeps in the leader's memory.
#[derive(Default)]
pub struct DriverState {
    /// VPSes whose move this replica is starting (Begin not yet applied).
    starting: Mutex<HashSet<String>>,
    /// VPS → the last progress event of its move.
    pub progress: Mutex<HashMap<String, apb::MigrationEvent>>,
}

impl DriverState {
    pub fn progress_of(&self, vps: &str) -> Option<apb::MigrationEvent> {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(vps)
            .cloned()
    }
}

pub async fn tick(ctl: &Arc<Controller>) {
    let Ok(m) = ctl.member().await else {
        return;
    };
    let drains: Vec<Drain> = m.sm.read(|a| {
        a.state
            .drains
            .values()
            .filter(|d| d.state == DrainState::Running)
            .cloned()
            .collect()
    });
    for d in drains {
        let span =
            tracing::info_span!("drain", node = %d.node, drain = %d.id, kind = d.kind.name());
        drive(ctl, &m, d).instrument(span).await;
    }
}

async fn drive(ctl: &Arc<Controller>, m: &Arc<Member>, d: Drain) {
    let now = now_ms();
    let (new, _) = m.sm.read(|a| housekeep(&a.state, &d, now));
    if new != d {
        let cmd = DrainCmd::Tick {
            node: d.node.clone(),
            id: d.id.clone(),
            now_ms: now,
        };
        if let Err(e) = m.propose(Request::Drain(cmd)).await {
            tracing::warn!(error = %e, "could not record the drain's progress");
        }
        return; // the next tick works from the new record
    }
    if d.paused.is_some() {
        return;
    }
    let state = &ctl.leader.drain;
    let starting = state
        .starting
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut busy = d.count(ItemStatus::Moving)
        + d.items
            .iter()
            .filter(|(n, i)| i.status == ItemStatus::Pending && starting.contains(*n))
            .count();
    for (name, item) in &d.items {
        if busy >= d.parallel as usize {
            break;
        }
        if item.status != ItemStatus::Pending || starting.contains(name) {
            continue;
        }
        let choice = m.sm.read(|a| planner::choose(&a.state, &d, name, item));
        match choice {
            Choice::Wait(why) => {
                tracing::debug!(vps = %name, %why, "waits");
            }
            Choice::Nowhere(why) => {
                let cmd = DrainCmd::Skip {
                    node: d.node.clone(),
                    id: d.id.clone(),
                    vps: name.clone(),
                    reason: why,
                    now_ms: now_ms(),
                };
                if let Err(e) = m.propose(Request::Drain(cmd)).await {
                    tracing::warn!(error = %e, vps = %name, "could not record a skipped VPS");
                }
            }
            Choice::Move { target, mode, why } => {
                busy += 1;
                state
                    .starting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.clone());
                tracing::info!(vps = %name, %target, %mode, %why, "moving");
                let r = DrainRef {
                    node: d.node.clone(),
                    id: d.id.clone(),
                };
                tokio::spawn(
                    move_one(
                        ctl.clone(),
                        m.clone(),
                        r,
                        name.clone(),
                        target,
                        mode,
                        item.attempts.len(),
                    )
                    .in_current_span(),
                );
            }
        }
    }
}

/// Starts one item's migration and follows it to its end.
async fn move_one(
    ctl: Arc<Controller>,
    m: Arc<Member>,
    r: DrainRef,
    name: String,
    target: String,
    mode: String,
    attempts: usize,
) {
    let state = &ctl.leader.drain;
    let started = migration::start(
        &ctl,
        Move {
            name: name.clone(),
            to_node: target.clone(),
            mode: ferry_proto::modes::parse(&mode).unwrap_or(apb::MigrationMode::Auto),
            verify: false,
            drain: Some(r.clone()),
        },
    )
    .await;
    state
        .starting
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&name);
    let mut started = match started {
        Ok(s) => s,
        Err(crate::error::ControllerError::Agent {
            node,
            code: tonic::Code::Unavailable,
            message,
        }) => {
            // The source agent did not answer: nothing was recorded. Not the
            // target's fault, so no attempt is spent; the item is tried
            // again, and if the node stays silent it goes down and the
            // drain pauses.
            tracing::warn!(vps = %name, %node, %message, "the source agent did not answer; trying again");
            return;
        }
        Err(crate::error::ControllerError::Rejected { message, .. }) => {
            // Refused before anything was recorded (the cluster changed since
            // the plan: the source went down, a node got busy). Counted, so a
            // refusal that persists ends in `failed`, but not held against
            // the target: the next plan may choose it again.
            tracing::warn!(vps = %name, %target, %message, "the move was refused");
            let cmd = DrainCmd::AttemptFailed {
                node: r.node.clone(),
                id: r.id.clone(),
                vps: name.clone(),
                attempts,
                target: String::new(),
                reason: format!("refused before it started: {message}"),
                now_ms: now_ms(),
            };
            let _ = m.propose(Request::Drain(cmd)).await;
            return;
        }
        Err(e) => {
            tracing::warn!(vps = %name, %target, error = %e, "the move did not start");
            // Counted only if nothing else settled the item meanwhile (a
            // Begin that was applied, then cancelled, is settled by its
            // decision).
            let cmd = DrainCmd::AttemptFailed {
                node: r.node.clone(),
                id: r.id.clone(),
                vps: name.clone(),
                attempts,
                target,
                reason: e.to_string(),
                now_ms: now_ms(),
            };
            let _ = m.propose(Request::Drain(cmd)).await;
            return;
        }
    };
    let mut last = apb::MigrationEvent::default();
    while let Some(ev) = started.events.next().await {
        match ev {
            Ok(ev) => {
                state
                    .progress
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.clone(), ev.clone());
                let done = ev.done;
                last = ev;
                if done {
                    break;
                }
            }
            Err(s) => {
                last.error = s.message().to_string();
                break;
            }
        }
    }
    state
        .progress
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&name);
    let cmd = DrainCmd::Figures {
        node: r.node,
        id: r.id,
        vps: name,
        migration_id: started.id,
        mode: if last.mode.is_empty() {
            mode
        } else {
            last.mode.clone()
        },
        downtime_ms: last.downtime_ms,
        bytes: last.phases.iter().map(|p| p.bytes).sum(),
        error: last.error,
    };
    let _ = m.propose(Request::Drain(cmd)).await;
}
