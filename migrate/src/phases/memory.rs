//! Choosing how memory moves.
//!
//! - pre-copy: iterative dumps while the VPS runs; needs soft-dirty tracking.
//! - post-copy: the VPS resumes on the target at once and its memory follows
//!   on demand (userfaultfd lazy pages).
//! - stop-copy: dump everything while frozen, copy, restore.
//! - cold: a stopped VPS: its files only.
//!
//! `auto` takes stop-copy for a running VPS: it has no window in which the
//! VPS depends on two nodes. Post-copy is chosen explicitly (it cuts the
//! freeze for VPSes with much memory; see docs/migration.md). Pre-copy is
//! refused with the reason.

use ferry_proto::agent::v1::MigrationMode;

use super::{MigrateError, Source};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Auto,
    PostCopy,
    PreCopy,
    StopCopy,
    Cold,
}

impl Mode {
    pub fn from_pb(m: i32) -> Mode {
        match MigrationMode::try_from(m).unwrap_or(MigrationMode::Auto) {
            MigrationMode::Auto => Mode::Auto,
            MigrationMode::PostCopy => Mode::PostCopy,
            MigrationMode::PreCopy => Mode::PreCopy,
            MigrationMode::StopCopy => Mode::StopCopy,
            MigrationMode::Cold => Mode::Cold,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::PostCopy => "post-copy",
            Mode::PreCopy => "pre-copy",
            Mode::StopCopy => "stop-copy",
            Mode::Cold => "cold",
        }
    }
}

pub fn choose(asked: Mode, src: &dyn Source) -> Result<Mode, MigrateError> {
    let running = src.running();
    if !running {
        return match asked {
            Mode::Auto | Mode::Cold => Ok(Mode::Cold),
            m => Err(MigrateError::Refused(format!(
                "mode {}: the VPS is stopped; a stopped VPS migrates cold (its files only)",
                m.as_str()
            ))),
        };
    }
    match asked {
        Mode::Auto | Mode::StopCopy => Ok(Mode::StopCopy),
        Mode::Cold => Err(MigrateError::Refused(
            "mode cold: the VPS is running; stop it first or use a live mode".into(),
        )),
        Mode::PreCopy if !src.dirty_tracking() => Err(MigrateError::Refused(
            "mode pre-copy: this kernel has no soft-dirty memory tracking (CONFIG_MEM_SOFT_DIRTY); use stop-copy".into(),
        )),
        Mode::PreCopy => Err(MigrateError::Refused(
            "mode pre-copy is not implemented yet; use stop-copy".into(),
        )),
        Mode::PostCopy if !src.post_copy() => Err(MigrateError::Refused(
            "mode post-copy: this node's CRIU or kernel has no lazy pages (userfaultfd); use stop-copy".into(),
        )),
        Mode::PostCopy => Ok(Mode::PostCopy),
    }
}
