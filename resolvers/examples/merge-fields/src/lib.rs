//! An object merge that keeps the newest value of each field: for every field, the value from the
//! newest version (by HLC, then region) that has it. Fields edited in different regions at once
//! both survive; a field edited in both keeps the later edit. Deletes are ignored unless every
//! version is a delete. Values that are not objects fall back to the newest value.

use locus_resolver::{resolver, Conflict, Resolution, Value};

pub fn resolve(conflict: Conflict) -> Resolution {
    let live: Vec<&Value> = conflict.live_values().collect();
    let Some(newest) = live.last() else {
        return Resolution::Deleted;
    };
    if !live.iter().all(|v| v.is_object()) {
        return Resolution::Value((*newest).clone());
    }
    let mut merged = locus_resolver::serde_json::Map::new();
    // Versions come oldest first, so a later version's field overwrites an earlier one's.
    for value in live {
        for (field, field_value) in value.as_object().expect("checked above") {
            merged.insert(field.clone(), field_value.clone());
        }
    }
    Resolution::Value(Value::Object(merged))
}

resolver!(resolve);

#[cfg(test)]
mod tests {
    use super::*;
    use locus_resolver::{json, Version};

    fn run(versions: Vec<Version>) -> Resolution {
        resolve(Conflict::new("profiles", "k", versions))
    }

    #[test]
    fn keeps_the_newest_value_of_each_field() {
        let resolved = run(vec![
            Version::new("eu", 1, Some(json!({"name": "Ada", "city": "Paris"}))),
            Version::new("us", 2, Some(json!({"city": "Boston", "email": "a@x"}))),
        ]);
        assert_eq!(
            resolved,
            Resolution::Value(json!({"name": "Ada", "city": "Boston", "email": "a@x"}))
        );
    }

    #[test]
    fn deletes_and_non_objects() {
        assert_eq!(
            run(vec![
                Version::new("eu", 1, None),
                Version::new("us", 2, None)
            ]),
            Resolution::Deleted
        );
        assert_eq!(
            run(vec![
                Version::new("eu", 1, Some(json!({"a": 1}))),
                Version::new("us", 2, None)
            ]),
            Resolution::Value(json!({"a": 1}))
        );
        assert_eq!(
            run(vec![
                Version::new("eu", 1, Some(json!({"a": 1}))),
                Version::new("us", 2, Some(json!(7)))
            ]),
            Resolution::Value(json!(7))
        );
    }
}
