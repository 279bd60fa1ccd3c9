//! locus: a multi-leader, geo-replicated JSON record store.
//!
//! Each region leads the writes of the records homed there, stores its data in its own PostgreSQL,
//! and (with the replication layer) ships every change to the other regions through a
//! transactional outbox. Conflicts are detected with version vectors and shown through a view.
//!
//! The map:
//! - [`clock`]: hybrid logical clock, version vectors, ETags, session tokens. Pure.
//! - [`record`]: versions, the antichain merge, collection policies, read views, name rules. Pure.
//! - [`config`]: region and deployment settings (`regions/*.toml` + `LOCUS_*` overrides).
//! - [`storage`]: the only place with SQL: records, outbox, conflicts, resolver modules, metadata.
//! - [`replication`]: the outbox's wire format, its publisher and the consumers of peers' streams.
//! - [`resolve`]: user resolvers: the wasmtime sandbox, the ABI, uploads, materialised views.
//! - [`membership`]: the deployment's regions as replicated records; a new region's first copy.
//! - [`deletion`]: deleting a collection with one replicated horizon, and purging what it removed.
//! - [`service`]: the read and write paths of a region: homing, preconditions, versioning.
//! - [`api`]: the REST API (axum): records, collections, resolvers, conflicts, regions, health,
//!   metrics, OpenAPI, forwarding.
//! - [`tls`]: the one rustls crypto provider every TLS connection uses.
//! - [`supervisor`]: background workers restarted when they end or panic, shown in readiness.
//! - [`logging`]: text or JSON log lines, each labelled with its region.
//! - [`app`]: builds a region from its config and runs it until shutdown; `locus dev`.
//! - [`nats_server`]: a current nats-server for `locus dev` and the tests, installed on first use.
//! - [`scaffold`]: `locus resolver new`, a standalone resolver crate to start from.
//! - [`bench`]: the benchmark programs behind `locus bench`.

pub mod api;
pub mod app;
pub mod bench;
pub mod client_cli;
pub mod clock;
pub mod config;
pub mod delay_proxy;
pub mod deletion;
pub mod logging;
pub mod membership;
pub mod nats_server;
pub mod peer_health;
pub mod record;
pub mod replication;
pub mod resolve;
pub mod scaffold;
pub mod service;
pub mod storage;
pub mod supervisor;
pub mod tls;
