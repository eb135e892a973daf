//! Restoring a dumped VPS tree into prepared kernel objects: the agent has
//! mounted the rootfs, made the cgroups (with limits) and the network
//! namespace (with the VPS's address and MAC) before this runs.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::dump::{dev_key, NETNS_KEY};
use super::rpc::{CgMode, CgroupRoot, InheritFd, NetworkLock, Opts, Req, ReqType};
use super::swrk::{Swrk, FIRST_PASSED_FD};
use super::CriuError;

pub const RESTORE_LOG: &str = "restore.log";

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RestoreRequest {
    pub images: PathBuf,
    /// The mounted rootfs on this host; becomes the VPS's `/`.
    pub root: PathBuf,
    /// The prepared network namespace to restore into (privileged VPSes).
    pub netns: PathBuf,
    /// An unprivileged VPS: CRIU remakes its user namespace and the netns
    /// it owns from the images, and binds the host's device nodes back in.
    /// Once they exist, this file (the user namespace) and `netns` are bound
    /// to them, for the agent and for init's restarts.
    #[serde(default)]
    pub userns: Option<PathBuf>,
    /// With `userns`: the host link CRIU moves into the netns as eth0.
    #[serde(default)]
    pub eth0_link: Option<String>,
    /// `pipe:[INODE]` of the dumped console pipe.
    pub console_key: String,
    /// (controller, path) for every hierarchy: where the VPS's cgroups are on this host.
    pub cg_roots: Vec<(Option<String>, String)>,
    pub log_level: i32,
    /// Post-copy: memory comes from the `criu lazy-pages` daemon already
    /// running on the images dir, not from the images.
    #[serde(default)]
    pub lazy: bool,
    /// Every cgroup hierarchy, mounted (see [`super::yard`]); None: CRIU
    /// mounts them itself.
    #[serde(default)]
    pub cgroup_yard: Option<PathBuf>,
}

/// Runs the restore. The restored init becomes a child of the caller
/// (`rst_sibling`), which must be a child subreaper. `on_notify` sees CRIU's
/// actions; answering false to `post-restore` makes CRIU kill the restored
/// tree before it ever runs. Returns init's host pid.
pub fn restore(
    criu: &Path,
    req: &RestoreRequest,
    console: BorrowedFd<'_>,
    mut on_notify: impl FnMut(&str) -> bool,
) -> Result<i32, CriuError> {
    let fail = |msg: String| CriuError::Failed { op: "restore", msg };
    let dir = nix::fcntl::open(
        &req.images,
        OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| fail(format!("opening {}: {e}", req.images.display())))?;
    let netns = if req.userns.is_some() {
        None
    } else {
        Some(
            std::fs::File::open(&req.netns)
                .map_err(|e| fail(format!("opening {}: {e}", req.netns.display())))?,
        )
    };
    let mut inherit = Vec::new();
    let mut external = Vec::new();
    if !req.console_key.is_empty() {
        // Init's stdout/stderr: a fresh pipe to this monitor instead of the
        // dumped one, whose reader stayed behind with the old monitor.
        inherit.push(InheritFd {
            key: req.console_key.clone(),
            fd: FIRST_PASSED_FD,
        });
    }
    if netns.is_some() {
        inherit.push(InheritFd {
            key: NETNS_KEY.into(),
            fd: FIRST_PASSED_FD + 1,
        });
    } else {
        for d in crate::runtime::HOST_DEVICES {
            external.push(format!("mnt[{}]:/dev/{d}", dev_key(d)));
        }
        if let Some(link) = &req.eth0_link {
            external.push(format!("netdev[eth0]:{link}"));
        }
    }
    let opts = Opts {
        images_dir_fd: dir.as_raw_fd(),
        root: Some(req.root.to_string_lossy().into_owned()),
        rst_sibling: Some(true),
        tcp_established: Some(true),
        file_locks: Some(true),
        log_level: Some(req.log_level),
        log_file: Some(RESTORE_LOG.into()),
        manage_cgroups: Some(true),
        manage_cgroups_mode: Some(CgMode::Soft as i32),
        cg_root: req
            .cg_roots
            .iter()
            .map(|(ctrl, path)| CgroupRoot {
                ctrl: ctrl.clone(),
                path: path.clone(),
            })
            .collect(),
        inherit_fd: inherit,
        external,
        cgroup_yard: req
            .cgroup_yard
            .as_ref()
            .map(|y| y.to_string_lossy().into_owned()),
        // The dump's method; CRIU takes it from the images in any case.
        network_lock: Some(NetworkLock::Nftables as i32),
        notify_scripts: Some(true),
        lazy_pages: req.lazy.then_some(true),
        ..Opts::default()
    };
    let mut passed = vec![console];
    if let Some(ns) = &netns {
        passed.push(ns.as_fd());
    }
    let mut w = Swrk::spawn(criu, &passed, true)?;
    let resp = w.call(
        &Req {
            r#type: ReqType::Restore as i32,
            opts: Some(opts),
            ..Default::default()
        },
        |action, pid| {
            if action == "setup-namespaces" {
                if let (Some(userns), Some(pid)) = (&req.userns, pid) {
                    // Before anything of the VPS runs, so the agent never
                    // reaches a namespace of the copy this replaced.
                    for (file, kind) in [(userns.as_path(), "user"), (req.netns.as_path(), "net")] {
                        if let Err(e) = rebind(file, &format!("/proc/{pid}/ns/{kind}")) {
                            tracing::error!(error = %e, "binding the restored VPS's namespaces");
                            return false;
                        }
                    }
                }
            }
            on_notify(action)
        },
    )?;
    super::keep_log(&req.images.join(RESTORE_LOG));
    if !resp.success {
        return Err(fail(super::failure(
            resp.cr_errmsg,
            &req.images.join(RESTORE_LOG),
        )));
    }
    resp.restore
        .map(|r| r.pid)
        .ok_or_else(|| fail("criu reported success without a pid".into()))
}

/// Points the namespace file `file` at `ns` (a /proc/PID/ns/ path) in place
/// of what it was bound to.
fn rebind(file: &Path, ns: &str) -> Result<(), String> {
    match nix::mount::umount2(file, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) => {}
        Err(e) => return Err(format!("unbinding {}: {e}", file.display())),
    }
    nix::mount::mount(
        Some(ns),
        file,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| format!("binding {ns} at {}: {e}", file.display()))
}
