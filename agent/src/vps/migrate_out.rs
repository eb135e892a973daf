//! Live migration, source side: the agent implements the engine's
//! [`Source`] (dump, resume, decide, release) and runs it in the background;
//! progress streams to whoever asked. The VPS's lock is taken per step, so the
//! node stays usable during a long rootfs pass.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferry_migrate::phases::{self, Dumped, Job, Mode, Source};
use ferry_proto::agent::v1 as pb;
use futures::StreamExt;
use tracing::Instrument;

use super::migrate_recover::Journal;
use super::start::Resume;
use super::{Agent, VpsRecord};
use crate::criu::dump::{SeizeProbe, Seized};
use crate::error::{AgentError, Result};

struct AgentSource {
    agent: Arc<Agent>,
    rec: VpsRecord,
    scratch: PathBuf,
    /// Who decides: in a cluster (journal.controllers set), the controllers'
    /// Raft log; in node-local use this agent, where the first decision
    /// stands. The journal keeps the decision and what a recovery needs
    /// across a crash.
    journal: std::sync::Mutex<Journal>,
    /// The VPS's lock, held from the dump to the outcome.
    frozen: tokio::sync::Mutex<Option<tokio::sync::OwnedMutexGuard<()>>>,
    /// Post-copy: the lazy dump serving the VPS's memory.
    lazy: tokio::sync::Mutex<Option<super::postcopy::LazyRun>>,
}

