//! `MigrateVps` and `DecideMigration`: the wire side of cluster migrations.
//! Starting and following one is [`crate::ops::migration`]'s, shared with
//! drain, restore and the rebalancer.

use ferry_proto::agent::v1 as apb;
use ferry_proto::controller::v1 as cpb;

use super::{applied, now_ms};
use crate::error::ControllerError;
use crate::host::Controller;
use crate::ops::migration::{self, Move};
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
