//! Who may call what: one server layer for every Ferry daemon.
//!
//! Before a call reaches its handler, the layer asks the daemon's [`Policy`]
//! about the method and the connection's [`Peer`]; a refusal is answered
//! with its status (`Unauthenticated`: no or a bad certificate, or a revoked
//! one; `PermissionDenied`: a role that may not make this call) and the
//! handler never runs. A verified peer's [`Identity`] is put in the
//! request's extensions for handlers that check more (a node may speak only
//! for itself). The layer also answers a request that does not decode with
//! `InvalidArgument` (see [`crate::addr::decode_failures_are_invalid_argument`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::http;

use super::pki::{Identity, Role, UserRole};
use super::transport::{Peer, PeerInfo};

/// A daemon's rules.
pub trait Policy: Send + Sync + 'static {
    /// `path` is the gRPC method (`/ferry.agent.v1.AgentService/Exec`).
    fn check(&self, path: &str, peer: &Peer) -> Result<(), tonic::Status>;
}

/// The method name of a gRPC path (`Exec` of `/pkg.Service/Exec`).
pub fn method(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Whether a method only reads: `Get*`, `List*`, `Watch*`, `Read*`.
pub fn is_read(method: &str) -> bool {
    ["Get", "List", "Watch", "Read"]
        .iter()
        .any(|p| method.starts_with(p))
}

/// The identity of a peer that presented a good certificate, or the status
/// every other peer gets.
pub fn verified(peer: &Peer) -> Result<&Identity, tonic::Status> {
    match peer {
        Peer::Verified(id) => Ok(id),
        Peer::Anonymous => Err(tonic::Status::unauthenticated(
            "no client certificate: this cluster needs mutual TLS (ferryctl --credentials, or a node's join)",
        )),
        Peer::Rejected(why) => Err(tonic::Status::unauthenticated(format!(
            "client certificate refused: {why}"
        ))),
        Peer::Plain => Err(tonic::Status::unauthenticated(
            "a plaintext connection to a daemon that needs mutual TLS",
        )),
    }
}

/// An operator's reach: admins every call, viewers reads only.
pub fn user_may(role: &Role, method: &str) -> Option<bool> {
    match role {
        Role::User {
            role: UserRole::Admin,
            ..
        } => Some(true),
        Role::User {
            role: UserRole::Viewer,
            ..
        } => Some(is_read(method)),
        _ => None,
    }
}

pub fn denied(id: &Identity, method: &str) -> tonic::Status {
    tonic::Status::permission_denied(format!("{} may not call {method}", id.role))
}

#[derive(Clone, Default)]
pub struct FerryLayer {
    policy: Option<Arc<dyn Policy>>,
}

impl FerryLayer {
    /// `None`: every peer may call everything (development mode, plaintext).
    pub fn new(policy: Option<Arc<dyn Policy>>) -> FerryLayer {
        FerryLayer { policy }
    }
}

impl<S> tower::Layer<S> for FerryLayer {
    type Service = FerryService<S>;
    fn layer(&self, inner: S) -> FerryService<S> {
        FerryService {
            inner,
            policy: self.policy.clone(),
        }
    }
}

#[derive(Clone)]
pub struct FerryService<S> {
    inner: S,
    policy: Option<Arc<dyn Policy>>,
}

type Resp = http::Response<tonic::body::Body>;

impl<S, B> tower::Service<http::Request<B>> for FerryService<S>
where
    S: tower::Service<http::Request<B>, Response = Resp> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Resp;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Resp, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let peer = req
            .extensions()
            .get::<PeerInfo>()
            .map(|i| i.peer.clone())
            .unwrap_or_else(|| Arc::new(Peer::Plain));
        if let Some(p) = &self.policy {
            if let Err(st) = p.check(req.uri().path(), &peer) {
                tracing::warn!(method = req.uri().path(), peer = ?peer, status = %st.message(), "call refused");
                return Box::pin(async move { Ok(st.into_http()) });
            }
        }
        if let Peer::Verified(id) = peer.as_ref() {
            req.extensions_mut().insert(id.clone());
        }
        // The service that was made ready is the one that is called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let fut = inner.call(req);
        Box::pin(async move {
            fut.await
                .map(crate::addr::decode_failures_are_invalid_argument)
        })
    }
}
