//! Test hosts: each is a network namespace with its own agent, data dir, run
//! dir and bridge, like a separate server. Cleanup does not trust the agent: it
//! kills by cgroup and by path, unmounts, removes cgroups and the netns, so a
//! failed or killed test leaves nothing, and leftovers of a killed earlier run
//! are swept at the next start.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

#[path = "../../../cluster-tests/src/checker.rs"]
pub mod checker;
pub mod cluster;
#[path = "../../../cluster-tests/src/reap.rs"]
mod reap;
#[allow(unused_imports)]
pub use cluster::*;

use ferry_proto::agent::v1 as pb;
use ferry_proto::agent::v1::agent_service_client::AgentServiceClient;
use tonic::transport::Channel;

pub const ROOT: &str = "/var/tmp/ferry-tests";
pub const AGENT: &str = env!("CARGO_BIN_EXE_ferry-agent");
pub const BRIDGE: &str = "fbr0";
pub const BRIDGE_CIDR: &str = "10.77.0.1/16";

static COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP: std::sync::Once = std::sync::Once::new();

/// Serializes tests that load the CPU or memory, so their measurements hold.
pub static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub struct Host {
    pub id: String,
    pub dir: PathBuf,
    agent: Option<Child>,
    /// More agent flags (e.g. --controller).
    pub extra_args: Vec<String>,
    /// The bridge's address on this host.
    pub bridge_cidr: String,
    /// Its agent speaks mutual TLS (this process's clients use the
    /// credentials set with `ferry_proto::addr::use_credentials`).
    pub tls: bool,
}

/// A LAN shared by hosts (a bridge in the root namespace) with a client host
/// on it at 10.77.0.99: VPSes of all hosts on the LAN are one L2 segment, so a
/// VPS keeps its address when it moves.
pub struct Lan {
    pub id: String,
    pub client: String,
}

impl Lan {
    pub fn new() -> Lan {
        SWEEP.call_once(sweep_leftovers);
        let id = format!(
            "ft{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        cleanup(&id);
        run_ok("ip", &["link", "add", &id, "type", "bridge"]);
        run_ok("ip", &["link", "set", &id, "up"]);
        // The client host: its netns carries the LAN's id, its veth is "<id>c".
        run_ok("ip", &["netns", "add", &id]);
        let port = format!("{id}c");
        run_ok(
            "ip",
            &[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &id,
            ],
        );
        run_ok("ip", &["link", "set", &port, "master", &id, "up"]);
        run_ok(
            "ip",
            &["-n", &id, "addr", "add", "10.77.0.99/16", "dev", "eth0"],
        );
        run_ok("ip", &["-n", &id, "link", "set", "eth0", "up"]);
        run_ok("ip", &["-n", &id, "link", "set", "lo", "up"]);
        Lan {
            client: format!("/run/netns/{id}"),
            id,
        }
    }

    /// An HTTP GET from the client host (see [`Host::http_get`]).
    pub async fn http_get(&self, url: &str) -> String {
        http_get_in(&self.client, url).await
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        cleanup(&self.id);
    }
}

impl Host {
    pub async fn new() -> Host {
        Self::with_args(Vec::new()).await
    }

    pub async fn with_args(extra_args: Vec<String>) -> Host {
        Self::make(None, BRIDGE_CIDR, extra_args, None).await
    }

    /// A host whose bridge is plugged into `lan`, with bridge address `addr`
    /// (e.g. "10.77.0.11/16").
    pub async fn on_lan(lan: &Lan, addr: &str, extra_args: Vec<String>) -> Host {
        Self::make(Some(lan), addr, extra_args, None).await
    }

    /// [`Host::on_lan`] with mutual TLS: node `node`'s credentials (from a
    /// CA the test made) are in place before the agent starts.
    pub async fn on_lan_tls(
        lan: &Lan,
        addr: &str,
        node: &str,
        creds: &ferry_proto::tls::Credentials,
    ) -> Host {
        let args = vec!["--node-name".to_string(), node.to_string()];
        Self::make(Some(lan), addr, args, Some(creds)).await
    }

