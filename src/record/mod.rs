//! The record domain: versions, the stored state of a record, and how states merge. Pure, no I/O.
//!
//! The stored state of a record is the set of its *maximal* versions (an antichain under version
//! vector order) plus its home. Merging is a join-semilattice (commutative, associative,
//! idempotent), which is what lets regions apply each other's events in any order, any number of
//! times, and still end in the same state. Concurrent versions are always kept, whatever the
//! collection's conflict strategy: strategies are views over the set (see [`view`]), so changing a
//! strategy never needs data that was thrown away, and every region holds the same set.
//!
//! Deletes are tombstone versions that merge like any other, so a delete never resurrects.
//! The home travels beside the versions and merges by the highest `(epoch, region)`, independently
//! of the values, so a failover write can never bring an old home back.

pub mod digest;
pub mod digest_frames;
pub mod names;
pub mod policy;
pub mod resolution;
pub mod value;
pub mod view;

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use self::resolution::Resolution;

use crate::clock::hlc::Hlc;
use crate::clock::version::{Actor, Causality, VersionVector};

/// One version of a record's value. The same shape is used in API responses (siblings), in events
/// and in the resolver ABI: `{"value","deleted","region","hlc","version"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Version {
    /// The JSON value; `null` for a tombstone.
    #[schema(value_type = Object)]
    pub value: Value,
    pub deleted: bool,
    /// The region that wrote this version.
    pub region: String,
    /// HLC as a decimal string.
    #[schema(value_type = String)]
    pub hlc: Hlc,
    /// Version vector `{"<region>.<incarnation>": counter}`.
    #[schema(value_type = Object)]
    #[serde(rename = "version")]
    pub vector: VersionVector,
}

impl Version {
    /// The order used to break ties deterministically: `(hlc, region)`, then the vector's text so
    /// that even a pathological tie is ordered the same way everywhere.
    pub fn lww_key(&self) -> (Hlc, &str, String) {
        (
            self.hlc,
            &self.region,
            serde_json::to_string(&self.vector).unwrap_or_default(),
        )
    }
}

/// Which region leads a record's writes, and how many times the home has moved.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Home {
    pub epoch: u64,
    pub region: String,
}

impl Home {
    pub fn new(region: impl Into<String>) -> Home {
        Home {
            epoch: 0,
            region: region.into(),
        }
    }
}

/// What merging one version into a state did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeOutcome {
    /// A held version dominates or equals the incoming one: nothing changed.
    AlreadyCovered,
    /// The incoming version replaced every held version it dominates, and no other remains.
    Superseded,
    /// The incoming version is concurrent with a held one: both are kept (a conflict).
    Conflict,
    /// A held version has the same vector but different content: two writes under one version
    /// (a region restored from a backup reused its counters, or a bug). Every region keeps the one
    /// with the larger content hash, whatever the arrival order; the caller logs a violation.
    Diverged,
}

/// The stored state of a record: its home and its maximal versions, kept sorted by
/// [`Version::lww_key`] so equal states compare equal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordState {
    pub home: Home,
    pub versions: Vec<Version>,
}

impl RecordState {
    pub fn new(home: Home) -> RecordState {
        RecordState {
            home,
            versions: Vec::new(),
        }
    }

    /// The join of every held vector: what a reader has seen, and what a writer supersedes.
    pub fn causal_context(&self) -> VersionVector {
        self.versions
            .iter()
            .fold(VersionVector::new(), |acc, v| acc.joined(&v.vector))
    }

    pub fn max_hlc(&self) -> Option<Hlc> {
        self.versions.iter().map(|v| v.hlc).max()
    }

