//! Resolver modules (content-addressed), their chunks in transit, and the materialised
//! resolutions of records with concurrent versions.

use sqlx::types::Json;
use sqlx::Row;

use super::apply::ApplyTx;
use super::records::{corrupt, decode_resolution};
use super::{StorageError, Store};
use crate::record::resolution::Resolution;
use crate::record::RecordState;
use crate::replication::event::ModuleChunk;
use crate::resolve::module_sha256;

/// A record with concurrent versions whose resolution is missing or stale.
#[derive(Debug, Clone)]
pub struct Unresolved {
    pub collection: String,
    pub key: String,
    pub rev: i64,
    pub state: RecordState,
    pub resolution: Option<Resolution>,
}

/// A record's new resolution, for [`Store::set_resolutions`].
#[derive(Debug, Clone)]
pub struct ResolutionUpdate {
    pub collection: String,
    pub key: String,
    /// The revision the resolution was computed at.
    pub rev: i64,
    pub resolution: Option<Resolution>,
}

/// What storing one chunk did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkProgress {
    /// More chunks are still to come.
    Waiting,
    /// The chunk completed its module, which hashed right and is now stored.
    Assembled { sha256: String },
    /// The module was here already.
    AlreadyHave,
    /// Every chunk is here but the whole does not hash to the sha256 named: discarded.
    Corrupt { sha256: String },
}

impl Store {
    /// The sha256 of every module held here, in order.
    pub async fn module_hashes(&self) -> Result<Vec<String>, StorageError> {
        Ok(
            sqlx::query_scalar("SELECT sha256 FROM resolver_modules ORDER BY sha256")
                .fetch_all(self.pool())
                .await?,
        )
    }

    /// Store a whole module a repair round fetched (its hash already checked), and drop any of
    /// its chunks still waiting. Returns false when it was here already.
    pub async fn adopt_module(&self, sha256: &str, module: &[u8]) -> Result<bool, StorageError> {
        let mut tx = self.pool().begin().await?;
        let inserted = insert_module_row(&mut tx, sha256, module).await?;
        sqlx::query("DELETE FROM resolver_module_chunks WHERE sha256 = $1")
            .bind(sha256)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(inserted)
    }

