//! Which JSON values a record may hold, and their one canonical form.
//!
//! Why this exists: a value is parsed here, stored as `jsonb`, encoded into an event, decoded at
//! every peer, stored there, and handed to resolvers. Each step must give back exactly what it got,
//! or regions hold different data under one and the same version vector, which the merge takes
//! for the same write and never repairs. So a write is admitted only in a form that every step
//! preserves:
//! - numbers parse and print exactly (serde_json's `float_roundtrip`), and `-0` is stored as `0`,
//!   as `jsonb` would make it anyway;
//! - no NUL character in a string or an object key (`jsonb` cannot store one);
//! - nesting at most [`MAX_DEPTH`] deep, well below serde_json's recursion limit of 128, which the
//!   envelopes around a value (event, stored state, resolver input) also count against.
//!
//! Pure: no I/O.

use serde_json::{Number, Value};

/// Deepest nesting of arrays and objects a value may have (a scalar is depth 0).
pub const MAX_DEPTH: usize = 100;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValueError {
    #[error("the value is nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("strings and object keys must not contain the NUL character (\\u0000)")]
    Nul,
}

/// Check `value` and bring it to its canonical form (see the module docs).
pub fn admit(mut value: Value) -> Result<Value, ValueError> {
    canonicalize(&mut value, 0)?;
    Ok(value)
}

fn canonicalize(value: &mut Value, depth: usize) -> Result<(), ValueError> {
    match value {
        Value::Null | Value::Bool(_) => Ok(()),
        Value::Number(number) => {
            if number.as_f64() == Some(0.0) && number.is_f64() {
                // -0.0 and 0.0 are one number to jsonb; keep the positive one everywhere.
                *number = Number::from_f64(0.0).expect("0 is finite");
            }
            Ok(())
        }
        Value::String(text) => no_nul(text),
        Value::Array(items) => {
            if depth >= MAX_DEPTH {
                return Err(ValueError::TooDeep);
            }
            items
                .iter_mut()
                .try_for_each(|item| canonicalize(item, depth + 1))
        }
        Value::Object(fields) => {
            if depth >= MAX_DEPTH {
                return Err(ValueError::TooDeep);
            }
            for (name, field) in fields.iter_mut() {
                no_nul(name)?;
                canonicalize(field, depth + 1)?;
            }
            Ok(())
        }
    }
}

fn no_nul(text: &str) -> Result<(), ValueError> {
    if text.contains('\0') {
        Err(ValueError::Nul)
    } else {
        Ok(())
    }
}

#[cfg(test)]
// The literal is the double, written as a client sent it, whose imprecise parsing once made
// regions differ: it must stay in that form.
#[allow(clippy::excessive_precision)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// Arbitrary JSON: every kind of number (integers at both ends, any finite double, -0),
    /// strings with any character, nesting.
    pub fn arb_json() -> impl Strategy<Value = Value> {
        let number = prop_oneof![
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            Just(json!(-0.0)),
            Just(json!(1e15)),
            Just(json!(9018998923926082416e-26)),
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            number,
            "\\PC{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map("\\PC{0,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn nested(depth: usize) -> Value {
        (0..depth).fold(json!(1), |inner, _| json!([inner]))
    }

    #[test]
    fn depth_is_limited_with_a_margin_below_the_parser() {
        assert!(admit(nested(MAX_DEPTH)).is_ok());
        assert_eq!(admit(nested(MAX_DEPTH + 1)), Err(ValueError::TooDeep));
        // What a value is wrapped in on the wire and in storage still parses.
        let event = json!({"version": {"value": nested(MAX_DEPTH)}, "versions": [{}]});
        let text = serde_json::to_string(&json!([[[event]]])).unwrap();
        assert!(serde_json::from_str::<Value>(&text).is_ok());
    }

    #[test]
    fn nul_is_refused_in_strings_and_keys() {
        assert_eq!(admit(json!({"a": "x\u{0}y"})), Err(ValueError::Nul));
        assert_eq!(admit(json!({"a\u{0}": 1})), Err(ValueError::Nul));
        assert!(admit(json!({"a": "x\u{1}y"})).is_ok());
    }

    #[test]
    fn negative_zero_becomes_zero() {
        let admitted = admit(json!({"z": -0.0, "i": 0})).unwrap();
        assert_eq!(
            serde_json::to_string(&admitted).unwrap(),
            r#"{"i":0,"z":0.0}"#
        );
    }

    #[test]
    fn the_issue_double_round_trips() {
        let text = r#"{"a":9018998923926082416e-26,"z":-0.0}"#;
        let admitted = admit(serde_json::from_str(text).unwrap()).unwrap();
        let printed = serde_json::to_string(&admitted).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&printed).unwrap(), admitted);
        assert_eq!(admitted["a"].as_f64(), Some(9018998923926082416e-26));
    }

    proptest! {
        /// decode ∘ encode is the identity on admitted values, so a value reads back identically
        /// after any number of trips through events and storage.
        #[test]
        fn admitted_values_are_a_fixed_point_of_encode_then_decode(value in arb_json()) {
            let admitted = admit(value).unwrap();
            let text = serde_json::to_string(&admitted).unwrap();
            let decoded: Value = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(&decoded, &admitted);
            prop_assert_eq!(serde_json::to_string(&decoded).unwrap(), text);
            prop_assert_eq!(admit(decoded).unwrap(), admitted);
        }
    }
}
