//! Cloning the VPS's init into its namespaces. Runs in the monitor, which is
//! single-threaded, so the child may allocate freely between clone and exec.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::OFlag;
use nix::sched::CloneFlags;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::Pid;
use seccompiler::BpfProgram;

use super::{rootfs, security, LaunchConfig};

/// A started init: its host pid and the read end of its console pipe.
pub struct Launched {
    pub pid: Pid,
    pub console: OwnedFd,
}

const ENV: &[&str] = &[
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "TERM=linux",
    "HOME=/root",
    "container=ferry",
];

pub fn launch(cfg: &LaunchConfig, seccomp: &BpfProgram) -> Result<Launched, String> {
    if let Some(userns) = &cfg.userns {
        return launch_in_userns(cfg, userns, seccomp);
    }
    let (argv, env) = init_command(cfg)?;
    let netns = match &cfg.netns {
        Some(p) => Some(
            std::fs::File::open(p).map_err(|e| format!("opening netns {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let (con_r, con_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;

    let mut flags = CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC;
    if netns.is_none() {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    // SAFETY: a raw clone without CLONE_VM and with no new stack behaves like
    // fork(2): the child gets a copy-on-write copy of this single-threaded
    // process and continues from here with a return value of 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags.bits() as libc::c_ulong | libc::SIGCHLD as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if rc < 0 {
        return Err(format!("clone: {}", std::io::Error::last_os_error()));
    }
    if rc == 0 {
        drop(con_r);
        drop(err_r);
        let msg = match child(cfg, netns.as_ref(), &con_w, &argv, &env, seccomp) {
            Ok(never) => match never {},
            Err(m) => m,
        };
        let _ = nix::unistd::write(&err_w, msg.as_bytes());
        // SAFETY: _exit ends the child without running the parent's atexit
        // handlers or flushing its copied stdio buffers.
        unsafe { libc::_exit(127) };
    }
    let pid = Pid::from_raw(rc as i32);
    drop(con_w);
    drop(err_w);
    let mut msg = String::new();
    let _ = std::fs::File::from(err_r).read_to_string(&mut msg);
    if !msg.is_empty() {
        let _ = nix::sys::wait::waitpid(pid, None);
        return Err(msg);
    }
    Ok(Launched {
        pid,
        console: con_r,
    })
}

enum Never {}

/// The child's side: join cgroups and namespaces, build the filesystem, restrict,
/// exec init. Returns only on failure.
fn child(
    cfg: &LaunchConfig,
    netns: Option<&std::fs::File>,
    console: &OwnedFd,
    argv: &[CString],
    env: &[CString],
    seccomp: &BpfProgram,
) -> Result<Never, String> {
    // Join the cgroups before making the cgroup namespace, so its root is the VPS's.
    for f in &cfg.cgroup_procs {
        std::fs::write(f, "0").map_err(|e| format!("joining cgroup {}: {e}", f.display()))?;
    }
    nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP)
        .map_err(|e| format!("unshare cgroup ns: {e}"))?;
    if let Some(ns) = netns {
        nix::sched::setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("joining netns: {e}"))?;
    }
    become_init(cfg, console, argv, env, seccomp)
}

/// Init's last steps, in its namespaces: hostname, filesystem, console,
/// session, restrictions, exec. Returns only on failure.
fn become_init(
    cfg: &LaunchConfig,
    console: &OwnedFd,
    argv: &[CString],
    env: &[CString],
    seccomp: &BpfProgram,
) -> Result<Never, String> {
    nix::unistd::sethostname(&cfg.hostname).map_err(|e| format!("sethostname: {e}"))?;
    rootfs::enter_rootfs(&cfg.rootfs, cfg.userns.is_some())?;

    // stdin is /dev/null, stdout and stderr the console pipe.
    let null = nix::fcntl::open("/dev/null", OFlag::O_RDWR, nix::sys::stat::Mode::empty())
        .map_err(|e| format!("open /dev/null: {e}"))?;
    dup_to(null.as_raw_fd(), 0)?;
    dup_to(console.as_raw_fd(), 1)?;
    dup_to(console.as_raw_fd(), 2)?;
    // Init must lead its own session inside the pid namespace (CRIU needs it).
    nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    // No descriptor of the monitor's may reach the VPS: everything above 2 closes at exec.
    cloexec_from(3)?;
    reset_signals();
    security::install_seccomp(seccomp).map_err(|e| format!("seccomp: {e}"))?;
    security::drop_capabilities().map_err(|e| format!("dropping capabilities: {e}"))?;
    let e = nix::unistd::execve(&argv[0], argv, env).err();
    Err(format!(
        "exec {}: {}",
        argv[0].to_string_lossy(),
        e.map(|e| e.to_string()).unwrap_or_default()
    ))
}

/// An unprivileged VPS's init (see the module doc of [`super`]): a first
/// child joins the cgroups as host root, then the VPS's user namespace and
/// netns, unshares the rest and forks init; it reports init's host pid and
/// exits, and the monitor (a child subreaper) inherits init.
fn launch_in_userns(
    cfg: &LaunchConfig,
    userns: &std::path::Path,
    seccomp: &BpfProgram,
) -> Result<Launched, String> {
    let (argv, env) = init_command(cfg)?;
    let open = |p: &std::path::Path| {
        std::fs::File::open(p).map_err(|e| format!("opening {}: {e}", p.display()))
    };
    let user = open(userns)?;
    let net = match &cfg.netns {
        Some(p) => open(p)?,
        None => return Err("an unprivileged VPS needs the netns its user namespace owns".into()),
    };
    let (con_r, con_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let (pid_r, pid_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: the monitor is single-threaded: the child may run any code.
    match unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
        nix::unistd::ForkResult::Child => {
            drop(con_r);
            drop(err_r);
            drop(pid_r);
            let msg = match enter_userns(cfg, &user, &net, &con_w, &pid_w, &argv, &env, seccomp) {
                Ok(()) => {
                    // SAFETY: _exit ends this intermediate child without the
                    // parent's atexit handlers; init lives on.
                    unsafe { libc::_exit(0) }
                }
                Err(m) => m,
            };
            let _ = nix::unistd::write(&err_w, msg.as_bytes());
            // SAFETY: as above.
            unsafe { libc::_exit(127) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(con_w);
            drop(err_w);
            drop(pid_w);
            let _ = nix::sys::wait::waitpid(child, None);
            let mut pid = [0u8; 4];
            let got = std::fs::File::from(pid_r).read_exact(&mut pid).is_ok();
            let mut msg = String::new();
            let _ = std::fs::File::from(err_r).read_to_string(&mut msg);
            let pid = Pid::from_raw(i32::from_ne_bytes(pid));
            if !msg.is_empty() || !got {
                if got {
                    let _ = nix::sys::wait::waitpid(pid, None);
                }
                if msg.is_empty() {
                    msg = "the VPS's init was not started".into();
                }
                return Err(msg);
            }
            Ok(Launched {
                pid,
                console: con_r,
            })
        }
    }
}

/// The intermediate child's work. Returns once init is forked.
#[allow(clippy::too_many_arguments)]
fn enter_userns(
    cfg: &LaunchConfig,
    user: &std::fs::File,
    net: &std::fs::File,
    console: &OwnedFd,
    pid_out: &OwnedFd,
    argv: &[CString],
    env: &[CString],
    seccomp: &BpfProgram,
) -> Result<(), String> {
    // As host root: the cgroup files are the host's.
    for f in &cfg.cgroup_procs {
        std::fs::write(f, "0").map_err(|e| format!("joining cgroup {}: {e}", f.display()))?;
    }
    nix::sched::setns(user.as_fd(), CloneFlags::CLONE_NEWUSER)
        .map_err(|e| format!("joining the VPS's user namespace: {e}"))?;
    nix::sched::setns(net.as_fd(), CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("joining netns: {e}"))?;
    // Owned by the VPS's user namespace, so its root rules them.
    nix::sched::unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWCGROUP,
    )
    .map_err(|e| format!("unshare: {e}"))?;
    // SAFETY: this intermediate child is single-threaded.
    match unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
        nix::unistd::ForkResult::Child => {
            let msg = match become_init(cfg, console, argv, env, seccomp) {
                Ok(never) => match never {},
                Err(m) => m,
            };
            Err(msg)
        }
        nix::unistd::ForkResult::Parent { child } => {
            nix::unistd::write(pid_out, &child.as_raw().to_ne_bytes())
                .map_err(|e| format!("reporting init's pid: {e}"))?;
            Ok(())
        }
    }
}

/// Init's argv and environment, made before any fork.
fn init_command(cfg: &LaunchConfig) -> Result<(Vec<CString>, Vec<CString>), String> {
    let argv: Vec<CString> = cfg
        .init
        .iter()
        .map(|a| CString::new(a.as_bytes()).map_err(|_| "init argument holds a NUL".to_string()))
        .collect::<Result<_, _>>()?;
    if argv.is_empty() {
        return Err("empty init command".into());
    }
    let env: Vec<CString> = ENV.iter().filter_map(|e| CString::new(*e).ok()).collect();
    Ok((argv, env))
}

/// Marks every descriptor from `first` up close-on-exec.
pub fn cloexec_from(first: u32) -> Result<(), String> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags on descriptors.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc != 0 {
        return Err(format!("close_range: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn dup_to(fd: i32, target: i32) -> Result<(), String> {
    // SAFETY: dup2 on descriptors this process owns.
    if unsafe { libc::dup2(fd, target) } < 0 {
        return Err(format!(
            "dup2 to {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Ignored signals survive exec (Rust ignores SIGPIPE at start-up): give init a
/// clean slate.
pub(super) fn reset_signals() {
    let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for sig in Signal::iterator() {
        if sig == Signal::SIGKILL || sig == Signal::SIGSTOP {
            continue;
        }
        // SAFETY: installing the default disposition has no handler to be unsafe about.
        let _ = unsafe { sigaction(sig, &dfl) };
    }
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&SigSet::empty()),
        None,
    );
}
