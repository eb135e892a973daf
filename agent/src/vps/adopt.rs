//! Agent start-up: find the VPSes an earlier agent left running, release what
//! stopped ones still hold, and after a host reboot start the autostart ones.
//!
//! VPSes that stop on their own (poweroff, init exiting) are released when their
//! monitor exits: each running VPS has a watch on its monitor's pidfd, which
//! works for monitors of an earlier agent too (they are not our children). A
//! slow sweep catches anything a watch could not see.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use super::{Agent, Status};
use crate::error::Result;

const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

impl Agent {
    pub(super) async fn adopt(self: &Arc<Self>) -> Result<()> {
        let marker = self.paths.run_dir.join("boot_id");
        let boot = std::fs::read_to_string(BOOT_ID).unwrap_or_default();
        // The run dir lives on /run, which a reboot empties: no marker (or another
        // boot's) means this is the first agent start since the host booted.
        let first_since_boot =
            std::fs::read_to_string(&marker).ok().as_deref() != Some(boot.as_str());
        for rec in self.records() {
            let name = rec.config.name.clone();
            if let Err(e) = super::disk::mount(&self.paths.vps(&name), rec.config.id_base) {
                tracing::error!(vps = %name, error = %e, "cannot mount the VPS's disk");
            }
            match self.status(&name) {
                Status::Running(s) | Status::Stopping(s) => {
                    tracing::info!(vps = %name, init_pid = s.init_pid, "adopted running VPS");
                    self.watch(&name);
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

    /// Watches the VPS's monitor (or, if it is gone, its init) and releases the
    /// VPS's kernel objects when it ends and the VPS is not running any more.
    pub(crate) fn watch(self: &Arc<Self>, name: &str) {
        let Some(st) = crate::runtime::RuntimeState::read(&self.paths.vps_run(name)) else {
            return;
        };
        let pid = if st.monitor_alive() {
            st.monitor_pid
        } else {
            st.init_pid
        };
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if raw < 0 {
            return; // Already gone: the sweep releases it.
        }
        // SAFETY: a fresh descriptor from pidfd_open, owned from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        // SAFETY: `fd` is an open pidfd owned by the AsyncFd for its whole life;
        // its raw descriptor never changes.
        let Ok(afd) = (unsafe { AsyncFd::register(fd) }) else {
            return;
        };
        let agent = Arc::clone(self);
        let name = name.to_string();
        tokio::spawn(async move {
            // A pidfd turns readable when its process exits.
            let _ = afd.readable().await;
            agent.release_if_stopped(&name).await;
        });
    }

    async fn release_if_stopped(&self, name: &str) {
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        // A VPS moving is its migration's: an arrival held mid-restore (CRIU
        // waiting for the go, init not reported running yet) reads as
        // stopped, and tearing it down SIGKILLed its restored tree, which
        // hung CRIU and failed a committed move.
        if self.arriving(name)
            || self.migrating_id(name).is_some()
            || self.status(name).is_running()
            || !self.holds_resources(name)
        {
            return;
        }
        if let Err(e) = self.teardown(name).await {
            tracing::warn!(vps = %name, error = %e, "releasing a stopped VPS");
        }
    }

    /// The safety net behind the watches: every `every`, releases what a
    /// stopped VPS still holds.
    pub fn spawn_reaper(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let agent = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let names: Vec<String> = std::fs::read_dir(&agent.paths.run_dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .collect();
                for name in names {
                    if agent.holds_resources(&name) && !agent.status(&name).is_running() {
                        agent.release_if_stopped(&name).await;
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
