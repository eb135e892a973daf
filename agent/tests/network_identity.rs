//! A VPS's port passes only its own identity: root in a VPS takes a
//! neighbour's address (adds its IP, announces it by gratuitous ARP requests) or
//! changes its MAC, first on a host without the filter (the takeover works),
//! then with it (the neighbour keeps its traffic). The same after a
//! migration: the filter follows the VPS to its new node.

mod common;
use common::*;
use ferry_proto::agent::v1 as pb;

/// The MAC this host's netns has for `ip`, or "".
fn neighbour_mac(h: &Host, ip: &str) -> String {
    let out = h.sh(&format!("ip neigh show {ip}"));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split_whitespace()
        .skip_while(|w| *w != "lladdr")
        .nth(1)
        .unwrap_or("")
        .to_string()
}

/// Root in `attacker` claims `victim_ip` and announces it.
async fn take_over(h: &Host, attacker: &str, victim_ip: &str) {
    let mut c = h.client().await;
    let r = exec(
        &mut c,
        attacker,
        &[
            "sh",
            "-c",
            &format!(
                "ip addr add {victim_ip}/16 dev eth0 && \
                 arping -U -c 3 -w 1 -I eth0 -s {victim_ip} {victim_ip}; true"
            ),
        ],
    )
    .await;
    assert_eq!(r.code, 0, "the attack itself failed: {}", r.stderr);
}

/// Runs the takeover on `h`: A at `a_ip` attacks B at `b_ip`. Returns what the
/// host then gets from B's address and the MAC it has for it.
async fn attack(h: &Host, a: &str, b: &str, b_ip: &str) -> (String, String) {
    // The host knows B (a fresh, confirmed neighbour entry).
    assert_eq!(h.http_get(&format!("http://{b_ip}/")).await.trim(), b);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    take_over(h, a, b_ip).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let body = h.http_get(&format!("http://{b_ip}/")).await;
    (body.trim().to_string(), neighbour_mac(h, b_ip))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vps_cannot_take_a_neighbours_address() {
    bounded(150, async {
        // Without the filter, the neighbour's traffic is taken.
        let open = Host::with_args(vec!["--host-firewall=false".into()]).await;
        let mut c = open.client().await;
        let a = create_started(&mut c, spec("idopena", Some("10.77.0.40"))).await;
        create_started(&mut c, spec("idopenb", Some("10.77.0.41"))).await;
        let (body, mac) = attack(&open, "idopena", "idopenb", "10.77.0.41").await;
        assert_eq!(
            (body.as_str(), mac.as_str()),
            ("idopena", a.mac.as_str()),
            "the takeover did not work without the filter: the test proves nothing"
        );
        drop(c);
        drop(open);

        let mut h = Host::new().await;
        let mut c = h.client().await;
        create_started(&mut c, spec("ida", Some("10.77.0.42"))).await;
        let b = create_started(&mut c, spec("idb", Some("10.77.0.43"))).await;
        let (body, mac) = attack(&h, "ida", "idb", "10.77.0.43").await;
        assert_eq!((body.as_str(), mac.as_str()), ("idb", b.mac.as_str()));

        // A new MAC passes nothing: the VPS is cut off, B is not.
        let r = exec(
            &mut c,
            "ida",
            &[
                "sh",
                "-c",
                "ip addr del 10.77.0.43/16 dev eth0; \
                 ip link set eth0 address 02:00:00:00:00:01 && \
                 timeout 3 wget -qO- http://10.77.0.43/",
            ],
        )
        .await;
        assert_ne!(r.stdout.trim(), "idb", "a forged MAC still reached B");
        assert_eq!(h.http_get("http://10.77.0.43/").await.trim(), "idb");
        // Its own identity back, A works again.
        let a = get(&mut c, "ida").await;
        let r = exec(
            &mut c,
            "ida",
            &[
                "sh",
                "-c",
                &format!(
                    "ip link set eth0 address {} && timeout 5 wget -qO- http://10.77.0.43/",
                    a.mac
                ),
            ],
        )
        .await;
        assert_eq!(r.stdout.trim(), "idb", "{}", r.stderr);

        // A restarted agent keeps the running VPSes' filters: they still
        // work, and the takeover still fails.
        h.kill_agent();
        h.start_agent().await;
        let mut c = h.client().await;
        let r = exec(
            &mut c,
            "ida",
            &["timeout", "5", "wget", "-qO-", "http://10.77.0.43/"],
        )
        .await;
        assert_eq!(r.stdout.trim(), "idb", "{}", r.stderr);
        let (body, mac) = attack(&h, "ida", "idb", "10.77.0.43").await;
        assert_eq!((body.as_str(), mac.as_str()), ("idb", b.mac.as_str()));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_filter_follows_a_migrated_vps() {
    let _heavy = HEAVY.lock().await;
    bounded(240, async {
        let lan = Lan::new();
        let src = Host::on_lan(&lan, "10.77.0.51/16", vec![]).await;
        let dst = Host::on_lan(&lan, "10.77.0.52/16", vec![]).await;
        let mut cs = src.client().await;
        let mut cd = dst.client().await;
        create_started(&mut cs, spec("idmove", Some("10.77.0.44"))).await;
        let b = create_started(&mut cd, spec("idstay", Some("10.77.0.45"))).await;
        let ev = migrate_vps(
            &mut cs,
            "idmove",
            &dst,
            pb::MigrationMode::StopCopy,
            false,
            |_| {},
        )
        .await;
        assert!(ev.error.is_empty(), "migration failed: {}", ev.error);
        // On the target, the migrated VPS attacks its new neighbour.
        let (body, mac) = attack(&dst, "idmove", "idstay", "10.77.0.45").await;
        assert_eq!((body.as_str(), mac.as_str()), ("idstay", b.mac.as_str()));
        // The source keeps no filter for a port it no longer has.
        let table = ferry_agent::net::firewall::table_name(BRIDGE);
        let out = src.sh(&format!("nft list table bridge {table}"));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{out:?}");
        assert!(!text.contains("chain port_"), "{text}");
    })
    .await;
}
