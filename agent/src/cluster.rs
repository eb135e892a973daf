//! Membership in a Ferry cluster (`--controller`): register this node, then
//! report what runs on it every second. The controller decides; the agent
//! carries out its calls through the ordinary API, fenced by generation.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::addr::Addr;
use ferry_proto::controller::v1 as cpb;
use ferry_proto::controller::v1::controller_service_client::ControllerServiceClient;
use tonic::transport::Channel;

use crate::vps::Agent;

const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct ClusterLink {
    pub controllers: Vec<Addr>,
    pub node_name: String,
    /// How the controller reaches this agent.
    pub advertise: String,
    pub labels: HashMap<String, String>,
}

async fn connect(addrs: &[Addr]) -> Option<ControllerServiceClient<Channel>> {
    for a in addrs {
        if let Ok(Ok(ch)) = tokio::time::timeout(
            Duration::from_secs(2),
            ferry_proto::addr::connect_controller(a),
        )
        .await
        {
            return Some(ferry_proto::limits::controller_client(ch));
        }
    }
    None
}

/// Runs for the agent's life: (re)registers, then heartbeats; any failure
/// starts over with the next reachable controller.
pub fn spawn(agent: Arc<Agent>, link: ClusterLink) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let span = tracing::info_span!("cluster", node = %link.node_name);
        let _e = span.enter();
        loop {
            let Some(mut c) = connect(&link.controllers).await else {
                tracing::warn!("no controller reachable; retrying");
                tokio::time::sleep(HEARTBEAT_EVERY).await;
                continue;
            };
            let info = agent.node_info();
            let reg = cpb::RegisterNodeRequest {
                name: link.node_name.clone(),
                addr: link.advertise.clone(),
                capacity: Some(cpb::Capacity {
                    cpu_millicores: info.cpu_millicores,
                    memory_bytes: info.memory_bytes,
                    disk_bytes: agent.disk_space().0,
                }),
                labels: link.labels.clone(),
            };
            match c.register_node(reg).await {
                Ok(n) => tracing::info!(node_id = n.get_ref().id, "registered with the controller"),
                Err(e) => {
                    tracing::warn!(error = %e.message(), "registering with the controller");
                    tokio::time::sleep(HEARTBEAT_EVERY).await;
                    continue;
                }
            }
            loop {
                let (vps, usage) = agent.node_report();
                let templates = crate::template::list(&agent.paths)
                    .map(|ts| ts.into_iter().map(|t| t.name).collect())
                    .unwrap_or_default();
                let mut req = tonic::Request::new(cpb::HeartbeatRequest {
                    node: link.node_name.clone(),
                    vps,
                    templates,
                    usage: Some(usage),
                });
                req.set_timeout(Duration::from_secs(5));
                match c.heartbeat(req).await {
                    Ok(r) => crate::authz::set_revoked(r.into_inner().revoked),
                    Err(e) => {
                        tracing::warn!(error = %e.message(), "heartbeat failed; reconnecting");
                        break;
                    }
                }
                tokio::time::sleep(HEARTBEAT_EVERY).await;
            }
        }
    })
}

/// Why no decision came back.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// The cluster knows no such migration (a definite answer).
    #[error("the cluster refused the decision: {0}")]
    Refused(String),
    /// No controller could answer in time; the outcome is unknown.
    #[error("no controller could decide: {0}")]
    NoAnswer(String),
}

/// Checks a migration's controller addresses (as the request names them).
pub fn check_controllers(controllers: &[String]) -> crate::error::Result<()> {
    for a in controllers {
        a.parse::<Addr>()
            .map_err(|e| crate::error::AgentError::invalid("controllers", format!("{a:?}: {e}")))?;
    }
    Ok(())
}

type ControllerClient =
    ferry_proto::controller::v1::controller_service_client::ControllerServiceClient<
        tonic::transport::Channel,
    >;

/// One call to the controller at `a` within `limit`; not reaching it, or no
/// answer in time, is `Unavailable`.
async fn ask<T, F, Fut>(a: &Addr, limit: Duration, f: F) -> Result<T, tonic::Status>
where
    F: FnOnce(ControllerClient) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let call = async {
        let ch = ferry_proto::addr::connect_controller(a)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        f(ferry_proto::limits::controller_client(ch))
            .await
            .map(|r| r.into_inner())
    };
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or_else(|_| Err(tonic::Status::unavailable("timed out")))
}

/// A definite answer that the cluster knows no such thing (not a failure
/// to reach it): asking again changes nothing.
fn refused(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::FailedPrecondition | tonic::Code::NotFound | tonic::Code::InvalidArgument
    )
}

/// The pause between rounds of asking every controller for a decision.
const DECIDE_RETRY_PAUSE: Duration = Duration::from_millis(300);

/// Asks the controllers for a migration's decision (`commit`: move it to the
/// target; otherwise cancel it). The first answer Raft applied stands and is
/// returned: (moved, generation after). While no controller can answer
/// (down, or no quorum) it keeps asking until `patience` runs out: during that
/// time the VPS stays frozen, which is the one safe state. A refusal (the
/// cluster knows no such migration) is returned as an error at once.
pub async fn decide_migration(
    controllers: &[String],
    name: &str,
    migration_id: &str,
    commit: bool,
    patience: Duration,
) -> Result<(bool, u64), DecideError> {
    let addrs: Vec<Addr> = controllers.iter().filter_map(|a| a.parse().ok()).collect();
    if addrs.is_empty() {
        return Err(DecideError::NoAnswer("no controller address to ask".into()));
    }
    let end = tokio::time::Instant::now() + patience;
    let mut last = String::new();
    let mut warned = tokio::time::Instant::now();
    loop {
        for a in &addrs {
            let req = cpb::DecideMigrationRequest {
                name: name.to_string(),
                migration_id: migration_id.to_string(),
                commit,
                query: false,
            };
            match ask(a, Duration::from_secs(10), |mut c| async move {
                c.decide_migration(req).await
            })
            .await
            {
                Ok(r) => return Ok((r.moved, r.generation)),
                Err(s) if refused(&s) => return Err(DecideError::Refused(s.message().to_string())),
                Err(s) => last = format!("{a}: {}", s.message()),
            }
        }
        if tokio::time::Instant::now() >= end {
            return Err(DecideError::NoAnswer(last));
        }
        if warned.elapsed() >= Duration::from_secs(10) {
            tracing::warn!(migration = %migration_id, error = %last, "still waiting for the migration's decision");
            warned = tokio::time::Instant::now();
        }
        tokio::time::sleep(DECIDE_RETRY_PAUSE).await;
    }
}

