//! ferryctl's connection to the controller: every replica of the list at
//! once, each call to the one that answered last, and on to the next when a
//! replica is gone or has no leader.
//!
//! Replicas are dialled in parallel, so one that is cut off (its SYNs go
//! unanswered) costs nothing while another answers. A call that fails on
//! its way (connection lost, `Unavailable`) goes to the next replica when
//! that is safe ([`ferry_proto::retry`]): reads always; writes the
//! controller applies once per request id carry a fresh id, and the repeat
//! answers the first try's result; other writes are never sent twice.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_proto::addr::Addr;
use ferry_proto::controller::v1::controller_service_client::ControllerServiceClient;
use ferry_proto::retry::{controller_call, Retry, NOT_APPLIED, REQUEST_ID};
use http_body_util::BodyExt;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::Channel;
use tower::ServiceExt;

/// A controller client over every replica of the list.
pub type Client = ControllerServiceClient<Replicas>;

/// How long one call keeps trying replicas (a leader election takes a few
/// seconds; a write waits up to 5 s for a leader on its replica).
const KEEP_TRYING: Duration = Duration::from_secs(30);
/// How long a retryable call waits for its replica's answer before asking
/// another (the replica's own waits end sooner: 5 s for a leader, 5 s for
/// a read barrier).
const ANSWER_WITHIN: Duration = Duration::from_secs(12);
/// Pause between rounds over the list.
const ROUND_PAUSE: Duration = Duration::from_millis(200);
/// Rounds in which every connected replica failed below gRPC (no answer at
/// all: a plaintext client against TLS, a wrong port) before giving up;
/// replicas that answer `Unavailable` (an election) are waited for longer.
const SILENT_ROUNDS: u32 = 3;
/// The gRPC status `Unavailable` (no leader reachable from that replica).
const UNAVAILABLE: &str = "14";

#[derive(Clone)]
enum Slot {
    Dialing,
    Up(Channel),
    Down(String),
}

struct Inner {
    addrs: Vec<Addr>,
    slots: Mutex<Vec<Slot>>,
    /// Bumped whenever a slot changes.
    changed: tokio::sync::watch::Sender<u64>,
    /// The replica that answered last (first to try).
    preferred: AtomicUsize,
}

#[derive(Clone)]
pub struct Replicas(Arc<Inner>);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Replicas {
    /// Dials every replica of `list` (`ADDR[,ADDR...]`) and returns once one
    /// answers, or fails with every replica's reason.
    pub async fn connect(list: &str) -> anyhow::Result<Client> {
        let addrs = list
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| a.parse::<Addr>().map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if addrs.is_empty() {
            anyhow::bail!("no controller address given (--controller ADDR[,ADDR...])");
        }
        let n = addrs.len();
        let r = Replicas(Arc::new(Inner {
            addrs,
            slots: Mutex::new(vec![Slot::Dialing; n]),
            changed: tokio::sync::watch::channel(0).0,
            preferred: AtomicUsize::new(usize::MAX),
        }));
        for i in 0..n {
            r.dial(i);
        }
        let mut rx = r.0.changed.subscribe();
        loop {
            let slots = r.slots();
            if slots.iter().any(|s| matches!(s, Slot::Up(_))) {
                break;
            }
            if slots.iter().all(|s| matches!(s, Slot::Down(_))) {
                anyhow::bail!("no controller answered ({})", r.reasons(&slots));
            }
            if rx.changed().await.is_err() {
                anyhow::bail!("no controller answered");
            }
        }
        Ok(ferry_proto::limits::controller_client(r))
    }

    fn slots(&self) -> Vec<Slot> {
        self.0
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, i: usize, s: Slot) {
        self.0.slots.lock().unwrap_or_else(|p| p.into_inner())[i] = s;
        self.0.changed.send_modify(|v| *v += 1);
    }

    fn reasons(&self, slots: &[Slot]) -> String {
        let why: Vec<String> = self
            .0
            .addrs
            .iter()
            .zip(slots)
            .map(|(a, s)| match s {
                Slot::Down(e) => e.clone(),
                Slot::Dialing => format!("{a}: still connecting"),
                Slot::Up(_) => format!("{a}: connected, but did not answer"),
            })
            .collect();
        why.join("; ")
    }

    /// Connects to replica `i` in the background.
    fn dial(&self, i: usize) {
        self.set(i, Slot::Dialing);
        let r = self.clone();
        tokio::spawn(async move {
            let addr = r.0.addrs[i].clone();
            let s = match ferry_proto::addr::connect_controller(&addr).await {
                Ok(ch) => {
                    let _ = r.0.preferred.compare_exchange(
                        usize::MAX,
                        i,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    );
                    Slot::Up(ch)
                }
                Err(e) => Slot::Down(format!("{addr}: {}", source_chain(&e))),
            };
            r.set(i, s);
        });
    }

