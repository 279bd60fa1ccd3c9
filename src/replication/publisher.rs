//! Ships committed outbox rows to the region's JetStream stream.
//!
//! Each pass publishes every row visible now, in id order, with many acknowledgements in flight,
//! and deletes a row only once JetStream acknowledged it. The message id `<region>.<incarnation>:<outbox id>`
//! lets JetStream drop the duplicate when a publisher dies between the acknowledgement and the
//! delete; it names the actor that wrote the row, so it is the same after a restart that rotated
//! the incarnation. Woken by the write path, with a timer as a backstop for rows other processes wrote.
//! One publisher per region: the holder of an advisory lock; another process takes over when its
//! session dies.
//!
//! Every `heartbeat_interval_ms` the publisher also sends a heartbeat: "every write of this region
//! with an HLC below T is in the stream before me". It raises the write floor to T first (no
//! write below T commits after that, and every write that read an older floor has committed), then
//! ships every row visible, and sends the heartbeat after their acknowledgements. T is the
//! publisher's clock less [`HEARTBEAT_MARGIN`], so only writes stamped that long before the raise
//! and still uncommitted must take a new HLC.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::Publish};

use super::event::{Heartbeat, MessageId};
use crate::clock::hlc::wall_clock_ms;
use crate::service::Region;
use crate::storage::outbox::PublisherLease;

const BATCH: i64 = 1024;
const IDLE_POLL: Duration = Duration::from_millis(250);
/// A pass shipping fewer rows than this waits [`COALESCE`] before the next one.
const SMALL_PASS: usize = 64;
const COALESCE: Duration = Duration::from_millis(2);
/// How far behind its clock the publisher promises.
const HEARTBEAT_MARGIN_MS: u64 = 20;
/// How long a heartbeat's floor raise may wait for writes in flight; writes queue behind it, so
/// it gives up (and tries at the next beat) rather than hold them long.
const FLOOR_WAIT: Duration = Duration::from_millis(200);

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
    let interval = Duration::from_millis(config.replication.heartbeat_interval_ms);
    let mut next_beat = Instant::now();
    loop {
        // A promise is made before the pass that reads the outbox, and kept after it.
        let promise = if Instant::now() >= next_beat {
            next_beat = Instant::now() + interval;
            raise_floor(region).await
        } else {
            None
        };
        let rows = lease.unpublished(BATCH).await?;
        let saw_everything = (rows.len() as i64) < BATCH;
        if rows.is_empty() {
            if let Some(through_ms) = promise {
                send_heartbeat(region, js, &subject, through_ms).await?;
            }
            tokio::select! {
                _ = region.outbox_signal.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL.min(next_beat.saturating_duration_since(Instant::now()))) => lease.check().await?,
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
            lease.mark_published(&published).await?;
            region.replication.published(published.len());
        }
        if let Some(error) = failure {
            return Err(error.into());
        }
        match promise {
            Some(through_ms) if saw_everything => {
                send_heartbeat(region, js, &subject, through_ms).await?
            }
            // Rows beyond this pass may be below the promise: make it again next pass.
            Some(_) => next_beat = Instant::now(),
            None => {}
        }
        if published.len() < SMALL_PASS {
            // Under a steady trickle of writes every pass would ship a handful of rows at the
            // fixed cost of three round trips; a moment's wait lets the next pass carry more.
            tokio::time::sleep(COALESCE).await;
        }
    }
}

/// Raise the write floor for a heartbeat; the promise it allows, or `None` when the raise had to
/// give up (writes kept it waiting, or the database is away): no heartbeat this beat.
async fn raise_floor(region: &Region) -> Option<u64> {
    let through_ms = wall_clock_ms().saturating_sub(HEARTBEAT_MARGIN_MS);
    match region.store.raise_write_floor(through_ms, FLOOR_WAIT).await {
        Ok(()) => Some(through_ms),
        Err(error) => {
            tracing::debug!(region = region.id(), %error, "no heartbeat this beat: the write floor could not be raised");
            None
        }
    }
}

async fn send_heartbeat(
    region: &Region,
    js: &jetstream::Context,
    subject: &str,
    through_ms: u64,
) -> Result<(), async_nats::Error> {
    // The view rides along for tombstone reclamation; a beat without it only delays that. A
    // region still copying the deployment's data, catching up after a restore, or holding dead
    // letters (events its stream positions count as applied, which it set aside) has not
    // applied everything its positions say: it sends none.
    let copying = region.is_bootstrapping() || !region.catching_up().is_empty();
    let view = async {
        if copying || region.store.dead_letter_count().await? > 0 {
            return Ok(BTreeMap::new());
        }
        region.store.applied_through().await
    };
    let applied = match view.await {
        Ok(applied) => applied,
        Err(error) => {
            tracing::debug!(region = region.id(), %error, "heartbeat sent without this region's view");
            BTreeMap::new()
        }
    };
    let beat = Heartbeat::new(region.id(), through_ms, applied).encode();
    js.publish(subject.to_owned(), beat.into()).await?.await?;
    region.replication.heartbeat_sent(through_ms);
    Ok(())
}
