//! The per-VPS monitor (`ferry-agent monitor RUN_DIR`): parent of the VPS's
//! init for as long as the VPS runs, independent of the agent.
//!
//! It reports the launch on stdout (`ok PID` or `err MESSAGE`, one line, read by
//! the agent's start), then keeps `state.json` current, writes the console log,
//! and on init's exit tells a reboot (init killed by SIGHUP, the kernel's word
//! for reboot(2) in a pid namespace) from a power-off (SIGINT) or a stop the
//! agent asked for (the `stop` marker file). A reboot starts init again.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::console::ConsoleLog;
use super::launch::launch;
use super::resume::{self, RestoreConfig, RESTORE_FILE};
use super::{
    process_start_time, security, LaunchConfig, Phase, RuntimeState, CHECKPOINT_MARKER,
    CONSOLE_FILE, LAUNCH_FILE, STOP_MARKER,
};

/// Reboots that come faster than this after a start count toward a loop.
const QUICK_REBOOT: Duration = Duration::from_secs(2);
const MAX_QUICK_REBOOTS: u32 = 5;

pub fn run(run_dir: &Path) -> i32 {
    // Own session: a signal to the agent's process group never reaches us.
    let _ = nix::unistd::setsid();
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let mut state = RuntimeState {
        monitor_pid: std::process::id() as i32,
        monitor_start: process_start_time(std::process::id() as i32).unwrap_or(0),
        ..Default::default()
    };
    let cfg: LaunchConfig = match std::fs::read(run_dir.join(LAUNCH_FILE))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => return fail_first(run_dir, &mut state, &format!("reading {LAUNCH_FILE}: {e}")),
    };
    let seccomp = match security::seccomp_program() {
        Ok(p) => p,
        Err(e) => {
            return fail_first(
                run_dir,
                &mut state,
                &format!("building seccomp filter: {e}"),
            )
        }
    };
    // A run that starts from a checkpoint: restore first, launch on reboots.
    let mut restore: Option<RestoreConfig> = match std::fs::read(run_dir.join(RESTORE_FILE)) {
        Ok(b) => match serde_json::from_slice(&b) {
            Ok(r) => Some(r),
            Err(e) => {
                return fail_first(run_dir, &mut state, &format!("reading {RESTORE_FILE}: {e}"))
            }
        },
        Err(_) => None,
    };
    let mut console = ConsoleLog::open(&run_dir.join(CONSOLE_FILE));
    let mut first = true;
    let mut quick_reboots = 0;
    loop {
        let attempt = match restore.take() {
            Some(r) => {
                let res = resume::restore(&r);
                let _ = std::fs::remove_file(run_dir.join(RESTORE_FILE));
                res
            }
            None => launch(&cfg, &seccomp),
        };
        let launched = match attempt {
            Ok(l) => l,
            Err(e) if first => return fail_first(run_dir, &mut state, &e),
            Err(e) => {
                console.write(format!("[ferry] restart failed: {e}\n").as_bytes());
                finish(run_dir, &mut state, "failed", -1, 0, &e);
                return 1;
            }
        };
        let started = Instant::now();
        state.phase = Phase::Running;
        state.init_pid = launched.pid.as_raw();
        state.init_start = process_start_time(state.init_pid).unwrap_or(0);
        state.started_unix = unix_now();
        state.stop_reason.clear();
        state.error.clear();
        let _ = state.write(run_dir);
        if first {
            report(&format!("ok {}", state.init_pid));
            first = false;
        }
        let status = pump(launched.pid, launched.console, &mut console);
        let stop_requested = run_dir.join(STOP_MARKER).exists();
        let checkpointed = run_dir.join(CHECKPOINT_MARKER).exists();
        let (reason, code, sig) = match status {
            WaitStatus::Signaled(_, Signal::SIGKILL, _) if checkpointed => ("checkpointed", -1, 0),
            WaitStatus::Exited(_, code) => {
                (if stop_requested { "stopped" } else { "exited" }, code, 0)
            }
            WaitStatus::Signaled(_, s, _) if stop_requested => ("stopped", -1, s as i32),
            WaitStatus::Signaled(_, Signal::SIGHUP, _) => {
                quick_reboots = if started.elapsed() < QUICK_REBOOT {
                    quick_reboots + 1
                } else {
                    0
                };
                if quick_reboots >= MAX_QUICK_REBOOTS {
                    ("reboot-loop", -1, Signal::SIGHUP as i32)
                } else {
                    state.reboots += 1;
                    console.write(b"[ferry] VPS rebooting\n");
                    continue;
                }
            }
            WaitStatus::Signaled(_, Signal::SIGINT, _) => ("poweroff", -1, 0),
            WaitStatus::Signaled(_, s, _) => ("killed", -1, s as i32),
            _ => ("exited", -1, 0),
        };
        finish(run_dir, &mut state, reason, code, sig, "");
        return 0;
    }
}

