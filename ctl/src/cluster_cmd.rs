//! Cluster mode (`--controller ADDR[,ADDR...]` or FERRY_CONTROLLER): the
//! controller's view of nodes, VPSes and its own replicas. Any replica will
//! do: followers pass writes to the leader.

use std::collections::HashMap;

use crate::replicas::Client;
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use ferry_proto::agent::v1 as apb;
use ferry_proto::controller::v1 as cpb;
use serde_json::json;
use tonic::transport::Channel;

use crate::agent_cmd::{Output, VpsCmd};
use crate::table;
use crate::units::{human_bytes, human_cpu};

#[derive(Subcommand)]
pub enum ControllerCmd {
    /// Add a waiting controller replica (started without --init) as a voter.
    Add { addr: String },
    /// Remove a replica by id (its id is never used again).
    Remove { id: u64 },
    /// A single-use token for a new replica: `ferry-controller --join TOKEN
    /// --via ADDR` (it gets its certificate and the CA).
    JoinToken {
        /// How long it stays valid: 90s, 30m, 1h, 2d (at most 7d).
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

#[derive(Subcommand)]
pub enum UserCmd {
    /// Credentials for an operator: admin (every call) or viewer (reads).
    Add {
        name: String,
        #[arg(long, value_parser = ["admin", "viewer"])]
        role: String,
        /// Where to write the bundle (0600); default ./NAME.pem.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Revoke every certificate issued to NAME, on every controller at once.
    Revoke { name: String },
}

/// `90s`, `30m`, `1h`, `2d` as seconds.
pub fn parse_ttl(s: &str) -> Result<u32> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u32 = n
        .parse()
        .map_err(|_| anyhow::anyhow!("--ttl {s:?}: use 90s, 30m, 1h or 2d"))?;
    let mul = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => bail!("--ttl {s:?}: use 90s, 30m, 1h or 2d"),
    };
    n.checked_mul(mul)
        .ok_or_else(|| anyhow::anyhow!("--ttl {s:?} is too long"))
}

async fn join_token(c: &mut Client, kind: cpb::JoinKind, ttl: &str) -> Result<()> {
    let r = c
        .create_join_token(cpb::CreateJoinTokenRequest {
            kind: kind as i32,
            ttl_secs: parse_ttl(ttl)?,
        })
        .await?
        .into_inner();
    println!("{}", r.token);
    eprintln!(
        "single use, valid for {ttl} (until unix time {})",
        r.expires_unix
    );
    Ok(())
}

pub async fn user(c: &mut Client, cmd: UserCmd) -> Result<()> {
    match cmd {
        UserCmd::Add { name, role, out } => {
            let r = c
                .add_user(cpb::AddUserRequest {
                    name: name.clone(),
                    role: role.clone(),
                })
                .await?
                .into_inner();
            let path = out.unwrap_or_else(|| format!("{name}.pem").into());
            ferry_proto::tls::pki::write_private(&path, &r.bundle)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{name} ({role}): {}", path.display());
        }
        UserCmd::Revoke { name } => {
            let r = c
                .revoke_user(cpb::RevokeUserRequest { name: name.clone() })
                .await?
                .into_inner();
            println!("{name}: {} certificate(s) revoked", r.revoked);
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum NodeCmd {
    /// Nodes of the cluster (cluster mode), or this agent's facts (node-local).
    Ls {
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
    Show {
        name: String,
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
    /// Place no new VPSes on the node.
    Cordon {
        name: String,
    },
    Uncordon {
        name: String,
    },
    /// Empty a node for maintenance: cordon it, then move every VPS on it to
    /// a node the scheduler picks, running ones live (stopped ones cold).
    /// Exit code 0 when complete, 2 when incomplete or cancelled.
    Drain {
        name: String,
        /// Mode for running VPSes: auto, post-copy, pre-copy, stop-copy, cold.
        #[arg(long, default_value = "auto")]
        mode: String,
        /// Moves at a time (at most 16).
        #[arg(long, default_value_t = 2)]
        parallel: u32,
        /// Print the plan (each VPS, its target and why) and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Start nothing new after this long (90s, 30m, 2h); the drain then
        /// ends incomplete with what is left.
        #[arg(long)]
        deadline: Option<String>,
        /// Show progress until the drain ends.
        #[arg(long, short)]
        follow: bool,
    },
    /// A node's drain or restore: under way, or the last one.
    DrainStatus {
        name: String,
        #[arg(long, short)]
        follow: bool,
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
    /// Start no more moves of the node's drain or restore.
    DrainCancel {
        name: String,
    },
    /// After maintenance: uncordon the node and move back, live, the VPSes
    /// its last drain moved away that are still where the drain put them.
    Restore {
        name: String,
        #[arg(long, default_value = "auto")]
        mode: String,
        #[arg(long, default_value_t = 2)]
        parallel: u32,
        #[arg(long)]
        dry_run: bool,
        #[arg(long, short)]
        follow: bool,
    },
    /// A single-use token for a new node: `ferry-agent --join TOKEN
    /// --controller ADDR --node-name NAME` (it gets its certificate).
    JoinToken {
        /// How long it stays valid: 90s, 30m, 1h, 2d (at most 7d).
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

/// Connects to the controller replicas of the list (see [`crate::replicas`]).
pub async fn connect(addrs: &str) -> Result<Client> {
    crate::replicas::Replicas::connect(addrs).await
}

pub async fn status(c: &mut Client, output: Output) -> Result<()> {
    let s = c
        .cluster_status(cpb::ClusterStatusRequest {})
        .await?
        .into_inner();
    if output == Output::Json {
        let members: Vec<_> = s
            .members
            .iter()
            .map(|m| json!({"id": m.id, "addr": m.addr, "role": m.role}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"leader_id": s.leader_id, "leader_addr": s.leader_addr, "term": s.term,
                "commit_index": s.commit_index, "last_applied": s.last_applied, "answered_by": s.self_id, "members": members,
                "drains": s.drains.iter().map(crate::drain_view::drain_json).collect::<Vec<_>>()})
            )?
        );
        return Ok(());
    }
    println!(
        "leader {} ({}), term {}, commit index {}, applied {} (answered by {})",
        s.leader_id, s.leader_addr, s.term, s.commit_index, s.last_applied, s.self_id
    );
    let rows: Vec<Vec<String>> = s
        .members
        .iter()
        .map(|m| {
            let lead = if m.id == s.leader_id { "leader" } else { "" };
            vec![
                m.id.to_string(),
                m.addr.clone(),
                m.role.clone(),
                lead.to_string(),
            ]
        })
        .collect();
    table::print(&["ID", "ADDRESS", "ROLE", ""], &rows);
    for d in &s.drains {
        println!("{}", crate::drain_view::summary(d));
    }
    Ok(())
}

pub async fn controller(c: &mut Client, cmd: ControllerCmd) -> Result<()> {
    let s = match cmd {
        ControllerCmd::JoinToken { ttl } => {
            return join_token(c, cpb::JoinKind::Controller, &ttl).await
        }
        ControllerCmd::Add { addr } => c
            .add_member(cpb::AddMemberRequest { addr })
            .await?
            .into_inner(),
        ControllerCmd::Remove { id } => c
            .remove_member(cpb::RemoveMemberRequest { id })
            .await?
            .into_inner(),
    };
    let list: Vec<String> = s
        .members
        .iter()
        .map(|m| format!("{} {} ({})", m.id, m.addr, m.role))
        .collect();
    println!("members: {}", list.join(", "));
    Ok(())
}

fn node_json(n: &cpb::Node) -> serde_json::Value {
    let cap = n.capacity.unwrap_or_default();
    let al = n.allocated.unwrap_or_default();
    json!({"id": n.id, "name": n.name, "addr": n.addr, "status": n.status, "labels": n.labels,
        "capacity": {"cpu_millicores": cap.cpu_millicores, "memory_bytes": cap.memory_bytes},
        "allocated": {"cpu_millicores": al.cpu_millicores, "memory_bytes": al.memory_bytes},
        "vps_count": n.vps_count, "last_heartbeat_unix_ms": n.last_heartbeat_unix_ms, "templates": n.templates,
        "usage": n.usage.map(|u| json!({"memory_bytes": u.memory_bytes, "vps_running": u.vps_running, "disk_bytes": u.disk_bytes})),
        "drain": n.drain.as_ref().map(crate::drain_view::drain_json)})
}

pub async fn node(addrs: &str, c: &mut Client, cmd: NodeCmd) -> Result<i32> {
    use crate::drain_view;
    match cmd {
        NodeCmd::Drain {
            name,
            mode,
            parallel,
            dry_run,
            deadline,
            follow,
        } => {
            let s = drain_view::Start {
                node: name,
                mode,
                parallel,
                dry_run,
                deadline,
                follow,
                restore: false,
            };
            return drain_view::start(addrs, c, s).await;
        }
        NodeCmd::Restore {
            name,
            mode,
            parallel,
            dry_run,
            follow,
        } => {
            let s = drain_view::Start {
                node: name,
                mode,
                parallel,
                dry_run,
                deadline: None,
                follow,
                restore: true,
            };
            return drain_view::start(addrs, c, s).await;
        }
        NodeCmd::DrainStatus {
            name,
            follow,
            output,
        } => return drain_view::status(addrs, c, &name, follow, output).await,
        NodeCmd::DrainCancel { name } => return drain_view::cancel(c, &name).await,
        NodeCmd::Ls { output } => {
            let nodes = c
                .list_nodes(cpb::ListNodesRequest {})
                .await?
                .into_inner()
                .nodes;
            if output == Output::Json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&nodes.iter().map(node_json).collect::<Vec<_>>())?
                );
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = nodes
                .iter()
                .map(|n| {
                    let cap = n.capacity.unwrap_or_default();
                    let al = n.allocated.unwrap_or_default();
                    vec![
                        n.name.clone(),
                        n.status.clone(),
                        n.addr.clone(),
                        format!(
                            "{}/{}",
                            human_cpu(al.cpu_millicores),
                            human_cpu(cap.cpu_millicores)
                        ),
                        format!(
                            "{}/{}",
                            human_bytes(al.memory_bytes),
                            human_bytes(cap.memory_bytes)
                        ),
                        n.vps_count.to_string(),
                    ]
                })
                .collect();
            table::print(&["NAME", "STATUS", "ADDRESS", "CPU", "MEM", "VPS"], &rows);
        }
        NodeCmd::Show { name, output } => {
            let n = c.get_node(cpb::GetNodeRequest { name }).await?.into_inner();
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&node_json(&n))?);
                return Ok(0);
            }
            let cap = n.capacity.unwrap_or_default();
            let al = n.allocated.unwrap_or_default();
            let mut labels: Vec<String> =
                n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            for (k, v) in [
                ("Name", n.name.clone()),
                ("Id", n.id.to_string()),
                ("Status", n.status.clone()),
                ("Address", n.addr.clone()),
                (
                    "Labels",
                    if labels.is_empty() {
                        "-".into()
                    } else {
                        labels.join(",")
                    },
                ),
                (
                    "CPU",
                    format!(
                        "{} allocated of {}",
                        human_cpu(al.cpu_millicores),
                        human_cpu(cap.cpu_millicores)
                    ),
                ),
                (
                    "Memory",
                    format!(
                        "{} allocated of {}",
                        human_bytes(al.memory_bytes),
                        human_bytes(cap.memory_bytes)
                    ),
                ),
                ("VPSes", {
                    let u = n.usage.unwrap_or_default();
                    format!("{} placed, {} running", n.vps_count, u.vps_running)
                }),
                ("In use", {
                    let u = n.usage.unwrap_or_default();
                    format!(
                        "{} memory, {} disk of {}",
                        human_bytes(u.memory_bytes),
                        human_bytes(u.disk_bytes),
                        human_bytes(cap.disk_bytes)
                    )
                }),
                (
                    "Templates",
                    if n.templates.is_empty() {
                        "-".into()
                    } else {
                        n.templates.join(",")
                    },
                ),
                (
                    "Drain",
                    n.drain
                        .as_ref()
                        .map(crate::drain_view::summary)
                        .unwrap_or_else(|| "-".into()),
                ),
                ("Heartbeat", {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as i64)
                        .unwrap_or(0);
                    format!(
                        "{:.0} s ago (reported every 10 s)",
                        (now - n.last_heartbeat_unix_ms).max(0) as f64 / 1000.0
                    )
                }),
            ] {
                println!("{k:<8} {v}");
            }
        }
        NodeCmd::Cordon { name } => {
            c.cordon_node(cpb::CordonNodeRequest {
                name: name.clone(),
                cordon: true,
            })
            .await?;
            println!("cordoned node {name}");
        }
        NodeCmd::Uncordon { name } => {
            c.cordon_node(cpb::CordonNodeRequest {
                name: name.clone(),
                cordon: false,
            })
            .await?;
            println!("uncordoned node {name}");
        }
        NodeCmd::JoinToken { ttl } => join_token(c, cpb::JoinKind::Node, &ttl).await?,
    }
    Ok(0)
}

/// A VPS's placement rules in one line ("-" for none).
fn placement_rules(p: Option<&cpb::Placement>) -> String {
    let Some(p) = p else {
        return "-".into();
    };
    let mut parts = Vec::new();
    if !p.node.is_empty() {
        parts.push(format!("pinned to {}", p.node));
    }
    let mut sel: Vec<String> = p
        .node_selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    sel.sort();
    if !sel.is_empty() {
        parts.push(format!("selector {}", sel.join(",")));
    }
    if !p.anti_affinity_group.is_empty() {
        parts.push(format!("anti-affinity {}", p.anti_affinity_group));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join("; ")
    }
}

fn cvps_json(v: &cpb::ClusterVps) -> serde_json::Value {
    let mut j = crate::agent_cmd::spec_json(v.spec.as_ref());
    j["node"] = json!(v.node);
    j["desired"] = json!(v.desired);
    j["status"] = json!(v.observed);
    j["generation"] = json!(v.generation);
    j["placement_reason"] = json!(v.placement_reason);
    if let Some(p) = &v.placement {
        j["placement"] = json!({
            "node": p.node, "node_selector": p.node_selector,
            "anti_affinity_group": p.anti_affinity_group,
        });
    }
    if let Some(m) = &v.migration {
        j["migration"] = json!({
            "id": m.id, "source": m.source, "target": m.target,
            "mode": m.mode, "phase": m.phase, "started_unix_ms": m.started_unix_ms,
        });
    }
    j["history"] = v
        .history
        .iter()
        .map(|h| {
            let phases: Vec<_> = h
                .phases
                .iter()
                .map(|p| json!({"phase": p.phase, "millis": p.millis, "bytes": p.bytes}))
                .collect();
            json!({
                "id": h.id, "source": h.source, "target": h.target, "mode": h.mode,
                "phase": h.phase, "started_unix_ms": h.started_unix_ms,
                "decided_unix_ms": h.decided_unix_ms, "outcome": h.outcome, "reason": h.reason,
                "ended_unix_ms": h.ended_unix_ms, "downtime_ms": h.downtime_ms,
                "total_ms": h.total_ms, "phases": phases, "error": h.error,
            })
        })
        .collect();
    j
}

/// VPS commands against the controller.
pub async fn vps(c: &mut Client, cmd: VpsCmd) -> Result<i32> {
    match cmd {
        VpsCmd::Create {
            name,
            template,
            hostname,
            limits,
            ip,
            gateway,
            mac,
            init,
            autostart,
            stop_signal,
            privileged,
            start,
            placement,
        } => {
            let spec = crate::agent_cmd::spec_from_args(
                &name,
                template,
                hostname,
                crate::agent_cmd::limit_values(&limits)?,
                ip.as_deref(),
                gateway,
                mac,
                init,
                autostart,
                stop_signal,
                privileged,
            )?;
            let allocate_ip = spec.net.is_none();
            let req = cpb::CreateVpsRequest {
                spec: Some(spec),
                placement: Some(cpb::Placement {
                    node: placement.node.unwrap_or_default(),
                    node_selector: placement.selector.into_iter().collect::<HashMap<_, _>>(),
                    anti_affinity_group: placement.anti_affinity.unwrap_or_default(),
                }),
                desired: if start {
                    "running".into()
                } else {
                    "stopped".into()
                },
                allocate_ip,
            };
            let v = c.create_vps(req).await?.into_inner();
            let got_ip = v
                .spec
                .as_ref()
                .and_then(|s| s.net.as_ref())
                .map(|n| n.ip.clone())
                .unwrap_or_default();
            println!(
                "created VPS {name} on {} ({}), ip {got_ip}",
                v.node, v.placement_reason
            );
        }
        VpsCmd::Ls {
            output,
            node,
            status,
            label,
        } => {
            let req = cpb::ListVpsRequest {
                node: node.unwrap_or_default(),
                status: status.unwrap_or_default(),
                label: label.unwrap_or_default(),
            };
            let vs = c.list_vps(req).await?.into_inner().vps;
            if output == Output::Json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&vs.iter().map(cvps_json).collect::<Vec<_>>())?
                );
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = vs
                .iter()
                .map(|v| {
                    let s = v.spec.clone().unwrap_or_default();
                    let l = s.limits.unwrap_or_default();
                    vec![
                        s.name,
                        v.node.clone(),
                        v.observed.clone(),
                        s.net
                            .map(|n| n.ip)
                            .filter(|i| !i.is_empty())
                            .unwrap_or_else(|| "-".into()),
                        human_cpu(l.cpu_millicores),
                        human_bytes(l.memory_bytes),
                        match l.disk_bytes {
                            0 => "-".into(),
                            q => human_bytes(q),
                        },
                        v.desired.clone(),
                    ]
                })
                .collect();
            table::print(
                &[
                    "NAME", "NODE", "STATUS", "IP", "CPU", "MEM", "DISK", "DESIRED",
                ],
                &rows,
            );
        }
        VpsCmd::Show { name, output } => {
            let v = c.get_vps(cpb::GetVpsRequest { name }).await?.into_inner();
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&cvps_json(&v))?);
            } else {
                let s = v.spec.clone().unwrap_or_default();
                let l = s.limits.unwrap_or_default();
                let isolation = crate::agent_cmd::isolation(&s);
                let ip = s.net.map(|n| n.ip).unwrap_or_default();
                // Disk use is the node's to tell (best effort: it may be down).
                let used = match agent_of(c, &s.name).await {
                    Ok((_, mut a)) => a
                        .get_vps(apb::GetVpsRequest {
                            name: s.name.clone(),
                        })
                        .await
                        .ok()
                        .and_then(|r| r.into_inner().usage)
                        .map(|u| u.disk_bytes),
                    Err(_) => None,
                };
                let disk = match used {
                    Some(u) => crate::agent_cmd::disk_line(u, l.disk_bytes),
                    None if l.disk_bytes > 0 => {
                        format!(
                            "quota {} (use unknown: node unreachable)",
                            human_bytes(l.disk_bytes)
                        )
                    }
                    None => "no quota (use unknown: node unreachable)".into(),
                };
                for (k, val) in [
                    ("Name", s.name),
                    ("Isolation", isolation),
                    ("Node", v.node.clone()),
                    ("Placed", v.placement_reason.clone()),
                    ("Rules", placement_rules(v.placement.as_ref())),
                    ("Status", format!("{} (desired {})", v.observed, v.desired)),
                    ("IP", if ip.is_empty() { "-".into() } else { ip }),
                    ("CPU", human_cpu(l.cpu_millicores)),
                    ("Memory", human_bytes(l.memory_bytes)),
                    ("Disk", disk),
                    ("Generation", v.generation.to_string()),
                ] {
                    println!("{k:<10} {val}");
                }
                if let Some(m) = &v.migration {
                    println!(
                        "{:<10} {} → {} ({}, {}, phase {})",
                        "Migrating", m.source, m.target, m.id, m.mode, m.phase
                    );
                }
                if !v.history.is_empty() {
                    println!("Moves (oldest first):");
                    for h in &v.history {
                        println!("  {}", move_line(h));
                    }
                }
            }
        }
        VpsCmd::Migrate {
            name,
            to,
            mode,
            verify,
        } => {
            let mode = crate::migrate_view::parse_mode(&mode)?;
            let s = c
                .migrate_vps(cpb::MigrateVpsRequest {
                    name: name.clone(),
                    to_node: to.unwrap_or_default(),
                    mode: mode as i32,
                    verify,
                })
                .await?
                .into_inner();
            return follow_migration(c, &name, s).await;
        }
        VpsCmd::Destroy { name, force } => {
            c.delete_vps(cpb::DeleteVpsRequest {
                name: name.clone(),
                force,
            })
            .await?;
            println!("destroyed VPS {name}");
        }
        VpsCmd::Start { name } => {
            let v = c
                .start_vps(cpb::SetDesiredRequest { name: name.clone() })
                .await?
                .into_inner();
            let v = observed(c, &name, "running", v.generation).await?;
            let (_, mut a) = agent_of(c, &name).await?;
            let pid = a
                .get_vps(apb::GetVpsRequest { name: name.clone() })
                .await?
                .into_inner()
                .init_pid;
            println!("started VPS {name} (init pid {pid}) on {}", v.node);
        }
        VpsCmd::Stop {
            name,
            timeout,
            force,
        } => {
            // Desired state first, so nothing starts it again; then the stop
            // itself on its node, with the caller's grace period.
            let v = c
                .stop_vps(cpb::SetDesiredRequest { name: name.clone() })
                .await?
                .into_inner();
            let (_, mut a) = agent_of(c, &name).await?;
            let r = a
                .stop_vps(apb::StopVpsRequest {
                    name: name.clone(),
                    timeout_secs: timeout,
                    force,
                    generation: v.generation,
                })
                .await;
            if let Err(e) = r {
                // The controller's own stop may have got there first.
                if e.code() != tonic::Code::FailedPrecondition {
                    return Err(e.into());
                }
            }
            let v = observed(c, &name, "stopped", v.generation).await?;
            println!("stopped VPS {name} on {}", v.node);
        }
        VpsCmd::Restart {
            name,
            timeout,
            force,
        } => {
            let (v, mut a) = agent_of(c, &name).await?;
            if v.desired != "running" {
                bail!("VPS {name} is meant to be stopped; start it instead");
            }
            let r = a
                .restart_vps(apb::StopVpsRequest {
                    name: name.clone(),
                    timeout_secs: timeout,
                    force,
                    generation: v.generation,
                })
                .await?
                .into_inner();
            println!(
                "restarted VPS {name} (init pid {}) on {}",
                r.init_pid, v.node
            );
        }
        VpsCmd::Set {
            name,
            limits,
            autostart,
        } => {
            if autostart.is_some() {
                bail!(
                    "--autostart is node-local: in a cluster the controller keeps each VPS's \
                     desired state and starts it wherever it runs"
                );
            }
            let r = crate::agent_cmd::limits_req(&name, &limits, None)?;
            let req = cpb::UpdateVpsRequest {
                name: name.clone(),
                cpu_millicores: r.cpu_millicores,
                cpu_weight: r.cpu_weight,
                memory_bytes: r.memory_bytes,
                swap_bytes: r.swap_bytes,
                pids: r.pids,
                disk_bytes: r.disk_bytes,
            };
            if crate::agent_cmd::nothing_to_set(&r) {
                bail!(
                    "nothing to change: give --cpu, --cpu-weight, --memory, --swap, --pids or --disk"
                );
            }
            let v = c.update_vps(req).await?.into_inner();
            let node = applied(c, &name, v.generation).await?;
            println!("updated VPS {name} (applied on {node})");
        }
        cmd @ (VpsCmd::Exec { .. } | VpsCmd::Logs { .. }) => {
            let name = match &cmd {
                VpsCmd::Exec { name, .. } | VpsCmd::Logs { name, .. } => name.clone(),
                _ => String::new(),
            };
            let (_, mut a) = agent_of(c, &name).await?;
            return crate::agent_cmd::vps(&mut a, cmd).await;
        }
        VpsCmd::Checkpoint { name, .. } | VpsCmd::Restore { name, .. } => {
            let v = c
                .get_vps(cpb::GetVpsRequest { name: name.clone() })
                .await?
                .into_inner();
            bail!(
                "checkpoint and restore files are node-local: run them with --agent on {} \
                 (VPS {name}'s node); to move a VPS, use vps migrate",
                v.node
            );
        }
    }
    Ok(0)
}

