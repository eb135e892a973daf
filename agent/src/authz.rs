//! Who may call what on an agent (with mutual TLS; `--insecure-dev` has no
//! rule). Revoked certificates are refused here too, by the list the
//! controller sends with every heartbeat answer. Controllers give the orders; admins may do anything, viewers only
//! read; another node may only drive a migration into this one, and only the
//! one it prepared ([`crate::vps::Agent::migrate_prepare`] records who).

use ferry_proto::tls::authz::{self, Policy};
use ferry_proto::tls::{Identity, Peer, Role, UserRole};

use crate::error::{AgentError, Result};

/// The target-side calls of a migration, which the source agent makes.
const MIGRATION_TARGET: &[&str] = &[
    "MigratePrepare",
    "MigratePush",
    "MigrateRestore",
    "MigrateFinish",
    "TreeDigest",
];

/// Fingerprints of revoked certificates, as the controller last sent them
/// (with each heartbeat answer; a node-local agent has none).
static REVOKED: std::sync::RwLock<std::collections::BTreeSet<String>> =
    std::sync::RwLock::new(std::collections::BTreeSet::new());

/// Replaces the revocation list.
pub fn set_revoked(list: Vec<String>) {
    let mut g = REVOKED.write().unwrap_or_else(|p| p.into_inner());
    if g.len() != list.len() || list.iter().any(|f| !g.contains(f)) {
        *g = list.into_iter().collect();
    }
}

fn revoked(fingerprint: &str) -> bool {
    REVOKED
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .contains(fingerprint)
}

pub struct AgentPolicy;

impl Policy for AgentPolicy {
    fn check(&self, path: &str, peer: &Peer) -> std::result::Result<(), tonic::Status> {
        let id = authz::verified(peer)?;
        if revoked(&id.fingerprint) {
            return Err(tonic::Status::unauthenticated(format!(
                "the certificate of {} is revoked",
                id.role
            )));
        }
        let m = authz::method(path);
        let ok = match &id.role {
            Role::Controller => true,
            Role::Node(_) => MIGRATION_TARGET.contains(&m) || m == "ExportTemplate",
            Role::User { .. } => authz::user_may(&id.role, m).unwrap_or(false),
        };
        if ok {
            Ok(())
        } else {
            Err(authz::denied(id, m))
        }
    }
}

/// Whether `caller` may go on with a migration that `owner` prepared: the
/// same node, or a controller or an admin. No owner: the development mode.
pub fn may_drive(owner: Option<&Role>, caller: Option<&Identity>, id: &str) -> Result<()> {
    let (Some(owner), Some(caller)) = (owner, caller) else {
        return Ok(());
    };
    let ok = match &caller.role {
        Role::Controller
        | Role::User {
            role: UserRole::Admin,
            ..
        } => true,
        r => r == owner,
    };
    if ok {
        Ok(())
    } else {
        Err(AgentError::PermissionDenied(format!(
            "migration {id} was prepared by {owner}, not {}",
            caller.role
        )))
    }
}