fn finish(
    run_dir: &Path,
    state: &mut RuntimeState,
    reason: &str,
    code: i32,
    sig: i32,
    error: &str,
) {
    state.phase = Phase::Stopped;
    state.stop_reason = reason.to_string();
    state.exit_code = code;
    state.exit_signal = sig;
    state.error = error.to_string();
    let _ = state.write(run_dir);
}

fn fail_first(run_dir: &Path, state: &mut RuntimeState, err: &str) -> i32 {
    finish(run_dir, state, "failed", -1, 0, err);
    report(&format!("err {}", err.replace('\n', " ")));
    1
}

/// One line to the agent on stdout, then stdout goes to /dev/null so an agent
/// that has gone away cannot hurt us with SIGPIPE or a full pipe.
fn report(line: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto our own stdout descriptor.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
}

/// Copies console output to the log until init exits; returns its wait status.
fn pump(pid: Pid, console_fd: OwnedFd, log: &mut ConsoleLog) -> WaitStatus {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor we own.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    let pidfd = (raw >= 0).then(|| {
        // SAFETY: `raw` is a fresh descriptor returned by pidfd_open.
        unsafe { OwnedFd::from_raw_fd(raw as i32) }
    });
    let mut console = Some(console_fd);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut fds = Vec::new();
        if let Some(c) = &console {
            fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
        }
        if let Some(p) = &pidfd {
            fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
        }
        // Without a pidfd (very old kernels) fall back to checking every 200 ms.
        let timeout = if pidfd.is_some() {
            PollTimeout::NONE
        } else {
            PollTimeout::from(200u16)
        };
        let _ = poll(&mut fds, timeout);
        let console_ready = console.is_some() && fds[0].revents().is_some_and(|r| !r.is_empty());
        drop(fds);
        if console_ready {
            if let Some(c) = &console {
                match nix::unistd::read(c, &mut buf) {
                    Ok(0) => console = None,
                    Ok(n) => log.write(&buf[..n]),
                    Err(nix::Error::EINTR) | Err(nix::Error::EAGAIN) => {}
                    Err(_) => console = None,
                }
            }
        }
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(nix::Error::EINTR) => continue,
            Ok(status) => {
                drain(console, log, &mut buf);
                return status;
            }
            Err(_) => return WaitStatus::Exited(pid, -1),
        }
    }
}

/// Init is gone, and with it every process in its pid namespace: read what they
/// wrote before they died.
fn drain(console: Option<OwnedFd>, log: &mut ConsoleLog, buf: &mut [u8]) {
    let Some(c) = console else { return };
    let deadline = Instant::now() + Duration::from_millis(200);
    while Instant::now() < deadline {
        let mut fds = [PollFd::new(c.as_fd(), PollFlags::POLLIN)];
        if !matches!(poll(&mut fds, PollTimeout::from(50u16)), Ok(n) if n > 0) {
            return;
        }
        match nix::unistd::read(&c, buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => log.write(&buf[..n]),
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
