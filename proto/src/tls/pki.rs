//! The cluster's certificate authority and the identities it vouches for.
//!
//! An identity lives in the certificate's subject alternative names, set by
//! the CA and never taken from a request:
//! - `URI:ferry://controller` + `DNS:controller.ferry`: a controller replica;
//! - `URI:ferry://node/<name>` + `DNS:node.ferry`: the agent of node `<name>`;
//! - `URI:ferry://user/<role>/<name>`: an operator, `admin` or `viewer`.
//!
//! Clients check a controller's certificate against the name
//! [`CONTROLLER_SERVER_NAME`] and an agent's against [`NODE_SERVER_NAME`],
//! or, when they know which node they dial (a controller does), against that
//! node's own [`node_server_name`]: what a daemon listens on (an IP, a unix
//! socket) plays no part.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};

pub const CONTROLLER_SERVER_NAME: &str = "controller.ferry";
pub const NODE_SERVER_NAME: &str = "node.ferry";

/// The name only node `node`'s certificate carries: what a controller,
/// which knows whom it dials, checks.
pub fn node_server_name(node: &str) -> String {
    format!("{node}.{NODE_SERVER_NAME}")
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate: {0}")]
    Cert(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn cert_err(e: impl std::fmt::Display) -> PkiError {
    PkiError::Cert(e.to_string())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UserRole {
    /// Every call.
    Admin,
    /// Reads only.
    Viewer,
}

impl UserRole {
    pub fn as_str(&self) -> &'static str {
        match self {
            UserRole::Admin => "admin",
            UserRole::Viewer => "viewer",
        }
    }
}

impl std::str::FromStr for UserRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(UserRole::Admin),
            "viewer" => Ok(UserRole::Viewer),
            _ => Err(format!("{s:?} is not a role (admin, viewer)")),
        }
    }
}

/// Who a certificate speaks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    Controller,
    Node(String),
    User { name: String, role: UserRole },
}

impl Role {
    fn uri(&self) -> String {
        match self {
            Role::Controller => "ferry://controller".into(),
            Role::Node(n) => format!("ferry://node/{n}"),
            Role::User { name, role } => format!("ferry://user/{}/{name}", role.as_str()),
        }
    }

    fn parse_uri(u: &str) -> Option<Role> {
        let rest = u.strip_prefix("ferry://")?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["controller"] => Some(Role::Controller),
            ["node", n] if !n.is_empty() => Some(Role::Node(n.to_string())),
            ["user", r, n] if !n.is_empty() => Some(Role::User {
                name: n.to_string(),
                role: r.parse().ok()?,
            }),
            _ => None,
        }
    }

    fn server_name(&self) -> Option<&'static str> {
        match self {
            Role::Controller => Some(CONTROLLER_SERVER_NAME),
            Role::Node(_) => Some(NODE_SERVER_NAME),
            Role::User { .. } => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Controller => write!(f, "controller"),
            Role::Node(n) => write!(f, "node {n}"),
            Role::User { name, role } => write!(f, "user {name} ({})", role.as_str()),
        }
    }
}

/// A verified peer: its role and its certificate's SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    pub fingerprint: String,
}

