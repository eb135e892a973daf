//! A three-voter controller cluster over real sockets.

mod common;
use std::time::{Duration, Instant};

use common::*;
use ferry_proto::controller::v1 as cpb;

#[tokio::test(flavor = "multi_thread")]
async fn leader_failover_keeps_every_acknowledged_write_and_restart_restores_all() {
    let mut cl = Cluster::start(3).await;
    let st = cl.status(0).await.unwrap();
    assert_eq!(
        st.members.iter().filter(|m| m.role == "voter").count(),
        3,
        "{st:?}"
    );
    let ids: Vec<u64> = st.members.iter().map(|m| m.id).collect();
    assert_eq!(ids, [1, 2, 3]);

    // Writes through every replica (followers forward to the leader).
    let mut acked = Vec::new();
    for i in 0..30 {
        let mut c = cl.replicas[i % 3].client().await;
        c.register_node(node_req(&format!("n{i}"), 1000 + i as u16))
            .await
            .expect("write");
        acked.push(format!("n{i}"));
    }

    let leader = cl.leader(&[0, 1, 2]).await;
    cl.replicas[leader].kill();
    let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let killed_at = Instant::now();
    // The first write accepted after the kill, through a survivor.
    let mut c = cl.replicas[survivors[0]].client().await;
    loop {
        match c.register_node(node_req("after-failover", 2000)).await {
            Ok(_) => break,
            Err(e) => assert!(
                killed_at.elapsed() < Duration::from_secs(10),
                "no write accepted: {e}"
            ),
        }
    }
    let failover = killed_at.elapsed();
    println!("leader killed -> first accepted write: {failover:?}");
    acked.push("after-failover".into());
    let new_leader = cl.leader(&survivors).await;
    assert_ne!(new_leader, leader);

    // No acknowledged write is lost, on either survivor.
    for &i in &survivors {
        let mut c = cl.replicas[i].client().await;
        let nodes = list_nodes(&mut c).await;
        for name in &acked {
            assert!(
                nodes.iter().any(|n| &n.name == name),
                "{name} lost on replica {i}"
            );
        }
    }

    // The old leader comes back as a follower and catches up.
    cl.replicas[leader].spawn(false);
    let mut c = cl.replicas[leader].client().await;
    let nodes = list_nodes(&mut c).await;
    assert_eq!(nodes.len(), acked.len());

    // All three down, all three back: the full state comes from disk.
    for r in &mut cl.replicas {
        r.kill();
    }
    for r in &mut cl.replicas {
        r.spawn(false);
    }
    let mut c = cl.replicas[0].client().await;
    wait_leader(&mut c).await;
    let nodes = list_nodes(&mut c).await;
    let missing: Vec<&String> = acked
        .iter()
        .filter(|a| !nodes.iter().any(|n| &n.name == *a))
        .collect();
    assert!(missing.is_empty(), "lost in a full restart: {missing:?}");
    assert_eq!(nodes.len(), acked.len(), "state after a full restart");
    let st = cl.status(0).await.unwrap();
    assert_eq!(st.members.len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn member_ids_are_never_reused() {
    let mut cl = Cluster::start(3).await;
    let mut c = cl.replicas[0].client().await;
    let st = c
        .remove_member(cpb::RemoveMemberRequest { id: 3 })
        .await
        .expect("remove")
        .into_inner();
    assert!(!st.members.iter().any(|m| m.id == 3), "{st:?}");
    cl.replicas[2].kill();
    // A new replica at a new address gets a new id.
    let mut r = Replica::new(cl.replicas[2].dir.with_file_name("c3"));
    r.spawn(false);
    let _ = r.client().await;
    let st = c
        .add_member(cpb::AddMemberRequest {
            addr: r.addr.clone(),
        })
        .await
        .expect("add")
        .into_inner();
    let ids: Vec<u64> = st.members.iter().map(|m| m.id).collect();
    assert_eq!(ids, [1, 2, 4], "{st:?}");
    // Adding an address that is a member already is refused.
    let e = c
        .add_member(cpb::AddMemberRequest {
            addr: r.addr.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists);
    cl.replicas.push(r);
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_compact_the_log_and_bring_a_late_replica_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Replica::new(dir.path().join("c0"));
    first.spawn(true);
    let mut c = first.client().await;
    wait_leader(&mut c).await;
    // More entries than the snapshot interval (1000). One writer, one write at a
    // time: concurrent writes would be grouped into fewer entries.
    for i in 0..1100 {
        c.register_node(node_req(&format!("n{i}"), i as u16))
            .await
            .unwrap();
    }
    let st = c
        .cluster_status(cpb::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(st.snapshot_index >= 999, "no snapshot built: {st:?}");
    assert!(st.purged_index > 0, "log not compacted: {st:?}");

    // A replica added now cannot get the purged entries: it must install the snapshot.
    let mut late = Replica::new(dir.path().join("c1"));
    late.spawn(false);
    let _ = late.client().await;
    c.add_member(cpb::AddMemberRequest {
        addr: late.addr.clone(),
    })
    .await
    .expect("add");
    let mut l = late.client().await;
    let nodes = list_nodes(&mut l).await;
    assert_eq!(nodes.len(), 1100);
    let st = l
        .cluster_status(cpb::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        st.snapshot_index >= 999,
        "the late replica did not install a snapshot: {st:?}"
    );
    // And it survives a restart from its own disk.
    late.kill();
    late.spawn(false);
    let mut l = late.client().await;
    let nodes = list_nodes(&mut l).await;
    assert_eq!(nodes.len(), 1100);
    first.kill();
}
