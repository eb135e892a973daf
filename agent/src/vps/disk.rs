//! Disk quotas. A VPS given a disk size keeps its own files (the overlay's
//! upper and work dirs) on a filesystem of that size, in a sparse image file
//! loop-mounted beneath its dir, as OpenVZ's ploop did. The kernel enforces
//! it: a write past it fails with ENOSPC inside the VPS, and the host's disk
//! holds only what the VPS wrote. Growing is live: the image file is
//! extended, the loop device told, and the mounted filesystem resized.
//!
//! The filesystem is btrfs (single data and metadata profiles: the image's
//! host filesystem already decides redundancy). ext4 was the first choice,
//! but growing a mounted ext4 needs CAP_SYS_RESOURCE, which an agent need
//! not have (this project's CI hosts do not); a btrfs resize needs only
//! CAP_SYS_ADMIN. Quotas inside one shared filesystem (ext4/xfs project
//! quotas) would avoid the images, but need CONFIG_QUOTA and a host
//! filesystem mounted for them.
//!
//! ```text
//! vps/<name>/disk.img    the image (sparse)
//! vps/<name>/disk/       its mount, for the VPS's whole life on this node
//!             upper/     the VPS's files (owned by its root)
//!             work/      overlayfs's work dir (same filesystem as upper)
//! ```
//!
//! Only images this agent made are ever mounted: a migration or a restore
//! carries files, which land in a fresh image on the receiving node, never
//! an image (a filesystem image is a kernel attack surface).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{AgentError, IoContext, Result};

pub const IMAGE: &str = "disk.img";
pub const MOUNT: &str = "disk";

/// The smallest quota (mkfs.btrfs refuses smaller devices).
pub const MIN_DISK: u64 = 64 << 20;
/// The largest: an image beyond this is a typo.
pub const MAX_DISK: u64 = 64 << 40;

/// Whether the VPS whose dir is `vdir` has a disk quota.
pub fn has_disk(vdir: &Path) -> bool {
    vdir.join(IMAGE).exists()
}

/// The VPS's own files: in its disk when it has one.
pub fn upper(vdir: &Path) -> PathBuf {
    layer(vdir).join("upper")
}

/// overlayfs's work dir, beside `upper`.
pub fn work(vdir: &Path) -> PathBuf {
    layer(vdir).join("work")
}

fn layer(vdir: &Path) -> PathBuf {
    if has_disk(vdir) {
        vdir.join(MOUNT)
    } else {
        vdir.to_path_buf()
    }
}

