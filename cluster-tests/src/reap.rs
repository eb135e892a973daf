//! Killing and unmounting what a test run left: processes that name its dir,
//! an agent's cgroup tree (VPS tasks included), mounts under its dir.
//!
//! Self-contained: the agent's tests include this file too.

use std::path::{Path, PathBuf};
use std::time::Duration;

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

/// SIGKILLs every process (but this one) whose command line names
/// something under `dir_s` (a dir path ending in `/`, so `x1/` does not
/// match `x1b/`). Stopped ones are continued first, so they go at once.
pub fn kill_naming(dir_s: &str) {
    let me = std::process::id() as i32;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd)
            .replace('\0', " ")
            .contains(dir_s)
        {
            signal(pid, nix::sys::signal::Signal::SIGCONT);
            signal(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Where cgroup hierarchies are mounted (v1 controllers and v2).
pub fn cgroup_mounts() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter(|l| l.contains(" - cgroup ") || l.contains(" - cgroup2 "))
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .collect()
}

fn subdirs(d: &Path, out: &mut Vec<PathBuf>) {
    out.push(d.to_path_buf());
    for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            subdirs(&e.path(), out);
        }
    }
}

/// Kills every task in the cgroup tree at `rel` (below each hierarchy's
/// mount) and removes the tree, deepest first (tasks take a moment to
/// leave).
pub fn kill_cgroup_tree(rel: &Path) {
    for m in cgroup_mounts() {
        let base = m.join(rel);
        for _ in 0..100 {
            if !base.exists() {
                break;
            }
            let mut all = Vec::new();
            subdirs(&base, &mut all);
            all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
            for d in &all {
                if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
                    for p in procs.lines().filter_map(|l| l.trim().parse().ok()) {
                        signal(p, nix::sys::signal::Signal::SIGKILL);
                    }
                }
                let _ = std::fs::remove_dir(d);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Lazily unmounts everything mounted under `dir_s`, deepest first.
pub fn unmount_under(dir_s: &str) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut ms: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(dir_s))
        .collect();
    ms.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in ms {
        let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
    }
}