    pub async fn module(&self, sha256: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(
            sqlx::query_scalar("SELECT module FROM resolver_modules WHERE sha256 = $1")
                .bind(sha256)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// Store an uploaded module and queue its chunk events (written by `actor`), in one transaction. Returns false
    /// when the module was here already (then its chunks went out, or came in, before).
    pub async fn insert_module(
        &self,
        sha256: &str,
        module: &[u8],
        chunk_events: &[Vec<u8>],
        actor: &str,
    ) -> Result<bool, StorageError> {
        let mut tx = self.pool().begin().await?;
        let inserted = insert_module_row(&mut tx, sha256, module).await?;
        if inserted {
            sqlx::query("INSERT INTO outbox (event, actor) SELECT unnest($1::bytea[]), $2")
                .bind(chunk_events)
                .bind(actor)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(inserted)
    }

    /// Store records' resolutions (or none), each only if its record is still at the revision
    /// read (a newer state gets its own); returns how many were stored. Rows are locked in the
    /// order given, which callers keep in `(collection, key)` order as applies do, so the two
    /// never wait on each other in a cycle.
    pub async fn set_resolutions(&self, updates: &[ResolutionUpdate]) -> Result<u64, StorageError> {
        if updates.is_empty() {
            return Ok(0);
        }
        let collections: Vec<&str> = updates.iter().map(|u| u.collection.as_str()).collect();
        let keys: Vec<&str> = updates.iter().map(|u| u.key.as_str()).collect();
        let revs: Vec<i64> = updates.iter().map(|u| u.rev).collect();
        let resolutions: Vec<Option<Json<&Resolution>>> = updates
            .iter()
            .map(|u| u.resolution.as_ref().map(Json))
            .collect();
        let done = sqlx::query(
            "WITH locked AS (
                 SELECT r.collection, r.key, u.resolution
                   FROM unnest($1::text[], $2::text[], $3::bigint[], $4::jsonb[])
                        WITH ORDINALITY AS u(collection, key, rev, resolution, n)
                  CROSS JOIN LATERAL (
                        SELECT collection, key FROM records
                         WHERE collection = u.collection AND key = u.key AND rev = u.rev
                           FOR UPDATE) r
                  ORDER BY u.n)
             UPDATE records SET resolution = locked.resolution FROM locked
              WHERE records.collection = locked.collection AND records.key = locked.key",
        )
        .bind(&collections)
        .bind(&keys)
        .bind(&revs)
        .bind(&resolutions)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }

    /// Records of `collection` with concurrent versions whose resolution was not made by
    /// `resolver` bound to `sha256`, or is marked for a retry; in key order after `after`.
    pub async fn unresolved(
        &self,
        collection: &str,
        resolver: &str,
        sha256: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<Unresolved>, StorageError> {
        let rows = sqlx::query(
            "SELECT collection, key, rev, state, resolution FROM records
              WHERE collection = $1 AND key > $4
                AND jsonb_array_length(state -> 'versions') > 1
                AND (resolution IS NULL
                     OR resolution ->> 'resolver' IS DISTINCT FROM $2
                     OR resolution ->> 'sha256' IS DISTINCT FROM $3
                     OR resolution ->> 'retry' = 'true')
              ORDER BY key LIMIT $5",
        )
        .bind(collection)
        .bind(resolver)
        .bind(sha256)
        .bind(after)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(unresolved).collect()
    }

    /// How many records' resolutions wait for a (new) run.
    pub async fn count_left_to_resolve(&self) -> Result<i64, StorageError> {
        Ok(
            sqlx::query_scalar(
                "SELECT count(*) FROM records WHERE resolution ->> 'retry' = 'true'",
            )
            .fetch_one(self.pool())
            .await?,
        )
    }

    /// Records whose resolution waits for a (new) run, in every collection, in `(collection,
    /// key)` order after `after`: what applies left to the worker. A partial index
    /// (`migrations/0013`) holds exactly these, so finding them never reads the other records.
    pub async fn left_to_resolve(
        &self,
        after: (&str, &str),
        limit: i64,
    ) -> Result<Vec<Unresolved>, StorageError> {
        let rows = sqlx::query(
            "SELECT collection, key, rev, state, resolution FROM records
              WHERE resolution ->> 'retry' = 'true' AND (collection, key) > ($1, $2)
              ORDER BY collection, key LIMIT $3",
        )
        .bind(after.0)
        .bind(after.1)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(unresolved).collect()
    }
}

fn unresolved(row: &sqlx::postgres::PgRow) -> Result<Unresolved, StorageError> {
    let Json(state): Json<RecordState> = row.try_get("state").map_err(corrupt)?;
    Ok(Unresolved {
        collection: row.try_get("collection")?,
        key: row.try_get("key")?,
        rev: row.try_get("rev")?,
        state,
        resolution: decode_resolution(row.try_get("resolution")?),
    })
}

impl ApplyTx {
    /// Keep one chunk of a module; when it is the last one missing, assemble the module and
    /// check its hash.
    pub async fn store_chunk(
        &mut self,
        chunk: &ModuleChunk,
    ) -> Result<ChunkProgress, StorageError> {
        let tx = self.transaction();
        let have: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM resolver_modules WHERE sha256 = $1)")
                .bind(&chunk.sha256)
                .fetch_one(&mut **tx)
                .await?;
        if have {
            return Ok(ChunkProgress::AlreadyHave);
        }
        let data = chunk
            .bytes()
            .map_err(|e| StorageError::Corrupt(e.to_string()))?;
        sqlx::query(
            "INSERT INTO resolver_module_chunks (sha256, chunk_index, chunk_count, data)
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(&chunk.sha256)
        .bind(chunk.index as i32)
        .bind(chunk.count as i32)
        .bind(&data)
        .execute(&mut **tx)
        .await?;
        let pieces: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT data FROM resolver_module_chunks
              WHERE sha256 = $1 AND chunk_count = $2 ORDER BY chunk_index",
        )
        .bind(&chunk.sha256)
        .bind(chunk.count as i32)
        .fetch_all(&mut **tx)
        .await?;
        if pieces.len() < chunk.count as usize {
            return Ok(ChunkProgress::Waiting);
        }
        let module = pieces.concat();
        sqlx::query("DELETE FROM resolver_module_chunks WHERE sha256 = $1")
            .bind(&chunk.sha256)
            .execute(&mut **tx)
            .await?;
        if module_sha256(&module) != chunk.sha256 {
            return Ok(ChunkProgress::Corrupt {
                sha256: chunk.sha256.clone(),
            });
        }
        insert_module_row(tx, &chunk.sha256, &module).await?;
        Ok(ChunkProgress::Assembled {
            sha256: chunk.sha256.clone(),
        })
    }
}

/// Store a whole module under its sha256 (checked by the caller); false when it was here already.
async fn insert_module_row(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    sha256: &str,
    module: &[u8],
) -> Result<bool, StorageError> {
    let inserted = sqlx::query(
        "INSERT INTO resolver_modules (sha256, module) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(sha256)
    .bind(module)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}
