//! Records, their policies and the outbox: load a record with its collection's policy in one
//! statement, and commit a new state together with its outbox event in another.

use serde_json::value::RawValue;
use sqlx::types::Json;
use sqlx::{PgConnection, PgExecutor, PgPool, Row};

use super::StorageError;

use std::borrow::Cow;

use crate::clock::hlc::Hlc;
use crate::record::digest::{bucket_of, state_hash, StateHash};
use crate::record::policy::{DELETION_COLLECTION, POLICY_COLLECTION};
use crate::record::resolution::Resolution;
use crate::record::{visible_record, RecordState};

/// The stored state of a record, the revision it was read at, and its collection's policy record.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub state: Option<RecordState>,
    /// 0 when the record has no row yet.
    pub rev: i64,
    pub policy: Option<RecordState>,
    /// The resolver's materialised view of the record's concurrent versions, if any.
    pub resolution: Option<Resolution>,
    /// The horizon below which this record's versions are gone ([`record_horizon`]): its
    /// collection's deletion (whether or not the purge has removed them from this row yet) or,
    /// for a record without a row, the reclamation of tombstones.
    pub deleted_before: Option<Hlc>,
    /// The horizon of the collection's deletion alone, if it was ever deleted.
    pub collection_deleted_before: Option<Hlc>,
}

impl Loaded {
    /// The record as writers see it: without what a deletion of its collection removed, and
    /// `None` when nothing is left ([`RecordState::visible`]).
    pub fn visible_state(&self) -> Option<Cow<'_, RecordState>> {
        self.state.as_ref()?.visible(self.deleted_before)
    }

    /// The record and its resolution as readers see them ([`visible_record`]).
    pub fn into_visible(self) -> (Option<RecordState>, Option<Resolution>) {
        match self.state {
            Some(state) => visible_record(state, self.resolution, self.deleted_before),
            None => (None, None),
        }
    }
}

/// A deletion marker's horizon: the greatest HLC among its versions.
pub(super) fn deletion_horizon(marker: Option<RecordState>) -> Option<Hlc> {
    marker.and_then(|state| state.max_hlc())
}

/// The horizon a local write judges one record by: its collection's deletion horizon and, for a
/// record of a user collection without a row here, the region's tombstone reclamation horizon
/// too. Such a record may be one whose tombstone was reclaimed here but is still held elsewhere:
/// a write that creates it takes the same precautions as after a collection deletion (a counter
/// floor, a newer home epoch), so a region still holding the tombstone never takes the new
/// version for an older one (`migrations/0012_tombstone_reclamation.sql`).
pub(super) fn record_horizon(
    collection: &str,
    has_row: bool,
    deletion: Option<Hlc>,
    reclaimed: Option<Hlc>,
) -> Option<Hlc> {
    let reclaimed = reclaimed
        .filter(|_| !has_row && !collection.starts_with(crate::record::policy::SYSTEM_PREFIX));
    deletion.max(reclaimed)
}

#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
}

fn decode_state(value: Option<Json<RecordState>>) -> Option<RecordState> {
    value.map(|Json(state)| state)
}

/// A stored resolution that no longer decodes is only a stale view: it is recomputed, so it is
/// dropped with a warning rather than failing the read.
pub(super) fn decode_resolution(value: Option<serde_json::Value>) -> Option<Resolution> {
    let value = value?;
    serde_json::from_value(value)
        .map_err(|error| tracing::warn!(%error, "stored resolution does not decode; ignored"))
        .ok()
}

