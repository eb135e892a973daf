//! Lets a lazy restore of an unprivileged VPS make its userfaultfd.
//!
//! CRIU's lazy restore (post-copy, and the stop-copy that runs before its
//! memory is in) has every restored task open a userfaultfd for its own
//! memory (criu/uffd.c, `uffd_open`: `syscall(SYS_userfaultfd, O_CLOEXEC |
//! O_NONBLOCK)`). The kernel allows one that handles kernel-mode faults only
//! to a caller with CAP_SYS_PTRACE in the *initial* user namespace, or when
//! `vm.unprivileged_userfaultfd` is 1 (fs/userfaultfd.c,
//! `userfaultfd_syscall_allowed`). Tasks restored into their own user
//! namespace have neither: the restore fails with "uffd: Unable to open an
//! userfaultfd descriptor: Operation not permitted".
//!
//! So the sysctl is 1 only while such a restore runs, and set back to what
//! it was when the last one ends. Every agent on the kernel shares it, so
//! holds are host-wide: one file per hold under [`DIR`], flock-held for the
//! hold's life (a holder that dies lets go by itself), the switch serialized
//! by a lock file. VPSes themselves never get a userfaultfd: their seccomp
//! filter refuses the call, and CRIU's tasks make theirs before the filter is
//! restored.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const SYSCTL: &str = "/proc/sys/vm/unprivileged_userfaultfd";
/// Host-wide, whatever agent holds it.
pub const DIR: &str = "/run/ferry-uffd";
const LOCK: &str = ".lock";
/// The sysctl's value before the first hold.
const ORIGINAL: &str = ".original";

/// A hold; dropping it lets go.
pub struct Grant {
    file: Option<(PathBuf, File)>,
}

fn flock(f: &File, how: libc::c_int) -> bool {
    // SAFETY: flock on a descriptor we own.
    unsafe { libc::flock(f.as_raw_fd(), how) == 0 }
}

/// Serializes the switch between holders (blocking).
fn switch_lock(dir: &Path) -> std::io::Result<File> {
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK))?;
    if !flock(&f, libc::LOCK_EX) {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

/// Takes a hold: the sysctl is 1 until it drops. A kernel where it is 1
/// already (set by the host's admin) is left alone.
pub fn grant() -> Result<Grant, String> {
    let dir = Path::new(DIR);
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {DIR}: {e}"))?;
    let _switch = switch_lock(dir).map_err(|e| format!("locking {DIR}: {e}"))?;
    let now = std::fs::read_to_string(SYSCTL)
        .map_err(|e| format!("reading {SYSCTL}: {e}"))?
        .trim()
        .to_string();
    let original = dir.join(ORIGINAL);
    if now == "1" && !original.exists() {
        return Ok(Grant { file: None });
    }
    let path = dir.join(format!(
        "hold-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let f = File::create(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
    if !flock(&f, libc::LOCK_EX | libc::LOCK_NB) {
        return Err(format!("locking {}", path.display()));
    }
    if !original.exists() {
        std::fs::write(&original, &now)
            .map_err(|e| format!("writing {}: {e}", original.display()))?;
    }
    if now != "1" {
        if let Err(e) = std::fs::write(SYSCTL, "1") {
            let _ = std::fs::remove_file(&path);
            return Err(format!("setting {SYSCTL}: {e}"));
        }
    }
    Ok(Grant {
        file: Some((path, f)),
    })
}

impl Drop for Grant {
    fn drop(&mut self) {
        let Some((path, f)) = self.file.take() else {
            return;
        };
        let dir = Path::new(DIR);
        let Ok(_switch) = switch_lock(dir) else {
            return;
        };
        let _ = std::fs::remove_file(&path);
        drop(f);
        if !others_hold(dir) {
            put_back(dir);
        }
    }
}

/// Is any other hold alive? Holds whose holder died are removed.
fn others_hold(dir: &Path) -> bool {
    let mut alive = false;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if !e.file_name().to_string_lossy().starts_with("hold-") {
            continue;
        }
        match File::open(&p) {
            Ok(f) if flock(&f, libc::LOCK_EX | libc::LOCK_NB) => {
                let _ = std::fs::remove_file(&p);
            }
            Ok(_) => alive = true,
            Err(_) => {}
        }
    }
    alive
}

fn put_back(dir: &Path) {
    let original = dir.join(ORIGINAL);
    if let Ok(v) = std::fs::read_to_string(&original) {
        if std::fs::write(SYSCTL, v.trim()).is_ok() {
            let _ = std::fs::remove_file(&original);
        }
    }
}

/// At agent start: holds left by holders that died with the sysctl still
/// set (a killed monitor) are cleared and the sysctl put back.
pub fn sweep() {
    let dir = Path::new(DIR);
    if !dir.is_dir() {
        return;
    }
    if let Ok(_switch) = switch_lock(dir) {
        if !others_hold(dir) {
            put_back(dir);
        }
    }
}
