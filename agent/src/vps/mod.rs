//! The VPS lifecycle, one file per step. [`Agent`] holds what every step needs.

mod adopt;
mod checkpoint;
mod console;
mod create;
mod destroy;
pub(crate) mod disk;
mod exec;
mod migrate_in;
mod migrate_out;
mod migrate_recover;
mod postcopy;
mod precopy;
mod query;
mod ram_images;
mod restore;
mod set;
mod start;
mod stop;

pub use exec::ExecStream;
pub use migrate_out::EventStream;
pub use stop::DEFAULT_STOP_TIMEOUT;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::cgroup::{Layout, VpsCgroup};
use crate::error::{AgentError, IoContext, Result};
use crate::paths::Paths;
use crate::runtime::{write_atomic, Phase, RuntimeState, STOP_MARKER};
use crate::spec::{Capacity, VpsConfig};
use crate::template::ImportLimits;

/// How the agent was started.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub bridge: String,
    pub bridge_cidr: ipnet::Ipv4Net,
    /// LAN interface plugged into the bridge (VPSes reachable across nodes).
    pub uplink: Option<String>,
    /// Static busybox for the built-in template.
    pub busybox: PathBuf,
    /// This binary, re-executed as the monitor and the exec helper.
    pub self_exe: PathBuf,
    pub import_limits: ImportLimits,
    /// CRIU binary (probed at start).
    pub criu: PathBuf,
    /// Expedite the kernel's RCU grace periods while a VPS is frozen (see
    /// [`crate::rcu`]).
    pub expedite_rcu: bool,
    /// How many outgoing moves may have their VPS frozen at once (0: no
    /// limit); see `Source::freeze_turns`.
    pub freeze_turns: usize,
    /// The largest checkpoint archive a restore may upload.
    pub max_upload_bytes: u64,
    /// The only directory `ImportTemplatePath` reads from (None:
    /// `<data_dir>/import`).
    pub import_dir: Option<PathBuf>,
    /// The address other nodes and controllers reach this node's daemons at
    /// (None: a unix socket or no IP known): the host firewall keeps the
    /// VPS network out of its network.
    pub management_ip: Option<std::net::IpAddr>,
    /// Keep VPSes off the host's own addresses (see [`crate::net::firewall`]);
    /// None: no firewall (warned at start).
    pub host_firewall: Option<crate::net::firewall::HostFirewall>,
    /// This node's credentials (mutual TLS), for the processes that speak
    /// for it without the agent (the page tunnel); None: `--insecure-dev`.
    pub credentials: Option<PathBuf>,
}

/// The persistent record of a VPS (`vps/<name>/config.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VpsRecord {
    pub config: VpsConfig,
    pub created_unix: i64,
}

pub struct Agent {
    pub cfg: AgentConfig,
    pub paths: Paths,
    /// Distinguishes this agent's cgroups from other agents' on the same kernel.
    pub instance: String,
    pub layout: Layout,
    pub capacity: Capacity,
    /// The CRIU binary and what it can do on this kernel.
    pub criu: crate::criu::Criu,
    /// Where this node's post-copy page tunnels listen: the management
    /// address when it is an IPv4 address off the bridge, else the bridge's.
    pub tunnel_ip: std::net::Ipv4Addr,
    /// The cgroup yard kept for CRIU (see [`crate::criu::yard`]); None: CRIU
    /// mounts its own on every run.
    cgyard: Option<PathBuf>,
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// VPSes leaving this node: name -> migration id.
    migrating: std::sync::Mutex<HashMap<String, String>>,
    /// Turns at freezing for outgoing moves (see `Source::freeze_turns`).
    pub(crate) freeze_turns: Arc<tokio::sync::Semaphore>,
    /// VPSes arriving from another node, by migration id.
    incoming: tokio::sync::Mutex<HashMap<String, migrate_in::Incoming>>,
    /// Migration ids aborted before their prepare arrived (the newest
    /// [`migrate_in`]'s ABORTED_KEPT): such a prepare is refused.
    aborted: std::sync::Mutex<std::collections::VecDeque<String>>,
    /// Migration ids this node finished as committed (the newest
    /// ABORTED_KEPT): a source's late finish of one is answered Ok.
    committed: std::sync::Mutex<std::collections::VecDeque<(String, std::time::Instant)>>,
    /// Held while a create checks names and addresses, so two creates cannot
    /// both take the same one.
    create_lock: tokio::sync::Mutex<()>,
}

