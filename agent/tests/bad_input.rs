//! Bad input gets a clear error with the right code, and leaves nothing made.

mod common;
use common::*;
use ferry_proto::agent::v1 as pb;
use tonic::Code;

fn count(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map(|r| r.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_specs_are_refused_cleanly() {
    bounded(60, async {
        let h = Host::new().await;
        let mut c = h.client().await;
        create_started(&mut c, spec("taken", Some("10.77.0.60"))).await;
        let before = count(&h.data_dir().join("vps"));

        let mut cases: Vec<(pb::VpsSpec, Code, &str)> = Vec::new();
        for bad in ["Bad", "a_b", "-x", "../etc", "", &"x".repeat(64)] {
            cases.push((spec(bad, None), Code::InvalidArgument, "name"));
        }
        cases.push((spec("taken", None), Code::AlreadyExists, "taken"));
        cases.push((
            spec("dupip", Some("10.77.0.60")),
            Code::AlreadyExists,
            "10.77.0.60",
        ));
        let mut s = spec("notmpl", None);
        s.template = "nosuch".into();
        cases.push((s, Code::NotFound, "nosuch"));
        let mut s = spec("huge", None);
        s.limits = Some(pb::Limits {
            memory_bytes: 1 << 50,
            ..Default::default()
        });
        cases.push((s, Code::ResourceExhausted, "memory"));
        let mut s = spec("manycpu", None);
        s.limits = Some(pb::Limits {
            memory_bytes: 64 << 20,
            cpu_millicores: 1_000_000,
            ..Default::default()
        });
        cases.push((s, Code::ResourceExhausted, "cpu"));
        cases.push((
            spec("badip", Some("10.77.0.999")),
            Code::InvalidArgument,
            "net.ip",
        ));
        cases.push((
            spec("bridgeip", Some("10.77.0.1")),
            Code::InvalidArgument,
            "net.ip",
        ));
        let mut s = spec("nolimits", None);
        s.limits = None;
        cases.push((s, Code::InvalidArgument, "limits"));
        // Another VPS's MAC: two bridge ports with one MAC steal frames.
        let taken_mac = get(&mut c, "taken")
            .await
            .spec
            .and_then(|s| s.net)
            .map(|n| n.mac)
            .expect("taken's MAC");
        let mut s = spec("dupmac", Some("10.77.0.62"));
        if let Some(n) = s.net.as_mut() {
            n.mac = taken_mac;
        }
        cases.push((s, Code::AlreadyExists, "net.mac"));
        // An address outside the node network, even with its own gateway.
        let mut s = spec("outsideip", Some("192.168.50.5"));
        if let Some(n) = s.net.as_mut() {
            n.prefix_len = 24;
            n.gateway = "192.168.50.1".into();
        }
        cases.push((s, Code::InvalidArgument, "net.ip"));
        let mut s = spec("manypids", None);
        if let Some(l) = s.limits.as_mut() {
            l.pids = u32::MAX;
        }
        cases.push((s, Code::InvalidArgument, "limits.pids"));
        let mut s = spec("hugeswap", None);
        if let Some(l) = s.limits.as_mut() {
            l.swap_bytes = u64::MAX;
        }
        cases.push((s, Code::InvalidArgument, "limits.swap_bytes"));

        for (s, code, word) in cases {
            let name = s.name.clone();
            let e = c
                .create_vps(pb::CreateVpsRequest {
                    spec: Some(s),
                    start: true,
                })
                .await
                .unwrap_err();
            assert_eq!(e.code(), code, "{name:?}: {}", e.message());
            assert!(
                e.message().contains(word),
                "{name:?}: {:?} should name {word}",
                e.message()
            );
        }
        assert_eq!(
            count(&h.data_dir().join("vps")),
            before,
            "something was made"
        );
        assert_eq!(
            count(&h.run_dir()),
            2,
            "only boot_id and the running VPS: {:?}",
            std::fs::read_dir(h.run_dir()).unwrap().collect::<Vec<_>>()
        );
        let e = c
            .create_vps(pb::CreateVpsRequest {
                spec: None,
                start: false,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        for (call, code) in [
            (
                c.start_vps(pb::StartVpsRequest {
                    name: "ghost".into(),
                    generation: 0,
                })
                .await
                .map(|_| ()),
                Code::NotFound,
            ),
            (
                c.stop_vps(pb::StopVpsRequest {
                    name: "ghost".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
                Code::NotFound,
            ),
            (
                c.destroy_vps(pb::DestroyVpsRequest {
                    name: "../../x".into(),
                    force: true,
                    generation: 0,
                })
                .await
                .map(|_| ()),
                Code::InvalidArgument,
            ),
            (
                c.set_vps(pb::SetVpsRequest {
                    name: "taken".into(),
                    cpu_weight: Some(0),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
                Code::InvalidArgument,
            ),
        ] {
            assert_eq!(call.unwrap_err().code(), code);
        }
    })
    .await;
}

/// A tar with raw headers, so hostile names get through.
fn raw_tar(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, data, link) in entries {
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(*kind);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

async fn upload(
    c: &mut ferry_proto::agent::v1::agent_service_client::AgentServiceClient<
        tonic::transport::Channel,
    >,
    name: &str,
    data: Vec<u8>,
) -> Result<pb::Template, tonic::Status> {
    let mut msgs = vec![pb::ImportTemplateChunk {
        item: Some(pb::import_template_chunk::Item::Header(
            pb::ImportTemplateHeader {
                name: name.into(),
                ..Default::default()
            },
        )),
    }];
    for chunk in data.chunks(4096) {
        msgs.push(pb::ImportTemplateChunk {
            item: Some(pb::import_template_chunk::Item::Data(chunk.to_vec())),
        });
    }
    c.import_template(futures::stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread")]
async fn templates_import_list_delete_and_hostile_archives() {
    bounded(90, async {
        let h = Host::new().await;
        let mut c = h.client().await;
        // A real rootfs: the busybox template's tree, packed as tar.zst and streamed.
        let src = h.data_dir().join("templates/busybox/rootfs");
        let mut b = tar::Builder::new(Vec::new());
        b.follow_symlinks(false);
        b.append_dir_all(".", &src).unwrap();
        let tarball = b.into_inner().unwrap();
        let zst = zstd::encode_all(&tarball[..], 3).unwrap();
        let t = upload(&mut c, "bb2", zst.clone()).await.unwrap();
        use sha2::Digest;
        assert_eq!(t.sha256, hex::encode(sha2::Sha256::digest(&zst)));
        assert!(t.file_count > 200 && t.size_bytes > 1_000_000, "{t:?}");
        // The same archive from a path on the node (in its import dir), as plain tar.
        let p = h.data_dir().join("import/bb.tar");
        std::fs::write(&p, &tarball).unwrap();
        let t3 = c
            .import_template_path(pb::ImportTemplatePathRequest {
                header: Some(pb::ImportTemplateHeader {
                    name: "bb3".into(),
                    ..Default::default()
                }),
                path: p.to_string_lossy().into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(t3.file_count, t.file_count);
        let names: Vec<String> = c
            .list_templates(pb::ListTemplatesRequest {})
            .await
            .unwrap()
            .into_inner()
            .templates
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["bb2", "bb3", "busybox"]);

        // A VPS from the imported template works; the template cannot go while used.
        let mut s = spec("fromimport", None);
        s.template = "bb2".into();
        create_started(&mut c, s).await;
        assert_eq!(
            exec(&mut c, "fromimport", &["hostname"])
                .await
                .stdout
                .trim(),
            "fromimport"
        );
        let e = c
            .delete_template(pb::DeleteTemplateRequest { name: "bb2".into() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
        c.delete_template(pb::DeleteTemplateRequest { name: "bb3".into() })
            .await
            .unwrap();
        // Duplicate name.
        let e = upload(&mut c, "bb2", zst.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists);

        // Hostile archives: refused, nothing installed, nothing written outside.
        let outside = h.dir.join("outside");
        std::fs::create_dir(&outside).unwrap();
        let out_s = outside.to_string_lossy().to_string();
        let hostile: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "dotdot",
                raw_tar(&[(
                    "../../../../etc/ferry-pwned",
                    tar::EntryType::Regular,
                    b"x",
                    None,
                )]),
                "leaves the tree",
            ),
            (
                "symlinkout",
                raw_tar(&[
                    ("evil", tar::EntryType::Symlink, b"", Some(&out_s)),
                    ("evil/pwned", tar::EntryType::Regular, b"x", None),
                ]),
                "symlink",
            ),
            (
                "blockdev",
                raw_tar(&[("etc/disk", tar::EntryType::Block, b"", None)]),
                "device node",
            ),
            (
                "garbage",
                b"definitely not an archive".repeat(40),
                "not a tar",
            ),
            ("truncated", zst[..zst.len() / 2].to_vec(), "archive"),
        ];
        for (name, data, want) in hostile {
            let e = upload(&mut c, name, data).await.unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{name}: {}", e.message());
            assert!(
                e.message().contains(want),
                "{name}: {:?} should say {want:?}",
                e.message()
            );
            assert!(
                !h.data_dir().join("templates").join(name).exists(),
                "{name} installed"
            );
        }
        assert_eq!(count(&outside), 0, "written outside the template dir");
        assert!(!std::path::Path::new("/etc/ferry-pwned").exists());
        assert_eq!(
            count(&h.data_dir().join("staging")),
            0,
            "staging not cleaned"
        );
        let e = upload(&mut c, "Bad_Name", tarball.clone())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    })
    .await;
}

/// A checkpoint upload larger than the node takes is cut off with
/// ResourceExhausted naming `data`, and leaves neither a file nor a change.
#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_checkpoint_upload_is_refused_and_leaves_nothing() {
    bounded(60, async {
        let h = Host::with_args(vec!["--max-upload-bytes".into(), "65536".into()]).await;
        let mut c = h.client().await;
        let name = format!("up{}", std::process::id());
        c.create_vps(pb::CreateVpsRequest {
            spec: Some(spec(&name, None)),
            start: false,
        })
        .await
        .expect("create");
        let before = get(&mut c, &name).await;
        let file = h.dir.join("big.ferryckpt");
        std::fs::write(&file, vec![7u8; 300_000]).expect("write the archive");
        let (code, _, err) = ferryctl(
            &h,
            &[
                "vps",
                "restore",
                &name,
                "--from",
                file.to_str().expect("path"),
            ],
        );
        assert_ne!(code, 0, "an oversized upload was taken");
        assert!(
            err.contains("data:") && err.contains("65536") && err.contains("ResourceExhausted"),
            "{err}"
        );
        let work = h.data_dir().join("work");
        let uploads = std::fs::read_dir(&work)
            .map(|r| {
                r.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("upload"))
                    .count()
            })
            .unwrap_or(0);
        assert_eq!(uploads, 0, "an upload dir was left in {}", work.display());
        let after = get(&mut c, &name).await;
        assert_eq!(
            (after.status, after.spec.clone()),
            (before.status, before.spec.clone()),
            "the VPS changed"
        );
    })
    .await;
}
