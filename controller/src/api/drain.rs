//! Drain, restore, their progress and cancellation (the wire side of
//! [`crate::state::drain`]; the leader's driver does the moving).

use ferry_proto::agent::v1 as apb;
use ferry_proto::controller::v1 as cpb;

use super::{applied, now_ms};
use crate::error::ControllerError;
use crate::host::Controller;
use crate::planner;
use crate::state::drain::{
    Drain, DrainCmd, DrainState, ItemStatus, Kind, DEFAULT_PARALLEL, MAX_PARALLEL,
};
use crate::state::{ClusterState, RejectCode, Request, Response};

/// The wire form of a drain; `live` adds the leader's progress of each move.
pub(crate) fn to_pb(s: &ClusterState, d: &Drain, live: Option<&Controller>) -> cpb::Drain {
    let items = d
        .items
        .iter()
        .map(|(name, i)| {
            let mut phase = String::new();
            let (mut bytes, mut downtime) = (i.bytes, i.downtime_ms);
            if i.status == ItemStatus::Moving {
                if let Some(m) = s.vps.get(name).and_then(|v| v.migration.as_ref()) {
                    phase = m.phase.clone();
                }
                if let Some(ev) = live.and_then(|c| c.leader.drain.progress_of(name)) {
                    bytes = ev.bytes_done;
                    downtime = ev.downtime_ms;
                    if !ev.phase.is_empty() {
                        phase = ev.phase;
                    }
                }
            }
            cpb::DrainItem {
                vps: name.clone(),
                status: i.status.name().into(),
                reason: i.reason.clone(),
                target: i.target.clone(),
                migration_id: i.migration_id.clone(),
                phase,
                attempts: i
                    .attempts
                    .iter()
                    .map(|a| cpb::DrainAttempt {
                        target: a.target.clone(),
                        migration_id: a.migration_id.clone(),
                        error: a.error.clone(),
                    })
                    .collect(),
                downtime_ms: downtime,
                bytes,
                mode: i.mode.clone(),
            }
        })
        .collect();
    cpb::Drain {
        id: d.id.clone(),
        node: d.node.clone(),
        kind: d.kind.name().into(),
        state: if d.paused.is_some() {
            "paused".into()
        } else {
            d.state.name().into()
        },
        reason: d.paused.clone().unwrap_or_else(|| d.reason.clone()),
        mode: d.mode.clone(),
        parallel: d.parallel,
        started_unix_ms: d.started_ms,
        ended_unix_ms: d.ended_ms,
        deadline_unix_ms: d.deadline_ms,
        items,
    }
}

fn parallel(p: u32) -> Result<u32, ControllerError> {
    match p {
        0 => Ok(DEFAULT_PARALLEL),
        p if p <= MAX_PARALLEL => Ok(p),
        p => Err(ControllerError::invalid(
            "parallel",
            format!("{p} is above the most moves at a time, {MAX_PARALLEL}"),
        )),
    }
}

fn mode(m: i32) -> Result<&'static str, ControllerError> {
    apb::MigrationMode::try_from(m)
        .map(ferry_proto::modes::name)
        .map_err(|_| ControllerError::invalid("mode", format!("{m} is not a migration mode")))
}

fn check_node(node: &str) -> Result<(), ControllerError> {
    if node.is_empty() {
        return Err(ControllerError::invalid("node", "name the node"));
    }
    Ok(())
}

pub async fn drain(
    ctl: &Controller,
    r: cpb::DrainNodeRequest,
) -> Result<cpb::DrainNodeResponse, ControllerError> {
    check_node(&r.node)?;
    let parallel = parallel(r.parallel)?;
    let mode = mode(r.mode)?;
    let deadline_ms = match r.deadline_secs {
        0 => 0,
        s if s > 7 * 24 * 3600 => {
            return Err(ControllerError::invalid("deadline_secs", "at most a week"))
        }
        s => now_ms() + s as i64 * 1000,
    };
    begin(
        ctl,
        &r.node,
        Kind::Drain,
        mode,
        parallel,
        deadline_ms,
        r.dry_run,
    )
    .await
}

pub async fn restore(
    ctl: &Controller,
    r: cpb::RestoreNodeRequest,
) -> Result<cpb::DrainNodeResponse, ControllerError> {
    check_node(&r.node)?;
    let parallel = parallel(r.parallel)?;
    let mode = mode(r.mode)?;
    begin(ctl, &r.node, Kind::Restore, mode, parallel, 0, r.dry_run).await
}

async fn begin(
    ctl: &Controller,
    node: &str,
    kind: Kind,
    mode: &str,
    parallel: u32,
    deadline_ms: i64,
    dry_run: bool,
) -> Result<cpb::DrainNodeResponse, ControllerError> {
    let m = ctl.member().await?;
    m.read_barrier().await?;
    let plan =
        m.sm.read(|a| planner::plan(&a.state, node, kind, mode))
            .map_err(|(code, message)| ControllerError::Rejected { code, message })?;
    let plan = plan
        .into_iter()
        .map(|p| cpb::DrainPlanItem {
            vps: p.vps,
            target: p.target,
            mode: p.mode,
            reason: p.why,
        })
        .collect();
    if dry_run {
        return Ok(cpb::DrainNodeResponse { drain: None, plan });
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let cmd = DrainCmd::Start {
        node: node.to_string(),
        id: format!("d{nanos:x}"),
        kind,
        mode: mode.to_string(),
        parallel,
        deadline_ms,
        now_ms: now_ms(),
    };
    match applied(m.propose(Request::Drain(cmd)).await?)? {
        Response::Drain(d) => Ok(cpb::DrainNodeResponse {
            drain: Some(m.sm.read(|a| to_pb(&a.state, &d, Some(ctl)))),
            plan,
        }),
        other => Err(ControllerError::Raft(format!("unexpected {other:?}"))),
    }
}

pub async fn get(ctl: &Controller, node: &str) -> Result<cpb::Drain, ControllerError> {
    check_node(node)?;
    let m = ctl.member().await?;
    m.read_barrier().await?;
    m.sm.read(|a| {
        a.state
            .drains
            .get(node)
            .map(|d| to_pb(&a.state, d, Some(ctl)))
    })
    .ok_or_else(|| ControllerError::Rejected {
        code: RejectCode::NotFound,
        message: format!("node {node:?} has never been drained"),
    })
}

pub async fn cancel(ctl: &Controller, node: &str) -> Result<cpb::Drain, ControllerError> {
    check_node(node)?;
    let m = ctl.member().await?;
    // Refused before anything is written: no drain, or one that ended.
    m.read_barrier().await?;
    m.sm.read(|a| match a.state.drains.get(node) {
        None => Err(ControllerError::Rejected {
            code: RejectCode::NotFound,
            message: format!("node {node:?} has no drain or restore"),
        }),
        Some(d) if d.state != DrainState::Running => Err(ControllerError::Rejected {
            code: RejectCode::FailedPrecondition,
            message: format!(
                "the {} of {node} has ended ({})",
                d.kind.name(),
                d.state.name()
            ),
        }),
        Some(_) => Ok(()),
    })?;
    let cmd = DrainCmd::Cancel {
        node: node.to_string(),
        now_ms: now_ms(),
    };
    match applied(m.propose(Request::Drain(cmd)).await?)? {
        Response::Drain(d) => Ok(m.sm.read(|a| to_pb(&a.state, &d, Some(ctl)))),
        other => Err(ControllerError::Raft(format!("unexpected {other:?}"))),
    }
}
