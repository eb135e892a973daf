//! The receiving side: writes `TreeItem`s into a directory. Blocking.
//!
//! Every entry replaces what is at its path (a different kind is removed
//! first). Owners, modes, xattrs and mtimes are set exactly; a directory's
//! metadata is set once its contents are written, at [`Applier::finish`].

use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ferry_proto::agent::v1::tree_entry::Kind;
use ferry_proto::agent::v1::{tree_item, FileData, TreeEntry, TreeItem};
use nix::sys::stat::{Mode, SFlag};
use nix::sys::time::TimeSpec;

use super::{wire_path, TreeError};

#[derive(Debug, Default, Clone, Copy)]
pub struct ApplyStats {
    pub entries: u64,
    pub bytes: u64,
}

pub struct Applier {
    root: PathBuf,
    /// The file being written; `true`: made new by this entry.
    open: Option<(std::fs::File, PathBuf, TreeEntry, bool)>,
    dirs: Vec<(PathBuf, TreeEntry)>,
    /// Directories we change by adding or removing a child, with their mtime
    /// before: put back at the end unless the sender sends the directory too.
    touched: std::collections::BTreeMap<PathBuf, (i64, i64)>,
    stats: ApplyStats,
}

impl Applier {
    pub fn new(root: &Path) -> Result<Applier, TreeError> {
        std::fs::create_dir_all(root).map_err(|e| TreeError::io(root, e))?;
        Ok(Applier {
            root: root.to_path_buf(),
            open: None,
            dirs: Vec::new(),
            touched: Default::default(),
            stats: ApplyStats::default(),
        })
    }

    pub fn item(&mut self, it: TreeItem) -> Result<(), TreeError> {
        match it.item {
            Some(tree_item::Item::Entry(e)) => {
                self.close_file()?;
                self.entry(e)
            }
            Some(tree_item::Item::Data(d)) => self.data(d),
            None => Ok(()),
        }
    }

    pub fn finish(mut self) -> Result<ApplyStats, TreeError> {
        self.close_file()?;
        // Deepest first: setting a child's times does not touch its parent's,
        // but creating it did.
        self.dirs.sort_by(|a, b| b.0.cmp(&a.0));
        for (full, _) in &self.dirs {
            self.touched.remove(full);
        }
        for (full, (sec, nsec)) in std::mem::take(&mut self.touched).into_iter().rev() {
            let t = TimeSpec::new(sec, nsec);
            let _ = nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                &full,
                &t,
                &t,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            );
        }
        for (full, e) in std::mem::take(&mut self.dirs) {
            set_meta(&full, &e, None)?;
        }
        Ok(self.stats)
    }

    fn entry(&mut self, e: TreeEntry) -> Result<(), TreeError> {
        let rel = wire_path(&e.path)?;
        let full = self.root.join(&rel);
        self.stats.entries += 1;
        if let Some(parent) = full.parent() {
            if !rel.as_os_str().is_empty() && !self.touched.contains_key(parent) {
                if let Ok(m) = std::fs::symlink_metadata(parent) {
                    use std::os::unix::fs::MetadataExt;
                    self.touched
                        .insert(parent.to_path_buf(), (m.mtime(), m.mtime_nsec()));
                }
            }
        }
        let kind = Kind::try_from(e.kind).unwrap_or(Kind::File);
        if kind == Kind::Delete {
            return remove_any(&full);
        }
        if kind == Kind::File && !e.partial {
            // Most files of a first pass are new: one open, no lookup first.
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&full)
            {
                Ok(f) => {
                    if e.size > 0 {
                        f.set_len(e.size).map_err(|er| TreeError::io(&full, er))?;
                    }
                    self.open = Some((f, full, e, true));
                    return Ok(());
                }
                Err(er) if er.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(er) => return Err(TreeError::io(&full, er)),
            }
        }
        let existing = std::fs::symlink_metadata(&full).ok();
        let same_kind = existing.as_ref().map(|m| {
            let ft = m.file_type();
            match kind {
                Kind::Dir => ft.is_dir(),
                Kind::File => ft.is_file(),
                _ => false,
            }
        });
        if existing.is_some() && same_kind != Some(true) {
            remove_any(&full)?;
        }
        match kind {
            Kind::Dir => {
                if same_kind != Some(true) {
                    std::fs::create_dir(&full).map_err(|er| TreeError::io(&full, er))?;
                }
                self.dirs.push((full, e));
            }
            Kind::File => {
                let f = if e.partial && same_kind == Some(true) {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&full)
                        .map_err(|er| TreeError::io(&full, er))?
                } else {
                    if same_kind == Some(true) {
                        // Never write through another hard link of the old inode.
                        std::fs::remove_file(&full).map_err(|er| TreeError::io(&full, er))?;
                    }
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&full)
                        .map_err(|er| TreeError::io(&full, er))?
                };
                f.set_len(e.size).map_err(|er| TreeError::io(&full, er))?;
                self.open = Some((f, full, e, false));
            }
            Kind::Symlink => {
                use std::os::unix::ffi::OsStrExt;
                let target = std::ffi::OsStr::from_bytes(&e.target);
                std::os::unix::fs::symlink(target, &full).map_err(|er| TreeError::io(&full, er))?;
                set_meta(&full, &e, None)?;
            }
            Kind::Hardlink => {
                let src = self.root.join(wire_path(&e.target)?);
                std::fs::hard_link(&src, &full).map_err(|er| TreeError::io(&full, er))?;
            }
            Kind::Char | Kind::Block | Kind::Fifo | Kind::Socket => {
                let t = match kind {
                    Kind::Char => SFlag::S_IFCHR,
                    Kind::Block => SFlag::S_IFBLK,
                    Kind::Fifo => SFlag::S_IFIFO,
                    _ => SFlag::S_IFSOCK,
                };
                nix::sys::stat::mknod(&full, t, Mode::from_bits_truncate(0o600), e.rdev)
                    .map_err(|er| TreeError::io(&full, er.into()))?;
                set_meta(&full, &e, None)?;
            }
            Kind::Delete => {}
        }
        Ok(())
    }

    fn data(&mut self, d: FileData) -> Result<(), TreeError> {
        let Some((f, full, _, _)) = &self.open else {
            return Err(TreeError::Invalid("file data without a file entry".into()));
        };
        let raw;
        let bytes: &[u8] = if d.zstd {
            raw = zstd::bulk::decompress(&d.data, d.raw_len as usize).map_err(|er| {
                TreeError::Invalid(format!("{}: bad compressed chunk: {er}", full.display()))
            })?;
            &raw
        } else {
            &d.data
        };
        f.write_all_at(bytes, d.offset)
            .map_err(|er| TreeError::io(full, er))?;
        self.stats.bytes += bytes.len() as u64;
        Ok(())
    }

    fn close_file(&mut self) -> Result<(), TreeError> {
        if let Some((f, full, e, fresh)) = self.open.take() {
            if fresh {
                return set_new_file_meta(&full, &e, &f);
            }
            // A partial update may have shrunk the file.
            f.set_len(e.size).map_err(|er| TreeError::io(&full, er))?;
            set_meta(&full, &e, Some(&f))?;
        }
        Ok(())
    }
}

