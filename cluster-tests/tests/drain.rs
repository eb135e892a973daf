//! Draining and restoring a node as an operator runs it (`ferryctl node
//! drain`, `drain-status --follow`, `node restore`), on hosts with their own
//! management addresses, each running a controller replica and an agent,
//! with real VPSes serving counters over HTTP. The exactly-once checker
//! watches throughout: no VPS ever runs on two nodes, no counter goes back.

mod common;
use common::*;

use std::time::{Duration, Instant};

use ferry_cluster_tests::checker::Checker;
use ferry_cluster_tests::{Cluster, Role};
use ferry_proto::controller::v1 as cpb;

#[tokio::test(flavor = "multi_thread")]
async fn a_node_drains_live_through_a_leader_kill_and_restores() {
    let _one = Cluster::lock().await;
    bounded(600, async {
        let mut cl = Cluster::start(&[Role::Both, Role::Both, Role::Both]).await;
        let (n1, n2, n3) = (Cluster::node(1), Cluster::node(2), Cluster::node(3));
        let (_, mut c) = cl.leader().await;
        let tag = format!("dr{}", std::process::id());

        // Little room on n2 and n3: a stopped filler on each leaves 1 GiB.
        let cap = c
            .get_node(cpb::GetNodeRequest { name: n2.clone() })
            .await
            .expect("node")
            .into_inner()
            .capacity
            .unwrap_or_default()
            .memory_bytes;
        for n in [&n2, &n3] {
            c.create_vps(cpb::CreateVpsRequest {
                spec: Some(spec(&format!("{tag}f{n}"), None, (cap >> 20) - 1024)),
                placement: Some(cpb::Placement {
                    node: n.clone(),
                    ..Default::default()
                }),
                desired: "stopped".into(),
                ..Default::default()
            })
            .await
            .expect("filler");
        }
        // On n1, placed by the scheduler (not pinned: a drain moves them):
        // six running with counters, one stopped, one too big for the room
        // left elsewhere.
        let movers: Vec<(String, String)> = (0..6)
            .map(|i| (format!("{tag}v{i}"), format!("10.85.4.{}", 10 + i)))
            .collect();
        create_unpinned_on(&cl, &mut c, 1, &movers, 128).await;
        for n in [&n2, &n3] {
            let (code, _, err) = cl.ferryctl(&["node", "cordon", n]);
            assert_eq!(code, 0, "{err}");
        }
        let stopped_one = format!("{tag}s");
        c.create_vps(cpb::CreateVpsRequest {
            spec: Some(spec(&stopped_one, None, 128)),
            desired: "stopped".into(),
            ..Default::default()
        })
        .await
        .expect("create stopped");
        let big = format!("{tag}big");
        c.create_vps(cpb::CreateVpsRequest {
            spec: Some(spec(&big, None, 1536)),
            ..Default::default()
        })
        .await
        .expect("create big");
        for n in [&n2, &n3] {
            let (code, _, err) = cl.ferryctl(&["node", "uncordon", n]);
            assert_eq!(code, 0, "{err}");
        }
        record_when(&mut c, &stopped_one, |v| v.observed == "stopped").await;
        record_when(&mut c, &big, |v| v.observed == "running").await;
        for (name, _) in &movers {
            start_counter(&cl, 1, name);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut before = Vec::new();
        for (name, ip) in &movers {
            let n = counter(ip).await.unwrap_or(0);
            assert!(n > 0, "{name} counts");
            before.push(n);
        }
        let checker = Checker::start(agents(3), None, movers.clone());

        // The plan, changing nothing.
        let (code, out, err) = cl.ferryctl(&["node", "drain", &n1, "--dry-run"]);
        assert_eq!(code, 0, "{out}{err}");
        for (name, _) in &movers {
            let line = out
                .lines()
                .find(|l| l.starts_with(name.as_str()))
                .unwrap_or("");
            assert!(line.contains(&n2) || line.contains(&n3), "{out}");
        }
        let line = out
            .lines()
            .find(|l| l.starts_with(big.as_str()))
            .unwrap_or("");
        assert!(line.contains("stays: no node can take it"), "{out}");
        let line = out
            .lines()
            .find(|l| l.starts_with(stopped_one.as_str()))
            .unwrap_or("");
        assert!(line.contains("cold"), "{out}");
        let n = c
            .get_node(cpb::GetNodeRequest { name: n1.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(n.status, "ready", "a dry run cordons nothing");
        assert!(n.drain.is_none(), "a dry run records nothing");

        // The drain, followed by a second operator's `drain-status --follow`.
        let (code, out, err) = cl.ferryctl(&["node", "drain", &n1, "--parallel", "2"]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("8 VPS(es), 2 at a time"), "{out}");
        let follower = ferryctl_thread(&cl, &["node", "drain-status", &n1, "--follow"]);
        let (code, _, err) = cl.ferryctl(&["node", "drain", &n1]);
        assert!(code != 0 && err.contains("under way"), "{err}");

        // SIGKILL the leader once the first VPS has moved, with more to go.
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            let d = drain_of(&cl, &n1).await.expect("drain");
            let moved = d.items.iter().filter(|i| i.status == "moved").count();
            let open = d
                .items
                .iter()
                .filter(|i| matches!(i.status.as_str(), "pending" | "moving"))
                .count();
            let moving = d.items.iter().filter(|i| i.status == "moving").count();
            assert!(moving <= 2, "more than --parallel moves at once: {d:#?}");
            if moved >= 1 && open >= 2 {
                break;
            }
            assert!(
                open > 0,
                "the drain ended before the leader could be killed: {d:#?}"
            );
            assert!(Instant::now() < end, "no VPS moved: {d:#?}{}", cl.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (leader, _) = cl.leader().await;
        cl.controller(leader).kill9();
        eprintln!("killed controller {leader} (the leader) mid-drain");

        let d = wait_drain_end(&cl, &n1, 240).await;
        let item = |n: &str| d.items.iter().find(|i| i.vps == n).cloned().unwrap();
        assert_eq!(d.state, "incomplete", "{d:#?}");
        for (name, _) in &movers {
            let i = item(name);
            assert_eq!(i.status, "moved", "{d:#?}");
            assert!(i.target == n2 || i.target == n3, "{i:?}");
        }
        assert_eq!(item(&stopped_one).status, "moved");
        assert_eq!(item(&stopped_one).mode, "cold");
        let bi = item(&big);
        assert_eq!(bi.status, "skipped", "{bi:?}");
        assert!(bi.reason.contains("no node can take it"), "{bi:?}");
        assert!(
            d.reason.contains(&format!("still on {n1}: {big}")),
            "{}",
            d.reason
        );

        // Where the records say, running, answering, counting on.
        let (_, mut c) = cl.leader().await;
        for ((name, ip), n0) in movers.iter().zip(&before) {
            let v = record_when(&mut c, name, |v| v.observed == "running").await;
            assert!(v.node != n1 && v.migration.is_none(), "{v:?}");
            assert!(
                counter(ip).await.unwrap_or(0) > *n0,
                "{name}'s counter went on"
            );
        }
        let v = record(&mut c, &big).await;
        assert_eq!(
            (v.node.as_str(), v.observed.as_str()),
            (n1.as_str(), "running")
        );
        let v = record(&mut c, &stopped_one).await;
        assert!(v.node != n1 && v.desired == "stopped", "{v:?}");
        let (code, out) = follower.join().expect("follower");
        eprintln!("$ ferryctl node drain-status {n1} --follow\n{out}");
        assert_eq!(code, 2, "incomplete exits 2: {out}");
        assert!(
            out.contains(&format!("moved to {n2}")) || out.contains(&format!("moved to {n3}")),
            "{out}"
        );
        assert!(out.contains(&format!("drain of {n1} incomplete")), "{out}");
        let (code, out, _) = cl.ferryctl(&["node", "show", &n1]);
        assert_eq!(code, 0);
        assert!(out.contains("cordoned"), "{out}");
        assert!(out.contains(&format!("drain of {n1} incomplete")), "{out}");
        let evs = events(&mut c).await;
        let said = |s: &str| evs.iter().any(|e| e.message.contains(s));
        assert!(said(&format!("drain of {n1} starts")), "{evs:?}");
        assert!(said(&format!("{big} skipped")), "{evs:?}");
        assert!(said(&format!("drain of {n1} incomplete")), "{evs:?}");

        // After the maintenance: everything the drain moved comes back.
        let (code, out, err) = cl.ferryctl(&["node", "restore", &n1, "--follow"]);
        eprintln!("$ ferryctl node restore {n1} --follow\n{out}{err}");
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains(&format!("restore of {n1} complete")), "{out}");
        for (name, ip) in &movers {
            let v = record(&mut c, name).await;
            assert_eq!(v.node, n1, "{v:?}");
            counts_on(name, ip).await;
        }
        assert_eq!(record(&mut c, &stopped_one).await.node, n1);
        let n = c
            .get_node(cpb::GetNodeRequest { name: n1.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(n.status, "ready", "a restore uncordons");
        let samples = checker.finish().await;
        eprintln!("exactly-once checker: {samples} samples, no violation");
    })
    .await;
}

/// The target agent SIGKILLed during a drain's move: that move rolls back
/// (the VPS runs on at the source), it is retried on the other node, and
/// the drain completes with every attempt's reason on record.
#[tokio::test(flavor = "multi_thread")]
async fn a_move_whose_target_dies_is_retried_elsewhere_and_the_drain_completes() {
    let _one = Cluster::lock().await;
    bounded(600, async {
        let mut cl = Cluster::start(&[Role::Both, Role::Both, Role::Both]).await;
        let n1 = Cluster::node(1);
        let (_, mut c) = cl.leader().await;
        let tag = format!("tk{}", std::process::id());
        let vpses = counting_vpses_on(&cl, &mut c, 1, &tag, 5, 3).await;
        let checker = Checker::start(agents(3), None, vpses.clone());
        let (code, out, err) = cl.ferryctl(&["node", "drain", &n1, "--parallel", "1"]);
        assert_eq!(code, 0, "{out}{err}");

        // The first move's target dies under it, past the preflight.
        let end = Instant::now() + Duration::from_secs(60);
        let (victim, target) = loop {
            if let Some(d) = drain_of(&cl, &n1).await {
                if let Some(i) = d.items.iter().find(|i| {
                    i.status == "moving"
                        && !matches!(i.phase.as_str(), "" | "starting" | "preflight")
                }) {
                    eprintln!("{} moving to {} in phase {}", i.vps, i.target, i.phase);
                    break (i.vps.clone(), i.target.clone());
                }
            }
            assert!(Instant::now() < end, "nothing moved{}", cl.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let t: usize = target.trim_start_matches('n').parse().expect("node name");
        cl.agent(t).kill9();
        eprintln!("killed {target}'s agent while {victim} moved there");

        let d = wait_drain_end(&cl, &n1, 240).await;
        let survivor = Cluster::node(if t == 2 { 3 } else { 2 });
        assert_eq!(d.state, "complete", "{d:#?}");
        let i = d.items.iter().find(|i| i.vps == victim).unwrap();
        assert_eq!(i.target, survivor, "{i:?}");
        assert!(i.attempts.len() >= 2, "{i:?}");
        assert_eq!(i.attempts[0].target, target);
        assert!(!i.attempts[0].error.is_empty(), "{i:?}");
        let (_, mut c) = cl.leader().await;
        for (name, ip) in &vpses {
            let v = record_when(&mut c, name, |v| v.observed == "running").await;
            assert_eq!(v.node, survivor, "{v:?}");
            counts_on(name, ip).await;
        }
        let samples = checker.finish().await;
        eprintln!("exactly-once checker: {samples} samples, no violation");
        let (code, out, _) = cl.ferryctl(&["node", "drain-status", &n1]);
        assert_eq!(code, 0);
        eprintln!("{out}");
        assert!(out.contains(&format!("attempt 1 to {target}")), "{out}");
    })
    .await;
}

/// The drained node's agent stops answering (SIGSTOP) mid-drain: the node
/// goes down, the drain pauses and starts nothing while it is; SIGCONT
/// brings the node back, the drain resumes and completes.
#[tokio::test(flavor = "multi_thread")]
async fn a_drain_pauses_while_its_node_is_down_and_resumes() {
    let _one = Cluster::lock().await;
    bounded(600, async {
        let cl = Cluster::start(&[Role::Both, Role::Both, Role::Controller]).await;
        let (n1, n2) = (Cluster::node(1), Cluster::node(2));
        let (_, mut c) = cl.leader().await;
        let tag = format!("pa{}", std::process::id());
        let vpses = counting_vpses_on(&cl, &mut c, 1, &tag, 6, 4).await;
        let checker = Checker::start(agents(2), None, vpses.clone());
        let (code, out, err) = cl.ferryctl(&["node", "drain", &n1, "--parallel", "1"]);
        assert_eq!(code, 0, "{out}{err}");
        let end = Instant::now() + Duration::from_secs(60);
        while !drain_of(&cl, &n1)
            .await
            .is_some_and(|d| d.items.iter().any(|i| i.status == "moved"))
        {
            assert!(Instant::now() < end, "nothing moved{}", cl.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let agent1 = cl.hosts[0].agent.as_ref().expect("agent 1");
        agent1.stop();
        let end = Instant::now() + Duration::from_secs(30);
        let paused = loop {
            let d = drain_of(&cl, &n1).await.expect("drain");
            if d.state == "paused" {
                break d;
            }
            assert!(Instant::now() < end, "the drain never paused: {d:#?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(
            paused.reason.contains(&format!("{n1} is down")),
            "{paused:?}"
        );
        let (_, out, _) = cl.ferryctl(&["node", "show", &n1]);
        assert!(out.contains(&format!("drain of {n1} paused")), "{out}");
        // Nothing new starts while it is paused.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let d = drain_of(&cl, &n1).await.expect("drain");
        for p in paused.items.iter().filter(|i| i.status == "pending") {
            let now = d.items.iter().find(|i| i.vps == p.vps).unwrap();
            assert_eq!(
                now.attempts.len(),
                p.attempts.len(),
                "{} started while the drain was paused: {d:#?}",
                p.vps
            );
        }
        agent1.cont();
        let d = wait_drain_end(&cl, &n1, 240).await;
        assert_eq!(d.state, "complete", "{d:#?}");
        let (_, mut c) = cl.leader().await;
        for (name, ip) in &vpses {
            let v = record_when(&mut c, name, |v| v.observed == "running").await;
            assert_eq!(v.node, n2, "{v:?}");
            counts_on(name, ip).await;
        }
        let evs = events(&mut c).await;
        let said = |s: &str| evs.iter().any(|e| e.message.contains(s));
        assert!(said(&format!("drain of {n1} paused")), "{evs:?}");
        assert!(said(&format!("drain of {n1} resumes")), "{evs:?}");
        checker.finish().await;
    })
    .await;
}
