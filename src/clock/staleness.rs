//! Bounded-staleness reads: whether this region's replica may serve a read that accepts data up to
//! `max_staleness_ms` old. Pure.
//!
//! Every peer's heartbeats tell this region "every write of mine with an HLC below T is applied
//! here". A read may be served locally when every peer has promised at least `now −
//! max_staleness`: the record's home alone is not enough, because failover and `anywhere` writes
//! can come from any region.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    /// `region` has not promised far enough; `behind_ms` is how far behind now its promise is
    /// (`None`: no heartbeat from it applied yet).
    Stale {
        region: String,
        behind_ms: Option<u64>,
    },
}

/// Judge the replica against `peers`' promises (`applied_through`, milliseconds since the epoch).
/// The stalest peer is named.
pub fn freshness(
    peers: &[&str],
    applied_through: &BTreeMap<String, u64>,
    now_ms: u64,
    max_staleness_ms: u64,
) -> Freshness {
    let needed = now_ms.saturating_sub(max_staleness_ms);
    let stalest = peers
        .iter()
        .map(|peer| (peer, applied_through.get(*peer).copied()))
        .filter(|(_, through)| through.is_none_or(|t| t < needed))
        .min_by_key(|(_, through)| through.unwrap_or(0));
    match stalest {
        None => Freshness::Fresh,
        Some((region, through)) => Freshness::Stale {
            region: (*region).to_owned(),
            behind_ms: through.map(|t| now_ms.saturating_sub(t)),
        },
    }
}

/// Views of the deployment, by region: each region's `applied_through` (origin → milliseconds)
/// as its heartbeats last said, this region's own as it is now.
pub type Views = BTreeMap<String, BTreeMap<String, u64>>;

