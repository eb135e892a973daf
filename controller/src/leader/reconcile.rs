//! The reconciler: compares what the cluster wants with what each node last
//! reported, and calls agents to close the gap. Every call carries the VPS's
//! generation, so an agent refuses instructions older than what it already
//! did. Calls are idempotent (a repeated create of the same generation returns
//! the VPS); failures back off per VPS, up to [`MAX_BACKOFF`]. Nodes that are
//! down are left alone.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_proto::agent::v1 as apb;
use ferry_proto::report::{ARRIVING, LEAVING};

use crate::host::Controller;
use crate::state::{ClusterState, Desired};

const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Agent calls in flight at once.
const PARALLEL: usize = 16;

#[derive(Debug, Clone)]
pub enum Action {
    Create {
        spec: Box<apb::VpsSpec>,
        start: bool,
        /// The node lacks the VPS's template: it fetches it first.
        fetch: Option<crate::ops::templates::Fetch>,
    },
    Start {
        generation: u64,
    },
    Stop {
        generation: u64,
    },
    Destroy {
        generation: u64,
    },
    /// The node holds an older generation: bring its limits up to date.
    Sync {
        spec: Box<apb::VpsSpec>,
    },
}

/// One thing to do on one node.
#[derive(Debug, Clone)]
pub struct Step {
    /// The node's name: its agent's certificate must carry it.
    pub node: String,
    pub node_addr: String,
    pub vps: String,
    pub action: Action,
}

/// How long after a committed move its target may go on not listing the
/// VPS before the reconciler takes it for lost: the decision clears the
/// migration record before the target's finish has run, and an arriving VPS
/// is not in the target's reports until then (a create in that window
/// cold-booted a second copy over the real restore).
pub const SETTLE: Duration = Duration::from_secs(30);

/// What to do, from the state and the latest reports (pure; tested alone).
/// `settling`: VPSes just moved by a migration, within [`SETTLE`].
pub fn plan(
    s: &ClusterState,
    seen: &HashMap<String, super::Seen>,
    settling: &HashSet<String>,
) -> Vec<Step> {
    let mut steps = Vec::new();
    for v in s.vps.values() {
        let Some(node) = s.nodes.get(&v.node) else {
            continue;
        };
        let Some(report) = seen.get(&v.node) else {
            continue;
        };
        if node.down {
            continue;
        }
        // A migrating VPS belongs to its migration: its agents move it and
        // settle the outcome; acting on either node now would race them.
        if v.migration.is_some() {
            continue;
        }
        let action = match (report.vps.get(&v.spec.name), v.desired) {
            // Still arriving, or leaving: its migration settles it, nobody
            // else.
            (Some((_, st)), _) if st == ARRIVING || st == LEAVING => None,
            // Moved here just now: the target is still finishing it.
            (None, _) if settling.contains(&v.spec.name) => None,
            (None, d) => Some(Action::Create {
                spec: Box::new(v.spec.to_pb(v.generation)),
                start: d == Desired::Running,
                fetch: crate::ops::templates::needed(s, &v.node, &v.spec.template),
            }),
            (Some((_, st)), Desired::Running) if st == "stopped" => Some(Action::Start {
                generation: v.generation,
            }),
            (Some((_, st)), Desired::Stopped) if st == "running" => Some(Action::Stop {
                generation: v.generation,
            }),
            (Some((g, _)), _) if *g < v.generation => Some(Action::Sync {
                spec: Box::new(v.spec.to_pb(v.generation)),
            }),
            _ => None,
        };
        if let Some(action) = action {
            steps.push(Step {
                node: v.node.clone(),
                node_addr: node.addr.clone(),
                vps: v.spec.name.clone(),
                action,
            });
        }
    }
    // What a node runs for the cluster (generation > 0) that the cluster no
    // longer has there: deleted, so destroyed. Node-local VPSes (generation 0)
    // are the operator's and stay.
    for (node_name, report) in seen {
        let Some(node) = s.nodes.get(node_name) else {
            continue;
        };
        if node.down {
            continue;
        }
        for (name, (generation, status)) in &report.vps {
            let ours = s.vps.get(name).is_some_and(|v| &v.node == node_name);
            let migrating = s.vps.get(name).is_some_and(|v| v.migration.is_some());
            // An arrival is its migration's to keep or drop; a source's
            // copy its migration's to remove (after a committed move) or
            // resume (after a rolled-back one).
            let moving = status == ARRIVING || status == LEAVING;
            // Just moved away: the report may predate the move (it says
            // running, not leaving); the migration removes the source's
            // copy itself. One still there after SETTLE is a stray.
            let just_moved = settling.contains(name);
            if *generation > 0 && !ours && !migrating && !moving && !just_moved {
                steps.push(Step {
                    node: node_name.clone(),
                    node_addr: node.addr.clone(),
                    vps: name.clone(),
                    action: Action::Destroy {
                        generation: *generation,
                    },
                });
            }
        }
    }
    steps
}

