//! The cgroup v2 device filter in a real kernel: the eBPF program is loaded and
//! attached to a cgroup under a cgroup2 mount (this host's hybrid layout has one
//! at /sys/fs/cgroup/unified; a v2 host at /sys/fs/cgroup), and a process in that
//! cgroup may open the listed devices and nothing else.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use ferry_agent::cgroup::devices::{attach, VPS_DEVICES};

fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .find(|l| l.contains(" - cgroup2 "))
        .and_then(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
}

#[test]
fn v2_device_filter_allows_only_the_list() {
    let Some(root) = cgroup2_mount() else {
        println!("SKIPPED: no cgroup2 mount on this host");
        return;
    };
    let cg = root.join(format!("ferry-devtest-{}", std::process::id()));
    let _ = std::fs::remove_dir(&cg);
    std::fs::create_dir(&cg).unwrap();
    struct Rm(PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _rm = Rm(cg.clone());
    attach(&cg, VPS_DEVICES).expect("attach");

    let dir = tempfile::tempdir().unwrap();
    let kmsg = dir.path().join("kmsg");
    let disk = dir.path().join("disk");
    let procs = cg.join("cgroup.procs");
    let script = format!(
        "head -c1 /dev/zero >/dev/null && echo zero-ok; mknod {k} c 1 11 && echo mknod-ok; : < {k} && echo kmsg-open; mknod {d} b 7 0 && : < {d} && echo disk-open; true",
        k = kmsg.display(),
        d = disk.display()
    );
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(script);
    // SAFETY: the closure only writes a file and returns an io::Result.
    unsafe {
        cmd.pre_exec(move || std::fs::write(&procs, "0"));
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("zero-ok"),
        "listed device refused: {stdout} {stderr}"
    );
    assert!(
        stdout.contains("mknod-ok"),
        "mknod is allowed: {stdout} {stderr}"
    );
    assert!(
        !stdout.contains("kmsg-open"),
        "unlisted char device opened: {stdout}"
    );
    assert!(
        !stdout.contains("disk-open"),
        "block device opened: {stdout}"
    );
    assert!(stderr.contains("not permitted"), "{stderr}");
}
