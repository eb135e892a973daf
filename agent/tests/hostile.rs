//! The attacks of an unauthenticated client that can reach an agent's port,
//! run against a real agent over its real gRPC socket: each is refused with
//! a clear status, nothing is written or deleted outside the data dir, the
//! VPS's files stay intact, and the agent stays healthy with bounded memory.

mod common;
use common::*;
use ferry_proto::agent::v1 as pb;
use pb::tree_entry::Kind;
use std::path::{Path, PathBuf};
use tonic::Code;

fn entry(path: &str, kind: Kind, f: impl FnOnce(&mut pb::TreeEntry)) -> pb::TreeItem {
    let mut e = pb::TreeEntry {
        path: path.as_bytes().to_vec(),
        kind: kind as i32,
        mode: 0o755,
        ..Default::default()
    };
    f(&mut e);
    pb::TreeItem {
        item: Some(pb::tree_item::Item::Entry(e)),
    }
}

fn data(bytes: &[u8]) -> pb::TreeItem {
    pb::TreeItem {
        item: Some(pb::tree_item::Item::Data(pb::FileData {
            offset: 0,
            data: bytes.to_vec(),
            zstd: false,
            raw_len: bytes.len() as u32,
        })),
    }
}

/// A directory beside the data dir with one file the attacks aim at.
fn victim_dir(h: &Host) -> PathBuf {
    let d = h.dir.join("outside");
    std::fs::create_dir_all(&d).expect("outside dir");
    std::fs::write(d.join("victim"), b"host file").expect("victim");
    d
}

