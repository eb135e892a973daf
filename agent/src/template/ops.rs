//! Template operations as the API offers them: import (streamed or from a node
//! path), list, delete (refused while a VPS uses the template).

use std::io::Read;

use ferry_proto::agent::v1 as pb;

use super::{install, tree_usage, unix_now, unpack_keeping, Format, TemplateMeta};
use crate::error::{AgentError, Result};
use crate::spec::validate_name;
use crate::vps::Agent;

pub fn format_from_pb(f: i32) -> Result<Option<Format>> {
    match pb::ArchiveFormat::try_from(f) {
        Ok(pb::ArchiveFormat::Auto) => Ok(None),
        Ok(pb::ArchiveFormat::Tar) => Ok(Some(Format::Tar)),
        Ok(pb::ArchiveFormat::TarGz) => Ok(Some(Format::TarGz)),
        Ok(pb::ArchiveFormat::TarZst) => Ok(Some(Format::TarZst)),
        Err(_) => Err(AgentError::invalid(
            "format",
            format!("unknown archive format {f}"),
        )),
    }
}

impl Agent {
    /// Checks a header before any byte is read.
    pub fn check_import(&self, h: &pb::ImportTemplateHeader) -> Result<Option<Format>> {
        validate_name("name", &h.name)?;
        let fmt = format_from_pb(h.format)?;
        if h.force && !h.replace {
            return Err(AgentError::invalid("force", "goes with replace"));
        }
        if !h.replace && self.paths.template(&h.name).exists() {
            return Err(AgentError::exists("template", &h.name));
        }
        if h.replace && !h.force {
            if h.name == super::busybox::NAME {
                return Err(AgentError::FailedPrecondition(format!(
                    "template {} is built in; replacing it needs force (--force)",
                    h.name
                )));
            }
            self.ensure_template_unused(&h.name)
                .map_err(|e| AgentError::FailedPrecondition(format!(
                    "{e}; force (--force) replaces it, and they keep the old tree until they restart"
                )))?;
        }
        Ok(fmt)
    }

    /// The only directory `ImportTemplatePath` reads from.
    pub fn import_dir(&self) -> std::path::PathBuf {
        self.cfg
            .import_dir
            .clone()
            .unwrap_or_else(|| self.paths.import())
    }

    /// Opens an archive for `ImportTemplatePath`: `path` is relative to the
    /// import dir or absolute inside it, reached without following a
    /// symlink, and a regular file (a device, a fifo or a directory is
    /// refused before a byte is read). Nothing of its content is echoed.
    pub fn open_import_file(&self, path: &str) -> Result<std::fs::File> {
        use nix::fcntl::OFlag;
        let dir = self.import_dir();
        let p = std::path::Path::new(path);
        let rel = if p.is_absolute() {
            p.strip_prefix(&dir).map_err(|_| {
                AgentError::invalid(
                    "path",
                    format!(
                        "{path:?} is not in this node's import dir {} (ferry-agent --import-dir)",
                        dir.display()
                    ),
                )
            })?
        } else {
            p
        };
        let plain = rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !plain || rel.as_os_str().is_empty() {
            return Err(AgentError::invalid(
                "path",
                format!("{path:?} must name a file in the import dir, without '..'"),
            ));
        }
        let not_ok = |why: String| AgentError::invalid("path", format!("{path:?}: {why}"));
        let beneath = ferry_migrate::tree::beneath::Beneath::open(&dir)
            .map_err(|e| AgentError::io(format!("opening the import dir {}", dir.display()), e))?;
        let file = beneath
            .place(rel)
            .and_then(|pl| {
                pl.open(
                    OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
                    nix::sys::stat::Mode::empty(),
                )
            })
            .map_err(|e| {
                if ferry_migrate::tree::beneath::is_escape(&e) {
                    not_ok("reached through a symlink (refused)".into())
                } else {
                    not_ok(e.to_string())
                }
            })?;
        let md = file
            .metadata()
            .map_err(|e| AgentError::io("reading the archive's type", e))?;
        if !md.file_type().is_file() {
            return Err(not_ok("not a regular file".into()));
        }
        Ok(file)
    }

    /// Unpacks an archive into staging and installs it. Blocking: call from a
    /// blocking thread.
    pub fn import_blocking(
        &self,
        h: &pb::ImportTemplateHeader,
        input: impl Read,
        source: String,
    ) -> Result<TemplateMeta> {
        self.import_checked(h, input, source, None)
    }

    /// [`Agent::import_blocking`]; with `sha256`, the archive must have that
    /// digest or nothing is installed. The archive is kept beside the tree
    /// ([`super::ARCHIVE_FILE`]) for nodes that fetch it from here.
    pub fn import_checked(
        &self,
        h: &pb::ImportTemplateHeader,
        input: impl Read,
        source: String,
        sha256: Option<&str>,
    ) -> Result<TemplateMeta> {
        let fmt = self.check_import(h)?;
        let staged =
            self.paths
                .staging()
                .join(format!("{}-{}-{}", h.name, std::process::id(), unix_now()));
        let root = staged.join("rootfs");
        let res = (|| {
            std::fs::create_dir_all(&root)
                .map_err(|e| AgentError::io(format!("creating {}", root.display()), e))?;
            let mut limits = self.cfg.import_limits;
            // The unpacked tree must fit the data dir too, less a reserve.
            limits.max_bytes = limits.max_bytes.min(self.free_room());
            let kept = staged.join(super::ARCHIVE_FILE);
            let keep = std::fs::File::create(&kept)
                .map_err(|e| AgentError::io(format!("creating {}", kept.display()), e))?;
            let u = unpack_keeping(input, fmt, &root, limits, Some(keep))?;
            if let Some(want) = sha256 {
                if u.sha256 != want {
                    return Err(AgentError::BadArchive(format!(
                        "its sha256 is {}, not the cluster's {want}: not installed",
                        u.sha256
                    )));
                }
            }
            let (size, count) = tree_usage(&root);
            let meta = TemplateMeta {
                name: h.name.clone(),
                size_bytes: size,
                sha256: u.sha256,
                source,
                imported_unix: unix_now(),
                file_count: count,
            };
            if let Some(old) = install(&self.paths, &staged, &meta, h.replace)? {
                if self.ensure_template_unused(&h.name).is_ok() {
                    super::remove_tree(&old)?;
                } else {
                    tracing::warn!(template = %h.name, kept = %old.display(),
                        "template replaced while VPSes use it: they keep the old tree until they restart");
                }
            }
            Ok(meta)
        })();
        if res.is_err() {
            let _ = super::remove_tree(&staged);
        }
        res
    }

    pub fn delete_template(&self, name: &str) -> Result<()> {
        validate_name("name", name)?;
        super::get(&self.paths, name)?;
        self.ensure_template_unused(name)?;
        super::remove_tree(&self.paths.template(name))
    }

    fn ensure_template_unused(&self, name: &str) -> Result<()> {
        let users: Vec<String> = self
            .records()
            .into_iter()
            .filter(|r| r.config.template == name)
            .map(|r| r.config.name)
            .collect();
        if users.is_empty() {
            Ok(())
        } else {
            Err(AgentError::FailedPrecondition(format!(
                "template {name} is used by VPS {}",
                users.join(", ")
            )))
        }
    }
}
