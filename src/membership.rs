//! Which regions make up the deployment, and how a new one joins it online.
//!
//! A region's configuration lists the peers it starts with; the deployment's membership lives in
//! a replicated system collection, [`REGIONS_COLLECTION`], one record per region naming the URL
//! its API is reached at. Why a record rather than a rolling change of every region's
//! configuration: a rolling change restarts every region to add one, and until the last restart
//! some regions forward to, replicate from and repair against a different set than others. The
//! record travels the path every write already takes (outbox, stream, repair), so each region
//! learns a new member within a replication delay, without a restart, and one that was down
//! learns it from repair.
//!
//! Joining: the new region's configuration lists the existing regions. It announces itself to
//! each (`PUT /v1/peer/members/{id}`, peer token); the peer writes the membership record, which
//! reaches every other region through the peer's stream, and each adopts the newcomer: its
//! stream is read, requests for records homed there are forwarded to it, repair rounds include it.
//!
//! Bootstrap ([`bootstrap`]): a region on an empty database attaches its consumers to every
//! peer's stream first (from then on no event can leave those streams before it is applied
//! here), applies their events while it copies, and copies every collection from one peer through
//! anti-entropy ([`crate::replication::repair`]). The merge does not care in which order a record's
//! versions arrive, so copying and applying at once is safe, and a consumer that waited for the
//! copy would pin the peers' streams and stall their outboxes. `/readyz` answers 503 with the
//! copy's progress until it completes; a crash during the copy starts it again at the next start.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_nats::jetstream;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::config::{Config, Peer};
use crate::record::policy::REGIONS_COLLECTION;
use crate::record::view::lww_winner;
use crate::service::{Precondition, Region, Route, WriteOp, WriteRequest};

/// How often a region reads the membership records (a change also wakes it at once).
const SYNC_EVERY: Duration = Duration::from_secs(2);

/// The value of a region's membership record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberRecord {
    /// Base URL of the region's REST API.
    pub api_url: String,
}

/// The peers of this region: those of its configuration and those the membership records added.
pub struct Members {
    own: String,
    /// The peers of the configuration: reached at the URL configured (an operator may route to a
    /// peer by another path than the one it announces); records only add regions.
    configured: std::collections::BTreeSet<String>,
    peers: RwLock<BTreeMap<String, String>>,
    /// Consumers started for adopted regions (the configured ones start with the region).
    adopted_consumers: Mutex<Vec<JoinHandle<()>>>,
    /// Woken when a membership record is written or applied here.
    pub changed: tokio::sync::Notify,
}

/// What adopting a membership record changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Adoption {
    /// A region not known before.
    New,
    /// A known region, now at another URL.
    Moved,
    Unchanged,
}

