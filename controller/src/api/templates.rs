//! Templates as cluster objects: recorded once imported on a node, listed
//! with the nodes that have them, removed when no VPS uses them.

use ferry_proto::agent::v1 as apb;
use ferry_proto::controller::v1 as cpb;

use super::{applied, now_ms};
use crate::error::ControllerError;
use crate::host::Controller;
use crate::state::templates::{in_use, TemplateCmd, TemplateRecord};
use crate::state::{ClusterState, RejectCode, Request};

fn to_pb(s: &ClusterState, t: &TemplateRecord) -> cpb::ClusterTemplate {
    cpb::ClusterTemplate {
        name: t.name.clone(),
        sha256: t.sha256.clone(),
        size_bytes: t.size_bytes,
        imported_unix_ms: t.imported_ms,
        imported_on: t.node.clone(),
        nodes: holders(s, &t.name),
    }
}

/// The nodes whose last report lists template `name`.
fn holders(s: &ClusterState, name: &str) -> Vec<String> {
    s.nodes
        .values()
        .filter(|n| {
            n.templates
                .as_ref()
                .is_some_and(|t| t.iter().any(|x| x == name))
        })
        .map(|n| n.name.clone())
        .collect()
}

use crate::ops::agent;

fn node_addr(m: &crate::member::Member, node: &str) -> Result<String, ControllerError> {
    m.sm.read(|a| a.state.nodes.get(node).map(|n| n.addr.clone()))
        .ok_or_else(|| ControllerError::Rejected {
            code: RejectCode::NotFound,
            message: format!("node {node:?} not found"),
        })
}

/// Records template `name` as node `node` holds it (its sha256 and size
/// read from that node's agent).
pub async fn register(
    ctl: &Controller,
    r: cpb::RegisterTemplateRequest,
) -> Result<cpb::ClusterTemplate, ControllerError> {
    ferry_proto::names::check_dns_label(&r.name)
        .map_err(|e| ControllerError::invalid("name", e))?;
    ferry_proto::names::check_dns_label(&r.node)
        .map_err(|e| ControllerError::invalid("node", e))?;
    let m = ctl.member().await?;
    m.read_barrier().await?;
    let addr = node_addr(&m, &r.node)?;
    let t = agent(&r.node, &addr)
        .await?
        .list_templates(apb::ListTemplatesRequest {})
        .await
        .map_err(|s| ControllerError::Agent {
            node: r.node.clone(),
            code: s.code(),
            message: s.message().to_string(),
        })?
        .into_inner()
        .templates
        .into_iter()
        .find(|t| t.name == r.name)
        .ok_or_else(|| ControllerError::Rejected {
            code: RejectCode::NotFound,
            message: format!("node {} has no template {:?}", r.node, r.name),
        })?;
    let rec = TemplateRecord {
        name: r.name.clone(),
        sha256: t.sha256,
        size_bytes: t.size_bytes,
        imported_ms: now_ms(),
        node: r.node,
    };
    applied(
        m.propose(Request::Template(TemplateCmd::Record { rec: rec.clone() }))
            .await?,
    )?;
    Ok(m.sm.read(|a| to_pb(&a.state, &rec)))
}

pub async fn list(ctl: &Controller) -> Result<cpb::ListClusterTemplatesResponse, ControllerError> {
    let m = ctl.member().await?;
    m.read_barrier().await?;
    Ok(m.sm.read(|a| cpb::ListClusterTemplatesResponse {
        templates: a
            .state
            .templates
            .values()
            .map(|t| to_pb(&a.state, t))
            .collect(),
    }))
}

/// Forgets a template no VPS uses, and deletes it on the nodes that hold it
/// (best effort: a node that cannot is named in the answer).
pub async fn delete(
    ctl: &Controller,
    name: &str,
) -> Result<cpb::DeleteClusterTemplateResponse, ControllerError> {
    let m = ctl.member().await?;
    m.read_barrier().await?;
    let on =
        m.sm.read(|a| -> Result<Vec<(String, String)>, ControllerError> {
            if !a.state.templates.contains_key(name) {
                return Err(ControllerError::Rejected {
                    code: RejectCode::NotFound,
                    message: format!("template {name:?} not found"),
                });
            }
            if let Some(why) = in_use(&a.state, name) {
                return Err(ControllerError::Rejected {
                    code: RejectCode::FailedPrecondition,
                    message: why,
                });
            }
            Ok(holders(&a.state, name)
                .into_iter()
                .filter_map(|n| a.state.nodes.get(&n).map(|r| (n, r.addr.clone())))
                .collect())
        })?;
    applied(
        m.propose(Request::Template(TemplateCmd::Remove {
            name: name.to_string(),
            now_ms: now_ms(),
        }))
        .await?,
    )?;
    let mut kept_on = Vec::new();
    for (node, addr) in on {
        let gone = match agent(&node, &addr).await {
            Ok(mut c) => c
                .delete_template(apb::DeleteTemplateRequest {
                    name: name.to_string(),
                })
                .await
                .map_err(|s| s.message().to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = gone {
            tracing::warn!(node = %node, template = %name, error = %e, "could not delete the template's files");
            kept_on.push(node);
        }
    }
    Ok(cpb::DeleteClusterTemplateResponse { kept_on })
}
