//! Trust: join tokens, nodes and replicas joining with them, operators'
//! credentials and their revocation, and the rule of who may call what
//! ([`ControllerPolicy`]). Certificates are issued only here, by the CA the
//! `--init` replica made and every joined replica holds.

use std::sync::Arc;

use ferry_proto::controller::v1 as cpb;
use ferry_proto::tls::authz::{self, Policy};
use ferry_proto::tls::pki::{daemon_cert_validity, CERT_VALIDITY};
use ferry_proto::tls::{Ca, Credentials, Identity, JoinToken, Peer, Role, UserRole};

use super::{applied, now_ms};
use crate::error::ControllerError;
use crate::host::Controller;
use crate::state::security::{SecurityCmd, TokenKind};
use crate::state::{RejectCode, Request, Response};

/// A TLS replica's CA and its own credentials.
pub struct ControllerPki {
    pub ca: Ca,
    pub creds: Credentials,
}

const MAX_TTL_SECS: u32 = 7 * 24 * 3600;

fn pki(ctl: &Controller) -> Result<&ControllerPki, ControllerError> {
    ctl.pki.as_deref().ok_or_else(|| ControllerError::Rejected {
        code: RejectCode::FailedPrecondition,
        message: "this controller runs without TLS (--insecure-dev): it has no CA".into(),
    })
}

fn kind_of(k: i32) -> Result<TokenKind, ControllerError> {
    match cpb::JoinKind::try_from(k) {
        Ok(cpb::JoinKind::Node) => Ok(TokenKind::Node),
        Ok(cpb::JoinKind::Controller) => Ok(TokenKind::Controller),
        Err(_) => Err(ControllerError::invalid(
            "kind",
            format!("unknown join kind {k}"),
        )),
    }
}

pub async fn create_token(
    ctl: &Controller,
    r: cpb::CreateJoinTokenRequest,
) -> Result<cpb::CreateJoinTokenResponse, ControllerError> {
    let kind = kind_of(r.kind)?;
    let ttl = match r.ttl_secs {
        0 => 3600,
        t if t > MAX_TTL_SECS => {
            return Err(ControllerError::invalid(
                "ttl_secs",
                format!("at most {MAX_TTL_SECS} (7 days)"),
            ))
        }
        t => t,
    };
    let fp = pki(ctl)?
        .ca
        .fingerprint()
        .map_err(|e| ControllerError::Storage(e.to_string()))?;
    let token = JoinToken::generate(&fp).map_err(ControllerError::Storage)?;
    let now = now_ms();
    let expires_ms = now + ttl as i64 * 1000;
    let m = ctl.member().await?;
    applied(
        m.propose(Request::Security(SecurityCmd::AddToken {
            hash: token.secret_hash(),
            kind,
            expires_ms,
            now_ms: now,
        }))
        .await?,
    )?;
    Ok(cpb::CreateJoinTokenResponse {
        token: token.to_string(),
        expires_unix: expires_ms / 1000,
    })
}

/// Checks a token against this cluster and, in this replica's state (after
/// a read barrier), the token's own record and `fits`; only then signs the
/// request and takes the token in Raft. A made-up token, which anyone who
/// reaches the port can send, costs no signature and no Raft entry; a refused
/// join issues nothing and leaves the token as it was.
async fn join(
    ctl: &Controller,
    r: &cpb::JoinRequest,
    kind: TokenKind,
    role: Role,
    by: String,
    fits: impl FnOnce(&crate::state::ClusterState) -> Result<(), ControllerError>,
) -> Result<cpb::JoinResponse, ControllerError> {
    let token: JoinToken = r
        .token
        .parse()
        .map_err(|e: String| ControllerError::invalid("token", e))?;
    let p = pki(ctl)?;
    let fp =
        p.ca.fingerprint()
            .map_err(|e| ControllerError::Storage(e.to_string()))?;
    if token.ca_fingerprint != fp {
        return Err(ControllerError::invalid(
            "token",
            "it names another cluster's CA",
        ));
    }
    let m = ctl.member().await?;
    m.read_barrier().await?;
    m.sm.read(|a| {
        a.state
            .security
            .check_token(&token.secret_hash(), kind, now_ms())
            .map_err(|(code, message)| ControllerError::Rejected { code, message })?;
        fits(&a.state)
    })?;
    let cert_pem =
        p.ca.sign_request(&role, &r.csr_pem, daemon_cert_validity())
            .map_err(|e| ControllerError::invalid("csr_pem", e.to_string()))?;
    applied(
        m.propose(Request::Security(SecurityCmd::UseToken {
            hash: token.secret_hash(),
            kind,
            by,
            now_ms: now_ms(),
        }))
        .await?,
    )?;
    Ok(cpb::JoinResponse {
        cert_pem,
        ca_pem: p.ca.cert_pem.clone(),
        ca_key_pem: String::new(),
    })
}

