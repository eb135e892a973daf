//! The controller's Raft group on hosts of their own, over mutual TLS: a
//! killed leader loses no acknowledged write and a full restart restores
//! everything from disk; member ids are never reused; snapshots compact the
//! log and bring a replica that joins late up to date.

mod common;
use common::*;

use std::time::{Duration, Instant};

use ferry_cluster_tests::cluster::Ctl;
use ferry_cluster_tests::{Cluster, Role};
use ferry_proto::controller::v1 as cpb;

async fn status(c: &mut Ctl) -> cpb::ClusterStatusResponse {
    c.cluster_status(cpb::ClusterStatusRequest {})
        .await
        .expect("cluster status")
        .into_inner()
}

/// The node list of replica `i` once it holds `n` nodes (it may still be
/// catching up).
async fn nodes_when(cl: &Cluster, i: usize, n: usize) -> Vec<cpb::Node> {
    let mut c = cl.client_of(i).await;
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let nodes = list_nodes(&mut c).await;
        if nodes.len() >= n {
            return nodes;
        }
        assert!(
            Instant::now() < end,
            "replica {i} holds {} of {n} nodes{}",
            nodes.len(),
            cl.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_leader_loses_no_acknowledged_write_and_a_full_restart_restores_all() {
    let _one = Cluster::lock().await;
    bounded(300, async {
        let mut cl = Cluster::start(&[Role::Controller, Role::Controller, Role::Controller]).await;
        let (_, mut c) = cl.leader().await;
        let st = status(&mut c).await;
        assert_eq!(
            st.members.iter().filter(|m| m.role == "voter").count(),
            3,
            "{st:?}"
        );
        let ids: Vec<u64> = st.members.iter().map(|m| m.id).collect();
        assert_eq!(ids, [1, 2, 3]);

        // Writes through every replica (followers forward to the leader).
        let mut acked = Vec::new();
        for k in 0..30 {
            let mut c = cl.client_of(1 + k % 3).await;
            c.register_node(node_req(&format!("w{k}"), 1000 + k as u16))
                .await
                .expect("write");
            acked.push(format!("w{k}"));
        }

        let (leader, _) = cl.leader().await;
        cl.controller(leader).kill9();
        let survivors: Vec<usize> = (1..=3).filter(|i| *i != leader).collect();
        let killed_at = Instant::now();
        // The first write accepted after the kill, through a survivor.
        let mut c = cl.client_of(survivors[0]).await;
        loop {
            match c.register_node(node_req("after-failover", 2000)).await {
                Ok(_) => break,
                Err(e) => {
                    assert!(
                        killed_at.elapsed() < Duration::from_secs(10),
                        "no write accepted: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        eprintln!(
            "leader killed -> first accepted write: {:?}",
            killed_at.elapsed()
        );
        acked.push("after-failover".into());
        let (new_leader, _) = cl.leader().await;
        assert_ne!(new_leader, leader);

        // No acknowledged write is lost, on either survivor.
        for &i in &survivors {
            let nodes = nodes_when(&cl, i, acked.len()).await;
            for name in &acked {
                assert!(
                    nodes.iter().any(|n| &n.name == name),
                    "{name} lost on replica {i}"
                );
            }
        }

        // The old leader comes back as a follower and catches up.
        cl.controller(leader).restart();
        let nodes = nodes_when(&cl, leader, acked.len()).await;
        assert_eq!(nodes.len(), acked.len());

        // All three down, all three back: the full state comes from disk.
        for i in 1..=3 {
            cl.controller(i).kill9();
        }
        for i in 1..=3 {
            cl.controller(i).restart();
        }
        let (_, mut c) = cl.leader().await;
        let nodes = list_nodes(&mut c).await;
        let missing: Vec<&String> = acked
            .iter()
            .filter(|a| !nodes.iter().any(|n| &n.name == *a))
            .collect();
        assert!(missing.is_empty(), "lost in a full restart: {missing:?}");
        assert_eq!(nodes.len(), acked.len(), "state after a full restart");
        assert_eq!(status(&mut c).await.members.len(), 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn member_ids_are_never_reused() {
    let _one = Cluster::lock().await;
    bounded(180, async {
        let mut cl = Cluster::start(&[
            Role::Controller,
            Role::Controller,
            Role::Controller,
            Role::Spare,
        ])
        .await;
        let (leader, mut c) = cl.leader().await;
        // Remove a follower (the replica on host i has id i: they joined in
        // that order).
        let gone = (1..=3).rev().find(|i| *i != leader).unwrap_or(3);
        let st = c
            .remove_member(cpb::RemoveMemberRequest { id: gone as u64 })
            .await
            .expect("remove")
            .into_inner();
        assert!(!st.members.iter().any(|m| m.id == gone as u64), "{st:?}");
        cl.controller(gone).kill9();

        // A new replica at a new address gets a new id, not the removed one.
        cl.join_controller(4).await;
        let (_, mut c) = cl.leader().await;
        let mut ids: Vec<u64> = status(&mut c).await.members.iter().map(|m| m.id).collect();
        ids.sort_unstable();
        let mut want: Vec<u64> = (1..=3u64).filter(|i| *i != gone as u64).collect();
        want.push(4);
        assert_eq!(ids, want);
        // Adding an address that is a member already is refused.
        let e = c
            .add_member(cpb::AddMemberRequest {
                addr: Cluster::controller_addr(4),
            })
            .await
            .expect_err("a member already");
        assert_eq!(e.code(), tonic::Code::AlreadyExists, "{}", e.message());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_compact_the_log_and_bring_a_late_replica_up() {
    let _one = Cluster::lock().await;
    bounded(300, async {
        let mut cl = Cluster::start(&[Role::Controller, Role::Spare]).await;
        let mut c = cl.client_of(1).await;
        // More entries than the snapshot interval (1000). One writer, one
        // write at a time: concurrent writes would be grouped into fewer
        // entries.
        for k in 0..1100 {
            c.register_node(node_req(&format!("w{k}"), k as u16))
                .await
                .expect("write");
        }
        let st = status(&mut c).await;
        assert!(st.snapshot_index >= 999, "no snapshot built: {st:?}");
        assert!(st.purged_index > 0, "log not compacted: {st:?}");

        // A replica added now cannot get the purged entries: it must install
        // the snapshot.
        cl.join_controller(2).await;
        assert_eq!(nodes_when(&cl, 2, 1100).await.len(), 1100);
        let mut l = cl.client_of(2).await;
        let st = status(&mut l).await;
        assert!(
            st.snapshot_index >= 999,
            "the late replica did not install a snapshot: {st:?}"
        );
        // And it comes back from its own disk.
        cl.controller(2).kill9();
        cl.controller(2).restart();
        assert_eq!(nodes_when(&cl, 2, 1100).await.len(), 1100);
    })
    .await;
}
