//! VPSes, cluster-wide. A create is checked in full against the current state
//! before it is proposed (bad input writes no Raft entry); placement itself
//! happens when the entry is applied, identically on every replica.

use std::collections::BTreeMap;

use ferry_proto::controller::v1 as cpb;

use super::{now_ms, write};
use crate::error::ControllerError;
use crate::host::Controller;
use crate::scheduler::{self, PlacementReq};
use crate::state::{
    ClusterState, Desired, RejectCode, Request, Response, VpsCmd, VpsRecord, VpsSpecData,
};

/// Smallest memory limit a VPS may have (as on the agent).
const MIN_MEMORY: u64 = 8 << 20;
/// Smallest disk quota (as on the agent).
const MIN_DISK: u64 = 64 << 20;

pub(crate) fn to_pb(v: &VpsRecord) -> cpb::ClusterVps {
    cpb::ClusterVps {
        spec: Some(v.spec.to_pb(v.generation)),
        node: v.node.clone(),
        desired: v.desired.as_str().into(),
        observed: v.observed.clone(),
        generation: v.generation,
        placement_reason: v.placement_reason.clone(),
        placement: Some(cpb::Placement {
            node: v.pin_node.clone(),
            node_selector: v
                .node_selector
                .iter()
                .map(|(k, val)| (k.clone(), val.clone()))
                .collect(),
            anti_affinity_group: v.anti_affinity_group.clone(),
        }),
        created_unix_ms: v.created_ms,
        migration: v.migration.as_ref().map(|m| cpb::Migration {
            id: m.id.clone(),
            source: v.node.clone(),
            target: m.target.clone(),
            mode: m.mode.clone(),
            phase: m.phase.clone(),
            started_unix_ms: m.started_ms,
        }),
        history: v.history.iter().map(move_pb).collect(),
    }
}

pub(crate) fn move_pb(h: &crate::state::migration::MoveRecord) -> cpb::MoveRecord {
    cpb::MoveRecord {
        id: h.id.clone(),
        source: h.source.clone(),
        target: h.target.clone(),
        mode: h.mode.clone(),
        phase: h.phase.clone(),
        started_unix_ms: h.started_ms,
        decided_unix_ms: h.decided_ms,
        outcome: match h.moved {
            None => String::new(),
            Some(true) => "moved".into(),
            Some(false) => "rolled back".into(),
        },
        reason: h.reason.clone(),
        ended_unix_ms: h.ended_ms,
        downtime_ms: h.downtime_ms,
        total_ms: h.total_ms,
        phases: h
            .phases
            .iter()
            .map(|(phase, millis, bytes)| ferry_proto::agent::v1::PhaseStat {
                phase: phase.clone(),
                millis: *millis,
                bytes: *bytes,
            })
            .collect(),
        error: h.error.clone(),
    }
}

fn not_found(name: &str) -> ControllerError {
    ControllerError::Rejected {
        code: RejectCode::NotFound,
        message: format!("VPS {name:?} not found"),
    }
}

/// Field checks that need no state.
fn check_spec(spec: &VpsSpecData) -> Result<(), ControllerError> {
    ferry_proto::names::check_dns_label(&spec.name)
        .map_err(|e| ControllerError::invalid("spec.name", e))?;
    ferry_proto::names::check_dns_label(&spec.template)
        .map_err(|e| ControllerError::invalid("spec.template", e))?;
    if spec.memory_bytes < MIN_MEMORY {
        return Err(ControllerError::invalid(
            "spec.limits.memory_bytes",
            format!("at least {MIN_MEMORY} bytes"),
        ));
    }
    if spec.cpu_weight > 10000 {
        return Err(ControllerError::invalid(
            "spec.limits.cpu_weight",
            "1 to 10000",
        ));
    }
    Ok(())
}

