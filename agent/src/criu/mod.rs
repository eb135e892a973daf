//! Checkpoint and restore through CRIU's RPC (`criu swrk`), never its CLI output.
//!
//! - [`rpc`]: our prost definitions of CRIU's published `rpc.proto`.
//! - [`swrk`]: one worker process and its socketpair.
//! - [`probe`](Criu::probe): version and kernel features, at agent start.
//! - [`kdat`]: CRIU's kernel cache, primed at start where CRIU cannot keep it.
//! - [`dump`] / [`restore`]: the options a Ferry VPS needs, each explained.
//! - [`pre_dump`]: pre-copy's rounds: the memory while the VPS runs.
//! - [`yard`]: every cgroup hierarchy mounted once for CRIU, not per run.
//! - [`lazy`]: post-copy: the target's `criu lazy-pages` daemon and its helpers.
//! - [`uffd_grant`]: the host-wide switch an unprivileged VPS's lazy restore needs.
//!
//! The CRIU binary comes from `--criu` (default: the project prefix that
//! `scripts/install-criu.sh` fills, then `criu` on PATH).

pub mod dump;
pub mod kdat;
pub mod lazy;
pub mod pre_dump;
pub mod restore;
pub mod rpc;
pub mod swrk;
pub mod tunnel;
pub mod uffd_grant;
pub mod yard;

use std::path::{Path, PathBuf};

use rpc::{Features, Req, ReqType};

/// Where `scripts/install-criu.sh` puts its wrapper.
pub const PROJECT_CRIU: &str = "/opt/ferry/criu/bin/criu";
/// The oldest CRIU that can dump TCP sockets on kernels >= 6.16.
pub const MIN_VERSION: (i32, i32) = (4, 2);
/// What an operator runs when CRIU is missing or too old.
pub const INSTALL_HINT: &str =
    "run scripts/install-criu.sh (installs CRIU >= 4.2 into /opt/ferry/criu) \
     and restart the agent, or point --criu at a working CRIU >= 4.2";

#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("starting criu: {0}")]
    Spawn(String),
    #[error("criu rpc: {0}")]
    Rpc(String),
    #[error("criu is not usable on this node: {0}; {INSTALL_HINT}")]
    Unavailable(String),
    #[error("criu {op} failed: {msg}")]
    Failed { op: &'static str, msg: String },
}

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CriuInfo {
    pub path: PathBuf,
    pub version: String,
    /// Post-copy: userfaultfd-backed lazy pages.
    pub lazy_pages: bool,
    /// Pre-copy: soft-dirty memory tracking.
    pub mem_track: bool,
}

/// The configured CRIU binary and what it can do (or why it cannot).
#[derive(Debug, Clone)]
pub struct Criu {
    pub path: PathBuf,
    pub info: Result<CriuInfo, String>,
}

impl Criu {
    /// The default binary: the project's prefix if installed, else PATH.
    pub fn default_path() -> PathBuf {
        if Path::new(PROJECT_CRIU).exists() {
            PathBuf::from(PROJECT_CRIU)
        } else {
            PathBuf::from("criu")
        }
    }

    /// Asks the binary for its version and kernel features. Never fails: a
    /// broken CRIU is remembered and named in every checkpoint call's error.
    pub fn probe(path: PathBuf) -> Criu {
        let info = probe(&path).map_err(|e| e.to_string());
        if info.is_ok() {
            match kdat::prime(&path) {
                Ok(kdat::Primed::Written) => {
                    tracing::info!(
                        cache = kdat::CACHE,
                        "/run is not a tmpfs: wrote CRIU's kernel cache for it"
                    )
                }
                Ok(kdat::Primed::CriuKeepsIt | kdat::Primed::Current) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "no CRIU kernel cache: every CRIU run probes the kernel (~30 ms)")
                }
            }
        }
        Criu { path, info }
    }

    /// The probe's result, or an error saying what to run.
    pub fn usable(&self) -> Result<&CriuInfo, CriuError> {
        self.info
            .as_ref()
            .map_err(|e| CriuError::Unavailable(e.clone()))
    }
}

