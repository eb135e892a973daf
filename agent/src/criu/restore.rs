//! Restoring a dumped VPS tree into prepared kernel objects: the agent has
//! mounted the rootfs, made the cgroups (with limits) and the network
//! namespace (with the VPS's address and MAC) before this runs.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::dump::NETNS_KEY;
use super::rpc::{CgMode, CgroupRoot, InheritFd, NetworkLock, Opts, Req, ReqType};
use super::swrk::{Swrk, FIRST_PASSED_FD};
use super::CriuError;

pub const RESTORE_LOG: &str = "restore.log";

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RestoreRequest {
    pub images: PathBuf,
    /// The mounted rootfs on this host; becomes the VPS's `/`.
    pub root: PathBuf,
    /// The prepared network namespace to restore into.
    pub netns: PathBuf,
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
    on_notify: impl FnMut(&str) -> bool,
) -> Result<i32, CriuError> {
    let fail = |msg: String| CriuError::Failed { op: "restore", msg };
    let dir = nix::fcntl::open(
        &req.images,
        OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| fail(format!("opening {}: {e}", req.images.display())))?;
    let netns = std::fs::File::open(&req.netns)
        .map_err(|e| fail(format!("opening {}: {e}", req.netns.display())))?;
    let mut inherit = Vec::new();
    if !req.console_key.is_empty() {
        // Init's stdout/stderr: a fresh pipe to this monitor instead of the
        // dumped one, whose reader stayed behind with the old monitor.
        inherit.push(InheritFd {
            key: req.console_key.clone(),
            fd: FIRST_PASSED_FD,
        });
    }
    inherit.push(InheritFd {
        key: NETNS_KEY.into(),
        fd: FIRST_PASSED_FD + 1,
    });
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
    let mut w = Swrk::spawn(criu, &[console, netns.as_fd()], true)?;
    let resp = w.call(
        &Req {
            r#type: ReqType::Restore as i32,
            opts: Some(opts),
            ..Default::default()
        },
        on_notify,
    )?;
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
