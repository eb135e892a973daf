//! The monitor's other way to bring up init: restore a dumped tree with CRIU
//! (a local restore, or the target side of a migration). The restored init
//! becomes the monitor's child exactly like a cloned one, so everything after
//! (console, reboot, exit status) is the same.

use std::io::{BufRead, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;

use nix::fcntl::OFlag;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::launch::Launched;
use crate::criu::restore::RestoreRequest;

/// Written by the agent as `restore.json` when this run starts from images.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreConfig {
    pub criu: PathBuf,
    pub request: RestoreRequest,
    /// Stop at CRIU's `post-restore` (tree rebuilt, network still locked,
    /// nothing has run yet), say `held` to the agent and wait for `go`. Anything
    /// else, or the agent going away, makes CRIU kill the restored tree.
    pub hold: bool,
}

pub const RESTORE_FILE: &str = "restore.json";

pub fn restore(cfg: &RestoreConfig) -> Result<Launched, String> {
    // An unprivileged VPS's tasks make their userfaultfd in their own user
    // namespace (see crate::criu::uffd_grant).
    let _uffd = match (cfg.request.lazy, &cfg.request.userns) {
        (true, Some(_)) => Some(crate::criu::uffd_grant::grant()?),
        _ => None,
    };
    let (con_r, con_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let pid = crate::criu::restore::restore(&cfg.criu, &cfg.request, con_w.as_fd(), |action| {
        if action == "post-restore" && cfg.hold {
            return wait_for_go();
        }
        true
    })
    .map_err(|e| e.to_string())?;
    drop(con_w);
    Ok(Launched {
        pid: Pid::from_raw(pid),
        console: con_r,
    })
}

/// Tells the agent the tree is ready and waits for its decision on stdin.
fn wait_for_go() -> bool {
    let mut out = std::io::stdout();
    if writeln!(out, "held").and_then(|_| out.flush()).is_err() {
        return false;
    }
    let mut line = String::new();
    match std::io::stdin().lock().read_line(&mut line) {
        Ok(n) if n > 0 => line.trim() == "go",
        _ => false,
    }
}
