//! The wire format of a replicated change. Versioned (`"v": 1`) so that regions running different
//! builds can tell an event they cannot read from a corrupt one; an unknown version is an error,
//! never a guess.
//!
//! An event carries the whole new version and the record's home: applying it is a merge into the
//! receiver's state (see [`crate::record::RecordState`]), so duplicates and reordering are harmless.

use serde::{Deserialize, Serialize};

use crate::record::{Home, Version};

pub const WIRE_VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub v: u8,
    /// The region whose outbox produced the event.
    pub origin: String,
    pub collection: String,
    pub key: String,
    pub home: Home,
    pub version: Version,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("event is not valid JSON of the expected shape: {0}")]
    Shape(#[from] serde_json::Error),
    #[error("event has wire version {0}, this build reads version {WIRE_VERSION}")]
    UnknownVersion(u8),
}

impl Event {
    pub fn new(origin: &str, collection: &str, key: &str, home: Home, version: Version) -> Event {
        Event {
            v: WIRE_VERSION,
            origin: origin.to_owned(),
            collection: collection.to_owned(),
            key: key.to_owned(),
            home,
            version,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("events serialize")
    }

    pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
        #[derive(Deserialize)]
        struct Probe {
            v: u8,
        }
        let probe: Probe = serde_json::from_slice(bytes)?;
        if probe.v != WIRE_VERSION {
            return Err(DecodeError::UnknownVersion(probe.v));
        }
        Ok(serde_json::from_slice(bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::hlc::Hlc;
    use crate::clock::version::VersionVector;

    fn sample() -> Event {
        Event::new(
            "eu",
            "users",
            "alice",
            Home::new("eu"),
            Version {
                value: serde_json::json!({"name": "Alice"}),
                deleted: false,
                region: "eu".into(),
                hlc: Hlc::from_parts(1_700_000_000_000, 3),
                vector: VersionVector::from([("eu.0a1b2c3d", 4)]),
            },
        )
    }

    #[test]
    fn round_trips() {
        let event = sample();
        assert_eq!(Event::decode(&event.encode()).unwrap(), event);
    }

    #[test]
    fn decodes_the_documented_v1_shape() {
        let text = r#"{"v":1,"origin":"us","collection":"c","key":"k","home":{"epoch":2,"region":"ap"},
            "version":{"value":null,"deleted":true,"region":"us","hlc":"111","version":{"us.x":1}}}"#;
        let event = Event::decode(text.as_bytes()).unwrap();
        assert!(event.version.deleted);
        assert_eq!(
            event.home,
            Home {
                epoch: 2,
                region: "ap".into()
            }
        );
        assert_eq!(event.version.hlc, Hlc::from_u64(111));
    }

    #[test]
    fn refuses_unknown_versions_and_bad_shapes() {
        let mut event = sample();
        event.v = 2;
        assert!(matches!(
            Event::decode(&event.encode()),
            Err(DecodeError::UnknownVersion(2))
        ));
        assert!(matches!(
            Event::decode(b"{\"v\":1}"),
            Err(DecodeError::Shape(_))
        ));
        assert!(matches!(
            Event::decode(b"not json"),
            Err(DecodeError::Shape(_))
        ));
        let text = r#"{"v":1,"origin":"us","collection":"c","key":"k","home":{"epoch":0,"region":"us"},
            "version":{"value":1,"deleted":false,"region":"us","hlc":12,"version":{}}}"#;
        assert!(
            Event::decode(text.as_bytes()).is_err(),
            "an HLC must be a decimal string"
        );
    }
}
