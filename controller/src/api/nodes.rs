//! Nodes: an agent registers; operators list, inspect, cordon.

use ferry_proto::controller::v1 as cpb;
use ferry_proto::report;

use super::{applied, now_ms};
use crate::error::ControllerError;
use crate::host::Controller;
use crate::state::{Capacity, ClusterState, NodeCmd, NodeRecord, RejectCode, Request, Response};

pub(crate) fn to_pb(s: &ClusterState, n: &NodeRecord) -> cpb::Node {
    let (alloc, count) = s.allocated(&n.name);
    let cap = |c: &Capacity| cpb::Capacity {
        cpu_millicores: c.cpu_millicores as u32,
        memory_bytes: c.memory_bytes,
        disk_bytes: c.disk_bytes,
    };
    cpb::Node {
        id: n.id,
        name: n.name.clone(),
        addr: n.addr.clone(),
        capacity: Some(cap(&n.capacity)),
        labels: n.labels.clone().into_iter().collect(),
        status: n.status().into(),
        last_heartbeat_unix_ms: n.last_heartbeat_ms,
        allocated: Some(cap(&alloc)),
        vps_count: count,
        templates: n.templates.iter().flatten().cloned().collect(),
        usage: Some(cpb::NodeUsage {
            memory_bytes: n.usage.memory_bytes,
            vps_running: n.usage.vps_running,
            disk_bytes: n.usage.disk_bytes,
        }),
        drain: s
            .drains
            .get(&n.name)
            .map(|d| super::drain::to_pb(s, d, None)),
    }
}

pub async fn register(
    ctl: &Controller,
    r: cpb::RegisterNodeRequest,
) -> Result<cpb::Node, ControllerError> {
    ferry_proto::names::check_dns_label(&r.name)
        .map_err(|e| ControllerError::invalid("name", e))?;
    r.addr
        .parse::<ferry_proto::addr::Addr>()
        .map_err(|e| ControllerError::invalid("addr", e))?;
    let c = r.capacity.unwrap_or_default();
    if c.cpu_millicores == 0 || c.memory_bytes == 0 {
        return Err(ControllerError::invalid(
            "capacity",
            "cpu_millicores and memory_bytes must be above 0",
        ));
    }
    for k in r.labels.keys() {
        if k.is_empty() || k.contains('=') || k.contains(',') {
            return Err(ControllerError::invalid(
                "labels",
                format!("{k:?} is not a label key"),
            ));
        }
    }
    let m = ctl.member().await?;
    let cmd = NodeCmd::Register {
        name: r.name,
        addr: r.addr,
        capacity: Capacity {
            cpu_millicores: c.cpu_millicores as u64,
            memory_bytes: c.memory_bytes,
            disk_bytes: c.disk_bytes,
        },
        labels: r.labels.into_iter().collect(),
        now_ms: now_ms(),
    };
    match applied(m.propose(Request::Node(cmd)).await?)? {
        Response::Node(n) => Ok(m.sm.read(|a| to_pb(&a.state, &n))),
        r => Err(ControllerError::Raft(format!("unexpected {r:?}"))),
    }
}

pub async fn list(ctl: &Controller) -> Result<cpb::ListNodesResponse, ControllerError> {
    let m = ctl.member().await?;
    m.read_barrier().await?;
    Ok(m.sm.read(|a| cpb::ListNodesResponse {
        nodes: a.state.nodes.values().map(|n| to_pb(&a.state, n)).collect(),
    }))
}

pub async fn get(ctl: &Controller, name: &str) -> Result<cpb::Node, ControllerError> {
    let m = ctl.member().await?;
    m.read_barrier().await?;
    m.sm.read(|a| a.state.nodes.get(name).map(|n| to_pb(&a.state, n)))
        .ok_or_else(|| ControllerError::Rejected {
            code: RejectCode::NotFound,
            message: format!("node {name:?} not found"),
        })
}

