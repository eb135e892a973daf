//! Trust kept in Raft, so every replica answers alike: join tokens (only the
//! secret's hash, its kind and expiry; taken once) and operators'
//! certificates (by name, so revoking a name revokes them all).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{reject, ClusterState, RejectCode, Response};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum TokenKind {
    Node,
    Controller,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub kind: TokenKind,
    pub expires_ms: i64,
    /// Who took it (a node's name, a replica's address), once taken.
    pub used_by: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Security {
    /// Secret hash → token.
    pub tokens: BTreeMap<String, TokenRecord>,
    /// Operator name → fingerprints of the certificates issued to it.
    pub users: BTreeMap<String, Vec<String>>,
    /// Fingerprints no call is taken from.
    pub revoked: BTreeSet<String>,
}

impl Security {
    /// Whether token `hash` may be taken now for `kind`; the one rule, used
    /// by the command and by the controller's check before any work.
    pub fn check_token(
        &self,
        hash: &str,
        kind: TokenKind,
        now_ms: i64,
    ) -> Result<(), (RejectCode, String)> {
        let Some(t) = self.tokens.get(hash) else {
            return Err((
                RejectCode::NotFound,
                "token: unknown (made by another cluster, or forgotten)".into(),
            ));
        };
        if t.kind != kind {
            return Err((
                RejectCode::InvalidArgument,
                format!("token: a {:?} token", t.kind),
            ));
        }
        if let Some(u) = &t.used_by {
            return Err((
                RejectCode::FailedPrecondition,
                format!("token: already used (by {u}); tokens are single-use"),
            ));
        }
        if t.expires_ms <= now_ms {
            return Err((RejectCode::FailedPrecondition, "token: expired".into()));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum SecurityCmd {
    AddToken {
        hash: String,
        kind: TokenKind,
        expires_ms: i64,
        now_ms: i64,
    },
    /// Takes a token for `by`: refused if unknown, of another kind, used or
    /// expired.
    UseToken {
        hash: String,
        kind: TokenKind,
        by: String,
        now_ms: i64,
    },
    AddUser {
        name: String,
        fingerprint: String,
        now_ms: i64,
    },
    RevokeUser {
        name: String,
        now_ms: i64,
    },
}

/// Tokens that expired this long ago are forgotten.
const TOKEN_KEEP_MS: i64 = 24 * 3600 * 1000;

impl ClusterState {
    pub(super) fn apply_security(&mut self, c: SecurityCmd) -> Response {
        match c {
            SecurityCmd::AddToken {
                hash,
                kind,
                expires_ms,
                now_ms,
            } => {
                let sec = &mut self.security;
                sec.tokens
                    .retain(|_, t| t.expires_ms + TOKEN_KEEP_MS > now_ms);
                sec.tokens.insert(
                    hash,
                    TokenRecord {
                        kind,
                        expires_ms,
                        used_by: None,
                    },
                );
                self.events.push(
                    now_ms,
                    "security",
                    "token",
                    format!("{kind:?} join token made"),
                );
                Response::Ok
            }
            SecurityCmd::UseToken {
                hash,
                kind,
                by,
                now_ms,
            } => {
                if let Err((code, msg)) = self.security.check_token(&hash, kind, now_ms) {
                    return reject(code, msg);
                }
                if let Some(t) = self.security.tokens.get_mut(&hash) {
                    t.used_by = Some(by.clone());
                }
                self.events.push(
                    now_ms,
                    "security",
                    &by,
                    format!("joined with a {kind:?} token"),
                );
                Response::Ok
            }
            SecurityCmd::AddUser {
                name,
                fingerprint,
                now_ms,
            } => {
                self.security
                    .users
                    .entry(name.clone())
                    .or_default()
                    .push(fingerprint);
                self.events
                    .push(now_ms, "security", &name, "credentials issued".to_string());
                Response::Ok
            }
            SecurityCmd::RevokeUser { name, now_ms } => {
                let Some(fps) = self.security.users.remove(&name) else {
                    return reject(RejectCode::NotFound, format!("user {name:?} not found"));
                };
                let n = fps.len();
                self.security.revoked.extend(fps);
                self.events.push(
                    now_ms,
                    "security",
                    &name,
                    format!("{n} certificate(s) revoked"),
                );
                Response::Revoked(n as u32)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn use_token(s: &mut ClusterState, kind: TokenKind, now_ms: i64) -> Response {
        s.apply_security(SecurityCmd::UseToken {
            hash: "h".into(),
            kind,
            by: "n1".into(),
            now_ms,
        })
    }

    /// A state holding one node token "h" that expires at 1000 ms.
    fn with_token() -> ClusterState {
        let mut s = ClusterState::default();
        s.apply_security(SecurityCmd::AddToken {
            hash: "h".into(),
            kind: TokenKind::Node,
            expires_ms: 1000,
            now_ms: 0,
        });
        s
    }

    #[test]
    fn a_token_is_taken_once_before_it_expires_and_only_for_its_kind() {
        let mut s = with_token();
        assert!(matches!(
            use_token(&mut s, TokenKind::Controller, 10),
            Response::Rejected { .. }
        ));
        assert_eq!(use_token(&mut s, TokenKind::Node, 10), Response::Ok);
        assert!(matches!(
            use_token(&mut s, TokenKind::Node, 20),
            Response::Rejected {
                code: RejectCode::FailedPrecondition,
                ..
            }
        ));
        let mut s = with_token();
        assert!(matches!(
            use_token(&mut s, TokenKind::Node, 1000),
            Response::Rejected {
                code: RejectCode::FailedPrecondition,
                ..
            }
        ));
    }

    #[test]
    fn revoking_a_user_revokes_every_certificate_it_had() {
        let mut s = ClusterState::default();
        for fp in ["a", "b"] {
            s.apply_security(SecurityCmd::AddUser {
                name: "ann".into(),
                fingerprint: fp.into(),
                now_ms: 0,
            });
        }
        assert_eq!(
            s.apply_security(SecurityCmd::RevokeUser {
                name: "ann".into(),
                now_ms: 1
            }),
            Response::Revoked(2)
        );
        assert!(s.security.revoked.contains("a") && s.security.revoked.contains("b"));
    }
}
