//! Applying a batch of remote events in one transaction: lock the touched records in key order (two
//! batches locking in opposite orders would deadlock), let the caller merge, write what changed, log
//! conflicts, and advance the origin's applied position, all committed together. Stream batches run
//! one at a time; repair merges, which record no position, run beside each other
//! ([`Store::begin_merge`]).

use std::collections::BTreeMap;

use sqlx::types::Json;
use sqlx::{Postgres, Row, Transaction};

use super::records::{decode_resolution, Loaded};
use super::{StorageError, Store};
use crate::clock::ranges::RangeSet;
use crate::record::digest::{bucket_of, state_hash};
use crate::record::policy::{DELETION_COLLECTION, POLICY_COLLECTION};
use crate::record::resolution::Resolution;
use crate::record::RecordState;

/// The advisory lock key that serializes a region's apply transactions.
pub const APPLY_LOCK: i64 = 0x6c6f_6375_7361_7070; // "locusapp"

/// A record's key.
pub type RecordKey = (String, String);

/// One conflict-log entry, as stored.
#[derive(Debug, Clone)]
pub struct ConflictEntry {
    pub collection: String,
    pub key: String,
    pub region: String,
    pub strategy: String,
    pub versions: serde_json::Value,
    pub outcome: serde_json::Value,
    /// `{"name","sha256"}` under the `resolver` strategy.
    pub resolver: Option<serde_json::Value>,
    pub error: Option<String>,
}

pub struct ApplyTx {
    tx: Transaction<'static, Postgres>,
    /// An origin's applied ranges, read by [`ApplyTx::lock`] under the exclusive apply lock (so
    /// they cannot change before the commit) and merged with the batch's sequences there.
    ranges: Option<(String, RangeSet)>,
}

/// The advisory lock key of the write floor ("locusflr"), the one `write_floor_ms()` takes shared.
const WRITE_FLOOR_LOCK: i64 = 0x6c6f_6375_7366_6c72;

impl Store {
    /// Begin an apply transaction. Applies of one region run one at a time (an advisory lock held
    /// until commit, so across processes too): a stream batch also rewrites its origin's applied
    /// ranges and position, and prunes and purges must not run beside the batches whose rows they
    /// judge.
    pub async fn begin_apply(&self) -> Result<ApplyTx, StorageError> {
        self.begin_with_apply_lock("SELECT pg_advisory_xact_lock($1)")
            .await
    }

    /// Begin a merge transaction that touches records alone (a repair round's merge, a dead
    /// letter retried): it takes the apply lock shared, so such merges run beside each other
    /// (a repair round keeps several in flight) but never beside a stream batch, a prune or a
    /// purge. They cannot deadlock one another: each locks the records that exist in key order,
    /// then inserts the new ones in key order, and a transaction waiting at the second step waits
    /// only for a key another inserted, which that one took in the same order. (A record created
    /// by a local write between the two steps is locked after them; a cycle through it is found by
    /// PostgreSQL and the merge runs again.)
    pub async fn begin_merge(&self) -> Result<ApplyTx, StorageError> {
        self.begin_with_apply_lock("SELECT pg_advisory_xact_lock_shared($1)")
            .await
    }

    /// Not one round trip with `BEGIN` (sqlx's `begin_with`): should the lock fail or the task be
    /// cancelled while it waits, sqlx would not roll that transaction back, and the connection
    /// would go back to the pool inside it, holding the lock or aborted. Here the transaction
    /// exists before the lock is asked for, and dropping it rolls it back.
    async fn begin_with_apply_lock(&self, lock: &str) -> Result<ApplyTx, StorageError> {
        let mut tx = self.pool().begin().await?;
        sqlx::query(lock).bind(APPLY_LOCK).execute(&mut *tx).await?;
        Ok(ApplyTx { tx, ranges: None })
    }

