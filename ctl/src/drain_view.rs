//! `ferryctl node drain | drain-status | drain-cancel | restore`: starting a
//! drain or restore, its plan, and following it to the end.
//!
//! Following polls `GetDrain` (twice a second) and prints a line each time a
//! VPS's move changes (status, phase, target), then the final table. A lost
//! replica does not end it: it reconnects to any replica of the list (the
//! drain goes on without us; the leader drives it from its Raft record).
//! Exit codes: 0 complete, 2 incomplete or cancelled, 1 an error.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::replicas::Client;
use anyhow::{bail, Result};
use ferry_proto::controller::v1 as cpb;
use serde_json::json;

use crate::agent_cmd::Output;
use crate::table;
use crate::units::human_bytes;

/// How long following waits for any replica to answer again.
const RECONNECT_FOR: Duration = Duration::from_secs(60);

pub fn plan_table(plan: &[cpb::DrainPlanItem]) {
    let rows: Vec<Vec<String>> = plan
        .iter()
        .map(|p| {
            vec![
                p.vps.clone(),
                dash(&p.target),
                dash(&p.mode),
                p.reason.clone(),
            ]
        })
        .collect();
    table::print(&["VPS", "TARGET", "MODE", "WHY"], &rows);
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

fn ended(d: &cpb::Drain) -> bool {
    !matches!(d.state.as_str(), "running" | "paused")
}

/// The exit code a drain's end gives.
pub fn exit_code(d: &cpb::Drain) -> i32 {
    if d.state == "complete" {
        0
    } else {
        2
    }
}

/// "drain of node1 running: 2 moved, 1 moving, 3 pending".
pub fn summary(d: &cpb::Drain) -> String {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for st in ["moved", "moving", "pending", "skipped", "failed"] {
        let n = d.items.iter().filter(|i| i.status == st).count();
        if n > 0 {
            counts.push((st.to_string(), n));
        }
    }
    let parts: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
    let mut line = format!(
        "{} of {} {} ({})",
        d.kind,
        d.node,
        d.state,
        if parts.is_empty() {
            "nothing to move".to_string()
        } else {
            parts.join(", ")
        }
    );
    if d.state == "paused" || (ended(d) && !d.reason.is_empty()) {
        line.push_str(&format!(": {}", d.reason));
    }
    line
}

pub fn items_table(d: &cpb::Drain) {
    let rows: Vec<Vec<String>> = d
        .items
        .iter()
        .map(|i| {
            vec![
                i.vps.clone(),
                i.status.clone(),
                dash(&i.target),
                dash(&i.mode),
                if i.status == "moving" {
                    dash(&i.phase)
                } else {
                    "-".into()
                },
                if i.downtime_ms > 0 {
                    format!("{} ms", i.downtime_ms)
                } else {
                    "-".into()
                },
                if i.bytes > 0 {
                    human_bytes(i.bytes)
                } else {
                    "-".into()
                },
                i.attempts.len().to_string(),
                reason_of(i),
            ]
        })
        .collect();
    table::print(
        &[
            "VPS", "STATUS", "TARGET", "MODE", "PHASE", "DOWNTIME", "BYTES", "TRIES", "REASON",
        ],
        &rows,
    );
}

/// Why it is skipped or failed; for one that moved after a failed attempt,
/// what went wrong before.
fn reason_of(i: &cpb::DrainItem) -> String {
    if !i.reason.is_empty() {
        return i.reason.clone();
    }
    let failed: Vec<String> = i
        .attempts
        .iter()
        .enumerate()
        .filter(|(_, a)| !a.error.is_empty())
        .map(|(n, a)| {
            if a.target.is_empty() {
                format!("attempt {}: {}", n + 1, a.error)
            } else {
                format!("attempt {} to {}: {}", n + 1, a.target, a.error)
            }
        })
        .collect();
    if failed.is_empty() {
        "-".into()
    } else {
        failed.join("; ")
    }
}

pub fn drain_json(d: &cpb::Drain) -> serde_json::Value {
    let items: Vec<_> = d
        .items
        .iter()
        .map(|i| {
            json!({"vps": i.vps, "status": i.status, "target": i.target, "reason": i.reason,
                "migration_id": i.migration_id, "phase": i.phase, "mode": i.mode,
                "downtime_ms": i.downtime_ms, "bytes": i.bytes,
                "attempts": i.attempts.iter().map(|a| json!({"target": a.target,
                    "migration_id": a.migration_id, "error": a.error})).collect::<Vec<_>>()})
        })
        .collect();
    json!({"id": d.id, "node": d.node, "kind": d.kind, "state": d.state, "reason": d.reason,
        "mode": d.mode, "parallel": d.parallel, "started_unix_ms": d.started_unix_ms,
        "ended_unix_ms": d.ended_unix_ms, "deadline_unix_ms": d.deadline_unix_ms, "items": items})
}

/// One line for an item's change while following.
fn item_line(i: &cpb::DrainItem) -> String {
    match i.status.as_str() {
        "moving" => {
            let mut s = format!(
                "  {:<16} moving to {} ({})",
                i.vps,
                i.target,
                dash(&i.phase)
            );
            if i.bytes > 0 {
                s.push_str(&format!(" {}", human_bytes(i.bytes)));
            }
            s
        }
        "moved" => {
            let mut s = format!("  {:<16} moved to {}", i.vps, i.target);
            if !i.mode.is_empty() {
                s.push_str(&format!(" ({}", i.mode));
                if i.downtime_ms > 0 {
                    s.push_str(&format!(", downtime {} ms", i.downtime_ms));
                }
                s.push(')');
            }
            s
        }
        "pending" if !i.attempts.is_empty() => {
            let last = i.attempts.last().map(|a| a.error.as_str()).unwrap_or("");
            format!(
                "  {:<16} attempt {} failed ({last}); it will be tried elsewhere",
                i.vps,
                i.attempts.len()
            )
        }
        st => format!("  {:<16} {st}: {}", i.vps, dash(&i.reason)),
    }
}

async fn get(c: &mut Client, node: &str) -> Result<cpb::Drain, tonic::Status> {
    c.get_drain(cpb::GetDrainRequest {
        node: node.to_string(),
    })
    .await
    .map(|r| r.into_inner())
}

/// Prints the drain's progress until it ends; returns its exit code.
pub async fn follow(addrs: &str, c: &mut Client, node: &str) -> Result<i32> {
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut last_state = String::new();
    let mut lost_since: Option<Instant> = None;
    loop {
        let d = match get(c, node).await {
            Ok(d) => {
                lost_since = None;
                d
            }
            Err(s) if s.code() == tonic::Code::NotFound => bail!("{}", s.message()),
            Err(s) => {
                let since = *lost_since.get_or_insert_with(Instant::now);
                if since.elapsed() > RECONNECT_FOR {
                    bail!(
                        "no controller answered for {} s ({}); the drain goes on: \
                         `ferryctl node drain-status {node}`",
                        RECONNECT_FOR.as_secs(),
                        s.message()
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Ok(n) = crate::cluster_cmd::connect(addrs).await {
                    *c = n;
                }
                continue;
            }
        };
        for i in &d.items {
            let key = format!("{}|{}|{}|{}", i.status, i.phase, i.target, i.attempts.len());
            let first = !seen.contains_key(&i.vps);
            if seen.get(&i.vps) != Some(&key) {
                seen.insert(i.vps.clone(), key);
                // Waiting its turn is not news.
                if !(first && i.status == "pending" && i.attempts.is_empty()) {
                    println!("{}", item_line(i));
                }
            }
        }
        if d.state != last_state {
            println!("{}", summary(&d));
            last_state = d.state.clone();
        }
        if ended(&d) {
            println!();
            items_table(&d);
            println!("{}", summary(&d));
            return Ok(exit_code(&d));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub struct Start {
    pub node: String,
    pub mode: String,
    pub parallel: u32,
    pub dry_run: bool,
    /// Drain only: `30m`, `2h`, ...
    pub deadline: Option<String>,
    pub follow: bool,
    pub restore: bool,
}

/// `node drain` and `node restore`.
pub async fn start(addrs: &str, c: &mut Client, s: Start) -> Result<i32> {
    let mode = crate::migrate_view::parse_mode(&s.mode)? as i32;
    let r = if s.restore {
        c.restore_node(cpb::RestoreNodeRequest {
            node: s.node.clone(),
            mode,
            parallel: s.parallel,
            dry_run: s.dry_run,
        })
        .await?
        .into_inner()
    } else {
        let deadline_secs = match &s.deadline {
            Some(d) => crate::cluster_cmd::parse_ttl(d)
                .map_err(|e| anyhow::anyhow!("--deadline: {e}"))? as u64,
            None => 0,
        };
        c.drain_node(cpb::DrainNodeRequest {
            node: s.node.clone(),
            mode,
            parallel: s.parallel,
            dry_run: s.dry_run,
            deadline_secs,
        })
        .await?
        .into_inner()
    };
    let what = if s.restore { "restore" } else { "drain" };
    if s.dry_run {
        println!("{what} of {} would do (nothing changed):", s.node);
        if r.plan.is_empty() {
            println!("  nothing to move");
        } else {
            plan_table(&r.plan);
        }
        return Ok(0);
    }
    let Some(d) = r.drain else {
        bail!("the controller started no {what}");
    };
    println!(
        "{what} {} of node {} started: {} VPS(es), {} at a time{}",
        d.id,
        d.node,
        d.items.len(),
        d.parallel,
        if s.restore {
            ""
        } else {
            "; the node is cordoned"
        }
    );
    if !r.plan.is_empty() {
        plan_table(&r.plan);
    }
    if s.follow {
        return follow(addrs, c, &s.node).await;
    }
    println!(
        "it goes on in the cluster: `ferryctl node drain-status {} --follow`",
        s.node
    );
    Ok(0)
}

/// `node drain-status`.
pub async fn status(
    addrs: &str,
    c: &mut Client,
    node: &str,
    follow_it: bool,
    output: Output,
) -> Result<i32> {
    if follow_it {
        return follow(addrs, c, node).await;
    }
    let d = get(c, node).await?;
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&drain_json(&d))?);
        return Ok(0);
    }
    println!("{}", summary(&d));
    items_table(&d);
    Ok(if ended(&d) { exit_code(&d) } else { 0 })
}

/// `node drain-cancel`.
pub async fn cancel(c: &mut Client, node: &str) -> Result<i32> {
    let d = c
        .cancel_drain(cpb::CancelDrainRequest {
            node: node.to_string(),
        })
        .await?
        .into_inner();
    println!("{}", summary(&d));
    println!("moves under way end on their own");
    if d.kind == "drain" {
        println!("the node stays cordoned: `ferryctl node uncordon {node}`");
    }
    Ok(0)
}
