//! Tree sync round trips on real files: every entry type, xattrs, hard links,
//! sparse and big files; a second pass sends only what changed and the result
//! is byte-exact (same digest).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ferry_migrate::tree::{apply::Applier, digest::digest, plan, scan, send};

fn sync(
    src: &Path,
    dst: &Path,
    prev: Option<&scan::Manifest>,
    hashes: &mut send::BlockHashes,
) -> (scan::Manifest, send::SendStats) {
    let m = scan::scan(src).unwrap();
    let p = plan::plan(prev, &m, |x| hashes.has(x));
    let mut a = Applier::new(dst).unwrap();
    let st = send::send(
        src,
        &m,
        &p,
        hashes,
        send::SendOpts {
            compress: send::Compress::Always,
        },
        &mut |it| a.item(it),
    )
    .unwrap();
    a.finish().unwrap();
    (m, st)
}

fn sh(cmd: &str) {
    let ok = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .unwrap();
    assert!(ok.success(), "{cmd}");
}

#[test]
fn full_then_delta_is_byte_exact() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir(&src).unwrap();
    let s = src.display();
    sh(&format!(
        "cd {s} && mkdir -p etc/sub var/empty && echo hello > etc/a && ln -s a etc/link \
         && ln etc/a etc/hard && mkfifo pipe && mknod wh c 0 0 && chown 1000:1000 etc/a \
         && chmod 4755 etc/sub \
         && truncate -s 64M sparse && printf x | dd of=sparse bs=1 seek=40000000 conv=notrunc 2>/dev/null \
         && head -c 12000000 /dev/urandom > big && touch -d 2001-01-01 etc"
    ));
    xattr::set(src.join("var/empty"), "trusted.overlay.opaque", b"y").unwrap();
    let mut hashes = send::BlockHashes::default();
    let (m1, st1) = sync(&src, &dst, None, &mut hashes);
    assert_eq!(digest(&src).unwrap(), digest(&dst).unwrap());
    // The sparse file stays sparse: only its one written block travels.
    assert!(st1.raw_bytes < 16 << 20, "sent {} bytes", st1.raw_bytes);
    assert_eq!(
        xattr::get(dst.join("var/empty"), "trusted.overlay.opaque").unwrap(),
        Some(b"y".to_vec())
    );
    assert_eq!(
        std::fs::metadata(dst.join("etc/sub"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o4755
    );

    // Change a little: one block of the big file, a new file, a deletion, a chmod.
    sh(&format!(
        "cd {s} && printf zzzz | dd of=big bs=1 seek=5000000 conv=notrunc 2>/dev/null \
         && echo new > etc/sub/new && rm etc/link && chmod 600 etc/a && rm -r var \
         && echo rewritten > etc/sub/../a.txt && touch -d 2002-02-02 etc"
    ));
    let (m2, st2) = sync(&src, &dst, Some(&m1), &mut hashes);
    assert_eq!(digest(&src).unwrap(), digest(&dst).unwrap());
    assert!(!dst.join("var").exists());
    // One 1 MiB block of the big file plus small files, not the 12 MB.
    assert!(
        st2.raw_bytes <= (1 << 20) + 4096,
        "sent {} bytes",
        st2.raw_bytes
    );

    // Nothing changed: nothing to send.
    let m3 = scan::scan(&src).unwrap();
    assert!(plan::plan(Some(&m2), &m3, |x| hashes.has(x)).is_empty());
}

#[test]
fn hostile_paths_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let mut a = Applier::new(t.path()).unwrap();
    let bad = ferry_proto::agent::v1::TreeItem {
        item: Some(ferry_proto::agent::v1::tree_item::Item::Entry(
            ferry_proto::agent::v1::TreeEntry {
                path: b"../escape".to_vec(),
                ..Default::default()
            },
        )),
    };
    assert!(a.item(bad).is_err());
    assert!(!t.path().parent().unwrap().join("escape").exists());
}

/// The watched rescan must see exactly what a full walk sees, whatever the
/// changes were (and send nothing when nothing changed).
#[test]
fn watched_rescan_matches_a_full_walk() {
    use ferry_migrate::tree::watch::Watch;
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let s = src.display();
    sh(&format!(
        "cd {s} && mkdir -p a/b/c d/e keep/deep/er moved && echo 1 > a/b/c/f && echo 2 > d/e/g \
         && echo 3 > keep/deep/er/h && echo 4 > a/linked && ln a/linked d/link2 \
         && echo 5 > moved/inside && mkdir moved/sub && echo 6 > moved/sub/x"
    ));
    let mut w = Watch::new().unwrap();
    let m1 = scan::scan_watched(&src, Some(&mut w)).unwrap();
    assert!(w.watched() >= 11, "{} dirs watched", w.watched());

    // Nothing happened: nothing to read again, nothing to send.
    let ch = w.drain();
    assert!(ch.dirs.is_empty() && !ch.everything, "{ch:?}");
    let same = scan::rescan(&src, &m1, &ch.dirs, &mut w).unwrap();
    assert!(plan::plan(Some(&m1), &same, |_| false).is_empty());

    // Every kind of change, some deep, some through another hard link.
    sh(&format!(
        "cd {s} && echo more >> a/b/c/f && rm -r d/e && mkdir d/e && echo new > d/e/new \
         && mv moved a/b/moved2 && echo via-other-link >> d/link2 && chmod 700 keep/deep \
         && mkdir -p fresh/x/y && echo z > fresh/x/y/z && rm keep/deep/er/h \
         && touch -d 2001-01-01 a/b/moved2/sub/x"
    ));
    let ch = w.drain();
    assert!(!ch.everything);
    let m2 = scan::rescan(&src, &m1, &ch.dirs, &mut w).unwrap();
    let full = scan::scan(&src).unwrap();
    assert_eq!(
        m2.entries.keys().collect::<Vec<_>>(),
        full.entries.keys().collect::<Vec<_>>()
    );
    for (p, m) in &full.entries {
        assert!(m2.entries[p].unchanged(m), "{} differs", p.display());
    }
    // Both paths of the hard link travel, though only one saw the write.
    let pl = plan::plan(Some(&m1), &m2, |_| false);
    let sent: Vec<_> = pl
        .sends
        .iter()
        .map(|(p, _)| p.display().to_string())
        .collect();
    assert!(sent.contains(&"a/linked".to_string()), "{sent:?}");
    assert!(sent.contains(&"d/link2".to_string()), "{sent:?}");

    // The moved subtree keeps being tracked under its new name.
    sh(&format!("cd {s} && echo again >> a/b/moved2/sub/x"));
    let ch = w.drain();
    assert!(
        ch.dirs.contains(std::path::Path::new("a/b/moved2/sub")),
        "{ch:?}"
    );
    let m3 = scan::rescan(&src, &m2, &ch.dirs, &mut w).unwrap();
    let full = scan::scan(&src).unwrap();
    for (p, m) in &full.entries {
        assert!(m3.entries[p].unchanged(m), "{} differs", p.display());
    }
    assert_eq!(m3.len(), full.len());
}

/// A file in `always` travels even when lstat sees no change (a write
/// through a shared mapping need not touch the file's times).
#[test]
fn always_sends_mapped_files() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("mapped"), b"x").unwrap();
    std::fs::write(src.join("other"), b"y").unwrap();
    let m = scan::scan(&src).unwrap();
    let always = [std::path::PathBuf::from("mapped")].into_iter().collect();
    let pl = plan::plan_with(Some(&m), &m, |_| false, &always);
    let sent: Vec<_> = pl.sends.iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(sent, vec![std::path::PathBuf::from("mapped")]);
}
