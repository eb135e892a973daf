//! Mutual TLS over real sockets: a real gRPC server (an echo RaftService)
//! behind the Ferry server layer, and clients with every kind of credential.
//! Refusals come back as gRPC statuses that say why, and the handler never
//! runs for them.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use ferry_proto::addr::{self, Addr};
use ferry_proto::controller::v1 as cpb;
use ferry_proto::tls::authz::{self, Policy};
use ferry_proto::tls::pki::{self, CERT_VALIDITY};
use ferry_proto::tls::{Ca, ClientTls, Credentials, Peer, Role, ServerTls, UserRole};
use tonic::{Code, Request, Response, Status};

/// Counts the calls that reached a handler.
#[derive(Clone, Default)]
struct Echo(Arc<AtomicU32>);

#[tonic::async_trait]
impl cpb::raft_service_server::RaftService for Echo {
    async fn append_entries(
        &self,
        r: Request<cpb::RaftPayload>,
    ) -> Result<Response<cpb::RaftPayload>, Status> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(r.into_inner()))
    }
    async fn vote(
        &self,
        r: Request<cpb::RaftPayload>,
    ) -> Result<Response<cpb::RaftPayload>, Status> {
        self.append_entries(r).await
    }
    async fn install_snapshot(
        &self,
        r: Request<cpb::RaftPayload>,
    ) -> Result<Response<cpb::RaftPayload>, Status> {
        self.append_entries(r).await
    }
    async fn propose(
        &self,
        r: Request<cpb::RaftPayload>,
    ) -> Result<Response<cpb::RaftPayload>, Status> {
        // The layer hands the verified identity to the handler.
        let who = r
            .extensions()
            .get::<pki::Identity>()
            .map(|i| i.role.to_string())
            .unwrap_or_default();
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(cpb::RaftPayload {
            json: who.into_bytes(),
        }))
    }
    async fn read_index(
        &self,
        _: Request<cpb::ReadIndexRequest>,
    ) -> Result<Response<cpb::ReadIndexResponse>, Status> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(cpb::ReadIndexResponse { index: 7 }))
    }
    async fn adopt(
        &self,
        _: Request<cpb::AdoptRequest>,
    ) -> Result<Response<cpb::AdoptResponse>, Status> {
        Ok(Response::new(cpb::AdoptResponse {}))
    }
}

/// Users by role; reads (`ReadIndex`) for viewers too.
struct TestPolicy;

impl Policy for TestPolicy {
    fn check(&self, path: &str, peer: &Peer) -> Result<(), Status> {
        let id = authz::verified(peer)?;
        let m = authz::method(path);
        match authz::user_may(&id.role, m) {
            Some(true) => Ok(()),
            Some(false) => Err(authz::denied(id, m)),
            None if id.role == Role::Controller => Ok(()),
            None => Err(authz::denied(id, m)),
        }
    }
}

