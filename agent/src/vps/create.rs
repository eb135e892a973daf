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
        // A controller retrying the same create (same generation) gets the VPS.
        if config.generation > 0 {
            if let Ok(existing) = self.record(&config.name) {
                if existing.config.generation == config.generation {
                    return Ok(existing);
                }
            }
        }
        self.check_free(&config)?;
        crate::template::get(&self.paths, &config.template)?;
        let rec = VpsRecord {
            config,
            created_unix: now_unix(),
        };
        self.lay_out(&rec, None)?;
        tracing::info!("created");
        Ok(rec)
    }

    /// Refuses a name or an address already taken on this node, by a VPS or
    /// by one still arriving. The caller holds `create_lock`.
    pub(super) fn check_free(&self, config: &crate::spec::VpsConfig) -> Result<()> {
        if self.paths.vps(&config.name).exists() {
            return Err(AgentError::exists("VPS", &config.name));
        }
        let Some(net) = &config.net else {
            return Ok(());
        };
        let others: Vec<_> = std::fs::read_dir(self.paths.vps_root())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| self.record(n).ok()))
            .collect();
        let held = |f: &dyn Fn(&crate::spec::NetConfig) -> bool| {
            others
                .iter()
                .find(|r| r.config.net.as_ref().is_some_and(f))
                .map(|r| r.config.name.clone())
        };
        if let Some(other) = held(&|n| n.ip == net.ip) {
            return Err(AgentError::AlreadyExists {
                kind: "net.ip",
                name: format!("{} (held by VPS {other})", net.ip),
            });
        }
        // Two ports with one MAC on the bridge would take each other's frames.
        if let Some(other) = held(&|n| n.mac == net.mac) {
            return Err(AgentError::AlreadyExists {
                kind: "net.mac",
                name: format!(
                    "{} (held by VPS {other})",
                    crate::spec::format_mac(&net.mac)
                ),
            });
        }
        Ok(())
    }

    /// Lays down a new VPS's directories and record. Built in a hidden dir and
    /// renamed, so a crash or an error leaves no half-made VPS. `incoming`
    /// marks a VPS still arriving by migration (with the migration's id).
    pub(super) fn lay_out(&self, rec: &VpsRecord, incoming: Option<&str>) -> Result<()> {
        let dir = self.paths.vps(&rec.config.name);
        let tmp = self
            .paths
            .vps_root()
            .join(format!(".new-{}", rec.config.name));
        let _ = crate::template::remove_tree(&tmp);
        let build = || -> Result<()> {
            for d in ["upper", "work", "rootfs"] {
                std::fs::create_dir_all(tmp.join(d)).at("creating", tmp.join(d))?;
            }
            if let Some(id) = incoming {
                let m = tmp.join(super::migrate_in::INCOMING_MARKER);
                std::fs::write(&m, id).at("writing", &m)?;
            }
            let json =
                serde_json::to_vec_pretty(rec).map_err(|e| AgentError::Internal(e.to_string()))?;
            std::fs::write(tmp.join("config.json"), json).at("writing", tmp.join("config.json"))?;
            std::fs::rename(&tmp, &dir).at("creating", &dir)
        };
        build().inspect_err(|_| {
            let _ = crate::template::remove_tree(&tmp);
        })
    }
}