/// The checks the state can answer now; the same ones run again at apply.
fn precheck(s: &ClusterState, cmd: &VpsCmd) -> Result<(), ControllerError> {
    let VpsCmd::Create {
        spec,
        pin_node,
        node_selector,
        anti_affinity_group,
        ..
    } = cmd
    else {
        return Ok(());
    };
    let rej = |code, message: String| ControllerError::Rejected { code, message };
    if s.vps.contains_key(&spec.name) {
        return Err(rej(
            RejectCode::AlreadyExists,
            format!("VPS {:?} already exists", spec.name),
        ));
    }
    if !pin_node.is_empty() && !s.nodes.contains_key(pin_node) {
        return Err(rej(
            RejectCode::NotFound,
            format!("placement.node: node {pin_node:?} not found"),
        ));
    }
    if let Some(ip) = spec.ip {
        if let Some(h) = s.ip_pool.holder(ip) {
            return Err(rej(
                RejectCode::AlreadyExists,
                format!("net.ip {ip} is already held by VPS {h}"),
            ));
        }
    }
    let req = PlacementReq {
        template: &spec.template,
        cpu_millicores: spec.cpu_millicores as u64,
        memory_bytes: spec.memory_bytes,
        disk_bytes: spec.disk_bytes,
        pin_node,
        exclude_node: "",
        node_selector,
        anti_affinity_group,
        avoid: &[],
        migration: false,
    };
    scheduler::place(s, &req)
        .map(|_| ())
        .map_err(|why| rej(RejectCode::ResourceExhausted, why))
}

pub async fn create(
    ctl: &Controller,
    id: Option<String>,
    r: cpb::CreateVpsRequest,
) -> Result<cpb::ClusterVps, ControllerError> {
    let spec_pb = r
        .spec
        .ok_or_else(|| ControllerError::invalid("spec", "missing"))?;
    let spec =
        VpsSpecData::from_pb(&spec_pb).map_err(|e| ControllerError::invalid("spec.net.ip", e))?;
    check_spec(&spec)?;
    let desired = match r.desired.as_str() {
        "" | "running" => Desired::Running,
        "stopped" => Desired::Stopped,
        d => {
            return Err(ControllerError::invalid(
                "desired",
                format!("{d:?} is not running or stopped"),
            ))
        }
    };
    let p = r.placement.unwrap_or_default();
    let cmd = VpsCmd::Create {
        spec: Box::new(spec),
        pin_node: p.node,
        node_selector: p.node_selector.into_iter().collect::<BTreeMap<_, _>>(),
        anti_affinity_group: p.anti_affinity_group,
        desired,
        allocate_ip: r.allocate_ip,
        now_ms: now_ms(),
    };
    let m = ctl.member().await?;
    // The pre-check sees every acknowledged write (a replica behind could
    // refuse a VPS for a node registered a moment ago); apply checks again.
    let check = |s: &ClusterState| precheck(s, &cmd);
    match write(&m, id, check, Request::Vps(cmd.clone())).await? {
        Response::Vps(v) => Ok(to_pb(&v)),
        r => Err(ControllerError::Raft(format!("unexpected {r:?}"))),
    }
}

fn exists(s: &ClusterState, name: &str) -> Result<(), ControllerError> {
    match s.vps.contains_key(name) {
        true => Ok(()),
        false => Err(not_found(name)),
    }
}

pub async fn get(ctl: &Controller, name: &str) -> Result<cpb::ClusterVps, ControllerError> {
    let m = ctl.member().await?;
    m.read_barrier().await?;
    m.sm.read(|a| a.state.vps.get(name).map(to_pb))
        .ok_or_else(|| not_found(name))
}

