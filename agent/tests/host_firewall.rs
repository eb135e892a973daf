//! The host firewall, attacked: a VPS tries the host's services, and a VPS on
//! another node (the LAN client stands in for it: it reaches a node through
//! the uplink port, as such a VPS does) detours through the node's bridge
//! address to its management network. Each attack first succeeds against a
//! host without the firewall, so a pass means the firewall stopped it.

mod common;
use common::*;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A TCP service in a netns that answers "host" to every connection.
struct Listener {
    child: Child,
}

impl Listener {
    async fn start(netns: &str, ip: &str, port: u16, ready: PathBuf) -> Listener {
        let _ = std::fs::remove_file(&ready);
        let code = format!(
            "import socket\n\
             s = socket.socket()\n\
             s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('{ip}', {port}))\n\
             s.listen(16)\n\
             open('{}', 'w').close()\n\
             while True:\n\
             \x20   c, _ = s.accept()\n\
             \x20   c.sendall(b'host\\n')\n\
             \x20   c.close()\n",
            ready.display()
        );
        let child = Command::new("nsenter")
            .arg(format!("--net={netns}"))
            .args(["--", "python3", "-c", &code])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the listener");
        let end = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            assert!(Instant::now() < end, "the listener did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Listener { child }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A second network namespace on a host's management link.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        cleanup(&self.0);
    }
}

/// Gives `h` a management link: `mgmt` at 10.66.0.1/24 in the host, its peer
/// at 10.66.0.2/24 in a namespace of its own (another server on that network).
fn management_link(h: &Host) -> Netns {
    let peer = Netns(format!("{}m", h.id));
    cleanup(&peer.0);
    run_ok("ip", &["netns", "add", &peer.0]);
    let sh = |cmd: &str| {
        let out = h.sh(cmd);
        assert!(out.status.success(), "{cmd}: {out:?}");
    };
    sh(&format!(
        "ip link add mgmt type veth peer name eth0 netns {}",
        peer.0
    ));
    sh("ip addr add 10.66.0.1/24 dev mgmt && ip link set mgmt up");
    run_ok(
        "ip",
        &["-n", &peer.0, "addr", "add", "10.66.0.2/24", "dev", "eth0"],
    );
    run_ok("ip", &["-n", &peer.0, "link", "set", "eth0", "up"]);
    run_ok("ip", &["-n", &peer.0, "link", "set", "lo", "up"]);
    peer
}

/// Connects from inside the VPS; the service's answer, or "" when nothing
/// answered within 2 s.
async fn from_vps(h: &Host, vps: &str, ip: &str, port: u16) -> String {
    let mut c = h.client().await;
    let r = exec(
        &mut c,
        vps,
        &["sh", "-c", &format!("nc -w 2 {ip} {port} </dev/null")],
    )
    .await;
    r.stdout.trim().to_string()
}

/// Connects from a netns (python: busybox may not be on the host's PATH).
fn from_netns(netns: &str, ip: &str, port: u16) -> String {
    let code = format!(
        "import socket\n\
         s = socket.create_connection(('{ip}', {port}), timeout=2)\n\
         print(s.recv(16).decode().strip())\n"
    );
    let out = Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(["--", "python3", "-c", &code])
        .output()
        .expect("nsenter python3");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The packets the firewall dropped from VPSes on this host.
fn dropped(h: &Host) -> u64 {
    let table = ferry_agent::net::firewall::table_name(BRIDGE);
    let out = h.sh(&format!("nft list chain inet {table} from_vps"));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines()
        .filter(|l| l.contains("drop") && l.contains("counter packets"))
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "packets").nth(1))
        .filter_map(|n| n.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vps_cannot_reach_the_services_of_its_host() {
    bounded(120, async {
        // Without the firewall the attack works: that is what it stops.
        let open = Host::with_args(vec!["--host-firewall=false".into()]).await;
        let _peer_open = management_link(&open);
        let _l_open = Listener::start(
            &open.netns_path(),
            "0.0.0.0",
            7401,
            open.dir.join("ready-7401"),
        )
        .await;
        let mut c = open.client().await;
        create_started(&mut c, spec("fwopen", Some("10.77.0.20"))).await;
        assert_eq!(from_vps(&open, "fwopen", "10.77.0.1", 7401).await, "host");
        assert_eq!(from_vps(&open, "fwopen", "10.66.0.1", 7401).await, "host");
        drop(c);
        drop(open);

        let h = Host::with_args(vec!["--vps-host-allow".into(), "tcp:7402".into()]).await;
        let peer = management_link(&h);
        let _l1 = Listener::start(&h.netns_path(), "0.0.0.0", 7401, h.dir.join("ready-7401")).await;
        let _l2 = Listener::start(&h.netns_path(), "0.0.0.0", 7402, h.dir.join("ready-7402")).await;
        let mut c = h.client().await;
        create_started(&mut c, spec("fwvps", Some("10.77.0.21"))).await;
        let before = dropped(&h);
        // The gateway's address and the management address: both dropped.
        assert_eq!(from_vps(&h, "fwvps", "10.77.0.1", 7401).await, "");
        assert_eq!(from_vps(&h, "fwvps", "10.66.0.1", 7401).await, "");
        assert!(dropped(&h) > before, "the firewall's counter did not move");
        // What the operator allowed gets through; ping the gateway does too.
        assert_eq!(from_vps(&h, "fwvps", "10.77.0.1", 7402).await, "host");
        let r = exec(
            &mut c,
            "fwvps",
            &["ping", "-c", "1", "-W", "2", "10.77.0.1"],
        )
        .await;
        assert_eq!(r.code, 0, "ping the gateway: {} {}", r.stdout, r.stderr);
        // The host still reaches the VPS (its replies are let back in).
        assert_eq!(h.http_get("http://10.77.0.21/").await.trim(), "fwvps");
        // Host services are still there for everyone else.
        assert_eq!(from_netns(&h.netns_path(), "10.66.0.1", 7401), "host");
        assert_eq!(
            from_netns(&format!("/run/netns/{}", peer.0), "10.66.0.1", 7401),
            "host"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vps_on_another_node_cannot_detour_to_the_management_network() {
    bounded(120, async {
        for firewall in [false, true] {
            let lan = Lan::new();
            let mut args = vec!["--advertise".to_string(), "10.66.0.1:7700".to_string()];
            if !firewall {
                args.push("--host-firewall=false".into());
            }
            let mut h = Host::on_lan(&lan, "10.77.0.12/16", args).await;
            let peer = management_link(&h);
            // Restarted, the agent finds its management address on `mgmt`.
            h.kill_agent();
            h.start_agent().await;
            // The node routes (as a NAT gateway for its VPSes would).
            let out = h.sh("sysctl -qw net.ipv4.ip_forward=1");
            assert!(out.status.success(), "{out:?}");
            let _l = Listener::start(&h.netns_path(), "0.0.0.0", 7401, h.dir.join("ready")).await;
            let peer_ns = format!("/run/netns/{}", peer.0);
            let _lp = Listener::start(&peer_ns, "0.0.0.0", 7401, h.dir.join("ready-peer")).await;
            run_ok(
                "ip",
                &[
                    "-n",
                    &peer.0,
                    "route",
                    "add",
                    "10.77.0.0/16",
                    "via",
                    "10.66.0.1",
                ],
            );
            // The attacker on the LAN routes the management network via the node.
            run_ok(
                "ip",
                &[
                    "-n",
                    &lan.id,
                    "route",
                    "add",
                    "10.66.0.0/24",
                    "via",
                    "10.77.0.12",
                ],
            );
            // The node's bridge address answers: the LAN path works.
            assert_eq!(from_netns(&lan.client, "10.77.0.12", 7401), "host");
            let to_node = from_netns(&lan.client, "10.66.0.1", 7401);
            let to_peer = from_netns(&lan.client, "10.66.0.2", 7401);
            if firewall {
                assert_eq!(
                    to_node, "",
                    "the node's management address answered the LAN"
                );
                assert_eq!(
                    to_peer, "",
                    "the node forwarded the LAN into the management network"
                );
                assert_eq!(from_netns(&peer_ns, "10.66.0.1", 7401), "host");
            } else {
                assert_eq!((to_node.as_str(), to_peer.as_str()), ("host", "host"));
            }
        }
    })
    .await;
}

/// Turned off after it was on, the firewall is gone: its old tables would
/// otherwise drop every new VPS port (none is in their map).
#[tokio::test(flavor = "multi_thread")]
async fn turning_the_firewall_off_removes_it() {
    bounded(120, async {
        let mut h = Host::new().await;
        let table = ferry_agent::net::firewall::table_name(BRIDGE);
        let listed = |h: &Host| {
            h.sh(&format!("nft list table bridge {table}"))
                .status
                .success()
        };
        assert!(listed(&h), "the firewall was not installed");
        h.kill_agent();
        h.extra_args.push("--host-firewall=false".into());
        h.start_agent().await;
        assert!(!listed(&h), "the firewall's tables stayed");
        let mut c = h.client().await;
        create_started(&mut c, spec("fwoffa", Some("10.77.0.30"))).await;
        create_started(&mut c, spec("fwoffb", Some("10.77.0.31"))).await;
        // fwoffb's httpd starts a moment after its init runs.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let r = exec(
                &mut c,
                "fwoffa",
                &["timeout", "5", "wget", "-qO-", "http://10.77.0.31/"],
            )
            .await;
            if r.stdout.trim() == "fwoffb" {
                break;
            }
            assert!(std::time::Instant::now() < end, "{}", r.stderr);
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await;
}
