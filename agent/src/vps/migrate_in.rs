//! Live migration, target side. The VPS arrives in a directory marked
//! `incoming` (invisible to listings and heartbeats), is restored and held
//! before it runs, and becomes an ordinary VPS of this node only at a
//! committed finish. An abort, or an agent restart, removes every trace.

use std::path::PathBuf;
use std::sync::Arc;

use ferry_proto::agent::v1 as pb;
use futures::StreamExt;

use super::start::{blocking, Held, Resume};
use super::{Agent, VpsRecord};
use crate::error::{AgentError, Result};

/// Marks a VPS dir that is still arriving; holds the migration id.
pub const INCOMING_MARKER: &str = "incoming";

impl Agent {
    /// Is VPS `name` here still arriving by a migration (its record laid
    /// down, its move not settled)?
    pub fn arriving(&self, name: &str) -> bool {
        self.paths.vps(name).join(INCOMING_MARKER).exists()
    }

    /// Refuses an outside call on a VPS still arriving: only its migration
    /// may act on it until the move settles (a create or start in that
    /// window once cold-booted a second copy over the real restore).
    pub(super) fn refuse_arriving(&self, name: &str) -> Result<()> {
        if self.arriving(name) {
            return Err(AgentError::FailedPrecondition(format!(
                "VPS {name} is still arriving by migration; it can be managed here once the move settles"
            )));
        }
        Ok(())
    }
}

/// How long a restored VPS waits for its source's decision before this node
/// gives up on it.
const HOLD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// In a cluster, how long a held VPS (all of its memory here) waits for its
/// source's word before it asks the controllers itself, then how often.
/// Between its restore here and the decision the source only asks for the
/// decision, so a longer wait means the source is slow or cut off; a move
/// decided already then runs here at once instead of when the source is
/// back (or after HOLD_TIMEOUT).
const FOLLOW_AFTER: std::time::Duration = std::time::Duration::from_secs(3);
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

pub struct Incoming {
    pub name: String,
    rec: VpsRecord,
    live: bool,
    images: PathBuf,
    held: Option<Held>,
    /// Post-copy: the daemon fetching the VPS's memory from the source.
    lazy: Option<crate::criu::lazy::LazyDaemon>,
    /// Post-copy: its end of the page tunnel to the source.
    tunnel: Option<crate::criu::tunnel::Tunnel>,
    /// Where the decision lives in a cluster (empty: node-local).
    controllers: Vec<String>,
    /// Who prepared it (mutual TLS): only it, a controller or an admin may
    /// push, restore or finish it.
    owner: Option<ferry_proto::tls::Role>,
}

/// How many aborted migration ids a node remembers.
const ABORTED_KEPT: usize = 1024;

fn aborted_err(id: &str) -> AgentError {
    AgentError::FailedPrecondition(format!("migration {id} was aborted by its source"))
}

impl Agent {
    fn was_aborted(&self, id: &str) -> bool {
        let a = self.aborted.lock().unwrap_or_else(|p| p.into_inner());
        a.iter().any(|x| x == id)
    }

    /// When this node carried out the commit of migration `id`, if it did.
    fn committed_at(&self, id: &str) -> Option<std::time::Instant> {
        let c = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        c.iter().find(|(x, _)| x == id).map(|(_, t)| *t)
    }

    fn mark_committed(&self, id: &str, at: std::time::Instant) {
        let mut c = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        if c.len() >= ABORTED_KEPT {
            c.pop_front();
        }
        c.push_back((id.to_string(), at));
    }

    fn mark_aborted(&self, id: &str) {
        let mut a = self.aborted.lock().unwrap_or_else(|p| p.into_inner());
        if a.len() >= ABORTED_KEPT {
            a.pop_front();
        }
        a.push_back(id.to_string());
    }