    /// The sequences of `origin`'s stream applied here.
    pub async fn applied_ranges(&self, origin: &str) -> Result<RangeSet, StorageError> {
        let rows: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT first_seq, last_seq FROM applied_ranges WHERE origin = $1 ORDER BY first_seq",
        )
        .bind(origin)
        .fetch_all(self.pool())
        .await?;
        Ok(RangeSet::from_ranges(
            rows.into_iter().map(|(a, b)| (a as u64, b as u64)),
        ))
    }

    /// Per origin, the sequence through which every event of its stream was applied here (or
    /// covered by a repair round or a first copy), with no hole below it: what a new region
    /// copying from this one may take as held by the copy.
    pub async fn applied_prefixes(&self) -> Result<BTreeMap<String, u64>, StorageError> {
        // Ranges are disjoint and apart, so the one starting at 1 is the whole prefix.
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT origin, last_seq FROM applied_ranges WHERE first_seq = 1")
                .fetch_all(self.pool())
                .await?;
        Ok(rows
            .into_iter()
            .map(|(origin, last)| (origin, last.max(0) as u64))
            .collect())
    }

    /// Mark `ranges` of `origin`'s stream as covered: a repair round brought over what their
    /// events carried.
    pub async fn cover_ranges(
        &self,
        origin: &str,
        ranges: &[(u64, u64)],
    ) -> Result<(), StorageError> {
        let mut tx = self.begin_apply().await?;
        let mut set = load_ranges(&mut tx.tx, origin).await?;
        for &(first, last) in ranges {
            set.insert(first, last);
        }
        save_ranges(&mut tx.tx, origin, &set).await?;
        tx.tx.commit().await?;
        Ok(())
    }

    /// Forget every range of `origin`: its stream was recreated and numbers its events anew.
    pub async fn reset_ranges(&self, origin: &str) -> Result<(), StorageError> {
        let mut tx = self.begin_apply().await?;
        save_ranges(&mut tx.tx, origin, &RangeSet::new()).await?;
        sqlx::query("UPDATE applied_positions SET stream_sequence = 0 WHERE origin = $1")
            .bind(origin)
            .execute(&mut *tx.tx)
            .await?;
        tx.tx.commit().await?;
        Ok(())
    }
}

async fn load_ranges(
    tx: &mut Transaction<'static, Postgres>,
    origin: &str,
) -> Result<RangeSet, StorageError> {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT first_seq, last_seq FROM applied_ranges WHERE origin = $1 ORDER BY first_seq",
    )
    .bind(origin)
    .fetch_all(&mut **tx)
    .await?;
    Ok(RangeSet::from_ranges(
        rows.into_iter().map(|(a, b)| (a as u64, b as u64)),
    ))
}

/// The CTEs that replace `origin`'s ranges (`$1`) with those starting at `$2` and ending at `$3`:
/// rows of other starts go, the others are written or updated. They touch disjoint rows, so one
/// statement does both.
macro_rules! replace_ranges {
    () => {
        "gone AS (DELETE FROM applied_ranges WHERE origin = $1 AND first_seq <> ALL($2::bigint[])),
         kept AS (INSERT INTO applied_ranges (origin, first_seq, last_seq)
                  SELECT $1, * FROM unnest($2::bigint[], $3::bigint[])
                  ON CONFLICT (origin, first_seq) DO UPDATE SET last_seq = EXCLUDED.last_seq)"
    };
}

/// The starts and ends of a range set's ranges, for [`replace_ranges`].
fn range_bounds(set: &RangeSet) -> (Vec<i64>, Vec<i64>) {
    set.ranges()
        .iter()
        .map(|&(a, b)| (a as i64, b as i64))
        .unzip()
}

async fn save_ranges(
    tx: &mut Transaction<'static, Postgres>,
    origin: &str,
    set: &RangeSet,
) -> Result<(), StorageError> {
    let (firsts, lasts) = range_bounds(set);
    sqlx::query(concat!("WITH ", replace_ranges!(), " SELECT 1"))
        .bind(origin)
        .bind(&firsts)
        .bind(&lasts)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// One record's merged state, to be written by [`ApplyTx::store_all`].
#[derive(Debug, Clone, Copy)]
pub struct MergedWrite<'a> {
    pub key: &'a RecordKey,
    /// The revision locked; 0 when the record did not exist.
    pub rev: i64,
    pub state: &'a RecordState,
    pub resolution: Option<&'a Resolution>,
}

/// Where a batch from a stream stands: recorded with the batch.
#[derive(Debug, Clone)]
pub struct StreamPosition<'a> {
    pub origin: &'a str,
    /// The stream sequences of the batch's events.
    pub sequences: &'a [u64],
    /// The HLC of the newest event in the batch.
    pub newest_hlc: u64,
    /// Per actor, the highest outbox id in the batch's message ids.
    pub highest_sent: BTreeMap<&'a str, i64>,
    /// The batch's newest heartbeat: `(stream sequence, through_ms)`.
    pub heartbeat: Option<(u64, u64)>,
}

