//! A cluster with mutual TLS on every channel, set up the way an operator
//! does it: `--init` makes the CA, replicas and nodes join with single-use
//! tokens, operators get role-bound bundles. A VPS lives-migrates between
//! two TLS nodes (agent to agent, node certificates). Then every refusal the
//! issue names, each with its status and nothing changed.

mod common;
use std::time::Duration;

use common::cluster::*;
use common::*;
use ferry_proto::addr::{self, Addr};
use ferry_proto::agent::v1 as apb;
use ferry_proto::controller::v1 as cpb;
use ferry_proto::tls::pki::{CONTROLLER_SERVER_NAME, NODE_SERVER_NAME};
use ferry_proto::tls::{ClientTls, Credentials};
use tonic::Code;

/// `ferryctl` with its own credentials bundle.
fn ferryctl_as(
    creds: &std::path::Path,
    flag: &str,
    addr: &str,
    args: &[&str],
) -> (i32, String, String) {
    let mut all = vec!["--credentials", creds.to_str().unwrap_or_default()];
    all.extend_from_slice(args);
    run_ferryctl(flag, addr, &all)
}

async fn controller_as(
    creds: &Credentials,
    sock: &std::path::Path,
) -> cpb::controller_service_client::ControllerServiceClient<tonic::transport::Channel> {
    let t = ClientTls::new(creds, CONTROLLER_SERVER_NAME).expect("tls");
    let ch = addr::connect_with(&Addr::Unix(sock.to_path_buf()), Some(&t))
        .await
        .expect("connect");
    ferry_proto::limits::controller_client(ch)
}

async fn agent_as(
    creds: &Credentials,
    h: &Host,
) -> apb::agent_service_client::AgentServiceClient<tonic::transport::Channel> {
    let t = ClientTls::new(creds, NODE_SERVER_NAME).expect("tls");
    let ch = addr::connect_with(&Addr::Unix(h.sock()), Some(&t))
        .await
        .expect("connect");
    ferry_proto::limits::agent_client(ch)
}

