//! ABI v1 between locus and a resolver module: the input document it is given and the output
//! document it must return. Pure, no I/O.

use serde::Serialize;

use crate::record::resolution::Outcome;
use crate::record::Version;

pub const ABI_VERSION: u32 = 1;

#[derive(Serialize)]
struct Input<'a> {
    abi: u32,
    collection: &'a str,
    key: &'a str,
    versions: Vec<&'a Version>,
}

/// The input document: every version, sorted by `(hlc, region)` whatever order they came in, so
/// every region hands the resolver the same bytes.
pub fn encode_input(collection: &str, key: &str, versions: &[Version]) -> Vec<u8> {
    let mut sorted: Vec<&Version> = versions.iter().collect();
    sorted.sort_by(|a, b| a.lww_key().cmp(&b.lww_key()));
    serde_json::to_vec(&Input {
        abi: ABI_VERSION,
        collection,
        key,
        versions: sorted,
    })
    .expect("versions serialize")
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputError {
    #[error("output is not UTF-8")]
    NotUtf8,
    #[error("output is not JSON: {0}")]
    NotJson(String),
    #[error("output is neither {{\"value\": …}} nor {{\"deleted\": true}}")]
    NotAnOutcome,
}

/// Read a resolver's output document.
pub fn decode_output(bytes: &[u8]) -> Result<Outcome, OutputError> {
    let text = std::str::from_utf8(bytes).map_err(|_| OutputError::NotUtf8)?;
    let document: serde_json::Value =
        serde_json::from_str(text).map_err(|e| OutputError::NotJson(e.to_string()))?;
    let single_field = document.as_object().is_some_and(|o| o.len() == 1);
    if !single_field {
        return Err(OutputError::NotAnOutcome);
    }
    serde_json::from_value(document).map_err(|_| OutputError::NotAnOutcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::hlc::Hlc;
    use crate::clock::version::VersionVector;
    use proptest::prelude::*;
    use serde_json::json;

    fn version(region: &str, hlc: u64, value: i64) -> Version {
        Version {
            value: json!(value),
            deleted: false,
            region: region.into(),
            hlc: Hlc::from_u64(hlc),
            vector: VersionVector::from([(format!("{region}.0").as_str(), 1)]),
        }
    }

    #[test]
    fn the_input_has_the_documented_shape() {
        let input = encode_input("carts", "k1", &[version("us", 7, 2), version("eu", 5, 1)]);
        let parsed: serde_json::Value = serde_json::from_slice(&input).unwrap();
        assert_eq!(
            parsed,
            json!({"abi": 1, "collection": "carts", "key": "k1", "versions": [
                {"value": 1, "deleted": false, "region": "eu", "hlc": "5", "version": {"eu.0": 1}},
                {"value": 2, "deleted": false, "region": "us", "hlc": "7", "version": {"us.0": 1}},
            ]})
        );
    }

    #[test]
    fn outputs_are_checked() {
        assert_eq!(
            decode_output(br#"{"value":[1,2]}"#),
            Ok(Outcome::value(json!([1, 2])))
        );
        assert_eq!(
            decode_output(br#"{"deleted":true}"#),
            Ok(Outcome::deleted())
        );
        assert_eq!(decode_output(b"\xff\xfe"), Err(OutputError::NotUtf8));
        assert!(matches!(decode_output(b"{"), Err(OutputError::NotJson(_))));
        for bad in [
            &br#"{"deleted":false}"#[..],
            br#"{"value":1,"deleted":true}"#,
            br#"[1]"#,
            br#"{}"#,
            br#"{"val":1}"#,
        ] {
            assert_eq!(
                decode_output(bad),
                Err(OutputError::NotAnOutcome),
                "{bad:?}"
            );
        }
    }

    proptest! {
        /// Whatever order versions arrive in, the resolver sees the same bytes.
        #[test]
        fn the_input_does_not_depend_on_arrival_order(
            hlcs in proptest::collection::vec(0u64..20, 2..6),
            seed in any::<u64>(),
        ) {
            let regions = ["eu", "us", "ap", "sa", "af", "me"];
            let versions: Vec<Version> = hlcs.iter().enumerate()
                .map(|(i, hlc)| version(regions[i], *hlc, i as i64)).collect();
            let mut shuffled = versions.clone();
            let len = shuffled.len();
            shuffled.rotate_left((seed as usize) % len);
            if seed % 2 == 0 { shuffled.reverse(); }
            prop_assert_eq!(encode_input("c", "k", &versions), encode_input("c", "k", &shuffled));
        }
    }
}
