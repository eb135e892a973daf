//! Persistent network namespaces, bound to a file like `ip netns add` does.

use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::{AgentError, IoContext, Result};

/// Makes a new network namespace and binds it at `path` (created). Runs the
/// unshare on a throwaway thread so no other thread changes namespace.
pub fn create_netns(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).at("creating", dir)?;
    }
    std::fs::File::create(path).at("creating netns file", path)?;
    let p = path.to_path_buf();
    let res = std::thread::spawn(move || -> Result<()> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &p,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )?;
        Ok(())
    })
    .join()
    .map_err(|_| AgentError::Internal("netns thread panicked".into()))?;
    if res.is_err() {
        let _ = std::fs::remove_file(path);
    }
    res
}

/// Unbinds and removes a netns file; a missing one is fine. The namespace itself
/// goes away with its last user.
pub fn remove_netns(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(e) => {
            return Err(AgentError::io(
                format!("unmounting netns {}", path.display()),
                e.into(),
            ))
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AgentError::io(format!("removing {}", path.display()), e)),
    }
}