    /// Merge one version. Equal vectors denote the same write, so they are never kept twice; should
    /// their contents differ, the larger content hash is kept (see [`MergeOutcome::Diverged`]).
    pub fn merge_version(&mut self, incoming: Version) -> MergeOutcome {
        let mut dominated = Vec::new();
        for (index, held) in self.versions.iter().enumerate() {
            match held.vector.compare(&incoming.vector) {
                Causality::Equal if *held == incoming => return MergeOutcome::AlreadyCovered,
                Causality::Equal => {
                    if digest::version_hash(&incoming) > digest::version_hash(held) {
                        self.versions[index] = incoming;
                        self.versions.sort_by(|a, b| a.lww_key().cmp(&b.lww_key()));
                    }
                    return MergeOutcome::Diverged;
                }
                Causality::Dominates => return MergeOutcome::AlreadyCovered,
                Causality::DominatedBy => dominated.push(index),
                Causality::Concurrent => {}
            }
        }
        for index in dominated.into_iter().rev() {
            self.versions.remove(index);
        }
        self.versions.push(incoming);
        self.versions.sort_by(|a, b| a.lww_key().cmp(&b.lww_key()));
        if self.versions.len() == 1 {
            MergeOutcome::Superseded
        } else {
            MergeOutcome::Conflict
        }
    }

    pub fn merge_home(&mut self, home: &Home) {
        if *home > self.home {
            self.home = home.clone();
        }
    }

    /// The join of two states.
    pub fn join(&mut self, other: &RecordState) {
        self.merge_home(&other.home);
        for version in &other.versions {
            self.merge_version(version.clone());
        }
    }

    /// The state without the versions that deleting its collection at `horizon` removed: those
    /// stamped at or below it. A write is stamped above every version it supersedes, so a version
    /// that dominates another has the greater HLC; dropping therefore commutes with the merge, and
    /// a region that drops before a late version arrives ends where one that drops after does
    /// (property-tested below).
    pub fn after_horizon(&self, horizon: Hlc) -> RecordState {
        RecordState {
            home: self.home.clone(),
            versions: self
                .versions
                .iter()
                .filter(|v| v.hlc > horizon)
                .cloned()
                .collect(),
        }
    }

    /// What a deletion of the collection at `deleted_before` leaves of this state: the state
    /// itself, borrowed, when the deletion removed none of its versions (the common case costs no
    /// copy); `None` when it removed them all.
    pub fn visible(&self, deleted_before: Option<Hlc>) -> Option<Cow<'_, RecordState>> {
        match deleted_before {
            Some(horizon) if self.versions.iter().any(|v| v.hlc <= horizon) => {
                let kept = self.after_horizon(horizon);
                (!kept.versions.is_empty()).then_some(Cow::Owned(kept))
            }
            _ => Some(Cow::Borrowed(self)),
        }
    }

    /// What a local write needs to know of this state.
    pub fn summary(&self) -> Summary {
        Summary {
            home: self.home.clone(),
            context: self.causal_context(),
            max_hlc: self.max_hlc(),
            exists: !self.versions.is_empty(),
            lww_live: view::lww_winner(self).is_some_and(|v| !v.deleted),
            any_live: self.versions.iter().any(|v| !v.deleted),
        }
    }

    /// A local write by `actor` (see [`Summary::write`]); returns the new version, which becomes
    /// the only one held.
    pub fn write(&mut self, actor: &Actor, hlc: Hlc, value: Option<Value>) -> Version {
        *self = self.summary().write(actor, hlc, value);
        self.versions[0].clone()
    }
}

/// A stored record and its materialised resolution as readers see them after a deletion of its
/// collection at `deleted_before` (see [`RecordState::visible`]). A resolution made of versions the
/// deletion removed describes nothing any more, so it goes with them.
pub fn visible_record(
    state: RecordState,
    resolution: Option<Resolution>,
    deleted_before: Option<Hlc>,
) -> (Option<RecordState>, Option<Resolution>) {
    let trimmed = match state.visible(deleted_before) {
        None => return (None, None),
        Some(Cow::Owned(kept)) => Some(kept),
        Some(Cow::Borrowed(_)) => None,
    };
    match trimmed {
        Some(kept) => (Some(kept), None),
        None => (Some(state), resolution),
    }
}

