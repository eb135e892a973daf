//! Drain benchmark (root; the multi-host harness: three hosts, each running
//! a controller replica and an agent, real CRIU, real VPSes).
//!
//! Host 1 holds N running VPSes (default 20), each with an address and a
//! process holding M MiB of touched memory (default 64). Each round: first
//! the peer, single `vps migrate` moves (mode auto), one at a time, of three
//! of those VPSes to another node and back; then, for each `--parallel`
//! setting (default 1, 2, 4), `DrainNode` of host 1 until it ends, then
//! `RestoreNode` to bring every VPS back for the next setting. Reported per
//! setting over every round: the drain's wall time (the leader's start to
//! end) min/median/max, per-VPS downtime p50/p99/max (as each move measured
//! it: freeze to running on the target) against the single moves' p50, and
//! the bytes moved. All of it twice: agents with `--freeze-turns 1` (the
//! default: one VPS frozen at a time per source node) and `0` (no limit).
//!
//! `cargo build --release --workspace && cargo bench -p ferry-cluster-tests
//! --bench drain`. FERRY_BENCH_DRAIN_N, FERRY_BENCH_DRAIN_MIB and
//! FERRY_BENCH_DRAIN_PARALLEL (e.g. "1,2,4") change the run;
//! FERRY_BENCH_DRAIN_ROUNDS sets the rounds (default 3);
//! FERRY_BENCH_DRAIN_TURNS the agents' freeze turns (default "1,0").

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use ferry_cluster_tests::{Cluster, Role};
use ferry_proto::agent::v1 as apb;
use ferry_proto::controller::v1 as cpb;

