//! Start: cgroup with limits, overlay rootfs, network namespace and veth, then
//! a monitor that clones init. Any failure undoes what was made.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::mount::{mount, MsFlags};
use tokio::io::AsyncBufReadExt;

use super::{is_mounted, Agent, VpsRecord};
use crate::criu::restore::RestoreRequest;
use crate::error::{AgentError, IoContext, Result};
use crate::runtime::{
    write_atomic, LaunchConfig, RestoreConfig, LAUNCH_FILE, RESTORE_FILE, STATE_FILE, STOP_MARKER,
};

/// How long a monitor may take to report its init started.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(20);

impl Agent {
    #[tracing::instrument(skip(self))]
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<()> {
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        self.refuse_arriving(name)?;
        self.start_locked(name).await
    }

    pub(super) async fn start_locked(self: &Arc<Self>, name: &str) -> Result<()> {
        let rec = self.record(name)?;
        if self.status(name).is_running() {
            return Ok(());
        }
        // Whatever a previous run left (an init that died while no agent watched).
        self.teardown(name).await?;
        let res = self.bring_up(&rec, None).await.map(|_| ());
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

    /// Makes the VPS's kernel objects and starts its monitor. With `resume`,
    /// init comes from CRIU images instead of a fresh exec; with `resume.hold`,
    /// the restored tree waits (see [`Held`]) and the caller must let it go.
    pub(crate) async fn bring_up(
        &self,
        rec: &VpsRecord,
        resume: Option<&Resume>,
    ) -> Result<Option<Held>> {
        self.bring_up_gated(rec, resume, std::future::ready(Ok(())))
            .await
            .map(|(held, ())| held)
    }

    /// [`Agent::bring_up`], which awaits `gate` (running meanwhile) after the
    /// kernel objects are made and before the monitor starts, and returns its
    /// output: a post-copy's lazy-pages daemon starts beside them so.
    pub(crate) async fn bring_up_gated<T>(
        &self,
        rec: &VpsRecord,
        resume: Option<&Resume>,
        gate: impl std::future::Future<Output = Result<T>>,
    ) -> Result<(Option<Held>, T)> {
        let c = &rec.config;
        // A restore: the VPS is frozen until it runs (or is held).
        let _window = resume.and_then(|_| self.freeze_window());
        // Before any kernel object is made: a restore needs a working CRIU.
        let criu = match resume {
            Some(_) => Some(self.criu_path()?),
            None => None,
        };
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
        let limits = match resume {
            Some(r) => restore_limits(&c.limits, &r.images),
            None => c.limits.clone(),
        };
        let cg2 = cg.clone();
        blocking(move || cg2.create(&limits)).await?;

        let vdir = self.paths.vps(&c.name);
        super::disk::mount(&vdir, c.id_base)?;
        let rootfs = vdir.join("rootfs");
        let netns = run.join("netns");
        // Unprivileged: the VPS's user namespace first; its netns and the
        // idmapped view of the template belong to it.
        let userns = match c.id_base {
            Some(base) => {
                let u = run.join("userns");
                // Off the runtime: it clones and waits for the child.
                let (u2, n2) = (u.clone(), netns.clone());
                blocking(move || crate::userns::create(&u2, &n2, base)).await?;
                Some(u)
            }
            None => {
                crate::net::create_netns(&netns)?;
                None
            }
        };
        if !is_mounted(&rootfs) {
            let lowerdir = match &userns {
                Some(u) => {
                    let view = vdir.join("lower");
                    std::fs::create_dir_all(&view).at("creating", &view)?;
                    if !is_mounted(&view) {
                        crate::userns::mount_idmapped(&lower, &view, u)?;
                    }
                    view
                }
                None => lower.clone(),
            };
            let opts = format!(
                "lowerdir={},upperdir={},workdir={}",
                lowerdir.display(),
                super::disk::upper(&vdir).display(),
                super::disk::work(&vdir).display()
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

        let mut host_veth = None;
        // A restore of an unprivileged VPS: CRIU remakes its user namespace
        // and, owned by it, its netns from the images; the VPS's eth0 waits
        // on the host for CRIU to move it in (see crate::criu::restore).
        let restore_moves_eth0 = resume.is_some() && userns.is_some();
        if let Some(net) = &c.net {
            let name = crate::net::host_veth_name(&self.instance, &c.name);
            let host = crate::net::Netlink::host()?;
            // A held restore keeps its link down until it may run (go).
            let host_up = !resume.is_some_and(|r| r.hold);
            if restore_moves_eth0 {
                crate::net::setup_unplaced_veth(&host, &self.cfg.bridge, &name, net, host_up)
                    .await?;
            } else {
                crate::net::setup_vps_network(&host, &self.cfg.bridge, &netns, &name, net, host_up)
                    .await?;
            }
            if let Err(e) = self.filter_port(&name, net).await {
                let _ = crate::net::remove_veth(&host, &name).await;
                return Err(e);
            }
            host_veth = Some(name);
        }
        let launch = LaunchConfig {
            name: c.name.clone(),
            rootfs: rootfs.clone(),
            hostname: c.hostname.clone(),
            init: c.init.clone(),
            netns: Some(netns),
            userns,
            cgroup_procs: cg.procs_files(),
            host_veth,
        };
        let json =
            serde_json::to_vec_pretty(&launch).map_err(|e| AgentError::Internal(e.to_string()))?;
        write_atomic(&run.join(LAUNCH_FILE), &json).at("writing", run.join(LAUNCH_FILE))?;
        let _ = std::fs::remove_file(run.join(RESTORE_FILE));
        if let (Some(r), Some(criu)) = (resume, criu) {
            let cfg = RestoreConfig {
                criu,
                request: RestoreRequest {
                    images: r.images.clone(),
                    root: rootfs,
                    netns: launch.netns.clone().unwrap_or_default(),
                    userns: launch.userns.clone(),
                    eth0_link: launch
                        .host_veth
                        .as_deref()
                        .filter(|_| restore_moves_eth0)
                        .map(crate::net::unplaced_peer_name),
                    console_key: r.console_key.clone(),
                    cg_roots: cg.criu_roots(),
                    log_level: criu_log_level(),
                    lazy: r.lazy,
                    cgroup_yard: self.criu_yard(),
                },
                hold: r.hold,
            };
            let json =
                serde_json::to_vec_pretty(&cfg).map_err(|e| AgentError::Internal(e.to_string()))?;
            write_atomic(&run.join(RESTORE_FILE), &json).at("writing", run.join(RESTORE_FILE))?;
            let gated = gate.await?;
            let held = self.spawn_monitor(&run, r.hold).await?;
            if held.is_none() {
                self.settle_limits(&c.name, &c.limits).await;
            }
            return Ok((held, gated));
        }
        let gated = gate.await?;
        Ok((self.spawn_monitor(&run, false).await?, gated))
    }

    /// Once a restored VPS runs: its own limits, in place of the restore's
    /// (see [`restore_limits`]). Lowering the memory limit makes the kernel
    /// drop the images' page cache; if it cannot get under (the VPS's own
    /// memory alone is above it), the VPS keeps the raised limit, logged.
    pub(crate) async fn settle_limits(&self, name: &str, limits: &crate::spec::LimitsConfig) {
        let cg = self.cgroup(name);
        let l = limits.clone();
        if let Err(e) = blocking(move || cg.apply(&l)).await {
            tracing::warn!(vps = %name, error = %e, "the restored VPS keeps the memory limit raised for its restore");
        }
    }

    async fn spawn_monitor(&self, run: &std::path::Path, hold: bool) -> Result<Option<Held>> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run.join("monitor.log"))
            .at("opening", run.join("monitor.log"))?;
        let mut child = tokio::process::Command::new(&self.cfg.self_exe)
            .arg("monitor")
            .arg(run)
            .stdin(if hold { Stdio::piped() } else { Stdio::null() })
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
        let mut reader = tokio::io::BufReader::new(stdout);
        let mut line = String::new();
        let read = tokio::time::timeout(LAUNCH_TIMEOUT, reader.read_line(&mut line)).await;
        if hold && matches!(read, Ok(Ok(_))) && line.trim() == "held" {
            let stdin = child
                .stdin
                .take()
                .ok_or_else(|| AgentError::Internal("monitor has no stdin".into()))?;
            return Ok(Some(Held {
                child,
                stdin,
                reader,
                run: run.to_path_buf(),
            }));
        }
        // The monitor outlives this call; tokio reaps it when it exits.
        drop(child);
        monitor_report(read, &line, run).map(|_| None)
    }
}

/// The limits a restore runs under. CRIU restores the VPS's memory inside the
/// VPS's memory cgroup and briefly needs more than the VPS itself (its
/// premapped copy, the images' page cache): a 1.7 GiB VPS peaked at 2.07 GiB
/// under a 2.125 GiB limit. At the limit the kernel's OOM killer hits a
/// half-restored tree, and CRIU then waits for the killed task for ever. So
/// the memory limit is raised by the images' size (plus 64 MiB) until the
/// VPS runs ([`Agent::settle_limits`]).
fn restore_limits(
    l: &crate::spec::LimitsConfig,
    images: &std::path::Path,
) -> crate::spec::LimitsConfig {
    let images_bytes = ferry_migrate::tree::files_bytes(images);
    let mut r = l.clone();
    if r.memory_bytes > 0 {
        r.memory_bytes = r
            .memory_bytes
            .saturating_add(images_bytes)
            .saturating_add(64 << 20);
    }
    r
}

/// The monitor's first line after a launch or restore: `ok PID` or `err MESSAGE`.
fn monitor_report(
    read: std::result::Result<std::io::Result<usize>, tokio::time::error::Elapsed>,
    line: &str,
    run: &std::path::Path,
) -> Result<()> {
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
            "VPS init did not report running in time; see {}",
            run.join("monitor.log").display()
        ))),
    }
}

