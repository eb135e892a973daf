//! Checkpoint: CRIU dumps a running VPS (which then stops, or keeps running
//! with `leave_running`), and its images plus the VPS's own files (the overlay
//! upper dir) are packed into a Ferry checkpoint archive.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::start::{blocking, criu_log_level};
use super::Agent;
use crate::criu::dump::{DumpFacts, DumpRequest, SeizeProbe};
use crate::error::{AgentError, IoContext, Result};
use crate::runtime::CHECKPOINT_MARKER;
use crate::spec::VpsConfig;

/// The archive's metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub config: VpsConfig,
    pub facts: DumpFacts,
    pub criu_version: String,
    pub agent_version: String,
    pub created_unix: i64,
    pub leave_running: bool,
}

impl Agent {
    /// Dumps the running VPS into `images`. Unless `leave_running`, the VPS has
    /// ended when this returns; its kernel objects are left for the caller to
    /// release (outside a migration's frozen window). On failure CRIU has
    /// resumed it and it runs on. The caller holds the VPS's lock.
    pub(super) async fn dump_locked(
        &self,
        name: &str,
        images: &Path,
        leave_running: bool,
        probe: Option<SeizeProbe>,
        parent: Option<String>,
    ) -> Result<DumpFacts> {
        let pid = self.running_init(name, "can be checkpointed")?;
        let criu = self.criu_path()?;
        let run = self.paths.vps_run(name);
        let marker = run.join(CHECKPOINT_MARKER);
        if !leave_running {
            std::fs::write(&marker, b"").at("writing", &marker)?;
        }
        std::fs::create_dir_all(images).at("creating", images)?;
        let images_owned = images.to_path_buf();
        let cgroup_yard = self.criu_yard();
        let lock_link = self.host_veth(name);
        let window = self.freeze_window();
        let res = blocking(move || {
            crate::criu::dump::dump(
                &criu,
                &DumpRequest {
                    pid,
                    images: &images_owned,
                    leave_running,
                    leave_stopped: false,
                    log_level: criu_log_level(),
                    lazy: None,
                    probe,
                    cgroup_yard,
                    lock_link,
                    parent,
                },
            )
            .map_err(|e| AgentError::FailedPrecondition(e.to_string()))
        })
        .await;
        drop(window);
        let facts = match res {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(&marker);
                return Err(e);
            }
        };
        if !leave_running {
            if !self.wait_stopped(name, Duration::from_secs(10)).await {
                return Err(AgentError::Internal(format!(
                    "VPS {name} was dumped but its monitor did not finish"
                )));
            }
            let _ = std::fs::remove_file(&marker);
        }
        Ok(facts)
    }

    /// The agent's cgroup yard for a CRIU run, if it still holds every
    /// hierarchy.
    pub(super) fn criu_yard(&self) -> Option<PathBuf> {
        self.cgyard.clone().filter(|y| crate::criu::yard::ready(y))
    }

    /// The host end of the veth of VPS `name` as its current run made it
    /// (the name changes with every start), if it has one.
    pub(super) fn host_veth(&self, name: &str) -> Option<String> {
        std::fs::read(self.paths.vps_run(name).join(crate::runtime::LAUNCH_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<crate::runtime::LaunchConfig>(&b).ok())
            .and_then(|l| l.host_veth)
    }

    /// The CRIU binary, if it is usable on this node.
    pub(super) fn criu_path(&self) -> Result<PathBuf> {
        self.criu
            .usable()
            .map(|i| i.path.clone())
            .map_err(|e| AgentError::FailedPrecondition(e.to_string()))
    }

    /// Checkpoints a VPS into an archive under the data dir; returns its path.
    #[tracing::instrument(skip(self))]
    pub async fn checkpoint(
        &self,
        name: &str,
        leave_running: bool,
        generation: u64,
    ) -> Result<PathBuf> {
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        self.fence(name, generation)?;
        let rec = self.record(name)?;
        let dir = self.work_dir(&format!("ckpt-{name}"))?;
        let images = dir.join("images");
        let res = async {
            let facts = self
                .dump_locked(name, &images, leave_running, None, None)
                .await?;
            if !leave_running {
                self.teardown(name).await?;
            }
            let meta = CheckpointMeta {
                config: rec.config.clone(),
                facts,
                criu_version: self
                    .criu
                    .usable()
                    .map(|i| i.version.clone())
                    .unwrap_or_default(),
                agent_version: env!("CARGO_PKG_VERSION").into(),
                created_unix: super::now_unix(),
                leave_running,
            };
            let meta =
                serde_json::to_vec(&meta).map_err(|e| AgentError::Internal(e.to_string()))?;
            let archive = dir.join(format!("{name}.ferryckpt"));
            let upper = super::disk::upper(&self.paths.vps(name));
            let (a, im) = (archive.clone(), images.clone());
            blocking(move || {
                let bad =
                    |e: ferry_migrate::archive::ArchiveError| AgentError::Internal(e.to_string());
                let mut w =
                    ferry_migrate::archive::ArchiveWriter::create(&a, &meta).map_err(bad)?;
                w.add_tree("images", &im).map_err(bad)?;
                w.add_tree("rootfs", &upper).map_err(bad)?;
                w.finish().map_err(bad)?;
                Ok(())
            })
            .await?;
            let _ = std::fs::remove_dir_all(&images);
            Ok(archive)
        }
        .await;
        if res.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        tracing::info!(ok = res.is_ok(), "checkpoint");
        res
    }

    /// At start: scratch dirs of checkpoints, restores and arrivals an earlier
    /// agent left go. A migration's own dir (`migrate-*`) holds the images a
    /// frozen VPS may need to come back from: [`Agent::recover_migrations`] reads it.
    pub(super) fn sweep_work(&self) {
        let Ok(rd) = std::fs::read_dir(self.paths.data_dir.join("work")) else {
            return;
        };
        for e in rd.flatten() {
            if !e.file_name().to_string_lossy().starts_with("migrate-") {
                crate::criu::remove_work_dir(&e.path());
            }
        }
    }

    /// How much a restore may upload, and what sets that: the configured
    /// most, or the data dir's free space less 1 GiB.
    pub fn upload_room(&self) -> (u64, &'static str) {
        let fits = self.free_room();
        if fits < self.cfg.max_upload_bytes {
            (fits, "the data dir's free space less 1 GiB")
        } else {
            (self.cfg.max_upload_bytes, "--max-upload-bytes")
        }
    }

    /// The data dir's free space less a 1 GiB reserve: what one stream
    /// (an upload, a push, an import) may write at most.
    pub fn free_room(&self) -> u64 {
        const RESERVE: u64 = 1 << 30;
        nix::sys::statvfs::statvfs(&self.paths.data_dir)
            .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
            .unwrap_or(u64::MAX)
            .saturating_sub(RESERVE)
    }

    /// A fresh scratch directory under `<data>/work`.
    pub(crate) fn work_dir(&self, prefix: &str) -> Result<PathBuf> {
        let d = self
            .paths
            .data_dir
            .join("work")
            .join(format!("{prefix}-{}", unix_nanos()));
        std::fs::create_dir_all(&d).at("creating", &d)?;
        Ok(d)
    }
}

pub(crate) fn unix_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
