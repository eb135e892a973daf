//! The Ferry controller: keeps the cluster state with Raft (openraft), places
//! VPSes on nodes, and serves the cluster API.
//!
//! # Layout
//! - [`types`]: the Raft type configuration.
//! - [`state`]: the replicated state and its commands, one module per command
//!   family (nodes, vps, ippool, members, events).
//! - [`scheduler`]: deterministic placement with explanations.
//! - [`planner`]: where each VPS of a drain or restore goes.
//! - [`leader`]: the leader's timers: node liveness, the reconciler, the
//!   drain driver.
//! - [`member`], [`host`]: a replica's Raft instance and the process around it.
//! - [`network`], [`raft_service`]: Raft between replicas over gRPC.
//! - [`api`]: the cluster API (the wire side).
//! - [`ops`]: operations the API and the leader's tasks share (starting and
//!   following a migration).
//! - [`store`]: redb-backed Raft log and state machine with snapshots.
//! - [`error`].

pub mod api;
pub mod error;
pub mod host;
pub mod leader;
pub mod member;
pub mod network;
pub mod ops;
pub mod planner;
pub mod raft_service;
pub mod scheduler;
pub mod state;
pub mod store;
pub mod types;
