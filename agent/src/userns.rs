//! The host side of an unprivileged VPS's user namespace.
//!
//! A VPS's ids 0..65535 are host ids `base..base+65535` ([`ferry_proto::ids`]).
//! Before init first runs, the agent makes the VPS's user namespace with that
//! map and, owned by it, the VPS's network namespace, and binds both to files
//! in the VPS's run dir (like `ip netns add`): the agent wires the network
//! into the netns from outside as for any VPS, and init (and every `vps exec`,
//! and init again after a reboot) joins them. The VPS's root holds every
//! capability over its own namespaces and none over the host's.
//!
//! The template stays shared, read-only and owned by host root: each VPS
//! sees it through an idmapped mount (kernel 5.12+, filesystems that support
//! them) that shows host id N as `base+N`, under the VPS's overlay. What the
//! VPS writes lands in its upper dir with its own host ids.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use nix::mount::{mount, MsFlags};

use crate::error::{AgentError, IoContext, Result};

/// `0 BASE 65536`: the one line of a VPS's uid_map and gid_map.
pub fn map_line(base: u32) -> String {
    format!("0 {base} {}\n", ferry_proto::ids::RANGE)
}

/// Makes the VPS's user namespace (ids mapped at `base`) and a network
/// namespace it owns, bound at `userns` and `netns` (files created). Runs the
/// namespaces' first process as a throwaway child that only waits to be
/// told to exit. On error nothing stays bound.
pub fn create(userns: &Path, netns: &Path, base: u32) -> Result<()> {
    for p in [userns, netns] {
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).at("creating", dir)?;
        }
        std::fs::File::create(p).at("creating namespace file", p)?;
    }
    let res = make(userns, netns, base);
    if res.is_err() {
        for p in [userns, netns] {
            let _ = crate::net::remove_netns(p);
        }
    }
    res
}

fn make(userns: &Path, netns: &Path, base: u32) -> Result<()> {
    let (hold_r, hold_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let flags = libc::CLONE_NEWUSER | libc::CLONE_NEWNET;
    // SAFETY: a raw clone without CLONE_VM behaves like fork(2). This process
    // has other threads, so the child calls only async-signal-safe functions
    // (close, read, _exit) on memory prepared before the clone.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if rc < 0 {
        return Err(AgentError::io(
            "making the VPS's user namespace",
            std::io::Error::last_os_error(),
        ));
    }
    if rc == 0 {
        let mut b = [0u8; 1];
        let keep = hold_r.as_raw_fd() as libc::c_uint;
        // SAFETY: close_range(2), read(2) into a local buffer, then _exit(2):
        // all async-signal-safe. Every descriptor but its own read end goes:
        // a clone made at the same moment by another thread holds its
        // sibling's write end otherwise, each child then kept the other's
        // pipe open, neither read ever ended, and both starts (and the
        // runtime threads waiting on them) hung. With its copy of the write
        // end closed, the read ends when the parent closes the last one.
        unsafe {
            if keep > 0 {
                libc::syscall(
                    libc::SYS_close_range,
                    0 as libc::c_uint,
                    keep - 1,
                    0 as libc::c_uint,
                );
            }
            libc::syscall(
                libc::SYS_close_range,
                keep + 1,
                libc::c_uint::MAX,
                0 as libc::c_uint,
            );
            libc::read(keep as libc::c_int, b.as_mut_ptr().cast(), 1);
            libc::_exit(0)
        }
    }
    let pid = rc as i32;
    drop(hold_r);
    let res = (|| -> Result<()> {
        let line = map_line(base);
        for f in ["uid_map", "gid_map"] {
            let p = format!("/proc/{pid}/{f}");
            std::fs::write(&p, &line).at("writing", &p)?;
        }
        for (kind, target) in [("user", userns), ("net", netns)] {
            let src = format!("/proc/{pid}/ns/{kind}");
            mount(
                Some(src.as_str()),
                target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| {
                AgentError::io(format!("binding {src} at {}", target.display()), e.into())
            })?;
        }
        Ok(())
    })();
    drop(hold_w);
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    res
}

/// Mounts `src` (a template's rootfs) at `target` (an empty dir) as the VPS
/// sees it: read-only, its ids shifted into the range of the user namespace
/// bound at `userns`. Nothing is copied or chowned.
pub fn mount_idmapped(src: &Path, target: &Path, userns: &Path) -> Result<()> {
    let ns = std::fs::File::open(userns).at("opening", userns)?;
    let fail = |what: &str, e: std::io::Error| {
        AgentError::io(
            format!(
                "{what} for an idmapped view of {} (needs kernel 5.12+ and a filesystem with idmapped mounts)",
                src.display()
            ),
            e,
        )
    };
    let csrc = cpath(src)?;
    // SAFETY: open_tree with a valid C string and flags; returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            csrc.as_ptr(),
            (libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC) as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(fail("open_tree", std::io::Error::last_os_error()));
    }
    // SAFETY: open_tree returned a fresh descriptor this function owns.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_IDMAP | libc::MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: ns.as_fd().as_raw_fd() as u64,
    };
    let empty = c"";
    // SAFETY: mount_setattr on the detached tree's fd with AT_EMPTY_PATH and
    // a mount_attr of the size passed; the kernel copies it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // The filesystem (or kernel) cannot idmap: say what would work.
        return Err(AgentError::FailedPrecondition(format!(
            "an unprivileged VPS needs an idmapped view of its template, and {} cannot \
             have one here ({e}): keep the data dir on ext4, xfs or btrfs (tmpfs from \
             kernel 6.3) on kernel 5.12 or later, or create the VPS with --privileged",
            src.display()
        )));
    }
    let ctarget = cpath(target)?;
    // SAFETY: move_mount from the detached tree (empty path) onto a C string path.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            ctarget.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH as libc::c_uint,
        )
    };
    if rc != 0 {
        return Err(fail("move_mount", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn cpath(p: &Path) -> Result<std::ffi::CString> {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| AgentError::Internal(format!("{} holds a NUL byte", p.display())))
}
