//! Service addresses as operators write them, on both ends of a connection:
//! `HOST:PORT`, `http://HOST:PORT`, or `unix:/path/to.sock`.

use std::path::PathBuf;

use tonic::transport::{Channel, Endpoint};

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

pub async fn connect(addr: &Addr) -> Result<Channel, tonic::transport::Error> {
    match addr {
        Addr::Tcp(h) => {
            Endpoint::from_shared(format!("http://{h}"))?
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .connect()
                .await
        }
        Addr::Unix(p) => {
            let p = p.clone();
            // The URI is a placeholder: the connector below decides where to go.
            Endpoint::from_static("http://localhost")
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .connect_with_connector(tower::service_fn(move |_| {
                    let p = p.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(p).await?,
                        ))
                    }
                }))
                .await
        }
    }
}

/// Serves `router` on `addr` until SIGINT or SIGTERM: TCP on `HOST:PORT` (an IP
/// address), or a unix socket (a stale socket file is replaced). The router
/// is built with [`server_layer`], as every Ferry daemon's is.
pub async fn serve(
    router: tonic::transport::server::Router<
        tower::layer::util::Stack<ServerLayer, tower::layer::util::Identity>,
    >,
    addr: &Addr,
) -> Result<(), String> {
    match addr {
        Addr::Tcp(h) => {
            let sa: std::net::SocketAddr = h
                .parse()
                .map_err(|_| format!("{h}: listen needs IP:PORT"))?;
            router
                .serve_with_shutdown(sa, shutdown_signal())
                .await
                .map_err(|e| format!("serving on {h}: {e}"))
        }
        Addr::Unix(p) => {
            let _ = std::fs::remove_file(p);
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
            }
            let l = tokio::net::UnixListener::bind(p)
                .map_err(|e| format!("binding {}: {e}", p.display()))?;
            router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(l),
                    shutdown_signal(),
                )
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

/// [`decode_failures_are_invalid_argument`] as a layer for
/// `Server::builder().layer(..)`.
pub type ServerLayer = tower::util::MapResponseLayer<
    fn(
        tonic::codegen::http::Response<tonic::body::Body>,
    ) -> tonic::codegen::http::Response<tonic::body::Body>,
>;

pub fn server_layer() -> ServerLayer {
    tower::util::MapResponseLayer::new(decode_failures_are_invalid_argument::<tonic::body::Body>)
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
