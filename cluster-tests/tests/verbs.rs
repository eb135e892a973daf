//! Every VPS verb through the controller, as a user runs them: `ferryctl
//! --controller … vps create|start|stop|restart|set|exec|logs|destroy` on a
//! VPS whose node the user never named. Each verb is checked on the node
//! itself (its agent's own view), not only in the controller's record.

mod common;
use common::*;

use ferry_cluster_tests::{Cluster, Role};
use ferry_proto::agent::v1 as apb;

fn ok(out: (i32, String, String), what: &str) -> String {
    let (code, o, e) = out;
    assert_eq!(code, 0, "{what}: {o}{e}");
    o
}

async fn running_there(a: &mut ferry_cluster_tests::cluster::AgentClient, name: &str) -> bool {
    on_agent(a, name).await.status == apb::VpsStatus::Running as i32
}

#[tokio::test(flavor = "multi_thread")]
async fn every_vps_verb_works_through_the_controller() {
    let _one = Cluster::lock().await;
    bounded(300, async {
        let cl = Cluster::start(&[Role::Both, Role::Both, Role::Controller]).await;
        let (_, mut c) = cl.leader().await;
        let name = format!("vb{}", std::process::id());
        let out = ok(
            cl.ferryctl(&["vps", "create", &name, "--memory", "64M", "--start"]),
            "create",
        );
        let v = record_when(&mut c, &name, |v| v.observed == "running").await;
        let node = v.node.clone();
        assert!(
            out.contains(&format!("created VPS {name} on {node}")),
            "{out}"
        );
        let i: usize = node.trim_start_matches('n').parse().expect("node n<i>");
        let mut a = cl.agent_client(i).await;
        let on_node = |v: &apb::Vps| (v.status, v.init_pid);

        // exec: its output and exit code come back.
        let (code, o, e) =
            cl.ferryctl(&["vps", "exec", &name, "--", "sh", "-c", "echo hi; exit 3"]);
        assert_eq!((code, o.as_str()), (3, "hi\n"), "{e}");

        // stop: desired state and the node agree; --timeout is honoured.
        let out = ok(
            cl.ferryctl(&["vps", "stop", &name, "--timeout", "5"]),
            "stop",
        );
        assert!(
            out.contains(&format!("stopped VPS {name} on {node}")),
            "{out}"
        );
        let there = on_agent(&mut a, &name).await;
        assert_eq!(there.status, apb::VpsStatus::Stopped as i32, "{there:?}");
        assert_eq!(record(&mut c, &name).await.desired, "stopped");

        // start
        let out = ok(cl.ferryctl(&["vps", "start", &name]), "start");
        let there = on_agent(&mut a, &name).await;
        assert_eq!(there.status, apb::VpsStatus::Running as i32);
        assert!(
            out.contains(&format!("(init pid {}) on {node}", there.init_pid)),
            "{out}"
        );

        // restart: a new init on the same node.
        let before = on_node(&there);
        let out = ok(cl.ferryctl(&["vps", "restart", &name]), "restart");
        let there = on_agent(&mut a, &name).await;
        assert_eq!(there.status, apb::VpsStatus::Running as i32);
        assert_ne!(before.1, there.init_pid, "the same init after a restart");
        assert!(out.contains(&format!("restarted VPS {name}")), "{out}");

        // set: new limits applied live on the node, in the VPS's cgroup.
        let out = ok(
            cl.ferryctl(&["vps", "set", &name, "--memory", "96M", "--pids", "300"]),
            "set",
        );
        assert!(out.contains(&format!("applied on {node}")), "{out}");
        let there = on_agent(&mut a, &name).await;
        let l = there.spec.and_then(|s| s.limits).unwrap_or_default();
        assert_eq!((l.memory_bytes, l.pids), (96 << 20, 300));
        assert_eq!(there.status, apb::VpsStatus::Running as i32, "set is live");
        let (code, _, e) = cl.ferryctl(&["vps", "set", &name, "--autostart", "true"]);
        assert_ne!(code, 0);
        assert!(e.contains("--autostart is node-local"), "{e}");

        // logs: init's console.
        let (code, o, e) = cl.ferryctl(&["vps", "logs", &name]);
        assert_eq!(code, 0, "{e}");
        assert!(!o.is_empty(), "no console output");

        // checkpoint files stay node-local, and say where to run them.
        let (code, _, e) = cl.ferryctl(&["vps", "checkpoint", &name]);
        assert_ne!(code, 0);
        assert!(e.contains(&format!("--agent on {node}")), "{e}");

        // destroy: a running VPS only with --force (as node-local); then
        // gone from the cluster and from its node.
        let (code, _, e) = cl.ferryctl(&["vps", "destroy", &name]);
        assert_ne!(code, 0);
        assert!(e.contains("stop it first") && e.contains("--force"), "{e}");
        assert!(
            running_there(&mut a, &name).await,
            "a refused destroy stopped it"
        );
        let out = ok(
            cl.ferryctl(&["vps", "destroy", &name, "--force"]),
            "destroy",
        );
        assert!(out.contains(&format!("destroyed VPS {name}")), "{out}");
        let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while a
            .get_vps(apb::GetVpsRequest { name: name.clone() })
            .await
            .is_ok()
        {
            assert!(std::time::Instant::now() < end, "still on {node}");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let (code, _, e) = cl.ferryctl(&["vps", "start", &name]);
        assert_ne!(code, 0);
        assert!(e.contains("not found") || e.contains("NotFound"), "{e}");

        // ferryctl against a stopped agent (its kernel still accepts the
        // connection) fails within its timeout instead of hanging.
        cl.hosts[i - 1]
            .agent
            .as_ref()
            .expect("an agent on the VPS's node")
            .stop();
        let t = std::time::Instant::now();
        let (code, _, e) = cl.ferryctl_agent(i, &["vps", "ls"]);
        let took = t.elapsed();
        cl.hosts[i - 1]
            .agent
            .as_ref()
            .expect("an agent on the VPS's node")
            .cont();
        assert_ne!(code, 0);
        assert!(e.contains("did not answer within"), "{e}");
        assert!(took < std::time::Duration::from_secs(10), "took {took:?}");
    })
    .await;
}

/// The node bridge's MAC, as the host's namespace has it.
fn bridge_mac(cl: &Cluster, i: usize) -> String {
    let out = std::process::Command::new("ip")
        .args(["-n", &cl.net.netns(i), "-o", "link", "show", "ferrybr0"])
        .output()
        .expect("ip link");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split("link/ether ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .unwrap_or_default()
        .to_string()
}

/// Left to itself the kernel gives a bridge the lowest MAC among its ports
/// (the VPSes' veths): it changed with VPS churn and other hosts lost the
/// node's address. 20 create/destroy cycles leave it as it was.
#[tokio::test(flavor = "multi_thread")]
async fn the_node_bridge_keeps_its_mac_through_vps_churn() {
    let _one = Cluster::lock().await;
    bounded(300, async {
        let cl = Cluster::start(&[Role::Both, Role::Controller, Role::Controller]).await;
        let (_, mut c) = cl.leader().await;
        let mac = bridge_mac(&cl, 1);
        assert!(mac.starts_with("02:"), "not the fixed address: {mac:?}");
        let tag = format!("mc{}", std::process::id());
        for k in 0..20 {
            let name = format!("{tag}v{k}");
            c.create_vps(ferry_proto::controller::v1::CreateVpsRequest {
                spec: Some(spec(&name, None, 32)),
                allocate_ip: true,
                ..Default::default()
            })
            .await
            .expect("create");
            record_when(&mut c, &name, |v| v.observed == "running").await;
            assert_eq!(bridge_mac(&cl, 1), mac, "cycle {k}: after the create");
            c.delete_vps(ferry_proto::controller::v1::DeleteVpsRequest {
                name: name.clone(),
                force: true,
            })
            .await
            .expect("delete");
            let mut a = cl.agent_client(1).await;
            while a
                .get_vps(apb::GetVpsRequest { name: name.clone() })
                .await
                .is_ok()
            {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            assert_eq!(bridge_mac(&cl, 1), mac, "cycle {k}: after the destroy");
        }
    })
    .await;
}

/// An address is free only once its node confirms the VPS gone: with n1's
/// agent down (its VPSes run on), a VPS of n1 deleted through the
/// controller keeps its address and name; back, n1 destroys it, and only
/// then may a new VPS get the address.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_vps_keeps_its_address_until_its_node_confirms_it_gone() {
    let _one = Cluster::lock().await;
    bounded(300, async {
        use ferry_proto::controller::v1 as cpb;
        let mut cl = Cluster::start(&[Role::Both, Role::Both, Role::Controller]).await;
        let (_, mut c) = cl.leader().await;
        let tag = format!("dl{}", std::process::id());
        let create = |name: &str, node: &str| cpb::CreateVpsRequest {
            spec: Some(spec(name, None, 32)),
            placement: Some(cpb::Placement {
                node: node.into(),
                ..Default::default()
            }),
            allocate_ip: true,
            ..Default::default()
        };
        let ip_of = |v: &cpb::ClusterVps| {
            v.spec
                .as_ref()
                .and_then(|s| s.net.as_ref())
                .map(|n| n.ip.clone())
                .unwrap_or_default()
        };
        let old = format!("{tag}old");
        let v = c
            .create_vps(create(&old, "n1"))
            .await
            .expect("create")
            .into_inner();
        let held = ip_of(&v);
        let v = record_when(&mut c, &old, |v| v.observed == "running").await;
        let mut a1 = cl.agent_client(1).await;
        let pid = on_agent(&mut a1, &old).await.init_pid;

        cl.agent(1).kill9();
        node_when(&mut c, "n1", "down", 20).await;
        c.delete_vps(cpb::DeleteVpsRequest {
            name: old.clone(),
            force: true,
        })
        .await
        .expect("delete");
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "the VPS runs on while its agent is down"
        );
        // Its address and name are held.
        let n = c
            .create_vps(create(&format!("{tag}new"), "n2"))
            .await
            .expect("create new")
            .into_inner();
        assert_ne!(
            ip_of(&n),
            held,
            "the address went to a new VPS: {n:?} (old {v:?})"
        );
        let e = c
            .create_vps(create(&old, "n2"))
            .await
            .expect_err("the name is held");
        assert!(
            e.message().contains("still being deleted"),
            "{}",
            e.message()
        );

        // n1 back: it destroys the VPS, confirms, and the address is free.
        cl.agent(1).restart();
        let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let r = c.create_vps(create(&old, "n2")).await;
            let e = match r {
                Ok(v) => {
                    assert_eq!(
                        ip_of(&v.into_inner()),
                        held,
                        "the freed address is the lowest"
                    );
                    break;
                }
                Err(e) => e,
            };
            assert!(
                std::time::Instant::now() < end,
                "never freed: {}{}",
                e.message(),
                cl.logs()
            );
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            assert!(
                std::time::Instant::now() < end,
                "n1 did not destroy the deleted VPS"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let said = events(&mut c)
            .await
            .iter()
            .any(|e| e.subject == old && e.message.contains("gone from n1"));
        assert!(said, "no event for the confirmation");
    })
    .await;
}
