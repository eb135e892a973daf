//! Freeze and final dump: CRIU freezes the whole tree, locks its network,
//! dumps it, and ends the source copy (post-copy: dumps all but the memory,
//! which it then serves, the tree frozen meanwhile). From here until the
//! decision, the VPS runs nowhere: this is the downtime. In a stop-copy the
//! memory pages go to the target while CRIU writes them ([`images::follow`]);
//! after pre-copy's rounds, the dump writes only the pages the last round
//! missed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ferry_proto::agent::v1::agent_service_client::AgentServiceClient;
use tonic::transport::Channel;

use super::images::{self, Streamed};
use super::{Job, MigrateError, Progress, Source, State};

/// Which memory the final dump writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Memory {
    /// Stop-copy: every page.
    All,
    /// Pre-copy: the pages dirtied since the last round (its dir, relative
    /// to the images dir).
    SinceRound(String),
    /// Post-copy: none; the source's page server serves them.
    Served,
}

/// What the rest of the migration needs from the dump.
pub struct Frozen {
    /// Files the final rootfs pass must send whatever lstat says.
    pub mapped: BTreeSet<PathBuf>,
    /// What of the images the target has already.
    pub streamed: Streamed,
}

pub async fn run(
    src: &dyn Source,
    target: &AgentServiceClient<Channel>,
    job: &Job,
    images: &Path,
    memory: Memory,
    p: &mut Progress,
    st: &mut State,
) -> Result<Frozen, MigrateError> {
    p.phase("freeze", "freezing and dumping").await;
    st.frozen_at = Some(Instant::now());
    let follower =
        (memory != Memory::Served).then(|| images::follow(target, job, images.to_path_buf()));
    let (lazy, parent) = match &memory {
        Memory::All => (false, None),
        Memory::SinceRound(r) => (false, Some(r.as_str())),
        Memory::Served => (true, None),
    };
    let dumped = src.dump(images, lazy, parent).await;
    let streamed = match follower {
        Some(f) => f.finish().await,
        None => Streamed::default(),
    };
    let d = dumped.map_err(|e| {
        // CRIU resumed the tree: the VPS never stopped running on the source.
        st.frozen_at = None;
        MigrateError::at("freeze")(e)
    })?;
    st.console_key = d.console_key;
    st.page_server = d.page_server;
    if let Some(t) = d.frozen_at {
        st.frozen_at = Some(t);
    }
    p.done_phase("freeze", crate::tree::files_bytes(images));
    Ok(Frozen {
        mapped: d.shared_writable.into_iter().collect(),
        streamed,
    })
}
