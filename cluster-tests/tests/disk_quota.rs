//! Disk quotas as a tenant meets them: a VPS created with `--disk 256M`
//! that writes 1 GiB gets ENOSPC at 256M, and the host's disk loses at most
//! that; the quota moves with the VPS (live migration) and `vps set --disk`
//! grows it while it runs.

mod common;
use common::*;

use ferry_cluster_tests::{Cluster, Role};

const MIB: u64 = 1 << 20;

/// Free bytes on the file system holding the harness's data dirs.
fn host_free() -> u64 {
    let st = nix::sys::statvfs::statvfs("/var/tmp").expect("statvfs");
    st.blocks_available() * st.fragment_size()
}

/// Runs `script` in VPS `name` through the controller: its output.
fn sh(cl: &Cluster, name: &str, script: &str) -> String {
    let (code, out, err) = cl.ferryctl(&["vps", "exec", name, "--", "sh", "-c", script]);
    assert_eq!(code, 0, "{script}: {out}{err}");
    out
}

/// (size, available) of the VPS's `/` in MiB, as `df` inside it says.
fn df(cl: &Cluster, name: &str) -> (u64, u64) {
    let out = sh(cl, name, "df -k / | tail -1");
    let f: Vec<u64> = out
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(f.len() >= 3, "df said {out:?}");
    (f[0] / 1024, f[2] / 1024)
}

/// Writes up to `mib` MiB into `path` in the VPS: (exit status of dd, its
/// message, the file's size in MiB). Random bytes: zeros would travel (and
/// land) as holes.
fn fill(cl: &Cluster, name: &str, path: &str, mib: u64) -> (i32, String, u64) {
    let out = sh(
        cl,
        name,
        &format!(
            "said=$(dd if=/dev/urandom of={path} bs=1M count={mib} 2>&1); echo rc=$?; \
             echo \"$said\"; ls -l {path}"
        ),
    );
    let rc = out
        .split("rc=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(-1);
    let size = out
        .lines()
        .last()
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    (rc, out, size / MIB)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disk_quota_holds_moves_with_the_vps_and_grows_live() {
    let _one = Cluster::lock().await;
    bounded(400, async {
        let cl = Cluster::start(&[Role::Both, Role::Both, Role::Controller]).await;
        let (_, mut c) = cl.leader().await;
        let name = format!("dq{}", std::process::id());
        let (code, out, err) = cl.ferryctl(&[
            "vps", "create", &name, "--memory", "64M", "--disk", "256M", "--node", "n1", "--start",
        ]);
        assert_eq!(code, 0, "{out}{err}");
        record_when(&mut c, &name, |v| v.observed == "running").await;
        let (size, _) = df(&cl, &name);
        assert!(
            (200..=256).contains(&size),
            "the VPS sees a {size} MiB disk"
        );

        // 1 GiB asked: ENOSPC at the quota; the host lost no more than it.
        let free0 = host_free();
        let (rc, text, got) = fill(&cl, &name, "/big", 1024);
        let lost = free0.saturating_sub(host_free()) / MIB;
        eprintln!("wrote {got} MiB of 1024 (dd rc {rc}); the host's disk lost {lost} MiB\n{text}");
        assert_ne!(rc, 0, "{text}");
        assert!(text.contains("No space left on device"), "{text}");
        assert!((200..=256).contains(&got), "{got} MiB written: {text}");
        assert!(lost <= 256 + 32, "the host lost {lost} MiB");
        let (code, out, err) = cl.ferryctl(&["vps", "show", &name]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains(" used of 256M"), "{out}");

        // Live to n2, full as it is: every file comes along (the arriving
        // disk has room to spare while they land, and keeps it when they
        // need it).
        let (code, out, err) =
            cl.ferryctl(&["vps", "migrate", &name, "--to", "n2", "--mode", "stop-copy"]);
        assert_eq!(code, 0, "{out}{err}{}", cl.logs());
        let v = record_when(&mut c, &name, |v| v.node == "n2").await;
        let l = v.spec.and_then(|s| s.limits).unwrap_or_default();
        assert_eq!(l.disk_bytes, 256 * MIB);
        let big = sh(&cl, &name, "du -sk /big");
        let arrived: u64 = big
            .split_whitespace()
            .next()
            .and_then(|k| k.parse().ok())
            .unwrap_or(0);
        assert!(arrived / 1024 >= got, "{big}: {got} MiB were written on n1");

        // Back to n1 with room to spare: the disk is the quota again there,
        // and a write past it is ENOSPC again.
        sh(
            &cl,
            &name,
            "rm /big && dd if=/dev/urandom of=/mid bs=1M count=100 2>/dev/null",
        );
        let (code, out, err) =
            cl.ferryctl(&["vps", "migrate", &name, "--to", "n1", "--mode", "stop-copy"]);
        assert_eq!(code, 0, "{out}{err}{}", cl.logs());
        record_when(&mut c, &name, |v| v.node == "n1").await;
        let (size, _) = df(&cl, &name);
        assert!(
            (200..=256).contains(&size),
            "{size} MiB on n1 after the move"
        );
        let (rc, text, got) = fill(&cl, &name, "/more", 1024);
        eprintln!("after the moves: {got} MiB more fit beside 100 MiB\n{text}");
        assert_ne!(rc, 0, "the quota did not hold after the move: {text}");
        assert!(got + 100 <= 256, "{got} MiB beside 100 MiB");

        // Grown live: the running VPS sees 512M at once and can write again.
        sh(&cl, &name, "rm -f /more");
        let (code, out, err) = cl.ferryctl(&["vps", "set", &name, "--disk", "512M"]);
        assert_eq!(code, 0, "{out}{err}{}", cl.logs());
        let (size, avail) = df(&cl, &name);
        eprintln!("after set --disk 512M: {size} MiB, {avail} MiB free");
        assert!((450..=512).contains(&size), "{size} MiB after growing");
        let (rc, text, got) = fill(&cl, &name, "/more", 128);
        assert_eq!((rc, got), (0, 128), "{text}");
        // It only grows.
        let (code, out, err) = cl.ferryctl(&["vps", "set", &name, "--disk", "300M"]);
        assert_ne!(code, 0, "{out}");
        assert!(err.contains("only grows"), "{err}");

        // Destroyed: the disk goes (no mount, no loop device left).
        let (code, _, err) = cl.ferryctl(&["vps", "destroy", &name, "--force"]);
        assert_eq!(code, 0, "{err}");
        let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            let loops = std::process::Command::new("losetup")
                .arg("-a")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let left = mounts.contains(&name) || loops.contains(&name);
            if !left {
                break;
            }
            assert!(
                std::time::Instant::now() < end,
                "left behind:\n{mounts}\n{loops}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await;
}