/// One `--parallel` setting's figures over every round.
#[derive(Default)]
struct Row {
    parallel: u32,
    /// Drain wall times (s).
    walls: Vec<f64>,
    /// Every moved VPS's downtime (ms).
    down: Vec<u64>,
    /// Bytes moved per drain.
    bytes: Vec<u64>,
    /// Restore wall times (s).
    restores: Vec<f64>,
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Nearest-rank percentile of sorted `v`.
fn pct(v: &[u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// A busybox awk that fills a string of at least `bytes` and sleeps.
fn memhog_awk(bytes: u64) -> String {
    format!(
        "BEGIN {{ s = \"x\"; while (length(s) < {bytes}) s = s s; \
         while (1) system(\"sleep 3600\") }}"
    )
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let n = env_num("FERRY_BENCH_DRAIN_N", 20) as usize;
    let mib = env_num("FERRY_BENCH_DRAIN_MIB", 64);
    let rounds = env_num("FERRY_BENCH_DRAIN_ROUNDS", 3);
    let settings: Vec<u32> = std::env::var("FERRY_BENCH_DRAIN_PARALLEL")
        .unwrap_or_else(|_| "1,2,4".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let turns: Vec<String> = std::env::var("FERRY_BENCH_DRAIN_TURNS")
        .unwrap_or_else(|_| "1,0".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    let _one = Cluster::lock().await;
    for t in &turns {
        measure(t, n, mib, rounds, &settings).await;
    }
}

/// One cluster whose agents run with `--freeze-turns TURNS`: every round,
/// then its table.
async fn measure(turns: &str, n: usize, mib: u64, rounds: u64, settings: &[u32]) {
    let env: Vec<(usize, &str, &str)> = (1..=3).map(|i| (i, "FERRY_FREEZE_TURNS", turns)).collect();
    let cl = Cluster::start_with(&[Role::Both, Role::Both, Role::Both], &env).await;
    let (_, mut c) = cl.leader().await;
    let n1 = Cluster::node(1);
    let tag = format!("bd{}", std::process::id());

    // N VPSes on host 1, each holding `mib` of touched memory (the awk's
    // doubling peaks at 1.5× the string: the limit leaves room for it).
    let vpses: Vec<(String, String)> = (0..n)
        .map(|k| (format!("{tag}v{k}"), format!("10.85.9.{}", 10 + k)))
        .collect();
    create_unpinned_on(&cl, &mut c, 1, &vpses, mib * 2 + 64).await;
    let prog = memhog_awk(mib << 20);
    for (name, _) in &vpses {
        let (code, _, err) = cl.ferryctl_agent(
            1,
            &[
                "vps",
                "exec",
                name,
                "--",
                "setsid",
                "sh",
                "-c",
                "awk \"$0\" </dev/null >/dev/null 2>&1 &",
                &prog,
            ],
        );
        assert_eq!(code, 0, "memhog in {name}: {err}");
    }
    let mut a1 = cl.agent_client(1).await;
    for (name, _) in &vpses {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let v = a1
                .get_vps(apb::GetVpsRequest { name: name.clone() })
                .await
                .expect("get vps")
                .into_inner();
            let used = v.usage.map(|u| u.memory_bytes).unwrap_or(0);
            if used >= mib << 20 {
                break;
            }
            assert!(Instant::now() < end, "{name} holds only {used} bytes");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eprintln!("{n} VPSes of {mib} MiB touched memory run on {n1}");

    let mut single = Vec::new();
    let mut rows: Vec<Row> = settings
        .iter()
        .map(|p| Row {
            parallel: *p,
            ..Default::default()
        })
        .collect();
    for round in 0..rounds {
        // The peer: single moves, one at a time, there and back.
        for (name, _) in vpses.iter().take(3) {
            for to in ["n2", "n1"] {
                let (code, out, err) = cl.ferryctl(&["vps", "migrate", name, "--to", to]);
                assert_eq!(code, 0, "single move of {name} to {to}: {out}{err}");
                let ms: u64 = out
                    .split("downtime ")
                    .nth(1)
                    .and_then(|t| t.split(" ms").next())
                    .and_then(|t| t.parse().ok())
                    .unwrap_or_else(|| panic!("no downtime in {out}"));
                single.push(ms);
            }
        }
        eprintln!("round {round}: single moves so far {single:?} ms");
        for row in rows.iter_mut() {
            let p = row.parallel;
            let asked = Instant::now();
            c.drain_node(cpb::DrainNodeRequest {
                node: n1.clone(),
                parallel: p,
                ..Default::default()
            })
            .await
            .expect("drain");
            let d = wait_drain_end(&cl, &n1, 600).await;
            let seen = asked.elapsed();
            assert_eq!(d.state, "complete", "{d:#?}{}", cl.logs());
            assert_eq!(d.items.len(), n, "{d:#?}");
            let wall = (d.ended_unix_ms - d.started_unix_ms).max(0) as f64 / 1000.0;
            let mut down: Vec<u64> = d.items.iter().map(|i| i.downtime_ms).collect();
            down.sort_unstable();
            let bytes: u64 = d.items.iter().map(|i| i.bytes).sum();
            let modes: std::collections::BTreeSet<&str> =
                d.items.iter().map(|i| i.mode.as_str()).collect();
            eprintln!(
                "round {round} --parallel {p}: drained in {wall:.1} s (client saw {:.1} s), \
                 downtime p50 {} max {} ms, {} MiB moved, modes {modes:?}",
                seen.as_secs_f64(),
                pct(&down, 50.0),
                down.last().copied().unwrap_or(0),
                bytes >> 20
            );

            // Back to host 1 for the next setting.
            c.restore_node(cpb::RestoreNodeRequest {
                node: n1.clone(),
                parallel: 4,
                ..Default::default()
            })
            .await
            .expect("restore");
            let r = wait_drain_end(&cl, &n1, 600).await;
            assert_eq!(r.kind, "restore", "{r:#?}");
            assert_eq!(r.state, "complete", "{r:#?}{}", cl.logs());
            let rwall = (r.ended_unix_ms - r.started_unix_ms).max(0) as f64 / 1000.0;
            eprintln!("  restored with --parallel 4 in {rwall:.1} s");
            row.walls.push(wall);
            row.down.extend(down);
            row.bytes.push(bytes);
            row.restores.push(rwall);
        }
    }

    let mmm = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        format!(
            "{:.1} / {:.1} / {:.1} s",
            v.first().copied().unwrap_or(0.0),
            v.get(v.len() / 2).copied().unwrap_or(0.0),
            v.last().copied().unwrap_or(0.0)
        )
    };
    single.sort_unstable();
    let single_p50 = pct(&single, 50.0).max(1);
    println!();
    println!(
        "drain of {n} VPSes × {mib} MiB touched memory, 3 hosts (controller + agent each), \
         mode auto, agents with --freeze-turns {turns}, {rounds} round(s):"
    );
    println!(
        "| --parallel | wall min / median / max | downtime p50 / p99 / max (all VPSes) | \
         p50 vs single | moved per drain | restore (--parallel 4) |"
    );
    println!("|---|---|---|---|---|---|");
    for r in &mut rows {
        r.down.sort_unstable();
        r.bytes.sort_unstable();
        let (p, walls, down, bytes, rwalls) =
            (r.parallel, &r.walls, &r.down, &r.bytes, &r.restores);
        println!(
            "| {p} | {} | {} / {} / {} ms | {:.2}× | {} MiB | {} |",
            mmm(walls),
            pct(down, 50.0),
            pct(down, 99.0),
            down.last().copied().unwrap_or(0),
            pct(down, 50.0) as f64 / single_p50 as f64,
            pct(bytes, 50.0) >> 20,
            mmm(rwalls)
        );
    }
    println!(
        "| single `vps migrate` (peer) | | {} / {} / {} ms ({} moves) | 1× | | |",
        single_p50,
        pct(&single, 99.0),
        single.last().copied().unwrap_or(0),
        single.len()
    );
}
