//! The controller process: either waiting to join a cluster (no id yet) or a
//! member. Its id lives in `<data-dir>/member.json`; ids come from the cluster
//! (`--init` takes 1; `ferryctl controller add` hands out the next), never reused.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use crate::error::ControllerError;
use crate::member::Member;
use crate::state::Request;
use crate::types::NodeId;

#[derive(Serialize, Deserialize)]
struct Identity {
    id: NodeId,
    addr: String,
}

pub struct Controller {
    pub dir: PathBuf,
    /// The address other replicas and clients reach this one at.
    pub addr: String,
    member: RwLock<Option<Arc<Member>>>,
    /// The leader's in-memory view of node heartbeats.
    pub leader: crate::leader::LeaderState,
    /// The CA and this replica's credentials (None: --insecure-dev).
    pub pki: Option<Arc<crate::api::trust::ControllerPki>>,
}

impl Controller {
    /// Starts as a member if this data dir has joined before; with `init`, a
    /// fresh data dir bootstraps a one-voter cluster (`ip_pool` becomes the
    /// cluster's address pool).
    pub async fn open(
        dir: PathBuf,
        addr: String,
        init: bool,
        ip_pool: Option<ipnet::Ipv4Net>,
        sched: crate::scheduler::SchedConfig,
        pki: Option<Arc<crate::api::trust::ControllerPki>>,
    ) -> Result<Arc<Controller>, ControllerError> {
        let c = Arc::new(Controller {
            dir,
            addr,
            member: RwLock::new(None),
            leader: Default::default(),
            pki,
        });
        let ident_path = c.dir.join("member.json");
        if let Ok(bytes) = std::fs::read(&ident_path) {
            let ident: Identity = serde_json::from_slice(&bytes).map_err(|e| {
                ControllerError::Storage(format!("corrupt {}: {e}", ident_path.display()))
            })?;
            if ident.addr != c.addr {
                tracing::warn!(was = %ident.addr, now = %c.addr, "address changed since last run; members still know the old one");
            }
            c.become_member(ident.id, ident.addr).await?;
        } else if init {
            let m = c.become_member(1, c.addr.clone()).await?;
            m.bootstrap().await?;
            m.propose(Request::Configure {
                ip_pool,
                sched: Some(sched),
            })
            .await?;
            tracing::info!("bootstrapped a new cluster as member 1");
        } else {
            tracing::info!(
                "waiting to be added to a cluster (ferryctl controller add {})",
                c.addr
            );
        }
        crate::leader::spawn(c.clone());
        Ok(c)
    }

    async fn become_member(
        &self,
        id: NodeId,
        addr: String,
    ) -> Result<Arc<Member>, ControllerError> {
        let mut slot = self.member.write().await;
        if let Some(m) = slot.as_ref() {
            return Ok(m.clone());
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| {
            ControllerError::Storage(format!("creating {}: {e}", self.dir.display()))
        })?;
        let json = serde_json::to_vec(&Identity {
            id,
            addr: addr.clone(),
        })
        .map_err(|e| ControllerError::Storage(e.to_string()))?;
        let tmp = self.dir.join("member.json.tmp");
        std::fs::write(&tmp, json)
            .and_then(|_| std::fs::rename(&tmp, self.dir.join("member.json")))
            .map_err(|e| ControllerError::Storage(format!("saving the member id: {e}")))?;
        let m = Member::start(&self.dir, id, addr).await?;
        *slot = Some(m.clone());
        Ok(m)
    }

    /// Called by the leader when this waiting replica is added.
    pub async fn adopt(&self, id: NodeId, addr: String) -> Result<(), ControllerError> {
        if let Some(m) = self.member.read().await.as_ref() {
            if m.id == id {
                return Ok(());
            }
            return Err(ControllerError::Rejected {
                code: crate::state::RejectCode::FailedPrecondition,
                message: format!("this controller is already member {} of a cluster", m.id),
            });
        }
        self.become_member(id, addr).await.map(|_| ())
    }

    pub async fn member(&self) -> Result<Arc<Member>, ControllerError> {
        self.member.read().await.clone().ok_or_else(|| {
            ControllerError::NotMember(format!(
                "this controller has not joined a cluster yet: run `ferryctl controller add {}` against a member",
                self.addr
            ))
        })
    }

    /// Whether the certificate with `fingerprint` is revoked, by this
    /// replica's applied state (checked on every call).
    pub fn revoked(&self, fingerprint: &str) -> bool {
        match self.member.try_read() {
            Ok(g) => g.as_ref().is_some_and(|m| {
                m.sm.read(|a| a.state.security.revoked.contains(fingerprint))
            }),
            // Joining right now: nothing to have revoked yet.
            Err(_) => false,
        }
    }

    pub async fn shutdown(&self) {
        if let Some(m) = self.member.read().await.as_ref() {
            let _ = m.raft.shutdown().await;
        }
    }
}