fn probe(path: &Path) -> Result<CriuInfo, CriuError> {
    let mut w = swrk::Swrk::spawn(path, &[], true).map_err(|e| {
        CriuError::Unavailable(format!("{} cannot be started ({e})", path.display()))
    })?;
    w.send(&Req {
        r#type: ReqType::Version as i32,
        keep_open: Some(true),
        ..Default::default()
    })?;
    let v = w.recv()?;
    let ver = v
        .version
        .filter(|_| v.success)
        .ok_or_else(|| CriuError::Unavailable("criu did not report its version".into()))?;
    let version = format!(
        "{}.{}{}",
        ver.major_number,
        ver.minor_number,
        ver.sublevel.map(|s| format!(".{s}")).unwrap_or_default()
    );
    if (ver.major_number, ver.minor_number) < MIN_VERSION {
        return Err(CriuError::Unavailable(format!(
            "{} is CRIU {version}; Ferry needs >= {}.{} (older releases cannot dump TCP sockets on this kernel)",
            path.display(),
            MIN_VERSION.0,
            MIN_VERSION.1
        )));
    }
    let f = w.call(
        &Req {
            r#type: ReqType::FeatureCheck as i32,
            features: Some(Features {
                mem_track: Some(true),
                lazy_pages: Some(true),
                pidfd_store: None,
            }),
            ..Default::default()
        },
        |_, _| false,
    )?;
    let feats = f.features.unwrap_or_default();
    Ok(CriuInfo {
        path: path.to_path_buf(),
        version,
        lazy_pages: feats.lazy_pages.unwrap_or(false),
        mem_track: feats.mem_track.unwrap_or(false),
    })
}

/// Why a CRIU request failed: its own message (unless it is the harmless
/// RLIMIT line this root always gets), then the last errors of its log.
/// With FERRY_CRIU_KEEP_LOGS=DIR, a copy of each CRIU log goes to DIR (a
/// migration's image dir, and its log, go when it ends): for profiling and
/// post-mortems, with FERRY_CRIU_LOG_LEVEL=4 for timestamps.
pub fn keep_log(log: &Path) {
    let Some(dir) = std::env::var_os("FERRY_CRIU_KEEP_LOGS") else {
        return;
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = log
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let to = Path::new(&dir).join(format!("{nanos}-{name}"));
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|_| std::fs::copy(log, &to)) {
        tracing::warn!(error = %e, log = %log.display(), "FERRY_CRIU_KEEP_LOGS: could not copy");
    }
}

pub fn failure(errmsg: Option<String>, log: &Path) -> String {
    format!(
        "{}{}",
        errmsg
            .filter(|m| !m.contains("RLIMIT_NOFILE"))
            .map(|m| format!("{m}: "))
            .unwrap_or_default(),
        log_tail(log)
    )
}

/// The last error lines of a CRIU log, for an operator-facing message.
pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") || l.contains("error"))
        // Always logged here: this root lacks CAP_SYS_RESOURCE; harmless.
        .filter(|l| !l.contains("RLIMIT_NOFILE"))
        .collect();
    let pick = if errors.is_empty() {
        text.lines().rev().take(3).collect::<Vec<_>>()
    } else {
        errors.iter().rev().take(3).copied().collect()
    };
    let mut pick: Vec<String> = pick.iter().map(|l| l.trim().to_string()).collect();
    pick.reverse();
    format!("{} (log: {})", pick.join(" | "), log.display())
}

/// Removes a CRIU work dir, unmounting what a killed CRIU left in it first.
pub fn remove_work_dir(dir: &Path) {
    clear_leftover_mounts(dir);
    let _ = std::fs::remove_dir_all(dir);
}

/// Unmounts what a killed CRIU restore leaves in its work dir (`.criu.cgyard.*`
/// cgroupfs mounts): a recursive delete would walk into /sys/fs/cgroup otherwise.
pub fn clear_leftover_mounts(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with(".criu.cgyard") {
            let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}
