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
//! Local writes do not take the apply lock, so a write racing the marker's arrival can store a
//! removed version after a pass; passes therefore go on for [`SETTLE`] after the horizon, then the
//! deletion counts as purged in this process (a restart purges once more).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::hlc::{wall_clock_ms, Hlc};
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
    loop {
        match pass(&region, &mut settled).await {
            Ok(()) => {}
            Err(error) => {
                tracing::warn!(%error, "purge of deleted collections failed; trying again")
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
        tokio::select! {
            _ = region.purge_wanted.notified() => {}
            _ = tokio::time::sleep(PASS_EVERY) => {}
        }
    }
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
