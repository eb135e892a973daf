//! Following a migration: a progress bar per phase (bytes where the phase
//! moves data), then downtime, total time and bytes per phase.

use anyhow::{bail, Result};
use ferry_proto::agent::v1 as pb;
use indicatif::{ProgressBar, ProgressStyle};

pub fn parse_mode(s: &str) -> Result<pb::MigrationMode> {
    ferry_proto::modes::parse(s)
        .ok_or_else(|| anyhow::anyhow!("--mode {s:?}: use {}", ferry_proto::modes::all()))
}

/// Prints progress until the final event; exit code 0 on success, 1 on failure.
pub async fn follow(mut s: tonic::Streaming<pb::MigrationEvent>) -> Result<i32> {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix:>12} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    let mut last = None;
    while let Some(ev) = s.message().await? {
        if ev.done {
            last = Some(ev);
            break;
        }
        bar.set_prefix(ev.phase.clone());
        if ev.bytes_total > 0 {
            bar.set_message(format!(
                "{} / {}",
                crate::units::human_bytes(ev.bytes_done),
                crate::units::human_bytes(ev.bytes_total)
            ));
        } else {
            bar.set_message(ev.message.clone());
        }
    }
    bar.finish_and_clear();
    let Some(ev) = last else {
        bail!("the migration stream ended without a result; check `vps show` on both nodes");
    };
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
        return Ok(1);
    }
    if let Some(w) = ev.phases.iter().find(|p| p.phase == "post-copy") {
        println!(
            "post-copy window: {} ms after it resumed, the VPS on the target still \
             needed the source's memory (all of it has arrived now)",
            w.millis
        );
    }
    println!(
        "migrated ({}): downtime {} ms, total {} ms; {}",
        ev.mode, ev.downtime_ms, ev.total_ms, ev.message
    );
    Ok(0)
}
