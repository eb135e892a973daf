//! The console log: init's stdout and stderr, kept to a bounded size on the node
//! (the current file plus one rotated-out predecessor).

use std::io::Write;
use std::path::{Path, PathBuf};

/// Bytes per file before it rotates to `console.log.1`.
pub const MAX_BYTES: u64 = 1 << 20;

pub struct ConsoleLog {
    path: PathBuf,
    file: Option<std::fs::File>,
    size: u64,
}

impl ConsoleLog {
    pub fn open(path: &Path) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok();
        let size = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map(|m| m.len())
            .unwrap_or(0);
        Self {
            path: path.to_path_buf(),
            file,
            size,
        }
    }

    pub fn write(&mut self, data: &[u8]) {
        if self.size + data.len() as u64 > MAX_BYTES {
            let _ = std::fs::rename(&self.path, rotated(&self.path));
            self.file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .ok();
            self.size = 0;
        }
        if let Some(f) = self.file.as_mut() {
            if f.write_all(data).is_ok() {
                self.size += data.len() as u64;
            }
        }
    }
}

fn rotated(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// The last `max` bytes of the console, across the rotation.
pub fn tail(path: &Path, max: usize) -> Vec<u8> {
    let mut out = std::fs::read(rotated(path)).unwrap_or_default();
    out.extend(std::fs::read(path).unwrap_or_default());
    if out.len() > max {
        out.drain(..out.len() - max);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_bounded_and_keeps_the_newest_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        let mut log = ConsoleLog::open(&p);
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..40 {
            log.write(&chunk);
        }
        log.write(b"the end\n");
        let total =
            std::fs::metadata(&p).unwrap().len() + std::fs::metadata(rotated(&p)).unwrap().len();
        assert!(total <= 2 * MAX_BYTES, "{total}");
        assert!(tail(&p, 100).ends_with(b"the end\n"));
        assert_eq!(tail(&p, 100).len(), 100);
    }
}
