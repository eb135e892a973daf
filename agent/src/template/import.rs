//! Unpacking a rootfs archive without trusting it.
//!
//! Every entry is made with `*at` calls relative to its parent directory,
//! reached beneath the staging root with no symlink followed
//! ([`ferry_migrate::tree::beneath`]); its data, owner, mode, xattrs and mtime
//! are set through the new file's descriptor.
//!
//! Refused, with the entry named: paths with `..` components; entries that would
//! be written through a symlink (so `evil -> /etc` followed by `evil/passwd`
//! cannot reach the host); hard links to anything outside the tree; device nodes
//! outside `dev/` (under `dev/` they are skipped: a VPS gets its own /dev);
//! unknown entry types; archives over the size limit. Symlinks themselves may
//! point anywhere, absolute ones included: they resolve inside the VPS's root,
//! and nothing on the host follows them.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use ferry_migrate::tree::beneath::{self, Beneath, Place};
use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, SFlag};
use sha2::{Digest, Sha256};
use tar::EntryType;

use crate::error::{AgentError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Tar,
    TarGz,
    TarZst,
}

#[derive(Debug, Clone, Copy)]
pub struct ImportLimits {
    /// Most bytes the unpacked tree may hold.
    pub max_bytes: u64,
    pub max_entries: u64,
}

impl Default for ImportLimits {
    fn default() -> Self {
        Self {
            max_bytes: 32 << 30,
            max_entries: 2_000_000,
        }
    }
}

/// Sniffs the compression from the first bytes.
pub fn detect_format(head: &[u8]) -> Result<Format> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Format::TarGz)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Format::TarZst)
    } else if head.len() >= 262 && &head[257..262] == b"ustar" {
        Ok(Format::Tar)
    } else {
        Err(AgentError::BadArchive(
            "not a tar, tar.gz or tar.zst archive".into(),
        ))
    }
}

/// Hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Summary of an unpacked archive.
pub struct Unpacked {
    pub sha256: String,
    pub bytes: u64,
    pub entries: u64,
}

/// Unpacks `input` into `dest` (an empty directory). `format` None = sniff.
pub fn unpack<R: Read>(
    input: R,
    format: Option<Format>,
    dest: &Path,
    limits: ImportLimits,
) -> Result<Unpacked> {
    unpack_keeping(input, format, dest, limits, None)
}

/// [`unpack`], writing the archive's bytes to `keep` as they are read.
pub fn unpack_keeping<R: Read>(
    input: R,
    format: Option<Format>,
    dest: &Path,
    limits: ImportLimits,
    keep: Option<std::fs::File>,
) -> Result<Unpacked> {
    let mut input = std::io::BufReader::with_capacity(
        1 << 20,
        Hashing {
            inner: Tee { inner: input, keep },
            hash: Sha256::new(),
        },
    );
    // Sniffed even when the caller names the format: a file that is not an
    // archive never reaches the tar parser, so nothing of it (a host file's
    // first bytes) can surface in an error.
    let format = {
        use std::io::BufRead;
        let head = input
            .fill_buf()
            .map_err(|e| AgentError::io("reading archive", e))?
            .to_vec();
        let found = detect_format(&head)?;
        match format {
            Some(f) if f != found => {
                return Err(AgentError::BadArchive(format!(
                    "the archive is {found:?}, not the {f:?} the request named"
                )))
            }
            _ => found,
        }
    };
    let (bytes, entries) = {
        let reader: Box<dyn Read + '_> = match format {
            Format::Tar => Box::new(&mut input),
            Format::TarGz => Box::new(flate2::read::GzDecoder::new(&mut input)),
            Format::TarZst => Box::new(
                zstd::stream::read::Decoder::new(&mut input)
                    .map_err(|e| AgentError::BadArchive(e.to_string()))?,
            ),
        };
        unpack_tar(reader, dest, limits)?
    };
    // Read to the end so the checksum covers the whole archive.
    std::io::copy(&mut input, &mut std::io::sink())
        .map_err(|e| AgentError::io("reading archive", e))?;
    let sha256 = hex::encode(input.into_inner().hash.finalize());
    Ok(Unpacked {
        sha256,
        bytes,
        entries,
    })
}

/// A reader that copies what it reads into a file.
struct Tee<R> {
    inner: R,
    keep: Option<std::fs::File>,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(f) = self.keep.as_mut() {
            std::io::Write::write_all(f, &buf[..n])?;
        }
        Ok(n)
    }
}

