//! Agent benchmark: VPS create+start latency (busybox, without and with
//! networking) beside `runc run` of busybox `true` in the same run, then
//! density: 500 VPSes, agent RSS and host memory per VPS.
//!
//! `cargo bench -p ferry-agent --bench lifecycle` (root). FERRY_BENCH_N sets the
//! latency samples (default 50), FERRY_BENCH_DENSITY the VPS count (default 500).

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use ferry_proto::agent::v1 as pb;

fn env_n(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn summary(label: &str, mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let (p50, p99) = (pct(&v, 0.5), pct(&v, 0.99));
    println!(
        "{label:<42} n={:<4} p50 {:>7.1} ms   p99 {:>7.1} ms",
        v.len(),
        ms(p50),
        ms(p99)
    );
    (p50, p99)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn kb_field(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// An OCI bundle running busybox `true`, from the busybox template's tree.
fn runc_bundle(h: &Host) -> Option<std::path::PathBuf> {
    let b = h.dir.join("runc-bundle");
    std::fs::create_dir_all(&b).ok()?;
    let spec = Command::new("runc")
        .args(["spec", "--bundle", b.to_str()?])
        .output()
        .ok()?;
    if !spec.status.success() {
        return None;
    }
    let path = b.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
    cfg["process"]["args"] = serde_json::json!(["/bin/true"]);
    cfg["process"]["terminal"] = serde_json::json!(false);
    cfg["root"]["path"] = serde_json::json!(h.data_dir().join("templates/busybox/rootfs"));
    cfg["root"]["readonly"] = serde_json::json!(true);
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).ok()?).ok()?;
    Some(b)
}

#[tokio::main]
async fn main() {
    let n = env_n("FERRY_BENCH_N", 50);
    let density = env_n("FERRY_BENCH_DENSITY", 500);
    let h = Host::new().await;
    let mut c = h.client().await;
    println!("== VPS create+start latency (busybox template), {n} samples each");

    // Unprivileged (the default: a user namespace each) beside privileged,
    // interleaved sample by sample so the machine's drift hits both alike.
    let variants = [
        (
            "ferry create+start, no network (unprivileged)",
            false,
            false,
        ),
        ("ferry create+start, veth + IP (unprivileged)", true, false),
        ("ferry create+start, no network (privileged)", false, true),
        ("ferry create+start, veth + IP (privileged)", true, true),
    ];
    let mut samples = vec![Vec::new(); variants.len()];
    for i in 0..n {
        for (k, (_, net, privileged)) in variants.iter().enumerate() {
            let name = format!("lat{k}x{i}");
            let mut s = spec(&name, net.then(|| format!("10.77.1.{}", i + 2)).as_deref());
            s.privileged = *privileged;
            let t = Instant::now();
            create_started(&mut c, s).await;
            samples[k].push(t.elapsed());
            c.destroy_vps(pb::DestroyVpsRequest {
                name,
                force: true,
                generation: 0,
            })
            .await
            .unwrap();
        }
    }
    let lat: Vec<_> = variants
        .iter()
        .zip(samples)
        .map(|((label, _, _), v)| summary(label, v))
        .collect();

    let mut runc_p50 = None;
    match runc_bundle(&h) {
        Some(bundle) => {
            let mut v = Vec::new();
            for i in 0..n {
                let id = format!("ferry-bench-{}-{i}", std::process::id());
                let t = Instant::now();
                let st = Command::new("runc")
                    .args(["run", "--bundle", bundle.to_str().unwrap(), &id])
                    .status()
                    .unwrap();
                v.push(t.elapsed());
                assert!(st.success(), "runc run failed");
            }
            runc_p50 = Some(summary("runc run busybox true (create+start+exit)", v).0);
        }
        None => println!("runc not available: no peer figure"),
    }
    if let Some(r) = runc_p50 {
        for (kind, at) in [("unprivileged", 0), ("privileged", 2)] {
            println!(
                "   ratio to runc p50, {kind}: no network {:.2}x (target <= 1), with network {:.2}x (target <= 2)",
                lat[at].0.as_secs_f64() / r.as_secs_f64(),
                lat[at + 1].0.as_secs_f64() / r.as_secs_f64()
            );
        }
    }
    for privileged in [false, true] {
        density_run(&h, &mut c, density, privileged).await;
    }
}

/// Starts `density` VPSes of one kind, reports what they cost, destroys them.
async fn density_run(
    h: &Host,
    c: &mut ferry_proto::agent::v1::agent_service_client::AgentServiceClient<
        tonic::transport::Channel,
    >,
    density: usize,
    privileged: bool,
) {
    let kind = if privileged {
        "privileged"
    } else {
        "unprivileged"
    };

    println!("\n== Density: {density} running {kind} VPSes (busybox init + httpd each, veth + IP)");
    let agent_pid = agent_pid(h);
    let avail0 = kb_field("/proc/meminfo", "MemAvailable:");
    let rss0 = kb_field(&format!("/proc/{agent_pid}/status"), "VmRSS:");
    let t = Instant::now();
    for i in 0..density {
        let ip = format!("10.77.{}.{}", 10 + i / 250, 2 + i % 250);
        let mut s = spec(&format!("d{i}"), Some(&ip));
        s.limits = Some(pb::Limits {
            memory_bytes: 32 << 20,
            ..Default::default()
        });
        s.privileged = privileged;
        create_started(c, s).await;
    }
    let took = t.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let list = c
        .list_vps(pb::ListVpsRequest {})
        .await
        .unwrap()
        .into_inner()
        .vps;
    let up = list.iter().filter(|v| running(v)).count();
    let rss = kb_field(&format!("/proc/{agent_pid}/status"), "VmRSS:");
    let avail = kb_field("/proc/meminfo", "MemAvailable:");
    let monitors: Vec<i32> = list
        .iter()
        .filter_map(|v| monitor_pid(h, &v.spec.as_ref().unwrap().name))
        .collect();
    let mon_pss: u64 = monitors
        .iter()
        .map(|p| kb_field(&format!("/proc/{p}/smaps_rollup"), "Pss:"))
        .sum();
    let vps_mem: u64 = list.iter().map(|v| v.usage.unwrap().memory_bytes).sum();
    println!(
        "started {density} in {:.1} s ({:.1} ms each); running: {up}",
        took.as_secs_f64(),
        ms(took) / density as f64
    );
    println!(
        "agent RSS: {:.1} MiB before, {:.1} MiB with {up} VPSes (target <= 64 MiB)",
        rss0 as f64 / 1024.0,
        rss as f64 / 1024.0
    );
    println!(
        "host memory per VPS: {:.2} MiB (MemAvailable drop / {up}); of which VPS cgroup charge {:.2} MiB, monitor PSS {:.2} MiB",
        (avail0.saturating_sub(avail)) as f64 / 1024.0 / up as f64,
        vps_mem as f64 / (1 << 20) as f64 / up as f64,
        mon_pss as f64 / 1024.0 / monitors.len().max(1) as f64
    );
    let t = Instant::now();
    for v in &list {
        c.destroy_vps(pb::DestroyVpsRequest {
            name: v.spec.as_ref().unwrap().name.clone(),
            force: true,
            generation: 0,
        })
        .await
        .unwrap();
    }
    println!(
        "destroyed {} in {:.1} s",
        list.len(),
        t.elapsed().as_secs_f64()
    );
}

fn agent_pid(h: &Host) -> i32 {
    let needle = format!("--data-dir {}", h.data_dir().display());
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(&needle) && !cmd.starts_with("nsenter")
        })
        .expect("agent pid")
}

fn monitor_pid(h: &Host, vps: &str) -> Option<i32> {
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(h.run_dir().join(vps).join("state.json")).ok()?)
            .ok()?;
    st["monitor_pid"].as_i64().map(|p| p as i32)
}
