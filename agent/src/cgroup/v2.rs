//! cgroup v2: one directory in the unified hierarchy.
//!
//! Device access on v2 is an eBPF program attached to the cgroup (see `devices`).

use std::path::Path;

use super::{read_keyed, read_u64, write, CgroupUsage};
use crate::error::{IoContext, Result};
use crate::spec::LimitsConfig;

const CFS_PERIOD_US: u64 = 100_000;

/// Makes the cgroup at `rel` with the controllers delegated down to it;
/// `devices`: attach the VPS's device program here (the VPS's own cgroup;
/// its leaf is covered by it, and may not attach one of its own below it).
pub fn create(root: &Path, rel: &Path, devices: bool) -> Result<()> {
    // Each level below the root must delegate the controllers to the next.
    let mut dir = root.to_path_buf();
    for comp in rel.components() {
        let avail = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        let enable: Vec<String> = ["cpu", "cpuset", "memory", "pids"]
            .iter()
            .filter(|c| avail.split_whitespace().any(|a| a == **c))
            .map(|c| format!("+{c}"))
            .collect();
        if !enable.is_empty() {
            write(&dir, "cgroup.subtree_control", &enable.join(" "))?;
        }
        dir.push(comp);
        if !dir.exists() {
            std::fs::create_dir(&dir).at("creating cgroup", &dir)?;
        }
    }
    if devices {
        super::devices::attach(&dir, super::devices::VPS_DEVICES).at("limiting devices", &dir)?;
    }
    Ok(())
}

pub fn apply(dir: &Path, l: &LimitsConfig) -> Result<()> {
    let quota = if l.cpu_millicores == 0 {
        "max".to_string()
    } else {
        (l.cpu_millicores as u64 * CFS_PERIOD_US / 1000).to_string()
    };
    write(dir, "cpu.max", &format!("{quota} {CFS_PERIOD_US}"))?;
    write(dir, "cpu.weight", &l.cpu_weight.to_string())?;
    write(dir, "memory.max", &l.memory_bytes.to_string())?;
    if dir.join("memory.swap.max").exists() {
        write(dir, "memory.swap.max", &l.swap_bytes.to_string())?;
    }
    write(dir, "pids.max", &l.pids.to_string())?;
    Ok(())
}

pub fn usage(dir: &Path) -> CgroupUsage {
    CgroupUsage {
        cpu_nanos: read_keyed(dir, "cpu.stat", "usage_usec") * 1000,
        memory_bytes: read_u64(dir, "memory.current"),
        memory_peak_bytes: read_u64(dir, "memory.peak"),
        pids: read_u64(dir, "pids.current") as u32,
        oom_kills: read_keyed(dir, "memory.events", "oom_kill"),
    }
}
