//! Agents under a three-replica controller, on hosts of their own: placed
//! VPSes run on their chosen nodes; an agent that dies makes its node `down`
//! and its VPSes `unknown` (nothing started elsewhere); back, it is
//! reconciled and nothing starts twice; desired state and limits flow down;
//! two hundred concurrent creates through every replica each run once, on
//! the node the controller chose, with addresses never handed out twice.

mod common;
use common::*;

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_cluster_tests::{Cluster, Role};
use ferry_proto::agent::v1 as apb;
use ferry_proto::controller::v1 as cpb;

fn vps(name: &str, node: &str) -> cpb::CreateVpsRequest {
    cpb::CreateVpsRequest {
        spec: Some(apb::VpsSpec {
            name: name.into(),
            template: "busybox".into(),
            limits: Some(apb::Limits {
                memory_bytes: 64 << 20,
                cpu_millicores: 200,
                ..Default::default()
            }),
            ..Default::default()
        }),
        placement: Some(cpb::Placement {
            node: node.into(),
            ..Default::default()
        }),
        allocate_ip: true,
        ..Default::default()
    }
}

fn running(v: &apb::Vps) -> bool {
    v.status == apb::VpsStatus::Running as i32
}

fn name_of(v: &cpb::ClusterVps) -> String {
    v.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_controller_drives_agents_and_never_starts_a_vps_twice() {
    let _one = Cluster::lock().await;
    bounded(300, async {
        let mut cl = Cluster::start(&[Role::Both, Role::Both, Role::Controller]).await;
        let (_, mut c) = cl.leader().await;
        let (n1, n2) = (Cluster::node(1), Cluster::node(2));
        let t = format!("pl{}", std::process::id());
        let (a1, a2, b1) = (format!("{t}a1"), format!("{t}a2"), format!("{t}b1"));

        // Nodes report their templates: a VPS of a template no node has is
        // refused, every node named, and nothing is written.
        let end = Instant::now() + Duration::from_secs(15);
        for n in [&n1, &n2] {
            while node_when(&mut c, n, "ready", 15).await.templates.is_empty() {
                assert!(Instant::now() < end, "{n} never reported its templates");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let mut missing = vps(&format!("{t}nt"), "");
        if let Some(s) = missing.spec.as_mut() {
            s.template = "nosuch".into();
        }
        let e = c.create_vps(missing).await.expect_err("no node has it");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{}", e.message());
        for n in [&n1, &n2] {
            assert!(
                e.message()
                    .contains(&format!("{n}: template nosuch missing")),
                "{}",
                e.message()
            );
        }
        assert!(vpses_when(&mut c, "none", |_| true).await.is_empty());

        for (name, node) in [(&a1, &n1), (&a2, &n1), (&b1, &n2)] {
            c.create_vps(vps(name, node)).await.expect("create");
        }
        vpses_when(&mut c, "all running", |vs| {
            vs.len() == 3 && vs.iter().all(|v| v.observed == "running")
        })
        .await;
        // The node reports what it runs (written at most every 10 s, at once
        // on a change).
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            let n = node_when(&mut c, &n1, "ready", 5).await;
            let u = n.usage.unwrap_or_default();
            if u.vps_running == 2 {
                let cap = n.capacity.unwrap_or_default();
                assert!(
                    u.memory_bytes > 0 && u.disk_bytes > 0 && cap.disk_bytes > 0,
                    "{n:?}"
                );
                break;
            }
            assert!(Instant::now() < end, "{n1} never reported 2 running: {n:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Each runs on its chosen agent, with the cluster's generation and
        // address.
        let mut aa = cl.agent_client(1).await;
        let mut bb = cl.agent_client(2).await;
        let v = on_agent(&mut aa, &a1).await;
        assert!(running(&v));
        let spec = v.spec.unwrap_or_default();
        assert_eq!(spec.generation, 1);
        assert!(spec.net.is_some_and(|n| n.ip.starts_with("10.85.16.")));
        assert!(running(&on_agent(&mut bb, &b1).await));
        assert!(
            bb.get_vps(apb::GetVpsRequest { name: a1.clone() })
                .await
                .is_err(),
            "{a1} on the wrong node"
        );
        let pids = vec![
            on_agent(&mut aa, &a1).await.init_pid,
            on_agent(&mut aa, &a2).await.init_pid,
        ];

        // n1's agent dies: its node goes down, its VPSes unknown, and they
        // keep running where they are; nothing moves to n2.
        cl.agent(1).kill9();
        node_when(&mut c, &n1, "down", 20).await;
        let vs = vpses_when(&mut c, "unknown", |vs| {
            vs.iter()
                .filter(|v| v.node == n1)
                .all(|v| v.observed == "unknown")
        })
        .await;
        assert!(vs
            .iter()
            .filter(|v| v.node == n2)
            .all(|v| v.observed == "running"));
        // `vps ls --status running` lists what runs as far as anyone knows,
        // not what is meant to.
        let (code, out, err) = cl.ferryctl(&["vps", "ls", "--status", "running"]);
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains(&b1) && !out.contains(&a1) && !out.contains(&a2),
            "{out}"
        );
        for p in &pids {
            assert!(
                Path::new(&format!("/proc/{p}")).exists(),
                "VPS init {p} died with its agent"
            );
        }
        let on_b = bb
            .list_vps(apb::ListVpsRequest {})
            .await
            .expect("list")
            .into_inner()
            .vps;
        assert_eq!(
            on_b.len(),
            1,
            "a VPS of the down node was started elsewhere"
        );

        // Back: the node is ready again and reconciled, the same inits run.
        cl.agent(1).restart();
        node_when(&mut c, &n1, "ready", 30).await;
        vpses_when(&mut c, "running again", |vs| {
            vs.iter().all(|v| v.observed == "running")
        })
        .await;
        let mut aa = cl.agent_client(1).await;
        assert_eq!(
            vec![
                on_agent(&mut aa, &a1).await.init_pid,
                on_agent(&mut aa, &a2).await.init_pid
            ],
            pids,
            "a VPS was started twice"
        );

        // Desired state flows down: stop, start, delete.
        let v = c
            .stop_vps(cpb::SetDesiredRequest { name: a2.clone() })
            .await
            .expect("stop")
            .into_inner();
        assert_eq!(v.generation, 2);
        vpses_when(&mut c, "a2 stopped", |vs| {
            vs.iter()
                .any(|v| name_of(v) == a2 && v.observed == "stopped")
        })
        .await;
        assert_eq!(
            on_agent(&mut aa, &a2).await.status,
            apb::VpsStatus::Stopped as i32
        );
        // The agent now refuses an instruction of the older generation.
        let e = aa
            .start_vps(apb::StartVpsRequest {
                name: a2.clone(),
                generation: 1,
            })
            .await
            .expect_err("an older generation");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
        c.start_vps(cpb::SetDesiredRequest { name: a2.clone() })
            .await
            .expect("start");
        vpses_when(&mut c, "a2 running", |vs| {
            vs.iter().all(|v| v.observed == "running")
        })
        .await;
        // New limits flow down to the running VPS, live.
        let v = c
            .update_vps(cpb::UpdateVpsRequest {
                name: a1.clone(),
                memory_bytes: Some(96 << 20),
                ..Default::default()
            })
            .await
            .expect("update")
            .into_inner();
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let there = on_agent(&mut aa, &a1).await;
            let spec = there.spec.clone().unwrap_or_default();
            if spec.limits.unwrap_or_default().memory_bytes == 96 << 20 {
                assert_eq!(spec.generation, v.generation);
                assert!(running(&there));
                break;
            }
            assert!(Instant::now() < end, "new limits never reached the agent");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let e = c
            .update_vps(cpb::UpdateVpsRequest {
                name: a1.clone(),
                memory_bytes: Some(1 << 50),
                ..Default::default()
            })
            .await
            .expect_err("more than any node has");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{}", e.message());
        c.delete_vps(cpb::DeleteVpsRequest {
            name: b1.clone(),
            force: true,
        })
        .await
        .expect("delete");
        let end = Instant::now() + Duration::from_secs(20);
        while bb
            .get_vps(apb::GetVpsRequest { name: b1.clone() })
            .await
            .is_ok()
        {
            assert!(
                Instant::now() < end,
                "deleted VPS not destroyed on its node"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let left = cl.residue(2);
        assert!(left.is_empty(), "n2 holds after the delete: {left:#?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_concurrent_creates_run_on_their_chosen_agents() {
    let _one = Cluster::lock().await;
    bounded(600, async {
        let cl = Cluster::start(&[Role::Both, Role::Both, Role::Both]).await;
        let t = format!("cc{}", std::process::id());
        let mut clients = Vec::new();
        for i in 1..=3 {
            clients.push(cl.client_of(i).await);
        }
        let mut tasks = Vec::new();
        for i in 0..200 {
            // Through every replica: followers forward to the leader.
            let mut c = clients[i % 3].clone();
            let mut req = vps(&format!("{t}m{i}"), "");
            req.placement = Some(cpb::Placement::default());
            if let Some(s) = req.spec.as_mut() {
                s.limits = Some(apb::Limits {
                    memory_bytes: 16 << 20,
                    cpu_millicores: 10,
                    pids: 64,
                    ..Default::default()
                });
            }
            tasks.push(tokio::spawn(async move {
                // Bounded, so a create that never answers is reported as such.
                match tokio::time::timeout(Duration::from_secs(60), c.create_vps(req)).await {
                    Ok(r) => r,
                    Err(_) => Err(tonic::Status::deadline_exceeded("no answer in 60 s")),
                }
            }));
        }
        let mut acked = Vec::new();
        let mut refused = Vec::new();
        for task in tasks {
            match task.await.expect("create task") {
                Ok(v) => acked.push(name_of(&v.into_inner())),
                Err(s) => refused.push(format!("{:?}: {}", s.code(), s.message())),
            }
        }
        refused.dedup();
        assert_eq!(acked.len(), 200, "creates refused: {refused:?}");
        let (_, mut c) = cl.leader().await;
        let vs = vpses_when(&mut c, "200 running", |vs| {
            vs.len() == 200 && vs.iter().all(|v| v.observed == "running")
        })
        .await;
        let ips: std::collections::BTreeSet<String> = vs
            .iter()
            .filter_map(|v| v.spec.as_ref().and_then(|s| s.net.as_ref()))
            .map(|n| n.ip.clone())
            .collect();
        assert_eq!(ips.len(), 200, "an address was handed out twice");
        // Every VPS runs on the agent the controller chose, and only there.
        let mut total = 0;
        for i in 1..=3 {
            let node = Cluster::node(i);
            let mut a = cl.agent_client(i).await;
            let mut here: Vec<String> = a
                .list_vps(apb::ListVpsRequest {})
                .await
                .expect("list")
                .into_inner()
                .vps
                .iter()
                .filter(|v| running(v))
                .filter_map(|v| v.spec.as_ref().map(|s| s.name.clone()))
                .collect();
            let mut placed: Vec<String> =
                vs.iter().filter(|v| v.node == node).map(name_of).collect();
            here.sort();
            placed.sort();
            assert_eq!(here, placed, "{node} runs other VPSes than placed there");
            total += here.len();
            let n = node_when(&mut c, &node, "ready", 5).await;
            assert!(
                n.allocated.unwrap_or_default().memory_bytes
                    <= n.capacity.unwrap_or_default().memory_bytes
            );
        }
        assert_eq!(total, 200);
        for v in &vs {
            c.delete_vps(cpb::DeleteVpsRequest {
                name: name_of(v),
                force: true,
            })
            .await
            .expect("delete");
        }
        // Every node lets go of everything.
        for i in 1..=3 {
            let end = Instant::now() + Duration::from_secs(120);
            loop {
                let left = cl.residue(i);
                if left.is_empty() {
                    break;
                }
                assert!(
                    Instant::now() < end,
                    "n{i} holds after the deletes: {left:#?}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    })
    .await;
}
