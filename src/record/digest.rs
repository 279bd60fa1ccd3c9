//! The canonical hash of a record's state, and the bucket a key falls in: what anti-entropy
//! compares between regions. Pure, no I/O.
//!
//! Two regions that converged hold the same antichain of versions and the same home, so they must
//! hash equal however the versions arrived. The hash therefore covers only replicated content, in
//! one canonical form: the home `{epoch, region}` and every maximal version `{value, deleted,
//! region, hlc, vector}` ordered by `(hlc, region, vector)`, object keys sorted here (not by
//! whatever map type serde_json was built with), integers exact, floats in shortest round-trip
//! form, `-0` as `0`. Never anything region-local: `rev`, timestamps, the resolver's view, or the
//! event's origin.
//!
//! 128 bits of SHA-256: a collision would hide a difference, so the hash is long enough for that
//! never to happen by chance. A bucket's digest is the XOR of its records' hashes (computed on
//! demand in SQL, so no digest row is touched by writes); keys are unique within a bucket, so two
//! equal hashes never cancel out.

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::RecordState;

/// Buckets per collection: a difference is narrowed to 1/65,536 of a collection before any key is
/// listed. Fine enough that a small share of records missing everywhere (a lost hour of events
/// spread over every key) leaves most buckets equal: with 1,024 buckets, 1% missing of a million
/// records made every bucket differ and a round listed every key. The digests of a collection
/// stay a few MB at most, and an empty bucket costs nothing.
pub const BUCKETS: u32 = 65_536;

/// The bucket of a record key: the same in every region and build (migration 0007 computes the
/// same in SQL).
pub fn bucket_of(key: &str) -> i32 {
    let digest = Sha256::digest(key.as_bytes());
    let first = u32::from_be_bytes(digest[..4].try_into().expect("4 bytes"));
    (first % BUCKETS) as i32
}

/// A 128-bit state hash, stored as two `bigint`s (PostgreSQL's `bit_xor` works on integers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StateHash {
    pub hi: i64,
    pub lo: i64,
}

impl StateHash {
    pub fn xor(self, other: StateHash) -> StateHash {
        StateHash {
            hi: self.hi ^ other.hi,
            lo: self.lo ^ other.lo,
        }
    }

    /// 32 hex digits, for the peer API.
    pub fn to_hex(self) -> String {
        format!("{:016x}{:016x}", self.hi as u64, self.lo as u64)
    }

    pub fn from_hex(text: &str) -> Option<StateHash> {
        if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(StateHash {
            hi: u64::from_str_radix(&text[..16], 16).ok()? as i64,
            lo: u64::from_str_radix(&text[16..], 16).ok()? as i64,
        })
    }
}

/// A bucket's digest: the XOR of its records' hashes, and how many records it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketDigest {
    pub bucket: i32,
    pub count: i64,
    pub hash: StateHash,
}

/// The canonical hash of a record's replicated state.
pub fn state_hash(state: &RecordState) -> StateHash {
    let mut versions: Vec<_> = state.versions.iter().collect();
    versions.sort_by(|a, b| a.lww_key().cmp(&b.lww_key()));
    let canonical = serde_json::json!({
        "home": {"epoch": state.home.epoch, "region": state.home.region},
        "versions": versions.iter().map(|v| version_json(v)).collect::<Vec<_>>(),
    });
    hash_canonical(&canonical)
}

/// The canonical hash of one version: what breaks the tie between two versions with equal vectors.
pub fn version_hash(version: &super::Version) -> StateHash {
    hash_canonical(&version_json(version))
}

fn version_json(v: &super::Version) -> Value {
    serde_json::json!({
        "value": v.value,
        "deleted": v.deleted,
        "region": v.region,
        "hlc": v.hlc.to_string(),
        "vector": v.vector,
    })
}

