//! Operations on the cluster that more than one caller runs: the API
//! handlers, and the leader's tasks (drain, restore, the rebalancer).
//!
//! - [`migration`]: starting and following a migration.

pub mod migration;
