//! A running replica: its Raft instance and state machine, with the two ways
//! the API touches them: [`Member::propose`] (a write, forwarded to the leader
//! from a follower) and [`Member::read_barrier`] (makes the next local read
//! linearizable, on a follower too).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_proto::controller::v1 as cpb;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::storage::RaftLogStorage;
use openraft::{BasicNode, Config, SnapshotPolicy};
use tokio::sync::{mpsc, oneshot};

use crate::error::ControllerError;
use crate::network::{raft_client, Network};
use crate::state::{Request, Response};
use crate::store::{self, StateMachine};
use crate::types::{NodeId, Raft};

/// How long a write or read waits for a leader to exist and answer.
const LEADER_WAIT: Duration = Duration::from_secs(5);
/// How long one call to the leader (a forward, a read index) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between attempts while there is no reachable leader.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

pub struct Member {
    pub id: NodeId,
    pub addr: String,
    pub raft: Raft,
    pub sm: StateMachine,
    batcher: mpsc::Sender<Pending>,
    /// The term and last log index on disk when this replica started. See
    /// [`Member::local_read_index`].
    startup_term: u64,
    startup_last_log: u64,
    /// Shared leadership checks (see [`Member::confirm_leader`]).
    reads: ReadRounds,
}

/// Coalesces leadership checks: each one is a heartbeat round to every voter
/// that must answer within one heartbeat interval, so two hundred concurrent
/// reads were two hundred rounds, and under load followers missed the
/// deadline (`not enough for a quorum`). Rounds run one at a time; a caller
/// that waited behind a round which *started after it arrived* takes that
/// round's answer, which covers every write acknowledged before it arrived.
#[derive(Default)]
struct ReadRounds {
    /// Arrival tickets.
    next: std::sync::atomic::AtomicU64,
    /// Held while a round runs; holds the last round's (first ticket not
    /// covered by it, its read log id).
    last: tokio::sync::Mutex<Option<(u64, Option<crate::types::LogId>)>>,
}

type CheckResult =
    Result<Option<crate::types::LogId>, RaftError<NodeId, CheckIsLeaderError<NodeId, BasicNode>>>;

/// Why a batched write did not happen here.
#[derive(Debug, Clone)]
enum WriteErr {
    /// This replica does not lead; the leader, if known.
    Forward(Option<String>),
    /// Not confirmed in time: the outcome is unknown.
    Timeout,
    Other(String),
}

struct Pending {
    req: Request,
    done: oneshot::Sender<Result<Response, WriteErr>>,
}

/// Most commands in one entry, and most entries in flight at once.
const BATCH_MAX: usize = 512;
const BATCHES_IN_FLIGHT: usize = 4;