/// SHA-256 of DER bytes, hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The identity a certificate carries (its chain is the caller's to check).
pub fn identity_of(cert_der: &[u8]) -> Result<Identity, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::Invalid(format!("unreadable certificate: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::Invalid(format!("bad subject alternative names: {e}")))?
        .ok_or_else(|| PkiError::Invalid("the certificate names no Ferry identity".into()))?;
    let role = san
        .value
        .general_names
        .iter()
        .find_map(|g| match g {
            x509_parser::extensions::GeneralName::URI(u) => Role::parse_uri(u),
            _ => None,
        })
        .ok_or_else(|| PkiError::Invalid("the certificate names no Ferry identity".into()))?;
    Ok(Identity {
        role,
        fingerprint: fingerprint(cert_der),
    })
}

/// How far before its issue a certificate is valid: slack for clocks a few
/// minutes apart.
const BACKDATE: time::Duration = time::Duration::minutes(10);

/// How long certificates the CA issues are valid.
pub const CERT_VALIDITY: time::Duration = time::Duration::days(365);

/// How long a daemon's (node's, replica's) certificate is valid: a year, or
/// `FERRY_CERT_VALIDITY_SECS` (for tests of rotation: the daemons renew
/// theirs when a third of it is left).
pub fn daemon_cert_validity() -> time::Duration {
    std::env::var("FERRY_CERT_VALIDITY_SECS")
        .ok()
        .and_then(|v| v.parse::<i64>().ok())
        .filter(|s| *s >= 10)
        .map(time::Duration::seconds)
        .unwrap_or(CERT_VALIDITY)
}

/// A certificate's validity: (not before, not after), Unix seconds.
pub fn validity(cert_pem: &str) -> Result<(i64, i64), PkiError> {
    let der = pem_der(cert_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| PkiError::Invalid(format!("unreadable certificate: {e}")))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// Whether a certificate is due for renewal: less than a third of its
/// lifetime left. Also the interval to check at (a tenth of it, 1 s to 1 h).
pub fn renewal_due(cert_pem: &str) -> Result<(bool, std::time::Duration), PkiError> {
    let (from, until) = validity(cert_pem)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    // Measured from when it was issued, not from the back-dated start.
    let life = (until - from - BACKDATE.whole_seconds()).max(1);
    let every = std::time::Duration::from_secs(((life / 10).clamp(1, 3600)) as u64);
    Ok((until - now < life / 3, every))
}
const CA_VALIDITY: time::Duration = time::Duration::days(3650);

fn leaf_params(role: &Role, validity: time::Duration) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, role.to_string());
    p.distinguished_name = dn;
    let ia5 = |s: String| s.try_into().map_err(cert_err);
    p.subject_alt_names = vec![SanType::URI(ia5(role.uri())?)];
    if let Some(n) = role.server_name() {
        p.subject_alt_names
            .push(SanType::DnsName(ia5(n.to_string())?));
    }
    if let Role::Node(n) = role {
        p.subject_alt_names
            .push(SanType::DnsName(ia5(node_server_name(n))?));
    }
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks a few minutes apart.
    p.not_before = now - BACKDATE;
    p.not_after = now + validity;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// The cluster CA: its certificate and private key, PEM.
pub struct Ca {
    pub cert_pem: String,
    key_pem: String,
}

pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";

impl Ca {
    pub fn generate(cluster: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Ferry cluster CA {cluster}"));
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::minutes(10);
        p.not_after = now + CA_VALIDITY;
        let cert = p.self_signed(&key).map_err(cert_err)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    pub fn from_pem(cert_pem: String, key_pem: String) -> Ca {
        Ca { cert_pem, key_pem }
    }

    /// The key, PEM: only ever sent to a joining controller replica.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Reads `dir/ca.crt` and `dir/ca.key`.
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let (c, k) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
        Ok(Ca {
            cert_pem: std::fs::read_to_string(&c).map_err(io_err(&c))?,
            key_pem: std::fs::read_to_string(&k).map_err(io_err(&k))?,
        })
    }

    /// Writes `dir/ca.crt` and `dir/ca.key` (0600).
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        write_private(&dir.join(CA_KEY_FILE), &self.key_pem)?;
        write_private(&dir.join(CA_CERT_FILE), &self.cert_pem)
    }

    /// SHA-256 of the CA certificate: what a join token pins.
    pub fn fingerprint(&self) -> Result<String, PkiError> {
        Ok(fingerprint(&pem_der(&self.cert_pem)?))
    }

    fn issuer(&self) -> Result<(rcgen::Certificate, KeyPair), PkiError> {
        let key = KeyPair::from_pem(&self.key_pem).map_err(cert_err)?;
        let params = CertificateParams::from_ca_cert_pem(&self.cert_pem).map_err(cert_err)?;
        let cert = params.self_signed(&key).map_err(cert_err)?;
        Ok((cert, key))
    }

    /// A certificate for `role` over the public key of `csr_pem`. Nothing
    /// else of the request is used: the CA alone says who it is.
    pub fn sign_request(
        &self,
        role: &Role,
        csr_pem: &str,
        validity: time::Duration,
    ) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Invalid(format!("csr: {e}")))?;
        let (issuer, key) = self.issuer()?;
        let cert = leaf_params(role, validity)?
            .signed_by(&csr.public_key, &issuer, &key)
            .map_err(cert_err)?;
        Ok(cert.pem())
    }

    /// Credentials for `role`, key made here (for users and tests).
    pub fn issue(&self, role: &Role, validity: time::Duration) -> Result<Credentials, PkiError> {
        let (key_pem, csr) = new_request()?;
        Ok(Credentials {
            ca_pem: self.cert_pem.clone(),
            cert_pem: self.sign_request(role, &csr, validity)?,
            key_pem,
        })
    }
}

