//! Restore on the target: CRIU rebuilds the tree into the target's cgroups,
//! rootfs and network namespace (same IP and MAC) and holds it at
//! post-restore: nothing in it runs until the decision.

use ferry_proto::agent::v1 as pb;
use ferry_proto::agent::v1::agent_service_client::AgentServiceClient;
use tonic::transport::Channel;

use super::{status_msg, Job, MigrateError, Mode, Progress, State};

pub async fn run(
    target: &mut AgentServiceClient<Channel>,
    job: &Job,
    mode: Mode,
    st: &State,
    p: &mut Progress,
) -> Result<(), MigrateError> {
    p.phase("restore", "").await;
    target
        .migrate_restore(pb::MigrateRestoreRequest {
            migration_id: job.id.clone(),
            live: mode != Mode::Cold,
            console_key: st.console_key.clone(),
            page_server: st.page_server.clone().unwrap_or_default(),
        })
        .await
        .map_err(|s| MigrateError::at("restore")(status_msg(s)))?;
    p.done_phase("restore", 0);
    Ok(())
}
