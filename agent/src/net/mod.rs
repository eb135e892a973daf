//! Node networking through netlink (the rtnetlink crate): the node bridge, one
//! persistent network namespace per VPS, and the veth pair that joins them.
//!
//! [`firewall`] keeps VPSes off the host's own addresses.
//!
//! The VPS's netns is made and configured before its init starts and outlives
//! reboots of the VPS; init joins it with setns.

mod announce;
mod bridge;
pub mod firewall;
pub mod lock;
mod netns;
mod veth;

pub use announce::{announce, garp_frames};
pub use bridge::{attach_uplink, ensure_bridge, find_address};
pub use netns::{create_netns, remove_netns};
pub use veth::{
    host_veth_name, remove_veth, setup_unplaced_veth, setup_vps_network, unplaced_peer_name,
};

use std::os::fd::{AsFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::Path;

use futures::TryStreamExt;
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, TokioSocket};
use rtnetlink::Handle;

use crate::error::{AgentError, Result};

/// An rtnetlink handle whose socket lives in some network namespace. Dropping it
/// stops the connection task.
pub struct Netlink {
    pub handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Netlink {
    /// A connection in the agent's own network namespace.
    pub fn host() -> Result<Self> {
        let sock =
            Socket::new(NETLINK_ROUTE).map_err(|e| AgentError::io("opening netlink socket", e))?;
        Self::from_socket(sock)
    }

    /// A connection whose socket is opened inside the netns bound at `path`. A
    /// socket keeps the namespace it was made in, so only its creation needs the
    /// switch, done on a short-lived thread so no runtime thread changes namespace.
    pub async fn in_netns(path: &Path) -> Result<Self> {
        let path = path.to_path_buf();
        let sock = tokio::task::spawn_blocking(move || -> Result<Socket> {
            let ns = std::fs::File::open(&path)
                .map_err(|e| AgentError::io(format!("opening netns {}", path.display()), e))?;
            std::thread::scope(|s| {
                s.spawn(|| -> Result<Socket> {
                    nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
                    Socket::new(NETLINK_ROUTE)
                        .map_err(|e| AgentError::io("opening netlink socket in netns", e))
                })
                .join()
                .map_err(|_| AgentError::Internal("netns thread panicked".into()))?
            })
        })
        .await
        .map_err(|e| AgentError::Internal(e.to_string()))??;
        Self::from_socket(sock)
    }

    fn from_socket(sock: Socket) -> Result<Self> {
        sock.set_non_blocking(true)
            .map_err(|e| AgentError::io("netlink socket", e))?;
        let fd: OwnedFd = {
            // SAFETY: into_raw_fd hands over sole ownership of a valid descriptor.
            unsafe { OwnedFd::from_raw_fd(sock.into_raw_fd()) }
        };
        // SAFETY: `fd` is an open, owned, non-blocking netlink socket; ownership
        // moves into the TokioSocket (we are inside the tokio runtime it registers with).
        let tsock = unsafe { TokioSocket::from_raw_fd(fd.into_raw_fd()) };
        let (conn, handle, _) = rtnetlink::from_socket(tsock);
        let task = tokio::spawn(conn);
        Ok(Self { handle, task })
    }

    /// The index of a link by name, or None.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(Some(msg.header.index)),
            Ok(None) => Ok(None),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
            Err(e) => Err(nl(format!("looking up link {name}"), e)),
        }
    }
}

pub(crate) fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| c.get().abs()) == Some(errno),
        _ => false,
    }
}

pub(crate) fn nl(context: impl Into<String>, e: rtnetlink::Error) -> AgentError {
    AgentError::Netlink(format!("{}: {e}", context.into()))
}