impl Store {
    pub(super) fn new(pool: PgPool) -> Store {
        Store { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A cheap round trip, for readiness.
    pub async fn ping(&self) -> Result<(), StorageError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn load(&self, collection: &str, key: &str) -> Result<Loaded, StorageError> {
        load(&self.pool, collection, key).await
    }

    /// Commit a write's state and its outbox event if the record is still at the write's
    /// `expected_rev` (0: still absent) and the event's HLC is not below the write floor. Nothing
    /// is written otherwise. Concurrent writes go through [`super::group_commit`] instead.
    pub async fn save(&self, write: &RecordWrite) -> Result<Saved, StorageError> {
        save(&self.pool, write).await
    }

    /// Take the record's row lock in a transaction and load it: the path of a writer that lost
    /// races, since lock waiters are served in order and so cannot starve.
    pub async fn lock(&self, collection: &str, key: &str) -> Result<LockedRecord, StorageError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT 1 FROM records WHERE collection = $1 AND key = $2 FOR UPDATE")
            .bind(collection)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        // A new statement takes a new snapshot, so this sees what the previous lock holder committed.
        let loaded = load(&mut *tx, collection, key).await?;
        Ok(LockedRecord { tx, loaded })
    }

    /// Up to `limit` records of `collection` in key order, after `after`, within `[from, until)`.
    pub async fn list(
        &self,
        collection: &str,
        after: Option<&str>,
        from: &str,
        until: Option<&str>,
        limit: i64,
    ) -> Result<Vec<(String, RecordState, Option<Resolution>)>, StorageError> {
        let rows = sqlx::query(
            "SELECT key, state, resolution FROM records
              WHERE collection = $1 AND key > $2 AND key >= $3 AND ($4::text IS NULL OR key < $4)
              ORDER BY key LIMIT $5",
        )
        .bind(collection)
        .bind(after.unwrap_or(""))
        .bind(from)
        .bind(until)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                let key: String = row.try_get("key")?;
                let Json(state): Json<RecordState> = row.try_get("state").map_err(corrupt)?;
                Ok((key, state, decode_resolution(row.try_get("resolution")?)))
            })
            .collect()
    }

    /// Every row of `collection`, in key order: for the small system collections (policies,
    /// resolver bindings), read page by page.
    pub async fn list_all(
        &self,
        collection: &str,
    ) -> Result<Vec<(String, RecordState)>, StorageError> {
        const PAGE: i64 = 500;
        let mut all = Vec::new();
        loop {
            let after = all
                .last()
                .map(|(key, _): &(String, RecordState)| key.clone());
            let page = self
                .list(collection, after.as_deref(), "", None, PAGE)
                .await?;
            let done = page.len() < PAGE as usize;
            all.extend(page.into_iter().map(|(key, state, _)| (key, state)));
            if done {
                return Ok(all);
            }
        }
    }

    /// Every collection that holds at least one row, system collections included, in name order.
    /// A loose index scan: one index probe per collection, not a scan of every record.
    /// Up to `limit` records homed in `region`, user collections only (system collections are
    /// writable everywhere and have no home to move), in `(collection, key)` order after `after`.
    pub async fn homed_in(
        &self,
        region: &str,
        after: Option<&(String, String)>,
        limit: i64,
    ) -> Result<Vec<(String, String)>, StorageError> {
        let (collection, key) = after.cloned().unwrap_or_default();
        Ok(sqlx::query_as(
            "SELECT collection, key FROM records
              WHERE (collection, key) > ($2, $3) AND collection NOT LIKE '\\_%'
                AND state->'home'->>'region' = $1
              ORDER BY collection, key LIMIT $4",
        )
        .bind(region)
        .bind(collection)
        .bind(key)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn collections_with_records(&self) -> Result<Vec<String>, StorageError> {
        let names = sqlx::query_scalar(
            "WITH RECURSIVE names AS (
                 (SELECT collection FROM records ORDER BY collection LIMIT 1)
                 UNION ALL
                 SELECT (SELECT r.collection FROM records r WHERE r.collection > names.collection
                          ORDER BY r.collection LIMIT 1)
                   FROM names WHERE names.collection IS NOT NULL)
             SELECT collection FROM names WHERE collection IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(names)
    }

    /// Whether a collection holds any row.
    pub async fn collection_has_records(&self, collection: &str) -> Result<bool, StorageError> {
        let found: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM records WHERE collection = $1)")
                .bind(collection)
                .fetch_one(&self.pool)
                .await?;
        Ok(found)
    }

    /// How many outbox rows wait to be published.
    pub async fn outbox_backlog(&self) -> Result<i64, StorageError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&self.pool)
            .await?)
    }
}

