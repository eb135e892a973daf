//! The sending side: entries and file contents as `TreeItem`s, in plan order.
//! Blocking (it reads files): run it on a blocking thread.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferry_proto::agent::v1::tree_entry::Kind;
use ferry_proto::agent::v1::{tree_item, FileData, TreeEntry, TreeItem, Xattr};

use super::plan::{Plan, Send};
use super::scan::{Manifest, Meta};
use super::{path_bytes, TreeError};

/// Read and send unit; also the block size of the block delta.
pub const BLOCK: usize = 1 << 20;
/// Files at least this big keep block hashes, so a later pass sends only changed blocks.
pub const BLOCK_DELTA_MIN: u64 = 4 << 20;

/// xxh3 of every block of the big files the receiver has, as we sent them.
#[derive(Debug, Default, Clone)]
pub struct BlockHashes(HashMap<PathBuf, Vec<u64>>);

impl BlockHashes {
    pub fn has(&self, p: &Path) -> bool {
        self.0.contains_key(p)
    }
}

#[derive(Debug, Clone)]
pub struct SendOpts {
    /// zstd level 1 per chunk, kept only where it saves at least 1/8 (and
    /// given up for the rest of a file whose first chunk does not compress).
    pub compress: Compress,
    /// Files the receiver holds a first part of already, sent while they
    /// grew ([`send_growth`]): path -> (inode, bytes). Only the rest is sent
    /// (all of it if the inode is another one now).
    pub resume: HashMap<PathBuf, (u64, u64)>,
}

impl SendOpts {
    pub fn new(compress: Compress) -> SendOpts {
        SendOpts {
            compress,
            resume: HashMap::new(),
        }
    }
}

/// When file data is compressed.
#[derive(Debug, Clone)]
pub enum Compress {
    /// Always (a checkpoint file: its size matters more than the CPU).
    Always,
    /// When it pays, as [`Adaptive`] judges.
    Adaptive(Arc<Adaptive>),
}

/// Compression that follows the link and the data.
/// - The link: the sender reports every message it hands on
///   ([`Adaptive::sent`]). Every 8 messages, if it had to wait for room at
///   least twice, the receiver is what limits the push, and compression goes
///   on when it took less than 200 MB/s (a link slower than ~1.6 Gbit/s,
///   where zstd at level 1 easily keeps ahead); if it never waited, the
///   sender is the limit and compressing would only slow it: off.
/// - The data: whatever the link, data that shrinks to a sixteenth or less
///   is compressed (zstd then runs faster than the bytes it saves could be
///   copied). Every 16th chunk is compressed to keep that judgement current.
#[derive(Debug)]
pub struct Adaptive {
    slow: AtomicBool,
    pace: Mutex<Pace>,
    chunks: AtomicU32,
    /// Compressed size per 1,000 bytes of the last probe.
    permille: AtomicU32,
}

/// The messages of the current window.
#[derive(Debug)]
struct Pace {
    waited: u32,
    seen: u32,
    bytes: u64,
    since: Instant,
}

impl Pace {
    fn new() -> Pace {
        Pace {
            waited: 0,
            seen: 0,
            bytes: 0,
            since: Instant::now(),
        }
    }
}

impl Default for Adaptive {
    fn default() -> Self {
        Adaptive {
            slow: AtomicBool::new(false),
            pace: Mutex::new(Pace::new()),
            chunks: AtomicU32::new(0),
            // Nothing seen yet: as if incompressible (the first chunk probes).
            permille: AtomicU32::new(1000),
        }
    }
}

impl Adaptive {
    const PROBE: u32 = 16;
    const WINDOW: u32 = 8;
    const SLOW: f64 = 200e6;
    /// Compressed size per 1,000 at or below which data is always compressed:
    /// a sixteenth. zstd then runs faster than the copies of the bytes it
    /// saves would take; at a quarter (text, binaries) it costs a fast link
    /// more CPU than it saves (measured: the Debian tree's copy 1.24-1.42x
    /// rsync's speed at a quarter, 1.44-1.56x at a sixteenth).
    const SHRINKS: u32 = 62;

