//! Migration benchmark (root; real CRIU, two agents on a LAN of network
//! namespaces, a client host polling the VPS).
//!
//! 1. Downtime and total time of a live migration of a VPS holding 64, 256 and
//!    1024 MiB of touched memory, per mode this host supports (stop-copy A->B,
//!    then post-copy B->A, then, where the kernel tracks dirty memory,
//!    pre-copy A->B; `scripts/vm/run.sh` runs the bench in the test VM,
//!    whose kernel does). Downtime is
//!    measured by the source (freeze to running on the target) and by a client
//!    on the LAN (the longest gap between HTTP answers, polling every ~5 ms with
//!    a 50 ms connect timeout). Beside it, the peer: the CRIU CLI dumping and
//!    restoring a plain process holding the same memory on this node, images
//!    in RAM as a migration's are (no transfer, no network): the floor of any
//!    stop-and-copy.
//! 2. Rootfs sync of a Debian 12 minbase tree (debootstrap): a cold migration's
//!    full pass and its no-op final pass, beside `rsync -aHAX` to a loopback
//!    rsync daemon (full, then no-op), and bytes on the wire against `rsync -z`.
//!
//! 3. Mutual TLS against plaintext in the same run: 256 MiB moved stop-copy
//!    A->B and post-copy B->A between two plaintext agents, then between two
//!    agents with node certificates (agent-to-agent TLS, the client TLS too),
//!    alternating, FERRY_BENCH_TLS_ROUNDS rounds (default 3).
//! 4. Unprivileged VPSes (user namespaces) against privileged ones, the same
//!    moves, alternating, FERRY_BENCH_USERNS_ROUNDS rounds (default 3).
//!
//! `cargo bench -p ferry-agent --bench migrate`. FERRY_BENCH_SIZES_MIB picks the
//! sizes (default "64,256,1024"); FERRY_BENCH_SKIP_ROOTFS=1 skips part 2;
//! FERRY_BENCH_ONLY_TLS=1 runs part 3 alone, FERRY_BENCH_ONLY_USERNS=1 part 4;
//! FERRY_BENCH_PHASES=1 prints every migration's phase times.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ferry_proto::agent::v1 as pb;

const DEBIAN: &str = "/var/tmp/ferry-cache/debian12-v1.tar.zst";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A busybox awk that fills a string of `bytes` (a power of two) and sleeps.
fn memhog_awk(bytes: u64) -> String {
    format!(
        "BEGIN {{ s = \"x\"; while (length(s) < {bytes}) s = s s; \
         while (1) system(\"sleep 3600\") }}"
    )
}

/// Polls http://ip/ from the client host until told to stop; reports the
/// longest gap between answers (ms), answers and failures.
struct Poller {
    child: std::process::Child,
}

impl Poller {
    fn start(lan: &Lan, ip: &str) -> Poller {
        let script = "import socket,sys,time,threading\n\
ip=sys.argv[1]\n\
done=[False]\n\
def wait():\n\
\x20   sys.stdin.read(); done[0]=True\n\
threading.Thread(target=wait,daemon=True).start()\n\
last=None; gap=0.0; ok=0; fail=0\n\
while not done[0]:\n\
\x20   try:\n\
\x20       s=socket.create_connection((ip,80),timeout=0.05)\n\
\x20       s.settimeout(0.5)\n\
\x20       s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n\
\x20       d=b''\n\
\x20       while True:\n\
\x20           c=s.recv(4096)\n\
\x20           if not c: break\n\
\x20           d+=c\n\
\x20       s.close()\n\
\x20       if b' 200 ' in d[:20]:\n\
\x20           now=time.monotonic()\n\
\x20           if last is not None: gap=max(gap,now-last)\n\
\x20           last=now; ok+=1\n\
\x20       else: fail+=1\n\
\x20   except Exception:\n\
\x20       fail+=1\n\
\x20   time.sleep(0.005)\n\
print('%d %d %d' % (gap*1000, ok, fail), flush=True)\n";
        let child = Command::new("nsenter")
            .arg(format!("--net={}", lan.client))
            .args(["--", "python3", "-c", script, ip])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 poller");
        Poller { child }
    }