    async fn make(
        lan: Option<&Lan>,
        bridge_cidr: &str,
        mut extra_args: Vec<String>,
        creds: Option<&ferry_proto::tls::Credentials>,
    ) -> Host {
        SWEEP.call_once(sweep_leftovers);
        let id = format!(
            "ft{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let dir = Path::new(ROOT).join(&id);
        cleanup(&id);
        std::fs::create_dir_all(&dir).expect("creating test dir");
        run_ok("ip", &["netns", "add", &id]);
        run_ok("ip", &["-n", &id, "link", "set", "lo", "up"]);
        if let Some(lan) = lan {
            // The host's LAN port ("uplink" inside, named like the host outside).
            run_ok(
                "ip",
                &[
                    "link", "add", &id, "type", "veth", "peer", "name", "uplink", "netns", &id,
                ],
            );
            run_ok("ip", &["link", "set", &id, "master", &lan.id, "up"]);
            extra_args.splice(0..0, ["--uplink".to_string(), "uplink".to_string()]);
        }
        let mut h = Host {
            id,
            dir,
            agent: None,
            extra_args,
            bridge_cidr: bridge_cidr.into(),
            tls: creds.is_some(),
        };
        if let Some(c) = creds {
            c.save(&h.data_dir().join("pki/node.pem"))
                .expect("writing the node's credentials");
        }
        h.start_agent().await;
        h
    }

    pub fn sock(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }
    pub fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.id)
    }

    pub async fn start_agent(&mut self) {
        let _ = std::fs::remove_file(self.sock());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns_path()))
            .arg("--")
            .arg(AGENT)
            .args(["--listen", &format!("unix:{}", self.sock().display())])
            .args(["--data-dir", self.data_dir().to_str().unwrap()])
            .args(["--run-dir", self.run_dir().to_str().unwrap()])
            .args(["--bridge", BRIDGE, "--bridge-cidr", &self.bridge_cidr])
            // Plaintext on its unix socket, unless the test joins a TLS cluster.
            .args(
                (!self.tls && !self.extra_args.iter().any(|a| a == "--join"))
                    .then_some("--insecure-dev"),
            )
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning the agent");
        self.agent = Some(child);
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if self.sock().exists() && self.try_client().await.is_some() {
                return;
            }
            if let Some(Ok(Some(st))) = self.agent.as_mut().map(|c| c.try_wait()) {
                panic!("agent exited with {st}: {}", self.agent_log());
            }
            assert!(
                Instant::now() < end,
                "agent did not come up: {}",
                self.agent_log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    pub fn agent_pid(&self) -> Option<i32> {
        self.agent.as_ref().map(|c| c.id() as i32)
    }

    /// SIGKILL, the way a crash would end it.
    pub fn kill_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn try_client(&self) -> Option<AgentServiceClient<Channel>> {
        let a = ferry_proto::addr::Addr::Unix(self.sock());
        let joined = self.extra_args.iter().any(|x| x == "--join");
        let ch = if self.tls || joined {
            ferry_proto::addr::connect_node(&a).await.ok()?
        } else {
            ferry_proto::addr::connect(&a).await.ok()?
        };
        Some(ferry_proto::limits::agent_client(ch))
    }

    pub async fn client(&self) -> AgentServiceClient<Channel> {
        self.try_client().await.expect("connecting to the agent")
    }

    /// A shell command in this host's network namespace.
    pub fn sh(&self, cmd: &str) -> Output {
        Command::new("nsenter")
            .arg(format!("--net={}", self.netns_path()))
            .args(["--", "/bin/sh", "-c", cmd])
            .output()
            .expect("nsenter")
    }

    /// An HTTP GET from this host's network namespace; the body, or "" if
    /// nothing answered within 5 s (a VPS's init starts httpd a moment after
    /// the VPS reports running, later still on a loaded machine).
    pub async fn http_get(&self, url: &str) -> String {
        http_get_in(&self.netns_path(), url).await
    }

    pub fn instance(&self) -> String {
        ferry_agent::paths::Paths::instance_id(&self.run_dir())
    }

    /// Every cgroup directory a VPS of this host would have.
    pub fn cgroup_dirs(&self, vps: &str) -> Vec<PathBuf> {
        let layout = ferry_agent::cgroup::Layout::detect().expect("cgroup layout");
        ferry_agent::cgroup::VpsCgroup::new(layout, &self.instance(), vps).dirs()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill_agent();
        // For a post-mortem: FERRY_KEEP_TEST_DIRS=1 leaves the host's dir
        // (logs, run state, images) in place; the next run's sweep removes it.
        if std::env::var("FERRY_KEEP_TEST_DIRS").as_deref() == Ok("1") {
            eprintln!("kept {}", self.dir.display());
            return;
        }
        cleanup(&self.id);
    }
}

