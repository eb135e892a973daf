//! A cgroup yard the agent keeps for CRIU.
//!
//! Every dump and restore needs each cgroup hierarchy mounted somewhere CRIU
//! can reach by a directory fd. Left to itself, CRIU mounts all of them into a
//! fresh `.criu.cgyard.*` dir on every run, and mounting the cgroup2
//! hierarchy costs 5-35 ms on this kernel: inside the freeze, once in the
//! dump and once in the restore. The agent mounts them once, at start, at
//! [`YARD`], and hands the dir to CRIU (`cgroup_yard`), which then opens
//! `<yard>/<hierarchy>` instead of mounting.
//!
//! A hierarchy's dir is named the way CRIU names it: its controllers as
//! /proc/self/cgroup lists them, `name=` dropped (`name=systemd` →
//! `systemd`), and `unified` for cgroup2. The yard is real mounts, not
//! symlinks to /sys/fs/cgroup: CRIU resolves paths in it from tasks that may
//! already see the VPS's root.
//!
//! One yard serves every agent on the host (the hierarchies are the host's).
//! It sits outside every data and run dir on purpose: a recursive delete of
//! the yard walks into the cgroup trees and removes every empty cgroup it
//! meets, so it must never be inside a tree anyone deletes (a test's dir, a
//! run dir wiped to simulate a reboot). It is per boot: /run is a tmpfs on
//! production hosts; elsewhere a stale dir is mounted again at start. If the
//! host's hierarchies change while the agent runs, [`ready`] says no and CRIU
//! makes its own yard again, as before.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};

/// Where the yard is. Never delete it recursively (see the module doc):
/// unmount what is under it first.
pub const YARD: &str = "/run/ferry-cgroup-yard";

/// One cgroup hierarchy: CRIU's name for its dir, and how to mount it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub dir: String,
    /// None: cgroup2. Some(options): a v1 hierarchy.
    pub v1_options: Option<String>,
}

/// The hierarchies in a /proc/PID/cgroup text.
pub fn hierarchies(proc_cgroup: &str) -> Vec<Hierarchy> {
    proc_cgroup
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_id, ctrls) = (f.next()?, f.next()?);
            if ctrls.is_empty() {
                return Some(Hierarchy {
                    dir: "unified".into(),
                    v1_options: None,
                });
            }
            let names: Vec<&str> = ctrls.split(',').collect();
            let dir = names
                .iter()
                .map(|n| n.strip_prefix("name=").unwrap_or(n))
                .collect::<Vec<_>>()
                .join(",");
            // A named hierarchy without controllers mounts with "none".
            let options = if names.iter().all(|n| n.starts_with("name=")) {
                format!("none,{ctrls}")
            } else {
                ctrls.to_string()
            };
            Some(Hierarchy {
                dir,
                v1_options: Some(options),
            })
        })
        .collect()
}

fn own_hierarchies() -> Result<Vec<Hierarchy>, String> {
    let text = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
    Ok(hierarchies(&text))
}

fn is_mount_point(dir: &Path, parent_dev: u64) -> bool {
    std::fs::metadata(dir).is_ok_and(|m| m.dev() != parent_dev)
}

/// Mounts every hierarchy this host has under [`YARD`] (those already
/// mounted there, by this or another agent, are kept). Returns the yard.
pub fn prepare() -> Result<PathBuf, String> {
    let yard = PathBuf::from(YARD);
    std::fs::create_dir_all(&yard).map_err(|e| format!("creating {}: {e}", yard.display()))?;
    let dev = std::fs::metadata(&yard)
        .map_err(|e| format!("{}: {e}", yard.display()))?
        .dev();
    for h in own_hierarchies()? {
        let dir = yard.join(&h.dir);
        if is_mount_point(&dir, dev) {
            continue;
        }
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let (fstype, data) = match &h.v1_options {
            None => ("cgroup2", None),
            Some(o) => ("cgroup", Some(o.as_str())),
        };
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        mount(Some("none"), &dir, Some(fstype), flags, data)
            .map_err(|e| format!("mounting {fstype} {:?} at {}: {e}", data, dir.display()))?;
        // Nothing mounted under the yard may show up elsewhere, or back.
        mount(
            None::<&str>,
            &dir,
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(|e| format!("making {} private: {e}", dir.display()))?;
    }
    Ok(yard)
}

/// Whether `yard` still holds every hierarchy this host has (a few stats).
pub fn ready(yard: &Path) -> bool {
    let Ok(dev) = std::fs::metadata(yard).map(|m| m.dev()) else {
        return false;
    };
    own_hierarchies().is_ok_and(|hs| hs.iter().all(|h| is_mount_point(&yard.join(&h.dir), dev)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_criu() {
        let hs = hierarchies(
            "12:name=systemd:/\n4:cpu,cpuacct:/x\n3:memory:/a/b\n2:net_cls,net_prio:/\n0::/user.slice\n",
        );
        let dirs: Vec<&str> = hs.iter().map(|h| h.dir.as_str()).collect();
        assert_eq!(
            dirs,
            [
                "systemd",
                "cpu,cpuacct",
                "memory",
                "net_cls,net_prio",
                "unified"
            ]
        );
        assert_eq!(hs[0].v1_options.as_deref(), Some("none,name=systemd"));
        assert_eq!(hs[1].v1_options.as_deref(), Some("cpu,cpuacct"));
        assert_eq!(hs[4].v1_options, None);
    }

    #[test]
    fn pure_v2_host() {
        let hs = hierarchies("0::/system.slice/ferry-agent.service\n");
        assert_eq!(
            hs,
            [Hierarchy {
                dir: "unified".into(),
                v1_options: None
            }]
        );
    }
}