fn assert_untouched(outside: &Path, what: &str) {
    let names: Vec<String> = std::fs::read_dir(outside)
        .expect("outside dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["victim"], "{what}: something was made outside");
    assert_eq!(
        std::fs::read(outside.join("victim")).expect("victim"),
        b"host file",
        "{what}: the host file changed"
    );
}

/// The tree items of the attack: a symlink to `outside`, then writes,
/// a delete and a link through it.
fn through_symlink(outside: &Path) -> Vec<pb::TreeItem> {
    let out = outside.to_string_lossy().into_owned();
    vec![
        entry("", Kind::Dir, |_| {}),
        entry("esc", Kind::Symlink, |e| e.target = out.into_bytes()),
        entry("esc/victim", Kind::Delete, |_| {}),
        entry("esc/owned", Kind::File, |e| e.size = 3),
        data(b"pwn"),
    ]
}

fn vm_rss_kb(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

async fn push(
    c: &mut pb::agent_service_client::AgentServiceClient<tonic::transport::Channel>,
    id: &str,
    area: &str,
    items: Vec<pb::TreeItem>,
) -> Result<pb::MigratePushResponse, tonic::Status> {
    let chunk = pb::MigrateChunk {
        migration_id: id.into(),
        area: area.into(),
        items,
    };
    c.migrate_push(futures::stream::iter(vec![chunk]))
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_migration_cannot_reach_outside_the_data_dir() {
    bounded(120, async {
        let h = Host::new().await;
        let mut c = h.client().await;
        let outside = victim_dir(&h);
        let id = format!("hostile{}", std::process::id());
        let name = format!("arrive{}", std::process::id());
        let prepare = |id: &str, name: &str| pb::MigratePrepareRequest {
            migration_id: id.into(),
            spec: Some(spec(name, None)),
            live: false,
            ..Default::default()
        };
        c.migrate_prepare(prepare(&id, &name))
            .await
            .expect("prepare");

        // Into the VPS's files and into the images dir, through a planted link.
        for area in ["rootfs", "images"] {
            let e = push(&mut c, &id, area, through_symlink(&outside))
                .await
                .expect_err("a push through a symlink was taken");
            assert_eq!(e.code(), Code::InvalidArgument, "{area}: {}", e.message());
            assert!(e.message().contains("symlink"), "{area}: {}", e.message());
            assert_untouched(&outside, area);
        }
        // A hard link to a host file through the link.
        let out = outside.to_string_lossy().into_owned();
        let e = push(
            &mut c,
            &id,
            "rootfs",
            vec![
                entry("esc2", Kind::Symlink, |e| e.target = out.into_bytes()),
                entry("stolen", Kind::Hardlink, |e| {
                    e.target = b"esc2/victim".to_vec()
                }),
            ],
        )
        .await
        .expect_err("a hard link out was taken");
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert_untouched(&outside, "hard link");

        // One message declaring a 4 GiB zstd frame: refused, memory bounded.
        let pid = h.agent_pid().expect("agent pid");
        let rss0 = vm_rss_kb(pid);
        let frame = zstd::bulk::compress(&vec![0u8; 1 << 20], 19).expect("zstd");
        let bomb = pb::TreeItem {
            item: Some(pb::tree_item::Item::Data(pb::FileData {
                offset: 0,
                data: frame,
                zstd: true,
                raw_len: u32::MAX,
            })),
        };
        let e = push(
            &mut c,
            &id,
            "rootfs",
            vec![entry("big", Kind::File, |e| e.size = 8 << 30), bomb],
        )
        .await
        .expect_err("a 4 GiB frame was taken");
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        let rss1 = vm_rss_kb(pid);
        assert!(
            rss1 < rss0 + (256 << 10),
            "the agent grew from {rss0} kB to {rss1} kB"
        );

        // An entry of a kind no sender makes.
        let e = push(
            &mut c,
            &id,
            "rootfs",
            vec![entry("", Kind::Dir, |e| e.kind = 42)],
        )
        .await
        .expect_err("an unknown kind was taken");
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());

        // The id is taken while the arrival lives: a second prepare with it
        // (another VPS) is refused and leaves nothing.
        let other = format!("second{}", std::process::id());
        let e = c
            .migrate_prepare(prepare(&id, &other))
            .await
            .expect_err("a reused migration id was taken");
        assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
        assert!(!h.data_dir().join("vps").join(&other).exists());

        // Abort: nothing of the arrival stays; the agent still answers.
        c.migrate_finish(pb::MigrateFinishRequest {
            migration_id: id.clone(),
            commit: false,
            generation: 0,
        })
        .await
        .expect("abort");
        assert!(!h.data_dir().join("vps").join(&name).exists());
        c.get_node(pb::GetNodeRequest {}).await.expect("healthy");
        assert_untouched(&outside, "after all");
    })
    .await;
}

/// An archive's areas, each a list of tree items.
type Areas<'a> = Vec<(&'a str, Vec<pb::TreeItem>)>;

/// An archive with `meta` and the given areas, written the way the agent
/// writes them.
fn forge(path: &Path, meta: &[u8], areas: Areas) {
    let mut w = ferry_migrate::archive::ArchiveWriter::create(path, meta).expect("create");
    for (area, items) in areas {
        w.add_items(area, items).expect("add");
    }
    w.finish().expect("finish");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_checkpoint_neither_escapes_nor_loses_the_vps_files() {
    bounded(180, async {
        let h = Host::new().await;
        if !h.agent_log().contains("criu ready") {
            panic!("the agent found no usable CRIU: {}", h.agent_log());
        }
        let mut c = h.client().await;
        let outside = victim_dir(&h);
        let name = format!("forged{}", std::process::id());
        create_started(&mut c, spec(&name, Some("10.77.4.10"))).await;
        let r = exec(&mut c, &name, &["sh", "-c", "echo mine > /keep.txt"]).await;
        assert_eq!(r.code, 0, "{}", r.stderr);
        let real = h.dir.join("real.ferryckpt");
        let (code, out, err) = ferryctl(
            &h,
            &[
                "vps",
                "checkpoint",
                &name,
                "--to",
                real.to_str().expect("path"),
            ],
        );
        assert_eq!(code, 0, "{out}{err}");
        let keep = h.data_dir().join("vps").join(&name).join("upper/keep.txt");
        assert_eq!(std::fs::read(&keep).expect("keep.txt"), b"mine\n");
        let meta = ferry_migrate::archive::open(&real)
            .expect("the real archive")
            .meta()
            .to_vec();
        let mut other: serde_json::Value = serde_json::from_slice(&meta).expect("meta");
        other["config"]["name"] = "someoneelse".into();
        let other = serde_json::to_vec(&other).expect("json");
        let images = vec![entry("", Kind::Dir, |e| e.mode = 0o700)];

        let cases: Vec<(&str, Vec<u8>, Areas, &str)> = vec![
            (
                "another VPS's metadata and a hostile tree",
                other,
                vec![
                    ("images", images.clone()),
                    ("rootfs", through_symlink(&outside)),
                ],
                "name",
            ),
            (
                "this VPS's metadata and a hostile tree",
                meta.clone(),
                vec![
                    ("images", images.clone()),
                    ("rootfs", through_symlink(&outside)),
                ],
                "symlink",
            ),
            (
                "no rootfs area",
                meta.clone(),
                vec![("images", images.clone())],
                "rootfs",
            ),
        ];
        for (i, (what, meta, areas, word)) in cases.into_iter().enumerate() {
            let f = h.dir.join(format!("forged{i}.ferryckpt"));
            forge(&f, &meta, areas);
            let (code, _, err) = ferryctl(
                &h,
                &["vps", "restore", &name, "--from", f.to_str().expect("path")],
            );
            assert_ne!(code, 0, "{what}: restored");
            assert!(
                err.contains("InvalidArgument") && err.contains(word),
                "{what}: {err}"
            );
            assert_untouched(&outside, what);
            assert_eq!(
                std::fs::read(&keep).ok().as_deref(),
                Some(&b"mine\n"[..]),
                "{what}: the VPS's files were lost"
            );
            assert!(stopped(&get(&mut c, &name).await), "{what}");
        }
        // The real checkpoint still restores, with the files it had.
        let (code, out, err) = ferryctl(
            &h,
            &[
                "vps",
                "restore",
                &name,
                "--from",
                real.to_str().expect("path"),
            ],
        );
        assert_eq!(code, 0, "{out}{err}\n{}", h.agent_log());
        let r = exec(&mut c, &name, &["cat", "/keep.txt"]).await;
        assert_eq!(r.stdout, "mine\n", "{}", r.stderr);
        let work = std::fs::read_dir(h.data_dir().join("work"))
            .map(|r| r.count())
            .unwrap_or(0);
        assert_eq!(work, 0, "scratch dirs left in work/");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn template_import_reads_only_regular_files_in_the_import_dir() {
    bounded(120, async {
        let h = Host::new().await;
        let mut c = h.client().await;
        let import = h.data_dir().join("import");
        let secret = h.dir.join("shadow");
        std::fs::write(&secret, b"root:$y$SECRETHASH:19000:0:99999:7:::\n").expect("secret");
        std::os::unix::fs::symlink(&secret, import.join("link.tar")).expect("symlink");
        std::fs::write(
            import.join("text.tar"),
            b"root:$y$SECRETHASH:19000:0:99999:7:::\n",
        )
        .expect("text");
        nix::unistd::mkfifo(&import.join("fifo.tar"), nix::sys::stat::Mode::S_IRWXU).expect("fifo");
        let req = |path: &str, format: pb::ArchiveFormat| pb::ImportTemplatePathRequest {
            header: Some(pb::ImportTemplateHeader {
                name: "stolen".into(),
                format: format as i32,
                ..Default::default()
            }),
            path: path.into(),
        };
        let secret_s = secret.to_string_lossy().into_owned();
        let import_s = import.to_string_lossy().into_owned();
        let fifo_abs = format!("{import_s}/fifo.tar");
        let up = format!("{import_s}/../../shadow");
        for (path, format, word) in [
            (secret_s.as_str(), pb::ArchiveFormat::Tar, "import dir"),
            ("/dev/zero", pb::ArchiveFormat::Auto, "import dir"),
            ("/etc/shadow", pb::ArchiveFormat::Tar, "import dir"),
            (up.as_str(), pb::ArchiveFormat::Auto, ".."),
            ("link.tar", pb::ArchiveFormat::Auto, "symlink"),
            ("fifo.tar", pb::ArchiveFormat::Auto, "not a regular file"),
            (
                fifo_abs.as_str(),
                pb::ArchiveFormat::Auto,
                "not a regular file",
            ),
            ("text.tar", pb::ArchiveFormat::Tar, "not a tar"),
        ] {
            let e = c
                .import_template_path(req(path, format))
                .await
                .expect_err(path);
            assert_eq!(e.code(), Code::InvalidArgument, "{path}: {}", e.message());
            assert!(e.message().contains(word), "{path}: {}", e.message());
            assert!(
                !e.message().contains("SECRETHASH"),
                "{path}: the file's content was echoed: {}",
                e.message()
            );
        }
        assert!(!h.data_dir().join("templates/stolen").exists());
        c.get_node(pb::GetNodeRequest {}).await.expect("healthy");

        // An archive in the import dir works, by name; replacing the
        // built-in template or one in use needs force.
        let src = h.data_dir().join("templates/busybox/rootfs");
        let mut b = tar::Builder::new(Vec::new());
        b.follow_symlinks(false);
        b.append_dir_all(".", &src).expect("tar");
        std::fs::write(import.join("bb.tar"), b.into_inner().expect("tar")).expect("write");
        let header = |name: &str, replace: bool, force: bool| pb::ImportTemplatePathRequest {
            header: Some(pb::ImportTemplateHeader {
                name: name.into(),
                replace,
                force,
                ..Default::default()
            }),
            path: "bb.tar".into(),
        };
        c.import_template_path(header("bb", false, false))
            .await
            .expect("import from the import dir");
        let e = c
            .import_template_path(header("busybox", true, false))
            .await
            .expect_err("the built-in was replaced without force");
        assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
        assert!(e.message().contains("force"), "{}", e.message());
        let vname = format!("onbb{}", std::process::id());
        let mut s = spec(&vname, None);
        s.template = "bb".into();
        create_started(&mut c, s).await;
        let e = c
            .import_template_path(header("bb", true, false))
            .await
            .expect_err("a template in use was replaced without force");
        assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
        assert!(e.message().contains(&vname), "{}", e.message());
        c.import_template_path(header("bb", true, true))
            .await
            .expect("forced replace");
        let r = exec(&mut c, &vname, &["cat", "/etc/inittab"]).await;
        assert_eq!(r.code, 0, "the VPS lost its tree: {}", r.stderr);
        let retired = std::fs::read_dir(h.data_dir().join("templates/.retired"))
            .map(|r| r.count())
            .unwrap_or(0);
        assert_eq!(retired, 1, "the old tree was not kept for the running VPS");
    })
    .await;
}

/// Sends bytes as they are: a message no client library would send.
#[derive(Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_does_not_decode_is_invalid_argument() {
    bounded(30, async {
        let h = Host::new().await;
        let addr: ferry_proto::addr::Addr = format!("unix:{}", h.sock().display())
            .parse()
            .expect("addr");
        let ch = ferry_proto::addr::connect(&addr).await.expect("connect");
        let mut g = tonic::client::Grpc::new(ch);
        g.ready().await.expect("ready");
        // An unterminated varint where a field tag should be.
        let e = g
            .unary(
                tonic::Request::new(vec![0xff, 0xff, 0xff]),
                tonic::codegen::http::uri::PathAndQuery::from_static(
                    "/ferry.agent.v1.AgentService/GetVps",
                ),
                RawCodec,
            )
            .await
            .expect_err("garbage was decoded");
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        let mut c = h.client().await;
        c.get_node(pb::GetNodeRequest {}).await.expect("healthy");
    })
    .await;
}
