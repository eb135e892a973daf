//! `ferryctl vps migrate` follows its migration to the end whatever happens
//! to the replica serving it: killed mid-move, the CLI picks the same
//! migration up by id on another replica and exits 0 with the downtime the
//! VPS really had; a migration that rolls back exits non-zero with the
//! reason. `vps show` lists the moves with their figures.

mod common;
use common::*;

use std::time::{Duration, Instant};

use ferry_cluster_tests::{Cluster, Role};
use ferry_proto::controller::v1 as cpb;

/// The controller host whose replica started migration of `name` (its log
/// says so), once one has.
async fn serving_replica(cl: &mut Cluster, name: &str) -> usize {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        for i in 1..=3 {
            let log = cl.controller(i).log_text();
            if log
                .lines()
                .any(|l| l.contains("migration started on the source agent") && l.contains(name))
            {
                return i;
            }
        }
        assert!(
            Instant::now() < end,
            "no replica started the migration{}",
            cl.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn downtime_in(text: &str) -> Option<u64> {
    text.split("downtime ")
        .nth(1)
        .and_then(|t| t.split(" ms").next())
        .and_then(|n| n.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_follows_its_migration_to_the_end_through_a_replica_death() {
    let _one = Cluster::lock().await;
    bounded(400, async {
        // The source stalls 3 s between the decision and the target's run:
        // the serving replica dies while the move is decided but not done.
        let mut cl = Cluster::start_with(
            &[Role::Both, Role::Both, Role::Both],
            &[(1, "FERRY_FAILPOINT", "commit-before-finish:3")],
        )
        .await;
        let (_, mut c) = cl.leader().await;
        let name = format!("mf{}", std::process::id());
        c.create_vps(cpb::CreateVpsRequest {
            spec: Some(spec(&name, None, 64)),
            allocate_ip: true,
            placement: Some(cpb::Placement {
                node: Cluster::node(1),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("create");
        record_when(&mut c, &name, |v| v.observed == "running").await;

        let mover = ferryctl_thread(
            &cl,
            &["vps", "migrate", &name, "--to", "n2", "--mode", "stop-copy"],
        );
        let serving = serving_replica(&mut cl, &name).await;
        cl.controller(serving).kill9();
        let (code, text) = tokio::task::spawn_blocking(move || mover.join())
            .await
            .expect("join")
            .expect("mover");
        eprintln!("replica {serving} killed mid-move; ferryctl said:\n{text}");
        assert_eq!(code, 0, "{text}{}", cl.logs());
        assert!(text.contains("following the migration by id"), "{text}");
        assert!(text.contains("migrated (stop-copy)"), "{text}");
        let said = downtime_in(&text).expect("a downtime figure");

        // The figure is the move's own, as its record keeps it.
        cl.controller(serving).restart();
        let (_, mut c) = cl.leader().await;
        let v = record_when(&mut c, &name, |v| {
            v.history.last().is_some_and(|h| h.ended_unix_ms != 0)
        })
        .await;
        let h = v.history.last().cloned().expect("a move on record");
        assert_eq!(
            (h.outcome.as_str(), h.target.as_str()),
            ("moved", "n2"),
            "{h:?}"
        );
        assert_eq!(h.downtime_ms, said, "{h:?}");
        assert!(
            said > 0 && h.phases.iter().any(|p| p.phase == "restore"),
            "{h:?}"
        );

        // A move that rolls back: its target's agent is frozen (not yet
        // marked down), so the source cannot reach it. The CLI exits
        // non-zero and says why.
        cl.agent(3).stop();
        let (code, out, err) =
            cl.ferryctl(&["vps", "migrate", &name, "--to", "n3", "--mode", "stop-copy"]);
        cl.agent(3).cont();
        let text = format!("{out}{err}");
        eprintln!("rolled back move; ferryctl said:\n{text}");
        assert_ne!(code, 0, "{text}");
        assert!(text.contains(&Cluster::agent_addr(3)), "{text}");

        // `vps show` lists both moves.
        let v = record_when(&mut c, &name, |v| {
            v.history.len() == 2 && v.history[1].ended_unix_ms != 0
        })
        .await;
        assert_eq!(v.node, "n2");
        assert_eq!(v.history[1].outcome, "rolled back", "{:?}", v.history[1]);
        let (code, out, err) = cl.ferryctl(&["vps", "show", &name]);
        assert_eq!(code, 0, "{err}");
        eprintln!("{out}");
        assert!(out.contains("Moves (oldest first):"), "{out}");
        assert!(
            out.contains(&format!(
                "{} n1 → n2 (stop-copy): moved; downtime {said} ms",
                h.id
            )),
            "{out}"
        );
        assert!(
            out.contains(&format!(
                "{} n2 → n3 (stop-copy): rolled back",
                v.history[1].id
            )),
            "{out}"
        );

        // Post-copy: its record counts the pages that came on demand.
        let (code, out, err) =
            cl.ferryctl(&["vps", "migrate", &name, "--to", "n1", "--mode", "post-copy"]);
        assert_eq!(code, 0, "{out}{err}");
        let v = record_when(&mut c, &name, |v| {
            v.history.len() == 3 && v.history[2].ended_unix_ms != 0
        })
        .await;
        let post = v.history[2]
            .phases
            .iter()
            .find(|p| p.phase == "post-copy")
            .cloned()
            .expect("a post-copy phase");
        eprintln!("{out}post-copy phase on record: {post:?}");
        assert!(post.bytes > 0, "{:?}", v.history[2]);
        assert!(out.contains("came on demand"), "{out}");
    })
    .await;
}
