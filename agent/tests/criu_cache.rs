//! What the agent keeps for CRIU across runs (root; the project's CRIU), so
//! that a run inside a migration's frozen window does less:
//! - CRIU's kernel cache: where /run is no tmpfs, the agent writes the cache
//!   CRIU will not keep, and CRIU then uses it instead of probing the kernel
//!   on every run (restores and lazy-pages daemons);
//! - the cgroup yard: every hierarchy mounted once, instead of CRIU mounting
//!   them all (cgroup2 at 5-35 ms) in every dump and every restore.

use std::path::Path;

use ferry_agent::criu::{kdat, yard, Criu};

#[test]
fn the_cgroup_yard_holds_every_hierarchy_once() {
    let y = yard::prepare().expect("preparing the yard");
    assert_eq!(y, Path::new(yard::YARD));
    assert!(yard::ready(&y), "a hierarchy is missing from the yard");
    let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let hs = yard::hierarchies(&own);
    assert!(!hs.is_empty());
    for h in &hs {
        let fs = nix::sys::statfs::statfs(&y.join(&h.dir))
            .expect("statfs")
            .filesystem_type();
        let want = if h.v1_options.is_some() {
            nix::sys::statfs::CGROUP_SUPER_MAGIC
        } else {
            nix::sys::statfs::CGROUP2_SUPER_MAGIC
        };
        assert_eq!(fs, want, "{} is not its hierarchy", h.dir);
    }
    // A second agent keeps what is there: nothing is stacked on top.
    let mounts = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .expect("mountinfo")
            .lines()
            .filter(|l| {
                l.split(' ')
                    .nth(4)
                    .is_some_and(|m| m.starts_with(yard::YARD))
            })
            .count()
    };
    let before = mounts();
    yard::prepare().expect("preparing again");
    assert_eq!(mounts(), before);
}

#[test]
fn criu_finds_its_kernel_cache_after_the_agent_primes_it() {
    let criu = Criu::default_path();
    let on_tmpfs = nix::sys::statfs::statfs("/run")
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
    if !on_tmpfs {
        // A fresh host: no cache yet (CRIU's own save fails here).
        let _ = std::fs::remove_file(kdat::CACHE);
    }
    let primed = kdat::prime(&criu).expect("priming CRIU's kernel cache");
    if on_tmpfs {
        assert_eq!(primed, kdat::Primed::CriuKeepsIt);
        return;
    }
    assert_eq!(primed, kdat::Primed::Written);
    assert!(Path::new(kdat::CACHE).exists());
    let dir = tempfile::tempdir().expect("tempdir");
    for run in 0..2 {
        let log = dir.path().join(format!("check-{run}.log"));
        let ok = std::process::Command::new(&criu)
            .args(["check", "-v4", "-o"])
            .arg(&log)
            .status()
            .expect("running criu check");
        assert!(ok.success(), "criu check failed");
        let text = std::fs::read_to_string(&log).expect("reading the check log");
        assert!(
            text.contains("Loaded kdat cache"),
            "run {run}: CRIU probed the kernel again:\n{}",
            text.lines().take(8).collect::<Vec<_>>().join("\n")
        );
    }
    // A CRIU run must not have removed it.
    assert!(Path::new(kdat::CACHE).exists());
    // Written since this boot: the next agent keeps it.
    assert_eq!(
        kdat::prime(&criu).expect("priming again"),
        kdat::Primed::Current
    );
}
