//! Node-local commands: `ferryctl --agent ADDR template|vps|node ...`.

use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ferry_proto::agent::v1 as pb;
use ferry_proto::agent::v1::agent_service_client::AgentServiceClient;
use serde_json::json;
use tonic::transport::Channel;

use crate::table;
use crate::units::{human_bytes, human_cpu, parse_bytes, parse_cpu};

#[derive(Clone, Copy, Debug, clap::ValueEnum, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
pub enum TemplateCmd {
    /// Import a rootfs archive (tar, tar.gz, tar.zst) as a template.
    Import {
        name: String,
        /// Archive file; "-" reads standard input.
        file: String,
        /// The file is already in the node's import dir (ferry-agent
        /// --import-dir, default <data-dir>/import): a name there, or an
        /// absolute path inside it. The agent reads it there.
        #[arg(long)]
        on_node: bool,
        /// Replace a template of the same name.
        #[arg(long)]
        replace: bool,
        /// With --replace: also replace the built-in template or one that
        /// VPSes use (they keep the old tree until they restart).
        #[arg(long, requires = "replace")]
        force: bool,
        /// Cluster mode: the node to import it on (default: the first ready
        /// one); the others fetch it from there when they need it.
        #[arg(long)]
        node: Option<String>,
    },
    /// List templates.
    Ls {
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
    /// Delete a template no VPS uses.
    Rm { name: String },
}

#[derive(Args)]
pub struct LimitArgs {
    /// CPU quota: 500m, 1, 1.5 (cores).
    #[arg(long)]
    pub cpu: Option<String>,
    /// Relative CPU weight, 1..10000 (default 100).
    #[arg(long)]
    pub cpu_weight: Option<u32>,
    /// Memory limit: 256M, 1G.
    #[arg(long)]
    pub memory: Option<String>,
    /// Swap on top of memory: 0, 512M.
    #[arg(long)]
    pub swap: Option<String>,
    /// Most tasks (processes and threads).
    #[arg(long)]
    pub pids: Option<u32>,
    /// Disk quota on the VPS's own files: 256M, 10G (given at create;
    /// `vps set` grows it live, never shrinks it).
    #[arg(long)]
    pub disk: Option<String>,
}

/// Disk use, and the quota when there is one.
pub fn disk_line(used: u64, quota: u64) -> String {
    if quota == 0 {
        format!("{} used (no quota)", human_bytes(used))
    } else {
        format!("{} used of {}", human_bytes(used), human_bytes(quota))
    }
}

fn disk_value(l: &LimitArgs) -> Result<Option<u64>> {
    l.disk
        .as_deref()
        .map(parse_bytes)
        .transpose()
        .map_err(anyhow::Error::msg)
        .context("--disk")
}

#[derive(Subcommand)]
pub enum VpsCmd {
    /// Create a VPS (and start it with --start).
    Create {
        name: String,
        #[arg(long, default_value = "busybox")]
        template: String,
        #[arg(long)]
        hostname: Option<String>,
        #[command(flatten)]
        limits: LimitArgs,
        /// IPv4 address, optionally with a prefix: 10.77.0.10 or 10.77.0.10/16.
        #[arg(long)]
        ip: Option<String>,
        #[arg(long)]
        gateway: Option<String>,
        #[arg(long)]
        mac: Option<String>,
        /// Init command (default /sbin/init), one --init per word, e.g. --init /bin/sh
        /// --init -c --init 'sleep 1d' (a word may start with '-').
        #[arg(long, allow_hyphen_values = true)]
        init: Vec<String>,
        /// Start when the node boots.
        #[arg(long)]
        autostart: bool,
        /// Signal that asks init to shut down: SIGTERM (busybox), SIGPWR (Debian
        /// sysvinit template), SIGRTMIN+3 (systemd).
        #[arg(long, default_value = "SIGTERM")]
        stop_signal: String,
        /// No user namespace: root in the VPS is root on the host. For
        /// trusted workloads only; `vps show` flags it. By default a VPS's
        /// ids map to a range of host ids of its own.
        #[arg(long)]
        privileged: bool,
        /// Cluster mode only: where the VPS may go.
        #[command(flatten)]
        placement: Box<crate::cluster_cmd::Placement>,
        #[arg(long)]
        start: bool,
    },
    Start {
        name: String,
    },
    Stop {
        name: String,
        /// Seconds between SIGTERM and SIGKILL.
        #[arg(long, default_value_t = 30)]
        timeout: u32,
        /// Kill right away.
        #[arg(long)]
        force: bool,
    },
    Restart {
        name: String,
        #[arg(long, default_value_t = 30)]
        timeout: u32,
        #[arg(long)]
        force: bool,
    },
    /// Save a running VPS (processes, memory, connections, files) to a file;
    /// it stops, unless --leave-running.
    Checkpoint {
        name: String,
        /// Archive to write (default NAME.ferryckpt).
        #[arg(long)]
        to: Option<std::path::PathBuf>,
        #[arg(long)]
        leave_running: bool,
    },
    /// Bring a stopped VPS back from a checkpoint archive, processes and all.
    Restore {
        name: String,
        #[arg(long)]
        from: std::path::PathBuf,
    },
    /// Live-migrate a VPS to another node. Cluster mode (--controller): the
    /// move is recorded and decided in Raft. Node-local mode (--agent): this
    /// agent decides, for VPSes no controller manages.
    Migrate {
        name: String,
        /// The target: a node name in cluster mode (default: the scheduler
        /// picks one); the target agent's address (HOST:PORT or unix:/path)
        /// in node-local mode.
        #[arg(long)]
        to: Option<String>,
        /// auto, post-copy, pre-copy, stop-copy or cold.
        #[arg(long, default_value = "auto")]
        mode: String,
        /// Compare both trees after the final pass.
        #[arg(long)]
        verify: bool,
    },
    /// Delete a VPS and its files.
    Destroy {
        name: String,
        /// Stop it first if running.
        #[arg(long)]
        force: bool,
    },
    Ls {
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
        /// Cluster mode: only VPSes on this node.
        #[arg(long)]
        node: Option<String>,
        /// Cluster mode: only VPSes in this state (running, stopped, unknown, pending).
        #[arg(long)]
        status: Option<String>,
        /// Cluster mode: only VPSes whose node has this label (key=value).
        #[arg(long)]
        label: Option<String>,
    },
    Show {
        name: String,
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
    /// Run a command inside: ferryctl vps exec web1 -- ps aux
    Exec {
        name: String,
        /// Kill the command after this many seconds (0 = never).
        #[arg(long, default_value_t = 0)]
        timeout: u32,
        /// Extra environment, KEY=VALUE.
        #[arg(long)]
        env: Vec<String>,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Init's console output.
    Logs {
        name: String,
        /// Bytes from the end.
        #[arg(long, default_value_t = 65536)]
        tail: u32,
    },
    /// Change limits (live on a running VPS) or autostart.
    Set {
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
        #[arg(long)]
        autostart: Option<bool>,
    },
}

pub async fn connect(addr: &str) -> Result<AgentServiceClient<Channel>> {
    let a: ferry_proto::addr::Addr = addr.parse().map_err(anyhow::Error::msg)?;
    let ch = ferry_proto::addr::connect_node(&a)
        .await
        .with_context(|| format!("cannot reach the agent at {a} (is ferry-agent running?)"))?;
    Ok(ferry_proto::limits::agent_client(ch))
}

pub async fn template(c: &mut AgentServiceClient<Channel>, cmd: TemplateCmd) -> Result<()> {
    match cmd {
        TemplateCmd::Import {
            name,
            file,
            on_node,
            replace,
            force,
            node,
        } => {
            if node.is_some() {
                bail!("--node is for cluster mode (--controller): a node-local import goes to this agent");
            }
            let header = pb::ImportTemplateHeader {
                name,
                format: pb::ArchiveFormat::Auto as i32,
                replace,
                force,
            };
            let t = if on_node {
                // As given: the agent resolves it in its import dir.
                let path = file.clone();
                c.import_template_path(pb::ImportTemplatePathRequest {
                    header: Some(header),
                    path,
                })
                .await?
                .into_inner()
            } else {
                let header = pb::ImportTemplateChunk {
                    item: Some(pb::import_template_chunk::Item::Header(header)),
                };
                let (chunks, reader) =
                    stream_file(file, Some(header), |buf| pb::ImportTemplateChunk {
                        item: Some(pb::import_template_chunk::Item::Data(buf)),
                    });
                let res = c.import_template(chunks).await;
                reader.await??;
                res?.into_inner()
            };
            println!(
                "imported template {} ({}, {} files, sha256 {})",
                t.name,
                human_bytes(t.size_bytes),
                t.file_count,
                t.sha256
            );
        }
        TemplateCmd::Ls { output } => {
            let ts = c
                .list_templates(pb::ListTemplatesRequest {})
                .await?
                .into_inner()
                .templates;
            if output == Output::Json {
                let v: Vec<_> = ts
                    .iter()
                    .map(|t| json!({"name": t.name, "size_bytes": t.size_bytes, "sha256": t.sha256, "source": t.source, "file_count": t.file_count, "imported_unix": t.imported_unix}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let rows = ts
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            human_bytes(t.size_bytes),
                            t.file_count.to_string(),
                            t.sha256[..t.sha256.len().min(16)].to_string(),
                            t.source.clone(),
                        ]
                    })
                    .collect::<Vec<_>>();
                table::print(&["NAME", "SIZE", "FILES", "SHA256", "SOURCE"], &rows);
            }
        }
        TemplateCmd::Rm { name } => {
            c.delete_template(pb::DeleteTemplateRequest { name: name.clone() })
                .await?;
            println!("deleted template {name}");
        }
    }
    Ok(())
}

fn status_name(s: i32) -> &'static str {
    match pb::VpsStatus::try_from(s) {
        Ok(pb::VpsStatus::Running) => "running",
        Ok(pb::VpsStatus::Stopped) => "stopped",
        Ok(pb::VpsStatus::Stopping) => "stopping",
        _ => "unknown",
    }
}

/// The spec part of a VPS as JSON, shared by node-local and cluster output.
pub fn spec_json(spec: Option<&pb::VpsSpec>) -> serde_json::Value {
    let spec = spec.cloned().unwrap_or_default();
    let l = spec.limits.unwrap_or_default();
    let n = spec.net.unwrap_or_default();
    json!({
        "name": spec.name, "template": spec.template, "hostname": spec.hostname,
        "ip": n.ip, "prefix_len": n.prefix_len, "gateway": n.gateway,
        "limits": {"cpu_millicores": l.cpu_millicores, "cpu_weight": l.cpu_weight, "memory_bytes": l.memory_bytes, "swap_bytes": l.swap_bytes, "pids": l.pids},
        "init": spec.init, "autostart": spec.autostart, "stop_signal": spec.stop_signal,
        "privileged": spec.privileged, "id_base": spec.id_base,
    })
}

pub fn vps_json(v: &pb::Vps) -> serde_json::Value {
    let u = v.usage.unwrap_or_default();
    let mut j = spec_json(v.spec.as_ref());
    for (k, val) in [
        ("status", json!(status_name(v.status))),
        ("mac", json!(v.mac)),
        ("host_veth", json!(v.host_veth)),
        ("init_pid", json!(v.init_pid)),
        ("started_unix", json!(v.started_unix)),
        ("stop_reason", json!(v.stop_reason)),
        ("exit_code", json!(v.exit_code)),
        ("exit_signal", json!(v.exit_signal)),
        ("reboots", json!(v.reboots)),
        (
            "usage",
            json!({"cpu_nanos": u.cpu_nanos, "memory_bytes": u.memory_bytes, "memory_peak_bytes": u.memory_peak_bytes, "pids": u.pids, "oom_kills": u.oom_kills, "disk_bytes": u.disk_bytes}),
        ),
    ] {
        j[k] = val;
    }
    j
}

/// The limits given on the command line, parsed; None where not given.
pub fn limit_values_opt(l: &LimitArgs) -> Result<(Option<u32>, Option<u64>, Option<u64>)> {
    Ok((
        l.cpu
            .as_deref()
            .map(parse_cpu)
            .transpose()
            .map_err(anyhow::Error::msg)
            .context("--cpu")?,
        l.memory
            .as_deref()
            .map(parse_bytes)
            .transpose()
            .map_err(anyhow::Error::msg)
            .context("--memory")?,
        l.swap
            .as_deref()
            .map(parse_bytes)
            .transpose()
            .map_err(anyhow::Error::msg)
            .context("--swap")?,
    ))
}

pub fn limit_values(l: &LimitArgs) -> Result<pb::Limits> {
    let (cpu, memory, swap) = limit_values_opt(l)?;
    Ok(pb::Limits {
        cpu_millicores: cpu.unwrap_or(0),
        cpu_weight: l.cpu_weight.unwrap_or(0),
        memory_bytes: memory.unwrap_or(256 << 20),
        swap_bytes: swap.unwrap_or(0),
        pids: l.pids.unwrap_or(0),
        disk_bytes: disk_value(l)?.unwrap_or(0),
    })
}

/// A VPS spec from `vps create`'s flags, for either mode.
#[allow(clippy::too_many_arguments)]
pub fn spec_from_args(
    name: &str,
    template: String,
    hostname: Option<String>,
    limits: pb::Limits,
    ip: Option<&str>,
    gateway: Option<String>,
    mac: Option<String>,
    init: Vec<String>,
    autostart: bool,
    stop_signal: String,
    privileged: bool,
) -> Result<pb::VpsSpec> {
    let (ip, prefix_len) = split_ip(ip)?;
    Ok(pb::VpsSpec {
        name: name.to_string(),
        template,
        hostname: hostname.unwrap_or_default(),
        limits: Some(limits),
        net: (!ip.is_empty()).then(|| pb::NetConfig {
            ip,
            prefix_len,
            gateway: gateway.unwrap_or_default(),
            mac: mac.unwrap_or_default(),
        }),
        init,
        autostart,
        generation: 0,
        stop_signal,
        privileged,
        id_base: 0,
    })
}

/// How a VPS is isolated, as `vps show` says it.
pub fn isolation(spec: &pb::VpsSpec) -> String {
    if spec.privileged {
        "PRIVILEGED: no user namespace, root in the VPS is root on this host".into()
    } else if spec.id_base != 0 {
        format!(
            "user namespace, ids 0-65535 are host ids {}",
            ferry_proto::ids::describe(spec.id_base)
        )
    } else {
        "user namespace (id range not assigned yet)".into()
    }
}

/// "10.77.0.10" or "10.77.0.10/16" → (address, prefix or 0); "" when absent.
pub fn split_ip(ip: Option<&str>) -> Result<(String, u32)> {
    match ip.map(|s| {
        s.split_once('/')
            .map(|(a, p)| (a.to_string(), p.to_string()))
            .unwrap_or((s.to_string(), String::new()))
    }) {
        Some((a, p)) if !p.is_empty() => {
            Ok((a, p.parse::<u32>().context("--ip prefix must be a number")?))
        }
        Some((a, _)) => Ok((a, 0)),
        None => Ok((String::new(), 0)),
    }
}

/// Whether a set request changes nothing.
pub fn nothing_to_set(r: &pb::SetVpsRequest) -> bool {
    r.cpu_millicores.is_none()
        && r.cpu_weight.is_none()
        && r.memory_bytes.is_none()
        && r.swap_bytes.is_none()
        && r.pids.is_none()
        && r.autostart.is_none()
        && r.disk_bytes.is_none()
}

pub fn limits_req(name: &str, l: &LimitArgs, autostart: Option<bool>) -> Result<pb::SetVpsRequest> {
    let (cpu_millicores, memory_bytes, swap_bytes) = limit_values_opt(l)?;
    Ok(pb::SetVpsRequest {
        name: name.to_string(),
        cpu_millicores,
        cpu_weight: l.cpu_weight,
        memory_bytes,
        swap_bytes,
        pids: l.pids,
        autostart,
        generation: 0,
        disk_bytes: disk_value(l)?,
    })
}

pub async fn vps(c: &mut AgentServiceClient<Channel>, cmd: VpsCmd) -> Result<i32> {
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
            if placement.node.is_some()
                || !placement.selector.is_empty()
                || placement.anti_affinity.is_some()
            {
                bail!("--node, --selector and --anti-affinity place VPSes across a cluster: use --controller");
            }
            let spec = spec_from_args(
                &name,
                template,
                hostname,
                limit_values(&limits)?,
                ip.as_deref(),
                gateway,
                mac,
                init,
                autostart,
                stop_signal,
                privileged,
            )?;
            let v = c
                .create_vps(pb::CreateVpsRequest {
                    spec: Some(spec),
                    start,
                })
                .await?
                .into_inner();
            println!(
                "created VPS {name}{}",
                if start {
                    format!(" (running, init pid {})", v.init_pid)
                } else {
                    String::new()
                }
            );
        }
        VpsCmd::Start { name } => {
            let v = c
                .start_vps(pb::StartVpsRequest {
                    name: name.clone(),
                    generation: 0,
                })
                .await?
                .into_inner();
            println!("started VPS {name} (init pid {})", v.init_pid);
        }
        VpsCmd::Stop {
            name,
            timeout,
            force,
        } => {
            c.stop_vps(pb::StopVpsRequest {
                name: name.clone(),
                timeout_secs: timeout,
                force,
                generation: 0,
            })
            .await?;
            println!("stopped VPS {name}");
        }
        VpsCmd::Restart {
            name,
            timeout,
            force,
        } => {
            let v = c
                .restart_vps(pb::StopVpsRequest {
                    name: name.clone(),
                    timeout_secs: timeout,
                    force,
                    generation: 0,
                })
                .await?
                .into_inner();
            println!("restarted VPS {name} (init pid {})", v.init_pid);
        }
        VpsCmd::Checkpoint {
            name,
            to,
            leave_running,
        } => {
            let path = to.unwrap_or_else(|| format!("{name}.ferryckpt").into());
            // Open the file before asking: a bad path must fail before the VPS
            // stops, or its state would have nowhere to go.
            let mut part = path.clone().into_os_string();
            part.push(".part");
            let part = std::path::PathBuf::from(part);
            let mut f = std::fs::File::create(&part)
                .with_context(|| format!("creating {}", part.display()))?;
            let res = async {
                let mut s = c
                    .checkpoint_vps(pb::CheckpointVpsRequest {
                        name: name.clone(),
                        leave_running,
                        generation: 0,
                    })
                    .await?
                    .into_inner();
                let mut n = 0u64;
                while let Some(ch) = s.message().await? {
                    f.write_all(&ch.data)?;
                    n += ch.data.len() as u64;
                }
                f.sync_all()?;
                std::fs::rename(&part, &path)
                    .with_context(|| format!("renaming to {}", path.display()))?;
                anyhow::Ok(n)
            }
            .await;
            let n = res.inspect_err(|_| {
                let _ = std::fs::remove_file(&part);
            })?;
            println!(
                "checkpointed VPS {name} to {} ({})",
                path.display(),
                human_bytes(n)
            );
        }
        VpsCmd::Restore { name, from } => {
            // The first message names the VPS; the archive follows.
            let first = pb::ArchiveChunk {
                name: name.clone(),
                data: Vec::new(),
            };
            let file = from.to_string_lossy().into_owned();
            let (chunks, reader) = stream_file(file, Some(first), |data| pb::ArchiveChunk {
                name: String::new(),
                data,
            });
            let res = c.restore_vps(chunks).await;
            reader.await??;
            res?;
            println!("restored VPS {name} from {}", from.display());
        }
        VpsCmd::Migrate {
            name,
            to,
            mode,
            verify,
        } => {
            let mode = crate::migrate_view::parse_mode(&mode)?;
            let Some(to) = to else {
                bail!("--to ADDR: give the target agent's address (or use --controller)");
            };
            let s = c
                .migrate_vps(pb::MigrateVpsRequest {
                    name: name.clone(),
                    target_addr: to.clone(),
                    target_node: to.clone(),
                    mode: mode as i32,
                    verify,
                    ..Default::default()
                })
                .await?
                .into_inner();
            return crate::migrate_view::follow(s).await;
        }
        VpsCmd::Destroy { name, force } => {
            c.destroy_vps(pb::DestroyVpsRequest {
                name: name.clone(),
                force,
                generation: 0,
            })
            .await?;
            println!("destroyed VPS {name}");
        }
        VpsCmd::Ls {
            output,
            node,
            status,
            label,
        } => {
            if node.is_some() || status.is_some() || label.is_some() {
                bail!("--node, --status and --label filter a cluster's VPSes: use --controller");
            }
            let vs = c.list_vps(pb::ListVpsRequest {}).await?.into_inner().vps;
            if output == Output::Json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&vs.iter().map(vps_json).collect::<Vec<_>>())?
                );
            } else {
                let rows = vs
                    .iter()
                    .map(|v| {
                        let s = v.spec.clone().unwrap_or_default();
                        let l = s.limits.unwrap_or_default();
                        let u = v.usage.unwrap_or_default();
                        vec![
                            s.name,
                            status_name(v.status).to_string(),
                            s.net
                                .map(|n| n.ip)
                                .filter(|i| !i.is_empty())
                                .unwrap_or_else(|| "-".into()),
                            human_cpu(l.cpu_millicores),
                            format!(
                                "{}/{}",
                                human_bytes(u.memory_bytes),
                                human_bytes(l.memory_bytes)
                            ),
                            format!("{}/{}", u.pids, l.pids),
                            match l.disk_bytes {
                                0 => human_bytes(u.disk_bytes),
                                q => format!("{}/{}", human_bytes(u.disk_bytes), human_bytes(q)),
                            },
                        ]
                    })
                    .collect::<Vec<_>>();
                table::print(
                    &["NAME", "STATUS", "IP", "CPU", "MEM", "PIDS", "DISK"],
                    &rows,
                );
            }
        }
        VpsCmd::Show { name, output } => {
            let v = c.get_vps(pb::GetVpsRequest { name }).await?.into_inner();
            let j = vps_json(&v);
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&j)?);
            } else {
                print_show(&v);
            }
        }
        VpsCmd::Exec {
            name,
            timeout,
            env,
            argv,
        } => {
            let mut s = c
                .exec(pb::ExecRequest {
                    name,
                    argv,
                    env,
                    stdin: Vec::new(),
                    timeout_secs: timeout,
                })
                .await?
                .into_inner();
            let mut code = 0;
            while let Some(m) = s.message().await? {
                match m.item {
                    Some(pb::exec_output::Item::Stdout(b)) => std::io::stdout().write_all(&b)?,
                    Some(pb::exec_output::Item::Stderr(b)) => std::io::stderr().write_all(&b)?,
                    Some(pb::exec_output::Item::ExitCode(c)) => code = c,
                    None => {}
                }
            }
            std::io::stdout().flush()?;
            return Ok(code);
        }
        VpsCmd::Logs { name, tail } => {
            let r = c
                .read_console(pb::ReadConsoleRequest {
                    name,
                    tail_bytes: tail,
                })
                .await?
                .into_inner();
            std::io::stdout().write_all(&r.data)?;
        }
        VpsCmd::Set {
            name,
            limits,
            autostart,
        } => {
            let req = limits_req(&name, &limits, autostart)?;
            if nothing_to_set(&req) {
                bail!("nothing to change: give --cpu, --cpu-weight, --memory, --swap, --pids, --disk or --autostart");
            }
            c.set_vps(req).await?;
            println!("updated VPS {name}");
        }
    }
    Ok(0)
}

