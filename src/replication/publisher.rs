//! Ships committed outbox rows to the region's JetStream stream.
//!
//! Each pass publishes every row visible now, in id order, with many acknowledgements in flight,
//! and deletes a row only once JetStream acknowledged it. The message id `<region>.<incarnation>:<outbox id>`
//! lets JetStream drop the duplicate when a publisher dies between the acknowledgement and the
//! delete; it names the actor that wrote the row, so it is the same after a restart that rotated
//! the incarnation. Woken by the write path, with a timer as a backstop for rows other processes wrote.
//! One publisher per region: the holder of an advisory lock; another process takes over when its
//! session dies.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::Publish};

use super::event::MessageId;
use crate::service::Region;
use crate::storage::outbox::PublisherLease;

const BATCH: i64 = 1024;
const IDLE_POLL: Duration = Duration::from_millis(250);
/// A pass shipping fewer rows than this waits [`COALESCE`] before the next one.
const SMALL_PASS: usize = 64;
const COALESCE: Duration = Duration::from_millis(2);

pub async fn run(region: Arc<Region>, js: jetstream::Context) {
    loop {
        match PublisherLease::try_acquire(&region.config.database_url).await {
            Ok(Some(lease)) => {
                tracing::info!(
                    region = region.id(),
                    "this process publishes the region's outbox"
                );
                if let Err(error) = publish_while_leased(&region, &js, lease).await {
                    tracing::warn!(region = region.id(), %error, "publisher interrupted; retrying");
                    region.replication.publisher_error(&error.to_string());
                }
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(region = region.id(), %error, "cannot reach the database for the publisher lock")
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn publish_while_leased(
    region: &Region,
    js: &jetstream::Context,
    mut lease: PublisherLease,
) -> Result<(), async_nats::Error> {
    let config = &region.config;
    let members = region.members.peers();
    let peers: Vec<&str> = members.iter().map(|p| p.id.as_str()).collect();
    super::ensure_stream(
        js,
        &config.replication,
        &config.deployment,
        &config.region,
        &peers,
    )
    .await?;
    let subject = super::subject(&config.deployment, &config.region);
    let actor = region.settled().await.to_string();
    loop {
        let rows = region.store.unpublished(BATCH).await?;
        if rows.is_empty() {
            tokio::select! {
                _ = region.outbox_signal.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL) => lease.check().await?,
            }
            continue;
        }
        let mut pending = Vec::with_capacity(rows.len());
        for (id, bytes, written_by) in rows {
            let message = Publish::build().payload(bytes.into()).message_id(
                MessageId {
                    actor: written_by.unwrap_or_else(|| actor.clone()),
                    outbox_id: id,
                }
                .to_string(),
            );
            pending.push((id, js.send_publish(subject.clone(), message).await?));
        }
        let mut published = Vec::with_capacity(pending.len());
        let mut failure = None;
        for (id, ack) in pending {
            match ack.await {
                Ok(_) => published.push(id),
                Err(error) => {
                    failure.get_or_insert(error);
                }
            }
        }
        if !published.is_empty() {
            region.store.mark_published(&published).await?;
            region.replication.published(published.len());
        }
        if let Some(error) = failure {
            return Err(error.into());
        }
        if published.len() < SMALL_PASS {
            // Under a steady trickle of writes every pass would ship a handful of rows at the
            // fixed cost of three round trips; a moment's wait lets the next pass carry more.
            tokio::time::sleep(COALESCE).await;
        }
    }
}