async fn count(
    c: &mut apb::agent_service_client::AgentServiceClient<tonic::transport::Channel>,
    name: &str,
) -> u64 {
    exec(c, name, &["cat", "/counter"])
        .await
        .stdout
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Waits until the controller sees `name` running on `node`.
async fn wait_placed(
    c: &mut cpb::controller_service_client::ControllerServiceClient<tonic::transport::Channel>,
    name: &str,
    node: &str,
) {
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(v) = c.get_vps(cpb::GetVpsRequest { name: name.into() }).await {
            let v = v.into_inner();
            if v.node == node && v.observed == "running" && v.migration.is_none() {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < end,
            "{name} never ran on {node}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tls_cluster_joins_migrates_and_refuses_every_wrong_caller() {
    bounded(300, async {
        let ctl = Controllers::start_tls().await;
        let mut c = ctl.client(0).await;
        let status = c
            .cluster_status(cpb::ClusterStatusRequest {})
            .await
            .expect("admin reads the status")
            .into_inner();
        assert_eq!(
            status.members.len(),
            3,
            "replicas joined with tokens: {status:?}"
        );

        // Nodes join with single-use tokens.
        let lan = Lan::new();
        let a = Host::on_lan(&lan, "10.77.0.51/16", ctl.join_args("tls-a").await).await;
        let b = Host::on_lan(&lan, "10.77.0.52/16", ctl.join_args("tls-b").await).await;
        wait_node(&mut c, "tls-a", "ready", 20).await;
        wait_node(&mut c, "tls-b", "ready", 20).await;
        let a_creds = Credentials::load(&a.data_dir().join("pki/node.pem")).expect("node.pem");
        assert_eq!(
            a_creds.identity().expect("identity").role,
            ferry_proto::tls::Role::Node("tls-a".into())
        );

        // A VPS placed on tls-a, live-migrated to tls-b: the controller orders
        // over TLS, the agents move it to each other with node certificates.
        let name = format!("tl{}", std::process::id());
        let (code, out, err) = ctl.ferryctl(&[
            "vps",
            "create",
            &name,
            "--ip",
            "10.77.8.10",
            "--memory",
            "64M",
            "--node",
            "tls-a",
            "--start",
        ]);
        assert_eq!(code, 0, "{out}{err}");
        wait_placed(&mut c, &name, "tls-a").await;
        let mut ca = a.client().await;
        spawn_in(
            &mut ca,
            &name,
            "i=0; while true; do i=$((i+1)); echo $i > /counter; sleep 0.1; done",
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = count(&mut ca, &name).await;
        assert!(before > 0, "the counter runs");
        let (code, out, err) = ctl.ferryctl(&["vps", "migrate", &name, "--to", "tls-b"]);
        assert_eq!(
            code,
            0,
            "{out}{err}\nA: {}\nB: {}",
            a.agent_log(),
            b.agent_log()
        );
        assert!(out.contains("migrated"), "{out}");
        wait_placed(&mut c, &name, "tls-b").await;
        let mut cb = b.client().await;
        wait_for(&mut cb, &name, 30, "running on tls-b", running).await;
        // The counting process itself came along: it goes on from where it was.
        let after = count(&mut cb, &name).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let later = count(&mut cb, &name).await;
        assert!(after >= before && later > after, "{before} {after} {later}");

        // Back by post-copy: the memory comes through the page tunnel, which
        // speaks mutual TLS with the nodes' certificates too.
        let (code, out, err) = ctl.ferryctl(&[
            "vps",
            "migrate",
            &name,
            "--to",
            "tls-a",
            "--mode",
            "post-copy",
        ]);
        assert_eq!(
            code,
            0,
            "{out}{err}\nA: {}\nB: {}",
            a.agent_log(),
            b.agent_log()
        );
        assert!(out.contains("post-copy"), "{out}");
        wait_placed(&mut c, &name, "tls-a").await;
        let after = count(&mut ca, &name).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let later2 = count(&mut ca, &name).await;
        assert!(after >= later && later2 > after, "{later} {after} {later2}");
        assert!(
            b.agent_log().contains("page tunnel listening, mutual TLS"),
            "{}",
            b.agent_log()
        );
        assert!(
            a.agent_log().contains("page tunnel dialled, mutual TLS"),
            "{}",
            a.agent_log()
        );

        // A used token, an expired one: nothing joins.
        let used = ctl.token(cpb::JoinKind::Node).await;
        let scratch = tempfile::tempdir().expect("tempdir");
        let join = |token: &str, node: &str| {
            let d = scratch.path().join(node);
            std::process::Command::new(AGENT)
                .args(["--listen", &format!("unix:{}/s.sock", d.display())])
                .args(["--data-dir", &d.join("data").to_string_lossy()])
                .args(["--run-dir", &d.join("run").to_string_lossy()])
                .args([
                    "--controller",
                    &ctl.addrs(),
                    "--node-name",
                    node,
                    "--join",
                    token,
                ])
                .output()
                .expect("agent")
        };
        let mut ctl0 = ctl.client(0).await;
        let third = ferry_proto::tls::join::join(
            &Addr::Unix(ctl.sock(0)),
            &used,
            cpb::JoinKind::Node,
            "tls-c",
        )
        .await
        .expect("a fresh token joins");
        let o = join(&used, "tls-d");
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("already used"), "{e}");
        let short = ctl0
            .create_join_token(cpb::CreateJoinTokenRequest {
                kind: cpb::JoinKind::Node as i32,
                ttl_secs: 1,
            })
            .await
            .expect("token")
            .into_inner()
            .token;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let o = join(&short, "tls-e");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains("expired"), "{e}");
        // A made-up secret with this cluster's (public) CA fingerprint.
        let fp = ferry_proto::tls::pki::fingerprint(
            &ferry_proto::tls::pki::pem_der(&third.creds.ca_pem).expect("ca"),
        );
        let forged = format!("ferry1.{fp}.{}", "ab".repeat(32));
        let o = join(&forged, "tls-f");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains("token: unknown"), "{e}");
        // A token for a name already registered, even a fresh one.
        let fresh = ctl.token(cpb::JoinKind::Node).await;
        let o = join(&fresh, "tls-a");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && e.contains("registered already"),
            "{e}"
        );

        // A node speaks only for itself, and only to what nodes may call.
        let mut as_a = controller_as(&a_creds, &ctl.sock(0)).await;
        let e = as_a
            .heartbeat(cpb::HeartbeatRequest {
                node: "tls-b".into(),
                ..Default::default()
            })
            .await
            .expect_err("tls-a spoke for tls-b");
        assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
        let e = as_a
            .list_vps(cpb::ListVpsRequest::default())
            .await
            .expect_err("a node listed VPSes");
        assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
        // Raft only from replicas.
        let raft = |creds: Credentials| {
            let sock = ctl.sock(0);
            async move {
                let t = ClientTls::new(&creds, CONTROLLER_SERVER_NAME).expect("tls");
                let ch = addr::connect_with(&Addr::Unix(sock), Some(&t))
                    .await
                    .expect("connect");
                ferry_proto::limits::raft_client(ch)
                    .vote(cpb::RaftPayload {
                        json: b"{}".to_vec(),
                    })
                    .await
            }
        };
        let admin = Credentials::load(&ctl.admin_pem()).expect("admin");
        for who in [a_creds.clone(), admin.clone()] {
            let e = raft(who).await.expect_err("a non-member spoke Raft");
            assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
        }

        // A client that knows whom it dials (a controller does) checks that
        // node's own name: tls-b's agent cannot pass for tls-a's.
        let named = |node: &str| {
            ClientTls::new(&admin, NODE_SERVER_NAME)
                .expect("tls")
                .for_server(&ferry_proto::tls::pki::node_server_name(node))
        };
        for (node, ok) in [("tls-a", false), ("tls-b", true)] {
            let t = named(node);
            let r = match addr::connect_with(&Addr::Unix(b.sock()), Some(&t)).await {
                Ok(ch) => ferry_proto::limits::agent_client(ch)
                    .get_node(apb::GetNodeRequest {})
                    .await
                    .is_ok(),
                Err(_) => false,
            };
            assert_eq!(r, ok, "tls-b's agent dialled as {node}");
        }

        // An agent takes orders from controllers and admins, not nodes; a
        // node may push only into a migration it prepared itself.
        let mut a_to_b = agent_as(&a_creds, &b).await;
        let e = a_to_b
            .exec(apb::ExecRequest {
                name: name.clone(),
                argv: vec!["true".into()],
                ..Default::default()
            })
            .await
            .expect_err("a node ran a command on another node");
        assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
        let mid = format!("tlsm{}", std::process::id());
        a_to_b
            .migrate_prepare(apb::MigratePrepareRequest {
                migration_id: mid.clone(),
                spec: Some(spec(&format!("{name}x"), None)),
                live: false,
                ..Default::default()
            })
            .await
            .expect("tls-a prepares a migration into tls-b");
        let mut c_to_b = agent_as(&third.creds, &b).await;
        let chunk = apb::MigrateChunk {
            migration_id: mid.clone(),
            area: "rootfs".into(),
            items: Vec::new(),
        };
        let e = c_to_b
            .migrate_push(futures::stream::iter(vec![chunk]))
            .await
            .expect_err("another node pushed into tls-a's migration");
        assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
        let e = c_to_b
            .migrate_finish(apb::MigrateFinishRequest {
                migration_id: mid.clone(),
                commit: true,
                generation: 0,
            })
            .await
            .expect_err("another node finished tls-a's migration");
        assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
        a_to_b
            .migrate_finish(apb::MigrateFinishRequest {
                migration_id: mid,
                commit: false,
                generation: 0,
            })
            .await
            .expect("tls-a aborts its own migration");

        // Operators: a viewer reads and may not write; revoked, it may do
        // nothing, on controllers at once.
        let viewer = ctl.dir.path().join("viewer.pem");
        let (code, out, err) = ctl.ferryctl(&[
            "user",
            "add",
            "vic",
            "--role",
            "viewer",
            "--out",
            viewer.to_str().unwrap_or_default(),
        ]);
        assert_eq!(code, 0, "{out}{err}");
        let addrs = ctl.addrs();
        let (code, out, err) = ferryctl_as(&viewer, "--controller", &addrs, &["vps", "ls"]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains(&name), "{out}");
        let (code, _, err) = ferryctl_as(
            &viewer,
            "--controller",
            &addrs,
            &["node", "cordon", "tls-a"],
        );
        assert!(code != 0 && err.contains("PermissionDenied"), "{err}");
        // On an agent too: a viewer reads there.
        let agent_b = format!("unix:{}", b.sock().display());
        let (code, out, err) = ferryctl_as(&viewer, "--agent", &agent_b, &["vps", "ls"]);
        assert_eq!(code, 0, "{out}{err}");
        let (code, out, err) = ctl.ferryctl(&["user", "revoke", "vic"]);
        assert_eq!(code, 0, "{out}{err}");
        for i in 0..3 {
            let one = format!("unix:{}", ctl.sock(i).display());
            let end = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let (code, _, err) = ferryctl_as(&viewer, "--controller", &one, &["vps", "ls"]);
                if code != 0 && err.contains("revoked") {
                    break;
                }
                assert!(
                    std::time::Instant::now() < end,
                    "replica {i} still serves a revoked viewer: {err}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // The agents learn it with their next heartbeat answer.
        let end = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (code, _, err) = ferryctl_as(&viewer, "--agent", &agent_b, &["vps", "ls"]);
            if code != 0 && err.contains("revoked") {
                break;
            }
            assert!(
                std::time::Instant::now() < end,
                "tls-b still serves a revoked viewer: {err}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // No certificate: refused with a status, not served.
        let anon = ClientTls::pinned(
            &ferry_proto::tls::pki::fingerprint(
                &ferry_proto::tls::pki::pem_der(&admin.ca_pem).expect("ca"),
            ),
            CONTROLLER_SERVER_NAME,
        )
        .expect("tls");
        let ch = addr::connect_with(&Addr::Unix(ctl.sock(0)), Some(&anon))
            .await
            .expect("connect");
        let e = ferry_proto::limits::controller_client(ch)
            .list_vps(cpb::ListVpsRequest::default())
            .await
            .expect_err("no certificate was served");
        assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
        // ferryctl without credentials gets nothing.
        let (code, _, _) = run_ferryctl("--controller", &addrs, &["vps", "ls"]);
        assert_ne!(code, 0);
        // Nothing of the refusals changed the cluster: the VPS still runs on tls-b.
        let v = ctl0
            .get_vps(cpb::GetVpsRequest { name: name.clone() })
            .await
            .expect("get")
            .into_inner();
        assert_eq!((v.node.as_str(), v.observed.as_str()), ("tls-a", "running"));
        // The first admin, made by --init, can be revoked too (last: this
        // test speaks as it).
        let (code, out, err) = ctl.ferryctl(&["user", "revoke", "admin"]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("1 certificate"), "{out}");
        let (code, _, err) = ctl.ferryctl(&["node", "ls"]);
        assert!(code != 0 && err.contains("revoked"), "{err}");
    })
    .await;
}
