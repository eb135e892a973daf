//! Operations on the cluster that more than one caller runs: the API
//! handlers, and the leader's tasks (drain, restore, the rebalancer).
//!
//! - [`migration`]: starting and following a migration.
//! - [`templates`]: a cluster template fetched by a node that lacks it.

pub mod migration;
pub mod templates;

use std::time::Duration;

use crate::error::ControllerError;

pub type AgentClient =
    ferry_proto::agent::v1::agent_service_client::AgentServiceClient<tonic::transport::Channel>;

/// How long reaching an agent may take.
const AGENT_CONNECT: Duration = Duration::from_secs(5);

/// A client of node `node`'s agent at `addr` (its certificate must name that
/// node), or `Unavailable` naming it.
pub async fn agent(node: &str, addr: &str) -> Result<AgentClient, ControllerError> {
    let unreachable = |e: String| ControllerError::Agent {
        node: node.to_string(),
        code: tonic::Code::Unavailable,
        message: format!("agent at {addr} is unreachable: {e}"),
    };
    let a: ferry_proto::addr::Addr = addr.parse().map_err(unreachable)?;
    let ch = tokio::time::timeout(
        AGENT_CONNECT,
        ferry_proto::addr::connect_node_named(&a, node),
    )
    .await
    .map_err(|_| unreachable("timed out".into()))?
    .map_err(|e| unreachable(e.to_string()))?;
    Ok(ferry_proto::limits::agent_client(ch))
}
