//! What a collection deletion leaves to do in each region: remove the rows whose every version it
//! removed, and rewrite the few that also hold versions written after it. Reads, writes and
//! applies already ignore those versions (see [`super::Loaded::visible_state`]); purging frees
//! the space and makes the stored state, and so the anti-entropy hash, equal to what every
//! region sees.

use sqlx::types::Json;
use sqlx::Row;

use super::records::corrupt;
use super::{StorageError, Store};
use crate::clock::hlc::Hlc;
use crate::record::digest::state_hash;
use crate::record::RecordState;

/// The greatest HLC of a stored state's versions, in SQL (HLCs are decimal strings in the state).
pub(super) const MAX_HLC: &str =
    "(SELECT max((v->>'hlc')::numeric) FROM jsonb_array_elements(state->'versions') v)";
const MIN_HLC: &str =
    "(SELECT min((v->>'hlc')::numeric) FROM jsonb_array_elements(state->'versions') v)";

impl Store {
    /// Delete up to `limit` rows of `collection` whose every version is at or below `horizon`;
    /// returns how many.
    pub async fn purge_deleted(
        &self,
        collection: &str,
        horizon: Hlc,
        limit: i64,
    ) -> Result<u64, StorageError> {
        let sql = format!(
            "DELETE FROM records WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM records
                  WHERE collection = $1 AND {MAX_HLC} <= $2::numeric
                  LIMIT $3))"
        );
        let done = sqlx::query(&sql)
            .bind(collection)
            .bind(horizon.as_u64().to_string())
            .bind(limit)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected())
    }

    /// Whether `collection` holds a version written after `horizon` (the deletion left it).
    pub async fn has_records_after(
        &self,
        collection: &str,
        horizon: Hlc,
    ) -> Result<bool, StorageError> {
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM records WHERE collection = $1 AND {MAX_HLC} > $2::numeric)"
        );
        Ok(sqlx::query_scalar(&sql)
            .bind(collection)
            .bind(horizon.as_u64().to_string())
            .fetch_one(self.pool())
            .await?)
    }

    /// Up to `limit` rows of `collection` holding versions on both sides of `horizon`:
    /// `(key, rev, state)`.
    pub async fn straddling(
        &self,
        collection: &str,
        horizon: Hlc,
        limit: i64,
    ) -> Result<Vec<(String, i64, RecordState)>, StorageError> {
        let sql = format!(
            "SELECT key, rev, state FROM records
              WHERE collection = $1 AND {MIN_HLC} <= $2::numeric AND {MAX_HLC} > $2::numeric
              LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(collection)
            .bind(horizon.as_u64().to_string())
            .bind(limit)
            .fetch_all(self.pool())
            .await?;
        rows.into_iter()
            .map(|row| {
                let Json(state): Json<RecordState> = row.try_get("state").map_err(corrupt)?;
                Ok((row.try_get("key")?, row.try_get("rev")?, state))
            })
            .collect()
    }

    /// Replace a record's state if it is still at `rev` (a writer or an apply in between wrote a
    /// state of its own, which already left the removed versions out). Its materialised
    /// resolution is dropped: it was made of versions that are gone.
    pub async fn replace_state(
        &self,
        collection: &str,
        key: &str,
        rev: i64,
        state: &RecordState,
    ) -> Result<bool, StorageError> {
        let hash = state_hash(state);
        let done = sqlx::query(
            "UPDATE records SET rev = rev + 1, state = $4, resolution = NULL, updated_at = now(),
                    hash_hi = $5, hash_lo = $6
              WHERE collection = $1 AND key = $2 AND rev = $3",
        )
        .bind(collection)
        .bind(key)
        .bind(rev)
        .bind(Json(state))
        .bind(hash.hi)
        .bind(hash.lo)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The region's tombstone reclamation horizon (`migrations/0012_tombstone_reclamation.sql`).
    pub async fn reclaimed_through(&self) -> Result<Option<Hlc>, StorageError> {
        let through: Option<i64> =
            sqlx::query_scalar("SELECT through_hlc::bigint FROM reclaimed_tombstones")
                .fetch_optional(self.pool())
                .await?;
        Ok(through.map(|hlc| Hlc::from_u64(hlc as u64)))
    }

    /// Raise the reclamation horizon to `through` (never lower it) and delete up to `limit` rows
    /// of user collections whose single version is a tombstone at or below it; returns how many.
    /// One apply transaction: applies run before or after it, never between the raise and the
    /// delete, and a statement that finds a row gone also finds the horizon that made it go.
    pub async fn reclaim_tombstones(&self, through: Hlc, limit: i64) -> Result<u64, StorageError> {
        let mut tx = self.begin_apply().await?;
        let through = through.as_u64() as i64;
        sqlx::query(
            "INSERT INTO reclaimed_tombstones (through_hlc) VALUES ($1)
             ON CONFLICT (singleton) DO UPDATE
               SET through_hlc = GREATEST(reclaimed_tombstones.through_hlc, EXCLUDED.through_hlc)",
        )
        .bind(through)
        .execute(&mut **tx.transaction())
        .await?;
        let done = sqlx::query(
            "DELETE FROM records WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM records
                  WHERE tombstone_hlc <= $1 AND left(collection, 1) <> $2
                  LIMIT $3))",
        )
        .bind(through)
        .bind(crate::record::policy::SYSTEM_PREFIX.to_string())
        .bind(limit)
        .execute(&mut **tx.transaction())
        .await?;
        tx.commit(None).await?;
        Ok(done.rows_affected())
    }
}
