//! The wire format of a replicated change. Versioned (`"v": 1`) so that regions running different
//! builds can tell an event they cannot read from a corrupt one; an unknown version is an error,
//! never a guess.
//!
//! An event carries the whole new version and the record's home: applying it is a merge into the
//! receiver's state (see [`crate::record::RecordState`]), so duplicates and reordering are harmless.
//!
//! A resolver module travels as [`ModuleChunk`]s (`"kind": "module_chunk"`), because a module may be
//! larger than a NATS message. Chunks are content-addressed, so replays are harmless too; a region
//! assembles a module only once it holds every chunk and the whole hashes to the sha256 named.

use std::collections::BTreeMap;

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
    #[error("event is of kind {0:?}, which this build does not know")]
    UnknownKind(String),
    #[error("bad module chunk: {0}")]
    Chunk(String),
}

/// One piece of a resolver module.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleChunk {
    pub v: u8,
    /// Always `"module_chunk"`: what tells a chunk from a record event.
    pub kind: String,
    pub origin: String,
    /// The sha256 (hex) of the whole module.
    pub sha256: String,
    pub index: u32,
    pub count: u32,
    /// This chunk's bytes, base64 (standard alphabet, padded).
    pub data: String,
}

pub const MODULE_CHUNK_KIND: &str = "module_chunk";

/// Raw bytes per chunk: base64 makes an event of about 4/3 of this, well inside NATS's default
/// 1 MiB `max_payload`.
pub const MODULE_CHUNK_BYTES: usize = 256 * 1024;

impl ModuleChunk {
    /// Cut a module into chunks.
    pub fn split(origin: &str, sha256: &str, module: &[u8]) -> Vec<ModuleChunk> {
        use base64::Engine as _;
        let pieces: Vec<&[u8]> = if module.is_empty() {
            vec![&[]]
        } else {
            module.chunks(MODULE_CHUNK_BYTES).collect()
        };
        let count = pieces.len() as u32;
        pieces
            .into_iter()
            .enumerate()
            .map(|(index, piece)| ModuleChunk {
                v: WIRE_VERSION,
                kind: MODULE_CHUNK_KIND.to_owned(),
                origin: origin.to_owned(),
                sha256: sha256.to_owned(),
                index: index as u32,
                count,
                data: base64::engine::general_purpose::STANDARD.encode(piece),
            })
            .collect()
    }

    pub fn bytes(&self) -> Result<Vec<u8>, DecodeError> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(&self.data)
            .map_err(|e| DecodeError::Chunk(e.to_string()))
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("chunks serialize")
    }
}

pub const HEARTBEAT_KIND: &str = "heartbeat";

/// The origin's promise, sent every second or so: every write it made with an HLC below
/// `through_ms` is earlier in its stream than this heartbeat (see
/// [`super::publisher`]). A reader that applied everything before it has applied those writes, so
/// it knows how fresh it is even while nobody writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub v: u8,
    /// Always `"heartbeat"`.
    pub kind: String,
    pub origin: String,
    /// Milliseconds since the epoch.
    pub through_ms: u64,
    /// The origin's own view, per peer: how far it has applied that peer's writes (the peer's
    /// heartbeat promises it applied). With every region's view, a region knows what is applied
    /// everywhere, and so which tombstones no region can need any more.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub applied: BTreeMap<String, u64>,
}

impl Heartbeat {
    pub fn new(origin: &str, through_ms: u64, applied: BTreeMap<String, u64>) -> Heartbeat {
        Heartbeat {
            v: WIRE_VERSION,
            kind: HEARTBEAT_KIND.to_owned(),
            origin: origin.to_owned(),
            through_ms,
            applied,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("heartbeats serialize")
    }
}

/// Anything a region's stream carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Record(Event),
    ModuleChunk(ModuleChunk),
    Heartbeat(Heartbeat),
}

