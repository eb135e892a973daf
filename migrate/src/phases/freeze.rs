//! Freeze and final dump: CRIU freezes the whole tree, locks its network
//! (nftables), dumps it, and ends the source copy (post-copy: dumps all but
//! the memory, which it then serves, the tree frozen meanwhile). From here
//! until the decision, the VPS runs nowhere: this is the downtime.

use std::path::Path;
use std::time::Instant;

use super::{MigrateError, Progress, Source, State};

pub async fn run(
    src: &dyn Source,
    images: &Path,
    lazy: bool,
    p: &mut Progress,
    st: &mut State,
) -> Result<(), MigrateError> {
    p.phase("freeze", "freezing and dumping").await;
    st.frozen_at = Some(Instant::now());
    let d = src.dump(images, lazy).await.map_err(|e| {
        // CRIU resumed the tree: the VPS never stopped running on the source.
        st.frozen_at = None;
        MigrateError::at("freeze")(e)
    })?;
    st.console_key = d.console_key;
    st.page_server = d.page_server;
    st.shared_writable = d.shared_writable;
    if let Some(t) = d.frozen_at {
        st.frozen_at = Some(t);
    }
    let bytes = dir_size(images);
    p.done_phase("freeze", bytes);
    Ok(())
}

fn dir_size(d: &Path) -> u64 {
    std::fs::read_dir(d)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}
