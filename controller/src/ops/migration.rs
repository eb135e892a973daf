//! Starting and following a cluster migration: the one way the API, drain,
//! restore and the rebalancer move a VPS.
//!
//! [`start`] checks the request against the state (a refusal writes no Raft
//! entry), records the migration in Raft (which holds the target's room),
//! then asks the source agent to run it, giving it the controllers'
//! addresses so the decision is a Raft commit (`DecideMigration`). Its
//! progress comes back as a stream whose phases are recorded in Raft.
//!
//! The controller only starts and watches a migration: the agents run it and
//! settle it, so a controller failover (or a caller that goes away) does not
//! stop it, and the record ends with the decision.

use std::sync::Arc;

use ferry_proto::agent::v1 as apb;
use futures::stream::BoxStream;
use futures::StreamExt;
use tracing::Instrument;

use crate::api::{applied, now_ms};
use crate::error::ControllerError;
use crate::host::Controller;
use crate::member::Member;
use crate::state::migration::check_begin;
use crate::state::{MigrationCmd, Request, Response};

pub type MigrationStream = BoxStream<'static, Result<apb::MigrationEvent, tonic::Status>>;

/// What to move, where and how. Names are checked by the caller.
#[derive(Debug, Clone)]
pub struct Move {
    pub name: String,
    /// Empty: the scheduler picks the target.
    pub to_node: String,
    pub mode: apb::MigrationMode,
    pub verify: bool,
    /// The drain or restore it is for (its item must be pending).
    pub drain: Option<crate::state::drain::DrainRef>,
}

/// A migration under way.
pub struct Started {
    pub id: String,
    pub source: String,
    pub target: String,
    /// The source agent's progress; it ends with an event that has `done`.
    /// The migration goes on if this is dropped.
    pub events: MigrationStream,
}

/// Records the migration and starts it on the source agent.
pub async fn start(ctl: &Controller, r: Move) -> Result<Started, ControllerError> {
    let mode = r.mode;
    let m = ctl.member().await?;
    m.read_barrier().await?;
    m.sm.read(|a| check_begin(&a.state, &r.name, &r.to_node))
        .map_err(|(code, message)| ControllerError::Rejected { code, message })?;
    // Reach the source agent before anything is recorded: an unreachable
    // source writes no Raft entry (and costs a drain's item no attempt).
    let source = m.sm.read(|a| {
        a.state
            .vps
            .get(&r.name)
            .and_then(|v| a.state.nodes.get(&v.node))
            .map(|n| (n.name.clone(), n.addr.clone()))
    });
    let Some((source_node, source_addr)) = source else {
        return Err(ControllerError::Rejected {
            code: crate::state::RejectCode::NotFound,
            message: format!("VPS {:?} or its node is gone", r.name),
        });
    };
    let source_client = connect_source(&source_node, &source_addr).await?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let id = format!("m{nanos:x}");
    let v = match applied(
        m.propose(Request::Migration(MigrationCmd::Begin {
            name: r.name.clone(),
            id: id.clone(),
            target: r.to_node.clone(),
            mode: ferry_proto::modes::name(mode).into(),
            now_ms: now_ms(),
            drain: r.drain.clone(),
        }))
        .await?,
    )? {
        Response::Vps(v) => v,
        other => return Err(ControllerError::Raft(format!("unexpected {other:?}"))),
    };
    let Some(mig) = v.migration.clone() else {
        return Err(ControllerError::Raft(
            "the migration was not recorded".into(),
        ));
    };
    let span = tracing::info_span!("migrate", vps = %r.name, migration = %id, source = %v.node, target = %mig.target);
    let dst_addr =
        m.sm.read(|a| a.state.nodes.get(&mig.target).map(|n| n.addr.clone()));
    let (Some(dst_addr), true) = (dst_addr, v.node == source_node) else {
        abandon(&m, &r.name, &id, "a node left the cluster").await;
        return Err(ControllerError::Raft(
            "a node of the migration is gone".into(),
        ));
    };
    // A target without the VPS's template fetches it first.
    let fetch =
        m.sm.read(|a| super::templates::needed(&a.state, &mig.target, &v.spec.template));
    if let Some(f) = fetch {
        if let Err(e) = super::templates::fetch(&mig.target, &dst_addr, &f).await {
            abandon(&m, &r.name, &id, &e).await;
            return Err(ControllerError::Rejected {
                code: crate::state::RejectCode::FailedPrecondition,
                message: e,
            });
        }
    }
    let controllers: Vec<String> = m.status().members.into_iter().map(|x| x.addr).collect();
    let req = apb::MigrateVpsRequest {
        name: r.name.clone(),
        target_addr: dst_addr,
        target_node: mig.target.clone(),
        mode: mode as i32,
        migration_id: id.clone(),
        generation: v.generation + 1,
        verify: r.verify,
        controllers,
    };
    let events = match start_on_source(&v.node, source_client, req).await {
        Ok(s) => s,
        Err(e) => {
            abandon(&m, &r.name, &id, &e.to_string()).await;
            return Err(e);
        }
    };
    tracing::info!(parent: &span, "migration started on the source agent");
    let events = relay(m, r.name, id.clone(), events).instrument(span).await;
    Ok(Started {
        id,
        source: v.node.clone(),
        target: mig.target.clone(),
        events,
    })
}

