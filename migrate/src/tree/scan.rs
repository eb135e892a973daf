//! A manifest of a directory tree: one lstat per entry, no file contents.
//! Two manifests of the same tree taken at different times tell what changed
//! (see [`super::plan`]): that is what keeps the frozen pass short.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use ferry_proto::agent::v1::tree_entry::Kind;

use super::TreeError;

/// What lstat says about one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    /// Permission bits and setuid/setgid/sticky (no file type).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
    pub rdev: u64,
}

impl Meta {
    pub fn from_metadata(m: &std::fs::Metadata) -> Meta {
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_char_device() {
            Kind::Char
        } else if ft.is_block_device() {
            Kind::Block
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_socket() {
            Kind::Socket
        } else {
            Kind::File
        };
        Meta {
            kind,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec() as u32),
            ctime: (m.ctime(), m.ctime_nsec() as u32),
            dev: m.dev(),
            ino: m.ino(),
            nlink: m.nlink(),
            rdev: m.rdev(),
        }
    }

    /// Same content and metadata as far as lstat can tell. ctime moves on any
    /// change to the inode (data, mode, owner, xattrs, link count) and cannot be
    /// set from user space, so an unchanged ctime on the same inode means unchanged.
    pub fn unchanged(&self, other: &Meta) -> bool {
        self.kind == other.kind
            && self.ino == other.ino
            && self.dev == other.dev
            && self.ctime == other.ctime
            && self.mtime == other.mtime
            && self.size == other.size
    }
}

/// Paths are relative to the tree's root, which itself is "" (an empty path).
#[derive(Debug, Clone, Default)]
pub struct Manifest {
    pub entries: BTreeMap<PathBuf, Meta>,
}

impl Manifest {
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Walks `root` without following symlinks or crossing into other file systems.
pub fn scan(root: &Path) -> Result<Manifest, TreeError> {
    let mut out = Manifest::default();
    let top = std::fs::symlink_metadata(root).map_err(|e| TreeError::io(root, e))?;
    if !top.is_dir() {
        return Err(TreeError::Invalid(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let dev = top.dev();
    out.entries
        .insert(PathBuf::new(), Meta::from_metadata(&top));
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let rd = std::fs::read_dir(&dir).map_err(|e| TreeError::io(&dir, e))?;
        for e in rd {
            let e = e.map_err(|e| TreeError::io(&dir, e))?;
            let child = rel.join(e.file_name());
            // lstat relative to the open directory (DirEntry::metadata does
            // not follow symlinks): no walk of the whole path per entry.
            let m = match e.metadata() {
                Ok(m) => m,
                // Gone between readdir and lstat: a running VPS deletes files.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(TreeError::io(&root.join(&child), e)),
            };
            let meta = Meta::from_metadata(&m);
            if meta.kind == Kind::Dir && meta.dev == dev {
                stack.push(child.clone());
            }
            out.entries.insert(child, meta);
        }
    }
    Ok(out)
}
