//! A three-replica controller cluster for agent tests, over unix sockets
//! reachable from every test host's network namespace.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_proto::controller::v1 as cpb;
use ferry_proto::controller::v1::controller_service_client::ControllerServiceClient;

use super::AGENT;

pub struct Controllers {
    pub dir: tempfile::TempDir,
    children: Vec<Option<Child>>,
    /// Mutual TLS: replica 0 made the CA; this process speaks as its admin.
    pub tls: bool,
}

impl Drop for Controllers {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Controllers {
    pub fn sock(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("c{i}.sock"))
    }
    /// Flags that make an agent join these controllers as node `name`.
    pub fn agent_args(&self, name: &str) -> Vec<String> {
        vec![
            "--controller".into(),
            self.addrs(),
            "--node-name".into(),
            name.into(),
        ]
    }
    pub fn addrs(&self) -> String {
        (0..3)
            .map(|i| format!("unix:{}", self.sock(i).display()))
            .collect::<Vec<_>>()
            .join(",")
    }
    /// Plaintext replicas (`--insecure-dev` on their unix sockets).
    pub async fn start() -> Controllers {
        Self::start_with(false).await
    }

    /// Replicas with mutual TLS, as an operator sets them up: replica 0
    /// `--init` (the CA, the first admin's bundle), the others `--join` with
    /// controller tokens. This test process then speaks as that admin.
    pub async fn start_tls() -> Controllers {
        Self::start_with(true).await
    }

    /// The first admin's credentials (TLS).
    pub fn admin_pem(&self) -> PathBuf {
        self.dir.path().join("c0/pki/admin.pem")
    }

    /// Flags that make an agent join these TLS controllers as node `name`,
    /// with a fresh node token.
    pub async fn join_args(&self, name: &str) -> Vec<String> {
        let mut a = self.agent_args(name);
        a.extend(["--join".to_string(), self.token(cpb::JoinKind::Node).await]);
        a
    }

    pub async fn token(&self, kind: cpb::JoinKind) -> String {
        self.client(0)
            .await
            .create_join_token(cpb::CreateJoinTokenRequest {
                kind: kind as i32,
                ttl_secs: 600,
            })
            .await
            .expect("join token")
            .into_inner()
            .token
    }

    fn spawn(&self, i: usize, extra: &[String]) -> Child {
        let bin = Path::new(AGENT).with_file_name("ferry-controller");
        let log = std::fs::File::create(self.dir.path().join(format!("c{i}.log"))).unwrap();
        let mut cmd = Command::new(&bin);
        cmd.args(["--listen", &format!("unix:{}", self.sock(i).display())])
            .args([
                "--data-dir",
                self.dir.path().join(format!("c{i}")).to_str().unwrap(),
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if !self.tls {
            cmd.arg("--insecure-dev");
        }
        cmd.spawn().unwrap()
    }

    async fn start_with(tls: bool) -> Controllers {
        let bin = Path::new(AGENT).with_file_name("ferry-controller");
        assert!(
            bin.exists(),
            "{} missing: build the workspace first (scripts/test.sh does)",
            bin.display()
        );
        // Named like a test host's dir (ft<pid>x…, under ROOT): if this run
        // is killed, the next one's sweep kills these controllers too (by
        // the dir on their command line) and removes the dir.
        super::SWEEP.call_once(super::sweep_leftovers);
        std::fs::create_dir_all(super::ROOT).expect("test root");
        let mut c = Controllers {
            dir: tempfile::Builder::new()
                .prefix(&format!("ft{}x", std::process::id()))
                .tempdir_in(super::ROOT)
                .expect("controllers' dir"),
            children: Vec::new(),
            tls,
        };
        let first_child = c.spawn(0, &["--init".to_string()]);
        c.children.push(Some(first_child));
        if tls {
            let end = Instant::now() + Duration::from_secs(10);
            while !c.admin_pem().exists() {
                assert!(Instant::now() < end, "no admin credentials: {}", c.log(0));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let admin = ferry_proto::tls::Credentials::load(&c.admin_pem()).expect("admin.pem");
            // Once per process; a second TLS cluster in one test binary
            // would need its own process.
            let _ = ferry_proto::addr::use_credentials(&admin);
        }
        let mut first = c.client(0).await;
        let end = Instant::now() + Duration::from_secs(10);
        while first
            .cluster_status(cpb::ClusterStatusRequest {})
            .await
            .map(|s| s.into_inner().leader_id)
            .unwrap_or(0)
            == 0
        {
            assert!(Instant::now() < end, "no leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for i in 1..3 {
            let extra = if tls {
                vec![
                    "--join".to_string(),
                    c.token(cpb::JoinKind::Controller).await,
                    "--via".to_string(),
                    format!("unix:{}", c.sock(0).display()),
                ]
            } else {
                Vec::new()
            };
            let child = c.spawn(i, &extra);
            c.children.push(Some(child));
            let _ = c.client(i).await;
            first
                .add_member(cpb::AddMemberRequest {
                    addr: format!("unix:{}", c.sock(i).display()),
                })
                .await
                .expect("add member");
        }
        c
    }
    pub async fn client(&self, i: usize) -> ControllerServiceClient<tonic::transport::Channel> {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if self.sock(i).exists() {
                if let Ok(ch) = ferry_proto::addr::connect_controller(
                    &ferry_proto::addr::Addr::Unix(self.sock(i)),
                )
                .await
                {
                    return ControllerServiceClient::new(ch);
                }
            }
            assert!(Instant::now() < end, "controller {i} does not answer");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub async fn wait_node(
    c: &mut ControllerServiceClient<tonic::transport::Channel>,
    name: &str,
    status: &str,
    secs: u64,
) {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(n) = c.get_node(cpb::GetNodeRequest { name: name.into() }).await {
            if n.get_ref().status == status {
                return;
            }
        }
        assert!(Instant::now() < end, "node {name} never became {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Controllers {
    /// The replica that leads now.
    pub async fn leader(&self) -> usize {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            for i in 0..self.children.len() {
                if self.children[i].is_none() {
                    continue;
                }
                let Ok(ch) = ferry_proto::addr::connect_controller(&ferry_proto::addr::Addr::Unix(
                    self.sock(i),
                ))
                .await
                else {
                    continue;
                };
                if let Ok(s) = ControllerServiceClient::new(ch)
                    .cluster_status(cpb::ClusterStatusRequest {})
                    .await
                {
                    let s = s.into_inner();
                    if s.leader_id != 0 && s.leader_id == s.self_id {
                        return i;
                    }
                }
            }
            assert!(Instant::now() < end, "no leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILLs replica `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("c{i}.log"))).unwrap_or_default()
    }

    /// `ferryctl --controller <all replicas> ARGS`: exit code, stdout,
    /// stderr; as the first admin when the cluster runs TLS.
    pub fn ferryctl(&self, args: &[&str]) -> (i32, String, String) {
        if !self.tls {
            return super::run_ferryctl("--controller", &self.addrs(), args);
        }
        let admin = self.admin_pem();
        let mut all = vec!["--credentials", admin.to_str().unwrap_or_default()];
        all.extend_from_slice(args);
        super::run_ferryctl("--controller", &self.addrs(), &all)
    }
}
