//! Checkpoint/restore and live migration with real CRIU, real VPSes and two
//! agents on two hosts (network namespaces on one LAN bridge), with a client
//! host holding a TCP connection to the VPS across the move.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_proto::agent::v1 as pb;
use futures::StreamExt;

/// Starts a counter (memory + a file httpd serves) inside the VPS.
async fn start_counter(
    c: &mut ferry_proto::agent::v1::agent_service_client::AgentServiceClient<
        tonic::transport::Channel,
    >,
    name: &str,
) {
    spawn_in(
        c,
        name,
        // Written aside and renamed in: a freeze never finds the file empty
        // (truncated, not yet written), which once read as counter 0.
        "sh -c 'i=0; while :; do i=$((i+1)); echo $i > /var/www/.counter; mv /var/www/.counter /var/www/counter; sleep 0.05; done'",
    )
    .await;
}

async fn counter(
    c: &mut ferry_proto::agent::v1::agent_service_client::AgentServiceClient<
        tonic::transport::Channel,
    >,
    name: &str,
) -> u64 {
    let r = exec(c, name, &["cat", "/var/www/counter"]).await;
    r.stdout.trim().parse().unwrap_or(0)
}

fn criu_ready(h: &Host) -> bool {
    h.agent_log().contains("criu ready")
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoint_and_restore_on_one_node() {
    bounded(180, async {
        let _heavy = HEAVY.lock().await;
        let h = Host::new().await;
        assert!(
            criu_ready(&h),
            "the agent found no usable CRIU: {}",
            h.agent_log()
        );
        let mut c = h.client().await;
        let name = format!("ck{}", std::process::id());
        create_started(&mut c, spec(&name, Some("10.77.3.10"))).await;
        start_counter(&mut c, &name).await;
        tokio::time::sleep(Duration::from_millis(500)).await;

        // A path that cannot be written fails before the VPS is touched.
        let (code, _, err) = ferryctl(&h, &["vps", "checkpoint", &name, "--to", "/nonexistent/x"]);
        assert_ne!(code, 0);
        assert!(err.contains("/nonexistent/x"), "{err}");
        assert!(
            running(&get(&mut c, &name).await),
            "a failed checkpoint stopped the VPS"
        );

        // As an operator does it: ferryctl streams the archive to a file and back.
        let file = h.dir.join("ck.ferryckpt");
        let file_s = file.to_string_lossy().into_owned();
        let (code, out, err) = ferryctl(&h, &["vps", "checkpoint", &name, "--to", &file_s]);
        assert_eq!(code, 0, "{out}{err}\n{}", h.agent_log());
        let archive = std::fs::read(&file).expect("archive written");
        assert_eq!(&archive[..8], b"FERRYCKP");
        let v = get(&mut c, &name).await;
        assert!(stopped(&v), "{v:?}");
        assert_eq!(v.stop_reason, "checkpointed");
        let before = {
            let r = h.sh(&format!(
                "cat {}/data/vps/{name}/upper/var/www/counter",
                h.dir.display()
            ));
            String::from_utf8_lossy(&r.stdout)
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
        };
        assert!(before > 0);

        // A damaged archive and a foreign file are refused; nothing changes.
        let mut damaged = archive.clone();
        let mid = damaged.len() / 2;
        damaged[mid] ^= 0xff;
        for (what, bad) in [
            ("damaged", damaged),
            ("foreign", b"#!/bin/sh\necho not an archive\n".repeat(10)),
        ] {
            let bad_file = h.dir.join(format!("{what}.ferryckpt"));
            std::fs::write(&bad_file, bad).unwrap();
            let bad_s = bad_file.to_string_lossy().into_owned();
            let (code, _, err) = ferryctl(&h, &["vps", "restore", &name, "--from", &bad_s]);
            assert_ne!(code, 0, "{what} archive accepted");
            // The agent refuses it as a bad archive (InvalidArgument), before touching the VPS.
            assert!(err.contains("archive rejected"), "{what}: {err}");
            assert!(stopped(&get(&mut c, &name).await));
        }

        let (code, out, err) = ferryctl(&h, &["vps", "restore", &name, "--from", &file_s]);
        assert_eq!(code, 0, "{out}{err}\n{}", h.agent_log());
        let v = get(&mut c, &name).await;
        assert!(running(&v), "{v:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = counter(&mut c, &name).await;
        // The loop resumed from its memory: no restart from 1.
        assert!(after > before, "counter {before} -> {after}");
        assert_eq!(h.http_get("http://10.77.3.10/").await.trim(), name);
        stop(&mut c, &name, 0, true).await;
    })
    .await;
}

/// A VPS with a disk quota checkpointed and restored on its node: its files
/// come back inside its disk (the unpack is staged there, so the swap is one
/// rename), the quota holds after, and destroy leaves no mount or loop device.
#[tokio::test(flavor = "multi_thread")]
async fn a_vps_with_a_disk_quota_restores_inside_its_disk() {
    bounded(180, async {
        let _heavy = HEAVY.lock().await;
        let h = Host::new().await;
        let name = format!("dk{}", std::process::id());
        let sh = |script: &str| {
            let (code, out, err) = ferryctl(&h, &["vps", "exec", &name, "--", "sh", "-c", script]);
            assert_eq!(code, 0, "{script}: {out}{err}");
            out
        };
        let (code, out, err) = ferryctl(
            &h,
            &[
                "vps", "create", &name, "--memory", "64M", "--disk", "128M", "--start",
            ],
        );
        assert_eq!(code, 0, "{out}{err}");
        sh("echo kept > /keep");
        let file = h.dir.join("dk.ferryckpt");
        let file_s = file.to_string_lossy().into_owned();
        let (code, out, err) = ferryctl(&h, &["vps", "checkpoint", &name, "--to", &file_s]);
        assert_eq!(code, 0, "{out}{err}\n{}", h.agent_log());
        let (code, _, err) = ferryctl(&h, &["vps", "start", &name]);
        assert_eq!(code, 0, "{err}");
        sh("echo later > /later");
        let (code, _, err) = ferryctl(&h, &["vps", "stop", &name]);
        assert_eq!(code, 0, "{err}");

        let (code, out, err) = ferryctl(&h, &["vps", "restore", &name, "--from", &file_s]);
        assert_eq!(code, 0, "{out}{err}\n{}", h.agent_log());
        assert_eq!(sh("cat /keep; ls /later 2>/dev/null; true").trim(), "kept");
        // Its disk is still its quota, and still full at it.
        let df = sh("df -k / | tail -1");
        let kib: u64 = df
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!((100 << 10..=128 << 10).contains(&kib), "{df}");
        let out = sh("dd if=/dev/urandom of=/big bs=1M count=256 2>&1; true");
        assert!(out.contains("No space left on device"), "{out}");
        let (_, show, _) = ferryctl(&h, &["vps", "show", &name]);
        assert!(show.contains("used of 128M"), "{show}");

        // Bad sizes are refused, naming the field, and leave nothing.
        let (code, _, err) = ferryctl(&h, &["vps", "set", &name, "--disk", "64M"]);
        assert_ne!(code, 0);
        assert!(err.contains("only grows"), "{err}");
        let tiny = format!("{name}t");
        let (code, _, err) = ferryctl(&h, &["vps", "create", &tiny, "--disk", "1M"]);
        assert_ne!(code, 0);
        assert!(err.contains("limits.disk_bytes"), "{err}");
        assert!(!h.dir.join("data/vps").join(&tiny).exists());

        let (code, _, err) = ferryctl(&h, &["vps", "destroy", &name, "--force"]);
        assert_eq!(code, 0, "{err}");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let loops = std::process::Command::new("losetup")
            .arg("-a")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        assert!(
            !mounts.contains(&name) && !loops.contains(&name),
            "left behind:\n{mounts}\n{loops}"
        );
    })
    .await;
}

/// A client on the LAN with one TCP connection to `ip:port` (a `cat` echo in
/// the VPS); each line written comes back.
struct TcpClient {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

impl TcpClient {
    fn connect(lan: &Lan, ip: &str, port: u16) -> TcpClient {
        let script = format!(
            "import socket,sys\n\
             s=socket.create_connection(('{ip}',{port}),timeout=5)\n\
             s.settimeout(20)\n\
             f=s.makefile('rwb',buffering=0)\n\
             for line in sys.stdin:\n\
             \x20   s.sendall(line.encode())\n\
             \x20   got=b''\n\
             \x20   while not got.endswith(b'\\n'):\n\
             \x20       got+=s.recv(100)\n\
             \x20   print(got.decode().strip(), flush=True)\n"
        );
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", lan.client))
            .args(["--", "python3", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 client");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        TcpClient { child, out }
    }

    fn echo(&mut self, s: &str) -> String {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{s}").expect("write");
        stdin.flush().expect("flush");
        let mut line = String::new();
        self.out.read_line(&mut line).expect("read");
        line.trim().to_string()
    }
}

impl Drop for TcpClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Listens on the client host for a gratuitous ARP of `ip` (sender and
/// target address both `ip`); the child prints "garp" and exits when it sees
/// one, or exits silently after 60 s.
fn watch_garp(lan: &Lan, ip: &str) -> std::process::Child {
    let octets: Vec<String> = ip.split('.').map(str::to_string).collect();
    let script = format!(
        "import socket,time\n\
         s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW,socket.htons(0x0806))\n\
         s.settimeout(1)\n\
         ip=bytes([{}])\n\
         end=time.time()+60\n\
         while time.time()<end:\n\
         \x20   try: f=s.recv(100)\n\
         \x20   except socket.timeout: continue\n\
         \x20   if f[28:32]==ip and f[38:42]==ip:\n\
         \x20       print('garp',flush=True); break\n",
        octets.join(",")
    );
    Command::new("nsenter")
        .arg(format!("--net={}", lan.client))
        .args(["--", "python3", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 ARP watcher")
}

async fn migrate(
    c: &mut ferry_proto::agent::v1::agent_service_client::AgentServiceClient<
        tonic::transport::Channel,
    >,
    name: &str,
    target: &Host,
    on_event: impl FnMut(&pb::MigrationEvent),
) -> pb::MigrationEvent {
    migrate_vps(c, name, target, pb::MigrationMode::Auto, true, on_event).await
}

#[tokio::test(flavor = "multi_thread")]
async fn live_migration_keeps_processes_files_ip_and_tcp() {
    bounded(240, async {
        let _heavy = HEAVY.lock().await;
        let lan = Lan::new();
        let a = Host::on_lan(&lan, "10.77.0.11/16", vec![]).await;
        let b = Host::on_lan(&lan, "10.77.0.12/16", vec![]).await;
        let (mut ca, mut cb) = (a.client().await, b.client().await);
        let name = format!("mv{}", std::process::id());
        let ip = "10.77.4.10";
        create_started(&mut ca, spec(&name, Some(ip))).await;
        start_counter(&mut ca, &name).await;
        spawn_in(&mut ca, &name, "nc -ll -p 7000 -e cat").await;
        // 16 MiB of memory that must arrive intact (the target fills it in
        // from its images after the VPS runs).
        spawn_string_scanner(&mut ca, &name).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut tcp = TcpClient::connect(&lan, ip, 7000);
        assert_eq!(tcp.echo("before"), "before");
        let page = lan.http_get(&format!("http://{ip}/")).await;
        assert_eq!(page.trim(), name, "the client reaches the VPS on A");
        let r = exec(
            &mut ca,
            &name,
            &[
                "sh",
                "-c",
                // 100 kB to check byte-exact, and 30 MB more: a tree of more
                // messages than the target's writer channel holds (a push
                // that size once hung).
                "head -c 100000 /dev/urandom > /root/blob; head -c 30000000 /dev/urandom > /root/bulk; sha256sum /root/blob",
            ],
        )
        .await;
        let sum = r.stdout.split_whitespace().next().unwrap_or("").to_string();
        let before = counter(&mut ca, &name).await;

        let (_, info, _) = ferryctl(&a, &["info"]);
        assert!(info.contains("live migration by stop-copy, post-copy (lazy pages)"), "{info}");
        assert_eq!(info.contains("pre-copy"), host_tracks_dirty_memory(), "{info}");
        let garp = watch_garp(&lan, ip);
        // As an operator does it: ferryctl on the source's agent.
        let target = format!("unix:{}", b.sock().display());
        let (code, out, err) =
            ferryctl(&a, &["vps", "migrate", &name, "--to", &target, "--verify"]);
        assert_eq!(
            code,
            0,
            "migration failed: {out}{err}\nA: {}\nB: {}",
            a.agent_log(),
            b.agent_log()
        );
        // The per-phase table (phase, ms, bytes), then mode, downtime and total.
        for p in [
            "preflight",
            "rootfs",
            "freeze",
            "final-rootfs",
            "images",
            "verify",
            "restore",
            "commit",
            "resume",
            "cleanup",
        ] {
            assert!(
                out.lines().any(|l| l.split_whitespace().next() == Some(p)),
                "phase {p} missing:\n{out}"
            );
        }
        // auto: pre-copy where the kernel tracks dirty memory (most distro
        // kernels, the test VM), else stop-copy for a VPS this small.
        let mode = if host_tracks_dirty_memory() {
            "pre-copy"
        } else {
            "stop-copy"
        };
        let summary = out.lines().last().unwrap_or_default();
        assert!(
            summary.starts_with(&format!("migrated ({mode}): downtime ")),
            "{out}"
        );
        let downtime: u64 = summary
            .split("downtime ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .expect("downtime in ms");
        assert!(downtime > 0 && downtime < 5000, "{out}");
        eprintln!("{out}");

        // The source dumped into RAM (this host has room), and nothing of
        // the images is left there once the move is over.
        if nix::sys::statfs::statfs("/dev/shm")
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        {
            assert!(a.agent_log().contains("images in RAM"), "{}", a.agent_log());
            for h in [&a, &b] {
                let mine = ferry_agent::paths::Paths::ram_images_of(&h.data_dir());
                let mut left = true;
                for _ in 0..50 {
                    left = std::fs::read_dir(&mine).is_ok_and(|mut d| d.next().is_some());
                    if !left {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                assert!(!left, "images left in {}", mine.display());
            }
        }

        // The restore ran under a raised memory limit (CRIU needs room beyond
        // the VPS's own memory); once it runs, the VPS is under its own (set
        // right after the move, outside the source's wait).
        let dirs = b.cgroup_dirs(&name);
        let limit_file = dirs
            .iter()
            .flat_map(|d| [d.join("memory.limit_in_bytes"), d.join("memory.max")])
            .find(|p| p.exists());
        if let Some(f) = limit_file {
            let want = (128u64 << 20).to_string();
            let end = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let l = std::fs::read_to_string(&f).expect("memory limit");
                if l.trim() == want {
                    break;
                }
                assert!(
                    std::time::Instant::now() < end,
                    "the restore's limit stayed: {l}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        assert!(
            !b.agent_log().contains("keeps the memory limit raised"),
            "{}",
            b.agent_log()
        );

        // The target announced the address on the LAN.
        let seen = garp.wait_with_output().expect("ARP watcher");
        assert_eq!(
            String::from_utf8_lossy(&seen.stdout).trim(),
            "garp",
            "no gratuitous ARP for {ip} reached the client"
        );
        // Gone from A, running on B with the same processes.
        let e = ca
            .get_vps(pb::GetVpsRequest { name: name.clone() })
            .await
            .expect_err("gone from A");
        assert_eq!(e.code(), tonic::Code::NotFound);
        let v = get(&mut cb, &name).await;
        assert!(running(&v), "{v:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = counter(&mut cb, &name).await;
        assert!(after > before, "counter continued: {before} -> {after}");
        // Same socket, data both ways; same IP serves HTTP from the client.
        assert_eq!(tcp.echo("after"), "after");
        let page = lan.http_get(&format!("http://{ip}/")).await;
        assert_eq!(page.trim(), name);
        let r = exec(&mut cb, &name, &["sha256sum", "/root/blob"]).await;
        assert!(
            r.stdout.starts_with(&sum),
            "file written before the freeze is byte-exact"
        );
        // The memory arrived intact: a scan made after the move finds only x.
        assert_string_intact(&mut cb, &name).await;
        // It came in lazily, from the images on B, after the VPS ran there.
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while !b.agent_log().contains("lazy pages: every page is in") {
            assert!(std::time::Instant::now() < end, "no lazy restore on B:\n{}", b.agent_log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The masks came along read-only and empty.
        let r = exec(
            &mut cb,
            &name,
            &["sh", "-c", "find /proc/acpi /sys/firmware -mindepth 1 | wc -l; touch /proc/acpi/x"],
        )
        .await;
        assert_ne!(r.code, 0, "a masked dir is writable after the move");
        assert_eq!(r.stdout.trim(), "0", "masked dirs not empty: {}", r.stdout);
        stop(&mut cb, &name, 0, true).await;
    })
    .await;
}

/// Migrates `name` to `b`, SIGKILLing b's agent when the migration reaches `phase`.
async fn migrate_killing_target(
    ca: &mut ferry_proto::agent::v1::agent_service_client::AgentServiceClient<
        tonic::transport::Channel,
    >,
    name: &str,
    b: &mut Host,
    phase: &str,
) -> pb::MigrationEvent {
    let b_pid = b.agent_pid();
    let ev = migrate(ca, name, b, |e| {
        if e.phase == phase {
            if let Some(p) = b_pid {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    })
    .await;
    assert!(
        !ev.error.is_empty(),
        "killing the target at {phase} must fail: {ev:?}"
    );
    ev
}

/// Restarts b's agent and checks it keeps nothing of `name`: no VPS, dir or cgroup.
async fn assert_target_clean(b: &mut Host, name: &str) {
    b.kill_agent();
    b.start_agent().await;
    let mut cb = b.client().await;
    let list = cb
        .list_vps(pb::ListVpsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(list.vps.is_empty(), "{list:?}");
    assert!(
        !b.data_dir().join("vps").join(name).exists(),
        "VPS dir left on the target"
    );
    assert!(
        b.cgroup_dirs(name).iter().all(|d| !d.exists()),
        "cgroup left on the target"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_before_the_decision_leave_the_vps_on_the_source() {
    bounded(300, async {
        let _heavy = HEAVY.lock().await;
        let lan = Lan::new();
        let a = Host::on_lan(&lan, "10.77.0.21/16", vec![]).await;
        let mut b = Host::on_lan(&lan, "10.77.0.22/16", vec![]).await;
        let mut ca = a.client().await;
        let name = format!("mf{}", std::process::id());
        let v0 = create_started(&mut ca, spec(&name, Some("10.77.5.10"))).await;
        start_counter(&mut ca, &name).await;

        // Bad input on either side: the field named, nothing made.
        let mut cb = b.client().await;
        let e = cb
            .migrate_prepare(pb::MigratePrepareRequest {
                migration_id: "mbad".into(),
                spec: Some(spec(&name, None)),
                controllers: vec!["no such address".into()],
                ..Default::default()
            })
            .await
            .expect_err("bad controllers");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains("controllers"), "{}", e.message());
        assert!(!b.data_dir().join("vps").join(&name).exists());
        let e = ca
            .migrate_vps(pb::MigrateVpsRequest {
                name: name.clone(),
                target_addr: format!("unix:{}", b.sock().display()),
                controllers: vec!["unix:/x".into()],
                generation: 1,
                ..Default::default()
            })
            .await
            .expect_err("a cluster migration without its id");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains("migration_id"), "{}", e.message());
        // A post-copy restore whose page server is not ADDR:PORT: refused
        // before any daemon or kernel object; the arrival is then dropped.
        cb.migrate_prepare(pb::MigratePrepareRequest {
            migration_id: "mbadps".into(),
            spec: Some(spec(&name, None)),
            live: true,
            ..Default::default()
        })
        .await
        .expect("prepare");
        let e = cb
            .migrate_restore(pb::MigrateRestoreRequest {
                migration_id: "mbadps".into(),
                live: true,
                page_server: "nowhere".into(),
                ..Default::default()
            })
            .await
            .expect_err("bad page server");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains("page_server"), "{}", e.message());
        assert!(b.cgroup_dirs(&name).iter().all(|d| !d.exists()));
        cb.migrate_finish(pb::MigrateFinishRequest {
            migration_id: "mbadps".into(),
            commit: false,
            generation: 0,
        })
        .await
        .expect("abort");
        assert!(!b.data_dir().join("vps").join(&name).exists());

        // Refused before anything is frozen: the name exists on the target.
        create_started(&mut cb, spec(&name, None)).await;
        let ev = migrate(&mut ca, &name, &b, |_| {}).await;
        assert!(
            ev.error.contains("refused before anything was frozen"),
            "{ev:?}"
        );
        assert_eq!(
            get(&mut ca, &name).await.init_pid,
            v0.init_pid,
            "never frozen"
        );
        stop(&mut cb, &name, 0, true).await;
        cb.destroy_vps(pb::DestroyVpsRequest {
            name: name.clone(),
            force: true,
            generation: 0,
        })
        .await
        .expect("destroy");

        // Kill the target agent during the rootfs pass (a 300 MB file makes it long).
        let r = exec(
            &mut ca,
            &name,
            &[
                "sh",
                "-c",
                "head -c 300000000 /dev/zero | tr '\\0' x > /root/big",
            ],
        )
        .await;
        assert_eq!(r.code, 0, "{}", r.stderr);
        migrate_killing_target(&mut ca, &name, &mut b, "rootfs").await;
        let v = get(&mut ca, &name).await;
        assert!(
            running(&v) && v.init_pid == v0.init_pid,
            "kept running, never frozen: {v:?}"
        );
        assert_target_clean(&mut b, &name).await;

        // Kill the target agent during the restore: the source resumes the VPS from its images.
        let before = counter(&mut ca, &name).await;
        let ev = migrate_killing_target(&mut ca, &name, &mut b, "restore").await;
        assert!(
            ev.error.contains("resumed on the source"),
            "{ev:?}\n{}",
            a.agent_log()
        );
        let v = get(&mut ca, &name).await;
        assert!(running(&v), "{v:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            counter(&mut ca, &name).await > before,
            "the counter went on"
        );
        assert_target_clean(&mut b, &name).await;
        stop(&mut ca, &name, 0, true).await;
    })
    .await;
}

/// The source agent dies right after the freeze (the dump is done, nothing is
/// decided). Its successor finds the journal, settles "stay", has the target
/// drop its copy and brings the VPS back from its images. The VPS runs exactly
/// once, on the source: the decision point was never reached, so the target
/// never let its copy run.
#[tokio::test(flavor = "multi_thread")]
async fn source_agent_killed_after_the_freeze_runs_the_vps_once_on_the_source() {
    bounded(240, async {
        let _heavy = HEAVY.lock().await;
        let lan = Lan::new();
        let mut a = Host::on_lan(&lan, "10.77.0.31/16", vec![]).await;
        let mut b = Host::on_lan(&lan, "10.77.0.32/16", vec![]).await;
        let mut ca = a.client().await;
        let name = format!("ms{}", std::process::id());
        create_started(&mut ca, spec(&name, Some("10.77.6.10"))).await;
        start_counter(&mut ca, &name).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = counter(&mut ca, &name).await;

        let mut s = ca
            .migrate_vps(pb::MigrateVpsRequest {
                name: name.clone(),
                target_addr: format!("unix:{}", b.sock().display()),
                ..Default::default()
            })
            .await
            .expect("migrate")
            .into_inner();
        let a_pid = a.agent_pid().expect("agent pid");
        let mut killed = false;
        while let Some(Ok(ev)) = s.next().await {
            // The final rootfs pass starts once the dump has finished.
            if ev.phase == "final-rootfs" {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(a_pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                killed = true;
                break;
            }
            assert!(!ev.done, "the migration ended before the freeze: {ev:?}");
        }
        assert!(killed, "never saw the freeze end");
        a.kill_agent();
        a.start_agent().await;
        let mut ca = a.client().await;
        let v = wait_for(&mut ca, &name, 30, "running again on the source", running).await;
        assert!(v.init_pid > 0);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = counter(&mut ca, &name).await;
        assert!(
            after > before,
            "resumed from its memory: {before} -> {after}"
        );
        assert!(a
            .agent_log()
            .contains("resumed here from its migration images"));
        // The target was told to drop its copy (no restart of its agent needed).
        assert!(
            !b.data_dir().join("vps").join(&name).exists(),
            "the target still holds the arriving VPS"
        );
        assert_target_clean(&mut b, &name).await;
        stop(&mut ca, &name, 0, true).await;
    })
    .await;
}

/// Waits until the controller's record of `name` satisfies `f`.
async fn wait_record(
    c: &mut ferry_proto::controller::v1::controller_service_client::ControllerServiceClient<
        tonic::transport::Channel,
    >,
    name: &str,
    what: &str,
    f: impl Fn(&ferry_proto::controller::v1::ClusterVps) -> bool,
) -> ferry_proto::controller::v1::ClusterVps {
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(v) = c
            .get_vps(ferry_proto::controller::v1::GetVpsRequest { name: name.into() })
            .await
        {
            let v = v.into_inner();
            if f(&v) {
                return v;
            }
            assert!(
                std::time::Instant::now() < end,
                "timed out waiting for {what}: {v:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Imports `tar` as template `tpl` on host `h` (node `node`) and waits until
/// the controller knows the node has it.
async fn import_template(
    h: &Host,
    c: &mut ferry_proto::controller::v1::controller_service_client::ControllerServiceClient<
        tonic::transport::Channel,
    >,
    node: &str,
    tpl: &str,
    tar: &std::path::Path,
) {
    let (code, _, err) = ferryctl(h, &["template", "import", tpl, tar.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while !c
        .get_node(ferry_proto::controller::v1::GetNodeRequest { name: node.into() })
        .await
        .unwrap()
        .into_inner()
        .templates
        .iter()
        .any(|t| t == tpl)
    {
        assert!(
            std::time::Instant::now() < end,
            "{node} never reported {tpl}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether an agent runs `name` now.
async fn runs_on(h: &Host, name: &str) -> bool {
    let mut c = h.client().await;
    c.get_vps(pb::GetVpsRequest { name: name.into() })
        .await
        .is_ok_and(|v| running(v.get_ref()))
}

/// Through the controllers: refusals before anything is frozen, a live move
/// that is one Raft commit (the record moves with a new generation, the source
/// copy goes), and a move during which the leading controller is SIGKILLed:
/// the agents settle it with the surviving replicas, and the VPS runs exactly
/// once, where the record says.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_migration_is_one_raft_decision_and_survives_a_controller_failover() {
    use ferry_proto::controller::v1 as cpb;
    bounded(360, async {
        let _heavy = HEAVY.lock().await;
        let mut ctl = Controllers::start().await;
        let lan = Lan::new();
        let a = Host::on_lan(&lan, "10.77.0.41/16", ctl.agent_args("mig-a")).await;
        let b = Host::on_lan(&lan, "10.77.0.42/16", ctl.agent_args("mig-b")).await;
        let mut c = ctl.client(0).await;
        wait_node(&mut c, "mig-a", "ready", 15).await;
        wait_node(&mut c, "mig-b", "ready", 15).await;
        let name = format!("cm{}", std::process::id());
        let ip = "10.77.7.10";
        let mut s = spec(&name, Some(ip));
        s.limits.as_mut().unwrap().memory_bytes = 64 << 20;
        c.create_vps(cpb::CreateVpsRequest {
            spec: Some(s),
            placement: Some(cpb::Placement {
                node: "mig-a".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("create");
        let v0 = wait_record(&mut c, &name, "running on mig-a", |v| {
            v.observed == "running" && v.node == "mig-a"
        })
        .await;
        let mut ca = a.client().await;
        start_counter(&mut ca, &name).await;
        let init = get(&mut ca, &name).await.init_pid;

        // Refused before anything is frozen, each naming why, and recording nothing.
        let (code, _, err) = ctl.ferryctl(&["vps", "migrate", &name, "--to", "nosuch"]);
        assert!(
            code != 0 && err.contains("node \"nosuch\" not found"),
            "{err}"
        );
        let (code, _, err) = ctl.ferryctl(&["vps", "migrate", &name, "--to", "mig-a"]);
        assert!(code != 0 && err.contains("is on mig-a already"), "{err}");
        // Target full: a stopped VPS takes all but 32 MiB of mig-b.
        let cap = c
            .get_node(cpb::GetNodeRequest {
                name: "mig-b".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .capacity
            .unwrap_or_default()
            .memory_bytes;
        let mut filler = spec(&format!("{name}f"), None);
        filler.limits.as_mut().unwrap().memory_bytes = cap - (32 << 20);
        c.create_vps(cpb::CreateVpsRequest {
            spec: Some(filler),
            placement: Some(cpb::Placement {
                node: "mig-b".into(),
                ..Default::default()
            }),
            desired: "stopped".into(),
            ..Default::default()
        })
        .await
        .expect("create filler");
        let (code, _, err) = ctl.ferryctl(&["vps", "migrate", &name, "--to", "mig-b"]);
        assert!(
            code != 0 && err.contains("mig-b: memory"),
            "target full: {err}"
        );
        c.delete_vps(cpb::DeleteVpsRequest {
            name: format!("{name}f"),
            force: false,
        })
        .await
        .expect("delete filler");
        // Template missing on the target: a template only mig-a has.
        let tar = a.dir.join("mini.tar");
        run_ok(
            "tar",
            &[
                "-C",
                a.data_dir()
                    .join("templates/busybox/rootfs")
                    .to_str()
                    .unwrap(),
                "-cf",
                tar.to_str().unwrap(),
                ".",
            ],
        );
        import_template(&a, &mut c, "mig-a", "mini", &tar).await;
        let mut tm = spec(&format!("{name}t"), None);
        tm.template = "mini".into();
        c.create_vps(cpb::CreateVpsRequest {
            spec: Some(tm),
            placement: Some(cpb::Placement {
                node: "mig-a".into(),
                ..Default::default()
            }),
            desired: "stopped".into(),
            ..Default::default()
        })
        .await
        .expect("create from mini");
        let (code, _, err) =
            ctl.ferryctl(&["vps", "migrate", &format!("{name}t"), "--to", "mig-b"]);
        assert!(
            code != 0 && err.contains("template mini missing"),
            "template missing: {err}"
        );
        // With the template on mig-b too, the stopped VPS moves cold: files
        // only, and the record follows. (Once mig-a has made it: the
        // reconciler creates it there after the record.)
        import_template(&b, &mut c, "mig-b", "mini", &tar).await;
        wait_record(&mut c, &format!("{name}t"), "made on mig-a", |v| {
            v.observed == "stopped"
        })
        .await;
        let (code, out, err) =
            ctl.ferryctl(&["vps", "migrate", &format!("{name}t"), "--to", "mig-b"]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("migrated (cold)"), "{out}");
        let t = wait_record(&mut c, &format!("{name}t"), "cold move recorded", |v| {
            v.node == "mig-b" && v.migration.is_none()
        })
        .await;
        assert_eq!(t.desired, "stopped");
        let mut cb = b.client().await;
        assert!(stopped(&get(&mut cb, &format!("{name}t")).await));

        let v = wait_record(&mut c, &name, "no migration recorded", |v| {
            v.migration.is_none()
        })
        .await;
        assert_eq!((v.node.as_str(), v.generation), ("mig-a", v0.generation));
        assert_eq!(get(&mut ca, &name).await.init_pid, init, "never frozen");

        // The live move, as an operator runs it, with a TCP client attached.
        spawn_in(&mut ca, &name, "nc -ll -p 7000 -e cat").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut tcp = TcpClient::connect(&lan, ip, 7000);
        assert_eq!(tcp.echo("before"), "before");
        let before = counter(&mut ca, &name).await;
        let (code, out, err) =
            ctl.ferryctl(&["vps", "migrate", &name, "--to", "mig-b", "--verify"]);
        assert_eq!(
            code,
            0,
            "{out}{err}\nA: {}\nB: {}",
            a.agent_log(),
            b.agent_log()
        );
        assert!(out.contains("migrated (stop-copy): downtime "), "{out}");
        eprintln!("{out}");
        // One commit moved the record: new node, next generation, no migration left.
        let v = wait_record(&mut c, &name, "owned by mig-b", |v| v.node == "mig-b").await;
        assert!(v.migration.is_none(), "{v:?}");
        assert_eq!(v.generation, v0.generation + 1);
        let mut cb = b.client().await;
        let on_b = get(&mut cb, &name).await;
        assert!(running(&on_b), "{on_b:?}");
        assert_eq!(on_b.spec.unwrap().generation, v.generation);
        assert!(!runs_on(&a, &name).await, "still running on the source");
        assert_eq!(tcp.echo("after"), "after");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(counter(&mut cb, &name).await > before, "counter continued");
        let events = c
            .watch_events(cpb::WatchEventsRequest {
                after_seq: 0,
                follow: false,
            })
            .await
            .unwrap()
            .into_inner();
        let events: Vec<cpb::Event> = events.filter_map(|e| async { e.ok() }).collect().await;
        assert!(
            events
                .iter()
                .any(|e| e.message.starts_with("migrated from mig-a to mig-b")),
            "{events:?}"
        );
        // The source copy goes (the source releases it; the reconciler would too).
        let end = std::time::Instant::now() + Duration::from_secs(20);
        while ca
            .get_vps(pb::GetVpsRequest { name: name.clone() })
            .await
            .is_ok()
        {
            assert!(std::time::Instant::now() < end, "source copy left");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // Back to mig-a, SIGKILLing the leading controller mid-move; the
        // stream comes through a replica that stays.
        let leader = ctl.leader().await;
        let watcher = (leader + 1) % 3;
        let mut cw = ctl.client(watcher).await;
        let mut stream = cw
            .migrate_vps(cpb::MigrateVpsRequest {
                name: name.clone(),
                to_node: "mig-a".into(),
                ..Default::default()
            })
            .await
            .expect("migrate back")
            .into_inner();
        let mut last = None;
        let mut killed = false;
        while let Some(ev) = stream.next().await {
            let ev = ev.expect("event");
            if !killed && ev.phase == "rootfs" {
                ctl.kill(leader);
                killed = true;
            }
            if ev.done {
                last = Some(ev);
            }
        }
        assert!(killed, "the leader was never killed");
        let ev = last.expect("a final event");
        // Either way, exactly once and where the record says, with no
        // migration left in flight. (The agents reach the survivors, so here
        // the move completes.)
        let mut c = ctl.client(watcher).await;
        let v = wait_record(&mut c, &name, "settled", |v| v.migration.is_none()).await;
        let (on_a, on_b) = (runs_on(&a, &name).await, runs_on(&b, &name).await);
        assert!(on_a != on_b, "runs on a: {on_a}, on b: {on_b}");
        assert_eq!(v.node, if on_a { "mig-a" } else { "mig-b" });
        assert!(
            ev.error.is_empty(),
            "{ev:?}\nA: {}\nB: {}\nleader log: {}",
            a.agent_log(),
            b.agent_log(),
            ctl.log(watcher)
        );
        assert_eq!(v.node, "mig-a");
        assert_eq!(v.generation, v0.generation + 2);
        assert_eq!(tcp.echo("again"), "again");
    })
    .await;
}

/// Post-copy: the VPS runs on the target while its memory follows from the
/// source; a failure before the decision thaws it on the source (its tasks
/// were only stopped, memory and all).
#[tokio::test(flavor = "multi_thread")]
async fn post_copy_moves_memory_on_demand_and_a_rollback_thaws_the_source() {
    bounded(300, async {
        let _heavy = HEAVY.lock().await;
        let lan = Lan::new();
        let mut a = Host::on_lan(&lan, "10.77.0.51/16", vec![]).await;
        let mut b = Host::on_lan(&lan, "10.77.0.52/16", vec![]).await;
        let mut ca = a.client().await;
        let name = format!("pc{}", std::process::id());
        let ip = "10.77.9.10";
        let mut s = spec(&name, Some(ip));
        s.limits.as_mut().unwrap().memory_bytes = 256 << 20;
        create_started(&mut ca, s).await;
        start_counter(&mut ca, &name).await;
        // 64 MiB of memory that must arrive intact: awk holds a string and
        // writes its length to a file every 100 ms.
        spawn_in(
            &mut ca,
            &name,
            "awk 'BEGIN { s = \"x\"; while (length(s) < 67108864) s = s s; \
             while (1) { print length(s) > \"/var/www/len\"; close(\"/var/www/len\"); system(\"sleep 0.1\") } }'",
        )
        .await;
        spawn_in(&mut ca, &name, "nc -ll -p 7000 -e cat").await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut tcp = TcpClient::connect(&lan, ip, 7000);
        assert_eq!(tcp.echo("before"), "before");

        // Rollback first: the target agent dies during the restore.
        let v = get(&mut ca, &name).await;
        let (init, veth) = (v.init_pid, v.host_veth.clone());
        assert!(link_passes(&a, &veth), "{veth} is locked before the move");
        let before = counter(&mut ca, &name).await;
        let b_pid = b.agent_pid();
        let mut locked = None;
        let ev = migrate_vps(&mut ca, &name, &b, pb::MigrationMode::PostCopy, false, |ev| {
            if ev.phase == "restore" {
                // Frozen: the network lock is the VPS's bridge port, disabled.
                locked = Some(!link_passes(&a, &veth));
                if let Some(p) = b_pid {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        })
        .await;
        assert!(!ev.error.is_empty(), "{ev:?}");
        assert_eq!(locked, Some(true), "the link passed frames while frozen");
        assert!(link_passes(&a, &veth), "the rollback left {veth} locked");
        let v = get(&mut ca, &name).await;
        assert!(
            running(&v) && v.init_pid == init,
            "thawed, same init: {v:?}\n{}",
            a.agent_log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(counter(&mut ca, &name).await > before, "the counter went on");
        assert_eq!(tcp.echo("after rollback"), "after rollback");
        b.kill_agent();
        b.start_agent().await;

        // The source agent dies right after the freeze (its CRIU holds the
        // stopped tasks and serves their memory). Its successor settles
        // "stay", has the target drop its copy, and thaws the same tasks.
        let before = counter(&mut ca, &name).await;
        let a_pid = a.agent_pid().expect("agent pid");
        let mut killed = false;
        let _ = migrate_vps(&mut ca, &name, &b, pb::MigrationMode::PostCopy, false, |ev| {
            if !killed && ev.phase == "final-rootfs" {
                killed = true;
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(a_pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        })
        .await;
        assert!(killed, "never reached final-rootfs");
        a.kill_agent();
        a.start_agent().await;
        let mut ca = a.client().await;
        let end = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let v = get(&mut ca, &name).await;
            if running(&v) && counter(&mut ca, &name).await > before {
                assert_eq!(v.init_pid, init, "the same tasks, thawed");
                break;
            }
            assert!(
                std::time::Instant::now() < end,
                "not thawed: {v:?}\n{}",
                a.agent_log()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert_eq!(tcp.echo("after recovery"), "after recovery");
        assert!(
            b.client()
                .await
                .list_vps(pb::ListVpsRequest {})
                .await
                .unwrap()
                .into_inner()
                .vps
                .is_empty(),
            "the target kept a copy"
        );

        // The move.
        let before = counter(&mut ca, &name).await;
        let (code, out, err) = ferryctl(
            &a,
            &[
                "vps",
                "migrate",
                &name,
                "--to",
                &format!("unix:{}", b.sock().display()),
                "--mode",
                "post-copy",
            ],
        );
        assert_eq!(
            code,
            0,
            "{out}{err}\nA: {}\nB: {}",
            a.agent_log(),
            b.agent_log()
        );
        eprintln!("{out}");
        assert!(out.contains("migrated (post-copy): downtime "), "{out}");
        assert!(
            out.lines()
                .any(|l| l.split_whitespace().next() == Some("post-copy")),
            "{out}"
        );
        let mut cb = b.client().await;
        let v = get(&mut cb, &name).await;
        assert!(running(&v), "{v:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(counter(&mut cb, &name).await > before, "counter continued");
        // awk truncates the file before it writes it: an empty read is a
        // write in progress.
        let mut r = exec(&mut cb, &name, &["cat", "/var/www/len"]).await;
        for _ in 0..50 {
            if !r.stdout.trim().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            r = exec(&mut cb, &name, &["cat", "/var/www/len"]).await;
        }
        assert_eq!(
            r.stdout.trim(),
            "67108864",
            "the 64 MiB string arrived\nA: {}\nB: {}\n{}{}",
            a.agent_log(),
            b.agent_log(),
            logs_under(&a.dir, 30),
            logs_under(&b.dir, 30)
        );
        assert_eq!(tcp.echo("after"), "after");
        let e = ca
            .get_vps(pb::GetVpsRequest { name: name.clone() })
            .await
            .expect_err("gone from A");
        assert_eq!(e.code(), tonic::Code::NotFound);
    })
    .await;
}

/// Inside the post-copy window the VPS runs on the target on memory that is
/// still partly on the source. Both agents are killed the moment it opens:
/// the page tunnel's ends, the page server and the lazy-pages daemon are
/// processes of their own, so the memory still arrives whole, and the
/// restarted source agent knows the VPS moved.
#[tokio::test(flavor = "multi_thread")]
async fn both_agents_may_stop_inside_the_post_copy_window() {
    bounded(300, async {
        let _heavy = HEAVY.lock().await;
        let lan = Lan::new();
        let mut a = Host::on_lan(&lan, "10.77.0.53/16", vec![]).await;
        let mut b = Host::on_lan(&lan, "10.77.0.54/16", vec![]).await;
        let mut ca = a.client().await;
        let name = format!("pw{}", std::process::id());
        let mut s = spec(&name, Some("10.77.9.12"));
        s.limits.as_mut().unwrap().memory_bytes = 512 << 20;
        create_started(&mut ca, s).await;
        // 128 MiB that must arrive intact.
        spawn_in(
            &mut ca,
            &name,
            "awk 'BEGIN { s = \"x\"; while (length(s) < 134217728) s = s s; \
             while (1) { print length(s), match(s, /[^x]/) > \"/var/www/len\"; close(\"/var/www/len\"); system(\"sleep 0.1\") } }'",
        )
        .await;
        let end = std::time::Instant::now() + Duration::from_secs(60);
        while exec(&mut ca, &name, &["cat", "/var/www/len"]).await.stdout.trim() != "134217728 0" {
            assert!(std::time::Instant::now() < end, "the string was never made");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (a_pid, b_pid) = (a.agent_pid(), b.agent_pid());
        let mut killed = false;
        let _ = migrate_vps(&mut ca, &name, &b, pb::MigrationMode::PostCopy, false, |ev| {
            if !killed && ev.phase == "post-copy" {
                killed = true;
                for p in [b_pid, a_pid].into_iter().flatten() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        })
        .await;
        assert!(killed, "the post-copy window never opened");
        a.kill_agent();
        b.kill_agent();
        b.start_agent().await;
        a.start_agent().await;
        let mut cb = b.client().await;
        let end = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let r = exec(&mut cb, &name, &["cat", "/var/www/len"]).await;
            if r.code == 0 && !r.stdout.trim().is_empty() {
                assert_eq!(
                    r.stdout.trim(),
                    "134217728 0",
                    "the 128 MiB string changed\nA: {}\nB: {}\n{}{}",
                    a.agent_log(),
                    b.agent_log(),
                    logs_under(&a.dir, 30),
                    logs_under(&b.dir, 30)
                );
                break;
            }
            assert!(
                std::time::Instant::now() < end,
                "the VPS does not run on the target: {}\n{}",
                r.stderr,
                b.agent_log()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // The source's successor knows the move happened: the stopped tasks
        // there stay stopped (an operator removes that copy; in a cluster the
        // controller does).
        let end = std::time::Instant::now() + Duration::from_secs(30);
        while !a
            .agent_log()
            .contains("post-copy: the VPS moved before this agent stopped")
        {
            assert!(
                std::time::Instant::now() < end,
                "the source did not recover the move: {}",
                a.agent_log()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
}

/// Found as an operator: a migration to a node whose agent was stopped
/// (SIGSTOP) waited in preflight until it came back, the VPS locked as
/// migrating. Now the target has a deadline to answer, the move is refused
/// with nothing frozen, and the VPS can move once the target is back.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_target_is_refused_within_a_deadline() {
    // Serialized with the load-sensitive tests (the pre-copy VM's included):
    // its stopped agent and background abort add work they must not share.
    let _heavy = HEAVY.lock().await;
    bounded(180, async {
        let lan = Lan::new();
        let a = Host::on_lan(&lan, "10.77.0.55/16", vec![]).await;
        let b = Host::on_lan(&lan, "10.77.0.56/16", vec![]).await;
        let mut ca = a.client().await;
        let name = format!("st{}", std::process::id());
        let v = create_started(&mut ca, spec(&name, Some("10.77.9.14"))).await;
        let pid = nix::unistd::Pid::from_raw(b.agent_pid().expect("agent pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
        let t = std::time::Instant::now();
        let ev = migrate_vps(
            &mut ca,
            &name,
            &b,
            pb::MigrationMode::StopCopy,
            false,
            |_| {},
        )
        .await;
        let took = t.elapsed();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
        assert!(ev.error.contains("did not answer within"), "{ev:?}");
        assert!(took < Duration::from_secs(30), "refused after {took:?}");
        let now = get(&mut ca, &name).await;
        assert!(running(&now) && now.init_pid == v.init_pid, "{now:?}");
        // The target got the prepare while stopped and may act on it now; the
        // source's abort follows it, and nothing of that arrival stays.
        let reserved = b.data_dir().join("vps").join(&name);
        let end = std::time::Instant::now() + Duration::from_secs(30);
        while reserved.exists() {
            assert!(
                std::time::Instant::now() < end,
                "the abandoned arrival stayed on the target: {}",
                b.agent_log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let ev = migrate_vps(
            &mut ca,
            &name,
            &b,
            pb::MigrationMode::StopCopy,
            false,
            |_| {},
        )
        .await;
        assert!(ev.error.is_empty(), "the move after SIGCONT: {}", ev.error);
    })
    .await;
}

/// Whether link `name` in host `h`'s netns is administratively up.
/// Does the VPS's host link pass frames: up, and its bridge port forwarding
/// (the network lock disables the port, see agent/src/net/lock.rs)?
fn link_passes(h: &Host, name: &str) -> bool {
    let out = std::process::Command::new("ip")
        .args(["-n", &h.id, "-o", "link", "show", name])
        .output()
        .expect("running ip");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.is_empty(), "no link {name}");
    let up = text
        .split_once('<')
        .and_then(|(_, r)| r.split_once('>'))
        .is_some_and(|(flags, _)| flags.split(',').any(|f| f == "UP"));
    let port = std::process::Command::new("bridge")
        .args(["-n", &h.id, "link", "show", "dev", name])
        .output()
        .expect("running bridge");
    up && String::from_utf8_lossy(&port.stdout).contains("state forwarding")
}

/// Pre-copy needs soft-dirty memory tracking. Where this host's kernel lacks
/// it, the test runs itself in the test VM (scripts/install-vm.sh: Debian's
/// stock kernel, which has it), on the same binaries, with cgroup v2.
#[test]
fn pre_copy_moves_memory_in_rounds_while_the_vps_runs() {
    let _heavy = HEAVY.blocking_lock();
    if host_tracks_dirty_memory() {
        tokio::runtime::Runtime::new()
            .expect("runtime")
            .block_on(pre_copy_body());
        return;
    }
    let exe = std::env::current_exe().expect("the test binary");
    let run = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/vm/run.sh");
    // The VM runs one cgroup2 hierarchy, as most production hosts do: the
    // host's own tests cover its hybrid layout.
    let out = Command::new(run)
        .env("FERRY_VM_CGROUP", "v2")
        .args(["-m", "3072", "-e", "FERRY_VM_CGROUP", "--"])
        .arg(&exe)
        .args([
            "--exact",
            "pre_copy_in_the_vm",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .expect("scripts/vm/run.sh");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("test result: ok. 1 passed"),
        "pre-copy in the test VM failed ({}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "runs inside the test VM, started by pre_copy_moves_memory_in_rounds_while_the_vps_runs"]
async fn pre_copy_in_the_vm() {
    assert!(
        host_tracks_dirty_memory(),
        "this kernel has no soft-dirty tracking: run the test outside, it starts the VM"
    );
    pre_copy_body().await;
}

/// `ferryctl vps migrate NAME --mode MODE` from `from`'s agent to `to`'s;
/// asserts it worked and returns what it printed.
fn ferryctl_migrate(from: &Host, to: &Host, name: &str, mode: &str) -> String {
    let target = format!("unix:{}", to.sock().display());
    let (code, out, err) = ferryctl(
        from,
        &["vps", "migrate", name, "--to", &target, "--mode", mode],
    );
    assert_eq!(
        code,
        0,
        "{mode} migration failed: {out}{err}\nsource: {}\ntarget: {}\n{}",
        from.agent_log(),
        to.agent_log(),
        logs_under(&to.dir, 25)
    );
    eprintln!("{out}");
    assert!(
        out.lines()
            .last()
            .is_some_and(|l| l.starts_with(&format!("migrated ({mode}): downtime "))),
        "{out}"
    );
    out
}

/// A phase's bytes in ferryctl's per-phase table (printed as 17M, 198K, 0B).
fn phase_bytes(out: &str, phase: &str) -> Option<u64> {
    let w = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.first() == Some(&phase))?;
    let b = w.last()?;
    let (num, unit) = b.split_at(b.len() - 1);
    let shift = ["B", "K", "M", "G"].iter().position(|u| *u == unit)? * 10;
    Some((num.parse::<f64>().ok()? * (1u64 << shift) as f64) as u64)
}

/// Starts an awk in the VPS holding 16 MiB of memory that must arrive intact:
/// it scans its string for any byte that is not an x and writes what it
/// found to /var/www/mem ("16777216 0": all there), every 200 ms.
async fn spawn_string_scanner(
    c: &mut ferry_proto::agent::v1::agent_service_client::AgentServiceClient<
        tonic::transport::Channel,
    >,
    name: &str,
) {
    spawn_in(
        c,
        name,
        "awk 'BEGIN { s = \"x\"; while (length(s) < 16777216) s = s s; \
         while (1) { print length(s), match(s, /[^x]/) > \"/var/www/mem\"; close(\"/var/www/mem\"); system(\"sleep 0.2\") } }'",
    )
    .await;
}

/// The awk of [`spawn_string_scanner`], scanning its string after the move,
/// finds every byte still an x.
async fn assert_string_intact(
    c: &mut ferry_proto::agent::v1::agent_service_client::AgentServiceClient<
        tonic::transport::Channel,
    >,
    name: &str,
) {
    let _ = exec(c, name, &["rm", "-f", "/var/www/mem"]).await;
    let end = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = exec(c, name, &["cat", "/var/www/mem"]).await;
        if r.code == 0 && !r.stdout.trim().is_empty() {
            assert_eq!(r.stdout.trim(), "16777216 0", "the 16 MiB string changed");
            return;
        }
        assert!(
            std::time::Instant::now() < end,
            "the memory scan never ran after the move"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A pre-copy as an operator runs it: the rounds copy the memory while the
/// VPS serves, the freeze dumps only what the last round missed, and the VPS
/// arrives whole (processes, memory, TCP connection, address).
async fn pre_copy_body() {
    // Generous: inside the VM everything runs under software emulation.
    bounded(900, async {
        let lan = Lan::new();
        let a = Host::on_lan(&lan, "10.77.0.61/16", vec![]).await;
        let mut b = Host::on_lan(&lan, "10.77.0.62/16", vec![]).await;
        let mut ca = a.client().await;
        let name = format!("pre{}", std::process::id());
        let ip = "10.77.11.10";
        // The operator sees which modes the node can run.
        let (_, info, _) = ferryctl(&a, &["info"]);
        assert!(info.contains("pre-copy (dirty tracking)"), "{info}");
        if std::env::var("FERRY_VM_CGROUP").as_deref() == Ok("v2") {
            assert!(info.contains("cgroup v2"), "{info}");
        }
        // Privileged: the VM's data dir is a tmpfs on Debian 12's kernel
        // (6.1), which cannot idmap a tmpfs (6.3+), so an unprivileged VPS
        // is refused there. Pre-copy's rounds are the same for both kinds.
        let mut s = spec(&name, Some(ip));
        s.privileged = true;
        create_started(&mut ca, s).await;
        start_counter(&mut ca, &name).await;
        spawn_in(&mut ca, &name, "nc -ll -p 7000 -e cat").await;
        // 16 MiB that the first round copies and no later round needs to.
        spawn_string_scanner(&mut ca, &name).await;
        let end = std::time::Instant::now() + Duration::from_secs(120);
        while exec(&mut ca, &name, &["cat", "/var/www/mem"])
            .await
            .stdout
            .trim()
            != "16777216 0"
        {
            assert!(
                std::time::Instant::now() < end,
                "the 16 MiB string never got made"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut tcp = TcpClient::connect(&lan, ip, 7000);
        assert_eq!(tcp.echo("before"), "before");

        // The target dies during the rounds (auto picks pre-copy where memory
        // is tracked): the VPS never stopped, and the target keeps nothing.
        let init = get(&mut ca, &name).await.init_pid;
        let ev = migrate_killing_target(&mut ca, &name, &mut b, "pre-copy-1").await;
        assert_eq!(ev.mode, "pre-copy", "{ev:?}");
        assert_target_clean(&mut b, &name).await;
        let v = get(&mut ca, &name).await;
        assert!(
            running(&v) && v.init_pid == init,
            "the VPS did not run on: {v:?}"
        );
        let c1 = counter(&mut ca, &name).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            counter(&mut ca, &name).await > c1,
            "the counter stopped on A"
        );
        assert_eq!(tcp.echo("still"), "still");

        // The target dies during the restore, after the freeze: the source
        // resumes the VPS from its own images, the rounds' chain included.
        migrate_killing_target(&mut ca, &name, &mut b, "restore").await;
        assert_target_clean(&mut b, &name).await;
        let v = get(&mut ca, &name).await;
        assert!(running(&v), "not resumed on A: {v:?}");
        assert_string_intact(&mut ca, &name).await;
        let c1 = counter(&mut ca, &name).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            counter(&mut ca, &name).await > c1,
            "the counter stopped on A"
        );
        assert_eq!(tcp.echo("resumed"), "resumed");

        let mut cb = b.client().await;
        let before = counter(&mut ca, &name).await;
        let out = ferryctl_migrate(&a, &b, &name, "pre-copy");
        let first =
            phase_bytes(&out, "pre-copy-1").unwrap_or_else(|| panic!("no first round:\n{out}"));
        assert!(
            phase_bytes(&out, "pre-copy-2").is_some(),
            "one round only:\n{out}"
        );
        assert!(
            first >= 16 << 20,
            "the first round copied {first} bytes:\n{out}"
        );
        // The freeze dumped what the rounds had not: far less than all of it.
        let frozen = phase_bytes(&out, "freeze").unwrap_or_else(|| panic!("no freeze row:\n{out}"));
        assert!(
            frozen * 4 < first,
            "the final dump wrote {frozen} bytes, the first round {first}:\n{out}"
        );

        // Running on B, whole: the same processes, memory and connection.
        let v = get(&mut cb, &name).await;
        assert!(running(&v), "{v:?}");
        let e = ca
            .get_vps(pb::GetVpsRequest { name: name.clone() })
            .await
            .expect_err("gone from A");
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert_eq!(tcp.echo("after"), "after");
        let page = lan.http_get(&format!("http://{ip}/")).await;
        assert_eq!(page.trim(), name);
        assert_string_intact(&mut cb, &name).await;
        let after = counter(&mut cb, &name).await;
        assert!(after > before, "counter continued: {before} -> {after}");

        // Back by stop-copy, then away again by pre-copy: memory that came in
        // through userfaultfd (the target's lazy fill from its own images) is
        // pre-copied like any other.
        ferryctl_migrate(&b, &a, &name, "stop-copy");
        assert_string_intact(&mut ca, &name).await;
        let out = ferryctl_migrate(&a, &b, &name, "pre-copy");
        let first = phase_bytes(&out, "pre-copy-1").unwrap_or(0);
        assert!(
            first >= 16 << 20,
            "after a lazy fill, the first round copied {first} bytes:\n{out}"
        );
        assert_string_intact(&mut cb, &name).await;
        assert_eq!(tcp.echo("again"), "again");
        stop(&mut cb, &name, 0, true).await;
    })
    .await;
}

/// The drain issue's first bug: right after a committed move the reconciler
/// sent the target `create{start}` for a VPS whose restore was still on its
/// way, and the target booted a fresh copy over it. An arriving VPS now
/// refuses every outside call (start, stop, destroy, a repeated create)
/// until its move settles, and then runs the restored tree, not a new boot.
#[tokio::test(flavor = "multi_thread")]
async fn an_arriving_vps_refuses_outside_calls_until_its_move_settles() {
    bounded(240, async {
        let _heavy = HEAVY.lock().await;
        let lan = Lan::new();
        let a = Host::on_lan(&lan, "10.77.0.81/16", vec![]).await;
        let b = Host::on_lan(&lan, "10.77.0.82/16", vec![]).await;
        let mut ca = a.client().await;
        let name = format!("arr{}", std::process::id());
        create_started(&mut ca, spec(&name, Some("10.77.13.10"))).await;
        start_counter(&mut ca, &name).await;
        // Some files, so the rootfs phase leaves the poller time to hit.
        exec(
            &mut ca,
            &name,
            &["sh", "-c", "head -c 20000000 /dev/urandom > /root/bulk"],
        )
        .await;
        let before = counter(&mut ca, &name).await;
        let marker = b.data_dir().join(format!("vps/{name}/incoming"));
        // While the move runs, the target is asked to start and to create
        // the VPS again as soon as it has a record of it.
        let stop_polling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let poller = {
            let (mut cb, name, stop_polling) =
                (b.client().await, name.clone(), stop_polling.clone());
            tokio::spawn(async move {
                let mut refused = Vec::new();
                while !stop_polling.load(std::sync::atomic::Ordering::SeqCst) {
                    if marker.exists() {
                        let start = cb
                            .start_vps(pb::StartVpsRequest {
                                name: name.clone(),
                                generation: 0,
                            })
                            .await;
                        // A repeated create, not a destroy: the marker may
                        // go between the check and the call, and a destroy
                        // that lands just after the move settled is allowed
                        // (and would end the test's VPS). Both calls share
                        // the refusal with stop, restart and destroy.
                        let create = cb
                            .create_vps(pb::CreateVpsRequest {
                                spec: Some(spec(&name, Some("10.77.13.10"))),
                                start: true,
                            })
                            .await;
                        for r in [start.map(|_| ()), create.map(|_| ())] {
                            match r {
                                // Settled meanwhile: the VPS is there.
                                Err(e) if e.code() == tonic::Code::AlreadyExists => {}
                                Err(e) => refused.push((e.code(), e.message().to_string())),
                                Ok(()) => {}
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                refused
            })
        };
        let ev = migrate_vps(
            &mut ca,
            &name,
            &b,
            pb::MigrationMode::StopCopy,
            false,
            |_| {},
        )
        .await;
        stop_polling.store(true, std::sync::atomic::Ordering::SeqCst);
        let refused = poller.await.expect("poller");
        assert!(ev.error.is_empty(), "{ev:?}");
        assert!(!refused.is_empty(), "the poller never caught the arrival");
        for (code, msg) in &refused {
            assert_eq!(*code, tonic::Code::FailedPrecondition, "{msg}");
            assert!(msg.contains("still arriving"), "{msg}");
        }
        // The restored tree runs: the counter loop (started by exec, which a
        // fresh boot would not run) goes on from where it was.
        let mut cb = b.client().await;
        let v = get(&mut cb, &name).await;
        assert!(running(&v), "{v:?}");
        let after = counter(&mut cb, &name).await;
        assert!(after >= before, "counter went back: {before} -> {after}");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let later = counter(&mut cb, &name).await;
        assert!(
            later > after,
            "the counter loop did not survive: {after} -> {later}"
        );
        assert!(!marker_exists(&b, &name));
    })
    .await;
}

fn marker_exists(h: &Host, name: &str) -> bool {
    h.data_dir().join(format!("vps/{name}/incoming")).exists()
}

/// The agent's safety net (releasing what a stopped VPS still holds) raced
/// against arrivals: a VPS held mid-restore (CRIU waiting for the go, init
/// not reported running yet) read as stopped, the reaper tore it down, its
/// restored tree was SIGKILLed, CRIU hung and a committed move failed with
/// "VPS init did not report running in time" (1 run in 5 of the churn
/// test). Here the reaper runs every 20 ms on both agents while the VPS
/// moves back and forth in both live modes: every move arrives running.
#[tokio::test(flavor = "multi_thread")]
async fn the_reaper_leaves_a_vps_arriving_mid_restore_alone() {
    let _heavy = HEAVY.lock().await;
    bounded(300, async {
        let lan = Lan::new();
        let fast = vec!["--reap-interval-ms".to_string(), "20".to_string()];
        let a = Host::on_lan(&lan, "10.77.0.57/16", fast.clone()).await;
        let b = Host::on_lan(&lan, "10.77.0.58/16", fast).await;
        let name = format!("rp{}", std::process::id());
        let mut ca = a.client().await;
        let mut cb = b.client().await;
        create_started(&mut ca, spec(&name, Some("10.77.9.15"))).await;
        start_counter(&mut ca, &name).await;
        let mut last = 0;
        for k in 0..6 {
            let mode = if k % 2 == 0 {
                pb::MigrationMode::StopCopy
            } else {
                pb::MigrationMode::PostCopy
            };
            let (from, to, c) = if k % 2 == 0 {
                (&mut ca, &b, &mut cb)
            } else {
                (&mut cb, &a, &mut ca)
            };
            let ev = migrate_vps(from, &name, to, mode, false, |_| {}).await;
            assert!(
                ev.error.is_empty(),
                "move {k} ({mode:?}): {}\n{}\n{}",
                ev.error,
                a.agent_log(),
                b.agent_log()
            );
            let v = get(c, &name).await;
            assert!(running(&v), "move {k}: {v:?}");
            // The running VPS came along: its counter goes on.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let n = counter(c, &name).await;
            assert!(n > last, "move {k}: counter {last} -> {n}");
            last = n;
        }
    })
    .await;
}