    /// A message with `bytes` of file data went to the receiver; `waited`:
    /// there was no room for it at first.
    pub fn sent(&self, waited: bool, bytes: usize) {
        let mut p = self.pace.lock().unwrap_or_else(|e| e.into_inner());
        p.seen += 1;
        p.waited += u32::from(waited);
        p.bytes += bytes as u64;
        if p.seen < Self::WINDOW {
            return;
        }
        if p.waited >= 2 {
            let rate = p.bytes as f64 / p.since.elapsed().as_secs_f64().max(1e-6);
            self.slow.store(rate < Self::SLOW, Ordering::Relaxed);
        } else if p.waited == 0 {
            self.slow.store(false, Ordering::Relaxed);
        }
        *p = Pace::new();
    }

    fn compress_next(&self) -> bool {
        let n = self.chunks.fetch_add(1, Ordering::Relaxed);
        self.slow.load(Ordering::Relaxed)
            || n.is_multiple_of(Self::PROBE)
            || self.permille.load(Ordering::Relaxed) <= Self::SHRINKS
    }

    fn saw(&self, raw: usize, packed: usize) {
        let p = (packed as u64 * 1000 / raw.max(1) as u64).min(1000) as u32;
        self.permille.store(p, Ordering::Relaxed);
    }
}

impl Compress {
    fn next_chunk(&self) -> bool {
        match self {
            Compress::Always => true,
            Compress::Adaptive(a) => a.compress_next(),
        }
    }