/// How far every write is applied everywhere: the milliseconds below which every write of every
/// origin among `members` is applied in every other member, by `views`. `None` while some member
/// has not said how far it has applied some origin (or there is no second member): nothing can be
/// known applied everywhere then. A tombstone below it can be reclaimed: no region can still
/// receive a write it superseded, nor lack the tombstone itself.
pub fn applied_everywhere_through(members: &[&str], views: &Views) -> Option<u64> {
    let mut through: Option<u64> = None;
    for member in members {
        for origin in members.iter().filter(|origin| *origin != member) {
            let promised = *views.get(*member)?.get(*origin)?;
            through = Some(through.map_or(promised, |t| t.min(promised)));
        }
    }
    through
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PEERS: [&str; 4] = ["ap", "eu", "sa", "us"];

    fn promises() -> impl Strategy<Value = BTreeMap<String, u64>> {
        proptest::collection::btree_map(
            proptest::sample::select(PEERS.to_vec()).prop_map(str::to_owned),
            0u64..10_000,
            0..4,
        )
    }

    #[test]
    fn a_peer_without_a_heartbeat_is_stale_and_no_peer_is_fresh() {
        let none = BTreeMap::new();
        assert_eq!(freshness(&[], &none, 5_000, 0), Freshness::Fresh);
        assert_eq!(
            freshness(&["eu"], &none, 5_000, 1_000_000),
            Freshness::Stale {
                region: "eu".into(),
                behind_ms: None
            }
        );
        let through = BTreeMap::from([("eu".to_owned(), 4_000), ("us".to_owned(), 4_900)]);
        assert_eq!(
            freshness(&["eu", "us"], &through, 5_000, 500),
            Freshness::Stale {
                region: "eu".into(),
                behind_ms: Some(1_000)
            }
        );
        assert_eq!(
            freshness(&["eu", "us"], &through, 5_000, 1_000),
            Freshness::Fresh
        );
    }

    proptest! {
        /// Fresh exactly when every peer promised at least now − max staleness.
        #[test]
        fn fresh_means_every_peer_promised_far_enough(
            through in promises(), now in 0u64..12_000, max in 0u64..12_000, n in 0usize..=4,
        ) {
            let peers = &PEERS[..n];
            let every = peers.iter().all(|p| through.get(*p).is_some_and(|t| *t + max >= now));
            prop_assert_eq!(freshness(peers, &through, now, max) == Freshness::Fresh, every);
        }

        /// Accepting older data, or learning of newer promises, never turns a fresh replica stale.
        #[test]
        fn fresh_stays_fresh_with_more_tolerance_or_newer_promises(
            through in promises(), now in 0u64..12_000, max in 0u64..12_000,
            more in 0u64..5_000, raise in 0u64..5_000, n in 0usize..=4,
        ) {
            let peers = &PEERS[..n];
            if freshness(peers, &through, now, max) == Freshness::Fresh {
                prop_assert_eq!(freshness(peers, &through, now, max + more), Freshness::Fresh);
                let raised = through.iter().map(|(p, t)| (p.clone(), t + raise)).collect();
                prop_assert_eq!(freshness(peers, &raised, now, max), Freshness::Fresh);
            }
        }

        /// A stale verdict names a peer that really is behind, and the stalest of them.
        #[test]
        fn a_stale_verdict_names_the_stalest_peer(
            through in promises(), now in 0u64..12_000, max in 0u64..12_000, n in 0usize..=4,
        ) {
            let peers = &PEERS[..n];
            if let Freshness::Stale { region, behind_ms } = freshness(peers, &through, now, max) {
                prop_assert!(peers.contains(&region.as_str()));
                let named = through.get(&region).copied();
                prop_assert!(named.is_none_or(|t| t + max < now));
                prop_assert_eq!(behind_ms, named.map(|t| now.saturating_sub(t)));
                for peer in peers {
                    prop_assert!(named.unwrap_or(0) <= through.get(*peer).copied().unwrap_or(0)
                        || named.is_none());
                }
            }
        }
    }

    fn views() -> impl Strategy<Value = Views> {
        proptest::collection::btree_map(
            proptest::sample::select(PEERS.to_vec()).prop_map(str::to_owned),
            promises(),
            0..5,
        )
    }

    fn members() -> impl Strategy<Value = Vec<&'static str>> {
        proptest::sample::subsequence(PEERS.to_vec(), 0..=4)
    }

    proptest! {
        /// Never past what any member promised for any other origin, and exactly the least such
        /// promise when every one is known.
        #[test]
        fn applied_everywhere_is_the_least_promise(members in members(), views in views()) {
            let promises: Vec<Option<u64>> = members
                .iter()
                .flat_map(|m| members.iter().filter(move |o| *o != m).map(move |o| (m, o)))
                .map(|(m, o)| views.get(*m).and_then(|v| v.get(*o)).copied())
                .collect();
            let expected = if promises.iter().any(Option::is_none) {
                None
            } else {
                promises.iter().flatten().copied().min()
            };
            prop_assert_eq!(applied_everywhere_through(&members, &views), expected);
        }

        /// A member applying more never moves the horizon back, and a member that has said
        /// nothing holds it back entirely.
        #[test]
        fn applied_everywhere_is_monotone(
            members in members(),
            views in views(),
            who in proptest::sample::select(PEERS.to_vec()),
            origin in proptest::sample::select(PEERS.to_vec()),
            more in 0u64..10_000,
        ) {
            let before = applied_everywhere_through(&members, &views);
            let mut raised = views.clone();
            let entry = raised.entry(who.to_owned()).or_default().entry(origin.to_owned()).or_insert(0);
            *entry += more;
            let after = applied_everywhere_through(&members, &raised);
            if let Some(before) = before {
                prop_assert!(after.is_some_and(|after| after >= before));
            }
            if members.len() > 1 && members.contains(&who) {
                let mut silent = views.clone();
                silent.remove(who);
                prop_assert_eq!(applied_everywhere_through(&members, &silent), None);
            }
        }
    }
}
