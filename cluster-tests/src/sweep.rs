//! Teardown of a run's hosts, and of what a killed earlier run left: its
//! daemons and VPS tasks (by the dir on their command line, and by their
//! agents' cgroups), mounts under its dir, the dir, namespaces and links.
//! A run's id is `fc<pid>x<n>`: a run whose process is gone is swept.

use std::path::Path;

use sha2::Digest;

use crate::net::Net;
use crate::ROOT;

/// The agent's cgroup parent is named after its run dir (agent/src/paths.rs).
pub(crate) fn instance_id(run_dir: &Path) -> String {
    hex::encode(&sha2::Sha256::digest(run_dir.as_os_str().as_encoded_bytes())[..6])
}

/// Removes run `id` (its `hosts` hosts) entirely.
pub fn teardown(id: &str, hosts: usize) {
    let dir = Path::new(ROOT).join(id);
    let dir_s = format!("{}/", dir.to_string_lossy());
    crate::reap::kill_naming(&dir_s);
    for i in 1..=hosts {
        let inst = instance_id(&dir.join(format!("h{i}/run")));
        crate::reap::kill_cgroup_tree(&Path::new("ferry").join(inst));
    }
    crate::reap::unmount_under(&dir_s);
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
