//! `ferry-controller`: one replica of the cluster's controller.
//!
//! `ferry-controller --init` on a fresh data dir bootstraps a one-voter
//! cluster; further replicas start without `--init` and wait until
//! `ferryctl controller add ADDR` brings them in.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ferry_controller::api::trust::{ControllerPki, ControllerPolicy};
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
    /// With --init: migrations one node takes part in at once, as source or
    /// target (drains and the rebalancer wait for a slot).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    max_migrations_per_node: u32,
    /// Join an existing cluster's trust: a token from `ferryctl controller
    /// join-token`, presented to the replica at --via.
    #[arg(long, env = "FERRY_JOIN_TOKEN", requires = "via")]
    join: Option<String>,
    /// With --join: a replica of the cluster to join through.
    #[arg(long)]
    via: Option<Addr>,
    /// Development only: no TLS, every caller may do everything. Refused
    /// unless --listen is a loopback address or a unix socket.
    #[arg(long)]
    insecure_dev: bool,
}

/// Where a replica keeps the CA and its credentials.
fn pki_dir(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("pki")
}

/// Loads this replica's CA and credentials; `--init` makes them (and the
/// first admin's bundle), `--join` gets them from the cluster.
/// Also: the fingerprint of the first admin's certificate, when `--init`
/// made it just now (recorded in Raft so `ferryctl user revoke admin` works).
async fn load_or_make_pki(cli: &Cli) -> anyhow::Result<(ControllerPki, Option<String>)> {
    use ferry_proto::tls::pki::{daemon_cert_validity, CERT_VALIDITY};
    use ferry_proto::tls::{Ca, Credentials, Role, UserRole};
    let dir = pki_dir(&cli.data_dir);
    let own = dir.join("controller.pem");
    if own.exists() {
        return Ok((
            ControllerPki {
                ca: Ca::load(&dir)?,
                creds: Credentials::load(&own)?,
            },
            None,
        ));
    }
    if let Some(token) = &cli.join {
        let via = cli.via.as_ref().context("--join needs --via")?;
        let j = ferry_proto::tls::join::join(
            via,
            token,
            ferry_proto::controller::v1::JoinKind::Controller,
            "",
        )
        .await
        .map_err(anyhow::Error::msg)?;
        let key = j
            .ca_key_pem
            .context("the cluster did not send its CA key to this replica")?;
        let ca = Ca::from_pem(j.creds.ca_pem.clone(), key);
        ca.save(&dir)?;
        j.creds.save(&own)?;
        tracing::info!(dir = %dir.display(), "joined the cluster's trust");
        return Ok((ControllerPki { ca, creds: j.creds }, None));
    }
    if cli.init && !cli.data_dir.join("member.json").exists() {
        let ca = Ca::generate(&cli.data_dir.display().to_string())?;
        ca.save(&dir)?;
        let creds = ca.issue(&Role::Controller, daemon_cert_validity())?;
        creds.save(&own)?;
        let admin = ca.issue(
            &Role::User {
                name: "admin".into(),
                role: UserRole::Admin,
            },
            CERT_VALIDITY,
        )?;
        let admin_path = dir.join("admin.pem");
        admin.save(&admin_path)?;
        tracing::info!(admin = %admin_path.display(), "made the cluster CA; the first admin's credentials: ferryctl --credentials {}", admin_path.display());
        return Ok((
            ControllerPki { ca, creds },
            Some(admin.identity()?.fingerprint),
        ));
    }
    anyhow::bail!(
        "no credentials in {}: start the first replica with --init, join others with --join TOKEN --via ADDR \
         (ferryctl controller join-token), or run plaintext on loopback with --insecure-dev",
        dir.display()
    )
}

