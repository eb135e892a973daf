//! Tree sync round trips on real files: every entry type, xattrs, hard links,
//! sparse and big files; a second pass sends only what changed and the result
//! is byte-exact (same digest).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ferry_migrate::tree::{apply::Applier, apply::Limits, digest::digest, plan, scan, send};

fn sync(
    src: &Path,
    dst: &Path,
    prev: Option<&scan::Manifest>,
    hashes: &mut send::BlockHashes,
) -> (scan::Manifest, send::SendStats) {
    let m = scan::scan(src).unwrap();
    let p = plan::plan(prev, &m, |x| hashes.has(x));
    let mut a = Applier::new(dst, Limits::bytes(u64::MAX)).unwrap();
    let st = send::send(
        src,
        &m,
        &p,
        hashes,
        send::SendOpts::new(send::Compress::Always),
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
    let mut a = Applier::new(t.path(), Limits::bytes(u64::MAX)).unwrap();
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

/// A file sent while it grows (CRIU writing a dump's pages), then the whole
/// tree with the part already sent left out: byte-exact, and the first part
/// travels once. A file made anew under the same name goes whole.
#[test]
fn growing_files_resume_where_they_were_sent() {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir(&src).unwrap();
    let mut a = Applier::new(&dst, Limits::bytes(u64::MAX)).unwrap();
    let z = send::Compress::Always;
    let rand = |n: usize| {
        let mut v = vec![0u8; n];
        let mut x = 0x9e3779b97f4a7c15u64;
        for b in v.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        v
    };
    let mut f = std::fs::File::create(src.join("pages-1.img")).unwrap();
    let mut at = 0;
    for part in [3 << 20, 1 << 19, (2 << 20) + 77] {
        f.write_all(&rand(part)).unwrap();
        at = send::send_growth(&src, Path::new("pages-1.img"), at, &z, &mut |it| a.item(it))
            .unwrap();
    }
    assert_eq!(at, (3 << 20) + (1 << 19) + (2 << 20) + 77);
    // Nothing new: nothing sent.
    let mut n = 0;
    let same = send::send_growth(&src, Path::new("pages-1.img"), at, &z, &mut |_| {
        n += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!((same, n), (at, 0));
    std::fs::write(src.join("pages-2.img"), rand(1 << 20)).unwrap();
    send::send_growth(&src, Path::new("pages-2.img"), 0, &z, &mut |it| a.item(it)).unwrap();
    a.finish().unwrap();
    // The dump goes on: pages-1 grows, pages-2 is made anew, others appear.
    f.write_all(&rand(12345)).unwrap();
    let ino = |p: &str| std::fs::metadata(src.join(p)).unwrap().ino();
    let resume = [
        ("pages-1.img".into(), (ino("pages-1.img"), at)),
        ("pages-2.img".into(), (ino("pages-2.img"), 1 << 20)),
    ];
    std::fs::remove_file(src.join("pages-2.img")).unwrap();
    std::fs::write(src.join("pages-2.img"), rand(3000)).unwrap();
    std::fs::write(src.join("core-1.img"), b"core").unwrap();
    let m = scan::scan(&src).unwrap();
    let p = plan::plan(None, &m, |_| false);
    let mut opts = send::SendOpts::new(send::Compress::Always);
    opts.resume = resume.into_iter().collect();
    let mut a = Applier::new(&dst, Limits::bytes(u64::MAX)).unwrap();
    let st = send::send(
        &src,
        &m,
        &p,
        &mut send::BlockHashes::default(),
        opts,
        &mut |it| a.item(it),
    )
    .unwrap();
    a.finish().unwrap();
    assert_eq!(digest(&src).unwrap(), digest(&dst).unwrap());
    assert_eq!(st.raw_bytes, 12345 + 3000 + 4, "only the new bytes travel");
}