    /// Checks everything this node can check before the source freezes
    /// anything, then reserves the name (an `incoming` VPS dir).
    #[tracing::instrument(skip(self, req), fields(migration = %req.migration_id))]
    pub async fn migrate_prepare(
        &self,
        req: pb::MigratePrepareRequest,
        caller: Option<&ferry_proto::tls::Identity>,
    ) -> Result<pb::MigratePrepareResponse> {
        crate::spec::validate_name("migration_id", &req.migration_id)?;
        crate::cluster::check_controllers(&req.controllers)?;
        let spec = req
            .spec
            .ok_or_else(|| AgentError::invalid("spec", "missing"))?;
        let config = crate::spec::validate_spec(&spec, self.capacity, self.cfg.bridge_cidr)?;
        let mine = self.criu.info.as_ref().ok();
        if req.live {
            self.check_live_target(&req.criu_version, &req.cpu_flags)?;
        }
        crate::template::get(&self.paths, &config.template).map_err(|_| {
            AgentError::FailedPrecondition(format!(
                "template {:?} is missing on this node",
                config.template
            ))
        })?;
        let _g = self.create_lock.lock().await;
        // A reused id would replace the first arrival's entry and orphan its
        // reservation (its VPS dir and scratch dir).
        if self.incoming.lock().await.contains_key(&req.migration_id)
            || self.migration_dir_exists(&req.migration_id)
        {
            return Err(AgentError::exists("migration", &req.migration_id));
        }
        if self.was_aborted(&req.migration_id) {
            return Err(aborted_err(&req.migration_id));
        }
        self.check_free(&config)?;
        let mem: u64 = self
            .records()
            .iter()
            .map(|r| r.config.limits.memory_bytes)
            .sum();
        if mem + config.limits.memory_bytes > self.capacity.memory_bytes {
            return Err(AgentError::ResourceExhausted(format!(
                "this node is full: {} MiB of memory allocated, the VPS needs {} MiB more of {} MiB",
                mem >> 20,
                config.limits.memory_bytes >> 20,
                self.capacity.memory_bytes >> 20
            )));
        }
        let name = config.name.clone();
        let rec = VpsRecord {
            config,
            created_unix: super::now_unix(),
        };
        let images = self.work_dir(&format!("incoming-{}", req.migration_id))?;
        if let Err(e) = self.lay_out(&rec, Some(&req.migration_id)) {
            let _ = std::fs::remove_dir_all(&images);
            return Err(e);
        }
        let mut incoming = self.incoming.lock().await;
        // Its source may have given up on this prepare (it came late: this
        // agent was stopped) and aborted it before it got here.
        if self.was_aborted(&req.migration_id) {
            drop(incoming);
            self.discard_incoming(&rec.config.name, &images).await;
            return Err(aborted_err(&req.migration_id));
        }
        incoming.insert(
            req.migration_id.clone(),
            Incoming {
                name,
                rec,
                live: req.live,
                images,
                held: None,
                lazy: None,
                tunnel: None,
                controllers: req.controllers.clone(),
                owner: caller.map(|c| c.role.clone()),
            },
        );
        Ok(pb::MigratePrepareResponse {
            criu_version: mine.map(|i| i.version.clone()).unwrap_or_default(),
            lazy_pages: mine.is_some_and(|i| i.lazy_pages),
        })
    }