impl ApplyTx {
    pub(super) fn transaction(&mut self) -> &mut Transaction<'static, Postgres> {
        &mut self.tx
    }

    /// Lock and load `keys` (sorted, so every batch locks in the same order), with each
    /// collection's policy record and deletion horizon, and, for a batch from `stream_of`'s stream,
    /// that origin's applied ranges, all in one statement. Absent records have no row to lock:
    /// their creation serializes on the primary key in [`ApplyTx::store_all`].
    pub async fn lock(
        &mut self,
        keys: &[RecordKey],
        stream_of: Option<&str>,
    ) -> Result<BTreeMap<RecordKey, Loaded>, StorageError> {
        let mut sorted: Vec<&RecordKey> = keys.iter().collect();
        sorted.sort_unstable();
        let collections: Vec<&str> = sorted.iter().map(|(c, _)| c.as_str()).collect();
        let names: Vec<&str> = sorted.iter().map(|(_, k)| k.as_str()).collect();
        // The keys are sorted, so their collections are too.
        let mut distinct: Vec<&str> = collections.clone();
        distinct.dedup();
        // Part 0: the records, locked row by row in the keys' order (byte order, as the "C"
        // collation sorts; the first branch runs to its end before the next starts): a lateral
        // lookup by primary key cannot become a scan of the whole table, which a join against
        // the array could in a plan cached while the table was small. Part 1: the policy and
        // deletion records of their collections. Part 2: the origin's applied ranges.
        let rows = sqlx::query(
            "SELECT 0 AS part, r.collection, r.key, r.rev, r.state, r.resolution,
                    NULL::bigint AS first_seq, NULL::bigint AS last_seq
               FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS k(collection, key, n)
              CROSS JOIN LATERAL (
                    SELECT * FROM records r WHERE r.collection = k.collection AND r.key = k.key
                       FOR UPDATE) r
             UNION ALL
             SELECT 1, collection, key, NULL, state, NULL, NULL, NULL FROM records
              WHERE collection = ANY($3) AND key = ANY($4)
             UNION ALL
             SELECT 2, NULL, NULL, NULL, NULL, NULL, first_seq, last_seq FROM applied_ranges
              WHERE origin = $5",
        )
        .bind(&collections)
        .bind(&names)
        .bind([POLICY_COLLECTION, DELETION_COLLECTION])
        .bind(&distinct)
        .bind(stream_of)
        .fetch_all(&mut *self.tx)
        .await?;
        let mut found = BTreeMap::new();
        let mut policies = BTreeMap::new();
        let mut deletions = BTreeMap::new();
        let mut ranges = Vec::new();
        for row in rows {
            match row.try_get::<i32, _>("part")? {
                0 => {
                    let key: RecordKey = (row.try_get("collection")?, row.try_get("key")?);
                    let Json(state): Json<RecordState> = row.try_get("state")?;
                    let resolution = decode_resolution(row.try_get("resolution")?);
                    found.insert(key, (row.try_get::<i64, _>("rev")?, state, resolution));
                }
                1 => {
                    let Json(state): Json<RecordState> = row.try_get("state")?;
                    let key: String = row.try_get("key")?;
                    if row.try_get::<String, _>("collection")? == POLICY_COLLECTION {
                        policies.insert(key, state);
                    } else {
                        deletions.insert(key, state);
                    }
                }
                _ => ranges.push((
                    row.try_get::<i64, _>("first_seq")? as u64,
                    row.try_get::<i64, _>("last_seq")? as u64,
                )),
            }
        }
        if let Some(origin) = stream_of {
            self.ranges = Some((origin.to_owned(), RangeSet::from_ranges(ranges)));
        }
        Ok(keys
            .iter()
            .map(|key| {
                let (rev, state, resolution) = match found.remove(key) {
                    Some((rev, state, resolution)) => (rev, Some(state), resolution),
                    None => (0, None, None),
                };
                let collection_deleted_before =
                    super::records::deletion_horizon(deletions.get(&key.0).cloned());
                // Applies keep every version that arrives for a record without a row, old or
                // not: a record a region lost comes back by repair, whatever its age.
                let loaded = Loaded {
                    deleted_before: collection_deleted_before,
                    collection_deleted_before,
                    state,
                    rev,
                    policy: policies.get(&key.0).cloned(),
                    resolution,
                };
                (key.clone(), loaded)
            })
            .collect())
    }

    /// Write the merged states of a batch: one statement for the records new here and one for
    /// those that changed, whatever the batch's size. Returns the keys that could not be written:
    /// a local write created the record after the lock (the caller merges into it and tries again).
    pub async fn store_all(
        &mut self,
        writes: &[MergedWrite<'_>],
    ) -> Result<Vec<RecordKey>, StorageError> {
        let mut written: std::collections::BTreeSet<RecordKey> = std::collections::BTreeSet::new();
        for new in [true, false] {
            let part: Vec<&MergedWrite> = writes.iter().filter(|w| (w.rev == 0) == new).collect();
            if part.is_empty() {
                continue;
            }
            let collections: Vec<&str> = part.iter().map(|w| w.key.0.as_str()).collect();
            let keys: Vec<&str> = part.iter().map(|w| w.key.1.as_str()).collect();
            let states: Vec<Json<&RecordState>> = part.iter().map(|w| Json(w.state)).collect();
            let resolutions: Vec<Option<Json<&Resolution>>> =
                part.iter().map(|w| w.resolution.map(Json)).collect();
            let buckets: Vec<i32> = part.iter().map(|w| bucket_of(&w.key.1)).collect();
            let hashes: Vec<_> = part.iter().map(|w| state_hash(w.state)).collect();
            let his: Vec<i64> = hashes.iter().map(|h| h.hi).collect();
            let los: Vec<i64> = hashes.iter().map(|h| h.lo).collect();
            let sql = if new {
                "INSERT INTO records (collection, key, rev, state, resolution, bucket, hash_hi, hash_lo)
                 SELECT c, k, 1, s, r, b, h, l
                   FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::jsonb[], $5::int[], $6::bigint[], $7::bigint[])
                     AS u(c, k, s, r, b, h, l)
                 ON CONFLICT (collection, key) DO NOTHING
                 RETURNING collection, key"
            } else {
                "UPDATE records SET rev = records.rev + 1, state = u.s, resolution = u.r, updated_at = now(),
                        bucket = u.b, hash_hi = u.h, hash_lo = u.l
                   FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::jsonb[], $5::int[], $6::bigint[], $7::bigint[])
                     AS u(c, k, s, r, b, h, l)
                  WHERE records.collection = u.c AND records.key = u.k
                 RETURNING records.collection, records.key"
            };
            let rows: Vec<(String, String)> = sqlx::query_as(sql)
                .bind(&collections)
                .bind(&keys)
                .bind(&states)
                .bind(&resolutions)
                .bind(&buckets)
                .bind(&his)
                .bind(&los)
                .fetch_all(&mut *self.tx)
                .await?;
            written.extend(rows);
        }
        Ok(writes
            .iter()
            .filter(|w| !written.contains(w.key))
            .map(|w| w.key.clone())
            .collect())
    }

    /// Log a batch's conflict entries in one statement, ids in the order given: a batch full of
    /// conflicts (a late region catching up, a partition healing) pays one round trip under the
    /// apply lock for all of them rather than one each.
    pub async fn log_conflicts(&mut self, entries: &[ConflictEntry]) -> Result<(), StorageError> {
        if entries.is_empty() {
            return Ok(());
        }
        let collections: Vec<&str> = entries.iter().map(|e| e.collection.as_str()).collect();
        let keys: Vec<&str> = entries.iter().map(|e| e.key.as_str()).collect();
        let regions: Vec<&str> = entries.iter().map(|e| e.region.as_str()).collect();
        let strategies: Vec<&str> = entries.iter().map(|e| e.strategy.as_str()).collect();
        let versions: Vec<Json<&serde_json::Value>> =
            entries.iter().map(|e| Json(&e.versions)).collect();
        let outcomes: Vec<Json<&serde_json::Value>> =
            entries.iter().map(|e| Json(&e.outcome)).collect();
        let errors: Vec<Option<&str>> = entries.iter().map(|e| e.error.as_deref()).collect();
        let resolvers: Vec<Option<Json<&serde_json::Value>>> = entries
            .iter()
            .map(|e| e.resolver.as_ref().map(Json))
            .collect();
        sqlx::query(
            "INSERT INTO conflicts (collection, key, region, strategy, versions, outcome, error, resolver)
             SELECT c, k, r, s, v, o, e, x
               FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[],
                           $7::text[], $8::jsonb[]) WITH ORDINALITY AS u(c, k, r, s, v, o, e, x, n)
              ORDER BY n",
        )
        .bind(&collections)
        .bind(&keys)
        .bind(&regions)
        .bind(&strategies)
        .bind(&versions)
        .bind(&outcomes)
        .bind(&errors)
        .bind(&resolvers)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Commit the batch and, for a batch from a stream, its position, together.
    pub async fn commit(
        mut self,
        position: Option<StreamPosition<'_>>,
    ) -> Result<(), StorageError> {
        let Some(position) = position else {
            self.tx.commit().await?;
            return Ok(());
        };
        let (origin, last_event_hlc) = (position.origin, position.newest_hlc);
        let stream_sequence = position.sequences.iter().copied().max().unwrap_or(0) as i64;
        // The ranges are few (usually one) and applies are serialized by the apply lock: read
        // (by the lock, for a batch from this origin's stream), merge, write.
        let mut ranges = match self.ranges.take() {
            Some((read_for, ranges)) if read_for == origin => ranges,
            _ => load_ranges(&mut self.tx, origin).await?,
        };
        ranges.insert_all(position.sequences.iter().copied());
        // A heartbeat's promise holds here only once every event before it is applied; batches
        // of a shared consumer commit in any order, so one may come before an earlier one. Then
        // the next heartbeat makes the promise.
        let applied_through = position
            .heartbeat
            .filter(|&(sequence, _)| ranges.holes_below(sequence).is_empty())
            .map(|(_, through_ms)| through_ms as i64);
        let (firsts, lasts) = range_bounds(&ranges);
        let (actors, ids): (Vec<&str>, Vec<i64>) = position.highest_sent.into_iter().unzip();
        // The ranges, the position and the actors seen in one statement: every round trip of an
        // apply holds the apply lock, and adds to replication lag.
        sqlx::query(concat!(
            "WITH ",
            replace_ranges!(),
            ",
             position AS (
                 INSERT INTO applied_positions (origin, stream_sequence, last_event_hlc, applied_through_ms)
                 VALUES ($1, $4, $5, $6)
                 ON CONFLICT (origin) DO UPDATE SET stream_sequence = GREATEST(applied_positions.stream_sequence, EXCLUDED.stream_sequence),
                     last_event_hlc = EXCLUDED.last_event_hlc, applied_at = now(),
                     applied_through_ms = GREATEST(applied_positions.applied_through_ms, EXCLUDED.applied_through_ms)),
             actors AS (
                 INSERT INTO actors_seen (actor, highest_outbox_id)
                 SELECT * FROM unnest($7::text[], $8::bigint[])
                 ON CONFLICT (actor) DO UPDATE
                   SET highest_outbox_id = GREATEST(actors_seen.highest_outbox_id, EXCLUDED.highest_outbox_id))
             SELECT 1"
        ))
        .bind(origin)
        .bind(&firsts)
        .bind(&lasts)
        .bind(stream_sequence)
        .bind(last_event_hlc as i64)
        .bind(applied_through)
        .bind(&actors)
        .bind(&ids)
        .execute(&mut *self.tx)
        .await?;
        self.tx.commit().await?;
        Ok(())
    }
}

