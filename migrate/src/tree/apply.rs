//! The receiving side: writes `TreeItem`s into a directory. Blocking.
//!
//! Every entry replaces what is at its path (a different kind is removed
//! first). Owners, modes, xattrs and mtimes are set exactly; a directory's
//! metadata is set once its contents are written, at [`Applier::finish`].
//!
//! The stream is hostile input (a peer, an uploaded archive): every path is
//! resolved beneath the root with no symlink in any component
//! ([`super::beneath`]), file data may not pass the size its entry declared,
//! no chunk inflates past [`super::send::BLOCK`], and the whole stream is held
//! to [`Limits`].

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use ferry_proto::agent::v1::tree_entry::Kind;
use ferry_proto::agent::v1::{tree_item, FileData, TreeEntry, TreeItem};
use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, SFlag};
use nix::sys::time::TimeSpec;
use std::os::unix::fs::FileExt;

use super::beneath::{is_escape, Beneath, Place};
use super::send::BLOCK;
use super::{wire_path, TreeError};

/// The most entries one stream may make unless told otherwise.
pub const MAX_ENTRIES: u64 = 16_000_000;
/// The largest file size an entry may declare (ext4's limit).
pub const MAX_FILE_SIZE: u64 = 16 << 40;

/// What one stream may write.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// File data bytes, after decompression.
    pub max_bytes: u64,
    pub max_entries: u64,
}

