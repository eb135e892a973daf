//! Rootfs passes: pass 1 while the VPS runs sends the whole tree; the final
//! pass, while it is frozen, sends only what changed since (big files by
//! block). Also the generic tree push the images use, and verify mode.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ferry_proto::agent::v1 as pb;
use ferry_proto::agent::v1::agent_service_client::AgentServiceClient;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use super::{status_msg, Job, MigrateError, Progress, Source};
use crate::tree::scan::Manifest;
use crate::tree::send::{Adaptive, BlockHashes, Compress, SendOpts, SendStats};
use crate::tree::watch::Watch;
use crate::tree::{plan, scan, send, TreeError};

/// Items per gRPC message, and the data size that closes a message early.
const BATCH_ITEMS: usize = 512;
const BATCH_BYTES: usize = 2 << 20;

pub struct RootfsSync {
    root: PathBuf,
    prev: Option<Manifest>,
    hashes: BlockHashes,
    /// Tracks changes between passes, so a later pass reads only the
    /// directories something happened in (None: every pass walks it all).
    watch: Option<Watch>,
}

impl RootfsSync {
    pub fn new(root: PathBuf) -> Self {
        let watch = Watch::new()
            .map_err(|e| tracing::warn!(error = %e, "no change tracking: every rootfs pass walks the whole tree"))
            .ok();
        RootfsSync {
            root,
            prev: None,
            hashes: BlockHashes::default(),
            watch,
        }
    }

    /// One pass: everything the first time, then what changed since the last
    /// pass, plus the files in `always` (see [`plan::plan_with`]).
    pub async fn pass(
        &mut self,
        target: &mut AgentServiceClient<Channel>,
        job: &Job,
        p: &mut Progress,
        phase: &'static str,
        always: BTreeSet<PathBuf>,
    ) -> Result<SendStats, MigrateError> {
        p.phase(phase, "").await;
        let (m, h, st, w) = push_tree(
            target,
            &job.id,
            "rootfs",
            self.root.clone(),
            Walk {
                prev: self.prev.take(),
                watch: self.watch.take(),
                always,
                resume: Default::default(),
            },
            std::mem::take(&mut self.hashes),
            p,
            phase,
        )
        .await
        .map_err(MigrateError::at(phase))?;
        self.prev = Some(m);
        self.hashes = h;
        self.watch = w;
        p.bytes(phase, st.raw_bytes, st.raw_bytes).await;
        p.done_phase(phase, st.wire_bytes);
        Ok(st)
    }
}

/// How a push finds what to send.
#[derive(Default)]
pub struct Walk {
    /// The manifest the receiver already matches (None: it has nothing).
    pub prev: Option<Manifest>,
    /// Change tracking since `prev` was taken (None: walk the whole tree).
    pub watch: Option<Watch>,
    /// Files sent even when lstat sees no change.
    pub always: BTreeSet<PathBuf>,
    /// Files the receiver has a first part of (see [`SendOpts::resume`]).
    pub resume: std::collections::HashMap<PathBuf, (u64, u64)>,
}

impl Walk {
    /// The tree's manifest now: read whole, or only where `watch` saw changes.
    fn manifest(&mut self, root: &Path) -> Result<Manifest, TreeError> {
        let Some(w) = self.watch.as_mut() else {
            return scan::scan(root);
        };
        let Some(prev) = &self.prev else {
            return scan::scan_watched(root, Some(w));
        };
        let ch = w.drain();
        if ch.everything {
            return scan::scan(root);
        }
        let mut m = scan::rescan(root, prev, &ch.dirs, w)?;
        // Mapped files may have changed without an event: look again.
        for p in &self.always {
            if let Ok(md) = std::fs::symlink_metadata(root.join(p)) {
                if let Some(e) = m.entries.get_mut(p) {
                    *e = scan::Meta::from_metadata(&md);
                }
            }
        }
        Ok(m)
    }
}

