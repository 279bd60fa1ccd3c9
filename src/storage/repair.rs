//! What anti-entropy reads: per-bucket digests of a collection, the `(key, hash)` lists of a
//! bucket, and the states of chosen records. All of it rides the `(collection, bucket, key)
//! INCLUDE (hash)` index, so comparing regions reads no record bodies until a difference is found.
//!
//! Digests are computed by scanning that index, not kept as records change. Keeping them was
//! measured on a 2-core machine: statement triggers appending per-bucket deltas (no hot row,
//! folded each second) cut a round over a million records in sync from about 0.4 s to 0.08–0.12 s
//! and repaired 1% of them at 14,400–20,500 records/s instead of 11,000–14,700, but cost 10% of
//! the PUTs per second at 8 clients and 14% at 32 (alternated runs of `locus bench writes`), 19%
//! with the deltas packed one row per statement. The triggers run inside the group commit's
//! statement, which every write of the batch waits for; writes are what a region does all day,
//! a repair is rare.

use futures_util::TryStreamExt;
use serde_json::value::RawValue;
use sqlx::types::Json;
use sqlx::Row;

use super::records::corrupt;
use super::{StorageError, Store};
use crate::clock::hlc::Hlc;
use crate::record::digest::{bucket_of, state_hash, BucketDigest, StateHash};
use crate::record::RecordState;

impl Store {
    /// Every non-empty bucket of `collection`, in bucket order.
    pub async fn bucket_digests(
        &self,
        collection: &str,
    ) -> Result<Vec<BucketDigest>, StorageError> {
        digests_as_read(self.pool(), collection).try_collect().await
    }

    /// Every non-empty bucket of `collection`, in bucket order, in pieces of `piece` digests
    /// sent as the scan yields them (a task of its own reads them), so a peer answers while its
    /// scan runs. The scan stops once the receiver is dropped; an error ends the pieces.
    pub fn bucket_digests_in_pieces(
        &self,
        collection: &str,
        piece: usize,
    ) -> tokio::sync::mpsc::Receiver<Result<Vec<BucketDigest>, StorageError>> {
        let (pieces, received) = tokio::sync::mpsc::channel(2);
        let (pool, collection) = (self.pool().clone(), collection.to_owned());
        tokio::spawn(async move {
            let mut digests = std::pin::pin!(digests_as_read(&pool, &collection));
            let mut gathered = Vec::with_capacity(piece);
            loop {
                match digests.try_next().await {
                    Ok(Some(digest)) => {
                        gathered.push(digest);
                        if gathered.len() < piece {
                            continue;
                        }
                    }
                    Ok(None) => {
                        if !gathered.is_empty() {
                            let _ = pieces.send(Ok(gathered)).await;
                        }
                        return;
                    }
                    Err(error) => {
                        let _ = pieces.send(Err(error)).await;
                        return;
                    }
                }
                let full = std::mem::replace(&mut gathered, Vec::with_capacity(piece));
                if pieces.send(Ok(full)).await.is_err() {
                    return; // the asker is gone
                }
            }
        });
        received
    }

    /// Up to `limit` `(bucket, key, hash)` triples of the chosen `buckets`, in `(bucket, key)`
    /// order, after `after`: one page of a listing that spans several buckets, so a round that
    /// finds many buckets differing pays per page, not per bucket. Callers choose buckets holding
    /// about a page together (the statement sorts the chosen buckets' rows). No row comparison
    /// on `(bucket, key)`: with a set of buckets, PostgreSQL cannot use it as an index bound and
    /// scans the whole collection.
    pub async fn bucket_hashes(
        &self,
        collection: &str,
        buckets: &[i32],
        after: Option<&HashCursor>,
        limit: i64,
    ) -> Result<Vec<BucketHash>, StorageError> {
        let mut rest = buckets.to_vec();
        rest.sort_unstable();
        rest.dedup();
        let mut page = Vec::new();
        if let Some(cursor) = after {
            if rest.binary_search(&cursor.bucket).is_ok() {
                let rows: Vec<(String, i64, i64)> = sqlx::query_as(
                    "SELECT key, hash_hi, hash_lo FROM records
                      WHERE collection = $1 AND bucket = $2 AND key > $3 ORDER BY key LIMIT $4",
                )
                .bind(collection)
                .bind(cursor.bucket)
                .bind(&cursor.key)
                .bind(limit)
                .fetch_all(self.pool())
                .await?;
                page.extend(
                    rows.into_iter()
                        .map(|(key, hi, lo)| BucketHash::from_row((cursor.bucket, key, hi, lo))),
                );
            }
            rest.retain(|bucket| *bucket > cursor.bucket);
        }
        if (page.len() as i64) < limit && !rest.is_empty() {
            let rows: Vec<(i32, String, i64, i64)> = sqlx::query_as(
                "SELECT bucket, key, hash_hi, hash_lo FROM records
                  WHERE collection = $1 AND bucket = ANY($2)
                  ORDER BY bucket, key LIMIT $3",
            )
            .bind(collection)
            .bind(&rest)
            .bind(limit - page.len() as i64)
            .fetch_all(self.pool())
            .await?;
            page.extend(rows.into_iter().map(BucketHash::from_row));
        }
        Ok(page)
    }

