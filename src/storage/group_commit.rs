//! Group commit: concurrent writes to a region share one statement and one commit.
//!
//! Why: a write's cost in PostgreSQL is mostly per statement and per commit (parse, plan, the WAL
//! flush), not per row. A write that commits alone pays all of it; writes that arrive together
//! share it. Each still passes its own compare-and-swap and its own write-floor check, and each is
//! answered only after the statement that holds it has committed, with PostgreSQL's durability
//! settings untouched: a 2xx still means the row and its outbox event are on disk.
//!
//! How writes gather, with no timer: a write queues, and if no batch is committing it starts one
//! at once (an idle region adds no wait). Otherwise it waits for the committer, which takes
//! everything queued meanwhile, up to [`MAX_BATCH`] writes. The batch is therefore as large as
//! the load of one commit's duration: one write when the region is quiet, hundreds under a burst.
//! One committer rather than several: on this project's two-core reference machine, one gave the
//! most writes per second at 8 clients and as many as two at 32 (5,506 and 8,629 PUTs/s against
//! 4,753 and 8,669 with two and 4,440 and 7,238 with three), because larger batches cost the
//! database less per write. But a batch can stall (it waits for a row lock held by an apply or by a writer that
//! took the lock path): a write that finds the committer busy for longer than [`STALLED`] starts
//! another, up to the pool's share ([`committers_for`]), so one slow record never holds up the
//! region's other writes for long.
//!
//! Rules inside a batch:
//! - A record, or an idempotency key, appears at most once; a second write of it waits for the
//!   next batch. It was computed against the same base as the first, so its compare-and-swap fails
//!   there and it retries on the first's result, as two racing writes always do.
//! - A write whose compare-and-swap fails, or whose HLC is below the write floor, is left out of
//!   the statement's result; the others commit. Only that write retries.
//! - Rows are locked in `(collection, key)` order, as applies lock theirs, so a batch and an apply
//!   never deadlock over the same records.
//! - A batch that fails as a whole (another request took one of its idempotency keys, a deadlock
//!   with a process that locks in another order) is committed again write by write, so each write
//!   gets its own outcome.
//!
//! The batch runs in a task of its own: a request whose client goes away does not cancel the
//! commit of the others that share its batch.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use sqlx::pool::PoolConnection;
use sqlx::types::Json;
use sqlx::{PgConnection, Postgres};
use tokio::sync::oneshot;

use super::records::{save, save_batch, RecordWrite};
use super::{Saved, StorageError, Store};

/// The most writes one statement carries.
const MAX_BATCH: usize = 256;

/// How long the committers may go without finishing a batch before a write starts another.
const STALLED: Duration = Duration::from_millis(10);

/// The most batches committing at once, for a pool of `pool_size` connections: a quarter of the
/// pool, so that reads keep most of it, and at most 4.
pub fn committers_for(pool_size: u32) -> usize {
    (pool_size as usize / 4).clamp(1, 4)
}

type Reply = oneshot::Sender<Result<Saved, StorageError>>;

struct Queue {
    waiting: VecDeque<(RecordWrite, Reply)>,
    committing: usize,
    /// When a committer last took or finished a batch.
    progress: Instant,
}

impl Queue {
    /// Whether a write queued now should start a committer: none is running, or those running
    /// have been stuck on their batches for a while and the pool has room for another.
    fn wants_committer(&self, most: usize) -> bool {
        self.committing == 0 || (self.committing < most && self.progress.elapsed() > STALLED)
    }
}

/// The group committer of one region's store.
#[derive(Clone)]
pub struct GroupCommit {
    store: Store,
    queue: Arc<Mutex<Queue>>,
    committers: usize,
    batches: prometheus::Histogram,
}

