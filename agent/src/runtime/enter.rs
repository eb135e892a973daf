//! `ferry-agent enter RUN_DIR -- ARGV...`: runs a command inside a running VPS,
//! like `vzctl exec`. Joins the VPS's cgroups and namespaces, forks (a pid
//! namespace takes effect for children only), and the child drops to the VPS's
//! capability set and seccomp filter before exec. Exits with the command's exit
//! code, or 128 + the signal that killed it.

use std::ffi::CString;
use std::os::fd::AsFd;
use std::path::Path;

use nix::sched::CloneFlags;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};

use super::{security, LaunchConfig, RuntimeState, LAUNCH_FILE};

const NAMESPACES: &[(&str, CloneFlags)] = &[
    ("cgroup", CloneFlags::CLONE_NEWCGROUP),
    ("ipc", CloneFlags::CLONE_NEWIPC),
    ("uts", CloneFlags::CLONE_NEWUTS),
    ("net", CloneFlags::CLONE_NEWNET),
    ("pid", CloneFlags::CLONE_NEWPID),
    // Last: after it, host paths are gone.
    ("mnt", CloneFlags::CLONE_NEWNS),
];

const VPS_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub fn run(run_dir: &Path, argv: &[String], env: &[String]) -> i32 {
    match enter(run_dir, argv, env) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: exec: {e}");
            126
        }
    }
}

fn enter(run_dir: &Path, argv: &[String], env: &[String]) -> Result<i32, String> {
    if argv.is_empty() {
        return Err("no command given".into());
    }
    let state = RuntimeState::read(run_dir).ok_or("the VPS is not running")?;
    if !state.init_alive() {
        return Err("the VPS is not running".into());
    }
    let cfg: LaunchConfig = std::fs::read(run_dir.join(LAUNCH_FILE))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|e| format!("reading {LAUNCH_FILE}: {e}"))?;
    let cargv: Vec<CString> = argv
        .iter()
        .map(|a| CString::new(a.as_bytes()).map_err(|_| "argument holds a NUL byte".to_string()))
        .collect::<Result<_, _>>()?;
    let mut cenv: Vec<CString> =
        vec![CString::new(format!("PATH={VPS_PATH}")).map_err(|e| e.to_string())?];
    for kv in ["TERM=xterm", "HOME=/root", "container=ferry"]
        .iter()
        .map(|s| s.to_string())
        .chain(env.iter().cloned())
    {
        cenv.push(CString::new(kv).map_err(|_| "environment entry holds a NUL byte".to_string())?);
    }
    let seccomp = security::seccomp_program()?;
    // Not dumpable from here until the command's exec resets it: nothing in
    // the VPS may ptrace, or read the memory of, a process that still holds
    // the host's capabilities (runc's CVE-2016-9962). The fork keeps it.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(format!(
            "PR_SET_DUMPABLE: {}",
            std::io::Error::last_os_error()
        ));
    }
    let ns_files: Vec<(std::fs::File, CloneFlags)> = NAMESPACES
        .iter()
        .map(|(n, f)| {
            std::fs::File::open(format!("/proc/{}/ns/{n}", state.init_pid))
                .map(|file| (file, *f))
                .map_err(|e| format!("opening {n} namespace: {e}"))
        })
        .collect::<Result<_, _>>()?;
    // An unprivileged VPS's user namespace: opened before the cgroups are
    // joined (as host root), entered first, so its root owns the rest.
    let user = match cfg.userns {
        Some(_) => Some(
            std::fs::File::open(format!("/proc/{}/ns/user", state.init_pid))
                .map_err(|e| format!("opening user namespace: {e}"))?,
        ),
        None => None,
    };
    for f in &cfg.cgroup_procs {
        std::fs::write(f, "0").map_err(|e| format!("joining cgroup {}: {e}", f.display()))?;
    }
    if let Some(user) = &user {
        nix::sched::setns(user.as_fd(), CloneFlags::CLONE_NEWUSER)
            .map_err(|e| format!("joining the VPS's user namespace: {e}"))?;
    }
    for (file, flag) in &ns_files {
        nix::sched::setns(file.as_fd(), *flag).map_err(|e| format!("setns {flag:?}: {e}"))?;
    }
    drop(ns_files);
    // SAFETY: this helper process is single-threaded, so the child may run any code.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            // SAFETY: prctl with integer arguments only.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
            let _ = nix::unistd::setsid();
            let _ = std::env::set_current_dir("/");
            super::launch::reset_signals();
            let err = (|| -> Result<std::convert::Infallible, String> {
                // Nothing of the host may reach the VPS: a descriptor the agent
                // inherited from its own launcher would pin a host mount and
                // make the VPS impossible to checkpoint.
                super::launch::cloexec_from(3)?;
                if user.is_some() {
                    super::rootfs::become_vps_root()?;
                }
                security::install_seccomp(&seccomp).map_err(|e| format!("seccomp: {e}"))?;
                security::drop_capabilities().map_err(|e| format!("capabilities: {e}"))?;
                let path =
                    resolve(&argv[0]).ok_or_else(|| format!("{}: command not found", argv[0]))?;
                let e = nix::unistd::execve(&path, &cargv, &cenv).err();
                Err(format!(
                    "exec {}: {}",
                    argv[0],
                    e.map(|e| e.to_string()).unwrap_or_default()
                ))
            })();
            let Err(e) = err;
            eprintln!("ferry: {e}");
            // SAFETY: leave the forked child without running the parent's exit handlers.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => loop {
            match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, c)) => return Ok(c),
                Ok(WaitStatus::Signaled(_, s, _)) => return Ok(128 + s as i32),
                Ok(_) | Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(format!("wait: {e}")),
            }
        },
    }
}

/// Finds a command on the VPS's PATH (we are in its mount namespace already).
fn resolve(cmd: &str) -> Option<CString> {
    use std::os::unix::fs::PermissionsExt;
    if cmd.contains('/') {
        return CString::new(cmd).ok();
    }
    VPS_PATH
        .split(':')
        .map(|d| Path::new(d).join(cmd))
        .find_map(|p| {
            let meta = std::fs::metadata(&p).ok()?;
            (meta.is_file() && meta.permissions().mode() & 0o111 != 0)
                .then(|| CString::new(p.into_os_string().into_encoded_bytes()).ok())?
        })
}
