//! The drained node cut off both networks mid-drain, then healed, on three
//! hosts that each run a controller replica and an agent over TCP with
//! mutual TLS: no VPS ever runs on two nodes, no counter goes back, and the
//! drain completes or says what it could not do.

mod common;
use common::*;

use std::time::{Duration, Instant};

use ferry_cluster_tests::checker::Checker;
use ferry_cluster_tests::{Cluster, Role};
use ferry_proto::agent::v1 as apb;
use ferry_proto::controller::v1 as cpb;

#[tokio::test(flavor = "multi_thread")]
async fn a_drained_node_cut_off_mid_drain_never_runs_a_vps_twice() {
    let _one = Cluster::lock().await;
    let run = async {
        let cl = Cluster::start(&[Role::Both, Role::Both, Role::Both]).await;
        let n1 = Cluster::node(1);
        let (_, mut c) = cl.leader().await;
        let tag = format!("pt{}", std::process::id());
        let vpses = counting_vpses_on(&cl, &mut c, 1, &tag, 2, 5).await;
        let checker = Checker::start(agents(3), None, vpses.clone());

        let (code, out, err) = cl.ferryctl(&["node", "drain", &n1, "--parallel", "1"]);
        assert_eq!(code, 0, "{out}{err}");
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(d) = drain_of(&cl, &n1).await {
                if d.items.iter().any(|i| i.status == "moved") {
                    break;
                }
            }
            assert!(Instant::now() < end, "nothing moved{}", cl.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cl.cut(1);
        eprintln!("cut {n1} off both networks");
        // The others see it go down; the drain pauses (the leader may have
        // been n1's replica: a new one is elected among n2 and n3).
        let end = Instant::now() + Duration::from_secs(60);
        let paused = loop {
            if let Some(d) = drain_of(&cl, &n1).await {
                if d.state == "paused" {
                    break d;
                }
                assert!(
                    d.state == "running",
                    "the drain ended while its node was cut off: {d:#?}"
                );
            }
            assert!(Instant::now() < end, "the drain never paused{}", cl.logs());
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        eprintln!("paused: {}", paused.reason);
        tokio::time::sleep(Duration::from_secs(3)).await;
        cl.heal(1);
        eprintln!("healed {n1}");

        let d = wait_drain_end(&cl, &n1, 240).await;
        let (_, out, _) = cl.ferryctl(&["node", "drain-status", &n1]);
        eprintln!("{out}");
        assert!(
            matches!(d.state.as_str(), "complete" | "incomplete"),
            "{d:#?}"
        );
        for i in &d.items {
            assert!(
                i.status == "moved" || !i.reason.is_empty(),
                "{} not moved and no reason given: {d:#?}",
                i.vps
            );
        }
        // Exactly once, where the record says, and counting on.
        let (_, mut lc) = cl.leader().await;
        for (name, ip) in &vpses {
            let end = Instant::now() + Duration::from_secs(30);
            loop {
                let v = lc
                    .get_vps(cpb::GetVpsRequest { name: name.clone() })
                    .await
                    .expect("get")
                    .into_inner();
                let mut on = Vec::new();
                for i in 1..=3 {
                    let mut a = cl.agent_client(i).await;
                    if let Ok(x) = a.get_vps(apb::GetVpsRequest { name: name.clone() }).await {
                        let x = x.into_inner();
                        if x.status == apb::VpsStatus::Running as i32 && x.migrating.is_empty() {
                            on.push(Cluster::node(i));
                        }
                    }
                }
                if on == [v.node.clone()] && v.migration.is_none() {
                    break;
                }
                assert!(
                    Instant::now() < end,
                    "{name}: record on {}, running on {on:?}{}",
                    v.node,
                    cl.logs()
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            counts_on(name, ip).await;
        }
        let samples = checker.finish().await;
        eprintln!("exactly-once checker: {samples} samples, no violation");
    };
    tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("test timed out");
}
