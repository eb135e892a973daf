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
        if let Ok(Ok(ch)) =
            tokio::time::timeout(Duration::from_secs(2), ferry_proto::addr::connect(a)).await
        {
            return Some(ControllerServiceClient::new(ch));
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
                if let Err(e) = c.heartbeat(req).await {
                    tracing::warn!(error = %e.message(), "heartbeat failed; reconnecting");
                    break;
                }
                tokio::time::sleep(HEARTBEAT_EVERY).await;
            }
        }
    })
}
