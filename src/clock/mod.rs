//! Time and causality, pure: the hybrid logical clock that orders writes, and the version vectors
//! (with the ETags and session tokens built from them) that tell "saw" from "concurrent".

pub mod hlc;
pub mod version;
