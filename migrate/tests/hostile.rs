//! A tree stream or checkpoint archive is hostile input: what a forged one
//! tries (writing, linking, deleting through a symlink it planted; inflating
//! a chunk; running past its caps) is refused with an `Invalid`/`TooLarge`
//! error, and nothing outside the root is touched.

use std::path::{Path, PathBuf};

use ferry_migrate::archive::{self, ArchiveWriter};
use ferry_migrate::tree::apply::{Applier, Limits};
use ferry_migrate::tree::TreeError;
use ferry_proto::agent::v1::tree_entry::Kind;
use ferry_proto::agent::v1::{tree_item, FileData, TreeEntry, TreeItem};

fn entry(path: &str, kind: Kind, f: impl FnOnce(&mut TreeEntry)) -> TreeItem {
    let mut e = TreeEntry {
        path: path.as_bytes().to_vec(),
        kind: kind as i32,
        mode: 0o644,
        ..Default::default()
    };
    f(&mut e);
    TreeItem {
        item: Some(tree_item::Item::Entry(e)),
    }
}

fn data(offset: u64, bytes: &[u8]) -> TreeItem {
    TreeItem {
        item: Some(tree_item::Item::Data(FileData {
            offset,
            data: bytes.to_vec(),
            zstd: false,
            raw_len: bytes.len() as u32,
        })),
    }
}

/// A root, and beside it a directory with a file the attacks aim at.
struct Scene {
    _t: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
}

impl Scene {
    fn new() -> Scene {
        let t = tempfile::tempdir().unwrap();
        let (root, outside) = (t.path().join("root"), t.path().join("outside"));
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("victim"), b"host file").unwrap();
        Scene {
            _t: t,
            root,
            outside,
        }
    }

    /// The outside dir holds just the victim, unchanged.
    fn assert_outside_untouched(&self, what: &str) {
        let names: Vec<_> = std::fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("victim")], "{what}");
        assert_eq!(
            std::fs::read(self.outside.join("victim")).unwrap(),
            b"host file",
            "{what}"
        );
    }
}

/// Applies `items` to a fresh root after a symlink `esc` -> the outside dir;
/// returns the first error.
fn attack(s: &Scene, limits: Limits, items: Vec<TreeItem>) -> Option<TreeError> {
    let mut a = Applier::new(&s.root, limits).unwrap();
    let out = s.outside.to_str().unwrap().to_string();
    let plant = entry("esc", Kind::Symlink, |e| e.target = out.into_bytes());
    a.item(plant).unwrap();
    for it in items {
        if let Err(e) = a.item(it) {
            return Some(e);
        }
    }
    a.finish().err()
}

fn expect_invalid(e: Option<TreeError>, want: &str, what: &str) {
    match e {
        Some(TreeError::Invalid(m)) => assert!(m.contains(want), "{what}: {m:?} lacks {want:?}"),
        other => panic!("{what}: expected Invalid({want:?}), got {other:?}"),
    }
}

#[test]
fn nothing_is_written_linked_or_deleted_through_a_planted_symlink() {
    let s = Scene::new();
    let cases: Vec<(&str, Vec<TreeItem>)> = vec![
        (
            "a new file",
            vec![
                entry("esc/owned", Kind::File, |e| e.size = 3),
                data(0, b"pwn"),
            ],
        ),
        (
            "overwriting a file",
            vec![
                entry("esc/victim", Kind::File, |e| e.size = 3),
                data(0, b"pwn"),
            ],
        ),
        (
            "a partial update",
            vec![
                entry("esc/victim", Kind::File, |e| {
                    e.size = 3;
                    e.partial = true
                }),
                data(0, b"pwn"),
            ],
        ),
        ("a directory", vec![entry("esc/dir", Kind::Dir, |_| {})]),
        ("a delete", vec![entry("esc/victim", Kind::Delete, |_| {})]),
        (
            "a symlink",
            vec![entry("esc/l", Kind::Symlink, |e| e.target = b"x".to_vec())],
        ),
        ("a device node", vec![entry("esc/sda", Kind::Block, |_| {})]),
        ("a fifo", vec![entry("esc/p", Kind::Fifo, |_| {})]),
        (
            "a hard link out of the tree",
            vec![entry("stolen", Kind::Hardlink, |e| {
                e.target = b"esc/victim".to_vec()
            })],
        ),
        (
            "a hard link into the outside",
            vec![
                entry("mine", Kind::File, |_| {}),
                entry("esc/planted", Kind::Hardlink, |e| {
                    e.target = b"mine".to_vec()
                }),
            ],
        ),
        (
            "a deeper path",
            vec![entry("esc/a/b/c", Kind::File, |_| {})],
        ),
    ];
    for (what, items) in cases {
        let _ = std::fs::remove_dir_all(&s.root);
        std::fs::create_dir(&s.root).unwrap();
        expect_invalid(attack(&s, Limits::bytes(1 << 20), items), "symlink", what);
        s.assert_outside_untouched(what);
    }
    // Replacing or deleting the link itself touches only the link.
    let e = attack(
        &s,
        Limits::bytes(1 << 20),
        vec![
            entry("esc", Kind::Delete, |_| {}),
            entry("esc", Kind::Dir, |_| {}),
            entry("esc/victim", Kind::File, |e| e.size = 4),
            data(0, b"mine"),
        ],
    );
    assert!(e.is_none(), "{e:?}");
    s.assert_outside_untouched("replacing the link");
    assert_eq!(std::fs::read(s.root.join("esc/victim")).unwrap(), b"mine");
}