/// How long a cluster verb waits for the VPS's node to carry it out.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(60);

/// The VPS's record and a client of the agent on its node (an admin's
/// credentials reach agents too): the user never names the node.
/// One line of a VPS's move history.
fn move_line(h: &cpb::MoveRecord) -> String {
    let state = match (h.outcome.as_str(), h.ended_unix_ms) {
        ("", _) => format!("in flight, phase {}", h.phase),
        ("moved", 0) => format!("moved, finishing ({})", h.phase),
        ("moved", _) if h.error.is_empty() => "moved".to_string(),
        ("moved", _) => format!("moved, then: {}", h.error),
        (o, _) if !h.reason.is_empty() => format!("{o}: {}", h.reason),
        (o, _) if !h.error.is_empty() => format!("{o}: {}", h.error),
        (o, _) => o.to_string(),
    };
    let figures = if h.ended_unix_ms != 0 && h.error.is_empty() {
        let bytes: u64 = h.phases.iter().map(|p| p.bytes).sum();
        let post = h
            .phases
            .iter()
            .find(|p| p.phase == "post-copy")
            .map(|p| format!(", post-copy {}", human_bytes(p.bytes)))
            .unwrap_or_default();
        format!(
            "; downtime {} ms, total {} ms, {}{post}",
            h.downtime_ms,
            h.total_ms,
            human_bytes(bytes)
        )
    } else {
        String::new()
    };
    format!(
        "{} {} → {} ({}): {state}{figures}",
        h.id, h.source, h.target, h.mode
    )
}