fn hash_canonical(value: &Value) -> StateHash {
    let mut bytes = Vec::with_capacity(256);
    write_canonical(value, &mut bytes);
    let digest = Sha256::digest(&bytes);
    StateHash {
        hi: i64::from_be_bytes(digest[..8].try_into().expect("8 bytes")),
        lo: i64::from_be_bytes(digest[8..16].try_into().expect("8 bytes")),
    }
}

/// JSON text with object keys sorted bytewise, `-0` written as `0`, and serde_json's exact
/// integers and shortest round-trip floats.
fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null | Value::Bool(_) | Value::String(_) => {
            serde_json::to_writer(&mut *out, value).expect("writing to a Vec cannot fail")
        }
        Value::Number(number) => {
            if number.is_f64() && number.as_f64() == Some(0.0) {
                out.extend_from_slice(b"0.0");
            } else {
                out.extend_from_slice(number.to_string().as_bytes());
            }
        }
        Value::Array(items) => {
            out.push(b'[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        Value::Object(fields) => {
            let mut names: Vec<&String> = fields.keys().collect();
            names.sort();
            out.push(b'{');
            for (index, name) in names.into_iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, name).expect("writing to a Vec cannot fail");
                out.push(b':');
                write_canonical(&fields[name], out);
            }
            out.push(b'}');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::version::tests::arb_vector;
    use crate::record::tests::version_for;
    use crate::record::Home;
    use proptest::prelude::*;

    #[test]
    fn buckets_are_stable_and_in_range() {
        // Fixed values: a change here would make regions of different builds disagree.
        assert_eq!(bucket_of("alice"), bucket_of("alice"));
        assert!((0..BUCKETS as i32).contains(&bucket_of("")));
        let spread: std::collections::BTreeSet<i32> =
            (0..5000).map(|i| bucket_of(&format!("k{i}"))).collect();
        assert!(spread.len() > 900, "keys spread over the buckets");
    }

    #[test]
    fn hex_round_trips() {
        let hash = StateHash { hi: -1, lo: 42 };
        assert_eq!(StateHash::from_hex(&hash.to_hex()), Some(hash));
        assert_eq!(StateHash::from_hex("xyz"), None);
    }

    #[test]
    fn negative_zero_and_key_order_do_not_change_the_hash() {
        let mut a = RecordState::new(Home::new("eu"));
        let mut version = version_for(crate::clock::version::VersionVector::from([("eu.1", 1)]));
        version.value = serde_json::json!({"b": -0.0, "a": 1});
        a.merge_version(version.clone());
        let mut b = RecordState::new(Home::new("eu"));
        version.value = serde_json::from_str(r#"{"a":1,"b":0.0}"#).unwrap();
        b.merge_version(version);
        assert_eq!(state_hash(&a), state_hash(&b));
    }

    #[test]
    fn the_home_and_every_version_count() {
        let vector = crate::clock::version::VersionVector::from([("eu.1", 1)]);
        let mut a = RecordState::new(Home::new("eu"));
        a.merge_version(version_for(vector.clone()));
        let mut moved = a.clone();
        moved.home.epoch = 1;
        assert_ne!(state_hash(&a), state_hash(&moved));
        let mut changed = a.clone();
        changed.versions[0].value = serde_json::json!("other");
        assert_ne!(state_hash(&a), state_hash(&changed));
    }

    proptest! {
        /// Regions that merged the same versions in any order hash equal.
        #[test]
        fn the_hash_does_not_depend_on_arrival_order(
            vectors in proptest::collection::vec(arb_vector(), 1..8),
            seed: u64,
        ) {
            let versions: Vec<_> = vectors.into_iter().map(version_for).collect();
            let mut forward = RecordState::new(Home::new("eu"));
            for v in &versions {
                forward.merge_version(v.clone());
            }
            let mut shuffled = versions.clone();
            let mut rng = seed;
            for i in (1..shuffled.len()).rev() {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (rng >> 33) as usize % (i + 1));
            }
            let mut backward = RecordState::new(Home::new("eu"));
            for v in shuffled {
                backward.merge_version(v);
            }
            prop_assert_eq!(state_hash(&forward), state_hash(&backward));
        }
    }
}
