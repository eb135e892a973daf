//! `ferry-controller`: one replica of the cluster's controller.
//!
//! `ferry-controller --init` on a fresh data dir bootstraps a one-voter
//! cluster; further replicas start without `--init` and wait until
//! `ferryctl controller add ADDR` brings them in.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ferry_controller::api::Api;
use ferry_controller::host::Controller;
use ferry_controller::raft_service::RaftServer;
use ferry_proto::addr::Addr;
use ferry_proto::controller::v1::controller_service_server::ControllerServiceServer;
use ferry_proto::controller::v1::raft_service_server::RaftServiceServer;

#[derive(Parser)]
#[command(name = "ferry-controller", version, about = "Ferry controller replica")]
struct Cli {
    /// Where to serve the cluster API and Raft: HOST:PORT or unix:/path.
    #[arg(
        long,
        env = "FERRY_CONTROLLER_LISTEN",
        default_value = "127.0.0.1:7800"
    )]
    listen: Addr,
    /// The address other replicas and clients use for this one (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// Raft log, snapshots and this replica's id.
    #[arg(
        long,
        env = "FERRY_CONTROLLER_DATA_DIR",
        default_value = "/var/lib/ferry-controller"
    )]
    data_dir: PathBuf,
    /// Bootstrap a new one-voter cluster if this data dir has none.
    #[arg(long)]
    init: bool,
    /// With --init: the cluster's VPS address pool.
    #[arg(long, default_value = "10.77.0.0/16")]
    ip_pool: ipnet::Ipv4Net,
    /// With --init: placement policy, `binpack` (fill nodes) or `spread` (even them out).
    #[arg(long, default_value = "binpack", value_parser = ["binpack", "spread"])]
    policy: String,
    /// With --init: allowed sum of CPU limits per node, as a multiple of its CPUs.
    #[arg(long, default_value_t = 4.0)]
    cpu_overcommit: f64,
    /// With --init: allowed sum of memory limits per node, as a multiple of its memory.
    #[arg(long, default_value_t = 1.0)]
    memory_overcommit: f64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let advertise = cli
            .advertise
            .clone()
            .unwrap_or_else(|| cli.listen.to_string());
        advertise
            .parse::<Addr>()
            .map_err(anyhow::Error::msg)
            .context("--advertise")?;
        if !(cli.cpu_overcommit >= 0.1 && cli.memory_overcommit >= 0.1) {
            anyhow::bail!("--cpu-overcommit and --memory-overcommit must be at least 0.1");
        }
        let sched = ferry_controller::scheduler::SchedConfig {
            policy: if cli.policy == "spread" {
                ferry_controller::scheduler::Policy::Spread
            } else {
                ferry_controller::scheduler::Policy::Binpack
            },
            cpu_overcommit: cli.cpu_overcommit,
            memory_overcommit: cli.memory_overcommit,
        };
        // Opening never waits on other replicas: a member starts its Raft, a
        // fresh `--init` commits alone as the only voter.
        let ctl = Controller::open(
            cli.data_dir.clone(),
            advertise.clone(),
            cli.init,
            Some(cli.ip_pool),
            sched,
        )
        .await
        .context("starting the controller")?;
        tracing::info!(listen = %cli.listen, advertise = %advertise, "controller serving");
        let router = tonic::transport::Server::builder()
            .layer(ferry_proto::addr::server_layer())
            .add_service(
                RaftServiceServer::new(RaftServer { ctl: ctl.clone() })
                    .max_decoding_message_size(ferry_proto::limits::RAFT_MESSAGE)
                    .max_encoding_message_size(ferry_proto::limits::RAFT_MESSAGE),
            )
            .add_service(
                ControllerServiceServer::new(Api { ctl: ctl.clone() })
                    .max_decoding_message_size(ferry_proto::limits::CONTROLLER_MESSAGE)
                    .max_encoding_message_size(ferry_proto::limits::CONTROLLER_MESSAGE),
            );
        ferry_proto::addr::serve(router, &cli.listen)
            .await
            .map_err(anyhow::Error::msg)?;
        ctl.shutdown().await;
        Ok(())
    })
}
