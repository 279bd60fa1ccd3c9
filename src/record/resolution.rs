//! A resolver's materialised view of a record with concurrent versions. Pure data: the resolve
//! module computes it whenever the set of versions changes and storage keeps it beside the record,
//! so a read never runs a resolver.
//!
//! It is a view, not a version: it never replicates. Every region computes it from the same set
//! with the same module (named by sha256) under the same limits, so every region shows the same.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a resolver (or its fallback) made of a set of versions: `{"value": …}` or
/// `{"deleted": true}`, as in the ABI's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Outcome {
    Value { value: Value },
    Deleted { deleted: True },
}

/// The literal `true`, so `{"deleted": false}` is not an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "bool", into = "bool")]
pub struct True;

impl TryFrom<bool> for True {
    type Error = &'static str;
    fn try_from(value: bool) -> Result<True, &'static str> {
        if value {
            Ok(True)
        } else {
            Err("`deleted` must be true")
        }
    }
}

impl From<True> for bool {
    fn from(_: True) -> bool {
        true
    }
}

impl Outcome {
    pub fn deleted() -> Outcome {
        Outcome::Deleted { deleted: True }
    }

    pub fn value(value: Value) -> Outcome {
        Outcome::Value { value }
    }
}

/// The stored resolution of one record's sibling set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolution {
    /// The resolver name the collection's policy named when this was computed.
    pub resolver: String,
    /// The module that ran; empty when the name was bound to no module here.
    pub sha256: String,
    /// The resolver's outcome; `None` when it failed (the view is then last-writer-wins).
    pub outcome: Option<Outcome>,
    /// Why the resolver gave no outcome.
    pub error: Option<String>,
    /// The outcome above is not this set's but the view readers had before: the set changed and
    /// the resolver has not run on it yet (an apply leaves that to the worker, so no module runs
    /// under the apply's locks), or its call failed transiently (wall-time interruption, module
    /// not yet replicated here). The worker resolves the record (again); reads say the view is
    /// pending.
    #[serde(default)]
    pub retry: bool,
}

impl Resolution {
    /// The resolution an apply stores when it changes a record's set under resolver `resolver`:
    /// the view before the change (`None` if nothing was readable), until the worker runs it.
    pub fn pending(resolver: &str, previous: Option<Outcome>) -> Resolution {
        Resolution {
            resolver: resolver.to_owned(),
            sha256: String::new(),
            outcome: previous,
            error: None,
            retry: true,
        }
    }
}
