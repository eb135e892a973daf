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
