//! Draining and restoring a node as an operator runs it (`ferryctl node
//! drain`, `drain-status --follow`, `node restore`), with real agents on
//! three hosts, real VPSes serving counters over HTTP, and three controller
//! replicas, one of them SIGKILLed mid-drain. The exactly-once checker
//! watches throughout: no VPS ever runs on two nodes, no counter goes back.

mod common;
use common::checker::Checker;
use common::*;

use std::time::{Duration, Instant};

use ferry_proto::addr::Addr;
use ferry_proto::controller::v1 as cpb;
use ferry_proto::controller::v1::controller_service_client::ControllerServiceClient;
use futures::StreamExt;
use tonic::transport::Channel;

type Ctl = ControllerServiceClient<Channel>;

/// Starts a counter in the VPS: its value in /var/www/counter, which httpd
/// serves (written aside and renamed in, so it is never read half-written).
async fn start_counter(h: &Host, name: &str) {
    let mut c = h.client().await;
    spawn_in(
        &mut c,
        name,
        "sh -c 'i=0; while :; do i=$((i+1)); echo $i > /var/www/.counter; mv /var/www/.counter /var/www/counter; sleep 0.05; done'",
    )
    .await;
}

async fn counter(lan: &Lan, ip: &str) -> u64 {
    lan.http_get(&format!("http://{ip}/counter"))
        .await
        .trim()
        .parse()
        .unwrap_or(0)
}

async fn record(c: &mut Ctl, name: &str) -> cpb::ClusterVps {
    c.get_vps(cpb::GetVpsRequest { name: name.into() })
        .await
        .expect("get vps")
        .into_inner()
}