/// Removes everything a test host made, agent or no agent.
pub fn cleanup(id: &str) {
    let dir = Path::new(ROOT).join(id);
    // Agents and monitors name a path under the dir on their command line.
    // With the slash: `ft1x1` must not match `ft1x1Ab3/`, a concurrent
    // test's controllers (their dir shares the prefix), which it killed.
    let dir_s = format!("{}/", dir.to_string_lossy());
    reap::kill_naming(&dir_s);
    let inst = ferry_agent::paths::Paths::instance_id(&dir.join("run"));
    reap::kill_cgroup_tree(&Path::new("ferry").join(inst));
    reap::unmount_under(&dir_s);
    let _ = std::fs::remove_dir_all(&dir);
    if Path::new("/run/netns").join(id).exists() {
        let _ = Command::new("ip").args(["netns", "del", id]).status();
    }
    // A LAN's bridge and client port (absent for ordinary hosts).
    if Path::new("/sys/class/net").join(id).exists() {
        let _ = Command::new("ip").args(["link", "del", id]).status();
    }
}

/// Hosts of test processes that no longer run (a killed earlier run).
fn sweep_leftovers() {
    let mut ids: Vec<String> = std::fs::read_dir(ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    ids.extend(
        std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string)),
    );
    for id in ids {
        let Some(pid) = id
            .strip_prefix("ft")
            .and_then(|r| r.split('x').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() as i32 && !Path::new(&format!("/proc/{pid}")).exists() {
            cleanup(&id);
        }
    }
}

