//! Set: change limits (applied live to a running VPS) and autostart.

use ferry_proto::agent::v1 as pb;

use super::Agent;
use crate::error::{AgentError, Result};
use crate::spec::validate_limits;

impl Agent {
    #[tracing::instrument(skip_all, fields(vps = %req.name))]
    pub async fn set(&self, req: &pb::SetVpsRequest) -> Result<()> {
        let lock = self.lock_for(&req.name);
        let _g = lock.lock().await;
        let mut rec = self.record(&req.name)?;
        let old = rec.config.limits.clone();
        let l = &mut rec.config.limits;
        if let Some(v) = req.cpu_millicores {
            l.cpu_millicores = v;
        }
        if let Some(v) = req.cpu_weight {
            l.cpu_weight = v;
        }
        if let Some(v) = req.memory_bytes {
            l.memory_bytes = v;
        }
        if let Some(v) = req.swap_bytes {
            l.swap_bytes = v;
        }
        if let Some(v) = req.pids {
            l.pids = v;
        }
        if let Some(v) = req.autostart {
            rec.config.autostart = v;
        }
        if let Some(v) = req.disk_bytes {
            rec.config.limits.disk_bytes = v;
        }
        validate_limits(&rec.config.limits, self.capacity)?;
        let disk = rec.config.limits.disk_bytes;
        if disk < old.disk_bytes {
            return Err(AgentError::invalid(
                "limits.disk_bytes",
                format!(
                    "a disk only grows ({disk} is less than its {})",
                    old.disk_bytes
                ),
            ));
        }
        if disk != old.disk_bytes && old.disk_bytes == 0 {
            return Err(AgentError::FailedPrecondition(format!(
                "VPS {} was created without a disk quota; one is given at create",
                req.name
            )));
        }
        if disk != old.disk_bytes {
            // Grown (never shrunk) while mounted: the VPS sees it at once.
            let vdir = self.paths.vps(&req.name);
            let bytes = rec.config.limits.disk_bytes;
            super::start::blocking(move || super::disk::grow(&vdir, bytes)).await?;
        }
        if self.status(&req.name).is_running() {
            let cg = self.cgroup(&req.name);
            let limits = rec.config.limits.clone();
            if let Err(e) = super::start::blocking(move || cg.apply(&limits)).await {
                // Put back what was there, so the VPS never runs on half a change.
                let cg = self.cgroup(&req.name);
                let _ = super::start::blocking(move || cg.apply(&old)).await;
                return Err(AgentError::FailedPrecondition(format!(
                    "the kernel refused the new limits (memory in use above the new limit?): {e}"
                )));
            }
        }
        self.save_record(&rec)?;
        Ok(())
    }
}