/// Makes `d` (and its missing parents) and leaves it 0700, owned by root.
fn private_dir(d: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(d).at("creating", d)?;
    let meta = std::fs::metadata(d).at("reading", d)?;
    if !meta.is_dir() {
        return Err(AgentError::invalid(
            "data_dir",
            format!("{} is not a directory", d.display()),
        ));
    }
    if meta.permissions().mode() & 0o777 != 0o700 {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).at("chmod 0700", d)?;
    }
    Ok(())
}

/// Finds where the management address lives, installs the host firewall
/// and returns where page tunnels listen.
async fn guard_host(host: &crate::net::Netlink, cfg: &AgentConfig) -> Result<std::net::Ipv4Addr> {
    let bridge_index = host.link_index(&cfg.bridge).await?;
    let mut management_net = None;
    let mut tunnel_ip = cfg.bridge_cidr.addr();
    match cfg.management_ip {
        Some(ip) if ip.is_loopback() => {}
        Some(ip) if ip.is_unspecified() => tracing::warn!(
            "the agent listens on every address, the VPS bridge's included: VPSes on other \
             nodes can reach it; listen on a management address (see docs/security.md)"
        ),
        Some(ip) => match crate::net::find_address(host, ip).await? {
            Some((index, _)) if Some(index) == bridge_index => tracing::warn!(
                address = %ip,
                "the management address is on the VPS bridge: VPSes on other nodes can reach \
                 the daemons; give them an address off the bridge (see docs/security.md)"
            ),
            Some((_, net)) => {
                management_net = Some(net);
                if let std::net::IpAddr::V4(v4) = ip {
                    tunnel_ip = v4;
                }
            }
            None => tracing::warn!(
                address = %ip,
                "the management address is not on any interface of this host"
            ),
        },
        None => {}
    }
    match &cfg.host_firewall {
        Some(fw) => {
            let rules = crate::net::firewall::Rules {
                bridge: cfg.bridge.clone(),
                management_net,
                allow: fw.allow.clone(),
            };
            let table = crate::net::firewall::table_name(&rules.bridge);
            let allowed: Vec<String> = fw.allow.iter().map(|a| a.to_string()).collect();
            start::blocking(move || rules.apply()).await?;
            tracing::info!(
                %table,
                management_net = ?management_net,
                ?allowed,
                "host firewall: VPSes may not reach this host's addresses"
            );
        }
        None => {
            // An earlier run's tables would drop every new VPS port (none
            // would be in its map): off means gone.
            let bridge = cfg.bridge.clone();
            if let Err(e) = start::blocking(move || crate::net::firewall::remove(&bridge)).await {
                tracing::debug!(error = %e, "no host firewall tables to remove");
            }
            tracing::warn!(
                "--host-firewall=false: VPSes can reach every service on this host's addresses"
            )
        }
    }
    Ok(tunnel_ip)
}

