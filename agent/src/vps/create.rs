//! Create: validate, check the name, template and address are free, and lay
//! down the VPS's directories. Nothing is made before every check has passed.

use ferry_proto::agent::v1 as pb;

use super::{now_unix, Agent, VpsRecord};
use crate::error::{AgentError, IoContext, Result};
use crate::spec::validate_spec;

impl Agent {
    #[tracing::instrument(skip_all, fields(vps = %spec.name))]
    pub async fn create(&self, spec: &pb::VpsSpec) -> Result<VpsRecord> {
        let config = validate_spec(spec, self.capacity, self.cfg.bridge_cidr)?;
        let _g = self.create_lock.lock().await;
        let dir = self.paths.vps(&config.name);
        if dir.exists() {
            // A controller retrying the same create (same generation) gets the VPS.
            if config.generation > 0 {
                if let Ok(existing) = self.record(&config.name) {
                    if existing.config.generation == config.generation {
                        return Ok(existing);
                    }
                }
            }
            return Err(AgentError::exists("VPS", &config.name));
        }
        crate::template::get(&self.paths, &config.template)?;
        if let Some(net) = &config.net {
            if let Some(other) = self
                .records()
                .into_iter()
                .find(|r| r.config.net.as_ref().map(|n| n.ip) == Some(net.ip))
            {
                return Err(AgentError::AlreadyExists {
                    kind: "net.ip",
                    name: format!("{} (held by VPS {})", net.ip, other.config.name),
                });
            }
        }
        let rec = VpsRecord {
            config,
            created_unix: now_unix(),
        };
        // Build in a hidden dir and rename, so a crash leaves no half-made VPS.
        let tmp = self
            .paths
            .vps_root()
            .join(format!(".new-{}", rec.config.name));
        let _ = crate::template::remove_tree(&tmp);
        let build = || -> Result<()> {
            for d in ["upper", "work", "rootfs"] {
                std::fs::create_dir_all(tmp.join(d)).at("creating", tmp.join(d))?;
            }
            let json =
                serde_json::to_vec_pretty(&rec).map_err(|e| AgentError::Internal(e.to_string()))?;
            std::fs::write(tmp.join("config.json"), json).at("writing", tmp.join("config.json"))?;
            std::fs::rename(&tmp, &dir).at("creating", &dir)
        };
        if let Err(e) = build() {
            let _ = crate::template::remove_tree(&tmp);
            return Err(e);
        }
        tracing::info!("created");
        Ok(rec)
    }
}