/// A record whose row lock is held until [`LockedRecord::save`] commits or the value is dropped.
pub struct LockedRecord {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    pub loaded: Loaded,
}

impl LockedRecord {
    pub async fn save(
        mut self,
        collection: &str,
        key: &str,
        state: &RecordState,
        event: &OutboxEvent<'_>,
        idempotent: Option<&IdempotentWrite<'_>>,
    ) -> Result<Saved, StorageError> {
        let write = RecordWrite::new(collection, key, self.loaded.rev, state, event, idempotent);
        let saved = save(&mut *self.tx, &write).await?;
        if saved == Saved::Yes {
            self.tx.commit().await?;
        }
        Ok(saved)
    }
}

async fn load<'e>(
    executor: impl PgExecutor<'e>,
    collection: &str,
    key: &str,
) -> Result<Loaded, StorageError> {
    let row = sqlx::query(
        "SELECT r.rev, r.state, r.resolution, p.state AS policy, d.state AS deletion, t.reclaimed
           FROM (SELECT 1) AS one
           LEFT JOIN records r ON r.collection = $1 AND r.key = $2
           LEFT JOIN records p ON p.collection = $3 AND p.key = $1
           LEFT JOIN records d ON d.collection = $4 AND d.key = $1
           LEFT JOIN (SELECT through_hlc::bigint AS reclaimed FROM reclaimed_tombstones) t ON true",
    )
    .bind(collection)
    .bind(key)
    .bind(POLICY_COLLECTION)
    .bind(DELETION_COLLECTION)
    .fetch_one(executor)
    .await?;
    let state = decode_state(row.try_get("state").map_err(corrupt)?);
    let reclaimed: Option<i64> = row.try_get("reclaimed")?;
    let collection_deleted_before =
        deletion_horizon(decode_state(row.try_get("deletion").map_err(corrupt)?));
    Ok(Loaded {
        rev: row.try_get::<Option<i64>, _>("rev")?.unwrap_or(0),
        deleted_before: record_horizon(
            collection,
            state.is_some(),
            collection_deleted_before,
            reclaimed.map(|hlc| Hlc::from_u64(hlc as u64)),
        ),
        collection_deleted_before,
        state,
        policy: decode_state(row.try_get("policy").map_err(corrupt)?),
        resolution: decode_resolution(row.try_get("resolution")?),
    })
}

/// An event for the outbox: its wire bytes and the actor that wrote it (its message id names it).
#[derive(Debug, Clone, Copy)]
pub struct OutboxEvent<'a> {
    pub bytes: &'a [u8],
    pub actor: &'a str,
    /// The physical milliseconds of the new version's HLC, checked against the write floor;
    /// `None` for an event that carries an existing version (a new home), which no heartbeat
    /// promise is about.
    pub hlc_ms: Option<u64>,
}

/// A write made under an `Idempotency-Key`: remembered with the write, in its statement.
#[derive(Debug, Clone, Copy)]
pub struct IdempotentWrite<'a> {
    pub key: &'a str,
    pub fingerprint: &'a str,
    pub created: bool,
    pub failover: bool,
    /// The write's session token, encoded.
    pub session: &'a str,
}

/// A write ready for the database: everything [`Store::save`] binds, owned and encoded once, so
/// that it can wait for a group commit ([`super::group_commit`]) on another task.
#[derive(Debug)]
pub struct RecordWrite {
    pub collection: String,
    pub key: String,
    /// The revision the write builds on; 0 when the record has no row.
    pub expected_rev: i64,
    pub(super) state: Box<RawValue>,
    pub(super) bucket: i32,
    pub(super) hash: StateHash,
    pub(super) event: Vec<u8>,
    pub(super) actor: String,
    pub(super) hlc_ms: Option<u64>,
    pub idempotent: Option<OwnedIdempotentWrite>,
}

