//! VPS networking: the host reaches a VPS's httpd, VPSes reach each other.

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn host_and_vps_reach_vps_over_the_bridge() {
    bounded(90, async {
        let h = Host::new().await;
        let mut c = h.client().await;
        let a = create_started(&mut c, spec("neta", Some("10.77.0.10"))).await;
        create_started(&mut c, spec("netb", Some("10.77.0.11"))).await;
        assert_eq!(
            a.mac,
            "02:fe:".to_string() + &a.mac[6..],
            "derived MAC is locally administered: {}",
            a.mac
        );

        // Inside: eth0 with the address, MAC and a default route via the bridge.
        let r = exec(&mut c, "neta", &["sh", "-c", "ip addr show eth0; ip route"]).await;
        assert!(r.stdout.contains("10.77.0.10/16"), "{}", r.stdout);
        assert!(r.stdout.contains(&a.mac), "{}", r.stdout);
        assert!(
            r.stdout.contains("default via 10.77.0.1 dev eth0"),
            "{}",
            r.stdout
        );

        // The host (this test host's netns) fetches the page httpd serves.
        let body = h.http_get("http://10.77.0.10/").await;
        assert_eq!(body.trim(), "neta");

        // VPS A reaches VPS B, by TCP and by ping.
        let r = exec(
            &mut c,
            "neta",
            &["timeout", "5", "wget", "-qO-", "http://10.77.0.11/"],
        )
        .await;
        assert_eq!((r.code, r.stdout.trim()), (0, "netb"), "{}", r.stderr);
        let r = exec(
            &mut c,
            "netb",
            &["ping", "-c", "1", "-W", "2", "10.77.0.10"],
        )
        .await;
        assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);

        // The host side is a veth on the node bridge.
        let link = h.sh(&format!("ip -o link show {}", a.host_veth));
        assert!(
            String::from_utf8_lossy(&link.stdout).contains(&format!("master {BRIDGE}")),
            "{:?}",
            link
        );
    })
    .await;
}
