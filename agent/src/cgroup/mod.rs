//! Per-VPS cgroups behind one interface, on cgroup v1 (legacy or hybrid
//! hierarchies, as on this project's CI host) and v2 (unified, most production hosts).
//!
//! A VPS's cgroup lives at `ferry/<agent instance>/<vps>` below each hierarchy's root,
//! so several agents sharing one kernel (the local cluster) never collide.

pub mod devices;
mod v1;
mod v2;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{AgentError, IoContext, Result};
use crate::spec::LimitsConfig;

/// Which hierarchy the host offers for resource control.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Layout {
    /// One mount per controller group: (controllers, mount point).
    V1 { mounts: Vec<(Vec<String>, PathBuf)> },
    /// The unified hierarchy's mount point.
    V2 { root: PathBuf },
}

/// Controllers a VPS gets on v1. `freezer` and `cpuset` are there for CRIU.
pub const V1_CONTROLLERS: &[&str] = &[
    "cpu", "cpuacct", "cpuset", "memory", "pids", "devices", "freezer",
];

/// Resource usage as the cgroup reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupUsage {
    pub cpu_nanos: u64,
    pub memory_bytes: u64,
    pub memory_peak_bytes: u64,
    pub pids: u32,
    pub oom_kills: u64,
}

impl Layout {
    /// Reads the host's cgroup mounts. A cgroup2 mount at /sys/fs/cgroup means v2;
    /// otherwise the v1 controller mounts are used (the cgroup2 mount of a hybrid
    /// layout has no controllers to offer).
    pub fn detect() -> Result<Layout> {
        let text = std::fs::read_to_string("/proc/self/mountinfo")
            .at("reading", "/proc/self/mountinfo")?;
        Self::from_mountinfo(&text)
    }

    pub fn from_mountinfo(text: &str) -> Result<Layout> {
        let mut v1 = Vec::new();
        let mut v2_root = None;
        for line in text.lines() {
            let Some((pre, post)) = line.split_once(" - ") else {
                continue;
            };
            let mount_point = pre.split(' ').nth(4).unwrap_or_default();
            let mut post_fields = post.split(' ');
            let fstype = post_fields.next().unwrap_or_default();
            let super_opts = post_fields.nth(1).unwrap_or_default();
            match fstype {
                "cgroup2" if mount_point == "/sys/fs/cgroup" => {
                    v2_root = Some(PathBuf::from(mount_point))
                }
                "cgroup" => {
                    let ctrls: Vec<String> = super_opts
                        .split(',')
                        .filter(|o| V1_CONTROLLERS.contains(o))
                        .map(str::to_string)
                        .collect();
                    if !ctrls.is_empty() {
                        v1.push((ctrls, PathBuf::from(mount_point)));
                    }
                }
                _ => {}
            }
        }
        if let Some(root) = v2_root {
            return Ok(Layout::V2 { root });
        }
        for needed in ["cpu", "cpuacct", "memory", "pids"] {
            if !v1.iter().any(|(c, _)| c.iter().any(|x| x == needed)) {
                return Err(AgentError::FailedPrecondition(format!(
                    "no cgroup v1 '{needed}' controller is mounted and /sys/fs/cgroup is not cgroup2; \
                     mount the cgroup controllers before starting the agent"
                )));
            }
        }
        Ok(Layout::V1 { mounts: v1 })
    }

    pub fn version(&self) -> &'static str {
        match self {
            Layout::V1 { .. } => "v1",
            Layout::V2 { .. } => "v2",
        }
    }
}

/// The cgroup below a VPS's own where its tasks live. The limits sit on the
/// VPS's cgroup, one level up, and the VPS's cgroup namespace starts at the
/// leaf: root in the VPS may mount a cgroup filesystem and write the leaf's
/// files, but the kernel enforces every limit hierarchically, so it can
/// neither raise its memory, CPU or pids limits nor widen its device access
/// (a v1 child cannot allow a device its parent denies; v2's device programs
/// need bpf(), which the VPS's seccomp filter refuses).
pub const LEAF: &str = "payload";

/// The cgroup(s) of one VPS.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VpsCgroup {
    pub layout: Layout,
    /// Path below each hierarchy's root, e.g. `ferry/3fa2c1/web1`.
    pub rel: PathBuf,
}

impl VpsCgroup {
    pub fn new(layout: Layout, instance: &str, vps: &str) -> Self {
        Self {
            layout,
            rel: Path::new("ferry").join(instance).join(vps),
        }
    }

    /// Every directory that makes up this cgroup (one per v1 mount, one on v2).
    pub fn dirs(&self) -> Vec<PathBuf> {
        match &self.layout {
            Layout::V1 { mounts } => mounts.iter().map(|(_, m)| m.join(&self.rel)).collect(),
            Layout::V2 { root } => vec![root.join(&self.rel)],
        }
    }

    /// The leaf's directories (see [`LEAF`]), where the tasks are.
    pub fn leaf_dirs(&self) -> Vec<PathBuf> {
        self.dirs().into_iter().map(|d| d.join(LEAF)).collect()
    }

