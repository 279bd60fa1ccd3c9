//! The read and write paths of one region, between the HTTP layer and storage.
//!
//! A write decides where it belongs before it touches anything: a record homed elsewhere (under
//! `homing: record`) is handed back to the caller to forward, unless it already was forwarded (one
//! hop only, so two regions can never bounce a write) or the caller is making a failover write.
//! Preconditions are checked against the state the write will replace, and the new version is
//! computed by the pure [`RecordState::write`]; storage commits it only if nobody wrote in between,
//! else the write starts over from a fresh read.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use tokio::sync::Notify;

use crate::clock::hlc::{wall_clock_ms, Hlc, HybridClock, Observation};
use crate::clock::staleness::{self, Freshness};
use crate::clock::version::{Actor, SessionToken, VersionVector};
use crate::config::Config;
use crate::record::policy::{
    Homing, Policy, DELETION_COLLECTION, POLICY_COLLECTION, SYSTEM_PREFIX,
};
use crate::record::resolution::Resolution;
use crate::record::view::lww_winner;
use crate::record::{Home, RecordState, Summary};
use crate::replication::event::Event;
use crate::replication::status::ReplicationStatus;
use crate::resolve::{Resolvers, RESOLVER_COLLECTION};
use crate::storage::{
    IdempotentWrite, Loaded, LockedRecord, OutboxEvent, RecordWrite, RegionIdentity, Saved,
    StorageError, Store,
};

/// NATS's default `max_payload`, assumed until the server says otherwise.
const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Optimistic attempts before a write takes the record's row lock.
const OPTIMISTIC_ATTEMPTS: usize = 2;
/// Attempts in all before giving up with [`ServiceError::Contention`]. Under the row lock a write
/// only loses to a concurrent create of a key that had no row, so this is never reached in practice.
const MAX_WRITE_ATTEMPTS: usize = 16;

#[derive(Debug, Clone, PartialEq)]
pub enum WriteOp {
    Put(Value),
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    None,
    /// Write only while the record's causal context is exactly this (from an ETag).
    IfMatch(VersionVector),
    /// Create only: fail if a reader would find the record.
    IfNoneMatchAny,
}

impl Precondition {
    pub fn is_conditional(&self) -> bool {
        !matches!(self, Precondition::None)
    }
}

/// How the request reached this region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// From a client: may be forwarded to the home.
    Client,
    /// Forwarded by a peer: never forwarded again.
    Forwarded,
    /// The home was unreachable and the policy accepts local writes.
    Failover,
}

#[derive(Debug, Clone)]
pub struct WriteRequest {
    pub collection: String,
    pub key: String,
    pub op: WriteOp,
    pub precondition: Precondition,
    /// `Locus-Home`: where a new record should live.
    pub home_hint: Option<String>,
    pub route: Route,
    /// `Idempotency-Key`: a retry of this request gets the first outcome.
    pub idempotency: Option<IdempotencyKey>,
}

/// A client's key for one write, with the fingerprint of the request it was first used for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    pub key: String,
    /// Hex sha256 of the method, collection, key and body.
    pub fingerprint: String,
}

#[derive(Debug, Clone)]
pub struct Written {
    pub state: RecordState,
    pub policy: Policy,
    /// The write made a record a reader can find where there was none (or only a tombstone).
    pub created: bool,
    pub session: SessionToken,
    /// A failover write: kept here because the home was unreachable.
    pub failover: bool,
    /// The outcome of an earlier request with the same idempotency key, not a new write.
    pub replayed: bool,
}

