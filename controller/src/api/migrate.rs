//! `MigrateVps` and `DecideMigration`: the wire side of cluster migrations.
//! Starting and following one is [`crate::ops::migration`]'s, shared with
//! drain, restore and the rebalancer.

use ferry_proto::agent::v1 as apb;
use ferry_proto::controller::v1 as cpb;

use super::{applied, now_ms};
use crate::error::ControllerError;
use crate::host::Controller;
use crate::ops::migration::{self, Move};
use crate::state::migration::{Finished, MoveRecord};
use crate::state::{MigrationCmd, Request, Response};

pub use crate::ops::migration::MigrationStream;

pub async fn migrate(
    ctl: &Controller,
    r: cpb::MigrateVpsRequest,
) -> Result<MigrationStream, ControllerError> {
    ferry_proto::names::check_dns_label(&r.name)
        .map_err(|e| ControllerError::invalid("name", e))?;
    if !r.to_node.is_empty() {
        ferry_proto::names::check_dns_label(&r.to_node)
            .map_err(|e| ControllerError::invalid("to_node", e))?;
    }
    let mode = apb::MigrationMode::try_from(r.mode)
        .map_err(|_| ControllerError::invalid("mode", format!("{} is not a mode", r.mode)))?;
    let started = migration::start(
        ctl,
        Move {
            name: r.name,
            to_node: r.to_node,
            mode,
            verify: r.verify,
            drain: None,
        },
    )
    .await?;
    Ok(started.events)
}

/// The decision point, asked by the migration's agents.
pub async fn decide(
    ctl: &Controller,
    r: cpb::DecideMigrationRequest,
) -> Result<cpb::DecideMigrationResponse, ControllerError> {
    if r.migration_id.is_empty() {
        return Err(ControllerError::invalid("migration_id", "missing"));
    }
    let m = ctl.member().await?;
    if r.query {
        m.read_barrier().await?;
        return m.sm.read(|a| {
            let v = a
                .state
                .vps
                .get(&r.name)
                .ok_or_else(|| ControllerError::Rejected {
                    code: crate::state::RejectCode::NotFound,
                    message: format!("VPS {:?} not found", r.name),
                })?;
            if let Some(o) = v.last_migration.as_ref().filter(|o| o.id == r.migration_id) {
                return Ok(cpb::DecideMigrationResponse {
                    moved: o.moved,
                    generation: v.generation,
                    decided: true,
                });
            }
            if v.migration
                .as_ref()
                .is_some_and(|mg| mg.id == r.migration_id)
            {
                return Ok(cpb::DecideMigrationResponse {
                    moved: false,
                    generation: v.generation,
                    decided: false,
                });
            }
            Err(ControllerError::Rejected {
                code: crate::state::RejectCode::FailedPrecondition,
                message: format!("VPS {} has no migration {}", r.name, r.migration_id),
            })
        });
    }
    let cmd = MigrationCmd::Decide {
        name: r.name.clone(),
        id: r.migration_id.clone(),
        commit: r.commit,
        reason: if r.commit {
            String::new()
        } else {
            "an agent rolled it back".into()
        },
        now_ms: now_ms(),
    };
    match applied(m.propose(Request::Migration(cmd)).await?)? {
        Response::Vps(v) => Ok(cpb::DecideMigrationResponse {
            moved: v
                .last_migration
                .as_ref()
                .is_some_and(|o| o.id == r.migration_id && o.moved),
            generation: v.generation,
            decided: true,
        }),
        other => Err(ControllerError::Raft(format!("unexpected {other:?}"))),
    }
}