/// An [`IdempotentWrite`] that owns its strings.
#[derive(Debug)]
pub struct OwnedIdempotentWrite {
    pub key: String,
    pub fingerprint: String,
    pub created: bool,
    pub failover: bool,
    pub session: String,
}

impl RecordWrite {
    pub fn new(
        collection: &str,
        key: &str,
        expected_rev: i64,
        state: &RecordState,
        event: &OutboxEvent<'_>,
        idempotent: Option<&IdempotentWrite<'_>>,
    ) -> RecordWrite {
        RecordWrite {
            collection: collection.to_owned(),
            key: key.to_owned(),
            expected_rev,
            state: serde_json::value::to_raw_value(state).expect("a record state always encodes"),
            bucket: bucket_of(key),
            hash: state_hash(state),
            event: event.bytes.to_vec(),
            actor: event.actor.to_owned(),
            hlc_ms: event.hlc_ms,
            idempotent: idempotent.map(|i| OwnedIdempotentWrite {
                key: i.key.to_owned(),
                fingerprint: i.fingerprint.to_owned(),
                created: i.created,
                failover: i.failover,
                session: i.session.to_owned(),
            }),
        }
    }

    /// What became of this write, given whether the statement wrote it and the floor it saw.
    fn outcome(&self, written: bool, floor_ms: i64) -> Saved {
        match self.hlc_ms {
            _ if written => Saved::Yes,
            Some(ms) if (ms as i64) < floor_ms => Saved::BelowFloor(floor_ms as u64),
            _ => Saved::Raced,
        }
    }
}

/// What became of a save.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    Yes,
    /// The row changed since it was read: read again and retry.
    Raced,
    /// The write's HLC is below the write floor (milliseconds) a heartbeat has promised past
    /// (see `migrations/0010_heartbeats.sql`): stamp a newer HLC and retry.
    BelowFloor(u64),
    /// Another write under the same idempotency key got there first: answer with its outcome.
    KeyTaken,
}

pub(super) async fn save<'e>(
    executor: impl PgExecutor<'e>,
    write: &RecordWrite,
) -> Result<Saved, StorageError> {
    // `floor` runs once per statement, before `written` (which reads it).
    let sql = if write.expected_rev == 0 {
        "WITH floor AS (SELECT write_floor_ms() AS ms),
         written AS (
             INSERT INTO records (collection, key, rev, state, bucket, hash_hi, hash_lo)
             SELECT $1, $2, 1, $3, $6, $7, $8 FROM floor WHERE $10::bigint IS NULL OR $10 >= floor.ms
             ON CONFLICT (collection, key) DO NOTHING
             RETURNING 1),
         queued AS (INSERT INTO outbox (event, actor) SELECT $4, $9 FROM written),
         remembered AS (INSERT INTO idempotent_writes (idempotency_key, fingerprint, created, failover, state, session)
             SELECT $11, $12, $13, $14, $3, $15 FROM written WHERE $11::text IS NOT NULL)
         SELECT (SELECT count(*) FROM written WHERE $5::bigint = 0), (SELECT ms FROM floor)"
    } else {
        "WITH floor AS (SELECT write_floor_ms() AS ms),
         written AS (
             UPDATE records SET rev = rev + 1, state = $3, updated_at = now(),
                    resolution = CASE WHEN jsonb_array_length($3::jsonb -> 'versions') > 1 THEN resolution END,
                    bucket = $6, hash_hi = $7, hash_lo = $8
               FROM floor
              WHERE collection = $1 AND key = $2 AND rev = $5
                AND ($10::bigint IS NULL OR $10 >= floor.ms)
             RETURNING 1),
         queued AS (INSERT INTO outbox (event, actor) SELECT $4, $9 FROM written),
         remembered AS (INSERT INTO idempotent_writes (idempotency_key, fingerprint, created, failover, state, session)
             SELECT $11, $12, $13, $14, $3, $15 FROM written WHERE $11::text IS NOT NULL)
         SELECT (SELECT count(*) FROM written), (SELECT ms FROM floor)"
    };
    let idempotent = write.idempotent.as_ref();
    let saved = sqlx::query_as::<_, (i64, i64)>(sql)
        .bind(&write.collection)
        .bind(&write.key)
        .bind(Json(write.state.as_ref()))
        .bind(&write.event)
        .bind(write.expected_rev)
        .bind(write.bucket)
        .bind(write.hash.hi)
        .bind(write.hash.lo)
        .bind(&write.actor)
        .bind(write.hlc_ms.map(|ms| ms as i64))
        .bind(idempotent.map(|i| i.key.as_str()))
        .bind(idempotent.map(|i| i.fingerprint.as_str()))
        .bind(idempotent.map(|i| i.created))
        .bind(idempotent.map(|i| i.failover))
        .bind(idempotent.map(|i| i.session.as_str()))
        .fetch_one(executor)
        .await;
    let (written, floor_ms) = match saved {
        Err(sqlx::Error::Database(error))
            if error.constraint() == Some("idempotent_writes_pkey") =>
        {
            return Ok(Saved::KeyTaken)
        }
        other => other?,
    };
    Ok(write.outcome(written == 1, floor_ms))
}

