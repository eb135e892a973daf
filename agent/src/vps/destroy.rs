//! Destroy: the VPS's files, runtime state and every kernel object go.

use std::time::Duration;

use super::Agent;
use crate::error::{AgentError, Result};

impl Agent {
    #[tracing::instrument(skip(self))]
    pub async fn destroy(&self, name: &str, force: bool) -> Result<()> {
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        self.record(name)?;
        self.refuse_arriving(name)?;
        if self.status(name).is_running() {
            if !force {
                return Err(AgentError::FailedPrecondition(format!(
                    "VPS {name} is running; stop it first or destroy with force"
                )));
            }
            // Forced: the VPS is going away, its shutdown scripts need not run.
            self.stop_locked(name, Duration::ZERO, true).await?;
        }
        self.teardown(name).await?;
        crate::template::remove_tree(&self.paths.vps_run(name))?;
        super::disk::unmount(&self.paths.vps(name))?;
        crate::template::remove_tree(&self.paths.vps(name))?;
        tracing::info!("destroyed");
        Ok(())
    }
}
