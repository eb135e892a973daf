//! `ferry-agent`: the node daemon. Also re-executed by itself as the per-VPS
//! monitor (`monitor`) and as the exec helper (`enter`); those two run without
//! an async runtime, single-threaded, because they fork.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_agent::paths::Paths;
use ferry_agent::vps::{Agent, AgentConfig};
use ferry_proto::addr::Addr;
use ferry_proto::agent::v1::agent_service_server::AgentServiceServer;

#[derive(Parser)]
#[command(
    name = "ferry-agent",
    version,
    about = "Ferry node agent: runs VPSes on this node"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// gRPC listen address: HOST:PORT or unix:/path.
    #[arg(long, env = "FERRY_AGENT_LISTEN", default_value = "127.0.0.1:7700")]
    listen: Addr,
    /// Persistent state: templates, VPS configs and files.
    #[arg(long, env = "FERRY_DATA_DIR", default_value = "/var/lib/ferry")]
    data_dir: PathBuf,
    /// Per-boot runtime state; default /run/ferry/<hash of data dir>.
    #[arg(long, env = "FERRY_RUN_DIR")]
    run_dir: Option<PathBuf>,
    /// Node bridge the VPSes' veths are plugged into (created if missing).
    #[arg(long, default_value = "ferrybr0")]
    bridge: String,
    /// Bridge address and network; VPS addresses come from this network.
    #[arg(long, default_value = "10.77.0.1/16")]
    bridge_cidr: ipnet::Ipv4Net,
    /// LAN interface to plug into the bridge, so VPSes of all nodes share one
    /// segment and keep their IP when they migrate (give each node its own
    /// --bridge-cidr address in that network).
    #[arg(long)]
    uplink: Option<String>,
    /// Static busybox for the built-in `busybox` template (Debian: busybox-static).
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// CRIU binary for checkpoint, restore and live migration (default:
    /// /opt/ferry/criu/bin/criu from scripts/install-criu.sh, else `criu` on PATH).
    #[arg(long, env = "FERRY_CRIU")]
    criu: Option<PathBuf>,
    /// Join a cluster: controller addresses, comma-separated.
    #[arg(long, env = "FERRY_CONTROLLER", value_delimiter = ',')]
    controller: Vec<Addr>,
    /// This node's name in the cluster (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// The address controllers reach this agent at (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// Node labels for placement, key=value (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Expedite the kernel's RCU grace periods (/sys/kernel/rcu_expedited)
    /// while a VPS is frozen for a checkpoint or migration: ~25 ms less
    /// downtime here. The old value is put back after each freeze.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    expedite_rcu: bool,
    /// How many VPSes moving away from this node may be frozen at once (0:
    /// no limit). Moves side by side (a drain's) overlap in everything else;
    /// with 1, one move's downtime never shares the CPU with another's.
    #[arg(long, env = "FERRY_FREEZE_TURNS", default_value_t = 1)]
    freeze_turns: usize,
    /// The largest checkpoint archive `vps restore --from` may upload, in
    /// bytes (an upload must also leave 1 GiB free on the data dir).
    #[arg(long, default_value_t = 64 << 30)]
    max_upload_bytes: u64,
    /// The only directory `template import --on-node` reads archives from
    /// (regular files in it, no symlinks); default <data-dir>/import.
    #[arg(long)]
    import_dir: Option<PathBuf>,
    /// Join the cluster at --controller with a token from `ferryctl node
    /// join-token`: the node gets its certificate (kept in <data-dir>/pki).
    #[arg(long, env = "FERRY_JOIN_TOKEN")]
    join: Option<String>,
    /// Development only: no TLS, every caller may do everything. Refused
    /// unless --listen is a loopback address or a unix socket.
    #[arg(long)]
    insecure_dev: bool,
    /// Keep VPSes off this host's own addresses with nftables (see
    /// docs/security.md). Off leaves every host service open to VPSes.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    host_firewall: bool,
    /// A host port VPSes may reach despite the host firewall, PROTO:PORT
    /// (e.g. udp:53 for a resolver on the host; repeatable).
    #[arg(long = "vps-host-allow")]
    vps_host_allow: Vec<ferry_agent::net::firewall::Allow>,
    /// How often the safety net releases what stopped VPSes still hold
    /// (tests shorten it to race it against migrations).
    #[arg(long, default_value_t = 30_000, hide = true)]
    reap_interval_ms: u64,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start
