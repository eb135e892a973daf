//! Mutual TLS for every Ferry channel: the cluster CA and identities
//! ([`pki`]), the TLS acceptor and connector ([`transport`]), and the
//! per-call check of who may call what ([`authz`]), joining with a token
//! ([`token`], [`join`]).

pub mod authz;
pub mod join;
pub mod pki;
pub mod token;
pub mod transport;

pub use pki::{Ca, Credentials, Identity, Role, UserRole};
pub use token::JoinToken;
pub use transport::{ClientTls, Peer, PeerInfo, ServerTls};
