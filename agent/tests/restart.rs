//! The agent can die at any moment: VPSes run on, and a new agent takes them back.
//! And after a host reboot, autostart VPSes come back.

mod common;
use common::*;
use ferry_proto::agent::v1 as pb;

#[tokio::test(flavor = "multi_thread")]
async fn sigkilled_agent_leaves_vpses_running_and_readopts_them() {
    bounded(120, async {
        let mut h = Host::new().await;
        let mut c = h.client().await;
        let a = create_started(&mut c, spec("ka", Some("10.77.0.30"))).await;
        let b = create_started(&mut c, spec("kb", Some("10.77.0.31"))).await;
        c.create_vps(pb::CreateVpsRequest {
            spec: Some(spec("kc", None)),
            start: false,
        })
        .await
        .unwrap();

        h.kill_agent();
        // With no agent at all, the VPSes run and serve.
        assert!(std::path::Path::new(&format!("/proc/{}", a.init_pid)).exists());
        assert_eq!(h.http_get("http://10.77.0.31/").await.trim(), "kb");

        h.start_agent().await;
        let mut c = h.client().await;
        let list = c
            .list_vps(pb::ListVpsRequest {})
            .await
            .unwrap()
            .into_inner()
            .vps;
        let by = |n: &str| {
            list.iter()
                .find(|v| v.spec.as_ref().unwrap().name == n)
                .unwrap()
                .clone()
        };
        assert!(running(&by("ka")) && running(&by("kb")) && stopped(&by("kc")));
        assert_eq!(by("ka").init_pid, a.init_pid, "same init, not a restart");
        assert_eq!(by("kb").init_pid, b.init_pid);
        // Still fully manageable: exec, stop, and an in-VPS poweroff seen by the new agent.
        assert_eq!(exec(&mut c, "ka", &["hostname"]).await.stdout.trim(), "ka");
        let v = stop(&mut c, "ka", 10, false).await;
        assert!(stopped(&v));
        let _ = exec(&mut c, "kb", &["poweroff"]).await;
        let v = wait_for(&mut c, "kb", 15, "poweroff", stopped).await;
        assert_eq!(v.stop_reason, "poweroff");
        // The new agent watches monitors it did not start: kb's cgroup is released.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while h.cgroup_dirs("kb").iter().any(|d| d.exists()) {
            assert!(
                std::time::Instant::now() < end,
                "adopted VPS's cgroup kept after poweroff"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn autostart_vps_comes_back_after_a_host_reboot() {
    bounded(120, async {
        let mut h = Host::new().await;
        let mut c = h.client().await;
        let mut s = spec("auto1", Some("10.77.0.40"));
        s.autostart = true;
        create_started(&mut c, s).await;
        create_started(&mut c, spec("manual1", None)).await;
        // A reboot: every VPS process ends, and /run (the run dir) is emptied.
        for n in ["auto1", "manual1"] {
            stop(&mut c, n, 0, true).await;
        }
        h.kill_agent();
        std::fs::remove_dir_all(h.run_dir()).unwrap();
        h.start_agent().await;
        let mut c = h.client().await;
        let v = wait_for(&mut c, "auto1", 20, "autostart", running).await;
        assert!(v.init_pid > 0);
        assert!(
            stopped(&get(&mut c, "manual1").await),
            "only autostart VPSes come back"
        );
        assert_eq!(h.http_get("http://10.77.0.40/").await.trim(), "auto1");
        // A plain agent restart (no reboot) does not start stopped VPSes.
        stop(&mut c, "auto1", 0, true).await;
        h.kill_agent();
        h.start_agent().await;
        let mut c = h.client().await;
        assert!(stopped(&get(&mut c, "auto1").await));
    })
    .await;
}
