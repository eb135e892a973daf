//! ferryctl against a list of controller replicas when some of them fail:
//! writes carry request ids, so one whose replica died is retried on another
//! and answers what really happened; a replica cut off the network costs a
//! call nothing (replicas are dialled in parallel).

mod common;
use common::*;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_cluster_tests::cluster::run;
use ferry_cluster_tests::{Cluster, Role};
use ferry_proto::controller::v1 as cpb;

const CREATES: usize = 300;
const AT_ONCE: usize = 16;

/// Every VPS the cluster holds whose name starts with `prefix`.
async fn names_with(cl: &Cluster, prefix: &str) -> BTreeSet<String> {
    let (_, mut c) = cl.leader().await;
    c.list_vps(cpb::ListVpsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .vps
        .into_iter()
        .filter_map(|v| v.spec.map(|s| s.name))
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Kills the leader (-9) once `done` creates have answered, then brings it
/// back so the next kill still leaves a quorum.
async fn kill_leader_after(cl: &mut Cluster, done: &AtomicUsize, after: usize) -> usize {
    while done.load(Ordering::SeqCst) < after {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (i, _) = cl.leader().await;
    cl.controller(i).kill9();
    let at = done.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    cl.controller(i).restart();
    at
}

#[tokio::test(flavor = "multi_thread")]
async fn creates_answer_what_happened_while_the_leader_is_killed_twice() {
    let _one = Cluster::lock().await;
    bounded(600, async {
        let mut cl = Cluster::start(&[Role::Both, Role::Both, Role::Both]).await;
        let prefix = format!("rq{}-", std::process::id());
        let queue: Vec<(String, std::process::Command)> = (0..CREATES)
            .map(|i| {
                let name = format!("{prefix}{i}");
                let all = cl.controllers();
                let cmd = cl.ferryctl_cmd(&[
                    "--controller",
                    &all,
                    "vps",
                    "create",
                    &name,
                    "--memory",
                    "16M",
                ]);
                (name, cmd)
            })
            .collect();
        let queue = Arc::new(Mutex::new(queue));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..AT_ONCE)
            .map(|_| {
                let (queue, answers, done) = (queue.clone(), answers.clone(), done.clone());
                std::thread::spawn(move || loop {
                    let next = queue.lock().unwrap().pop();
                    let Some((name, cmd)) = next else { return };
                    let t = Instant::now();
                    let (code, out, err) = run(cmd);
                    answers
                        .lock()
                        .unwrap()
                        .push((name, code, out + &err, t.elapsed()));
                    done.fetch_add(1, Ordering::SeqCst);
                })
            })
            .collect();

        let first = kill_leader_after(&mut cl, &done, CREATES / 3).await;
        let second = kill_leader_after(&mut cl, &done, 2 * CREATES / 3).await;
        for w in workers {
            w.join().expect("worker");
        }
        // The kills came while creates were still being sent.
        assert!(first < CREATES && second < CREATES, "{first} {second}");

        let answers = answers.lock().unwrap().clone();
        assert_eq!(answers.len(), CREATES);
        let mut ok = BTreeSet::new();
        let mut slowest = Duration::ZERO;
        for (name, code, text, took) in &answers {
            slowest = slowest.max(*took);
            // A definite answer: success, or an error that is not "unknown".
            assert!(
                !text.contains("unknown") && !text.contains("may or may not"),
                "{name}: an answer that is not definite: {text}"
            );
            if *code == 0 {
                assert!(text.contains(&format!("created VPS {name} on ")), "{text}");
                ok.insert(name.clone());
            }
        }
        let failed: Vec<_> = answers.iter().filter(|a| a.1 != 0).collect();
        eprintln!(
            "{} of {CREATES} creates succeeded (leader killed after {first} and {second}); \
             slowest call {slowest:?}; failures: {failed:?}",
            ok.len()
        );
        // Every create names a VPS of its own and the nodes have room: each
        // one succeeds, retried through the kills.
        assert!(failed.is_empty(), "{failed:?}");
        // The cluster holds exactly the VPSes that answered success.
        assert_eq!(names_with(&cl, &prefix).await, ok);
    })
    .await;
}

/// Millisecond figures: min, median, max.
fn spread(mut v: Vec<Duration>) -> (u128, u128, u128) {
    v.sort();
    let ms = |d: Duration| d.as_millis();
    (ms(v[0]), ms(v[v.len() / 2]), ms(v[v.len() - 1]))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_cut_off_the_network_costs_a_call_nothing() {
    let _one = Cluster::lock().await;
    bounded(300, async {
        let cl = Cluster::start(&[Role::Controller, Role::Both, Role::Both]).await;
        // Host 1 is first in the list: the replica a client tried first.
        assert!(cl.controllers().starts_with(&Cluster::controller_addr(1)));
        cl.cut(1);
        // The other two have (or elect) a leader.
        let (leader, _) = cl.leader().await;
        assert_ne!(leader, 1);

        let mut ls = Vec::new();
        let mut creates = Vec::new();
        for k in 0..5 {
            let t = Instant::now();
            let (code, out, err) = cl.ferryctl(&["vps", "ls"]);
            ls.push(t.elapsed());
            assert_eq!(code, 0, "vps ls: {out}{err}");

            let name = format!("cut{}-{k}", std::process::id());
            let t = Instant::now();
            let (code, out, err) = cl.ferryctl(&["vps", "create", &name, "--memory", "16M"]);
            creates.push(t.elapsed());
            assert_eq!(code, 0, "create: {out}{err}");
            assert!(out.contains(&format!("created VPS {name} on ")), "{out}");
        }
        let (ls, creates) = (spread(ls), spread(creates));
        eprintln!("replica 1 of 3 cut off: vps ls min/median/max {ls:?} ms, create {creates:?} ms");
        // A call takes what it takes with every replica up (tens of ms), not
        // a dial timeout.
        assert!(ls.1 <= 1500 && creates.1 <= 1500, "{ls:?} {creates:?}");
        cl.heal(1);
    })
    .await;
}

/// `req` carrying request id `id`.
fn with_id<T>(req: T, id: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(req);
    r.metadata_mut().insert(
        ferry_proto::retry::REQUEST_ID,
        id.parse().expect("metadata value"),
    );
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_sent_again_with_its_id_answers_its_first_result() {
    let _one = Cluster::lock().await;
    bounded(120, async {
        let cl = Cluster::start(&[Role::Controller, Role::Controller, Role::Both]).await;
        let (leader, _) = cl.leader().await;
        // First try through one replica, the repeat through another (as
        // ferryctl does when the first one died before answering).
        let mut a = cl.client_of(leader).await;
        let mut b = cl.client_of(if leader == 1 { 2 } else { 1 }).await;
        let name = format!("once{}", std::process::id());
        let id = format!("t{}-create", std::process::id());
        let req = cpb::CreateVpsRequest {
            spec: Some(spec(&name, None, 16)),
            allocate_ip: true,
            desired: "stopped".into(),
            ..Default::default()
        };
        let first = a
            .create_vps(with_id(req.clone(), &id))
            .await
            .expect("create")
            .into_inner();
        let again = b
            .create_vps(with_id(req.clone(), &id))
            .await
            .expect("the same create again")
            .into_inner();
        assert_eq!(first, again);
        // Without the id (or with another) it is another create.
        let e = b.create_vps(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
        let e = b.create_vps(with_id(req, "other")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");

        // A delete sent again answers success, not "not found".
        let del = cpb::DeleteVpsRequest {
            name: name.clone(),
            force: true,
        };
        let did = format!("t{}-delete", std::process::id());
        a.delete_vps(with_id(del.clone(), &did))
            .await
            .expect("delete");
        b.delete_vps(with_id(del.clone(), &did))
            .await
            .expect("the same delete again");
        let e = b.delete_vps(del).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e}");

        // A bad id is refused, naming the field.
        let e = b
            .get_vps(cpb::GetVpsRequest { name: name.clone() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        let e = b
            .start_vps(with_id(
                cpb::SetDesiredRequest { name: name.clone() },
                "no/slashes",
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.message().contains("ferry-request-id"), "{e}");
    })
    .await;
}
