//! The state machine: [`ClusterState`] in memory, shared with the API for
//! reads, and its snapshots in redb.

use std::io::Cursor;
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{Entry, EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use redb::{Database, ReadableDatabase};

use super::{blocking, META};
use crate::error::ControllerError;
use crate::state::{ClusterState, Response};
use crate::types::{LogId, SnapshotBody, StorageError, StoredMembership, TypeConfig};

/// The applied state, readable by the API while Raft applies entries.
#[derive(Debug, Default)]
pub struct Applied {
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembership,
    pub state: ClusterState,
}

#[derive(Clone)]
pub struct StateMachine {
    db: Arc<Database>,
    pub applied: Arc<RwLock<Applied>>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, openraft::BasicNode>,
    data: Vec<u8>,
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn read_snapshot(db: &Database) -> Result<Option<StoredSnapshot>, String> {
    let tx = db.begin_read().map_err(|e| e.to_string())?;
    let t = tx.open_table(META).map_err(|e| e.to_string())?;
    match t.get("snapshot").map_err(|e| e.to_string())? {
        Some(v) => serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|e| e.to_string()),
        None => Ok(None),
    }
}

fn write_snapshot(db: &Database, s: &StoredSnapshot) -> Result<(), String> {
    let bytes = serde_json::to_vec(s).map_err(|e| e.to_string())?;
    let tx = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut t = tx.open_table(META).map_err(|e| e.to_string())?;
        t.insert("snapshot", bytes.as_slice())
            .map_err(|e| e.to_string())?;
    }
    tx.commit().map_err(|e| e.to_string())
}

impl StateMachine {
    /// Starts from the latest snapshot, if any.
    pub fn load(db: Arc<Database>) -> Result<Self, ControllerError> {
        let mut applied = Applied::default();
        if let Some(s) = read_snapshot(&db).map_err(ControllerError::Storage)? {
            let body: SnapshotBody = serde_json::from_slice(&s.data)
                .map_err(|e| ControllerError::Storage(format!("corrupt snapshot: {e}")))?;
            let mut state = body.state;
            state.rebuild_index();
            applied = Applied {
                last_applied: body.last_applied,
                last_membership: body.last_membership,
                state,
            };
        }
        Ok(Self {
            db,
            applied: Arc::new(RwLock::new(applied)),
        })
    }

    pub fn read<T>(&self, f: impl FnOnce(&Applied) -> T) -> T {
        let g = self.applied.read().unwrap_or_else(|p| p.into_inner());
        f(&g)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (body, last) = self.read(|a| {
            (
                SnapshotBody {
                    last_applied: a.last_applied,
                    last_membership: a.last_membership.clone(),
                    state: a.state.clone(),
                },
                a.last_applied,
            )
        });
        let data = serde_json::to_vec(&body).map_err(|e| StorageIOError::read_state_machine(&e))?;
        let snapshot_id = match last {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.leader_id.node_id, l.index),
            None => "empty".to_string(),
        };
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: body.last_membership,
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        let db = self.db.clone();
        blocking(move || write_snapshot(&db, &stored))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &io_err(e)))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok(self.read(|a| (a.last_applied, a.last_membership.clone())))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut g = self.applied.write().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for e in entries {
            g.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => out.push(Response::Ok),
                EntryPayload::Normal(req) => out.push(g.state.apply(req)),
                EntryPayload::Membership(m) => {
                    g.last_membership = StoredMembership::new(Some(e.log_id), m);
                    out.push(Response::Ok);
                }
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let body: SnapshotBody = serde_json::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        let db = self.db.clone();
        let sig = meta.signature();
        blocking(move || write_snapshot(&db, &stored))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(sig), &io_err(e)))?;
        let mut state = body.state;
        state.rebuild_index();
        let mut g = self.applied.write().unwrap_or_else(|p| p.into_inner());
        *g = Applied {
            last_applied: meta.last_log_id,
            last_membership: meta.last_membership.clone(),
            state,
        };
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let db = self.db.clone();
        let s = blocking(move || read_snapshot(&db))
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, &io_err(e)))?;
        Ok(s.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
