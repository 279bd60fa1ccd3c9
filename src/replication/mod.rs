//! Replication between regions over NATS JetStream.
//!
//! A write commits its outbox row with the record in one transaction ([`crate::storage`]); the
//! [`publisher`] ships committed rows to the origin region's stream; every other region's
//! [`consumer`] merges them into its own PostgreSQL. Delivery is at least once and in no particular
//! order, which the merge (a join-semilattice, see [`crate::record`]) makes harmless.
//!
//! Streams never drop an event some region has not applied: retention is interest-based, the
//! origin creates the durable consumer of every peer when it creates its stream (so interest exists
//! before the first event), and a full stream refuses new events (discard new), which leaves them
//! in the origin's outbox until there is room.

pub mod connection;
pub mod consumer;
pub mod event;
pub mod incarnation;
pub mod permissions;
pub mod publisher;
pub mod repair;
pub mod status;

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};

use crate::config::Replication;

/// How long JetStream remembers a message id for deduplication.
pub const DEDUPE_WINDOW: Duration = Duration::from_secs(120);
/// How long a delivered event may stay unacknowledged before JetStream delivers it again.
pub const ACK_WAIT: Duration = Duration::from_secs(10);

pub fn stream_name(deployment: &str, origin: &str) -> String {
    format!("locus-{deployment}-{origin}")
}

pub fn subject(deployment: &str, origin: &str) -> String {
    format!("locus.{deployment}.{origin}.events")
}

/// The durable consumer through which `reader` reads another region's stream.
pub fn consumer_name(reader: &str) -> String {
    format!("to-{reader}")
}

pub fn stream_config(settings: &Replication, deployment: &str, origin: &str) -> stream::Config {
    stream::Config {
        name: stream_name(deployment, origin),
        subjects: vec![subject(deployment, origin)],
        retention: stream::RetentionPolicy::Interest,
        discard: stream::DiscardPolicy::New,
        storage: stream::StorageType::File,
        max_bytes: settings.stream_max_bytes,
        num_replicas: settings.stream_replicas,
        duplicate_window: DEDUPE_WINDOW,
        placement: settings
            .streams_in_region_clusters
            .then(|| stream::Placement {
                cluster: Some(origin.to_owned()),
                tags: Vec::new(),
            }),
        ..Default::default()
    }
}

pub fn consumer_config(reader: &str) -> pull::Config {
    pull::Config {
        durable_name: Some(consumer_name(reader)),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        deliver_policy: jetstream::consumer::DeliverPolicy::All,
        max_ack_pending: 20_000,
        ..Default::default()
    }
}

/// Get or create `origin`'s stream, with the durable consumer of every region in `readers`.
pub async fn ensure_stream(
    js: &jetstream::Context,
    settings: &Replication,
    deployment: &str,
    origin: &str,
    readers: &[&str],
) -> Result<stream::Stream, async_nats::Error> {
    let stream = js
        .get_or_create_stream(stream_config(settings, deployment, origin))
        .await?;
    for reader in readers {
        stream
            .get_or_create_consumer(&consumer_name(reader), consumer_config(reader))
            .await?;
    }
    Ok(stream)
}

/// Whether a nats-server release purges interest-stream events at restart while one consumer
/// has never acknowledged anything: introduced in 2.9.7 (nats-io/nats-server#3625), fixed in 2.9.16
/// (#3999). Every fresh deployment is in that state; repair covers what such a server loses.
pub fn has_interest_purge_bug(version: &str) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u64>().ok());
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Some(2)), Some(Some(9)), Some(Some(patch))) => (7..16).contains(&patch),
        _ => false,
    }
}

/// Delete the streams of `regions` in `deployment` (and with them their consumers): what
/// `locus dev --reset` and test teardown do. Streams that do not exist are fine.
pub async fn delete_streams(
    nats_url: &str,
    deployment: &str,
    regions: &[&str],
) -> Result<(), async_nats::Error> {
    let js = jetstream::new(async_nats::connect(crate::app::nats_servers(nats_url)).await?);
    for region in regions {
        match js.delete_stream(stream_name(deployment, region)).await {
            Ok(_) => {}
            Err(error) if error.to_string().contains("not found") => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn knows_which_servers_purge_interest_streams_at_restart() {
        for bad in ["2.9.7", "2.9.10", "v2.9.15"] {
            assert!(super::has_interest_purge_bug(bad), "{bad}");
        }
        for good in [
            "2.9.6",
            "2.9.16",
            "2.10.0",
            "2.15.1",
            "3.0.0-beta",
            "garbage",
        ] {
            assert!(!super::has_interest_purge_bug(good), "{good}");
        }
    }
}
