//! Expedited RCU grace periods while a VPS is frozen.
//!
//! Several kernel steps of a dump and a restore wait for an RCU grace period:
//! the first move of a task into a cgroup (the threadgroup rwsem's rcu_sync),
//! dropping the network namespace's sysfs mount after CRIU read its links,
//! mounting cgroup2. On this host a normal grace period is ~10 ms, and a
//! post-copy migration paid ~25 ms of them inside its freeze (measured: 171-183
//! ms at 256 MiB, 146-150 ms with expedited grace periods).
//!
//! `/sys/kernel/rcu_expedited` makes every grace period expedited (IPIs to the
//! CPUs instead of waiting for them to pass a quiescent state on their own),
//! which costs the rest of the host a little CPU while it is set. So the agent
//! sets it only while some VPS of its is frozen (a [`Guard`] per freeze, the
//! first one sets it, the last one puts the old value back), and never if the
//! operator turned this off (`--expedite-rcu=false`) or had set it already.
//!
//! A marker in the run dir records the value to put back, so an agent that
//! died inside a window restores it at its next start ([`recover`]).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The kernel's switch.
pub const KNOB: &str = "/sys/kernel/rcu_expedited";
/// In the run dir while the agent holds the knob set: the value to put back.
const MARKER: &str = "rcu-expedited.prev";

struct State {
    holders: usize,
    /// The knob and the marker, while this agent holds the knob set.
    held: Option<(PathBuf, PathBuf)>,
}

static STATE: Mutex<State> = Mutex::new(State {
    holders: 0,
    held: None,
});

/// Holds RCU grace periods expedited until dropped.
#[must_use = "the grace periods are expedited only while the guard lives"]
pub struct Guard {
    _private: (),
}

/// Expedites RCU grace periods until the guard drops. Best effort: a knob
/// that cannot be read or written leaves the kernel as it was.
pub fn expedite(run_dir: &Path) -> Guard {
    expedite_at(Path::new(KNOB), run_dir)
}

fn expedite_at(knob: &Path, run_dir: &Path) -> Guard {
    let mut st = STATE.lock().unwrap_or_else(|p| p.into_inner());
    st.holders += 1;
    if st.holders == 1 {
        st.held = set(knob, run_dir).map(|m| (knob.to_path_buf(), m));
    }
    Guard { _private: () }
}

fn set(knob: &Path, run_dir: &Path) -> Option<PathBuf> {
    let prev = std::fs::read_to_string(knob).ok()?;
    if prev.trim() != "0" {
        // Set by someone else: theirs to keep.
        return None;
    }
    let marker = run_dir.join(MARKER);
    std::fs::write(&marker, prev.trim()).ok()?;
    if let Err(e) = std::fs::write(knob, "1") {
        tracing::debug!(error = %e, "cannot expedite RCU grace periods");
        let _ = std::fs::remove_file(&marker);
        return None;
    }
    Some(marker)
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut st = STATE.lock().unwrap_or_else(|p| p.into_inner());
        st.holders = st.holders.saturating_sub(1);
        if st.holders == 0 {
            if let Some((knob, marker)) = st.held.take() {
                put_back(&knob, &marker);
            }
        }
    }
}

fn put_back(knob: &Path, marker: &Path) {
    let prev = std::fs::read_to_string(marker).unwrap_or_else(|_| "0".into());
    match std::fs::write(knob, prev.trim()) {
        Ok(()) => {
            let _ = std::fs::remove_file(marker);
        }
        Err(e) => {
            tracing::warn!(knob = %knob.display(), error = %e, "cannot put RCU grace periods back")
        }
    }
}

/// At start: an earlier agent that died while a VPS was frozen left the knob
/// set; put back what it found.
pub fn recover(run_dir: &Path) {
    recover_at(Path::new(KNOB), run_dir)
}

fn recover_at(knob: &Path, run_dir: &Path) {
    let marker = run_dir.join(MARKER);
    if marker.exists() {
        tracing::warn!(knob = %knob.display(), "putting back RCU grace periods an earlier agent left expedited");
        put_back(knob, &marker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn knob_in(dir: &Path, v: &str) -> PathBuf {
        let k = dir.join("rcu_expedited");
        std::fs::write(&k, v).expect("knob");
        k
    }

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).expect("read").trim().to_string()
    }

    /// One test: the holder count is process-wide.
    #[test]
    fn set_while_held_put_back_after_kept_if_not_ours_recovered_after_a_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let knob = knob_in(dir.path(), "0\n");
        let a = expedite_at(&knob, dir.path());
        assert_eq!(read(&knob), "1");
        let b = expedite_at(&knob, dir.path());
        drop(a);
        assert_eq!(read(&knob), "1", "another freeze still holds it");
        drop(b);
        assert_eq!(read(&knob), "0");
        assert!(!dir.path().join(MARKER).exists());

        // Set by the operator: left alone.
        std::fs::write(&knob, "1").expect("knob");
        drop(expedite_at(&knob, dir.path()));
        assert_eq!(read(&knob), "1");

        // An agent died inside a window: the next one puts the value back.
        std::fs::write(&knob, "0").expect("knob");
        std::mem::forget(expedite_at(&knob, dir.path()));
        assert_eq!(read(&knob), "1");
        recover_at(&knob, dir.path());
        assert_eq!(read(&knob), "0");
        assert!(!dir.path().join(MARKER).exists());
        // (The forgotten guard's count is this test's alone to leak.)
        let mut st = STATE.lock().unwrap_or_else(|p| p.into_inner());
        (st.holders, st.held) = (0, None);
    }
}
