//! Preflight: the target checks everything it can before the VPS is touched:
//! the name is free there, capacity, template, a usable CRIU of a compatible
//! version, and the CPU features the VPS's processes may use. It answers
//! whether it can take a post-copy arrival.

use ferry_proto::agent::v1 as pb;
use ferry_proto::agent::v1::agent_service_client::AgentServiceClient;
use tonic::transport::Channel;

use super::{Job, MigrateError, Mode, Progress, Source};

/// How long the target has to answer: a stopped or hung agent must not hold
/// the VPS locked as migrating (nothing is frozen yet; the move is refused).
pub const PREPARE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(15);

pub async fn run(
    src: &dyn Source,
    target: &mut AgentServiceClient<Channel>,
    job: &Job,
    mode: Mode,
    p: &mut Progress,
) -> Result<bool, MigrateError> {
    p.phase("preflight", format!("checking {}", job.target_node))
        .await;
    let mut spec = src.spec();
    spec.generation = job.generation;
    let live = mode != Mode::Cold;
    let prepare = target.migrate_prepare(pb::MigratePrepareRequest {
        migration_id: job.id.clone(),
        spec: Some(spec),
        live,
        criu_version: src.criu_version(),
        cpu_flags: if live { cpu_flags() } else { Vec::new() },
        controllers: job.controllers.clone(),
    });
    let r = tokio::time::timeout(PREPARE_DEADLINE, prepare)
        .await
        .map_err(|_| {
            MigrateError::Refused(format!(
                "target {} did not answer within {} s (is its agent stopped or hung?); \
                 nothing was frozen",
                job.target_node,
                PREPARE_DEADLINE.as_secs()
            ))
        })?
        .map_err(|s| MigrateError::Refused(format!("target {}: {}", job.target_node, s.message())))?
        .into_inner();
    p.done_phase("preflight", 0);
    Ok(r.lazy_pages)
}

/// This CPU's feature flags (x86 `flags`, arm `Features`); the restored
/// processes may use any of them, so the target must have them all.
pub fn cpu_flags() -> Vec<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find(|l| l.starts_with("flags") || l.starts_with("Features"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}