/// The record once `f` holds (what a node reports comes with its heartbeat).
async fn record_when(
    c: &mut Ctl,
    name: &str,
    f: impl Fn(&cpb::ClusterVps) -> bool,
) -> cpb::ClusterVps {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let v = record(c, name).await;
        if f(&v) {
            return v;
        }
        assert!(Instant::now() < end, "{name}: {v:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `node`'s drain (or restore) has ended; polls any replica
/// that answers.
async fn wait_drain_end(ctl: &Controllers, node: &str, secs: u64) -> cpb::Drain {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        let i = ctl.leader().await;
        if let Ok(d) = ctl
            .client(i)
            .await
            .get_drain(cpb::GetDrainRequest { node: node.into() })
            .await
        {
            let d = d.into_inner();
            if !matches!(d.state.as_str(), "running" | "paused") {
                return d;
            }
            assert!(Instant::now() < end, "the drain never ended: {d:#?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_drains_live_through_a_leader_kill_and_restores() {
    bounded(600, async {
        let _heavy = HEAVY.lock().await;
        let mut ctl = Controllers::start().await;
        let lan = Lan::new();
        let a = Host::on_lan(&lan, "10.77.0.91/16", ctl.agent_args("dr-a")).await;
        let b = Host::on_lan(&lan, "10.77.0.92/16", ctl.agent_args("dr-b")).await;
        let cc = Host::on_lan(&lan, "10.77.0.93/16", ctl.agent_args("dr-c")).await;
        let mut c = ctl.client(0).await;
        for n in ["dr-a", "dr-b", "dr-c"] {
            wait_node(&mut c, n, "ready", 20).await;
        }
        let tag = format!("dr{}", std::process::id());

        // Little room on dr-b and dr-c: a stopped filler on each leaves 1 GiB.
        let cap = c
            .get_node(cpb::GetNodeRequest {
                name: "dr-b".into(),
            })
            .await
            .expect("node")
            .into_inner()
            .capacity
            .unwrap_or_default()
            .memory_bytes;
        for n in ["dr-b", "dr-c"] {
            let mut f = spec(&format!("{tag}f{}", &n[3..]), None);
            f.limits.as_mut().unwrap().memory_bytes = cap - (1 << 30);
            c.create_vps(cpb::CreateVpsRequest {
                spec: Some(f),
                placement: Some(cpb::Placement {
                    node: n.into(),
                    ..Default::default()
                }),
                desired: "stopped".into(),
                ..Default::default()
            })
            .await
            .expect("filler");
        }
        // The VPSes of dr-a, placed there by the scheduler (not pinned: a
        // drain moves them) while the others are cordoned: six running
        // with counters, one stopped, and one too big for the room left.
        for n in ["dr-b", "dr-c"] {
            let (code, _, err) = ctl.ferryctl(&["node", "cordon", n]);
            assert_eq!(code, 0, "{err}");
        }
        let movers: Vec<(String, String)> = (0..6)
            .map(|i| (format!("{tag}v{i}"), format!("10.77.21.{}", 10 + i)))
            .collect();
        for (name, ip) in &movers {
            c.create_vps(cpb::CreateVpsRequest {
                spec: Some(spec(name, Some(ip))),
                ..Default::default()
            })
            .await
            .expect("create");
        }
        let stopped_one = format!("{tag}s");
        c.create_vps(cpb::CreateVpsRequest {
            spec: Some(spec(&stopped_one, None)),
            desired: "stopped".into(),
            ..Default::default()
        })
        .await
        .expect("create stopped");
        let big = format!("{tag}big");
        let mut bs = spec(&big, None);
        bs.limits.as_mut().unwrap().memory_bytes = 3 << 29; // 1.5 GiB
        c.create_vps(cpb::CreateVpsRequest {
            spec: Some(bs),
            ..Default::default()
        })
        .await
        .expect("create big");
        for n in ["dr-b", "dr-c"] {
            let (code, _, err) = ctl.ferryctl(&["node", "uncordon", n]);
            assert_eq!(code, 0, "{err}");
        }
        let all: Vec<String> = movers
            .iter()
            .map(|(n, _)| n.clone())
            .chain([stopped_one.clone(), big.clone()])
            .collect();
        wait_vps(&mut c, "every VPS placed and settled on dr-a", |vs| {
            all.iter().all(|n| {
                vs.iter().any(|v| {
                    v.spec.as_ref().is_some_and(|s| &s.name == n)
                        && v.node == "dr-a"
                        && v.observed == v.desired
                })
            })
        })
        .await;
        for (name, _) in &movers {
            start_counter(&a, name).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut before = Vec::new();
        for (_, ip) in &movers {
            before.push(counter(&lan, ip).await);
        }
        assert!(before.iter().all(|n| *n > 0), "counters run: {before:?}");
        let checker = Checker::start(
            vec![
                ("dr-a".into(), Addr::Unix(a.sock())),
                ("dr-b".into(), Addr::Unix(b.sock())),
                ("dr-c".into(), Addr::Unix(cc.sock())),
            ],
            Some(lan.client.clone()),
            movers.clone(),
        );

        // The plan, changing nothing.
        let (code, out, err) = ctl.ferryctl(&["node", "drain", "dr-a", "--dry-run"]);
        assert_eq!(code, 0, "{out}{err}");
        for (name, _) in &movers {
            let line = out
                .lines()
                .find(|l| l.starts_with(name.as_str()))
                .unwrap_or("");
            assert!(line.contains("dr-b") || line.contains("dr-c"), "{out}");
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
            .get_node(cpb::GetNodeRequest {
                name: "dr-a".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(n.status, "ready", "a dry run cordons nothing");
        assert!(n.drain.is_none(), "a dry run records nothing");

        // The drain, followed by a second operator's `drain-status --follow`.
        let (code, out, err) = ctl.ferryctl(&["node", "drain", "dr-a", "--parallel", "2"]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("8 VPS(es), 2 at a time"), "{out}");
        let addrs = ctl.addrs();
        let follower = std::thread::spawn(move || {
            run_ferryctl(
                "--controller",
                &addrs,
                &["node", "drain-status", "dr-a", "--follow"],
            )
        });
        // Refused while it runs: a second drain.
        let (code, _, err) = ctl.ferryctl(&["node", "drain", "dr-a"]);
        assert!(code != 0 && err.contains("under way"), "{err}");

        // SIGKILL the leader once the first VPS has moved, with more to go.
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            let d = c
                .get_drain(cpb::GetDrainRequest {
                    node: "dr-a".into(),
                })
                .await
                .expect("drain")
                .into_inner();
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
            assert!(
                Instant::now() < end,
                "no VPS moved: {d:#?}\n{}",
                a.agent_log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let leader = ctl.leader().await;
        ctl.kill(leader);
        eprintln!("killed controller {leader} mid-drain");

        let d = wait_drain_end(&ctl, "dr-a", 240).await;
        let mut c = ctl.client(ctl.leader().await).await;
        let item = |n: &str| d.items.iter().find(|i| i.vps == n).cloned().unwrap();
        assert_eq!(d.state, "incomplete", "{d:#?}");
        for (name, _) in &movers {
            let i = item(name);
            assert_eq!(i.status, "moved", "{d:#?}");
            assert!(matches!(i.target.as_str(), "dr-b" | "dr-c"), "{i:?}");
        }
        assert_eq!(item(&stopped_one).status, "moved");
        assert_eq!(item(&stopped_one).mode, "cold");
        let bi = item(&big);
        assert_eq!(bi.status, "skipped", "{bi:?}");
        assert!(bi.reason.contains("no node can take it"), "{bi:?}");
        assert!(
            d.reason.contains(&format!("still on dr-a: {big}")),
            "{}",
            d.reason
        );

        // Where the records say, running, answering, counting on.
        for ((name, ip), n0) in movers.iter().zip(&before) {
            let v = record_when(&mut c, name, |v| v.observed == "running").await;
            assert!(v.node != "dr-a" && v.migration.is_none(), "{v:?}");
            assert!(counter(&lan, ip).await > *n0, "{name}'s counter went on");
        }
        let v = record(&mut c, &big).await;
        assert_eq!((v.node.as_str(), v.observed.as_str()), ("dr-a", "running"));
        let v = record(&mut c, &stopped_one).await;
        assert!(v.node != "dr-a" && v.desired == "stopped", "{v:?}");
        let (code, out, err) = follower.join().expect("follower");
        eprintln!("$ ferryctl node drain-status dr-a --follow\n{out}{err}");
        assert_eq!(code, 2, "incomplete exits 2: {out}{err}");
        assert!(out.contains("moved to dr-"), "{out}");
        assert!(out.contains("drain of dr-a incomplete"), "{out}");
        let (code, out, _) = ctl.ferryctl(&["node", "show", "dr-a"]);
        assert_eq!(code, 0);
        assert!(out.contains("cordoned"), "{out}");
        assert!(out.contains("drain of dr-a incomplete"), "{out}");
        let events: Vec<cpb::Event> = c
            .watch_events(cpb::WatchEventsRequest {
                after_seq: 0,
                follow: false,
            })
            .await
            .unwrap()
            .into_inner()
            .filter_map(|e| async { e.ok() })
            .collect()
            .await;
        let said = |s: &str| events.iter().any(|e| e.message.contains(s));
        assert!(said("drain of dr-a starts"), "{events:?}");
        assert!(said(&format!("{big} skipped")), "{events:?}");
        assert!(said("drain of dr-a incomplete"), "{events:?}");

        // After the maintenance: everything the drain moved comes back.
        let (code, out, err) = ctl.ferryctl(&["node", "restore", "dr-a", "--follow"]);
        eprintln!("$ ferryctl node restore dr-a --follow\n{out}{err}");
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("restore of dr-a complete"), "{out}");
        for (name, ip) in &movers {
            let v = record(&mut c, name).await;
            assert_eq!(v.node, "dr-a", "{v:?}");
            let n0 = counter(&lan, ip).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(counter(&lan, ip).await > n0, "{name} counts on dr-a again");
        }
        assert_eq!(record(&mut c, &stopped_one).await.node, "dr-a");
        let n = c
            .get_node(cpb::GetNodeRequest {
                name: "dr-a".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(n.status, "ready", "a restore uncordons");
        let samples = checker.finish().await;
        eprintln!("exactly-once checker: {samples} samples, no violation");
    })
    .await;
}

/// Creates running VPSes `names` (with IPs) where the scheduler must put
/// them on `node` (the `others` cordoned meanwhile), so they are not pinned:
/// a drain may move them. Waits until each runs.
async fn create_unpinned_on(
    ctl: &Controllers,
    c: &mut Ctl,
    node: &str,
    others: &[&str],
    vpses: &[(String, String)],
) {
    for n in others {
        let (code, _, err) = ctl.ferryctl(&["node", "cordon", n]);
        assert_eq!(code, 0, "{err}");
    }
    for (name, ip) in vpses {
        c.create_vps(cpb::CreateVpsRequest {
            spec: Some(spec(name, Some(ip))),
            ..Default::default()
        })
        .await
        .expect("create");
    }
    for n in others {
        let (code, _, err) = ctl.ferryctl(&["node", "uncordon", n]);
        assert_eq!(code, 0, "{err}");
    }
    for (name, _) in vpses {
        let v = record_when(c, name, |v| v.observed == "running").await;
        assert_eq!(v.node, node);
    }
}

/// The target agent SIGKILLed during a drain's move: that move rolls back
/// (the VPS runs on at the source), it is retried on the other node, and
/// the drain completes with every attempt's reason on record.
#[tokio::test(flavor = "multi_thread")]
async fn a_move_whose_target_dies_is_retried_elsewhere_and_the_drain_completes() {
    bounded(600, async {
        let _heavy = HEAVY.lock().await;
        let ctl = Controllers::start().await;
        let lan = Lan::new();
        let a = Host::on_lan(&lan, "10.77.0.94/16", ctl.agent_args("tk-a")).await;
        let mut b = Host::on_lan(&lan, "10.77.0.95/16", ctl.agent_args("tk-b")).await;
        let mut cc = Host::on_lan(&lan, "10.77.0.96/16", ctl.agent_args("tk-c")).await;
        let mut c = ctl.client(0).await;
        for n in ["tk-a", "tk-b", "tk-c"] {
            wait_node(&mut c, n, "ready", 20).await;
        }
        let tag = format!("tk{}", std::process::id());
        let vpses: Vec<(String, String)> = (0..3)
            .map(|i| (format!("{tag}v{i}"), format!("10.77.22.{}", 10 + i)))
            .collect();
        create_unpinned_on(&ctl, &mut c, "tk-a", &["tk-b", "tk-c"], &vpses).await;
        for (name, _) in &vpses {
            start_counter(&a, name).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let checker = Checker::start(
            vec![
                ("tk-a".into(), Addr::Unix(a.sock())),
                ("tk-b".into(), Addr::Unix(b.sock())),
                ("tk-c".into(), Addr::Unix(cc.sock())),
            ],
            Some(lan.client.clone()),
            vpses.clone(),
        );
        let (code, out, err) = ctl.ferryctl(&["node", "drain", "tk-a", "--parallel", "1"]);
        assert_eq!(code, 0, "{out}{err}");

        // The first move's target dies under it.
        let end = Instant::now() + Duration::from_secs(60);
        let (victim, target) = loop {
            let d = c
                .get_drain(cpb::GetDrainRequest {
                    node: "tk-a".into(),
                })
                .await
                .expect("drain")
                .into_inner();
            // Past the preflight: the target holds part of the VPS.
            if let Some(i) = d.items.iter().find(|i| {
                i.status == "moving" && !matches!(i.phase.as_str(), "" | "starting" | "preflight")
            }) {
                eprintln!("{} moving to {} in phase {}", i.vps, i.target, i.phase);
                break (i.vps.clone(), i.target.clone());
            }
            assert!(Instant::now() < end, "nothing moved: {d:#?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if target == "tk-b" {
            b.kill_agent();
        } else {
            cc.kill_agent();
        }
        eprintln!("killed {target}'s agent while {victim} moved there");

        let d = wait_drain_end(&ctl, "tk-a", 240).await;
        let survivor = if target == "tk-b" { "tk-c" } else { "tk-b" };
        assert_eq!(d.state, "complete", "{d:#?}");
        let i = d.items.iter().find(|i| i.vps == victim).unwrap();
        assert_eq!(i.target, survivor, "{i:?}");
        assert!(i.attempts.len() >= 2, "{i:?}");
        assert_eq!(i.attempts[0].target, target);
        assert!(!i.attempts[0].error.is_empty(), "{i:?}");
        for (name, ip) in &vpses {
            let v = record_when(&mut c, name, |v| v.observed == "running").await;
            assert_eq!(v.node, survivor, "{v:?}");
            let n0 = counter(&lan, ip).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(counter(&lan, ip).await > n0, "{name} counts on");
        }
        let samples = checker.finish().await;
        eprintln!("exactly-once checker: {samples} samples, no violation");
        let (code, out, _) = ctl.ferryctl(&["node", "drain-status", "tk-a"]);
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
    bounded(600, async {
        let _heavy = HEAVY.lock().await;
        let ctl = Controllers::start().await;
        let lan = Lan::new();
        let a = Host::on_lan(&lan, "10.77.0.97/16", ctl.agent_args("pa-a")).await;
        let b = Host::on_lan(&lan, "10.77.0.98/16", ctl.agent_args("pa-b")).await;
        let mut c = ctl.client(0).await;
        for n in ["pa-a", "pa-b"] {
            wait_node(&mut c, n, "ready", 20).await;
        }
        let tag = format!("pa{}", std::process::id());
        let vpses: Vec<(String, String)> = (0..4)
            .map(|i| (format!("{tag}v{i}"), format!("10.77.23.{}", 10 + i)))
            .collect();
        create_unpinned_on(&ctl, &mut c, "pa-a", &["pa-b"], &vpses).await;
        for (name, _) in &vpses {
            start_counter(&a, name).await;
        }
        let checker = Checker::start(
            vec![
                ("pa-a".into(), Addr::Unix(a.sock())),
                ("pa-b".into(), Addr::Unix(b.sock())),
            ],
            Some(lan.client.clone()),
            vpses.clone(),
        );
        let (code, out, err) = ctl.ferryctl(&["node", "drain", "pa-a", "--parallel", "1"]);
        assert_eq!(code, 0, "{out}{err}");
        let get = |mut c: Ctl| async move {
            c.get_drain(cpb::GetDrainRequest {
                node: "pa-a".into(),
            })
            .await
            .expect("drain")
            .into_inner()
        };
        let end = Instant::now() + Duration::from_secs(60);
        while !get(c.clone())
            .await
            .items
            .iter()
            .any(|i| i.status == "moved")
        {
            assert!(Instant::now() < end, "nothing moved");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let pid = a.agent_pid().expect("agent pid");
        run_ok("kill", &["-STOP", &pid.to_string()]);
        let end = Instant::now() + Duration::from_secs(30);
        let paused = loop {
            let d = get(c.clone()).await;
            if d.state == "paused" {
                break d;
            }
            assert!(Instant::now() < end, "the drain never paused: {d:#?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(paused.reason.contains("pa-a is down"), "{paused:?}");
        let (_, out, _) = ctl.ferryctl(&["node", "show", "pa-a"]);
        assert!(out.contains("drain of pa-a paused"), "{out}");
        // Nothing new starts while it is paused.
        let pending = |d: &cpb::Drain| {
            d.items
                .iter()
                .filter(|i| i.status == "pending")
                .map(|i| i.vps.clone())
                .collect::<Vec<_>>()
        };
        let before = pending(&paused);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let d = get(c.clone()).await;
        for v in &before {
            let i = d.items.iter().find(|i| &i.vps == v).unwrap();
            assert!(
                i.status == "pending"
                    || i.attempts.len()
                        == paused
                            .items
                            .iter()
                            .find(|p| &p.vps == v)
                            .unwrap()
                            .attempts
                            .len(),
                "{v} started while the drain was paused: {d:#?}"
            );
        }
        run_ok("kill", &["-CONT", &pid.to_string()]);
        let d = wait_drain_end(&ctl, "pa-a", 240).await;
        assert_eq!(d.state, "complete", "{d:#?}");
        for (name, ip) in &vpses {
            let v = record_when(&mut c, name, |v| v.observed == "running").await;
            assert_eq!(v.node, "pa-b", "{v:?}");
            let n0 = counter(&lan, ip).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(counter(&lan, ip).await > n0, "{name} counts on");
        }
        let events: Vec<cpb::Event> = c
            .watch_events(cpb::WatchEventsRequest {
                after_seq: 0,
                follow: false,
            })
            .await
            .unwrap()
            .into_inner()
            .filter_map(|e| async { e.ok() })
            .collect()
            .await;
        let said = |s: &str| events.iter().any(|e| e.message.contains(s));
        assert!(said("drain of pa-a paused"), "{events:?}");
        assert!(said("drain of pa-a resumes"), "{events:?}");
        checker.finish().await;
    })
    .await;
}
