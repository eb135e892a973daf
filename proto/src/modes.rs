//! Migration modes by the names operators type and records keep ("auto",
//! "post-copy", "pre-copy", "stop-copy", "cold"): one spelling for ferryctl,
//! the controller and the agent.

use crate::agent::v1::MigrationMode;

const NAMES: [(MigrationMode, &str); 5] = [
    (MigrationMode::Auto, "auto"),
    (MigrationMode::PostCopy, "post-copy"),
    (MigrationMode::PreCopy, "pre-copy"),
    (MigrationMode::StopCopy, "stop-copy"),
    (MigrationMode::Cold, "cold"),
];

pub fn name(m: MigrationMode) -> &'static str {
    NAMES
        .iter()
        .find(|(x, _)| *x == m)
        .map(|(_, n)| *n)
        .unwrap_or("auto")
}

/// The mode called `s`, or None.
pub fn parse(s: &str) -> Option<MigrationMode> {
    NAMES.iter().find(|(_, n)| *n == s).map(|(m, _)| *m)
}

/// Every name, for messages ("auto, post-copy, ...").
pub fn all() -> String {
    NAMES.iter().map(|(_, n)| *n).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_mode_reads_back_by_its_name() {
        for (m, n) in super::NAMES {
            assert_eq!(super::parse(super::name(m)), Some(m));
            assert_eq!(super::name(m), n);
        }
        assert_eq!(super::parse("fast"), None);
    }
}
