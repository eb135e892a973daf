//! The replicated cluster state and the commands that change it, one module
//! per command family. Applying a command is deterministic: every replica
//! computes the same result from the same state (times come in the command,
//! placement and address choices break ties by name and number).

pub mod drain;
pub mod events;
pub mod ippool;
pub mod members;
pub mod migration;
pub mod nodes;
pub mod requests;
pub mod security;
pub mod templates;
pub mod vps;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use events::{Event, EventLog};
pub use ippool::IpPool;
pub use members::Members;
pub use migration::{Migration, MigrationCmd, Outcome};
pub use nodes::{Capacity, NodeCmd, NodeRecord, NodeUsage};
pub use vps::{Desired, LimitsUpdate, VpsCmd, VpsRecord, VpsSpecData};

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
    /// Join tokens, operators' certificates, revocations.
    #[serde(default)]
    pub security: security::Security,
    /// Each node's drain or restore under way, or its last one.
    #[serde(default)]
    pub drains: BTreeMap<String, drain::Drain>,
    /// Deleted VPSes their node has not confirmed gone, by name.
    #[serde(default)]
    pub deleting: BTreeMap<String, vps::Deleting>,
    /// The answers of writes that carried a client's request id.
    #[serde(default)]
    pub requests: requests::RequestLog,
    /// Templates imported through the cluster, by name.
    #[serde(default)]
    pub templates: BTreeMap<String, templates::TemplateRecord>,
    /// Per-node sums of the VPSes placed there, kept as VPSes come and go so
    /// placement never scans every VPS (derived: not in snapshots).
    #[serde(skip)]
    pub alloc: BTreeMap<String, NodeAlloc>,
    /// Node address → node name (derived: not in snapshots).
    #[serde(skip)]
    pub node_by_addr: BTreeMap<String, String>,
    /// User-namespace id range base → the VPS holding it (derived).
    #[serde(skip)]
    pub id_bases: BTreeMap<u32, String>,
}

/// What the VPSes on one node add up to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeAlloc {
    pub cpu_millicores: u64,
    pub memory_bytes: u64,
    /// Disk quotas given out.
    pub disk_bytes: u64,
    pub count: u32,
    /// Anti-affinity group → VPSes of it on the node.
    pub groups: BTreeMap<String, u32>,
    /// Migrations in flight from or to the node.
    pub migrations: u32,
}

/// A command in the Raft log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Request {
    Node(NodeCmd),
    Vps(VpsCmd),
    Migration(MigrationCmd),
    Member(members::MemberCmd),
    Security(security::SecurityCmd),
    Drain(drain::DrainCmd),
    Template(templates::TemplateCmd),
    /// Cluster settings, proposed once at bootstrap.
    Configure {
        ip_pool: Option<ipnet::Ipv4Net>,
        sched: Option<SchedConfig>,
    },
    /// Several commands in one log entry (group commit): applied in order,
    /// each with its own result.
    Batch(Vec<Request>),
    /// A client's write with its request id: applied once; a repeat answers
    /// the first one's result.
    Once {
        id: String,
        req: Box<Request>,
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
    Drain(Box<drain::Drain>),
    /// How many certificates a revocation took.
    Revoked(u32),
    /// The command changed nothing, for this reason.
    Rejected {
        code: RejectCode,
        message: String,
    },
    /// The results of a [`Request::Batch`], in order.
    Batch(Vec<Response>),
}

pub(crate) fn reject(code: RejectCode, message: impl Into<String>) -> Response {
    Response::Rejected {
        code,
        message: message.into(),
    }
}

impl ClusterState {
    /// Rebuilds the derived allocation index (after loading a snapshot).
    pub fn rebuild_index(&mut self) {
        self.node_by_addr = self
            .nodes
            .values()
            .map(|n| (n.addr.clone(), n.name.clone()))
            .collect();
        self.alloc.clear();
        self.id_bases.clear();
        let vs: Vec<VpsRecord> = self.vps.values().cloned().collect();
        for v in &vs {
            self.index_add(v);
        }
        for (name, d) in &self.deleting {
            if d.id_base != 0 {
                self.id_bases.insert(d.id_base, name.clone());
            }
        }
    }

