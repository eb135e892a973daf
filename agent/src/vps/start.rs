//! Start: cgroup with limits, overlay rootfs, network namespace and veth, then
//! a monitor that clones init. Any failure undoes what was made.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::mount::{mount, MsFlags};
use tokio::io::AsyncBufReadExt;

use super::{is_mounted, Agent, VpsRecord};
use crate::error::{AgentError, IoContext, Result};
use crate::runtime::{write_atomic, LaunchConfig, LAUNCH_FILE, STATE_FILE, STOP_MARKER};

/// How long a monitor may take to report its init started.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(20);

impl Agent {
    #[tracing::instrument(skip(self))]
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<()> {
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        self.start_locked(name).await
    }

    pub(super) async fn start_locked(self: &Arc<Self>, name: &str) -> Result<()> {
        let rec = self.record(name)?;
        if self.status(name).is_running() {
            return Ok(());
        }
        // Whatever a previous run left (an init that died while no agent watched).
        self.teardown(name).await?;
        let res = self.bring_up(&rec).await;
        if res.is_ok() {
            self.watch(name);
        }
        if let Err(e) = &res {
            tracing::warn!(error = %e, "start failed; cleaning up");
            if let Err(e2) = self.teardown(name).await {
                tracing::error!(error = %e2, "cleanup after failed start");
            }
        }
        res
    }

    async fn bring_up(&self, rec: &VpsRecord) -> Result<()> {
        let c = &rec.config;
        let run = self.paths.vps_run(&c.name);
        std::fs::create_dir_all(&run).at("creating", &run)?;
        for f in [STOP_MARKER, STATE_FILE] {
            let _ = std::fs::remove_file(run.join(f));
        }
        let lower = crate::template::rootfs(&self.paths, &c.template);
        if !lower.is_dir() {
            return Err(AgentError::FailedPrecondition(format!(
                "template {:?} of VPS {} is missing on this node",
                c.template, c.name
            )));
        }
        let cg = self.cgroup(&c.name);
        let limits = c.limits.clone();
        let cg2 = cg.clone();
        blocking(move || cg2.create(&limits)).await?;

        let vdir = self.paths.vps(&c.name);
        let rootfs = vdir.join("rootfs");
        if !is_mounted(&rootfs) {
            let opts = format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                vdir.join("upper").display(),
                vdir.join("work").display()
            );
            mount(
                Some("overlay"),
                &rootfs,
                Some("overlay"),
                MsFlags::empty(),
                Some(opts.as_str()),
            )
            .map_err(|e| {
                AgentError::io(
                    format!("mounting the overlay rootfs at {}", rootfs.display()),
                    e.into(),
                )
            })?;
        }

        let netns = run.join("netns");
        crate::net::create_netns(&netns)?;
        let mut host_veth = None;
        if let Some(net) = &c.net {
            let name = crate::net::host_veth_name(&self.instance, &c.name);
            let host = crate::net::Netlink::host()?;
            crate::net::setup_vps_network(&host, &self.cfg.bridge, &netns, &name, net).await?;
            host_veth = Some(name);
        }
        let launch = LaunchConfig {
            name: c.name.clone(),
            rootfs: rootfs.clone(),
            hostname: c.hostname.clone(),
            init: c.init.clone(),
            netns: Some(netns),
            cgroup_procs: cg.procs_files(),
            host_veth,
        };
        let json =
            serde_json::to_vec_pretty(&launch).map_err(|e| AgentError::Internal(e.to_string()))?;
        write_atomic(&run.join(LAUNCH_FILE), &json).at("writing", run.join(LAUNCH_FILE))?;
        self.spawn_monitor(&run).await
    }

    async fn spawn_monitor(&self, run: &std::path::Path) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run.join("monitor.log"))
            .at("opening", run.join("monitor.log"))?;
        let mut child = tokio::process::Command::new(&self.cfg.self_exe)
            .arg("monitor")
            .arg(run)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| {
                AgentError::io(
                    format!("starting the monitor ({})", self.cfg.self_exe.display()),
                    e,
                )
            })?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| AgentError::Internal("monitor has no stdout".into()))?;
        let mut line = String::new();
        let read = tokio::time::timeout(
            LAUNCH_TIMEOUT,
            tokio::io::BufReader::new(stdout).read_line(&mut line),
        )
        .await;
        // The monitor outlives this call; tokio reaps it when it exits.
        drop(child);
        match read {
            Ok(Ok(_)) if line.starts_with("ok ") => {
                tracing::info!(init_pid = line[3..].trim(), "started");
                Ok(())
            }
            Ok(Ok(_)) if line.starts_with("err ") => Err(AgentError::FailedPrecondition(format!(
                "VPS init failed to start: {}",
                line[4..].trim()
            ))),
            Ok(Ok(_)) => Err(AgentError::Internal(format!(
                "the monitor exited without reporting; see {}",
                run.join("monitor.log").display()
            ))),
            Ok(Err(e)) => Err(AgentError::io("reading the monitor's report", e)),
            Err(_) => Err(AgentError::Internal(format!(
                "VPS init did not start within {LAUNCH_TIMEOUT:?}"
            ))),
        }
    }

    /// Releases a stopped VPS's kernel objects: veth, netns, overlay mount,
    /// cgroup. Keeps its files, its state and console log. Idempotent.
    pub(super) async fn teardown(&self, name: &str) -> Result<()> {
        if self.status(name).is_running() {
            return Err(AgentError::FailedPrecondition(format!(
                "VPS {name} is running"
            )));
        }
        let run = self.paths.vps_run(name);
        if let Some(launch) = std::fs::read(run.join(LAUNCH_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<LaunchConfig>(&b).ok())
        {
            if let Some(v) = launch.host_veth {
                let host = crate::net::Netlink::host()?;
                crate::net::remove_veth(&host, &v).await?;
            }
        }
        crate::net::remove_netns(&run.join("netns"))?;
        let rootfs: PathBuf = self.paths.vps(name).join("rootfs");
        if is_mounted(&rootfs) {
            nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH).map_err(|e| {
                AgentError::io(format!("unmounting {}", rootfs.display()), e.into())
            })?;
        }
        let cg = self.cgroup(name);
        if cg.exists() {
            // Keep the OOM count of the run that ended, then drop the cgroup.
            let oom = cg.usage().oom_kills;
            if let Some(mut st) = crate::runtime::RuntimeState::read(&run) {
                st.oom_kills = oom;
                let _ = st.write(&run);
            }
            blocking(move || cg.destroy()).await?;
        }
        let _ = std::fs::remove_file(run.join(LAUNCH_FILE));
        Ok(())
    }
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Internal(format!("worker thread: {e}")))?
}