/// The start of a query of the conflict log as [`LoggedConflict`] reads it; the caller adds the
/// conditions and the order.
macro_rules! select_logged_conflicts {
    () => {
        "SELECT id, collection, key, region,
                to_char(detected_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS detected_at,
                strategy, resolver, versions, outcome, error
           FROM conflicts "
    };
}

/// What the resolution worker made of a pending conflict-log entry.
#[derive(Debug, Clone)]
pub struct SettledConflict {
    pub id: i64,
    pub outcome: serde_json::Value,
    /// `{"name", "sha256"}` of the resolver that ran.
    pub resolver: serde_json::Value,
    pub error: Option<String>,
}

/// A conflict-log entry as listed (and as the API shows it).
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct LoggedConflict {
    pub id: i64,
    pub collection: String,
    pub key: String,
    /// The region that detected it.
    pub region: String,
    pub detected_at: String,
    pub strategy: String,
    #[schema(value_type = Option<Object>)]
    pub resolver: Option<serde_json::Value>,
    /// The concurrent versions kept.
    #[schema(value_type = Vec<Object>)]
    pub versions: serde_json::Value,
    /// What a reader saw: `{"value":…}`, `{"deleted":true}` or `{"siblings":n}`; under a
    /// resolver, `{"pending":true}` until the resolution worker has run it on these versions, and
    /// `{"unresolved":true}` (with `error`) if the entry's logged versions could no longer be
    /// decoded when it came to run it (a damaged row: the record's own view is resolved apart).
    #[schema(value_type = Object)]
    pub outcome: serde_json::Value,
    pub error: Option<String>,
}

impl Store {
    /// Per origin, the newest heartbeat promise applied here (milliseconds since the epoch):
    /// every write that origin made with an HLC below it is applied.
    pub async fn applied_through(&self) -> Result<BTreeMap<String, u64>, StorageError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT origin, applied_through_ms FROM applied_positions WHERE applied_through_ms IS NOT NULL",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(origin, ms)| (origin, ms.max(0) as u64))
            .collect())
    }

    /// Raise the write floor to `through_ms` (never lower it): from the commit on, no write with
    /// an HLC below it can commit, and every write that read an older floor has committed. The
    /// publisher's half of a heartbeat's promise (`migrations/0010_heartbeats.sql`). Gives up
    /// after `wait` rather than hold back the writes queued behind it.
    pub async fn raise_write_floor(
        &self,
        through_ms: u64,
        wait: std::time::Duration,
    ) -> Result<(), StorageError> {
        // Begun before the timeout and the lock are asked for, never with them in one `BEGIN`
        // statement: a lock that times out would leave the pooled connection in an aborted
        // transaction ([`Store::begin_apply`]'s helper says why).
        let mut tx = self.pool().begin().await?;
        sqlx::query(&format!(
            "SET LOCAL lock_timeout = {}",
            wait.as_millis().max(1)
        ))
        .execute(&mut *tx)
        .await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(WRITE_FLOOR_LOCK)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE write_floor SET through_ms = GREATEST(through_ms, $1)")
            .bind(through_ms as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Conflict-log entries after id `after`, oldest first, optionally for one collection or key.
    pub async fn conflicts(
        &self,
        collection: Option<&str>,
        key: Option<&str>,
        after: i64,
        limit: i64,
    ) -> Result<Vec<LoggedConflict>, StorageError> {
        Ok(sqlx::query_as(concat!(
            select_logged_conflicts!(),
            "WHERE id > $1 AND ($2::text IS NULL OR collection = $2) AND ($3::text IS NULL OR key = $3)
              ORDER BY id LIMIT $4"
        ))
        .bind(after)
        .bind(collection)
        .bind(key)
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }

    /// Conflict-log entries whose resolver has not given their outcome yet, oldest first, after id
    /// `after`. A partial index (`migrations/0013`) holds exactly these.
    pub async fn conflicts_left_to_resolve(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<LoggedConflict>, StorageError> {
        Ok(sqlx::query_as(concat!(
            select_logged_conflicts!(),
            "WHERE outcome ? 'pending' AND id > $1
              ORDER BY id LIMIT $2"
        ))
        .bind(after)
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }

    /// Fill in pending conflict-log entries: each one's outcome (still `{"pending": true}` after a
    /// transient failure, with the failure as its error), and the resolver and module that ran.
    pub async fn settle_conflicts(&self, settled: &[SettledConflict]) -> Result<(), StorageError> {
        if settled.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = settled.iter().map(|s| s.id).collect();
        let outcomes: Vec<&serde_json::Value> = settled.iter().map(|s| &s.outcome).collect();
        let resolvers: Vec<&serde_json::Value> = settled.iter().map(|s| &s.resolver).collect();
        let errors: Vec<Option<&str>> = settled.iter().map(|s| s.error.as_deref()).collect();
        sqlx::query(
            "UPDATE conflicts SET outcome = u.outcome, resolver = u.resolver, error = u.error
               FROM unnest($1::bigint[], $2::jsonb[], $3::jsonb[], $4::text[])
                    AS u(id, outcome, resolver, error)
              WHERE conflicts.id = u.id",
        )
        .bind(&ids)
        .bind(&outcomes)
        .bind(&resolvers)
        .bind(&errors)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The id of the newest conflict-log entry of one record, if any.
    pub async fn latest_conflict_id(
        &self,
        collection: &str,
        key: &str,
    ) -> Result<Option<i64>, StorageError> {
        Ok(
            sqlx::query_scalar("SELECT max(id) FROM conflicts WHERE collection = $1 AND key = $2")
                .bind(collection)
                .bind(key)
                .fetch_one(self.pool())
                .await?,
        )
    }

    /// The newest `limit` conflict-log entries of a collection, newest first.
    pub async fn recent_conflicts(
        &self,
        collection: &str,
        limit: i64,
    ) -> Result<Vec<LoggedConflict>, StorageError> {
        Ok(sqlx::query_as(concat!(
            select_logged_conflicts!(),
            "WHERE collection = $1
              ORDER BY id DESC LIMIT $2"
        ))
        .bind(collection)
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }
}
