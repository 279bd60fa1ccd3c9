//! A counter that every region increments: the value is `{"counts": {"<region>": n, …}}` and a
//! region only ever raises its own entry (a grow-only counter). Concurrent versions merge by
//! taking each region's largest count; the output adds `"total"`, the sum.

use locus_resolver::{json, resolver, Conflict, Resolution, Value};
use std::collections::BTreeMap;

pub fn resolve(conflict: Conflict) -> Resolution {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for value in conflict.live_values() {
        let Some(entries) = value.get("counts").and_then(Value::as_object) else {
            continue;
        };
        for (region, count) in entries {
            let count = count.as_u64().unwrap_or(0);
            let held = counts.entry(region.clone()).or_insert(0);
            *held = (*held).max(count);
        }
    }
    let total: u64 = counts.values().sum();
    Resolution::Value(json!({ "counts": counts, "total": total }))
}

resolver!(resolve);

#[cfg(test)]
mod tests {
    use super::*;
    use locus_resolver::Version;

    fn version(region: &str, hlc: u64, value: Value) -> Version {
        Version::new(region, hlc, Some(value))
    }

    #[test]
    fn takes_each_regions_largest_count_and_sums_them() {
        let resolved = resolve(Conflict::new(
            "counters",
            "k",
            vec![
                version("eu", 1, json!({"counts": {"eu": 5, "us": 1}})),
                version("us", 2, json!({"counts": {"eu": 3, "us": 4}})),
                version("ap", 3, json!({"counts": {"ap": 2}})),
            ],
        ));
        assert_eq!(
            resolved,
            Resolution::Value(json!({"counts": {"ap": 2, "eu": 5, "us": 4}, "total": 11}))
        );
    }

    #[test]
    fn the_merge_does_not_depend_on_order() {
        let a = version("eu", 1, json!({"counts": {"eu": 5}}));
        let b = version("us", 2, json!({"counts": {"us": 7, "eu": 1}}));
        // Built by hand, not with Conflict::new (which sorts), so the order really differs.
        let run = |versions| {
            resolve(Conflict {
                abi: 1,
                collection: "c".into(),
                key: "k".into(),
                versions,
            })
        };
        assert_eq!(run(vec![a.clone(), b.clone()]), run(vec![b, a]));
    }
}