/// Plaintext only where nobody else can reach: loopback or a unix socket.
fn check_insecure_listen(a: &Addr) -> anyhow::Result<()> {
    match a {
        Addr::Unix(_) => Ok(()),
        Addr::Tcp(h) => match h.parse::<std::net::SocketAddr>() {
            Ok(sa) if sa.ip().is_loopback() => Ok(()),
            _ => anyhow::bail!(
                "--insecure-dev serves plaintext: only on a loopback address or a unix socket, not {h}"
            ),
        },
    }
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
            max_migrations_per_node: cli.max_migrations_per_node,
        };
        let mut first_admin = None;
        let pki = if cli.insecure_dev {
            check_insecure_listen(&cli.listen)?;
            tracing::warn!("--insecure-dev: plaintext, no authentication");
            None
        } else {
            let (p, admin) = load_or_make_pki(&cli).await.context("the cluster's TLS")?;
            first_admin = admin;
            ferry_proto::addr::use_credentials(&p.creds).map_err(anyhow::Error::msg)?;
            Some(std::sync::Arc::new(p))
        };
        let server_tls = match &pki {
            Some(p) => Some(ferry_proto::tls::ServerTls::new(&p.creds)?),
            None => None,
        };
        if let (Some(p), Some(t)) = (&pki, &server_tls) {
            spawn_renewal(pki_dir(&cli.data_dir), p.clone(), t.clone());
        }
        // Opening never waits on other replicas: a member starts its Raft, a
        // fresh `--init` commits alone as the only voter.
        let ctl = Controller::open(
            cli.data_dir.clone(),
            advertise.clone(),
            cli.init,
            Some(cli.ip_pool),
            sched,
            pki.clone(),
        )
        .await
        .context("starting the controller")?;
        if let Some(fingerprint) = first_admin {
            use ferry_controller::state::{security::SecurityCmd, Request};
            ctl.member()
                .await?
                .propose(Request::Security(SecurityCmd::AddUser {
                    name: "admin".into(),
                    fingerprint,
                    now_ms: ferry_controller::api::now_ms(),
                }))
                .await
                .context("recording the first admin")?;
        }
        let policy: Option<std::sync::Arc<dyn ferry_proto::tls::authz::Policy>> = match &pki {
            Some(_) => Some(std::sync::Arc::new(ControllerPolicy { ctl: ctl.clone() })),
            None => None,
        };
        tracing::info!(listen = %cli.listen, advertise = %advertise, "controller serving");
        let router = tonic::transport::Server::builder()
            .layer(ferry_proto::addr::server_layer(policy))
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
        ferry_proto::addr::serve(router, &cli.listen, server_tls)
            .await
            .map_err(anyhow::Error::msg)?;
        ctl.shutdown().await;
        Ok(())
    })
}

/// A replica renews its own certificate (it holds the CA) when a third of
/// its lifetime is left, and serves and dials with the new one from then on:
/// no restart.
fn spawn_renewal(
    dir: PathBuf,
    pki: std::sync::Arc<ControllerPki>,
    server: ferry_proto::tls::ServerTls,
) {
    use ferry_proto::tls::pki::{daemon_cert_validity, renewal_due};
    use ferry_proto::tls::{Credentials, Role};
    tokio::spawn(async move {
        let own = dir.join("controller.pem");
        loop {
            let every = match Credentials::load(&own).and_then(|c| renewal_due(&c.cert_pem)) {
                Ok((due, every)) => {
                    if due {
                        let renewed = pki
                            .ca
                            .issue(&Role::Controller, daemon_cert_validity())
                            .and_then(|c| c.save(&own).map(|_| c))
                            .map_err(|e| e.to_string())
                            .and_then(|c| {
                                ferry_proto::addr::use_credentials(&c)?;
                                server.reload(&c).map_err(|e| e.to_string())
                            });
                        match renewed {
                            Ok(()) => tracing::info!("certificate renewed"),
                            Err(e) => tracing::error!(error = %e, "renewing the certificate"),
                        }
                    }
                    every
                }
                Err(e) => {
                    tracing::error!(error = %e, "reading this replica's certificate");
                    std::time::Duration::from_secs(60)
                }
            };
            tokio::time::sleep(every).await;
        }
    });
}