impl Limits {
    /// At most `max_bytes` of data and [`MAX_ENTRIES`] entries.
    pub fn bytes(max_bytes: u64) -> Limits {
        Limits {
            max_bytes,
            max_entries: MAX_ENTRIES,
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct ApplyStats {
    pub entries: u64,
    pub bytes: u64,
}

/// The file being written.
struct Open {
    file: std::fs::File,
    rel: PathBuf,
    entry: TreeEntry,
    /// Made new by this entry (root's, no xattrs yet).
    fresh: bool,
}

pub struct Applier {
    root: Beneath,
    limits: Limits,
    open: Option<Open>,
    /// Directories (relative paths) whose metadata is set at the end.
    dirs: Vec<(PathBuf, TreeEntry)>,
    /// Directories we change by adding or removing a child, with their mtime
    /// before: put back at the end unless the sender sends the directory too.
    touched: std::collections::BTreeMap<PathBuf, (i64, i64)>,
    stats: ApplyStats,
}

impl Applier {
    pub fn new(root: &Path, limits: Limits) -> Result<Applier, TreeError> {
        std::fs::create_dir_all(root).map_err(|e| TreeError::io(root, e))?;
        Ok(Applier {
            root: Beneath::open(root).map_err(|e| TreeError::io(root, e))?,
            limits,
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
        for (rel, _) in &self.dirs {
            self.touched.remove(rel);
        }
        for (rel, (sec, nsec)) in std::mem::take(&mut self.touched).into_iter().rev() {
            let t = TimeSpec::new(sec, nsec);
            if let Ok(fd) = self.root.dir(&rel, OFlag::O_RDONLY) {
                let _ = nix::sys::stat::futimens(&fd, &t, &t);
            }
        }
        for (rel, e) in std::mem::take(&mut self.dirs) {
            let dir = self
                .root
                .dir(&rel, OFlag::O_RDONLY)
                .map_err(|er| self.lookup_err(&rel, er))?;
            set_meta_fd(&self.full(&rel), &e, &std::fs::File::from(dir), false)?;
        }
        Ok(self.stats)
    }

    /// The path as a message shows it.
    fn full(&self, rel: &Path) -> PathBuf {
        self.root.path().join(rel)
    }

    /// A failed lookup: the input's fault when it named a path through a
    /// symlink, a non-directory or a missing parent.
    fn lookup_err(&self, rel: &Path, e: std::io::Error) -> TreeError {
        if is_escape(&e) {
            TreeError::Invalid(format!(
                "path {:?}: a component is a symlink or not a directory (refused: it could lead outside the tree)",
                rel.display()
            ))
        } else if e.kind() == std::io::ErrorKind::NotFound {
            TreeError::Invalid(format!(
                "path {:?}: its parent directory was not sent first",
                rel.display()
            ))
        } else {
            TreeError::io(&self.full(rel), e)
        }
    }

    fn place(&self, rel: &Path) -> Result<Place, TreeError> {
        self.root.place(rel).map_err(|e| self.lookup_err(rel, e))
    }

    fn entry(&mut self, e: TreeEntry) -> Result<(), TreeError> {
        let rel = wire_path(&e.path)?;
        self.stats.entries += 1;
        if self.stats.entries > self.limits.max_entries {
            return Err(TreeError::TooLarge(format!(
                "more than {} entries",
                self.limits.max_entries
            )));
        }
        let kind = Kind::try_from(e.kind).map_err(|_| {
            TreeError::Invalid(format!(
                "{:?}: unknown entry kind {}",
                rel.display(),
                e.kind
            ))
        })?;
        if rel.as_os_str().is_empty() {
            // The root itself: only its metadata can change.
            if kind != Kind::Dir {
                return Err(TreeError::Invalid(
                    "the tree's root must be a directory".into(),
                ));
            }
            self.dirs.push((rel, e));
            return Ok(());
        }
        if kind == Kind::File && e.size > MAX_FILE_SIZE {
            return Err(TreeError::Invalid(format!(
                "{:?}: size {} is over the {MAX_FILE_SIZE}-byte limit",
                rel.display(),
                e.size
            )));
        }
        let full = self.full(&rel);
        let io = |er: std::io::Error| TreeError::io(&full, er);
        if kind == Kind::Delete {
            return match self.root.place(&rel) {
                Ok(p) => p.remove_all().map_err(io),
                // Its parent is gone already: so is it.
                Err(er) if er.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(er) => Err(self.lookup_err(&rel, er)),
            };
        }
        let place = self.place(&rel)?;
        if let Some(parent) = rel.parent() {
            if !self.touched.contains_key(parent) {
                if let Ok(st) = nix::sys::stat::fstat(place.dir_fd()) {
                    self.touched
                        .insert(parent.to_path_buf(), (st.st_mtime, st.st_mtime_nsec));
                }
            }
        }
        let new_file = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL;
        if kind == Kind::File && !e.partial {
            // Most files of a first pass are new: one open, no lookup first.
            match place.open(new_file, Mode::from_bits_truncate(0o600)) {
                Ok(f) => {
                    if e.size > 0 {
                        f.set_len(e.size).map_err(io)?;
                    }
                    self.open = Some(Open {
                        file: f,
                        rel,
                        entry: e,
                        fresh: true,
                    });
                    return Ok(());
                }
                Err(er) if er.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(er) => return Err(io(er)),
            }
        }
        let existing = place.lstat().map_err(io)?;
        let same_kind = existing.map(|st| {
            let ft = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
            match kind {
                Kind::Dir => ft == SFlag::S_IFDIR,
                Kind::File => ft == SFlag::S_IFREG,
                _ => false,
            }
        });
        if existing.is_some() && same_kind != Some(true) {
            place.remove_all().map_err(io)?;
        }
        match kind {
            Kind::Dir => {
                if same_kind != Some(true) {
                    place.mkdir(Mode::from_bits_truncate(0o700)).map_err(io)?;
                }
                self.dirs.push((rel, e));
            }
            Kind::File => {
                let f = if e.partial && same_kind == Some(true) {
                    place.open(OFlag::O_WRONLY, Mode::empty()).map_err(io)?
                } else {
                    if same_kind == Some(true) {
                        // Never write through another hard link of the old inode.
                        place.remove_all().map_err(io)?;
                    }
                    place
                        .open(new_file, Mode::from_bits_truncate(0o600))
                        .map_err(io)?
                };
                f.set_len(e.size).map_err(io)?;
                self.open = Some(Open {
                    file: f,
                    rel,
                    entry: e,
                    fresh: false,
                });
            }
            Kind::Symlink => {
                use std::os::unix::ffi::OsStrExt;
                if e.target.is_empty() || e.target.contains(&0) {
                    return Err(TreeError::Invalid(format!(
                        "{:?}: a symlink's target must be non-empty, without NUL bytes",
                        rel.display()
                    )));
                }
                place
                    .symlink(std::ffi::OsStr::from_bytes(&e.target))
                    .map_err(io)?;
                set_meta_at(&full, &place, &e)?;
            }
            Kind::Hardlink => {
                let src_rel = wire_path(&e.target)?;
                if src_rel.as_os_str().is_empty() {
                    return Err(TreeError::Invalid(format!(
                        "{:?}: a hard link to the tree's root",
                        rel.display()
                    )));
                }
                let src = self.place(&src_rel)?;
                place.link_from(&src).map_err(io)?;
            }
            Kind::Char | Kind::Block | Kind::Fifo | Kind::Socket => {
                let t = match kind {
                    Kind::Char => SFlag::S_IFCHR,
                    Kind::Block => SFlag::S_IFBLK,
                    Kind::Fifo => SFlag::S_IFIFO,
                    _ => SFlag::S_IFSOCK,
                };
                place
                    .mknod(t, Mode::from_bits_truncate(0o600), e.rdev)
                    .map_err(io)?;
                set_meta_at(&full, &place, &e)?;
            }
            Kind::Delete => {}
        }
        Ok(())
    }

    fn data(&mut self, d: FileData) -> Result<(), TreeError> {
        let Some(o) = &self.open else {
            return Err(TreeError::Invalid("file data without a file entry".into()));
        };
        let show = || o.rel.display().to_string();
        let raw;
        let bytes: &[u8] = if d.zstd {
            // The declared size is the input's word: capped, then checked.
            if d.raw_len as usize > BLOCK {
                return Err(TreeError::Invalid(format!(
                    "{:?}: a chunk declares {} bytes, over the {BLOCK}-byte chunk size",
                    show(),
                    d.raw_len
                )));
            }
            raw = zstd::bulk::decompress(&d.data, d.raw_len as usize).map_err(|er| {
                TreeError::Invalid(format!("{:?}: bad compressed chunk: {er}", show()))
            })?;
            if raw.len() != d.raw_len as usize {
                return Err(TreeError::Invalid(format!(
                    "{:?}: a chunk declared {} bytes and held {}",
                    show(),
                    d.raw_len,
                    raw.len()
                )));
            }
            &raw
        } else {
            if d.data.len() > BLOCK {
                return Err(TreeError::Invalid(format!(
                    "{:?}: a chunk of {} bytes, over the {BLOCK}-byte chunk size",
                    show(),
                    d.data.len()
                )));
            }
            &d.data
        };
        let len = bytes.len() as u64;
        if d.offset
            .checked_add(len)
            .is_none_or(|end| end > o.entry.size)
        {
            return Err(TreeError::Invalid(format!(
                "{:?}: data at offset {} runs past the file's declared size {}",
                show(),
                d.offset,
                o.entry.size
            )));
        }
        if self.stats.bytes + len > self.limits.max_bytes {
            return Err(TreeError::TooLarge(format!(
                "the tree holds more than {} bytes of file data",
                self.limits.max_bytes
            )));
        }
        o.file
            .write_all_at(bytes, d.offset)
            .map_err(|er| TreeError::io(&self.full(&o.rel), er))?;
        self.stats.bytes += len;
        Ok(())
    }

    fn close_file(&mut self) -> Result<(), TreeError> {
        if let Some(o) = self.open.take() {
            let full = self.full(&o.rel);
            if !o.fresh {
                // A partial update may have shrunk the file.
                o.file
                    .set_len(o.entry.size)
                    .map_err(|er| TreeError::io(&full, er))?;
            }
            set_meta_fd(&full, &o.entry, &o.file, o.fresh)?;
        }
        Ok(())
    }
}

/// Owner, then mode (chown clears setuid), xattrs, then mtime last, all
/// through the open descriptor. `fresh`: root made it just now, so it is
/// root's already and has no extended attributes to remove.
fn set_meta_fd(
    full: &Path,
    e: &TreeEntry,
    f: &std::fs::File,
    fresh: bool,
) -> Result<(), TreeError> {
    use xattr::FileExt;
    let io = |er: nix::Error| TreeError::io(full, er.into());
    if !fresh || e.uid != 0 || e.gid != 0 || !nix::unistd::geteuid().is_root() {
        nix::unistd::fchown(f.as_fd(), Some(e.uid.into()), Some(e.gid.into())).map_err(io)?;
    }
    nix::sys::stat::fchmod(f.as_fd(), Mode::from_bits_truncate(e.mode)).map_err(io)?;
    if !fresh {
        if let Ok(names) = f.list_xattr() {
            for n in names {
                if !e.xattrs.iter().any(|x| std::ffi::OsStr::new(&x.name) == n) {
                    let _ = f.remove_xattr(&n);
                }
            }
        }
    }
    for x in &e.xattrs {
        f.set_xattr(&x.name, &x.value)
            .map_err(|er| TreeError::io(full, er))?;
    }
    let t = TimeSpec::new(e.mtime_sec, e.mtime_nsec as i64);
    nix::sys::stat::futimens(f.as_fd(), &t, &t).map_err(io)?;
    Ok(())
}

/// [`set_meta_fd`] for what cannot be opened safely (symlinks, device nodes,
/// fifos, sockets): by name in its verified directory, never following it.
fn set_meta_at(full: &Path, p: &Place, e: &TreeEntry) -> Result<(), TreeError> {
    let io = |er: std::io::Error| TreeError::io(full, er);
    p.chown(e.uid, e.gid).map_err(io)?;
    if e.kind != Kind::Symlink as i32 {
        p.chmod(Mode::from_bits_truncate(e.mode)).map_err(io)?;
    }
    // The xattr crate's calls never follow the last component.
    let path = p.proc_path();
    if let Ok(names) = xattr::list(&path) {
        for n in names {
            if !e.xattrs.iter().any(|x| std::ffi::OsStr::new(&x.name) == n) {
                let _ = xattr::remove(&path, &n);
            }
        }
    }
    for x in &e.xattrs {
        xattr::set(&path, &x.name, &x.value).map_err(io)?;
    }
    p.set_times(&TimeSpec::new(e.mtime_sec, e.mtime_nsec as i64))
        .map_err(io)
}