impl Agent {
    /// Prepares directories, the cgroup layout, the bridge and the busybox
    /// template, then finds the VPSes left running by an earlier agent.
    pub async fn open(cfg: AgentConfig) -> Result<Arc<Agent>> {
        let turns = match cfg.freeze_turns {
            0 => tokio::sync::Semaphore::MAX_PERMITS,
            n => n,
        };
        for p in [&cfg.data_dir, &cfg.run_dir] {
            let s = p.to_string_lossy();
            if !p.is_absolute() || s.contains(',') || s.contains(':') {
                return Err(AgentError::invalid(
                    "data_dir",
                    format!("{s:?} must be an absolute path without ',' or ':'"),
                ));
            }
        }
        // Host users never reach a VPS's files (a setuid binary planted in
        // one would run for them) nor its run state: both roots are root's.
        for d in [&cfg.data_dir, &cfg.run_dir] {
            private_dir(d)?;
        }
        let paths = Paths::new(cfg.data_dir.clone(), cfg.run_dir.clone());
        for d in [
            paths.templates(),
            paths.vps_root(),
            paths.staging(),
            paths.run_dir.clone(),
        ] {
            std::fs::create_dir_all(&d).at("creating", &d)?;
        }
        let import_dir = cfg.import_dir.clone().unwrap_or_else(|| paths.import());
        if !import_dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&import_dir)
                .at("creating", &import_dir)?;
        }
        // Leftovers of interrupted imports.
        if let Ok(rd) = std::fs::read_dir(paths.staging()) {
            for e in rd.flatten() {
                let _ = crate::template::remove_tree(&e.path());
            }
        }
        let layout = Layout::detect()?;
        let capacity = node_capacity();
        let instance = Paths::instance_id(&cfg.run_dir);
        crate::template::ensure_busybox(&paths, &cfg.busybox)?;
        let host = crate::net::Netlink::host()?;
        crate::net::ensure_bridge(&host, &cfg.bridge, cfg.bridge_cidr).await?;
        if let Some(up) = &cfg.uplink {
            crate::net::attach_uplink(&host, &cfg.bridge, up).await?;
        }
        let tunnel_ip = guard_host(&host, &cfg).await?;
        let criu_path = cfg.criu.clone();
        let criu = tokio::task::spawn_blocking(move || {
            crate::criu::uffd_grant::sweep();
            crate::criu::Criu::probe(criu_path)
        })
        .await
        .map_err(|e| AgentError::Internal(format!("criu probe: {e}")))?;
        match &criu.info {
            Ok(i) => tracing::info!(
                version = %i.version,
                path = %i.path.display(),
                lazy_pages = i.lazy_pages,
                dirty_tracking = i.mem_track,
                "criu ready"
            ),
            Err(e) => tracing::warn!(
                "checkpoint and migration unavailable: {e}; {}",
                crate::criu::INSTALL_HINT
            ),
        }
        let cgyard = match criu.info {
            Ok(_) => match tokio::task::spawn_blocking(crate::criu::yard::prepare).await {
                Ok(Ok(y)) => Some(y),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "no cgroup yard for CRIU: each dump and restore mounts its own");
                    None
                }
                Err(e) => return Err(AgentError::Internal(format!("cgroup yard: {e}"))),
            },
            Err(_) => None,
        };
        let agent = Arc::new(Agent {
            criu,
            tunnel_ip,
            cgyard,
            cfg,
            paths,
            instance,
            layout,
            capacity,
            locks: Default::default(),
            migrating: Default::default(),
            freeze_turns: Arc::new(tokio::sync::Semaphore::new(turns)),
            incoming: Default::default(),
            aborted: Default::default(),
            committed: Default::default(),
            create_lock: Default::default(),
        });
        crate::rcu::recover(&agent.paths.run_dir);
        agent.sweep_work();
        ram_images::ensure_root();
        agent.sweep_ram();
        agent.sweep_incoming().await;
        agent.adopt().await?;
        agent.sync_port_filters().await?;
        agent.recover_migrations().await;
        Ok(agent)
    }

    /// Gives a VPS's new host-side port its identity filter (see
    /// [`crate::net::firewall`]); nothing when the firewall is off.
    pub(crate) async fn filter_port(&self, veth: &str, net: &crate::spec::NetConfig) -> Result<()> {
        if self.cfg.host_firewall.is_none() {
            return Ok(());
        }
        let bridge = self.cfg.bridge.clone();
        let port = crate::net::firewall::Port {
            name: veth.to_string(),
            mac: net.mac,
            ip: net.ip,
        };
        start::blocking(move || crate::net::firewall::add_port(&bridge, &port)).await
    }

    /// Drops a removed port's filter.
    pub(crate) async fn unfilter_port(&self, veth: &str) -> Result<()> {
        if self.cfg.host_firewall.is_none() {
            return Ok(());
        }
        let bridge = self.cfg.bridge.clone();
        let veth = veth.to_string();
        start::blocking(move || crate::net::firewall::remove_port(&bridge, &veth)).await
    }

    /// At start: the port filters are those of the VPS ports that exist.
    async fn sync_port_filters(&self) -> Result<()> {
        if self.cfg.host_firewall.is_none() {
            return Ok(());
        }
        let host = crate::net::Netlink::host()?;
        let mut ports = Vec::new();
        for rec in self.records() {
            let (Some(veth), Some(net)) = (self.host_veth(&rec.config.name), &rec.config.net)
            else {
                continue;
            };
            if host.link_index(&veth).await?.is_some() {
                ports.push(crate::net::firewall::Port {
                    name: veth,
                    mac: net.mac,
                    ip: net.ip,
                });
            }
        }
        let bridge = self.cfg.bridge.clone();
        start::blocking(move || crate::net::firewall::sync_ports(&bridge, &ports)).await
    }

    pub(crate) fn lock_for(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(name.to_string()).or_default().clone()
    }

    pub fn migrating_id(&self, name: &str) -> Option<String> {
        let m = self.migrating.lock().unwrap_or_else(|p| p.into_inner());
        m.get(name).cloned()
    }

    /// Held while a VPS is frozen: the kernel's RCU grace periods are
    /// expedited meanwhile, unless the operator turned that off.
    pub(crate) fn freeze_window(&self) -> Option<crate::rcu::Guard> {
        self.cfg
            .expedite_rcu
            .then(|| crate::rcu::expedite(&self.paths.run_dir))
    }

    pub fn cgroup(&self, name: &str) -> VpsCgroup {
        VpsCgroup::new(self.layout.clone(), &self.instance, name)
    }

    pub fn record(&self, name: &str) -> Result<VpsRecord> {
        crate::spec::validate_name("name", name)?;
        let p = self.paths.vps(name).join("config.json");
        let bytes = std::fs::read(&p).map_err(|_| AgentError::not_found("VPS", name))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| AgentError::Internal(format!("corrupt {}: {e}", p.display())))
    }

    pub fn save_record(&self, rec: &VpsRecord) -> Result<()> {
        let p = self.paths.vps(&rec.config.name).join("config.json");
        let json =
            serde_json::to_vec_pretty(rec).map_err(|e| AgentError::Internal(e.to_string()))?;
        write_atomic(&p, &json).at("writing", &p)
    }

    pub fn records(&self) -> Vec<VpsRecord> {
        let mut out: Vec<VpsRecord> = std::fs::read_dir(self.paths.vps_root())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| !e.path().join(migrate_in::INCOMING_MARKER).exists())
            .filter_map(|e| e.file_name().to_str().and_then(|n| self.record(n).ok()))
            .collect();
        out.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        out
    }

    /// Refuses a controller's call that carries an older generation than the
    /// one this agent holds for the VPS (a newer one is recorded); generation
    /// 0 (node-local use) passes that check. Any call on a VPS going out by a
    /// migration is refused until the migration ends.
    pub fn fence(&self, name: &str, generation: u64) -> Result<()> {
        // A VPS going out by a migration is the migration's until it ends
        // (it removes the copy here or resumes it): a destroy, stop or
        // start now would race it.
        if let Some(id) = self.migrating_id(name) {
            return Err(AgentError::FailedPrecondition(format!(
                "VPS {name} is migrating ({id}); try again once the move has ended"
            )));
        }
        if generation == 0 {
            return Ok(());
        }
        let mut rec = self.record(name)?;
        if rec.config.generation > generation {
            return Err(AgentError::FailedPrecondition(format!(
                "stale request for VPS {name}: generation {generation} is older than {} held here",
                rec.config.generation
            )));
        }
        if rec.config.generation < generation {
            rec.config.generation = generation;
            self.save_record(&rec)?;
        }
        Ok(())
    }

    /// The VPS's runtime status as of now.
    /// The host pid of running VPS `name`'s init; `for_what` (e.g. "can be
    /// checkpointed") completes the error when it is not running.
    pub(crate) fn running_init(&self, name: &str, for_what: &str) -> Result<i32> {
        match self.status(name) {
            Status::Running(s) => Ok(s.init_pid),
            _ => Err(AgentError::FailedPrecondition(format!(
                "VPS {name} is not running; only a running VPS {for_what}"
            ))),
        }
    }

    pub fn status(&self, name: &str) -> Status {
        let run = self.paths.vps_run(name);
        let Some(state) = RuntimeState::read(&run) else {
            return Status::Stopped(None);
        };
        match state.phase {
            Phase::Running | Phase::Starting if state.init_alive() => {
                if run.join(STOP_MARKER).exists() {
                    Status::Stopping(state)
                } else {
                    Status::Running(state)
                }
            }
            Phase::Running | Phase::Starting if state.monitor_alive() => Status::Running(state),
            _ => Status::Stopped(Some(state)),
        }
    }
}

#[derive(Debug)]
pub enum Status {
    Stopped(Option<RuntimeState>),
    Running(RuntimeState),
    Stopping(RuntimeState),
}

impl Status {
    pub fn is_running(&self) -> bool {
        !matches!(self, Status::Stopped(_))
    }
}

/// The node's CPU (millicores) and memory.
pub fn node_capacity() -> Capacity {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as u32;
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    Capacity {
        cpu_millicores: cpus * 1000,
        memory_bytes: mem,
    }
}

pub(crate) fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4).map(unescape_mount) == Some(want.to_string()))
}

fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

pub(crate) fn now_unix() -> i64 {
    crate::template::unix_now()
}
