//! Collection policies: how a collection's records are homed, what happens when the home is
//! unreachable, and which view a reader gets of concurrent versions.
//!
//! Policies are stored as records of the system collection [`POLICY_COLLECTION`] (last-writer-wins,
//! writable anywhere), so they travel through the same write and replication path as user data and
//! every region ends with the same policy. The parsing is strict: an unknown field or value is an
//! error, never silently ignored, because a typo in a policy changes where data is written.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The system collection that holds one record per configured collection.
pub const POLICY_COLLECTION: &str = "_collections";

/// The system collection that holds one record per deleted collection: the greatest HLC among its
/// versions is the deletion's horizon (every version of the collection stamped at or below it is
/// gone). Never deleted itself, so a horizon only rises.
pub const DELETION_COLLECTION: &str = "_deletions";

/// The system collection that holds one record per region of the deployment: the URL its API is
/// reached at ([`crate::membership`]).
pub const REGIONS_COLLECTION: &str = "_regions";

/// Collection names starting with this are reserved for the system.
pub const SYSTEM_PREFIX: char = '_';

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Homing {
    /// Each record has a home region that leads its writes; other regions forward.
    #[default]
    Record,
    /// Every region accepts writes; concurrent writes are conflicts resolved by the strategy.
    Anywhere,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnHomeUnreachable {
    /// Answer 503; nothing is written.
    #[default]
    Reject,
    /// Write locally (a failover write, `Locus-Failover: true`), reconciled by the strategy later.
    AcceptLocal,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StrategyKind {
    #[default]
    Lww,
    Siblings,
    Resolver,
}

/// The conflict strategy, as the API spells it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Conflicts {
    pub strategy: StrategyKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolver: Option<String>,
}

/// A collection's policy. Every field has a default, so `{}` is a valid policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    pub homing: Homing,
    /// Where new records are homed when the writer names no `Locus-Home`; `null` = the receiving region.
    pub default_home: Option<String>,
    pub on_home_unreachable: OnHomeUnreachable,
    pub conflicts: Conflicts,
}

/// The strategy in the form the read view uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Strategy {
    Lww,
    Siblings,
    Resolver(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("{0}")]
    Parse(String),
    #[error("default_home names the unknown region {0:?}")]
    UnknownRegion(String),
    #[error("conflicts.strategy \"resolver\" needs conflicts.resolver, the name of a resolver")]
    ResolverMissing,
    #[error("conflicts.resolver is only allowed with conflicts.strategy \"resolver\"")]
    ResolverWithoutStrategy,
    #[error("no resolver named {0:?} is registered")]
    UnknownResolver(String),
}

impl Policy {
    /// Parse and validate a policy document. `is_region` says whether a region id exists;
    /// `is_resolver` whether a resolver name is registered.
    pub fn parse(
        body: &[u8],
        is_region: impl Fn(&str) -> bool,
        is_resolver: impl Fn(&str) -> bool,
    ) -> Result<Policy, PolicyError> {
        let document: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| PolicyError::Parse(e.to_string()))?;
        if !document.is_object() {
            // serde would build a struct from `[]` when every field has a default.
            return Err(PolicyError::Parse("a policy is a JSON object".into()));
        }
        let policy: Policy =
            serde_json::from_value(document).map_err(|e| PolicyError::Parse(e.to_string()))?;
        if let Some(home) = &policy.default_home {
            if !is_region(home) {
                return Err(PolicyError::UnknownRegion(home.clone()));
            }
        }
        match (&policy.conflicts.strategy, &policy.conflicts.resolver) {
            (StrategyKind::Resolver, None) => return Err(PolicyError::ResolverMissing),
            (StrategyKind::Resolver, Some(name)) if !is_resolver(name) => {
                return Err(PolicyError::UnknownResolver(name.clone()))
            }
            (StrategyKind::Lww | StrategyKind::Siblings, Some(_)) => {
                return Err(PolicyError::ResolverWithoutStrategy)
            }
            _ => {}
        }
        Ok(policy)
    }

    pub fn strategy(&self) -> Strategy {
        match (&self.conflicts.strategy, &self.conflicts.resolver) {
            (StrategyKind::Lww, _) => Strategy::Lww,
            (StrategyKind::Siblings, _) => Strategy::Siblings,
            (StrategyKind::Resolver, Some(name)) => Strategy::Resolver(name.clone()),
            // Unreachable for a parsed policy; last-writer-wins is the safe reading.
            (StrategyKind::Resolver, None) => Strategy::Lww,
        }
    }

    /// The policy of the system collection that stores policies.
    pub fn system() -> Policy {
        Policy {
            homing: Homing::Anywhere,
            ..Policy::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Policy, PolicyError> {
        Policy::parse(
            text.as_bytes(),
            |r| ["eu", "us", "ap"].contains(&r),
            |n| n == "cart",
        )
    }

    #[test]
    fn omitted_fields_take_defaults() {
        assert_eq!(parse("{}").unwrap(), Policy::default());
        let p = parse(r#"{"homing":"anywhere","conflicts":{"strategy":"siblings"}}"#).unwrap();
        assert_eq!(p.homing, Homing::Anywhere);
        assert_eq!(p.strategy(), Strategy::Siblings);
        assert_eq!(p.on_home_unreachable, OnHomeUnreachable::Reject);
    }

    #[test]
    fn unknown_fields_values_and_regions_are_refused() {
        assert!(matches!(
            parse(r#"{"homing":"record","colour":1}"#),
            Err(PolicyError::Parse(_))
        ));
        assert!(matches!(
            parse(r#"{"homing":"sometimes"}"#),
            Err(PolicyError::Parse(_))
        ));
        assert!(matches!(
            parse(r#"{"conflicts":{"strategy":"lww","x":1}}"#),
            Err(PolicyError::Parse(_))
        ));
        assert_eq!(
            parse(r#"{"default_home":"mars"}"#),
            Err(PolicyError::UnknownRegion("mars".into()))
        );
        assert!(matches!(parse("[1]"), Err(PolicyError::Parse(_))));
        assert!(matches!(parse("[]"), Err(PolicyError::Parse(_))));
        assert!(matches!(parse("null"), Err(PolicyError::Parse(_))));
    }

    #[test]
    fn the_resolver_strategy_needs_a_registered_resolver() {
        assert_eq!(
            parse(r#"{"conflicts":{"strategy":"resolver"}}"#),
            Err(PolicyError::ResolverMissing)
        );
        assert_eq!(
            parse(r#"{"conflicts":{"strategy":"resolver","resolver":"nope"}}"#),
            Err(PolicyError::UnknownResolver("nope".into()))
        );
        assert_eq!(
            parse(r#"{"conflicts":{"strategy":"lww","resolver":"cart"}}"#),
            Err(PolicyError::ResolverWithoutStrategy)
        );
        let p = parse(r#"{"conflicts":{"strategy":"resolver","resolver":"cart"}}"#).unwrap();
        assert_eq!(p.strategy(), Strategy::Resolver("cart".into()));
    }
}
