//! {{name}}: a locus conflict resolver.
//!
//! locus calls `resolve` when a record has concurrent versions, in every region, with the same
//! versions in the same order (by HLC, then region), and shows what it returns to readers. It
//! must be deterministic: the sandbox has no clock, randomness or I/O.
//!
//! This one keeps the newest value that is not a delete: a write concurrent with a delete wins
//! over it. Change `resolve` to your rule, and its tests with it.

use locus_resolver::{resolver, Conflict, Resolution};

pub fn resolve(conflict: Conflict) -> Resolution {
    match conflict.live_values().last() {
        Some(value) => Resolution::Value(value.clone()),
        None => Resolution::Deleted, // every version is a delete
    }
}

resolver!(resolve);

#[cfg(test)]
mod tests {
    use super::*;
    use locus_resolver::{json, Version};

    #[test]
    fn a_write_beats_a_concurrent_delete() {
        let conflict = Conflict::new(
            "c",
            "k",
            vec![
                Version::new("eu", 10, Some(json!({"n": 1}))),
                Version::new("us", 11, None),
            ],
        );
        assert_eq!(resolve(conflict), Resolution::Value(json!({"n": 1})));
    }

    #[test]
    fn the_newest_live_value_wins_and_all_deletes_stay_deleted() {
        let conflict = Conflict::new(
            "c",
            "k",
            vec![
                Version::new("us", 12, Some(json!(2))),
                Version::new("eu", 11, Some(json!(1))),
            ],
        );
        assert_eq!(resolve(conflict), Resolution::Value(json!(2)));
        let conflict = Conflict::new(
            "c",
            "k",
            vec![Version::new("eu", 1, None), Version::new("us", 2, None)],
        );
        assert_eq!(resolve(conflict), Resolution::Deleted);
    }
}
