//! A Debian template, built by scripts/make-debian-template.sh as the README
//! shows, boots sysvinit as a VPS. Skipped, saying why, when debootstrap or a
//! Debian mirror cannot be had here. The archive is cached in
//! /var/tmp/ferry-cache across runs.

mod common;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use ferry_proto::agent::v1 as pb;

const CACHE: &str = "/var/tmp/ferry-cache/debian12-v1.tar.zst";

fn template_archive() -> Result<&'static str, String> {
    if Path::new(CACHE).exists() {
        return Ok(CACHE);
    }
    if std::process::Command::new("debootstrap")
        .arg("--version")
        .output()
        .is_err()
    {
        return Err("debootstrap is not installed".into());
    }
    std::fs::create_dir_all("/var/tmp/ferry-cache").map_err(|e| e.to_string())?;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/make-debian-template.sh"
    );
    let out = std::process::Command::new(script)
        .arg(CACHE)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "debootstrap failed (no Debian mirror?): {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(CACHE)
}

#[tokio::test(flavor = "multi_thread")]
async fn debian_template_boots_sysvinit() {
    bounded(600, async {
        let archive = match tokio::task::spawn_blocking(template_archive).await.unwrap() {
            Ok(a) => a,
            Err(why) => {
                println!("SKIPPED debian_template_boots_sysvinit: {why}");
                return;
            }
        };
        let h = Host::new().await;
        let mut c = h.client().await;
        // As an operator does for --on-node: the archive goes into the
        // node's import dir, the only place the agent reads one from.
        let staged = h.data_dir().join("import/debian12.tar.zst");
        if std::fs::hard_link(archive, &staged).is_err() {
            std::fs::copy(archive, &staged).expect("copying the archive into the import dir");
        }
        c.import_template_path(pb::ImportTemplatePathRequest {
            header: Some(pb::ImportTemplateHeader {
                name: "debian12".into(),
                ..Default::default()
            }),
            path: "debian12.tar.zst".into(),
        })
        .await
        .unwrap();
        let mut s = spec("deb1", Some("10.77.0.70"));
        s.template = "debian12".into();
        s.stop_signal = "SIGPWR".into();
        create_started(&mut c, s).await;
        let r = exec(&mut c, "deb1", &["cat", "/etc/debian_version"]).await;
        assert!(r.stdout.starts_with("12."), "{} {}", r.stdout, r.stderr);
        assert_eq!(
            exec(&mut c, "deb1", &["hostname"]).await.stdout.trim(),
            "deb1",
            "boot scripts kept our hostname"
        );
        // sysvinit reaches its runlevel as PID 1.
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let r = exec(&mut c, "deb1", &["ps", "-o", "pid=,args=", "-p", "1"]).await;
            if r.stdout.contains("init [2]") {
                break;
            }
            assert!(
                Instant::now() < end,
                "init did not reach runlevel 2: {}",
                r.stdout
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let r = exec(&mut c, "deb1", &["ping", "-c", "1", "-W", "2", "10.77.0.1"]).await;
        assert_eq!(r.code, 0, "{}", r.stdout);
        // A package installed with apt inside the (unprivileged) VPS: apt and
        // dpkg run as the VPS's root, apt's own sandbox user too. The .deb
        // comes from the host's mirror (the VPS LAN has no way out here).
        let dl = h.dir.join("deb-download");
        std::fs::create_dir_all(&dl).unwrap();
        let got = std::process::Command::new("apt-get")
            .args(["download", "hello"])
            .current_dir(&dl)
            .output()
            .expect("running apt-get download");
        let deb = std::fs::read_dir(&dl)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"));
        match deb {
            None => println!(
                "apt inside the VPS not tried: the host could not download a .deb: {}",
                String::from_utf8_lossy(&got.stderr)
            ),
            Some(deb) => {
                // Through the mounted rootfs, as the isolation probes go in.
                let inside = h.data_dir().join("vps/deb1/rootfs/tmp/hello.deb");
                std::fs::copy(&deb, &inside).unwrap();
                let r = exec_t(
                    &mut c,
                    "deb1",
                    &["apt-get", "install", "-y", "/tmp/hello.deb"],
                    120,
                )
                .await;
                assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
                let r = exec(&mut c, "deb1", &["hello"]).await;
                assert_eq!(r.stdout.trim(), "Hello, world!", "{}", r.stderr);
                let r = exec(&mut c, "deb1", &["cat", "/proc/self/uid_map"]).await;
                assert_ne!(
                    r.stdout.split_whitespace().nth(1),
                    Some("0"),
                    "{}",
                    r.stdout
                );
            }
        }
        // Stop is a clean shutdown, not a kill after the timeout.
        let t = Instant::now();
        let v = stop(&mut c, "deb1", 20, false).await;
        assert!(stopped(&v) && v.exit_signal != 9, "{v:?}");
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "shutdown took {:?}",
            t.elapsed()
        );
        c.destroy_vps(pb::DestroyVpsRequest {
            name: "deb1".into(),
            force: true,
            generation: 0,
        })
        .await
        .unwrap();
    })
    .await;
}
