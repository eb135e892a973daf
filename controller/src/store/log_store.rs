//! The Raft log, the vote and the committed index in redb. Every write commits
//! durably (fsync) before openraft is told it happened.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, OptionalSend, StorageIOError, Vote};
use redb::{Database, ReadableDatabase, ReadableTable};

use super::{blocking, LOG, META};
use crate::types::{LogId, NodeId, StorageError, TypeConfig};

#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    pub fn new(db: Arc<Database>) -> Self {
        Self { db }
    }
}

fn get_meta<T: serde::de::DeserializeOwned>(db: &Database, key: &str) -> Result<Option<T>, String> {
    let tx = db.begin_read().map_err(|e| e.to_string())?;
    let t = tx.open_table(META).map_err(|e| e.to_string())?;
    match t.get(key).map_err(|e| e.to_string())? {
        Some(v) => serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|e| e.to_string()),
        None => Ok(None),
    }
}

fn put_meta<T: serde::Serialize>(db: &Database, key: &str, value: &T) -> Result<(), String> {
    let bytes = serde_json::to_vec(value).map_err(|e| e.to_string())?;
    let tx = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut t = tx.open_table(META).map_err(|e| e.to_string())?;
        t.insert(key, bytes.as_slice()).map_err(|e| e.to_string())?;
    }
    tx.commit().map_err(|e| e.to_string())
}

fn io_err(e: String) -> std::io::Error {
    std::io::Error::other(e)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        let db = self.db.clone();
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(e) => Some(e + 1),
            Bound::Excluded(e) => Some(*e),
            Bound::Unbounded => None,
        };
        blocking(move || {
            let tx = db.begin_read().map_err(|e| e.to_string())?;
            let t = tx.open_table(LOG).map_err(|e| e.to_string())?;
            let iter = match end {
                Some(e) => t.range(start..e),
                None => t.range(start..),
            }
            .map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            for item in iter {
                let (_, v) = item.map_err(|e| e.to_string())?;
                out.push(serde_json::from_slice(v.value()).map_err(|e| e.to_string())?);
            }
            Ok(out)
        })
        .await
        .map_err(|e| StorageIOError::read_logs(&io_err(e)).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let db = self.db.clone();
        blocking(move || {
            let last_purged: Option<LogId> = get_meta(&db, "last_purged")?;
            let tx = db.begin_read().map_err(|e| e.to_string())?;
            let t = tx.open_table(LOG).map_err(|e| e.to_string())?;
            let last = match t.last().map_err(|e| e.to_string())? {
                Some((_, v)) => {
                    let e: Entry<TypeConfig> =
                        serde_json::from_slice(v.value()).map_err(|e| e.to_string())?;
                    Some(e.log_id)
                }
                None => last_purged,
            };
            Ok(LogState {
                last_purged_log_id: last_purged,
                last_log_id: last,
            })
        })
        .await
        .map_err(|e| StorageIOError::read_logs(&io_err(e)).into())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let db = self.db.clone();
        let vote = *vote;
        blocking(move || put_meta(&db, "vote", &vote))
            .await
            .map_err(|e| StorageIOError::write_vote(&io_err(e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        let db = self.db.clone();
        blocking(move || get_meta(&db, "vote"))
            .await
            .map_err(|e| StorageIOError::read_vote(&io_err(e)).into())
    }

    /// Saved without its own fsync: the next durable write (an append, a vote)
    /// carries it to disk. A committed index lost in a crash only shortens the
    /// replay at start (the leader tells followers the real one); log entries
    /// themselves are always durable before they are acknowledged.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let db = self.db.clone();
        blocking(move || {
            let bytes = serde_json::to_vec(&committed).map_err(|e| e.to_string())?;
            let mut tx = db.begin_write().map_err(|e| e.to_string())?;
            tx.set_durability(redb::Durability::None)
                .map_err(|e| e.to_string())?;
            {
                let mut t = tx.open_table(META).map_err(|e| e.to_string())?;
                t.insert("committed", bytes.as_slice())
                    .map_err(|e| e.to_string())?;
            }
            tx.commit().map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| StorageIOError::write(&io_err(e)).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let db = self.db.clone();
        blocking(move || Ok(get_meta::<Option<LogId>>(&db, "committed")?.flatten()))
            .await
            .map_err(|e| StorageIOError::read(&io_err(e)).into())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let encoded: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|e| serde_json::to_vec(&e).map(|b| (e.log_id.index, b)))
            .collect::<Result<_, _>>()
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let db = self.db.clone();
        let res = blocking(move || {
            let tx = db.begin_write().map_err(|e| e.to_string())?;
            {
                let mut t = tx.open_table(LOG).map_err(|e| e.to_string())?;
                for (i, b) in &encoded {
                    t.insert(*i, b.as_slice()).map_err(|e| e.to_string())?;
                }
            }
            tx.commit().map_err(|e| e.to_string())
        })
        .await;
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(io_err(e.clone())));
                Err(StorageIOError::write_logs(&io_err(e)).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let db = self.db.clone();
        blocking(move || {
            let tx = db.begin_write().map_err(|e| e.to_string())?;
            {
                let mut t = tx.open_table(LOG).map_err(|e| e.to_string())?;
                t.retain_in(log_id.index.., |_, _| false)
                    .map_err(|e| e.to_string())?;
            }
            tx.commit().map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&io_err(e)).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let db = self.db.clone();
        blocking(move || {
            let bytes = serde_json::to_vec(&Some(log_id)).map_err(|e| e.to_string())?;
            let tx = db.begin_write().map_err(|e| e.to_string())?;
            {
                let mut m = tx.open_table(META).map_err(|e| e.to_string())?;
                m.insert("last_purged", bytes.as_slice())
                    .map_err(|e| e.to_string())?;
                let mut t = tx.open_table(LOG).map_err(|e| e.to_string())?;
                t.retain_in(..=log_id.index, |_, _| false)
                    .map_err(|e| e.to_string())?;
            }
            tx.commit().map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&io_err(e)).into())
    }
}
