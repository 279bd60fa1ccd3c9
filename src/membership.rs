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
//! Joining: the new region's configuration lists the existing regions. At every start it
//! announces itself to the first of them that answers (`PUT /v1/peer/members/{id}`, peer token);
//! that peer writes the membership record (one writer, so joining makes no conflict), which
//! reaches every other region through the peer's stream, and each adopts the newcomer: its
//! stream is read, requests for records homed there are forwarded to it, repair rounds include it.
//!
//! Bootstrap ([`bootstrap`]): a region on an empty database attaches its consumers to every
//! peer's stream first (from then on no event can leave those streams before it is applied
//! here), then copies every collection from one peer through anti-entropy
//! ([`crate::replication::repair`]). Before the copy starts, it asks that peer how far it has
//! applied every other region's stream: the copy holds those events and the peer's own, so once
//! it completes they are acknowledged without a merge. Meanwhile the consumers leave the events
//! waiting, rather than merge them only for the copy to bring the same records again, each
//! taking the apply lock from the other; a consumer starts applying during the copy once its
//! stream is half full, since a full one would stall its origin's outbox. The merge does not
//! care in which order a record's versions arrive, so copying and applying at once stays safe.
//! `/readyz` answers 503 with the copy's progress until it completes; a crash during the copy
//! starts it again at the next start.
//!
//! Retiring ([`retire`]): the region's records move to a successor, its stream drains, and the
//! record marks it retired, after which every region stops reading, forwarding to and repairing
//! against it. A region gone for good is retired by a survivor, which takes over its records.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_nats::jetstream;
use futures_util::StreamExt;
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
    #[serde(default)]
    pub state: MemberState,
    /// While retiring and once retired: the region its records were moved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rehome_to: Option<String>,
}

impl MemberRecord {
    pub fn active(api_url: impl Into<String>) -> MemberRecord {
        MemberRecord {
            api_url: api_url.into(),
            state: MemberState::Active,
            rehome_to: None,
        }
    }
}

/// Where a region is in its life. Retired is for good: a region id once retired is not reused
/// (its version-vector entries stay in every record it wrote).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    #[default]
    Active,
    /// Its records are being moved to `rehome_to`; it homes no new record.
    Retiring,
    /// Gone: no region reads its stream, forwards to it or repairs against it.
    Retired,
}

/// The peers of this region: those of its configuration and those the membership records added,
/// less the retired.
pub struct Members {
    own: String,
    /// The peers of the configuration: reached at the URL configured (an operator may route to a
    /// peer by another path than the one it announces); records only add regions.
    configured: std::collections::BTreeSet<String>,
    peers: RwLock<BTreeMap<String, String>>,
    retired: RwLock<std::collections::BTreeSet<String>>,
    /// This region is retiring: the region that homes the records it would have homed.
    own_successor: RwLock<Option<String>>,
    /// The consumer of each peer's stream.
    consumers: Mutex<BTreeMap<String, JoinHandle<()>>>,
    /// The region's JetStream, once connected (retirement removes streams and consumers).
    js: std::sync::OnceLock<jetstream::Context>,
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
    /// A peer that is now retired.
    Retired,
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
            retired: RwLock::default(),
            own_successor: RwLock::default(),
            consumers: Mutex::default(),
            js: std::sync::OnceLock::new(),
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

    /// This region or one of its peers (not a retired one).
    pub fn is_region(&self, id: &str) -> bool {
        (id == self.own && !self.is_retired(id)) || self.is_peer(id)
    }

    pub fn is_retired(&self, id: &str) -> bool {
        self.retired.read().expect("members lock").contains(id)
    }

    /// The regions retired from the deployment, in id order.
    pub fn retired(&self) -> Vec<String> {
        self.retired
            .read()
            .expect("members lock")
            .iter()
            .cloned()
            .collect()
    }

    /// While this region retires: the region new records are homed in instead of this one.
    pub fn successor(&self) -> Option<String> {
        self.own_successor.read().expect("members lock").clone()
    }

