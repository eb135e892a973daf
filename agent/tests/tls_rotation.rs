//! Certificates rotate before they expire, without a restart: with daemon
//! certificates valid 30 s, every replica and node renews its own (at a third
//! left) and the cluster goes on working past the first ones' expiry, on new
//! connections (which would refuse an expired certificate).

mod common;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::*;
use ferry_proto::controller::v1 as cpb;
use ferry_proto::tls::Credentials;

const VALIDITY_SECS: u64 = 30;

fn fingerprint(path: &std::path::Path) -> String {
    Credentials::load(path)
        .and_then(|c| c.identity())
        .map(|i| i.fingerprint)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn daemons_renew_their_certificates_without_a_restart() {
    bounded(150, async {
        // Inherited by the controllers and agents this test starts.
        std::env::set_var("FERRY_CERT_VALIDITY_SECS", VALIDITY_SECS.to_string());
        let started = Instant::now();
        let ctl = Controllers::start_tls().await;
        let mut c = ctl.client(0).await;
        let lan = Lan::new();
        let a = Host::on_lan(&lan, "10.77.0.71/16", ctl.join_args("rot-a").await).await;
        wait_node(&mut c, "rot-a", "ready", 20).await;
        let node_pem = a.data_dir().join("pki/node.pem");
        let replica_pem = ctl.dir.path().join("c1/pki/controller.pem");
        let (node0, replica0) = (fingerprint(&node_pem), fingerprint(&replica_pem));
        assert!(!node0.is_empty() && !replica0.is_empty());

        // Past the first certificates' lifetime, with margin.
        let end = started + Duration::from_secs(VALIDITY_SECS + 8);
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_ne!(
            fingerprint(&node_pem),
            node0,
            "the node never renewed: {}",
            a.agent_log()
        );
        assert_ne!(
            fingerprint(&replica_pem),
            replica0,
            "replica 1 never renewed: {}",
            ctl.log(1)
        );
        assert!(
            a.agent_log().contains("certificate renewed"),
            "{}",
            a.agent_log()
        );

        // Every new connection is made with the renewed certificates: each
        // replica answers, Raft still has a leader, the node heartbeats, and
        // the agent serves an admin.
        for i in 0..3 {
            let s = ctl
                .client(i)
                .await
                .cluster_status(cpb::ClusterStatusRequest {})
                .await
                .unwrap_or_else(|e| panic!("replica {i}: {}\n{}", e.message(), ctl.log(i)))
                .into_inner();
            assert_ne!(s.leader_id, 0, "replica {i} knows no leader");
        }
        let mut c = ctl.client(0).await;
        wait_node(&mut c, "rot-a", "ready", 10).await;
        let n = c
            .get_node(cpb::GetNodeRequest {
                name: "rot-a".into(),
            })
            .await
            .expect("node")
            .into_inner();
        let age = ferry_proto::tls::pki::validity(
            &Credentials::load(&node_pem).expect("node.pem").cert_pem,
        )
        .expect("validity");
        assert!(
            n.last_heartbeat_unix_ms / 1000 > age.0,
            "no heartbeat since the renewal"
        );
        let mut ac = a.client().await;
        ac.get_node(ferry_proto::agent::v1::GetNodeRequest {})
            .await
            .expect("the agent serves with its renewed certificate");
    })
    .await;
}