    /// Sends one call, to replica after replica as long as that is safe.
    async fn send(self, req: http::Request<Body>) -> Result<http::Response<Body>, BoxError> {
        let (parts, body) = req.into_parts();
        let body = body.collect().await?.to_bytes();
        let retry = controller_call(parts.uri.path());
        let mut headers = parts.headers.clone();
        if retry == Retry::WithId && !headers.contains_key(REQUEST_ID) {
            headers.insert(REQUEST_ID, http::HeaderValue::from_str(&new_request_id()?)?);
        }
        let build = || {
            let mut b = http::Request::builder()
                .method(parts.method.clone())
                .uri(parts.uri.clone())
                .version(parts.version);
            if let Some(h) = b.headers_mut() {
                *h = headers.clone();
            }
            b.body(Body::new(http_body_util::Full::new(body.clone())))
        };
        let n = self.0.addrs.len();
        let end = Instant::now() + KEEP_TRYING;
        let mut last = String::new();
        let mut rx = self.0.changed.subscribe();
        let mut silent_rounds = 0;
        loop {
            let slots = self.slots();
            let first = self.0.preferred.load(Ordering::SeqCst) % n;
            let mut tried = false;
            let mut answered = false;
            for i in (0..n).map(|k| (first + k) % n) {
                let Slot::Up(ch) = &slots[i] else { continue };
                tried = true;
                let call = ch.clone().oneshot(build()?);
                let answer = match retry {
                    Retry::Never => call.await.map_err(|e| e.to_string()),
                    _ => match tokio::time::timeout(ANSWER_WITHIN, call).await {
                        Ok(a) => a.map_err(|e| source_chain(&e)),
                        Err(_) => Err(format!("no answer within {} s", ANSWER_WITHIN.as_secs())),
                    },
                };
                match answer {
                    Ok(resp) => {
                        answered = true;
                        let unavailable = resp
                            .headers()
                            .get("grpc-status")
                            .is_some_and(|v| v == UNAVAILABLE);
                        // A replica that is no member did nothing: the
                        // call goes on whatever it is.
                        let not_applied = resp.headers().contains_key(NOT_APPLIED);
                        if !unavailable || (retry == Retry::Never && !not_applied) {
                            self.0.preferred.store(i, Ordering::SeqCst);
                            return Ok(resp);
                        }
                        last = format!(
                            "{}: {}",
                            self.0.addrs[i],
                            grpc_message(&resp).unwrap_or_else(|| "unavailable".into())
                        );
                    }
                    Err(e) if retry == Retry::Never => {
                        return Err(Box::new(tonic::Status::unavailable(format!(
                            "{}: {e} (the call may or may not have taken effect: look before \
                             trying again)",
                            self.0.addrs[i]
                        ))));
                    }
                    Err(e) => {
                        last = format!("{}: {e}", self.0.addrs[i]);
                        self.dial(i);
                    }
                }
            }
            if tried && !answered {
                silent_rounds += 1;
            }
            if Instant::now() >= end || silent_rounds >= SILENT_ROUNDS {
                let what = match retry {
                    Retry::WithId => "; the write's outcome is unknown",
                    _ => "",
                };
                return Err(Box::new(tonic::Status::unavailable(format!(
                    "no controller replica answered (tried for {} s: {}){what}",
                    (KEEP_TRYING - end.saturating_duration_since(Instant::now())).as_secs(),
                    if last.is_empty() {
                        self.reasons(&slots)
                    } else {
                        last
                    }
                ))));
            }
            // Replicas that were down may be back.
            for (i, s) in slots.iter().enumerate() {
                if matches!(s, Slot::Down(_)) {
                    self.dial(i);
                }
            }
            if tried {
                tokio::time::sleep(ROUND_PAUSE).await;
            } else {
                let _ =
                    tokio::time::timeout(ROUND_PAUSE.max(Duration::from_millis(500)), rx.changed())
                        .await;
            }
        }
    }
}

impl tower::Service<http::Request<Body>> for Replicas {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        Box::pin(self.clone().send(req))
    }
}

/// 128 random bits in hex.
fn new_request_id() -> std::io::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn grpc_message(resp: &http::Response<Body>) -> Option<String> {
    let m = resp.headers().get("grpc-message")?.to_str().ok()?;
    Some(percent_decode(m))
}

/// grpc-message is percent-encoded.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An error with its causes, without tonic's "transport error" wrapper alone.
fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s = format!("{s}: {t}");
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_fresh_hex() {
        let a = super::new_request_id().unwrap();
        let b = super::new_request_id().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn grpc_messages_decode() {
        assert_eq!(super::percent_decode("no%20leader%3A x"), "no leader: x");
        assert_eq!(super::percent_decode("50%"), "50%");
    }
}
