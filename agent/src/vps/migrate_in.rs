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
use crate::error::{AgentError, IoContext, Result};

/// Marks a VPS dir that is still arriving; holds the migration id.
pub const INCOMING_MARKER: &str = "incoming";

pub struct Incoming {
    pub name: String,
    rec: VpsRecord,
    live: bool,
    images: PathBuf,
    held: Option<Held>,
}

impl Agent {
    #[tracing::instrument(skip(self, req), fields(migration = %req.migration_id))]
    pub async fn migrate_prepare(
        &self,
        req: pb::MigratePrepareRequest,
    ) -> Result<pb::MigratePrepareResponse> {
        crate::spec::validate_name("migration_id", &req.migration_id)?;
        let spec = req
            .spec
            .ok_or_else(|| AgentError::invalid("spec", "missing"))?;
        let config = crate::spec::validate_spec(&spec, self.capacity, self.cfg.bridge_cidr)?;
        let name = config.name.clone();
        let node = self.node_label();
        let mine = self.criu.info.as_ref().ok();
        if req.live {
            let info = mine.ok_or_else(|| {
                AgentError::FailedPrecondition(format!(
                    "CRIU is not usable on {node}: {}",
                    self.criu.info.as_ref().err().cloned().unwrap_or_default()
                ))
            })?;
            if version_tuple(&info.version) < version_tuple(&req.criu_version) {
                return Err(AgentError::FailedPrecondition(format!(
                    "CRIU on {node} is {}, older than the source's {}; images may not restore",
                    info.version, req.criu_version
                )));
            }
            let here = ferry_migrate::phases::preflight::cpu_flags();
            let missing: Vec<&String> =
                req.cpu_flags.iter().filter(|f| !here.contains(f)).collect();
            if !missing.is_empty() {
                return Err(AgentError::FailedPrecondition(format!(
                    "the CPU of {node} lacks features the VPS's processes may use: {}",
                    missing
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                )));
            }
        }
        crate::template::get(&self.paths, &config.template).map_err(|_| {
            AgentError::FailedPrecondition(format!(
                "template {:?} is missing on {node}",
                config.template
            ))
        })?;
        let _g = self.create_lock.lock().await;
        if self.paths.vps(&name).exists() {
            return Err(AgentError::AlreadyExists {
                kind: "VPS",
                name: format!("{name} (on {node})"),
            });
        }
        let recs = self.records();
        let mem: u64 = recs.iter().map(|r| r.config.limits.memory_bytes).sum();
        if mem + config.limits.memory_bytes > self.capacity.memory_bytes {
            return Err(AgentError::ResourceExhausted(format!(
                "{node} is full: {} MiB of memory allocated, the VPS needs {} MiB more of {} MiB",
                mem >> 20,
                config.limits.memory_bytes >> 20,
                self.capacity.memory_bytes >> 20
            )));
        }
        if let Some(net) = &config.net {
            if let Some(other) = recs
                .iter()
                .find(|r| r.config.net.as_ref().map(|n| n.ip) == Some(net.ip))
            {
                return Err(AgentError::AlreadyExists {
                    kind: "net.ip",
                    name: format!("{} (held by VPS {} on {node})", net.ip, other.config.name),
                });
            }
        }
        let dir = self.paths.vps(&name);
        for d in ["upper", "work", "rootfs"] {
            std::fs::create_dir_all(dir.join(d)).at("creating", dir.join(d))?;
        }
        std::fs::write(dir.join(INCOMING_MARKER), &req.migration_id)
            .at("writing", dir.join(INCOMING_MARKER))?;
        let rec = VpsRecord {
            config,
            created_unix: super::checkpoint::unix_now(),
        };
        self.save_record(&rec)?;
        let images = self.work_dir(&format!("incoming-{}", req.migration_id))?;
        let mut inc = self.incoming.lock().await;
        inc.insert(
            req.migration_id.clone(),
            Incoming {
                name,
                rec,
                live: req.live,
                images,
                held: None,
            },
        );
        Ok(pb::MigratePrepareResponse {
            criu_version: mine.map(|i| i.version.clone()).unwrap_or_default(),
        })
    }