/// Commit several writes in one statement ([`super::group_commit`]): each under its own
/// compare-and-swap and floor check, rows locked in `(collection, key)` order, outbox events
/// queued in batch order. The writes must name distinct records and distinct idempotency keys.
/// An error (another request took one of the idempotency keys) writes nothing.
pub async fn save_batch(
    connection: &mut PgConnection,
    writes: &[RecordWrite],
) -> Result<Vec<Saved>, StorageError> {
    // `locked` takes the row locks of the records that exist, in key order (the lock is taken
    // above the sort), before `updated` changes them; `updated` checks each revision against
    // the newest committed row, as a single UPDATE does.
    //
    // No step joins two of the batch's row sets by nested loop: the plan is generic, and it
    // takes the batch for ten rows, so such a join would compare every write with every other
    // (a batch of 128 updates took 11 to 15 ms instead of 2.4 to 4.3). `locked` carries what
    // `updated` needs and `updated` finds each row by its primary key; the inserted keys are
    // matched through a hashed subplan (`IS TRUE` keeps the planner from turning the `IN` into
    // a join).
    let sql = "WITH floor AS (SELECT write_floor_ms() AS ms),
             batch AS (
                 SELECT * FROM unnest($1::int[], $2::text[], $3::text[], $4::bigint[], $5::jsonb[],
                                      $6::int[], $7::bigint[], $8::bigint[], $9::bytea[], $10::text[],
                                      $11::bigint[], $12::text[], $13::text[], $14::bool[], $15::bool[],
                                      $16::text[])
                     AS b(ord, collection, key, expected_rev, state, bucket, hash_hi, hash_lo, event,
                          actor, hlc_ms, idempotency_key, fingerprint, created, failover, session)),
             admitted AS (
                 SELECT batch.* FROM batch, floor WHERE batch.hlc_ms IS NULL OR batch.hlc_ms >= floor.ms),
             locked AS (
                 SELECT r.collection, r.key, a.ord, a.expected_rev, a.state, a.bucket, a.hash_hi, a.hash_lo
                   FROM records r
                   JOIN admitted a ON a.collection = r.collection AND a.key = r.key AND a.expected_rev > 0
                  ORDER BY r.collection, r.key
                    FOR UPDATE OF r),
             updated AS (
                 UPDATE records r SET rev = r.rev + 1, state = l.state, updated_at = now(),
                        resolution = CASE WHEN jsonb_array_length(l.state -> 'versions') > 1 THEN r.resolution END,
                        bucket = l.bucket, hash_hi = l.hash_hi, hash_lo = l.hash_lo
                   FROM locked l
                  WHERE r.collection = l.collection AND r.key = l.key AND r.rev = l.expected_rev
                 RETURNING l.ord),
             inserted AS (
                 INSERT INTO records (collection, key, rev, state, bucket, hash_hi, hash_lo)
                 SELECT collection, key, 1, state, bucket, hash_hi, hash_lo FROM admitted
                  WHERE expected_rev = 0 ORDER BY collection, key
                 ON CONFLICT (collection, key) DO NOTHING
                 RETURNING collection, key),
             written AS (
                 SELECT ord FROM updated
                 UNION ALL
                 SELECT ord FROM admitted
                  WHERE expected_rev = 0
                    AND ((collection, key) IN (SELECT collection, key FROM inserted)) IS TRUE),
             queued AS (
                 INSERT INTO outbox (event, actor)
                 SELECT b.event, b.actor FROM batch b JOIN written w ON w.ord = b.ord ORDER BY b.ord),
             remembered AS (
                 INSERT INTO idempotent_writes (idempotency_key, fingerprint, created, failover, state, session)
                 SELECT b.idempotency_key, b.fingerprint, b.created, b.failover, b.state, b.session
                   FROM batch b JOIN written w ON w.ord = b.ord
                  WHERE b.idempotency_key IS NOT NULL)
             SELECT (SELECT coalesce(array_agg(ord), '{}') FROM written), (SELECT ms FROM floor)";
    let columns = super::group_commit::Columns::of(writes);
    let (written, floor_ms): (Vec<i32>, i64) = sqlx::query_as(sql)
        .bind(&columns.ord)
        .bind(&columns.collection)
        .bind(&columns.key)
        .bind(&columns.expected_rev)
        .bind(&columns.state)
        .bind(&columns.bucket)
        .bind(&columns.hash_hi)
        .bind(&columns.hash_lo)
        .bind(&columns.event)
        .bind(&columns.actor)
        .bind(&columns.hlc_ms)
        .bind(&columns.idempotency_key)
        .bind(&columns.fingerprint)
        .bind(&columns.created)
        .bind(&columns.failover)
        .bind(&columns.session)
        .fetch_one(connection)
        .await?;
    let mut outcomes: Vec<Saved> = writes
        .iter()
        .map(|write| write.outcome(false, floor_ms))
        .collect();
    for ord in written {
        outcomes[ord as usize] = Saved::Yes;
    }
    Ok(outcomes)
}