enum Cmd {
    /// Run the agent (the default).
    Serve(ServeArgs),
    #[command(hide = true)]
    Monitor { run_dir: PathBuf },
    /// The post-copy page tunnel (see ferry_agent::criu::tunnel).
    #[command(hide = true, subcommand)]
    PageTunnel(TunnelCmd),
    #[command(hide = true)]
    Enter {
        run_dir: PathBuf,
        #[arg(long)]
        env: Vec<String>,
        #[arg(last = true)]
        argv: Vec<String>,
    },
}

#[derive(Subcommand)]
enum TunnelCmd {
    Serve {
        #[arg(long)]
        listen: std::net::Ipv4Addr,
        #[arg(long)]
        page_server: std::net::SocketAddr,
        #[arg(long)]
        credentials: Option<PathBuf>,
    },
    Dial {
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long, default_value = "")]
        server_node: String,
        #[arg(long)]
        credentials: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Monitor { run_dir }) => {
            std::process::exit(ferry_agent::runtime::monitor::run(&run_dir))
        }
        Some(Cmd::Enter { run_dir, env, argv }) => {
            std::process::exit(ferry_agent::runtime::enter::run(&run_dir, &argv, &env))
        }
        Some(Cmd::PageTunnel(t)) => {
            use ferry_agent::criu::tunnel::{run, Role};
            std::process::exit(match t {
                TunnelCmd::Serve {
                    listen,
                    page_server,
                    credentials,
                } => run(
                    Role::Serve {
                        listen,
                        page_server,
                    },
                    credentials.as_deref(),
                ),
                TunnelCmd::Dial {
                    to,
                    server_node,
                    credentials,
                } => run(Role::Dial { to, server_node }, credentials.as_deref()),
            })
        }
        Some(Cmd::Serve(args)) => serve(args),
        None => serve(cli.serve),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Descriptors our launcher left open must not reach monitors, CRIU or VPSes.
    ferry_agent::runtime::cloexec_from(3).map_err(anyhow::Error::msg)?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let run_dir = args
            .run_dir
            .clone()
            .unwrap_or_else(|| Paths::default_run_dir(&args.data_dir));
        let management_ip = management_ip(&args);
        let credentials = (!args.insecure_dev).then(|| args.data_dir.join("pki").join("node.pem"));
        let cfg = AgentConfig {
            data_dir: args.data_dir,
            run_dir,
            bridge: args.bridge,
            bridge_cidr: args.bridge_cidr,
            uplink: args.uplink.clone(),
            busybox: args.busybox,
            self_exe: std::env::current_exe().context("locating the agent binary")?,
            import_limits: Default::default(),
            criu: args
                .criu
                .clone()
                .unwrap_or_else(ferry_agent::criu::Criu::default_path),
            expedite_rcu: args.expedite_rcu,
            freeze_turns: args.freeze_turns,
            max_upload_bytes: args.max_upload_bytes,
            import_dir: args.import_dir.clone(),
            management_ip,
            credentials,
            host_firewall: args
                .host_firewall
                .then(|| ferry_agent::net::firewall::HostFirewall {
                    allow: args.vps_host_allow.clone(),
                }),
        };
        let node_name = match args.node_name.clone() {
            Some(n) => n,
            None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
        };
        ferry_proto::names::check_dns_label(&node_name)
            .map_err(anyhow::Error::msg)
            .context("--node-name")?;
        let server_tls = if args.insecure_dev {
            check_insecure_listen(&args.listen)?;
            tracing::warn!("--insecure-dev: plaintext, no authentication");
            None
        } else {
            let creds = load_or_join(
                args.join.as_deref(),
                &args.controller,
                &cfg.data_dir,
                &node_name,
            )
            .await?;
            ferry_proto::addr::use_credentials(&creds).map_err(anyhow::Error::msg)?;
            Some(ferry_proto::tls::ServerTls::new(&creds)?)
        };
        let policy: Option<std::sync::Arc<dyn ferry_proto::tls::authz::Policy>> = match &server_tls
        {
            Some(_) => Some(std::sync::Arc::new(ferry_agent::authz::AgentPolicy)),
            None => None,
        };
        if let Some(t) = &server_tls {
            ferry_agent::cluster::spawn_renewal(
                cfg.data_dir.join("pki").join("node.pem"),
                t.clone(),
                args.controller.clone(),
            );
        }
        let agent = Agent::open(cfg).await.context("starting the agent")?;
        agent.spawn_reaper(std::time::Duration::from_millis(
            args.reap_interval_ms.max(10),
        ));
        if !args.controller.is_empty() {
            let link = ferry_agent::cluster::ClusterLink {
                controllers: args.controller.clone(),
                node_name,
                advertise: args
                    .advertise
                    .clone()
                    .unwrap_or_else(|| args.listen.to_string()),
                labels: args.labels.iter().cloned().collect(),
            };
            ferry_agent::cluster::spawn(agent.clone(), link);
        }
        tracing::info!(listen = %args.listen, "agent serving");
        let svc = AgentServiceServer::new(ferry_agent::service::Service { agent })
            .max_decoding_message_size(ferry_proto::limits::AGENT_MESSAGE)
            .max_encoding_message_size(ferry_proto::limits::AGENT_MESSAGE);
        // Migration pushes stream hundreds of MB: HTTP/2's default 64 KiB
        // window would have the target grant more every few frames.
        let router = tonic::transport::Server::builder()
            .layer(ferry_proto::addr::server_layer(policy))
            .initial_stream_window_size(ferry_proto::addr::STREAM_WINDOW)
            .initial_connection_window_size(ferry_proto::addr::CONNECTION_WINDOW)
            .max_frame_size(ferry_proto::addr::MAX_FRAME)
            .add_service(svc);
        ferry_proto::addr::serve(router, &args.listen, server_tls)
            .await
            .map_err(anyhow::Error::msg)?;
        tracing::info!("shutting down; VPSes keep running");
        Ok(())
    })
}

