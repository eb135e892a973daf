//! The decision point. The source asks the VPS's owner (the controller's Raft
//! log, or this agent in node-local use) to move ownership to the target, in
//! one commit fenced by the VPS's generation. Before it, any failure rolls
//! back; after it, the source never runs the VPS again and the target is told
//! to go until it has.

use std::time::{Duration, Instant};

use ferry_proto::agent::v1 as pb;
use ferry_proto::agent::v1::agent_service_client::AgentServiceClient;
use tonic::transport::Channel;

use super::{status_msg, Job, MigrateError, Progress, Source, State};

/// How long the target may take to accept a committed move before we give up
/// reporting (it keeps the VPS held; its agent asks the owner on its own).
const FINISH_RETRY: Duration = Duration::from_secs(30);

pub async fn run(
    src: &dyn Source,
    target: &mut AgentServiceClient<Channel>,
    job: &Job,
    st: &mut State,
    p: &mut Progress,
) -> Result<(), MigrateError> {
    p.phase("commit", "moving ownership").await;
    let moved = src.decide(true).await.map_err(MigrateError::at("commit"))?;
    if !moved {
        return Err(MigrateError::at("commit")(
            "the owner kept the VPS on the source (the migration was cancelled)".into(),
        ));
    }
    st.decided = Some(true);
    p.done_phase("commit", 0);
    p.phase("resume", "").await;
    finish_committed(target, job)
        .await
        .map_err(MigrateError::at("resume"))?;
    if let Some(t) = st.frozen_at {
        st.downtime = Some(t.elapsed());
    }
    p.done_phase("resume", 0);
    Ok(())
}

/// Tells the target to let the VPS run, retrying through transient failures.
pub async fn finish_committed(
    target: &mut AgentServiceClient<Channel>,
    job: &Job,
) -> Result<(), String> {
    let end = Instant::now() + FINISH_RETRY;
    loop {
        let r = target
            .migrate_finish(pb::MigrateFinishRequest {
                migration_id: job.id.clone(),
                commit: true,
                generation: job.generation,
            })
            .await;
        match r {
            Ok(_) => return Ok(()),
            Err(s) if Instant::now() < end && s.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => return Err(status_msg(s)),
        }
    }
}
