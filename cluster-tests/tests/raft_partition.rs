//! A controller replica partitioned from the other two (a real network
//! partition on the harness, not a stopped process): it neither commits a
//! write nor serves a read, stale or not, while the majority goes on; healed,
//! it has the majority's writes and not its own refused one.

mod common;
use common::*;

use std::time::{Duration, Instant};

use ferry_cluster_tests::{Cluster, Role};
use ferry_proto::controller::v1 as cpb;

#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_replica_neither_commits_nor_serves_reads() {
    let _one = Cluster::lock().await;
    let run = async {
        let cl = Cluster::start(&[Role::Controller, Role::Controller, Role::Controller]).await;
        let (leader, mut c) = cl.leader().await;
        // The minority: a follower, so the majority keeps its leader.
        let minority = if leader == 1 { 2 } else { 1 };
        let majority: Vec<usize> = (1..=3).filter(|i| *i != minority).collect();
        c.register_node(node_req("before", 1)).await.expect("write");

        cl.partition(minority, &majority);
        for &i in &majority {
            cl.partition(i, &[minority]);
        }
        // The majority commits on.
        c.register_node(node_req("while-away", 2))
            .await
            .expect("the majority commits");
        // The minority refuses, and serves no read, stale or not.
        let mut m = cl.client_of(minority).await;
        // A refusal or no answer: nothing, stale or not, is served.
        let read = tokio::time::timeout(
            Duration::from_secs(15),
            m.get_node(cpb::GetNodeRequest {
                name: "before".into(),
            }),
        )
        .await;
        assert!(
            !matches!(read, Ok(Ok(_))),
            "a partitioned replica served a read: {read:?}"
        );
        let list = tokio::time::timeout(
            Duration::from_secs(15),
            m.list_nodes(cpb::ListNodesRequest {}),
        )
        .await;
        assert!(
            !matches!(list, Ok(Ok(_))),
            "a partitioned replica served a (stale) list: {list:?}"
        );
        let write = tokio::time::timeout(
            Duration::from_secs(15),
            m.register_node(node_req("from-minority", 3)),
        )
        .await;
        assert!(
            !matches!(write, Ok(Ok(_))),
            "a partitioned replica committed a write: {write:?}"
        );

        for i in 1..=3 {
            cl.unpartition(i);
        }
        let end = Instant::now() + Duration::from_secs(30);
        let nodes = loop {
            match m.list_nodes(cpb::ListNodesRequest {}).await {
                Ok(r) => break r.into_inner().nodes,
                Err(e) => assert!(Instant::now() < end, "no read after healing: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        assert!(names.contains(&"while-away"), "{names:?}");
        assert!(!names.contains(&"from-minority"), "{names:?}");
    };
    tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("test timed out");
}
