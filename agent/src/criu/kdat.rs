//! CRIU's cache of what it found out about the kernel (`/run/criu.kdat`).
//!
//! Every CRIU run first probes the kernel (25–35 ms here) unless that file
//! exists, and CRIU writes it only when /run is a tmpfs, so that a reboot
//! clears it. On a host whose /run is a plain directory (this one), every
//! restore and every `criu lazy-pages` paid the probe inside a migration's
//! frozen window. The agent runs `criu check` once at start with a private
//! tmpfs on /run and installs the file CRIU wrote there. A file written since
//! this boot is kept (every agent on the host would otherwise redo it); an
//! older one may describe another kernel and is written again.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::statfs::{statfs, TMPFS_MAGIC};

/// Where CRIU (running as root) looks for the cache.
pub const CACHE: &str = "/run/criu.kdat";

#[derive(Debug, PartialEq, Eq)]
pub enum Primed {
    /// /run is a tmpfs: CRIU keeps the cache itself.
    CriuKeepsIt,
    /// Written since this boot already.
    Current,
    /// Written by the agent now.
    Written,
}

/// When this boot began (`btime` of /proc/stat).
fn boot_time() -> Option<SystemTime> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let secs: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// Makes sure CRIU finds its kernel cache (see the module doc).
pub fn prime(criu: &Path) -> Result<Primed, String> {
    if statfs("/run").is_ok_and(|s| s.filesystem_type() == TMPFS_MAGIC) {
        return Ok(Primed::CriuKeepsIt);
    }
    let written = std::fs::metadata(CACHE).and_then(|m| m.modified()).ok();
    if let (Some(w), Some(boot)) = (written, boot_time()) {
        if w > boot {
            return Ok(Primed::Current);
        }
    }
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#""$0" check >/dev/null 2>&1; cat /run/criu.kdat"#)
        .arg(criu);
    // SAFETY: between fork and exec the child makes only raw syscalls
    // (unshare, mount) on static C strings: no allocation, no locks. The new
    // mount namespace is the child's alone, and private, so the tmpfs on /run
    // never shows on the host.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let none = std::ptr::null();
            if libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::mount(
                c"ferry-kdat".as_ptr(),
                c"/run".as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c"size=1m,mode=755".as_ptr().cast(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd
        .output()
        .map_err(|e| format!("running {} check: {e}", criu.display()))?;
    if out.stdout.is_empty() {
        return Err(format!(
            "{} check wrote no kernel cache ({})",
            criu.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let tmp = format!("{CACHE}.ferry-{}", std::process::id());
    std::fs::write(&tmp, &out.stdout)
        .and_then(|()| std::fs::rename(&tmp, CACHE))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("writing {CACHE}: {e}")
        })?;
    Ok(Primed::Written)
}
