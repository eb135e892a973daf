//! The source's migration journal, and recovery from it when the source agent
//! died mid-migration.
//!
//! Node-local migrations are decided by the source agent, so the decision must
//! outlive it: `migrate-<id>/journal.json` records the target, the console key
//! and whether the VPS was frozen *before* the dump, and the decision *before*
//! anyone acts on it. At start the agent reads every journal left behind:
//! - the VPS runs: it was never frozen, or CRIU resumed it: nothing to do;
//! - frozen, no decision (or "stay"): settle "stay", tell the target to drop
//!   its copy, and bring the VPS back here from its images;
//! - decided "move": the VPS is the target's; it stays stopped here, so it
//!   never runs twice (the target lets it run, or gives it up after its hold
//!   timeout: then an operator restarts it from its files).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_proto::agent::v1 as pb;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use super::start::Resume;
use super::Agent;
use crate::error::{AgentError, Result};

const JOURNAL: &str = "journal.json";
/// How long recovery waits for a CRIU dump the dead agent started.
const CRIU_WAIT: Duration = Duration::from_secs(60);
/// How long one round of asking the cluster for a decision may take.
const CLUSTER_PATIENCE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct Journal {
    pub migration_id: String,
    pub name: String,
    pub target_addr: String,
    pub console_key: String,
    /// Set before the dump starts.
    pub frozen: bool,
    /// Some(true): moved to the target; Some(false): stays here.
    pub decision: Option<bool>,
    /// Set when the cluster owns the VPS: the decision is the controllers'.
    #[serde(default)]
    pub controllers: Vec<String>,
    /// The VPS's generation after a committed move.
    #[serde(default)]
    pub generation: u64,
    /// Post-copy: the dump left the tasks stopped here, memory and all.
    #[serde(default)]
    pub lazy: bool,
    /// Post-copy: where this node's page server listened (ADDR:PORT).
    #[serde(default)]
    pub page_server: String,
}

impl Journal {
    pub fn save(&self, scratch: &Path) -> Result<()> {
        let json =
            serde_json::to_vec_pretty(self).map_err(|e| AgentError::Internal(e.to_string()))?;
        let p = scratch.join(JOURNAL);
        crate::runtime::write_atomic(&p, &json)
            .map_err(|e| AgentError::io(format!("writing {}", p.display()), e))?;
        // The decision must survive a crash of the whole node, not only of the agent.
        std::fs::File::open(scratch)
            .and_then(|d| d.sync_all())
            .map_err(|e| AgentError::io("syncing the migration journal", e))
    }

    fn load(scratch: &Path) -> Option<Journal> {
        serde_json::from_slice(&std::fs::read(scratch.join(JOURNAL)).ok()?).ok()
    }
}

