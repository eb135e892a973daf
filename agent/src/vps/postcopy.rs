//! Post-copy, source side: a lazy dump whose page server this node runs
//! until the target has every page.
//!
//! The dump leaves the tasks *stopped*, not ended (`leave_stopped`): CRIU
//! would otherwise end them as soon as the last page left, even before the
//! migration's decision, and a rollback would have nothing to resume. So:
//! - committed: the target runs the VPS; once every page has gone, the
//!   stopped tasks here are ended with the rest of the source copy;
//! - rolled back: the page transfer is cut (the target drops its copy, and
//!   the server is poked so it stops waiting), then the tasks here are let
//!   run again and the network lock CRIU left in the VPS's netns is removed.

use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::criu::dump::{DumpFacts, DumpRequest, LazyDump, LazyEvent, SeizeProbe};
use crate::error::{AgentError, IoContext, Result};
use crate::runtime::CHECKPOINT_MARKER;

use super::start::{blocking, criu_log_level};
use super::Agent;

/// How long the dump may take to reach its page server.
const SERVE_WAIT: Duration = Duration::from_secs(60);

/// A post-copy dump in progress.
pub(super) struct LazyRun {
    /// Where the page server listens (loopback ADDR:PORT).
    pub page_server: String,
    /// Ends when every page was served (Ok) or the transfer failed.
    pub done: tokio::task::JoinHandle<Result<DumpFacts>>,
    /// The page tunnel's serving end, which the target dials (see
    /// [`crate::criu::tunnel`]).
    pub tunnel: Option<crate::criu::tunnel::Tunnel>,
}

