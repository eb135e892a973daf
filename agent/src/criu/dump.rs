//! Dumping a running VPS: its whole process tree, rooted at the VPS's init.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::rpc::{CgMode, NetworkLock, Opts, Req, ReqType};
use super::swrk::Swrk;
use super::CriuError;

/// The key under which the VPS's network namespace is declared external. The
/// namespace itself is not dumped: the agent keeps (or, on another node,
/// recreates) it with the VPS's address and MAC, and CRIU restores the
/// processes and their sockets into it.
pub const NETNS_KEY: &str = "ferry-netns";

pub const DUMP_LOG: &str = "dump.log";

/// The external-mount key of a host device node bound into an unprivileged
/// VPS's /dev.
pub fn dev_key(dev: &str) -> String {
    format!("ferry-dev-{dev}")
}

/// Does the process live in a user namespace of its own (an unprivileged VPS)?
pub fn in_own_userns(pid: i32) -> bool {
    let ino = |p: String| std::fs::metadata(p).ok().map(|m| m.ino());
    match (
        ino(format!("/proc/{pid}/ns/user")),
        ino("/proc/self/ns/user".into()),
    ) {
        (Some(a), Some(b)) => a != b,
        _ => false,
    }
}

/// What a restore needs to know about the dumped tree beyond the images.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DumpFacts {
    /// The console pipe init writes to, as CRIU names it (`pipe:[INODE]`); the
    /// restore hands in a fresh pipe under this key.
    pub console_key: String,
}

pub struct DumpRequest<'a> {
    /// Host pid of the VPS's init.
    pub pid: i32,
    pub images: &'a Path,
    /// Keep the VPS running after the dump (a snapshot) instead of ending it.
    pub leave_running: bool,
    /// Leave the tasks stopped (SIGSTOP) after the dump instead of ending
    /// them (post-copy: a rollback must be able to let them run again).
    pub leave_stopped: bool,
    /// 0 = errors only .. 4 = debug.
    pub log_level: i32,
    /// Post-copy: leave anonymous memory out of the images and serve it
    /// from a page server on this address once the rest is dumped.
    pub lazy: Option<LazyDump>,
    /// A migration reads the tree while CRIU holds it stopped.
    pub probe: Option<SeizeProbe>,
    /// Every cgroup hierarchy, mounted (see [`super::yard`]); None: CRIU
    /// mounts them itself.
    pub cgroup_yard: Option<PathBuf>,
    /// The host end of the VPS's veth: down while CRIU holds the tasks (the
    /// network lock, see [`crate::net::lock`]). None: the VPS has no link
    /// outside itself.
    pub lock_link: Option<String>,
    /// Pre-copy: the last pre-dump's images, relative to `images`; only the
    /// pages dirtied since then are dumped (see [`super::pre_dump`]).
    pub parent: Option<String>,
}

/// What a migration reads of the tree while CRIU holds every task stopped.
#[derive(Debug, Clone, Default)]
pub struct Seized {
    /// Just before CRIU stopped the tasks: the downtime starts here, not when
    /// CRIU was asked (its start-up runs while the VPS still serves).
    pub at: Option<Instant>,
    /// Files the tasks have mapped shared and writable, relative to the VPS's
    /// root: writes through such a mapping raise no change event and may
    /// leave the file's times alone, so the rootfs's frozen pass sends them.
    pub shared_writable: Vec<PathBuf>,
}

pub struct SeizeProbe {
    /// The VPS's cgroup: it lists the tasks.
    pub cgroup: crate::cgroup::VpsCgroup,
    /// The VPS's root as the host sees it (its mappings may be named through it).
    pub root: PathBuf,
    pub out: Arc<Mutex<Seized>>,
}

/// Files mapped shared and writable by `pids`, relative to the VPS's root.
/// /proc/PID/maps names a file by its path from the VPS's own root (the host
/// cannot reach the VPS's mount namespace), or through `root` when it can.
pub fn shared_writable_maps(pids: &[i32], root: &Path) -> Vec<PathBuf> {
    let mut out = std::collections::BTreeSet::new();
    for pid in pids {
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            continue;
        };
        for line in maps.lines() {
            // start-end perms offset dev inode [path]
            let mut f = line.splitn(6, ' ');
            let perms = f.nth(1).unwrap_or("");
            let path = f.nth(3).unwrap_or("").trim_start();
            let p = perms.as_bytes();
            if p.len() < 4 || p[1] != b'w' || p[3] != b's' || !path.starts_with('/') {
                continue;
            }
            if path.ends_with(" (deleted)") {
                continue;
            }
            let path = Path::new(path);
            let rel = path
                .strip_prefix(root)
                .or_else(|_| path.strip_prefix("/"))
                .map(Path::to_path_buf);
            if let Ok(rel) = rel {
                if !rel.as_os_str().is_empty() {
                    out.insert(rel);
                }
            }
        }
    }
    out.into_iter().collect()
}

