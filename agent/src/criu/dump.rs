//! Dumping a running VPS: its whole process tree, rooted at the VPS's init.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::rpc::{CgMode, NetworkLock, Opts, Req, ReqType};
use super::swrk::Swrk;
use super::{log_tail, CriuError};

/// The key under which the VPS's network namespace is declared external. The
/// namespace itself is not dumped: the agent keeps (or, on another node,
/// recreates) it with the VPS's address and MAC, and CRIU restores the
/// processes and their sockets into it.
pub const NETNS_KEY: &str = "ferry-netns";

pub const DUMP_LOG: &str = "dump.log";

/// What a restore needs to know about the dumped tree beyond the images.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DumpFacts {
    /// The console pipe init writes to, as CRIU names it (`pipe:[INODE]`); the
    /// restore hands in a fresh pipe under this key.
    pub console_key: String,
}

pub struct DumpRequest<'a> {
    /// Host pid of the VPS's init.
    pub pid: i32,
    pub images: &'a Path,
    /// Keep the VPS running after the dump (a snapshot) instead of ending it.
    pub leave_running: bool,
    /// Leave the tasks stopped (SIGSTOP) after the dump instead of ending
    /// them (post-copy: a rollback must be able to let them run again).
    pub leave_stopped: bool,
    /// 0 = errors only .. 4 = debug.
    pub log_level: i32,
    /// Post-copy: leave anonymous memory out of the images and serve it
    /// from a page server on this address once the rest is dumped.
    pub lazy: Option<LazyDump>,
}

/// A post-copy dump's page server and what it reports while it runs.
pub struct LazyDump {
    pub address: String,
    pub port: u16,
    pub events: std::sync::mpsc::Sender<LazyEvent>,
}

/// The steps of a post-copy dump, in order. The tasks stay frozen until every
/// page has been served (then they end), or until the page transfer fails
/// (then CRIU lets them run again, with the network still locked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LazyEvent {
    /// Everything but the lazy memory is in the images.
    Dumped,
    /// The page server listens: the target can start fetching.
    Serving,
}

/// The console pipe of init `pid` as CRIU names it (`pipe:[INODE]`), or "".
pub fn console_key(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/1"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub fn dump(criu: &Path, req: &DumpRequest<'_>) -> Result<DumpFacts, CriuError> {
    let netns = std::fs::metadata(format!("/proc/{}/ns/net", req.pid))
        .map_err(|e| CriuError::Failed {
            op: "dump",
            msg: format!("VPS init {} is gone ({e})", req.pid),
        })?
        .ino();
    let console_key = console_key(req.pid);
    let dir = nix::fcntl::open(
        req.images,
        OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| CriuError::Failed {
        op: "dump",
        msg: format!("opening {}: {e}", req.images.display()),
    })?;
    let opts = Opts {
        images_dir_fd: dir.as_raw_fd(),
        pid: Some(req.pid),
        leave_running: Some(req.leave_running),
        leave_stopped: req.leave_stopped.then_some(true),
        // Established TCP connections are dumped in repair mode and survive.
        tcp_established: Some(true),
        // A connection still in a listening socket's accept queue (the
        // handshake done, not yet accepted) cannot be dumped; without this a
        // busy server could never be checkpointed. Its client sees the
        // connection reset and reconnects; accepted ones move intact.
        tcp_skip_in_flight: Some(true),
        // flock/posix locks held inside the VPS are part of its state.
        file_locks: Some(true),
        log_level: Some(req.log_level),
        log_file: Some(DUMP_LOG.into()),
        // Record each task's cgroup; "soft": never fight the agent over limits.
        manage_cgroups: Some(true),
        manage_cgroups_mode: Some(CgMode::Soft as i32),
        // iptables is not installed on Ferry nodes; nftables is.
        network_lock: Some(NetworkLock::Nftables as i32),
        external: vec![format!("net[{netns}]:{NETNS_KEY}")],
        lazy_pages: req.lazy.as_ref().map(|_| true),
        ps: req.lazy.as_ref().map(|l| super::rpc::PageServerInfo {
            address: Some(l.address.clone()),
            port: Some(l.port as i32),
            pid: None,
            fd: None,
        }),
        notify_scripts: req.lazy.as_ref().map(|_| true),
        ..Opts::default()
    };
    let mut w = Swrk::spawn(criu, &[])?;
    let resp = w.call(
        &Req {
            r#type: ReqType::Dump as i32,
            opts: Some(opts),
            ..Default::default()
        },
        |action| {
            if let Some(l) = &req.lazy {
                let ev = match action {
                    "post-dump" => Some(LazyEvent::Dumped),
                    "status-ready" => Some(LazyEvent::Serving),
                    _ => None,
                };
                if let Some(ev) = ev {
                    let _ = l.events.send(ev);
                }
            }
            true
        },
    )?;
    if !resp.success {
        return Err(CriuError::Failed {
            op: "dump",
            msg: format!(
                "{}{}",
                resp.cr_errmsg
                    .filter(|m| !m.contains("RLIMIT_NOFILE"))
                    .map(|m| format!("{m}: "))
                    .unwrap_or_default(),
                log_tail(&req.images.join(DUMP_LOG))
            ),
        });
    }
    Ok(DumpFacts { console_key })
}
