//! The value a reader sees: a pure function of the stored set of maximal versions and the
//! collection's strategy. Because it depends on nothing else (not arrival order, not which region
//! computes it), every region that holds the same set shows the same view.

use serde_json::Value;

use super::policy::Strategy;
use super::resolution::{Outcome, Resolution};
use super::{RecordState, Version};

#[derive(Debug, Clone, PartialEq)]
pub enum View<'a> {
    /// No version was ever stored.
    Absent,
    /// The view is a tombstone: reads answer 404.
    Deleted,
    /// One value.
    Value(&'a Version),
    /// Several concurrent versions, sorted by `(hlc, region)`; the client resolves them.
    Siblings(Vec<&'a Version>),
    /// Several concurrent versions, and the value the collection's resolver made of them.
    Resolved(&'a Value),
    /// Several concurrent versions, which the collection's resolver (named) resolved to deleted:
    /// reads answer 404, but say so, since the versions are still there and a write supersedes
    /// them.
    ResolvedDeleted { resolver: &'a str, siblings: usize },
}

impl View<'_> {
    /// Whether a reader would find the record (for `If-None-Match: *` and listings).
    pub fn is_live(&self) -> bool {
        matches!(self, View::Value(_) | View::Siblings(_) | View::Resolved(_))
    }

    /// This view as a resolver outcome, to keep showing it while a changed set waits for its
    /// resolver. `None` when no value was readable (absent, deleted, siblings): the set's
    /// last-writer-wins fallback shows meanwhile.
    pub fn as_outcome(&self) -> Option<Outcome> {
        match self {
            View::Value(version) => Some(Outcome::value(version.value.clone())),
            View::Resolved(value) => Some(Outcome::value((*value).clone())),
            View::ResolvedDeleted { .. } => Some(Outcome::deleted()),
            View::Absent | View::Deleted | View::Siblings(_) => None,
        }
    }

    /// What the conflict log records as a conflict's outcome: `{"value": …}`, `{"deleted":
    /// true}` or `{"siblings": n}`.
    pub fn logged_outcome(&self) -> Value {
        match self {
            View::Siblings(siblings) => serde_json::json!({ "siblings": siblings.len() }),
            View::Value(version) => serde_json::json!(Outcome::value(version.value.clone())),
            View::Resolved(value) => serde_json::json!(Outcome::value((*value).clone())),
            View::Deleted | View::ResolvedDeleted { .. } | View::Absent => {
                serde_json::json!(Outcome::deleted())
            }
        }
    }
}

/// The conflict log's outcome of an entry whose resolver has not run yet.
pub fn pending_outcome() -> Value {
    serde_json::json!({ "pending": true })
}

/// The last-writer-wins winner: the greatest `(hlc, region)`.
pub fn lww_winner(state: &RecordState) -> Option<&Version> {
    state
        .versions
        .iter()
        .max_by(|a, b| a.lww_key().cmp(&b.lww_key()))
}

pub fn read_view<'a>(state: &'a RecordState, strategy: &Strategy) -> View<'a> {
    match strategy {
        Strategy::Siblings if state.versions.len() > 1 => {
            if state.versions.iter().all(|v| v.deleted) {
                View::Deleted
            } else {
                // `versions` is kept sorted by `(hlc, region)` already.
                View::Siblings(state.versions.iter().collect())
            }
        }
        // A resolver's output is materialised by the resolve module when the set changes; this
        // pure view is its last-writer-wins fallback.
        Strategy::Lww | Strategy::Siblings | Strategy::Resolver(_) => match lww_winner(state) {
            None => View::Absent,
            Some(v) if v.deleted => View::Deleted,
            Some(v) => View::Value(v),
        },
    }
}

