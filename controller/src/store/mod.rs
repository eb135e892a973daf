//! Durable Raft storage in one redb database (`raft.redb` in the data dir):
//! the log ([`log_store`]) and the state machine with its snapshots
//! ([`state_machine`]).
//!
//! The state machine lives in memory and is rebuilt at start from the latest
//! snapshot (kept in redb); openraft then re-applies the committed entries
//! after it, since the committed index is saved. A snapshot every
//! `SNAPSHOT_EVERY` entries bounds that replay and lets the log be purged.

pub mod log_store;
pub mod state_machine;

use std::path::Path;
use std::sync::Arc;

use redb::{Database, TableDefinition};

pub use log_store::LogStore;
pub use state_machine::StateMachine;

pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Opens (or creates) the database and both stores over it.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachine), crate::error::ControllerError> {
    std::fs::create_dir_all(dir).map_err(|e| {
        crate::error::ControllerError::Storage(format!("creating {}: {e}", dir.display()))
    })?;
    let path = dir.join("raft.redb");
    let db = Database::create(&path).map_err(|e| {
        crate::error::ControllerError::Storage(format!("opening {}: {e}", path.display()))
    })?;
    // Make sure both tables exist, so readers never meet a missing table.
    let tx = db
        .begin_write()
        .map_err(|e| crate::error::ControllerError::Storage(e.to_string()))?;
    tx.open_table(LOG)
        .map_err(|e| crate::error::ControllerError::Storage(e.to_string()))?;
    tx.open_table(META)
        .map_err(|e| crate::error::ControllerError::Storage(e.to_string()))?;
    tx.commit()
        .map_err(|e| crate::error::ControllerError::Storage(e.to_string()))?;
    let db = Arc::new(db);
    let sm = StateMachine::load(db.clone())?;
    Ok((LogStore::new(db), sm))
}

/// Runs a redb job off the async runtime (redb does blocking file I/O and fsync).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("storage thread: {e}"))?
}
