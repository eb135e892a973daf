//! The post-copy page tunnel, attacked: the serving end carries a VPS's
//! memory, so only a node of the cluster may take it, and the dialling end
//! talks only to the node the migration came from. A stand-in page server
//! (a TCP listener that sends "PAGES" and counts its connections) sits where
//! CRIU's would.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_agent::criu::tunnel::{start_dial, start_serve, PAGE_SERVER_IP};
use ferry_proto::tls::pki::CERT_VALIDITY;
use ferry_proto::tls::{Ca, Role, UserRole};

const AGENT: &str = env!("CARGO_BIN_EXE_ferry-agent");

/// A page server that greets each connection and counts them.
fn fake_page_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind((PAGE_SERVER_IP, 0)).expect("binding the page server");
    let at = l.local_addr().expect("its address");
    let n = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&n);
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            let mut s = s;
            let _ = s.write_all(b"PAGES");
        }
    });
    (at, n)
}

fn save(dir: &Path, name: &str, c: &ferry_proto::tls::Credentials) -> std::path::PathBuf {
    let p = dir.join(name);
    c.save(&p).expect("saving credentials");
    p
}

/// Reads what arrives on `s` within 5 s.
fn read_some(s: &mut impl Read) -> String {
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(_) => String::new(),
    }
}

#[test]
fn only_a_node_of_the_cluster_takes_the_tunnel_and_only_to_its_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::generate("tunnel").expect("ca");
    let node = |n: &str| {
        ca.issue(&Role::Node(n.into()), CERT_VALIDITY)
            .expect("node")
    };
    let src = save(dir.path(), "src.pem", &node("src"));
    let dst = save(dir.path(), "dst.pem", &node("dst"));
    let viewer = ca
        .issue(
            &Role::User {
                name: "eve".into(),
                role: UserRole::Viewer,
            },
            CERT_VALIDITY,
        )
        .expect("viewer");
    let viewer = save(dir.path(), "viewer.pem", &viewer);
    let other_ca = Ca::generate("other").expect("ca");
    let stranger = other_ca
        .issue(&Role::Node("dst".into()), CERT_VALIDITY)
        .expect("stranger");
    let stranger = save(dir.path(), "stranger.pem", &stranger);

    let (ps, served) = fake_page_server();
    let log = dir.path().join("serve.log");
    let tunnel =
        start_serve(Path::new(AGENT), Ipv4Addr::LOCALHOST, ps, Some(&src), &log).expect("serve");
    let at: SocketAddr = tunnel.address.parse().expect("tunnel address");

    // Plain TCP: nothing comes back, and the page server is not touched.
    let mut raw = TcpStream::connect(at).expect("connecting");
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = raw.write_all(b"PS_IOV_GET please");
    assert!(
        !read_some(&mut raw).contains("PAGES"),
        "plain TCP got pages"
    );
    drop(raw);
    // A viewer's certificate, and a node certificate of another CA: the same.
    for (who, creds) in [("a viewer", &viewer), ("another CA's node", &stranger)] {
        let (t, sock) = start_dial(
            Path::new(AGENT),
            at,
            "src",
            Some(creds),
            &dir.path().join("d.log"),
        )
        .expect("dial");
        let mut s = std::os::unix::net::UnixStream::from(sock);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(read_some(&mut s), "", "{who} got pages");
        drop(t);
    }
    assert_eq!(
        served.load(Ordering::SeqCst),
        0,
        "the page server was reached"
    );

    // A dial that expects another source refuses this tunnel.
    let (t, sock) = start_dial(
        Path::new(AGENT),
        at,
        "mallory",
        Some(&dst),
        &dir.path().join("m.log"),
    )
    .expect("dial");
    let mut s = std::os::unix::net::UnixStream::from(sock);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(
        read_some(&mut s),
        "",
        "a tunnel of the wrong node was trusted"
    );
    drop(t);
    assert_eq!(served.load(Ordering::SeqCst), 0);

    // A peer that connects and stalls its handshake does not keep the
    // target waiting (handshakes run side by side; the read allows 5 s, a
    // stalled handshake is given 10).
    let _stall = TcpStream::connect(at).expect("connecting");
    std::thread::sleep(Duration::from_millis(200));
    // The target node, expecting this source: the pages flow, once.
    let (t, sock) = start_dial(
        Path::new(AGENT),
        at,
        "src",
        Some(&dst),
        &dir.path().join("ok.log"),
    )
    .expect("dial");
    let mut s = std::os::unix::net::UnixStream::from(sock);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(
        read_some(&mut s),
        "PAGES",
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(served.load(Ordering::SeqCst), 1);
    drop(s);
    assert!(
        t.finish(Duration::from_secs(10)),
        "the dialling end did not end cleanly"
    );
    assert!(
        tunnel.finish(Duration::from_secs(10)),
        "the serving end did not end cleanly"
    );
}
