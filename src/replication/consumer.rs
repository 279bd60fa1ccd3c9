//! Reads another region's stream and merges its events into this region.
//!
//! A batch is applied in one transaction (records locked in key order, conflicts logged, the
//! origin's position recorded) and acknowledged only after it commits, so a crash at any point
//! means redelivery, never loss; redelivered or reordered events merge to the same state.
//!
//! The stream is trusted for nothing else. The sequences applied are kept as ranges in
//! PostgreSQL ([`crate::clock::ranges`]); a hole whose events are gone (purged, dropped by the
//! server, a recreated stream) or that stays open triggers a repair round against the origin
//! ([`super::repair`]), after which the hole is covered and replication goes on: never a silent
//! skip, never a stop. An event that cannot be read or applied, even alone, is set aside as a dead
//! letter and its record left to repair; an event of a newer wire version pauses the consumer
//! ("needs upgrade") without acknowledging it.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use futures_util::StreamExt;
use serde_json::json;

use super::event::{Change, DecodeError, Event, MessageId, ModuleChunk};
use crate::clock::hlc::{wall_clock_ms, Observation};
use crate::record::policy::{Strategy, DELETION_COLLECTION, POLICY_COLLECTION, REGIONS_COLLECTION};
use crate::record::resolution::Resolution;
use crate::record::view::{materialized_view, pending_outcome};
use crate::record::{MergeOutcome, RecordState};
use crate::resolve::RESOLVER_COLLECTION;
use crate::service::Region;
use crate::storage::apply::{ConflictEntry, MergedWrite, RecordKey, StreamPosition};
use crate::storage::resolvers::ChunkProgress;
use crate::storage::StorageError;

