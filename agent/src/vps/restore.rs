//! Restore from a checkpoint archive: the VPS's files go back to the
//! checkpoint's, and its processes come back from the CRIU images with their
//! memory, open files and connections.

use std::path::Path;
use std::sync::Arc;

use super::checkpoint::CheckpointMeta;
use super::start::{blocking, Resume};
use super::Agent;
use crate::error::{AgentError, IoContext, Result};

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
        let (images, upper) = (dir.join("images"), dir.join("upper"));
        let (a, i2, u2) = (archive.to_path_buf(), images.clone(), upper.clone());
        let meta = blocking(move || {
            ferry_migrate::archive::unpack(&a, |area| match area {
                "images" => Some(i2.clone()),
                "rootfs" => Some(u2.clone()),
                _ => None,
            })
            .map_err(|e| AgentError::BadArchive(e.to_string()))
        })
        .await?;
        let meta: CheckpointMeta = serde_json::from_slice(&meta)
            .map_err(|e| AgentError::BadArchive(format!("metadata: {e}")))?;
        if meta.config.name != name || meta.config.template != rec.config.template {
            return Err(AgentError::invalid(
                "name",
                format!(
                    "the archive holds VPS {:?} (template {:?}), not {name:?} (template {:?})",
                    meta.config.name, meta.config.template, rec.config.template
                ),
            ));
        }
        self.teardown(&name).await?;
        // Swap the VPS's files for the checkpoint's; keep the old ones until
        // the restore worked.
        let vdir = self.paths.vps(&name);
        let old = dir.join("old-upper");
        std::fs::rename(vdir.join("upper"), &old).at("moving aside", vdir.join("upper"))?;
        std::fs::rename(&upper, vdir.join("upper")).at("installing", vdir.join("upper"))?;
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
                let _ = std::fs::remove_dir_all(vdir.join("upper"));
                let _ = std::fs::rename(&old, vdir.join("upper"));
                Err(e)
            }
        }
    }
}
