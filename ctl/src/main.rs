//! `ferryctl`: the Ferry command line.
//!
//! # Layout
//! - `agent_cmd`: node-local mode (`--agent ADDR`): templates and VPSes on one agent.
//! - `cluster_cmd`: cluster mode (`--controller ADDR[,ADDR...]`): nodes, VPSes
//!   across nodes, controller replicas.
//! - `units`: sizes and CPU amounts as operators type them.
//! - `table`: aligned tables.
//! - `migrate_view`, `drain_view`: following a migration, a drain or a restore.

mod agent_cmd;
mod cluster_cmd;
mod drain_view;
mod migrate_view;
mod replicas;
mod table;
mod units;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ferryctl", version, about = "Manage Ferry VPSes")]
struct Cli {
    /// Agent address for node-local mode (default 127.0.0.1:7700).
    #[arg(long, global = true, env = "FERRY_AGENT")]
    agent: Option<String>,
    /// Controller addresses (any replica; comma-separated for failover): cluster mode.
    #[arg(long, global = true, env = "FERRY_CONTROLLER")]
    controller: Option<String>,
    /// Your credentials bundle (CA, certificate, key): mutual TLS to the
    /// cluster's controllers and agents. The first admin's is
    /// <controller data dir>/pki/admin.pem; `ferryctl user add` makes more.
    #[arg(long, global = true, env = "FERRY_CREDENTIALS")]
    credentials: Option<std::path::PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Templates: on the node (--agent) or across the cluster (--controller).
    #[command(subcommand)]
    Template(agent_cmd::TemplateCmd),
    /// VPSes: on the node (--agent) or across the cluster (--controller).
    #[command(subcommand)]
    Vps(Box<agent_cmd::VpsCmd>),
    /// Cluster nodes (--controller).
    #[command(subcommand)]
    Node(cluster_cmd::NodeCmd),
    /// Facts about the agent's node (--agent).
    Info,
    /// The controller cluster (--controller).
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Controller replicas (--controller).
    #[command(subcommand)]
    Controller(cluster_cmd::ControllerCmd),
    /// Operators' credentials (--controller).
    #[command(subcommand)]
    User(cluster_cmd::UserCmd),
    /// What happened in the cluster (UTC times); --follow keeps watching.
    Events {
        #[arg(long, short)]
        follow: bool,
        #[arg(long, short, value_enum, default_value = "table")]
        output: agent_cmd::Output,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Replicas, leader, term, commit index.
    Status {
        #[arg(long, short, value_enum, default_value = "table")]
        output: agent_cmd::Output,
    },
}

#[tokio::main]
async fn main() {
    // SIGPIPE stays ignored (Rust's default): with SIGPIPE's default action
    // a write to any closed socket (one of the replicas' connections) killed
    // ferryctl. A closed stdout (`ferryctl vps ls | head`) makes println!
    // panic instead; that ends ferryctl quietly, with SIGPIPE's exit code.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info.payload_as_str().unwrap_or("");
        if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(128 + libc::SIGPIPE);
        }
        default_hook(info);
    }));
    let cli = Cli::parse();
    let code = match run(cli).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferryctl: {}", describe(&e));
            1
        }
    };
    std::process::exit(code);
}

/// Defaults from `$FERRY_CONFIG` or `~/.config/ferry/config`: lines of
/// `controller=ADDR[,ADDR...]`, `agent=ADDR` and `credentials=PATH` (`#`
/// starts a comment). Flags
/// and environment variables win over the file.
fn config_file() -> std::collections::HashMap<String, String> {
    let path = std::env::var_os("FERRY_CONFIG")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".config/ferry/config"))
        });
    let text = path
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

