//! Multi-host tests with faults. A [`Cluster`] is N hosts on this machine,
//! each a network namespace with its own data dirs and two networks, like
//! `scripts/cluster-demo.sh`: a management network its daemons listen on
//! (TCP, mutual TLS) and the VPS LAN its node bridge is plugged into. Each
//! host runs a `ferry-controller` replica and/or a `ferry-agent` as real
//! processes. Fault verbs: SIGKILL and restart a daemon, SIGSTOP/SIGCONT it,
//! cut a host off both networks and heal it. The [`checker`] watches that no
//! VPS ever runs twice and no counter goes back.
//!
//! # Layout
//! - [`net`]: bridges, namespaces, veths; cutting and healing a host.
//! - [`daemon`]: a daemon process inside a host, and the fault verbs on it.
//! - [`cluster`]: forming the cluster (CA, join tokens), clients, ferryctl.
//! - [`checker`]: the exactly-once checker.
//! - [`residue`]: what an agent still holds of VPSes that should be gone.
//! - [`sweep`]: teardown, also of what a killed earlier run left; [`reap`]:
//!   killing and unmounting what a run left.
//!
//! Tests need root and the workspace's binaries built (`scripts/test.sh`
//! builds them first).

pub mod checker;
pub mod cluster;
pub mod daemon;
pub mod net;
pub mod reap;
pub mod residue;
pub mod sweep;

pub use cluster::{Cluster, Role};

/// Where the harness keeps each run's hosts (one dir per run, named after
/// the test process so a later run can tell a dead run's leftovers).
pub const ROOT: &str = "/var/tmp/ferry-ctests";

/// The directory holding the workspace's binaries (next to this test's).
pub fn bin_dir() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test>-<hash> → target/<profile>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.to_path_buf())
        .unwrap_or_default();
    for b in ["ferry-agent", "ferry-controller", "ferryctl"] {
        assert!(
            dir.join(b).exists(),
            "{} missing: build the workspace first (cargo build --workspace; scripts/test.sh does)",
            dir.join(b).display()
        );
    }
    dir
}

/// Runs a command that must succeed (setup steps).
pub fn run_ok(cmd: &str, args: &[&str]) {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a command, ignoring how it ends (teardown steps).
pub fn run_quiet(cmd: &str, args: &[&str]) {
    let _ = std::process::Command::new(cmd)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}