    /// Take in what a membership record says about region `id`.
    pub fn adopt(&self, id: &str, record: &MemberRecord) -> Adoption {
        if record.state != MemberState::Active && id == self.own {
            *self.own_successor.write().expect("members lock") = record.rehome_to.clone();
        }
        if record.state == MemberState::Retired {
            let newly = self
                .retired
                .write()
                .expect("members lock")
                .insert(id.to_owned());
            self.peers.write().expect("members lock").remove(id);
            return if newly && id != self.own {
                Adoption::Retired
            } else {
                Adoption::Unchanged
            };
        }
        if id == self.own || self.configured.contains(id) || self.is_retired(id) {
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

    /// The region is connected to JetStream: start reading every peer's stream.
    pub fn connected(&self, region: &Arc<Region>, js: jetstream::Context) {
        let _ = self.js.set(js);
        for peer in self.peers() {
            self.start_consumer(region, &peer.id);
        }
    }

    fn start_consumer(&self, region: &Arc<Region>, origin: &str) {
        let Some(js) = self.js.get().cloned() else {
            return; // started with the others once connected
        };
        let (r, origin_id) = (region.clone(), origin.to_owned());
        let consumer = region
            .supervisor
            .spawn(format!("consumer:{origin}"), move || {
                crate::replication::consumer::run(r.clone(), js.clone(), origin_id.clone())
            });
        if let Some(old) = self
            .consumers
            .lock()
            .expect("members lock")
            .insert(origin.to_owned(), consumer)
        {
            old.abort();
        }
    }

    fn stop_consumer(&self, origin: &str) {
        if let Some(consumer) = self.consumers.lock().expect("members lock").remove(origin) {
            consumer.abort();
        }
    }

    /// Stop every consumer (the region is stopping).
    pub fn stop_consumers(&self) {
        for (_, consumer) in std::mem::take(&mut *self.consumers.lock().expect("members lock")) {
            consumer.abort();
        }
    }
}

fn normalized(url: &str) -> String {
    url.trim_end_matches('/').to_owned()
}

/// The record of a region that announces itself: refused when it is retiring or retired (a region
/// id once retired is not reused, and a retiring region's restart must not undo its retirement).
pub async fn record_announced(
    region: &Region,
    id: &str,
    record: &MemberRecord,
) -> Result<Option<bool>, crate::service::ServiceError> {
    let current = member_record(region, id).await?;
    if region.members.is_retired(id) || current.is_some_and(|c| c.state != MemberState::Active) {
        return Ok(None);
    }
    record_member(region, id, record).await.map(Some)
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
        idempotency: None,
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

/// Keep this region's view of the membership current: announce itself once per process to the
/// first configured peer that answers, and adopt every region the records name.
///
/// One peer writes the region's membership record, the others receive it through that peer's
/// stream: two regions writing it at once would only make a conflict in every conflict log.
pub async fn run(region: Arc<Region>, own_url: String) {
    let own = MemberRecord::active(own_url);
    let mut announced = false;
    let client = region
        .peer_trust
        .client(&region.config)
        .timeout(region.config.request_timeout())
        .build()
        .expect("an HTTP client with plain settings builds");
    loop {
        // A retiring or retired region never announces itself as active again.
        if !announced
            && region.members.successor().is_none()
            && !region.members.is_retired(region.id())
        {
            announced = announce(&region, &client, &own).await;
        }
        if let Err(error) = adopt_recorded(&region).await {
            tracing::warn!(%error, "cannot read the membership records; retrying");
        }
        tokio::select! {
            _ = tokio::time::sleep(SYNC_EVERY) => {}
            _ = region.members.changed.notified() => {}
        }
    }
}

/// Announce this region to its configured peers in order until one takes it; whether one did
/// (or there is nobody to tell).
async fn announce(region: &Region, client: &reqwest::Client, own: &MemberRecord) -> bool {
    for peer in &region.config.peers {
        let url = format!(
            "{}/v1/peer/members/{}",
            normalized(&peer.api_url),
            region.id()
        );
        let answer = client
            .put(url)
            .bearer_auth(region.config.peer_token.expose())
            .json(own)
            .send()
            .await;
        match answer {
            Ok(answer) if answer.status().is_success() => {
                tracing::info!(peer = %peer.id, url = %own.api_url, "announced this region to the deployment");
                return true;
            }
            Ok(answer) => {
                tracing::debug!(peer = %peer.id, status = %answer.status(), "peer did not take this region's announcement")
            }
            Err(error) => {
                tracing::debug!(peer = %peer.id, %error, "peer unreachable for this region's announcement")
            }
        }
    }
    region.config.peers.is_empty()
}

/// Take in the membership records held here, before the region starts replicating: a restarted
/// region reads the streams of regions it adopted and not those of retired ones.
pub async fn load_recorded(region: &Region) -> Result<(), crate::storage::StorageError> {
    for (id, record) in recorded(region).await? {
        region.members.adopt(&id, &record);
    }
    Ok(())
}

async fn recorded(
    region: &Region,
) -> Result<Vec<(String, MemberRecord)>, crate::storage::StorageError> {
    let mut records = Vec::new();
    for (id, state) in region.store.list_all(REGIONS_COLLECTION).await? {
        let Some(winner) = lww_winner(&state).filter(|v| !v.deleted) else {
            continue;
        };
        match serde_json::from_value::<MemberRecord>(winner.value.clone()) {
            Ok(record) => records.push((id, record)),
            Err(error) => {
                tracing::warn!(region = %id, %error, "membership record does not decode; ignored")
            }
        }
    }
    Ok(records)
}

/// Adopt every region the membership records name that this region does not know yet (read its
/// stream, forward to it, repair against it), and let go of every region retired since.
async fn adopt_recorded(region: &Arc<Region>) -> Result<(), crate::storage::StorageError> {
    for (id, record) in recorded(region).await? {
        match region.members.adopt(&id, &record) {
            Adoption::Unchanged => {}
            Adoption::Moved => {
                tracing::info!(peer = %id, url = %record.api_url, "peer's API moved")
            }
            Adoption::New => {
                tracing::info!(peer = %id, url = %record.api_url, "region joined the deployment; adopting it");
                // Its stream keeps every event for this region: the newcomer created this
                // region's consumer on it with the stream. No repair round now: it would scan
                // every collection here to compare with a region that is still copying them.
                region.members.start_consumer(region, &id);
            }
            Adoption::Retired => {
                tracing::info!(peer = %id, rehomed_to = ?record.rehome_to, "region retired; no longer reading, forwarding to or repairing against it");
                region.members.stop_consumer(&id);
                if let Some(js) = region.members.js.get() {
                    let own =
                        crate::replication::stream_name(&region.config.deployment, region.id());
                    if let Err(error) = remove_consumer(js, &own, &id).await {
                        tracing::warn!(peer = %id, %error, "cannot remove the retired region's consumer from this region's stream");
                    }
                }
                // What the retired region's stream still carried comes from the survivors.
                region.repair_wanted.notify_one();
            }
        }
    }
    Ok(())
}

/// Remove `reader`'s consumer from `stream`; a stream or consumer already gone is fine.
async fn remove_consumer(
    js: &jetstream::Context,
    stream: &str,
    reader: &str,
) -> Result<(), async_nats::Error> {
    let stream = match js.get_stream(stream).await {
        Ok(stream) => stream,
        Err(error) if error.to_string().contains("not found") => return Ok(()),
        Err(error) => return Err(error.into()),
    };
    match stream
        .delete_consumer(&crate::replication::consumer_name(reader))
        .await
    {
        Ok(_) => Ok(()),
        Err(error) if error.to_string().contains("not found") => Ok(()),
        Err(error) => Err(error.into()),
    }
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
        for peer in peers_by_answer(region).await {
            let held = held_by_a_copy_from(region, &peer.id).await;
            if let Ok(report) = crate::replication::repair::round(region, &peer.id).await {
                // A restored peer may lack some of its own history, and a record skipped or
                // unrepairable is not here: the copy then does not stand for those events.
                let complete = !report.peer_restoring
                    && report.records_skipped == 0
                    && report.records_unrepairable == 0;
                if complete {
                    for (origin, through) in held {
                        cover_copied_history(region, &origin, through).await;
                    }
                }
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

/// How long a new region waits for a peer's first answer before it copies from the others first.
const FIRST_ANSWER_WAIT: Duration = Duration::from_secs(3);

/// The peers to copy from, in the order their APIs answered a probe sent to all at once. A peer
/// whose API hangs (its host overloaded, its process stuck) would otherwise hold the copy for the
/// peer client's whole timeout, a minute, while another could serve it at once. Peers that did not
/// answer within [`FIRST_ANSWER_WAIT`] are left out of this pass when another answered, and are
/// the whole pass (each tried with the full timeout) when none did: a peer slow to answer a probe
/// may still serve a copy.
async fn peers_by_answer(region: &Region) -> Vec<Peer> {
    let peers = region.members.peers();
    let client = crate::replication::repair::PeerClient::new(region);
    let mut probes: futures_util::stream::FuturesUnordered<_> = peers
        .iter()
        .map(|peer| {
            let client = &client;
            async move {
                client
                    .answers_within(&peer.id, FIRST_ANSWER_WAIT)
                    .await
                    .then(|| peer.clone())
            }
        })
        .collect();
    let mut answered = Vec::new();
    while let Some(probe) = probes.next().await {
        answered.extend(probe);
    }
    drop(probes);
    if answered.is_empty() {
        return peers;
    }
    if answered.len() < peers.len() {
        let silent: Vec<&str> = peers
            .iter()
            .filter(|p| !answered.iter().any(|a| a.id == p.id))
            .map(|p| p.id.as_str())
            .collect();
        tracing::warn!(
            ?silent,
            wait_secs = FIRST_ANSWER_WAIT.as_secs(),
            "peers did not answer a probe in time; copying from the others first"
        );
    }
    answered
}

/// The last sequence of `peer`'s stream, if known (0 when empty). Every event up to it was
/// committed at the peer before it was published, so a copy of the peer started afterwards
/// holds what those events carry.
async fn last_published(region: &Region, peer: &str) -> Option<u64> {
    let js = region.members.js.get()?;
    let stream = crate::replication::stream_name(&region.config.deployment, peer);
    match js.get_stream(&stream).await {
        Ok(mut stream) => match stream.info().await {
            Ok(info) => Some(info.state.last_sequence),
            Err(error) => {
                tracing::debug!(%peer, %error, "no stream position before the copy");
                None
            }
        },
        Err(error) => {
            tracing::debug!(%peer, %error, "no stream position before the copy");
            None
        }
    }
}

/// The events of every stream that a copy from `peer`, started now, is sure to hold: its own
/// stream's through the last (each was committed at the peer before it was published), and every
/// other origin's through the sequence the peer had applied everything of. Asked before the copy
/// starts, so every record the copy then reads already holds what those events carry.
async fn held_by_a_copy_from(region: &Region, peer: &str) -> Vec<(String, u64)> {
    let mut held: Vec<(String, u64)> = last_published(region, peer)
        .await
        .map(|last| (peer.to_owned(), last))
        .into_iter()
        .collect();
    let client = crate::replication::repair::PeerClient::new(region);
    let applied = match client.applied(peer).await {
        Ok(applied) => applied,
        Err(error) => {
            // A peer of an earlier build has no such call: only its own stream counts as held.
            tracing::debug!(%peer, %error, "no applied positions from the peer before the copy");
            return held;
        }
    };
    for (origin, through) in applied {
        if origin == peer || !region.members.is_peer(&origin) {
            continue;
        }
        // A stream recreated since the peer applied it numbers its events anew: a position
        // beyond its last event says nothing about it.
        if last_published(region, &origin)
            .await
            .is_some_and(|last| through <= last)
        {
            held.push((origin, through));
        }
    }
    held
}

/// After a copy that holds every event of `origin`'s stream through `through` ([`held_by_a_copy_from`]):
/// mark them applied, and tell this process's consumer to acknowledge them without merging
/// history the copy already brought (after a restart they are merged again, to the same result).
/// Best effort: without the mark they are merged too.
async fn cover_copied_history(region: &Region, origin: &str, through: u64) {
    if through == 0 {
        return;
    }
    match region.store.cover_ranges(origin, &[(1, through)]).await {
        Ok(()) => {
            region.replication.copy_holds(origin, through);
            tracing::info!(%origin, through, "the copy holds these events of the origin's stream; they are acknowledged without being merged again")
        }
        Err(error) => {
            tracing::warn!(%origin, %error, "cannot mark the copied events as held; they are merged again")
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RetireError {
    #[error("{0:?} is not a region of this deployment")]
    UnknownRegion(String),
    /// The successor is not a region that can take the records.
    #[error("{0}")]
    BadSuccessor(String),
    /// The request was sent to the wrong region for what it asks.
    #[error("{0}")]
    WrongRegion(String),
    /// A step did not complete in time (NATS unreachable, a peer that does not apply).
    #[error("{0}")]
    Stalled(String),
    #[error(transparent)]
    Repair(#[from] crate::replication::repair::RepairError),
    #[error(transparent)]
    Service(#[from] crate::service::ServiceError),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
}

/// What a retirement did.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RetireReport {
    pub region: String,
    pub rehomed_to: String,
    /// Retired by a survivor because the region is gone for good.
    pub gone: bool,
    pub records_rehomed: u64,
    pub seconds: f64,
}

/// How long each waiting step of a retirement may take.
const RETIRE_STEP: Duration = Duration::from_secs(60);
/// Records rehomed per page of the scan.
const REHOME_PAGE: i64 = 500;
/// Records moved at once, each in its own transaction.
const MOVES_AT_ONCE: usize = 4;

/// Retire region `id`, moving its records to `successor`.
///
/// Live (`id` is this region): mark this region retiring (it homes no new record from then on),
/// rehome every record it homes (as the home, the ordinary way), let its outbox drain, mark it
/// retired, wait until every reader of its stream has applied all of it, then remove its stream
/// and its consumers. The peers, on applying the retired record, stop reading, forwarding to and
/// repairing against it, and remove its consumer from their own streams.
///
/// Gone for good (`gone`, run by a survivor): after a repair round against every other survivor
/// and once this region has applied everything the gone region's stream holds, take over each of
/// its records with a new home epoch, mark it retired and remove its stream. Version-vector entries
/// of a retired region stay in every record: they are history, not membership.
pub async fn retire(
    region: &Region,
    id: &str,
    successor: &str,
    gone: bool,
) -> Result<RetireReport, RetireError> {
    let started = std::time::Instant::now();
    if !region.members.is_region(id) {
        return Err(RetireError::UnknownRegion(id.to_owned()));
    }
    if successor == id || !region.members.is_region(successor) {
        return Err(RetireError::BadSuccessor(format!(
            "{successor:?} cannot take {id}'s records: name another region of this deployment"
        )));
    }
    let url = member_record(region, id)
        .await?
        .map(|r| r.api_url)
        .or_else(|| region.members.url(id))
        .unwrap_or_default();
    let marked = |state| MemberRecord {
        api_url: url.clone(),
        state,
        rehome_to: Some(successor.to_owned()),
    };
    let records_rehomed = if id == region.id() {
        if gone {
            return Err(RetireError::WrongRegion(format!(
                "{id} answers this request, so it is not gone: retire it without \"gone\""
            )));
        }
        let retiring = marked(MemberState::Retiring);
        record_member(region, id, &retiring).await?;
        region.members.adopt(id, &retiring);
        tracing::info!(%successor, "retiring: moving this region's records to its successor");
        let moved = rehome_all(region, id, successor).await?;
        wait_for_outbox(region).await?;
        let retired = marked(MemberState::Retired);
        record_member(region, id, &retired).await?;
        wait_for_outbox(region).await?;
        let own_stream = crate::replication::stream_name(&region.config.deployment, id);
        wait_until_read(region, &own_stream).await;
        region.members.stop_consumers();
        region.members.adopt(id, &retired);
        if let Some(js) = region.members.js.get() {
            for peer in region.members.peers() {
                let stream = crate::replication::stream_name(&region.config.deployment, &peer.id);
                if let Err(error) = remove_consumer(js, &stream, id).await {
                    tracing::warn!(peer = %peer.id, %error, "cannot remove this region's consumer from the peer's stream");
                }
            }
            delete_stream(js, &own_stream).await;
        }
        moved
    } else {
        if !gone {
            let at = region.members.url(id).unwrap_or_default();
            return Err(RetireError::WrongRegion(format!(
                "a region retires itself: send this to {id} ({at}); if {id} is gone for good, add \"gone\": true"
            )));
        }
        if answers(region, &url).await {
            return Err(RetireError::WrongRegion(format!(
                "{id} answers at {url}, so it is not gone: retire it at {id} itself"
            )));
        }
        record_member(region, id, &marked(MemberState::Retiring)).await?;
        for peer in region.members.peers() {
            if peer.id != id {
                crate::replication::repair::round(region, &peer.id).await?;
            }
        }
        let gone_stream = crate::replication::stream_name(&region.config.deployment, id);
        wait_until_applied(region, &gone_stream).await?;
        tracing::info!(%id, %successor, "taking over the records of a region gone for good");
        let moved = rehome_all(region, id, successor).await?;
        let retired = marked(MemberState::Retired);
        record_member(region, id, &retired).await?;
        region.members.adopt(id, &retired);
        region.members.stop_consumer(id);
        wait_for_outbox(region).await?;
        if let Some(js) = region.members.js.get() {
            let own = crate::replication::stream_name(&region.config.deployment, region.id());
            if let Err(error) = remove_consumer(js, &own, id).await {
                tracing::warn!(%id, %error, "cannot remove the retired region's consumer");
            }
            delete_stream(js, &gone_stream).await;
        }
        region.repair_wanted.notify_one();
        moved
    };
    let report = RetireReport {
        region: id.to_owned(),
        rehomed_to: successor.to_owned(),
        gone,
        records_rehomed,
        seconds: started.elapsed().as_secs_f64(),
    };
    tracing::info!(retired = %id, %successor, gone, records_rehomed, "region retired");
    Ok(report)
}

async fn member_record(
    region: &Region,
    id: &str,
) -> Result<Option<MemberRecord>, crate::storage::StorageError> {
    Ok(recorded(region)
        .await?
        .into_iter()
        .find_map(|(member, record)| (member == id).then_some(record)))
}

/// Move every record homed in `from` to `to`, tombstones included, page by page, until a pass
/// finds none (a record created meanwhile is caught by the next pass).
async fn rehome_all(region: &Region, from: &str, to: &str) -> Result<u64, RetireError> {
    let mut moved = 0;
    loop {
        let mut after = None;
        let mut found = 0;
        loop {
            let page = region
                .store
                .homed_in(from, after.as_ref(), REHOME_PAGE)
                .await?;
            let Some(last) = page.last().cloned() else {
                break;
            };
            found += page.len();
            // A few at once: each move is its own short transaction on one row.
            let mut moves = futures_util::stream::iter(page)
                .map(|(collection, key)| async move {
                    region.move_home(&collection, &key, from, to).await
                })
                .buffer_unordered(MOVES_AT_ONCE);
            while let Some(changed) = moves.next().await {
                moved += u64::from(changed?);
            }
            tracing::info!(moved, "rehoming the retiring region's records");
            after = Some(last);
        }
        if found == 0 {
            return Ok(moved);
        }
    }
}

async fn wait_for_outbox(region: &Region) -> Result<(), RetireError> {
    let deadline = tokio::time::Instant::now() + RETIRE_STEP;
    while region.store.outbox_backlog().await? > 0 {
        if tokio::time::Instant::now() > deadline {
            return Err(RetireError::Stalled(
                "the outbox did not drain within 60 s: is NATS reachable? Retry the retirement once it is".into(),
            ));
        }
        region.outbox_signal.notify_one();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Wait (a while) until no event of `stream` is left unacknowledged by its readers: every peer
/// has applied all this region wrote. A peer that does not gets the rest by repair.
async fn wait_until_read(region: &Region, stream: &str) {
    let Some(js) = region.members.js.get() else {
        return;
    };
    let deadline = tokio::time::Instant::now() + RETIRE_STEP;
    while tokio::time::Instant::now() < deadline {
        match js.get_stream(stream).await {
            Ok(mut s) => match s.info().await {
                Ok(info) if info.state.messages == 0 => return,
                _ => {}
            },
            Err(_) => return,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::warn!(%stream, "peers did not apply all of this region's stream within 60 s; they repair the rest from the survivors");
}

/// Wait until this region has applied every event of `stream` (a gone region's).
async fn wait_until_applied(region: &Region, stream: &str) -> Result<(), RetireError> {
    let Some(js) = region.members.js.get() else {
        return Ok(());
    };
    let consumer = crate::replication::consumer_name(region.id());
    let deadline = tokio::time::Instant::now() + RETIRE_STEP;
    loop {
        let Ok(s) = js.get_stream(stream).await else {
            return Ok(()); // no stream: nothing left to apply
        };
        match s.consumer_info(&consumer).await {
            Ok(info) if info.num_pending == 0 && info.num_ack_pending == 0 => return Ok(()),
            Err(_) => return Ok(()),
            _ => {}
        }
        if tokio::time::Instant::now() > deadline {
            return Err(RetireError::Stalled(format!(
                "this region has not applied all of {stream} within 60 s; retry once replication catches up"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn delete_stream(js: &jetstream::Context, stream: &str) {
    match js.delete_stream(stream).await {
        Ok(_) => {}
        Err(error) if error.to_string().contains("not found") => {}
        Err(error) => {
            tracing::warn!(%stream, %error, "cannot delete the retired region's stream; delete it by hand")
        }
    }
}

/// Whether the API at `url` answers its liveness check within a second.
async fn answers(region: &Region, url: &str) -> bool {
    let client = region
        .peer_trust
        .client(&region.config)
        .timeout(Duration::from_secs(1))
        .build()
        .expect("an HTTP client with plain settings builds");
    client
        .get(format!("{url}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}