pub async fn list(
    ctl: &Controller,
    f: cpb::ListVpsRequest,
) -> Result<cpb::ListVpsResponse, ControllerError> {
    let label = if f.label.is_empty() {
        None
    } else {
        Some(
            f.label
                .split_once('=')
                .ok_or_else(|| ControllerError::invalid("label", "use key=value"))?,
        )
    };
    let m = ctl.member().await?;
    m.read_barrier().await?;
    Ok(m.sm.read(|a| {
        let vps = a
            .state
            .vps
            .values()
            .filter(|v| f.node.is_empty() || v.node == f.node)
            // What the VPS's node reports, not what is wanted of it: a VPS
            // whose node is down is `unknown`, not `running`.
            .filter(|v| f.status.is_empty() || v.observed == f.status)
            .filter(|v| match label {
                None => true,
                Some((k, val)) => {
                    a.state
                        .nodes
                        .get(&v.node)
                        .and_then(|n| n.labels.get(k))
                        .map(String::as_str)
                        == Some(val)
                }
            })
            .map(to_pb)
            .collect();
        cpb::ListVpsResponse { vps }
    }))
}

pub async fn delete(
    ctl: &Controller,
    id: Option<String>,
    name: &str,
    force: bool,
) -> Result<(), ControllerError> {
    let m = ctl.member().await?;
    let check = |s: &ClusterState| {
        let v = s.vps.get(name).ok_or_else(|| not_found(name))?;
        if !force && (v.desired == Desired::Running || v.observed == "running") {
            return Err(ControllerError::Rejected {
                code: RejectCode::FailedPrecondition,
                message: format!(
                    "VPS {name:?} runs (or is meant to run) on {}: stop it first, or \
                     force its deletion (ferryctl vps destroy --force)",
                    v.node
                ),
            });
        }
        Ok(())
    };
    let cmd = Request::Vps(VpsCmd::Delete {
        name: name.to_string(),
        now_ms: now_ms(),
    });
    write(&m, id, check, cmd).await.map(|_| ())
}

/// Wants the VPS running or stopped; the reconciler makes its node follow.
pub async fn set_desired(
    ctl: &Controller,
    id: Option<String>,
    name: &str,
    desired: Desired,
) -> Result<cpb::ClusterVps, ControllerError> {
    let m = ctl.member().await?;
    let cmd = Request::Vps(VpsCmd::SetDesired {
        name: name.to_string(),
        desired,
        now_ms: now_ms(),
    });
    match write(&m, id, |s| exists(s, name), cmd).await? {
        Response::Vps(v) => Ok(to_pb(&v)),
        r => Err(ControllerError::Raft(format!("unexpected {r:?}"))),
    }
}

/// New limits for a VPS; its node applies them (live when it runs).
pub async fn update(
    ctl: &Controller,
    id: Option<String>,
    r: cpb::UpdateVpsRequest,
) -> Result<cpb::ClusterVps, ControllerError> {
    if r.memory_bytes.is_some_and(|m| m < MIN_MEMORY) {
        return Err(ControllerError::invalid(
            "memory_bytes",
            format!("at least {MIN_MEMORY} bytes"),
        ));
    }
    if r.cpu_weight.is_some_and(|w| !(1..=10000).contains(&w)) {
        return Err(ControllerError::invalid("cpu_weight", "1 to 10000"));
    }
    let limits = crate::state::LimitsUpdate {
        cpu_millicores: r.cpu_millicores,
        cpu_weight: r.cpu_weight,
        memory_bytes: r.memory_bytes,
        swap_bytes: r.swap_bytes,
        pids: r.pids,
        disk_bytes: r.disk_bytes,
    };
    if r.disk_bytes.is_some_and(|d| d < MIN_DISK) {
        return Err(ControllerError::invalid(
            "disk_bytes",
            format!("at least {MIN_DISK} bytes"),
        ));
    }
    if limits == crate::state::LimitsUpdate::default() {
        return Err(ControllerError::invalid("limits", "nothing to change"));
    }
    let m = ctl.member().await?;
    let check = |s: &ClusterState| exists(s, &r.name);
    let cmd = Request::Vps(VpsCmd::Update {
        name: r.name.clone(),
        limits,
        now_ms: now_ms(),
    });
    match write(&m, id, check, cmd).await? {
        Response::Vps(v) => Ok(to_pb(&v)),
        r => Err(ControllerError::Raft(format!("unexpected {r:?}"))),
    }
}