    /// (longest gap ms, answers, failures)
    fn stop(self) -> (u64, u64, u64) {
        let Poller { mut child } = self;
        drop(child.stdin.take());
        let out = child.wait_with_output().expect("poller output");
        let s = String::from_utf8_lossy(&out.stdout);
        let v: Vec<u64> = s
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        (
            v.first().copied().unwrap_or(0),
            v.get(1).copied().unwrap_or(0),
            v.get(2).copied().unwrap_or(0),
        )
    }
}

async fn wait_memory(
    c: &mut pb::agent_service_client::AgentServiceClient<tonic::transport::Channel>,
    name: &str,
    bytes: u64,
    secs: u64,
) {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        let v = get(c, name).await;
        if v.usage.map(|u| u.memory_bytes).unwrap_or(0) >= bytes {
            return;
        }
        assert!(Instant::now() < end, "{name} never reached {bytes} bytes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn migrate(
    c: &mut pb::agent_service_client::AgentServiceClient<tonic::transport::Channel>,
    name: &str,
    to: &Host,
    mode: pb::MigrationMode,
) -> pb::MigrationEvent {
    let ev = migrate_vps(c, name, to, mode, false, |_| {}).await;
    if !ev.error.is_empty() {
        // The monitor's log says what the restore did; the test dir goes
        // with the panic.
        let log = ev
            .error
            .split("see ")
            .nth(1)
            .and_then(|r| r.split(';').next())
            .and_then(|p| std::fs::read_to_string(p.trim()).ok())
            .unwrap_or_default();
        let target_log = to.agent_log();
        let tail: Vec<&str> = target_log.lines().rev().take(15).collect();
        panic!(
            "migration failed: {}\n{log}\ntarget agent log (last lines):\n{}",
            ev.error,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    if std::env::var_os("FERRY_BENCH_PHASES").is_some() {
        let table: Vec<String> = ev
            .phases
            .iter()
            .map(|p| format!("{} {} ms {} KiB", p.phase, p.millis, p.bytes >> 10))
            .collect();
        println!("    {name} {}: {}", ev.mode, table.join(", "));
    }
    ev
}

/// A phase's (milliseconds, bytes), summed over its runs.
fn phase(ev: &pb::MigrationEvent, phase: &str) -> (u64, u64) {
    ev.phases
        .iter()
        .filter(|p| p.phase == phase)
        .fold((0, 0), |(ms, b), p| (ms + p.millis, b + p.bytes))
}

fn phase_ms(ev: &pb::MigrationEvent, name: &str) -> u64 {
    phase(ev, name).0
}

fn criu_bin() -> String {
    if Path::new("/opt/ferry/criu/bin/criu").exists() {
        "/opt/ferry/criu/bin/criu".into()
    } else {
        "criu".into()
    }
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// The CRIU CLI on a plain process holding `bytes`: (dump, restore) times.
/// Its images go where a migration's do: to RAM (/dev/shm) when it is a
/// tmpfs, else next to the test's files.
fn criu_cli_peer(dir: &Path, bytes: u64) -> Option<(Duration, Duration)> {
    let ram = nix::sys::statfs::statfs("/dev/shm")
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
    let images = if ram {
        Path::new("/dev/shm").join(format!("ferry-bench-cli-{}-{bytes}", std::process::id()))
    } else {
        dir.join(format!("cli-{bytes}"))
    };
    std::fs::create_dir_all(&images).ok()?;
    let res = cli_dump_restore(dir, &images, bytes);
    let _ = std::fs::remove_dir_all(&images);
    res
}

fn cli_dump_restore(dir: &Path, images: &Path, bytes: u64) -> Option<(Duration, Duration)> {
    let child = Command::new("setsid")
        .args(["busybox", "awk", &memhog_awk(bytes)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let pid = child.id();
    let end = Instant::now() + Duration::from_secs(300);
    while rss_bytes(pid) < bytes {
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = Instant::now();
    let dump = Command::new(criu_bin())
        .args(["dump", "-t", &pid.to_string(), "-D"])
        .arg(images)
        .args(["-o", "dump.log"])
        .status()
        .ok()?;
    let dump_t = t.elapsed();
    let mut child = child;
    let _ = child.wait();
    if !dump.success() {
        eprintln!("criu dump failed: see {}/dump.log", images.display());
        return None;
    }
    let t = Instant::now();
    let pidfile = dir.join(format!("cli-{bytes}.pid"));
    let rst = Command::new(criu_bin())
        .args(["restore", "-d", "-D"])
        .arg(images)
        .args(["-o", "restore.log", "--pidfile"])
        .arg(&pidfile)
        .status()
        .ok()?;
    let rst_t = t.elapsed();
    if let Some(p) = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = std::fs::remove_file(&pidfile);
    rst.success().then_some((dump_t, rst_t))
}

async fn memory_bench(lan: &Lan, a: &Host, b: &Host) -> Vec<String> {
    let sizes: Vec<u64> = std::env::var("FERRY_BENCH_SIZES_MIB")
        .unwrap_or_else(|_| "64,256,1024".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let mut rows = Vec::new();
    let tracked = host_tracks_dirty_memory();
    println!(
        "\n== live migration downtime{}",
        if tracked {
            ""
        } else {
            " (no pre-copy: this kernel has no soft-dirty tracking)"
        }
    );
    println!(
        "{:>8} {:>10}  {:>9} {:>10} {:>8} {:>7} {:>7} {:>8} {:>9}",
        "memory",
        "mode",
        "downtime",
        "client gap",
        "total",
        "freeze",
        "images",
        "restore",
        "post-copy"
    );
    for (i, mib) in sizes.iter().enumerate() {
        let bytes = mib << 20;
        let name = format!("bm{mib}");
        let ip = format!("10.77.8.{}", 10 + i);
        let mut ca = a.client().await;
        let mut s = spec(&name, Some(&ip));
        s.limits.as_mut().expect("limits").memory_bytes = 2 * bytes + (128 << 20);
        create_started(&mut ca, s).await;
        spawn_in(
            &mut ca,
            &name,
            &format!("awk '{}'", memhog_awk(bytes).replace('\'', "")),
        )
        .await;
        wait_memory(&mut ca, &name, bytes, 300).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        // A -> B stop-copy, then B -> A post-copy: the same VPS, the same memory.
        let mut moves = vec![
            (pb::MigrationMode::StopCopy, a, b),
            (pb::MigrationMode::PostCopy, b, a),
        ];
        if tracked {
            moves.push((pb::MigrationMode::PreCopy, a, b));
        }
        let mut at = a;
        for (mode, from, to) in moves {
            let mut c = from.client().await;
            let poller = Poller::start(lan, &ip);
            tokio::time::sleep(Duration::from_millis(500)).await;
            let ev = migrate(&mut c, &name, to, mode).await;
            if ev.error.is_empty() {
                at = to;
            }
            // The figures count only if the VPS arrived whole: its memory is
            // all there again (filled in after it runs, where lazily).
            wait_memory(&mut at.client().await, &name, bytes, 60).await;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let (gap, ok, fail) = poller.stop();
            assert!(ok > 0, "the client never got an answer");
            let row = format!(
                "{:>4} MiB {:>10}  {:>6} ms {:>7} ms {:>5} ms {:>4} ms {:>4} ms {:>5} ms {:>6} ms",
                mib,
                ev.mode,
                ev.downtime_ms,
                gap,
                ev.total_ms,
                phase_ms(&ev, "freeze"),
                phase_ms(&ev, "images"),
                phase_ms(&ev, "restore"),
                phase_ms(&ev, "post-copy"),
            );
            println!("{row}  (client: {ok} answers, {fail} failed polls)");
            rows.push(row);
        }
        let peer = criu_cli_peer(&a.dir, bytes);
        let peer_s = match peer {
            Some((d, r)) => format!(
                "{:>4} MiB  peer: CRIU CLI dump {:.0} ms + restore {:.0} ms = {:.0} ms (one node, images in RAM, no transfer)",
                mib,
                ms(d),
                ms(r),
                ms(d + r)
            ),
            None => format!("{mib:>4} MiB  peer: CRIU CLI failed"),
        };
        println!("{peer_s}");
        rows.push(peer_s);
        let mut c = at.client().await;
        stop(&mut c, &name, 0, true).await;
        let _ = c
            .destroy_vps(pb::DestroyVpsRequest {
                name: name.clone(),
                force: true,
                generation: 0,
            })
            .await;
    }
    rows
}

fn debian_tree(into: &Path) -> bool {
    if !Path::new(DEBIAN).exists() {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/make-debian-template.sh"
        );
        let _ = std::fs::create_dir_all("/var/tmp/ferry-cache");
        if !Command::new(script)
            .arg(DEBIAN)
            .status()
            .is_ok_and(|s| s.success())
        {
            return false;
        }
    }
    std::fs::create_dir_all(into).is_ok()
        && Command::new("sh")
            .arg("-c")
            .arg(format!(
                "zstd -dc {DEBIAN} | tar -C {} --numeric-owner --xattrs -xf -",
                into.display()
            ))
            .status()
            .is_ok_and(|s| s.success())
}

struct RsyncDaemon {
    child: std::process::Child,
    port: u16,
}

impl Drop for RsyncDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Mounts a tmpfs on `dir` if it is empty (its contents would be hidden).
fn ram_dest(dir: &Path) -> bool {
    let _ = std::fs::create_dir_all(dir);
    if !std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none()) {
        return false;
    }
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("mode=755"),
    )
    .is_ok()
}

fn rsync_daemon(dir: &Path, dest: &Path) -> RsyncDaemon {
    let port = 20000 + (std::process::id() % 20000) as u16;
    let conf = dir.join("rsyncd.conf");
    let mut f = std::fs::File::create(&conf).expect("rsyncd.conf");
    writeln!(
        f,
        "use chroot = false\nuid = root\ngid = root\n[dst]\npath = {}\nread only = false\n",
        dest.display()
    )
    .expect("write rsyncd.conf");
    let child = Command::new("rsync")
        .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
        .arg(format!("--port={port}"))
        .arg(format!("--config={}", conf.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("rsync --daemon");
    std::thread::sleep(Duration::from_millis(500));
    RsyncDaemon { child, port }
}

/// One rsync run: (time, bytes sent).
fn rsync(src: &Path, port: u16, sub: &str, z: bool) -> (Duration, u64) {
    let t = Instant::now();
    let out = Command::new("rsync")
        .arg(if z { "-aHAXz" } else { "-aHAX" })
        .args(["--stats", "--numeric-ids"])
        .arg(format!("{}/", src.display()))
        .arg(format!("rsync://127.0.0.1:{port}/dst/{sub}/"))
        .output()
        .expect("rsync");
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "rsync failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("Total bytes sent:"))
        .and_then(|l| l.split(':').nth(1))
        .map(|v| v.trim().replace(',', ""))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (took, sent)
}

async fn rootfs_bench(a: &Host, b: &Host) -> Vec<String> {
    println!("\n== rootfs sync: Debian 12 minbase (debootstrap)");
    let name = "bdeb".to_string();
    let mut ca = a.client().await;
    ca.create_vps(pb::CreateVpsRequest {
        spec: Some(spec(&name, None)),
        start: false,
    })
    .await
    .expect("create");
    let upper: PathBuf = a.data_dir().join("vps").join(&name).join("upper");
    if !debian_tree(&upper) {
        println!("skipped: no Debian 12 tree (debootstrap or a mirror is missing)");
        return Vec::new();
    }
    let du = Command::new("du")
        .args(["-sb"])
        .arg(&upper)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    let tree_bytes: u64 = du
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // Both contenders read a warm page cache and start with nothing dirty
    // (tar to a pipe reads every file; tar to /dev/null would skip them).
    let warm = || {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "tar -C {} -cf - . | cat >/dev/null; sync",
                upper.display()
            ))
            .status();
    };
    warm();

    // rsync first: the migration removes the source copy.
    let dest = a.dir.join("rsync-dest");
    std::fs::create_dir_all(&dest).expect("rsync dest");
    // Both destinations in RAM: the comparison is of the two engines, not
    // of this host's disk, which throttles as the bench writes (runs to disk
    // swung from 0.75x to 2.6x). The test's cleanup unmounts them.
    let on_ram = ram_dest(&dest) && ram_dest(&b.data_dir().join("vps"));
    let d = rsync_daemon(&a.dir, &dest);
    // The better of two full runs, each into an empty directory.
    let (r1, r_bytes) = rsync(&upper, d.port, "plain", false);
    warm();
    let (r2, _) = rsync(&upper, d.port, "plain2", false);
    let r_full = r1.min(r2);
    warm();
    let (r_noop, _) = rsync(&upper, d.port, "plain", false);
    let (_, rz_bytes) = rsync(&upper, d.port, "z", true);
    warm();

    let ev = migrate(&mut ca, &name, b, pb::MigrationMode::Cold).await;
    let (full1, full_bytes) = phase(&ev, "rootfs");
    let noop = phase_ms(&ev, "final-rootfs");
    // The better of two full copies, as rsync's: the tree goes back B→A,
    // into A's VPS dir (empty now) on tmpfs as well.
    let back = on_ram && ram_dest(&a.data_dir().join("vps"));
    let full = if back {
        // B's copy lives in RAM: nothing to warm, only writes to settle.
        let _ = Command::new("sync").status();
        let ev = migrate(&mut b.client().await, &name, a, pb::MigrationMode::Cold).await;
        let full2 = phase(&ev, "rootfs").0;
        println!("full copies: A→B {full1} ms, B→A {full2} ms");
        full1.min(full2)
    } else {
        full1
    };

    let mb = tree_bytes as f64 / 1e6;
    let rows = vec![
        format!(
            "tree {:.0} MB, {}; full copy, the better of two: ferry {} ms ({:.0} MB/s), rsync -aHAX {:.0} ms ({:.0} MB/s): {:.2}x rsync's speed",
            mb,
            if on_ram { "both destinations on tmpfs" } else { "destinations on disk" },
            full,
            mb / (full.max(1) as f64 / 1000.0),
            ms(r_full),
            mb / r_full.as_secs_f64(),
            ms(r_full) / full.max(1) as f64
        ),
        format!(
            "bytes on the wire: ferry {:.1} MB (zstd where it pays), rsync {:.1} MB, rsync -z {:.1} MB",
            full_bytes as f64 / 1e6,
            r_bytes as f64 / 1e6,
            rz_bytes as f64 / 1e6
        ),
        format!(
            "no-op pass (nothing changed): ferry {} ms, rsync {:.0} ms",
            noop,
            ms(r_noop)
        ),
    ];
    for r in &rows {
        println!("{r}");
    }
    rows
}

/// Part 3: the same 256 MiB moves between plaintext agents and between TLS
/// agents, alternating.
async fn tls_vs_plaintext(lan: &Lan, a: &Host, b: &Host) -> Vec<String> {
    use ferry_proto::tls::{pki::CERT_VALIDITY, Ca, Role, UserRole};
    let ca = Ca::generate("bench").expect("ca");
    let admin = ca
        .issue(
            &Role::User {
                name: "bench".into(),
                role: UserRole::Admin,
            },
            CERT_VALIDITY,
        )
        .expect("admin");
    ferry_proto::addr::use_credentials(&admin).expect("credentials");
    let node = |n: &str| {
        ca.issue(&Role::Node(n.into()), CERT_VALIDITY)
            .expect("node")
    };
    let c = Host::on_lan_tls(lan, "10.77.0.63/16", "bench-c", &node("bench-c")).await;
    let d = Host::on_lan_tls(lan, "10.77.0.64/16", "bench-d", &node("bench-d")).await;
    let rounds = env_rounds("FERRY_BENCH_TLS_ROUNDS");
    println!("\n== mutual TLS against plaintext, 256 MiB, {rounds} rounds alternating");
    alternating(
        &[("plaintext", a, b, false), ("TLS", &c, &d, false)],
        rounds,
        "bt",
        9,
    )
    .await
}

/// Unprivileged VPSes (a user namespace each, the default) against
/// privileged ones, between the same two agents.
async fn userns_vs_privileged(a: &Host, b: &Host) -> Vec<String> {
    let rounds = env_rounds("FERRY_BENCH_USERNS_ROUNDS");
    println!("\n== unprivileged against privileged, 256 MiB, {rounds} rounds alternating");
    alternating(
        &[("unprivileged", a, b, false), ("privileged", a, b, true)],
        rounds,
        "bu",
        8,
    )
    .await
}

fn env_rounds(key: &str) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// Each round, for each variant (label, source, target, privileged): a VPS
/// holding 256 MiB moved stop-copy source→target, then post-copy back.
/// Returns min/median/max rows per variant and mode.
async fn alternating(
    variants: &[(&str, &Host, &Host, bool)],
    rounds: usize,
    prefix: &str,
    subnet: u8,
) -> Vec<String> {
    let bytes: u64 = 256 << 20;
    // (variant, mode) -> [(downtime, total)]
    let mut got: std::collections::BTreeMap<(usize, String), Vec<(u64, u64)>> = Default::default();
    for round in 0..rounds {
        for (k, (label, x, y, privileged)) in variants.iter().enumerate() {
            let name = format!("{prefix}{round}v{k}");
            let ip = format!("10.77.{subnet}.{}", 10 + round * variants.len() + k);
            let mut cx = x.client().await;
            let mut s = spec(&name, Some(&ip));
            s.limits.as_mut().expect("limits").memory_bytes = 2 * bytes + (128 << 20);
            s.privileged = *privileged;
            create_started(&mut cx, s).await;
            spawn_in(
                &mut cx,
                &name,
                &format!("awk '{}'", memhog_awk(bytes).replace('\'', "")),
            )
            .await;
            wait_memory(&mut cx, &name, bytes, 300).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut at = *x;
            for (mode, from, to) in [
                (pb::MigrationMode::StopCopy, *x, *y),
                (pb::MigrationMode::PostCopy, *y, *x),
            ] {
                let ev = migrate(&mut from.client().await, &name, to, mode).await;
                if ev.error.is_empty() {
                    at = to;
                    got.entry((k, ev.mode.clone()))
                        .or_default()
                        .push((ev.downtime_ms, ev.total_ms));
                    println!(
                        "round {round} {label:<12} {:>10}: downtime {} ms, total {} ms",
                        ev.mode, ev.downtime_ms, ev.total_ms
                    );
                } else {
                    println!("round {round} {label}: {} failed: {}", ev.mode, ev.error);
                }
                wait_memory(&mut at.client().await, &name, bytes, 60).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let _ = at
                .client()
                .await
                .destroy_vps(pb::DestroyVpsRequest {
                    name: name.clone(),
                    force: true,
                    ..Default::default()
                })
                .await;
        }
    }
    let mut rows = Vec::new();
    for ((k, mode), v) in &got {
        let stat = |f: &dyn Fn(&(u64, u64)) -> u64| {
            let mut x: Vec<u64> = v.iter().map(f).collect();
            x.sort();
            format!("{}/{}/{}", x[0], x[x.len() / 2], x[x.len() - 1])
        };
        let row = format!(
            "256 MiB {:>10} {:<12} downtime min/median/max {} ms, total {} ms ({} runs)",
            mode,
            variants[*k].0,
            stat(&|p| p.0),
            stat(&|p| p.1),
            v.len()
        );
        println!("{row}");
        rows.push(row);
    }
    rows
}

fn main() {
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async {
        let lan = Lan::new();
        let a = Host::on_lan(&lan, "10.77.0.61/16", vec![]).await;
        let b = Host::on_lan(&lan, "10.77.0.62/16", vec![]).await;
        if std::env::var("FERRY_BENCH_ONLY_TLS").as_deref() == Ok("1") {
            for r in tls_vs_plaintext(&lan, &a, &b).await {
                println!("{r}");
            }
            return;
        }
        if std::env::var("FERRY_BENCH_ONLY_USERNS").as_deref() == Ok("1") {
            for r in userns_vs_privileged(&a, &b).await {
                println!("{r}");
            }
            return;
        }
        let mut rows = memory_bench(&lan, &a, &b).await;
        if std::env::var("FERRY_BENCH_SKIP_ROOTFS").as_deref() != Ok("1") {
            rows.extend(rootfs_bench(&a, &b).await);
        }
        rows.extend(tls_vs_plaintext(&lan, &a, &b).await);
        rows.extend(userns_vs_privileged(&a, &b).await);
        println!("\n== summary");
        for r in rows {
            println!("{r}");
        }
    });
}
