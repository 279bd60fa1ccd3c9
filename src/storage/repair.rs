//! What anti-entropy reads: per-bucket digests of a collection, the `(key, hash)` lists of a
//! bucket, and the states of chosen records. All of it rides the `(collection, bucket, key)
//! INCLUDE (hash)` index, so comparing regions reads no record bodies until a difference is found.

use std::collections::HashMap;

use sqlx::types::Json;
use sqlx::Row;

use super::records::corrupt;
use super::{StorageError, Store};
use crate::record::digest::{bucket_of, state_hash, StateHash};
use crate::record::RecordState;

/// The XOR of a bucket's record hashes, and how many records it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketDigest {
    pub bucket: i32,
    pub count: i64,
    pub hash: StateHash,
}

impl Store {
    /// Every non-empty bucket of `collection`, in bucket order.
    pub async fn bucket_digests(
        &self,
        collection: &str,
    ) -> Result<Vec<BucketDigest>, StorageError> {
        let rows = sqlx::query(
            "SELECT bucket, count(*) AS count, bit_xor(hash_hi) AS hi, bit_xor(hash_lo) AS lo
               FROM records WHERE collection = $1 GROUP BY bucket ORDER BY bucket",
        )
        .bind(collection)
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(BucketDigest {
                    bucket: row.try_get("bucket")?,
                    count: row.try_get("count")?,
                    hash: StateHash {
                        hi: row.try_get("hi")?,
                        lo: row.try_get("lo")?,
                    },
                })
            })
            .collect()
    }

    /// Up to `limit` `(key, hash)` pairs of one bucket, in key order, after `after`.
    pub async fn bucket_hashes(
        &self,
        collection: &str,
        bucket: i32,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<(String, StateHash)>, StorageError> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT key, hash_hi, hash_lo FROM records
              WHERE collection = $1 AND bucket = $2 AND ($3::text IS NULL OR key > $3)
              ORDER BY key LIMIT $4",
        )
        .bind(collection)
        .bind(bucket)
        .bind(after)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(keyed_hash).collect())
    }

    /// The hashes of `keys` of `collection` that exist here.
    pub async fn hashes_of(
        &self,
        collection: &str,
        keys: &[String],
    ) -> Result<HashMap<String, StateHash>, StorageError> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT key, hash_hi, hash_lo FROM records WHERE collection = $1 AND key = ANY($2)",
        )
        .bind(collection)
        .bind(keys)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(keyed_hash).collect())
    }

    /// The stored states of `keys` of `collection` (absent keys are left out), in key order,
    /// stopping once about `byte_limit` bytes of state are gathered (at least one is returned).
    pub async fn states_of(
        &self,
        collection: &str,
        keys: &[String],
        byte_limit: usize,
    ) -> Result<Vec<(String, RecordState)>, StorageError> {
        let rows = sqlx::query(
            "SELECT key, state, octet_length(state::text) AS size FROM records
              WHERE collection = $1 AND key = ANY($2) ORDER BY key",
        )
        .bind(collection)
        .bind(keys)
        .fetch_all(self.pool())
        .await?;
        let mut states = Vec::new();
        let mut bytes = 0usize;
        for row in rows {
            let size: i32 = row.try_get("size")?;
            if !states.is_empty() && bytes + size as usize > byte_limit {
                break;
            }
            bytes += size as usize;
            let Json(state): Json<RecordState> = row.try_get("state").map_err(corrupt)?;
            states.push((row.try_get("key")?, state));
        }
        Ok(states)
    }

    /// Hash the rows written before state hashes existed, a batch at a time. Returns how many.
    pub async fn backfill_state_hashes(&self) -> Result<u64, StorageError> {
        let mut total = 0;
        loop {
            let rows = sqlx::query(
                "SELECT collection, key, rev, state FROM records WHERE hash_hi IS NULL LIMIT 500",
            )
            .fetch_all(self.pool())
            .await?;
            if rows.is_empty() {
                return Ok(total);
            }
            for row in rows {
                let collection: String = row.try_get("collection")?;
                let key: String = row.try_get("key")?;
                let rev: i64 = row.try_get("rev")?;
                let Json(state): Json<RecordState> = row.try_get("state").map_err(corrupt)?;
                let hash = state_hash(&state);
                // Only if the state is still the one hashed: a write in between set its own.
                sqlx::query(
                    "UPDATE records SET bucket = $3, hash_hi = $4, hash_lo = $5
                      WHERE collection = $1 AND key = $2 AND rev = $6",
                )
                .bind(&collection)
                .bind(&key)
                .bind(bucket_of(&key))
                .bind(hash.hi)
                .bind(hash.lo)
                .bind(rev)
                .execute(self.pool())
                .await?;
                total += 1;
            }
        }
    }
}

fn keyed_hash((key, hi, lo): (String, i64, i64)) -> (String, StateHash) {
    (key, StateHash { hi, lo })
}