async fn run(mut cli: Cli) -> anyhow::Result<i32> {
    let file = config_file();
    if cli.controller.is_none() {
        cli.controller = file.get("controller").cloned();
    }
    if cli.credentials.is_none() {
        cli.credentials = file.get("credentials").map(std::path::PathBuf::from);
    }
    if let Some(p) = &cli.credentials {
        let creds = ferry_proto::tls::Credentials::load(p)
            .map_err(|e| anyhow::anyhow!("--credentials: {e}"))?;
        ferry_proto::addr::use_credentials(&creds).map_err(anyhow::Error::msg)?;
    }
    let agent = cli
        .agent
        .clone()
        .or_else(|| file.get("agent").cloned())
        .unwrap_or_else(|| "127.0.0.1:7700".into());
    let cluster = || -> anyhow::Result<&str> {
        cli.controller.as_deref().ok_or_else(|| {
            anyhow::anyhow!("this command needs --controller ADDR (or FERRY_CONTROLLER)")
        })
    };
    match cli.cmd {
        Cmd::Vps(v) if cli.controller.is_some() => {
            cluster_cmd::vps(&mut cluster_cmd::connect(cluster()?).await?, *v).await
        }
        Cmd::Node(n) => {
            let addrs = cluster()?;
            cluster_cmd::node(addrs, &mut cluster_cmd::connect(addrs).await?, n).await
        }
        Cmd::Cluster(ClusterCmd::Status { output }) => {
            cluster_cmd::status(&mut cluster_cmd::connect(cluster()?).await?, output)
                .await
                .map(|_| 0)
        }
        Cmd::Events { follow, output } => {
            cluster_cmd::events(&mut cluster_cmd::connect(cluster()?).await?, follow, output)
                .await
                .map(|_| 0)
        }
        Cmd::User(u) => cluster_cmd::user(&mut cluster_cmd::connect(cluster()?).await?, u)
            .await
            .map(|_| 0),
        Cmd::Controller(c) => {
            cluster_cmd::controller(&mut cluster_cmd::connect(cluster()?).await?, c)
                .await
                .map(|_| 0)
        }
        Cmd::Template(t) if cli.controller.is_some() => {
            cluster_cmd::template(&mut cluster_cmd::connect(cluster()?).await?, t)
                .await
                .map(|_| 0)
        }
        Cmd::Template(t) => agent_cmd::template(&mut agent_cmd::connect(&agent).await?, t)
            .await
            .map(|_| 0),
        Cmd::Vps(v) => agent_cmd::vps(&mut agent_cmd::connect(&agent).await?, *v).await,
        Cmd::Info => {
            let mut c = agent_cmd::connect(&agent).await?;
            let n = c
                .get_node(ferry_proto::agent::v1::GetNodeRequest {})
                .await?
                .into_inner();
            println!(
                "{} (agent {}): cgroup {}, {} CPU, {} memory, bridge {} {}, {} VPS ({} running)",
                n.hostname,
                n.agent_version,
                n.cgroup_version,
                units::human_cpu(n.cpu_millicores),
                units::human_bytes(n.memory_bytes),
                n.bridge,
                n.bridge_cidr,
                n.vps_count,
                n.vps_running
            );
            // Which live-migration modes this node can run as a source.
            if n.criu_version.is_empty() {
                println!("criu: not usable: {}", n.criu_error);
            } else {
                let mut modes = vec!["stop-copy"];
                if n.criu_lazy_pages {
                    modes.push("post-copy (lazy pages)");
                }
                if n.criu_dirty_tracking {
                    modes.push("pre-copy (dirty tracking)");
                }
                println!(
                    "criu {}: live migration by {}",
                    n.criu_version,
                    modes.join(", ")
                );
            }
            Ok(0)
        }
    }
}

/// A gRPC error reads as its message, not as a debug dump.
fn describe(e: &anyhow::Error) -> String {
    let (text, transport) = match e.downcast_ref::<tonic::Status>() {
        Some(s) => (
            format!("{} ({:?})", s.message(), s.code()),
            matches!(
                s.code(),
                tonic::Code::Cancelled | tonic::Code::Unavailable | tonic::Code::Unknown
            ) || s.message().contains("h2 protocol"),
        ),
        None => {
            let t = format!("{e:#}");
            let tls = t.contains("h2 protocol");
            (t, tls)
        }
    };
    // Plaintext against a TLS daemon fails below gRPC (the HTTP/2 stream is
    // cut, cancelled or reset): say what is most likely missing.
    if !ferry_proto::addr::tls_enabled() && transport {
        return format!(
            "{text}\n  the daemon may need mutual TLS: give --credentials FILE (or FERRY_CREDENTIALS)"
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    /// The help's own example parses: init words may start with '-'.
    #[test]
    fn init_words_may_start_with_a_dash() {
        let cli = super::Cli::try_parse_from([
            "ferryctl", "vps", "create", "v", "--init", "/bin/sh", "--init", "-c", "--init",
            "sleep 1d", "--start",
        ]);
        let Ok(super::Cli {
            cmd: super::Cmd::Vps(v),
            ..
        }) = cli
        else {
            panic!("did not parse: {:?}", cli.err());
        };
        let crate::agent_cmd::VpsCmd::Create { init, start, .. } = *v else {
            panic!("not a create");
        };
        assert_eq!(init, ["/bin/sh", "-c", "sleep 1d"]);
        assert!(start);
    }
}
