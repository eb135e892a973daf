//! Templates as cluster objects: each imported template's name, digest and
//! size. Its files live on nodes (which ones, their heartbeats say); a node
//! that needs it fetches it from one that has it and checks the digest.

use serde::{Deserialize, Serialize};

use super::{reject, ClusterState, RejectCode, Response};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TemplateRecord {
    pub name: String,
    /// sha256 of the archive as imported (hex): what a fetching node checks.
    pub sha256: String,
    pub size_bytes: u64,
    pub imported_ms: i64,
    /// Where it was imported.
    pub node: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum TemplateCmd {
    /// Records a template imported on a node (again: a new version, when no
    /// VPS uses the old one).
    Record { rec: TemplateRecord },
    /// Forgets a template no VPS uses.
    Remove { name: String, now_ms: i64 },
}

/// Why a template may not be replaced or removed now: a VPS uses it.
pub fn in_use(s: &ClusterState, name: &str) -> Option<String> {
    let users: Vec<&str> = s
        .vps
        .values()
        .filter(|v| v.spec.template == name)
        .map(|v| v.spec.name.as_str())
        // A deleted VPS its node has not confirmed gone still runs on it.
        .chain(
            s.deleting
                .iter()
                .filter(|(_, d)| d.template == name)
                .map(|(n, _)| n.as_str()),
        )
        .take(5)
        .collect();
    (!users.is_empty()).then(|| {
        format!(
            "template {name} is in use by VPS {}{}",
            users.join(", "),
            if users.len() == 5 { ", ..." } else { "" }
        )
    })
}

impl ClusterState {
    pub(super) fn apply_template(&mut self, c: TemplateCmd) -> Response {
        match c {
            TemplateCmd::Record { rec } => {
                if let Some(old) = self.templates.get(&rec.name) {
                    if old.sha256 != rec.sha256 {
                        if let Some(why) = in_use(self, &rec.name) {
                            return reject(
                                RejectCode::FailedPrecondition,
                                format!("{why}: a new version would differ from the VPSes' own"),
                            );
                        }
                    }
                }
                self.events.push(
                    rec.imported_ms,
                    "template",
                    &rec.name,
                    format!(
                        "imported on {} ({} bytes, sha256 {})",
                        rec.node, rec.size_bytes, rec.sha256
                    ),
                );
                self.templates.insert(rec.name.clone(), rec);
                Response::Ok
            }
            TemplateCmd::Remove { name, now_ms } => {
                if !self.templates.contains_key(&name) {
                    return reject(RejectCode::NotFound, format!("template {name:?} not found"));
                }
                if let Some(why) = in_use(self, &name) {
                    return reject(RejectCode::FailedPrecondition, why);
                }
                self.templates.remove(&name);
                self.events
                    .push(now_ms, "template", &name, "removed".to_string());
                Response::Ok
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Capacity, Desired, NodeCmd, Request, VpsCmd, VpsSpecData};

    fn rec(name: &str, sha: &str) -> Request {
        Request::Template(TemplateCmd::Record {
            rec: TemplateRecord {
                name: name.into(),
                sha256: sha.into(),
                size_bytes: 10,
                imported_ms: 1,
                node: "a".into(),
            },
        })
    }

    #[test]
    fn a_template_in_use_is_neither_replaced_nor_removed() {
        let mut s = ClusterState::default();
        s.apply(Request::Node(NodeCmd::Register {
            name: "a".into(),
            addr: "h:1".into(),
            capacity: Capacity {
                cpu_millicores: 1000,
                memory_bytes: 1 << 30,
                disk_bytes: 0,
            },
            labels: Default::default(),
            now_ms: 0,
        }));
        assert_eq!(s.apply(rec("deb", "s1")), Response::Ok);
        let r = s.apply(Request::Vps(VpsCmd::Create {
            spec: Box::new(VpsSpecData {
                name: "v".into(),
                template: "deb".into(),
                memory_bytes: 64 << 20,
                ..Default::default()
            }),
            pin_node: String::new(),
            node_selector: Default::default(),
            anti_affinity_group: String::new(),
            desired: Desired::Stopped,
            allocate_ip: false,
            now_ms: 0,
        }));
        assert!(matches!(r, Response::Vps(_)), "{r:?}");
        // The same version again is fine; another is not.
        assert_eq!(s.apply(rec("deb", "s1")), Response::Ok);
        assert!(matches!(
            s.apply(rec("deb", "s2")),
            Response::Rejected {
                code: RejectCode::FailedPrecondition,
                ..
            }
        ));
        let rm = |s: &mut ClusterState| {
            s.apply(Request::Template(TemplateCmd::Remove {
                name: "deb".into(),
                now_ms: 2,
            }))
        };
        assert!(matches!(
            rm(&mut s),
            Response::Rejected {
                code: RejectCode::FailedPrecondition,
                ..
            }
        ));
        s.apply(Request::Vps(VpsCmd::Delete {
            name: "v".into(),
            now_ms: 3,
        }));
        // Deleted, but its node has not confirmed it gone: still in use.
        assert!(matches!(rm(&mut s), Response::Rejected { .. }));
        s.apply(Request::Vps(VpsCmd::Purge {
            node: "a".into(),
            names: vec!["v".into()],
            now_ms: 4,
        }));
        assert_eq!(rm(&mut s), Response::Ok);
        assert!(s.templates.is_empty());
    }
}