pub struct Reconciler {
    /// VPS → (generation, when this leader first saw it) for VPSes whose
    /// last migration moved them.
    moved: HashMap<String, (u64, Instant)>,
    inflight: Arc<Mutex<HashSet<String>>>,
    backoff: Arc<Mutex<HashMap<String, (Instant, Duration)>>>,
    limit: Arc<tokio::sync::Semaphore>,
}

impl Default for Reconciler {
    fn default() -> Self {
        Self {
            moved: Default::default(),
            inflight: Default::default(),
            backoff: Default::default(),
            limit: Arc::new(tokio::sync::Semaphore::new(PARALLEL)),
        }
    }
}

impl Reconciler {
    pub async fn tick(&mut self, ctl: &Controller) {
        let Ok(m) = ctl.member().await else { return };
        let seen = ctl.leader.snapshot();
        let now = Instant::now();
        let moved = &mut self.moved;
        let settling = m.sm.read(|a| {
            moved.retain(|name, _| a.state.vps.contains_key(name));
            let mut settling = HashSet::new();
            for v in a.state.vps.values() {
                if !v.last_migration.as_ref().is_some_and(|o| o.moved) {
                    continue;
                }
                let e = moved
                    .entry(v.spec.name.clone())
                    .or_insert((v.generation, now));
                if e.0 != v.generation {
                    *e = (v.generation, now);
                }
                if now.duration_since(e.1) < SETTLE {
                    settling.insert(v.spec.name.clone());
                }
            }
            settling
        });
        let steps = m.sm.read(|a| plan(&a.state, &seen, &settling));
        for step in steps {
            let key = format!("{}/{}", step.node_addr, step.vps);
            {
                let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
                if inflight.contains(&key) {
                    continue;
                }
                let b = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
                if b.get(&key)
                    .is_some_and(|(until, _)| Instant::now() < *until)
                {
                    continue;
                }
                inflight.insert(key.clone());
            }
            let (inflight, backoff, limit) = (
                self.inflight.clone(),
                self.backoff.clone(),
                self.limit.clone(),
            );
            tokio::spawn(async move {
                let _permit = limit.acquire_owned().await;
                let res = tokio::time::timeout(CALL_TIMEOUT, run(&step))
                    .await
                    .unwrap_or_else(|_| Err("timed out".into()));
                // One lock at a time: `tick` takes inflight, then backoff;
                // holding backoff here while taking inflight deadlocked both
                // (and, with std mutexes, every worker thread behind them).
                {
                    let mut b = backoff.lock().unwrap_or_else(|p| p.into_inner());
                    match res {
                        Ok(()) => {
                            tracing::info!(vps = %step.vps, node = %step.node_addr, action = ?short(&step.action), "reconciled");
                            b.remove(&key);
                        }
                        Err(e) => {
                            let next = b
                                .get(&key)
                                .map(|(_, d)| (*d * 2).min(MAX_BACKOFF))
                                .unwrap_or(Duration::from_millis(500));
                            tracing::warn!(vps = %step.vps, node = %step.node_addr, error = %e, retry_in = ?next, "reconcile step failed");
                            b.insert(key.clone(), (Instant::now() + next, next));
                        }
                    }
                }
                inflight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&key);
            });
        }
    }
}

fn short(a: &Action) -> &'static str {
    match a {
        Action::Create { .. } => "create",
        Action::Start { .. } => "start",
        Action::Stop { .. } => "stop",
        Action::Destroy { .. } => "destroy",
        Action::Sync { .. } => "sync",
    }
}

