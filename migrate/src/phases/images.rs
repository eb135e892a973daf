//! Images: the CRIU images of the frozen tree go to the target.

use std::path::Path;

use ferry_proto::agent::v1::agent_service_client::AgentServiceClient;
use tonic::transport::Channel;

use super::rootfs::{push_tree, Walk};
use super::{Job, MigrateError, Progress};

pub async fn push(
    target: &mut AgentServiceClient<Channel>,
    job: &Job,
    images: &Path,
    p: &mut Progress,
) -> Result<(), MigrateError> {
    p.phase("images", "").await;
    let (_, _, st, _) = push_tree(
        target,
        &job.id,
        "images",
        // The images dir may be a link (to RAM): send what it points at.
        std::fs::canonicalize(images).unwrap_or_else(|_| images.to_path_buf()),
        Walk::default(),
        Default::default(),
        p,
        "images",
    )
    .await
    .map_err(MigrateError::at("images"))?;
    p.bytes("images", st.raw_bytes, st.raw_bytes).await;
    p.done_phase("images", st.wire_bytes);
    Ok(())
}
