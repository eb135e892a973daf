//! Fault injection for tests: `FERRY_FAILPOINT=NAME:SECS` in a daemon's
//! environment makes the step named NAME wait SECS seconds, standing in for
//! a source that is cut off or stalled right there. Unset, it costs one
//! environment lookup.
//!
//! Points: `commit-before-finish` (the source, between the decision and
//! telling the target to run the VPS); `kill-held-arrival` (the target,
//! after the decision: SIGKILLs the restored tree before it runs, standing
//! in for a restore that dies then; SECS is ignored).

use std::time::Duration;

/// How long the point `name` waits (None: not armed).
pub fn delay(name: &str) -> Option<Duration> {
    let v = std::env::var("FERRY_FAILPOINT").ok()?;
    let (n, secs) = v.split_once(':')?;
    if n != name {
        return None;
    }
    secs.parse::<u64>().ok().map(Duration::from_secs)
}

/// Waits at point `name` if it is armed.
pub async fn hit(name: &str) {
    if let Some(d) = delay(name) {
        tracing::warn!(point = name, secs = d.as_secs(), "FERRY_FAILPOINT: waiting");
        tokio::time::sleep(d).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_named_point_is_armed() {
        // One test sets the variable: tests of this crate run in one process.
        std::env::set_var("FERRY_FAILPOINT", "commit-before-finish:7");
        assert_eq!(
            super::delay("commit-before-finish"),
            Some(std::time::Duration::from_secs(7))
        );
        assert_eq!(super::delay("other"), None);
        std::env::remove_var("FERRY_FAILPOINT");
        assert_eq!(super::delay("commit-before-finish"), None);
    }
}