    /// Compare a page of a peer's listing (`theirs`, in `(bucket, key)` order, following the
    /// page that ended at `after`) with this region's rows of the page's buckets: a merge join
    /// (whole buckets: a row comparison bound would not narrow the index scan), streamed.
    /// Returns the peer's entries whose hash here differs or that are missing here, and the keys
    /// held here that the peer's listing passed over (after the page's last entry too when it
    /// is the listing's `last_page`).
    pub async fn compare_page(
        &self,
        collection: &str,
        theirs: &[BucketHash],
        after: Option<&HashCursor>,
        last_page: bool,
    ) -> Result<PageComparison, StorageError> {
        let mut comparison = PageComparison::default();
        // The bucket the previous page ended in, too: its rows past that page's last entry are
        // compared with this page.
        let mut buckets: Vec<i32> = after
            .map(|after| after.bucket)
            .into_iter()
            .chain(theirs.iter().map(|entry| entry.bucket))
            .collect();
        buckets.dedup(); // in bucket order already
        if buckets.is_empty() {
            return Ok(comparison);
        }
        let mut ours = sqlx::query_as::<_, (i32, String, i64, i64)>(
            "SELECT bucket, key, hash_hi, hash_lo FROM records
              WHERE collection = $1 AND bucket = ANY($2)
              ORDER BY bucket, key",
        )
        .bind(collection)
        .bind(&buckets)
        .fetch(self.pool());
        // Rows at or before `after` were compared with the previous page.
        let unlisted = |row: &BucketHash| {
            after.is_none_or(|after| {
                (row.bucket, row.key.as_str()) > (after.bucket, after.key.as_str())
            })
        };
        let mut here: Option<BucketHash> = ours.try_next().await?.map(BucketHash::from_row);
        for entry in theirs {
            // Advance our side to the first row at or past the peer's entry.
            while let Some(row) = here.take() {
                if (row.bucket, row.key.as_str()) >= (entry.bucket, entry.key.as_str()) {
                    here = Some(row);
                    break;
                }
                if unlisted(&row) {
                    comparison.ours_only.push(row.key);
                }
                here = ours.try_next().await?.map(BucketHash::from_row);
            }
            let matched = here
                .as_ref()
                .filter(|row| row.bucket == entry.bucket && row.key == entry.key);
            if matched.is_none_or(|row| row.hash != entry.hash) {
                comparison.differing.push(entry.clone());
            }
            if matched.is_some() {
                here = ours.try_next().await?.map(BucketHash::from_row);
            }
        }
        if last_page {
            // What is left here past the listing's last entry, the peer does not hold.
            let last = theirs.last().map(|last| (last.bucket, last.key.as_str()));
            while let Some(row) = here.take() {
                if last.is_none_or(|last| (row.bucket, row.key.as_str()) > last) && unlisted(&row) {
                    comparison.ours_only.push(row.key);
                }
                here = ours.try_next().await?.map(BucketHash::from_row);
            }
        }
        Ok(comparison)
    }

    /// Delete the rows of `keys` whose every version is at or below `horizon`: records a peer no
    /// longer holds although every region applied all they hold (their tombstone was reclaimed
    /// there, or their collection's deletion purged them). What a region restored from an old
    /// backup brings back. Returns how many.
    pub async fn prune_reclaimed(
        &self,
        collection: &str,
        keys: &[String],
        horizon: Hlc,
    ) -> Result<u64, StorageError> {
        let mut tx = self.begin_apply().await?;
        let sql = format!(
            "DELETE FROM records
              WHERE collection = $1 AND key = ANY($2) AND {} <= $3::numeric",
            super::deletions::MAX_HLC
        );
        let done = sqlx::query(&sql)
            .bind(collection)
            .bind(keys)
            .bind(horizon.as_u64().to_string())
            .execute(&mut **tx.transaction())
            .await?;
        tx.commit(None).await?;
        Ok(done.rows_affected())
    }

    /// The stored states of `keys` of `collection` (absent keys are left out), in key order,
    /// stopping once about `byte_limit` bytes of state are gathered (at least one is returned).
    /// Passed on as stored, undecoded: the peer that asked parses them, and sizing them by the
    /// bytes received spares PostgreSQL a second rendering of each state as text.
    pub async fn states_of(
        &self,
        collection: &str,
        keys: &[String],
        byte_limit: usize,
    ) -> Result<Vec<(String, Box<RawValue>)>, StorageError> {
        let rows = sqlx::query_as(
            "SELECT key, state FROM records WHERE collection = $1 AND key = ANY($2) ORDER BY key",
        )
        .bind(collection)
        .bind(keys)
        .fetch(self.pool());
        Ok(up_to(rows, byte_limit).await?.0)
    }