/// This node's credentials (`<data-dir>/pki/node.pem`), got by joining with
/// `--join` the first time.
async fn load_or_join(
    join: Option<&str>,
    controllers: &[ferry_proto::addr::Addr],
    data_dir: &std::path::Path,
    node_name: &str,
) -> anyhow::Result<ferry_proto::tls::Credentials> {
    use ferry_proto::tls::{Credentials, Role};
    let path = data_dir.join("pki").join("node.pem");
    if path.exists() {
        let c = Credentials::load(&path)?;
        let role = c.identity()?.role;
        if role != Role::Node(node_name.to_string()) {
            anyhow::bail!(
                "{} holds the credentials of {role}, not node {node_name} (--node-name)",
                path.display()
            );
        }
        return Ok(c);
    }
    let Some(token) = join else {
        anyhow::bail!(
            "no credentials in {}: join the cluster with --join TOKEN --controller ADDR \
             (ferryctl node join-token), or run plaintext on loopback with --insecure-dev",
            path.display()
        );
    };
    let mut last = String::from("no --controller to join through");
    for via in controllers {
        match ferry_proto::tls::join::join(
            via,
            token,
            ferry_proto::controller::v1::JoinKind::Node,
            node_name,
        )
        .await
        {
            Ok(j) => {
                j.creds.save(&path)?;
                tracing::info!(node = node_name, "joined the cluster");
                return Ok(j.creds);
            }
            Err(e) => last = format!("{via}: {e}"),
        }
    }
    anyhow::bail!("joining the cluster: {last}")
}

/// Plaintext only where nobody else can reach: loopback or a unix socket.
/// The IP this node's daemons are reached at: --advertise's, else --listen's.
fn management_ip(args: &ServeArgs) -> Option<std::net::IpAddr> {
    if let Some(a) = &args.advertise {
        if let Ok(sa) = a.parse::<std::net::SocketAddr>() {
            return Some(sa.ip());
        }
    }
    match &args.listen {
        Addr::Tcp(hp) => hp.parse::<std::net::SocketAddr>().ok().map(|sa| sa.ip()),
        Addr::Unix(_) => None,
    }
}

fn check_insecure_listen(a: &ferry_proto::addr::Addr) -> anyhow::Result<()> {
    match a {
        ferry_proto::addr::Addr::Unix(_) => Ok(()),
        ferry_proto::addr::Addr::Tcp(h) => match h.parse::<std::net::SocketAddr>() {
            Ok(sa) if sa.ip().is_loopback() => Ok(()),
            _ => anyhow::bail!(
                "--insecure-dev serves plaintext: only on a loopback address or a unix socket, not {h}"
            ),
        },
    }
}
