//! The read and write paths of one region, between the HTTP layer and storage.
//!
//! A write decides where it belongs before it touches anything: a record homed elsewhere (under
//! `homing: record`) is handed back to the caller to forward, unless it already was forwarded (one
//! hop only, so two regions can never bounce a write) or the caller is making a failover write.
//! Preconditions are checked against the state the write will replace, and the new version is
//! computed by the pure [`RecordState::write`]; storage commits it only if nobody wrote in between,
//! else the write starts over from a fresh read.

use std::sync::Mutex;

use serde_json::Value;

use crate::clock::hlc::{wall_clock_ms, HybridClock};
use crate::clock::version::{Actor, SessionToken, VersionVector};
use crate::config::Config;
use crate::record::policy::{Homing, Policy, POLICY_COLLECTION};
use crate::record::view::{lww_winner, read_view};
use crate::record::{Home, RecordState};
use crate::replication::event::Event;
use crate::storage::{RegionIdentity, StorageError, Store};

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
}

#[derive(Debug, Clone)]
pub struct Written {
    pub state: RecordState,
    pub policy: Policy,
    /// The write made a record a reader can find where there was none (or only a tombstone).
    pub created: bool,
    pub session: SessionToken,
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
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// One region's state shared by every request.
pub struct Region {
    pub config: Config,
    pub store: Store,
    pub identity: RegionIdentity,
    pub actor: Actor,
    clock: Mutex<HybridClock>,
}

impl Region {
    pub fn new(config: Config, store: Store, identity: RegionIdentity) -> Region {
        let actor = Actor::new(&identity.region, &identity.incarnation);
        let clock = Mutex::new(HybridClock::new(config.clock.max_drift_ms));
        Region {
            config,
            store,
            identity,
            actor,
            clock,
        }
    }

    pub fn id(&self) -> &str {
        &self.config.region
    }

    /// The policy of `collection`, from its policy record (or the defaults).
    pub fn policy_of(&self, collection: &str, record: Option<&RecordState>) -> Policy {
        if collection == POLICY_COLLECTION {
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

    pub async fn read(
        &self,
        collection: &str,
        key: &str,
    ) -> Result<(Option<RecordState>, Policy), ServiceError> {
        let loaded = self.store.load(collection, key).await?;
        let policy = self.policy_of(collection, loaded.policy.as_ref());
        Ok((loaded.state, policy))
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

    pub async fn write(&self, request: &WriteRequest) -> Result<WriteOutcome, ServiceError> {
        for attempt in 0..MAX_WRITE_ATTEMPTS {
            let mut lock = None;
            let loaded = if attempt < OPTIMISTIC_ATTEMPTS {
                self.store.load(&request.collection, &request.key).await?
            } else {
                let locked = self.store.lock(&request.collection, &request.key).await?;
                let loaded = locked.loaded.clone();
                lock = Some(locked);
                loaded
            };
            let policy = self.policy_of(&request.collection, loaded.policy.as_ref());
            let mut state = match &loaded.state {
                Some(state) => state.clone(),
                None => RecordState::new(Home::new(self.placement(request, &policy))),
            };

            if policy.homing == Homing::Record && state.home.region != self.config.region {
                match request.route {
                    Route::Client => {
                        return Ok(WriteOutcome::Forward {
                            home: state.home.region,
                            policy,
                        })
                    }
                    Route::Forwarded => {
                        return Err(ServiceError::NotHome {
                            home: state.home.region,
                        })
                    }
                    Route::Failover => {}
                }
            }

            let before = read_view(&state, &policy.strategy());
            match &request.precondition {
                Precondition::IfMatch(context)
                    if loaded.state.is_none() || state.causal_context() != *context =>
                {
                    return Err(ServiceError::PreconditionFailed(
                        "the record changed since the ETag was read",
                    ));
                }
                Precondition::IfNoneMatchAny if before.is_live() => {
                    return Err(ServiceError::PreconditionFailed("the record exists"));
                }
                _ => {}
            }
            let created = !before.is_live();
            let value = match &request.op {
                WriteOp::Put(value) => Some(value.clone()),
                WriteOp::Delete if created => return Err(ServiceError::NotFound),
                WriteOp::Delete => None,
            };

            let hlc = {
                let mut clock = self.clock.lock().expect("clock lock");
                clock.stamp_write(wall_clock_ms(), state.max_hlc())
            };
            let version = state.write(&self.actor, hlc, value);
            let event = Event::new(
                self.id(),
                &request.collection,
                &request.key,
                state.home.clone(),
                version.clone(),
            );
            let saved = match lock {
                Some(locked) => {
                    locked
                        .save(&request.collection, &request.key, &state, &event)
                        .await?
                }
                None => {
                    self.store
                        .save(
                            &request.collection,
                            &request.key,
                            loaded.rev,
                            &state,
                            &event,
                        )
                        .await?
                }
            };
            if saved {
                let session = SessionToken {
                    collection: request.collection.clone(),
                    key: request.key.clone(),
                    version: version.vector,
                    home: state.home.region.clone(),
                };
                return Ok(WriteOutcome::Written(Written {
                    state,
                    policy,
                    created,
                    session,
                }));
            }
            tracing::debug!(collection = %request.collection, key = %request.key, "lost a write race; retrying");
        }
        Err(ServiceError::Contention)
    }

    /// Where a new record lives: the writer's `Locus-Home`, else the collection's default home,
    /// else this region.
    fn placement(&self, request: &WriteRequest, policy: &Policy) -> String {
        request
            .home_hint
            .clone()
            .or_else(|| policy.default_home.clone())
            .unwrap_or_else(|| self.config.region.clone())
    }
}
