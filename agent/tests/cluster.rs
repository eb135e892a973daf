//! Agents under a three-replica controller: placed VPSes run on their chosen
//! nodes; an agent that dies makes its node `down` and its VPSes `unknown`
//! (nothing started elsewhere); back, it is reconciled and nothing starts twice.
//! Controllers and agents speak over unix sockets, reachable from every test
//! host's network namespace.

mod common;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use ferry_proto::agent::v1 as apb;
use ferry_proto::controller::v1 as cpb;
use ferry_proto::controller::v1::controller_service_client::ControllerServiceClient;

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

#[tokio::test(flavor = "multi_thread")]
async fn controller_drives_agents_and_never_starts_a_vps_twice() {
    bounded(240, async {
        let ctl = Controllers::start().await;
        let args = |name: &str| ctl.agent_args(name);
        let mut a = Host::with_args(args("node-a")).await;
        let b = Host::with_args(args("node-b")).await;
        // Agents advertise their unix socket (the default advertise is --listen).
        let mut c = ctl.client(1).await;
        wait_node(&mut c, "node-a", "ready", 15).await;
        wait_node(&mut c, "node-b", "ready", 15).await;

        // Nodes report their templates: a VPS of a template no node has is refused,
        // every node named, and nothing is written.
        let end = Instant::now() + Duration::from_secs(10);
        while c
            .get_node(cpb::GetNodeRequest {
                name: "node-b".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .templates
            .is_empty()
        {
            assert!(Instant::now() < end, "node-b never reported its templates");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut missing = vps("nt1", "");
        missing.spec.as_mut().unwrap().template = "nosuch".into();
        let e = c.create_vps(missing).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{}", e.message());
        assert!(
            e.message().contains("node-a: template nosuch missing")
                && e.message().contains("node-b: template nosuch missing"),
            "{}",
            e.message()
        );
        for (n, node) in [("ca1", "node-a"), ("ca2", "node-a"), ("cb1", "node-b")] {
            c.create_vps(vps(n, node)).await.expect("create");
        }
        wait_vps(&mut c, "all running", |vs| {
            vs.len() == 3 && vs.iter().all(|v| v.observed == "running")
        })
        .await;
        // The node reports what it runs (written at most every 10 s, at once on change).
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            let n = c
                .get_node(cpb::GetNodeRequest {
                    name: "node-a".into(),
                })
                .await
                .unwrap()
                .into_inner();
            let u = n.usage.unwrap_or_default();
            if u.vps_running == 2 {
                assert!(
                    u.memory_bytes > 0 && u.disk_bytes > 0 && n.capacity.unwrap().disk_bytes > 0,
                    "{n:?}"
                );
                break;
            }
            assert!(
                Instant::now() < end,
                "node-a never reported 2 running: {n:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Each runs on its chosen agent, with the cluster's generation and address.
        let mut aa = a.client().await;
        let mut bb = b.client().await;
        let ca1 = get(&mut aa, "ca1").await;
        assert!(running(&ca1));
        assert_eq!(ca1.spec.as_ref().unwrap().generation, 1);
        assert!(running(&get(&mut bb, "cb1").await));
        assert!(
            bb.get_vps(apb::GetVpsRequest { name: "ca1".into() })
                .await
                .is_err(),
            "ca1 on the wrong node"
        );
        let pids: Vec<i32> = [
            get(&mut aa, "ca1").await.init_pid,
            get(&mut aa, "ca2").await.init_pid,
        ]
        .to_vec();

        // node-a's agent dies: its node goes down, its VPSes unknown, and they
        // keep running where they are; nothing moves to node-b.
        a.kill_agent();
        wait_node(&mut c, "node-a", "down", 15).await;
        let vs = wait_vps(&mut c, "unknown", |vs| {
            vs.iter()
                .filter(|v| v.node == "node-a")
                .all(|v| v.observed == "unknown")
        })
        .await;
        assert!(vs
            .iter()
            .filter(|v| v.node == "node-b")
            .all(|v| v.observed == "running"));
        for p in &pids {
            assert!(
                Path::new(&format!("/proc/{p}")).exists(),
                "VPS init {p} died with its agent"
            );
        }
        let on_b = bb
            .list_vps(apb::ListVpsRequest {})
            .await
            .unwrap()
            .into_inner()
            .vps;
        assert_eq!(
            on_b.len(),
            1,
            "a VPS of the down node was started elsewhere"
        );

        // Back: the node is ready again and reconciled, the same inits run.
        a.start_agent().await;
        wait_node(&mut c, "node-a", "ready", 15).await;
        wait_vps(&mut c, "running again", |vs| {
            vs.iter().all(|v| v.observed == "running")
        })
        .await;
        let mut aa = a.client().await;
        assert_eq!(
            vec![
                get(&mut aa, "ca1").await.init_pid,
                get(&mut aa, "ca2").await.init_pid
            ],
            pids,
            "a VPS was started twice"
        );

        // Desired state flows down: stop, start, delete.
        let v = c
            .stop_vps(cpb::SetDesiredRequest { name: "ca2".into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(v.generation, 2);
        wait_vps(&mut c, "ca2 stopped", |vs| {
            vs.iter()
                .any(|v| v.spec.as_ref().unwrap().name == "ca2" && v.observed == "stopped")
        })
        .await;
        assert!(stopped(&get(&mut aa, "ca2").await));
        // The agent now refuses an instruction of the older generation.
        let e = aa
            .start_vps(apb::StartVpsRequest {
                name: "ca2".into(),
                generation: 1,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
        c.start_vps(cpb::SetDesiredRequest { name: "ca2".into() })
            .await
            .unwrap();
        wait_vps(&mut c, "ca2 running", |vs| {
            vs.iter().all(|v| v.observed == "running")
        })
        .await;
        // New limits flow down to the running VPS, live.
        let v = c
            .update_vps(cpb::UpdateVpsRequest {
                name: "ca1".into(),
                memory_bytes: Some(96 << 20),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let on_a = get(&mut aa, "ca1").await;
            let spec = on_a.spec.unwrap();
            if spec.limits.unwrap().memory_bytes == 96 << 20 {
                assert_eq!(spec.generation, v.generation);
                assert!(running(&get(&mut aa, "ca1").await));
                break;
            }
            assert!(Instant::now() < end, "new limits never reached the agent");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let e = c
            .update_vps(cpb::UpdateVpsRequest {
                name: "ca1".into(),
                memory_bytes: Some(1 << 50),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{}", e.message());
        c.delete_vps(cpb::DeleteVpsRequest { name: "cb1".into() })
            .await
            .unwrap();
        let end = Instant::now() + Duration::from_secs(20);
        while bb
            .get_vps(apb::GetVpsRequest { name: "cb1".into() })
            .await
            .is_ok()
        {
            assert!(
                Instant::now() < end,
                "deleted VPS not destroyed on its node"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_concurrent_creates_run_on_their_chosen_agents() {
    bounded(420, async {
        let _heavy = HEAVY.lock().await;
        let ctl = Controllers::start().await;
        let args = |name: &str| ctl.agent_args(name);
        let hosts = [
            Host::with_args(args("n1")).await,
            Host::with_args(args("n2")).await,
            Host::with_args(args("n3")).await,
        ];
        let mut c = ctl.client(0).await;
        for n in ["n1", "n2", "n3"] {
            wait_node(&mut c, n, "ready", 15).await;
        }
        let mut tasks = Vec::new();
        for i in 0..200 {
            let sock = ctl.sock(i % 3);
            tasks.push(tokio::spawn(async move {
                let ch = ferry_proto::addr::connect(&ferry_proto::addr::Addr::Unix(sock))
                    .await
                    .unwrap();
                let mut c = ControllerServiceClient::new(ch);
                let mut req = vps(&format!("m{i}"), "");
                req.placement = Some(cpb::Placement {
                    anti_affinity_group: String::new(),
                    ..Default::default()
                });
                req.spec.as_mut().unwrap().limits = Some(apb::Limits {
                    memory_bytes: 16 << 20,
                    cpu_millicores: 10,
                    pids: 64,
                    ..Default::default()
                });
                // Bounded, so a create that never answers is reported as such.
                match tokio::time::timeout(Duration::from_secs(60), c.create_vps(req)).await {
                    Ok(r) => r,
                    Err(_) => Err(tonic::Status::deadline_exceeded("no answer in 60 s")),
                }
            }));
        }
        let mut acked = Vec::new();
        let mut refused = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(v) => acked.push(v.into_inner().spec.unwrap().name),
                Err(s) => refused.push(format!("{:?}: {}", s.code(), s.message())),
            }
        }
        refused.dedup();
        assert_eq!(acked.len(), 200, "creates refused: {refused:?}");
        let vs = wait_vps(&mut c, "200 running", |vs| {
            vs.len() == 200 && vs.iter().all(|v| v.observed == "running")
        })
        .await;
        let ips: std::collections::BTreeSet<String> = vs
            .iter()
            .map(|v| v.spec.as_ref().unwrap().net.as_ref().unwrap().ip.clone())
            .collect();
        assert_eq!(ips.len(), 200, "an address was handed out twice");
        // Every VPS runs on the agent the controller chose, and only there.
        let mut total = 0;
        for (h, node) in hosts.iter().zip(["n1", "n2", "n3"]) {
            let mut a = h.client().await;
            let on_agent = a
                .list_vps(apb::ListVpsRequest {})
                .await
                .unwrap()
                .into_inner()
                .vps;
            let mut here: Vec<String> = on_agent
                .iter()
                .filter(|v| running(v))
                .map(|v| v.spec.as_ref().unwrap().name.clone())
                .collect();
            let mut placed: Vec<String> = vs
                .iter()
                .filter(|v| v.node == node)
                .map(|v| v.spec.as_ref().unwrap().name.clone())
                .collect();
            here.sort();
            placed.sort();
            assert_eq!(here, placed, "{node} runs other VPSes than placed there");
            total += here.len();
            let n = c
                .get_node(cpb::GetNodeRequest { name: node.into() })
                .await
                .unwrap()
                .into_inner();
            assert!(n.allocated.unwrap().memory_bytes <= n.capacity.unwrap().memory_bytes);
        }
        assert_eq!(total, 200);
        for v in &vs {
            c.delete_vps(cpb::DeleteVpsRequest {
                name: v.spec.as_ref().unwrap().name.clone(),
            })
            .await
            .unwrap();
        }
    })
    .await;
}
