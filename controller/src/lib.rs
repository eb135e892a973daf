//! The Ferry controller: keeps the cluster state with Raft (openraft), places
//! VPSes on nodes, and serves the cluster API.
//!
//! # Layout
//! - [`types`]: the Raft type configuration.
//! - [`state`]: the replicated state and its commands, one module per command
//!   family (nodes, vps, ippool, members, events).
//! - [`scheduler`]: deterministic placement with explanations.
//! - [`store`]: redb-backed Raft log and state machine with snapshots.
//! - [`error`].

pub mod api;
pub mod error;
pub mod host;
pub mod member;
pub mod network;
pub mod raft_service;
pub mod scheduler;
pub mod state;
pub mod store;
pub mod types;