#[tonic::async_trait]
impl Source for AgentSource {
    fn spec(&self) -> pb::VpsSpec {
        self.rec.config.to_pb()
    }
    fn freeze_turns(&self) -> Option<Arc<tokio::sync::Semaphore>> {
        Some(Arc::clone(&self.agent.freeze_turns))
    }
    fn running(&self) -> bool {
        self.agent.status(&self.rec.config.name).is_running()
    }
    fn rootfs(&self) -> PathBuf {
        super::disk::upper(&self.agent.paths.vps(&self.rec.config.name))
    }
    fn scratch(&self) -> PathBuf {
        self.scratch.clone()
    }
    fn criu_version(&self) -> String {
        self.agent
            .criu
            .info
            .as_ref()
            .map(|i| i.version.clone())
            .unwrap_or_default()
    }
    fn dirty_tracking(&self) -> bool {
        self.agent.criu.info.as_ref().is_ok_and(|i| i.mem_track)
    }
    fn post_copy(&self) -> bool {
        self.agent.criu.info.as_ref().is_ok_and(|i| i.lazy_pages)
    }
    fn memory_bytes(&self) -> u64 {
        self.agent
            .cgroup(&self.rec.config.name)
            .usage()
            .memory_bytes
    }
    async fn pre_dump(
        &self,
        images: &Path,
        parent: Option<&str>,
    ) -> std::result::Result<(), String> {
        // The rounds and the final dump share the images dir: in RAM if the
        // whole memory fits there.
        self.agent.images_in_ram(&self.scratch, self.memory_bytes());
        self.agent
            .pre_dump(&self.rec.config.name, images, parent.map(str::to_string))
            .await
            .map_err(|e| e.to_string())
    }
    async fn dump(
        &self,
        images: &Path,
        lazy: bool,
        parent: Option<&str>,
    ) -> std::result::Result<Dumped, String> {
        if lazy {
            return self.dump_lazy(images).await;
        }
        let name = &self.rec.config.name;
        self.agent.images_in_ram(&self.scratch, self.memory_bytes());
        let guard = self.before_freeze(false).await?;
        let (probe, seized) = self.probe();
        let key = self
            .agent
            .dump_locked(name, images, false, Some(probe), parent.map(str::to_string))
            .await
            .map(|f| f.console_key)
            .map_err(|e| {
                // CRIU resumed the VPS: it was never stopped.
                let _ = self.journal_update(|j| j.frozen = false);
                e.to_string()
            })?;
        // Keep the VPS's lock until the outcome: nothing (the exit watcher
        // included) touches the old run's kernel objects inside the frozen window.
        *self.frozen.lock().await = Some(guard);
        let seized = take_seized(&seized);
        Ok(Dumped {
            console_key: key,
            page_server: None,
            frozen_at: seized.at,
            shared_writable: seized.shared_writable,
        })
    }
    async fn post_copy_done(&self) -> std::result::Result<u64, String> {
        let Some(run) = self.lazy.lock().await.take() else {
            return Ok(0);
        };
        let served = run.done.await;
        // The page server is done; the tunnel ends once it has passed the
        // last bytes on, and says how many it passed.
        let mut bytes = 0;
        if let Some(t) = run.tunnel {
            let log = t.log.clone();
            let _ =
                tokio::task::spawn_blocking(move || t.finish(std::time::Duration::from_secs(30)))
                    .await;
            bytes = crate::criu::tunnel::relayed(&log).unwrap_or(0);
        }
        match served {
            Ok(Ok(_)) => Ok(bytes),
            Ok(Err(e)) => Err(format!(
                "the page transfer failed: {e}; the VPS on the target may miss memory"
            )),
            Err(e) => Err(format!("the lazy dump's thread: {e}")),
        }
    }
    async fn resume(&self, images: &Path, console_key: &str) -> std::result::Result<(), String> {
        let name = &self.rec.config.name;
        let mut frozen = self.frozen.lock().await;
        let _g = match frozen.take() {
            Some(g) => g,
            None => self.agent.lock_for(name).lock_owned().await,
        };
        if let Some(run) = self.lazy.lock().await.take() {
            // Post-copy: the tasks are still here, stopped; let them run.
            self.agent
                .thaw_lazy(name, run)
                .await
                .map_err(|e| e.to_string())?;
            self.agent.announce(&self.rec);
            return Ok(());
        }
        let r = Resume {
            images: images.to_path_buf(),
            console_key: console_key.to_string(),
            hold: false,
            lazy: false,
        };
        // The dump left the kernel objects of the old run; release them first.
        self.agent.teardown(name).await.map_err(|e| e.to_string())?;
        let res = self.agent.bring_up(&self.rec, Some(&r)).await;
        match res {
            Ok(_) => {
                self.agent.watch(name);
                // The target may have announced the VPS already: take it back.
                self.agent.announce(&self.rec);
                Ok(())
            }
            Err(e) => {
                let _ = self.agent.teardown(name).await;
                Err(e.to_string())
            }
        }
    }
    async fn decide(&self, commit: bool) -> std::result::Result<bool, String> {
        let (controllers, id) = {
            let mut j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(d) = j.decision {
                return Ok(d);
            }
            if j.controllers.is_empty() {
                j.decision = Some(commit);
                // Durable before anyone acts on it.
                if let Err(e) = j.save(&self.scratch) {
                    j.decision = None;
                    return Err(e.to_string());
                }
                return Ok(commit);
            }
            (j.controllers.clone(), j.migration_id.clone())
        };
        let (moved, _) = crate::cluster::decide_migration(
            &controllers,
            &self.rec.config.name,
            &id,
            commit,
            DECIDE_PATIENCE,
        )
        .await
        .map_err(|e| e.to_string())?;
        // Raft holds the decision; the journal's copy saves a question later.
        let _ = self.journal_update(|j| j.decision = Some(moved));
        Ok(moved)
    }
    async fn release(&self) -> std::result::Result<(), String> {
        drop(self.frozen.lock().await.take());
        self.agent
            .destroy(&self.rec.config.name, true)
            .await
            .map_err(|e| e.to_string())
    }
}

impl AgentSource {
    /// Takes the VPS's lock and journals the freeze before it happens: if
    /// this agent dies during the dump, its successor knows the VPS may be
    /// frozen and how to bring it back.
    async fn before_freeze(
        &self,
        lazy: bool,
    ) -> std::result::Result<tokio::sync::OwnedMutexGuard<()>, String> {
        let name = &self.rec.config.name;
        let guard = self.agent.lock_for(name).lock_owned().await;
        let pid = self
            .agent
            .running_init(name, "can be migrated live")
            .map_err(|e| e.to_string())?;
        self.journal_update(|j| {
            j.console_key = crate::criu::dump::console_key(pid);
            j.frozen = true;
            j.lazy = lazy;
        })?;
        Ok(guard)
    }