struct Server {
    addr: Addr,
    calls: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn server(creds: &Credentials, tcp: bool) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr: Addr = if tcp {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        let port = l.local_addr().expect("addr").port();
        drop(l);
        format!("127.0.0.1:{port}").parse().expect("addr")
    } else {
        format!("unix:{}/s.sock", dir.path().display())
            .parse()
            .expect("addr")
    };
    let echo = Echo::default();
    let calls = echo.0.clone();
    let router = tonic::transport::Server::builder()
        .layer(addr::server_layer(Some(Arc::new(TestPolicy))))
        .add_service(cpb::raft_service_server::RaftServiceServer::new(echo));
    let tls = ServerTls::new(creds).expect("server tls");
    let a = addr.clone();
    let task = tokio::spawn(async move {
        let _ = addr::serve(router, &a, Some(tls)).await;
    });
    for _ in 0..100 {
        let up = match &addr {
            Addr::Unix(p) => p.exists(),
            Addr::Tcp(h) => tokio::net::TcpStream::connect(h.as_str()).await.is_ok(),
        };
        if up {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Server {
        addr,
        calls,
        task,
        _dir: dir,
    }
}

type Client = cpb::raft_service_client::RaftServiceClient<tonic::transport::Channel>;

async fn client(s: &Server, tls: Option<&ClientTls>) -> Result<Client, String> {
    addr::connect_with(&s.addr, tls)
        .await
        .map(Client::new)
        .map_err(|e| format!("{e:?}"))
}

async fn propose(c: &mut Client) -> Result<String, Status> {
    c.propose(cpb::RaftPayload {
        json: b"x".to_vec(),
    })
    .await
    .map(|r| String::from_utf8_lossy(&r.into_inner().json).into_owned())
}

fn user(ca: &Ca, name: &str, role: UserRole) -> Credentials {
    ca.issue(
        &Role::User {
            name: name.into(),
            role,
        },
        CERT_VALIDITY,
    )
    .expect("issue")
}

#[tokio::test]
async fn roles_get_what_they_may_and_bad_certificates_get_a_status() {
    let ca = Ca::generate("a").expect("ca");
    let other = Ca::generate("b").expect("ca");
    let srv_creds = ca.issue(&Role::Controller, CERT_VALIDITY).expect("issue");
    for tcp in [false, true] {
        let s = server(&srv_creds, tcp).await;
        let name = pki::CONTROLLER_SERVER_NAME;

        // An admin may do anything, and the handler sees who it is.
        let admin = ClientTls::new(&user(&ca, "ann", UserRole::Admin), name).expect("tls");
        let mut c = client(&s, Some(&admin)).await.expect("admin connects");
        assert_eq!(
            propose(&mut c).await.expect("admin proposes"),
            "user ann (admin)"
        );

        // A viewer reads, and may not write.
        let viewer = ClientTls::new(&user(&ca, "vic", UserRole::Viewer), name).expect("tls");
        let mut c = client(&s, Some(&viewer)).await.expect("viewer connects");
        assert_eq!(
            c.read_index(cpb::ReadIndexRequest {})
                .await
                .expect("read")
                .into_inner()
                .index,
            7
        );
        let e = propose(&mut c).await.expect_err("a viewer wrote");
        assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
        assert!(e.message().contains("vic"), "{}", e.message());

        let before = s.calls.load(Ordering::SeqCst);
        // No certificate at all.
        let fp = ca.fingerprint().expect("fp");
        let anon = ClientTls::pinned(&fp, name).expect("tls");
        let mut c = client(&s, Some(&anon)).await.expect("anonymous connects");
        let e = propose(&mut c)
            .await
            .expect_err("no certificate was let in");
        assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
        assert!(
            e.message().contains("no client certificate"),
            "{}",
            e.message()
        );

        // A certificate from another cluster's CA (trusting ours for the server).
        let mut foreign = user(&other, "eve", UserRole::Admin);
        foreign.ca_pem = ca.cert_pem.clone();
        let c_foreign = ClientTls::new(&foreign, name).expect("tls");
        let mut c = client(&s, Some(&c_foreign))
            .await
            .expect("foreign connects");
        let e = propose(&mut c)
            .await
            .expect_err("a foreign certificate was let in");
        assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
        assert!(e.message().contains("refused"), "{}", e.message());

        // An expired certificate of our own CA.
        let expired = ca
            .issue(
                &Role::User {
                    name: "old".into(),
                    role: UserRole::Admin,
                },
                time::Duration::minutes(-5),
            )
            .expect("issue");
        let c_exp = ClientTls::new(&expired, name).expect("tls");
        let mut c = client(&s, Some(&c_exp)).await.expect("expired connects");
        let e = propose(&mut c)
            .await
            .expect_err("an expired certificate was let in");
        assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
        assert!(
            e.message().to_lowercase().contains("expired"),
            "{}",
            e.message()
        );
        assert_eq!(
            s.calls.load(Ordering::SeqCst),
            before,
            "a refused call reached the handler"
        );

        // Plaintext to a TLS server gets nothing.
        match client(&s, None).await {
            Err(_) => {}
            Ok(mut c) => assert!(propose(&mut c).await.is_err(), "plaintext was served"),
        }
        // A client pinned to another CA, or expecting a node, never talks.
        let wrong_pin = ClientTls::pinned(&other.fingerprint().expect("fp"), name).expect("tls");
        let as_node = admin.for_server(pki::NODE_SERVER_NAME);
        for (what, t) in [("wrong pin", wrong_pin), ("wrong server name", as_node)] {
            match client(&s, Some(&t)).await {
                Err(_) => {}
                Ok(mut c) => assert!(propose(&mut c).await.is_err(), "{what}: talked"),
            }
        }
        assert_eq!(s.calls.load(Ordering::SeqCst), before);
    }
}
