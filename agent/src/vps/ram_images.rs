//! A live migration's CRIU images go through RAM when the node has room.
//!
//! The dump writes every page of the VPS's memory inside the frozen window.
//! Here CRIU wrote 256 MiB to a tmpfs in ~270 ms and to the disk in ~560 ms
//! (1.5 GiB: 1.2 s against 3.3 s), and the disk's figure swings with whatever
//! else writes to it. So the source's images dir (`<scratch>/images`) is a
//! link into a tmpfs when MemAvailable leaves room for twice the VPS's memory
//! (the images, and the VPS's copy until the dump ends it) plus a margin.
//! Otherwise, and for checkpoint files, the images go to disk as before.
//!
//! The target keeps receiving to disk: its restore read the images no faster
//! from a tmpfs (the page cache already holds what was just written), and in
//! the bench it was slower at 1 GiB.
//!
//! An agent's RAM dirs live under `/dev/shm/ferry/<its data dir, hex>`, named
//! after the data dir so that any agent can tell an orphan (its data dir is
//! gone, say a test's) and free it. A RAM dir is named like the scratch dir
//! it belongs to, so it is found without following the link.

use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sys::statfs::{statfs, TMPFS_MAGIC};

use super::Agent;
use crate::paths::{Paths, RAM_ROOT};

/// RAM kept free beyond the images and the VPS itself.
const MARGIN: u64 = 512 << 20;

fn tmpfs(p: &str) -> bool {
    statfs(p).is_ok_and(|s| s.filesystem_type() == TMPFS_MAGIC)
}

/// MemAvailable from /proc/meminfo, in bytes (0 when unreadable).
fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb << 10)
        .unwrap_or(0)
}

/// Whether `memory` bytes of VPS can have their images in RAM now.
fn room_for(memory: u64) -> bool {
    mem_available() > memory.saturating_mul(2).saturating_add(MARGIN)
}

impl Agent {
    /// This agent's RAM dir root, if the shared root is ours alone
    /// (/dev/shm is world-writable: anyone could have put something there).
    fn ram_root(&self) -> Option<PathBuf> {
        let m = std::fs::symlink_metadata(RAM_ROOT).ok()?;
        let safe = m.is_dir() && m.uid() == 0 && m.mode() & 0o077 == 0 && tmpfs(RAM_ROOT);
        safe.then(|| Paths::ram_images_of(&self.paths.data_dir))
    }

    /// Makes `<scratch>/images` a link to a RAM dir if there is room for
    /// `memory` bytes of VPS (else the dump creates a plain dir there).
    pub(super) fn images_in_ram(&self, scratch: &Path, memory: u64) {
        let (Some(root), Some(name)) = (self.ram_root(), scratch.file_name()) else {
            return;
        };
        let link = scratch.join("images");
        if !room_for(memory) || link.exists() {
            return;
        }
        let ram = root.join(name);
        match std::fs::create_dir_all(&ram).and_then(|()| std::os::unix::fs::symlink(&ram, &link)) {
            Ok(()) => tracing::info!(dir = %ram.display(), "images in RAM"),
            Err(e) => {
                tracing::warn!(dir = %ram.display(), error = %e, "images go to disk");
                let _ = std::fs::remove_dir_all(&ram);
            }
        }
    }

    /// Removes a scratch dir (unmounting what a killed CRIU left in its
    /// images first) and the RAM dir its images live in, if any.
    pub(super) fn remove_scratch(&self, scratch: &Path) {
        crate::criu::clear_leftover_mounts(&scratch.join("images"));
        if let (Some(root), Some(name)) = (self.ram_root(), scratch.file_name()) {
            let _ = std::fs::remove_dir_all(root.join(name));
            // The agent's root goes too once nothing is in flight.
            let _ = std::fs::remove_dir(root);
        }
        let _ = std::fs::remove_dir_all(scratch);
    }

    /// At start: frees RAM dirs no scratch dir needs any more (migrations
    /// without a journal), and those of agents whose data dir is gone.
    pub(super) fn sweep_ram(&self) {
        let Some(mine) = self.ram_root() else {
            return;
        };
        let work = self.paths.data_dir.join("work");
        if let Ok(rd) = std::fs::read_dir(&mine) {
            for e in rd.flatten() {
                if !work.join(e.file_name()).join("images").exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        if std::fs::read_dir(&mine).is_ok_and(|mut d| d.next().is_none()) {
            let _ = std::fs::remove_dir(&mine);
        }
        let Ok(rd) = std::fs::read_dir(RAM_ROOT) else {
            return;
        };
        for e in rd.flatten() {
            let owner = hex::decode(e.file_name().as_encoded_bytes())
                .ok()
                .map(|b| PathBuf::from(std::ffi::OsString::from_vec(b)));
            if owner.is_some_and(|d| !d.exists()) {
                tracing::info!(dir = %e.path().display(), "freeing the RAM images of an agent whose data dir is gone");
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Creates the shared RAM root, root's alone (images hold VPS memory). A
/// root that is not a plain directory of ours is left alone, and the images
/// go to disk.
pub(super) fn ensure_root() {
    use std::os::unix::fs::DirBuilderExt;
    if !tmpfs("/dev/shm") {
        return;
    }
    let _ = std::fs::DirBuilder::new().mode(0o700).create(RAM_ROOT);
    match std::fs::symlink_metadata(RAM_ROOT) {
        Ok(m) if m.is_dir() && m.uid() == 0 && m.mode() & 0o077 == 0 => {}
        _ => tracing::warn!(
            dir = RAM_ROOT,
            "not a private directory of root's: migration images go to disk"
        ),
    }
}
