//! Cleanup after a committed move: the source removes its copy (files,
//! kernel objects, images).

use super::{Progress, Source, State};

pub async fn run(src: &dyn Source, st: &State, p: &mut Progress) {
    p.phase("cleanup", "").await;
    if let Err(e) = src.release().await {
        tracing::warn!(error = %e, "removing the source copy after the move");
    }
    if let Some(i) = &st.images {
        let _ = std::fs::remove_dir_all(i);
    }
    p.done_phase("cleanup", 0);
}
