//! What replication set aside: events a peer's stream delivered that could not be read or
//! applied even alone, and records repair fetched but could not merge. Kept with their payload
//! and error for an operator to list, retry or discard; replication and repair go on meanwhile.
//! A record mark carries the peer state's hash, so repair skips that key until the peer's state
//! changes, rather than failing on it every round.

use std::collections::HashMap;

use sqlx::{FromRow, Row};

use super::{StorageError, Store};
use crate::record::digest::StateHash;

/// One dead letter, as listed.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize, utoipa::ToSchema)]
pub struct DeadLetter {
    pub id: i64,
    /// The region whose stream carried the event, or that repair fetched the record from.
    pub origin: String,
    /// The event's place in the origin's stream; null for a record repair could not merge.
    pub stream_sequence: Option<i64>,
    pub collection: Option<String>,
    pub key: Option<String>,
    pub error: String,
    pub attempts: i32,
    #[schema(value_type = String)]
    pub created_at: String,
}

/// A dead letter with what it set aside: an event's wire bytes, or a record's state as JSON.
#[derive(Debug, Clone)]
pub struct HeldPayload {
    pub letter: DeadLetter,
    pub payload: Vec<u8>,
}

const COLUMNS: &str = "id, origin, stream_sequence, collection, key, error, attempts, \
     to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS created_at";

impl Store {
    /// Set aside an event that cannot be read or applied.
    pub async fn dead_letter(
        &self,
        origin: &str,
        stream_sequence: u64,
        key: Option<(&str, &str)>,
        event: &[u8],
        error: &str,
    ) -> Result<(), StorageError> {
        sqlx::query(
            "INSERT INTO dead_letters (origin, stream_sequence, collection, key, event, error)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(origin)
        .bind(stream_sequence as i64)
        .bind(key.map(|(c, _)| c))
        .bind(key.map(|(_, k)| k))
        .bind(event)
        .bind(error)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Mark a record that repair fetched from `peer` but could not merge, with the peer state's
    /// hash (one mark per record and peer: a newer failure replaces the older).
    pub async fn mark_unrepairable(
        &self,
        peer: &str,
        collection: &str,
        key: &str,
        hash: StateHash,
        state: &[u8],
        error: &str,
    ) -> Result<(), StorageError> {
        let mut tx = self.pool().begin().await?;
        sqlx::query(
            "DELETE FROM dead_letters
              WHERE origin = $1 AND collection = $2 AND key = $3 AND stream_sequence IS NULL",
        )
        .bind(peer)
        .bind(collection)
        .bind(key)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO dead_letters (origin, collection, key, event, error, hash_hi, hash_lo)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(peer)
        .bind(collection)
        .bind(key)
        .bind(state)
        .bind(error)
        .bind(hash.hi)
        .bind(hash.lo)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The records of `collection` marked unrepairable from `peer`, with the hash each was
    /// marked at.
    pub async fn unrepairable(
        &self,
        peer: &str,
        collection: &str,
    ) -> Result<HashMap<String, StateHash>, StorageError> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT key, hash_hi, hash_lo FROM dead_letters
              WHERE origin = $1 AND collection = $2 AND stream_sequence IS NULL",
        )
        .bind(peer)
        .bind(collection)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(key, hi, lo)| (key, StateHash { hi, lo }))
            .collect())
    }

    /// Drop the dead letters of `keys` from `origin`: repair merged those records from it, which
    /// covers whatever their events carried.
    pub async fn clear_dead_letters(
        &self,
        origin: &str,
        collection: &str,
        keys: &[String],
    ) -> Result<(), StorageError> {
        sqlx::query(
            "DELETE FROM dead_letters WHERE origin = $1 AND collection = $2 AND key = ANY($3)",
        )
        .bind(origin)
        .bind(collection)
        .bind(keys)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Up to `limit` dead letters after id `after`, oldest first.
    pub async fn dead_letters(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, StorageError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM dead_letters WHERE id > $1 ORDER BY id LIMIT $2"
        ))
        .bind(after)
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }

    /// One dead letter with its payload.
    pub async fn dead_letter_payload(&self, id: i64) -> Result<Option<HeldPayload>, StorageError> {
        let Some(row) = sqlx::query(&format!(
            "SELECT {COLUMNS}, event FROM dead_letters WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(self.pool())
        .await?
        else {
            return Ok(None);
        };
        Ok(Some(HeldPayload {
            letter: DeadLetter::from_row(&row)?,
            payload: row.try_get("event")?,
        }))
    }

    /// A retry failed again: keep the newest error and count the attempt.
    pub async fn dead_letter_failed_again(&self, id: i64, error: &str) -> Result<(), StorageError> {
        sqlx::query("UPDATE dead_letters SET error = $2, attempts = attempts + 1 WHERE id = $1")
            .bind(id)
            .bind(error)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Forget a dead letter; false if there was none.
    pub async fn discard_dead_letter(&self, id: i64) -> Result<bool, StorageError> {
        Ok(sqlx::query("DELETE FROM dead_letters WHERE id = $1")
            .bind(id)
            .execute(self.pool())
            .await?
            .rows_affected()
            > 0)
    }

    /// How many dead letters wait for an operator.
    pub async fn dead_letter_count(&self) -> Result<i64, StorageError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM dead_letters")
            .fetch_one(self.pool())
            .await?)
    }
}