/// A post-copy dump's page server and what it reports while it runs.
pub struct LazyDump {
    pub address: String,
    pub port: u16,
    pub events: std::sync::mpsc::Sender<LazyEvent>,
}

/// The steps of a post-copy dump, in order. The tasks stay frozen until every
/// page has been served (then they end), or until the page transfer fails
/// (then CRIU lets them run again, with the network still locked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LazyEvent {
    /// Everything but the lazy memory is in the images.
    Dumped,
    /// The page server listens: the target can start fetching.
    Serving,
}

/// The console pipe of init `pid` as CRIU names it (`pipe:[INODE]`), or "".
pub fn console_key(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/1"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The options every CRIU run on the VPS's live tree (a dump, a pre-dump)
/// sets alike, and the images dir they name (keep it open for the run).
pub(super) fn tree_opts(
    op: &'static str,
    pid: i32,
    images: &Path,
    log_level: i32,
    log_file: &str,
    cgroup_yard: Option<&Path>,
) -> Result<(Opts, std::os::fd::OwnedFd), CriuError> {
    let netns = std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .map_err(|e| CriuError::Failed {
            op,
            msg: format!("VPS init {pid} is gone ({e})"),
        })?
        .ino();
    let external = if in_own_userns(pid) {
        // An unprivileged VPS's netns is its user namespace's: it is dumped
        // with the tree (links, addresses, routes, its own firewall) and
        // remade inside the restored user namespace, which could not join
        // a netns the agent made. Its device nodes are the host's, bound in.
        crate::runtime::HOST_DEVICES
            .iter()
            .map(|d| format!("mnt[/dev/{d}]:{}", dev_key(d)))
            .collect()
    } else {
        // The network namespace is the agent's (see NETNS_KEY).
        vec![format!("net[{netns}]:{NETNS_KEY}")]
    };
    let dir = nix::fcntl::open(images, OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| CriuError::Failed {
            op,
            msg: format!("opening {}: {e}", images.display()),
        })?;
    let opts = Opts {
        images_dir_fd: dir.as_raw_fd(),
        pid: Some(pid),
        log_level: Some(log_level),
        log_file: Some(log_file.into()),
        // Record each task's cgroup; "soft": never fight the agent over limits.
        manage_cgroups: Some(true),
        manage_cgroups_mode: Some(CgMode::Soft as i32),
        cgroup_yard: cgroup_yard.map(|y| y.to_string_lossy().into_owned()),
        // The agent locks the network itself (the veth down, at CRIU's
        // `network-lock` notification): CRIU's nftables lock would make
        // every restore fail to delete it, at ~20 ms (crate::net::lock).
        network_lock: Some(NetworkLock::Skip as i32),
        external,
        ..Opts::default()
    };
    Ok((opts, dir))
}

pub fn dump(criu: &Path, req: &DumpRequest<'_>) -> Result<DumpFacts, CriuError> {
    let (base, _dir) = tree_opts(
        "dump",
        req.pid,
        req.images,
        req.log_level,
        DUMP_LOG,
        req.cgroup_yard.as_deref(),
    )?;
    let console_key = console_key(req.pid);
    let opts = Opts {
        leave_running: Some(req.leave_running),
        leave_stopped: req.leave_stopped.then_some(true),
        // Established TCP connections are dumped in repair mode and survive.
        tcp_established: Some(true),
        // A connection still in a listening socket's accept queue (the
        // handshake done, not yet accepted) cannot be dumped; without this a
        // busy server could never be checkpointed. Its client sees the
        // connection reset and reconnects; accepted ones move intact.
        tcp_skip_in_flight: Some(true),
        // flock/posix locks held inside the VPS are part of its state.
        file_locks: Some(true),
        // Pre-copy: the pages not dirtied since the last pre-dump are there.
        parent_img: req.parent.clone(),
        track_mem: req.parent.as_ref().map(|_| true),
        lazy_pages: req.lazy.as_ref().map(|_| true),
        ps: req.lazy.as_ref().map(|l| super::rpc::PageServerInfo {
            address: Some(l.address.clone()),
            port: Some(l.port as i32),
            pid: None,
            fd: None,
        }),
        // Notifications: the network lock, the lazy dump's progress, the
        // probe's freeze mark.
        notify_scripts: Some(true),
        ..base
    };
    let mut w = Swrk::spawn(criu, &[], false)?;
    let mut pre_dump = None;
    let resp = w.call(
        &Req {
            r#type: ReqType::Dump as i32,
            opts: Some(opts),
            ..Default::default()
        },
        |action, _| {
            let lock = match action {
                "network-lock" => Some(false),
                // Only when CRIU lets the tasks run again here.
                "network-unlock" => Some(true),
                _ => None,
            };
            if let (Some(up), Some(link)) = (lock, &req.lock_link) {
                if let Err(e) = crate::net::lock::set_link(link, up) {
                    tracing::error!(link = %link, up, error = %e, "network lock");
                    // Refused: CRIU gives up the dump and resumes the tasks.
                    if !up {
                        return false;
                    }
                }
            }
            if let Some(probe) = &req.probe {
                match action {
                    // The last step before CRIU seizes the tasks.
                    "pre-dump" => pre_dump = Some(Instant::now()),
                    // Right after: every task is stopped, none can map more.
                    "network-lock" => {
                        let pids = probe.cgroup.pids();
                        let seized = Seized {
                            at: pre_dump,
                            shared_writable: shared_writable_maps(&pids, &probe.root),
                        };
                        *probe.out.lock().unwrap_or_else(|p| p.into_inner()) = seized;
                    }
                    _ => {}
                }
            }
            if let Some(l) = &req.lazy {
                let ev = match action {
                    "post-dump" => Some(LazyEvent::Dumped),
                    "status-ready" => Some(LazyEvent::Serving),
                    _ => None,
                };
                if let Some(ev) = ev {
                    let _ = l.events.send(ev);
                }
            }
            true
        },
    );
    super::keep_log(&req.images.join(DUMP_LOG));
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            unlock_after_failure(req);
            return Err(e);
        }
    };
    if !resp.success {
        unlock_after_failure(req);
        return Err(CriuError::Failed {
            op: "dump",
            msg: super::failure(resp.cr_errmsg, &req.images.join(DUMP_LOG)),
        });
    }
    Ok(DumpFacts { console_key })
}