pub async fn join_node(
    ctl: &Controller,
    r: cpb::JoinRequest,
) -> Result<cpb::JoinResponse, ControllerError> {
    ferry_proto::names::check_dns_label(&r.name)
        .map_err(|e| ControllerError::invalid("name", e))?;
    let name = r.name.clone();
    // A token is for a new node: it may not take over a registered name.
    let fits = |s: &crate::state::ClusterState| {
        if s.nodes.contains_key(&name) {
            return Err(ControllerError::Rejected {
                code: RejectCode::AlreadyExists,
                message: format!("node {name:?} is registered already; join under a new name"),
            });
        }
        Ok(())
    };
    join(
        ctl,
        &r,
        TokenKind::Node,
        Role::Node(r.name.clone()),
        r.name.clone(),
        fits,
    )
    .await
}

pub async fn join_controller(
    ctl: &Controller,
    r: cpb::JoinRequest,
) -> Result<cpb::JoinResponse, ControllerError> {
    let mut resp = join(
        ctl,
        &r,
        TokenKind::Controller,
        Role::Controller,
        "controller".into(),
        |_| Ok(()),
    )
    .await?;
    resp.ca_key_pem = pki(ctl)?.ca.key_pem().to_string();
    Ok(resp)
}

/// A node or replica's new certificate for its own identity (the caller's,
/// proven by the certificate it calls with), over its new key.
pub async fn renew(
    ctl: &Controller,
    caller: Option<&Identity>,
    r: cpb::JoinRequest,
) -> Result<cpb::JoinResponse, ControllerError> {
    let role = match caller.map(|c| &c.role) {
        Some(r @ (Role::Node(_) | Role::Controller)) => r.clone(),
        _ => {
            return Err(ControllerError::Rejected {
                code: RejectCode::FailedPrecondition,
                message: "only a node or a replica renews its certificate this way".into(),
            })
        }
    };
    let p = pki(ctl)?;
    let cert_pem =
        p.ca.sign_request(&role, &r.csr_pem, daemon_cert_validity())
            .map_err(|e| ControllerError::invalid("csr_pem", e.to_string()))?;
    tracing::info!(%role, "certificate renewed");
    Ok(cpb::JoinResponse {
        cert_pem,
        ca_pem: p.ca.cert_pem.clone(),
        ca_key_pem: String::new(),
    })
}

pub async fn add_user(
    ctl: &Controller,
    r: cpb::AddUserRequest,
) -> Result<cpb::AddUserResponse, ControllerError> {
    ferry_proto::names::check_dns_label(&r.name)
        .map_err(|e| ControllerError::invalid("name", e))?;
    let role: UserRole = r
        .role
        .parse()
        .map_err(|e: String| ControllerError::invalid("role", e))?;
    let creds = pki(ctl)?
        .ca
        .issue(
            &Role::User {
                name: r.name.clone(),
                role,
            },
            CERT_VALIDITY,
        )
        .map_err(|e| ControllerError::Storage(e.to_string()))?;
    let fingerprint = creds
        .identity()
        .map_err(|e| ControllerError::Storage(e.to_string()))?
        .fingerprint;
    let m = ctl.member().await?;
    applied(
        m.propose(Request::Security(SecurityCmd::AddUser {
            name: r.name,
            fingerprint,
            now_ms: now_ms(),
        }))
        .await?,
    )?;
    Ok(cpb::AddUserResponse {
        bundle: creds.to_bundle(),
    })
}

