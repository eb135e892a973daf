//! The drained node cut off both networks mid-drain, then healed, on three
//! hosts that each run a controller replica and an agent over TCP with
//! mutual TLS: no VPS ever runs on two nodes, no counter goes back, and the
//! drain completes or says what it could not do.

use std::time::{Duration, Instant};

use ferry_cluster_tests::checker::Checker;
use ferry_cluster_tests::cluster::Ctl;
use ferry_cluster_tests::{Cluster, Role};
use ferry_proto::addr::Addr;
use ferry_proto::agent::v1 as apb;
use ferry_proto::controller::v1 as cpb;

fn spec(name: &str, ip: &str) -> apb::VpsSpec {
    apb::VpsSpec {
        name: name.into(),
        template: "busybox".into(),
        limits: Some(apb::Limits {
            memory_bytes: 64 << 20,
            ..Default::default()
        }),
        net: Some(apb::NetConfig {
            ip: ip.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn drain_of(c: &mut Ctl, node: &str) -> Option<cpb::Drain> {
    c.get_drain(cpb::GetDrainRequest { node: node.into() })
        .await
        .ok()
        .map(|d| d.into_inner())
}

async fn counter(ip: &str) -> Option<u64> {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-m", "2", &format!("http://{ip}/counter")])
        .output()
        .await
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drained_node_cut_off_mid_drain_never_runs_a_vps_twice() {
    let _one = Cluster::lock().await;
    let run = async {
        let cl = Cluster::start(&[Role::Both, Role::Both, Role::Both]).await;
        let (n1, n2, n3) = (Cluster::node(1), Cluster::node(2), Cluster::node(3));
        let (_, mut c) = cl.leader().await;
        let tag = format!("pt{}", std::process::id());
        let vpses: Vec<(String, String)> = (0..5)
            .map(|i| (format!("{tag}v{i}"), format!("10.85.2.{}", 10 + i)))
            .collect();
        // Placed on n1 by the scheduler (not pinned): the others cordoned.
        for n in [&n2, &n3] {
            let (code, _, err) = cl.ferryctl(&["node", "cordon", n]);
            assert_eq!(code, 0, "{err}");
        }
        for (name, ip) in &vpses {
            c.create_vps(cpb::CreateVpsRequest {
                spec: Some(spec(name, ip)),
                ..Default::default()
            })
            .await
            .expect("create");
        }
        for n in [&n2, &n3] {
            let (code, _, err) = cl.ferryctl(&["node", "uncordon", n]);
            assert_eq!(code, 0, "{err}");
        }
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let vs = c
                .list_vps(cpb::ListVpsRequest::default())
                .await
                .expect("list")
                .into_inner()
                .vps;
            if vs.len() == vpses.len() && vs.iter().all(|v| v.node == n1 && v.observed == "running")
            {
                break;
            }
            assert!(
                Instant::now() < end,
                "not all running on {n1}: {vs:?}{}",
                cl.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for (name, _) in &vpses {
            let (code, _, err) = cl.ferryctl_agent(
                1,
                &[
                    "vps", "exec", name, "--", "setsid", "sh", "-c",
                    "i=0; while :; do i=$((i+1)); echo $i > /var/www/.counter; mv /var/www/.counter /var/www/counter; sleep 0.05; done </dev/null >/dev/null 2>&1 &",
                ],
            );
            assert_eq!(code, 0, "{err}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (name, ip) in &vpses {
            assert!(counter(ip).await.is_some_and(|n| n > 0), "{name} counts");
        }
        let checker = Checker::start(
            (1..=3)
                .map(|i| (Cluster::node(i), Addr::Tcp(Cluster::agent_addr(i))))
                .collect(),
            None,
            vpses.clone(),
        );

        let (code, out, err) = cl.ferryctl(&["node", "drain", &n1, "--parallel", "1"]);
        assert_eq!(code, 0, "{out}{err}");
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(d) = drain_of(&mut c, &n1).await {
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
            let (_, mut lc) = cl.leader().await;
            if let Some(d) = drain_of(&mut lc, &n1).await {
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

        let end = Instant::now() + Duration::from_secs(240);
        let d = loop {
            let (_, mut lc) = cl.leader().await;
            if let Some(d) = drain_of(&mut lc, &n1).await {
                if !matches!(d.state.as_str(), "running" | "paused") {
                    break d;
                }
            }
            assert!(Instant::now() < end, "the drain never ended{}", cl.logs());
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
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
            let n0 = counter(ip).await.unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(counter(ip).await.unwrap_or(0) > n0, "{name} counts on");
        }
        let samples = checker.finish().await;
        eprintln!("exactly-once checker: {samples} samples, no violation");
    };
    tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("test timed out");
}
