//! Paths beneath a root, named by a peer or an archive: hostile input.
//!
//! Every lookup is `openat2(2)` from the root's descriptor with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`: no
//! component may be a symlink, `..` or an absolute jump, so nothing a tree
//! holds (an `esc -> /etc` link sent just before `esc/passwd`) can steer a
//! write, a delete or a link outside it. The change itself is made with an
//! `*at` call on the last name, relative to its verified parent, never
//! following a symlink there either.
//!
//! Needs Linux 5.6 (openat2); older kernels get a clear error, never a
//! path-based fallback.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::UnlinkatFlags;

fn resolve() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH
        | ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

fn io(e: Errno) -> std::io::Error {
    std::io::Error::from(e)
}

/// True for the errors a lookup gives when a component is a symlink, not a
/// directory, or leads out of the root: the input's fault, not the host's.
pub fn is_escape(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::ELOOP | Errno::EXDEV | Errno::ENOTDIR)
    )
}

/// A directory that hostile relative paths are resolved beneath.
pub struct Beneath {
    root: OwnedFd,
    path: PathBuf,
}

/// One name in a directory that was reached without following a symlink.
pub struct Place {
    dir: OwnedFd,
    name: OsString,
}

impl Beneath {
    /// Opens `root` (trusted: the caller's own directory).
    pub fn open(root: &Path) -> std::io::Result<Beneath> {
        let root_fd = nix::fcntl::open(
            root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io)?;
        Ok(Beneath {
            root: root_fd,
            path: root.to_path_buf(),
        })
    }