impl Change {
    pub fn decode(bytes: &[u8]) -> Result<Change, DecodeError> {
        #[derive(Deserialize)]
        struct Probe {
            v: u8,
            kind: Option<String>,
        }
        let probe: Probe = serde_json::from_slice(bytes)?;
        if probe.v != WIRE_VERSION {
            return Err(DecodeError::UnknownVersion(probe.v));
        }
        match probe.kind.as_deref() {
            None => Ok(Change::Record(serde_json::from_slice(bytes)?)),
            Some(MODULE_CHUNK_KIND) => {
                let chunk: ModuleChunk = serde_json::from_slice(bytes)?;
                if chunk.count == 0 || chunk.index >= chunk.count {
                    return Err(DecodeError::Chunk(format!(
                        "chunk {} of {}",
                        chunk.index, chunk.count
                    )));
                }
                chunk.bytes()?;
                Ok(Change::ModuleChunk(chunk))
            }
            Some(HEARTBEAT_KIND) => Ok(Change::Heartbeat(serde_json::from_slice(bytes)?)),
            Some(other) => Err(DecodeError::UnknownKind(other.to_owned())),
        }
    }
}

/// The id an event is published under: `<region>.<incarnation>:<outbox id>`. JetStream drops a
/// repeated id within its dedupe window (a publish retried after a lost ack), and every peer keeps
/// the highest outbox id it applied per actor, which is how a region learns at start that its
/// database was restored from a backup (see [`super::incarnation`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageId {
    pub actor: String,
    pub outbox_id: i64,
}

impl MessageId {
    /// Read a message id; ids of the older `<region>:<outbox id>` form name no incarnation and
    /// give `None`.
    pub fn parse(text: &str) -> Option<MessageId> {
        let (actor, id) = text.rsplit_once(':')?;
        if !actor.contains('.') {
            return None;
        }
        Some(MessageId {
            actor: actor.to_owned(),
            outbox_id: id.parse().ok()?,
        })
    }
}

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.actor, self.outbox_id)
    }
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
    #[test]
    fn message_ids_read_back_and_old_ones_name_no_actor() {
        let id = super::MessageId {
            actor: "eu.3f9a1c07".into(),
            outbox_id: 42,
        };
        assert_eq!(super::MessageId::parse(&id.to_string()), Some(id));
        assert_eq!(super::MessageId::parse("eu:42"), None);
        assert_eq!(super::MessageId::parse("eu.a:x"), None);
    }

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

    #[test]
    fn heartbeats_decode_as_heartbeats_and_a_bad_one_is_refused() {
        let beat = Heartbeat::new(
            "eu",
            1_700_000_000_123,
            BTreeMap::from([("us".to_owned(), 1_700_000_000_001)]),
        );
        assert_eq!(
            Change::decode(&beat.encode()).unwrap(),
            Change::Heartbeat(beat)
        );
        // A heartbeat from a region that does not send its view yet still decodes, viewless.
        let viewless = br#"{"v":1,"kind":"heartbeat","origin":"eu","through_ms":5}"#;
        assert_eq!(
            Change::decode(viewless).unwrap(),
            Change::Heartbeat(Heartbeat::new("eu", 5, BTreeMap::new()))
        );
        assert!(matches!(
            Change::decode(br#"{"v":1,"kind":"heartbeat","origin":"eu"}"#),
            Err(DecodeError::Shape(_))
        ));
    }

    #[test]
    fn modules_split_into_chunks_that_reassemble() {
        let module: Vec<u8> = (0..(MODULE_CHUNK_BYTES * 2 + 17))
            .map(|i| i as u8)
            .collect();
        let chunks = ModuleChunk::split("eu", "abc", &module);
        assert_eq!(chunks.len(), 3);
        let mut whole = Vec::new();
        for chunk in &chunks {
            assert!(
                chunk.encode().len() < 1024 * 1024 - 4096,
                "fits a default NATS message"
            );
            match Change::decode(&chunk.encode()).unwrap() {
                Change::ModuleChunk(decoded) => {
                    assert_eq!(&decoded, chunk);
                    assert_eq!(decoded.count, 3);
                    whole.extend(decoded.bytes().unwrap());
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(whole, module);
        assert!(matches!(
            Change::decode(&sample().encode()).unwrap(),
            Change::Record(e) if e == sample()
        ));
        let mut bad = chunks[0].clone();
        bad.index = 3;
        assert!(matches!(
            Change::decode(&bad.encode()),
            Err(DecodeError::Chunk(_))
        ));
        assert!(matches!(
            Change::decode(br#"{"v":1,"kind":"snapshot"}"#),
            Err(DecodeError::UnknownKind(_))
        ));
    }
}
