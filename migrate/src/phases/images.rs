//! Images: the CRIU images of the frozen tree go to the target.
//!
//! In a stop-copy, most of them go while CRIU is still dumping: [`follow`]
//! sends the memory pages (`pages-*.img`, which only grow during a dump) as
//! CRIU writes them, and [`push`] then sends the rest and the pages' tails.
//! The dump and the transfer overlap instead of running one after the other.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::agent::v1 as pb;
use ferry_proto::agent::v1::agent_service_client::AgentServiceClient;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use super::rootfs::{push_tree, Walk};
use super::{status_msg, Job, MigrateError, Progress};
use crate::tree::send::{send_growth, Adaptive, Compress};

/// The data that closes a message of the follower.
const BATCH_BYTES: usize = 2 << 20;
/// How often the follower looks for more pages.
const LOOK_EVERY: Duration = Duration::from_millis(2);

/// What the target got while the dump ran.
#[derive(Debug, Default)]
pub struct Streamed {
    /// Per file: (inode, bytes the target holds).
    pub resume: HashMap<PathBuf, (u64, u64)>,
    pub wire_bytes: u64,
}

/// Sends the pages CRIU writes into `images` while it dumps, until
/// [`Follower::finish`].
pub struct Follower {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<Streamed, String>>,
}

pub fn follow(target: &AgentServiceClient<Channel>, job: &Job, images: PathBuf) -> Follower {
    let stop = Arc::new(AtomicBool::new(false));
    let (mut target, id, stop2) = (target.clone(), job.id.clone(), Arc::clone(&stop));
    let task = tokio::spawn(async move {
        let (tx, rx) = mpsc::channel::<pb::MigrateChunk>(8);
        let producer = tokio::task::spawn_blocking(move || produce(&tx, &id, &images, &stop2));
        let pushed = target
            .migrate_push(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        let produced = producer.await.map_err(|e| format!("sender thread: {e}"))?;
        pushed.map_err(status_msg)?;
        produced
    });
    Follower { stop, task }
}

impl Follower {
    /// The dump has ended: stops following and says what the target holds.
    /// A failed follower costs only time: [`push`] then sends everything.
    pub async fn finish(self) -> Streamed {
        self.stop.store(true, Ordering::Release);
        match self.task.await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "sending the pages during the dump failed; they go after it");
                Streamed::default()
            }
            Err(e) => {
                tracing::warn!(error = %e, "the pages' sender ended; they go after the dump");
                Streamed::default()
            }
        }
    }
}

fn produce(
    tx: &mpsc::Sender<pb::MigrateChunk>,
    id: &str,
    root: &Path,
    stop: &AtomicBool,
) -> Result<Streamed, String> {
    let link = Arc::new(Adaptive::default());
    let z = Compress::Adaptive(Arc::clone(&link));
    let put = |items: Vec<pb::TreeItem>, bytes: usize| -> Result<(), String> {
        let c = pb::MigrateChunk {
            migration_id: id.to_string(),
            area: "images".into(),
            items,
        };
        let closed = || "the target stopped reading".to_string();
        match tx.try_send(c) {
            Ok(()) => {
                link.sent(false, bytes);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(c)) => {
                link.sent(true, bytes);
                tx.blocking_send(c).map_err(|_| closed())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(closed()),
        }
    };
    // The target learns the migration and area even if no page comes.
    put(Vec::new(), 0)?;
    let mut st = Streamed::default();
    let (mut batch, mut bytes) = (Vec::new(), 0usize);
    while !stop.load(Ordering::Acquire) {
        for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let name = PathBuf::from(e.file_name());
            let Ok(md) = e.metadata() else { continue };
            if !is_pages(&name) || !md.is_file() {
                continue;
            }
            let at = st.resume.entry(name.clone()).or_insert((md.ino(), 0));
            if at.0 != md.ino() {
                // Made anew: from its start.
                *at = (md.ino(), 0);
            }
            if md.len() <= at.1 {
                continue;
            }
            at.1 = send_growth(root, &name, at.1, &z, &mut |it| {
                if let Some(pb::tree_item::Item::Data(d)) = &it.item {
                    bytes += d.data.len();
                    st.wire_bytes += d.data.len() as u64;
                }
                batch.push(it);
                if bytes >= BATCH_BYTES {
                    put(std::mem::take(&mut batch), bytes)
                        .map_err(crate::tree::TreeError::Closed)?;
                    bytes = 0;
                }
                Ok(())
            })
            .map_err(|e| e.to_string())?;
        }
        if !batch.is_empty() {
            put(std::mem::take(&mut batch), bytes)?;
            bytes = 0;
        }
        std::thread::sleep(LOOK_EVERY);
    }
    Ok(st)
}

/// A CRIU memory pages file (`pages-N.img`): it only grows during a dump.
pub(crate) fn is_pages(name: &Path) -> bool {
    name.to_str()
        .is_some_and(|n| n.starts_with("pages-") && n.ends_with(".img"))
}

/// What a push of the images dir reads: the dir may be a link (to RAM), so
/// what it points at.
pub(crate) fn sent_root(images: &Path) -> PathBuf {
    std::fs::canonicalize(images).unwrap_or_else(|_| images.to_path_buf())
}

/// Sends the images: only what the target lacks of them, after a [`follow`]
/// (`streamed`) and pre-copy's rounds (`sent`: the tree it holds).
pub async fn push(
    target: &mut AgentServiceClient<Channel>,
    job: &Job,
    images: &Path,
    streamed: Streamed,
    sent: Option<crate::tree::scan::Manifest>,
    p: &mut Progress,
) -> Result<(), MigrateError> {
    p.phase("images", "").await;
    let (_, _, st, _) = push_tree(
        target,
        &job.id,
        "images",
        sent_root(images),
        Walk {
            prev: sent,
            resume: streamed.resume,
            ..Walk::default()
        },
        Default::default(),
        p,
        "images",
    )
    .await
    .map_err(MigrateError::at("images"))?;
    p.bytes("images", st.raw_bytes, st.raw_bytes).await;
    p.done_phase("images", st.wire_bytes + streamed.wire_bytes);
    Ok(())
}