impl Agent {
    /// Releases a stopped VPS's kernel objects: veth, netns, overlay mount,
    /// cgroup. Keeps its files, its state and console log. Idempotent.
    pub(crate) async fn teardown(&self, name: &str) -> Result<()> {
        if self.status(name).is_running() {
            return Err(AgentError::FailedPrecondition(format!(
                "VPS {name} is running"
            )));
        }
        let run = self.paths.vps_run(name);
        if let Some(v) = self.host_veth(name) {
            let host = crate::net::Netlink::host()?;
            crate::net::remove_veth(&host, &v).await?;
            self.unfilter_port(&v).await?;
        }
        crate::net::remove_netns(&run.join("netns"))?;
        crate::net::remove_netns(&run.join("userns"))?;
        // The overlay, then the idmapped template view under it.
        for dir in ["rootfs", "lower"] {
            let p: PathBuf = self.paths.vps(name).join(dir);
            if is_mounted(&p) {
                nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH)
                    .map_err(|e| AgentError::io(format!("unmounting {}", p.display()), e.into()))?;
            }
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

/// Where a start from CRIU images comes from.
pub(crate) struct Resume {
    pub images: PathBuf,
    pub console_key: String,
    pub hold: bool,
    /// Post-copy: a `criu lazy-pages` daemon serves the memory.
    pub lazy: bool,
}

/// A restored VPS waiting at CRIU's post-restore: nothing in it has run and its
/// network is still locked. `go` lets it run; dropping it (or `abort`) makes
/// CRIU kill the tree.
pub(crate) struct Held {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    reader: tokio::io::BufReader<tokio::process::ChildStdout>,
    run: PathBuf,
}

impl Held {
    /// Lets it run; `alive` says whether its restored tree is still there.
    pub async fn go(mut self, alive: impl Fn() -> bool) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        self.stdin
            .write_all(b"go\n")
            .await
            .map_err(|e| AgentError::io("telling the monitor to resume", e))?;
        let mut line = String::new();
        // Past the decision there is no going back, so this waits long: CRIU
        // finishing a restore of gigabytes can take a while under load. But
        // not for a tree that is gone: CRIU does not always notice its root
        // die under it (it waits for ever).
        let gone = async {
            let mut missing = 0;
            loop {
                tokio::time::sleep(TREE_CHECK).await;
                missing = if alive() { 0 } else { missing + 1 };
                if missing >= 2 {
                    return;
                }
            }
        };
        let read = tokio::select! {
            r = tokio::time::timeout(GO_TIMEOUT, self.reader.read_line(&mut line)) => r,
            () = gone => {
                return Err(self.kill_with(AgentError::Internal(
                    "the restored VPS died before it ran (its processes were killed)".into(),
                )).await);
            }
        };
        let res = monitor_report(read, &line, &self.run);
        match res {
            Ok(()) => Ok(()),
            Err(e) => Err(self.kill_with(e).await),
        }
    }

    /// A restore that never finishes (its tree killed under it, CRIU stuck)
    /// must not leave the monitor and CRIU (tied to it) behind.
    async fn kill_with(mut self, e: AgentError) -> AgentError {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        e
    }

    pub async fn abort(mut self) {
        use tokio::io::AsyncWriteExt;
        let _ = self.stdin.write_all(b"abort\n").await;
        let mut line = String::new();
        let _ = tokio::time::timeout(LAUNCH_TIMEOUT, self.reader.read_line(&mut line)).await;
    }
}

/// How long a held VPS may take to run once told to go.
const GO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
/// How often a VPS told to go is checked for its restored tree.
const TREE_CHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// CRIU's log level: FERRY_CRIU_LOG_LEVEL (0-4), default 2 (warnings); 4 for debugging.
pub(crate) fn criu_log_level() -> i32 {
    std::env::var("FERRY_CRIU_LOG_LEVEL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Internal(format!("worker thread: {e}")))?
}
