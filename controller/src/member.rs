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
use openraft::{BasicNode, Config, SnapshotPolicy};

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
        let (log, sm) = store::open(dir)?;
        let raft = Raft::new(id, raft_config()?, Network::default(), log, sm.clone())
            .await
            .map_err(|e| ControllerError::Raft(e.to_string()))?;
        Ok(Arc::new(Member { id, addr, raft, sm }))
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
            let write =
                tokio::time::timeout(LEADER_WAIT, self.raft.client_write(req.clone())).await;
            let Ok(write) = write else {
                // Appended but not committed in time: it may still commit later.
                return Err(ControllerError::Unavailable(
                    "the write was not committed in time (no quorum?); its outcome is unknown"
                        .into(),
                ));
            };
            let err = match write {
                Ok(r) => return Ok(r.data),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    match f.leader_node {
                        Some(node) => match forward_propose(&node.addr, &req).await {
                            Ok(r) => return Ok(r),
                            Err(e) => e,
                        },
                        None => "no leader elected yet".to_string(),
                    }
                }
                Err(e) => return Err(ControllerError::Raft(e.to_string())),
            };
            if Instant::now() >= end {
                return Err(ControllerError::Unavailable(err));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// Commits on this replica only if it leads (the target of a forward).
    pub async fn propose_local(&self, req: Request) -> Result<Response, String> {
        self.raft
            .client_write(req)
            .await
            .map(|r| r.data)
            .map_err(|e| e.to_string())
    }

    /// After this returns, a read of the local state sees every write
    /// acknowledged before the call. A follower asks the leader for its read
    /// index and waits to have applied that far; without a leader it fails
    /// rather than serve stale data.
    pub async fn read_barrier(&self) -> Result<(), ControllerError> {
        let end = Instant::now() + LEADER_WAIT;
        loop {
            let check = tokio::time::timeout(CALL_TIMEOUT, self.raft.ensure_linearizable()).await;
            let Ok(check) = check else {
                return Err(ControllerError::Unavailable(
                    "could not confirm leadership with a quorum".into(),
                ));
            };
            let err = match check {
                Ok(_) => return Ok(()),
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
    pub async fn local_read_index(&self) -> Result<u64, String> {
        tokio::time::timeout(CALL_TIMEOUT, self.raft.ensure_linearizable())
            .await
            .map_err(|_| "could not confirm leadership with a quorum".to_string())?
            .map(|l| l.map(|l| l.index).unwrap_or(0))
            .map_err(|e| e.to_string())
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
