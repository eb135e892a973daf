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

/// A decided move whose restored VPS dies on the target before it runs
/// (`FERRY_FAILPOINT=kill-held-arrival` on the target's agent SIGKILLs the
/// held tree, standing in for a restore killed then): the target notices at
/// once instead of waiting on a CRIU that never answers, keeps the VPS as
/// a stopped VPS of its own with its files, leaves no monitor, CRIU or
/// images behind; the operator is told, and the controller starts the VPS
/// again there from its files. It never runs on both nodes.
#[tokio::test(flavor = "multi_thread")]
async fn a_decided_arrival_that_dies_stays_on_the_target_and_is_started_again() {
    let _one = Cluster::lock().await;
    bounded(300, async {
        let cl = Cluster::start_with(
            &[Role::Both, Role::Both, Role::Controller],
            &[(2, "FERRY_FAILPOINT", "kill-held-arrival:0")],
        )
        .await;
        let (_, mut c) = cl.leader().await;
        let name = format!("la{}", std::process::id());
        let ip = "10.85.3.20";
        create_unpinned_on(&cl, &mut c, 1, &[(name.clone(), ip.to_string())], 64).await;
        start_counter(&cl, 1, &name);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(counter(ip).await.is_some_and(|n| n > 0));
        let checker = ferry_cluster_tests::checker::Checker::start(agents(2), None, Vec::new());

        let t = Instant::now();
        let (code, out, err) =
            cl.ferryctl(&["vps", "migrate", &name, "--to", "n2", "--mode", "stop-copy"]);
        let took = t.elapsed();
        assert_ne!(code, 0, "{out}{err}");
        assert!(
            err.contains("died before it ran") && err.contains("stays on this node, stopped"),
            "{out}{err}"
        );
        assert!(took < Duration::from_secs(30), "the failure took {took:?}");

        // It is n2's, and the controller starts it again there.
        let v = record_when(&mut c, &name, |v| v.node == "n2" && v.observed == "running").await;
        assert_eq!(v.node, "n2");
        let mut answered = None;
        for _ in 0..50 {
            answered = counter(ip).await;
            if answered.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(answered.is_some(), "{name} does not answer at {ip} on n2");
        let mut a1 = cl.agent_client(1).await;
        assert!(
            a1.get_vps(apb::GetVpsRequest { name: name.clone() })
                .await
                .is_err(),
            "the source kept a copy"
        );
        // Nothing of the dead restore stays on n2.
        let h2 = cl.dir.join("h2/agent/work");
        let left: Vec<String> = std::fs::read_dir(&h2)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        assert!(left.is_empty(), "scratch left on n2: {left:?}");
        let procs: Vec<String> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&h2.display().to_string()))
            .collect();
        assert!(procs.is_empty(), "left running: {procs:#?}");
        checker.finish().await;
    })
    .await;
}
