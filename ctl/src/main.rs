//! `ferryctl`: the Ferry command line.
//!
//! # Layout
//! - `agent_cmd`: node-local mode (`--agent ADDR`): templates and VPSes on one agent.
//! - `units`: sizes and CPU amounts as operators type them.
//! - `table`: aligned tables.

mod agent_cmd;
mod table;
mod units;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ferryctl", version, about = "Manage Ferry VPSes")]
struct Cli {
    /// Agent address for node-local mode.
    #[arg(
        long,
        global = true,
        env = "FERRY_AGENT",
        default_value = "127.0.0.1:7700"
    )]
    agent: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Templates on the node.
    #[command(subcommand)]
    Template(agent_cmd::TemplateCmd),
    /// VPSes on the node.
    #[command(subcommand)]
    Vps(Box<agent_cmd::VpsCmd>),
    /// Facts about the node.
    Node,
}

#[tokio::main]
async fn main() {
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

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let mut c = agent_cmd::connect(&cli.agent).await?;
    match cli.cmd {
        Cmd::Template(t) => agent_cmd::template(&mut c, t).await.map(|_| 0),
        Cmd::Vps(v) => agent_cmd::vps(&mut c, *v).await,
        Cmd::Node => {
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
            Ok(0)
        }
    }
}

/// A gRPC error reads as its message, not as a debug dump.
fn describe(e: &anyhow::Error) -> String {
    if let Some(s) = e.downcast_ref::<tonic::Status>() {
        return format!("{} ({:?})", s.message(), s.code());
    }
    format!("{e:#}")
}
