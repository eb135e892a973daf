//! The Ferry checkpoint archive: a stateful snapshot of one VPS in one file.
//!
//! ```text
//! "FERRYCKP"  format version (u32 LE)  metadata length (u32 LE)  metadata (JSON)
//! payload: records of (u32 LE length, ferry.agent.v1.MigrateChunk), one area
//!          per chunk ("images": the CRIU images, "rootfs": the VPS's own files),
//!          file data zstd-compressed where it pays
//! payload length (u64 LE)  sha256 of every byte before it (32 bytes)
//! ```
//! A reader checks the magic, the version, the lengths and the checksum
//! ([`open`]), then its caller checks the metadata, and only then is anything
//! written ([`Verified::unpack`], into staging, beneath each area's root, with
//! every record, size and count capped): the file is hostile input.

use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ferry_proto::agent::v1::MigrateChunk;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::tree::{self, apply::Applier, apply::Limits, send::Compress, send::SendOpts, TreeError};

pub const MAGIC: &[u8; 8] = b"FERRYCKP";
pub const VERSION: u32 = 1;
const TRAILER: u64 = 8 + 32;
/// Items per record.
const BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("not a Ferry checkpoint archive (bad magic)")]
    NotAnArchive,
    #[error("archive format version {0} is not supported (this build reads version {VERSION})")]
    Version(u32),
    #[error("archive is damaged: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Tree(#[from] TreeError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ArchiveError {
    let context = context.into();
    move |source| ArchiveError::Io { context, source }
}

/// Hashes everything written through it.
struct Hashing<W: Write> {
    inner: W,
    hash: Sha256,
    written: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

pub struct ArchiveWriter {
    out: Hashing<BufWriter<std::fs::File>>,
    payload_start: u64,
    path: PathBuf,
}

impl ArchiveWriter {
    pub fn create(path: &Path, meta: &[u8]) -> Result<ArchiveWriter, ArchiveError> {
        let f = std::fs::File::create(path).map_err(io(format!("creating {}", path.display())))?;
        let mut out = Hashing {
            inner: BufWriter::with_capacity(1 << 20, f),
            hash: Sha256::new(),
            written: 0,
        };
        let w = io(format!("writing {}", path.display()));
        (|| {
            out.write_all(MAGIC)?;
            out.write_all(&VERSION.to_le_bytes())?;
            out.write_all(&(meta.len() as u32).to_le_bytes())?;
            out.write_all(meta)
        })()
        .map_err(w)?;
        let payload_start = out.written;
        Ok(ArchiveWriter {
            out,
            payload_start,
            path: path.to_path_buf(),
        })
    }

    /// Adds a whole directory tree under `area`. Blocking.
    pub fn add_tree(
        &mut self,
        area: &str,
        root: &Path,
    ) -> Result<tree::send::SendStats, ArchiveError> {
        let m = tree::scan::scan(root)?;
        let plan = tree::plan::plan(None, &m, |_| false);
        let mut hashes = Default::default();
        let mut batch = Vec::with_capacity(BATCH);
        let path = self.path.clone();
        let out = &mut self.out;
        let mut flush = |batch: &mut Vec<_>| -> Result<(), TreeError> {
            let rec = MigrateChunk {
                migration_id: String::new(),
                area: area.to_string(),
                items: std::mem::take(batch),
            }
            .encode_to_vec();
            out.write_all(&(rec.len() as u32).to_le_bytes())
                .and_then(|_| out.write_all(&rec))
                .map_err(|e| TreeError::io(&path, e))
        };
        let st = tree::send::send(
            root,
            &m,
            &plan,
            &mut hashes,
            SendOpts::new(Compress::Always),
            &mut |it| {
                batch.push(it);
                if batch.len() >= BATCH {
                    flush(&mut batch)?;
                }
                Ok(())
            },
        )?;
        if !batch.is_empty() {
            flush(&mut batch)?;
        }
        Ok(st)
    }

    /// Adds `items` to `area` as one record, as they are: for trees built by
    /// hand (a forged archive in a test, a tool). Blocking.
    pub fn add_items(
        &mut self,
        area: &str,
        items: Vec<ferry_proto::agent::v1::TreeItem>,
    ) -> Result<(), ArchiveError> {
        let rec = MigrateChunk {
            migration_id: String::new(),
            area: area.to_string(),
            items,
        }
        .encode_to_vec();
        let w = io(format!("writing {}", self.path.display()));
        (|| {
            self.out.write_all(&(rec.len() as u32).to_le_bytes())?;
            self.out.write_all(&rec)
        })()
        .map_err(w)
    }

