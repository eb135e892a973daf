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
    crate::failpoint::hit("commit-before-finish").await;
    p.phase("resume", "").await;
    let ran_ago = finish_committed(target, job)
        .await
        .map_err(MigrateError::at("resume"))?;
    if let Some(t) = st.frozen_at {
        // The target may have run it before our word came (it follows the
        // decision itself when we are slow): the downtime ended then.
        st.downtime = Some(t.elapsed().saturating_sub(ran_ago));
    }
    p.done_phase("resume", 0);
    Ok(())
}

/// Tells the target to let the VPS run, retrying through transient failures.
/// Returns how long ago the VPS started running there (zero unless the target
/// had followed the decision without us).
pub async fn finish_committed(
    target: &mut AgentServiceClient<Channel>,
    job: &Job,
) -> Result<Duration, String> {
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
            Ok(r) => return Ok(Duration::from_millis(r.into_inner().ran_ms_ago)),
            Err(s) if Instant::now() < end && s.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => return Err(status_msg(s)),
        }
    }
}