/// Tells the controllers how a migration this node ran as source ended (its
/// last event, after the post-copy window and cleanup), for the move's
/// record. Tries every controller for up to `patience`; a definite refusal
/// ends it. Best effort: the record only loses its figures.
pub async fn finish_migration(
    controllers: &[String],
    name: &str,
    migration_id: &str,
    last: ferry_proto::agent::v1::MigrationEvent,
    patience: Duration,
) {
    let end = tokio::time::Instant::now() + patience;
    let mut why = String::new();
    while tokio::time::Instant::now() < end {
        for a in controllers.iter().filter_map(|a| a.parse::<Addr>().ok()) {
            let req = cpb::FinishMigrationRequest {
                name: name.to_string(),
                migration_id: migration_id.to_string(),
                last: Some(last.clone()),
            };
            match ask(&a, Duration::from_secs(10), |mut c| async move {
                c.finish_migration(req).await
            })
            .await
            {
                Ok(_) => return,
                Err(s) if refused(&s) || s.code() == tonic::Code::PermissionDenied => {
                    tracing::debug!(migration = %migration_id, error = %s.message(), "the end of the migration was not recorded");
                    return;
                }
                Err(s) => why = format!("{a}: {}", s.message()),
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tracing::warn!(migration = %migration_id, error = %why, "could not report the end of the migration");
}

/// Asks the controllers what was decided about a migration, writing
/// nothing: Some((moved, generation)) once decided, None while undecided or
/// when no controller answered this round.
pub async fn query_decision(
    controllers: &[String],
    name: &str,
    migration_id: &str,
) -> Option<(bool, u64)> {
    for a in controllers.iter().filter_map(|a| a.parse::<Addr>().ok()) {
        let req = cpb::DecideMigrationRequest {
            name: name.to_string(),
            migration_id: migration_id.to_string(),
            commit: false,
            query: true,
        };
        if let Ok(r) = ask(&a, Duration::from_secs(3), |mut c| async move {
            c.decide_migration(req).await
        })
        .await
        {
            return r.decided.then_some((r.moved, r.generation));
        }
    }
    None
}

/// Renews this node's certificate through the controllers when a third of
/// its lifetime is left, and serves, dials and runs CRIU with the new one
/// from then on: no restart.
pub fn spawn_renewal(
    path: std::path::PathBuf,
    server: ferry_proto::tls::ServerTls,
    controllers: Vec<Addr>,
) {
    use ferry_proto::tls::{pki::renewal_due, Credentials};
    if controllers.is_empty() {
        return;
    }
    tokio::spawn(async move {
        loop {
            let every = match Credentials::load(&path).and_then(|c| renewal_due(&c.cert_pem)) {
                Ok((due, every)) => {
                    if due {
                        match renew(&path, &server, &controllers).await {
                            Ok(()) => tracing::info!("certificate renewed"),
                            Err(e) => {
                                tracing::warn!(error = %e, "renewing the certificate; retrying")
                            }
                        }
                    }
                    every
                }
                Err(e) => {
                    tracing::error!(error = %e, "reading this node's certificate");
                    Duration::from_secs(60)
                }
            };
            tokio::time::sleep(every).await;
        }
    });
}

async fn renew(
    path: &std::path::Path,
    server: &ferry_proto::tls::ServerTls,
    controllers: &[Addr],
) -> Result<(), String> {
    use ferry_proto::tls::{pki, Credentials};
    let old = Credentials::load(path).map_err(|e| e.to_string())?;
    let who = old.identity().map_err(|e| e.to_string())?.role;
    let (key_pem, csr_pem) = pki::new_request().map_err(|e| e.to_string())?;
    let mut last = String::from("no controller");
    for a in controllers {
        let ch = match ferry_proto::addr::connect_controller(a).await {
            Ok(ch) => ch,
            Err(e) => {
                last = format!("{a}: {e}");
                continue;
            }
        };
        let r = ferry_proto::limits::controller_client(ch)
            .renew_certificate(cpb::JoinRequest {
                token: String::new(),
                name: String::new(),
                csr_pem: csr_pem.clone(),
            })
            .await;
        let r = match r {
            Ok(r) => r.into_inner(),
            Err(s) => {
                last = format!("{a}: {}", s.message());
                continue;
            }
        };
        let new = Credentials {
            ca_pem: r.ca_pem,
            cert_pem: r.cert_pem,
            key_pem: key_pem.clone(),
        };
        let got = new.identity().map_err(|e| e.to_string())?.role;
        if got != who {
            return Err(format!("the controller renewed {got}, not {who}"));
        }
        new.save(path).map_err(|e| e.to_string())?;
        ferry_proto::addr::use_credentials(&new)?;
        server.reload(&new).map_err(|e| e.to_string())?;
        return Ok(());
    }
    Err(last)
}
