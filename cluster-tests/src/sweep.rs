//! Teardown of a run's hosts, and of what a killed earlier run left: its
//! daemons and VPS tasks (by the dir on their command line, and by their
//! agents' cgroups), mounts under its dir, the dir, namespaces and links.
//! A run's id is `fc<pid>x<n>`: a run whose process is gone is swept.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::Digest;

use crate::net::Net;
use crate::ROOT;

fn kill9(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Processes whose command line names something under `dir`.
fn pids_naming(dir: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(dir) {
            out.push(pid);
        }
    }
    out
}

/// The agent's cgroup parent is named after its run dir (agent/src/paths.rs).
fn instance_id(run_dir: &Path) -> String {
    hex::encode(&sha2::Sha256::digest(run_dir.as_os_str().as_encoded_bytes())[..6])
}

fn subdirs(d: &Path, out: &mut Vec<PathBuf>) {
    out.push(d.to_path_buf());
    for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            subdirs(&e.path(), out);
        }
    }
}

/// Removes run `id` (its `hosts` hosts) entirely.
pub fn teardown(id: &str, hosts: usize) {
    let dir = Path::new(ROOT).join(id);
    let dir_s = format!("{}/", dir.to_string_lossy());
    for p in pids_naming(&dir_s) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGCONT,
        );
        kill9(p);
    }
    let cgroot = Path::new("/sys/fs/cgroup");
    let mut mounts: Vec<PathBuf> = std::fs::read_dir(cgroot)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    mounts.push(cgroot.to_path_buf());
    for i in 1..=hosts {
        let inst = instance_id(&dir.join(format!("h{i}/run")));
        for m in &mounts {
            let base = m.join("ferry").join(&inst);
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
                            kill9(p);
                        }
                    }
                    let _ = std::fs::remove_dir(d);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut ms: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&dir_s))
        .map(str::to_string)
        .collect();
    ms.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in ms {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Net { id: id.to_string() }.remove(hosts);
}

/// Sweeps runs whose test process is gone (a killed earlier run).
pub fn leftovers(max_hosts: usize) {
    let mut ids: Vec<String> = std::fs::read_dir(ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    // Namespaces and bridges of a run whose dir is already gone.
    for e in std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Some(n) = e.file_name().to_str() {
            if let Some((id, _)) = n.split_once('h') {
                ids.push(id.to_string());
            }
        }
    }
    ids.sort();
    ids.dedup();
    for id in ids {
        let Some(pid) = id
            .strip_prefix("fc")
            .and_then(|r| r.split('x').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() as i32 && !Path::new(&format!("/proc/{pid}")).exists() {
            teardown(&id, max_hosts);
        }
    }
}
