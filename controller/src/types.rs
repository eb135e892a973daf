//! The Raft type configuration: what a log entry carries and what applying
//! it returns.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::state::{Request, Response};

openraft::declare_raft_types!(
    /// Ferry's Raft types: commands are [`Request`], results [`Response`].
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type StorageError = openraft::StorageError<NodeId>;

/// What a snapshot holds: the whole cluster state and where it stands in the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotBody {
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembership,
    pub state: crate::state::ClusterState,
}
