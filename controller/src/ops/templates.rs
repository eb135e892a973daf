//! Bringing a cluster template to a node that lacks it: the node's agent
//! fetches it from a node that has it and checks its digest against the
//! cluster's record before installing it. Run before a VPS is created on
//! the node (by the reconciler) and before a migration to it.

use std::time::Duration;

use ferry_proto::agent::v1 as apb;

use crate::state::ClusterState;

/// How long a fetch may take (a template is a rootfs: hundreds of MiB).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(300);

/// A template a node must fetch, and from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    pub name: String,
    pub sha256: String,
    pub from_node: String,
    pub from_addr: String,
}

/// What `node` must fetch before it can run a VPS of `template`: None when
/// it has it, or when the cluster has no record of it (the node then
/// refuses the VPS, naming the template), or when no live node holds it.
pub fn needed(s: &ClusterState, node: &str, template: &str) -> Option<Fetch> {
    let rec = s.templates.get(template)?;
    let has = |n: &crate::state::NodeRecord| {
        n.templates
            .as_ref()
            .is_some_and(|t| t.iter().any(|x| x == template))
    };
    if s.nodes.get(node).is_none_or(has) {
        return None;
    }
    // Where it was imported first, else any live holder (by name).
    let holders = s
        .nodes
        .values()
        .filter(|n| n.name != node && !n.down && has(n));
    let from = holders
        .clone()
        .find(|n| n.name == rec.node)
        .or_else(|| holders.clone().next())?;
    Some(Fetch {
        name: template.to_string(),
        sha256: rec.sha256.clone(),
        from_node: from.name.clone(),
        from_addr: from.addr.clone(),
    })
}

/// Has node `node` (its agent at `addr`) fetch `f`.
pub async fn fetch(node: &str, addr: &str, f: &Fetch) -> Result<(), String> {
    let call = async {
        super::agent(node, addr)
            .await
            .map_err(|e| e.to_string())?
            .fetch_template(apb::FetchTemplateRequest {
                name: f.name.clone(),
                sha256: f.sha256.clone(),
                from_node: f.from_node.clone(),
                from_addr: f.from_addr.clone(),
            })
            .await
            .map_err(|s| {
                format!(
                    "node {node} could not fetch template {} from {}: {}",
                    f.name,
                    f.from_node,
                    s.message()
                )
            })
    };
    tokio::time::timeout(FETCH_TIMEOUT, call)
        .await
        .map_err(|_| {
            format!(
                "node {node} did not fetch template {} within {} s",
                f.name,
                FETCH_TIMEOUT.as_secs()
            )
        })??;
    tracing::info!(node, template = %f.name, from = %f.from_node, "template fetched");
    Ok(())
}
