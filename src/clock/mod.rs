//! Time and causality, pure: the hybrid logical clock that orders writes, the version vectors
//! (with the ETags and session tokens built from them) that tell "saw" from "concurrent", and the
//! ranges of a peer's stream a region has applied, and how fresh the replica is by its peers' heartbeats.

pub mod hlc;
pub mod ranges;
pub mod staleness;
pub mod version;