/// All a local write needs of the state it replaces: not the values, only the home, the causal
/// context, the greatest HLC and whether a reader would find the record. Small enough to cache
/// per key, so a write can skip reading the record when its revision is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub home: Home,
    pub context: VersionVector,
    pub max_hlc: Option<Hlc>,
    /// Whether any version is stored (a tombstone counts).
    pub exists: bool,
    lww_live: bool,
    any_live: bool,
}

impl Summary {
    pub fn absent(home: Home) -> Summary {
        Summary {
            home,
            context: VersionVector::new(),
            max_hlc: None,
            exists: false,
            lww_live: false,
            any_live: false,
        }
    }

    /// Whether a reader would find the record under `strategy`: the same answer as
    /// `read_view(state, strategy).is_live()`, without the state.
    pub fn is_live(&self, strategy: &policy::Strategy) -> bool {
        match strategy {
            policy::Strategy::Siblings => self.any_live,
            policy::Strategy::Lww | policy::Strategy::Resolver(_) => self.lww_live,
        }
    }

    /// The state after a local write by `actor`: one version whose vector is the join of every
    /// held version plus one for the writer, so it supersedes everything this region holds. The
    /// caller stamps `hlc` above [`Summary::max_hlc`].
    pub fn write(&self, actor: &Actor, hlc: Hlc, value: Option<Value>) -> RecordState {
        self.write_above(actor, hlc, value, 0)
    }