async fn run(step: &Step) -> Result<(), String> {
    let a: ferry_proto::addr::Addr = step.node_addr.parse()?;
    let ch = ferry_proto::addr::connect_node_named(&a, &step.node)
        .await
        .map_err(|e| format!("agent {a}: {e}"))?;
    let mut c = ferry_proto::limits::agent_client(ch);
    let name = step.vps.clone();
    let r = match &step.action {
        Action::Create { spec, start, fetch } => {
            if let Some(f) = fetch {
                crate::ops::templates::fetch(&step.node, &step.node_addr, f).await?;
            }
            c.create_vps(apb::CreateVpsRequest {
                spec: Some((**spec).clone()),
                start: *start,
            })
            .await
            .map(|_| ())
        }
        Action::Start { generation } => c
            .start_vps(apb::StartVpsRequest {
                name,
                generation: *generation,
            })
            .await
            .map(|_| ()),
        Action::Stop { generation } => c
            .stop_vps(apb::StopVpsRequest {
                name,
                generation: *generation,
                timeout_secs: 0,
                force: false,
            })
            .await
            .map(|_| ()),
        Action::Sync { spec } => {
            let l = spec.limits.unwrap_or_default();
            c.set_vps(apb::SetVpsRequest {
                name,
                cpu_millicores: Some(l.cpu_millicores),
                // 0 in a spec means the agent's default: keep what the agent has.
                cpu_weight: (l.cpu_weight != 0).then_some(l.cpu_weight),
                memory_bytes: Some(l.memory_bytes),
                swap_bytes: Some(l.swap_bytes),
                pids: (l.pids != 0).then_some(l.pids),
                autostart: None,
                generation: spec.generation,
                disk_bytes: (l.disk_bytes != 0).then_some(l.disk_bytes),
            })
            .await
            .map(|_| ())
        }
        Action::Destroy { generation } => match c
            .destroy_vps(apb::DestroyVpsRequest {
                name,
                force: true,
                generation: *generation,
            })
            .await
        {
            // Gone already (the plan came from a report older than the
            // destroy that removed it): what the step wanted.
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            r => r.map(|_| ()),
        },
    };
    r.map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Capacity, NodeCmd, Request, VpsCmd, VpsSpecData};

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(Request::Node(NodeCmd::Register {
            name: "a".into(),
            addr: "unix:/a.sock".into(),
            capacity: Capacity {
                cpu_millicores: 4000,
                memory_bytes: 8 << 30,
                disk_bytes: 0,
            },
            labels: Default::default(),
            now_ms: 0,
        }));
        s.apply(Request::Vps(VpsCmd::Create {
            spec: Box::new(VpsSpecData {
                name: "v".into(),
                memory_bytes: 64 << 20,
                ..Default::default()
            }),
            pin_node: String::new(),
            node_selector: Default::default(),
            anti_affinity_group: String::new(),
            desired: Desired::Running,
            allocate_ip: false,
            now_ms: 0,
        }));
        s
    }

    fn seen(vps: &[(&str, u64, &str)]) -> HashMap<String, super::super::Seen> {
        let vps = vps
            .iter()
            .map(|(n, g, s)| (n.to_string(), (*g, s.to_string())))
            .collect();
        HashMap::from([(
            "a".to_string(),
            super::super::Seen {
                at: Instant::now(),
                vps,
            },
        )])
    }

    #[test]
    fn plans_create_start_stop_destroy_and_leaves_node_local_vpses_alone() {
        let s = state();
        let kinds = |steps: Vec<Step>| {
            steps
                .into_iter()
                .map(|s| (s.vps, short(&s.action)))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            kinds(plan(&s, &seen(&[]), &HashSet::new())),
            [("v".to_string(), "create")]
        );
        assert_eq!(
            kinds(plan(&s, &seen(&[("v", 1, "stopped")]), &HashSet::new())),
            [("v".to_string(), "start")]
        );
        assert!(plan(&s, &seen(&[("v", 1, "running")]), &HashSet::new()).is_empty());
        // A newer generation than the node holds (limits changed): sync.
        let mut newer = s.clone();
        newer.vps.get_mut("v").unwrap().generation = 2;
        assert_eq!(
            kinds(plan(&newer, &seen(&[("v", 1, "running")]), &HashSet::new())),
            [("v".to_string(), "sync")]
        );
        // Deleted from the cluster: destroyed. Made node-local (generation 0): untouched.
        assert_eq!(
            kinds(plan(
                &s,
                &seen(&[
                    ("v", 1, "running"),
                    ("old", 3, "running"),
                    ("mine", 0, "running")
                ]),
                &HashSet::new()
            )),
            [("old".to_string(), "destroy")]
        );
        // Migrating: hands off, on the source and on the target.
        let mut moving = s.clone();
        moving.vps.get_mut("v").unwrap().migration = Some(crate::state::Migration {
            id: "m1".into(),
            target: "b".into(),
            mode: "stop-copy".into(),
            phase: "rootfs".into(),
            started_ms: 0,
            drain: None,
        });
        assert!(plan(&moving, &seen(&[("v", 1, "stopped")]), &HashSet::new()).is_empty());
        assert!(plan(&moving, &seen(&[]), &HashSet::new()).is_empty());
        // No report from the node yet, or the node down: nothing.
        assert!(plan(&s, &HashMap::new(), &HashSet::new()).is_empty());
        // Just moved here by a migration: the target's report may predate its
        // finish, so no create until it settles (then a lost VPS is made again).
        let settling: HashSet<String> = ["v".to_string()].into();
        assert!(plan(&s, &seen(&[]), &settling).is_empty());
        assert_eq!(
            kinds(plan(&s, &seen(&[("v", 1, "stopped")]), &settling)),
            [("v".to_string(), "start")],
            "a report that lists it is acted on"
        );
        let mut down = s.clone();
        down.nodes.get_mut("a").unwrap().down = true;
        assert!(plan(&down, &seen(&[]), &HashSet::new()).is_empty());
    }

    /// A VPS its node reports as still arriving by migration is left to the
    /// migration, however long it takes: never created, started or synced
    /// there (the cold boot over a restore), never destroyed as a stray.
    #[test]
    fn an_arriving_vps_is_left_to_its_migration() {
        let s = state();
        assert!(plan(&s, &seen(&[("v", 1, ARRIVING)]), &HashSet::new()).is_empty());
        let mut newer = s.clone();
        newer.vps.get_mut("v").unwrap().generation = 2;
        assert!(plan(&newer, &seen(&[("v", 1, ARRIVING)]), &HashSet::new()).is_empty());
        // On a node the cluster did not put it on (a move rolled back): kept
        // for the target's own abort to remove.
        assert!(plan(
            &s,
            &seen(&[("v", 1, "running"), ("gone", 4, ARRIVING)]),
            &HashSet::new()
        )
        .is_empty());
    }

    /// The source's copy of a VPS a migration is moving away (its node
    /// reports it leaving) is left to the migration: not destroyed as a
    /// stray once the decision has moved the record (the migration removes
    /// it itself), not started or stopped while it is still the VPS's node.
    #[test]
    fn a_leaving_vps_is_left_to_its_migration() {
        let s = state();
        // Still placed here.
        assert!(plan(&s, &seen(&[("v", 1, LEAVING)]), &HashSet::new()).is_empty());
        // Decided: the record is elsewhere now, the source still holds it.
        let mut moved = s.clone();
        moved.vps.get_mut("v").unwrap().node = "b".into();
        let steps = plan(&moved, &seen(&[("v", 1, LEAVING)]), &HashSet::new());
        assert!(
            !steps.iter().any(|st| st.node == "a"),
            "acted on the source's copy: {:?}",
            steps.iter().map(|st| short(&st.action)).collect::<Vec<_>>()
        );
        // A report older than the move (running, not leaving) within the
        // settling time: left to the migration too.
        let settling: HashSet<String> = ["v".to_string()].into();
        let steps = plan(&moved, &seen(&[("v", 1, "running")]), &settling);
        assert!(!steps.iter().any(|st| st.node == "a"));
        // After it, a copy left behind is a stray.
        let steps = plan(&moved, &seen(&[("v", 1, "running")]), &HashSet::new());
        assert!(steps
            .iter()
            .any(|st| st.node == "a" && short(&st.action) == "destroy"));
    }
}
