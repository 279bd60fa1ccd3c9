//! Write a locus conflict resolver in Rust.
//!
//! `json!` and [`Value`] are `serde_json`'s, re-exported so a resolver needs no other dependency.
//!
//! ```
//! use locus_resolver::{resolver, Conflict, Resolution};
//!
//! fn resolve(conflict: Conflict) -> Resolution {
//!     // `conflict.versions` holds every concurrent version, oldest (by HLC, region) first.
//!     Resolution::Value(conflict.versions.last().unwrap().value.clone())
//! }
//!
//! resolver!(resolve);
//! ```
//!
//! Build for `wasm32-unknown-unknown` as a `cdylib`. The macro exports what ABI v1 asks for
//! (`memory`, `locus_alloc`, `locus_resolve`): it reads the input document, calls your function and
//! writes its answer. A resolver has no clock, no randomness and no I/O: locus runs it in every
//! region and needs the same answer everywhere. A panic traps, and locus then falls back to
//! last-writer-wins and logs the error.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
pub use serde_json::{self, json, Value};

// The guide's snippets (resolvers/README.md in the locus repository) are compiled as doc-tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeSnippets;

/// A hybrid logical clock reading: milliseconds since the Unix epoch in the upper 48 bits, a
/// counter in the lower 16. Orders versions as locus does (ties broken by region). On the wire
/// it is the decimal string of the number, since JSON numbers lose precision past 2^53; a string
/// that is not one fails the input's decoding rather than reading as 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Hlc(pub u64);

impl Hlc {
    /// The wall-clock milliseconds part.
    pub fn millis(self) -> u64 {
        self.0 >> 16
    }
}

impl TryFrom<String> for Hlc {
    type Error = String;

    fn try_from(text: String) -> Result<Hlc, String> {
        text.parse()
            .map(Hlc)
            .map_err(|_| format!("{text:?} is not an HLC (a decimal u64)"))
    }
}

impl From<Hlc> for String {
    fn from(hlc: Hlc) -> String {
        hlc.0.to_string()
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One concurrent version of the record.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Version {
    /// The JSON value; `null` for a tombstone.
    pub value: Value,
    /// A delete.
    pub deleted: bool,
    /// The region that wrote it.
    pub region: String,
    /// Its hybrid logical clock.
    pub hlc: Hlc,
    /// Its version vector.
    pub version: BTreeMap<String, u64>,
}

impl Version {
    /// A version written at `region` at HLC `hlc`: `Some(value)`, or `None` for a delete. For
    /// testing a resolver natively.
    pub fn new(region: &str, hlc: u64, value: Option<Value>) -> Version {
        Version {
            deleted: value.is_none(),
            value: value.unwrap_or(Value::Null),
            region: region.to_owned(),
            hlc: Hlc(hlc),
            version: [(format!("{region}.1"), 1)].into(),
        }
    }
}

/// What the resolver is asked to resolve.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Conflict {
    pub abi: u32,
    pub collection: String,
    pub key: String,
    /// Two or more versions, sorted by (HLC, region): the last is the last-writer-wins winner.
    pub versions: Vec<Version>,
}

impl Conflict {
    /// The conflict locus would hand a resolver for these versions: sorted by (HLC, region). For
    /// testing a resolver natively.
    pub fn new(collection: &str, key: &str, mut versions: Vec<Version>) -> Conflict {
        versions.sort_by(|a, b| (a.hlc, &a.region).cmp(&(b.hlc, &b.region)));
        Conflict {
            abi: 1,
            collection: collection.to_owned(),
            key: key.to_owned(),
            versions,
        }
    }

    /// The values of the versions that are not deletes, oldest first.
    pub fn live_values(&self) -> impl Iterator<Item = &Value> {
        self.versions
            .iter()
            .filter(|v| !v.deleted)
            .map(|v| &v.value)
    }
}

/// The value readers will see.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    Value(Value),
    Deleted,
}

impl Resolution {
    /// The ABI's output document.
    pub fn to_json(&self) -> Vec<u8> {
        let document = match self {
            Resolution::Value(value) => json!({ "value": value }),
            Resolution::Deleted => json!({ "deleted": true }),
        };
        serde_json::to_vec(&document).expect("JSON values serialize")
    }
}

/// Exports the ABI v1 entry points for a `fn(Conflict) -> Resolution`.
#[macro_export]
macro_rules! resolver {
    ($resolve:path) => {
        #[no_mangle]
        pub extern "C" fn locus_alloc(len: i32) -> i32 {
            $crate::__private::alloc(len)
        }

        #[no_mangle]
        pub extern "C" fn locus_resolve(ptr: i32, len: i32) -> i64 {
            $crate::__private::resolve(ptr, len, $resolve)
        }
    };
}

#[doc(hidden)]
pub mod __private {
    use super::{Conflict, Resolution};

    /// Memory for the input. Each call gets a fresh instance, so nothing is ever freed.
    pub fn alloc(len: i32) -> i32 {
        let buffer = vec![0u8; len.max(0) as usize].into_boxed_slice();
        Box::leak(buffer).as_mut_ptr() as usize as i32
    }

    pub fn resolve(ptr: i32, len: i32, resolve: fn(Conflict) -> Resolution) -> i64 {
        // SAFETY: locus wrote `len` bytes at `ptr`, which `alloc` handed out.
        let input = unsafe { core::slice::from_raw_parts(ptr as usize as *const u8, len as usize) };
        let conflict: Conflict =
            serde_json::from_slice(input).expect("locus sends an ABI v1 input document");
        let output = Box::leak(resolve(conflict).to_json().into_boxed_slice());
        ((output.as_ptr() as usize as i64) << 32) | output.len() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_have_the_abi_shape() {
        assert_eq!(
            Resolution::Value(json!({"a": 1})).to_json(),
            br#"{"value":{"a":1}}"#
        );
        assert_eq!(Resolution::Deleted.to_json(), br#"{"deleted":true}"#);
    }

    #[test]
    fn reads_the_input_document() {
        let conflict: Conflict = serde_json::from_str(
            r#"{"abi":1,"collection":"c","key":"k","versions":[
                {"value":1,"deleted":false,"region":"eu","hlc":"5","version":{"eu.1":1}},
                {"value":null,"deleted":true,"region":"us","hlc":"7","version":{"us.1":1}}]}"#,
        )
        .unwrap();
        assert_eq!(conflict.versions[1].hlc, Hlc(7));
        assert_eq!(conflict.live_values().collect::<Vec<_>>(), [&json!(1)]);
    }

    #[test]
    fn an_hlc_that_is_not_a_number_fails_the_input() {
        let bad = serde_json::from_str::<Version>(
            r#"{"value":1,"deleted":false,"region":"eu","hlc":"soon","version":{"eu.1":1}}"#,
        );
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("\"soon\" is not an HLC"));
        let hlc = Hlc((1_700_000_000_000 << 16) | 3);
        assert_eq!(hlc.millis(), 1_700_000_000_000);
        assert_eq!(
            serde_json::to_string(&hlc).unwrap(),
            format!("\"{}\"", hlc.0)
        );
    }
}
