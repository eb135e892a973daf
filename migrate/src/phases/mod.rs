//! The live-migration engine, run by the source agent. One file per phase:
//!
//! [`preflight`] (target checks capacity, template, CRIU, CPU; nothing is
//! frozen yet) → [`rootfs`] pass 1 while the VPS runs → [`memory`] picks the
//! mode → (pre-copy: [`precopy`] rounds while the VPS runs) → [`freeze`]
//! (CRIU dumps the frozen tree; the source copy ends) →
//! [`rootfs`] final delta + [`images`] → [`restore`] on the target, held before
//! it runs → [`commit`]: the single decision point, then the target runs it →
//! (post-copy: the memory follows until the source has served every page) →
//! [`cleanup`] of the source copy, or [`rollback`].
//!
//! Until the decision commits, every failure rolls back: the target removes
//! what it got and the source runs on (resumed from its own images when the
//! failure came after the freeze). After it, the source never runs the VPS again.

pub mod cleanup;
pub mod commit;
pub mod freeze;
pub mod images;
pub mod memory;
pub mod precopy;
pub mod preflight;
pub mod restore;
pub mod rollback;
pub mod rootfs;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_proto::agent::v1 as pb;
use ferry_proto::agent::v1::agent_service_client::AgentServiceClient;
use tokio::sync::mpsc;
use tonic::transport::Channel;

pub use memory::Mode;

/// What the engine needs from the source node. The agent implements it.
#[tonic::async_trait]
pub trait Source: Send + Sync {
    fn spec(&self) -> pb::VpsSpec;
    fn running(&self) -> bool;
    /// The VPS's own files (its overlay upper dir).
    fn rootfs(&self) -> PathBuf;
    /// A scratch dir for the images.
    fn scratch(&self) -> PathBuf;
    fn criu_version(&self) -> String;
    fn dirty_tracking(&self) -> bool;
    /// Whether this node can serve a post-copy migration (lazy pages).
    fn post_copy(&self) -> bool;
    /// Memory the VPS uses now (auto mode weighs it).
    fn memory_bytes(&self) -> u64;
    /// Pre-copy: copies the memory of the running VPS into `images` (with
    /// `parent`, relative to `images`: only what changed since that round).
    /// The VPS runs on, whatever the outcome.
    async fn pre_dump(&self, images: &Path, parent: Option<&str>) -> Result<(), String>;
    /// Freezes and dumps the VPS into `images`. Stop-copy: on success the
    /// source copy has ended; with `parent` (pre-copy's last round, relative
    /// to `images`) only the pages dirtied since go in. Post-copy (`lazy`):
    /// the memory stays out of the images and a page server serves it; the
    /// frozen tasks end once it has all gone ([`Source::post_copy_done`]).
    async fn dump(&self, images: &Path, lazy: bool, parent: Option<&str>)
        -> Result<Dumped, String>;
    /// Post-copy: waits until the target has every page (the window in which
    /// the VPS on the target still needs this node ends); the bytes that went
    /// to the target meanwhile, when known.
    async fn post_copy_done(&self) -> Result<u64, String>;
    /// Brings the VPS back on this node after a freeze (rollback): from
    /// `images`, or, in post-copy, by stopping the page server, which lets the
    /// frozen tasks run again.
    async fn resume(&self, images: &Path, console_key: &str) -> Result<(), String>;
    /// The decision point: asks whoever owns the VPS record to move it to the
    /// target (`commit`) or to keep it here. Returns whether it moved, which
    /// may differ from what was asked if someone decided first.
    async fn decide(&self, commit: bool) -> Result<bool, String>;
    /// Removes the source copy after a committed migration.
    async fn release(&self) -> Result<(), String>;
    /// Turns at freezing on this node (a semaphore shared by its outgoing
    /// moves), so that moves running side by side (a drain's) overlap in
    /// everything but their downtime; None: no limit.
    fn freeze_turns(&self) -> Option<Arc<tokio::sync::Semaphore>> {
        None
    }
}

/// What a dump gives the rest of the migration.
#[derive(Debug, Clone, Default)]
pub struct Dumped {
    /// The console pipe key the restore needs.
    pub console_key: String,
    /// Post-copy: where the source serves the memory (ADDR:PORT).
    pub page_server: Option<String>,
    /// When the tasks were actually stopped (CRIU seizes them only after its
    /// own start-up); None: the engine's mark before it asked for the dump.
    pub frozen_at: Option<Instant>,
    /// Files of the rootfs (relative) the frozen tasks had mapped shared and
    /// writable: writes through such a mapping raise no change event and may
    /// leave the file's times alone, so the final pass always sends them.
    pub shared_writable: Vec<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub name: String,
    pub target_node: String,
    pub mode: Mode,
    pub verify: bool,
    /// The VPS's generation after the move.
    pub generation: u64,
    /// The controllers holding the decision (empty: node-local).
    pub controllers: Vec<String>,
}