use super::{agent as connect_source, AgentClient};

async fn start_on_source(
    node: &str,
    mut client: AgentClient,
    req: apb::MigrateVpsRequest,
) -> Result<tonic::Streaming<apb::MigrationEvent>, ControllerError> {
    client
        .migrate_vps(req)
        .await
        .map(|r| r.into_inner())
        .map_err(|s| ControllerError::Agent {
            node: node.to_string(),
            code: s.code(),
            message: s.message().to_string(),
        })
}

/// Forwards the source's events to the caller and records each new phase in
/// Raft (off the forwarding path). Runs to the end even if the caller leaves.
async fn relay(
    m: Arc<Member>,
    name: String,
    id: String,
    mut events: tonic::Streaming<apb::MigrationEvent>,
) -> MigrationStream {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let (phase_tx, mut phase_rx) = tokio::sync::watch::channel(String::new());
    {
        let (m, name, id) = (m.clone(), name.clone(), id.clone());
        tokio::spawn(
            async move {
                while phase_rx.changed().await.is_ok() {
                    let phase = phase_rx.borrow_and_update().clone();
                    let cmd = MigrationCmd::Phase {
                        name: name.clone(),
                        id: id.clone(),
                        phase,
                    };
                    // Display only: a lost phase update is harmless.
                    let _ = m.propose(Request::Migration(cmd)).await;
                }
            }
            .in_current_span(),
        );
    }
    tokio::spawn(
        async move {
            let mut last = String::new();
            let mut ended = false;
            while let Some(item) = events.next().await {
                match item {
                    Ok(ev) => {
                        if ev.done {
                            ended = true;
                            // Its figures for the move's record (the source
                            // reports them too; the first report stands).
                            let cmd = MigrationCmd::Finish {
                                name: name.clone(),
                                id: id.clone(),
                                report: crate::state::migration::Finished::from_event(&ev),
                                now_ms: now_ms(),
                            };
                            let _ = m.propose(Request::Migration(cmd)).await;
                            if !ev.error.is_empty() {
                                // The source settles this itself; repeating it
                                // is harmless (the first decision stands).
                                cancel(&m, &name, &id, "the migration failed").await;
                            }
                        } else if ev.phase != last {
                            last = ev.phase.clone();
                            let _ = phase_tx.send(last.clone());
                        }
                        let _ = tx.send(Ok(ev)).await;
                    }
                    Err(s) => {
                        let _ = tx
                            .send(Err(tonic::Status::unavailable(format!(
                                "lost the source agent's progress stream ({}); the agents \
                                 settle the migration themselves: see `ferryctl vps show {name}`",
                                s.message()
                            ))))
                            .await;
                        return;
                    }
                }
            }
            if !ended {
                let _ = tx
                    .send(Err(tonic::Status::unavailable(format!(
                        "the source agent's progress stream ended early; the agents settle \
                         the migration themselves: see `ferryctl vps show {name}`"
                    ))))
                    .await;
            }
        }
        .in_current_span(),
    );
    tokio_stream::wrappers::ReceiverStream::new(rx).boxed()
}

/// Cancels a migration that never got going (best effort: the first
/// decision stands).
async fn cancel(m: &Member, name: &str, id: &str, reason: &str) {
    let cmd = MigrationCmd::Decide {
        name: name.to_string(),
        id: id.to_string(),
        commit: false,
        reason: reason.to_string(),
        now_ms: now_ms(),
    };
    if let Err(e) = m.propose(Request::Migration(cmd)).await {
        tracing::warn!(error = %e, "could not record the migration's cancellation");
    }
}

/// Cancels a migration the source agent never ran: it ends here.
async fn abandon(m: &Member, name: &str, id: &str, reason: &str) {
    cancel(m, name, id, reason).await;
    let cmd = MigrationCmd::Finish {
        name: name.to_string(),
        id: id.to_string(),
        report: crate::state::migration::Finished {
            error: reason.to_string(),
            ..Default::default()
        },
        now_ms: now_ms(),
    };
    let _ = m.propose(Request::Migration(cmd)).await;
}