    fn saw(&self, raw: usize, packed: usize) {
        if let Compress::Adaptive(a) = self {
            a.saw(raw, packed);
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SendStats {
    pub entries: u64,
    /// File bytes read and sent (before compression); holes and unchanged blocks excluded.
    pub raw_bytes: u64,
    /// Bytes of data on the wire (after compression).
    pub wire_bytes: u64,
}

pub fn send(
    root: &Path,
    cur: &Manifest,
    plan: &Plan,
    hashes: &mut BlockHashes,
    opts: SendOpts,
    out: &mut dyn FnMut(TreeItem) -> Result<(), TreeError>,
) -> Result<SendStats, TreeError> {
    let mut st = SendStats::default();
    for d in &plan.deletes {
        hashes.0.remove(d);
        out(entry_item(TreeEntry {
            path: path_bytes(d),
            kind: Kind::Delete as i32,
            ..Default::default()
        }))?;
        st.entries += 1;
    }
    // The first path (in tree order) of every multiply-linked inode.
    let mut first_link: HashMap<(u64, u64), &Path> = HashMap::new();
    for (p, m) in &cur.entries {
        if m.kind != Kind::Dir && m.nlink > 1 {
            first_link.entry((m.dev, m.ino)).or_insert(p.as_path());
        }
    }
    let mut buf = vec![0u8; BLOCK];
    for (path, how) in &plan.sends {
        let Some(meta) = cur.entries.get(path) else {
            continue;
        };
        let full = root.join(path);
        st.entries += 1;
        if meta.kind != Kind::Dir && meta.nlink > 1 {
            if let Some(first) = first_link.get(&(meta.dev, meta.ino)) {
                if *first != path.as_path() {
                    out(entry_item(TreeEntry {
                        path: path_bytes(path),
                        kind: Kind::Hardlink as i32,
                        target: path_bytes(first),
                        ..Default::default()
                    }))?;
                    continue;
                }
            }
        }
        if meta.kind == Kind::File && *how != Send::Meta {
            let file = match std::fs::File::open(&full) {
                Ok(f) => f,
                // Deleted since the scan (the VPS runs during pass 1); the
                // frozen pass will see it gone.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(TreeError::io(&full, err)),
            };
            // Its attributes through the descriptor: no second path lookup.
            let mut e = entry_of(path, meta, xattrs_of(&file, &full)?);

            let size = file.metadata().map_err(|e| TreeError::io(&full, e))?.len();
            e.size = size;
            let old = if *how == Send::Blocks {
                e.partial = true;
                hashes.0.remove(path)
            } else {
                None
            };
            // The part the receiver got while the file grew.
            let from = match opts.resume.get(path) {
                Some(&(ino, n)) if ino == meta.ino && n <= size && old.is_none() => n,
                _ => 0,
            };
            if from > 0 {
                e.partial = true;
            }
            out(entry_item(e))?;
            let keep = size >= BLOCK_DELTA_MIN && from == 0;
            let mut new_hashes = Vec::new();
            // Cleared for the rest of the file once a chunk does not pay.
            let mut worth = true;
            let mut off = from;
            while off < size {
                // Never past the size the entry declared: the receiver refuses that.
                let want = ((size - off) as usize).min(BLOCK);
                let n =
                    read_full(&file, &mut buf[..want], off).map_err(|e| TreeError::io(&full, e))?;
                if n == 0 {
                    break;
                }
                let chunk = &buf[..n];
                let idx = (off / BLOCK as u64) as usize;
                let h = if keep || old.is_some() {
                    xxhash_rust::xxh3::xxh3_64(chunk)
                } else {
                    0
                };
                let same = old.as_ref().and_then(|o| o.get(idx)) == Some(&h);
                // A zero block of a fresh file stays a hole on the receiver.
                let skip = same || (old.is_none() && chunk.iter().all(|&b| b == 0));
                if !skip {
                    let (data, z) = pack(chunk, &mut worth, &opts.compress);
                    st.raw_bytes += n as u64;
                    st.wire_bytes += data.len() as u64;
                    out(data_item(off, data, z, n))?;
                }
                if keep {
                    new_hashes.push(h);
                }
                off += n as u64;
            }
            if keep {
                hashes.0.insert(path.clone(), new_hashes);
            }
            continue;
        }
        let mut e = base_entry(path, meta, &full)?;
        match meta.kind {
            Kind::Symlink => {
                let t = std::fs::read_link(&full).map_err(|e| TreeError::io(&full, e))?;
                e.target = path_bytes(&t);
                out(entry_item(e))?;
            }
            Kind::Char | Kind::Block => {
                e.rdev = meta.rdev;
                out(entry_item(e))?;
            }
            _ => out(entry_item(e))?,
        }
    }
    Ok(st)
}

/// One chunk as it goes on the wire: compressed (true) when that is tried
/// and pays; `worth` goes false for the rest of the file once it does not.
fn pack(chunk: &[u8], worth: &mut bool, compress: &Compress) -> (Vec<u8>, bool) {
    if !*worth || !compress.next_chunk() {
        return (chunk.to_vec(), false);
    }
    let n = chunk.len();
    match zstd::bulk::compress(chunk, 1) {
        Ok(c) => {
            compress.saw(n, c.len());
            if c.len() < n - n / 8 {
                return (c, true);
            }
            *worth = false;
            (chunk.to_vec(), false)
        }
        Err(_) => {
            *worth = false;
            (chunk.to_vec(), false)
        }
    }
}

/// Sends what file `path` (under `root`) got since its first `from` bytes
/// went: its entry (partial after the first time) and the new data. For
/// files that only grow while they are sent (CRIU writing a dump's pages).
/// Returns how many bytes the receiver has now.
pub fn send_growth(
    root: &Path,
    path: &Path,
    from: u64,
    compress: &Compress,
    out: &mut dyn FnMut(TreeItem) -> Result<(), TreeError>,
) -> Result<u64, TreeError> {
    let full = root.join(path);
    let file = std::fs::File::open(&full).map_err(|e| TreeError::io(&full, e))?;
    let md = file.metadata().map_err(|e| TreeError::io(&full, e))?;
    let size = md.len();
    if size <= from {
        return Ok(from);
    }
    let mut e = base_entry(path, &Meta::from_metadata(&md), &full)?;
    e.partial = from > 0;
    out(entry_item(e))?;
    let mut buf = vec![0u8; BLOCK];
    let mut worth = true;
    let mut off = from;
    while off < size {
        let want = ((size - off) as usize).min(BLOCK);
        let n = read_full(&file, &mut buf[..want], off).map_err(|e| TreeError::io(&full, e))?;
        if n == 0 {
            break;
        }
        let (data, z) = pack(&buf[..n], &mut worth, compress);
        out(data_item(off, data, z, n))?;
        off += n as u64;
    }
    Ok(off)
}

/// `raw_len` bytes of a file at `offset`, as packed (`zstd`: compressed).
fn data_item(offset: u64, data: Vec<u8>, zstd: bool, raw_len: usize) -> TreeItem {
    TreeItem {
        item: Some(tree_item::Item::Data(FileData {
            offset,
            data,
            zstd,
            raw_len: raw_len as u32,
        })),
    }
}

fn read_full(f: &std::fs::File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn entry_item(e: TreeEntry) -> TreeItem {
    TreeItem {
        item: Some(tree_item::Item::Entry(e)),
    }
}

fn base_entry(path: &Path, m: &Meta, full: &Path) -> Result<TreeEntry, TreeError> {
    Ok(entry_of(path, m, read_xattrs(full)?))
}

fn entry_of(path: &Path, m: &Meta, xattrs: Vec<Xattr>) -> TreeEntry {
    TreeEntry {
        path: path_bytes(path),
        kind: m.kind as i32,
        mode: m.mode,
        uid: m.uid,
        gid: m.gid,
        size: m.size,
        mtime_sec: m.mtime.0,
        mtime_nsec: m.mtime.1,
        xattrs,
        ..Default::default()
    }
}

/// [`read_xattrs`] of an open file.
fn xattrs_of(f: &std::fs::File, full: &Path) -> Result<Vec<Xattr>, TreeError> {
    use xattr::FileExt;
    let names = match f.list_xattr() {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(TreeError::io(full, e)),
    };
    let mut out: Vec<Xattr> = names
        .filter_map(|n| {
            let v = f.get_xattr(&n).ok()??;
            Some(Xattr {
                name: n.to_string_lossy().into_owned(),
                value: v,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// All extended attributes of a path (not following a symlink), sorted by name.
pub fn read_xattrs(full: &Path) -> Result<Vec<Xattr>, TreeError> {
    let names = match xattr::list(full) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(TreeError::io(full, e)),
    };
    let mut out = Vec::new();
    for n in names {
        if let Ok(Some(v)) = xattr::get(full, &n) {
            out.push(Xattr {
                name: n.to_string_lossy().into_owned(),
                value: v,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_follows_the_link() {
        let a = Adaptive::default();
        let slow = |a: &Adaptive| a.slow.load(Ordering::Relaxed);
        // A receiver that keeps the sender waiting and takes little: a slow link.
        std::thread::sleep(std::time::Duration::from_millis(20));
        for _ in 0..Adaptive::WINDOW {
            a.sent(true, 100_000);
        }
        assert!(slow(&a), "slow link: compress");
        // Never waiting: the sender is the bottleneck, compressing slows it.
        for _ in 0..Adaptive::WINDOW {
            a.sent(false, 2 << 20);
        }
        assert!(!slow(&a), "sender-bound: do not compress");
        // Waiting, but taking gigabytes a second: a fast link, no compression.
        for _ in 0..Adaptive::WINDOW {
            a.sent(true, 1 << 30);
        }
        assert!(!slow(&a), "fast link: do not compress");
    }

    #[test]
    fn adaptive_compresses_what_shrinks_a_lot_or_a_slow_link() {
        let a = Adaptive::default();
        // The first chunk probes; incompressible data then goes as it is.
        assert!(a.compress_next());
        a.saw(1000, 990);
        let picked = (0..Adaptive::PROBE * 2)
            .filter(|_| a.compress_next())
            .count();
        assert_eq!(picked, 2, "only the probes");
        // Data that shrinks to a fifth, on a fast link: only the probes.
        a.saw(1000, 200);
        let picked = (0..Adaptive::PROBE * 2)
            .filter(|_| a.compress_next())
            .count();
        assert_eq!(picked, 2, "only the probes");
        // To a twentieth: every chunk.
        a.saw(1000, 50);
        assert!((0..40).all(|_| a.compress_next()));
        // A slow link: every chunk, whatever the data.
        a.saw(1000, 990);
        a.slow.store(true, Ordering::Relaxed);
        assert!((0..40).all(|_| a.compress_next()));
    }
}