    /// Where the VPS's tasks are, per hierarchy, as CRIU's `cg_root` wants
    /// it (the leaf): one entry per v1 controller (a root without a
    /// controller would also remap cpuset and fail), one for the unified
    /// hierarchy.
    pub fn criu_roots(&self) -> Vec<(Option<String>, String)> {
        let path = format!("/{}", self.rel.join(LEAF).display());
        match &self.layout {
            Layout::V1 { mounts } => mounts
                .iter()
                .flat_map(|(ctrls, _)| ctrls.iter().map(|c| (Some(c.clone()), path.clone())))
                .collect(),
            Layout::V2 { .. } => vec![(None, path)],
        }
    }

    /// The `cgroup.procs` files a task writes itself into to join the VPS
    /// (the leaf's).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.leaf_dirs()
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// Creates the cgroup and applies the limits; a leftover cgroup of the same
    /// name (an earlier crash) is reused.
    pub fn create(&self, limits: &LimitsConfig) -> Result<()> {
        let leaf = self.rel.join(LEAF);
        match &self.layout {
            Layout::V1 { mounts } => {
                v1::create(mounts, &self.rel)?;
                v1::create(mounts, &leaf)?;
            }
            Layout::V2 { root } => {
                v2::create(root, &self.rel, true)?;
                v2::create(root, &leaf, false)?;
            }
        }
        self.apply(limits)
    }

    pub fn exists(&self) -> bool {
        self.dirs().iter().any(|d| d.exists())
    }

    /// Applies limits; works on a running VPS.
    pub fn apply(&self, limits: &LimitsConfig) -> Result<()> {
        match &self.layout {
            Layout::V1 { mounts } => v1::apply(mounts, &self.rel, limits),
            Layout::V2 { root } => v2::apply(&root.join(&self.rel), limits),
        }
    }

    pub fn usage(&self) -> CgroupUsage {
        match &self.layout {
            Layout::V1 { mounts } => v1::usage(mounts, &self.rel),
            Layout::V2 { root } => v2::usage(&root.join(&self.rel)),
        }
    }

    /// Host pids of every task in the VPS: in its cgroup and every cgroup
    /// below it (the leaf, and whatever the VPS made inside; a VPS started by
    /// an older agent has its tasks in its own cgroup).
    pub fn pids(&self) -> Vec<i32> {
        let Some(first) = self.dirs().into_iter().find(|d| d.exists()) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for d in subtree(&first) {
            out.extend(
                std::fs::read_to_string(d.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.trim().parse::<i32>().ok()),
            );
        }
        out
    }

    /// SIGKILLs every task in it.
    pub fn kill_tasks(&self) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Kills whatever is left and removes the cgroup directories.
    pub fn destroy(&self) -> Result<()> {
        for attempt in 0..50 {
            self.kill_tasks();
            let mut busy = None;
            // Deepest first: the leaf and what the VPS made below it.
            let mut all: Vec<PathBuf> = self.dirs().iter().flat_map(|d| subtree(d)).collect();
            all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
            for d in all {
                match std::fs::remove_dir(&d) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => busy = Some((d, e)),
                }
            }
            match busy {
                None => return Ok(()),
                Some((d, e)) if attempt == 49 => {
                    return Err(AgentError::PathIo {
                        context: "removing cgroup",
                        path: d,
                        source: e,
                    })
                }
                Some(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
        Ok(())
    }
}

/// `dir` and every cgroup below it (parents before children); nothing if it
/// does not exist. Symlinks are not followed (cgroupfs has none).
pub(crate) fn subtree(dir: &Path) -> Vec<PathBuf> {
    if !dir.is_dir() {
        return Vec::new();
    }
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(rd) = std::fs::read_dir(&out[i]) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

pub(crate) fn write(dir: &Path, file: &str, value: &str) -> Result<()> {
    let p = dir.join(file);
    std::fs::write(&p, value).map_err(|source| AgentError::PathIo {
        context: "writing cgroup file",
        path: p,
        source,
    })
}

pub(crate) fn read_u64(dir: &Path, file: &str) -> u64 {
    std::fs::read_to_string(dir.join(file))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Reads `key value` lines (memory.stat, cpu.stat, memory.events, oom_control).
pub(crate) fn read_keyed(dir: &Path, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_hybrid_as_v1_and_unified_as_v2() {
        let hybrid = "\
35 27 0:30 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
36 27 0:31 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
37 27 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 27 0:33 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
39 27 0:34 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
40 27 0:35 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        match Layout::from_mountinfo(hybrid).unwrap() {
            Layout::V1 { mounts } => {
                assert_eq!(mounts.len(), 4);
                assert_eq!(
                    mounts[0],
                    (vec!["cpu".to_string()], PathBuf::from("/sys/fs/cgroup/cpu"))
                );
            }
            l => panic!("expected v1, got {l:?}"),
        }
        let unified = "30 27 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            Layout::from_mountinfo(unified).unwrap(),
            Layout::V2 {
                root: "/sys/fs/cgroup".into()
            }
        );
        let comounted = "35 27 0:30 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
37 27 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
38 27 0:33 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
";
        assert!(
            matches!(Layout::from_mountinfo(comounted).unwrap(), Layout::V1 { mounts } if mounts.len() == 3)
        );
        let err = Layout::from_mountinfo("").unwrap_err().to_string();
        assert!(err.contains("cgroup"), "{err}");
    }
}
