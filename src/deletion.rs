//! Deleting a collection, and the worker that purges what a deletion removed.
//!
//! Why a horizon instead of a tombstone per record: `DELETE /v1/collections/{c}` writes one record
//! of the system collection [`DELETION_COLLECTION`], replicated like a policy. Its HLC is the
//! deletion's horizon: every version of the collection stamped at or below it is gone, in every
//! region. A write concurrent with the deletion therefore has one outcome everywhere (it survives
//! if and only if its HLC is above the horizon), and since a version's HLC exceeds that of every
//! version it supersedes, leaving those versions out commutes with the merge: regions that see the
//! marker before or after a late event end in the same state (`RecordState::after_horizon`,
//! property-tested). Issuing it costs one write however large the collection is.
//!
//! Reads, listings, writes and applies ignore removed versions at once; this worker then frees
//! the space, region by region: it deletes the rows whose every version is removed and rewrites
//! the few that also hold later versions, so the stored state (and the anti-entropy hash) is what
//! every region sees. A record written again after the deletion starts afresh: its vector entry
//! above the region's outbox sequence and its home epoch above the old ones, so a region still
//! holding the old record never takes the new one for superseded.
//!
//! Tombstones of deleted records go the same way once every region has applied them. Heartbeats
//! carry each region's view (how far it has applied every origin), so each region knows a time
//! below which every write is applied everywhere ([`applied_everywhere_through`]). A tombstone
//! below it can no longer be needed: every region holds it or what superseded it, and no region
//! can still receive a version it superseded. Each region then raises its reclamation horizon and
//! deletes those rows, and a record created again starts afresh as after a collection deletion.
//! A region restored from an old backup may hold records whose tombstones went everywhere else:
//! while it catches up it deletes what a peer lacks and every region had applied, and its peers
//! pull nothing that old from it meanwhile ([`crate::replication::repair`]).
//!
//! Applies keep every version that arrives, however old: absence cannot tell a reclaimed record
//! from one a region lost, and repair must bring back what was lost. A region that is copying the
//! deployment's data (a new one) neither reclaims nor sends its view until the copy is complete.
//!
//! Local writes do not take the apply lock, so a write racing the marker's arrival can store a
//! removed version after a pass; passes therefore go on for [`SETTLE`] after the horizon, then the
//! deletion counts as purged in this process (a restart purges once more).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::hlc::{wall_clock_ms, Hlc};
use crate::clock::staleness::applied_everywhere_through;
use crate::record::policy::DELETION_COLLECTION;
use crate::service::Region;
use crate::storage::StorageError;

/// Rows deleted per statement: short transactions, so writes and applies are not held up.
const PURGE_BATCH: i64 = 2_000;
/// How long after its horizon a deletion is purged again, for writes that raced its arrival.
const SETTLE: Duration = Duration::from_secs(120);
/// Passes run at least this often while a deletion is settling.
const PASS_EVERY: Duration = Duration::from_secs(10);
/// How long a write's idempotency key is honoured; each pass of this worker forgets older ones
/// (the same kind of chore: rows that served their purpose).
const IDEMPOTENCY_KEYS_KEPT: Duration = Duration::from_secs(24 * 60 * 60);