    /// Counts a VPS on its node, and on its migration's target too (the room
    /// it needs there is held while it moves).
    pub(crate) fn index_add(&mut self, v: &VpsRecord) {
        if v.spec.id_base != 0 {
            self.id_bases.insert(v.spec.id_base, v.spec.name.clone());
        }
        self.index_add_on(&v.node.clone(), v);
        if let Some(m) = &v.migration {
            self.index_add_on(&m.target.clone(), v);
        }
    }

    fn index_add_on(&mut self, node: &str, v: &VpsRecord) {
        let a = self.alloc.entry(node.to_string()).or_default();
        a.cpu_millicores += v.spec.cpu_millicores as u64;
        a.memory_bytes += v.spec.memory_bytes;
        a.disk_bytes += v.spec.disk_bytes;
        a.count += 1;
        if v.migration.is_some() {
            a.migrations += 1;
        }
        if !v.anti_affinity_group.is_empty() {
            *a.groups.entry(v.anti_affinity_group.clone()).or_default() += 1;
        }
    }

    pub(crate) fn index_remove(&mut self, v: &VpsRecord) {
        if v.spec.id_base != 0 {
            self.id_bases.remove(&v.spec.id_base);
        }
        self.index_remove_on(&v.node, v);
        if let Some(m) = &v.migration {
            self.index_remove_on(&m.target, v);
        }
    }

    fn index_remove_on(&mut self, node: &str, v: &VpsRecord) {
        if let Some(a) = self.alloc.get_mut(node) {
            // Saturating: an apply that panicked would stop every replica.
            a.cpu_millicores = a
                .cpu_millicores
                .saturating_sub(v.spec.cpu_millicores as u64);
            a.memory_bytes = a.memory_bytes.saturating_sub(v.spec.memory_bytes);
            a.disk_bytes = a.disk_bytes.saturating_sub(v.spec.disk_bytes);
            a.count = a.count.saturating_sub(1);
            if v.migration.is_some() {
                a.migrations = a.migrations.saturating_sub(1);
            }
            if let Some(g) = a.groups.get_mut(&v.anti_affinity_group) {
                *g -= 1;
                if *g == 0 {
                    a.groups.remove(&v.anti_affinity_group);
                }
            }
        }
    }

