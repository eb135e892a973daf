//! Restore from a checkpoint archive: the VPS's files go back to the
//! checkpoint's, and its processes come back from the CRIU images with their
//! memory, open files and connections. All or nothing: the archive is checked
//! whole before anything is written, unpacked into staging, and swapped in.

use std::path::Path;
use std::sync::Arc;

use super::checkpoint::CheckpointMeta;
use super::start::{blocking, Resume};
use super::Agent;
use crate::error::{AgentError, Result};

impl Agent {
    #[tracing::instrument(skip(self, archive))]
    pub async fn restore_archive(self: &Arc<Self>, name: &str, archive: &Path) -> Result<()> {
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        let rec = self.record(name)?;
        if self.status(name).is_running() {
            return Err(AgentError::FailedPrecondition(format!(
                "VPS {name} is running; stop it before restoring a checkpoint into it"
            )));
        }
        self.criu
            .usable()
            .map_err(|e| AgentError::FailedPrecondition(e.to_string()))?;
        let dir = self.work_dir(&format!("restore-{name}"))?;
        let res = self.restore_in(&rec, archive, &dir).await;
        crate::criu::clear_leftover_mounts(&dir.join("images"));
        let _ = std::fs::remove_dir_all(&dir);
        res
    }

    async fn restore_in(
        self: &Arc<Self>,
        rec: &super::VpsRecord,
        archive: &Path,
        dir: &Path,
    ) -> Result<()> {
        let name = rec.config.name.clone();
        let vdir = self.paths.vps(&name);
        let images = dir.join("images");
        let upper = if super::disk::has_disk(&vdir) {
            let u = vdir.join(super::disk::MOUNT).join("restore-upper");
            let _ = crate::template::remove_tree(&u);
            u
        } else {
            dir.join("upper")
        };
        let res = self.restore_from(rec, archive, &images, &upper).await;
        // The old files (or the unused checkpoint's) go.
        let _ = crate::template::remove_tree(&upper);
        res
    }

    async fn restore_from(
        self: &Arc<Self>,
        rec: &super::VpsRecord,
        archive: &Path,
        images: &Path,
        upper: &Path,
    ) -> Result<()> {
        let name = rec.config.name.clone();
        let (images, upper) = (images.to_path_buf(), upper.to_path_buf());
        // The archive is hostile until proven otherwise: checked whole, its
        // metadata checked against this VPS, and only then unpacked, into
        // staging beside the VPS, every path beneath its area's root.
        let (a, i2, u2) = (archive.to_path_buf(), images.clone(), upper.clone());
        let limits = ferry_migrate::tree::apply::Limits::bytes(self.upload_room().0);
        let want = (name.clone(), rec.config.template.clone());
        let meta = blocking(move || {
            let bad = |e: ferry_migrate::archive::ArchiveError| match e {
                ferry_migrate::archive::ArchiveError::Tree(
                    ferry_migrate::tree::TreeError::TooLarge(m),
                ) => AgentError::ResourceExhausted(format!("archive rejected: {m}")),
                e => AgentError::BadArchive(e.to_string()),
            };
            let v = ferry_migrate::archive::open(&a).map_err(bad)?;
            let meta: CheckpointMeta = serde_json::from_slice(v.meta())
                .map_err(|e| AgentError::BadArchive(format!("metadata: {e}")))?;
            if meta.config.name != want.0 || meta.config.template != want.1 {
                return Err(AgentError::invalid(
                    "name",
                    format!(
                        "the archive holds VPS {:?} (template {:?}), not {:?} (template {:?})",
                        meta.config.name, meta.config.template, want.0, want.1
                    ),
                ));
            }
            v.unpack(
                |area| match area {
                    "images" => Some(i2.clone()),
                    "rootfs" => Some(u2.clone()),
                    _ => None,
                },
                &["images", "rootfs"],
                limits,
            )
            .map_err(bad)?;
            Ok(meta)
        })
        .await?;
        self.teardown(&name).await?;
        // One atomic exchange: the VPS's dir holds either its old files or
        // the checkpoint's, never neither; the old ones wait in `upper`
        // until the restore worked.
        let mine = super::disk::upper(&self.paths.vps(&name));
        exchange(&upper, &mine)?;
        let resume = Resume {
            images,
            console_key: meta.facts.console_key.clone(),
            hold: false,
            lazy: false,
        };
        match self.bring_up(rec, Some(&resume)).await {
            Ok(_) => {
                self.watch(&name);
                tracing::info!("restored from checkpoint");
                Ok(())
            }
            Err(e) => {
                if let Err(e2) = self.teardown(&name).await {
                    tracing::error!(error = %e2, "cleanup after failed restore");
                }
                if let Err(e2) = exchange(&upper, &mine) {
                    // Keep the old files where they are rather than lose them.
                    let keep = self
                        .paths
                        .vps(&name)
                        .join(format!("upper-before-restore-{}", super::now_unix()));
                    let _ = std::fs::rename(&upper, &keep);
                    tracing::error!(error = %e2, kept = %keep.display(), "could not put the VPS's files back after a failed restore");
                }
                Err(e)
            }
        }
    }
}

/// Swaps two directories in one step (`renameat2(RENAME_EXCHANGE)`).
fn exchange(a: &Path, b: &Path) -> Result<()> {
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        a,
        nix::fcntl::AT_FDCWD,
        b,
        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
    )
    .map_err(|e| {
        AgentError::io(
            format!("swapping {} and {}", a.display(), b.display()),
            e.into(),
        )
    })
}