/// Follows a migration to its outcome: its own stream, then, if that breaks
/// (the replica serving it died, the source agent restarted), the same
/// migration by id from any replica. The exit code is its outcome.
async fn follow_migration(
    c: &mut Client,
    name: &str,
    s: tonic::Streaming<apb::MigrationEvent>,
) -> Result<i32> {
    use crate::migrate_view::{report, Ended, Progress};
    let p = Progress::new();
    let mut ended = p.show(s).await;
    let mut tries = 0;
    let out = loop {
        let (id, why) = match ended {
            Ended::Done(ev) => break Ok(report(&ev)),
            Ended::Broken { id, why } => (id, why),
        };
        tries += 1;
        if tries > 20 {
            break Err(anyhow::anyhow!(
                "lost the migration's progress ({why}); see `ferryctl vps show {name}`"
            ));
        }
        p.reconnecting(&why);
        // Without an event yet, the record names the migration in flight.
        let id = if id.is_empty() {
            match c.get_vps(cpb::GetVpsRequest { name: name.into() }).await {
                Ok(v) => {
                    let v = v.into_inner();
                    v.migration
                        .map(|m| m.id)
                        .or_else(|| v.history.last().map(|h| h.id.clone()))
                        .unwrap_or_default()
                }
                Err(_) => String::new(),
            }
        } else {
            id
        };
        if id.is_empty() {
            break Err(anyhow::anyhow!(
                "lost the migration's progress ({why}) before it was named; see `ferryctl vps \
                 show {name}`"
            ));
        }
        ended = match c
            .watch_migration(cpb::WatchMigrationRequest {
                name: name.into(),
                migration_id: id.clone(),
            })
            .await
        {
            Ok(s) => p.show(s.into_inner()).await,
            Err(e) => {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                Ended::Broken {
                    id,
                    why: e.message().to_string(),
                }
            }
        };
    };
    p.finish();
    out
}

