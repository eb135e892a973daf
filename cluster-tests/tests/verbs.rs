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