pub async fn cordon(
    ctl: &Controller,
    id: Option<String>,
    r: cpb::CordonNodeRequest,
) -> Result<cpb::Node, ControllerError> {
    let m = ctl.member().await?;
    // Unknown nodes are refused before anything is written.
    let check = |s: &crate::state::ClusterState| match s.nodes.contains_key(&r.name) {
        true => Ok(()),
        false => Err(ControllerError::Rejected {
            code: RejectCode::NotFound,
            message: format!("node {:?} not found", r.name),
        }),
    };
    let cmd = Request::Node(NodeCmd::Cordon {
        name: r.name.clone(),
        cordon: r.cordon,
        now_ms: now_ms(),
    });
    match super::write(&m, id, check, cmd).await? {
        Response::Node(n) => Ok(m.sm.read(|a| to_pb(&a.state, &n))),
        r => Err(ControllerError::Raft(format!("unexpected {r:?}"))),
    }
}

/// An agent's report. Kept in the leader's memory; written through Raft only
/// when something changed (the node was down, a VPS's observed state moved).
pub async fn heartbeat(ctl: &Controller, r: cpb::HeartbeatRequest) -> Result<(), ControllerError> {
    let m = ctl.member().await?;
    if let Some(mut leader) = super::members::leader_client(&m).await? {
        return leader
            .heartbeat(r)
            .await
            .map(|_| ())
            .map_err(super::members::from_status);
    }
    let reports: std::collections::HashMap<String, (u64, String)> = r
        .vps
        .iter()
        .map(|v| (v.name.clone(), (v.generation, v.status.clone())))
        .collect();
    let reported: std::collections::BTreeSet<String> = r.templates.iter().cloned().collect();
    let (known, was_down, changes, templates_changed) = m.sm.read(|a| {
        let Some(n) = a.state.nodes.get(&r.node) else {
            return (false, false, Vec::new(), false);
        };
        let changes: Vec<(String, String)> = a
            .state
            .vps
            .values()
            .filter(|v| v.node == r.node)
            .filter_map(|v| {
                let now = reports
                    .get(&v.spec.name)
                    .map(|(_, s)| s.clone())
                    .unwrap_or_else(|| "pending".into());
                // A VPS going out by a migration is as it was until the
                // move settles.
                (now != v.observed && now != report::LEAVING).then(|| (v.spec.name.clone(), now))
            })
            .collect();
        (
            true,
            n.down,
            changes,
            n.templates.as_ref() != Some(&reported),
        )
    });
    if !known {
        return Err(ControllerError::Rejected {
            code: RejectCode::NotFound,
            message: format!("node {:?} is not registered", r.node),
        });
    }
    // Deleted VPSes of this node that it no longer holds: confirmed gone.
    let gone: Vec<String> = m.sm.read(|a| {
        a.state
            .deleting
            .iter()
            .filter(|(name, d)| d.node == r.node && !reports.contains_key(*name))
            .map(|(name, _)| name.clone())
            .collect()
    });
    ctl.leader.record(&r.node, reports);
    if !gone.is_empty() {
        applied(
            m.propose(Request::Vps(crate::state::VpsCmd::Purge {
                node: r.node.clone(),
                names: gone,
                now_ms: now_ms(),
            }))
            .await?,
        )?;
    }
    if was_down {
        applied(
            m.propose(Request::Node(NodeCmd::SetDown {
                name: r.node.clone(),
                down: false,
                now_ms: now_ms(),
            }))
            .await?,
        )?;
    }
    let u = r.usage.unwrap_or_default();
    let usage = crate::state::NodeUsage {
        memory_bytes: u.memory_bytes,
        vps_running: u.vps_running,
        disk_bytes: u.disk_bytes,
    };
    let running_changed = m.sm.read(|a| {
        a.state.nodes.get(&r.node).map(|n| n.usage.vps_running) != Some(usage.vps_running)
    });
    if ctl.leader.report_due(&r.node, running_changed) {
        applied(
            m.propose(Request::Node(NodeCmd::Report {
                name: r.node.clone(),
                usage,
                now_ms: now_ms(),
            }))
            .await?,
        )?;
    }
    if templates_changed {
        applied(
            m.propose(Request::Node(NodeCmd::SetTemplates {
                name: r.node.clone(),
                templates: reported,
            }))
            .await?,
        )?;
    }
    if !changes.is_empty() {
        applied(
            m.propose(Request::Vps(crate::state::VpsCmd::Observe {
                updates: changes,
            }))
            .await?,
        )?;
    }
    Ok(())
}
