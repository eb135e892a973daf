//! Joining a cluster with a token: a fresh key and certificate request made
//! here (the key never leaves), a TLS connection that trusts only the CA the
//! token names, then the controller's certificate for us.

use super::pki::{self, Credentials};
use super::{ClientTls, JoinToken};
use crate::addr::{self, Addr};
use crate::controller::v1 as cpb;

/// What joining gave: our credentials, and for a controller replica the CA
/// key too.
pub struct Joined {
    pub creds: Credentials,
    pub ca_key_pem: Option<String>,
}

/// Joins through the controller at `via`. `name`: the node's name (empty for
/// a controller replica).
pub async fn join(
    via: &Addr,
    token: &str,
    kind: cpb::JoinKind,
    name: &str,
) -> Result<Joined, String> {
    let t: JoinToken = token.parse()?;
    let (key_pem, csr_pem) = pki::new_request().map_err(|e| e.to_string())?;
    let tls = ClientTls::pinned(&t.ca_fingerprint, pki::CONTROLLER_SERVER_NAME)
        .map_err(|e| e.to_string())?;
    let ch = addr::connect_with(via, Some(&tls)).await.map_err(|e| {
        format!("reaching the controller at {via} (is it the cluster the token names?): {e}")
    })?;
    let mut c = crate::limits::controller_client(ch);
    let req = cpb::JoinRequest {
        token: token.trim().to_string(),
        name: name.to_string(),
        csr_pem,
    };
    let r = match kind {
        cpb::JoinKind::Node => c.join_node(req).await,
        cpb::JoinKind::Controller => c.join_controller(req).await,
    }
    .map_err(|s| format!("the controller refused the join: {}", s.message()))?
    .into_inner();
    // The CA it sent must be the one the token pinned.
    let ca_fp = pki::fingerprint(&pki::pem_der(&r.ca_pem).map_err(|e| e.to_string())?);
    if ca_fp != t.ca_fingerprint {
        return Err("the controller sent a CA other than the token's".into());
    }
    Ok(Joined {
        creds: Credentials {
            ca_pem: r.ca_pem,
            cert_pem: r.cert_pem,
            key_pem,
        },
        ca_key_pem: (!r.ca_key_pem.is_empty()).then_some(r.ca_key_pem),
    })
}
