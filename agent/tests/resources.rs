//! Limits hold, and usage is reported: memory (OOM kill), pids, cpu quota.

mod common;
use std::time::{Duration, Instant};

use common::*;
use ferry_proto::agent::v1 as pb;

#[tokio::test(flavor = "multi_thread")]
async fn memory_limit_oom_kills_inside_and_is_reported() {
    bounded(120, async {
        let _heavy = HEAVY.lock().await;
        let h = Host::new().await;
        let mut c = h.client().await;
        let mut s = spec("mem1", None);
        s.limits = Some(pb::Limits {
            memory_bytes: 48 << 20,
            ..Default::default()
        });
        create_started(&mut c, s).await;
        // awk doubles a string until the kernel stops it.
        let r = exec(
            &mut c,
            "mem1",
            &["awk", "BEGIN { s = \"xxxxxxxx\"; while (1) s = s s }"],
        )
        .await;
        assert_eq!(
            r.code,
            128 + 9,
            "the hog should die by SIGKILL: {} {}",
            r.code,
            r.stderr
        );
        let v = get(&mut c, "mem1").await;
        assert!(running(&v), "the VPS itself survives its hog");
        let u = v.usage.unwrap();
        assert!(u.oom_kills >= 1, "OOM kill not reported: {u:?}");
        assert!(
            u.memory_peak_bytes <= 48 << 20,
            "peak over the limit: {u:?}"
        );
        // The agent is fine and answers.
        c.get_node(pb::GetNodeRequest {}).await.unwrap();
        // The VPS still works.
        assert_eq!(exec(&mut c, "mem1", &["true"]).await.code, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pids_limit_contains_a_fork_bomb() {
    bounded(120, async {
        let _heavy = HEAVY.lock().await;
        let h = Host::new().await;
        let mut c = h.client().await;
        let mut s = spec("bomb1", None);
        s.limits = Some(pb::Limits {
            memory_bytes: 256 << 20,
            pids: 64,
            cpu_millicores: 500,
            ..Default::default()
        });
        create_started(&mut c, s).await;
        // The bomb relaunches itself for as long as the VPS runs: a plain bomb can
        // die out when its forks fail, which would prove nothing.
        let r = exec(
            &mut c,
            "bomb1",
            &[
                "sh",
                "-c",
                "(while :; do b() { b | b & }; b; done) </dev/null >/dev/null 2>&1 & echo started",
            ],
        )
        .await;
        assert_eq!(r.stdout.trim(), "started");
        // Sample while it rages: never over the limit, and the agent stays quick.
        for _ in 0..20 {
            let t = Instant::now();
            let v = get(&mut c, "bomb1").await;
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "agent slow under a fork bomb: {:?}",
                t.elapsed()
            );
            let pids = v.usage.unwrap().pids;
            assert!(pids <= 64, "pids over the limit: {pids}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The kernel's own account: forks were refused at the limit, and the
        // highest count reached (where the kernel keeps one) is the limit, not more.
        // v1 counts a refused fork in the forking task's cgroup: the VPS's
        // leaf, below the cgroup with the limit.
        let dir = h
            .cgroup_dirs("bomb1")
            .into_iter()
            .find(|d| d.join("pids.events").exists())
            .unwrap();
        let events = |d: &std::path::Path| -> u64 {
            std::fs::read_to_string(d.join("pids.events"))
                .unwrap_or_default()
                .split_whitespace()
                .nth(1)
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        let max_hits = events(&dir) + events(&dir.join(ferry_agent::cgroup::LEAF));
        assert!(max_hits > 0, "no fork was refused");
        if let Ok(peak) = std::fs::read_to_string(dir.join("pids.peak")) {
            let peak: u32 = peak.trim().parse().unwrap();
            assert!(
                (32..=64).contains(&peak),
                "peak of {peak} tasks with a limit of 64"
            );
        }
        // The host still forks fine.
        assert!(std::process::Command::new("true")
            .status()
            .unwrap()
            .success());
        let v = stop(&mut c, "bomb1", 2, true).await;
        assert!(stopped(&v));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cpu_quota_caps_a_busy_loop_at_half_a_core() {
    bounded(120, async {
        let _heavy = HEAVY.lock().await;
        let h = Host::new().await;
        let mut c = h.client().await;
        let mut s = spec("cpu1", None);
        s.limits = Some(pb::Limits { memory_bytes: 64 << 20, cpu_millicores: 500, ..Default::default() });
        create_started(&mut c, s).await;
        // Two spinning loops want two cores; the quota allows half of one.
        let r = exec(&mut c, "cpu1", &["sh", "-c", "for i in 1 2; do (while :; do :; done) </dev/null >/dev/null 2>&1 & done; echo started"]).await;
        assert_eq!(r.code, 0);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let u0 = get(&mut c, "cpu1").await.usage.unwrap().cpu_nanos;
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let u1 = get(&mut c, "cpu1").await.usage.unwrap().cpu_nanos;
        let cores = (u1 - u0) as f64 / t0.elapsed().as_nanos() as f64;
        println!("cpu1 used {cores:.3} cores with a 500m quota");
        assert!((0.4..=0.6).contains(&cores), "expected about 0.5 cores, got {cores:.3}");

        // Raising the quota on the running VPS takes effect at once.
        c.set_vps(pb::SetVpsRequest { name: "cpu1".into(), cpu_millicores: Some(1000), ..Default::default() }).await.unwrap();
        let u0 = get(&mut c, "cpu1").await.usage.unwrap().cpu_nanos;
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let u1 = get(&mut c, "cpu1").await.usage.unwrap().cpu_nanos;
        let cores = (u1 - u0) as f64 / t0.elapsed().as_nanos() as f64;
        println!("cpu1 used {cores:.3} cores with a 1000m quota");
        assert!(cores > 0.75, "raised quota not applied: {cores:.3}");
        stop(&mut c, "cpu1", 0, true).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_change_live_and_persist() {
    bounded(60, async {
        let h = Host::new().await;
        let mut c = h.client().await;
        create_started(&mut c, spec("set1", None)).await;
        let v = c
            .set_vps(pb::SetVpsRequest {
                name: "set1".into(),
                memory_bytes: Some(200 << 20),
                swap_bytes: Some(0),
                pids: Some(300),
                autostart: Some(true),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let l = v.spec.as_ref().unwrap().limits.unwrap();
        assert_eq!((l.memory_bytes, l.pids), (200 << 20, 300));
        assert!(v.spec.unwrap().autostart);
        // The kernel holds the new values.
        let dirs = h.cgroup_dirs("set1");
        let read = |file: &str| dirs.iter().map(|d| d.join(file)).find(|p| p.exists()).map(|p| std::fs::read_to_string(p).unwrap());
        if let Some(m) = read("memory.limit_in_bytes").or_else(|| read("memory.max")) {
            assert_eq!(m.trim(), (200u64 << 20).to_string());
        }
        assert_eq!(read("pids.max").unwrap().trim(), "300");
        // Over the node's capacity: refused, nothing changed.
        let e = c.set_vps(pb::SetVpsRequest { name: "set1".into(), memory_bytes: Some(1 << 50), ..Default::default() }).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{}", e.message());
        assert_eq!(get(&mut c, "set1").await.spec.unwrap().limits.unwrap().memory_bytes, 200 << 20);
        // Below what the VPS uses now: the kernel refuses, the old limit stays.
        let hog = exec(&mut c, "set1", &["sh", "-c", "mkdir -p /run/h && mount -t tmpfs -o size=100m t /run/h && head -c 60000000 /dev/zero > /run/h/f && echo ok"]).await;
        assert_eq!(hog.stdout.trim(), "ok", "{}", hog.stderr);
        let e = c.set_vps(pb::SetVpsRequest { name: "set1".into(), memory_bytes: Some(20 << 20), ..Default::default() }).await;
        if let Err(e) = e {
            assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
            assert_eq!(get(&mut c, "set1").await.spec.unwrap().limits.unwrap().memory_bytes, 200 << 20);
        }
    })
    .await;
}
