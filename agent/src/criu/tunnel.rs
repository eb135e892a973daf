//! The page tunnel: post-copy memory between nodes over mutual TLS (rustls),
//! with CRIU's own sockets on loopback and in a socketpair.
//!
//! CRIU's post-copy has the target's `criu lazy-pages` fetch memory from a
//! page server in the source's dump. CRIU can wrap that socket in TLS itself
//! (GnuTLS), but that nearly doubled a 256 MiB post-copy's total time here
//! (docs/benchmarks.md). So the two CRIUs never meet on the network:
//!
//! ```text
//! source: CRIU page server on 127.77.0.1:P  <-tcp->  `ferry-agent page-tunnel serve`
//!                                                        ^ mutual TLS, the node certificates
//! target: `criu lazy-pages --ps-socket` <-socketpair-> `ferry-agent page-tunnel dial`
//! ```
//!
//! Both ends are small processes of their own, not tasks of the agents: like
//! the lazy-pages daemon and CRIU's dump, they outlive an agent restart, so a
//! VPS inside its post-copy window survives either agent stopping. The
//! serving end takes one connection that completes the handshake with a node
//! certificate of the cluster (others are dropped and it keeps waiting), then
//! connects to the page server, which takes one connection: its own. The
//! host firewall lets only root connect to 127.77.0.1
//! ([`crate::net::firewall`]). Without credentials (`--insecure-dev`) the
//! tunnel is plain TCP.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::CriuError;

/// Where a source's CRIU page server listens: loopback, root only.
pub const PAGE_SERVER_IP: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 1);

/// The fd a tunnel process gets: `serve` reports its port there, `dial` finds
/// its end of the socketpair there.
const TUNNEL_FD: RawFd = 3;

/// How long the serving end waits for the target.
const ACCEPT_WAIT: Duration = Duration::from_secs(120);

/// Handshakes the serving end runs at once; more connections wait in the
/// listen queue or are dropped.
const MAX_HANDSHAKES: usize = 16;

/// Each direction's copy buffer: the page server answers in batches of up
/// to 4 MiB.
const BUF: usize = 256 << 10;

/// What to run (`ferry-agent page-tunnel …`).
#[derive(Debug, Clone)]
pub enum Role {
    /// Source: listen on `listen`, relay one peer to `page_server`.
    Serve {
        listen: Ipv4Addr,
        page_server: SocketAddr,
    },
    /// Target: relay the socket on fd 3 to the tunnel at `to`, whose
    /// certificate must name node `server_node` (any node when empty).
    Dial { to: SocketAddr, server_node: String },
}

/// The tunnel process's body; its exit code.
pub fn run(role: Role, credentials: Option<&Path>) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("page tunnel: runtime: {e}");
            return 1;
        }
    };
    let res = rt.block_on(async move {
        let creds = match credentials {
            Some(p) => Some(ferry_proto::tls::Credentials::load(p).map_err(|e| e.to_string())?),
            None => None,
        };
        match role {
            Role::Serve {
                listen,
                page_server,
            } => serve(listen, page_server, creds).await,
            Role::Dial { to, server_node } => dial(to, &server_node, creds).await,
        }
    });
    match res {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("page tunnel: {e}");
            1
        }
    }
}