pub(super) fn corrupt(error: sqlx::Error) -> StorageError {
    match error {
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            StorageError::Corrupt(error.to_string())
        }
        other => other.into(),
    }
}

/// A write remembered under its idempotency key.
#[derive(Debug, Clone)]
pub struct RememberedWrite {
    pub fingerprint: String,
    pub created: bool,
    pub failover: bool,
    /// The record as that write left it.
    pub state: RecordState,
    pub session: String,
}

impl Store {
    /// The write made under `key`, if one was (and is not yet forgotten).
    pub async fn remembered_write(
        &self,
        key: &str,
    ) -> Result<Option<RememberedWrite>, StorageError> {
        let row: Option<(String, bool, bool, Json<RecordState>, String)> = sqlx::query_as(
            "SELECT fingerprint, created, failover, state, session FROM idempotent_writes
              WHERE idempotency_key = $1",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await
        .map_err(corrupt)?;
        Ok(row.map(
            |(fingerprint, created, failover, Json(state), session)| RememberedWrite {
                fingerprint,
                created,
                failover,
                state,
                session,
            },
        ))
    }

    /// Forget the idempotency keys of writes older than `age`; how many.
    pub async fn forget_idempotency_keys(
        &self,
        age: std::time::Duration,
    ) -> Result<u64, StorageError> {
        let done = sqlx::query(
            "DELETE FROM idempotent_writes WHERE written_at < now() - make_interval(secs => $1)",
        )
        .bind(age.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}
