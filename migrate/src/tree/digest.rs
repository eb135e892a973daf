//! One digest for a whole tree: every entry's path, type, owner, mode, mtime,
//! xattrs, symlink target, device number, hard-link group and file contents.
//! Two trees with the same digest are the same byte for byte (verify mode).

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use ferry_proto::agent::v1::tree_entry::Kind;
use sha2::{Digest, Sha256};

use super::scan::scan;
use super::send::read_xattrs;
use super::{path_bytes, TreeError};

pub fn digest(root: &Path) -> Result<(String, u64), TreeError> {
    let m = scan(root)?;
    let mut h = Sha256::new();
    let mut groups: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut buf = vec![0u8; 1 << 20];
    for (p, e) in &m.entries {
        let full = root.join(p);
        h.update(path_bytes(p));
        h.update([0, e.kind as u8]);
        h.update(e.mode.to_le_bytes());
        h.update(e.uid.to_le_bytes());
        h.update(e.gid.to_le_bytes());
        h.update(e.mtime.0.to_le_bytes());
        h.update(e.mtime.1.to_le_bytes());
        for x in read_xattrs(&full)? {
            h.update(x.name.as_bytes());
            h.update(&x.value);
        }
        if e.kind != Kind::Dir && e.nlink > 1 {
            let first = groups
                .entry((e.dev, e.ino))
                .or_insert_with(|| path_bytes(p));
            h.update(b"link");
            h.update(first.as_slice());
        }
        match e.kind {
            Kind::File => {
                h.update(e.size.to_le_bytes());
                let mut f = std::fs::File::open(&full).map_err(|er| TreeError::io(&full, er))?;
                let mut x = xxhash_rust::xxh3::Xxh3::new();
                loop {
                    let n = f.read(&mut buf).map_err(|er| TreeError::io(&full, er))?;
                    if n == 0 {
                        break;
                    }
                    x.update(&buf[..n]);
                }
                h.update(x.digest128().to_le_bytes());
            }
            Kind::Symlink => {
                let t = std::fs::read_link(&full).map_err(|er| TreeError::io(&full, er))?;
                h.update(path_bytes(&t));
            }
            Kind::Char | Kind::Block => h.update(e.rdev.to_le_bytes()),
            _ => {}
        }
    }
    Ok((hex::encode(h.finalize()), m.len() as u64))
}