pub async fn revoke_user(
    ctl: &Controller,
    r: cpb::RevokeUserRequest,
) -> Result<cpb::RevokeUserResponse, ControllerError> {
    let m = ctl.member().await?;
    match applied(
        m.propose(Request::Security(SecurityCmd::RevokeUser {
            name: r.name,
            now_ms: now_ms(),
        }))
        .await?,
    )? {
        Response::Revoked(n) => Ok(cpb::RevokeUserResponse { revoked: n }),
        r => Err(ControllerError::Raft(format!("unexpected {r:?}"))),
    }
}

/// A node may speak only for itself: `name` is what the call says it is.
pub fn node_speaks_for(id: Option<&Identity>, name: &str) -> Result<(), tonic::Status> {
    match id.map(|i| &i.role) {
        Some(Role::Node(n)) if n != name => Err(tonic::Status::permission_denied(format!(
            "node {n} may speak only for itself, not for {name:?}"
        ))),
        _ => Ok(()),
    }
}

/// A node may decide only a migration it takes part in (its source or its
/// target); one decided already only reads its answer, which anyone may.
pub async fn node_in_migration(
    ctl: &Controller,
    id: Option<&Identity>,
    r: &cpb::DecideMigrationRequest,
) -> Result<(), tonic::Status> {
    let Some(Role::Node(n)) = id.map(|i| &i.role) else {
        return Ok(());
    };
    let m = ctl.member().await?;
    let ok = m.sm.read(|a| {
        a.state.vps.get(&r.name).is_some_and(|v| {
            v.node == *n
                || v.migration
                    .as_ref()
                    .is_some_and(|mg| mg.id == r.migration_id && mg.target == *n)
                || v.last_migration
                    .as_ref()
                    .is_some_and(|o| o.id == r.migration_id)
        })
    });
    if ok {
        Ok(())
    } else {
        Err(tonic::Status::permission_denied(format!(
            "node {n} takes no part in migration {} of {}",
            r.migration_id, r.name
        )))
    }
}

/// A node may report only the end of a move it took part in (its source or
/// its target, as the VPS's move history records them).
pub async fn node_in_move(
    ctl: &Controller,
    id: Option<&Identity>,
    name: &str,
    migration_id: &str,
) -> Result<(), tonic::Status> {
    let Some(Role::Node(n)) = id.map(|i| &i.role) else {
        return Ok(());
    };
    let m = ctl.member().await?;
    let ok = m.sm.read(|a| {
        a.state.vps.get(name).is_some_and(|v| {
            v.history
                .iter()
                .any(|h| h.id == migration_id && (h.source == *n || h.target == *n))
        })
    });
    if ok {
        Ok(())
    } else {
        Err(tonic::Status::permission_denied(format!(
            "node {n} takes no part in migration {migration_id} of {name}"
        )))
    }
}

/// Who may call what on a controller.
pub struct ControllerPolicy {
    pub ctl: Arc<Controller>,
}

impl ControllerPolicy {
    fn revoked(&self, fingerprint: &str) -> bool {
        self.ctl.revoked(fingerprint)
    }
}

impl Policy for ControllerPolicy {
    fn check(&self, path: &str, peer: &Peer) -> Result<(), tonic::Status> {
        let m = authz::method(path);
        let raft = path.starts_with("/ferry.controller.v1.RaftService/");
        // A joiner has no certificate yet: its token is checked inside.
        if !raft && matches!(m, "JoinNode" | "JoinController") {
            return Ok(());
        }
        let id = authz::verified(peer)?;
        if self.revoked(&id.fingerprint) {
            return Err(tonic::Status::unauthenticated(format!(
                "the certificate of {} is revoked",
                id.role
            )));
        }
        let ok = match &id.role {
            Role::Controller => true,
            _ if raft => false,
            Role::Node(_) => matches!(
                m,
                "RegisterNode"
                    | "Heartbeat"
                    | "DecideMigration"
                    | "FinishMigration"
                    | "RenewCertificate"
            ),
            Role::User { .. } => {
                authz::user_may(&id.role, m).unwrap_or(false) || m == "ClusterStatus"
            }
        };
        if ok {
            Ok(())
        } else {
            Err(authz::denied(id, m))
        }
    }
}