async fn agent_of(
    c: &mut Client,
    name: &str,
) -> Result<(
    cpb::ClusterVps,
    ferry_proto::agent::v1::agent_service_client::AgentServiceClient<Channel>,
)> {
    let v = c
        .get_vps(cpb::GetVpsRequest { name: name.into() })
        .await?
        .into_inner();
    if let Some(m) = &v.migration {
        bail!(
            "VPS {name} is migrating ({} → {}, phase {}); try again once the move has ended",
            m.source,
            m.target,
            m.phase
        );
    }
    let a = node_agent(c, &v.node)
        .await
        .with_context(|| format!("VPS {name}'s node"))?;
    Ok((v, a))
}

/// A client of node `node`'s agent, which must prove it is that node (its
/// certificate names it).
async fn node_agent(
    c: &mut Client,
    node: &str,
) -> Result<ferry_proto::agent::v1::agent_service_client::AgentServiceClient<Channel>> {
    let n = c
        .get_node(cpb::GetNodeRequest { name: node.into() })
        .await?
        .into_inner();
    if n.status == "down" {
        bail!("node {node} is down");
    }
    let addr: ferry_proto::addr::Addr = n.addr.parse().map_err(anyhow::Error::msg)?;
    let ch = ferry_proto::addr::connect_node_named(&addr, node)
        .await
        .with_context(|| format!("reaching node {node} at {}", n.addr))?;
    Ok(ferry_proto::limits::agent_client(ch))
}