/// A fresh key and a certificate request for it (the key never leaves the
/// caller).
pub fn new_request() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(cert_err)?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .map_err(cert_err)?
        .pem()
        .map_err(cert_err)?;
    Ok((key.serialize_pem(), csr))
}

/// The first certificate of a PEM text, DER.
pub fn pem_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| PkiError::Invalid(format!("no certificate in PEM: {e}")))
}

/// What a daemon or an operator holds: the cluster CA, its own certificate
/// and key. One file (a "bundle"): the three PEM blocks in that order.
#[derive(Clone)]
pub struct Credentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity().map(|i| i.role).ok())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn identity(&self) -> Result<Identity, PkiError> {
        identity_of(&pem_der(&self.cert_pem)?)
    }

    pub fn to_bundle(&self) -> String {
        format!(
            "# Ferry credentials: cluster CA, certificate, private key. Keep private.\n{}{}{}",
            self.ca_pem, self.cert_pem, self.key_pem
        )
    }

    /// Parses a bundle: the first certificate is the CA, the second this
    /// holder's, then its key.
    pub fn from_bundle(text: &str) -> Result<Credentials, PkiError> {
        let mut certs = Vec::new();
        let mut key = None;
        for (label, block) in pem_blocks(text) {
            if label == "CERTIFICATE" {
                certs.push(block);
            } else if label.ends_with("PRIVATE KEY") {
                key = Some(block);
            }
        }
        match (certs.as_slice(), key) {
            ([ca, cert], Some(key)) => Ok(Credentials {
                ca_pem: ca.clone(),
                cert_pem: cert.clone(),
                key_pem: key,
            }),
            _ => Err(PkiError::Invalid(
                "a credentials bundle holds the CA certificate, a certificate and its key".into(),
            )),
        }
    }

    pub fn load(path: &Path) -> Result<Credentials, PkiError> {
        let t = std::fs::read_to_string(path).map_err(io_err(path))?;
        Credentials::from_bundle(&t)
            .map_err(|e| PkiError::Invalid(format!("{}: {e}", path.display())))
    }

    /// Writes the bundle, 0600.
    pub fn save(&self, path: &Path) -> Result<(), PkiError> {
        write_private(path, &self.to_bundle())
    }
}

/// The PEM blocks of a text: (label, the block with its BEGIN/END lines).
fn pem_blocks(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur: Option<(String, String)> = None;
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(l) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
        {
            cur = Some((l.to_string(), format!("{line}\n")));
        } else if let Some((label, mut block)) = cur.take() {
            block.push_str(line);
            block.push('\n');
            if line == format!("-----END {label}-----") {
                out.push((label, block));
            } else {
                cur = Some((label, block));
            }
        }
    }
    out
}

/// Writes `text` to `path` with mode 0600 from the start.
pub fn write_private(path: &Path, text: &str) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(io_err(d))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_and_bundles_parse() {
        let ca = Ca::generate("t").unwrap();
        for role in [
            Role::Controller,
            Role::Node("node5".into()),
            Role::User {
                name: "ann".into(),
                role: UserRole::Viewer,
            },
        ] {
            let c = ca.issue(&role, CERT_VALIDITY).unwrap();
            let back = Credentials::from_bundle(&c.to_bundle()).unwrap();
            assert_eq!(back.identity().unwrap().role, role);
            assert_eq!(back.ca_pem, c.ca_pem);
        }
        assert_eq!(ca.fingerprint().unwrap().len(), 64);
    }

    #[test]
    fn a_request_cannot_choose_its_identity() {
        let ca = Ca::generate("t").unwrap();
        // The request asks to be a controller; the CA signs it as node n1.
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI("ferry://controller".try_into().unwrap())];
        let csr = p.serialize_request(&key).unwrap().pem().unwrap();
        let pem = ca
            .sign_request(&Role::Node("n1".into()), &csr, CERT_VALIDITY)
            .unwrap();
        assert_eq!(
            identity_of(&pem_der(&pem).unwrap()).unwrap().role,
            Role::Node("n1".into())
        );
    }
}
