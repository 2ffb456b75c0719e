//! What a replica knows of every rollout in the store between lease renewals.
//!
//! At every renewal a replica with room looks for rollouts it should take: unfinished, not
//! waiting for a person, nobody's lease live. Reading every record each time costs a replica
//! the whole store per renewal (10,000 records parsed every second or so, on every replica).
//! A rollout's record changes only with a commit, and every commit moves its event sequence,
//! which the store keeps beside the record (PostgreSQL's `seq` column). So a renewal reads the
//! sequences only, glances again at just the rollouts whose sequence moved (or that are new),
//! and remembers for each whether it is one to take. A rollout whose owner died keeps its
//! sequence: it is still known as one to take, and is taken once its lease is no longer live.
//!
//! Pure bookkeeping: the runner does the reads ([`Store::rollout_seqs`],
//! [`Store::glances_of`]) and hands their answers here.
//!
//! [`Store::rollout_seqs`]: crate::store::Store::rollout_seqs
//! [`Store::glances_of`]: crate::store::Store::glances_of

use std::collections::{BTreeMap, BTreeSet};

/// How [`crate::store::Store::rollout_seqs`] lists a row whose sequence it does not keep.
pub(super) const UNKNOWN_SEQ: u64 = u64::MAX;

/// Every rollout of the store as last seen: the event its record was at, and whether it was one
/// for a replica to take (it can move by itself).
#[derive(Debug, Default)]
pub(super) struct Census {
    known: BTreeMap<String, Seen>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    seq: u64,
    takeable: bool,
}

impl Census {
    /// Takes in the store's listing of sequences: forgets rollouts no longer listed and answers
    /// those to glance at again (new, or moved since last seen), each with its listed sequence.
    /// A row listed without a sequence ([`UNKNOWN_SEQ`]) is glanced at every time.
    pub(super) fn moved(&mut self, listed: Vec<(String, u64)>) -> Vec<(String, u64)> {
        let listed: BTreeMap<String, u64> = listed.into_iter().collect();
        self.known.retain(|id, _| listed.contains_key(id));
        listed
            .into_iter()
            .filter(|(id, seq)| {
                *seq == UNKNOWN_SEQ || self.known.get(id).is_none_or(|seen| seen.seq != *seq)
            })
            .collect()
    }

    /// Records what a glance at rollout `id` (listed at `seq`) said. A glance that read a later
    /// record than the listing is recorded under the listed sequence: the next listing shows it
    /// moved, and it is glanced at again.
    pub(super) fn seen(&mut self, id: &str, seq: u64, takeable: bool) {
        self.known.insert(id.to_string(), Seen { seq, takeable });
    }

    /// Rollouts listed but not found when glanced at (gone meanwhile): forgotten, so that the
    /// next listing looks again.
    pub(super) fn forget(&mut self, id: &str) {
        self.known.remove(id);
    }

    /// The rollouts to take, in id order: known as takeable, no lease of theirs live, and not
    /// driven here already.
    pub(super) fn to_take<'a>(
        &'a self,
        live: &'a BTreeSet<String>,
        driven: &'a dyn Fn(&str) -> bool,
    ) -> impl Iterator<Item = &'a str> + 'a {
        self.known
            .iter()
            .filter(|(id, seen)| seen.takeable && !live.contains(*id) && !driven(id))
            .map(|(id, _)| id.as_str())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.known.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(rows: &[(&str, u64)]) -> Vec<(String, u64)> {
        rows.iter()
            .map(|(id, seq)| (id.to_string(), *seq))
            .collect()
    }

    #[test]
    fn the_first_listing_glances_at_everything_and_the_next_only_at_what_moved() {
        let mut census = Census::default();
        let first = census.moved(listing(&[("a", 3), ("b", 7), ("c", 1)]));
        assert_eq!(first, listing(&[("a", 3), ("b", 7), ("c", 1)]));
        for (id, seq) in &first {
            census.seen(id, *seq, id != "b");
        }
        // b moved, d is new, c is gone, a is as it was.
        let next = census.moved(listing(&[("a", 3), ("b", 8), ("d", 1)]));
        assert_eq!(next, listing(&[("b", 8), ("d", 1)]));
        assert_eq!(
            census.len(),
            2,
            "c is forgotten; d is not known until glanced at"
        );
        // Nothing moved: nothing to read.
        census.seen("b", 8, false);
        census.seen("d", 1, true);
        assert!(
            census
                .moved(listing(&[("a", 3), ("b", 8), ("d", 1)]))
                .is_empty()
        );
    }

    #[test]
    fn a_rollout_is_taken_only_when_takeable_unleased_and_not_driven_here() {
        let mut census = Census::default();
        for (id, takeable) in [("a", true), ("b", true), ("c", false), ("d", true)] {
            census.seen(id, 1, takeable);
        }
        let live: BTreeSet<String> = ["b".to_string()].into();
        let driven = |id: &str| id == "d";
        let taken: Vec<&str> = census.to_take(&live, &driven).collect();
        assert_eq!(taken, vec!["a"]);
        // b's owner died: its lease is no longer live, and it is taken although it never moved.
        let none = BTreeSet::new();
        let taken: Vec<&str> = census.to_take(&none, &driven).collect();
        assert_eq!(taken, vec!["a", "b"]);
    }

    #[test]
    fn a_row_without_a_sequence_is_glanced_at_every_time() {
        let mut census = Census::default();
        assert_eq!(census.moved(listing(&[("a", UNKNOWN_SEQ)])).len(), 1);
        census.seen("a", UNKNOWN_SEQ, true);
        assert_eq!(census.moved(listing(&[("a", UNKNOWN_SEQ)])).len(), 1);
        let live = BTreeSet::new();
        assert_eq!(census.to_take(&live, &|_| false).count(), 1);
    }

    #[test]
    fn a_rollout_gone_when_glanced_at_is_looked_for_again() {
        let mut census = Census::default();
        census.moved(listing(&[("a", 1)]));
        census.forget("a");
        assert_eq!(census.moved(listing(&[("a", 1)])), listing(&[("a", 1)]));
    }
}
