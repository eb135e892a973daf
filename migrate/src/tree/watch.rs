//! Change tracking between passes: an inotify watch on every directory of the
//! tree, set before the directory is read, so that a later pass re-reads only
//! the directories something happened in instead of walking the whole tree.
//!
//! inotify reports, on the watch of an entry's parent directory, every create,
//! delete, rename, write and metadata change made through a path, whoever
//! makes it (the VPS writes through its overlay, whose upper dir is what we
//! watch). What it cannot report, the rescan makes up for:
//! - a queue overflow, or a directory we could not watch (the per-user watch
//!   limit): the next pass walks the whole tree, as without a tracker;
//! - a hard link changed through another of its paths: every path of an inode
//!   whose link count is above one is looked at again with it;
//! - writes through a shared writable memory mapping raise no event at all:
//!   the caller names the mapped files and they are always sent.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use super::TreeError;

/// What changed since the watches were set, as far as inotify can tell.
#[derive(Debug, Default)]
pub struct Changes {
    /// Directories to read again (relative; "" is the root).
    pub dirs: BTreeSet<PathBuf>,
    /// Events were lost or a directory went unwatched: walk everything.
    pub everything: bool,
}

pub struct Watch {
    fd: Inotify,
    dirs: HashMap<WatchDescriptor, PathBuf>,
    /// Why tracking can no longer be trusted, if it cannot.
    broken: Option<String>,
}

fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR
        | AddWatchFlags::IN_DONT_FOLLOW
}

impl Watch {
    pub fn new() -> Result<Watch, TreeError> {
        let fd = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(|e| {
            TreeError::Invalid(format!(
                "inotify: {e} (fs.inotify.max_user_instances may be exhausted)"
            ))
        })?;
        Ok(Watch {
            fd,
            dirs: HashMap::new(),
            broken: None,
        })
    }

    /// Watches directory `rel` of the tree at `root`. Call it before reading
    /// the directory: a change made after the read is then always reported.
    /// A directory that cannot be watched marks the tracker broken (the next
    /// pass walks everything) rather than failing the pass.
    pub fn add(&mut self, root: &Path, rel: &Path) {
        if self.broken.is_some() {
            return;
        }
        match self.fd.add_watch(&root.join(rel), mask()) {
            // Re-watching a directory (moved, or read again) returns its old
            // descriptor: the path is updated.
            Ok(wd) => {
                self.dirs.insert(wd, rel.to_path_buf());
            }
            // Gone since it was listed: its parent's event covers it.
            Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => {}
            Err(e) => {
                self.broken = Some(format!("watching {}: {e}", rel.display()));
            }
        }
    }

    pub fn watched(&self) -> usize {
        self.dirs.len()
    }

    /// Takes every event queued so far.
    pub fn drain(&mut self) -> Changes {
        let mut ch = Changes::default();
        loop {
            let evs = match self.fd.read_events() {
                Ok(evs) => evs,
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    self.broken = Some(format!("reading inotify events: {e}"));
                    break;
                }
            };
            if evs.is_empty() {
                break;
            }
            for ev in evs {
                if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    self.broken = Some("inotify queue overflowed".into());
                    continue;
                }
                if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                    // The directory is gone (or unmounted): its parent saw that.
                    self.dirs.remove(&ev.wd);
                    continue;
                }
                let Some(dir) = self.dirs.get(&ev.wd) else {
                    continue;
                };
                note(&mut ch, dir, ev.name.as_ref(), ev.mask);
            }
        }
        if let Some(why) = &self.broken {
            tracing::debug!(why = %why, "change tracking lost: walking the whole tree");
            ch.everything = true;
        }
        ch
    }
}

fn note(ch: &mut Changes, dir: &Path, name: Option<&OsString>, mask: AddWatchFlags) {
    match name {
        // Something happened to an entry of `dir`: read `dir` again.
        Some(_) => {
            ch.dirs.insert(dir.to_path_buf());
        }
        // To `dir` itself (its own metadata, or it was moved or deleted):
        // its entry lives in its parent.
        None => {
            if mask.contains(AddWatchFlags::IN_ATTRIB) {
                ch.dirs.insert(dir.to_path_buf());
            }
            match dir.parent() {
                Some(p) => ch.dirs.insert(p.to_path_buf()),
                None => ch.dirs.insert(PathBuf::new()),
            };
        }
    }
}
