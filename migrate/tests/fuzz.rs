//! Property tests over what parses untrusted bytes: random tree streams
//! (paths from a small alphabet, so they collide, nest and pass through the
//! symlinks they plant, some pointing out of the tree) and damaged checkpoint
//! archives. Whatever they hold: no panic, and nothing outside the root is
//! ever written, linked or deleted. Bounded case counts: this runs in CI.

use std::path::Path;

use ferry_migrate::archive::{self, ArchiveWriter};
use ferry_migrate::tree::apply::{Applier, Limits};
use ferry_proto::agent::v1::tree_entry::Kind;
use ferry_proto::agent::v1::{tree_item, FileData, TreeEntry, TreeItem};
use proptest::prelude::*;

const NAMES: &[&str] = &[
    "a", "b", "esc", "a/b", "a/esc", "esc/x", "a/b/c", "esc/a/b", "b/esc/y",
];

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::File),
        Just(Kind::Dir),
        Just(Kind::Symlink),
        Just(Kind::Hardlink),
        Just(Kind::Delete),
        Just(Kind::Fifo),
        Just(Kind::Char),
    ]
}

/// Items as a hostile sender makes them; symlink targets include the
/// outside dir (`@OUT`), `..` runs and absolute paths.
fn item() -> impl Strategy<Value = TreeItem> {
    let entry = (
        prop::sample::select(NAMES),
        kind(),
        prop::sample::select(&["@OUT", "../../..", "/etc", "a", "esc/x", ""][..]),
        0u64..64,
        any::<bool>(),
    )
        .prop_map(|(path, kind, target, size, partial)| TreeItem {
            item: Some(tree_item::Item::Entry(TreeEntry {
                path: path.as_bytes().to_vec(),
                kind: kind as i32,
                target: target.as_bytes().to_vec(),
                size,
                partial,
                mode: 0o755,
                ..Default::default()
            })),
        });
    let data = (
        0u64..80,
        prop::collection::vec(any::<u8>(), 0..40),
        any::<bool>(),
        0u32..100,
    )
        .prop_map(|(offset, data, zstd, raw_len)| TreeItem {
            item: Some(tree_item::Item::Data(FileData {
                offset,
                data,
                zstd,
                raw_len,
            })),
        });
    prop_oneof![3 => entry, 1 => data]
}

fn outside_snapshot(d: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

fn resolve_out(mut it: TreeItem, out: &str) -> TreeItem {
    if let Some(tree_item::Item::Entry(e)) = &mut it.item {
        if e.target == b"@OUT" {
            e.target = out.as_bytes().to_vec();
        }
    }
    it
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn a_random_stream_never_reaches_outside(items in prop::collection::vec(item(), 1..40)) {
        let t = tempfile::tempdir().unwrap();
        let (root, outside) = (t.path().join("root"), t.path().join("outside"));
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("victim"), b"host").unwrap();
        let before = outside_snapshot(&outside);
        let out = outside.to_string_lossy().into_owned();
        let mut a = Applier::new(&root, Limits { max_bytes: 1 << 20, max_entries: 1000 }).unwrap();
        for it in items {
            if a.item(resolve_out(it, &out)).is_err() {
                break;
            }
        }
        let _ = a.finish();
        prop_assert_eq!(outside_snapshot(&outside), before);
    }

    #[test]
    fn a_damaged_archive_is_refused_or_stays_inside(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        fix_checksum in any::<bool>(),
        items in prop::collection::vec(item(), 1..20),
    ) {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("victim"), b"host").unwrap();
        let before = outside_snapshot(&outside);
        let out = outside.to_string_lossy().into_owned();
        let p = t.path().join("a.ferryckpt");
        let mut w = ArchiveWriter::create(&p, b"{}").unwrap();
        w.add_items("rootfs", items.into_iter().map(|i| resolve_out(i, &out)).collect()).unwrap();
        w.finish().unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        let body = bytes.len() - 32;
        for (at, x) in flips {
            let i = at.index(body);
            bytes[i] ^= x;
        }
        if fix_checksum {
            // Forged, not damaged: the checksum matches what was changed.
            use sha2::Digest;
            let h = sha2::Sha256::digest(&bytes[..body]);
            bytes[body..].copy_from_slice(&h);
        }
        std::fs::write(&p, &bytes).unwrap();
        let dest = t.path().join("staging");
        if let Ok(v) = archive::open(&p) {
            let _ = v.unpack(
                |a| (a == "rootfs").then(|| dest.clone()),
                &["rootfs"],
                Limits { max_bytes: 1 << 20, max_entries: 1000 },
            );
        }
        prop_assert_eq!(outside_snapshot(&outside), before);
    }
}