    /// [`Summary::write`] with the writer's entry raised to at least `counter_floor`. A record
    /// created anew in a deleted collection may still be held, under its old versions, by a
    /// region that has not applied the deletion yet; there the new version must not look
    /// superseded by them. The writer's entry in an old version is at most the number of writes
    /// its region ever made (each queued one outbox row), so a floor above the outbox sequence
    /// guarantees it.
    pub fn write_above(
        &self,
        actor: &Actor,
        hlc: Hlc,
        value: Option<Value>,
        counter_floor: u64,
    ) -> RecordState {
        debug_assert!(self.max_hlc.is_none_or(|max| hlc > max));
        let mut vector = self.context.clone();
        vector.increment_to_at_least(actor, counter_floor);
        let version = Version {
            deleted: value.is_none(),
            value: value.unwrap_or(Value::Null),
            region: actor.region().to_owned(),
            hlc,
            vector,
        };
        RecordState {
            home: self.home.clone(),
            versions: vec![version],
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::view::{read_view, View};
    use super::*;
    use crate::clock::version::tests::arb_vector;
    use crate::record::policy::Strategy as ConflictStrategy;
    use proptest::prelude::*;

    /// A version whose every field derives from its vector, so equal vectors mean the same write
    /// (as they do in the store). Its HLC is a hash of the vector: clocks skewed arbitrarily, with no
    /// respect for causality, which the merge must not need.
    pub fn version_for(vector: VersionVector) -> Version {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        vector.hash(&mut hasher);
        let h = hasher.finish();
        let region = ["eu", "us", "ap"][(h % 3) as usize].to_owned();
        let deleted = h % 5 == 0;
        Version {
            value: if deleted {
                Value::Null
            } else {
                serde_json::json!({ "h": h % 1000 })
            },
            deleted,
            region,
            hlc: Hlc::from_u64(h % 64), // few distinct values: ties happen
            vector,
        }
    }

    fn arb_home() -> impl Strategy<Value = Home> {
        (0u64..3, prop_oneof![Just("eu"), Just("us"), Just("ap")]).prop_map(|(epoch, region)| {
            Home {
                epoch,
                region: region.to_owned(),
            }
        })
    }

    fn arb_versions() -> impl Strategy<Value = Vec<Version>> {
        proptest::collection::vec(arb_vector().prop_map(version_for), 0..8)
    }

    /// Versions as the write path makes them: each write, at one of three regions, supersedes what
    /// its region has seen (its own earlier writes and some of the others') and is stamped above
    /// all of it, so causality and HLC order agree. Concurrent versions may tie on the HLC.
    fn arb_causal_history() -> impl Strategy<Value = Vec<Version>> {
        let step = (
            0usize..3,
            proptest::collection::vec(any::<bool>(), 8),
            0u64..3,
        );
        proptest::collection::vec(step, 1..9).prop_map(|steps| {
            let regions = ["eu", "us", "ap"];
            let mut history: Vec<Version> = Vec::new();
            for (i, (writer, seen, gap)) in steps.into_iter().enumerate() {
                let mut vector = VersionVector::new();
                let mut above = 0;
                for (j, earlier) in history.iter().enumerate() {
                    if earlier.region == regions[writer] || seen[j % seen.len()] {
                        vector.join(&earlier.vector);
                        above = above.max(earlier.hlc.as_u64());
                    }
                }
                vector.increment(&Actor::new(regions[writer], "a"));
                history.push(Version {
                    value: serde_json::json!(i),
                    deleted: i % 4 == 3,
                    region: regions[writer].to_owned(),
                    hlc: Hlc::from_u64(above + 1 + gap),
                    vector,
                });
            }
            history
        })
    }

    fn state_of(home: Home, versions: &[Version]) -> RecordState {
        let mut state = RecordState::new(home);
        for v in versions {
            state.merge_version(v.clone());
        }
        state
    }

    fn is_antichain(state: &RecordState) -> bool {
        state.versions.iter().enumerate().all(|(i, a)| {
            state
                .versions
                .iter()
                .skip(i + 1)
                .all(|b| a.vector.compare(&b.vector) == Causality::Concurrent)
        })
    }

    #[test]
    fn a_deletion_leaves_later_versions_and_drops_a_resolution_it_made_stale() {
        let at = |actor: &str, hlc: u64| {
            let mut v = version_for(VersionVector::from([(actor, 1)]));
            v.hlc = Hlc::from_u64(hlc);
            v
        };
        let state = state_of(Home::new("eu"), &[at("eu.a", 5), at("us.b", 9)]);
        let resolution = Resolution {
            resolver: "r".into(),
            sha256: String::new(),
            outcome: None,
            error: None,
            retry: false,
        };
        // Untouched: borrowed, resolution kept.
        assert!(matches!(state.visible(None), Some(Cow::Borrowed(_))));
        assert!(matches!(
            state.visible(Some(Hlc::from_u64(4))),
            Some(Cow::Borrowed(_))
        ));
        let (kept, kept_resolution) = visible_record(
            state.clone(),
            Some(resolution.clone()),
            Some(Hlc::from_u64(4)),
        );
        assert_eq!(kept.as_ref(), Some(&state));
        assert_eq!(kept_resolution, Some(resolution.clone()));
        // Trimmed: the later version alone, and no resolution made of the removed one.
        let (trimmed, dropped) = visible_record(
            state.clone(),
            Some(resolution.clone()),
            Some(Hlc::from_u64(5)),
        );
        assert_eq!(trimmed.unwrap().versions, vec![state.versions[1].clone()]);
        assert_eq!(dropped, None);
        // All removed.
        assert!(state.visible(Some(Hlc::from_u64(9))).is_none());
        assert_eq!(
            visible_record(state, Some(resolution), Some(Hlc::from_u64(9))),
            (None, None)
        );
    }

    #[test]
    fn concurrent_versions_are_both_kept_and_a_write_supersedes_them() {
        let mut state = RecordState::new(Home::new("eu"));
        let a = version_for(VersionVector::from([("eu.a", 1)]));
        let b = version_for(VersionVector::from([("us.b", 1)]));
        assert_eq!(state.merge_version(a.clone()), MergeOutcome::Superseded);
        assert_eq!(state.merge_version(b), MergeOutcome::Conflict);
        assert_eq!(state.merge_version(a), MergeOutcome::AlreadyCovered);
        let max = state.max_hlc().unwrap();
        let written = state.write(
            &Actor::new("eu", "a"),
            max.successor(),
            Some(serde_json::json!(1)),
        );
        assert_eq!(
            written.vector,
            VersionVector::from([("eu.a", 2), ("us.b", 1)])
        );
        assert_eq!(state.versions.len(), 1);
    }

    #[test]
    fn a_tombstone_does_not_resurrect_when_an_old_version_arrives_late() {
        let mut state = RecordState::new(Home::new("eu"));
        let old = version_for(VersionVector::from([("eu.a", 1)]));
        state.merge_version(old.clone());
        state.write(&Actor::new("eu", "a"), Hlc::from_u64(1_000), None);
        assert_eq!(state.merge_version(old), MergeOutcome::AlreadyCovered);
        assert!(matches!(
            read_view(&state, &ConflictStrategy::Lww),
            View::Deleted
        ));
    }

    proptest! {
        #[test]
        fn merge_is_commutative(versions in arb_versions(), home in arb_home(), seed: u64) {
            let forward = state_of(home.clone(), &versions);
            let mut shuffled = versions.clone();
            // A deterministic permutation from the seed.
            let len = shuffled.len();
            for i in (1..len).rev() {
                shuffled.swap(i, (seed.wrapping_mul(i as u64 + 7) % (i as u64 + 1)) as usize);
            }
            prop_assert_eq!(forward, state_of(home, &shuffled));
        }

        #[test]
        fn join_is_associative_commutative_and_idempotent(
            a in arb_versions(), b in arb_versions(), c in arb_versions(),
            ha in arb_home(), hb in arb_home(), hc in arb_home(),
        ) {
            let (sa, sb, sc) = (state_of(ha, &a), state_of(hb, &b), state_of(hc, &c));
            let join = |x: &RecordState, y: &RecordState| { let mut z = x.clone(); z.join(y); z };
            prop_assert_eq!(join(&join(&sa, &sb), &sc), join(&sa, &join(&sb, &sc)));
            prop_assert_eq!(join(&sa, &sb), join(&sb, &sa));
            prop_assert_eq!(join(&sa, &sa), sa.clone());
        }

        /// Two writes under one vector (a reused counter) merge to the same choice in any order,
        /// and the merge stays a semilattice.
        #[test]
        fn equal_vectors_with_different_content_merge_the_same_in_any_order(
            versions in arb_versions(), twins in proptest::collection::vec(any::<bool>(), 8),
        ) {
            let mut all = versions.clone();
            for (v, twin) in versions.iter().zip(twins) {
                if twin {
                    let mut other = v.clone();
                    other.value = serde_json::json!({"twin": other.value});
                    all.push(other);
                }
            }
            let forward = state_of(Home::new("eu"), &all);
            let mut reversed = all.clone();
            reversed.reverse();
            prop_assert_eq!(&forward, &state_of(Home::new("eu"), &reversed));
            prop_assert!(is_antichain(&forward));
            let mut twice = forward.clone();
            twice.join(&forward);
            prop_assert_eq!(twice, forward);
        }

        #[test]
        fn the_stored_set_is_an_antichain_covering_every_input(versions in arb_versions()) {
            let state = state_of(Home::new("eu"), &versions);
            prop_assert!(is_antichain(&state));
            for v in &versions {
                prop_assert!(state.versions.iter().any(|held| held.vector.covers(&v.vector)));
            }
        }

        #[test]
        fn views_do_not_depend_on_arrival_order(versions in arb_versions()) {
            let forward = state_of(Home::new("eu"), &versions);
            let mut reversed_input = versions.clone();
            reversed_input.reverse();
            let backward = state_of(Home::new("eu"), &reversed_input);
            for strategy in [ConflictStrategy::Lww, ConflictStrategy::Siblings] {
                prop_assert_eq!(read_view(&forward, &strategy), read_view(&backward, &strategy));
            }
        }

        #[test]
        fn a_local_write_dominates_everything_its_region_held(
            versions in arb_versions(), physical in 0u64..100,
        ) {
            let mut state = state_of(Home::new("eu"), &versions);
            let held = state.versions.clone();
            let mut clock = crate::clock::hlc::HybridClock::new(1_000);
            let hlc = clock.stamp_write(physical, state.max_hlc());
            let written = state.write(&Actor::new("us", "b"), hlc, Some(serde_json::json!("new")));
            for old in &held {
                prop_assert_eq!(written.vector.compare(&old.vector), Causality::Dominates);
                prop_assert!(written.hlc > old.hlc);
            }
            // And merging the old versions back in changes nothing.
            for old in held {
                prop_assert_eq!(state.merge_version(old), MergeOutcome::AlreadyCovered);
            }
        }

        #[test]
        fn the_summary_agrees_with_the_read_view(versions in arb_versions()) {
            let state = state_of(Home::new("eu"), &versions);
            let summary = state.summary();
            for strategy in [ConflictStrategy::Lww, ConflictStrategy::Siblings, ConflictStrategy::Resolver("r".into())] {
                prop_assert_eq!(summary.is_live(&strategy), read_view(&state, &strategy).is_live());
            }
            prop_assert_eq!(summary.exists, !versions.is_empty());
            prop_assert_eq!(summary.context, state.causal_context());
        }

        /// A deletion at any horizon gives the same state whether it drops from the merged state
        /// or from each version as it arrives, in any order.
        #[test]
        fn dropping_up_to_a_horizon_commutes_with_the_merge(
            history in arb_causal_history(), horizon in 0u64..24, seed: u64,
        ) {
            let horizon = Hlc::from_u64(horizon);
            let merged_then_dropped = state_of(Home::new("eu"), &history).after_horizon(horizon);
            let mut arrivals = history.clone();
            let len = arrivals.len();
            for i in (1..len).rev() {
                arrivals.swap(i, (seed.wrapping_mul(i as u64 + 7) % (i as u64 + 1)) as usize);
            }
            let kept: Vec<Version> = arrivals.into_iter().filter(|v| v.hlc > horizon).collect();
            prop_assert_eq!(merged_then_dropped, state_of(Home::new("eu"), &kept));
        }

        /// A region that still holds a deleted collection's old versions keeps a new write made
        /// above the counter floor: it never takes it for superseded, and once it drops the old
        /// versions it holds exactly the new one.
        #[test]
        fn a_write_above_the_counter_floor_survives_old_versions(history in arb_causal_history()) {
            let outbox_sequence = history.len() as u64; // at least every region's own writes
            let old = state_of(Home::new("eu"), &history);
            let horizon = old.max_hlc().unwrap();
            let fresh = Summary::absent(Home::new("eu")).write_above(
                &Actor::new("eu", "a"), Hlc::from_u64(horizon.as_u64() + 1), Some(serde_json::json!("new")),
                outbox_sequence + 1,
            );
            let mut lagging = old.clone();
            prop_assert_ne!(lagging.merge_version(fresh.versions[0].clone()), MergeOutcome::AlreadyCovered);
            prop_assert_eq!(lagging.after_horizon(horizon), fresh);
        }

        #[test]
        fn the_home_with_the_highest_epoch_wins_in_any_order(homes in proptest::collection::vec(arb_home(), 1..6)) {
            let mut forward = RecordState::new(homes[0].clone());
            for h in &homes { forward.merge_home(h); }
            let mut backward = RecordState::new(homes[homes.len() - 1].clone());
            for h in homes.iter().rev() { backward.merge_home(h); }
            prop_assert_eq!(&forward.home, &backward.home);
            prop_assert_eq!(forward.home.clone(), homes.iter().max().unwrap().clone());
        }
    }
}