/// Purge every deleted collection, whenever a deletion is written or applied here and every
/// [`PASS_EVERY`] until each has settled.
pub async fn run(region: Arc<Region>) {
    let mut settled: BTreeMap<String, Hlc> = BTreeMap::new();
    // Tombstones are reclaimed every `reclaim_interval_ms`, however often the purge passes run
    // (a deletion wakes them): the setting says how long a tombstone every region applied stays.
    let reclaim_every = Duration::from_millis(region.config.replication.reclaim_interval_ms);
    let mut reclaimed_at: Option<std::time::Instant> = None;
    loop {
        match pass(&region, &mut settled).await {
            Ok(()) => {}
            Err(error) => {
                tracing::warn!(%error, "purge of deleted collections failed; trying again")
            }
        }
        if reclaimed_at.is_none_or(|at| at.elapsed() >= reclaim_every) {
            // A failed reclaim is tried again on the next pass, not a whole interval later.
            match reclaim_tombstones(&region).await {
                Ok(_) => reclaimed_at = Some(std::time::Instant::now()),
                Err(error) => {
                    tracing::warn!(%error, "reclaiming tombstones failed; trying again")
                }
            }
        }
        match region
            .store
            .forget_idempotency_keys(IDEMPOTENCY_KEYS_KEPT)
            .await
        {
            Ok(0) => {}
            Ok(forgotten) => tracing::debug!(forgotten, "idempotency keys forgotten"),
            Err(error) => {
                tracing::warn!(%error, "forgetting old idempotency keys failed; trying again")
            }
        }
        let every = PASS_EVERY.min(Duration::from_millis(
            region.config.replication.reclaim_interval_ms,
        ));
        tokio::select! {
            _ = region.purge_wanted.notified() => {}
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Remove the tombstones every region has applied; returns how many.
pub async fn reclaim_tombstones(region: &Region) -> Result<u64, StorageError> {
    if region.is_bootstrapping() || !region.catching_up().is_empty() {
        return Ok(0); // what it has applied is not all it holds yet
    }
    let (_, own_view) = region.applied_through().await?;
    let mut views = region.replication.peer_views();
    views.insert(region.id().to_owned(), own_view);
    let peers = region.members.peers();
    let members: Vec<&str> = std::iter::once(region.id())
        .chain(peers.iter().map(|peer| peer.id.as_str()))
        .collect();
    let Some(through_ms) = applied_everywhere_through(&members, &views) else {
        return Ok(0);
    };
    // Every write stamped below `through_ms` is applied everywhere: the horizon is the greatest
    // HLC below it.
    let horizon = Hlc::from_parts(through_ms.saturating_sub(1), u16::MAX);
    let mut reclaimed = 0;
    loop {
        let n = region
            .store
            .reclaim_tombstones(horizon, PURGE_BATCH)
            .await?;
        reclaimed += n;
        if n < PURGE_BATCH as u64 {
            break;
        }
    }
    region
        .replication
        .tombstones_reclaimed(through_ms, reclaimed);
    if reclaimed > 0 {
        tracing::debug!(
            reclaimed,
            through_ms,
            "reclaimed tombstones every region has applied"
        );
    }
    Ok(reclaimed)
}

async fn pass(region: &Region, settled: &mut BTreeMap<String, Hlc>) -> Result<(), StorageError> {
    for (collection, marker) in region.store.list_all(DELETION_COLLECTION).await? {
        let Some(horizon) = marker.max_hlc() else {
            continue;
        };
        if settled.get(&collection) == Some(&horizon) {
            continue;
        }
        let (deleted, rewritten) = purge(region, &collection, horizon).await?;
        region.replication.purged(deleted + rewritten);
        if deleted + rewritten > 0 {
            tracing::info!(%collection, %horizon, deleted, rewritten, "purged what the collection's deletion removed");
        }
        let settle_ms = SETTLE.as_millis() as u64;
        if wall_clock_ms() > horizon.millis() + settle_ms {
            settled.insert(collection, horizon);
        }
    }
    Ok(())
}

/// Remove what the deletion of `collection` at `horizon` removed from this region's rows.
pub async fn purge(
    region: &Region,
    collection: &str,
    horizon: Hlc,
) -> Result<(u64, u64), StorageError> {
    let mut deleted = 0;
    loop {
        let n = region
            .store
            .purge_deleted(collection, horizon, PURGE_BATCH)
            .await?;
        deleted += n;
        if n < PURGE_BATCH as u64 {
            break;
        }
    }
    let mut rewritten = 0;
    loop {
        let rows = region
            .store
            .straddling(collection, horizon, PURGE_BATCH)
            .await?;
        let full = rows.len() as i64 == PURGE_BATCH;
        let mut progress = false;
        for (key, rev, state) in rows {
            // A writer or an apply that changed the row since wrote what it saw, which already
            // left the removed versions out.
            if region
                .store
                .replace_state(collection, &key, rev, &state.after_horizon(horizon))
                .await?
            {
                region.forget_cached(collection, &key);
                rewritten += 1;
                progress = true;
            }
        }
        if !full || !progress {
            break;
        }
    }
    if rewritten > 0 {
        region.resolvers.changed.notify_one();
    }
    Ok((deleted, rewritten))
}
