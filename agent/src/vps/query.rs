//! Get and list: the record, the runtime status and live usage.

use ferry_proto::agent::v1 as pb;
use ferry_proto::report;

use super::{Agent, Status, VpsRecord};
use crate::error::Result;
use crate::runtime::RuntimeState;

impl Agent {
    pub async fn get(&self, name: &str) -> Result<pb::Vps> {
        let rec = self.record(name)?;
        Ok(self.describe(rec).await)
    }

    pub async fn list(&self) -> Vec<pb::Vps> {
        let mut out = Vec::new();
        for rec in self.records() {
            out.push(self.describe(rec).await);
        }
        out
    }

    async fn describe(&self, rec: VpsRecord) -> pb::Vps {
        let name = rec.config.name.clone();
        let status = self.status(&name);
        let vdir = self.paths.vps(&name);
        let disk = tokio::task::spawn_blocking(move || match super::disk::usage(&vdir) {
            Some((_, used)) if super::disk::has_disk(&vdir) => used,
            _ => crate::template::tree_usage(&super::disk::upper(&vdir)).0,
        })
        .await
        .unwrap_or(0);
        let mut usage = pb::Usage {
            disk_bytes: disk,
            ..Default::default()
        };
        let (code, state) = match &status {
            Status::Stopped(s) => (pb::VpsStatus::Stopped, s.clone()),
            Status::Running(s) => (pb::VpsStatus::Running, Some(s.clone())),
            Status::Stopping(s) => (pb::VpsStatus::Stopping, Some(s.clone())),
        };
        if status.is_running() {
            let u = self.cgroup(&name).usage();
            usage.cpu_nanos = u.cpu_nanos;
            usage.memory_bytes = u.memory_bytes;
            usage.memory_peak_bytes = u.memory_peak_bytes;
            usage.pids = u.pids;
            usage.oom_kills = u.oom_kills;
        } else if let Some(s) = &state {
            usage.oom_kills = s.oom_kills;
        }
        let st = state.unwrap_or_else(RuntimeState::default);
        let running = status.is_running();
        let host_veth = self.host_veth(&name).unwrap_or_default();
        pb::Vps {
            mac: rec
                .config
                .net
                .as_ref()
                .map(|n| crate::spec::format_mac(&n.mac))
                .unwrap_or_default(),
            spec: Some(rec.config.to_pb()),
            status: code as i32,
            init_pid: if running { st.init_pid } else { 0 },
            started_unix: if running { st.started_unix } else { 0 },
            stop_reason: if running {
                String::new()
            } else {
                st.stop_reason.clone()
            },
            exit_code: if running { -1 } else { st.exit_code },
            exit_signal: if running { 0 } else { st.exit_signal },
            usage: Some(usage),
            reboots: st.reboots,
            host_veth,
            migrating: self.migrating_id(&name).unwrap_or_default(),
        }
    }

    pub fn node_info(&self) -> pb::NodeInfo {
        let recs = self.records();
        let running = recs
            .iter()
            .filter(|r| self.status(&r.config.name).is_running())
            .count();
        pb::NodeInfo {
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            cgroup_version: self.layout.version().into(),
            cpu_millicores: self.capacity.cpu_millicores,
            memory_bytes: self.capacity.memory_bytes,
            bridge: self.cfg.bridge.clone(),
            bridge_cidr: self.cfg.bridge_cidr.to_string(),
            vps_count: recs.len() as u32,
            vps_running: running as u32,
            allocated_millicores: recs.iter().map(|r| r.config.limits.cpu_millicores).sum(),
            allocated_memory_bytes: recs.iter().map(|r| r.config.limits.memory_bytes).sum(),
            criu_version: self
                .criu
                .info
                .as_ref()
                .map(|i| i.version.clone())
                .unwrap_or_default(),
            criu_error: self.criu.info.as_ref().err().cloned().unwrap_or_default(),
            criu_lazy_pages: self.criu.info.as_ref().is_ok_and(|i| i.lazy_pages),
            criu_dirty_tracking: self.criu.info.as_ref().is_ok_and(|i| i.mem_track),
        }
    }
}

impl Agent {
    /// (total, used) bytes of the file system holding the data dir.
    pub fn disk_space(&self) -> (u64, u64) {
        match nix::sys::statvfs::statvfs(&self.paths.data_dir) {
            Ok(v) => {
                let f = v.fragment_size();
                let total = v.blocks() * f;
                (total, total.saturating_sub(v.blocks_free() * f))
            }
            Err(_) => (0, 0),
        }
    }

    /// One pass over the node's VPSes for a heartbeat: each one's generation
    /// and status, and what the running ones use.
    pub fn node_report(
        &self,
    ) -> (
        Vec<ferry_proto::controller::v1::VpsReport>,
        ferry_proto::controller::v1::NodeUsage,
    ) {
        let mut usage = ferry_proto::controller::v1::NodeUsage {
            disk_bytes: self.disk_space().1,
            ..Default::default()
        };
        let mut reports = Vec::new();
        for r in self.records() {
            let status = match self.status(&r.config.name) {
                Status::Running(_) => report::RUNNING,
                Status::Stopping(_) => report::STOPPING,
                Status::Stopped(_) => report::STOPPED,
            };
            if status != report::STOPPED {
                usage.vps_running += 1;
                usage.memory_bytes += self.cgroup(&r.config.name).usage().memory_bytes;
            }
            // Going out by a migration: its migration settles it.
            let status = if self.migrating_id(&r.config.name).is_some() {
                report::LEAVING
            } else {
                status
            };
            reports.push(ferry_proto::controller::v1::VpsReport {
                name: r.config.name,
                generation: r.config.generation,
                status: status.into(),
            });
        }
        // VPSes still arriving by a migration: the controller leaves them to it.
        for e in std::fs::read_dir(self.paths.vps_root())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if !self.arriving(&name) {
                continue;
            }
            if let Ok(r) = self.record(&name) {
                reports.push(ferry_proto::controller::v1::VpsReport {
                    name,
                    generation: r.config.generation,
                    status: report::ARRIVING.into(),
                });
            }
        }
        (reports, usage)
    }
}
