//! A manifest of a directory tree: one lstat per entry, no file contents.
//! Two manifests of the same tree taken at different times tell what changed
//! (see [`super::plan`]): that is what keeps the frozen pass short.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ops::Bound;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use ferry_proto::agent::v1::tree_entry::Kind;

use super::watch::Watch;
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
    scan_watched(root, None)
}

/// [`scan`], watching every directory (before reading it) with `watch`, so
/// that a later [`rescan`] can read only what changed.
pub fn scan_watched(root: &Path, mut watch: Option<&mut Watch>) -> Result<Manifest, TreeError> {
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
    walk(root, Path::new(""), dev, &mut out, &mut watch)?;
    Ok(out)
}

/// Adds everything below directory `from` (relative) to `out`.
fn walk(
    root: &Path,
    from: &Path,
    dev: u64,
    out: &mut Manifest,
    watch: &mut Option<&mut Watch>,
) -> Result<(), TreeError> {
    let mut stack = vec![from.to_path_buf()];
    while let Some(rel) = stack.pop() {
        if let Some(w) = watch.as_deref_mut() {
            w.add(root, &rel);
        }
        let dir = root.join(&rel);
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            // Deleted since it was listed (the VPS runs): its parent's event
            // (or the next full walk) accounts for it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !rel.as_os_str().is_empty() => {
                continue
            }
            Err(e) => return Err(TreeError::io(&dir, e)),
        };
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
    Ok(())
}

/// The manifest `prev` brought up to date by reading again only `dirs` (what
/// [`Watch::drain`] reported): each one's own entry and its listing; new
/// directories found there are walked whole (and watched). Every path of a
/// multiply-linked inode seen changing is looked at again too, since a change
/// through one path is reported only in that path's directory.
pub fn rescan(
    root: &Path,
    prev: &Manifest,
    dirs: &BTreeSet<PathBuf>,
    watch: &mut Watch,
) -> Result<Manifest, TreeError> {
    let mut cur = prev.clone();
    let Some(dev) = prev.entries.get(Path::new("")).map(|m| m.dev) else {
        return scan_watched(root, Some(watch));
    };
    // Subtrees walked whole in this rescan: nothing under them needs more.
    let mut fresh: Vec<PathBuf> = Vec::new();
    let mut linked: HashSet<(u64, u64)> = HashSet::new();
    for d in dirs {
        if fresh.iter().any(|f| d.starts_with(f)) {
            continue;
        }
        let full = root.join(d);
        let meta = match std::fs::symlink_metadata(&full) {
            Ok(m) => Meta::from_metadata(&m),
            // Deleted or moved away: the parent's listing accounts for it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !d.as_os_str().is_empty() => {
                continue
            }
            Err(e) => return Err(TreeError::io(&full, e)),
        };
        if meta.kind != Kind::Dir || meta.dev != dev {
            continue;
        }
        let known = cur
            .entries
            .get(d)
            .is_some_and(|o| o.kind == Kind::Dir && o.ino == meta.ino);
        if !known {
            // Not the directory we walked before under this name: walk it.
            if d.as_os_str().is_empty() {
                return scan_watched(root, Some(watch));
            }
            rewalk(root, d, meta, dev, &mut cur, watch)?;
            fresh.push(d.clone());
            continue;
        }
        cur.entries.insert(d.clone(), meta);
        watch.add(root, d);
        let rd = match std::fs::read_dir(&full) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(TreeError::io(&full, e)),
        };
        let mut seen: HashSet<std::ffi::OsString> = HashSet::new();
        for e in rd {
            let e = e.map_err(|e| TreeError::io(&full, e))?;
            let name = e.file_name();
            let child = d.join(&name);
            let meta = match e.metadata() {
                Ok(m) => Meta::from_metadata(&m),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(TreeError::io(&root.join(&child), e)),
            };
            seen.insert(name);
            let old = cur.entries.get(&child);
            for m in old.into_iter().chain([&meta]) {
                if m.nlink > 1 && m.kind != Kind::Dir {
                    linked.insert((m.dev, m.ino));
                }
            }
            let same_dir = old.is_some_and(|o| o.kind == Kind::Dir && o.ino == meta.ino);
            let was_dir = old.is_some_and(|o| o.kind == Kind::Dir);
            if meta.kind == Kind::Dir && meta.dev == dev && !same_dir {
                rewalk(root, &child, meta, dev, &mut cur, watch)?;
                fresh.push(child);
            } else {
                if was_dir && !same_dir {
                    remove_under(&mut cur, &child);
                }
                cur.entries.insert(child, meta);
            }
        }
        // Entries listed before and gone now.
        let depth = d.components().count() + 1;
        let gone: Vec<PathBuf> = children(&cur, d)
            .filter(|p| p.components().count() == depth)
            .filter(|p| p.file_name().is_some_and(|n| !seen.contains(n)))
            .cloned()
            .collect();
        for g in gone {
            remove_under(&mut cur, &g);
        }
    }
    if !linked.is_empty() {
        let paths: Vec<PathBuf> = cur
            .entries
            .iter()
            .filter(|(_, m)| m.kind != Kind::Dir && linked.contains(&(m.dev, m.ino)))
            .map(|(p, _)| p.clone())
            .collect();
        for p in paths {
            match std::fs::symlink_metadata(root.join(&p)) {
                Ok(m) => {
                    cur.entries.insert(p, Meta::from_metadata(&m));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    cur.entries.remove(&p);
                }
                Err(e) => return Err(TreeError::io(&root.join(&p), e)),
            }
        }
    }
    Ok(cur)
}

/// Replaces whatever `m` had at `p` and below with a fresh walk of the
/// directory now there (watched).
fn rewalk(
    root: &Path,
    p: &Path,
    meta: Meta,
    dev: u64,
    m: &mut Manifest,
    watch: &mut Watch,
) -> Result<(), TreeError> {
    remove_under(m, p);
    m.entries.insert(p.to_path_buf(), meta);
    walk(root, p, dev, m, &mut Some(watch))
}

/// Everything below `d` (not `d` itself), in tree order: paths compare by
/// component, so a directory's descendants follow it without a gap.
fn children<'a>(m: &'a Manifest, d: &'a Path) -> impl Iterator<Item = &'a PathBuf> + 'a {
    m.entries
        .range::<Path, _>((Bound::Excluded(d), Bound::Unbounded))
        .map(|(p, _)| p)
        .take_while(move |p| p.starts_with(d))
}

/// Removes `p` and everything below it.
fn remove_under(m: &mut Manifest, p: &Path) {
    let below: Vec<PathBuf> = children(m, p).cloned().collect();
    for b in below {
        m.entries.remove(&b);
    }
    m.entries.remove(p);
}
