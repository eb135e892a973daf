//! User-namespace id ranges: the host uids and gids a VPS's ids map to.
//!
//! Every unprivileged VPS owns one range of [`RANGE`] ids (0..65535 inside is
//! `base..base+65535` on the host). Ranges are aligned slots, so two VPSes
//! either share a slot or none of their ids. Host ids below [`FIRST_BASE`]
//! stay the host's own (system and human users, subuid ranges). The last slot
//! holds uid 4294967295, which the kernel treats as "no id", and is never used.
//!
//! The controller hands slots out from the bottom up, an agent on its own
//! (node-local VPSes) at random in [`AGENT_ZONE`], so the two rarely meet and
//! every agent refuses a range it already has in use.

/// Ids in one VPS's range.
pub const RANGE: u32 = 65536;
/// The lowest base a VPS may have (slot 16).
pub const FIRST_BASE: u32 = 16 * RANGE;
/// The highest base a VPS may have (slot 65534).
pub const LAST_BASE: u32 = u32::MAX - 2 * RANGE + 1;

/// Checks a base from the wire: aligned, and inside the usable slots.
pub fn check_base(base: u32) -> Result<(), String> {
    if !base.is_multiple_of(RANGE) {
        return Err(format!("{base} is not a multiple of {RANGE}"));
    }
    if !(FIRST_BASE..=LAST_BASE).contains(&base) {
        return Err(format!(
            "{base} is outside {FIRST_BASE}..={LAST_BASE} (host ids below stay the host's)"
        ));
    }
    Ok(())
}

/// The lowest free base, given the bases in use (the controller's order).
pub fn lowest_free(used: impl IntoIterator<Item = u32>) -> Option<u32> {
    let used: std::collections::BTreeSet<u32> = used.into_iter().collect();
    (FIRST_BASE / RANGE..=LAST_BASE / RANGE)
        .map(|slot| slot * RANGE)
        .find(|b| !used.contains(b))
}

/// The agent's own zone: node-local VPSes take their ranges here, at a
/// random slot (see [`agent_pick`]), ids below 2^31 (some tools still read
/// ids as signed 32-bit).
pub const AGENT_ZONE: std::ops::RangeInclusive<u32> = (1 << 30)..=((1 << 31) - RANGE);

/// A node-local VPS's range: the first free slot from a random start in
/// [`AGENT_ZONE`] (`seed`), so that two agents' VPSes, which may later move
/// between them, rarely share one; else any free slot, highest first.
pub fn agent_pick(used: impl IntoIterator<Item = u32>, seed: u64) -> Option<u32> {
    let used: std::collections::BTreeSet<u32> = used.into_iter().collect();
    let (lo, hi) = (*AGENT_ZONE.start() / RANGE, *AGENT_ZONE.end() / RANGE);
    let n = (hi - lo + 1) as u64;
    let start = (seed % n) as u32;
    (0..n as u32)
        .map(|i| (lo + (start + i) % n as u32) * RANGE)
        .chain(
            (FIRST_BASE / RANGE..=LAST_BASE / RANGE)
                .rev()
                .map(|slot| slot * RANGE),
        )
        .find(|b| !used.contains(b))
}

/// `base-last` as operators read it.
pub fn describe(base: u32) -> String {
    format!("{base}-{}", base as u64 + RANGE as u64 - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bases_are_aligned_and_inside_the_usable_slots() {
        assert!(check_base(FIRST_BASE).is_ok());
        assert!(check_base(LAST_BASE).is_ok());
        assert!(check_base(0).is_err());
        assert!(check_base(FIRST_BASE - RANGE).is_err());
        assert!(check_base(FIRST_BASE + 1).is_err());
        assert!(check_base(LAST_BASE + RANGE).is_err());
        // The last id of the last usable range is still a real id.
        assert!(LAST_BASE as u64 + RANGE as u64 - 1 < u32::MAX as u64);
    }

    #[test]
    fn free_slots_are_found_from_either_end_and_never_reused() {
        assert_eq!(lowest_free([]), Some(FIRST_BASE));
        assert_eq!(lowest_free([FIRST_BASE]), Some(FIRST_BASE + RANGE));
        let zone_start = *AGENT_ZONE.start();
        assert_eq!(agent_pick([], 0), Some(zone_start));
        assert_eq!(agent_pick([zone_start], 0), Some(zone_start + RANGE));
        let picked = agent_pick([], 12345).unwrap();
        assert!(AGENT_ZONE.contains(&picked) && check_base(picked).is_ok());
        let all: Vec<u32> = (FIRST_BASE / RANGE..=LAST_BASE / RANGE)
            .map(|s| s * RANGE)
            .collect();
        assert_eq!(lowest_free(all.clone()), None);
        assert_eq!(agent_pick(all, 7), None);
    }
}