    /// Post-copy: dumps all but the memory and keeps serving it.
    async fn dump_lazy(&self, images: &Path) -> std::result::Result<Dumped, String> {
        let name = &self.rec.config.name;
        // Only what is not memory: small, but the restore reads it in the window.
        self.agent.images_in_ram(&self.scratch, 0);
        let guard = self.before_freeze(true).await?;
        let marker = self
            .agent
            .paths
            .vps_run(name)
            .join(crate::runtime::CHECKPOINT_MARKER);
        let _ = std::fs::write(&marker, b"");
        let (probe, seized) = self.probe();
        let (key, run) = match self.agent.dump_lazy_locked(name, images, probe).await {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_file(&marker);
                let _ = self.journal_update(|j| j.frozen = false);
                return Err(e.to_string());
            }
        };
        // The journal keeps the page server (a recovery cuts it); the target
        // dials the tunnel.
        let page_server = run.page_server.clone();
        let tunnel = run
            .tunnel
            .as_ref()
            .map(|t| t.address.clone())
            .unwrap_or_default();
        let _ = self.journal_update(|j| j.page_server = page_server.clone());
        *self.lazy.lock().await = Some(run);
        *self.frozen.lock().await = Some(guard);
        let seized = take_seized(&seized);
        Ok(Dumped {
            console_key: key,
            page_server: Some(tunnel),
            frozen_at: seized.at,
            shared_writable: seized.shared_writable,
        })
    }

    /// What the dump reads of the tree while it holds it stopped.
    fn probe(&self) -> (SeizeProbe, Arc<Mutex<Seized>>) {
        let out = Arc::new(Mutex::new(Seized::default()));
        let name = &self.rec.config.name;
        let probe = SeizeProbe {
            cgroup: self.agent.cgroup(name),
            root: self.agent.paths.vps(name).join("rootfs"),
            out: Arc::clone(&out),
        };
        (probe, out)
    }

    fn journal_update(&self, f: impl FnOnce(&mut Journal)) -> std::result::Result<(), String> {
        let mut j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut j);
        j.save(&self.scratch).map_err(|e| e.to_string())
    }
}

fn take_seized(s: &Mutex<Seized>) -> Seized {
    std::mem::take(&mut *s.lock().unwrap_or_else(|p| p.into_inner()))
}

/// How long the source keeps asking the controllers for a decision they
/// cannot give (no quorum); the VPS stays frozen meanwhile.
const DECIDE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(120);

pub type EventStream =
    futures::stream::BoxStream<'static, std::result::Result<pb::MigrationEvent, tonic::Status>>;

