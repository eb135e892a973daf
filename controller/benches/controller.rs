//! Controller benchmark: committed writes/s with three voters on loopback
//! (p50/p99 latency), leader failover to the first accepted write, and
//! scheduling 10,000 VPSes onto 1,000 simulated nodes.
//!
//! `cargo bench -p ferry-controller --bench controller`. FERRY_BENCH_WRITERS
//! (default 64) and FERRY_BENCH_SECS (default 5) shape the write run.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use ferry_controller::state::{
    Capacity, ClusterState, Desired, NodeCmd, Request, Response, VpsCmd, VpsSpecData,
};
use ferry_proto::controller::v1 as cpb;

fn env_n(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    scheduling();
    writes_and_failover().await;
}

fn scheduling() {
    println!("== Scheduling 10,000 VPSes onto 1,000 simulated nodes (in-process, the apply path)");
    let mut s = ClusterState::default();
    for i in 0..1000 {
        s.apply(Request::Node(NodeCmd::Register {
            name: format!("node{i:04}"),
            addr: format!("10.1.{}.{}:7700", i / 250, i % 250),
            capacity: Capacity {
                cpu_millicores: 32_000,
                memory_bytes: 128 << 30,
                disk_bytes: 0,
            },
            labels: BTreeMap::new(),
            now_ms: 0,
        }));
    }
    let t = Instant::now();
    let mut placed = 0;
    for i in 0..10_000 {
        let r = s.apply(Request::Vps(VpsCmd::Create {
            spec: Box::new(VpsSpecData {
                name: format!("v{i}"),
                cpu_millicores: 500,
                memory_bytes: 1 << 30,
                ..Default::default()
            }),
            pin_node: String::new(),
            node_selector: BTreeMap::new(),
            anti_affinity_group: if i % 10 == 0 {
                format!("g{}", i % 100)
            } else {
                String::new()
            },
            desired: Desired::Running,
            allocate_ip: false,
            now_ms: 0,
        }));
        if matches!(r, Response::Vps(_)) {
            placed += 1;
        }
    }
    let took = t.elapsed();
    println!(
        "placed {placed} in {:.1} ms ({:.1} us each); target <= 1 s in total",
        ms(took),
        took.as_secs_f64() * 1e6 / 10_000.0
    );
}

/// One timed write run against a fresh 3-voter cluster: (writes, p50, p99).
async fn writes(tls: bool, writers: usize, secs: u64) -> (usize, Duration, Duration) {
    let cl = Cluster::start_with(3, tls).await;
    let leader = cl.leader(&[0, 1, 2]).await;
    let addr = cl.replicas[leader].addr.clone();
    let admin = cl.replicas[0].admin.clone();
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (addr, admin) = (addr.clone(), admin.clone());
        tasks.push(tokio::spawn(async move {
            let a: ferry_proto::addr::Addr = addr.parse().unwrap();
            let mut c = ferry_proto::controller::v1::controller_service_client::ControllerServiceClient::new(
                ferry_proto::addr::connect_with(&a, admin.as_ref()).await.unwrap(),
            );
            let mut lat = Vec::new();
            let mut i = 0u32;
            while Instant::now() < end {
                let t = Instant::now();
                let req = cpb::RegisterNodeRequest {
                    name: format!("w{w}-{i}"),
                    addr: format!("10.{}.{}.{}:7700", w, (i >> 8) & 255, i & 255),
                    capacity: Some(cpb::Capacity { cpu_millicores: 1000, memory_bytes: 1 << 30, disk_bytes: 0 }),
                    labels: Default::default(),
                };
                if c.register_node(req).await.is_ok() {
                    lat.push(t.elapsed());
                }
                i += 1;
            }
            lat
        }));
    }
    let mut lat: Vec<Duration> = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    lat.sort();
    if lat.is_empty() {
        return (0, Duration::ZERO, Duration::ZERO);
    }
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q) as usize];
    (lat.len(), p(0.5), p(0.99))
}

async fn writes_and_failover() {
    let writers = env_n("FERRY_BENCH_WRITERS", 64);
    let secs = env_n("FERRY_BENCH_SECS", 5) as u64;
    let rounds = env_n("FERRY_BENCH_ROUNDS", 3);
    println!("\n== Committed writes, 3 voters on loopback, {writers} concurrent writers for {secs} s (RegisterNode, sent to the leader); plaintext and mutual TLS alternate, {rounds} rounds each");
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for tls in [false, true] {
            let (n, p50, p99) = writes(tls, writers, secs).await;
            let rate = n as f64 / secs as f64;
            println!(
                "round {round} {:<9} {n} writes committed: {rate:.0} writes/s (target >= 5,000); latency p50 {:.1} ms, p99 {:.1} ms",
                if tls { "TLS" } else { "plaintext" },
                ms(p50),
                ms(p99)
            );
            rates[tls as usize].push(rate);
        }
    }
    for (i, what) in ["plaintext", "TLS"].iter().enumerate() {
        let mut r = rates[i].clone();
        r.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{what:<9} writes/s: min {:.0}, median {:.0}, max {:.0}",
            r[0],
            r[r.len() / 2],
            r[r.len() - 1]
        );
    }
    let mut cl = Cluster::start(3).await;

    println!("\n== Leader failover: SIGKILL the leader, time to the first write accepted by a survivor (5 runs)");
    let mut runs = Vec::new();
    for run in 0..5 {
        let all: Vec<usize> = (0..3).collect();
        let leader = cl.leader(&all).await;
        let survivor = (leader + 1) % 3;
        let mut c = cl.replicas[survivor].client().await;
        cl.replicas[leader].kill();
        let t = Instant::now();
        loop {
            let r = c
                .register_node(common::node_req(&format!("fo{run}"), 60000 + run as u16))
                .await;
            if r.is_ok() {
                break;
            }
        }
        runs.push(t.elapsed());
        cl.replicas[leader].spawn(false);
        let _ = cl.replicas[leader].client().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    runs.sort();
    let list: Vec<String> = runs.iter().map(|d| format!("{:.0}", ms(*d))).collect();
    println!(
        "failover ms: {} (median {:.0} ms; target <= 1,000 ms)",
        list.join(", "),
        ms(runs[runs.len() / 2])
    );
}