impl GroupCommit {
    pub fn new(store: Store, committers: usize, registry: &prometheus::Registry) -> GroupCommit {
        let batches = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "locus_write_batch_size",
                "Writes committed together by one statement",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
        )
        .expect("a valid histogram");
        // A second registration (a test that starts a region twice in one registry) is harmless.
        let _ = registry.register(Box::new(batches.clone()));
        GroupCommit {
            store,
            queue: Arc::new(Mutex::new(Queue {
                waiting: VecDeque::new(),
                committing: 0,
                progress: Instant::now(),
            })),
            committers,
            batches,
        }
    }

    /// Commit `write` with whatever other writes are waiting; its outcome once committed.
    pub async fn save(&self, write: RecordWrite) -> Result<Saved, StorageError> {
        let (reply, outcome) = oneshot::channel();
        let start = {
            let mut queue = self.queue.lock().expect("group commit lock");
            queue.waiting.push_back((write, reply));
            let start = queue.wants_committer(self.committers);
            if start {
                queue.committing += 1;
                queue.progress = Instant::now();
            }
            start
        };
        if start {
            tokio::spawn(self.clone().commit_while_queued());
        }
        outcome.await.unwrap_or_else(|_| {
            // The committing task panicked: its writes' outcome is unknown, like a lost connection's.
            Err(StorageError::Unavailable(sqlx::Error::WorkerCrashed))
        })
    }

    /// Commit batches until nothing is queued. The committer count is given back in the same
    /// critical section that finds the queue empty: a write queued just after must see no
    /// committer running, or it would wait with nobody to take it. A panic gives it back too.
    async fn commit_while_queued(self) {
        struct Slot(Option<Arc<Mutex<Queue>>>);
        impl Drop for Slot {
            fn drop(&mut self) {
                if let Some(queue) = self.0.take() {
                    if let Ok(mut queue) = queue.lock() {
                        queue.committing -= 1;
                    }
                }
            }
        }
        let mut slot = Slot(Some(self.queue.clone()));
        let mut held = None;
        loop {
            let batch = {
                let mut queue = self.queue.lock().expect("group commit lock");
                let batch = take_batch(&mut queue.waiting);
                if batch.is_empty() {
                    queue.committing -= 1;
                    slot.0 = None;
                    return;
                }
                queue.progress = Instant::now();
                batch
            };
            self.batches.observe(batch.len() as f64);
            let (writes, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            let outcomes = self.commit(&mut held, &writes).await;
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                // A writer that went away no longer wants its answer; the write stands.
                let _ = reply.send(outcome);
            }
        }
    }

    /// The committer's connection, taken from the pool for its first batch and kept while
    /// batches follow one another: the pool checks a connection with a round trip to PostgreSQL
    /// each time it hands it out, which would sit on the path of every batch.
    async fn connection<'h>(
        &self,
        held: &'h mut Option<PoolConnection<Postgres>>,
    ) -> Result<&'h mut PgConnection, StorageError> {
        if held.is_none() {
            *held = Some(self.store.pool().acquire().await?);
        }
        Ok(held.as_mut().expect("a connection was just taken"))
    }

    /// One statement for the batch, on the committer's connection; write by write if it fails
    /// as a whole.
    async fn commit(
        &self,
        held: &mut Option<PoolConnection<Postgres>>,
        writes: &[RecordWrite],
    ) -> Vec<Result<Saved, StorageError>> {
        let committed = match self.connection(held).await {
            Ok(connection) if writes.len() > 1 => save_batch(connection, writes).await,
            Ok(connection) => save(connection, &writes[0]).await.map(|saved| vec![saved]),
            Err(error) => Err(error),
        };
        match committed {
            Ok(outcomes) => return outcomes.into_iter().map(Ok).collect(),
            // The connection may be what failed: it goes back to the pool, which checks it, and
            // the next batch takes one the pool vouches for.
            Err(error) => {
                *held = None;
                if writes.len() == 1 {
                    return vec![Err(error)];
                }
                tracing::debug!(%error, writes = writes.len(), "a batch failed; committing its writes one by one");
            }
        }
        let mut outcomes = Vec::with_capacity(writes.len());
        for write in writes {
            outcomes.push(self.store.save(write).await);
        }
        outcomes
    }
}

/// The next batch: queued writes in arrival order, up to [`MAX_BATCH`], each record and each
/// idempotency key at most once; the writes left behind keep their place at the queue's head.
fn take_batch(waiting: &mut VecDeque<(RecordWrite, Reply)>) -> Vec<(RecordWrite, Reply)> {
    let mut batch = Vec::new();
    // Hashes, not names: a collision only sends a write to the next batch.
    let mut taken = HashSet::new();
    let mut deferred = VecDeque::new();
    while let Some(entry) = waiting.pop_front() {
        if batch.len() == MAX_BATCH {
            waiting.push_front(entry);
            break;
        }
        let write = &entry.0;
        let record = hash_of(&(0u8, &write.collection, &write.key));
        let idempotency_key = write.idempotent.as_ref().map(|i| hash_of(&(1u8, &i.key)));
        let free = !taken.contains(&record) && idempotency_key.is_none_or(|k| !taken.contains(&k));
        if free {
            taken.insert(record);
            taken.extend(idempotency_key);
            batch.push(entry);
        } else {
            deferred.push_back(entry);
        }
    }
    while let Some(entry) = deferred.pop_back() {
        waiting.push_front(entry);
    }
    batch
}

fn hash_of(value: &impl std::hash::Hash) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(value)
}

/// The batch's columns, one array each, for `unnest`.
pub(super) struct Columns<'a> {
    pub ord: Vec<i32>,
    pub collection: Vec<&'a str>,
    pub key: Vec<&'a str>,
    pub expected_rev: Vec<i64>,
    pub state: Vec<Json<&'a RawValue>>,
    pub bucket: Vec<i32>,
    pub hash_hi: Vec<i64>,
    pub hash_lo: Vec<i64>,
    pub event: Vec<&'a [u8]>,
    pub actor: Vec<&'a str>,
    pub hlc_ms: Vec<Option<i64>>,
    pub idempotency_key: Vec<Option<&'a str>>,
    pub fingerprint: Vec<Option<&'a str>>,
    pub created: Vec<Option<bool>>,
    pub failover: Vec<Option<bool>>,
    pub session: Vec<Option<&'a str>>,
}

