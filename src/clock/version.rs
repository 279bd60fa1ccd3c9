//! Version vectors, and the opaque tokens built from them (ETags, session tokens).
//!
//! Why version vectors: an HLC orders writes but cannot tell "B saw A" from "B and A never met".
//! Only the latter is a conflict, and a conflict must be kept, not silently overwritten, so each
//! version carries `{actor: counter}` and two versions are concurrent exactly when neither vector
//! covers the other.
//!
//! An actor is a region *incarnation* (`eu.3f9a1c07`), not just a region: a region whose database
//! is recreated or restored starts a new incarnation, so it can never hand out a counter that a peer
//! already holds for a different write.
//!
//! ETags and session tokens are opaque to clients (base64url of JSON) but strictly parsed: a token
//! that does not decode is a client error, never "no precondition".

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};

/// A region incarnation: the name of one entry of a version vector.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Actor(String);

impl Actor {
    pub fn new(region: &str, incarnation: &str) -> Actor {
        Actor(format!("{region}.{incarnation}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The incarnation part of the actor's name.
    pub fn incarnation(&self) -> &str {
        self.0
            .split_once('.')
            .map_or("", |(_, incarnation)| incarnation)
    }

    /// The region part of the actor's name.
    pub fn region(&self) -> &str {
        self.0
            .split_once('.')
            .map_or(self.0.as_str(), |(region, _)| region)
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How two version vectors relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Causality {
    Equal,
    /// The left vector covers the right one: the left version saw the right one.
    Dominates,
    /// The right vector covers the left one.
    DominatedBy,
    Concurrent,
}

/// `{actor: counter}`; absent entries are zero, so zero entries are never stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VersionVector(BTreeMap<String, u64>);

impl VersionVector {
    pub fn new() -> VersionVector {
        VersionVector::default()
    }

    pub fn get(&self, actor: &str) -> u64 {
        self.0.get(actor).copied().unwrap_or(0)
    }

    pub fn entries(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(actor, n)| (actor.as_str(), *n))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Bump `actor`'s counter by one: what a write does after joining everything it supersedes.
    pub fn increment(&mut self, actor: &Actor) {
        self.increment_to_at_least(actor, 0);
    }

    /// Increment `actor`'s entry, raising it to `floor` if it is still below.
    pub fn increment_to_at_least(&mut self, actor: &Actor, floor: u64) {
        let entry = self.0.entry(actor.as_str().to_owned()).or_insert(0);
        *entry = (*entry + 1).max(floor);
    }

    /// The least upper bound: the entry-wise maximum.
    pub fn join(&mut self, other: &VersionVector) {
        for (actor, &n) in &other.0 {
            let entry = self.0.entry(actor.clone()).or_insert(0);
            *entry = (*entry).max(n);
        }
        self.0.retain(|_, n| *n > 0);
    }

    pub fn joined(mut self, other: &VersionVector) -> VersionVector {
        self.join(other);
        self
    }

    pub fn compare(&self, other: &VersionVector) -> Causality {
        let mut left_ahead = false;
        let mut right_ahead = false;
        for actor in self.0.keys().chain(other.0.keys()) {
            match self.get(actor).cmp(&other.get(actor)) {
                Ordering::Greater => left_ahead = true,
                Ordering::Less => right_ahead = true,
                Ordering::Equal => {}
            }
            if left_ahead && right_ahead {
                return Causality::Concurrent;
            }
        }
        match (left_ahead, right_ahead) {
            (false, false) => Causality::Equal,
            (true, false) => Causality::Dominates,
            (false, true) => Causality::DominatedBy,
            (true, true) => Causality::Concurrent,
        }
    }

    /// `self` covers `other`: equal or dominating.
    pub fn covers(&self, other: &VersionVector) -> bool {
        matches!(self.compare(other), Causality::Equal | Causality::Dominates)
    }

    fn from_raw(map: BTreeMap<String, u64>) -> VersionVector {
        VersionVector(map.into_iter().filter(|(_, n)| *n > 0).collect())
    }
}

impl<const N: usize> From<[(&str, u64); N]> for VersionVector {
    fn from(entries: [(&str, u64); N]) -> VersionVector {
        VersionVector::from_raw(
            entries
                .into_iter()
                .map(|(a, n)| (a.to_owned(), n))
                .collect(),
        )
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("an ETag must be a quoted string")]
    NotQuoted,
    #[error("the token is not one this store issued")]
    Malformed,
}

/// An entity tag naming a causal context: the join of the versions a reader saw. Writing with
/// `If-Match: <etag>` succeeds only while the record's context is still exactly that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ETag(pub VersionVector);

impl ETag {
    pub fn encode(&self) -> String {
        format!("\"{}\"", encode_json(&self.0))
    }

    pub fn decode(text: &str) -> Result<ETag, TokenError> {
        let text = text.trim();
        let inner = text
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .ok_or(TokenError::NotQuoted)?;
        decode_json(inner).map(ETag)
    }
}

/// What a client carries from a write to later reads anywhere: "this key, at least this version".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionToken {
    #[serde(rename = "c")]
    pub collection: String,
    #[serde(rename = "k")]
    pub key: String,
    #[serde(rename = "v")]
    pub version: VersionVector,
    /// The region that took the write: the one region sure to hold it, so where to read when
    /// this region lags. (Not the home: under `homing: anywhere` or a failover write, the home
    /// may lag as much as the reader.)
    #[serde(rename = "w")]
    pub written_at: String,
}

impl SessionToken {
    pub fn encode(&self) -> String {
        encode_json(self)
    }

    pub fn decode(text: &str) -> Result<SessionToken, TokenError> {
        decode_json(text.trim())
    }
}

fn encode_json<T: Serialize>(value: &T) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).expect("plain data serializes"))
}

fn decode_json<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub fn arb_vector() -> impl Strategy<Value = VersionVector> {
        proptest::collection::btree_map(
            prop_oneof![Just("eu.a"), Just("us.b"), Just("ap.c"), Just("eu.d")]
                .prop_map(str::to_owned),
            0u64..4,
            0..4,
        )
        .prop_map(VersionVector::from_raw)
    }

