//! Templates as cluster objects, as an operator uses them: imported once
//! through the controller onto one node, then a VPS created on a node that
//! lacks it, a migration and a drain to such nodes all work (the node
//! fetches it from one that has it and checks its sha256); `template ls`
//! shows where each is; `template rm` refuses while a VPS uses it. A fetch
//! whose archive is not the cluster's installs nothing.

mod common;
use common::*;

use ferry_cluster_tests::{run_ok, Cluster, Role};
use ferry_proto::agent::v1 as apb;

fn ok(out: (i32, String, String), what: &str) -> String {
    let (code, o, e) = out;
    assert_eq!(code, 0, "{what}: {o}{e}");
    o
}

/// A template archive: host 1's busybox tree with a marker naming it.
fn template_tar(cl: &Cluster, name: &str) -> std::path::PathBuf {
    let root = cl.dir.join(format!("{name}-root"));
    let _ = std::fs::remove_dir_all(&root);
    let busybox = cl.agent_data_dir(1).join("templates/busybox/rootfs");
    run_ok(
        "cp",
        &["-a", busybox.to_str().unwrap(), root.to_str().unwrap()],
    );
    std::fs::write(root.join("etc/ferry-template"), name).unwrap();
    let tar = cl.dir.join(format!("{name}.tar"));
    run_ok(
        "tar",
        &[
            "-C",
            root.to_str().unwrap(),
            "-cf",
            tar.to_str().unwrap(),
            ".",
        ],
    );
    tar
}

/// The nodes `template ls` says have template `name`, once `f` holds.
async fn holders_when(cl: &Cluster, name: &str, f: impl Fn(&str) -> bool) -> String {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let out = ok(cl.ferryctl(&["template", "ls"]), "template ls");
        let nodes = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().last())
            .unwrap_or("")
            .to_string();
        if f(&nodes) {
            return nodes;
        }
        assert!(std::time::Instant::now() < end, "template ls said:\n{out}");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

