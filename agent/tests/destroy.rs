//! Destroy leaves nothing behind: no cgroup, mount, veth, netns or rootfs.

mod common;
use common::*;
use ferry_proto::agent::v1 as pb;

#[tokio::test(flavor = "multi_thread")]
async fn destroy_leaves_nothing_behind() {
    bounded(90, async {
        let h = Host::new().await;
        let mut c = h.client().await;
        let v = create_started(&mut c, spec("gone1", Some("10.77.0.50"))).await;
        let r = exec(&mut c, "gone1", &["sh", "-c", "echo data > /root/file"]).await;
        assert_eq!(r.code, 0);
        let veth = v.host_veth.clone();
        let vdir = h.data_dir().join("vps/gone1");
        let rdir = h.run_dir().join("gone1");
        assert!(h.cgroup_dirs("gone1").iter().all(|d| d.exists()));
        assert!(
            vdir.join("upper/root/file").exists(),
            "the VPS's files live in its upper dir"
        );
        assert!(mounts_under(&vdir) >= 1 && rdir.join("netns").exists());

        c.destroy_vps(pb::DestroyVpsRequest {
            name: "gone1".into(),
            force: true,
            generation: 0,
        })
        .await
        .unwrap();

        for d in h.cgroup_dirs("gone1") {
            assert!(!d.exists(), "cgroup left: {}", d.display());
        }
        assert_eq!(mounts_under(&vdir) + mounts_under(&rdir), 0, "mount left");
        assert!(!vdir.exists(), "rootfs left");
        assert!(!rdir.exists(), "run dir (netns file) left");
        let links = h.sh("ip -o link");
        let links = String::from_utf8_lossy(&links.stdout);
        assert!(!links.contains(&veth), "veth left: {links}");
        assert!(
            !links.contains("fv") && !links.contains("fp"),
            "some veth left: {links}"
        );
        assert!(
            !std::path::Path::new(&format!("/proc/{}", v.init_pid)).exists(),
            "init still alive"
        );
        // The name is free again.
        create_started(&mut c, spec("gone1", Some("10.77.0.50"))).await;
    })
    .await;
}

fn mounts_under(p: &std::path::Path) -> usize {
    let s = p.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&s)))
        .count()
}

/// A VPS cgroup left behind with its leaf (a crash, or a cleanup that could
/// not remove it) on a migration's target: the restore reuses it. The v1
/// devices controller refuses to reset the rules of a cgroup with children,
/// which failed the cluster demo's migration once.
#[tokio::test(flavor = "multi_thread")]
async fn a_leftover_cgroup_with_its_leaf_does_not_stop_an_arrival() {
    bounded(120, async {
        let lan = Lan::new();
        let a = Host::on_lan(&lan, "10.77.0.57/16", vec![]).await;
        let b = Host::on_lan(&lan, "10.77.0.58/16", vec![]).await;
        let name = format!("lc{}", std::process::id());
        for d in b.cgroup_dirs(&name) {
            std::fs::create_dir_all(d.join(ferry_agent::cgroup::LEAF))
                .expect("making the leftover cgroup");
        }
        let mut ca = a.client().await;
        create_started(&mut ca, spec(&name, Some("10.77.9.16"))).await;
        let ev = migrate_vps(
            &mut ca,
            &name,
            &b,
            ferry_proto::agent::v1::MigrationMode::StopCopy,
            false,
            |_| {},
        )
        .await;
        assert!(ev.error.is_empty(), "{}", ev.error);
        let mut cb = b.client().await;
        let r = exec(&mut cb, &name, &["true"]).await;
        assert_eq!(r.code, 0, "{}", r.stderr);
    })
    .await;
}
