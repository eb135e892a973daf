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
                    // Not a VPS still arriving: its create-and-start would
                    // boot a fresh copy beside the restore on its way.
                    self.refuse_arriving(&config.name)?;
                    return Ok(existing);
                }
            }
        }
        let mut config = config;
        self.check_free(&config)?;
        if config.id_base == Some(0) {
            config.id_base = Some(self.pick_id_range()?);
        }
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
        let others = self.every_record();
        if let Some(base) = config.id_base.filter(|b| *b != 0) {
            if let Some(other) = others.iter().find(|r| r.config.id_base == Some(base)) {
                return Err(AgentError::AlreadyExists {
                    kind: "id_base",
                    name: format!(
                        "{} (ids {} are VPS {}'s on this node)",
                        base,
                        ferry_proto::ids::describe(base),
                        other.config.name
                    ),
                });
            }
        }
        let Some(net) = &config.net else {
            return Ok(());
        };
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

    /// Every VPS record on this node, those still arriving included.
    fn every_record(&self) -> Vec<VpsRecord> {
        std::fs::read_dir(self.paths.vps_root())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| self.record(n).ok()))
            .collect()
    }

    /// A node-local VPS's id range: a random free slot of the agent's zone
    /// (see [`ferry_proto::ids::agent_pick`]). The caller holds `create_lock`.
    fn pick_id_range(&self) -> Result<u32> {
        let used = self
            .every_record()
            .into_iter()
            .filter_map(|r| r.config.id_base);
        let mut seed = [0u8; 8];
        // SAFETY: getrandom(2) writes at most 8 bytes into a buffer we own.
        // Without randomness the pick starts at the zone's first slot: still
        // correct, only likelier to meet another agent's VPS.
        let _ = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
        ferry_proto::ids::agent_pick(used, u64::from_ne_bytes(seed)).ok_or_else(|| {
            AgentError::ResourceExhausted("every user-namespace id range is in use".into())
        })
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
            let disk = rec.config.limits.disk_bytes;
            let dirs: &[&str] = if disk > 0 {
                &["rootfs"]
            } else {
                &["upper", "work", "rootfs"]
            };
            for d in dirs {
                std::fs::create_dir_all(tmp.join(d)).at("creating", tmp.join(d))?;
            }
            if disk > 0 {
                // Its own files live in a filesystem of that size (an
                // arrival's a little more: see `arrival_room`).
                let room = match incoming {
                    Some(_) => super::disk::arrival_room(disk),
                    None => 0,
                };
                super::disk::make(&tmp, disk + room)?;
            } else if let Some(base) = rec.config.id_base {
                // The rootfs's `/` is the upper dir's root: the VPS's root owns it.
                std::os::unix::fs::chown(tmp.join("upper"), Some(base), Some(base))
                    .at("handing to the VPS's root", tmp.join("upper"))?;
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
        })?;
        // The disk mounts where it stays (a mount would not follow the rename).
        super::disk::mount(&dir, rec.config.id_base).inspect_err(|_| {
            let _ = super::disk::unmount(&dir);
            let _ = crate::template::remove_tree(&dir);
        })
    }
}
