//! The VPS lifecycle as an operator drives it.

mod common;
use common::*;
use ferry_proto::agent::v1 as pb;

#[tokio::test(flavor = "multi_thread")]
async fn start_stop_restart_reboot_poweroff_destroy() {
    bounded(180, async {
        let h = Host::new().await;
        let mut c = h.client().await;
        c.create_vps(pb::CreateVpsRequest {
            spec: Some(spec("life1", Some("10.77.0.20"))),
            start: false,
        })
        .await
        .unwrap();
        assert!(stopped(&get(&mut c, "life1").await));
        let v = c
            .start_vps(pb::StartVpsRequest {
                name: "life1".into(),
                generation: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(running(&v));
        let first_pid = v.init_pid;

        // The console carries init's output.
        wait_for(&mut c, "life1", 10, "boot message", |_| true).await;
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let log = c
                .read_console(pb::ReadConsoleRequest {
                    name: "life1".into(),
                    tail_bytes: 0,
                })
                .await
                .unwrap()
                .into_inner();
            if String::from_utf8_lossy(&log.data).contains("booted life1") {
                break;
            }
            assert!(
                std::time::Instant::now() < end,
                "no boot message in console"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }

        // `reboot` inside restarts it: new init, same VPS, still running.
        let _ = exec(&mut c, "life1", &["reboot"]).await;
        let v = wait_for(&mut c, "life1", 15, "reboot", |v| {
            running(v) && v.reboots == 1
        })
        .await;
        assert_ne!(v.init_pid, first_pid);
        let r = exec(&mut c, "life1", &["hostname"]).await;
        assert_eq!(r.stdout.trim(), "life1");

        // restart through the API.
        let v = c
            .restart_vps(pb::StopVpsRequest {
                name: "life1".into(),
                timeout_secs: 10,
                force: false,
                generation: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(running(&v));

        // `poweroff` inside stops it, and its kernel objects are released.
        let _ = exec(&mut c, "life1", &["poweroff"]).await;
        let v = wait_for(&mut c, "life1", 15, "poweroff", stopped).await;
        assert_eq!(v.stop_reason, "poweroff");
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while h.cgroup_dirs("life1").iter().any(|d| d.exists()) {
            assert!(
                std::time::Instant::now() < end,
                "cgroup kept after poweroff"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }

        // Start again, then stop through the API (SIGTERM; busybox init shuts down).
        c.start_vps(pb::StartVpsRequest {
            name: "life1".into(),
            generation: 0,
        })
        .await
        .unwrap();
        let v = stop(&mut c, "life1", 10, false).await;
        assert!(stopped(&v));
        assert_eq!(v.stop_reason, "stopped");

        // An init that ignores SIGTERM is killed after the timeout.
        let mut s = spec("stubborn", None);
        s.init = vec![
            "/bin/sh".into(),
            "-c".into(),
            "trap '' TERM; while :; do sleep 1; done".into(),
        ];
        create_started(&mut c, s).await;
        let t = std::time::Instant::now();
        let v = stop(&mut c, "stubborn", 1, false).await;
        assert!(stopped(&v) && t.elapsed() < std::time::Duration::from_secs(8));
        assert_eq!(v.exit_signal, 9);

        // Destroy refuses a running VPS unless forced.
        c.start_vps(pb::StartVpsRequest {
            name: "life1".into(),
            generation: 0,
        })
        .await
        .unwrap();
        let e = c
            .destroy_vps(pb::DestroyVpsRequest {
                name: "life1".into(),
                force: false,
                generation: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        c.destroy_vps(pb::DestroyVpsRequest {
            name: "life1".into(),
            force: true,
            generation: 0,
        })
        .await
        .unwrap();
        let e = c
            .get_vps(pb::GetVpsRequest {
                name: "life1".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn init_exit_is_reported_with_its_status() {
    bounded(60, async {
        let h = Host::new().await;
        let mut c = h.client().await;
        let mut s = spec("quitter", None);
        s.init = vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo bye; sleep 0.3; exit 7".into(),
        ];
        create_started(&mut c, s).await;
        let v = wait_for(&mut c, "quitter", 10, "init exit", stopped).await;
        assert_eq!((v.stop_reason.as_str(), v.exit_code), ("exited", 7));
        let log = c
            .read_console(pb::ReadConsoleRequest {
                name: "quitter".into(),
                tail_bytes: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(String::from_utf8_lossy(&log.data).contains("bye"));

        // A missing init fails the start with the reason, and leaves nothing running.
        let mut s = spec("noinit", None);
        s.init = vec!["/no/such/init".into()];
        c.create_vps(pb::CreateVpsRequest {
            spec: Some(s),
            start: false,
        })
        .await
        .unwrap();
        let e = c
            .start_vps(pb::StartVpsRequest {
                name: "noinit".into(),
                generation: 0,
            })
            .await
            .unwrap_err();
        assert!(e.message().contains("/no/such/init"), "{}", e.message());
        assert!(
            h.cgroup_dirs("noinit").iter().all(|d| !d.exists()),
            "cgroup left after a failed start"
        );
        assert!(!h.run_dir().join("noinit/netns").exists());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_streams_output_and_exit_code() {
    bounded(60, async {
        let h = Host::new().await;
        let mut c = h.client().await;
        create_started(&mut c, spec("ex1", None)).await;
        let r = exec(
            &mut c,
            "ex1",
            &["sh", "-c", "echo out; echo err >&2; exit 3"],
        )
        .await;
        assert_eq!(
            (r.code, r.stdout.as_str(), r.stderr.as_str()),
            (3, "out\n", "err\n")
        );
        let r = exec(&mut c, "ex1", &["nosuchcommand"]).await;
        assert_eq!(r.code, 127, "{}", r.stderr);
        // stdin and env reach the command.
        let req = pb::ExecRequest {
            name: "ex1".into(),
            argv: vec!["sh".into(), "-c".into(), "cat; echo $GREETING".into()],
            env: vec!["GREETING=hi".into()],
            stdin: b"from stdin\n".to_vec(),
            timeout_secs: 10,
        };
        let mut s = c.exec(req).await.unwrap().into_inner();
        let mut out = Vec::new();
        while let Some(m) = s.message().await.unwrap() {
            if let Some(pb::exec_output::Item::Stdout(b)) = m.item {
                out.extend(b);
            }
        }
        assert_eq!(String::from_utf8_lossy(&out), "from stdin\nhi\n");
        // A timeout ends a command that runs too long.
        let req = pb::ExecRequest {
            name: "ex1".into(),
            argv: vec!["sleep".into(), "30".into()],
            timeout_secs: 1,
            ..Default::default()
        };
        let mut s = c.exec(req).await.unwrap().into_inner();
        let mut got = None;
        loop {
            match s.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(e) => {
                    got = Some(e.code());
                    break;
                }
            }
        }
        assert_eq!(got, Some(tonic::Code::DeadlineExceeded));
        // Exec into a stopped VPS is refused.
        stop(&mut c, "ex1", 0, true).await;
        let e = c
            .exec(pb::ExecRequest {
                name: "ex1".into(),
                argv: vec!["true".into()],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    })
    .await;
}
