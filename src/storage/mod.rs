//! The only place with SQL. A region's PostgreSQL holds its records (one row per record: the home
//! and the antichain of maximal versions), the outbox of changes to replicate, the conflict log and
//! the region's identity, resolver modules and the resolutions they made.
//!
//! Why compare-and-swap instead of `BEGIN; lock; read; write; COMMIT`: on this kind of hardware a
//! commit's fsync costs about as much as two network round trips, so round trips dominate a write.
//! A write reads the row (and its collection's policy) in one statement, computes the new state in
//! Rust, and commits the record and its outbox row in a second, single statement that only succeeds
//! if the row's `rev` is unchanged (or, for a new key, the key is still absent). A lost race re-reads
//! and retries, so concurrent writers to one record serialize, creates of the same new key included,
//! while writers to different records never wait on each other. Optimism alone could starve a slow
//! writer on a hot record, so a writer that lost twice takes the row lock instead
//! ([`Store::lock`]): lock waiters are served in order, so every write makes progress. Concurrent
//! writes share that second statement and its commit ([`group_commit`]), each under its own
//! compare-and-swap.

pub mod apply;
pub mod dead_letters;
pub mod deletions;
pub mod group_commit;
pub mod outbox;
pub mod records;
pub mod repair;
pub mod resolvers;

use std::time::Duration;

use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};

pub use records::{
    IdempotentWrite, Loaded, LockedRecord, OutboxEvent, RecordWrite, RememberedWrite, Saved, Store,
};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    // The message includes sqlx's error, which is therefore not also a `source`: a chain would
    // print it twice.
    /// PostgreSQL could not be reached or gave no connection in time: worth retrying.
    #[error("the database is unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// The TLS handshake with PostgreSQL failed: its certificate is not trusted or does not name
    /// the host. A setting to fix, not an outage to wait out.
    #[error("TLS with the database failed ({0}); check sslmode and sslrootcert in database_url")]
    Tls(sqlx::Error),
    #[error("database error: {0}")]
    Database(sqlx::Error),
    #[error("stored data does not decode: {0}")]
    Corrupt(String),
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("the database belongs to region {found:?}, not {expected:?}")]
    WrongRegion { expected: String, found: String },
}

impl StorageError {
    /// A deadlock or serialization failure: PostgreSQL aborted the transaction, and running it
    /// again is the remedy.
    pub fn is_retryable(&self) -> bool {
        let StorageError::Database(sqlx::Error::Database(error)) = self else {
            return false;
        };
        matches!(error.code().as_deref(), Some("40P01" | "40001"))
    }
}

impl From<sqlx::Error> for StorageError {
    fn from(error: sqlx::Error) -> StorageError {
        let text = error.to_string();
        match error {
            sqlx::Error::Io(_) | sqlx::Error::Tls(_)
                if text.contains("certificate") || text.contains("UnknownIssuer") =>
            {
                StorageError::Tls(error)
            }
            sqlx::Error::PoolTimedOut
            | sqlx::Error::Io(_)
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => StorageError::Unavailable(error),
            other => StorageError::Database(other),
        }
    }
}

/// Who this database says the region is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionIdentity {
    pub region: String,
    pub incarnation: String,
    /// Whether the database holds a full copy of the deployment's data: false on a new region's
    /// empty database until its first copy from a peer completes ([`crate::membership`]).
    pub bootstrapped: bool,
}

/// Create the database if it is missing, connect a pool, run the migrations and read (or make)
/// the region's identity.
pub async fn open(
    database_url: &str,
    pool_size: u32,
    region: &str,
) -> Result<(Store, RegionIdentity), StorageError> {
    if !Postgres::database_exists(database_url).await? {
        if let Err(error) = Postgres::create_database(database_url).await {
            // Another process may have created it in between; only that is harmless.
            if !Postgres::database_exists(database_url).await? {
                return Err(error.into());
            }
        }
    }
    let options: PgConnectOptions = database_url.parse()?;
    let pool = PgPoolOptions::new()
        .max_connections(pool_size)
        .acquire_timeout(Duration::from_secs(3))
        .connect_with(options)
        .await?;
    sqlx::migrate!("./migrations").run(&pool).await?;
    let identity = ensure_identity(&pool, region).await?;
    Ok((Store::new(pool), identity))
}

impl Store {
    /// The highest outbox id this region has applied from `actor`'s stream, if any.
    pub async fn highest_outbox_id_seen(&self, actor: &str) -> Result<Option<i64>, StorageError> {
        Ok(
            sqlx::query_scalar("SELECT highest_outbox_id FROM actors_seen WHERE actor = $1")
                .bind(actor)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// The last outbox id this database handed out (0 if none): every event it ever published
    /// has an id at most this, unless the database was rewound.
    pub async fn outbox_sequence(&self) -> Result<i64, StorageError> {
        Ok(sqlx::query_scalar(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM outbox_id_seq",
        )
        .fetch_one(self.pool())
        .await?)
    }

    /// Give the region a new incarnation, unless another process already replaced `current`;
    /// returns the incarnation now in force either way.
    pub async fn rotate_incarnation(&self, current: &str) -> Result<String, StorageError> {
        let fresh = new_incarnation();
        sqlx::query("UPDATE region_meta SET incarnation = $2 WHERE incarnation = $1")
            .bind(current)
            .bind(&fresh)
            .execute(self.pool())
            .await?;
        Ok(sqlx::query_scalar("SELECT incarnation FROM region_meta")
            .fetch_one(self.pool())
            .await?)
    }
}

impl Store {
    /// The first copy from a peer completed: this database now holds the deployment's data.
    pub async fn mark_bootstrapped(&self) -> Result<(), StorageError> {
        sqlx::query("UPDATE region_meta SET bootstrapped = true")
            .execute(self.pool())
            .await?;
        Ok(())
    }
}

fn new_incarnation() -> String {
    format!("{:08x}", rand::random::<u32>())
}

async fn ensure_identity(pool: &PgPool, region: &str) -> Result<RegionIdentity, StorageError> {
    let fresh = new_incarnation();
    sqlx::query(
        "INSERT INTO region_meta (region, incarnation) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(region)
    .bind(&fresh)
    .execute(pool)
    .await?;
    let (found, incarnation, bootstrapped): (String, String, bool) =
        sqlx::query_as("SELECT region, incarnation, bootstrapped FROM region_meta")
            .fetch_one(pool)
            .await?;
    if found != region {
        return Err(StorageError::WrongRegion {
            expected: region.to_owned(),
            found,
        });
    }
    Ok(RegionIdentity {
        region: found,
        incarnation,
        bootstrapped,
    })
}
