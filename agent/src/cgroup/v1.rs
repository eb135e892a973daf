//! cgroup v1: one directory per controller mount.

use std::path::{Path, PathBuf};

use super::{read_keyed, read_u64, write, CgroupUsage};
use crate::error::{IoContext, Result};
use crate::spec::LimitsConfig;

const CFS_PERIOD_US: u64 = 100_000;

fn has(ctrls: &[String], c: &str) -> bool {
    ctrls.iter().any(|x| x == c)
}

pub fn create(mounts: &[(Vec<String>, PathBuf)], rel: &Path) -> Result<()> {
    for (ctrls, mount) in mounts {
        if has(ctrls, "cpuset") {
            // A new v1 cpuset has no cpus or mems and refuses tasks: copy them down
            // from the parent at every level.
            let mut dir = mount.clone();
            for comp in rel.components() {
                let parent = dir.clone();
                dir.push(comp);
                if !dir.exists() {
                    std::fs::create_dir(&dir).at("creating cgroup", &dir)?;
                }
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let cur = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
                    if cur.trim().is_empty() {
                        let v = std::fs::read_to_string(parent.join(f))
                            .at("reading cpuset", parent.join(f))?;
                        write(&dir, f, v.trim())?;
                    }
                }
            }
        } else {
            let dir = mount.join(rel);
            std::fs::create_dir_all(&dir).at("creating cgroup", &dir)?;
        }
        if has(ctrls, "devices") {
            let dir = mount.join(rel);
            // The kernel refuses to change the default of a cgroup with
            // children (a reused VPS cgroup holds its leaf): its rules were
            // set when it was made, and a child never widens them.
            let has_children = std::fs::read_dir(&dir)
                .map(|rd| {
                    rd.flatten()
                        .any(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                })
                .unwrap_or(false);
            if has_children {
                continue;
            }
            write(&dir, "devices.deny", "a")?;
            for rule in super::devices::VPS_DEVICES {
                write(&dir, "devices.allow", &rule.v1_line())?;
            }
        }
    }
    Ok(())
}

pub fn apply(mounts: &[(Vec<String>, PathBuf)], rel: &Path, l: &LimitsConfig) -> Result<()> {
    for (ctrls, mount) in mounts {
        let dir = mount.join(rel);
        if has(ctrls, "cpu") {
            write(&dir, "cpu.cfs_period_us", &CFS_PERIOD_US.to_string())?;
            let quota = if l.cpu_millicores == 0 {
                "-1".to_string()
            } else {
                (l.cpu_millicores as u64 * CFS_PERIOD_US / 1000).to_string()
            };
            write(&dir, "cpu.cfs_quota_us", &quota)?;
            // v2 weight 100 is v1 shares 1024.
            let shares = (l.cpu_weight as u64 * 1024 / 100).max(2);
            write(&dir, "cpu.shares", &shares.to_string())?;
        }
        if has(ctrls, "memory") {
            // memsw must stay >= the memory limit at every step: lift it, set the
            // limit, then bring memsw down to memory + swap.
            let memsw = dir.join("memory.memsw.limit_in_bytes").exists();
            if memsw {
                write(&dir, "memory.memsw.limit_in_bytes", "-1")?;
            }
            write(&dir, "memory.limit_in_bytes", &l.memory_bytes.to_string())?;
            if memsw {
                let total = l.memory_bytes.saturating_add(l.swap_bytes);
                write(&dir, "memory.memsw.limit_in_bytes", &total.to_string())?;
            } else if l.swap_bytes == 0 {
                // No swap accounting: keep the VPS out of swap as best we can.
                write(&dir, "memory.swappiness", "0")?;
            }
        }
        if has(ctrls, "pids") {
            write(&dir, "pids.max", &l.pids.to_string())?;
        }
    }
    Ok(())
}

pub fn usage(mounts: &[(Vec<String>, PathBuf)], rel: &Path) -> CgroupUsage {
    let mut u = CgroupUsage::default();
    for (ctrls, mount) in mounts {
        let dir = mount.join(rel);
        if has(ctrls, "cpuacct") {
            u.cpu_nanos = read_u64(&dir, "cpuacct.usage");
        }
        if has(ctrls, "memory") {
            u.memory_bytes = read_u64(&dir, "memory.usage_in_bytes");
            u.memory_peak_bytes = read_u64(&dir, "memory.max_usage_in_bytes");
            // v1 counts a kill in the victim's own cgroup (the leaf, or one
            // the VPS made below it), not where the limit was hit.
            u.oom_kills = super::subtree(&dir)
                .iter()
                .map(|d| read_keyed(d, "memory.oom_control", "oom_kill"))
                .sum();
        }
        if has(ctrls, "pids") {
            u.pids = read_u64(&dir, "pids.current") as u32;
        }
    }
    u
}