    /// Writes the trailer; returns the archive's size.
    pub fn finish(mut self) -> Result<u64, ArchiveError> {
        let len = self.out.written - self.payload_start;
        let w = io(format!("writing {}", self.path.display()));
        self.out.write_all(&len.to_le_bytes()).map_err(w)?;
        let digest = self.out.hash.clone().finalize();
        let mut inner = self.out.inner;
        let w = io(format!("writing {}", self.path.display()));
        inner.write_all(&digest).map_err(w)?;
        let f = inner
            .into_inner()
            .map_err(|e| ArchiveError::Corrupt(format!("flushing: {e}")))?;
        f.sync_all().map_err(io("syncing the archive"))?;
        Ok(self.out.written + 32)
    }
}

/// The most metadata an archive may hold.
pub const MAX_META: u64 = 1 << 20;
/// The largest record a reader takes: room for the biggest a writer makes
/// ([`BATCH`] chunks of [`tree::send::BLOCK`] each, compressed or not, with
/// their framing), so a forged length cannot make it allocate more.
pub const MAX_RECORD: usize = BATCH * (tree::send::BLOCK + 4096);

/// An archive whose magic, version, section lengths and checksum were
/// checked, and whose metadata was read; nothing was written yet.
pub struct Verified {
    file: std::fs::File,
    meta: Vec<u8>,
    payload_len: u64,
}

/// Checks an archive whole. Blocking.
pub fn open(path: &Path) -> Result<Verified, ArchiveError> {
    let mut f = std::fs::File::open(path).map_err(io(format!("opening {}", path.display())))?;
    let size = f
        .metadata()
        .map_err(io("reading the archive's size"))?
        .len();
    if size < 16 + TRAILER {
        return Err(ArchiveError::NotAnArchive);
    }
    let mut head = [0u8; 16];
    f.read_exact(&mut head).map_err(io("reading the archive"))?;
    if &head[..8] != MAGIC {
        return Err(ArchiveError::NotAnArchive);
    }
    let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    if version != VERSION {
        return Err(ArchiveError::Version(version));
    }
    let meta_len = u32::from_le_bytes([head[12], head[13], head[14], head[15]]) as u64;
    if meta_len > MAX_META {
        return Err(ArchiveError::Corrupt(format!(
            "metadata of {meta_len} bytes (at most {MAX_META})"
        )));
    }
    // The checksum first: one pass over everything before it.
    f.seek(SeekFrom::Start(0)).map_err(io("seeking"))?;
    let mut h = Sha256::new();
    let mut left = size - 32;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = (left as usize).min(buf.len());
        f.read_exact(&mut buf[..n])
            .map_err(io("reading the archive"))?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    let mut want = [0u8; 32];
    f.read_exact(&mut want).map_err(io("reading the archive"))?;
    if h.finalize().as_slice() != want {
        return Err(ArchiveError::Corrupt("checksum mismatch".into()));
    }
    f.seek(SeekFrom::Start(size - TRAILER))
        .map_err(io("seeking"))?;
    let mut lb = [0u8; 8];
    f.read_exact(&mut lb).map_err(io("reading the archive"))?;
    let payload_len = u64::from_le_bytes(lb);
    if (16 + meta_len)
        .checked_add(payload_len)
        .and_then(|n| n.checked_add(TRAILER))
        != Some(size)
    {
        return Err(ArchiveError::Corrupt(
            "section lengths do not add up".into(),
        ));
    }
    f.seek(SeekFrom::Start(16)).map_err(io("seeking"))?;
    let mut meta = vec![0u8; meta_len as usize];
    f.read_exact(&mut meta).map_err(io("reading the archive"))?;
    Ok(Verified {
        file: f,
        meta,
        payload_len,
    })
}

impl Verified {
    /// The metadata, for the caller to check before [`Verified::unpack`].
    pub fn meta(&self) -> &[u8] {
        &self.meta
    }

    /// Unpacks each area into `dest(area)` (fresh staging directories: the
    /// caller swaps them in once this returns). Every area in `required`
    /// must be there; an area `dest` does not know is refused. Each area is
    /// held to `limits`. Blocking.
    pub fn unpack(
        self,
        dest: impl Fn(&str) -> Option<PathBuf>,
        required: &[&str],
        limits: Limits,
    ) -> Result<(), ArchiveError> {
        let mut r = BufReader::with_capacity(1 << 20, self.file).take(self.payload_len);
        let mut appliers: Vec<(String, Applier)> = Vec::new();
        loop {
            let mut lenb = [0u8; 4];
            match r.read_exact(&mut lenb) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(io("reading the archive")(e)),
            }
            let n = u32::from_le_bytes(lenb) as usize;
            if n > MAX_RECORD {
                return Err(ArchiveError::Corrupt(format!(
                    "a record of {n} bytes (at most {MAX_RECORD})"
                )));
            }
            let mut rec = vec![0u8; n];
            r.read_exact(&mut rec)
                .map_err(|_| ArchiveError::Corrupt("truncated record".into()))?;
            let chunk = MigrateChunk::decode(rec.as_slice())
                .map_err(|e| ArchiveError::Corrupt(format!("bad record: {e}")))?;
            let idx = match appliers.iter().position(|(a, _)| *a == chunk.area) {
                Some(i) => i,
                None => {
                    let d = dest(&chunk.area).ok_or_else(|| {
                        ArchiveError::Corrupt(format!("unknown area {:?}", chunk.area))
                    })?;
                    appliers.push((chunk.area.clone(), Applier::new(&d, limits)?));
                    appliers.len() - 1
                }
            };
            for it in chunk.items {
                appliers[idx].1.item(it)?;
            }
        }
        if let Some(missing) = required
            .iter()
            .find(|a| !appliers.iter().any(|(have, _)| have == *a))
        {
            return Err(ArchiveError::Corrupt(format!(
                "the archive has no {missing:?} area"
            )));
        }
        for (_, a) in appliers {
            a.finish()?;
        }
        Ok(())
    }
}
