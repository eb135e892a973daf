//! Node liveness: a node silent for [`NODE_TIMEOUT`] is marked down and its
//! VPSes "unknown". They are not started anywhere else: the node may only be
//! cut off, its VPSes still running, and without fencing a second copy could
//! corrupt their data (the lesson of lxc/incus#1032). An operator decides, or a
//! later fenced evacuation does.

use std::time::{Duration, Instant};

use crate::api::now_ms;
use crate::host::Controller;
use crate::state::{NodeCmd, Request};

pub const NODE_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn tick(ctl: &Controller) {
    let Ok(m) = ctl.member().await else { return };
    let since = ctl
        .leader
        .since
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .unwrap_or_else(Instant::now);
    let seen = ctl.leader.snapshot();
    let live: Vec<String> = m.sm.read(|a| {
        a.state
            .nodes
            .values()
            .filter(|n| !n.down)
            .map(|n| n.name.clone())
            .collect()
    });
    for name in live {
        let last = seen.get(&name).map(|s| s.at).unwrap_or(since).max(since);
        if last.elapsed() > NODE_TIMEOUT {
            tracing::warn!(node = %name, "no heartbeat for {:?}: marking down", NODE_TIMEOUT);
            let _ = m
                .propose(Request::Node(NodeCmd::SetDown {
                    name,
                    down: true,
                    now_ms: now_ms(),
                }))
                .await;
        }
    }
}