#[test]
fn sizes_are_capped_and_never_trusted() {
    let s = Scene::new();
    let compressed = zstd::bulk::compress(&[0u8; 4096], 3).unwrap();
    // A chunk that claims 4 GiB inflated: refused before any allocation.
    let bomb = TreeItem {
        item: Some(tree_item::Item::Data(FileData {
            offset: 0,
            data: compressed.clone(),
            zstd: true,
            raw_len: u32::MAX,
        })),
    };
    let e = attack(
        &s,
        Limits::bytes(u64::MAX),
        vec![entry("big", Kind::File, |e| e.size = 8 << 30), bomb],
    );
    expect_invalid(e, "chunk size", "a 4 GiB declared chunk");
    // A chunk that inflates to other than it declared.
    let liar = TreeItem {
        item: Some(tree_item::Item::Data(FileData {
            offset: 0,
            data: compressed,
            zstd: true,
            raw_len: 100,
        })),
    };
    let e = attack(
        &s,
        Limits::bytes(u64::MAX),
        vec![entry("f", Kind::File, |e| e.size = 8192), liar],
    );
    assert!(matches!(e, Some(TreeError::Invalid(_))), "{e:?}");
    // Data past the size the entry declared.
    let e = attack(
        &s,
        Limits::bytes(u64::MAX),
        vec![entry("f", Kind::File, |e| e.size = 2), data(0, b"abc")],
    );
    expect_invalid(e, "declared size", "data past the end");
    // The stream's byte cap.
    let e = attack(
        &s,
        Limits::bytes(5000),
        vec![
            entry("a", Kind::File, |e| e.size = 4096),
            data(0, &[1u8; 4096]),
            entry("b", Kind::File, |e| e.size = 4096),
            data(0, &[1u8; 4096]),
        ],
    );
    assert!(
        matches!(&e, Some(TreeError::TooLarge(m)) if m.contains("5000")),
        "{e:?}"
    );
    // The entry cap.
    let e = attack(
        &s,
        Limits {
            max_bytes: u64::MAX,
            max_entries: 3,
        },
        (0..5)
            .map(|i| entry(&format!("d{i}"), Kind::Dir, |_| {}))
            .collect(),
    );
    assert!(matches!(e, Some(TreeError::TooLarge(_))), "{e:?}");
    // Names and kinds that are not plain.
    for (p, kind) in [
        ("../x", Kind::File as i32),
        ("/abs", Kind::File as i32),
        ("a\0b", Kind::File as i32),
        ("ok", 99),
    ] {
        let mut a = Applier::new(&s.root, Limits::bytes(1 << 20)).unwrap();
        let it = TreeItem {
            item: Some(tree_item::Item::Entry(TreeEntry {
                path: p.as_bytes().to_vec(),
                kind,
                ..Default::default()
            })),
        };
        assert!(
            matches!(a.item(it), Err(TreeError::Invalid(_))),
            "{p:?} kind {kind}"
        );
    }
    s.assert_outside_untouched("caps");
}

fn forged_archive(dir: &Path, areas: &[(&str, Vec<TreeItem>)]) -> PathBuf {
    let p = dir.join("forged.ferryckpt");
    let mut w = ArchiveWriter::create(&p, b"{}").unwrap();
    for (area, items) in areas {
        w.add_items(area, items.clone()).unwrap();
    }
    w.finish().unwrap();
    p
}

#[test]
fn a_forged_archive_is_checked_before_anything_is_written() {
    let s = Scene::new();
    let out = s.outside.to_str().unwrap().to_string();
    let evil = vec![
        entry("", Kind::Dir, |e| e.mode = 0o755),
        entry("esc", Kind::Symlink, |e| e.target = out.into_bytes()),
        entry("esc/victim", Kind::File, |e| e.size = 3),
        data(0, b"pwn"),
    ];
    let p = forged_archive(&s.root, &[("rootfs", evil)]);
    let dest = s.root.join("staging");
    let v = archive::open(&p).unwrap();
    assert_eq!(v.meta(), b"{}");
    let e = v
        .unpack(
            |a| (a == "rootfs").then(|| dest.clone()),
            &["rootfs"],
            Limits::bytes(1 << 20),
        )
        .unwrap_err();
    assert!(e.to_string().contains("symlink"), "{e}");
    s.assert_outside_untouched("a forged archive");

    // An archive without an area the caller needs is refused whole.
    let p = forged_archive(
        &s.root,
        &[("images", vec![entry("", Kind::Dir, |e| e.mode = 0o700)])],
    );
    let e = archive::open(&p)
        .unwrap()
        .unpack(
            |a| Some(s.root.join(format!("area-{a}"))),
            &["images", "rootfs"],
            Limits::bytes(1 << 20),
        )
        .unwrap_err();
    assert!(e.to_string().contains("no \"rootfs\" area"), "{e}");

    // A record length no writer makes is refused before it is allocated.
    let p = s.root.join("huge-record.ferryckpt");
    {
        use sha2::Digest;
        let mut b = Vec::new();
        b.extend_from_slice(archive::MAGIC);
        b.extend_from_slice(&archive::VERSION.to_le_bytes());
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(b"{}");
        let payload = u32::MAX.to_le_bytes();
        b.extend_from_slice(&payload);
        b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        let h = sha2::Sha256::digest(&b);
        b.extend_from_slice(&h);
        std::fs::write(&p, b).unwrap();
    }
    let e = archive::open(&p)
        .unwrap()
        .unpack(|_| Some(s.root.join("x")), &[], Limits::bytes(1 << 20))
        .unwrap_err();
    assert!(e.to_string().contains("record of"), "{e}");
}