    pub fn apply(&mut self, req: Request) -> Response {
        match req {
            Request::Node(c) => self.apply_node(c),
            Request::Vps(c) => self.apply_vps(c),
            Request::Migration(c) => self.apply_migration(c),
            Request::Member(c) => self.apply_member(c),
            Request::Security(c) => self.apply_security(c),
            Request::Drain(c) => self.apply_drain(c),
            Request::Template(c) => self.apply_template(c),
            Request::Batch(reqs) => {
                Response::Batch(reqs.into_iter().map(|r| self.apply(r)).collect())
            }
            Request::Once { id, req } => {
                if let Some(r) = self.requests.get(&id) {
                    return r.clone();
                }
                let r = self.apply(*req);
                self.requests.record(id, r.clone());
                r
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(name: &str, addr: &str) -> Request {
        Request::Node(NodeCmd::Register {
            name: name.into(),
            addr: addr.into(),
            capacity: Capacity {
                cpu_millicores: 1000,
                memory_bytes: 1 << 30,
                disk_bytes: 0,
            },
            labels: Default::default(),
            now_ms: 0,
        })
    }

    #[test]
    fn a_repeated_write_answers_the_first_result_and_changes_nothing() {
        let mut s = ClusterState::default();
        let once = |id: &str, r: Request| Request::Once {
            id: id.into(),
            req: Box::new(r),
        };
        let first = s.apply(once("r1", reg("a", "h:1")));
        assert!(matches!(&first, Response::Node(n) if n.name == "a"));
        let nodes = s.nodes.clone();
        // The same write again (its client did not hear the answer): the
        // first answer, not "already exists".
        assert_eq!(s.apply(once("r1", reg("a", "h:1"))), first);
        assert_eq!(s.nodes, nodes);
        // Another id is another write.
        assert!(matches!(
            s.apply(once("r2", reg("c", "h:3"))),
            Response::Node(n) if n.name == "c"
        ));
        // A refusal is an answer too.
        let refused = s.apply(once("r3", reg("b", "h:1")));
        assert!(matches!(refused, Response::Rejected { .. }));
        assert_eq!(s.apply(once("r3", reg("b", "h:2"))), refused);
        assert!(!s.nodes.contains_key("b"));
    }

    #[test]
    fn a_batch_applies_in_order_with_one_result_each() {
        let mut s = ClusterState::default();
        let r = s.apply(Request::Batch(vec![
            reg("a", "h:1"),
            reg("b", "h:1"), // address already taken by a: refused, the rest goes on
            Request::Node(NodeCmd::Cordon {
                name: "a".into(),
                cordon: true,
                now_ms: 0,
            }),
            Request::Node(NodeCmd::Cordon {
                name: "zz".into(),
                cordon: true,
                now_ms: 0,
            }),
        ]));
        let Response::Batch(rs) = r else {
            panic!("{r:?}")
        };
        assert_eq!(rs.len(), 4);
        assert!(matches!(&rs[0], Response::Node(n) if n.name == "a"));
        assert!(matches!(
            &rs[1],
            Response::Rejected {
                code: RejectCode::AlreadyExists,
                ..
            }
        ));
        assert!(matches!(&rs[2], Response::Node(n) if n.cordoned));
        assert!(matches!(
            &rs[3],
            Response::Rejected {
                code: RejectCode::NotFound,
                ..
            }
        ));
        assert_eq!(s.nodes.len(), 1);
    }

    /// A deleted VPS keeps its address, id range and name until its node
    /// no longer reports it: an agent that is down runs its VPSes on, and a
    /// new VPS given the address answered ARP beside the old one.
    #[test]
    fn a_deleted_vps_holds_its_address_until_its_node_confirms_it_gone() {
        let mut s = ClusterState::default();
        s.ip_pool.cidr = Some("10.9.0.0/29".parse().expect("cidr"));
        s.apply(reg("a", "h:1"));
        let create = |name: &str| {
            Request::Vps(VpsCmd::Create {
                spec: Box::new(VpsSpecData {
                    name: name.into(),
                    memory_bytes: 64 << 20,
                    ..Default::default()
                }),
                pin_node: String::new(),
                node_selector: Default::default(),
                anti_affinity_group: String::new(),
                desired: Desired::Running,
                allocate_ip: true,
                now_ms: 0,
            })
        };
        let Response::Vps(v) = s.apply(create("old")) else {
            panic!("create")
        };
        let (ip, base) = (v.spec.ip, v.spec.id_base);
        assert!(ip.is_some() && base != 0);
        s.apply(Request::Vps(VpsCmd::Delete {
            name: "old".into(),
            now_ms: 1,
        }));
        assert!(!s.vps.contains_key("old"));
        // Held: the name, the address, the ids.
        assert!(matches!(
            s.apply(create("old")),
            Response::Rejected {
                code: RejectCode::AlreadyExists,
                ..
            }
        ));
        let Response::Vps(n) = s.apply(create("new")) else {
            panic!("create new")
        };
        assert_ne!(n.spec.ip, ip, "the address went to a new VPS");
        assert_ne!(n.spec.id_base, base, "the ids went to a new VPS");
        // Held across a snapshot (the derived index is rebuilt).
        let mut restored: ClusterState =
            serde_json::from_slice(&serde_json::to_vec(&s).expect("ser")).expect("de");
        restored.rebuild_index();
        assert_eq!(
            restored.id_bases.get(&base).map(String::as_str),
            Some("old")
        );
        // Another node's word frees nothing; its own frees everything.
        s.apply(Request::Vps(VpsCmd::Purge {
            node: "b".into(),
            names: vec!["old".into()],
            now_ms: 2,
        }));
        assert_eq!(s.ip_pool.holder(ip.expect("ip")), Some("old"));
        s.apply(Request::Vps(VpsCmd::Purge {
            node: "a".into(),
            names: vec!["old".into()],
            now_ms: 3,
        }));
        assert_eq!(s.ip_pool.holder(ip.expect("ip")), None);
        assert!(!s.id_bases.contains_key(&base));
        assert!(matches!(s.apply(create("old")), Response::Vps(_)));
    }
}