async fn has_template(cl: &Cluster, i: usize, name: &str) -> bool {
    cl.agent_client(i)
        .await
        .list_templates(apb::ListTemplatesRequest {})
        .await
        .expect("list templates")
        .into_inner()
        .templates
        .iter()
        .any(|t| t.name == name)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_template_imported_once_follows_its_vpses() {
    let _one = Cluster::lock().await;
    bounded(400, async {
        let cl = Cluster::start(&[Role::Both, Role::Both, Role::Both]).await;
        let (_, mut c) = cl.leader().await;
        let tag = format!("t{}", std::process::id());
        let tpl = format!("{tag}a");
        let tar = template_tar(&cl, &tpl);

        // Imported once, through the controller, onto n1 only.
        let out = ok(
            cl.ferryctl(&[
                "template",
                "import",
                &tpl,
                tar.to_str().unwrap(),
                "--node",
                "n1",
            ]),
            "import",
        );
        assert!(out.contains(&format!("template {tpl} is on n1")), "{out}");
        assert!(!has_template(&cl, 2, &tpl).await && !has_template(&cl, 3, &tpl).await);
        holders_when(&cl, &tpl, |n| n == "n1").await;

        // A VPS created on n2, which lacks it: n2 fetches it.
        let v1 = format!("{tag}v1");
        ok(
            cl.ferryctl(&[
                "vps",
                "create",
                &v1,
                "--template",
                &tpl,
                "--memory",
                "64M",
                "--node",
                "n2",
                "--start",
            ]),
            "create on n2",
        );
        record_when(&mut c, &v1, |v| v.observed == "running").await;
        let (code, o, e) = cl.ferryctl(&["vps", "exec", &v1, "--", "cat", "/etc/ferry-template"]);
        assert_eq!((code, o.trim()), (0, tpl.as_str()), "{e}");
        // Fetching it took nothing from the node it came from.
        assert!(has_template(&cl, 1, &tpl).await);
        holders_when(&cl, &tpl, |n| n == "n1,n2").await;

        // A live migration to n3, which lacks it.
        ok(
            cl.ferryctl(&["vps", "migrate", &v1, "--to", "n3"]),
            "migrate to n3",
        );
        record_when(&mut c, &v1, |v| v.node == "n3" && v.observed == "running").await;
        assert!(has_template(&cl, 3, &tpl).await);

        // A drain whose targets lack the VPS's template.
        let tpl_b = format!("{tag}b");
        let tar_b = template_tar(&cl, &tpl_b);
        ok(
            cl.ferryctl(&[
                "template",
                "import",
                &tpl_b,
                tar_b.to_str().unwrap(),
                "--node",
                "n1",
            ]),
            "import b",
        );
        // Not pinned (a drain leaves pinned VPSes be): the others cordoned
        // while it is placed.
        let v2 = format!("{tag}v2");
        for n in ["n2", "n3"] {
            ok(cl.ferryctl(&["node", "cordon", n]), "cordon");
        }
        ok(
            cl.ferryctl(&[
                "vps",
                "create",
                &v2,
                "--template",
                &tpl_b,
                "--memory",
                "64M",
                "--start",
            ]),
            "create on n1",
        );
        for n in ["n2", "n3"] {
            ok(cl.ferryctl(&["node", "uncordon", n]), "uncordon");
        }
        record_when(&mut c, &v2, |v| v.observed == "running").await;
        let out = ok(
            cl.ferryctl(&["node", "drain", "n1", "--follow"]),
            "drain n1",
        );
        eprintln!("{out}");
        let v = record_when(&mut c, &v2, |v| v.node != "n1" && v.observed == "running").await;
        let there: usize = v.node.trim_start_matches('n').parse().expect("node n<i>");
        assert!(has_template(&cl, there, &tpl_b).await);
        ok(
            cl.ferryctl(&["node", "restore", "n1", "--follow"]),
            "restore n1",
        );

        // Removal is refused while a VPS uses it.
        let (code, _, err) = cl.ferryctl(&["template", "rm", &tpl]);
        assert_ne!(code, 0);
        assert!(err.contains(&format!("in use by VPS {v1}")), "{err}");

        // A node asked to fetch an archive that is not the cluster's (a
        // wrong digest: a holder serving something else) installs nothing.
        let e = cl
            .agent_client(2)
            .await
            .fetch_template(apb::FetchTemplateRequest {
                name: format!("{tag}x"),
                sha256: "0".repeat(64),
                from_node: "n1".into(),
                from_addr: Cluster::agent_addr(1),
            })
            .await
            .unwrap_err();
        // n1 has no template of that name: nothing to fetch...
        assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
        // (On the node the drain did not use: it lacks the template.)
        let other = if there == 2 { 3 } else { 2 };
        let e = cl
            .agent_client(other)
            .await
            .fetch_template(apb::FetchTemplateRequest {
                name: tpl_b.clone(),
                sha256: "0".repeat(64),
                from_node: "n1".into(),
                from_addr: Cluster::agent_addr(1),
            })
            .await
            .unwrap_err();
        // ...and one whose digest differs is refused, and installs nothing.
        assert!(e.message().contains("not the cluster's"), "{e}");
        assert!(!has_template(&cl, other, &tpl_b).await);

        // Once unused it goes, from the cluster and from every node.
        for v in [&v1, &v2] {
            ok(cl.ferryctl(&["vps", "destroy", v, "--force"]), "destroy");
        }
        let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let (code, _, err) = cl.ferryctl(&["template", "rm", &tpl]);
            if code == 0 {
                break;
            }
            // The deleted VPSes' tombstones settle first.
            assert!(std::time::Instant::now() < end, "{err}");
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
        let out = ok(cl.ferryctl(&["template", "ls"]), "ls");
        assert!(!out.contains(&format!("{tpl} ")), "{out}");
        for i in 1..=3 {
            assert!(!has_template(&cl, i, &tpl).await, "still on n{i}");
        }
    })
    .await;
}
