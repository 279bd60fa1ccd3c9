//! Integration tests: regions run in this process against the real PostgreSQL, over real HTTP.
//! One test binary, so the crate links once.

mod bad_input;
mod cli;
mod client;
mod collections;
mod group_commit;
mod health;
mod heartbeats;
mod helpers;
mod homing;
mod idempotency;
mod integrity;
mod membership;
mod records;
mod replication;
mod resolvers;
mod security;
mod supercluster;