/// Templates as cluster objects: imported on one node and recorded; the
/// nodes that need one later fetch it.
pub async fn template(c: &mut Client, cmd: crate::agent_cmd::TemplateCmd) -> Result<()> {
    use crate::agent_cmd::TemplateCmd;
    match cmd {
        TemplateCmd::Import {
            name,
            file,
            on_node,
            replace,
            force,
            node,
        } => {
            let node = match node {
                Some(n) => n,
                None => c
                    .list_nodes(cpb::ListNodesRequest {})
                    .await?
                    .into_inner()
                    .nodes
                    .into_iter()
                    .filter(|n| n.status == "ready")
                    .map(|n| n.name)
                    .min()
                    .ok_or_else(|| anyhow::anyhow!("no node is ready to take the template"))?,
            };
            let mut a = node_agent(c, &node).await?;
            let cmd = TemplateCmd::Import {
                name: name.clone(),
                file,
                on_node,
                replace,
                force,
                node: None,
            };
            crate::agent_cmd::template(&mut a, cmd).await?;
            let t = c
                .register_template(cpb::RegisterTemplateRequest {
                    name: name.clone(),
                    node: node.clone(),
                })
                .await?
                .into_inner();
            println!(
                "template {name} is on {node}; other nodes fetch it when they need it \
                 (sha256 {})",
                t.sha256
            );
        }
        TemplateCmd::Ls { output } => {
            let ts = c
                .list_templates(cpb::ListClusterTemplatesRequest {})
                .await?
                .into_inner()
                .templates;
            if output == Output::Json {
                let v: Vec<_> = ts
                    .iter()
                    .map(|t| {
                        json!({"name": t.name, "size_bytes": t.size_bytes, "sha256": t.sha256,
                               "imported_on": t.imported_on, "nodes": t.nodes})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = ts
                .iter()
                .map(|t| {
                    vec![
                        t.name.clone(),
                        human_bytes(t.size_bytes),
                        t.sha256.chars().take(12).collect(),
                        if t.nodes.is_empty() {
                            "-".into()
                        } else {
                            t.nodes.join(",")
                        },
                    ]
                })
                .collect();
            table::print(&["NAME", "SIZE", "SHA256", "NODES"], &rows);
        }
        TemplateCmd::Rm { name } => {
            let r = c
                .delete_template(cpb::DeleteClusterTemplateRequest { name: name.clone() })
                .await?
                .into_inner();
            println!("removed template {name}");
            if !r.kept_on.is_empty() {
                eprintln!(
                    "its files stay on {} (their agents could not delete them): \
                     `ferryctl --agent NODE template rm {name}` there",
                    r.kept_on.join(", ")
                );
            }
        }
    }
    Ok(())
}

/// Waits until the controller reports the VPS `status` at generation `gen`
/// or later (its node's heartbeat tells).
async fn observed(c: &mut Client, name: &str, status: &str, gen: u64) -> Result<cpb::ClusterVps> {
    let end = std::time::Instant::now() + SETTLE;
    loop {
        let v = c
            .get_vps(cpb::GetVpsRequest { name: name.into() })
            .await?
            .into_inner();
        if v.generation >= gen && v.observed == status {
            return Ok(v);
        }
        if std::time::Instant::now() > end {
            bail!(
                "VPS {name} is {} on {} after {} s (asked: {status}); `vps show {name}` follows it",
                v.observed,
                v.node,
                SETTLE.as_secs()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Waits until the VPS's node holds generation `gen` of it (new limits are
/// in place); returns the node's name.
async fn applied(c: &mut Client, name: &str, gen: u64) -> Result<String> {
    let end = std::time::Instant::now() + SETTLE;
    let (v, mut a) = agent_of(c, name).await?;
    loop {
        let there = a
            .get_vps(apb::GetVpsRequest { name: name.into() })
            .await?
            .into_inner()
            .spec
            .map(|s| s.generation)
            .unwrap_or(0);
        if there >= gen {
            return Ok(v.node);
        }
        if std::time::Instant::now() > end {
            bail!(
                "VPS {name}'s node {} has not applied the change after {} s",
                v.node,
                SETTLE.as_secs()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Where a cluster-mode create may go.
#[derive(clap::Args, Default, Clone)]
pub struct Placement {
    /// Pin to this node.
    #[arg(long = "node")]
    pub node: Option<String>,
    /// Only nodes with this label (key=value; repeatable).
    #[arg(long = "selector", value_parser = parse_kv)]
    pub selector: Vec<(String, String)>,
    /// At most one VPS of this group per node.
    #[arg(long)]
    pub anti_affinity: Option<String>,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

/// The cluster's events; with `follow`, new ones as they happen (Ctrl-C ends).
pub async fn events(c: &mut Client, follow: bool, output: Output) -> Result<()> {
    let mut s = c
        .watch_events(cpb::WatchEventsRequest {
            after_seq: 0,
            follow,
        })
        .await?
        .into_inner();
    while let Some(e) = s.message().await? {
        if output == Output::Json {
            println!(
                "{}",
                json!({"seq": e.seq, "ts_unix_ms": e.ts_unix_ms, "kind": e.kind, "subject": e.subject, "message": e.message})
            );
        } else {
            let secs = e.ts_unix_ms / 1000;
            let (h, m, sec) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
            println!(
                "{:>6}  {h:02}:{m:02}:{sec:02}  {:<6} {:<16} {}",
                e.seq, e.kind, e.subject, e.message
            );
        }
    }
    Ok(())
}
