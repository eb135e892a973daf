//! Pre-copy, source side: one round of CRIU's pre-dump while the VPS runs
//! (see [`crate::criu::pre_dump`]). The migration engine decides how many.

use std::path::Path;

use super::start::{blocking, criu_log_level};
use super::Agent;
use crate::criu::pre_dump::PreDumpRequest;
use crate::error::{AgentError, IoContext, Result};

impl Agent {
    /// Copies the memory of the running VPS `name` into `images`: all of it
    /// the first time, then (with `parent`, relative to `images`) what
    /// changed since that round. The VPS runs on whatever happens.
    pub(super) async fn pre_dump(
        &self,
        name: &str,
        images: &Path,
        parent: Option<String>,
    ) -> Result<()> {
        let _g = self.lock_for(name).lock_owned().await;
        let pid = self.running_init(name, "can be pre-copied")?;
        let criu = self.criu_path()?;
        std::fs::create_dir_all(images).at("creating", images)?;
        let images = images.to_path_buf();
        let cgroup_yard = self.criu_yard();
        blocking(move || {
            crate::criu::pre_dump::pre_dump(
                &criu,
                &PreDumpRequest {
                    pid,
                    images: &images,
                    parent,
                    log_level: criu_log_level(),
                    cgroup_yard,
                },
            )
            .map_err(|e| AgentError::FailedPrecondition(e.to_string()))
        })
        .await
    }
}