async fn serve(
    listen: Ipv4Addr,
    page_server: SocketAddr,
    creds: Option<ferry_proto::tls::Credentials>,
) -> Result<(), String> {
    let l = tokio::net::TcpListener::bind((listen, 0))
        .await
        .map_err(|e| format!("listening on {listen}: {e}"))?;
    let port = l.local_addr().map_err(|e| e.to_string())?.port();
    {
        use std::io::Write;
        // SAFETY: fd 3 was handed to us for this report; we own and close it.
        let mut f = unsafe { std::fs::File::from_raw_fd(TUNNEL_FD) };
        writeln!(f, "{port}").map_err(|e| format!("reporting the port: {e}"))?;
    }
    let tls = match &creds {
        Some(c) => Some(ferry_proto::tls::ServerTls::new(c).map_err(|e| e.to_string())?),
        None => None,
    };
    let end = tokio::time::Instant::now() + ACCEPT_WAIT;
    let Some(tls) = tls else {
        let (sock, _) = tokio::time::timeout_at(end, l.accept())
            .await
            .map_err(|_| "no target connected in time".to_string())?
            .map_err(|e| format!("accepting: {e}"))?;
        let _ = sock.set_nodelay(true);
        return relay(sock, page_server).await;
    };
    // Handshakes run side by side: a peer that stalls its handshake must not
    // keep the target waiting behind it.
    let tls = std::sync::Arc::new(tls);
    let mut pending = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            acc = l.accept() => {
                let (sock, from) = acc.map_err(|e| format!("accepting: {e}"))?;
                if pending.len() >= MAX_HANDSHAKES {
                    eprintln!("page tunnel: too many handshakes at once; dropped {from}");
                    continue;
                }
                let _ = sock.set_nodelay(true);
                let tls = std::sync::Arc::clone(&tls);
                pending.spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(10), tls.accept(sock)).await {
                        Ok(Ok((s, ferry_proto::tls::Peer::Verified(id))))
                            if matches!(id.role, ferry_proto::tls::Role::Node(_)) =>
                        {
                            eprintln!("page tunnel: {} connected from {from}", id.role);
                            Some(s)
                        }
                        Ok(Ok((_, peer))) => {
                            eprintln!("page tunnel: refused {from}: {peer:?}");
                            None
                        }
                        Ok(Err(e)) => {
                            eprintln!("page tunnel: handshake with {from}: {e}");
                            None
                        }
                        Err(_) => {
                            eprintln!("page tunnel: handshake with {from} timed out");
                            None
                        }
                    }
                });
            }
            Some(done) = pending.join_next() => {
                if let Ok(Some(s)) = done {
                    return relay(s, page_server).await;
                }
            }
            _ = tokio::time::sleep_until(end) => {
                return Err("no target connected in time".into());
            }
        }
    }
}

async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
    mut peer: S,
    page_server: SocketAddr,
) -> Result<(), String> {
    let mut ps = tokio::net::TcpStream::connect(page_server)
        .await
        .map_err(|e| format!("connecting to the page server {page_server}: {e}"))?;
    let _ = ps.set_nodelay(true);
    let (_, to_peer) = tokio::io::copy_bidirectional_with_sizes(&mut peer, &mut ps, BUF, BUF)
        .await
        .map_err(|e| format!("relaying: {e}"))?;
    // Read back by the agent ([`relayed`]): the post-copy's bytes.
    eprintln!("{RELAYED} {to_peer} bytes");
    Ok(())
}

/// How the serving end's log states what it sent to the target.
const RELAYED: &str = "page tunnel: relayed";

/// What the serving end whose log is `log` sent to the target, once it ended.
pub fn relayed(log: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix(RELAYED))
        .and_then(|rest| rest.trim().strip_suffix("bytes"))
        .and_then(|n| n.trim().parse().ok())
}

async fn dial(
    to: SocketAddr,
    server_node: &str,
    creds: Option<ferry_proto::tls::Credentials>,
) -> Result<(), String> {
    // SAFETY: fd 3 is our end of the socketpair, handed to us alone.
    let local = unsafe { std::os::unix::net::UnixStream::from_raw_fd(TUNNEL_FD) };
    local.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut local = tokio::net::UnixStream::from_std(local).map_err(|e| e.to_string())?;
    let tcp = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(to))
        .await
        .map_err(|_| format!("connecting to the source's page tunnel {to}: timed out"))?
        .map_err(|e| format!("connecting to the source's page tunnel {to}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let copy = |r: std::io::Result<(u64, u64)>| r.map(|_| ()).map_err(|e| format!("relaying: {e}"));
    match creds {
        None => {
            let mut tcp = tcp;
            copy(tokio::io::copy_bidirectional_with_sizes(&mut local, &mut tcp, BUF, BUF).await)
        }
        Some(c) => {
            let name = if server_node.is_empty() {
                "node.ferry".to_string()
            } else {
                ferry_proto::tls::pki::node_server_name(server_node)
            };
            let client = ferry_proto::tls::ClientTls::new(&c, "node.ferry")
                .map_err(|e| e.to_string())?
                .for_server(&name);
            let mut s = tokio::time::timeout(Duration::from_secs(10), client.connect(tcp))
                .await
                .map_err(|_| format!("TLS with the source's page tunnel {to}: timed out"))?
                .map_err(|e| format!("TLS with the source's page tunnel {to}: {e}"))?;
            copy(tokio::io::copy_bidirectional_with_sizes(&mut local, &mut s, BUF, BUF).await)
        }
    }
}

/// A running tunnel end; killed when dropped unless kept.
pub struct Tunnel {
    child: Option<std::process::Child>,
    /// `serve`: where the target dials (IP:PORT).
    pub address: String,
    /// Its log.
    pub log: PathBuf,
}

impl Tunnel {
    /// Waits (blocking) up to `limit` for the tunnel to end by itself, then
    /// kills it.
    pub fn finish(mut self, limit: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let end = std::time::Instant::now() + limit;
        loop {
            match c.try_wait() {
                Ok(Some(st)) => return st.success(),
                Ok(None) if std::time::Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    return false;
                }
            }
        }
    }

    /// Lets it run on its own: a thread reaps it, or, if this agent stops
    /// first, whoever inherits it.
    pub fn keep(mut self) {
        if let Some(mut c) = self.child.take() {
            std::thread::spawn(move || {
                let _ = c.wait();
            });
        }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Spawns `self_exe page-tunnel …` with `fd` as its fd 3.
fn spawn(
    self_exe: &Path,
    args: &[String],
    credentials: Option<&Path>,
    fd: &OwnedFd,
    log: &Path,
) -> Result<std::process::Child, CriuError> {
    use std::os::unix::process::CommandExt;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| CriuError::Spawn(format!("{}: {e}", log.display())))?;
    let mut cmd = std::process::Command::new(self_exe);
    cmd.arg("page-tunnel").args(args);
    if let Some(c) = credentials {
        cmd.arg("--credentials").arg(c);
    }
    let raw = fd.as_raw_fd();
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    // SAFETY: between fork and exec only dup2 runs, on a descriptor we own;
    // the copy has no FD_CLOEXEC, so the tunnel keeps it.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, TUNNEL_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| CriuError::Spawn(format!("page tunnel: {e}")))
}

/// A descriptor above fd 3, so the dup2 in the child cannot clobber it.
fn high(fd: OwnedFd) -> Result<OwnedFd, CriuError> {
    let raw = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))
        .map_err(|e| CriuError::Spawn(format!("page tunnel fd: {e}")))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Source: starts the serving end on `listen` for the page server at
