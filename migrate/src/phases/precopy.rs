//! Pre-copy: rounds of CRIU pre-dumps while the VPS runs, each sent to the
//! target before the next. The first round copies all present memory; each
//! later round only what the VPS dirtied meanwhile (soft-dirty tracking), so
//! the final dump, inside the freeze, writes only the last round's dirt.
//!
//! On the source the rounds are `pre-1`, `pre-2`, … inside the images dir,
//! each with a `parent` link to the one before (CRIU makes them); the final
//! dump links to the last. The target receives the same tree, and its
//! restore follows the links. A failure in a round leaves the VPS running:
//! nothing was frozen.
//!
//! When to stop is [`Rule`], P.Haul's rule: after a round small enough to
//! dump frozen, after a round that did not shrink by a tenth (the VPS dirties
//! memory as fast as it is copied: more rounds only add time), or after
//! [`Rule::max_rounds`].

use std::path::Path;

use ferry_proto::agent::v1::agent_service_client::AgentServiceClient;
use tonic::transport::Channel;

use super::rootfs::{push_tree, Walk};
use super::{Job, MigrateError, Progress, Source};
use crate::tree::scan::Manifest;

/// When pre-copy stops and the VPS is frozen.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub max_rounds: usize,
    /// A round this small (bytes of pages) is what a freeze can take.
    pub small: u64,
    /// A round must shrink to this many tenths of the one before (or less)
    /// to be worth another.
    pub shrink_tenths: u64,
}

impl Default for Rule {
    fn default() -> Rule {
        Rule {
            max_rounds: 8,
            small: 1 << 20,
            shrink_tenths: 9,
        }
    }
}

/// What [`Rule::next`] says after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Again,
    /// Freeze now; the reason, for the progress stream.
    Freeze(&'static str),
}

impl Rule {
    /// `rounds`: the bytes of pages each round so far wrote, in order.
    pub fn next(&self, rounds: &[u64]) -> Next {
        let Some(&last) = rounds.last() else {
            return Next::Again;
        };
        if last <= self.small {
            return Next::Freeze("what is left is small");
        }
        if rounds.len() >= self.max_rounds {
            return Next::Freeze("the most rounds");
        }
        if let [.., before, _] = rounds {
            if last.saturating_mul(10) > before.saturating_mul(self.shrink_tenths) {
                return Next::Freeze("the VPS dirties memory as fast as it is copied");
            }
        }
        Next::Again
    }
}

/// What the freeze and the final push need from the rounds.
pub struct PreCopied {
    /// The last round's dir, relative to the images dir: the final dump's parent.
    pub parent: String,
    /// The images tree the target holds now.
    pub sent: Manifest,
}

/// The name of round `n`'s dir inside the images dir.
fn round_dir(n: usize) -> String {
    format!("pre-{n}")
}

pub async fn run(
    src: &dyn Source,
    target: &mut AgentServiceClient<Channel>,
    job: &Job,
    images: &Path,
    rule: Rule,
    p: &mut Progress,
) -> Result<PreCopied, MigrateError> {
    let mut rounds: Vec<u64> = Vec::new();
    let mut sent: Option<Manifest> = None;
    loop {
        let n = rounds.len() + 1;
        let phase = format!("pre-copy-{n}");
        p.phase(
            &phase,
            format!("round {n}: memory copied while the VPS runs"),
        )
        .await;
        let dir = round_dir(n);
        let parent = (n > 1).then(|| format!("../{}", round_dir(n - 1)));
        src.pre_dump(&images.join(&dir), parent.as_deref())
            .await
            .map_err(MigrateError::at("pre-copy"))?;
        rounds.push(pages_bytes(&images.join(&dir)));
        let (m, _, st, _) = push_tree(
            target,
            &job.id,
            "images",
            super::images::sent_root(images),
            Walk {
                prev: sent.take(),
                ..Walk::default()
            },
            Default::default(),
            p,
            &phase,
        )
        .await
        .map_err(MigrateError::at("pre-copy"))?;
        sent = Some(m);
        tracing::debug!(migration = %job.id, round = n, wire = st.wire_bytes, "pre-copy round sent");
        // As the freeze's row: the bytes the round dumped.
        p.done_phase(&phase, crate::tree::files_bytes(&images.join(&dir)));
        if let Next::Freeze(why) = rule.next(&rounds) {
            tracing::info!(migration = %job.id, rounds = n, pages = ?rounds, why, "pre-copy done");
            p.phase(&phase, format!("freezing after {n} rounds: {why}"))
                .await;
            return Ok(PreCopied {
                parent: dir,
                sent: sent.unwrap_or_default(),
            });
        }
    }
}

/// Bytes of memory pages in one images dir.
fn pages_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| super::images::is_pages(Path::new(&e.file_name())))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn stops_when_small_when_not_shrinking_or_after_the_most_rounds() {
        let r = Rule::default();
        assert_eq!(r.next(&[]), Next::Again);
        // Shrinking well: go on.
        assert_eq!(r.next(&[256 * MIB]), Next::Again);
        assert_eq!(r.next(&[256 * MIB, 40 * MIB]), Next::Again);
        // Small enough to dump frozen.
        assert!(
            matches!(r.next(&[256 * MIB, 40 * MIB, MIB]), Next::Freeze(w) if w.contains("small"))
        );
        // The first round alone may be small (an idle VPS).
        assert!(matches!(r.next(&[MIB / 2]), Next::Freeze(_)));
        // Grew, or shrank by less than a tenth: the VPS keeps up with the copy.
        for after in [60 * MIB, 37 * MIB] {
            assert!(
                matches!(r.next(&[256 * MIB, 40 * MIB, after]), Next::Freeze(w) if w.contains("as fast")),
                "{after}"
            );
        }
        assert_eq!(r.next(&[256 * MIB, 40 * MIB, 35 * MIB]), Next::Again);
        // Never more than max_rounds.
        let mut rounds: Vec<u64> = (0..8).map(|i| (256 * MIB) >> i).collect();
        assert!(matches!(r.next(&rounds), Next::Freeze(w) if w.contains("most")));
        rounds.pop();
        assert_eq!(r.next(&rounds), Next::Again);
    }
}