/// Sends `root` (or what changed in it since `walk.prev`) as `area` of
/// migration `id`, reporting bytes sent (of the plan's file bytes) under
/// `phase`. Hands the change tracker back for the next pass.
#[allow(clippy::too_many_arguments)]
pub async fn push_tree(
    target: &mut AgentServiceClient<Channel>,
    id: &str,
    area: &str,
    root: PathBuf,
    mut walk: Walk,
    mut hashes: BlockHashes,
    p: &Progress,
    phase: &str,
) -> Result<(Manifest, BlockHashes, SendStats, Option<Watch>), String> {
    let (tx, rx) = mpsc::channel::<pb::MigrateChunk>(8);
    let (id2, area2) = (id.to_string(), area.to_string());
    // (bytes read so far, bytes the plan will read), shared with the sender thread.
    let counts = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let c2 = Arc::clone(&counts);
    // Set when the push has ended (the target answered, maybe with an error):
    // the sender must not wait for room in a channel nobody drains any more.
    let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ended2 = Arc::clone(&ended);
    let producer = tokio::task::spawn_blocking(move || {
        let chunk = |items| pb::MigrateChunk {
            migration_id: id2.clone(),
            area: area2.clone(),
            items,
        };
        // Compression follows the link and the data (see Adaptive).
        let z = Arc::new(Adaptive::default());
        // `bytes`: the message's file data on the wire.
        let put = |mut c: pb::MigrateChunk, bytes: usize| -> Result<(), TreeError> {
            let mut first = true;
            loop {
                let res = tx.try_send(c);
                if first {
                    z.sent(
                        matches!(res, Err(mpsc::error::TrySendError::Full(_))),
                        bytes,
                    );
                    first = false;
                }
                match res {
                    Ok(()) => return Ok(()),
                    Err(mpsc::error::TrySendError::Full(back)) => {
                        if ended2.load(Ordering::Relaxed) {
                            return Err(TreeError::Closed("the target stopped reading".into()));
                        }
                        c = back;
                        std::thread::sleep(std::time::Duration::from_micros(200));
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        return Err(TreeError::Closed("the target stopped reading".into()))
                    }
                }
            }
        };
        let m = walk.manifest(&root)?;
        let plan = plan::plan_with(walk.prev.as_ref(), &m, |x| hashes.has(x), &walk.always);
        let total: u64 = plan
            .sends
            .iter()
            .filter_map(|(path, _)| m.entries.get(path))
            .filter(|e| e.kind == ferry_proto::agent::v1::tree_entry::Kind::File)
            .map(|e| e.size)
            .sum();
        c2.1.store(total, Ordering::Relaxed);
        let mut batch = Vec::with_capacity(BATCH_ITEMS);
        let mut bytes = 0usize;
        let mut sent_any = false;
        let st = send::send(
            &root,
            &m,
            &plan,
            &mut hashes,
            SendOpts {
                compress: Compress::Adaptive(Arc::clone(&z)),
                resume: std::mem::take(&mut walk.resume),
            },
            &mut |it| {
                if let Some(pb::tree_item::Item::Data(d)) = &it.item {
                    bytes += d.data.len();
                    c2.0.fetch_add(d.raw_len as u64, Ordering::Relaxed);
                }
                batch.push(it);
                if batch.len() >= BATCH_ITEMS || bytes >= BATCH_BYTES {
                    put(chunk(std::mem::take(&mut batch)), bytes)?;
                    bytes = 0;
                    sent_any = true;
                }
                Ok(())
            },
        )?;
        // At least one message, so the target learns the migration and area.
        if !batch.is_empty() || !sent_any {
            put(chunk(batch), bytes)?;
        }
        Ok::<_, TreeError>((m, hashes, st, walk.watch))
    });
    let push = target.migrate_push(tokio_stream::wrappers::ReceiverStream::new(rx));
    tokio::pin!(push);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    let resp = loop {
        tokio::select! {
            r = &mut push => break r,
            _ = tick.tick() => {
                let (done, total) = (counts.0.load(Ordering::Relaxed), counts.1.load(Ordering::Relaxed));
                if total > 0 {
                    p.bytes(phase, done, total).await;
                }
            }
        }
    };
    ended.store(true, Ordering::Relaxed);
    let produced = producer.await.map_err(|e| format!("sender thread: {e}"))?;
    match (resp, produced) {
        (Ok(_), Ok(done)) => Ok(done),
        // The sender stopped because the target did: the target says why.
        (Err(s), Err(TreeError::Closed(_))) => Err(status_msg(s)),
        // Our side failed (the target saw only an ended stream).
        (_, Err(e)) => Err(e.to_string()),
        (Err(s), Ok(_)) => Err(status_msg(s)),
    }
}

/// Verify mode: both trees' digests must match.
pub async fn verify(
    src: &dyn Source,
    target: &mut AgentServiceClient<Channel>,
    job: &Job,
    p: &mut Progress,
) -> Result<(), MigrateError> {
    p.phase("verify", "comparing both trees").await;
    let root = src.rootfs();
    let ours = tokio::task::spawn_blocking(move || crate::tree::digest::digest(&root))
        .await
        .map_err(|e| MigrateError::at("verify")(e.to_string()))?
        .map_err(|e| MigrateError::at("verify")(e.to_string()))?;
    let theirs = target
        .tree_digest(pb::TreeDigestRequest {
            tree: format!("incoming:{}", job.id),
        })
        .await
        .map_err(|s| MigrateError::at("verify")(status_msg(s)))?
        .into_inner();
    if theirs.digest != ours.0 {
        return Err(MigrateError::at("verify")(format!(
            "trees differ: source {} ({} entries), target {} ({} entries)",
            ours.0, ours.1, theirs.digest, theirs.entries
        )));
    }
    p.done_phase("verify", 0);
    Ok(())
}