fn unpack_tar(reader: impl Read, dest: &Path, limits: ImportLimits) -> Result<(u64, u64)> {
    let mut ar = tar::Archive::new(reader);
    let root = Beneath::open(dest)
        .map_err(|e| AgentError::io(format!("opening {}", dest.display()), e))?;
    let mut total = 0u64;
    let mut count = 0u64;
    let bad = |e: std::io::Error| AgentError::BadArchive(e.to_string());
    for entry in ar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        count += 1;
        if count > limits.max_entries {
            return Err(AgentError::BadArchive(format!(
                "more than {} entries",
                limits.max_entries
            )));
        }
        let raw = entry.path().map_err(bad)?.into_owned();
        let Some(rel) = clean_path(&raw)? else {
            continue;
        };
        let kind = entry.header().entry_type();
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                total += entry.header().size().unwrap_or(0);
                if total > limits.max_bytes {
                    return Err(AgentError::BadArchive(format!(
                        "unpacks to more than {} bytes",
                        limits.max_bytes
                    )));
                }
            }
            EntryType::Directory | EntryType::Symlink | EntryType::Fifo | EntryType::Link => {}
            EntryType::Char | EntryType::Block => {
                if rel.starts_with("dev") {
                    continue;
                }
                return Err(AgentError::BadArchive(format!(
                    "device node {} outside /dev is not allowed in a template",
                    show(&raw)
                )));
            }
            EntryType::XGlobalHeader
            | EntryType::XHeader
            | EntryType::GNULongName
            | EntryType::GNULongLink => continue,
            other => {
                return Err(AgentError::BadArchive(format!(
                    "entry {} has unsupported type {other:?}",
                    show(&raw)
                )))
            }
        }
        let place = make_parents(&root, &rel, &raw)?;
        write_entry(&root, &place, &mut entry, kind, &raw)?;
    }
    Ok((total, count))
}

/// The entry's place, its missing parent directories made (an archive may
/// list a file before, or without, its directory). Every component is
/// reached beneath the root with no symlink followed.
fn make_parents(root: &Beneath, rel: &Path, raw: &Path) -> Result<Place> {
    let mut cur = PathBuf::new();
    let comps: Vec<_> = rel.components().collect();
    for c in &comps[..comps.len().saturating_sub(1)] {
        cur.push(c);
        let p = root.place(&cur).map_err(|e| lookup_err(e, raw))?;
        match p
            .lstat()
            .map_err(|e| AgentError::io("inspecting the tree", e))?
        {
            None => p
                .mkdir(Mode::from_bits_truncate(0o755))
                .map_err(|e| AgentError::io(format!("creating {}", cur.display()), e))?,
            Some(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR => {
            }
            Some(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK => {
                return Err(AgentError::BadArchive(format!(
                    "entry {} would be written through the symlink {}",
                    show(raw),
                    show(&cur)
                )))
            }
            Some(_) => {
                return Err(AgentError::BadArchive(format!(
                    "entry {}: a parent is not a directory",
                    show(raw)
                )))
            }
        }
    }
    root.place(rel).map_err(|e| lookup_err(e, raw))
}

fn lookup_err(e: std::io::Error, raw: &Path) -> AgentError {
    if beneath::is_escape(&e) {
        AgentError::BadArchive(format!(
            "entry {} would be written through a symlink or a non-directory",
            show(raw)
        ))
    } else {
        AgentError::io(format!("resolving {}", show(raw)), e)
    }
}

/// Makes one entry at `place` (what was there goes first, a directory
/// excepted when the entry is one), then its owner, mode, xattrs and mtime:
/// all through `*at` calls or the new file's descriptor, never a path.
fn write_entry<R: Read>(
    root: &Beneath,
    place: &Place,
    entry: &mut tar::Entry<'_, R>,
    kind: EntryType,
    raw: &Path,
) -> Result<()> {
    use std::os::fd::AsFd;
    let h = entry.header();
    let (uid, gid) = (
        h.uid()
            .map_err(|e| AgentError::BadArchive(format!("{}: uid: {e}", show(raw))))?
            as u32,
        h.gid()
            .map_err(|e| AgentError::BadArchive(format!("{}: gid: {e}", show(raw))))?
            as u32,
    );
    let mode = Mode::from_bits_truncate(h.mode().unwrap_or(0o644) & 0o7777);
    let mtime = nix::sys::time::TimeSpec::new(h.mtime().unwrap_or(0) as i64, 0);
    let fail = |what: &str, e: std::io::Error| {
        AgentError::BadArchive(format!("unpacking {}: {what}: {e}", show(raw)))
    };
    let existing = place.lstat().map_err(|e| fail("inspecting", e))?;
    let is_dir = existing
        .is_some_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR);
    if existing.is_some() && !(is_dir && kind == EntryType::Directory) {
        place.remove_all().map_err(|e| fail("replacing", e))?;
    }
    let xattrs: Vec<(String, Vec<u8>)> = match entry.pax_extensions() {
        Ok(Some(exts)) => exts
            .flatten()
            .filter_map(|x| {
                let k = x.key().ok()?.strip_prefix("SCHILY.xattr.")?.to_string();
                Some((k, x.value_bytes().to_vec()))
            })
            .collect(),
        _ => Vec::new(),
    };
    match kind {
        EntryType::Directory => {
            if !is_dir {
                place
                    .mkdir(Mode::from_bits_truncate(0o700))
                    .map_err(|e| fail("mkdir", e))?;
            }
            let d = place
                .open(OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty())
                .map_err(|e| fail("opening", e))?;
            fd_meta(d.as_fd(), uid, gid, mode, &xattrs, &mtime).map_err(|e| fail("metadata", e))
        }
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
            let mut f = place
                .open(
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(|e| fail("creating", e))?;
            std::io::copy(entry, &mut f).map_err(|e| fail("writing", e))?;
            fd_meta(f.as_fd(), uid, gid, mode, &xattrs, &mtime).map_err(|e| fail("metadata", e))
        }
        EntryType::Symlink => {
            let target = link_target(entry, "symlink", raw)?;
            place
                .symlink(target.as_os_str())
                .map_err(|e| fail("symlink", e))?;
            place.chown(uid, gid).map_err(|e| fail("owner", e))?;
            place.set_times(&mtime).map_err(|e| fail("mtime", e))
        }
        EntryType::Link => {
            let target = link_target(entry, "hard link", raw)?;
            let t = clean_path(&target)?.ok_or_else(|| {
                AgentError::BadArchive(format!("hard link {} points at the root", show(raw)))
            })?;
            let missing = || {
                AgentError::BadArchive(format!(
                    "hard link {} -> {}: target is not in the archive",
                    show(raw),
                    show(&t)
                ))
            };
            let src = match root.place(&t) {
                Ok(p) => p,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing()),
                Err(e) => return Err(lookup_err(e, raw)),
            };
            match src.lstat().map_err(|e| fail("inspecting", e))? {
                None => Err(missing()),
                Some(st)
                    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR =>
                {
                    Err(AgentError::BadArchive(format!(
                        "hard link {} points at a directory",
                        show(raw)
                    )))
                }
                Some(_) => place.link_from(&src).map_err(|e| fail("link", e)),
            }
        }
        EntryType::Fifo => {
            place
                .mknod(SFlag::S_IFIFO, Mode::from_bits_truncate(0o600), 0)
                .map_err(|e| fail("mkfifo", e))?;
            place.chown(uid, gid).map_err(|e| fail("owner", e))?;
            place.chmod(mode).map_err(|e| fail("mode", e))?;
            place.set_times(&mtime).map_err(|e| fail("mtime", e))
        }
        _ => Ok(()),
    }
}

