//! Controller replicas for the benchmark: real processes on loopback, each
//! with its own data dir and port, killed with SIGKILL, restarted on the same
//! data. (The tests run replicas on the `cluster-tests/` harness, over TLS.)
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_proto::controller::v1 as cpb;
use ferry_proto::controller::v1::controller_service_client::ControllerServiceClient;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_ferry-controller");

pub struct Replica {
    pub addr: String,
    pub dir: PathBuf,
    child: Option<Child>,
    /// Mutual TLS as this admin (None: --insecure-dev).
    pub admin: Option<ferry_proto::tls::ClientTls>,
    /// Flags for the next spawn (a replica joining: --join TOKEN --via ADDR).
    pub extra: Vec<String>,
    /// Mutual TLS (else --insecure-dev on its loopback port).
    pub tls: bool,
}

impl Replica {
    /// A replica at a fresh loopback port, not started yet.
    pub fn new(dir: PathBuf) -> Replica {
        std::fs::create_dir_all(&dir).unwrap();
        Replica {
            addr: format!("127.0.0.1:{}", free_port()),
            dir,
            child: None,
            admin: None,
            extra: Vec::new(),
            tls: false,
        }
    }

    pub fn spawn(&mut self, init: bool) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log"))
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args([
            "--listen",
            &self.addr,
            "--data-dir",
            self.dir.join("data").to_str().unwrap(),
        ])
        .args((!self.tls).then_some("--insecure-dev"))
        .args(&self.extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        if init {
            cmd.arg("--init");
        }
        self.child = Some(cmd.spawn().expect("spawn ferry-controller"));
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.child {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig).unwrap();
        }
    }

    pub async fn client(&self) -> ControllerServiceClient<Channel> {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let a: ferry_proto::addr::Addr = self.addr.parse().unwrap();
            if let Ok(ch) = ferry_proto::addr::connect_with(&a, self.admin.as_ref()).await {
                return ControllerServiceClient::new(ch);
            }
            assert!(
                Instant::now() < end,
                "replica {} does not answer",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
        self.kill();
    }
}

pub struct Cluster {
    pub replicas: Vec<Replica>,
    _dir: tempfile::TempDir,
}

/// A port nothing listens on, and that no other test of this binary got:
/// the port is released before the replica binds it, so two tests running
/// side by side could otherwise be handed the same one (a test then talked to
/// another test's replica and saw no leader).
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

impl Cluster {
    /// `n` replicas: the first bootstraps, the others are added one by one.
    pub async fn start(n: usize) -> Cluster {
        Self::start_with(n, false).await
    }

    /// The same with mutual TLS: the first replica makes the CA, the others
    /// join with tokens, and this process's clients speak as the admin.
    pub async fn start_with(n: usize, tls: bool) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut replicas = Vec::new();
        let mut first = Replica::new(dir.path().join("c0"));
        first.tls = tls;
        first.spawn(true);
        if tls {
            let pem = first.dir.join("data/pki/admin.pem");
            let end = Instant::now() + Duration::from_secs(10);
            while !pem.exists() {
                assert!(Instant::now() < end, "no admin.pem: {}", first.log());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let admin = ferry_proto::tls::Credentials::load(&pem).expect("admin.pem");
            first.admin = Some(
                ferry_proto::tls::ClientTls::new(
                    &admin,
                    ferry_proto::tls::pki::CONTROLLER_SERVER_NAME,
                )
                .expect("admin tls"),
            );
        }
        replicas.push(first);
        for i in 1..n {
            let mut r = Replica::new(dir.path().join(format!("c{i}")));
            if tls {
                let token = replicas[0]
                    .client()
                    .await
                    .create_join_token(cpb::CreateJoinTokenRequest {
                        kind: cpb::JoinKind::Controller as i32,
                        ttl_secs: 600,
                    })
                    .await
                    .expect("token")
                    .into_inner()
                    .token;
                r.extra = vec![
                    "--join".into(),
                    token,
                    "--via".into(),
                    replicas[0].addr.clone(),
                ];
                r.admin = replicas[0].admin.clone();
                r.tls = true;
            }
            r.spawn(false);
            replicas.push(r);
        }
        let c = Cluster {
            replicas,
            _dir: dir,
        };
        let mut first = c.replicas[0].client().await;
        assert!(
            has_leader(&mut first).await,
            "the bootstrapping replica {} elected no leader; its log:\n{}",
            c.replicas[0].addr,
            c.replicas[0].log()
        );
        for r in &c.replicas[1..] {
            let _ = r.client().await;
            first
                .add_member(cpb::AddMemberRequest {
                    addr: r.addr.clone(),
                })
                .await
                .expect("add member");
        }
        c
    }

    /// Status as the given replica sees it.
    pub async fn status(&self, i: usize) -> Result<cpb::ClusterStatusResponse, tonic::Status> {
        let mut c = self.replicas[i].client().await;
        c.cluster_status(cpb::ClusterStatusRequest {})
            .await
            .map(|r| r.into_inner())
    }

    /// Index of the current leader, asking the live replicas in `among`.
    pub async fn leader(&self, among: &[usize]) -> usize {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            for &i in among {
                if let Ok(s) = self.status(i).await {
                    if s.leader_id != 0 {
                        if let Some(j) = self.replicas.iter().position(|r| r.addr == s.leader_addr)
                        {
                            if among.contains(&j) {
                                return j;
                            }
                        }
                    }
                }
            }
            assert!(Instant::now() < end, "no leader among {among:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Whether the replica behind `c` knows a leader within 10 s.
async fn has_leader(c: &mut ControllerServiceClient<Channel>) -> bool {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(s) = c.cluster_status(cpb::ClusterStatusRequest {}).await {
            if s.get_ref().leader_id != 0 {
                return true;
            }
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn node_req(name: &str, port: u16) -> cpb::RegisterNodeRequest {
    cpb::RegisterNodeRequest {
        name: name.into(),
        addr: format!("10.0.0.1:{port}"),
        capacity: Some(cpb::Capacity {
            cpu_millicores: 4000,
            memory_bytes: 8 << 30,
            disk_bytes: 0,
        }),
        labels: Default::default(),
    }
}
