//! Templates: read-only root filesystems a VPS starts from (the overlay's lower
//! layer). Imported from tar, tar.gz or tar.zst archives, or built in (busybox).
//!
//! A template is first unpacked into `staging/` and renamed into `templates/`
//! only once complete, so a failed import leaves nothing behind.

mod busybox;
mod import;
mod ops;

pub use busybox::ensure_busybox;
pub use import::{detect_format, unpack, unpack_keeping, Format, ImportLimits};

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{AgentError, IoContext, Result};
use crate::paths::Paths;

pub const META_FILE: &str = "template.json";
/// The archive a template was imported from, kept for nodes that fetch it.
pub const ARCHIVE_FILE: &str = "archive";
/// Under `templates/`: replaced templates' trees, kept for the VPSes that
/// still run on them.
pub const RETIRED: &str = ".retired";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateMeta {
    pub name: String,
    pub size_bytes: u64,
    pub sha256: String,
    pub source: String,
    pub imported_unix: i64,
    pub file_count: u32,
}

impl TemplateMeta {
    pub fn to_pb(&self) -> ferry_proto::agent::v1::Template {
        ferry_proto::agent::v1::Template {
            name: self.name.clone(),
            size_bytes: self.size_bytes,
            sha256: self.sha256.clone(),
            source: self.source.clone(),
            imported_unix: self.imported_unix,
            file_count: self.file_count,
        }
    }
}

pub fn rootfs(paths: &Paths, name: &str) -> PathBuf {
    paths.template(name).join("rootfs")
}

pub fn get(paths: &Paths, name: &str) -> Result<TemplateMeta> {
    let p = paths.template(name).join(META_FILE);
    let bytes = std::fs::read(&p).map_err(|_| AgentError::not_found("template", name))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| AgentError::Internal(format!("corrupt {}: {e}", p.display())))
}

pub fn list(paths: &Paths) -> Result<Vec<TemplateMeta>> {
    let mut out = Vec::new();
    let dir = paths.templates();
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Ok(out);
    };
    for e in rd.flatten() {
        if let Some(name) = e.file_name().to_str() {
            if let Ok(m) = get(paths, name) {
                out.push(m);
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Moves a finished staging dir (holding `rootfs/`) into place as template
/// `name`; returns where a replaced template's tree went.
pub fn install(
    paths: &Paths,
    staged: &Path,
    meta: &TemplateMeta,
    replace: bool,
) -> Result<Option<PathBuf>> {
    let json = serde_json::to_vec_pretty(meta).map_err(|e| AgentError::Internal(e.to_string()))?;
    std::fs::write(staged.join(META_FILE), json).at("writing", staged.join(META_FILE))?;
    let dest = paths.template(&meta.name);
    std::fs::create_dir_all(paths.templates()).at("creating", paths.templates())?;
    if dest.exists() {
        if !replace {
            return Err(AgentError::exists("template", &meta.name));
        }
        // Kept, not removed: a VPS running on the old tree keeps it as its
        // overlay's lower layer until it restarts (replacing one in use needs
        // force). `ls` skips the dir, which holds no template.json at its top.
        let retired = paths.templates().join(RETIRED);
        std::fs::create_dir_all(&retired).at("creating", &retired)?;
        let old = retired.join(format!("{}-{}", meta.name, unix_now()));
        std::fs::rename(&dest, &old).at("moving aside", &dest)?;
        std::fs::rename(staged, &dest).at("installing template", &dest)?;
        Ok(Some(old))
    } else {
        std::fs::rename(staged, &dest).at("installing template", &dest)?;
        Ok(None)
    }
}

/// Removes a directory tree without following symlinks (template trees hold
/// absolute symlinks that point into the host if followed).
pub fn remove_tree(p: &Path) -> Result<()> {
    match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AgentError::io(format!("inspecting {}", p.display()), e)),
        // remove_dir_all does not follow symlinks.
        Ok(_) => std::fs::remove_dir_all(p).at("removing", p),
    }
}

/// Size and file count of a tree, not following symlinks and counting each
/// hard-linked inode once.
pub fn tree_usage(root: &Path) -> (u64, u32) {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut size = 0u64;
    let mut count = 0u32;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            count += 1;
            if m.is_dir() {
                stack.push(e.path());
            }
            if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            size += m.blocks() * 512;
        }
    }
    (size, count)
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