/// Where a failure happened decides the rollback.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("refused before anything was frozen: {0}")]
    Refused(String),
    #[error("{phase}: {msg}")]
    Failed { phase: &'static str, msg: String },
}

impl MigrateError {
    pub fn at(phase: &'static str) -> impl Fn(String) -> MigrateError {
        move |msg| MigrateError::Failed { phase, msg }
    }
}

pub(crate) fn status_msg(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// Progress reporting and per-phase figures.
pub struct Progress {
    tx: mpsc::Sender<pb::MigrationEvent>,
    id: String,
    started: Instant,
    phase_start: Instant,
    pub phases: Vec<pb::PhaseStat>,
}

impl Progress {
    pub fn new(tx: mpsc::Sender<pb::MigrationEvent>, id: &str) -> Progress {
        Progress {
            tx,
            id: id.to_string(),
            started: Instant::now(),
            phase_start: Instant::now(),
            phases: Vec::new(),
        }
    }

    pub async fn phase(&mut self, phase: &str, message: impl Into<String>) {
        self.phase_start = Instant::now();
        self.send(pb::MigrationEvent {
            phase: phase.into(),
            message: message.into(),
            ..Default::default()
        })
        .await;
    }

    pub async fn bytes(&self, phase: &str, done: u64, total: u64) {
        self.send(pb::MigrationEvent {
            phase: phase.into(),
            bytes_done: done,
            bytes_total: total,
            ..Default::default()
        })
        .await;
    }

    pub fn done_phase(&mut self, phase: &str, bytes: u64) {
        self.phases.push(pb::PhaseStat {
            phase: phase.into(),
            millis: self.phase_start.elapsed().as_millis() as u64,
            bytes,
        });
    }

    pub fn total(&self) -> Duration {
        self.started.elapsed()
    }

    pub async fn send(&self, mut ev: pb::MigrationEvent) {
        ev.migration_id = self.id.clone();
        // A watcher that went away does not stop the migration.
        let _ = self.tx.send(ev).await;
    }
}

/// Runs a whole migration; returns the final event (done, or failed with the
/// VPS still on the source).
pub async fn run(
    src: Arc<dyn Source>,
    mut target: AgentServiceClient<Channel>,
    job: Job,
    tx: mpsc::Sender<pb::MigrationEvent>,
) -> pb::MigrationEvent {
    let mut p = Progress::new(tx, &job.id);
    let mut st = State::default();
    let res = steps(&*src, &mut target, &job, &mut p, &mut st).await;
    let mut ev = match res {
        Ok(()) => pb::MigrationEvent {
            phase: "done".into(),
            done: true,
            node: job.target_node.clone(),
            message: format!("{} runs on {}", job.name, job.target_node),
            ..Default::default()
        },
        Err(e) => {
            let note = rollback::rollback(&*src, &mut target, &job, &st, &mut p).await;
            pb::MigrationEvent {
                phase: "failed".into(),
                done: true,
                error: format!("{e}; {note}"),
                ..Default::default()
            }
        }
    };
    ev.mode = st.mode.map(|m| m.as_str().to_string()).unwrap_or_default();
    ev.downtime_ms = st.downtime.map(|d| d.as_millis() as u64).unwrap_or(0);
    ev.total_ms = p.total().as_millis() as u64;
    ev.phases = p.phases.clone();
    p.send(ev.clone()).await;
    ev
}

/// Waits for this node's turn at freezing (another move's VPS is frozen
/// now); the turn lasts until the permit is dropped.
async fn freeze_turn(
    turns: Arc<tokio::sync::Semaphore>,
    p: &mut Progress,
) -> Result<tokio::sync::OwnedSemaphorePermit, MigrateError> {
    if let Ok(t) = Arc::clone(&turns).try_acquire_owned() {
        return Ok(t);
    }
    p.phase(
        "queued",
        "waiting for another VPS's downtime on this node to end",
    )
    .await;
    let t = turns
        .acquire_owned()
        .await
        .map_err(|_| MigrateError::Refused("this node stopped taking freezes".into()))?;
    p.done_phase("queued", 0);
    Ok(t)
}

/// How far a migration got; the rollback reads it.
#[derive(Debug, Default)]
pub struct State {
    /// The prepare went out (the target may act on it even unanswered).
    pub prepare_sent: bool,
    pub prepared: bool,
    pub frozen_at: Option<Instant>,
    pub images: Option<PathBuf>,
    pub console_key: String,
    pub page_server: Option<String>,
    pub decided: Option<bool>,
    pub mode: Option<Mode>,
    pub downtime: Option<Duration>,
}

async fn steps(
    src: &dyn Source,
    target: &mut AgentServiceClient<Channel>,
    job: &Job,
    p: &mut Progress,
    st: &mut State,
) -> Result<(), MigrateError> {
    let mut mode = memory::choose(job.mode, src)?;
    st.mode = Some(mode);
    st.prepare_sent = true;
    let target_lazy = preflight::run(src, target, job, mode, p).await?;
    st.prepared = true;
    if mode == Mode::PostCopy && !target_lazy {
        if job.mode == Mode::Auto {
            // auto wanted post-copy; the target cannot take it.
            mode = Mode::StopCopy;
            st.mode = Some(mode);
        } else {
            return Err(MigrateError::Refused(format!(
                "mode post-copy: {} has no lazy pages (userfaultfd); use stop-copy",
                job.target_node
            )));
        }
    }
    let mut sync = rootfs::RootfsSync::new(src.rootfs());
    sync.pass(target, job, p, "rootfs", Default::default())
        .await?;
    // Held from the freeze until the VPS runs on the target.
    let mut turn = None;
    if mode != Mode::Cold {
        let images = src.scratch().join("images");
        st.images = Some(images.clone());
        let (memory, sent) = match mode {
            Mode::PreCopy => {
                let rule = precopy::Rule::default();
                let pre = precopy::run(src, target, job, &images, rule, p).await?;
                (freeze::Memory::SinceRound(pre.parent), Some(pre.sent))
            }
            Mode::PostCopy => (freeze::Memory::Served, None),
            _ => (freeze::Memory::All, None),
        };
        if let Some(t) = src.freeze_turns() {
            turn = Some(freeze_turn(t, p).await?);
        }
        let frozen = freeze::run(src, target, job, &images, memory, p, st).await?;
        // The tree is frozen (dead on the source): the final delta is exact.
        sync.pass(target, job, p, "final-rootfs", frozen.mapped)
            .await?;
        images::push(target, job, &images, frozen.streamed, sent, p).await?;
    } else {
        sync.pass(target, job, p, "final-rootfs", Default::default())
            .await?;
    }
    if job.verify {
        rootfs::verify(src, target, job, p).await?;
    }
    restore::run(target, job, mode, st, p).await?;
    commit::run(src, target, job, st, p).await?;
    // The VPS runs on the target: the next move may freeze.
    drop(turn);
    if mode == Mode::PostCopy {
        // The VPS runs on the target; its memory still comes from here.
        p.phase("post-copy", "memory follows on demand").await;
        let served = src
            .post_copy_done()
            .await
            .map_err(MigrateError::at("post-copy"))?;
        p.done_phase("post-copy", served);
    }
    cleanup::run(src, st, p).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A move whose node has no free turn says it is queued, waits, and
    /// freezes once the other move's VPS runs again; with a free turn it
    /// says nothing and takes it at once.
    #[tokio::test]
    async fn a_move_waits_for_its_turn_to_freeze() {
        let turns = Arc::new(tokio::sync::Semaphore::new(1));
        let (tx, mut rx) = mpsc::channel(8);
        let mut p = Progress::new(tx, "m1");
        let first = freeze_turn(Arc::clone(&turns), &mut p).await.expect("turn");
        assert!(rx.try_recv().is_err(), "a free turn is taken silently");

        let (tx2, mut rx2) = mpsc::channel(8);
        let t2 = Arc::clone(&turns);
        let second = tokio::spawn(async move {
            let mut p = Progress::new(tx2, "m2");
            let t = freeze_turn(t2, &mut p).await;
            (
                t.is_ok(),
                p.phases.iter().map(|s| s.phase.clone()).collect::<Vec<_>>(),
            )
        });
        let ev = rx2.recv().await.expect("an event");
        assert_eq!(ev.phase, "queued");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished(), "it froze during the other's turn");
        drop(first);
        let (got, phases) = second.await.expect("join");
        assert!(got);
        assert_eq!(phases, ["queued"]);
    }
}
