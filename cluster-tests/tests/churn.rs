//! Migration churn as an operator would cause it: six VPSes serving counters,
//! each moved back and forth between two nodes ten times with `ferryctl vps
//! migrate`, two moves at a time, the modes taking turns. Every move must
//! carry the running VPS over (its counter, kept only in a shell's memory,
//! goes on from where it was; a fresh boot would have no counter loop), the
//! checker must never see a VPS run twice, and once the VPSes are destroyed
//! neither node may hold anything of them: no process, dir, scratch dir,
//! image, mount, cgroup or veth.

mod common;
use common::*;

use std::time::Duration;

use ferry_cluster_tests::checker::Checker;
use ferry_cluster_tests::{Cluster, Role};
use ferry_proto::agent::v1 as apb;

const VPSES: usize = 6;
const ROUNDS: usize = 10;
const MODES: [&str; 3] = ["stop-copy", "post-copy", "auto"];

#[tokio::test(flavor = "multi_thread")]
async fn six_vpses_moved_back_and_forth_ten_times_keep_running_and_leave_nothing() {
    let _one = Cluster::lock().await;
    bounded(900, async {
        let cl = Cluster::start(&[Role::Both, Role::Both, Role::Controller]).await;
        let (_, mut c) = cl.leader().await;
        let tag = format!("ch{}", std::process::id());
        let vpses = counting_vpses_on(&cl, &mut c, 1, &tag, 7, VPSES).await;
        let checker = Checker::start(agents(2), None, vpses.clone());

        let mut moves = 0;
        for round in 0..ROUNDS {
            // Round 0 goes n1 → n2, round 1 back, and so on.
            let (from, to) = if round % 2 == 0 { (1, 2) } else { (2, 1) };
            let mode = MODES[round % MODES.len()];
            for pair in vpses.chunks(2) {
                let mut before = Vec::new();
                for (_, ip) in pair {
                    before.push(counter(ip).await.unwrap_or(0));
                }
                let to_node = Cluster::node(to);
                let movers: Vec<_> = pair
                    .iter()
                    .map(|(name, _)| {
                        ferryctl_thread(
                            &cl,
                            &["vps", "migrate", name, "--to", &to_node, "--mode", mode],
                        )
                    })
                    .collect();
                for ((name, ip), (mover, n0)) in pair.iter().zip(movers.into_iter().zip(before)) {
                    let (code, text) = tokio::task::spawn_blocking(move || mover.join())
                        .await
                        .expect("join")
                        .expect("mover");
                    assert_eq!(
                        code,
                        0,
                        "round {round}: {name} n{from} -> {to_node} ({mode}): {text}{}",
                        cl.logs()
                    );
                    assert!(text.contains("migrated ("), "{text}");
                    // The running VPS came along: its counter goes on from
                    // where it was.
                    let mut n1 = 0;
                    for _ in 0..30 {
                        n1 = counter(ip).await.unwrap_or(0);
                        if n1 > n0 {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    assert!(
                        n1 > n0,
                        "round {round}: {name}'s counter went {n0} -> {n1} after its move to \
                         {to_node}: not the running VPS{}",
                        cl.logs()
                    );
                    moves += 1;
                }
            }
            for (name, _) in &vpses {
                let v = record_when(&mut c, name, |v| v.observed == "running").await;
                assert_eq!(v.node, Cluster::node(to), "round {round}: {v:?}");
            }
        }
        assert_eq!(moves, VPSES * ROUNDS);
        let samples = checker.finish().await;
        eprintln!("{moves} moves; the checker took {samples} samples and saw no double run");

        for (name, _) in &vpses {
            let (code, _, err) = cl.ferryctl(&["vps", "destroy", name, "--force"]);
            assert_eq!(code, 0, "destroy {name}: {err}");
        }
        // Gone from both agents' own lists, then nothing of them anywhere.
        for i in [1, 2] {
            let mut a = cl.agent_client(i).await;
            let end = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let left: Vec<String> = a
                    .list_vps(apb::ListVpsRequest {})
                    .await
                    .expect("list")
                    .into_inner()
                    .vps
                    .into_iter()
                    .filter_map(|v| v.spec.map(|s| s.name))
                    .filter(|n| n.starts_with(&tag))
                    .collect();
                if left.is_empty() {
                    break;
                }
                assert!(
                    std::time::Instant::now() < end,
                    "n{i} still lists {left:?}{}",
                    cl.logs()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let mut residue = cl.residue(i);
            for _ in 0..50 {
                if residue.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                residue = cl.residue(i);
            }
            assert!(residue.is_empty(), "n{i} holds after destroy: {residue:#?}");
        }
    })
    .await;
}
