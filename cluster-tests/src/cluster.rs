//! Forming a cluster as an operator does (`scripts/cluster-demo.sh`, in
//! Rust): host 1's controller `--init` makes the CA and the first admin's
//! credentials; the other replicas join with tokens and are added; each
//! agent joins with a node token. This test process then speaks as that
//! admin (one cluster at a time per process, see [`Cluster::lock`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ferry_proto::addr::Addr;
use ferry_proto::controller::v1 as cpb;
use ferry_proto::controller::v1::controller_service_client::ControllerServiceClient;
use tonic::transport::Channel;

use crate::daemon::Daemon;
use crate::net::Net;
use crate::{bin_dir, sweep, ROOT};

pub type Ctl = ControllerServiceClient<Channel>;
pub type AgentClient = ferry_proto::agent::v1::agent_service_client::AgentServiceClient<Channel>;

/// What a host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Controller,
    Agent,
    Both,
    /// Nothing at first: a host a test adds later (see
    /// [`Cluster::join_controller`]).
    Spare,
}

impl Role {
    fn controller(self) -> bool {
        matches!(self, Role::Controller | Role::Both)
    }
    fn agent(self) -> bool {
        matches!(self, Role::Agent | Role::Both)
    }
}

pub struct Host {
    pub i: usize,
    pub role: Role,
    pub controller: Option<Daemon>,
    pub agent: Option<Daemon>,
}

pub struct Cluster {
    pub id: String,
    pub dir: PathBuf,
    pub net: Net,
    pub hosts: Vec<Host>,
    bin: PathBuf,
    agent_env: Vec<(usize, String, String)>,
}

static SEQ: AtomicU32 = AtomicU32::new(0);
static ONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub const CONTROLLER_PORT: u16 = 7800;
pub const AGENT_PORT: u16 = 7700;