    /// A live arrival needs a usable CRIU no older than the source's and every
    /// CPU feature the source has (the restored processes may use them).
    fn check_live_target(&self, src_criu: &str, src_flags: &[String]) -> Result<()> {
        let info = self
            .criu
            .usable()
            .map_err(|e| AgentError::FailedPrecondition(format!("on this node: {e}")))?;
        if version_tuple(&info.version) < version_tuple(src_criu) {
            return Err(AgentError::FailedPrecondition(format!(
                "CRIU on this node is {}, older than the source's {src_criu}; images may not restore",
                info.version
            )));
        }
        let here = ferry_migrate::phases::preflight::cpu_flags();
        let missing: Vec<&str> = src_flags
            .iter()
            .filter(|f| !here.contains(f))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(AgentError::FailedPrecondition(format!(
                "this node's CPU lacks features the VPS's processes may use: {}",
                missing.join(" ")
            )));
        }
        Ok(())
    }

    /// Whether an arrival's scratch dir (`work/incoming-<id>-<nanos>`) for
    /// migration `id` exists: it lives from prepare to finish, including
    /// while the arrival is out of the map being restored.
    fn migration_dir_exists(&self, id: &str) -> bool {
        let Ok(rd) = std::fs::read_dir(self.paths.data_dir.join("work")) else {
            return false;
        };
        rd.flatten().any(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("incoming-"))
                .and_then(|n| n.rsplit_once('-'))
                .is_some_and(|(have, _)| have == id)
        })
    }

    /// Whether `caller` may drive migration `id` (see [`crate::authz::may_drive`]).
    pub async fn check_driver(
        &self,
        id: &str,
        caller: Option<&ferry_proto::tls::Identity>,
    ) -> Result<()> {
        let owner = self
            .incoming
            .lock()
            .await
            .get(id)
            .and_then(|i| i.owner.clone());
        crate::authz::may_drive(owner.as_ref(), caller, id)
    }

    pub async fn migrate_push(
        &self,
        mut stream: tonic::Streaming<pb::MigrateChunk>,
        caller: Option<&ferry_proto::tls::Identity>,
    ) -> Result<pb::MigratePushResponse> {
        let first = match stream.next().await {
            Some(Ok(c)) => c,
            Some(Err(s)) => return Err(stream_err(s)),
            None => return Err(AgentError::invalid("migration_id", "empty push")),
        };
        let dest = {
            let inc = self.incoming.lock().await;
            let i = inc
                .get(&first.migration_id)
                .ok_or_else(|| AgentError::not_found("migration", &first.migration_id))?;
            crate::authz::may_drive(i.owner.as_ref(), caller, &first.migration_id)?;
            match first.area.as_str() {
                "rootfs" => super::disk::upper(&self.paths.vps(&i.name)),
                "images" => i.images.clone(),
                a => return Err(AgentError::invalid("area", format!("unknown area {a:?}"))),
            }
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<pb::MigrateChunk>(8);
        // Spawned now, not when awaited: the feed below fills the channel
        // and would wait for a writer that had not started (a tree bigger
        // than the channel's eight messages hung the push).
        // Every push is held to what this node can take: the configured most,
        // or its free space less a reserve.
        let limits = ferry_migrate::tree::apply::Limits::bytes(self.upload_room().0);
        let writer = tokio::spawn(blocking(move || {
            let mut a =
                ferry_migrate::tree::apply::Applier::new(&dest, limits).map_err(tree_err)?;
            while let Some(c) = rx.blocking_recv() {
                for it in c.items {
                    a.item(it).map_err(tree_err)?;
                }
            }
            a.finish().map_err(tree_err)
        }));
        let feed = async {
            tx.send(first).await.map_err(|_| None)?;
            while let Some(c) = stream.next().await {
                let c = c.map_err(Some)?;
                tx.send(c).await.map_err(|_| None)?;
            }
            Ok::<_, Option<tonic::Status>>(())
        };
        let fed = feed.await;
        drop(tx);
        let st = writer
            .await
            .map_err(|e| AgentError::Internal(format!("tree writer: {e}")))??;
        match fed {
            Ok(()) => {}
            Err(Some(s)) => return Err(stream_err(s)),
            Err(None) => return Err(AgentError::Internal("the push stream broke".into())),
        }
        Ok(pb::MigratePushResponse {
            entries: st.entries,
            bytes: st.bytes,
        })
    }

    #[tracing::instrument(skip(self, req), fields(migration = %req.migration_id))]
    pub async fn migrate_restore(
        self: &Arc<Self>,
        req: pb::MigrateRestoreRequest,
    ) -> Result<pb::MigrateRestoreResponse> {
        let t = std::time::Instant::now();
        // Out of the map while it restores, so other migrations are not held up.
        let mut i = self
            .incoming
            .lock()
            .await
            .remove(&req.migration_id)
            .ok_or_else(|| AgentError::not_found("migration", &req.migration_id))?;
        let res = if i.live && req.live {
            self.restore_held(&mut i, &req.console_key, &req.page_server)
                .await
        } else {
            Ok(())
        };
        self.incoming
            .lock()
            .await
            .insert(req.migration_id.clone(), i);
        res?;
        // A source that never comes back must not leave the VPS held here for
        // ever: after HOLD_TIMEOUT, give up (node-local), or ask the cluster
        // what was decided and follow it (a no-op once it has finished).
        let agent = Arc::clone(self);
        let id = req.migration_id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(HOLD_TIMEOUT).await;
            agent.settle_held(&id).await;
        });
        // Post-copy arrivals wait for their source: they need its memory.
        if req.page_server.is_empty() {
            let agent = Arc::clone(self);
            tokio::spawn(async move {
                agent.follow_decision(&req.migration_id).await;
            });
        }
        Ok(pb::MigrateRestoreResponse {
            restore_ms: t.elapsed().as_millis() as u64,
        })
    }

    /// A held arrival whose memory is all here (not post-copy), in a
    /// cluster: once its move is decided, follows the decision without
    /// waiting for the source.
    async fn follow_decision(self: &Arc<Self>, id: &str) {
        let (name, controllers) = match self.incoming.lock().await.get(id) {
            Some(i) if !i.controllers.is_empty() => (i.name.clone(), i.controllers.clone()),
            _ => return,
        };
        tokio::time::sleep(FOLLOW_AFTER).await;
        let end = std::time::Instant::now() + HOLD_TIMEOUT;
        while std::time::Instant::now() < end {
            if !self.incoming.lock().await.contains_key(id) {
                return; // finished the usual way
            }
            if let Some((moved, generation)) =
                crate::cluster::query_decision(&controllers, &name, id).await
            {
                tracing::warn!(vps = %name, migration = %id, moved, "the source did not finish a decided move; following the decision");
                let finish = pb::MigrateFinishRequest {
                    migration_id: id.to_string(),
                    commit: moved,
                    generation,
                };
                if let Err(e) = self.migrate_finish(finish).await {
                    tracing::error!(vps = %name, migration = %id, error = %e, "following the decision");
                }
                return;
            }
            tokio::time::sleep(FOLLOW_EVERY).await;
        }
    }

    /// Ends a held arrival whose source went quiet. In a cluster the Raft
    /// decision says which way: cancelling first means a later commit cannot
    /// happen, and a commit made already is followed. While no controller can
    /// answer, the VPS stays held: running it or dropping it could each be
    /// wrong.
    async fn settle_held(self: &Arc<Self>, id: &str) {
        let (name, controllers) = match self.incoming.lock().await.get(id) {
            Some(i) => (i.name.clone(), i.controllers.clone()),
            None => return,
        };
        let mut finish = pb::MigrateFinishRequest {
            migration_id: id.to_string(),
            commit: false,
            generation: 0,
        };
        if !controllers.is_empty() {
            loop {
                match crate::cluster::decide_migration(&controllers, &name, id, false, HOLD_TIMEOUT)
                    .await
                {
                    Ok((moved, generation)) => {
                        finish.commit = moved;
                        finish.generation = generation;
                        break;
                    }
                    Err(e @ crate::cluster::DecideError::Refused(_)) => {
                        tracing::error!(vps = %name, migration = %id, error = %e, "dropping the held arrival");
                        break;
                    }
                    Err(e) => {
                        tracing::error!(vps = %name, migration = %id, error = %e, "the arrival stays held until the cluster decides");
                    }
                }
                if !self.incoming.lock().await.contains_key(id) {
                    return;
                }
            }
        }
        tracing::warn!(vps = %name, migration = %id, commit = finish.commit, "settling a held arrival its source left");
        if let Err(e) = self.migrate_finish(finish).await {
            tracing::error!(vps = %name, migration = %id, error = %e, "settling a held arrival");
        }
    }

    /// Tells the LAN where a VPS that just came up here is (gratuitous ARP).
    pub(super) fn announce(&self, rec: &VpsRecord) {
        if let Some(net) = &rec.config.net {
            let netns = self.paths.vps_run(&rec.config.name).join("netns");
            crate::net::announce(&netns, net.ip, net.mac, &rec.config.name);
        }
    }

    /// Restores the arriving VPS and keeps it held before it runs. On failure
    /// its kernel objects are gone (the source's rollback removes the rest).
    async fn restore_held(
        self: &Arc<Self>,
        i: &mut Incoming,
        console_key: &str,
        page_server: &str,
    ) -> Result<()> {
        let lock = self.lock_for(&i.name);
        let _g = lock.lock().await;
        // The memory comes through a lazy-pages daemon: from the source's
        // page server (post-copy, through the page tunnel), or, in a stop-copy whose images are all
        // here, from them, so the VPS runs before CRIU has copied its memory
        // in (a restore of 256 MiB spent ~170 ms copying). Either way the
        // daemon starts (~10 ms: a CRIU of its own) while the VPS's kernel
        // objects are made; the monitor's restore waits for it.
        // Post-copy: the page tunnel to the source, dialled by a process of
        // its own (started with the daemon, beside the restore's work).
        let tunnel_to = if page_server.is_empty() {
            None
        } else {
            let at: std::net::SocketAddr = page_server.parse().map_err(|_| {
                AgentError::invalid("page_server", format!("{page_server:?}: use ADDR:PORT"))
            })?;
            let source = match &i.owner {
                Some(ferry_proto::tls::Role::Node(n)) => n.clone(),
                _ => String::new(),
            };
            let how = if self.cfg.credentials.is_some() {
                "mutual TLS"
            } else {
                "plaintext (--insecure-dev)"
            };
            tracing::info!(vps = %i.name, tunnel = %at, "page tunnel dialled, {how}");
            Some((at, source))
        };
        let server = tunnel_to.is_some();
        let tunnel_slot: Arc<std::sync::Mutex<Option<crate::criu::tunnel::Tunnel>>> =
            Default::default();
        // Post-copy needs lazy pages; a stop-copy uses them where this node
        // has them, else CRIU copies the memory in.
        let lazy = server || self.criu.usable().is_ok_and(|c| c.lazy_pages);
        let daemon = match lazy.then(crate::criu::lazy::ensure_pipe_max_size) {
            None => None,
            Some(Err(e)) if server => return Err(AgentError::FailedPrecondition(e.to_string())),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "the restore copies the memory in");
                None
            }
            Some(Ok(())) => {
                let criu = self.criu_path()?;
                let images = i.images.clone();
                let exe = self.cfg.self_exe.clone();
                let creds = self.cfg.credentials.clone();
                let slot = Arc::clone(&tunnel_slot);
                Some(tokio::spawn(async move {
                    let sock = match tunnel_to {
                        Some((at, source)) => {
                            let log = crate::criu::tunnel::log_in(&images);
                            let (t, s) = blocking(move || {
                                crate::criu::tunnel::start_dial(
                                    &exe,
                                    at,
                                    &source,
                                    creds.as_deref(),
                                    &log,
                                )
                                .map_err(|e| AgentError::FailedPrecondition(e.to_string()))
                            })
                            .await?;
                            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
                            Some(s)
                        }
                        None => None,
                    };
                    crate::criu::lazy::start_daemon(
                        &criu,
                        &images,
                        sock,
                        super::start::criu_log_level(),
                    )
                    .await
                    .map_err(|e| AgentError::FailedPrecondition(e.to_string()))
                }))
            }
        };
        let r = Resume {
            images: i.images.clone(),
            console_key: console_key.to_string(),
            hold: true,
            lazy: daemon.is_some(),
        };
        let gate = async {
            match daemon {
                Some(h) => h
                    .await
                    .map_err(|e| AgentError::Internal(format!("lazy-pages start: {e}")))?
                    .map(Some),
                None => Ok(None),
            }
        };
        let res = self.bring_up_gated(&i.rec, Some(&r), gate).await;
        i.tunnel = tunnel_slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        match res {
            Ok((Some(h), lazy)) => {
                i.held = Some(h);
                i.lazy = lazy;
                Ok(())
            }
            Ok((None, _)) => {
                // Cannot happen (the monitor was asked to hold); never let it run.
                let _ = self
                    .stop_locked(&i.name, std::time::Duration::ZERO, true)
                    .await;
                Err(AgentError::Internal("the restored VPS was not held".into()))
            }
            Err(e) => {
                // What CRIU and the monitor said, before the rollback removes
                // their logs with the arrival.
                let tail = crate::criu::log_tail;
                tracing::error!(
                    vps = %i.name,
                    error = %e,
                    restore = %tail(&i.images.join(crate::criu::restore::RESTORE_LOG)),
                    lazy_pages = %tail(&i.images.join(crate::criu::lazy::LAZY_LOG)),
                    monitor = %tail(&self.paths.vps_run(&i.name).join("monitor.log")),
                    "the restore failed"
                );
                i.lazy = None;
                i.tunnel = None;
                crate::criu::clear_leftover_mounts(&i.images);
                let _ = self.teardown(&i.name).await;
                Err(e)
            }
        }
    }

    #[tracing::instrument(skip(self, req), fields(migration = %req.migration_id, commit = req.commit))]
    pub async fn migrate_finish(
        self: &Arc<Self>,
        req: pb::MigrateFinishRequest,
    ) -> Result<pb::MigrateFinishResponse> {
        let removed = {
            let mut incoming = self.incoming.lock().await;
            let i = incoming.remove(&req.migration_id);
            if i.is_none() && !req.commit {
                // An abort ahead of its prepare: the prepare must not stand.
                self.mark_aborted(&req.migration_id);
            }
            i
        };
        let Some(mut i) = removed else {
            if req.commit {
                if let Some(at) = self.committed_at(&req.migration_id) {
                    // This node ran it already, following the decision.
                    return Ok(pb::MigrateFinishResponse {
                        vps: None,
                        ran_ms_ago: at.elapsed().as_millis() as u64,
                    });
                }
                return Err(AgentError::not_found("migration", &req.migration_id));
            }
            return Ok(pb::MigrateFinishResponse {
                vps: None,
                ran_ms_ago: 0,
            });
        };
        let name = i.name.clone();
        let lock = self.lock_for(&name);
        let _g = lock.lock().await;
        if req.commit {
            let mut rec = i.rec.clone();
            rec.config.generation = rec.config.generation.max(req.generation);
            if let Some(h) = i.held.take() {
                // The decision is made: the VPS's link may reach the LAN now
                // (the tasks run a moment later; the LAN still sends to the
                // source until the announce below).
                if let Err(e) = self.unlock_link(&name) {
                    tracing::error!(vps = %name, error = %e, "the moved VPS's link stays down");
                }
                let _window = self.freeze_window();
                if ferry_migrate::failpoint::delay("kill-held-arrival").is_some() {
                    tracing::warn!(vps = %name, "FERRY_FAILPOINT: killing the held arrival");
                    self.cgroup(&name).kill_tasks();
                }
                let cg = self.cgroup(&name);
                if let Err(e) = h.go(move || !cg.pids().is_empty()).await {
                    return Err(self.arrival_lost(&i, &rec, e).await);
                }
            }
            let ran_at = std::time::Instant::now();
            // It runs: the LAN learns where first.
            self.announce(&rec);
            // Like the daemon, the tunnel goes on if this agent stops.
            if let Some(t) = i.tunnel.take() {
                t.keep();
            }
            if let Some(d) = i.lazy.take() {
                // The VPS runs here while its memory still comes in: from the
                // source (post-copy: the window in which it needs that node)
                // or from its images here (stop-copy). They stay until then.
                let images = std::mem::take(&mut i.images);
                let vps = name.clone();
                // From here the daemon finishes even if this agent stops.
                let kept = d.keep();
                tokio::spawn(async move {
                    let t = std::time::Instant::now();
                    let Some(mut child) = kept else {
                        return;
                    };
                    let st = child.wait().await;
                    let ok = st.as_ref().is_ok_and(|s| s.success());
                    if ok {
                        tracing::info!(vps = %vps, ms = t.elapsed().as_millis() as u64, "lazy pages: every page is in");
                    } else {
                        tracing::error!(vps = %vps, status = ?st, log = %crate::criu::log_tail(&images.join(crate::criu::lazy::LAZY_LOG)), "lazy pages: the transfer failed; the VPS may miss memory");
                    }
                    crate::criu::remove_work_dir(&images);
                });
            }
            self.save_record(&rec)?;
            self.mark_committed(&req.migration_id, ran_at);
            let _ = std::fs::remove_file(self.paths.vps(&name).join(INCOMING_MARKER));
            self.watch(&name);
            drop(_g);
            // Not in the source's wait (its downtime figure): the VPS's own
            // limits in place of the restore's (lowering the memory limit
            // drops the images' page cache, ~20 ms at 256 MiB), and the
            // images' removal.
            let agent = Arc::clone(self);
            let (vps, images) = (name.clone(), std::mem::take(&mut i.images));
            tokio::spawn(async move {
                let lock = agent.lock_for(&vps);
                let _g = lock.lock().await;
                if let Ok(rec) = agent.record(&vps) {
                    if agent.status(&vps).is_running() {
                        agent.settle_limits(&vps, &rec.config.limits).await;
                    }
                    // The disk's arrival room goes back (when the files allow).
                    let (vdir, quota) = (agent.paths.vps(&vps), rec.config.limits.disk_bytes);
                    let _ = blocking(move || {
                        super::disk::fit(&vdir, quota);
                        Ok(())
                    })
                    .await;
                }
                if !images.as_os_str().is_empty() {
                    let _ = blocking(move || {
                        crate::criu::remove_work_dir(&images);
                        Ok(())
                    })
                    .await;
                }
            });
            tracing::info!(vps = %name, "migration arrived");
            return Ok(pb::MigrateFinishResponse {
                vps: Some(self.get(&name).await?),
                ran_ms_ago: 0,
            });
        }
        if let Some(h) = i.held.take() {
            h.abort().await;
        }
        drop(i.lazy.take());
        drop(i.tunnel.take());
        self.discard_incoming(&name, &i.images).await;
        Ok(pb::MigrateFinishResponse {
            vps: None,
            ran_ms_ago: 0,
        })
    }

    /// A decided arrival whose restored processes never ran (its restore
    /// died after the decision): the VPS is this node's now, so it stays
    /// here as a stopped VPS with its files, and its kernel objects, images
    /// and arrival marks go; a controller starts it again from its files
    /// (its processes and memory are lost). Returns the error to report.
    async fn arrival_lost(&self, i: &Incoming, rec: &VpsRecord, e: AgentError) -> AgentError {
        let tail = crate::criu::log_tail;
        tracing::error!(
            vps = %i.name,
            error = %e,
            restore = %tail(&i.images.join(crate::criu::restore::RESTORE_LOG)),
            monitor = %tail(&self.paths.vps_run(&i.name).join("monitor.log")),
            "the decided arrival did not run; it stays here stopped"
        );
        crate::criu::clear_leftover_mounts(&i.images);
        let mut kept = true;
        if let Err(t) = self.teardown(&i.name).await {
            tracing::error!(vps = %i.name, error = %t, "releasing the lost arrival");
            kept = false;
        }
        crate::criu::remove_work_dir(&i.images);
        if let Err(s) = self.save_record(rec) {
            tracing::error!(vps = %i.name, error = %s, "recording the lost arrival");
        }
        let _ = std::fs::remove_file(self.paths.vps(&i.name).join(INCOMING_MARKER));
        AgentError::Internal(format!(
            "{e}; the move was decided, so VPS {} stays on this node{}, with its files but              not its processes: start it again",
            i.name,
            if kept { ", stopped" } else { "" }
        ))
    }

    /// Removes an arriving VPS: its kernel objects (the cgroup's removal kills
    /// a held tree), files and images. Its files stay if its kernel objects
    /// could not be released: they may still be in use.
    async fn discard_incoming(&self, name: &str, images: &std::path::Path) {
        crate::criu::remove_work_dir(images);
        if let Err(e) = self.teardown(name).await {
            tracing::error!(vps = %name, error = %e, "cannot release an arriving VPS; its files stay");
            return;
        }
        let _ = crate::template::remove_tree(&self.paths.vps_run(name));
        if let Err(e) = super::disk::unmount(&self.paths.vps(name)) {
            tracing::error!(vps = %name, error = %e, "cannot unmount an arriving VPS's disk; its files stay");
            return;
        }
        let _ = crate::template::remove_tree(&self.paths.vps(name));
    }

    /// At start: arrivals an earlier agent left unfinished are removed (their
    /// held monitors saw the agent go and had CRIU kill the restored tree). One
    /// already let go (the agent died between `go` and dropping the marker) is
    /// kept: it runs, so its move was decided.
    pub(super) async fn sweep_incoming(&self) {
        let Ok(rd) = std::fs::read_dir(self.paths.vps_root()) else {
            return;
        };
        for e in rd.flatten() {
            let marker = e.path().join(INCOMING_MARKER);
            if !marker.exists() {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            if self.status(&name).is_running() {
                tracing::warn!(vps = %name, "keeping an arrived VPS that runs");
                let _ = std::fs::remove_file(&marker);
                continue;
            }
            tracing::warn!(vps = %name, "removing an unfinished incoming migration");
            self.discard_incoming(&name, std::path::Path::new("")).await;
        }
    }

    pub async fn tree_digest(&self, tree: &str) -> Result<pb::TreeDigestResponse> {
        let root = if let Some(id) = tree.strip_prefix("incoming:") {
            let inc = self.incoming.lock().await;
            let i = inc
                .get(id)
                .ok_or_else(|| AgentError::not_found("migration", id))?;
            super::disk::upper(&self.paths.vps(&i.name))
        } else if let Some(name) = tree.strip_prefix("vps:") {
            self.record(name)?;
            super::disk::upper(&self.paths.vps(name))
        } else {
            return Err(AgentError::invalid(
                "tree",
                "use vps:NAME or incoming:MIGRATION_ID",
            ));
        };
        let (digest, entries) = blocking(move || {
            ferry_migrate::tree::digest::digest(&root)
                .map_err(|e| AgentError::Internal(e.to_string()))
        })
        .await?;
        Ok(pb::TreeDigestResponse { digest, entries })
    }
}

/// A push stream's own error: a message that does not decode is the
/// sender's fault.
fn stream_err(s: tonic::Status) -> AgentError {
    if crate::error::is_decode_failure(&s) {
        AgentError::invalid("chunk", s.message().to_string())
    } else {
        AgentError::Internal(format!("push stream: {}", s.message()))
    }
}

fn tree_err(e: ferry_migrate::tree::TreeError) -> AgentError {
    match e {
        ferry_migrate::tree::TreeError::Invalid(m) => AgentError::invalid("items", m),
        ferry_migrate::tree::TreeError::TooLarge(m) => {
            AgentError::ResourceExhausted(format!("items: {m}"))
        }
        other => AgentError::Internal(other.to_string()),
    }
}

fn version_tuple(v: &str) -> Vec<u32> {
    v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}