/// Group commit. openraft 0.9's core flushes the log once per client write,
/// one after another, so commands are gathered: whatever queued while earlier
/// entries were being committed goes out as one entry ([`Request::Batch`]),
/// each caller getting its own result.
async fn batcher(raft: Raft, mut rx: mpsc::Receiver<Pending>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (reqs, dones): (Vec<Request>, Vec<_>) =
                batch.into_iter().map(|p| (p.req, p.done)).unzip();
            let single = reqs.len() == 1;
            let cmd = if single {
                reqs.into_iter()
                    .next()
                    .unwrap_or(Request::Batch(Vec::new()))
            } else {
                Request::Batch(reqs)
            };
            let res = match tokio::time::timeout(LEADER_WAIT, raft.client_write(cmd)).await {
                Err(_) => Err(WriteErr::Timeout),
                Ok(Ok(r)) => Ok(r.data),
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                    Err(WriteErr::Forward(f.leader_node.map(|n| n.addr)))
                }
                Ok(Err(e)) => Err(WriteErr::Other(e.to_string())),
            };
            match res {
                Ok(Response::Batch(rs)) if !single => {
                    for (done, r) in dones.into_iter().zip(rs) {
                        let _ = done.send(Ok(r));
                    }
                }
                Ok(r) => {
                    for done in dones {
                        let _ = done.send(Ok(r.clone()));
                    }
                }
                Err(e) => {
                    for done in dones {
                        let _ = done.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}

/// Raft timing: heartbeats every 50 ms; a follower that hears nothing for
/// 250-500 ms calls an election, so a dead leader is replaced within a second
/// (etcd: 100 ms and 1 s). An append with its fsync takes a few ms here, below
/// a tenth of the timeout.
pub fn raft_config() -> Result<Arc<Config>, ControllerError> {
    let c = Config {
        cluster_name: "ferry".into(),
        heartbeat_interval: 50,
        election_timeout_min: 250,
        election_timeout_max: 500,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(1000),
        max_in_snapshot_log_to_keep: 200,
        ..Default::default()
    };
    Ok(Arc::new(
        c.validate()
            .map_err(|e| ControllerError::Raft(e.to_string()))?,
    ))
}

impl Member {
    pub async fn start(
        dir: &Path,
        id: NodeId,
        addr: String,
    ) -> Result<Arc<Member>, ControllerError> {
        let (mut log, sm) = store::open(dir)?;
        let startup_last_log = log
            .get_log_state()
            .await
            .map_err(|e| ControllerError::Storage(e.to_string()))?
            .last_log_id
            .map(|l| l.index)
            .unwrap_or(0);
        let startup_term = log
            .read_vote()
            .await
            .map_err(|e| ControllerError::Storage(e.to_string()))?
            .map(|v| v.leader_id().term)
            .unwrap_or(0);
        let raft = Raft::new(id, raft_config()?, Network::default(), log, sm.clone())
            .await
            .map_err(|e| ControllerError::Raft(e.to_string()))?;
        let (tx, rx) = mpsc::channel(4 * BATCH_MAX);
        tokio::spawn(batcher(raft.clone(), rx));
        Ok(Arc::new(Member {
            id,
            addr,
            raft,
            sm,
            batcher: tx,
            startup_term,
            startup_last_log,
            reads: ReadRounds::default(),
        }))
    }

    /// Makes this replica the only voter of a new cluster (a no-op when it is
    /// initialized already).
    pub async fn bootstrap(&self) -> Result<(), ControllerError> {
        let mut m = BTreeMap::new();
        m.insert(self.id, BasicNode::new(&self.addr));
        match self.raft.initialize(m).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(ControllerError::Raft(e.to_string())),
        }
    }

    /// Commits a command and returns what applying it gave; on a follower the
    /// command goes to the leader. Retries while there is no leader, up to
    /// [`LEADER_WAIT`].
    pub async fn propose(&self, req: Request) -> Result<Response, ControllerError> {
        let end = Instant::now() + LEADER_WAIT;
        loop {
            let err = match self.write(req.clone()).await {
                Ok(r) => return Ok(r),
                Err(WriteErr::Timeout) => {
                    // Appended but not committed in time: it may still commit later.
                    return Err(ControllerError::Unavailable(
                        "the write was not committed in time (no quorum?); its outcome is unknown"
                            .into(),
                    ));
                }
                Err(WriteErr::Forward(Some(leader))) => {
                    match forward_propose(&leader, &req).await {
                        Ok(r) => return Ok(r),
                        Err(e) => e,
                    }
                }
                Err(WriteErr::Forward(None)) => "no leader elected yet".to_string(),
                Err(WriteErr::Other(e)) => return Err(ControllerError::Raft(e)),
            };
            if Instant::now() >= end {
                return Err(ControllerError::Unavailable(err));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// Commits on this replica only if it leads (the target of a forward).
    pub async fn propose_local(&self, req: Request) -> Result<Response, String> {
        self.write(req).await.map_err(|e| match e {
            WriteErr::Forward(_) => "this replica no longer leads".to_string(),
            WriteErr::Timeout => {
                "the write was not committed in time; its outcome is unknown".to_string()
            }
            WriteErr::Other(e) => e,
        })
    }

    /// One command through the group-commit batcher.
    async fn write(&self, req: Request) -> Result<Response, WriteErr> {
        let (done, rx) = oneshot::channel();
        self.batcher
            .send(Pending { req, done })
            .await
            .map_err(|_| WriteErr::Other("the replica is shutting down".into()))?;
        rx.await
            .map_err(|_| WriteErr::Other("the replica is shutting down".into()))?
    }

    /// After this returns, a read of the local state sees every write
    /// acknowledged before the call. A follower asks the leader for its read
    /// index and waits to have applied that far; without a leader it fails
    /// rather than serve stale data.
    pub async fn read_barrier(&self) -> Result<(), ControllerError> {
        let end = Instant::now() + LEADER_WAIT;
        loop {
            let check = tokio::time::timeout(CALL_TIMEOUT, self.confirm_leader()).await;
            let Ok(check) = check else {
                return Err(ControllerError::Unavailable(
                    "could not confirm leadership with a quorum".into(),
                ));
            };
            let err = match check {
                Ok(read) => {
                    let idx = read.map(|l| l.index).unwrap_or(0);
                    let floor = self.read_floor();
                    if idx >= floor {
                        return Ok(());
                    }
                    // A leader restored at start: see `local_read_index`.
                    let left = end.saturating_duration_since(Instant::now());
                    return self
                        .raft
                        .wait(Some(left.max(Duration::from_millis(100))))
                        .applied_index_at_least(Some(floor), "read barrier")
                        .await
                        .map(|_| ())
                        .map_err(|e| {
                            ControllerError::Unavailable(format!(
                                "re-committing the log after a restart: {e}"
                            ))
                        });
                }
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    match f.leader_node {
                        Some(node) => match leader_read_index(&node.addr).await {
                            Ok(idx) => {
                                let left = end.saturating_duration_since(Instant::now());
                                return self
                                    .raft
                                    .wait(Some(left.max(Duration::from_millis(100))))
                                    .applied_index_at_least(Some(idx), "read barrier")
                                    .await
                                    .map(|_| ())
                                    .map_err(|e| {
                                        ControllerError::Unavailable(format!(
                                            "catching up to the leader: {e}"
                                        ))
                                    });
                            }
                            Err(e) => e,
                        },
                        None => "no leader elected yet".to_string(),
                    }
                }
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => {
                    format!("no quorum: {q}")
                }
                Err(e) => return Err(ControllerError::Raft(e.to_string())),
            };
            if Instant::now() >= end {
                return Err(ControllerError::Unavailable(err));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// The read index, when this replica leads.
    ///
    /// openraft 0.9 restores a replica that led before a restart as leader at
    /// once, in its old term, with the committed index it last saved. We save
    /// that index without an fsync (it costs a quarter of the write rate), so
    /// it can lag what was acknowledged before the crash, and openraft's read
    /// index would then let a read miss an acknowledged write. Every
    /// acknowledged write is in this leader's log, so until it has
    /// re-committed everything it held at start, that is the read index.
    /// (A leader never drops entries of its own log, so they all commit.)
    pub async fn local_read_index(&self) -> Result<u64, String> {
        tokio::time::timeout(CALL_TIMEOUT, self.confirm_leader())
            .await
            .map_err(|_| "could not confirm leadership with a quorum".to_string())?
            .map(|l| l.map(|l| l.index).unwrap_or(0).max(self.read_floor()))
            .map_err(|e| e.to_string())
    }

    /// openraft's `ensure_linearizable` (leadership confirmed by a quorum,
    /// then applied up to the read index), shared among concurrent callers.
    async fn confirm_leader(&self) -> CheckResult {
        use std::sync::atomic::Ordering;
        let ticket = self.reads.next.fetch_add(1, Ordering::SeqCst);
        let mut last = self.reads.last.lock().await;
        if let Some((covers_below, idx)) = *last {
            if ticket < covers_below {
                return Ok(idx);
            }
        }
        // Everyone who arrived so far is covered by a round starting now.
        let covers_below = self.reads.next.load(Ordering::SeqCst);
        let r = self.raft.ensure_linearizable().await;
        if let Ok(idx) = &r {
            *last = Some((covers_below, *idx));
        }
        r
    }

    /// The lowest read index a leader may give: the log held at start while
    /// it still leads in the term it restarted in, nothing once a later
    /// election has put a no-op of its own term in front.
    fn read_floor(&self) -> u64 {
        if self.raft.metrics().borrow().current_term == self.startup_term {
            self.startup_last_log
        } else {
            0
        }
    }

    pub fn status(&self) -> cpb::ClusterStatusResponse {
        let m = self.raft.metrics().borrow().clone();
        let cfg = m.membership_config.membership();
        let voters: std::collections::BTreeSet<NodeId> = cfg.voter_ids().collect();
        let members = cfg
            .nodes()
            .map(|(id, n)| cpb::Member {
                id: *id,
                addr: n.addr.clone(),
                role: if voters.contains(id) {
                    "voter"
                } else {
                    "learner"
                }
                .into(),
            })
            .collect();
        let leader_addr = m
            .current_leader
            .and_then(|l| cfg.get_node(&l).map(|n| n.addr.clone()))
            .unwrap_or_default();
        // The commit index: on the leader, the highest index a quorum of voters
        // holds; elsewhere what this replica applied (a lower bound).
        let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
        let commit_index = match &m.replication {
            Some(rep) => {
                let mut held: Vec<u64> = voters
                    .iter()
                    .map(|v| {
                        if *v == self.id {
                            m.last_log_index.unwrap_or(0)
                        } else {
                            rep.get(v).and_then(|l| l.map(|l| l.index)).unwrap_or(0)
                        }
                    })
                    .collect();
                held.sort_unstable_by(|a, b| b.cmp(a));
                held.get(held.len() / 2)
                    .copied()
                    .unwrap_or(applied)
                    .max(applied)
            }
            None => applied,
        };
        cpb::ClusterStatusResponse {
            members,
            leader_id: m.current_leader.unwrap_or(0),
            leader_addr,
            term: m.current_term,
            commit_index,
            last_applied: applied,
            self_id: self.id,
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            purged_index: m.purged.map(|l| l.index).unwrap_or(0),
            drains: Vec::new(),
        }
    }
}

async fn forward_propose(leader: &str, req: &Request) -> Result<Response, String> {
    let mut c = raft_client(leader).await?;
    let json = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    let mut r = tonic::Request::new(cpb::RaftPayload { json });
    r.set_timeout(LEADER_WAIT);
    let resp = c
        .propose(r)
        .await
        .map_err(|s| format!("leader {leader}: {}", s.message()))?
        .into_inner();
    let r: Result<Response, String> =
        serde_json::from_slice(&resp.json).map_err(|e| e.to_string())?;
    r
}

async fn leader_read_index(leader: &str) -> Result<u64, String> {
    let mut c = raft_client(leader).await?;
    let mut req = tonic::Request::new(cpb::ReadIndexRequest {});
    req.set_timeout(CALL_TIMEOUT);
    let r = c
        .read_index(req)
        .await
        .map_err(|s| format!("leader {leader}: {}", s.message()))?;
    Ok(r.into_inner().index)
}
