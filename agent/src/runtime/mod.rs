//! Running a VPS: the per-VPS monitor process, the clone of the VPS init into
//! its namespaces, and entering a running VPS for `exec`.
//!
//! The agent never parents a VPS itself. For each running VPS it starts a
//! monitor (the agent binary re-executed as `ferry-agent monitor`), in its own
//! session, that clones init into new pid, mount, uts, ipc and cgroup
//! namespaces (net: a prepared namespace) and waits for it. The monitor keeps
//! the exit status, restarts init when the VPS reboots, and writes console output
//! to a bounded log. Killing the agent, even with SIGKILL, touches no VPS; a
//! restarted agent reads each VPS's `state.json` and finds it again.
//!
//! An unprivileged VPS's init is started in two steps (like runc's nsexec):
//! a first child joins the VPS's cgroups as host root, enters the VPS's user
//! namespace and netns, makes the rest of its namespaces (owned by that user
//! namespace) and forks init, the new pid namespace's first process; the
//! monitor, a child subreaper, inherits init when that child exits.

pub mod console;
pub mod enter;
mod launch;
pub mod monitor;
mod resume;
mod rootfs;
pub mod security;

pub use launch::cloexec_from;
pub use resume::{RestoreConfig, RESTORE_FILE};
pub use rootfs::HOST_DEVICES;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Everything the monitor needs to (re)start a VPS's init; written by the agent
/// as `launch.json` in the VPS's run dir.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchConfig {
    pub name: String,
    pub rootfs: PathBuf,
    pub hostname: String,
    pub init: Vec<String>,
    /// Bound netns file to join; None = a fresh, empty netns with only lo.
    pub netns: Option<PathBuf>,
    /// Bound user namespace file to join (an unprivileged VPS; its netns is
    /// owned by it); None = a privileged VPS.
    #[serde(default)]
    pub userns: Option<PathBuf>,
    pub cgroup_procs: Vec<PathBuf>,
    /// Host-side veth of this run (the agent removes it at teardown).
    pub host_veth: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    #[default]
    Starting,
    Running,
    Stopped,
}

/// What the monitor reports in `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct RuntimeState {
    pub phase: Phase,
    pub monitor_pid: i32,
    pub monitor_start: u64,
    pub init_pid: i32,
    pub init_start: u64,
    pub started_unix: i64,
    pub reboots: u32,
    /// "poweroff", "stopped", "exited", "killed", "reboot-loop", "failed" or "".
    pub stop_reason: String,
    pub exit_code: i32,
    pub exit_signal: i32,
    pub error: String,
    /// OOM kills of the run that ended (kept by the agent when it drops the cgroup).
    #[serde(default)]
    pub oom_kills: u64,
}

pub const LAUNCH_FILE: &str = "launch.json";
pub const STATE_FILE: &str = "state.json";
pub const CONSOLE_FILE: &str = "console.log";
pub const STOP_MARKER: &str = "stop";
/// Written by the agent before a CRIU dump that ends the VPS: init's SIGKILL
/// then means "checkpointed", not "killed".
pub const CHECKPOINT_MARKER: &str = "checkpoint";

impl RuntimeState {
    pub fn read(run_dir: &Path) -> Option<RuntimeState> {
        let text = std::fs::read(run_dir.join(STATE_FILE)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn write(&self, run_dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        write_atomic(&run_dir.join(STATE_FILE), &json)
    }

    /// Is the VPS's init still the process we started? (Guards against pid reuse.)
    pub fn init_alive(&self) -> bool {
        self.init_pid > 0 && process_start_time(self.init_pid) == Some(self.init_start)
    }

    pub fn monitor_alive(&self) -> bool {
        self.monitor_pid > 0 && process_start_time(self.monitor_pid) == Some(self.monitor_start)
    }
}

/// Writes through a temporary file and a rename, so a reader never sees half.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

/// Field 22 of /proc/PID/stat: start time in clock ticks since boot. Together
/// with the pid it names one process for the life of the boot.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    // rest starts at field 3 (state); field 22 is index 19 here.
    let start = rest.split(' ').nth(19)?.parse().ok()?;
    // A zombie has exited already.
    if rest.starts_with('Z') {
        return None;
    }
    Some(start)
}

#[cfg(test)]
mod tests {
    #[test]
    fn start_time_of_self_is_stable_and_of_nonsense_is_none() {
        let me = std::process::id() as i32;
        let a = super::process_start_time(me);
        assert!(a.is_some());
        assert_eq!(a, super::process_start_time(me));
        assert_eq!(super::process_start_time(i32::MAX), None);
    }
}
