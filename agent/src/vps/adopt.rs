//! Agent start-up: find the VPSes an earlier agent left running, release what
//! stopped ones still hold, and after a host reboot start the autostart ones.
//! A background loop keeps releasing VPSes that stop on their own (poweroff).

use std::sync::Arc;
use std::time::Duration;

use super::{Agent, Status};
use crate::error::Result;

const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

impl Agent {
    pub(super) async fn adopt(&self) -> Result<()> {
        let marker = self.paths.run_dir.join("boot_id");
        let boot = std::fs::read_to_string(BOOT_ID).unwrap_or_default();
        // The run dir lives on /run, which a reboot empties: no marker (or another
        // boot's) means this is the first agent start since the host booted.
        let first_since_boot =
            std::fs::read_to_string(&marker).ok().as_deref() != Some(boot.as_str());
        for rec in self.records() {
            let name = rec.config.name.clone();
            match self.status(&name) {
                Status::Running(s) | Status::Stopping(s) => {
                    tracing::info!(vps = %name, init_pid = s.init_pid, "adopted running VPS");
                }
                Status::Stopped(_) => {
                    if let Err(e) = self.teardown(&name).await {
                        tracing::warn!(vps = %name, error = %e, "releasing a stopped VPS");
                    }
                    if first_since_boot && rec.config.autostart {
                        match self.start(&name).await {
                            Ok(()) => tracing::info!(vps = %name, "autostarted"),
                            Err(e) => tracing::error!(vps = %name, error = %e, "autostart failed"),
                        }
                    }
                }
            }
        }
        let _ = std::fs::write(&marker, &boot);
        Ok(())
    }

    /// Releases the kernel objects of VPSes that stopped by themselves.
    pub fn spawn_reaper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let agent = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                for rec in agent.records() {
                    let name = rec.config.name;
                    if agent.status(&name).is_running() || !agent.holds_resources(&name) {
                        continue;
                    }
                    let lock = agent.lock_for(&name);
                    let Ok(_g) = lock.try_lock() else { continue };
                    if let Err(e) = agent.teardown(&name).await {
                        tracing::warn!(vps = %name, error = %e, "releasing a stopped VPS");
                    }
                }
            }
        })
    }

    fn holds_resources(&self, name: &str) -> bool {
        self.paths
            .vps_run(name)
            .join(crate::runtime::LAUNCH_FILE)
            .exists()
            || self.paths.vps_run(name).join("netns").exists()
            || self.cgroup(name).exists()
    }
}
