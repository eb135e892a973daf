//! `ferryctl` against a real agent, as an operator types it.

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn ferryctl_drives_the_lifecycle() {
    bounded(120, async {
        let h = Host::new().await;
        let (code, out, err) = ferryctl(
            &h,
            &[
                "vps",
                "create",
                "cli1",
                "--ip",
                "10.77.0.80",
                "--cpu",
                "500m",
                "--memory",
                "96M",
                "--pids",
                "200",
                "--start",
            ],
        );
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("created VPS cli1 (running"), "{out}");

        // vzlist-like table.
        let (_, out, _) = ferryctl(&h, &["vps", "ls"]);
        let mut lines = out.lines();
        assert_eq!(
            lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
            ["NAME", "STATUS", "IP", "CPU", "MEM", "PIDS", "DISK"]
        );
        let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            (row[0], row[1], row[2], row[3]),
            ("cli1", "running", "10.77.0.80", "500m")
        );
        assert!(
            row[4].ends_with("/96M") && row[5].ends_with("/200"),
            "{row:?}"
        );

        // A reader that closes the pipe early ends ferryctl quietly (exit
        // 141, as SIGPIPE would), without a panic.
        let bin = std::path::Path::new(AGENT).with_file_name("ferryctl");
        let o = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "{} --agent unix:{} vps ls -o json | true; echo \"${{PIPESTATUS[0]}}\"",
                bin.display(),
                h.sock().display()
            ))
            .output()
            .expect("bash");
        let (out, err) = (
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(["0", "141"].contains(&out.trim()), "exit {out}: {err}");

        // JSON for scripts.
        let (_, out, _) = ferryctl(&h, &["vps", "ls", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v[0]["name"], "cli1");
        assert_eq!(v[0]["limits"]["memory_bytes"], 96 << 20);
        let (_, out, _) = ferryctl(&h, &["vps", "show", "cli1", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            (v["status"].as_str(), v["ip"].as_str()),
            (Some("running"), Some("10.77.0.80"))
        );
        let (_, out, _) = ferryctl(&h, &["vps", "show", "cli1"]);
        assert!(
            out.contains("Memory") && out.contains("OOM kills") && out.contains("Disk"),
            "{out}"
        );

        // exec passes the command's output and exit code through.
        let (code, out, err) = ferryctl(
            &h,
            &[
                "vps",
                "exec",
                "cli1",
                "--",
                "sh",
                "-c",
                "echo hi; echo oops >&2; exit 5",
            ],
        );
        assert_eq!((code, out.as_str(), err.as_str()), (5, "hi\n", "oops\n"));

        let (code, _, _) = ferryctl(
            &h,
            &[
                "vps",
                "set",
                "cli1",
                "--memory",
                "128M",
                "--autostart",
                "true",
            ],
        );
        assert_eq!(code, 0);
        let (_, out, _) = ferryctl(&h, &["vps", "show", "cli1", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            (
                v["limits"]["memory_bytes"].as_u64(),
                v["autostart"].as_bool()
            ),
            (Some(128 << 20), Some(true))
        );

        let (_, out, _) = ferryctl(&h, &["vps", "logs", "cli1"]);
        assert!(out.contains("booted cli1") || out.is_empty(), "{out}");

        // Errors: a message naming the problem, exit code 1, no stack dump.
        let (code, _, err) = ferryctl(&h, &["vps", "create", "Bad_Name"]);
        assert_eq!(code, 1);
        assert!(
            err.contains("invalid name") && err.contains("InvalidArgument"),
            "{err}"
        );
        let (code, _, err) = ferryctl(&h, &["vps", "create", "x1", "--memory", "lots"]);
        assert_eq!(code, 1);
        assert!(err.contains("\"lots\""), "{err}");
        let (code, _, err) = ferryctl(&h, &["vps", "start", "ghost"]);
        assert_eq!(code, 1);
        assert!(err.contains("not found"), "{err}");

        // Templates: import from stdin, list.
        let tarball = {
            let mut b = tar::Builder::new(Vec::new());
            b.follow_symlinks(false);
            b.append_dir_all(".", h.data_dir().join("templates/busybox/rootfs"))
                .unwrap();
            b.into_inner().unwrap()
        };
        let path = h.dir.join("t.tar.gz");
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&path).unwrap(),
            flate2::Compression::fast(),
        );
        std::io::Write::write_all(&mut gz, &tarball).unwrap();
        gz.finish().unwrap();
        let (code, out, err) =
            ferryctl(&h, &["template", "import", "bbgz", path.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("imported template bbgz"), "{out}");
        let (_, out, _) = ferryctl(&h, &["template", "ls"]);
        assert!(out.lines().any(|l| l.starts_with("bbgz ")), "{out}");

        let (code, _, _) = ferryctl(&h, &["vps", "stop", "cli1", "--timeout", "5"]);
        assert_eq!(code, 0);
        let (code, _, _) = ferryctl(&h, &["vps", "destroy", "cli1"]);
        assert_eq!(code, 0);
        let (_, out, _) = ferryctl(&h, &["vps", "ls", "-o", "json"]);
        assert_eq!(out.trim(), "[]");
    })
    .await;
}
