//! What a node's heartbeat says of each VPS it holds (`VpsReport.status`):
//! one spelling for the agent that reports and the controller that acts.

/// Its init runs.
pub const RUNNING: &str = "running";
/// Being stopped.
pub const STOPPING: &str = "stopping";
/// Not running.
pub const STOPPED: &str = "stopped";
/// Still coming in by a migration: the migration keeps or drops it, nobody
/// else acts on it.
pub const ARRIVING: &str = "arriving";
/// Going out by a migration (the source's copy, until the move has settled
/// and the migration has removed it or resumed it): nobody else acts on it.
pub const LEAVING: &str = "leaving";
