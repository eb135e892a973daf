//! Byte-exact tree sync: a manifest of the tree ([`scan`]), what differs from
//! what the receiver has ([`plan`]), the stream of entries and file data
//! ([`send`]), writing it on the receiver ([`apply`]), a digest of a whole
//! tree for verify mode ([`digest`]), and change tracking between passes
//! ([`watch`]) so a later pass reads only the directories that changed.
//!
//! The wire items are `ferry.agent.v1.TreeItem`s: an entry, then its data in
//! chunks (holes are skipped, chunks are zstd-compressed when that pays:
//! see [`send::Compress`]).

pub mod apply;
pub mod beneath;
pub mod digest;
pub mod plan;
pub mod scan;
pub mod send;
pub mod watch;

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    /// Over a byte, entry or size cap.
    #[error("{0}")]
    TooLarge(String),
    #[error("receiver gone: {0}")]
    Closed(String),
}

impl TreeError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        TreeError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Total size of the files directly in `dir` (0 if it cannot be read).
pub fn files_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Raw bytes of a relative path (the wire form).
pub fn path_bytes(p: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    p.as_os_str().as_bytes().to_vec()
}

/// A wire path back to a relative path; refuses anything that could leave the tree.
pub fn wire_path(b: &[u8]) -> Result<std::path::PathBuf, TreeError> {
    use std::os::unix::ffi::OsStrExt;
    if b.contains(&0) {
        return Err(TreeError::Invalid(format!(
            "path {:?} holds a NUL byte",
            String::from_utf8_lossy(b)
        )));
    }
    let p = Path::new(std::ffi::OsStr::from_bytes(b));
    for c in p.components() {
        match c {
            std::path::Component::Normal(_) => {}
            _ => {
                return Err(TreeError::Invalid(format!(
                    "path {:?} is not a plain relative path",
                    p.display()
                )))
            }
        }
    }
    Ok(p.to_path_buf())
}
