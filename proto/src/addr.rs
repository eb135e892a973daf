//! Service addresses as operators write them, on both ends of a connection:
//! `HOST:PORT`, `http://HOST:PORT`, or `unix:/path/to.sock`.

use std::path::PathBuf;

use tonic::transport::{Channel, Endpoint};

use crate::tls::{ClientTls, Peer, PeerInfo, ServerTls};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Tcp(String),
    Unix(PathBuf),
}

impl std::str::FromStr for Addr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            if !p.starts_with('/') {
                return Err(format!("{s:?}: a unix socket address needs an absolute path (unix:/run/ferry/agent.sock)"));
            }
            return Ok(Addr::Unix(PathBuf::from(p)));
        }
        let hostport = s.strip_prefix("http://").unwrap_or(s);
        if hostport
            .rsplit_once(':')
            .is_none_or(|(_, port)| port.parse::<u16>().is_err())
        {
            return Err(format!("{s:?} is not HOST:PORT or unix:/path"));
        }
        Ok(Addr::Tcp(hostport.to_string()))
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Tcp(h) => write!(f, "{h}"),
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Connects a gRPC channel to `addr`.
/// HTTP/2 flow-control windows for bulk streams (a migration's rootfs and
/// images): the default 64 KiB has the receiver grant more every few frames.
pub const STREAM_WINDOW: u32 = 8 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// The largest HTTP/2 frame a server takes: a pushed MiB of file data goes
/// in one frame instead of 64 of the default 16 KiB.
pub const MAX_FRAME: u32 = 1 << 20;

/// A plaintext connection (tests, and daemons in the development mode).
pub async fn connect(addr: &Addr) -> Result<Channel, tonic::transport::Error> {
    connect_with(addr, None).await
}

/// This process's identity for the connections it makes: set once at start
/// by a daemon (or ferryctl) that has credentials. Without it, connections
/// are plaintext (the development mode).
static CLIENT_TLS: std::sync::RwLock<Option<ClientTls>> = std::sync::RwLock::new(None);

/// Makes every later [`connect_controller`] and [`connect_node`] mutual TLS
/// with `creds` (called again with a renewed certificate, it replaces it).
pub fn use_credentials(creds: &crate::tls::Credentials) -> Result<(), String> {
    let t = ClientTls::new(creds, crate::tls::pki::CONTROLLER_SERVER_NAME)
        .map_err(|e| e.to_string())?;
    *CLIENT_TLS.write().unwrap_or_else(|p| p.into_inner()) = Some(t);
    Ok(())
}

fn client_tls() -> Option<ClientTls> {
    CLIENT_TLS.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Whether this process connects with mutual TLS.
pub fn tls_enabled() -> bool {
    client_tls().is_some()
}

/// Connects to a controller (its certificate must name a controller).
pub async fn connect_controller(addr: &Addr) -> Result<Channel, tonic::transport::Error> {
    let t = client_tls();
    connect_with(addr, t.as_ref()).await
}

/// Connects to a node's agent (its certificate must name a node).
pub async fn connect_node(addr: &Addr) -> Result<Channel, tonic::transport::Error> {
    let t = client_tls().map(|t| t.for_server(crate::tls::pki::NODE_SERVER_NAME));
    connect_with(addr, t.as_ref()).await
}

/// Connects to node `node`'s agent: its certificate must name that node,
/// not just any node of the cluster.
pub async fn connect_node_named(
    addr: &Addr,
    node: &str,
) -> Result<Channel, tonic::transport::Error> {
    let t = client_tls().map(|t| t.for_server(&crate::tls::pki::node_server_name(node)));
    connect_with(addr, t.as_ref()).await
}

/// Connects a gRPC channel to `addr`, over TLS when `tls` is given (the
/// handshake is ours: tonic sees an HTTP/2 byte stream).
pub async fn connect_with(
    addr: &Addr,
    tls: Option<&ClientTls>,
) -> Result<Channel, tonic::transport::Error> {
    let tls = tls.cloned();
    let ep = match addr {
        Addr::Tcp(h) => Endpoint::from_shared(format!("http://{h}"))?,
        // The URI is a placeholder: the connector below decides where to go.
        Addr::Unix(_) => Endpoint::from_static("http://localhost"),
    }
    .initial_stream_window_size(STREAM_WINDOW)
    .initial_connection_window_size(CONNECTION_WINDOW)
    // A peer that stops answering (SIGSTOPped, cut off, hung) fails the
    // calls on its connection instead of holding them for ever; a live one,
    // however busy, answers pings and long streams go on.
    .http2_keep_alive_interval(KEEPALIVE_EVERY)
    .keep_alive_timeout(KEEPALIVE_TIMEOUT)
    .keep_alive_while_idle(true);
    let addr = addr.clone();
    ep.connect_with_connector(tower::service_fn(move |_| {
        let (addr, tls) = (addr.clone(), tls.clone());
        async move {
            let dial = async {
                let io: Box<dyn Io> = match &addr {
                    Addr::Tcp(h) => {
                        let s = tokio::net::TcpStream::connect(h.as_str()).await?;
                        let _ = s.set_nodelay(true);
                        Box::new(s)
                    }
                    Addr::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await?),
                };
                let io: Box<dyn Io> = match &tls {
                    Some(t) => Box::new(t.connect(io).await?),
                    None => io,
                };
                Ok::<_, std::io::Error>(io)
            };
            // The kernel of a stopped daemon still accepts the connection;
            // its TLS handshake never comes.
            let io = tokio::time::timeout(CONNECT_TIMEOUT, dial)
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "{addr} did not answer within {} s (is it stopped or hung?)",
                            CONNECT_TIMEOUT.as_secs()
                        ),
                    )
                })??;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(io))
        }
    }))
    .await
}