#[derive(Debug, Clone)]
pub enum WriteOutcome {
    Written(Written),
    /// The record lives elsewhere: forward the request there.
    Forward {
        home: String,
        policy: Policy,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("no such record")]
    NotFound,
    #[error("{0}")]
    PreconditionFailed(&'static str),
    /// A forwarded write reached a region that is not (or no longer) the record's home.
    #[error("this region is not the home of the record; its home is {home}")]
    NotHome { home: String },
    #[error("the record is being written too often to take this write; retry")]
    Contention,
    /// The write's replication event would exceed what the transport carries (NATS
    /// `max_payload`): refused before anything is stored, or it could never replicate.
    #[error("the value encodes to a replication event of {size} bytes, over the transport's limit of {limit} bytes")]
    EventTooLarge { size: usize, limit: usize },
    /// The region has not yet settled which incarnation it writes as (see
    /// [`crate::replication::incarnation`]).
    #[error("this region is still checking with its peers whether its database was restored; retry shortly")]
    IncarnationUnsettled,
    #[error("the Idempotency-Key was used for a different request")]
    IdempotencyKeyReused,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// How long a write waits for the region's incarnation to be settled at start.
const INCARNATION_WAIT: Duration = Duration::from_secs(20);

/// The revision and summary of a record, as this process last wrote it.
#[derive(Debug, Clone)]
struct Known {
    rev: i64,
    summary: Summary,
}

/// What a write is judged on: the record's revision and summary, and its collection's policy.
struct Base {
    rev: i64,
    summary: Summary,
    policy: Policy,
    /// The horizon of the collection's deletion, if it was ever deleted.
    deleted_before: Option<Hlc>,
}

enum Decision {
    Save { created: bool, value: Option<Value> },
    Forward { home: String },
    Fail(ServiceError),
}

/// Lets a write skip reading the record when this process wrote it last: the write then saves
/// against the cached revision, and the compare-and-swap in storage rejects it if anyone (another
/// process, replication) changed the record since, so a stale entry costs a retry, never a wrong
/// version. Policies are cached for [`POLICY_TTL`], so a policy changed by another process of
/// this region takes effect here within that time. Bounded: when full, it starts over empty.
struct WriteCache {
    records: Mutex<HashMap<(String, String), Known>>,
    policies: Mutex<HashMap<String, CachedPolicy>>,
}

/// A collection's policy and deletion horizon, and when they were read.
type CachedPolicy = (Instant, Policy, Option<Hlc>);

const RECORD_CACHE_ENTRIES: usize = 100_000;
const POLICY_TTL: Duration = Duration::from_secs(1);

impl WriteCache {
    fn new() -> WriteCache {
        WriteCache {
            records: Mutex::new(HashMap::new()),
            policies: Mutex::new(HashMap::new()),
        }
    }

    fn base(&self, collection: &str, key: &str) -> Option<Base> {
        let policy = {
            let policies = self.policies.lock().expect("policy cache lock");
            let (at, policy, deleted_before) = policies.get(collection)?;
            // A deleted collection's writes always read their record: whether it is a new one
            // (and so takes the counter floor) depends on what the deletion left of it.
            if at.elapsed() > POLICY_TTL || deleted_before.is_some() {
                return None;
            }
            policy.clone()
        };
        let records = self.records.lock().expect("record cache lock");
        let known = records.get(&(collection.to_owned(), key.to_owned()))?;
        Some(Base {
            rev: known.rev,
            summary: known.summary.clone(),
            policy,
            deleted_before: None,
        })
    }

    fn remember(&self, collection: &str, key: &str, known: Known) {
        let mut records = self.records.lock().expect("record cache lock");
        if records.len() >= RECORD_CACHE_ENTRIES {
            records.clear();
        }
        records.insert((collection.to_owned(), key.to_owned()), known);
    }

    fn forget(&self, collection: &str, key: &str) {
        self.records
            .lock()
            .expect("record cache lock")
            .remove(&(collection.to_owned(), key.to_owned()));
    }

    fn remember_policy(&self, collection: &str, policy: &Policy, deleted_before: Option<Hlc>) {
        self.policies.lock().expect("policy cache lock").insert(
            collection.to_owned(),
            (Instant::now(), policy.clone(), deleted_before),
        );
    }

    fn forget_policy(&self, collection: &str) {
        self.policies
            .lock()
            .expect("policy cache lock")
            .remove(collection);
    }
}

/// One region's state shared by every request.
pub struct Region {
    pub config: Config,
    pub store: Store,
    pub identity: RegionIdentity,
    /// The actor this region writes as: settled once at start, after asking the peers whether the
    /// database was restored ([`crate::replication::incarnation`]); writes wait for it.
    actor: tokio::sync::watch::Sender<Option<Actor>>,
    clock: Mutex<HybridClock>,
    cache: WriteCache,
    /// Writes arriving together share one statement and one commit.
    commits: crate::storage::group_commit::GroupCommit,
    /// Woken after each committed write, so the publisher ships it at once.
    pub outbox_signal: Notify,
    /// Wakes the repair worker for a round against every peer now.
    pub repair_wanted: Notify,
    /// Wakes the purge worker: a collection was deleted ([`crate::deletion`]).
    pub purge_wanted: Notify,
    /// After a restore: the peers a repair round has yet to complete against before this region
    /// is ready ([`crate::replication::incarnation`]).
    catching_up: Mutex<std::collections::BTreeSet<String>>,
    /// A new region copying the deployment's data ([`crate::membership::bootstrap`]); not ready
    /// until the copy completes.
    bootstrapping: std::sync::atomic::AtomicBool,
    /// The regions of the deployment besides this one ([`crate::membership`]).
    pub members: crate::membership::Members,
    /// The largest event the transport carries: NATS's `max_payload`, learnt at connect.
    max_event_bytes: std::sync::atomic::AtomicUsize,
    pub replication: ReplicationStatus,
    pub resolvers: Resolvers,
    /// Every metric of this region (HTTP and replication), rendered at `/metrics`.
    pub registry: prometheus::Registry,
    /// The region's background workers.
    pub supervisor: std::sync::Arc<crate::supervisor::Supervisor>,
    /// What calls to peers trust ([`crate::tls`]).
    pub peer_trust: crate::tls::PeerTrust,
    /// Whether each peer's API is up ([`crate::peer_health`]).
    pub peer_health: crate::peer_health::HealthBook,
}

impl Region {
    pub fn new(config: Config, store: Store, identity: RegionIdentity) -> anyhow::Result<Region> {
        let clock = Mutex::new(HybridClock::new(config.clock.max_drift_ms));
        let registry = prometheus::Registry::new();
        let resolvers = Resolvers::new(&config.resolvers, &registry)?;
        // A region without peers has nobody to copy from: its data is whatever it holds.
        let bootstrapping = !identity.bootstrapped && !config.peers.is_empty();
        let members = crate::membership::Members::new(&config);
        let peer_trust = crate::tls::PeerTrust::load(&config)?;
        let commits = crate::storage::group_commit::GroupCommit::new(
            store.clone(),
            crate::storage::group_commit::committers_for(config.database_pool_size),
            &registry,
        );
        Ok(Region {
            config,
            store,
            identity,
            actor: tokio::sync::watch::Sender::new(None),
            clock,
            cache: WriteCache::new(),
            commits,
            outbox_signal: Notify::new(),
            repair_wanted: Notify::new(),
            purge_wanted: Notify::new(),
            catching_up: Mutex::new(std::collections::BTreeSet::new()),
            bootstrapping: std::sync::atomic::AtomicBool::new(bootstrapping),
            members,
            max_event_bytes: std::sync::atomic::AtomicUsize::new(DEFAULT_MAX_EVENT_BYTES),
            replication: ReplicationStatus::new(&registry),
            resolvers,
            supervisor: std::sync::Arc::new(crate::supervisor::Supervisor::new(&registry)),
            peer_trust,
            peer_health: Default::default(),
            registry,
        })
    }

    /// The actor this region writes as, once settled; writes wait for it (a while).
    pub async fn actor(&self) -> Result<Actor, ServiceError> {
        if let Some(actor) = self.settled_actor() {
            return Ok(actor);
        }
        tokio::time::timeout(INCARNATION_WAIT, self.settled())
            .await
            .map_err(|_| ServiceError::IncarnationUnsettled)
    }

    /// The actor this region writes as, waiting as long as it takes to settle.
    pub async fn settled(&self) -> Actor {
        let mut settled = self.actor.subscribe();
        let actor = settled
            .wait_for(Option::is_some)
            .await
            .expect("the region holds the sender");
        actor.clone().expect("waited for an actor")
    }

    /// The actor this region writes as, if it is settled yet.
    pub fn settled_actor(&self) -> Option<Actor> {
        self.actor.borrow().clone()
    }

    /// Start writing as `actor`.
    pub fn settle_actor(&self, actor: Actor) {
        self.actor.send_replace(Some(actor));
    }

    /// Whether this replica may serve a read that accepts data `max_staleness_ms` old, by the
    /// heartbeats of every current peer ([`crate::clock::staleness`]).
    pub async fn freshness(&self, max_staleness_ms: u64) -> Result<Freshness, ServiceError> {
        let (now_ms, applied_through) = self.applied_through().await?;
        let members = self.members.peers();
        let peers: Vec<&str> = members.iter().map(|p| p.id.as_str()).collect();
        Ok(staleness::freshness(
            &peers,
            &applied_through,
            now_ms,
            max_staleness_ms,
        ))
    }

    /// Per peer, the newest heartbeat promise applied here, with the wall clock it is judged at;
    /// the lag gauges are set from them on the way.
    pub async fn applied_through(&self) -> Result<(u64, BTreeMap<String, u64>), StorageError> {
        let applied_through = self.store.applied_through().await?;
        let now_ms = wall_clock_ms();
        self.replication.set_lag(now_ms, &applied_through);
        Ok((now_ms, applied_through))
    }

    /// Fold a remote event's HLC into this region's clock (unless it is too far ahead).
    pub fn observe_remote(&self, hlc: Hlc) -> Observation {
        self.clock
            .lock()
            .expect("clock lock")
            .observe(hlc, wall_clock_ms())
    }

    pub fn max_event_bytes(&self) -> usize {
        self.max_event_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What the NATS server said its `max_payload` is.
    pub fn set_max_event_bytes(&self, bytes: usize) {
        self.max_event_bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// A record changed under this process (replication): its cached revision is stale.
    pub fn forget_cached(&self, collection: &str, key: &str) {
        self.cache.forget(collection, key);
    }

    /// A collection's policy changed under this process (replication).
    pub fn forget_cached_policy(&self, collection: &str) {
        self.cache.forget_policy(collection);
    }

    pub fn id(&self) -> &str {
        &self.config.region
    }

    /// The policy of `collection`, from its policy record (or the defaults).
    pub fn policy_of(&self, collection: &str, record: Option<&RecordState>) -> Policy {
        if collection.starts_with(SYSTEM_PREFIX) {
            return Policy::system();
        }
        let Some(winner) = record.and_then(lww_winner).filter(|v| !v.deleted) else {
            return Policy::default();
        };
        serde_json::from_value(winner.value.clone()).unwrap_or_else(|error| {
            tracing::warn!(collection, %error, "stored policy does not decode; using the defaults");
            Policy::default()
        })
    }

    /// A record's stored state, its resolution and its collection's policy.
    pub async fn read(
        &self,
        collection: &str,
        key: &str,
    ) -> Result<(Option<RecordState>, Option<Resolution>, Policy), ServiceError> {
        let loaded = self.store.load(collection, key).await?;
        let policy = self.policy_of(collection, loaded.policy.as_ref());
        let (state, resolution) = loaded.into_visible();
        Ok((state, resolution, policy))
    }

    pub async fn policy(&self, collection: &str) -> Result<Option<Policy>, ServiceError> {
        let loaded = self.store.load(POLICY_COLLECTION, collection).await?;
        let live = loaded
            .state
            .as_ref()
            .and_then(lww_winner)
            .is_some_and(|v| !v.deleted);
        Ok(live.then(|| self.policy_of(collection, loaded.state.as_ref())))
    }

    /// The horizon of `collection`'s deletion, if it was ever deleted.
    pub async fn deletion_horizon(&self, collection: &str) -> Result<Option<Hlc>, StorageError> {
        let marker = self.store.load(DELETION_COLLECTION, collection).await?;
        Ok(marker.state.and_then(|state| state.max_hlc()))
    }

    /// Delete a collection: one replicated marker whose HLC is the deletion's horizon (every
    /// version of the collection stamped at or below it is gone, in every region, whatever order
    /// events arrive in), and a tombstone for its policy. Cheap whatever the collection's size:
    /// each region's purge worker removes the rows afterwards. Returns the horizon.
    pub async fn delete_collection(&self, collection: &str) -> Result<Hlc, ServiceError> {
        let marker = WriteRequest {
            idempotency: None,
            collection: DELETION_COLLECTION.to_owned(),
            key: collection.to_owned(),
            op: WriteOp::Put(serde_json::json!({})),
            precondition: Precondition::None,
            home_hint: None,
            route: Route::Client,
        };
        let horizon = match self.write(&marker).await? {
            WriteOutcome::Written(written) => written.state.versions[0].hlc,
            WriteOutcome::Forward { .. } => {
                unreachable!("system collections are writable in every region")
            }
        };
        let policy = WriteRequest {
            idempotency: None,
            collection: POLICY_COLLECTION.to_owned(),
            key: collection.to_owned(),
            op: WriteOp::Delete,
            ..marker
        };
        match self.write(&policy).await {
            Ok(_) | Err(ServiceError::NotFound) => {}
            Err(error) => return Err(error),
        }
        self.deletion_applied(collection);
        tracing::info!(%collection, %horizon, "collection deleted; its rows are purged in the background");
        Ok(horizon)
    }

    /// The database was restored: not ready until a repair round against every peer completes.
    pub fn catch_up_from_every_peer(&self) {
        let mut pending = self.catching_up.lock().expect("catch-up lock");
        pending.extend(self.members.peers().into_iter().map(|p| p.id));
    }

    /// Whether this is a new region still copying the deployment's data.
    pub fn is_bootstrapping(&self) -> bool {
        self.bootstrapping
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The bootstrap copy from `peer` completed.
    pub fn bootstrap_complete(&self, peer: &str) {
        self.bootstrapping
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.caught_up_with(peer);
    }

    /// Whether `id` names this region or one of its peers.
    pub fn is_region(&self, id: &str) -> bool {
        self.members.is_region(id)
    }

    /// A repair round against `peer` ran to its end.
    pub fn caught_up_with(&self, peer: &str) {
        self.catching_up.lock().expect("catch-up lock").remove(peer);
    }

    /// The peers a restored region still has to repair from before it is ready.
    pub fn catching_up(&self) -> Vec<String> {
        let pending = self.catching_up.lock().expect("catch-up lock");
        pending.iter().cloned().collect()
    }

    /// A deletion of `collection` was written or applied here: writes must read their records
    /// again, and the purge worker has rows to remove.
    pub fn deletion_applied(&self, collection: &str) {
        self.cache.forget_policy(collection);
        self.purge_wanted.notify_one();
    }

    /// Every configured collection's policy, in name order.
    pub async fn policies(&self) -> Result<Vec<(String, Policy)>, StorageError> {
        Ok(self
            .store
            .list_all(POLICY_COLLECTION)
            .await?
            .into_iter()
            .filter(|(_, state)| lww_winner(state).is_some_and(|v| !v.deleted))
            .map(|(collection, state)| {
                let policy = self.policy_of(&collection, Some(&state));
                (collection, policy)
            })
            .collect())
    }

    pub async fn write(&self, request: &WriteRequest) -> Result<WriteOutcome, ServiceError> {
        if let Some(written) = self.replay(request).await? {
            return Ok(WriteOutcome::Written(written));
        }
        let (collection, key) = (&request.collection, &request.key);
        let mut trust_cache = true;
        let mut loads = 0;
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let cached = if trust_cache {
                self.cache.base(collection, key)
            } else {
                None
            };
            let from_cache = cached.is_some();
            let mut lock = None;
            let base = match cached {
                Some(base) => base,
                None => {
                    loads += 1;
                    let loaded = if loads <= OPTIMISTIC_ATTEMPTS {
                        self.store.load(collection, key).await?
                    } else {
                        let locked = self.store.lock(collection, key).await?;
                        let loaded = locked.loaded.clone();
                        lock = Some(locked);
                        loaded
                    };
                    let policy = self.policy_of(collection, loaded.policy.as_ref());
                    self.cache.remember_policy(
                        collection,
                        &policy,
                        loaded.collection_deleted_before,
                    );
                    let summary = match loaded.visible_state() {
                        Some(state) => state.summary(),
                        None => Summary::absent(self.new_home(request, &policy, &loaded)),
                    };
                    Base {
                        rev: loaded.rev,
                        summary,
                        policy,
                        deleted_before: loaded.deleted_before,
                    }
                }
            };

            let (created, value) = match self.decide(request, &base) {
                Decision::Save { created, value } => (created, value),
                // Only a save may rest on the cache: anything else is checked against a fresh read.
                _ if from_cache => {
                    trust_cache = false;
                    continue;
                }
                Decision::Forward { home } => {
                    return Ok(WriteOutcome::Forward {
                        home,
                        policy: base.policy,
                    })
                }
                Decision::Fail(error) => return Err(error),
            };

            let actor = self.actor().await?;
            let hlc = {
                let mut clock = self.clock.lock().expect("clock lock");
                clock.stamp_write(wall_clock_ms(), base.summary.max_hlc)
            };
            // A record made anew in a deleted collection, or where a reclaimed tombstone may
            // have been: its counter starts above any its region may have issued before (see
            // `Summary::write_above`).
            let counter_floor = match base.deleted_before {
                Some(_) if !base.summary.exists => self.store.outbox_sequence().await? as u64 + 1,
                _ => 0,
            };
            let state = base.summary.write_above(&actor, hlc, value, counter_floor);
            let version = state.versions[0].clone();
            let event = Event::new(
                self.id(),
                collection,
                key,
                state.home.clone(),
                version.clone(),
            )
            .encode();
            let limit = self.max_event_bytes();
            if event.len() > limit {
                return Err(ServiceError::EventTooLarge {
                    size: event.len(),
                    limit,
                });
            }
            let event = OutboxEvent {
                bytes: &event,
                actor: actor.as_str(),
                hlc_ms: Some(hlc.millis()),
            };
            let session = SessionToken {
                collection: collection.clone(),
                key: key.clone(),
                version: version.vector.clone(),
                written_at: self.id().to_owned(),
            };
            let failover = request.route == Route::Failover;
            // Remembered only under an idempotency key (the answer encodes it again).
            let encoded_session = request.idempotency.as_ref().map(|_| session.encode());
            let idempotent = request
                .idempotency
                .as_ref()
                .zip(encoded_session.as_deref())
                .map(|(idempotency, session)| IdempotentWrite {
                    key: &idempotency.key,
                    fingerprint: &idempotency.fingerprint,
                    created,
                    failover,
                    session,
                });
            let saved = match lock {
                Some(locked) => {
                    locked
                        .save(collection, key, &state, &event, idempotent.as_ref())
                        .await?
                }
                None => {
                    self.commits
                        .save(RecordWrite::new(
                            collection,
                            key,
                            base.rev,
                            &state,
                            &event,
                            idempotent.as_ref(),
                        ))
                        .await?
                }
            };
            match saved {
                Saved::Yes => {}
                Saved::Raced => {
                    tracing::debug!(%collection, %key, "lost a write race; retrying");
                    self.cache.forget(collection, key);
                    trust_cache = false;
                    continue;
                }
                Saved::BelowFloor(floor_ms) => {
                    // A heartbeat promised past this HLC while the write was on its way: take
                    // one above the floor (the base is still good).
                    tracing::debug!(%collection, %key, floor_ms, "write stamped below the heartbeat floor; restamping");
                    self.clock
                        .lock()
                        .expect("clock lock")
                        .observe(Hlc::from_parts(floor_ms, 0), wall_clock_ms());
                    continue;
                }
                // A request with the same key was written meanwhile: its outcome is the answer.
                Saved::KeyTaken => {
                    return match self.replay(request).await? {
                        Some(written) => Ok(WriteOutcome::Written(written)),
                        None => Err(ServiceError::Contention),
                    }
                }
            }
            self.cache.remember(
                collection,
                key,
                Known {
                    rev: base.rev + 1,
                    summary: state.summary(),
                },
            );
            if collection == POLICY_COLLECTION {
                self.cache.forget_policy(key);
            }
            if collection == RESOLVER_COLLECTION {
                self.resolvers.forget_binding(key);
            }
            if collection == POLICY_COLLECTION || collection == RESOLVER_COLLECTION {
                self.resolvers.changed.notify_one();
            }
            self.outbox_signal.notify_one();
            return Ok(WriteOutcome::Written(Written {
                state,
                policy: base.policy,
                created,
                session,
                failover,
                replayed: false,
            }));
        }
        Err(ServiceError::Contention)
    }

    /// The outcome of the write this request's idempotency key was first used for, if any; a
    /// key first used for another request is refused.
    async fn replay(&self, request: &WriteRequest) -> Result<Option<Written>, ServiceError> {
        let Some(idempotency) = &request.idempotency else {
            return Ok(None);
        };
        let Some(remembered) = self.store.remembered_write(&idempotency.key).await? else {
            return Ok(None);
        };
        if remembered.fingerprint != idempotency.fingerprint {
            return Err(ServiceError::IdempotencyKeyReused);
        }
        let session = SessionToken::decode(&remembered.session).map_err(|e| {
            StorageError::Corrupt(format!("a remembered write's session token: {e}"))
        })?;
        let policy = self.policy(&request.collection).await?.unwrap_or_default();
        Ok(Some(Written {
            state: remembered.state,
            policy,
            created: remembered.created,
            session,
            failover: remembered.failover,
            replayed: true,
        }))
    }

    /// Where the write goes and whether its preconditions hold, judged on `base`.
    fn decide(&self, request: &WriteRequest, base: &Base) -> Decision {
        let summary = &base.summary;
        if let Some(elsewhere) = self.route(request.route, &base.policy, &summary.home) {
            return elsewhere;
        }
        let live = summary.is_live(&base.policy.strategy());
        match &request.precondition {
            Precondition::IfMatch(context) if !summary.exists || summary.context != *context => {
                return Decision::Fail(ServiceError::PreconditionFailed(
                    "the record changed since the ETag was read",
                ));
            }
            Precondition::IfNoneMatchAny if live => {
                return Decision::Fail(ServiceError::PreconditionFailed("the record exists"));
            }
            _ => {}
        }
        match &request.op {
            WriteOp::Put(value) => Decision::Save {
                created: !live,
                value: Some(value.clone()),
            },
            WriteOp::Delete if !live => Decision::Fail(ServiceError::NotFound),
            WriteOp::Delete => Decision::Save {
                created: false,
                value: None,
            },
        }
    }

    /// Whether a write to a record homed at `home` belongs elsewhere: forward it (a client's), or
    /// refuse it (a forwarded one: one hop only). `None`: this region takes it.
    fn route(&self, route: Route, policy: &Policy, home: &Home) -> Option<Decision> {
        if policy.homing != Homing::Record || home.region == self.config.region {
            return None;
        }
        match route {
            Route::Client => Some(Decision::Forward {
                home: home.region.clone(),
            }),
            Route::Forwarded => Some(Decision::Fail(ServiceError::NotHome {
                home: home.region.clone(),
            })),
            Route::Failover => None,
        }
    }

    /// Move a record's home to `target`: at the current home, raise the home epoch and name the
    /// new home. No value changes, so concurrent versions survive the move; the event carries the
    /// new home with a version every region may merge again harmlessly. Under the row lock, so a
    /// write racing the move either commits before it (and replicates with it) or sees the new
    /// home and is forwarded there.
    pub async fn rehome(
        &self,
        collection: &str,
        key: &str,
        target: &str,
        route: Route,
    ) -> Result<WriteOutcome, ServiceError> {
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let locked = self.store.lock(collection, key).await?;
            let policy = self.policy_of(collection, locked.loaded.policy.as_ref());
            let Some(mut state) = locked.loaded.visible_state().map(Cow::into_owned) else {
                return Err(ServiceError::NotFound);
            };
            // A rehome is never a failover write: only the home may move the home.
            let route = if route == Route::Failover {
                Route::Client
            } else {
                route
            };
            let routing_policy = Policy {
                homing: Homing::Record,
                ..policy.clone()
            };
            match self.route(route, &routing_policy, &state.home) {
                Some(Decision::Forward { home }) => {
                    return Ok(WriteOutcome::Forward { home, policy })
                }
                Some(Decision::Fail(error)) => return Err(error),
                _ => {}
            }
            let session = |state: &RecordState| SessionToken {
                collection: collection.to_owned(),
                key: key.to_owned(),
                version: state.causal_context(),
                written_at: self.id().to_owned(),
            };
            if state.home.region != target {
                if !self
                    .save_new_home(locked, collection, key, &mut state, target)
                    .await?
                {
                    continue;
                }
                tracing::info!(%collection, %key, %target, epoch = state.home.epoch, "record rehomed");
            }
            let session = session(&state);
            return Ok(WriteOutcome::Written(Written {
                state,
                policy,
                created: false,
                session,
                failover: false,
                replayed: false,
            }));
        }
        Err(ServiceError::Contention)
    }

    /// Where a new record lives: the writer's `Locus-Home`, else the collection's default home,
    /// else this region.
    /// The home of a record this write creates. In a collection that was deleted, a region that
    /// has not applied the deletion yet may still hold the old record under an old home; the new
    /// home's epoch (the deletion's wall-clock milliseconds) outranks every old one, whose epochs
    /// count rehomes or are older deletions' milliseconds.
    fn new_home(&self, request: &WriteRequest, policy: &Policy, loaded: &Loaded) -> Home {
        let region = self.placement(request, policy);
        let epoch = loaded.deleted_before.map_or(0, |horizon| {
            let old = loaded.state.as_ref().map_or(0, |s| s.home.epoch + 1);
            horizon.millis().max(old)
        });
        Home { epoch, region }
    }

    /// A region that is retiring homes no new record: its successor does.
    fn placement(&self, request: &WriteRequest, policy: &Policy) -> String {
        let chosen = request
            .home_hint
            .clone()
            .or_else(|| policy.default_home.clone())
            .unwrap_or_else(|| self.config.region.clone());
        match self.members.successor() {
            Some(successor) if chosen == self.config.region => successor,
            _ => chosen,
        }
    }

    /// Move a record homed in a retiring region (`from`) to `target` with a new home epoch, the
    /// record's versions and tombstones unchanged: at the retiring region itself, or at a survivor
    /// when it is gone for good (it cannot move them then). Returns whether it moved.
    pub async fn move_home(
        &self,
        collection: &str,
        key: &str,
        from: &str,
        target: &str,
    ) -> Result<bool, ServiceError> {
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let locked = self.store.lock(collection, key).await?;
            let Some(mut state) = locked.loaded.state.clone() else {
                return Ok(false);
            };
            if state.home.region != from {
                return Ok(false);
            }
            if self
                .save_new_home(locked, collection, key, &mut state, target)
                .await?
            {
                return Ok(true);
            }
        }
        Err(ServiceError::Contention)
    }

    /// Give a locked record the home `target` with the next home epoch, and store it with an
    /// event that carries the new home (and a version every region may merge again harmlessly).
    /// False when the row changed since it was locked: the caller tries again.
    async fn save_new_home(
        &self,
        locked: LockedRecord,
        collection: &str,
        key: &str,
        state: &mut RecordState,
        target: &str,
    ) -> Result<bool, ServiceError> {
        state.home = Home {
            epoch: state.home.epoch + 1,
            region: target.to_owned(),
        };
        let carried = lww_winner(state)
            .expect("a stored record has a version")
            .clone();
        let event = Event::new(self.id(), collection, key, state.home.clone(), carried).encode();
        let actor = self.actor().await?;
        let event = OutboxEvent {
            bytes: &event,
            actor: actor.as_str(),
            hlc_ms: None,
        };
        if locked.save(collection, key, state, &event, None).await? != Saved::Yes {
            return Ok(false);
        }
        self.cache.forget(collection, key);
        self.outbox_signal.notify_one();
        Ok(true)
    }
}
