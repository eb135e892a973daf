//! Template operations as the API offers them: import (streamed or from a node
//! path), list, delete (refused while a VPS uses the template).

use std::io::Read;

use ferry_proto::agent::v1 as pb;

use super::{install, tree_usage, unix_now, unpack, Format, TemplateMeta};
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
        if !h.replace && self.paths.template(&h.name).exists() {
            return Err(AgentError::exists("template", &h.name));
        }
        if h.replace {
            self.ensure_template_unused(&h.name)?;
        }
        Ok(fmt)
    }

    /// Unpacks an archive into staging and installs it. Blocking: call from a
    /// blocking thread.
    pub fn import_blocking(
        &self,
        h: &pb::ImportTemplateHeader,
        input: impl Read,
        source: String,
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
            let u = unpack(input, fmt, &root, self.cfg.import_limits)?;
            let (size, count) = tree_usage(&root);
            let meta = TemplateMeta {
                name: h.name.clone(),
                size_bytes: size,
                sha256: u.sha256,
                source,
                imported_unix: unix_now(),
                file_count: count,
            };
            install(&self.paths, &staged, &meta, h.replace)?;
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