fn print_show(v: &pb::Vps) {
    let s = v.spec.clone().unwrap_or_default();
    let l = s.limits.unwrap_or_default();
    let u = v.usage.unwrap_or_default();
    let n = s.net.clone().unwrap_or_default();
    let mut rows = vec![
        ("Name", s.name.clone()),
        ("Status", status_name(v.status).to_string()),
        ("Template", s.template.clone()),
        ("Isolation", isolation(&s)),
        ("Hostname", s.hostname.clone()),
        (
            "IP",
            if n.ip.is_empty() {
                "-".into()
            } else {
                format!("{}/{} via {}", n.ip, n.prefix_len, n.gateway)
            },
        ),
        (
            "MAC",
            if v.mac.is_empty() {
                "-".into()
            } else {
                v.mac.clone()
            },
        ),
        (
            "Init",
            format!("{} (stops on {})", s.init.join(" "), s.stop_signal),
        ),
        (
            "CPU",
            format!("{} (weight {})", human_cpu(l.cpu_millicores), l.cpu_weight),
        ),
        (
            "Memory",
            format!(
                "{} used, {} peak, limit {} + {} swap",
                human_bytes(u.memory_bytes),
                human_bytes(u.memory_peak_bytes),
                human_bytes(l.memory_bytes),
                human_bytes(l.swap_bytes)
            ),
        ),
        ("Pids", format!("{} of {}", u.pids, l.pids)),
        ("CPU time", format!("{:.2}s", u.cpu_nanos as f64 / 1e9)),
        ("OOM kills", u.oom_kills.to_string()),
        ("Disk", disk_line(u.disk_bytes, l.disk_bytes)),
        ("Autostart", s.autostart.to_string()),
        ("Reboots", v.reboots.to_string()),
    ];
    if v.init_pid > 0 {
        rows.push(("Init pid", v.init_pid.to_string()));
    }
    if !v.stop_reason.is_empty() {
        let how = if v.exit_signal != 0 {
            format!("signal {}", v.exit_signal)
        } else {
            format!("exit code {}", v.exit_code)
        };
        rows.push(("Last stop", format!("{} ({how})", v.stop_reason)));
    }
    for (k, val) in rows {
        println!("{k:<10} {val}");
    }
}

/// Streams a file (or stdin for "-") to a call: `first`, then the contents in
/// 1 MiB messages made by `chunk`. The task ends with the read's outcome.
fn stream_file<T: Send + 'static>(
    file: String,
    first: Option<T>,
    chunk: impl Fn(Vec<u8>) -> T + Send + 'static,
) -> (
    tokio_stream::wrappers::ReceiverStream<T>,
    tokio::task::JoinHandle<Result<()>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let reader = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        if let Some(f) = first {
            if tx.send(f).await.is_err() {
                return Ok(());
            }
        }
        let mut input: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if file == "-" {
            Box::new(tokio::io::stdin())
        } else {
            Box::new(
                tokio::fs::File::open(&file)
                    .await
                    .with_context(|| format!("opening {file}"))?,
            )
        };
        loop {
            let mut buf = vec![0u8; 1 << 20];
            let n = input.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            buf.truncate(n);
            if tx.send(chunk(buf)).await.is_err() {
                return Ok(());
            }
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), reader)
}
