//! Freeze and final dump: CRIU freezes the whole tree, locks its network
//! (nftables), dumps it, and ends the source copy (post-copy: dumps all but
//! the memory, which it then serves, the tree frozen meanwhile). From here
//! until the decision, the VPS runs nowhere: this is the downtime.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{MigrateError, Progress, Source, State};

pub async fn run(
    src: &dyn Source,
    images: &Path,
    lazy: bool,
    p: &mut Progress,
    st: &mut State,
) -> Result<BTreeSet<PathBuf>, MigrateError> {
    p.phase("freeze", "freezing and dumping").await;
    st.frozen_at = Some(Instant::now());
    let d = src.dump(images, lazy).await.map_err(|e| {
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
    // What the final rootfs pass must send whatever lstat says.
    Ok(d.shared_writable.into_iter().collect())
}
