//! Choosing how memory moves.
//!
//! - pre-copy: iterative dumps while the VPS runs; needs soft-dirty tracking.
//! - post-copy: the VPS resumes on the target at once and its memory follows
//!   on demand (userfaultfd lazy pages).
//! - stop-copy: dump everything while frozen, copy, restore.
//! - cold: a stopped VPS: its files only.
//!
//! `auto`, for a running VPS:
//! - pre-copy where this node tracks dirty memory: its freeze holds only
//!   what the VPS dirtied during the last round, and, unlike post-copy, the
//!   VPS never depends on two nodes at once;
//! - else post-copy when it uses at least [`AUTO_POST_COPY`] of memory and
//!   both nodes have lazy pages (its downtime stays flat while stop-copy's
//!   grows with memory); if the target turns out to lack lazy pages,
//!   preflight falls back to stop-copy;
//! - else stop-copy.
//!
//! A forced mode the nodes cannot do is refused with the reason.

use ferry_proto::agent::v1::MigrationMode;

use super::{MigrateError, Source};

/// Memory in use from which `auto` prefers post-copy.
pub const AUTO_POST_COPY: u64 = 256 << 20;

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
        Mode::Auto if src.dirty_tracking() => Ok(Mode::PreCopy),
        Mode::Auto if src.post_copy() && src.memory_bytes() >= AUTO_POST_COPY => Ok(Mode::PostCopy),
        Mode::Auto | Mode::StopCopy => Ok(Mode::StopCopy),
        Mode::Cold => Err(MigrateError::Refused(
            "mode cold: the VPS is running; stop it first or use a live mode".into(),
        )),
        Mode::PreCopy if !src.dirty_tracking() => Err(MigrateError::Refused(
            "mode pre-copy: this kernel has no soft-dirty memory tracking (CONFIG_MEM_SOFT_DIRTY); use stop-copy".into(),
        )),
        Mode::PreCopy => Ok(Mode::PreCopy),
        Mode::PostCopy if !src.post_copy() => Err(MigrateError::Refused(
            "mode post-copy: this node's CRIU or kernel has no lazy pages (userfaultfd); use stop-copy".into(),
        )),
        Mode::PostCopy => Ok(Mode::PostCopy),
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::phases::Dumped;

    /// Only what `choose` reads; the rest is never called.
    struct Fake {
        running: bool,
        lazy: bool,
        mem: u64,
        dirty: bool,
    }

    #[tonic::async_trait]
    impl Source for Fake {
        fn spec(&self) -> ferry_proto::agent::v1::VpsSpec {
            Default::default()
        }
        fn running(&self) -> bool {
            self.running
        }
        fn rootfs(&self) -> PathBuf {
            PathBuf::new()
        }
        fn scratch(&self) -> PathBuf {
            PathBuf::new()
        }
        fn criu_version(&self) -> String {
            String::new()
        }
        fn dirty_tracking(&self) -> bool {
            self.dirty
        }
        fn post_copy(&self) -> bool {
            self.lazy
        }
        fn memory_bytes(&self) -> u64 {
            self.mem
        }
        async fn pre_dump(&self, _: &Path, _: Option<&str>) -> Result<(), String> {
            Err("unused".into())
        }
        async fn dump(&self, _: &Path, _: bool, _: Option<&str>) -> Result<Dumped, String> {
            Err("unused".into())
        }
        async fn post_copy_done(&self) -> Result<u64, String> {
            Ok(0)
        }
        async fn resume(&self, _: &Path, _: &str) -> Result<(), String> {
            Ok(())
        }
        async fn decide(&self, c: bool) -> Result<bool, String> {
            Ok(c)
        }
        async fn release(&self) -> Result<(), String> {
            Ok(())
        }
    }

    #[test]
    fn auto_weighs_memory_and_lazy_pages_forced_modes_say_why_not() {
        let f = |running, lazy, mem| Fake {
            running,
            lazy,
            mem,
            dirty: false,
        };
        let ok = |m: Mode, s: &Fake| choose(m, s).ok();
        assert_eq!(ok(Mode::Auto, &f(false, true, 1 << 30)), Some(Mode::Cold));
        assert_eq!(
            ok(Mode::Auto, &f(true, true, 64 << 20)),
            Some(Mode::StopCopy)
        );
        assert_eq!(
            ok(Mode::Auto, &f(true, true, 512 << 20)),
            Some(Mode::PostCopy)
        );
        assert_eq!(
            ok(Mode::Auto, &f(true, false, 512 << 20)),
            Some(Mode::StopCopy)
        );
        assert_eq!(ok(Mode::PostCopy, &f(true, true, 1)), Some(Mode::PostCopy));
        // Dirty tracking: pre-copy, whatever the size; forced, it runs.
        let tracked = |mem| Fake {
            dirty: true,
            ..f(true, true, mem)
        };
        assert_eq!(ok(Mode::Auto, &tracked(64 << 20)), Some(Mode::PreCopy));
        assert_eq!(ok(Mode::Auto, &tracked(1 << 30)), Some(Mode::PreCopy));
        assert_eq!(ok(Mode::PreCopy, &tracked(1)), Some(Mode::PreCopy));
        assert_eq!(
            ok(
                Mode::Auto,
                &Fake {
                    dirty: true,
                    ..f(false, true, 1)
                }
            ),
            Some(Mode::Cold)
        );
        for (m, s, why) in [
            (Mode::PostCopy, f(true, false, 1), "no lazy pages"),
            (Mode::PreCopy, f(true, true, 1), "soft-dirty"),
            (Mode::Cold, f(true, true, 1), "is running"),
            (Mode::StopCopy, f(false, true, 1), "is stopped"),
        ] {
            let e = choose(m, &s).expect_err("refused").to_string();
            assert!(e.contains(why), "{m:?}: {e}");
        }
    }
}