impl Agent {
    /// Freezes and dumps a running VPS without its memory, and returns once
    /// the page server listens. The caller holds the VPS's lock.
    pub(super) async fn dump_lazy_locked(
        &self,
        name: &str,
        images: &Path,
        probe: SeizeProbe,
    ) -> Result<(String, LazyRun)> {
        let pid = self.running_init(name, "can move by post-copy")?;
        let criu = self.criu_path()?;
        crate::criu::lazy::ensure_pipe_max_size()
            .map_err(|e| AgentError::FailedPrecondition(e.to_string()))?;
        let addr = crate::criu::tunnel::PAGE_SERVER_IP;
        let port = crate::criu::lazy::free_port(addr)
            .map_err(|e| AgentError::FailedPrecondition(e.to_string()))?;
        std::fs::create_dir_all(images).at("creating", images)?;
        // The tunnel's serving end starts before the freeze (a process
        // start, off the downtime); it connects to the page server only once
        // the target dials, which is after the page server listens.
        let tunnel = {
            let exe = self.cfg.self_exe.clone();
            let creds = self.cfg.credentials.clone();
            let listen = self.tunnel_ip;
            let at = std::net::SocketAddr::from((addr, port));
            let log = crate::criu::tunnel::log_in(images);
            blocking(move || {
                crate::criu::tunnel::start_serve(&exe, listen, at, creds.as_deref(), &log)
                    .map_err(|e| AgentError::FailedPrecondition(e.to_string()))
            })
            .await?
        };
        let how = if self.cfg.credentials.is_some() {
            "mutual TLS"
        } else {
            "plaintext (--insecure-dev)"
        };
        tracing::info!(vps = %name, tunnel = %tunnel.address, "page tunnel listening, {how}");
        let console_key = crate::criu::dump::console_key(pid);
        let (tx, rx) = std::sync::mpsc::channel();
        let images_owned = images.to_path_buf();
        let address = addr.to_string();
        let cgroup_yard = self.criu_yard();
        let lock_link = self.host_veth(name);
        // Expedited until the page server runs (the window of the freeze
        // that is this node's; the target's restore has its own).
        let _window = self.freeze_window();
        let mut done = tokio::spawn(blocking(move || {
            crate::criu::dump::dump(
                &criu,
                &DumpRequest {
                    pid,
                    images: &images_owned,
                    leave_running: false,
                    leave_stopped: true,
                    log_level: criu_log_level(),
                    lazy: Some(LazyDump {
                        address,
                        port,
                        events: tx,
                    }),
                    probe: Some(probe),
                    cgroup_yard,
                    lock_link,
                    parent: None,
                },
            )
            .map_err(|e| AgentError::FailedPrecondition(e.to_string()))
        }));
        // Dumped, then listening (seen in /proc/net/tcp: connecting would
        // take the server's one connection).
        let end = Instant::now() + SERVE_WAIT;
        let mut dumped = false;
        loop {
            if !dumped && rx.try_recv() == Ok(LazyEvent::Dumped) {
                dumped = true;
            }
            if dumped && crate::criu::lazy::listening(port) {
                break;
            }
            if done.is_finished() {
                return match (&mut done).await {
                    Ok(Err(e)) => Err(e),
                    _ => Err(AgentError::Internal(
                        "the lazy dump ended before it served any page".into(),
                    )),
                };
            }
            if Instant::now() > end {
                return Err(AgentError::Internal(
                    "the lazy dump did not start its page server in time".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let run = LazyRun {
            page_server: format!("{addr}:{port}"),
            done,
            tunnel: Some(tunnel),
        };
        Ok((console_key, run))
    }

    /// Rollback of a post-copy dump: stops the page transfer, lets the
    /// stopped tasks run and removes CRIU's network lock.
    pub(super) async fn thaw_lazy(&self, name: &str, run: LazyRun) -> Result<()> {
        // The tunnel first: then the page server sees its peer go.
        drop(run.tunnel);
        self.cut_transfer(&run.page_server);
        let res = tokio::time::timeout(Duration::from_secs(30), run.done).await;
        match &res {
            Ok(Ok(Ok(_))) => {
                tracing::warn!(vps = %name, "the page transfer had finished before the rollback; the tasks are stopped, not gone")
            }
            Ok(Ok(Err(e))) => {
                tracing::info!(vps = %name, error = %e, "page transfer cut for the rollback")
            }
            _ => tracing::warn!(vps = %name, "the lazy dump did not end in time"),
        }
        self.thaw_stopped(name).await
    }

    /// Lets a VPS whose tasks a post-copy dump left stopped run again: its
    /// network lock removed, its TCP sockets out of repair mode.
    pub(super) async fn thaw_stopped(&self, name: &str) -> Result<()> {
        self.unlock_link(name)?;
        let pids = self.cgroup(name).pids();
        let n = blocking({
            let pids = pids.clone();
            move || Ok(tcp_repair_off(&pids))
        })
        .await?;
        tracing::info!(vps = %name, sockets = n, "TCP connections out of repair mode");
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
        let _ = std::fs::remove_file(self.paths.vps_run(name).join(CHECKPOINT_MARKER));
        Ok(())
    }
}

impl Agent {
    /// Brings the VPS's host link back up: after a dump took it down (its
    /// network lock), or once a held restore may run.
    pub(super) fn unlock_link(&self, name: &str) -> Result<()> {
        match self.host_veth(name) {
            Some(link) => crate::net::lock::set_link(&link, true)
                .map_err(|e| AgentError::io(format!("bringing {link} up again"), e)),
            None => Ok(()),
        }
    }

    /// The target dropped its daemon already; a page server still waiting for
    /// it gives up on a connection that closes at once.
    pub(super) fn cut_transfer(&self, page_server: &str) {
        if let Ok(a) = page_server.parse::<std::net::SocketAddr>() {
            if let Ok(s) = std::net::TcpStream::connect_timeout(&a, Duration::from_millis(200)) {
                drop(s);
            }
        }
    }

    /// Recovery of a post-copy whose source agent died: waits for the dead
    /// agent's CRIU to let go of the tasks (the target dropped its copy, so
    /// the transfer fails), then thaws them.
    pub(super) async fn recover_lazy_stay(&self, name: &str, init_pid: i32) -> Result<()> {
        let end = Instant::now() + SERVE_WAIT;
        while traced(init_pid) {
            if Instant::now() > end {
                return Err(AgentError::Internal(format!(
                    "the tasks of VPS {name} are still held by a CRIU of the dead agent"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // That CRIU has let go of the tasks; it must not linger either.
        end_orphan_dump(init_pid);
        self.thaw_stopped(name).await
    }
}

/// Kills a dead agent's CRIU still serving the dump of `init_pid` (CRIU
/// names itself `criu: dump --rpc -t PID`).
fn end_orphan_dump(init_pid: i32) {
    let want = format!("dump --rpc -t {init_pid} ");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.starts_with("criu: ") && cmd.contains(&want) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Whether a process is ptrace-attached (CRIU holds dumped tasks so).
fn traced(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("TracerPid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .is_some_and(|v| v != "0")
}

/// Linux's TCP_REPAIR socket option (linux/tcp.h).
const TCP_REPAIR: libc::c_int = 19;

/// Takes every TCP socket of `pids` out of repair mode, where CRIU's dump put
/// them (it would take them out when it unlocks the network, which a failed
/// lazy transfer skips): each socket is borrowed with pidfd_getfd and
/// switched back, which also sends a window probe so the peer resumes at
/// once. Returns how many it switched.
fn tcp_repair_off(pids: &[i32]) -> usize {
    let mut n = 0;
    for &pid in pids {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
        if pidfd < 0 {
            continue;
        }
        // SAFETY: `pidfd` is a fresh descriptor owned here alone.
        let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd) };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let is_socket = std::fs::read_link(fd.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
            let Some(num) = fd.file_name().to_str().and_then(|f| f.parse::<i32>().ok()) else {
                continue;
            };
            if !is_socket {
                continue;
            }
            // SAFETY: pidfd_getfd duplicates the task's descriptor `num` into
            // this process; the result is checked and owned below.
            let mine =
                unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), num, 0) } as i32;
            if mine < 0 {
                continue;
            }
            // SAFETY: a fresh descriptor owned here alone.
            let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(mine) };
            let tcp = nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::SockType)
                .is_ok_and(|t| t == nix::sys::socket::SockType::Stream)
                && nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(
                    sock.as_raw_fd(),
                )
                .is_ok_and(|a| a.as_sockaddr_in().is_some() || a.as_sockaddr_in6().is_some());
            if !tcp {
                continue;
            }
            let off: libc::c_int = 0;
            // SAFETY: setsockopt with a valid fd and a c_int option value.
            let r = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    TCP_REPAIR,
                    (&off as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            if r == 0 {
                n += 1;
            }
        }
    }
    n
}