fn run(what: &str, cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .map_err(|e| AgentError::io(format!("running {what}"), e))?;
    if !out.status.success() {
        return Err(AgentError::Internal(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes a `bytes` image with an empty filesystem in `vdir` (not mounted
/// yet).
pub fn make(vdir: &Path, bytes: u64) -> Result<()> {
    check_size(bytes.min(MAX_DISK))?;
    let img = vdir.join(IMAGE);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&img)
        .at("creating the disk image", &img)?;
    f.set_len(bytes).at("sizing the disk image", &img)?;
    drop(f);
    // Single profiles: metadata twice on one image file only costs space
    // (256M gave 175M of files with the default DUP, 243M without).
    run(
        "mkfs.btrfs",
        Command::new("mkfs.btrfs")
            .args(["-q", "-f", "-m", "single", "-d", "single", "--nodiscard"])
            .arg(&img),
    )?;
    std::fs::create_dir_all(vdir.join(MOUNT)).at("creating", vdir.join(MOUNT))?;
    tracing::info!(bytes, "made a disk image");
    Ok(())
}

/// Mounts the VPS's disk (if it has one and it is not mounted), with its
/// upper and work dirs; `owner` gets the upper dir (the VPS's root).
pub fn mount(vdir: &Path, owner: Option<u32>) -> Result<()> {
    if !has_disk(vdir) {
        return Ok(());
    }
    let mnt = vdir.join(MOUNT);
    std::fs::create_dir_all(&mnt).at("creating", &mnt)?;
    if !super::is_mounted(&mnt) {
        // `loop` has mount(8) attach a loop device that detaches itself at
        // the unmount (autoclear).
        run(
            "mount",
            Command::new("mount")
                .args(["-t", "btrfs", "-o", "loop,nodev"])
                .arg(vdir.join(IMAGE))
                .arg(&mnt),
        )?;
    }
    for d in ["upper", "work"] {
        std::fs::create_dir_all(mnt.join(d)).at("creating", mnt.join(d))?;
    }
    if let Some(base) = owner {
        std::os::unix::fs::chown(mnt.join("upper"), Some(base), Some(base))
            .at("handing to the VPS's root", mnt.join("upper"))?;
    }
    Ok(())
}

/// Unmounts the VPS's disk (its loop device goes with it).
pub fn unmount(vdir: &Path) -> Result<()> {
    let mnt = vdir.join(MOUNT);
    if super::is_mounted(&mnt) {
        nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH).map_err(|e| {
            AgentError::io(
                format!("unmounting the disk at {}", mnt.display()),
                e.into(),
            )
        })?;
    }
    Ok(())
}

/// A quota's size is between [`MIN_DISK`] and [`MAX_DISK`].
pub(crate) fn check_size(bytes: u64) -> Result<()> {
    if !(MIN_DISK..=MAX_DISK).contains(&bytes) {
        return Err(AgentError::invalid(
            "limits.disk_bytes",
            format!("{bytes} is not between {MIN_DISK} and {MAX_DISK} (or 0: no quota)"),
        ));
    }
    Ok(())
}

/// The image's size now.
pub fn size(vdir: &Path) -> Option<u64> {
    std::fs::metadata(vdir.join(IMAGE)).ok().map(|m| m.len())
}

/// The room an arriving VPS's disk gets beyond its quota while its files
/// come in. The same files written by a migration's sync took more of a
/// btrfs than on the source (a VPS filled to 256M needed about 267M: other
/// extents, partly used data chunks), so one filled to its quota did not
/// fit an image of the quota's size. [`fit`] takes the room back after.
pub fn arrival_room(bytes: u64) -> u64 {
    (bytes / 4).clamp(64 << 20, 2 << 30)
}

/// Shrinks an arrived VPS's filesystem to its quota, live. When its files
/// need more (it arrived full), the room stays, and the VPS may hold up to
/// [`arrival_room`] more than its quota on this node.
pub fn fit(vdir: &Path, quota: u64) {
    if quota == 0 || !has_disk(vdir) {
        return;
    }
    if usage(vdir).is_some_and(|(size, _)| size <= quota) {
        return;
    }
    let r = run(
        "btrfs filesystem resize",
        Command::new("btrfs")
            .args(["filesystem", "resize", &quota.to_string()])
            .arg(vdir.join(MOUNT)),
    );
    match r {
        Ok(_) => tracing::info!(quota, "the disk is back to its quota"),
        Err(e) => {
            tracing::warn!(quota, error = %e, "the arrived files need more than the quota: the disk keeps its room")
        }
    }
}

/// Grows the mounted disk to `bytes`, live (the image first, if it is
/// smaller; nothing shrinks here).
pub fn grow(vdir: &Path, bytes: u64) -> Result<()> {
    check_size(bytes)?;
    let img = vdir.join(IMAGE);
    let now = size(vdir).ok_or_else(|| {
        AgentError::FailedPrecondition(
            "the VPS was created without a disk quota; one is given at create".into(),
        )
    })?;
    if usage(vdir).is_some_and(|(size, _)| size >= bytes) {
        return Ok(());
    }
    if bytes <= now {
        // The image is big enough already (an arrival's room).
        return resize(vdir, bytes);
    }
    let dev = run(
        "losetup",
        Command::new("losetup")
            .args(["--noheadings", "--output", "NAME", "--associated"])
            .arg(&img),
    )?;
    let dev = dev
        .lines()
        .next()
        .map(str::trim)
        .filter(|d| d.starts_with("/dev/loop"))
        .ok_or_else(|| {
            AgentError::FailedPrecondition(format!("the disk {} is not mounted", img.display()))
        })?
        .to_string();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .at("opening the disk image", &img)?;
    f.set_len(bytes).at("growing the disk image", &img)?;
    drop(f);
    run(
        "losetup",
        Command::new("losetup").arg("--set-capacity").arg(&dev),
    )?;
    resize(vdir, bytes)
}

/// Resizes the mounted filesystem to `bytes`.
fn resize(vdir: &Path, bytes: u64) -> Result<()> {
    run(
        "btrfs filesystem resize",
        Command::new("btrfs")
            .args(["filesystem", "resize", &bytes.to_string()])
            .arg(vdir.join(MOUNT)),
    )?;
    Ok(())
}

/// (size, used) of the mounted disk, in bytes.
pub fn usage(vdir: &Path) -> Option<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(&vdir.join(MOUNT)).ok()?;
    let frsize = st.fragment_size();
    let size = st.blocks() * frsize;
    let used = (st.blocks() - st.blocks_free()) * frsize;
    Some((size, used))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_follows_the_image() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(upper(d.path()), d.path().join("upper"));
        std::fs::write(d.path().join(IMAGE), b"").unwrap();
        assert_eq!(upper(d.path()), d.path().join("disk/upper"));
        assert_eq!(work(d.path()), d.path().join("disk/work"));
    }

    #[test]
    fn sizes_are_checked() {
        assert!(check_size(MIN_DISK).is_ok());
        assert!(check_size(MIN_DISK - 1).is_err());
        assert!(check_size(MAX_DISK + 1).is_err());
    }
}