impl<'a> Columns<'a> {
    pub fn of(writes: &'a [RecordWrite]) -> Columns<'a> {
        let idempotent =
            |f: &dyn Fn(&'a super::records::OwnedIdempotentWrite) -> Option<&'a str>| {
                writes
                    .iter()
                    .map(|w| w.idempotent.as_ref().and_then(f))
                    .collect()
            };
        Columns {
            ord: (0..writes.len() as i32).collect(),
            collection: writes.iter().map(|w| w.collection.as_str()).collect(),
            key: writes.iter().map(|w| w.key.as_str()).collect(),
            expected_rev: writes.iter().map(|w| w.expected_rev).collect(),
            state: writes.iter().map(|w| Json(w.state.as_ref())).collect(),
            bucket: writes.iter().map(|w| w.bucket).collect(),
            hash_hi: writes.iter().map(|w| w.hash.hi).collect(),
            hash_lo: writes.iter().map(|w| w.hash.lo).collect(),
            event: writes.iter().map(|w| w.event.as_slice()).collect(),
            actor: writes.iter().map(|w| w.actor.as_str()).collect(),
            hlc_ms: writes
                .iter()
                .map(|w| w.hlc_ms.map(|ms| ms as i64))
                .collect(),
            idempotency_key: idempotent(&|i| Some(i.key.as_str())),
            fingerprint: idempotent(&|i| Some(i.fingerprint.as_str())),
            created: writes
                .iter()
                .map(|w| w.idempotent.as_ref().map(|i| i.created))
                .collect(),
            failover: writes
                .iter()
                .map(|w| w.idempotent.as_ref().map(|i| i.failover))
                .collect(),
            session: idempotent(&|i| Some(i.session.as_str())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Home, RecordState};
    use crate::storage::records::{IdempotentWrite, OutboxEvent};

    fn queued(key: &str, idempotency_key: Option<&str>) -> (RecordWrite, Reply) {
        let event = OutboxEvent {
            bytes: b"event",
            actor: "eu.00000000",
            hlc_ms: None,
        };
        let idempotent = idempotency_key.map(|key| IdempotentWrite {
            key,
            fingerprint: "f",
            created: true,
            failover: false,
            session: "s",
        });
        let state = RecordState::new(Home::new("eu"));
        let write = RecordWrite::new("c", key, 0, &state, &event, idempotent.as_ref());
        (write, oneshot::channel().0)
    }

    fn keys(entries: &[(RecordWrite, Reply)]) -> Vec<&str> {
        entries.iter().map(|(w, _)| w.key.as_str()).collect()
    }

    #[test]
    fn a_second_committer_starts_only_when_the_running_ones_are_stalled() {
        let mut queue = Queue {
            waiting: VecDeque::new(),
            committing: 0,
            progress: Instant::now(),
        };
        assert!(queue.wants_committer(3), "an idle region commits at once");
        queue.committing = 1;
        assert!(
            !queue.wants_committer(3),
            "a busy committer gathers the next batch"
        );
        queue.progress = Instant::now() - STALLED * 2;
        assert!(queue.wants_committer(3), "a stalled committer gets help");
        queue.committing = 3;
        assert!(
            !queue.wants_committer(3),
            "never more than the pool's share"
        );
    }

    #[test]
    fn a_record_or_idempotency_key_met_twice_waits_for_the_next_batch_in_its_place() {
        let mut waiting: VecDeque<_> = [
            queued("a", None),
            queued("a", None),
            queued("b", Some("x")),
            queued("c", Some("x")),
            queued("d", None),
        ]
        .into();
        let first = take_batch(&mut waiting);
        assert_eq!(keys(&first), ["a", "b", "d"]);
        let rest: Vec<_> = waiting.into_iter().collect();
        assert_eq!(keys(&rest), ["a", "c"]);
    }

    #[test]
    fn a_batch_holds_at_most_max_batch_writes_and_the_rest_keep_their_order() {
        let mut waiting: VecDeque<_> = (0..MAX_BATCH + 3)
            .map(|i| queued(&format!("k{i:04}"), None))
            .collect();
        let first = take_batch(&mut waiting);
        assert_eq!(first.len(), MAX_BATCH);
        let rest: Vec<_> = waiting.into_iter().collect();
        assert_eq!(
            keys(&rest),
            [
                format!("k{MAX_BATCH:04}"),
                format!("k{:04}", MAX_BATCH + 1),
                format!("k{:04}", MAX_BATCH + 2)
            ]
        );
    }
}
