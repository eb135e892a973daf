//! Rollback of a migration that failed before its decision committed: the
//! target removes every trace, and the source runs on (resumed from its own
//! images if the failure came after the freeze). Returns what happened, for
//! the operator.

use ferry_proto::agent::v1 as pb;
use ferry_proto::agent::v1::agent_service_client::AgentServiceClient;
use tonic::transport::Channel;

use super::{commit, Job, Progress, Source, State};

pub async fn rollback(
    src: &dyn Source,
    target: &mut AgentServiceClient<Channel>,
    job: &Job,
    st: &State,
    p: &mut Progress,
) -> String {
    p.phase("rollback", "").await;
    if st.decided == Some(true) {
        // The VPS is the target's now. Unless its memory still comes from
        // here (post-copy: the target may be running it), the stopped copy
        // here is of no use to anyone: remove it now rather than leave it
        // for the controller's reconciler to find.
        if st.mode != Some(super::Mode::PostCopy) {
            if let Err(e) = src.release().await {
                return format!(
                    "the move was committed: the VPS belongs to the target now; removing the \
                     copy here failed: {e}"
                );
            }
        }
        return "the move was committed: the VPS belongs to the target now".into();
    }
    let dumped = st.frozen_at.is_some();
    if dumped {
        // Settle the decision as "stay" first, so nobody commits it later. If
        // it had been committed after all, finish the move instead.
        match src.decide(false).await {
            Ok(true) => {
                return match commit::finish_committed(target, job).await {
                    Ok(_) => {
                        src.release().await.ok();
                        "the move had been committed; the target runs the VPS".into()
                    }
                    Err(e) => format!(
                        "the move had been committed but the target did not confirm ({e}); \
                         its agent resolves it from the owner"
                    ),
                };
            }
            Ok(false) => {}
            Err(e) => {
                return format!(
                    "could not settle the decision ({e}); the VPS stays frozen on the source \
                     until its agent can ask the owner"
                )
            }
        }
    }
    let abort = pb::MigrateFinishRequest {
        migration_id: job.id.clone(),
        commit: false,
        generation: 0,
    };
    if st.prepared {
        let _ = target.migrate_finish(abort).await;
    } else if st.prepare_sent {
        // Unanswered (a stopped or hung target): it may still act on the
        // prepare once it runs again. The abort goes after it, in the
        // background, until the target answers; the target also refuses a
        // prepare whose abort came first.
        let mut target = target.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                let call = target.migrate_finish(abort.clone());
                if let Ok(Ok(_)) =
                    tokio::time::timeout(std::time::Duration::from_secs(30), call).await
                {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        });
    }
    let note = if dumped {
        let images = st.images.clone().unwrap_or_default();
        match src.resume(&images, &st.console_key).await {
            Ok(()) => "the VPS was resumed on the source from its checkpoint".to_string(),
            Err(e) => format!("resuming on the source failed: {e}"),
        }
    } else {
        "the VPS kept running on the source".to_string()
    };
    if let Some(i) = &st.images {
        let _ = std::fs::remove_dir_all(i);
    }
    p.done_phase("rollback", 0);
    note
}
