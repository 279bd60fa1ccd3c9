//! TLS for every connection that leaves a process: PostgreSQL (sqlx), peers (reqwest) and NATS
//! (async-nats) all use rustls, with one crypto provider (ring) installed once at start, so no
//! library picks another and none needs OpenSSL.
//!
//! PostgreSQL takes its TLS settings in the URL, as libpq does: `sslmode` (`disable`, `prefer`,
//! `require`, `verify-ca`, `verify-full`) and `sslrootcert` for a private CA.

/// Install the process's rustls crypto provider (ring). Idempotent: later calls keep the first.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
