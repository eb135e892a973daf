//! CRIU's kernel cache (root; the project's CRIU): where /run is no tmpfs,
//! the agent writes the cache CRIU will not keep, and CRIU then uses it
//! instead of probing the kernel on every run (restores and lazy-pages
//! daemons run inside a migration's frozen window).

use std::path::Path;

use ferry_agent::criu::{kdat, Criu};

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