fn remove_any(full: &Path) -> Result<(), TreeError> {
    let r = match std::fs::symlink_metadata(full) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(full),
        Ok(_) => std::fs::remove_file(full),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    r.map_err(|e| TreeError::io(full, e))
}

/// Owner, then mode (chown clears setuid), xattrs, then mtime last.
fn set_meta(full: &Path, e: &TreeEntry, file: Option<&std::fs::File>) -> Result<(), TreeError> {
    let io = |er: nix::Error| TreeError::io(full, er.into());
    let symlink = e.kind == Kind::Symlink as i32;
    match file {
        Some(f) => {
            nix::unistd::fchown(f.as_fd(), Some(e.uid.into()), Some(e.gid.into())).map_err(io)?
        }
        None => nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            full,
            Some(e.uid.into()),
            Some(e.gid.into()),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(io)?,
    }
    if !symlink {
        let mode = Mode::from_bits_truncate(e.mode);
        match file {
            Some(f) => nix::sys::stat::fchmod(f.as_fd(), mode).map_err(io)?,
            None => nix::sys::stat::fchmodat(
                nix::fcntl::AT_FDCWD,
                full,
                mode,
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .map_err(io)?,
        }
    }
    sync_xattrs(full, e)?;
    let t = TimeSpec::new(e.mtime_sec, e.mtime_nsec as i64);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        full,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io)?;
    Ok(())
}

/// [`set_meta`] for a file this applier just made, through its descriptor
/// (no path lookups): root made it, so it is root's already, and it has no
/// extended attributes to remove.
fn set_new_file_meta(full: &Path, e: &TreeEntry, f: &std::fs::File) -> Result<(), TreeError> {
    use xattr::FileExt;
    let io = |er: nix::Error| TreeError::io(full, er.into());
    if e.uid != 0 || e.gid != 0 || !nix::unistd::geteuid().is_root() {
        nix::unistd::fchown(f.as_fd(), Some(e.uid.into()), Some(e.gid.into())).map_err(io)?;
    }
    nix::sys::stat::fchmod(f.as_fd(), Mode::from_bits_truncate(e.mode)).map_err(io)?;
    for x in &e.xattrs {
        f.set_xattr(&x.name, &x.value)
            .map_err(|er| TreeError::io(full, er))?;
    }
    let t = TimeSpec::new(e.mtime_sec, e.mtime_nsec as i64);
    nix::sys::stat::futimens(f.as_fd(), &t, &t).map_err(io)?;
    Ok(())
}

fn sync_xattrs(full: &Path, e: &TreeEntry) -> Result<(), TreeError> {
    if let Ok(names) = xattr::list(full) {
        for n in names {
            let name = n.to_string_lossy();
            if !e.xattrs.iter().any(|x| x.name == name) {
                let _ = xattr::remove(full, &n);
            }
        }
    }
    for x in &e.xattrs {
        xattr::set(full, &x.name, &x.value).map_err(|er| TreeError::io(full, er))?;
    }
    Ok(())
}