impl Agent {
    /// Settles every migration an earlier agent left unfinished (see the module doc).
    pub(super) async fn recover_migrations(self: &Arc<Self>) {
        let Ok(rd) = std::fs::read_dir(self.paths.data_dir.join("work")) else {
            return;
        };
        let dirs: Vec<PathBuf> = rd
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("migrate-"))
            .map(|e| e.path())
            .collect();
        for dir in dirs {
            let Some(j) = Journal::load(&dir) else {
                self.remove_scratch(&dir);
                continue;
            };
            let span = tracing::info_span!("recover", vps = %j.name, migration = %j.migration_id);
            if j.controllers.is_empty() {
                if let Err(e) = self.recover_one(&dir, j).instrument(span).await {
                    tracing::error!(error = %e, "recovering an interrupted migration");
                }
                self.remove_scratch(&dir);
            } else {
                // The cluster decides, which can take a while (no quorum):
                // in the background, so the agent serves meanwhile.
                let agent = Arc::clone(self);
                tokio::spawn(
                    async move {
                        match agent.recover_in_cluster(&dir, j).await {
                            Ok(()) => agent.remove_scratch(&dir),
                            Err(e) => {
                                tracing::error!(error = %e, "recovering an interrupted migration")
                            }
                        }
                    }
                    .instrument(span),
                );
            }
        }
    }

    /// A cluster migration: Raft's decision says where the VPS belongs. Asking
    /// to cancel settles it when nothing was decided yet.
    async fn recover_in_cluster(self: &Arc<Self>, dir: &Path, mut j: Journal) -> Result<()> {
        if !j.lazy {
            // (A post-copy's CRIU keeps its images open until the target lets go.)
            wait_for_criu(&dir.join("images")).await;
        }
        let moved = match j.decision {
            Some(true) => true,
            _ => loop {
                match crate::cluster::decide_migration(
                    &j.controllers,
                    &j.name,
                    &j.migration_id,
                    false,
                    CLUSTER_PATIENCE,
                )
                .await
                {
                    Ok((moved, _)) => break moved,
                    Err(e @ crate::cluster::DecideError::Refused(_)) => {
                        return Err(AgentError::FailedPrecondition(format!(
                            "{e}; the VPS is left as it is for an operator"
                        )))
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "no decision yet; the VPS stays as it is")
                    }
                }
            },
        };
        j.decision = Some(moved);
        j.save(dir)?;
        if j.lazy && j.frozen {
            return self.recover_lazy(&j, moved).await;
        }
        if moved {
            // The cluster's reconciler removes this copy; the target may be
            // holding the VPS for our word.
            self.tell_target(&j, true).await;
            tracing::warn!(target = %j.target_addr, "the VPS moved to the target before this agent stopped; it stays stopped here");
            return Ok(());
        }
        self.tell_target(&j, false).await;
        if !j.frozen || self.status(&j.name).is_running() {
            // CRIU resumed it, but could not tell the dead agent to lift the
            // network lock.
            return self.unlock_link(&j.name);
        }
        let rec = self.record(&j.name)?;
        self.resume_here(dir, &j, &rec).await
    }

    async fn recover_one(self: &Arc<Self>, dir: &Path, mut j: Journal) -> Result<()> {
        if j.lazy && j.frozen {
            let moved = j.decision == Some(true);
            if !moved {
                j.decision = Some(false);
                j.save(dir)?;
            }
            return self.recover_lazy(&j, moved).await;
        }
        let images = dir.join("images");
        wait_for_criu(&images).await;
        let rec = self.record(&j.name)?;
        if !j.frozen || self.status(&j.name).is_running() {
            // CRIU resumed it, but could not tell the dead agent to lift the
            // network lock.
            return self.unlock_link(&j.name);
        }
        if j.decision == Some(true) {
            tracing::warn!(
                target = %j.target_addr,
                "the VPS was handed to the target before this agent stopped; it stays stopped here"
            );
            return Ok(());
        }
        j.decision = Some(false);
        j.save(dir)?;
        self.tell_target(&j, false).await;
        self.resume_here(dir, &j, &rec).await
    }

    /// A post-copy the dead agent was serving: its tasks are stopped here,
    /// memory and all. Moved: they stay stopped (the target may still be
    /// fetching pages from the dead agent's CRIU) until the copy is removed.
    /// Not moved: the target drops its copy and the tasks run again.
    async fn recover_lazy(self: &Arc<Self>, j: &Journal, moved: bool) -> Result<()> {
        if moved {
            self.tell_target(j, true).await;
            tracing::warn!("post-copy: the VPS moved before this agent stopped; its stopped tasks here stay until the copy is removed");
            return Ok(());
        }
        self.tell_target(j, false).await;
        // A page server the target never reached still waits for it.
        self.cut_transfer(&j.page_server);
        let pid = match self.status(&j.name) {
            super::Status::Running(s) => s.init_pid,
            _ => return Ok(()),
        };
        self.recover_lazy_stay(&j.name, pid).await?;
        tracing::warn!("post-copy: the VPS runs on here again");
        Ok(())
    }

    /// Brings the VPS back on this node from the migration's images.
    async fn resume_here(
        self: &Arc<Self>,
        dir: &Path,
        j: &Journal,
        rec: &super::VpsRecord,
    ) -> Result<()> {
        let lock = self.lock_for(&j.name);
        let _g = lock.lock().await;
        self.teardown(&j.name).await?;
        let r = Resume {
            images: dir.join("images"),
            console_key: j.console_key.clone(),
            hold: false,
            lazy: false,
        };
        match self.bring_up(rec, Some(&r)).await {
            Ok(_) => {
                self.watch(&j.name);
                self.announce(rec);
                tracing::warn!("the VPS was resumed here from its migration images");
                Ok(())
            }
            Err(e) => {
                let _ = self.teardown(&j.name).await;
                Err(e)
            }
        }
    }

    /// Best effort: the target lets the VPS run (`commit`) or removes what it
    /// got (it would settle on its own after its hold timeout anyway).
    async fn tell_target(&self, j: &Journal, commit: bool) {
        let Ok(addr) = j.target_addr.parse::<ferry_proto::addr::Addr>() else {
            return;
        };
        let call = async {
            let ch = ferry_proto::addr::connect_node(&addr).await.ok()?;
            let mut c = ferry_proto::limits::agent_client(ch);
            c.migrate_finish(pb::MigrateFinishRequest {
                migration_id: j.migration_id.clone(),
                commit,
                generation: if commit { j.generation } else { 0 },
            })
            .await
            .ok()
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), call).await;
    }
}

/// Waits while some process (a CRIU dump the dead agent started) still has
/// files open under `images`.
async fn wait_for_criu(images: &Path) {
    let end = Instant::now() + CRIU_WAIT;
    while Instant::now() < end && open_under(images) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn open_under(dir: &Path) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        std::fs::read_dir(p.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.starts_with(dir)))
    })
}