impl Members {
    pub fn new(config: &Config) -> Members {
        Members {
            own: config.region.clone(),
            configured: config.peers.iter().map(|p| p.id.clone()).collect(),
            peers: RwLock::new(
                config
                    .peers
                    .iter()
                    .map(|p| (p.id.clone(), normalized(&p.api_url)))
                    .collect(),
            ),
            adopted_consumers: Mutex::new(Vec::new()),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Every peer, in id order.
    pub fn peers(&self) -> Vec<Peer> {
        self.peers
            .read()
            .expect("members lock")
            .iter()
            .map(|(id, url)| Peer {
                id: id.clone(),
                api_url: url.clone(),
            })
            .collect()
    }

    pub fn url(&self, peer: &str) -> Option<String> {
        self.peers.read().expect("members lock").get(peer).cloned()
    }

    pub fn is_peer(&self, id: &str) -> bool {
        self.peers.read().expect("members lock").contains_key(id)
    }

    /// This region or one of its peers.
    pub fn is_region(&self, id: &str) -> bool {
        id == self.own || self.is_peer(id)
    }

    /// Take in what a membership record says about region `id`.
    pub fn adopt(&self, id: &str, record: &MemberRecord) -> Adoption {
        if id == self.own || self.configured.contains(id) {
            return Adoption::Unchanged;
        }
        let url = normalized(&record.api_url);
        let mut peers = self.peers.write().expect("members lock");
        match peers.insert(id.to_owned(), url.clone()) {
            None => Adoption::New,
            Some(old) if old != url => Adoption::Moved,
            Some(_) => Adoption::Unchanged,
        }
    }

    /// Stop the consumers of adopted regions (the region is stopping).
    pub fn stop_adopted(&self) {
        for consumer in self
            .adopted_consumers
            .lock()
            .expect("members lock")
            .drain(..)
        {
            consumer.abort();
        }
    }
}

fn normalized(url: &str) -> String {
    url.trim_end_matches('/').to_owned()
}

/// Write region `id`'s membership record here, unless it already says the same; returns whether
/// it wrote. It then replicates to every region that reads this one.
pub async fn record_member(
    region: &Region,
    id: &str,
    record: &MemberRecord,
) -> Result<bool, crate::service::ServiceError> {
    let held = region.store.load(REGIONS_COLLECTION, id).await?;
    let current = held
        .state
        .as_ref()
        .and_then(lww_winner)
        .filter(|v| !v.deleted)
        .and_then(|v| serde_json::from_value::<MemberRecord>(v.value.clone()).ok());
    if current.as_ref() == Some(record) {
        return Ok(false);
    }
    let request = WriteRequest {
        collection: REGIONS_COLLECTION.to_owned(),
        key: id.to_owned(),
        op: WriteOp::Put(serde_json::to_value(record).expect("a member record serializes")),
        precondition: Precondition::None,
        home_hint: None,
        route: Route::Client,
    };
    region.write(&request).await?;
    region.members.changed.notify_one();
    Ok(true)
}

/// Keep this region's view of the membership current: record its own URL, announce itself to
/// its configured peers (once each per process), and adopt every region the records name.
pub async fn run(region: Arc<Region>, js: jetstream::Context, own_url: String) {
    let own = MemberRecord { api_url: own_url };
    // Writes wait for the incarnation (at most the peers' answer window at start).
    region.settled().await;
    let mut recorded = false;
    let mut announced = std::collections::BTreeSet::new();
    let client = reqwest::Client::builder()
        .connect_timeout(region.config.connect_timeout())
        .timeout(region.config.request_timeout())
        .build()
        .expect("an HTTP client with plain settings builds");
    loop {
        if !recorded {
            match record_member(&region, region.id(), &own).await {
                Ok(_) => recorded = true,
                Err(error) => {
                    tracing::warn!(%error, "cannot record this region's membership; retrying")
                }
            }
        }
        for peer in &region.config.peers {
            if announced.contains(&peer.id) {
                continue;
            }
            let url = format!(
                "{}/v1/peer/members/{}",
                normalized(&peer.api_url),
                region.id()
            );
            let answer = client
                .put(url)
                .bearer_auth(&region.config.peer_token)
                .json(&own)
                .send()
                .await;
            match answer {
                Ok(answer) if answer.status().is_success() => {
                    announced.insert(peer.id.clone());
                }
                Ok(answer) => {
                    tracing::debug!(peer = %peer.id, status = %answer.status(), "peer did not take this region's announcement yet")
                }
                Err(error) => {
                    tracing::debug!(peer = %peer.id, %error, "peer unreachable for this region's announcement")
                }
            }
        }
        if let Err(error) = adopt_recorded(&region, &js).await {
            tracing::warn!(%error, "cannot read the membership records; retrying");
        }
        tokio::select! {
            _ = tokio::time::sleep(SYNC_EVERY) => {}
            _ = region.members.changed.notified() => {}
        }
    }
}

/// Adopt every region the membership records name that this region does not know yet: read its
/// stream (creating this region's consumer on it, and the stream if it is missing), forward to
/// it, repair against it.
async fn adopt_recorded(
    region: &Arc<Region>,
    js: &jetstream::Context,
) -> Result<(), crate::storage::StorageError> {
    for (id, state) in region.store.list_all(REGIONS_COLLECTION).await? {
        let Some(winner) = lww_winner(&state).filter(|v| !v.deleted) else {
            continue;
        };
        let Ok(record) = serde_json::from_value::<MemberRecord>(winner.value.clone()) else {
            tracing::warn!(region = %id, "membership record does not decode; ignored");
            continue;
        };
        match region.members.adopt(&id, &record) {
            Adoption::Unchanged => {}
            Adoption::Moved => {
                tracing::info!(peer = %id, url = %record.api_url, "peer's API moved")
            }
            Adoption::New => {
                tracing::info!(peer = %id, url = %record.api_url, "region joined the deployment; adopting it");
                let (r, j, origin) = (region.clone(), js.clone(), id.clone());
                let consumer = region.supervisor.spawn(format!("consumer:{id}"), move || {
                    crate::replication::consumer::run(r.clone(), j.clone(), origin.clone())
                });
                region
                    .members
                    .adopted_consumers
                    .lock()
                    .expect("members lock")
                    .push(consumer);
                // Whatever the newcomer holds that the stream will not bring (a write it took
                // before this region adopted it) comes with the next round.
                region.repair_wanted.notify_one();
            }
        }
    }
    Ok(())
}

/// The first copy of a region on an empty database; see the module docs. Returns once a repair
/// round against one peer has completed after every configured peer's stream had this region's
/// consumer; the database is then marked as holding the deployment's data.
pub async fn bootstrap(region: &Region) {
    let configured: Vec<String> = region.config.peers.iter().map(|p| p.id.clone()).collect();
    tracing::info!(peers = ?configured, "new region: attaching to every peer's stream, then copying the deployment's data");
    while !configured
        .iter()
        .all(|peer| region.replication.is_consumer_attached(peer))
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    loop {
        for peer in region.members.peers() {
            if crate::replication::repair::round(region, &peer.id)
                .await
                .is_ok()
            {
                loop {
                    match region.store.mark_bootstrapped().await {
                        Ok(()) => break,
                        Err(error) => {
                            tracing::warn!(%error, "cannot record the completed copy; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
                region.bootstrap_complete(&peer.id);
                tracing::info!(from = %peer.id, "copy complete: this region holds the deployment's data and is ready");
                return;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
