//! Following a migration: a progress bar per phase (bytes where the phase
//! moves data), then downtime, total time and bytes per phase.

use anyhow::{bail, Result};
use ferry_proto::agent::v1 as pb;
use indicatif::{ProgressBar, ProgressStyle};

pub fn parse_mode(s: &str) -> Result<pb::MigrationMode> {
    ferry_proto::modes::parse(s)
        .ok_or_else(|| anyhow::anyhow!("--mode {s:?}: use {}", ferry_proto::modes::all()))
}

/// How a stream of migration events ended.
pub enum Ended {
    /// Its last event.
    Done(Box<pb::MigrationEvent>),
    /// It broke (or ended early); the migration's id if an event named it.
    Broken { id: String, why: String },
}

/// A progress line per phase, over however many streams one migration takes.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    pub fn new() -> Self {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix:>12} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(100));
        Progress { bar }
    }

    /// Shows `s`'s events until its last one, or until it breaks.
    pub async fn show(&self, mut s: tonic::Streaming<pb::MigrationEvent>) -> Ended {
        let mut id = String::new();
        loop {
            match s.message().await {
                Ok(Some(ev)) => {
                    if !ev.migration_id.is_empty() {
                        id = ev.migration_id.clone();
                    }
                    if ev.done {
                        return Ended::Done(Box::new(ev));
                    }
                    self.bar.set_prefix(ev.phase.clone());
                    if ev.bytes_total > 0 {
                        self.bar.set_message(format!(
                            "{} / {}",
                            crate::units::human_bytes(ev.bytes_done),
                            crate::units::human_bytes(ev.bytes_total)
                        ));
                    } else {
                        self.bar.set_message(ev.message.clone());
                    }
                }
                Ok(None) => {
                    return Ended::Broken {
                        id,
                        why: "the stream ended without a result".into(),
                    }
                }
                Err(e) => {
                    return Ended::Broken {
                        id,
                        why: e.message().to_string(),
                    }
                }
            }
        }
    }

    /// Says a stream broke and is being picked up again.
    pub fn reconnecting(&self, why: &str) {
        // On stderr even without a terminal (the bar is hidden then).
        self.bar.suspend(|| {
            eprintln!("lost the progress stream ({why}); following the migration by id")
        });
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Prints progress until the final event; exit code 0 on success, 1 on failure.
pub async fn follow(s: tonic::Streaming<pb::MigrationEvent>) -> Result<i32> {
    let p = Progress::new();
    let ended = p.show(s).await;
    p.finish();
    match ended {
        Ended::Done(ev) => Ok(report(&ev)),
        Ended::Broken { why, .. } => bail!(
            "the migration stream broke ({why}) before its result; check `vps show` on both nodes"
        ),
    }
}

/// Prints a migration's last event: figures per phase, then the outcome.
/// Returns the exit code: 0 when it moved, 1 when it did not.
pub fn report(ev: &pb::MigrationEvent) -> i32 {
    for p in &ev.phases {
        println!(
            "  {:<13} {:>7} ms  {:>10}",
            p.phase,
            p.millis,
            crate::units::human_bytes(p.bytes)
        );
    }
    if !ev.error.is_empty() {
        eprintln!("migration failed: {}", ev.error);
        return 1;
    }
    if let Some(w) = ev.phases.iter().find(|p| p.phase == "post-copy") {
        println!(
            "post-copy window: {} ms after it resumed, the VPS on the target still \
             needed the source's memory ({} came on demand; all of it has arrived now)",
            w.millis,
            crate::units::human_bytes(w.bytes)
        );
    }
    println!(
        "migrated ({}): downtime {} ms, total {} ms; {}",
        ev.mode, ev.downtime_ms, ev.total_ms, ev.message
    );
    0
}