/// The view a reader gets: under the `resolver` strategy, the resolution materialised for this
/// set by the collection's current resolver when there is one; otherwise (and for every other
/// strategy) [`read_view`], whose last-writer-wins choice is also a failed resolver's fallback.
pub fn materialized_view<'a>(
    state: &'a RecordState,
    strategy: &Strategy,
    resolution: Option<&'a Resolution>,
) -> View<'a> {
    if let (Strategy::Resolver(name), Some(resolution)) = (strategy, resolution) {
        if state.versions.len() > 1 && resolution.resolver == *name {
            match &resolution.outcome {
                Some(Outcome::Value { value }) => return View::Resolved(value),
                Some(Outcome::Deleted { .. }) => {
                    return View::ResolvedDeleted {
                        resolver: &resolution.resolver,
                        siblings: state.versions.len(),
                    }
                }
                None => {}
            }
        }
    }
    read_view(state, strategy)
}

/// Whether the view [`materialized_view`] gives is a pending one: the set changed and the
/// collection's resolver has not run on it yet, so it shows the view from before the change.
pub fn resolution_pending(
    state: &RecordState,
    strategy: &Strategy,
    resolution: Option<&Resolution>,
) -> bool {
    match (strategy, resolution) {
        (Strategy::Resolver(name), Some(resolution)) => {
            state.versions.len() > 1 && resolution.resolver == *name && resolution.retry
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::hlc::Hlc;
    use crate::clock::version::VersionVector;
    use crate::record::Home;
    use serde_json::json;

    fn version(actor: &str, hlc: u64, region: &str, value: Option<i64>) -> Version {
        Version {
            value: value.map_or(serde_json::Value::Null, |v| json!(v)),
            deleted: value.is_none(),
            region: region.into(),
            hlc: Hlc::from_u64(hlc),
            vector: VersionVector::from([(actor, 1)]),
        }
    }

    fn state(versions: Vec<Version>) -> RecordState {
        let mut s = RecordState::new(Home::new("eu"));
        for v in versions {
            s.merge_version(v);
        }
        s
    }

    #[test]
    fn lww_picks_the_greatest_hlc_and_breaks_ties_by_region() {
        let s = state(vec![
            version("eu.a", 5, "eu", Some(1)),
            version("us.b", 5, "us", Some(2)),
        ]);
        assert_eq!(read_view(&s, &Strategy::Lww), View::Value(&s.versions[1]));
        assert_eq!(s.versions[1].region, "us");
        let s = state(vec![
            version("eu.a", 9, "eu", None),
            version("us.b", 5, "us", Some(2)),
        ]);
        assert_eq!(read_view(&s, &Strategy::Lww), View::Deleted);
    }

    #[test]
    fn siblings_show_every_concurrent_version_including_tombstones() {
        let s = state(vec![
            version("eu.a", 9, "eu", None),
            version("us.b", 5, "us", Some(2)),
        ]);
        match read_view(&s, &Strategy::Siblings) {
            View::Siblings(v) => {
                assert_eq!(v.iter().map(|v| v.hlc.as_u64()).collect::<Vec<_>>(), [5, 9])
            }
            other => panic!("{other:?}"),
        }
        let s = state(vec![
            version("eu.a", 9, "eu", None),
            version("us.b", 5, "us", None),
        ]);
        assert_eq!(read_view(&s, &Strategy::Siblings), View::Deleted);
        assert_eq!(
            read_view(&RecordState::new(Home::new("eu")), &Strategy::Siblings),
            View::Absent
        );
    }

    fn resolution(resolver: &str, outcome: Option<Outcome>) -> Resolution {
        Resolution {
            resolver: resolver.into(),
            sha256: "ab".into(),
            outcome,
            error: None,
            retry: false,
        }
    }

    #[test]
    fn a_resolution_shows_only_for_siblings_of_the_resolver_it_names() {
        let siblings = state(vec![
            version("eu.a", 9, "eu", Some(1)),
            version("us.b", 5, "us", Some(2)),
        ]);
        let merged = json!(3);
        let cart = Strategy::Resolver("cart".into());
        let resolved = resolution("cart", Some(Outcome::value(merged.clone())));
        assert_eq!(
            materialized_view(&siblings, &cart, Some(&resolved)),
            View::Resolved(&merged)
        );
        // Resolved to deleted: not live, and not the same as a record deleted by a write.
        let deleted = resolution("cart", Some(Outcome::deleted()));
        let view = materialized_view(&siblings, &cart, Some(&deleted));
        assert_eq!(
            view,
            View::ResolvedDeleted {
                resolver: "cart",
                siblings: 2
            }
        );
        assert!(!view.is_live());
        // Another resolver's output, a failure, or no resolution: last-writer-wins.
        let lww = View::Value(&siblings.versions[1]);
        let other = resolution("other", Some(Outcome::value(merged.clone())));
        assert_eq!(materialized_view(&siblings, &cart, Some(&other)), lww);
        let failed = resolution("cart", None);
        assert_eq!(materialized_view(&siblings, &cart, Some(&failed)), lww);
        assert_eq!(materialized_view(&siblings, &cart, None), lww);
        assert_eq!(
            materialized_view(&siblings, &Strategy::Lww, Some(&resolved)),
            lww
        );
        // One version: nothing to resolve, whatever is stored.
        let single = state(vec![version("eu.a", 9, "eu", Some(1))]);
        assert_eq!(
            materialized_view(&single, &cart, Some(&resolved)),
            View::Value(&single.versions[0])
        );
    }

    #[test]
    fn a_pending_resolution_keeps_the_view_readers_had_before_the_set_changed() {
        let cart = Strategy::Resolver("cart".into());
        let before = state(vec![version("eu.a", 9, "eu", Some(1))]);
        let after = state(vec![
            version("eu.a", 9, "eu", Some(1)),
            version("us.b", 12, "us", Some(2)),
        ]);
        let pending = Resolution::pending("cart", read_view(&before, &cart).as_outcome());
        assert_eq!(
            materialized_view(&after, &cart, Some(&pending)),
            View::Resolved(&json!(1)),
            "not last-writer-wins (2) before the resolver ran"
        );
        assert!(resolution_pending(&after, &cart, Some(&pending)));
        let done = resolution("cart", Some(Outcome::value(json!(3))));
        assert!(!resolution_pending(&after, &cart, Some(&done)));
        assert!(!resolution_pending(&after, &Strategy::Lww, Some(&pending)));
        // A pending resolution kept again (a second change before the worker ran) keeps it still.
        let again = Resolution::pending(
            "cart",
            materialized_view(&after, &cart, Some(&pending)).as_outcome(),
        );
        assert_eq!(again, pending);
        // Nothing readable before: the new set's fallback shows meanwhile.
        let deleted = state(vec![version("eu.a", 9, "eu", None)]);
        let pending = Resolution::pending("cart", read_view(&deleted, &cart).as_outcome());
        assert_eq!(pending.outcome, None);
        assert_eq!(
            materialized_view(&after, &cart, Some(&pending)),
            View::Value(&after.versions[1])
        );
        // A resolution to deleted is kept as one.
        let hidden = resolution("cart", Some(Outcome::deleted()));
        let kept = materialized_view(&after, &cart, Some(&hidden)).as_outcome();
        assert_eq!(kept, Some(Outcome::deleted()));
    }

    #[test]
    fn outcomes_have_the_abi_shape() {
        assert_eq!(
            serde_json::from_str::<Outcome>(r#"{"value":{"a":1}}"#).unwrap(),
            Outcome::value(json!({"a":1}))
        );
        assert_eq!(
            serde_json::from_str::<Outcome>(r#"{"deleted":true}"#).unwrap(),
            Outcome::deleted()
        );
        assert!(serde_json::from_str::<Outcome>(r#"{"deleted":false}"#).is_err());
        assert_eq!(
            serde_json::to_string(&Outcome::deleted()).unwrap(),
            r#"{"deleted":true}"#
        );
    }
}
