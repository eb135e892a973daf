//! The replicated cluster state and the commands that change it, one module
//! per command family. Applying a command is deterministic: every replica
//! computes the same result from the same state (times come in the command,
//! placement and address choices break ties by name and number).

pub mod events;
pub mod ippool;
pub mod members;
pub mod nodes;
pub mod vps;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use events::{Event, EventLog};
pub use ippool::IpPool;
pub use members::Members;
pub use nodes::{Capacity, NodeCmd, NodeRecord};
pub use vps::{Desired, VpsCmd, VpsRecord, VpsSpecData};

use crate::scheduler::SchedConfig;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ClusterState {
    /// Nodes by name.
    pub nodes: BTreeMap<String, NodeRecord>,
    pub next_node_id: u64,
    /// VPSes by name.
    pub vps: BTreeMap<String, VpsRecord>,
    pub ip_pool: IpPool,
    pub members: Members,
    pub events: EventLog,
    pub sched: SchedConfig,
}

/// A command in the Raft log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Request {
    Node(NodeCmd),
    Vps(VpsCmd),
    Member(members::MemberCmd),
    /// Cluster settings, proposed once at bootstrap.
    Configure {
        ip_pool: Option<ipnet::Ipv4Net>,
        sched: Option<SchedConfig>,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum RejectCode {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    ResourceExhausted,
    FailedPrecondition,
}

/// What applying a command gave back.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Response {
    Ok,
    Node(NodeRecord),
    Vps(Box<VpsRecord>),
    MemberId(u64),
    /// The command changed nothing, for this reason.
    Rejected {
        code: RejectCode,
        message: String,
    },
}

pub(crate) fn reject(code: RejectCode, message: impl Into<String>) -> Response {
    Response::Rejected {
        code,
        message: message.into(),
    }
}

impl ClusterState {
    pub fn apply(&mut self, req: Request) -> Response {
        match req {
            Request::Node(c) => self.apply_node(c),
            Request::Vps(c) => self.apply_vps(c),
            Request::Member(c) => self.apply_member(c),
            Request::Configure { ip_pool, sched } => {
                if let Some(p) = ip_pool {
                    self.ip_pool.cidr = Some(p);
                }
                if let Some(s) = sched {
                    self.sched = s;
                }
                Response::Ok
            }
        }
    }
}