/// How long connecting (and the TLS handshake) may take.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// HTTP/2 pings on every connection, and how long an answer may take.
pub const KEEPALIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A byte stream a connection runs on.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Io for T {}

/// An accepted connection and who is on the other end.
pub struct Conn {
    io: Box<dyn Io>,
    info: PeerInfo,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut *self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut *self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// How long a client may take over its TLS handshake.
const HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(10);

/// Accepts connections in a task of its own: each TLS handshake runs on its
/// own, so a slow or silent client holds up nobody.
fn incoming<L, F>(
    accept: L,
    tls: Option<ServerTls>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<Conn>>
where
    L: FnMut() -> F + Send + 'static,
    F: std::future::Future<Output = std::io::Result<(Box<dyn Io>, Option<std::net::SocketAddr>)>>
        + Send,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut accept = accept;
        loop {
            let (io, remote) = match accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let Some(tls) = tls.clone() else {
                let info = PeerInfo {
                    peer: std::sync::Arc::new(Peer::Plain),
                    remote,
                };
                if tx.send(Ok(Conn { io, info })).await.is_err() {
                    return;
                }
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE, tls.accept(io)).await {
                    Ok(Ok((s, peer))) => {
                        let info = PeerInfo {
                            peer: std::sync::Arc::new(peer),
                            remote,
                        };
                        let _ = tx
                            .send(Ok(Conn {
                                io: Box::new(s),
                                info,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => tracing::debug!(?remote, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(?remote, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Serves `router` on `addr` until SIGINT or SIGTERM: TCP on `HOST:PORT` (an IP
/// address), or a unix socket (a stale socket file is replaced); over TLS
/// when `tls` is given. The router is built with [`server_layer`], as every
/// Ferry daemon's is.
pub async fn serve(
    router: tonic::transport::server::Router<
        tower::layer::util::Stack<ServerLayer, tower::layer::util::Identity>,
    >,
    addr: &Addr,
    tls: Option<ServerTls>,
) -> Result<(), String> {
    match addr {
        Addr::Tcp(h) => {
            let sa: std::net::SocketAddr = h
                .parse()
                .map_err(|_| format!("{h}: listen needs IP:PORT"))?;
            let l = std::sync::Arc::new(
                tokio::net::TcpListener::bind(sa)
                    .await
                    .map_err(|e| format!("binding {h}: {e}"))?,
            );
            let conns = incoming(
                move || {
                    let l = l.clone();
                    async move {
                        let (s, remote) = l.accept().await?;
                        let _ = s.set_nodelay(true);
                        Ok((Box::new(s) as Box<dyn Io>, Some(remote)))
                    }
                },
                tls,
            );
            router
                .serve_with_incoming_shutdown(conns, shutdown_signal())
                .await
                .map_err(|e| format!("serving on {h}: {e}"))
        }
        Addr::Unix(p) => {
            let _ = std::fs::remove_file(p);
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
            }
            let l = std::sync::Arc::new(
                tokio::net::UnixListener::bind(p)
                    .map_err(|e| format!("binding {}: {e}", p.display()))?,
            );
            let conns = incoming(
                move || {
                    let l = l.clone();
                    async move {
                        let (s, _) = l.accept().await?;
                        Ok((Box::new(s) as Box<dyn Io>, None))
                    }
                },
                tls,
            );
            router
                .serve_with_incoming_shutdown(conns, shutdown_signal())
                .await
                .map_err(|e| format!("serving on {}: {e}", p.display()))
        }
    }
}

/// A server layer: a request message that does not decode is the caller's
/// bad input. tonic answers it `Internal` (gRPC's table says so for a
/// server's own parse failures); Ferry's daemons answer `InvalidArgument`,
/// as for any other malformed field.
pub fn decode_failures_are_invalid_argument<B>(
    mut resp: tonic::codegen::http::Response<B>,
) -> tonic::codegen::http::Response<B> {
    let h = resp.headers();
    let internal = h.get("grpc-status").is_some_and(|v| v == "13");
    let decode = h
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|m| m.contains("decode"));
    if internal && decode {
        resp.headers_mut().insert(
            "grpc-status",
            tonic::codegen::http::HeaderValue::from_static("3"),
        );
    }
    resp
}

/// Every Ferry server's layer: authorization by `policy` (None: anyone may
/// call anything, the development mode) and decode failures answered
/// `InvalidArgument`.
pub type ServerLayer = crate::tls::authz::FerryLayer;

pub fn server_layer(policy: Option<std::sync::Arc<dyn crate::tls::authz::Policy>>) -> ServerLayer {
    crate::tls::authz::FerryLayer::new(policy)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_and_unix() {
        assert_eq!(
            "127.0.0.1:7700".parse::<Addr>().unwrap(),
            Addr::Tcp("127.0.0.1:7700".into())
        );
        assert_eq!(
            "http://h:1".parse::<Addr>().unwrap(),
            Addr::Tcp("h:1".into())
        );
        assert_eq!(
            "unix:/run/a.sock".parse::<Addr>().unwrap(),
            Addr::Unix("/run/a.sock".into())
        );
        assert!("unix:rel.sock".parse::<Addr>().is_err());
        assert!("nohost".parse::<Addr>().is_err());
        assert!("h:99999".parse::<Addr>().is_err());
    }
}
