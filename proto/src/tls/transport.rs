//! TLS 1.3/1.2 on every channel, with our own acceptor and connector
//! (tokio-rustls) so that:
//! - the server sees the client's certificate and hands the verified
//!   [`Peer`] to every request (`request.extensions().get::<PeerInfo>()`);
//! - a client without a certificate, or with one from another CA, expired or
//!   otherwise bad, still completes the handshake and then gets a gRPC
//!   status that says why (`Unauthenticated`), instead of a dead socket.
//!   The handshake itself always proves that the client holds the key of
//!   the certificate it presented (rustls checks its signature); the chain
//!   is checked right after, with the same WebPKI rules, before any request
//!   is served.
//! - a server presents its certificate and the CA, so a joining node can pin
//!   the CA by fingerprint (a join token) on its very first connection.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use super::pki::{self, Credentials, Identity};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls: {0}")]
    Config(String),
}

fn cfg_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

/// ring: builds with nothing but a C compiler. rustls deprecates its
/// default provider only for lacking post-quantum key exchange (aws-lc-rs
/// has it, at the cost of a much heavier build); the move is one line here.
#[allow(deprecated)]
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Who is on the other end of a connection a server accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// No TLS on this listener (the development mode: loopback or a unix
    /// socket only).
    Plain,
    /// TLS, no client certificate.
    Anonymous,
    /// TLS with a certificate that did not verify; the reason.
    Rejected(String),
    /// TLS with a certificate of this cluster's CA.
    Verified(Identity),
}

/// What tonic hands each request of a connection (its `ConnectInfo`).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub peer: Arc<Peer>,
    pub remote: Option<SocketAddr>,
}

fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut r = RootCertStore::empty();
    r.add(CertificateDer::from(pki::pem_der(ca_pem).map_err(cfg_err)?))
        .map_err(cfg_err)?;
    Ok(r)
}

fn chain_and_key(
    c: &Credentials,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let leaf = CertificateDer::from(pki::pem_der(&c.cert_pem).map_err(cfg_err)?);
    let ca = CertificateDer::from(pki::pem_der(&c.ca_pem).map_err(cfg_err)?);
    let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).map_err(cfg_err)?;
    Ok((vec![leaf, ca], key))
}

/// Takes any client chain at the handshake (the signature over the
/// handshake is still checked); the chain is judged after it, so a bad one
/// is answered with a status.
#[derive(Debug)]
struct JudgeLater(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for JudgeLater {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A server's TLS: its config and the verifier that judges client chains.
/// Clones share one slot, so [`ServerTls::reload`] swaps the certificate for
/// every later connection without a restart.
#[derive(Clone)]
pub struct ServerTls {
    inner: Arc<std::sync::RwLock<ServerInner>>,
}

#[derive(Clone)]
struct ServerInner {
    acceptor: tokio_rustls::TlsAcceptor,
    judge: Arc<dyn ClientCertVerifier>,
}

impl ServerTls {
    pub fn new(creds: &Credentials) -> Result<ServerTls, TlsError> {
        Ok(ServerTls {
            inner: Arc::new(std::sync::RwLock::new(Self::build(creds)?)),
        })
    }

    /// Serves new connections with `creds` from now on (a renewed certificate).
    pub fn reload(&self, creds: &Credentials) -> Result<(), TlsError> {
        let next = Self::build(creds)?;
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    fn build(creds: &Credentials) -> Result<ServerInner, TlsError> {
        let judge = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots(&creds.ca_pem)?),
            provider(),
        )
        .build()
        .map_err(cfg_err)?;
        let (chain, key) = chain_and_key(creds)?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(cfg_err)?
            .with_client_cert_verifier(Arc::new(JudgeLater(judge.clone())))
            .with_single_cert(chain, key)
            .map_err(cfg_err)?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(ServerInner {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
            judge,
        })
    }

    /// The handshake, then the verdict on the client's chain.
    pub async fn accept<IO>(
        &self,
        io: IO,
    ) -> std::io::Result<(tokio_rustls::server::TlsStream<IO>, Peer)>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let cur = self.inner.read().unwrap_or_else(|p| p.into_inner()).clone();
        let s = cur.acceptor.accept(io).await?;
        let peer = match s.get_ref().1.peer_certificates() {
            None | Some([]) => Peer::Anonymous,
            Some([leaf, rest @ ..]) => {
                match cur.judge.verify_client_cert(leaf, rest, UnixTime::now()) {
                    Err(e) => Peer::Rejected(e.to_string()),
                    Ok(_) => match pki::identity_of(leaf) {
                        Ok(id) => Peer::Verified(id),
                        Err(e) => Peer::Rejected(e.to_string()),
                    },
                }
            }
        };
        Ok((s, peer))
    }
}

/// A client's TLS: whom it trusts, what it presents, which name it expects.
#[derive(Clone)]
pub struct ClientTls {
    connector: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts `creds`' CA, presents its certificate, and expects a server
    /// certificate for `server_name` (a controller or a node).
    pub fn new(creds: &Credentials, server_name: &'static str) -> Result<ClientTls, TlsError> {
        let (chain, key) = chain_and_key(creds)?;
        let cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(cfg_err)?
            .with_root_certificates(roots(&creds.ca_pem)?)
            .with_client_auth_cert(chain, key)
            .map_err(cfg_err)?;
        Ok(ClientTls::from_config(cfg, server_name))
    }

    /// Joining: no certificate to present and no CA yet, only the CA's
    /// fingerprint from a join token. The server's chain must hold a CA
    /// with that fingerprint, and its certificate must verify against it.
    pub fn pinned(ca_fingerprint: &str, server_name: &'static str) -> Result<ClientTls, TlsError> {
        let cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(cfg_err)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCa {
                fingerprint: ca_fingerprint.to_ascii_lowercase(),
            }))
            .with_no_client_auth();
        Ok(ClientTls::from_config(cfg, server_name))
    }

    fn from_config(mut cfg: rustls::ClientConfig, server_name: &'static str) -> ClientTls {
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        ClientTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
            server_name: ServerName::try_from(server_name).unwrap_or_else(|_| {
                ServerName::try_from("invalid.ferry").unwrap_or(ServerName::IpAddress(
                    std::net::Ipv4Addr::UNSPECIFIED.into(),
                ))
            }),
        }
    }

    /// The same trust and certificate, for a server of another name.
    pub fn for_server(&self, server_name: &str) -> ClientTls {
        ClientTls {
            connector: self.connector.clone(),
            server_name: ServerName::try_from(server_name.to_string())
                .unwrap_or_else(|_| self.server_name.clone()),
        }
    }

    pub async fn connect<IO>(&self, io: IO) -> std::io::Result<tokio_rustls::client::TlsStream<IO>>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        self.connector.connect(self.server_name.clone(), io).await
    }
}

/// The join token's check of a server: its chain carries the pinned CA, and
/// its certificate verifies against that CA for the expected name.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| pki::fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General("the server's CA is not the one the join token names".into())
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        v.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = provider().signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algs)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = provider().signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
