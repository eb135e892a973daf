//! Nodes: the agents that run VPSes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{reject, ClusterState, RejectCode, Response};

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Capacity {
    pub cpu_millicores: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

/// What a node reported it uses.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeUsage {
    pub memory_bytes: u64,
    pub vps_running: u32,
    pub disk_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: u64,
    pub name: String,
    pub addr: String,
    pub capacity: Capacity,
    pub labels: BTreeMap<String, String>,
    pub cordoned: bool,
    pub down: bool,
    pub last_heartbeat_ms: i64,
    /// Templates present on the node; None until it reports.
    #[serde(default)]
    pub templates: Option<std::collections::BTreeSet<String>>,
    /// The last usage report.
    #[serde(default)]
    pub usage: NodeUsage,
}

impl NodeRecord {
    pub fn status(&self) -> &'static str {
        if self.down {
            "down"
        } else if self.cordoned {
            "cordoned"
        } else {
            "ready"
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum NodeCmd {
    /// An agent joins, or rejoins under the same name (it keeps its id).
    Register {
        name: String,
        addr: String,
        capacity: Capacity,
        labels: BTreeMap<String, String>,
        now_ms: i64,
    },
    Cordon {
        name: String,
        cordon: bool,
        now_ms: i64,
    },
    /// Liveness as the leader sees it: a down node's VPSes become "unknown"
    /// (never started elsewhere: without fencing that could run one twice).
    SetDown {
        name: String,
        down: bool,
        now_ms: i64,
    },
    /// The templates a node reported (written only when they change).
    SetTemplates {
        name: String,
        templates: std::collections::BTreeSet<String>,
    },
    /// A usage report and heartbeat time (written at most every few seconds).
    Report {
        name: String,
        usage: NodeUsage,
        now_ms: i64,
    },
}

impl ClusterState {
    pub(super) fn apply_node(&mut self, c: NodeCmd) -> Response {
        match c {
            NodeCmd::Register {
                name,
                addr,
                capacity,
                labels,
                now_ms,
            } => {
                if let Some(other) = self.node_by_addr.get(&addr).filter(|o| **o != name) {
                    return reject(
                        RejectCode::AlreadyExists,
                        format!("address {addr} is already registered by node {}", other),
                    );
                }
                let rec = match self.nodes.get_mut(&name) {
                    Some(n) => {
                        self.node_by_addr.remove(&n.addr);
                        self.node_by_addr.insert(addr.clone(), name.clone());
                        n.addr = addr;
                        n.capacity = capacity;
                        n.labels = labels;
                        n.down = false;
                        n.last_heartbeat_ms = now_ms;
                        self.events.push(now_ms, "node", &name, "re-registered");
                        n.clone()
                    }
                    None => {
                        self.next_node_id += 1;
                        let n = NodeRecord {
                            id: self.next_node_id,
                            name: name.clone(),
                            addr,
                            capacity,
                            labels,
                            cordoned: false,
                            down: false,
                            last_heartbeat_ms: now_ms,
                            templates: None,
                            usage: NodeUsage::default(),
                        };
                        self.node_by_addr.insert(n.addr.clone(), name.clone());
                        self.nodes.insert(name.clone(), n.clone());
                        self.events.push(
                            now_ms,
                            "node",
                            &name,
                            format!("registered as node {}", n.id),
                        );
                        n
                    }
                };
                Response::Node(rec)
            }
            NodeCmd::Report {
                name,
                usage,
                now_ms,
            } => match self.nodes.get_mut(&name) {
                None => reject(RejectCode::NotFound, format!("node {name:?} not found")),
                Some(n) => {
                    n.usage = usage;
                    n.last_heartbeat_ms = now_ms;
                    Response::Ok
                }
            },
            NodeCmd::SetTemplates { name, templates } => match self.nodes.get_mut(&name) {
                None => reject(RejectCode::NotFound, format!("node {name:?} not found")),
                Some(n) => {
                    n.templates = Some(templates);
                    Response::Node(n.clone())
                }
            },
            NodeCmd::SetDown { name, down, now_ms } => match self.nodes.get_mut(&name) {
                None => reject(RejectCode::NotFound, format!("node {name:?} not found")),
                Some(n) => {
                    n.down = down;
                    if !down {
                        n.last_heartbeat_ms = now_ms;
                    }
                    let n = n.clone();
                    if down {
                        for v in self.vps.values_mut().filter(|v| v.node == name) {
                            v.observed = "unknown".into();
                        }
                    }
                    self.events.push(
                        now_ms,
                        "node",
                        &name,
                        if down {
                            "down: no heartbeat"
                        } else {
                            "back up"
                        },
                    );
                    Response::Node(n)
                }
            },
            NodeCmd::Cordon {
                name,
                cordon,
                now_ms,
            } => match self.nodes.get_mut(&name) {
                None => reject(RejectCode::NotFound, format!("node {name:?} not found")),
                Some(n) => {
                    n.cordoned = cordon;
                    let n = n.clone();
                    self.events.push(
                        now_ms,
                        "node",
                        &name,
                        if cordon { "cordoned" } else { "uncordoned" },
                    );
                    Response::Node(n)
                }
            },
        }
    }

    /// Limits of the VPSes placed on a node, summed, and how many there are.
    pub fn allocated(&self, node: &str) -> (Capacity, u32) {
        match self.alloc.get(node) {
            Some(a) => (
                Capacity {
                    cpu_millicores: a.cpu_millicores,
                    memory_bytes: a.memory_bytes,
                    disk_bytes: a.disk_bytes,
                },
                a.count,
            ),
            None => (Capacity::default(), 0),
        }
    }
}