/// Runs `cmd`: exit code, stdout, stderr.
pub fn run(mut cmd: std::process::Command) -> (i32, String, String) {
    let out = cmd.output().expect("ferryctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A single-use join token of `kind`, as an operator makes one.
async fn join_token(c: &mut Ctl, kind: cpb::JoinKind) -> String {
    c.create_join_token(cpb::CreateJoinTokenRequest {
        kind: kind as i32,
        ttl_secs: 600,
    })
    .await
    .expect("join token")
    .into_inner()
    .token
}

impl Cluster {
    /// One cluster at a time in a test process (they share the admin
    /// credentials and this machine's two cores).
    pub async fn lock() -> tokio::sync::MutexGuard<'static, ()> {
        ONE.lock().await
    }

    /// `roles[i]` is host i+1's. Every controller host gets a replica.
    pub async fn start(roles: &[Role]) -> Cluster {
        Self::start_with(roles, &[]).await
    }

    /// [`Cluster::start`] with environment variables for some hosts' agents:
    /// `(host, NAME, value)` (e.g. a `FERRY_FAILPOINT`).
    pub async fn start_with(roles: &[Role], agent_env: &[(usize, &str, &str)]) -> Cluster {
        sweep::leftovers(8);
        let id = format!(
            "fc{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let dir = PathBuf::from(ROOT).join(&id);
        sweep::teardown(&id, roles.len());
        std::fs::create_dir_all(&dir).expect("run dir");
        let net = Net::create(&id, roles.len());
        let mut c = Cluster {
            id,
            dir,
            net,
            hosts: roles
                .iter()
                .enumerate()
                .map(|(n, r)| Host {
                    i: n + 1,
                    role: *r,
                    controller: None,
                    agent: None,
                })
                .collect(),
            bin: bin_dir(),
            agent_env: agent_env
                .iter()
                .map(|(i, k, v)| (*i, k.to_string(), v.to_string()))
                .collect(),
        };
        c.form().await;
        c
    }

    fn host_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("h{i}"))
    }

    /// Host i's agent data dir (its templates, VPSes).
    pub fn agent_data_dir(&self, i: usize) -> PathBuf {
        self.host_dir(i).join("agent")
    }

    pub fn controller_addr(i: usize) -> String {
        format!("{}:{CONTROLLER_PORT}", Net::mgmt_ip(i))
    }

    pub fn agent_addr(i: usize) -> String {
        format!("{}:{AGENT_PORT}", Net::mgmt_ip(i))
    }

    /// Every replica's address, comma-separated (ferryctl's --controller).
    pub fn controllers(&self) -> String {
        self.hosts
            .iter()
            .filter(|h| h.role.controller())
            .map(|h| Self::controller_addr(h.i))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn admin_pem(&self) -> PathBuf {
        let first = self
            .hosts
            .iter()
            .find(|h| h.role.controller())
            .map(|h| h.i)
            .unwrap_or(1);
        self.host_dir(first).join("controller/pki/admin.pem")
    }

    async fn form(&mut self) {
        let ctl_hosts: Vec<usize> = self
            .hosts
            .iter()
            .filter(|h| h.role.controller())
            .map(|h| h.i)
            .collect();
        let first = *ctl_hosts.first().expect("a controller host");
        let d = self.spawn_controller(
            first,
            vec!["--init".into(), "--ip-pool".into(), "10.85.16.0/22".into()],
        );
        self.hosts[first - 1].controller = Some(d);
        let end = Instant::now() + Duration::from_secs(15);
        while !self.admin_pem().exists() {
            assert!(Instant::now() < end, "no admin credentials");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let admin = self.admin_pem();
        // This process speaks as this cluster's admin from now on (clusters
        // run one at a time: see `lock`).
        let creds = ferry_proto::tls::Credentials::load(&admin).expect("admin.pem");
        ferry_proto::addr::use_credentials(&creds).expect("credentials");
        let mut c = self.client_of(first).await;
        for &i in ctl_hosts.iter().skip(1) {
            self.join_controller_via(&mut c, first, i).await;
        }
        let agents: Vec<usize> = self
            .hosts
            .iter()
            .filter(|h| h.role.agent())
            .map(|h| h.i)
            .collect();
        for &i in &agents {
            let token = join_token(&mut c, cpb::JoinKind::Node).await;
            let d = self.spawn_agent(i, token);
            self.hosts[i - 1].agent = Some(d);
        }
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = c
                .list_nodes(cpb::ListNodesRequest {})
                .await
                .map(|r| {
                    r.into_inner()
                        .nodes
                        .iter()
                        .filter(|n| n.status == "ready")
                        .count()
                })
                .unwrap_or(0);
            if ready == agents.len() {
                break;
            }
            assert!(
                Instant::now() < end,
                "{ready} of {} nodes ready: {}",
                agents.len(),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Host `i` joins as a controller replica, as an operator adds one: a
    /// join token from a replica, the new replica started with it (`--join
    /// TOKEN --via`), then added as a voter. For a [`Role::Spare`] host (its
    /// role becomes [`Role::Controller`]) or a controller host whose data dir
    /// a test removed.
    pub async fn join_controller(&mut self, i: usize) {
        let (via, mut c) = self.leader().await;
        self.hosts[i - 1].role = match self.hosts[i - 1].role {
            Role::Spare | Role::Controller => Role::Controller,
            Role::Agent | Role::Both => Role::Both,
        };
        self.join_controller_via(&mut c, via, i).await;
    }

    async fn join_controller_via(&mut self, c: &mut Ctl, first: usize, i: usize) {
        let token = join_token(c, cpb::JoinKind::Controller).await;
        let d = self.spawn_controller(
            i,
            vec![
                "--join".into(),
                token,
                "--via".into(),
                Self::controller_addr(first),
            ],
        );
        self.hosts[i - 1].controller = Some(d);
        let pem = self.host_dir(i).join("controller/pki/controller.pem");
        let end = Instant::now() + Duration::from_secs(15);
        while !pem.exists() {
            assert!(Instant::now() < end, "replica {i} never joined");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let r = c
                .add_member(cpb::AddMemberRequest {
                    addr: Self::controller_addr(i),
                })
                .await;
            match r {
                Ok(_) => break,
                Err(e) => {
                    assert!(Instant::now() < end, "adding replica {i}: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    fn spawn_controller(&self, i: usize, extra: Vec<String>) -> Daemon {
        let dir = self.host_dir(i);
        let mut args = vec![
            "--listen".to_string(),
            Self::controller_addr(i),
            "--data-dir".into(),
            dir.join("controller").to_string_lossy().into_owned(),
        ];
        args.extend(extra);
        Daemon::spawn(
            &format!("controller{i}"),
            self.bin.join("ferry-controller"),
            &self.net.netns_path(i),
            args,
            Vec::new(),
            self.dir.join(format!("controller{i}.log")),
        )
    }

    fn spawn_agent(&self, i: usize, token: String) -> Daemon {
        let dir = self.host_dir(i);
        let args = vec![
            "--listen".to_string(),
            Self::agent_addr(i),
            "--data-dir".into(),
            dir.join("agent").to_string_lossy().into_owned(),
            "--run-dir".into(),
            dir.join("run").to_string_lossy().into_owned(),
            "--bridge".into(),
            "ferrybr0".into(),
            "--bridge-cidr".into(),
            Net::lan_cidr(i),
            "--uplink".into(),
            "uplink".into(),
            "--controller".into(),
            self.controllers(),
            "--node-name".into(),
            Self::node(i),
            "--join".into(),
            token,
        ];
        Daemon::spawn(
            &format!("agent{i}"),
            self.bin.join("ferry-agent"),
            &self.net.netns_path(i),
            args,
            self.agent_env
                .iter()
                .filter(|(h, _, _)| *h == i)
                .map(|(_, k, v)| (k.clone(), v.clone()))
                .collect(),
            self.dir.join(format!("agent{i}.log")),
        )
    }

    /// Host i's node name.
    pub fn node(i: usize) -> String {
        format!("n{i}")
    }

    /// A client of host i's controller replica.
    pub async fn client_of(&self, i: usize) -> Ctl {
        let a = Addr::Tcp(Self::controller_addr(i));
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(ch) = ferry_proto::addr::connect_controller(&a).await {
                return ControllerServiceClient::new(ch);
            }
            assert!(Instant::now() < end, "controller {i} does not answer");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A client of whichever replica leads now.
    pub async fn leader(&self) -> (usize, Ctl) {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            for h in self
                .hosts
                .iter()
                .filter(|h| h.controller.as_ref().is_some_and(|d| d.running()))
            {
                let a = Addr::Tcp(Self::controller_addr(h.i));
                let Ok(Ok(ch)) = tokio::time::timeout(
                    Duration::from_secs(1),
                    ferry_proto::addr::connect_controller(&a),
                )
                .await
                else {
                    continue;
                };
                let mut c = ControllerServiceClient::new(ch);
                if let Ok(Ok(s)) = tokio::time::timeout(
                    Duration::from_secs(1),
                    c.cluster_status(cpb::ClusterStatusRequest {}),
                )
                .await
                {
                    let s = s.into_inner();
                    if s.leader_id != 0 && s.leader_id == s.self_id {
                        return (h.i, c);
                    }
                }
            }
            assert!(Instant::now() < end, "no leader: {}", self.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A client of host i's agent.
    pub async fn agent_client(&self, i: usize) -> AgentClient {
        let a = Addr::Tcp(Self::agent_addr(i));
        let ch = ferry_proto::addr::connect_node(&a)
            .await
            .unwrap_or_else(|e| panic!("agent {i}: {e}"));
        ferry_proto::limits::agent_client(ch)
    }

    /// `ferryctl --credentials ADMIN ARGS`, not run yet (e.g. for a thread
    /// of its own beside the test).
    pub fn ferryctl_cmd(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new(self.bin.join("ferryctl"));
        cmd.arg("--credentials").arg(self.admin_pem()).args(args);
        cmd
    }

    /// `ferryctl --credentials ADMIN --controller ALL ARGS`: exit code,
    /// stdout, stderr.
    pub fn ferryctl(&self, args: &[&str]) -> (i32, String, String) {
        let all = self.controllers();
        let mut full = vec!["--controller", all.as_str()];
        full.extend_from_slice(args);
        run(self.ferryctl_cmd(&full))
    }

    /// `ferryctl --agent HOST_I ARGS` (node-local calls: exec, ...).
    pub fn ferryctl_agent(&self, i: usize, args: &[&str]) -> (i32, String, String) {
        let agent = Self::agent_addr(i);
        let mut full = vec!["--agent", agent.as_str()];
        full.extend_from_slice(args);
        run(self.ferryctl_cmd(&full))
    }

    /// Takes host i off both networks (its processes run on).
    pub fn cut(&self, i: usize) {
        self.net.cut(i);
    }

    pub fn heal(&self, i: usize) {
        self.net.heal(i);
    }

    /// Host i stops hearing from, and reaching, the `peers` hosts.
    pub fn partition(&self, i: usize, peers: &[usize]) {
        self.net.partition(i, peers);
    }

    pub fn unpartition(&self, i: usize) {
        self.net.unpartition(i);
    }

    pub fn agent(&mut self, i: usize) -> &mut Daemon {
        self.hosts[i - 1]
            .agent
            .as_mut()
            .expect("no agent on that host")
    }

    pub fn controller(&mut self, i: usize) -> &mut Daemon {
        self.hosts[i - 1]
            .controller
            .as_mut()
            .expect("no controller on that host")
    }

    /// Every daemon's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for h in &self.hosts {
            for d in [&h.controller, &h.agent].into_iter().flatten() {
                let text = d.log_text();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                s.push_str(&format!("\n== {} (last lines)\n", d.name));
                for l in tail.into_iter().rev() {
                    s.push_str(l);
                    s.push('\n');
                }
            }
        }
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            h.agent = None;
            h.controller = None;
        }
        if std::env::var("FERRY_KEEP_TEST_DIRS").as_deref() == Ok("1") {
            eprintln!("kept {} (the next run sweeps it)", self.dir.display());
            return;
        }
        sweep::teardown(&self.id, self.hosts.len());
    }
}