/// The source agent's last event: its figures go into the move's record.
pub async fn finish(
    ctl: &Controller,
    r: cpb::FinishMigrationRequest,
) -> Result<cpb::FinishMigrationResponse, ControllerError> {
    if r.migration_id.is_empty() {
        return Err(ControllerError::invalid("migration_id", "missing"));
    }
    let last = r
        .last
        .ok_or_else(|| ControllerError::invalid("last", "missing"))?;
    if last.phases.len() > 64 || last.error.len() > 4096 || last.mode.len() > 32 {
        return Err(ControllerError::invalid(
            "last",
            "at most 64 phases, a 4 KiB error and a 32-byte mode",
        ));
    }
    let m = ctl.member().await?;
    applied(
        m.propose(Request::Migration(MigrationCmd::Finish {
            name: r.name,
            id: r.migration_id,
            report: Finished::from_event(&last),
            now_ms: now_ms(),
        }))
        .await?,
    )?;
    Ok(cpb::FinishMigrationResponse {})
}

pub type WatchStream = crate::ops::migration::MigrationStream;

/// How long a decided move may go without its end being reported before a
/// watch stops waiting (the source agent died in its post-copy window, or
/// never came back).
const REPORT_WAIT_MS: i64 = 10 * 60 * 1000;

/// The event a finished (or given up on) move ends its watch with.
fn last_event(h: &MoveRecord) -> apb::MigrationEvent {
    let error = match (h.moved, h.error.is_empty()) {
        (_, false) => h.error.clone(),
        (Some(false), true) if h.reason.is_empty() => "it was rolled back".into(),
        (Some(false), true) => format!("it was rolled back: {}", h.reason),
        _ => String::new(),
    };
    let node = match h.moved {
        Some(true) => h.target.clone(),
        _ => h.source.clone(),
    };
    let message = if h.ended_ms == 0 {
        "decided; the source never reported its end (post-copy and cleanup)".into()
    } else {
        format!("now on {node}")
    };
    apb::MigrationEvent {
        migration_id: h.id.clone(),
        phase: if error.is_empty() { "done" } else { "failed" }.into(),
        done: true,
        error,
        downtime_ms: h.downtime_ms,
        total_ms: h.total_ms,
        phases: h
            .phases
            .iter()
            .map(|(phase, millis, bytes)| apb::PhaseStat {
                phase: phase.clone(),
                millis: *millis,
                bytes: *bytes,
            })
            .collect(),
        mode: h.mode.clone(),
        node,
        message,
        ..Default::default()
    }
}

/// Follows one migration from its record: a phase event for each change,
/// then its last event once it has ended.
pub async fn watch(
    ctl: std::sync::Arc<Controller>,
    r: cpb::WatchMigrationRequest,
) -> Result<WatchStream, ControllerError> {
    use futures::StreamExt;
    ferry_proto::names::check_dns_label(&r.name)
        .map_err(|e| ControllerError::invalid("name", e))?;
    if r.migration_id.is_empty() {
        return Err(ControllerError::invalid("migration_id", "missing"));
    }
    let m = ctl.member().await?;
    m.read_barrier().await?;
    let find = move |m: &crate::member::Member| {
        m.sm.read(|a| {
            a.state
                .vps
                .get(&r.name)
                .and_then(|v| v.history.iter().find(|h| h.id == r.migration_id).cloned())
        })
    };
    let Some(first) = find(&m) else {
        return Err(ControllerError::Rejected {
            code: crate::state::RejectCode::NotFound,
            message: "no such migration of that VPS on record (it may be older than the last 10 \
                      moves, or the VPS is gone)"
                .into(),
        });
    };
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut metrics = m.raft.metrics();
        let mut phase = String::new();
        let mut h = first;
        loop {
            if h.ended_ms != 0 || (h.decided_ms != 0 && now_ms() - h.decided_ms > REPORT_WAIT_MS) {
                let _ = tx.send(Ok(last_event(&h))).await;
                return;
            }
            if h.phase != phase {
                phase = h.phase.clone();
                let ev = apb::MigrationEvent {
                    migration_id: h.id.clone(),
                    phase: phase.clone(),
                    mode: h.mode.clone(),
                    ..Default::default()
                };
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                _ = metrics.changed() => {}
                _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
                _ = tx.closed() => return,
            }
            match find(&m) {
                Some(next) => h = next,
                None => {
                    let _ = tx
                        .send(Err(tonic::Status::not_found(
                            "the VPS was deleted while it was followed",
                        )))
                        .await;
                    return;
                }
            }
        }
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
}
