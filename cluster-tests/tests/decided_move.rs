//! A move decided in Raft whose source then stalls before it tells the
//! target (`FERRY_FAILPOINT=commit-before-finish:20` on the source's agent,
//! standing in for a source cut off right after the decision): the target
//! follows the decision on its own within seconds, instead of holding the
//! VPS frozen until the source is back; the source's late word is answered
//! as done, and the operator's `vps migrate` ends in success with the
//! downtime the VPS really had.

mod common;
use common::*;

use std::time::{Duration, Instant};

use ferry_cluster_tests::{Cluster, Role};
use ferry_proto::agent::v1 as apb;
use ferry_proto::controller::v1 as cpb;

#[tokio::test(flavor = "multi_thread")]
async fn a_decided_move_runs_on_the_target_when_its_source_stalls() {
    let _one = Cluster::lock().await;
    let run = async {
        let cl = Cluster::start_with(
            &[Role::Both, Role::Both, Role::Both],
            &[(1, "FERRY_FAILPOINT", "commit-before-finish:20")],
        )
        .await;
        let (_, mut c) = cl.leader().await;
        let name = format!("dm{}", std::process::id());
        let ip = "10.85.3.10";
        c.create_vps(cpb::CreateVpsRequest {
            spec: Some(spec(&name, Some(ip), 64)),
            placement: Some(cpb::Placement {
                node: Cluster::node(1),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("create");
        record_when(&mut c, &name, |v| v.observed == "running").await;
        start_counter(&cl, 1, &name);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = counter(ip).await.expect("counter before");

        let mover = ferryctl_thread(
            &cl,
            &["vps", "migrate", &name, "--to", "n2", "--mode", "stop-copy"],
        );
        // The decision: the record moves to n2.
        record_when(&mut c, &name, |v| v.node == "n2").await;
        let decided = Instant::now();
        // It runs on n2 long before the source's 20 s stall ends.
        let mut a2 = cl.agent_client(2).await;
        loop {
            if let Ok(v) = a2.get_vps(apb::GetVpsRequest { name: name.clone() }).await {
                let v = v.into_inner();
                if v.status == apb::VpsStatus::Running as i32 && v.migrating.is_empty() {
                    break;
                }
            }
            assert!(
                decided.elapsed() < Duration::from_secs(10),
                "the target held the decided VPS for 10 s{}",
                cl.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let waited = decided.elapsed();
        eprintln!(
            "ran on the target {} ms after the decision",
            waited.as_millis()
        );
        assert!(!mover.is_finished(), "the source was not stalled");
        let after = counter(ip).await.expect("counter on the target");
        assert!(after >= before, "counter went back: {before} -> {after}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(counter(ip).await.unwrap_or(0) > after, "it counts on n2");
        let (code, text) = tokio::task::spawn_blocking(move || mover.join())
            .await
            .expect("join")
            .expect("mover");
        eprintln!("{text}");
        assert_eq!(code, 0, "{text}{}", cl.logs());
        assert!(text.contains("migrated (stop-copy)"), "{text}");
        // The downtime it reports ends when the target ran the VPS, not when
        // the stalled source's word came 20 s after the decision.
        let downtime: u64 = text
            .split("downtime ")
            .nth(1)
            .and_then(|t| t.split(" ms").next())
            .and_then(|n| n.parse().ok())
            .expect("a downtime figure");
        assert!(downtime < 10_000, "downtime {downtime} ms: {text}");
        assert!(
            cl.hosts[1]
                .agent
                .as_ref()
                .is_some_and(|d| d.log_text().contains("following the decision")),
            "the target did not follow the decision itself{}",
            cl.logs()
        );
    };
    tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("test timed out");
}
