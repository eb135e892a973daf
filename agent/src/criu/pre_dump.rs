//! Pre-copy rounds: CRIU copies the VPS's memory while it keeps running.
//!
//! Each round freezes the tree only long enough to read which pages are
//! present and clear their soft-dirty bits (`track_mem`), then lets it run
//! and reads the pages with `process_vm_readv` (`VmRead` mode). A round with
//! a parent writes only the pages dirtied since the parent round; the final
//! dump ([`super::dump`] with `parent`) writes only what the last round
//! missed. Restore follows the `parent` links the rounds leave in each
//! images dir. Needs soft-dirty tracking in the kernel (the probe's
//! `mem_track`).

use std::path::{Path, PathBuf};

use super::rpc::{Opts, PreDumpMode, Req, ReqType};
use super::swrk::Swrk;
use super::CriuError;

pub const PRE_DUMP_LOG: &str = "pre-dump.log";

pub struct PreDumpRequest<'a> {
    /// Host pid of the VPS's init.
    pub pid: i32,
    pub images: &'a Path,
    /// The previous round's images, relative to `images` (None: the first
    /// round, which copies every present page).
    pub parent: Option<String>,
    /// 0 = errors only .. 4 = debug.
    pub log_level: i32,
    /// Every cgroup hierarchy, mounted (see [`super::yard`]).
    pub cgroup_yard: Option<PathBuf>,
}

pub fn pre_dump(criu: &Path, req: &PreDumpRequest<'_>) -> Result<(), CriuError> {
    // As a dump's: CRIU checks the tree's cgroups and namespaces the same way.
    let (base, _dir) = super::dump::tree_opts(
        "pre-dump",
        req.pid,
        req.images,
        req.log_level,
        PRE_DUMP_LOG,
        req.cgroup_yard.as_deref(),
    )?;
    let opts = Opts {
        track_mem: Some(true),
        parent_img: req.parent.clone(),
        pre_dump_mode: Some(PreDumpMode::VmRead as i32),
        ..base
    };
    let mut w = Swrk::spawn(criu, &[], false)?;
    let resp = w.call(
        &Req {
            r#type: ReqType::PreDump as i32,
            opts: Some(opts),
            ..Default::default()
        },
        |_, _| true,
    )?;
    if !resp.success {
        return Err(CriuError::Failed {
            op: "pre-dump",
            msg: super::failure(resp.cr_errmsg, &req.images.join(PRE_DUMP_LOG)),
        });
    }
    Ok(())
}
