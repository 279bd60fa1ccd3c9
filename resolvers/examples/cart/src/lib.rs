//! A shopping cart whose concurrent versions union their items: an item added in any region stays
//! in the cart. The value is `{"items": {"<sku>": <quantity>, …}}`; where two versions hold the
//! same item, the larger quantity wins. A delete of the whole cart loses to a concurrent version
//! that still holds items; if every version is a delete, the cart stays deleted.

use locus_resolver::{json, resolver, Conflict, Resolution, Value};
use std::collections::BTreeMap;

pub fn resolve(conflict: Conflict) -> Resolution {
    let mut live = conflict.live_values().peekable();
    if live.peek().is_none() {
        return Resolution::Deleted;
    }
    let mut items: BTreeMap<String, u64> = BTreeMap::new();
    for value in live {
        let Some(cart) = value.get("items").and_then(Value::as_object) else {
            continue;
        };
        for (sku, quantity) in cart {
            let quantity = quantity.as_u64().unwrap_or(1);
            let held = items.entry(sku.clone()).or_insert(0);
            *held = (*held).max(quantity);
        }
    }
    Resolution::Value(json!({ "items": items }))
}

resolver!(resolve);

#[cfg(test)]
mod tests {
    use super::*;
    use locus_resolver::Version;

    fn conflict(versions: Vec<Version>) -> Conflict {
        Conflict::new("carts", "k", versions)
    }

    #[test]
    fn unions_items_keeping_the_larger_quantity() {
        let resolved = resolve(conflict(vec![
            Version::new("eu", 1, Some(json!({"items": {"apple": 1, "pear": 2}}))),
            Version::new("us", 2, Some(json!({"items": {"apple": 3, "fig": 1}}))),
        ]));
        assert_eq!(
            resolved,
            Resolution::Value(json!({"items": {"apple": 3, "fig": 1, "pear": 2}}))
        );
    }

    #[test]
    fn a_delete_loses_to_a_cart_with_items_but_all_deletes_stay_deleted() {
        let resolved = resolve(conflict(vec![
            Version::new("eu", 1, Some(json!({"items": {"apple": 1}}))),
            Version::new("us", 2, None),
        ]));
        assert_eq!(resolved, Resolution::Value(json!({"items": {"apple": 1}})));
        let resolved = resolve(conflict(vec![
            Version::new("eu", 1, None),
            Version::new("us", 2, None),
        ]));
        assert_eq!(resolved, Resolution::Deleted);
    }

    #[test]
    fn values_of_another_shape_add_nothing() {
        let resolved = resolve(conflict(vec![
            Version::new("eu", 1, Some(json!({}))),
            Version::new("us", 2, Some(json!("not a cart"))),
        ]));
        assert_eq!(resolved, Resolution::Value(json!({"items": {}})));
    }
}