/// `page_server` (blocking; returns once it listens).
pub fn start_serve(
    self_exe: &Path,
    listen: Ipv4Addr,
    page_server: SocketAddr,
    credentials: Option<&Path>,
    log: &Path,
) -> Result<Tunnel, CriuError> {
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| CriuError::Spawn(format!("pipe: {e}")))?;
    let wr = high(wr)?;
    let child = spawn(
        self_exe,
        &[
            "serve".into(),
            "--listen".into(),
            listen.to_string(),
            "--page-server".into(),
            page_server.to_string(),
        ],
        credentials,
        &wr,
        log,
    )?;
    drop(wr);
    let mut t = Tunnel {
        child: Some(child),
        address: String::new(),
        log: log.to_path_buf(),
    };
    let mut text = String::new();
    {
        use std::io::Read;
        let mut f = std::fs::File::from(rd);
        let _ = f.read_to_string(&mut text);
    }
    let port: u16 = text.trim().parse().map_err(|_| CriuError::Failed {
        op: "page tunnel",
        msg: format!("it did not report a port: {}", super::log_tail(log)),
    })?;
    t.address = SocketAddr::from((listen, port)).to_string();
    Ok(t)
}

/// Target: starts the dialling end for the tunnel at `to`; returns it and the
/// socket lazy-pages reads (`--ps-socket`).
pub fn start_dial(
    self_exe: &Path,
    to: SocketAddr,
    server_node: &str,
    credentials: Option<&Path>,
    log: &Path,
) -> Result<(Tunnel, OwnedFd), CriuError> {
    let (a, b) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Stream,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| CriuError::Spawn(format!("socketpair: {e}")))?;
    let b = high(b)?;
    let child = spawn(
        self_exe,
        &[
            "dial".into(),
            "--to".into(),
            to.to_string(),
            "--server-node".into(),
            server_node.to_string(),
        ],
        credentials,
        &b,
        log,
    )?;
    Ok((
        Tunnel {
            child: Some(child),
            address: to.to_string(),
            log: log.to_path_buf(),
        },
        a,
    ))
}

/// The tunnel log's name in a migration's images dir.
pub const TUNNEL_LOG: &str = "page-tunnel.log";

/// Where a tunnel's log goes.
pub fn log_in(dir: &Path) -> PathBuf {
    dir.join(TUNNEL_LOG)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_what_the_serving_end_relayed() {
        let d = tempfile::tempdir().unwrap();
        let log = super::log_in(d.path());
        assert_eq!(super::relayed(&log), None);
        std::fs::write(
            &log,
            "page tunnel: node n2 connected from 10.0.0.2:5000\npage tunnel: relayed 12345 bytes\n",
        )
        .unwrap();
        assert_eq!(super::relayed(&log), Some(12345));
    }
}