/// A failed dump: CRIU let the tasks run again, so their link comes back up
/// (in case CRIU could not say so). Not for a post-copy, whose failure can
/// come after the decision, with the VPS running on the target: its tasks
/// stay stopped and locked until a rollback thaws them.
fn unlock_after_failure(req: &DumpRequest<'_>) {
    if let (Some(link), None) = (&req.lock_link, &req.lazy) {
        if let Err(e) = crate::net::lock::set_link(link, true) {
            tracing::error!(link = %link, error = %e, "unlocking the network after a failed dump");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shared writable mapping of ours is found and named relative to the
    /// root it lives under; a private or read-only one is not.
    #[test]
    fn finds_shared_writable_mappings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir(root.join("var")).expect("mkdir");
        let open = |name: &str| {
            let p = root.join(name);
            std::fs::write(&p, vec![0u8; 4096]).expect("write");
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .expect("open")
        };
        let (shared, private) = (open("var/shared.db"), open("private"));
        let map = |f: &std::fs::File, flags: libc::c_int| {
            // SAFETY: a fresh one-page mapping of a file we own, unmapped below;
            // nothing else aliases it.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags,
                    std::os::fd::AsRawFd::as_raw_fd(f),
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            p
        };
        let a = map(&shared, libc::MAP_SHARED);
        let b = map(&private, libc::MAP_PRIVATE);
        let found = shared_writable_maps(&[std::process::id() as i32], root);
        // SAFETY: the two mappings made above, each one page.
        unsafe {
            libc::munmap(a, 4096);
            libc::munmap(b, 4096);
        }
        assert_eq!(found, vec![PathBuf::from("var/shared.db")]);
    }
}
