//! What only the leader does, on timers: notice nodes that stop reporting
//! ([`liveness`]), drive agents to the desired state ([`reconcile`]), and
//! drive drains and restores ([`drain`]).
//! Heartbeats are kept in the leader's memory; only changes (a node down or
//! back, a VPS's observed state) are written through Raft. A new leader starts
//! with an empty table and gives every node a full timeout before judging it.

pub mod drain;
pub mod liveness;
pub mod reconcile;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::host::Controller;

/// How often a node's usage and heartbeat time are written through Raft.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

/// What a node last reported.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    /// VPS name → (generation, status).
    pub vps: HashMap<String, (u64, String)>,
}

#[derive(Default)]
pub struct LeaderState {
    pub seen: Mutex<HashMap<String, Seen>>,
    /// When this replica last became leader (None while it is not).
    pub since: Mutex<Option<Instant>>,
    /// When each node's usage was last written through Raft.
    pub reported: Mutex<HashMap<String, Instant>>,
    /// The drain driver's starts and the progress of its moves.
    pub drain: drain::DriverState,
}

impl LeaderState {
    pub fn record(&self, node: &str, vps: HashMap<String, (u64, String)>) {
        let mut g = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        g.insert(
            node.to_string(),
            Seen {
                at: Instant::now(),
                vps,
            },
        );
    }

    /// Whether a node's usage report is due for writing (every
    /// [`REPORT_EVERY`], or at once when what runs there changed).
    pub fn report_due(&self, node: &str, changed: bool) -> bool {
        let mut g = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        let due = changed || g.get(node).is_none_or(|t| t.elapsed() >= REPORT_EVERY);
        if due {
            g.insert(node.to_string(), Instant::now());
        }
        due
    }

    pub fn snapshot(&self) -> HashMap<String, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Whether this replica leads now; tracks when it started to.
pub(crate) async fn leading(ctl: &Controller) -> bool {
    let Ok(m) = ctl.member().await else {
        return false;
    };
    // A leader acts on its state only once that state holds every
    // acknowledged write (a fresh leader may still be applying them).
    let leads =
        m.raft.metrics().borrow().current_leader == Some(m.id) && m.read_barrier().await.is_ok();
    let mut since = ctl.leader.since.lock().unwrap_or_else(|p| p.into_inner());
    match (leads, since.is_some()) {
        (true, false) => *since = Some(Instant::now()),
        (false, true) => {
            *since = None;
            ctl.leader
                .seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
        _ => {}
    }
    leads
}

/// Starts both loops; they idle while this replica does not lead.
pub fn spawn(ctl: Arc<Controller>) {
    let c = ctl.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if leading(&c).await {
                liveness::tick(&c).await;
            }
        }
    });
    let c = ctl.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if leading(&c).await {
                drain::tick(&c).await;
            }
        }
    });
    tokio::spawn(async move {
        let mut r = reconcile::Reconciler::default();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if leading(&ctl).await {
                r.tick(&ctl).await;
            }
        }
    });
}