impl Agent {
    /// Starts migrating a VPS to another agent; returns its progress.
    pub async fn migrate_out(self: &Arc<Self>, req: pb::MigrateVpsRequest) -> Result<EventStream> {
        let rec = self.record(&req.name)?;
        if req.controllers.is_empty() && (rec.config.generation > 0 || req.generation > 0) {
            // Moving it behind the controller's back would leave the cluster
            // state pointing at this node.
            return Err(AgentError::FailedPrecondition(format!(
                "VPS {} is managed by a controller (generation {}); migrate it through the \
                 controller. Agent-to-agent migration is for node-local VPSes",
                req.name, rec.config.generation
            )));
        }
        crate::cluster::check_controllers(&req.controllers)?;
        if !req.controllers.is_empty() {
            if req.migration_id.is_empty() {
                return Err(AgentError::invalid(
                    "migration_id",
                    "a cluster migration needs the id the controller recorded",
                ));
            }
            if req.generation <= rec.config.generation {
                return Err(AgentError::FailedPrecondition(format!(
                    "generation {} is not newer than the VPS's {} here; the request is stale",
                    req.generation, rec.config.generation
                )));
            }
        }
        if req.target_addr.is_empty() {
            return Err(AgentError::invalid(
                "target_addr",
                "give the target agent's address",
            ));
        }
        let addr: ferry_proto::addr::Addr = req.target_addr.parse().map_err(
            |e: <ferry_proto::addr::Addr as std::str::FromStr>::Err| {
                AgentError::invalid("target_addr", e.to_string())
            },
        )?;
        let running = self.status(&req.name).is_running();
        if running {
            self.criu
                .usable()
                .map_err(|e| AgentError::FailedPrecondition(e.to_string()))?;
        }
        let id = if req.migration_id.is_empty() {
            format!("m{:x}", super::checkpoint::unix_nanos())
        } else {
            req.migration_id.clone()
        };
        crate::spec::validate_name("migration_id", &id)?;
        {
            let mut m = self.migrating.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(other) = m.get(&req.name) {
                return Err(AgentError::FailedPrecondition(format!(
                    "VPS {} is already migrating ({other})",
                    req.name
                )));
            }
            m.insert(req.name.clone(), id.clone());
        }
        let setup = async {
            // A stopped agent's kernel still accepts the connection; its
            // handshake never comes.
            let deadline = ferry_migrate::phases::preflight::PREPARE_DEADLINE;
            let ch = tokio::time::timeout(deadline, ferry_proto::addr::connect_node(&addr))
                .await
                .map_err(|_| {
                    AgentError::FailedPrecondition(format!(
                        "target agent {} did not answer within {} s (is it stopped or hung?)",
                        req.target_addr,
                        deadline.as_secs()
                    ))
                })?
                .map_err(|e| {
                    AgentError::FailedPrecondition(format!(
                        "target agent {} is unreachable: {e}",
                        req.target_addr
                    ))
                })?;
            Ok::<_, AgentError>((
                ferry_proto::limits::agent_client(ch),
                self.work_dir(&format!("migrate-{id}"))?,
            ))
        };
        let (target, scratch) = match setup.await {
            Ok(x) => x,
            Err(e) => {
                self.end_migrating(&req.name);
                return Err(e);
            }
        };
        let journal = Journal {
            migration_id: id.clone(),
            name: req.name.clone(),
            target_addr: req.target_addr.clone(),
            controllers: req.controllers.clone(),
            generation: req.generation,
            ..Default::default()
        };
        if let Err(e) = journal.save(&scratch) {
            self.end_migrating(&req.name);
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(e);
        }
        let src = Arc::new(AgentSource {
            agent: Arc::clone(self),
            rec,
            scratch: scratch.clone(),
            journal: std::sync::Mutex::new(journal),
            frozen: Default::default(),
            lazy: Default::default(),
        });
        let job = Job {
            id,
            name: req.name.clone(),
            target_node: if req.target_node.is_empty() {
                req.target_addr.clone()
            } else {
                req.target_node.clone()
            },
            mode: Mode::from_pb(req.mode),
            verify: req.verify,
            generation: req.generation,
            controllers: req.controllers.clone(),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let agent = Arc::clone(self);
        let span = tracing::info_span!(
            "migrate",
            vps = %job.name,
            migration = %job.id,
            target = %job.target_node
        );
        tokio::spawn(
            async move {
                let name = job.name.clone();
                let (id, controllers) = (job.id.clone(), job.controllers.clone());
                let ev = phases::run(src, target, job, tx).await;
                if !controllers.is_empty() {
                    let (name, last) = (name.clone(), ev.clone());
                    tokio::spawn(
                        async move {
                            crate::cluster::finish_migration(
                                &controllers,
                                &name,
                                &id,
                                last,
                                std::time::Duration::from_secs(120),
                            )
                            .await
                        }
                        .in_current_span(),
                    );
                }
                tracing::info!(
                    phase = %ev.phase,
                    downtime_ms = ev.downtime_ms,
                    total_ms = ev.total_ms,
                    error = %ev.error,
                    "migration ended"
                );
                agent.remove_scratch(&scratch);
                agent.end_migrating(&name);
            }
            .instrument(span),
        );
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(Ok)
            .boxed())
    }

    fn end_migrating(&self, name: &str) {
        let mut m = self.migrating.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(name);
    }
}