/// A link entry's target; `what` names the kind in the error.
fn link_target<R: Read>(entry: &tar::Entry<'_, R>, what: &str, raw: &Path) -> Result<PathBuf> {
    entry
        .link_name()
        .map_err(|e| AgentError::BadArchive(e.to_string()))?
        .map(|t| t.into_owned())
        .ok_or_else(|| AgentError::BadArchive(format!("{what} {} has no target", show(raw))))
}

/// Owner, then mode (chown clears setuid), xattrs, then mtime, through `fd`.
fn fd_meta(
    fd: std::os::fd::BorrowedFd<'_>,
    uid: u32,
    gid: u32,
    mode: Mode,
    xattrs: &[(String, Vec<u8>)],
    mtime: &nix::sys::time::TimeSpec,
) -> std::io::Result<()> {
    nix::unistd::fchown(fd, Some(uid.into()), Some(gid.into()))?;
    nix::sys::stat::fchmod(fd, mode)?;
    for (k, v) in xattrs {
        let name = std::ffi::CString::new(k.as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        use std::os::fd::AsRawFd;
        // SAFETY: `name` is a NUL-terminated string and `v` a live buffer of
        // `v.len()` bytes for the duration of the call; `fd` is open.
        let r = unsafe {
            libc::fsetxattr(fd.as_raw_fd(), name.as_ptr(), v.as_ptr().cast(), v.len(), 0)
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    nix::sys::stat::futimens(fd, mtime, mtime)?;
    Ok(())
}

/// An entry's name for a message: quoted, escaped, at most 100 characters.
fn show(p: &Path) -> String {
    let s = format!("{:?}", p.to_string_lossy());
    if s.chars().count() > 100 {
        format!("{}...", s.chars().take(100).collect::<String>())
    } else {
        s
    }
}

/// Normalizes an archive path to a relative one: drops `.` and a leading `/`,
/// refuses `..`. None for the root itself.
fn clean_path(p: &Path) -> Result<Option<PathBuf>> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(AgentError::BadArchive(format!(
                    "entry {} leaves the tree (..)",
                    show(p)
                )))
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tar in memory with raw headers, so hostile names get through
    /// (the tar crate's builder refuses `..` itself).
    fn tar_with(entries: &[(&str, EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            {
                let gnu = h.as_gnu_mut().unwrap();
                gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            }
            h.set_entry_type(*kind);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(data.len() as u64);
            h.set_mode(if *kind == EntryType::Directory {
                0o755
            } else {
                0o644
            });
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            if matches!(kind, EntryType::Char | EntryType::Block) {
                h.set_device_major(8).unwrap();
                h.set_device_minor(0).unwrap();
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn run(bytes: &[u8]) -> (tempfile::TempDir, Result<Unpacked>) {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("rootfs");
        std::fs::create_dir(&dest).unwrap();
        let r = unpack(bytes, None, &dest, ImportLimits::default());
        (dir, r)
    }

    #[test]
    fn unpacks_a_normal_tree_with_absolute_symlinks() {
        let t = tar_with(&[
            ("./", EntryType::Directory, b"", None),
            ("./etc/", EntryType::Directory, b"", None),
            ("./etc/hostname", EntryType::Regular, b"vps\n", None),
            (
                "./etc/localtime",
                EntryType::Symlink,
                b"",
                Some("/usr/share/zoneinfo/UTC"),
            ),
            ("./etc/hn2", EntryType::Link, b"", Some("./etc/hostname")),
            ("./dev/sda", EntryType::Block, b"", None),
        ]);
        let (dir, r) = run(&t);
        let u = r.unwrap();
        assert_eq!(u.sha256.len(), 64);
        let root = dir.path().join("rootfs");
        assert_eq!(std::fs::read(root.join("etc/hostname")).unwrap(), b"vps\n");
        assert_eq!(std::fs::read(root.join("etc/hn2")).unwrap(), b"vps\n");
        assert_eq!(
            std::fs::read_link(root.join("etc/localtime")).unwrap(),
            Path::new("/usr/share/zoneinfo/UTC")
        );
        assert!(
            !root.join("dev/sda").exists(),
            "device nodes under dev/ are skipped"
        );
    }

    #[test]
    fn refuses_hostile_archives_and_writes_nothing_outside() {
        let outside = tempfile::tempdir().unwrap();
        let out = outside.path().to_str().unwrap().to_string();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                tar_with(&[("../../etc/x", EntryType::Regular, b"pwn", None)]),
                "leaves the tree",
            ),
            (
                tar_with(&[
                    ("evil", EntryType::Symlink, b"", Some(&out)),
                    ("evil/owned", EntryType::Regular, b"pwn", None),
                ]),
                "through the symlink",
            ),
            (
                tar_with(&[("hl", EntryType::Link, b"", Some("../../../etc/passwd"))]),
                "leaves the tree",
            ),
            (
                tar_with(&[("etc/sda", EntryType::Block, b"", None)]),
                "device node",
            ),
            // An absolute hard-link target means the tree's own /etc/passwd, never the host's.
            (
                tar_with(&[("hl2", EntryType::Link, b"", Some("/etc/passwd"))]),
                "not in the archive",
            ),
            (
                b"this is not an archive at all, just some text that goes on".repeat(10),
                "not a tar",
            ),
        ];
        for (bytes, want) in cases {
            let (_d, r) = run(&bytes);
            let e = r.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(want), "expected {want:?}, got {e:?}");
        }
        assert_eq!(
            std::fs::read_dir(outside.path()).unwrap().count(),
            0,
            "nothing written outside"
        );
    }

    #[test]
    fn size_limit_stops_a_bomb() {
        let big = vec![0u8; 4096];
        let t = tar_with(&[
            ("a", EntryType::Regular, &big, None),
            ("b", EntryType::Regular, &big, None),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let e = unpack(
            &t[..],
            Some(Format::Tar),
            dir.path(),
            ImportLimits {
                max_bytes: 5000,
                max_entries: 10,
            },
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("more than 5000 bytes"), "{e}");
    }

    #[test]
    fn compressed_formats_round_trip() {
        let t = tar_with(&[("f", EntryType::Regular, b"hello", None)]);
        let zst = zstd::encode_all(&t[..], 3).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &t).unwrap();
        let gz = gz.finish().unwrap();
        for data in [zst, gz] {
            let (dir, r) = run(&data);
            r.unwrap();
            assert_eq!(
                std::fs::read(dir.path().join("rootfs/f")).unwrap(),
                b"hello"
            );
        }
    }
}
