//! Reads another region's stream and merges its events into this region.
//!
//! A batch is applied in one transaction (records locked in key order, conflicts logged, the
//! origin's position recorded) and acknowledged only after it commits, so a crash at any point
//! means redelivery, never loss; redelivered or reordered events merge to the same state. A gap
//! (events this region never applied are gone from the stream) stops the consumer with an error
//! in the log and the status: applying on top of a gap would silently diverge, so this region
//! needs a bootstrap from a peer instead.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use futures_util::StreamExt;
use serde_json::json;

use super::event::{Change, Event, ModuleChunk};
use crate::clock::hlc::{wall_clock_ms, Observation};
use crate::record::policy::{Strategy, POLICY_COLLECTION};
use crate::record::resolution::{Outcome, Resolution};
use crate::record::view::{materialized_view, View};
use crate::record::{MergeOutcome, RecordState};
use crate::resolve::{self, RESOLVER_COLLECTION};
use crate::service::Region;
use crate::storage::apply::{ConflictEntry, RecordKey};
use crate::storage::resolvers::ChunkProgress;
use crate::storage::StorageError;

const BATCH: usize = 512;
const FETCH_WAIT: Duration = Duration::from_millis(500);
/// How often a running consumer checks its origin's stream for a gap.
const GAP_CHECK_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
enum ConsumeError {
    /// The consumer cannot go on without losing or guessing: it stops until an operator acts.
    #[error("{0}")]
    Stopped(String),
    #[error("NATS: {0}")]
    Nats(#[from] async_nats::Error),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

pub async fn run(region: Arc<Region>, js: jetstream::Context, origin: String) {
    loop {
        match consume(&region, &js, &origin).await {
            Ok(()) => return,
            Err(ConsumeError::Stopped(reason)) => {
                tracing::error!(region = region.id(), %origin, %reason, "replication from this origin stopped");
                region.replication.peer_stopped(&origin, &reason);
                return;
            }
            Err(error) => {
                tracing::warn!(region = region.id(), %origin, %error, "replication interrupted; retrying");
                region.replication.peer_error(&origin, &error.to_string());
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn consume(
    region: &Region,
    js: &jetstream::Context,
    origin: &str,
) -> Result<(), ConsumeError> {
    let config = &region.config;
    // Create the origin's stream if it does not exist yet (its configuration, placement included,
    // depends only on the origin and the deployment's shared settings): this region's consumer
    // then holds interest from the first event on.
    let mut stream = super::ensure_stream(
        js,
        &config.replication,
        &config.deployment,
        origin,
        &[config.region.as_str()],
    )
    .await
    .map_err(ConsumeError::Nats)?;
    let consumer: PullConsumer = stream
        .get_consumer(&super::consumer_name(&config.region))
        .await
        .map_err(ConsumeError::Nats)?;
    check_for_gap(region, &mut stream, origin).await?;
    let mut last_gap_check = std::time::Instant::now();
    region.replication.peer_running(origin);

    loop {
        let mut fetched = consumer
            .fetch()
            .max_messages(BATCH)
            .expires(FETCH_WAIT)
            .messages()
            .await
            .map_err(|e| ConsumeError::Nats(e.into()))?;
        let mut messages = Vec::new();
        while let Some(message) = fetched.next().await {
            messages.push(message.map_err(ConsumeError::Nats)?);
        }
        if last_gap_check.elapsed() > GAP_CHECK_EVERY {
            check_for_gap(region, &mut stream, origin).await?;
            last_gap_check = std::time::Instant::now();
        }
        if messages.is_empty() {
            continue;
        }
        let mut events = Vec::with_capacity(messages.len());
        let mut last_sequence = 0;
        for message in &messages {
            let sequence = message.info().map_err(ConsumeError::Nats)?.stream_sequence;
            let event = Change::decode(&message.payload).map_err(|e| {
                ConsumeError::Stopped(format!(
                    "event {sequence} of {origin}'s stream cannot be read: {e}"
                ))
            })?;
            last_sequence = last_sequence.max(sequence);
            events.push(event);
        }
        // A batch whose conflicts run resolvers can take longer than the ack wait: tell JetStream
        // the batch is in progress, so it is not delivered again while it is being applied.
        let apply = apply_with_retries(region, origin, &events, last_sequence);
        tokio::pin!(apply);
        let mut progress = tokio::time::interval(super::ACK_WAIT / 3);
        progress.tick().await;
        let applied = loop {
            tokio::select! {
                applied = &mut apply => break applied?,
                _ = progress.tick() => {
                    for message in &messages {
                        message
                            .ack_with(AckKind::Progress)
                            .await
                            .map_err(ConsumeError::Nats)?;
                    }
                }
            }
        };
        for message in &messages {
            message.ack().await.map_err(ConsumeError::Nats)?;
        }
        region.replication.applied(origin, &applied);
    }
}

/// Stop if events this region has not applied are no longer in the stream. An event leaves an
/// interest-retention stream only once every consumer acknowledged it, and this region
/// acknowledges only after committing, so everything before the stream's first event must be at
/// or below this region's applied position. The consumer's ack floor is no evidence: NATS moves
/// it forward when a stream is purged.
async fn check_for_gap(
    region: &Region,
    stream: &mut jetstream::stream::Stream,
    origin: &str,
) -> Result<(), ConsumeError> {
    let applied = region.store.applied_position(origin).await? as u64;
    let state = stream
        .info()
        .await
        .map_err(|e| ConsumeError::Nats(e.into()))?
        .state
        .clone();
    if state.last_sequence < applied {
        return Err(ConsumeError::Stopped(format!(
            "{origin}'s stream ends at {} but this region applied up to {applied}: the stream was recreated; bootstrap this region from a peer",
            state.last_sequence
        )));
    }
    // An empty stream reports the sequence its next event will get as its first.
    if state.first_sequence > applied + 1 {
        return Err(ConsumeError::Stopped(format!(
            "events {}..{} of {origin}'s stream are gone but were never applied here: bootstrap this region from a peer",
            applied + 1,
            state.first_sequence - 1
        )));
    }
    Ok(())
}

/// Apply a batch, running it again if PostgreSQL aborted it as a deadlock or serialization
/// victim, rather than leaving the batch to JetStream's redelivery after the ack wait.
async fn apply_with_retries(
    region: &Region,
    origin: &str,
    events: &[Change],
    sequence: u64,
) -> Result<Applied, StorageError> {
    let mut attempt = 0;
    loop {
        match apply_batch(region, origin, events, sequence).await {
            Err(error) if error.is_retryable() && attempt < 5 => {
                attempt += 1;
                tracing::info!(%origin, attempt, %error, "apply aborted by PostgreSQL; running it again");
            }
            other => return other,
        }
    }
}

/// What one applied batch did.
#[derive(Debug, Default, Clone)]
pub struct Applied {
    pub events: usize,
    pub conflicts: usize,
    pub conflicts_by_strategy: BTreeMap<&'static str, usize>,
    pub stream_sequence: u64,
    /// Milliseconds from the newest event's HLC to its apply here.
    pub lag_ms: u64,
}

/// Merge `events` from `origin` in one transaction.
pub async fn apply_batch(
    region: &Region,
    origin: &str,
    changes: &[Change],
    stream_sequence: u64,
) -> Result<Applied, StorageError> {
    let mut by_key: BTreeMap<RecordKey, Vec<&Event>> = BTreeMap::new();
    let mut chunks: Vec<&ModuleChunk> = Vec::new();
    for change in changes {
        match change {
            Change::Record(event) => by_key
                .entry((event.collection.clone(), event.key.clone()))
                .or_default()
                .push(event),
            Change::ModuleChunk(chunk) => chunks.push(chunk),
        }
    }
    let events: Vec<&Event> = by_key.values().flatten().copied().collect();
    let newest = events
        .iter()
        .map(|e| e.version.hlc)
        .max()
        .unwrap_or_default();
    for event in &events {
        if let Observation::TooFarAhead { skew_ms } = region.observe_remote(event.version.hlc) {
            tracing::warn!(%origin, skew_ms, "event from further in the future than the allowed drift; applied, clock not advanced");
            region.replication.skewed(origin);
        }
    }

    let keys: Vec<RecordKey> = by_key.keys().cloned().collect();
    let mut tx = region.store.begin_apply().await?;
    let mut modules_arrived = false;
    for chunk in chunks {
        match tx.store_chunk(chunk).await? {
            ChunkProgress::Assembled { sha256 } => {
                tracing::info!(%origin, %sha256, "resolver module arrived in full");
                modules_arrived = true;
            }
            ChunkProgress::Corrupt { sha256 } => {
                tracing::error!(%origin, %sha256, "resolver module chunks do not hash to the module's sha256; discarded");
            }
            ChunkProgress::Waiting | ChunkProgress::AlreadyHave => {}
        }
    }
    let mut loaded = tx.lock(&keys).await?;
    let mut conflicts = 0;
    let mut conflicts_by_strategy = BTreeMap::new();
    for (key, batch) in &by_key {
        loop {
            let current = &loaded[key];
            let mut state = current
                .state
                .clone()
                .unwrap_or_else(|| RecordState::new(batch[0].home.clone()));
            // Each merge that kept concurrent versions is a conflict, logged with the versions
            // it found, even if a later event of the same batch supersedes them.
            let mut detected = Vec::new();
            for event in batch {
                state.merge_home(&event.home);
                if state.merge_version(event.version.clone()) == MergeOutcome::Conflict {
                    detected.push(state.clone());
                }
            }
            if current.state.as_ref() == Some(&state) {
                break; // replays: nothing new
            }
            // Only a record that has (or had, within this batch) concurrent versions needs its
            // collection's strategy; the common single-version apply skips decoding the policy.
            let strategy = if state.versions.len() > 1 || !detected.is_empty() {
                region.policy_of(&key.0, current.policy.as_ref()).strategy()
            } else {
                Strategy::Lww
            };
            // Materialise the resolver's view now that the set changed, so reads never run it.
            let resolution = match &strategy {
                Strategy::Resolver(name) if state.versions.len() > 1 => Some(
                    resolve::resolve(
                        region,
                        &key.0,
                        &key.1,
                        &state,
                        name,
                        current.resolution.as_ref(),
                    )
                    .await,
                ),
                _ => None,
            };
            if !tx
                .store(key, current.rev, &state, resolution.as_ref())
                .await?
            {
                // A local write created the record after the lock: merge into what it wrote.
                let again = tx.lock(std::slice::from_ref(key)).await?;
                loaded.extend(again);
                continue;
            }
            region.forget_cached(&key.0, &key.1);
            if !detected.is_empty() {
                for found in &detected {
                    // Each detected set is logged with the outcome a reader saw for it.
                    let found_resolution = match &strategy {
                        Strategy::Resolver(name) if *found == state => resolution.clone(),
                        Strategy::Resolver(name) => {
                            Some(resolve::resolve(region, &key.0, &key.1, found, name, None).await)
                        }
                        _ => None,
                    };
                    tx.log_conflict(&conflict_entry(
                        region.id(),
                        key,
                        found,
                        &strategy,
                        found_resolution.as_ref(),
                    ))
                    .await?;
                }
                *conflicts_by_strategy
                    .entry(strategy_label(&strategy))
                    .or_insert(0) += detected.len();
                conflicts += detected.len();
            }
            break;
        }
    }
    tx.commit(origin, stream_sequence as i64, newest.as_u64())
        .await?;
    let mut resolution_inputs_changed = modules_arrived;
    for (collection, key) in &keys {
        if collection == POLICY_COLLECTION {
            region.forget_cached_policy(key);
        }
        if collection == RESOLVER_COLLECTION {
            region.resolvers.forget_binding(key);
        }
        resolution_inputs_changed |=
            collection == POLICY_COLLECTION || collection == RESOLVER_COLLECTION;
    }
    if resolution_inputs_changed {
        region.resolvers.changed.notify_one();
    }
    Ok(Applied {
        events: changes.len(),
        conflicts,
        conflicts_by_strategy,
        stream_sequence,
        lag_ms: wall_clock_ms().saturating_sub(newest.millis()),
    })
}

fn conflict_entry(
    region: &str,
    key: &RecordKey,
    state: &RecordState,
    strategy: &Strategy,
    resolution: Option<&Resolution>,
) -> ConflictEntry {
    let outcome = match materialized_view(state, strategy, resolution) {
        View::Siblings(siblings) => json!({ "siblings": siblings.len() }),
        View::Value(v) => json!(Outcome::value(v.value.clone())),
        View::Resolved(value) => json!(Outcome::value(value.clone())),
        View::Deleted | View::Absent => json!(Outcome::deleted()),
    };
    ConflictEntry {
        collection: key.0.clone(),
        key: key.1.clone(),
        region: region.to_owned(),
        strategy: strategy_label(strategy).to_owned(),
        versions: serde_json::to_value(&state.versions).expect("versions serialize"),
        outcome,
        resolver: resolution.map(|r| json!({ "name": r.resolver, "sha256": r.sha256 })),
        error: resolution.and_then(|r| r.error.clone()),
    }
}

fn strategy_label(strategy: &Strategy) -> &'static str {
    match strategy {
        Strategy::Lww => "lww",
        Strategy::Siblings => "siblings",
        Strategy::Resolver(_) => "resolver",
    }
}