    pub async fn migrate_push(
        &self,
        mut stream: tonic::Streaming<pb::MigrateChunk>,
    ) -> Result<pb::MigratePushResponse> {
        let first = match stream.next().await {
            Some(Ok(c)) => c,
            Some(Err(s)) => {
                return Err(AgentError::Internal(format!(
                    "push stream: {}",
                    s.message()
                )))
            }
            None => return Err(AgentError::invalid("migration_id", "empty push")),
        };
        let dest = {
            let inc = self.incoming.lock().await;
            let i = inc
                .get(&first.migration_id)
                .ok_or_else(|| AgentError::not_found("migration", &first.migration_id))?;
            match first.area.as_str() {
                "rootfs" => self.paths.vps(&i.name).join("upper"),
                "images" => i.images.clone(),
                a => return Err(AgentError::invalid("area", format!("unknown area {a:?}"))),
            }
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<pb::MigrateChunk>(8);
        let writer = blocking(move || {
            let mut a = ferry_migrate::tree::apply::Applier::new(&dest)
                .map_err(|e| AgentError::Internal(e.to_string()))?;
            while let Some(c) = rx.blocking_recv() {
                for it in c.items {
                    a.item(it)
                        .map_err(|e| AgentError::Internal(e.to_string()))?;
                }
            }
            a.finish().map_err(|e| AgentError::Internal(e.to_string()))
        });
        let feed = async {
            tx.send(first).await.map_err(|_| ())?;
            while let Some(c) = stream.next().await {
                let c = c.map_err(|_| ())?;
                tx.send(c).await.map_err(|_| ())?;
            }
            Ok::<_, ()>(())
        };
        let fed = feed.await;
        drop(tx);
        let st = writer.await?;
        if fed.is_err() {
            return Err(AgentError::Internal("the push stream broke".into()));
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
        let mut inc = self.incoming.lock().await;
        let i = inc
            .get_mut(&req.migration_id)
            .ok_or_else(|| AgentError::not_found("migration", &req.migration_id))?;
        if !i.live || !req.live {
            return Ok(pb::MigrateRestoreResponse { restore_ms: 0 });
        }
        let lock = self.lock_for(&i.name);
        let _g = lock.lock().await;
        let r = Resume {
            images: i.images.clone(),
            console_key: req.console_key.clone(),
            hold: true,
        };
        match self.bring_up(&i.rec, Some(&r)).await {
            Ok(Some(h)) => i.held = Some(h),
            Ok(None) => {
                // The monitor answered without holding: refuse, it must not run yet.
                let _ = self.teardown_forced(&i.name).await;
                return Err(AgentError::Internal("the restored VPS was not held".into()));
            }
            Err(e) => {
                crate::criu::clear_leftover_mounts(&i.images);
                let _ = self.teardown_forced(&i.name).await;
                return Err(e);
            }
        }
        Ok(pb::MigrateRestoreResponse {
            restore_ms: t.elapsed().as_millis() as u64,
        })
    }

    #[tracing::instrument(skip(self, req), fields(migration = %req.migration_id, commit = req.commit))]
    pub async fn migrate_finish(
        self: &Arc<Self>,
        req: pb::MigrateFinishRequest,
    ) -> Result<pb::MigrateFinishResponse> {
        let Some(mut i) = self.incoming.lock().await.remove(&req.migration_id) else {
            if req.commit {
                return Err(AgentError::not_found("migration", &req.migration_id));
            }
            return Ok(pb::MigrateFinishResponse { vps: None });
        };
        let name = i.name.clone();
        let lock = self.lock_for(&name);
        let _g = lock.lock().await;
        if req.commit {
            if let Some(h) = i.held.take() {
                h.go().await?;
            }
            let mut rec = i.rec.clone();
            rec.config.generation = rec.config.generation.max(req.generation);
            self.save_record(&rec)?;
            let _ = std::fs::remove_file(self.paths.vps(&name).join(INCOMING_MARKER));
            self.watch(&name);
            crate::criu::clear_leftover_mounts(&i.images);
            let _ = std::fs::remove_dir_all(&i.images);
            drop(_g);
            tracing::info!(vps = %name, "migration arrived");
            return Ok(pb::MigrateFinishResponse {
                vps: Some(self.get(&name).await?),
            });
        }
        if let Some(h) = i.held.take() {
            h.abort().await;
        }
        self.discard_incoming(&name, &i.images).await;
        Ok(pb::MigrateFinishResponse { vps: None })
    }

    /// Removes an arriving VPS: its kernel objects, files and images.
    async fn discard_incoming(&self, name: &str, images: &std::path::Path) {
        let _ = self.teardown_forced(name).await;
        crate::criu::clear_leftover_mounts(images);
        let _ = std::fs::remove_dir_all(images);
        let _ = crate::template::remove_tree(&self.paths.vps_run(name));
        let _ = crate::template::remove_tree(&self.paths.vps(name));
    }

    /// Teardown even if a (held or half-restored) tree is still there: kill it first.
    async fn teardown_forced(&self, name: &str) -> Result<()> {
        let cg = self.cgroup(name);
        for pid in cg.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(st) = crate::runtime::RuntimeState::read(&self.paths.vps_run(name)) {
            if st.init_alive() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(st.init_pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = self
            .wait_stopped(name, std::time::Duration::from_secs(5))
            .await;
        self.teardown(name).await
    }

    /// At start: arrivals an earlier agent left unfinished are removed (their
    /// held monitors saw the agent go and had CRIU kill the restored tree).
    pub(super) async fn sweep_incoming(&self) {
        let Ok(rd) = std::fs::read_dir(self.paths.vps_root()) else {
            return;
        };
        for e in rd.flatten() {
            if e.path().join(INCOMING_MARKER).exists() {
                let name = e.file_name().to_string_lossy().into_owned();
                tracing::warn!(vps = %name, "removing an unfinished incoming migration");
                let images = PathBuf::new();
                self.discard_incoming(&name, &images).await;
            }
        }
        if let Ok(rd) = std::fs::read_dir(self.paths.data_dir.join("work")) {
            for e in rd.flatten() {
                crate::criu::clear_leftover_mounts(&e.path());
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    pub async fn tree_digest(&self, tree: &str) -> Result<pb::TreeDigestResponse> {
        let root = if let Some(id) = tree.strip_prefix("incoming:") {
            let inc = self.incoming.lock().await;
            let i = inc
                .get(id)
                .ok_or_else(|| AgentError::not_found("migration", id))?;
            self.paths.vps(&i.name).join("upper")
        } else if let Some(name) = tree.strip_prefix("vps:") {
            self.record(name)?;
            self.paths.vps(name).join("upper")
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

    fn node_label(&self) -> String {
        let n = self.node_name.lock().unwrap_or_else(|p| p.into_inner());
        if n.is_empty() {
            "this node".into()
        } else {
            format!("node {n}")
        }
    }
}

fn version_tuple(v: &str) -> Vec<u32> {
    v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}
