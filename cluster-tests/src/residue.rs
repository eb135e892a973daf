//! What a host's agent still holds of VPSes that should be gone: their
//! dirs, scratch dirs of arrivals, migration images in RAM, mounts, cgroups
//! (and any task in them), host-side veths, processes naming their dirs.
//! A test destroys its VPSes, then asks for this to be empty.

use std::path::{Path, PathBuf};

use crate::Cluster;

use crate::sweep::instance_id;

/// Where the agent keeps migration images in RAM (agent/src/paths.rs).
fn ram_images_of(data_dir: &Path) -> PathBuf {
    Path::new("/dev/shm/ferry").join(hex::encode(data_dir.as_os_str().as_encoded_bytes()))
}

fn entries(d: &Path) -> Vec<String> {
    std::fs::read_dir(d)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect()
}

impl Cluster {
    /// Everything host `i`'s agent holds of VPSes (all of them: call it
    /// once the test's VPSes are destroyed), one line each; empty when
    /// nothing is left.
    pub fn residue(&self, i: usize) -> Vec<String> {
        let host = self.dir.join(format!("h{i}"));
        let data = host.join("agent");
        let run = host.join("run");
        let mut left = Vec::new();
        for v in entries(&data.join("vps")) {
            left.push(format!("dir {}", data.join("vps").join(v).display()));
        }
        for w in entries(&data.join("work")) {
            left.push(format!(
                "scratch dir {}",
                data.join("work").join(w).display()
            ));
        }
        for r in entries(&ram_images_of(&data)) {
            left.push(format!("images in RAM {r}"));
        }
        for r in entries(&run) {
            if run.join(&r).is_dir() {
                left.push(format!("run dir {}", run.join(r).display()));
            }
        }
        let data_s = format!("{}/", data.display());
        let run_s = format!("{}/", run.display());
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for m in info.lines().filter_map(|l| l.split(' ').nth(4)) {
            if (m.starts_with(&data_s) && !m.starts_with(&format!("{data_s}templates/")))
                || m.starts_with(&run_s)
            {
                left.push(format!("mount {m}"));
            }
        }
        let inst = Path::new("ferry").join(instance_id(&run));
        for root in crate::reap::cgroup_mounts() {
            let base = root.join(&inst);
            for v in entries(&base) {
                if base.join(&v).is_dir() {
                    let procs = std::fs::read_to_string(base.join(&v).join("cgroup.procs"))
                        .unwrap_or_default();
                    left.push(format!(
                        "cgroup {} (tasks: {})",
                        base.join(v).display(),
                        procs.split_whitespace().collect::<Vec<_>>().join(" ")
                    ));
                }
            }
        }
        let links = std::process::Command::new("ip")
            .args(["-n", &self.net.netns(i), "-o", "link"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for l in links.lines() {
            if let Some(name) = l.split(": ").nth(1) {
                if name.starts_with("fv") {
                    left.push(format!("veth {name}"));
                }
            }
        }
        for vdir in [format!("{data_s}vps/"), format!("{data_s}work/")] {
            for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                if e.file_name()
                    .to_str()
                    .is_none_or(|s| s.parse::<u32>().is_err())
                {
                    continue;
                }
                let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                if cmd.contains(&vdir) {
                    left.push(format!("process {:?}: {cmd}", e.file_name()));
                }
            }
        }
        left
    }
}
