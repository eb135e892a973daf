//! Post-copy (lazy pages) plumbing around CRIU.
//!
//! The source dumps everything but the VPS's anonymous memory, then serves
//! that memory from a page server (see [`super::dump::LazyDump`]); its tasks
//! stay frozen until every page has gone, then end. The target runs
//! `criu lazy-pages` (a command: there is no RPC request for it), which
//! fetches pages from that server on demand (userfaultfd) and in the
//! background, and restores with `lazy_pages` so the restored tasks hand their
//! userfaultfds to it. Until that daemon has every page, the VPS on the target
//! needs the source: this is the post-copy window.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::fcntl::OFlag;

use super::CriuError;

pub const LAZY_LOG: &str = "lazy-pages.log";
/// Where `--status-fd` lands in the daemon.
const STATUS_FD: RawFd = 3;
/// Where the daemon finds its page-server socket (`--ps-socket`).
const PS_FD: RawFd = 4;
/// CRIU splices whole page pipes; smaller pipes make the first page request
/// fail (`page-pipe: splice: Bad file descriptor`).
pub const PIPE_MAX_SIZE: u64 = 4 << 20;

/// Makes sure pipes can be as big as CRIU's page pipes (a host-wide sysctl,
/// raised only when lower).
pub fn ensure_pipe_max_size() -> Result<(), CriuError> {
    let p = "/proc/sys/fs/pipe-max-size";
    let cur: u64 = std::fs::read_to_string(p)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if cur >= PIPE_MAX_SIZE {
        return Ok(());
    }
    std::fs::write(p, PIPE_MAX_SIZE.to_string()).map_err(|e| {
        CriuError::Unavailable(format!(
            "post-copy needs fs.pipe-max-size >= {PIPE_MAX_SIZE} (it is {cur}) and raising it failed: {e}"
        ))
    })?;
    tracing::info!(
        from = cur,
        to = PIPE_MAX_SIZE,
        "raised fs.pipe-max-size for post-copy"
    );
    Ok(())
}

/// A free TCP port on `addr` for a page server (bound and released: CRIU
/// binds it again a moment later).
pub fn free_port(addr: std::net::Ipv4Addr) -> Result<u16, CriuError> {
    std::net::TcpListener::bind((addr, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| CriuError::Spawn(format!("finding a page-server port on {addr}: {e}")))
}

/// Whether something listens on TCP `port` in this network namespace
/// (without connecting: CRIU's lazy page server accepts one connection only).
pub fn listening(port: u16) -> bool {
    let want = format!("{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[3] == "0A" && f[1].rsplit(':').next().is_some_and(|p| p == want)
        })
}

/// The target's `criu lazy-pages` daemon. Dropped, it is killed (a restore
/// given up on); once the VPS runs on its pages, [`LazyDaemon::keep`] hands
/// the process over, and it then finishes even if the agent stops first: the
/// VPS would die on a page it never got.
pub struct LazyDaemon {
    child: Option<tokio::process::Child>,
}

impl LazyDaemon {
    /// The VPS runs on this daemon's pages: no longer killed when dropped.
    pub fn keep(mut self) -> Option<tokio::process::Child> {
        self.child.take()
    }
}

impl Drop for LazyDaemon {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
    }
}

/// Starts `criu lazy-pages` for the images in `dir`, fetching from the page
/// server at the other end of the connected socket `server`
/// (`--ps-socket`), or from the pages in `dir` itself when there is none,
/// and waits until it is ready for the restore.
pub async fn start_daemon(
    criu: &Path,
    dir: &Path,
    server: Option<OwnedFd>,
    log_level: i32,
) -> Result<LazyDaemon, CriuError> {
    let (rd, wr) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| CriuError::Spawn(format!("pipe: {e}")))?;
    let wr_raw = wr.as_raw_fd();
    let mut cmd = tokio::process::Command::new(criu);
    cmd.arg("lazy-pages");
    // Above both targets, so the first dup2 below cannot clobber it.
    let server = match server {
        Some(s) => Some(
            nix::fcntl::fcntl(&s, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))
                // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor we own.
                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
                .map_err(|e| CriuError::Spawn(format!("page-server socket: {e}")))?,
        ),
        None => None,
    };
    let ps_raw = server.as_ref().map(|s| s.as_raw_fd());
    if server.is_some() {
        cmd.arg("--page-server")
            .args(["--ps-socket", &PS_FD.to_string()]);
    }
    cmd.arg("-D")
        .arg(dir)
        .arg("-W")
        .arg(dir)
        .args(["-o", LAZY_LOG])
        .arg(format!("-v{log_level}"))
        .args(["--status-fd", &STATUS_FD.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: between fork and exec only dup2 runs, on a descriptor we own.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(wr_raw, STATUS_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // dup2 leaves the copy without FD_CLOEXEC: CRIU keeps it.
            if let Some(ps) = ps_raw {
                if libc::dup2(ps, PS_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| CriuError::Spawn(format!("{} lazy-pages: {e}", criu.display())))?;
    // Killed on every way out below but the last.
    let daemon = LazyDaemon { child: Some(child) };
    drop(wr);
    drop(server);
    let ready = tokio::task::spawn_blocking(move || wait_ready(rd, Duration::from_secs(20)))
        .await
        .map_err(|e| CriuError::Spawn(format!("waiting for lazy-pages: {e}")))?;
    if let Err(e) = ready {
        return Err(CriuError::Failed {
            op: "lazy-pages",
            msg: format!("{e}; {}", super::log_tail(&dir.join(LAZY_LOG))),
        });
    }
    Ok(daemon)
}

/// Waits for CRIU's status byte (or EOF: it died first).
fn wait_ready(rd: OwnedFd, timeout: Duration) -> Result<(), String> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let end = std::time::Instant::now() + timeout;
    loop {
        let left = end.saturating_duration_since(std::time::Instant::now());
        let ms = PollTimeout::try_from(left.as_millis() as i32).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(rd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(0) => return Err("not ready in time".into()),
            Ok(_) => break,
            // A signal for another thread of the agent (a child of another
            // migration ending) is no failure of this one.
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("poll: {e}")),
        }
    }
    let mut b = [0u8; 1];
    loop {
        return match nix::unistd::read(&rd, &mut b) {
            Ok(1) => Ok(()),
            Ok(_) => Err("exited before it was ready".into()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => Err(format!("reading its status: {e}")),
        };
    }
}