    #[test]
    fn compare_covers_the_four_cases() {
        let a = VersionVector::from([("eu.a", 2), ("us.b", 1)]);
        let b = VersionVector::from([("eu.a", 1), ("us.b", 1)]);
        let c = VersionVector::from([("eu.a", 1), ("us.b", 2)]);
        assert_eq!(a.compare(&a.clone()), Causality::Equal);
        assert_eq!(a.compare(&b), Causality::Dominates);
        assert_eq!(b.compare(&a), Causality::DominatedBy);
        assert_eq!(a.compare(&c), Causality::Concurrent);
    }

    #[test]
    fn etag_round_trips_and_rejects_garbage() {
        let tag = ETag(VersionVector::from([("eu.a", 3)]));
        assert_eq!(ETag::decode(&tag.encode()).unwrap(), tag);
        assert_eq!(ETag::decode("abc"), Err(TokenError::NotQuoted));
        assert_eq!(ETag::decode("\"!!\""), Err(TokenError::Malformed));
        assert_eq!(ETag::decode("\"e30\""), Ok(ETag(VersionVector::new()))); // "{}"
        assert_eq!(ETag::decode("\"WzFd\""), Err(TokenError::Malformed)); // "[1]"
    }

    #[test]
    fn session_token_round_trips() {
        let token = SessionToken {
            collection: "users".into(),
            key: "alice".into(),
            version: VersionVector::from([("us.b", 9)]),
            written_at: "us".into(),
        };
        assert_eq!(SessionToken::decode(&token.encode()).unwrap(), token);
        assert!(SessionToken::decode("not a token").is_err());
    }

    proptest! {
        #[test]
        fn join_is_a_semilattice(a in arb_vector(), b in arb_vector(), c in arb_vector()) {
            prop_assert_eq!(a.clone().joined(&b), b.clone().joined(&a));
            prop_assert_eq!(a.clone().joined(&b).joined(&c), a.clone().joined(&b.clone().joined(&c)));
            prop_assert_eq!(a.clone().joined(&a), a.clone());
        }

        #[test]
        fn the_join_covers_both_sides(a in arb_vector(), b in arb_vector()) {
            let j = a.clone().joined(&b);
            prop_assert!(j.covers(&a) && j.covers(&b));
        }

        #[test]
        fn compare_is_antisymmetric(a in arb_vector(), b in arb_vector()) {
            let flipped = match a.compare(&b) {
                Causality::Dominates => Causality::DominatedBy,
                Causality::DominatedBy => Causality::Dominates,
                other => other,
            };
            prop_assert_eq!(b.compare(&a), flipped);
        }

        #[test]
        fn an_increment_dominates_its_base(a in arb_vector()) {
            let mut next = a.clone();
            next.increment(&Actor::new("eu", "a"));
            prop_assert_eq!(next.compare(&a), Causality::Dominates);
        }
    }
}