const BATCH: usize = 512;
const FETCH_WAIT: Duration = Duration::from_millis(500);
/// How often a running consumer checks its origin's stream for a gap.
const GAP_CHECK_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
enum ConsumeError {
    /// An event of a newer wire version: this region must be upgraded to read on.
    #[error("needs upgrade: {0}")]
    NeedsUpgrade(String),
    /// The origin has not created its stream yet (it has never run): nothing to read so far.
    #[error("its stream does not exist yet")]
    NoStream,
    #[error("NATS: {0}")]
    Nats(#[from] async_nats::Error),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

pub async fn run(region: Arc<Region>, js: jetstream::Context, origin: String) {
    // Whether the origin's stream was seen missing: then it holds nothing from before this
    // region attached, and no history of it is skipped when it appears.
    let mut seen_without_stream = false;
    loop {
        if region.members.is_retired(&origin) {
            // Never read a retired region's stream again; the membership worker stops this task.
            return std::future::pending().await;
        }
        match consume(&region, &js, &origin, &mut seen_without_stream).await {
            Ok(()) => return,
            Err(ConsumeError::NoStream) => {
                tracing::debug!(region = region.id(), %origin, "waiting for the origin to create its stream");
                region
                    .replication
                    .peer_error(&origin, &ConsumeError::NoStream.to_string());
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(ConsumeError::NeedsUpgrade(reason)) => {
                tracing::error!(region = region.id(), %origin, %reason, "replication from this origin paused until this region is upgraded");
                region.replication.peer_needs_upgrade(&origin, &reason);
                tokio::time::sleep(Duration::from_secs(30)).await;
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
    seen_without_stream: &mut bool,
) -> Result<(), ConsumeError> {
    let config = &region.config;
    // Only the origin creates its stream (a reader may not: see `super::permissions`), with the
    // consumers of the readers it knows, so they hold interest from its first event on. A reader
    // it did not know yet (one that joined later) creates its own consumer here.
    let mut stream = match js
        .get_stream(super::stream_name(&config.deployment, origin))
        .await
    {
        Ok(stream) => stream,
        Err(error) if is_stream_not_found(&error) => {
            *seen_without_stream = true;
            // No history to wait for or to skip: a bootstrap may go on without it.
            region.replication.consumer_attached(origin);
            return Err(ConsumeError::NoStream);
        }
        Err(error) => return Err(ConsumeError::Nats(error.into())),
    };
    let consumer: PullConsumer = stream
        .get_or_create_consumer(
            &super::consumer_name(&config.region),
            super::consumer_config(&config.region),
        )
        .await
        .map_err(|e| ConsumeError::Nats(e.into()))?;
    if region.is_bootstrapping() && !*seen_without_stream {
        skip_history_before_attach(region, &mut stream, origin).await?;
    }
    region.replication.consumer_attached(origin);
    region.replication.peer_running(origin);
    let mut open_holes = BTreeMap::new();
    check_for_gap(region, &mut stream, origin, &mut open_holes).await?;
    wait_for_first_copy(region, &mut stream, origin).await?;
    let mut last_gap_check = Instant::now();

    // The next batch is fetched while this one is applied, so a backlog costs no fetch round
    // trip per batch. Should this task end early, what the fetch delivered is redelivered after
    // the ack wait, like a batch whose apply failed.
    let mut fetching = Prefetch::start(&consumer);
    loop {
        let messages = fetching.take().await?;
        fetching = Prefetch::start(&consumer);
        if last_gap_check.elapsed() > GAP_CHECK_EVERY {
            check_for_gap(region, &mut stream, origin, &mut open_holes).await?;
            last_gap_check = Instant::now();
        }
        if messages.is_empty() {
            continue;
        }
        // History this region's first copy already holds: acknowledged, never merged again.
        let copied_through = region.replication.copied_through(origin);
        let (copied, messages): (Vec<_>, Vec<_>) = messages.into_iter().partition(|message| {
            message
                .info()
                .is_ok_and(|info| info.stream_sequence <= copied_through)
        });
        for message in &copied {
            message.ack().await.map_err(ConsumeError::Nats)?;
        }
        if !copied.is_empty() {
            let stream_sequence = copied
                .iter()
                .filter_map(|message| message.info().ok().map(|info| info.stream_sequence))
                .max()
                .unwrap_or(0);
            region.replication.held_by_copy(origin, copied.len());
            region.replication.applied(
                origin,
                &Applied {
                    events: copied.len(),
                    stream_sequence,
                    ..Applied::default()
                },
            );
        }
        if messages.is_empty() {
            continue;
        }
        let mut events = Vec::with_capacity(messages.len());
        let mut sequences = Vec::with_capacity(messages.len());
        let mut sent_as = Vec::with_capacity(messages.len());
        let mut unreadable = Vec::new();
        for message in &messages {
            let sequence = message.info().map_err(ConsumeError::Nats)?.stream_sequence;
            match Change::decode(&message.payload) {
                Ok(event) => {
                    events.push(event);
                    sequences.push(sequence);
                    sent_as.extend(
                        message
                            .headers
                            .as_ref()
                            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                            .and_then(|id| MessageId::parse(id.as_str())),
                    );
                }
                // A newer build's event is no poison: wait for this region's upgrade, without
                // acknowledging anything, so nothing is lost meanwhile.
                Err(error @ DecodeError::UnknownVersion(_)) => {
                    return Err(ConsumeError::NeedsUpgrade(format!(
                        "event {sequence} of {origin}'s stream: {error}"
                    )))
                }
                Err(error) => {
                    unreadable.push((sequence, message.payload.to_vec(), error.to_string()))
                }
            }
        }
        for (sequence, payload, error) in unreadable {
            tracing::error!(region = region.id(), %origin, sequence, %error, "unreadable event set aside as a dead letter; repair brings its record over");
            region
                .store
                .dead_letter(origin, sequence, None, &payload, &error)
                .await?;
            region.replication.dead_lettered(origin, 1);
            region.repair_wanted.notify_one();
        }
        // A batch that waits on locks or retries, or falls back to event-by-event applies, can
        // take longer than the ack wait: tell JetStream the batch is in progress, so it is not
        // delivered again while it is being applied.
        let apply = apply_or_set_aside(region, origin, &events, &sequences, &sent_as);
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

/// Apply a batch; if it fails for a reason other than an unavailable database, apply its events
/// one by one, and set aside as dead letters only those that fail alone, so one poison event never
/// stops the stream. Repair brings their records over from the origin.
async fn apply_or_set_aside(
    region: &Region,
    origin: &str,
    events: &[Change],
    sequences: &[u64],
    sent_as: &[MessageId],
) -> Result<Applied, StorageError> {
    match apply_with_retries(region, origin, events, sequences, sent_as).await {
        Err(error) if !matches!(error, StorageError::Unavailable(_)) && !events.is_empty() => {
            tracing::warn!(region = region.id(), %origin, %error, "batch failed; applying its events one by one");
            let mut total = Applied::default();
            for (event, &sequence) in events.iter().zip(sequences) {
                // The batch's message ids go with the first event: they only say what the
                // origin has published, whatever became of each event here.
                let sent_as = if total.events == 0 { sent_as } else { &[] };
                match apply_with_retries(
                    region,
                    origin,
                    std::slice::from_ref(event),
                    &[sequence],
                    sent_as,
                )
                .await
                {
                    Ok(applied) => total.absorb(applied),
                    Err(StorageError::Unavailable(e)) => return Err(StorageError::Unavailable(e)),
                    Err(error) => {
                        let key = match event {
                            Change::Record(e) => Some((e.collection.as_str(), e.key.as_str())),
                            Change::ModuleChunk(_) | Change::Heartbeat(_) => None,
                        };
                        tracing::error!(region = region.id(), %origin, sequence, ?key, %error, "event set aside as a dead letter; repair brings its record over");
                        region
                            .store
                            .dead_letter(
                                origin,
                                sequence,
                                key,
                                &encode_change(event),
                                &error.to_string(),
                            )
                            .await?;
                        region.replication.dead_lettered(origin, 1);
                        region.repair_wanted.notify_one();
                    }
                }
            }
            Ok(total)
        }
        other => other,
    }
}

fn encode_change(change: &Change) -> Vec<u8> {
    match change {
        Change::Record(event) => event.encode(),
        Change::ModuleChunk(chunk) => chunk.encode(),
        Change::Heartbeat(beat) => beat.encode(),
    }
}

/// How long a hole inside the stream may stay open before it is taken as lost: well past the
/// ack wait, after which JetStream would have delivered its events again.
const HOLE_GRACE: Duration = Duration::from_secs(60);

/// Find events this region never applied and will never receive: below the stream's first
/// event (purged, or dropped by the server), in a stream that was recreated, or in a hole that
/// stays open. Each triggers a repair round against the origin, which brings over what those
/// events carried; the hole is then covered and replication goes on. A failed round leaves the
/// hole to the next check: never a silent skip, never a stop.
async fn check_for_gap(
    region: &Region,
    stream: &mut jetstream::stream::Stream,
    origin: &str,
    open_holes: &mut BTreeMap<(u64, u64), Instant>,
) -> Result<(), ConsumeError> {
    let applied = region.store.applied_ranges(origin).await?;
    let state = stream
        .info()
        .await
        .map_err(|e| ConsumeError::Nats(e.into()))?
        .state
        .clone();
    let recreated = applied.max().is_some_and(|max| state.last_sequence < max);
    let mut lost = if recreated {
        Vec::new()
    } else {
        applied.holes_below(state.first_sequence)
    };
    // Holes still inside the stream wait for (re)delivery, up to the grace.
    let now = Instant::now();
    let inside = applied
        .holes_below(applied.max().map_or(0, |max| max + 1))
        .into_iter()
        .filter(|&(_, last)| last >= state.first_sequence);
    let mut still_open = BTreeMap::new();
    for hole in inside {
        let seen = *open_holes.get(&hole).unwrap_or(&now);
        if now.duration_since(seen) > HOLE_GRACE {
            lost.push(hole);
        } else {
            still_open.insert(hole, seen);
        }
    }
    *open_holes = still_open;
    if !recreated && lost.is_empty() {
        return Ok(());
    }
    let missing: u64 = lost.iter().map(|(a, b)| b - a + 1).sum();
    tracing::warn!(region = region.id(), %origin, ?lost, recreated, "events of this origin's stream are gone unapplied; repairing from the origin");
    region.replication.peer_repairing(origin, missing);
    match super::repair::round(region, origin).await {
        Ok(_) => {
            if recreated {
                region.store.reset_ranges(origin).await?;
            } else {
                region.store.cover_ranges(origin, &lost).await?;
            }
            region.replication.gap_repaired(origin, missing);
            region.replication.peer_running(origin);
        }
        Err(error) => {
            tracing::warn!(region = region.id(), %origin, %error, "repair of a gap failed; trying again at the next check");
        }
    }
    Ok(())
}

fn is_stream_not_found(error: &jetstream::context::GetStreamError) -> bool {
    matches!(
        error.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// One fetch of up to [`BATCH`] messages, running on its own task; aborted if dropped untaken.
struct Prefetch(tokio::task::JoinHandle<Result<Vec<jetstream::Message>, ConsumeError>>);

impl Prefetch {
    fn start(consumer: &PullConsumer) -> Prefetch {
        let consumer = consumer.clone();
        Prefetch(tokio::spawn(async move {
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
            Ok(messages)
        }))
    }

    async fn take(&mut self) -> Result<Vec<jetstream::Message>, ConsumeError> {
        match (&mut self.0).await {
            Ok(fetched) => fetched,
            Err(error) => Err(ConsumeError::Nats(
                format!("the fetch task ended: {error}").into(),
            )),
        }
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// While this new region copies the deployment's data, its consumer of `origin` leaves the
/// stream's events waiting: once the copy completes, those it holds are acknowledged without a
/// merge ([`crate::membership::bootstrap`]) instead of being merged twice, by this consumer and
/// again by the copy, each taking the region's apply lock from the other. Waiting pins the stream
/// (interest retention keeps every event for this region), so it ends once the stream holds half
/// its `max_bytes`: a long copy must not fill it, or the origin's outbox would stall.
async fn wait_for_first_copy(
    region: &Region,
    stream: &mut jetstream::stream::Stream,
    origin: &str,
) -> Result<(), ConsumeError> {
    const LOOK_EVERY: Duration = Duration::from_millis(50);
    const STREAM_EVERY: u32 = 20;
    let mut looks = 0u32;
    while region.is_bootstrapping() {
        if looks % STREAM_EVERY == 0 {
            let info = stream
                .info()
                .await
                .map_err(|e| ConsumeError::Nats(e.into()))?;
            let (held, most) = (info.state.bytes, info.config.max_bytes);
            if most > 0 && held >= most as u64 / 2 {
                tracing::info!(region = region.id(), %origin, held, most, "the stream is half full while the first copy runs; applying its events meanwhile");
                break;
            }
            if looks == 0 {
                tracing::info!(region = region.id(), %origin, "the stream's events wait for the first copy, which holds most of them");
                region.replication.peer_waiting_for_copy(origin);
            }
        }
        looks = looks.wrapping_add(1);
        tokio::time::sleep(LOOK_EVERY).await;
    }
    region.replication.peer_running(origin);
    Ok(())
}

/// A new region's consumer has just attached: the events its origin's stream already let go were
/// applied by every region reading it then, and reach this one through the bootstrap copy, not
/// the stream; they are no gap. Everything from the stream's first sequence on stays until this
/// region acknowledges it, since its consumer exists now.
async fn skip_history_before_attach(
    region: &Region,
    stream: &mut jetstream::stream::Stream,
    origin: &str,
) -> Result<(), ConsumeError> {
    if region.store.applied_ranges(origin).await?.max().is_some() {
        return Ok(()); // attached at an earlier start, before a crash
    }
    let first = stream
        .info()
        .await
        .map_err(|e| ConsumeError::Nats(e.into()))?
        .state
        .first_sequence;
    if first > 1 {
        region.store.cover_ranges(origin, &[(1, first - 1)]).await?;
        tracing::info!(%origin, before = first, "joining: events this stream let go before this region attached come with the copy");
    }
    Ok(())
}

/// Apply a batch, running it again if PostgreSQL aborted it as a deadlock or serialization
/// victim, rather than leaving the batch to JetStream's redelivery after the ack wait.
pub async fn apply_with_retries(
    region: &Region,
    origin: &str,
    events: &[Change],
    sequences: &[u64],
    sent_as: &[MessageId],
) -> Result<Applied, StorageError> {
    let mut attempt = 0;
    loop {
        match apply_batch(region, origin, events, sequences, sent_as).await {
            Err(error) if error.is_retryable() && attempt < 5 => {
                attempt += 1;
                tracing::info!(%origin, attempt, %error, "apply aborted by PostgreSQL; running it again");
            }
            other => return other,
        }
    }
}

/// One key's merge within a batch, waiting to be written.
struct Merged<'k> {
    key: &'k RecordKey,
    rev: i64,
    state: RecordState,
    resolution: Option<Resolution>,
    strategy: Strategy,
    detected: Vec<RecordState>,
}

/// What one applied batch did.
#[derive(Debug, Default, Clone)]
pub struct Applied {
    pub events: usize,
    pub conflicts: usize,
    pub conflicts_by_strategy: BTreeMap<&'static str, usize>,
    /// Records whose stored state changed.
    pub records_changed: usize,
    pub stream_sequence: u64,
    /// Milliseconds from the newest record event's HLC to its apply here (none in the batch:
    /// `None`).
    pub lag_ms: Option<u64>,
}

impl Applied {
    /// Add another batch's figures to these.
    fn absorb(&mut self, other: Applied) {
        self.events += other.events;
        self.conflicts += other.conflicts;
        for (strategy, count) in other.conflicts_by_strategy {
            *self.conflicts_by_strategy.entry(strategy).or_insert(0) += count;
        }
        self.records_changed += other.records_changed;
        self.stream_sequence = self.stream_sequence.max(other.stream_sequence);
        self.lag_ms = self.lag_ms.max(other.lag_ms);
    }
}

/// Merge `events` from `origin` in one transaction, with the stream `sequences` they came at and
/// the message ids they were `sent_as` (recorded with them; repair merges with neither).
pub async fn apply_batch(
    region: &Region,
    origin: &str,
    changes: &[Change],
    sequences: &[u64],
    sent_as: &[MessageId],
) -> Result<Applied, StorageError> {
    let mut by_key: BTreeMap<RecordKey, Vec<&Event>> = BTreeMap::new();
    let mut chunks: Vec<&ModuleChunk> = Vec::new();
    // The newest heartbeat of the batch, with its stream sequence: its promise holds once
    // everything before it is applied, which the commit checks.
    let mut heartbeat: Option<(u64, u64)> = None;
    for (i, change) in changes.iter().enumerate() {
        match change {
            Change::Record(event) => by_key
                .entry((event.collection.clone(), event.key.clone()))
                .or_default()
                .push(event),
            Change::ModuleChunk(chunk) => chunks.push(chunk),
            Change::Heartbeat(beat) if beat.origin == origin => {
                region.replication.peer_view(origin, &beat.applied);
                if let Some(&sequence) = sequences.get(i) {
                    heartbeat = heartbeat.max(Some((sequence, beat.through_ms)));
                }
            }
            Change::Heartbeat(beat) => {
                tracing::warn!(%origin, claimed = %beat.origin, "a heartbeat in another region's stream; ignored")
            }
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
    // A batch from the stream records its position, and a module's chunks assemble it: such
    // batches run alone. Records alone (a repair round's merge, a dead letter retried) may be
    // merged beside other merges.
    let mut tx = if sequences.is_empty() && chunks.is_empty() {
        region.store.begin_merge().await?
    } else {
        region.store.begin_apply().await?
    };
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
    let mut loaded = tx
        .lock(&keys, (!sequences.is_empty()).then_some(origin))
        .await?;
    let mut conflicts = 0;
    let mut records_changed = 0;
    let mut conflicts_by_strategy = BTreeMap::new();
    // Whether this batch changed a set under a resolver: the worker then has work.
    let mut left_to_resolve = false;
    let mut violations_logged = std::collections::BTreeSet::new();
    // Logged together before the commit, in the order they were found.
    let mut logged: Vec<ConflictEntry> = Vec::new();
    // Merge every key, write all that changed in two statements, and merge again only the keys a
    // local write created after the lock (rare: the insert found a row).
    let mut todo: Vec<&RecordKey> = by_key.keys().collect();
    while !todo.is_empty() {
        let mut merged = Vec::with_capacity(todo.len());
        for key in todo {
            let current = &loaded[key];
            // Versions a deletion of the collection removed are left out, held or arriving: the
            // same set then remains in every region, whatever it applied first.
            let kept: Vec<&Event>;
            let batch: &[&Event] = match current.deleted_before {
                None => &by_key[key],
                Some(horizon) => {
                    kept = by_key[key]
                        .iter()
                        .copied()
                        .filter(|e| e.version.hlc > horizon)
                        .collect();
                    &kept
                }
            };
            let mut state = match (current.visible_state(), batch.first()) {
                // Only removed versions arrived, and the row holds none: nothing to do.
                (Some(Cow::Borrowed(_)), None) => continue,
                (Some(state), _) => state.into_owned(),
                (None, Some(first)) => RecordState::new(first.home.clone()),
                // Everything here was deleted and nothing new arrived: the purge removes the row.
                (None, None) => continue,
            };
            // Each merge that kept concurrent versions is a conflict, logged with the versions
            // it found, even if a later event of the same batch supersedes them.
            let mut detected = Vec::new();
            let mut diverged = Vec::new();
            for event in batch {
                state.merge_home(&event.home);
                match state.merge_version(event.version.clone()) {
                    MergeOutcome::Conflict => detected.push(state.clone()),
                    MergeOutcome::Diverged => diverged.push(&event.version),
                    MergeOutcome::AlreadyCovered | MergeOutcome::Superseded => {}
                }
            }
            if violations_logged.insert(key) {
                for incoming in diverged {
                    tracing::error!(region = region.id(), %origin, collection = %key.0, key = %key.1,
                        vector = ?incoming.vector, "integrity violation: two different versions under one version vector; keeping the larger content hash");
                    region.replication.integrity_violation();
                    logged.push(integrity_entry(region.id(), key, incoming, &state));
                }
            }
            if current.state.as_ref() == Some(&state) {
                continue; // replays: nothing new
            }
            // Only a record that has (or had, within this batch) concurrent versions needs its
            // collection's strategy; the common single-version apply skips decoding the policy.
            let strategy = if state.versions.len() > 1 || !detected.is_empty() {
                region.policy_of(&key.0, current.policy.as_ref()).strategy()
            } else {
                Strategy::Lww
            };
            // The resolver runs in the worker, after this commits: no module runs under the
            // apply's locks. Until then readers keep the view they had, marked pending.
            let resolution = match &strategy {
                Strategy::Resolver(name) if state.versions.len() > 1 => {
                    let before = current.visible_state();
                    let previous = before.as_deref().and_then(|before| {
                        materialized_view(before, &strategy, current.resolution.as_ref())
                            .as_outcome()
                    });
                    left_to_resolve = true;
                    Some(Resolution::pending(name, previous))
                }
                _ => None,
            };
            merged.push(Merged {
                key,
                rev: current.rev,
                state,
                resolution,
                strategy,
                detected,
            });
        }
        let writes: Vec<MergedWrite> = merged
            .iter()
            .map(|m| MergedWrite {
                key: m.key,
                rev: m.rev,
                state: &m.state,
                resolution: m.resolution.as_ref(),
            })
            .collect();
        let raced = tx.store_all(&writes).await?;
        todo = Vec::new();
        for m in &merged {
            if raced.contains(m.key) {
                todo.push(m.key);
                continue;
            }
            region.forget_cached(&m.key.0, &m.key.1);
            records_changed += 1;
            for found in &m.detected {
                logged.push(conflict_entry(region.id(), m.key, found, &m.strategy));
            }
            if !m.detected.is_empty() {
                *conflicts_by_strategy
                    .entry(strategy_label(&m.strategy))
                    .or_insert(0) += m.detected.len();
                conflicts += m.detected.len();
            }
        }
        if !raced.is_empty() {
            // Local writes created these records after the lock: merge into what they wrote.
            let again = tx.lock(&raced, None).await?;
            loaded.extend(again);
        }
    }
    tx.log_conflicts(&logged).await?;
    let mut highest_sent: BTreeMap<&str, i64> = BTreeMap::new();
    for id in sent_as {
        let highest = highest_sent
            .entry(id.actor.as_str())
            .or_insert(id.outbox_id);
        *highest = (*highest).max(id.outbox_id);
    }
    let position = (!sequences.is_empty()).then_some(StreamPosition {
        origin,
        sequences,
        newest_hlc: newest.as_u64(),
        highest_sent,
        heartbeat,
    });
    tx.commit(position).await?;
    let mut resolution_inputs_changed = modules_arrived;
    for (collection, key) in &keys {
        if collection == POLICY_COLLECTION {
            region.forget_cached_policy(key);
        }
        if collection == RESOLVER_COLLECTION {
            region.resolvers.forget_binding(key);
        }
        if collection == DELETION_COLLECTION {
            region.deletion_applied(key);
        }
        if collection == REGIONS_COLLECTION {
            region.members.changed.notify_one();
        }
        resolution_inputs_changed |=
            collection == POLICY_COLLECTION || collection == RESOLVER_COLLECTION;
    }
    if resolution_inputs_changed {
        region.resolvers.changed.notify_one();
    }
    if left_to_resolve {
        region.resolvers.left_to_resolve.notify_one();
    }
    Ok(Applied {
        events: changes.len(),
        conflicts,
        conflicts_by_strategy,
        records_changed,
        stream_sequence: sequences.iter().copied().max().unwrap_or(0),
        lag_ms: (!events.is_empty()).then(|| wall_clock_ms().saturating_sub(newest.millis())),
    })
}

/// A conflict-log entry. Under a resolver its outcome is pending: the worker fills it in once the
/// resolver has run on the versions ([`crate::resolve::worker`]).
fn conflict_entry(
    region: &str,
    key: &RecordKey,
    state: &RecordState,
    strategy: &Strategy,
) -> ConflictEntry {
    let (outcome, resolver) = match strategy {
        Strategy::Resolver(name) => (pending_outcome(), Some(json!({ "name": name }))),
        _ => (
            materialized_view(state, strategy, None).logged_outcome(),
            None,
        ),
    };
    ConflictEntry {
        collection: key.0.clone(),
        key: key.1.clone(),
        region: region.to_owned(),
        strategy: strategy_label(strategy).to_owned(),
        versions: serde_json::to_value(&state.versions).expect("versions serialize"),
        outcome,
        resolver,
        error: None,
    }
}

/// A conflict-log entry for two versions under one vector: both, and which one every region keeps.
fn integrity_entry(
    region: &str,
    key: &RecordKey,
    incoming: &crate::record::Version,
    state: &RecordState,
) -> ConflictEntry {
    let kept = state
        .versions
        .iter()
        .find(|v| v.vector == incoming.vector)
        .cloned();
    ConflictEntry {
        collection: key.0.clone(),
        key: key.1.clone(),
        region: region.to_owned(),
        strategy: "integrity".to_owned(),
        versions: json!([incoming, kept]),
        outcome: json!({ "kept": kept }),
        resolver: None,
        error: Some(
            "two different versions under one version vector (a reused counter); every region keeps the one with the larger content hash"
                .to_owned(),
        ),
    }
}

fn strategy_label(strategy: &Strategy) -> &'static str {
    match strategy {
        Strategy::Lww => "lww",
        Strategy::Siblings => "siblings",
        Strategy::Resolver(_) => "resolver",
    }
}

/// What an operator's retry of a dead letter did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryOutcome {
    /// Merged at last; the dead letter is gone.
    Applied,
    /// Failed again, with this error; the dead letter stays, its attempts counted.
    StillFails(String),
}

/// Apply a dead letter's payload again: an event through the replicated-event apply, a record
/// through repair's merge. `None` if there is no such dead letter.
pub async fn retry_dead_letter(
    region: &Region,
    id: i64,
) -> Result<Option<RetryOutcome>, StorageError> {
    let Some(held) = region.store.dead_letter_payload(id).await? else {
        return Ok(None);
    };
    let letter = &held.letter;
    let origin = letter.origin.as_str();
    let attempt = match (letter.stream_sequence, &letter.collection, &letter.key) {
        (None, Some(collection), Some(key)) => {
            match serde_json::from_slice::<RecordState>(&held.payload) {
                Ok(state) => {
                    super::repair::merge_states(region, origin, collection, &[(key.clone(), state)])
                        .await
                        .map(|_| ())
                }
                Err(error) => Err(StorageError::Corrupt(error.to_string())),
            }
        }
        _ => match Change::decode(&held.payload) {
            Ok(change) => apply_with_retries(region, origin, &[change], &[], &[])
                .await
                .map(|_| ()),
            Err(error) => Err(StorageError::Corrupt(format!("unreadable event: {error}"))),
        },
    };
    match attempt {
        Ok(()) => {
            region.store.discard_dead_letter(id).await?;
            if let (None, Some(collection), Some(key)) =
                (letter.stream_sequence, &letter.collection, &letter.key)
            {
                // The peer's whole state is merged: it covers the record's events set aside
                // from that peer too.
                region
                    .store
                    .clear_dead_letters(origin, collection, std::slice::from_ref(key))
                    .await?;
            }
            tracing::info!(region = region.id(), id, %origin, "dead letter applied on retry");
            Ok(Some(RetryOutcome::Applied))
        }
        Err(error @ StorageError::Unavailable(_)) => Err(error),
        Err(error) => {
            let error = error.to_string();
            region.store.dead_letter_failed_again(id, &error).await?;
            Ok(Some(RetryOutcome::StillFails(error)))
        }
    }
}