    /// The root as the caller named it (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens directory `rel` ("" is the root), each component a real
    /// directory. `flags` add to `O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC`.
    pub fn dir(&self, rel: &Path, flags: OFlag) -> std::io::Result<OwnedFd> {
        let p = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        nix::fcntl::openat2(
            self.root.as_fd(),
            p,
            OpenHow::new()
                .flags(flags | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
                .resolve(resolve()),
        )
        .map_err(io)
    }

    /// `rel`'s parent, verified, and its last name. `rel` must not be empty.
    pub fn place(&self, rel: &Path) -> std::io::Result<Place> {
        let name = rel
            .file_name()
            .ok_or_else(|| io(Errno::EINVAL))?
            .to_os_string();
        let parent = rel.parent().unwrap_or(Path::new(""));
        Ok(Place {
            dir: self.dir(parent, OFlag::O_PATH)?,
            name,
        })
    }
}

impl Place {
    /// The verified parent directory (an `O_PATH` descriptor).
    pub fn dir_fd(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// What is there now, not following a symlink; None if nothing is.
    pub fn lstat(&self) -> std::io::Result<Option<FileStat>> {
        match nix::sys::stat::fstatat(
            &self.dir,
            self.name.as_os_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(io(e)),
        }
    }

    /// Opens the name itself; a symlink there is refused (`ELOOP`).
    pub fn open(&self, flags: OFlag, mode: Mode) -> std::io::Result<std::fs::File> {
        nix::fcntl::openat2(
            &self.dir,
            self.name.as_os_str(),
            OpenHow::new()
                .flags(flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
                .mode(mode)
                .resolve(resolve()),
        )
        .map(std::fs::File::from)
        .map_err(io)
    }

    pub fn mkdir(&self, mode: Mode) -> std::io::Result<()> {
        nix::sys::stat::mkdirat(&self.dir, self.name.as_os_str(), mode).map_err(io)
    }

    pub fn symlink(&self, target: &OsStr) -> std::io::Result<()> {
        nix::unistd::symlinkat(target, &self.dir, self.name.as_os_str()).map_err(io)
    }

    pub fn mknod(&self, kind: SFlag, mode: Mode, rdev: u64) -> std::io::Result<()> {
        nix::sys::stat::mknodat(&self.dir, self.name.as_os_str(), kind, mode, rdev).map_err(io)
    }

    /// A hard link here to the inode at `src` (never to what a symlink
    /// there points at).
    pub fn link_from(&self, src: &Place) -> std::io::Result<()> {
        nix::unistd::linkat(
            &src.dir,
            src.name.as_os_str(),
            &self.dir,
            self.name.as_os_str(),
            AtFlags::empty(),
        )
        .map_err(io)
    }

    /// Removes whatever is here, a directory with all it holds; nothing
    /// there is fine.
    pub fn remove_all(&self) -> std::io::Result<()> {
        remove_at(self.dir.as_fd(), &self.name)
    }

    /// Owner of the name itself (a symlink's own).
    pub fn chown(&self, uid: u32, gid: u32) -> std::io::Result<()> {
        nix::unistd::fchownat(
            &self.dir,
            self.name.as_os_str(),
            Some(uid.into()),
            Some(gid.into()),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(io)
    }

    /// Mode of a name that is not a symlink (refused on one).
    pub fn chmod(&self, mode: Mode) -> std::io::Result<()> {
        nix::sys::stat::fchmodat(
            &self.dir,
            self.name.as_os_str(),
            mode,
            nix::sys::stat::FchmodatFlags::NoFollowSymlink,
        )
        .map_err(io)
    }

    pub fn set_times(&self, t: &nix::sys::time::TimeSpec) -> std::io::Result<()> {
        nix::sys::stat::utimensat(
            &self.dir,
            self.name.as_os_str(),
            t,
            t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .map_err(io)
    }

    /// A path to the name through its verified parent's descriptor, for the
    /// calls that have no `*at` form (the `l*xattr` family): the kernel
    /// jumps straight to that directory, and the last name is not followed.
    pub fn proc_path(&self) -> PathBuf {
        let mut p = PathBuf::from(format!("/proc/self/fd/{}", self.dir.as_raw_fd()));
        p.push(&self.name);
        p
    }
}

fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> std::io::Result<()> {
    let st = match nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR {
        return nix::unistd::unlinkat(dir, name, UnlinkatFlags::NoRemoveDir).map_err(io);
    }
    let fd = nix::fcntl::openat2(
        dir,
        name,
        OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(resolve()),
    )
    .map_err(io)?;
    let mut d = nix::dir::Dir::from_fd(fd).map_err(io)?;
    let mut children = Vec::new();
    for e in d.iter() {
        let e = e.map_err(io)?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            use std::os::unix::ffi::OsStrExt;
            children.push(OsStr::from_bytes(n).to_os_string());
        }
    }
    for c in &children {
        remove_at(d.as_fd(), c)?;
    }
    nix::unistd::unlinkat(dir, name, UnlinkatFlags::RemoveDir).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_component_may_be_a_symlink_or_leave_the_root() {
        let t = tempfile::tempdir().unwrap();
        let (root, outside) = (t.path().join("root"), t.path().join("outside"));
        std::fs::create_dir_all(root.join("real")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("victim"), b"keep").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("esc")).unwrap();
        std::os::unix::fs::symlink("real", root.join("rel")).unwrap();
        let b = Beneath::open(&root).unwrap();
        for bad in ["esc/victim", "rel/x", "esc/a/b"] {
            let e = b.place(Path::new(bad)).err().unwrap();
            assert!(is_escape(&e), "{bad}: {e}");
        }
        // The last name is never followed either.
        let p = b.place(Path::new("esc")).unwrap();
        assert!(p.open(OFlag::O_WRONLY, Mode::empty()).is_err());
        p.remove_all().unwrap();
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep");
        assert!(b.place(Path::new("real/x")).is_ok());
    }

    #[test]
    fn remove_all_takes_a_tree_and_not_what_its_links_point_at() {
        let t = tempfile::tempdir().unwrap();
        let (root, outside) = (t.path().join("root"), t.path().join("outside"));
        std::fs::create_dir_all(root.join("d/e/f")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("victim"), b"keep").unwrap();
        std::fs::write(root.join("d/e/f/file"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("d/e/out")).unwrap();
        let b = Beneath::open(&root).unwrap();
        b.place(Path::new("d")).unwrap().remove_all().unwrap();
        assert!(!root.join("d").exists());
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep");
    }
}
