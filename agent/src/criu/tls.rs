//! TLS for CRIU's own page-server socket (post-copy: the target's
//! `criu lazy-pages` fetches the VPS's memory from the source's page server,
//! a connection CRIU opens itself, outside the agents' gRPC channel). CRIU
//! speaks TLS there with GnuTLS given PEM files: the node's certificate and
//! key and the cluster CA, written once at start from the node's credentials.
//! CRIU would check the peer's name against the IP address it dialled, which
//! a Ferry certificate does not carry (it names `node.ferry`), so name checks
//! are off: any certificate of this cluster's CA is accepted, the same trust
//! the agents' own channel gives another node.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The files CRIU reads.
#[derive(Debug, Clone)]
pub struct CriuTls {
    pub cacert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

static TLS: OnceLock<CriuTls> = OnceLock::new();

/// Writes the node's credentials for CRIU into `dir` (0600) and makes every
/// later page-server connection use them.
pub fn enable(dir: &Path, creds: &ferry_proto::tls::Credentials) -> Result<(), String> {
    let t = CriuTls {
        cacert: dir.join("ca.crt"),
        cert: dir.join("node.crt"),
        key: dir.join("node.key"),
    };
    for (p, text) in [
        (&t.cacert, &creds.ca_pem),
        (&t.cert, &creds.cert_pem),
        (&t.key, &creds.key_pem),
    ] {
        ferry_proto::tls::pki::write_private(p, text).map_err(|e| e.to_string())?;
    }
    TLS.set(t)
        .map_err(|_| "CRIU's TLS is set once per process".to_string())
}

/// Rewrites the files with renewed credentials (CRIU reads them per run).
pub fn refresh(creds: &ferry_proto::tls::Credentials) -> Result<(), String> {
    let Some(t) = TLS.get() else { return Ok(()) };
    for (p, text) in [
        (&t.cacert, &creds.ca_pem),
        (&t.cert, &creds.cert_pem),
        (&t.key, &creds.key_pem),
    ] {
        ferry_proto::tls::pki::write_private(p, text).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The files, when this agent runs with mutual TLS.
pub fn get() -> Option<&'static CriuTls> {
    TLS.get()
}

/// `criu lazy-pages` flags for a TLS connection to the page server.
pub fn args(t: &CriuTls) -> Vec<String> {
    let s = |p: &PathBuf| p.to_string_lossy().into_owned();
    vec![
        "--tls".into(),
        "--tls-cacert".into(),
        s(&t.cacert),
        "--tls-cert".into(),
        s(&t.cert),
        "--tls-key".into(),
        s(&t.key),
        "--tls-no-cn-verify".into(),
    ]
}
