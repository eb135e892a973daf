//! One `criu swrk` worker: CRIU's RPC over a SOCK_SEQPACKET socketpair, one
//! protobuf message per packet. CRIU serves one dump or restore per worker
//! (`keep_open` only works for queries), so every operation spawns its own.
//! Blocking: call from a blocking thread or from the single-threaded monitor.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use nix::sys::socket::{socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use prost::Message;

use super::rpc::{Req, ReqType, Resp};
use super::CriuError;

/// The descriptor number CRIU's end of the socketpair gets in the worker.
const SWRK_FD: RawFd = 3;
/// Descriptors handed to CRIU (`inherit_fd`, netns) start here in the worker.
pub const FIRST_PASSED_FD: RawFd = 4;

pub struct Swrk {
    child: Child,
    sock: OwnedFd,
}

impl Swrk {
    /// Starts `criu swrk 3`. `pass` are descriptors of ours that the worker gets
    /// as 4, 5, ... in order (for `inherit_fd`). `tied`: it is killed if the
    /// spawning process dies
    /// (a restore: a monitor that is gone must not leave CRIU waiting for
    /// ever on a tree that cannot finish). A dump is not tied: a post-copy's
    /// CRIU must keep serving pages if the agent dies.
    pub fn spawn(criu: &Path, pass: &[BorrowedFd<'_>], tied: bool) -> Result<Swrk, CriuError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| CriuError::Spawn(format!("socketpair: {e}")))?;
        let theirs_raw = theirs.as_raw_fd();
        let passed: Vec<RawFd> = pass.iter().map(|f| f.as_raw_fd()).collect();
        let mut cmd = Command::new(criu);
        cmd.arg("swrk")
            .arg(SWRK_FD.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: between fork and exec only async-signal-safe calls (dup, dup2,
        // fcntl, prctl) run, on descriptors this process owns.
        unsafe {
            cmd.pre_exec(move || {
                // Move everything out of the way first: a source may sit on a
                // target number (e.g. our socket end is 4 and must become 3).
                let high: Vec<RawFd> = std::iter::once(theirs_raw)
                    .chain(passed.iter().copied())
                    .map(|fd| libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100))
                    .collect();
                if high.iter().any(|&fd| fd < 0) {
                    return Err(std::io::Error::last_os_error());
                }
                for (i, fd) in high.iter().enumerate() {
                    // dup2 clears FD_CLOEXEC on the new number.
                    if libc::dup2(*fd, SWRK_FD + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if tied && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| CriuError::Spawn(format!("{}: {e}", criu.display())))?;
        drop(theirs);
        Ok(Swrk { child, sock: ours })
    }

    pub fn send(&self, req: &Req) -> Result<(), CriuError> {
        let buf = req.encode_to_vec();
        nix::sys::socket::send(self.sock.as_raw_fd(), &buf, MsgFlags::empty())
            .map_err(|e| CriuError::Rpc(format!("sending to criu: {e}")))?;
        Ok(())
    }

    pub fn recv(&self) -> Result<Resp, CriuError> {
        let mut buf = vec![0u8; 1 << 16];
        let n = loop {
            match nix::sys::socket::recv(self.sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) => break n,
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(CriuError::Rpc(format!("reading from criu: {e}"))),
            }
        };
        if n == 0 {
            return Err(CriuError::Rpc("criu closed the connection".into()));
        }
        Resp::decode(&buf[..n]).map_err(|e| CriuError::Rpc(format!("bad message from criu: {e}")))
    }

    /// Sends `req` and serves CRIU's notifications (`notify_scripts`) with
    /// `on_notify(action, pid) -> ok` until the final answer arrives (`pid`:
    /// the restored root task's, at `setup-namespaces` and `post-restore`).
    pub fn call(
        &mut self,
        req: &Req,
        mut on_notify: impl FnMut(&str, Option<i32>) -> bool,
    ) -> Result<Resp, CriuError> {
        self.send(req)?;
        let resp = loop {
            let resp = self.recv()?;
            if resp.r#type == ReqType::Notify as i32 {
                let action = resp
                    .notify
                    .as_ref()
                    .and_then(|n| n.script.clone())
                    .unwrap_or_default();
                let pid = resp.notify.as_ref().and_then(|n| n.pid);
                let ok = on_notify(&action, pid);
                self.send(&Req {
                    r#type: ReqType::Notify as i32,
                    notify_success: Some(ok),
                    ..Default::default()
                })?;
                continue;
            }
            break resp;
        };
        let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let _ = self.child.wait();
        Ok(resp)
    }
}

impl Drop for Swrk {
    fn drop(&mut self) {
        // A worker we abandon must not linger (it would hold frozen tasks).
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