    /// A page of `collection`'s stored states in key order, after `after` (from the first when
    /// empty): at most `limit` records, stopping once about `byte_limit` bytes of state are
    /// gathered (at least one is returned); and whether the page reaches the collection's end.
    /// What a region that holds nothing of a collection copies it with: one range scan of the
    /// primary key per page, instead of comparing digests and looking records up by key.
    pub async fn states_after(
        &self,
        collection: &str,
        after: &str,
        limit: i64,
        byte_limit: usize,
    ) -> Result<(Vec<(String, Box<RawValue>)>, bool), StorageError> {
        // The function's plan is fixed (see its migration); a plain query's depends on statistics.
        let rows = sqlx::query_as("SELECT key, state FROM states_after($1, $2, $3)")
            .bind(collection)
            .bind(after)
            .bind(limit)
            .fetch(self.pool());
        let (states, all_rows) = up_to(rows, byte_limit).await?;
        let last = all_rows && (states.len() as i64) < limit;
        Ok((states, last))
    }

    /// The stored states of the records of `collection` whose bucket and hash are one of
    /// `wanted`'s pairs, in `(bucket, key)` order, stopping once about `byte_limit` bytes of state
    /// are gathered (at least one is returned); and whether every match was returned. The keys
    /// are found first from the `(collection, bucket, key) INCLUDE (hash)` index alone, then only
    /// their rows are read: matching the hash on the rows read every row of the bucket (16 in a
    /// million records), and took 32–76 ms instead of 8–9 ms for 1,000 buckets.
    pub async fn states_by_hash(
        &self,
        collection: &str,
        wanted: &[(i32, StateHash)],
        byte_limit: usize,
    ) -> Result<(Vec<(String, Box<RawValue>)>, bool), StorageError> {
        let buckets: Vec<i32> = wanted.iter().map(|(bucket, _)| *bucket).collect();
        let his: Vec<i64> = wanted.iter().map(|(_, hash)| hash.hi).collect();
        let los: Vec<i64> = wanted.iter().map(|(_, hash)| hash.lo).collect();
        let rows = sqlx::query_as(
            "SELECT key, state FROM records
              WHERE collection = $1 AND key IN (
                    SELECT r.key
                      FROM unnest($2::int4[], $3::int8[], $4::int8[]) AS w(bucket, hi, lo)
                      JOIN records r ON r.collection = $1 AND r.bucket = w.bucket
                                    AND r.hash_hi = w.hi AND r.hash_lo = w.lo)
              ORDER BY bucket, key",
        )
        .bind(collection)
        .bind(&buckets)
        .bind(&his)
        .bind(&los)
        .fetch(self.pool());
        up_to(rows, byte_limit).await
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

/// The digests of `collection`'s buckets, in bucket order, as the index scan finds them.
fn digests_as_read<'a>(
    pool: &'a sqlx::PgPool,
    collection: &'a str,
) -> impl futures_util::Stream<Item = Result<BucketDigest, StorageError>> + Send + 'a {
    sqlx::query_as::<_, (i32, i64, i64, i64)>(
        "SELECT bucket, count(*), bit_xor(hash_hi), bit_xor(hash_lo)
           FROM records WHERE collection = $1 GROUP BY bucket ORDER BY bucket",
    )
    .bind(collection)
    .fetch(pool)
    .map_ok(|(bucket, count, hi, lo)| BucketDigest {
        bucket,
        count,
        hash: StateHash { hi, lo },
    })
    .map_err(StorageError::from)
}

/// The `(key, state)` rows of `rows` until about `byte_limit` bytes of state are gathered (at
/// least one), and whether that was all of them.
async fn up_to(
    mut rows: impl futures_util::Stream<Item = Result<(String, Json<Box<RawValue>>), sqlx::Error>>
        + Unpin,
    byte_limit: usize,
) -> Result<(Vec<(String, Box<RawValue>)>, bool), StorageError> {
    let mut states = Vec::new();
    let mut bytes = 0usize;
    while let Some((key, Json(state))) = rows.try_next().await? {
        let size = state.get().len();
        if !states.is_empty() && bytes + size > byte_limit {
            return Ok((states, false));
        }
        bytes += size;
        states.push((key, state));
    }
    Ok((states, true))
}

/// Where a listing of `(bucket, key)` pairs stands: the last pair of the previous page.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct HashCursor {
    pub bucket: i32,
    pub key: String,
}

/// What comparing one page of a peer's listing found ([`Store::compare_page`]).
#[derive(Debug, Default)]
pub struct PageComparison {
    /// The peer's entries that differ here or are missing here.
    pub differing: Vec<BucketHash>,
    /// Keys held here that the peer does not hold.
    pub ours_only: Vec<String>,
}

/// One record's place and hash, as anti-entropy lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketHash {
    pub bucket: i32,
    pub key: String,
    pub hash: StateHash,
}

impl BucketHash {
    fn from_row((bucket, key, hi, lo): (i32, String, i64, i64)) -> BucketHash {
        BucketHash {
            bucket,
            key,
            hash: StateHash { hi, lo },
        }
    }
}
