//! Which sequences of an origin's stream a region has applied, as a set of disjoint ranges: the
//! region's logical position in that stream. Pure.
//!
//! Why ranges and not "the last sequence applied": several processes of a region share one durable
//! consumer and redeliveries arrive out of order, so batches commit in any order. A high-water mark
//! would jump a hole that opens while the consumer runs (events purged before this region read
//! them), and later checks would pass. With the ranges, every hole is visible until it is filled
//! by its events or covered by a repair round.

use serde::{Deserialize, Serialize};

/// Disjoint, non-adjacent, sorted inclusive ranges `[first, last]` of stream sequences (from 1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeSet(Vec<(u64, u64)>);

impl RangeSet {
    pub fn new() -> RangeSet {
        RangeSet(Vec::new())
    }

    pub fn from_ranges(ranges: impl IntoIterator<Item = (u64, u64)>) -> RangeSet {
        let mut set = RangeSet::new();
        for (first, last) in ranges {
            set.insert(first, last);
        }
        set
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.0
    }

    /// The highest sequence covered.
    pub fn max(&self) -> Option<u64> {
        self.0.last().map(|&(_, last)| last)
    }

    pub fn contains(&self, sequence: u64) -> bool {
        self.0
            .iter()
            .any(|&(first, last)| first <= sequence && sequence <= last)
    }

    /// Cover `[first, last]` (ignored when empty).
    pub fn insert(&mut self, first: u64, last: u64) {
        if first > last {
            return;
        }
        let (mut first, mut last) = (first, last);
        let mut kept = Vec::with_capacity(self.0.len() + 1);
        for &(a, b) in &self.0 {
            // Overlapping or adjacent ranges melt into the new one.
            if b.saturating_add(1) < first || last.saturating_add(1) < a {
                kept.push((a, b));
            } else {
                first = first.min(a);
                last = last.max(b);
            }
        }
        kept.push((first, last));
        kept.sort_unstable();
        self.0 = kept;
    }

    pub fn insert_all(&mut self, sequences: impl IntoIterator<Item = u64>) {
        for sequence in sequences {
            self.insert(sequence, sequence);
        }
    }

    /// The uncovered ranges among sequences `1..below`.
    pub fn holes_below(&self, below: u64) -> Vec<(u64, u64)> {
        let mut holes = Vec::new();
        let mut next = 1;
        for &(first, last) in &self.0 {
            if first >= below {
                break;
            }
            if first > next {
                holes.push((next, first - 1));
            }
            next = last.saturating_add(1);
        }
        if next < below {
            holes.push((next, below - 1));
        }
        holes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn ranges_merge_and_holes_show() {
        let mut set = RangeSet::new();
        set.insert_all([1, 2, 3, 7, 5]);
        assert_eq!(set.ranges(), &[(1, 3), (5, 5), (7, 7)]);
        assert_eq!(set.holes_below(10), vec![(4, 4), (6, 6), (8, 9)]);
        set.insert(4, 6);
        assert_eq!(set.ranges(), &[(1, 7)]);
        assert_eq!(set.holes_below(8), vec![]);
        assert_eq!(RangeSet::new().holes_below(151), vec![(1, 150)]);
        assert_eq!(RangeSet::new().holes_below(1), vec![]);
    }

    proptest! {
        /// The set covers exactly the sequences inserted, in any order, as disjoint sorted
        /// non-adjacent ranges, and its holes are exactly the rest.
        #[test]
        fn covers_exactly_what_was_inserted(
            inserts in proptest::collection::vec((1u64..200, 0u64..5), 0..40),
        ) {
            let mut set = RangeSet::new();
            let mut model = BTreeSet::new();
            for (first, len) in inserts {
                set.insert(first, first + len);
                model.extend(first..=first + len);
            }
            for pair in set.ranges().windows(2) {
                prop_assert!(pair[0].1 + 1 < pair[1].0, "disjoint and not adjacent: {:?}", set);
            }
            for s in 1..=210 {
                prop_assert_eq!(set.contains(s), model.contains(&s));
            }
            let holes: BTreeSet<u64> = set
                .holes_below(211)
                .into_iter()
                .flat_map(|(a, b)| a..=b)
                .collect();
            let expected: BTreeSet<u64> = (1..211).filter(|s| !model.contains(s)).collect();
            prop_assert_eq!(holes, expected);
        }
    }
}
