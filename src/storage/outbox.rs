//! The outbox as the publisher sees it: unpublished rows in id order, deleted once JetStream has
//! acknowledged them, and the advisory lock that elects one publisher per region.
//!
//! No watermark: ids are handed out at insert, not at commit, so "id > last published" would skip
//! a row that commits late. Each pass takes every row visible now, in id order; a row that commits
//! late is simply in the next pass.

use sqlx::{Connection, PgConnection};

use super::StorageError;

/// The advisory lock key held by a region's publisher (any constant; one per database).
const PUBLISHER_LOCK: i64 = 0x6c6f_6375_7370_7562; // "locuspub"

/// A dedicated connection holding the publisher lock: the lock lives exactly as long as the
/// session, so a publisher that dies (even by kill -9) releases it and another process takes over.
pub struct PublisherLease {
    connection: PgConnection,
}

impl PublisherLease {
    /// Try to become the region's publisher; `None` when another process is.
    pub async fn try_acquire(database_url: &str) -> Result<Option<PublisherLease>, StorageError> {
        let mut connection = PgConnection::connect(database_url).await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(PUBLISHER_LOCK)
            .fetch_one(&mut connection)
            .await?;
        Ok(got.then_some(PublisherLease { connection }))
    }

    /// Up to `limit` unpublished events, oldest first: `(outbox id, wire bytes, the actor that
    /// wrote it)`; the actor is unknown for rows queued before the outbox recorded it. Read on
    /// the lease's own connection, as is every delete: a pool would check a connection with a
    /// round trip each time it handed one out, twice per pass.
    pub async fn unpublished(
        &mut self,
        limit: i64,
    ) -> Result<Vec<(i64, Vec<u8>, Option<String>)>, StorageError> {
        Ok(
            sqlx::query_as("SELECT id, event, actor FROM outbox ORDER BY id LIMIT $1")
                .bind(limit)
                .fetch_all(&mut self.connection)
                .await?,
        )
    }

    /// Forget events JetStream has acknowledged.
    pub async fn mark_published(&mut self, ids: &[i64]) -> Result<(), StorageError> {
        sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind(ids)
            .execute(&mut self.connection)
            .await?;
        Ok(())
    }

    /// Whether the lease still holds (its session is alive).
    pub async fn check(&mut self) -> Result<(), StorageError> {
        self.connection.ping().await?;
        Ok(())
    }
}