pub fn run_ok(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Bounds a test: a hang fails it instead of holding CI.
pub async fn bounded<F: std::future::Future<Output = ()>>(secs: u64, f: F) {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test timed out");
}

pub fn spec(name: &str, ip: Option<&str>) -> pb::VpsSpec {
    pb::VpsSpec {
        name: name.into(),
        template: "busybox".into(),
        limits: Some(pb::Limits {
            memory_bytes: 128 << 20,
            ..Default::default()
        }),
        net: ip.map(|i| pb::NetConfig {
            ip: i.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub async fn create_started(c: &mut AgentServiceClient<Channel>, spec: pb::VpsSpec) -> pb::Vps {
    c.create_vps(pb::CreateVpsRequest {
        spec: Some(spec),
        start: true,
    })
    .await
    .expect("create+start")
    .into_inner()
}

pub struct ExecResult {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub async fn exec(c: &mut AgentServiceClient<Channel>, name: &str, argv: &[&str]) -> ExecResult {
    exec_t(c, name, argv, 60).await
}

pub async fn exec_t(
    c: &mut AgentServiceClient<Channel>,
    name: &str,
    argv: &[&str],
    timeout: u32,
) -> ExecResult {
    let req = pb::ExecRequest {
        name: name.into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        timeout_secs: timeout,
        ..Default::default()
    };
    let mut s = c.exec(req).await.expect("exec").into_inner();
    let (mut out, mut err, mut code) = (Vec::new(), Vec::new(), -999);
    while let Some(m) = s.message().await.expect("exec stream") {
        match m.item {
            Some(pb::exec_output::Item::Stdout(b)) => out.extend(b),
            Some(pb::exec_output::Item::Stderr(b)) => err.extend(b),
            Some(pb::exec_output::Item::ExitCode(c)) => code = c,
            None => {}
        }
    }
    ExecResult {
        code,
        stdout: String::from_utf8_lossy(&out).into(),
        stderr: String::from_utf8_lossy(&err).into(),
    }
}

/// Stops a VPS through the API and returns it as it is afterwards.
pub async fn stop(
    c: &mut AgentServiceClient<Channel>,
    name: &str,
    timeout_secs: u32,
    force: bool,
) -> pb::Vps {
    c.stop_vps(pb::StopVpsRequest {
        name: name.into(),
        timeout_secs,
        force,
        generation: 0,
    })
    .await
    .expect("stop")
    .into_inner()
}

pub async fn get(c: &mut AgentServiceClient<Channel>, name: &str) -> pb::Vps {
    c.get_vps(pb::GetVpsRequest { name: name.into() })
        .await
        .expect("get")
        .into_inner()
}

/// Polls until `f` holds for the VPS, or panics after `secs`.
pub async fn wait_for(
    c: &mut AgentServiceClient<Channel>,
    name: &str,
    secs: u64,
    what: &str,
    f: impl Fn(&pb::Vps) -> bool,
) -> pb::Vps {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        let v = get(c, name).await;
        if f(&v) {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for {name}: {what}; last: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn running(v: &pb::Vps) -> bool {
    v.status == pb::VpsStatus::Running as i32
}
pub fn stopped(v: &pb::Vps) -> bool {
    v.status == pb::VpsStatus::Stopped as i32
}

/// `ferryctl --agent <h> ARGS`: exit code, stdout, stderr.
pub fn ferryctl(h: &Host, args: &[&str]) -> (i32, String, String) {
    run_ferryctl("--agent", &format!("unix:{}", h.sock().display()), args)
}

/// `ferryctl FLAG ADDR ARGS`: exit code, stdout, stderr.
pub fn run_ferryctl(flag: &str, addr: &str, args: &[&str]) -> (i32, String, String) {
    let bin = std::path::Path::new(AGENT).with_file_name("ferryctl");
    assert!(
        bin.exists(),
        "{} missing: build the workspace first (scripts/test.sh does)",
        bin.display()
    );
    let o = Command::new(bin)
        .arg(flag)
        .arg(addr)
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// curl from the network namespace at `netns`, retried for 5 s while nothing answers.
async fn http_get_in(netns: &str, url: &str) -> String {
    for _ in 0..50 {
        let o = Command::new("nsenter")
            .arg(format!("--net={netns}"))
            .args(["--", "curl", "-s", "-m", "3", url])
            .output()
            .expect("nsenter");
        if !o.stdout.is_empty() {
            return String::from_utf8_lossy(&o.stdout).into_owned();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    String::new()
}

/// Migrates `name` from the agent behind `c` to `target` (node-local),
/// showing every event to `on_event`; returns the final one.
pub async fn migrate_vps(
    c: &mut AgentServiceClient<Channel>,
    name: &str,
    target: &Host,
    mode: pb::MigrationMode,
    verify: bool,
    mut on_event: impl FnMut(&pb::MigrationEvent),
) -> pb::MigrationEvent {
    use futures::StreamExt;
    let mut s = c
        .migrate_vps(pb::MigrateVpsRequest {
            name: name.into(),
            target_addr: format!("unix:{}", target.sock().display()),
            target_node: target.id.clone(),
            mode: mode as i32,
            verify,
            ..Default::default()
        })
        .await
        .expect("migrate")
        .into_inner();
    let mut last = None;
    while let Some(ev) = s.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            // The source agent went away (some tests kill it).
            Err(s) => {
                return pb::MigrationEvent {
                    done: true,
                    error: format!("progress stream broke: {}", s.message()),
                    ..Default::default()
                }
            }
        };
        on_event(&ev);
        if ev.done {
            last = Some(ev);
        }
    }
    last.expect("a final event")
}

/// Starts `cmd` in the background inside VPS `name`, detached from exec (its
/// own session, no stdio), and checks the shell took it.
pub async fn spawn_in(c: &mut AgentServiceClient<Channel>, name: &str, cmd: &str) {
    let line = format!("{cmd} </dev/null >/dev/null 2>&1 &");
    let r = exec(c, name, &["setsid", "sh", "-c", &line]).await;
    assert_eq!(r.code, 0, "{cmd}: {}", r.stderr);
}

/// The last lines of every `*.log` under `dir` (a failed test's evidence:
/// CRIU's and the monitor's logs go with the run dirs).
pub fn logs_under(dir: &Path, lines: usize) -> String {
    let mut out = String::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() && p.extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(lines).collect();
                out.push_str(&format!("--- {}\n", p.display()));
                for l in tail.into_iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
    }
    out
}

/// Whether this host's CRIU and kernel track dirty memory (pre-copy).
pub fn host_tracks_dirty_memory() -> bool {
    Command::new(ferry_agent::criu::Criu::default_path())
        .args(["check", "--feature", "mem_dirty_track"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Builds `tests/probes/<name>.c` as a static binary at `out`.
#[allow(dead_code)]
pub fn build_probe(name: &str, out: &std::path::Path) {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/probes/");
    let st = std::process::Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(out)
        .arg(format!("{src}{name}.c"))
        .status()
        .expect("running cc (Debian: build-essential)");
    assert!(st.success(), "building the {name} probe");
}

/// Parses a probe's "NAME RESULT" lines.
#[allow(dead_code)]
pub fn probe_results(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// Runs the `syscalls` probe (built at `bin`) as root in VPS `name` on `h`:
/// every call that reaches the host kernel as a whole must get EPERM.
#[allow(dead_code)]
pub async fn assert_kernel_calls_refused(
    c: &mut AgentServiceClient<Channel>,
    h: &Host,
    name: &str,
    bin: &Path,
) {
    let inside = h.data_dir().join(format!("vps/{name}/rootfs/probe"));
    std::fs::copy(bin, &inside).expect("copying the probe into the VPS");
    let r = exec(c, name, &["/probe"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let got = probe_results(&r.stdout);
    for call in [
        "bpf",
        "perf_event_open",
        "keyctl",
        "add_key",
        "userfaultfd",
        "kcmp",
        "init_module",
        "kexec_load",
    ] {
        assert_eq!(
            got.get(call).map(String::as_str),
            Some("EPERM"),
            "{call} inside the VPS: {got:?}"
        );
    }
}
