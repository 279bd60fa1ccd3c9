//! Anti-entropy: a region pulls from a peer whatever it lacks, whatever the stream lost.
//!
//! The stream is the fast path, never the only one: a transport that purges events, a peer that
//! rejects one, a restore that rewinds, all leave regions apart, and only a comparison of what
//! the regions hold brings them back. A round against one peer:
//! 1. lists the peer's collections (system collections included: policies, resolver bindings);
//! 2. per collection, compares the peer's bucket digests ([`crate::record::digest`]) with its own;
//! 3. per differing bucket where the peer holds one record more, asks for the record whose hash
//!    is the XOR of the two digests: if nothing else differs there, that record is what the
//!    bucket lacks, found without listing its keys. A region that missed a few writes in a
//!    million lacks them one to a bucket, so most of its repair takes this path;
//! 4. per other differing bucket (and one where step 3 found nothing), pages through the peer's
//!    `(key, hash)` list and picks the keys whose hash differs here (or that are missing here);
//! 5. fetches only those records' states and merges them through the same apply as replicated
//!    events (same merge, conflict log and resolution), in transactions of at most
//!    [`MERGE_RECORDS`] records that never touch the applied stream positions, several at once.
//!
//! A collection this region holds nothing of (a new region's first copy, a collection lost
//! whole) skips steps 2 to 4: every record the peer holds is wanted, so the round pages through
//! them in key order ([`copy_pages`]) and merges them as in step 5.
//!
//! Merging a peer's state is safe whatever it holds, so step 3 trusts the XOR: a bucket that
//! differs otherwise, by chance, only has its listing put off to the next round. The steps of a
//! collection overlap (finding runs ahead of fetching, fetching ahead of merging), linked by
//! bounded channels.
//!
//! Pull-only and idempotent: what this region holds that the peer lacks, the peer pulls in its own
//! round, and two regions repairing each other at once is harmless. Memory is bounded by one page
//! of hashes and a few merge transactions' worth of states, whatever the collection's size.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::consumer::apply_with_retries;
use super::event::{Change, Event};
use super::status::RepairProgress;
use crate::clock::hlc::Hlc;
use crate::record::digest::{bucket_of, BucketDigest, StateHash};
use crate::record::digest_frames::{
    DIGESTS_MEDIA_TYPE, RECLAIMED_THROUGH_HEADER, RESTORING_HEADER,
};
use crate::record::RecordState;
use crate::service::Region;
use crate::storage::repair::{BucketHash, HashCursor};
use crate::storage::StorageError;

/// `(bucket, key, hash)` triples per page of a listing.
pub const HASH_PAGE: i64 = 10_000;
/// Most keys asked for in one fetch of states. Fewer, larger fetches cost less per record (one
/// request and one statement per thousand): 1,000 rather than 200 copied a new region 12% faster
/// and repaired 1% of a million records 14% faster, with the same peak memory.
pub const FETCH_KEYS: usize = 1_000;
/// The most keys per fetch that builds before [`FETCH_KEYS`] rose accept: asked of a peer that
/// refuses a larger fetch, so regions of both builds repair each other during an upgrade.
const EARLIER_FETCH_KEYS: usize = 200;
/// About the most state bytes one fetch answers with.
pub const FETCH_BYTES: usize = 4 * 1024 * 1024;
/// A peer call that takes this long to answer is logged. In a round over a million records the
/// statements behind the calls took about 200 ms (the digest scan) and 8 to 38 ms a call on
/// average (listings, fetches and lookups by hash), so this is a stall worth finding: one round in
/// 32 took 14.9 s instead of about 1 s, and the report could not say where.
const SLOW_PEER_CALL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("{0} is not a peer of this region")]
    UnknownPeer(String),
    #[error("peer {peer} did not answer the repair request: {cause}")]
    Peer { peer: String, cause: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// What one round against one peer did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RepairReport {
    pub peer: String,
    pub collections: u64,
    pub buckets_compared: u64,
    pub buckets_differing: u64,
    /// Keys whose hash was compared, in differing buckets.
    pub keys_compared: u64,
    /// Records fetched from the peer because they differed.
    pub records_fetched: u64,
    /// Of those, records fetched by the hash their bucket's digests gave (the peer held one
    /// record more there, and nothing else differed), without listing the bucket's keys.
    #[serde(default)]
    pub records_found_by_hash: u64,
    /// Of those, records fetched page by page in key order from a collection this region held
    /// nothing of, without comparing digests or listing keys.
    #[serde(default)]
    pub records_paged: u64,
    /// Records whose state here changed by the merge.
    pub records_repaired: u64,
    /// Records that failed to merge even alone: marked as dead letters, skipped by later rounds
    /// until the peer's state changes.
    pub records_unrepairable: u64,
    /// Records skipped: marked unrepairable at the peer's current state, or, from a peer catching
    /// up after a restore, older than what every region had applied.
    pub records_skipped: u64,
    /// Records deleted here because the peer no longer holds them although every region had
    /// applied all they held (their tombstone was reclaimed): what a restore from an old backup
    /// brings back.
    pub records_pruned: u64,
    /// Resolver modules fetched whole because they were missing here (a lost chunk, say).
    pub modules_fetched: u64,
    /// The peer said it is catching up after a restore: it may lack some of its own history.
    #[serde(default)]
    pub peer_restoring: bool,
    pub seconds: f64,
    /// Time spent before any record is fetched, comparing every collection's digests (and
    /// fetching missing modules): the part of a round that grows with the records held rather
    /// than with those that differ.
    #[serde(default)]
    pub seconds_comparing: f64,
    /// Time spent finding what differs in differing buckets (looking records up by hash, listing
    /// and comparing `(key, hash)` pairs); it overlaps the fetches and merges.
    pub seconds_listing: f64,
    /// Time during which at least one merge transaction of fetched records ran (several run at
    /// once).
    pub seconds_merging: f64,
}

/// The peer API that repair reads, over HTTP with the peer token.
pub struct PeerClient {
    client: reqwest::Client,
    urls: BTreeMap<String, String>,
    token: crate::config::Secret,
    /// Peers that refused a fetch of more than [`EARLIER_FETCH_KEYS`] keys: asked for no more
    /// from then on, rather than refused again on every fetch.
    earlier_builds: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Peers that do not know `/v1/peer/states-by-hash`: their differing buckets are listed.
    without_hash_lookup: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Peers that do not know `/v1/peer/states-after`: a collection held nothing of here is
    /// compared and listed like any other.
    without_pages: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CollectionsBody {
    pub collections: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DigestEntry {
    pub bucket: i32,
    pub count: i64,
    /// 32 hex digits: the XOR of the bucket's record hashes.
    pub hash: String,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DigestsBody {
    pub buckets: Vec<DigestEntry>,
    /// The HLC (a decimal string) at or below which this region has reclaimed tombstones, every
    /// region having applied everything up to it; null if it never has.
    #[serde(default)]
    pub reclaimed_through: Option<String>,
    /// This region is catching up after a restore: what it holds that old may be records deleted
    /// everywhere since its backup.
    #[serde(default)]
    pub restoring: bool,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HashesRequest {
    /// The buckets to list, any order.
    pub buckets: Vec<i32>,
    /// List after this place; absent for the first page.
    pub after: Option<HashCursor>,
    /// At most this many entries (default and most: 10,000).
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HashesBody {
    /// `[bucket, key, hash]` triples in `(bucket, key)` order; the hash is 32 hex digits.
    #[schema(value_type = Vec<Vec<Object>>)]
    pub entries: Vec<(i32, String, String)>,
    /// The `after` of the next page, or null on the last.
    pub next: Option<HashCursor>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ActorSeenBody {
    pub actor: String,
    /// The highest outbox id applied here from the actor's events; null if none.
    pub highest_outbox_id: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AppliedBody {
    /// Per origin region, the sequence of its stream through which every event was applied
    /// here (or covered by a repair round or a first copy), with no hole below it.
    pub streams: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModulesBody {
    /// The sha256 of every resolver module held.
    pub modules: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatesRequest {
    pub keys: Vec<String>,
}

/// A bucket and the hash of the one record wanted from it ([`HashedStatesRequest`]).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WantedState {
    pub bucket: i32,
    /// 32 hex digits.
    #[schema(pattern = "^[0-9a-fA-F]{32}$")]
    pub hash: String,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HashedStatesRequest {
    /// At most 1,000 pairs.
    pub wanted: Vec<WantedState>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HashedStatesBody {
    /// `[key, state]` pairs of the records held with a wanted bucket and hash, in `(bucket, key)`
    /// order.
    #[schema(value_type = Vec<Object>)]
    pub records: Vec<(String, RecordState)>,
    /// Whether every such record is in `records`; false when the byte limit cut the answer short:
    /// ask again for the buckets after the last record's.
    pub complete: bool,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatesBody {
    /// `[key, state]` pairs; fewer than asked when the byte limit was reached (ask again for the
    /// rest), and without the keys the peer does not hold.
    #[schema(value_type = Vec<Object>)]
    pub records: Vec<(String, RecordState)>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatesPageRequest {
    /// The page starts after this key; absent for the first page.
    pub after: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatesPageBody {
    /// `[key, state]` pairs in key order: at most 1,000, fewer when the byte limit was reached.
    #[schema(value_type = Vec<Object>)]
    pub records: Vec<(String, RecordState)>,
    /// The `after` of the next page, or null on the last.
    pub next: Option<String>,
}

impl DigestEntry {
    pub fn of(digest: &BucketDigest) -> DigestEntry {
        DigestEntry {
            bucket: digest.bucket,
            count: digest.count,
            hash: digest.hash.to_hex(),
        }
    }

    /// The digest this entry stands for; `None` if its hash is not one.
    pub fn digest(&self) -> Option<BucketDigest> {
        Some(BucketDigest {
            bucket: self.bucket,
            count: self.count,
            hash: StateHash::from_hex(&self.hash)?,
        })
    }
}

impl PeerClient {
    /// A client for `region`'s peers as they are now.
    pub fn new(region: &Region) -> PeerClient {
        let config = &region.config;
        let client = region
            .peer_trust
            .client(config)
            .timeout(Duration::from_secs(60))
            .build()
            .expect("an HTTP client with plain settings builds");
        PeerClient {
            client,
            urls: region
                .members
                .peers()
                .into_iter()
                .map(|p| (p.id, p.api_url))
                .collect(),
            token: config.peer_token.clone(),
            earlier_builds: Default::default(),
            without_hash_lookup: Default::default(),
            without_pages: Default::default(),
        }
    }

    /// Send a peer API request; a non-2xx answer is an error.
    async fn send(
        &self,
        peer: &str,
        request: impl FnOnce(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, RepairError> {
        succeeded(peer, self.send_any(peer, request).await?).await
    }

    /// Send a peer API request; any answer is returned.
    async fn send_any(
        &self,
        peer: &str,
        request: impl FnOnce(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, RepairError> {
        let base = self
            .urls
            .get(peer)
            .ok_or_else(|| RepairError::UnknownPeer(peer.to_owned()))?;
        let request = request(&self.client, base)
            .bearer_auth(self.token.expose())
            .build()
            .map_err(|e| peer_failed(peer, crate::logging::chain(&e)))?;
        let path = request.url().path().to_owned();
        let sent = Instant::now();
        let answer = self
            .client
            .execute(request)
            .await
            .map_err(|e| peer_failed(peer, crate::logging::chain(&e)));
        // A round that takes far longer than usual says which call it waited for. A call that
        // failed is reported by its caller, with its error.
        let waited = sent.elapsed();
        if answer.is_ok() && waited >= SLOW_PEER_CALL {
            tracing::warn!(%peer, %path, waited_ms = waited.as_millis() as u64,
                "a peer was slow to answer a call to its peer API");
        }
        answer
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        peer: &str,
        request: impl FnOnce(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<T, RepairError> {
        read_json(peer, self.send(peer, request).await?).await
    }

    /// Whether `peer`'s peer API answers within `wait`: a cheap call (its collection names), so
    /// a new region can tell a peer that serves a copy at once from one whose API hangs.
    pub async fn answers_within(&self, peer: &str, wait: Duration) -> bool {
        self.send(peer, |c, base| {
            c.get(format!("{base}/v1/peer/collections")).timeout(wait)
        })
        .await
        .is_ok()
    }

    pub async fn collections(&self, peer: &str) -> Result<Vec<String>, RepairError> {
        let body: CollectionsBody = self
            .call(peer, |c, base| c.get(format!("{base}/v1/peer/collections")))
            .await?;
        Ok(body.collections)
    }

    /// The highest outbox id `peer` applied from `actor` ([`super::incarnation`]).
    pub async fn highest_outbox_id(
        &self,
        peer: &str,
        actor: &crate::clock::version::Actor,
    ) -> Result<Option<i64>, RepairError> {
        let body: ActorSeenBody = self
            .call(peer, |c, base| {
                c.get(format!("{base}/v1/peer/actors/{actor}"))
            })
            .await?;
        Ok(body.highest_outbox_id)
    }

    /// Per origin, the sequence of its stream through which `peer` applied everything.
    pub async fn applied(&self, peer: &str) -> Result<BTreeMap<String, u64>, RepairError> {
        let body: AppliedBody = self
            .call(peer, |c, base| c.get(format!("{base}/v1/peer/applied")))
            .await?;
        Ok(body.streams)
    }

    pub async fn modules(&self, peer: &str) -> Result<Vec<String>, RepairError> {
        let body: ModulesBody = self
            .call(peer, |c, base| c.get(format!("{base}/v1/peer/modules")))
            .await?;
        Ok(body.modules)
    }

    pub async fn module(&self, peer: &str, sha256: &str) -> Result<Vec<u8>, RepairError> {
        let response = self
            .send(peer, |c, base| {
                c.get(format!("{base}/v1/peer/modules/{sha256}"))
            })
            .await?;
        Ok(response
            .bytes()
            .await
            .map_err(|e| peer_failed(peer, crate::logging::chain(&e)))?
            .to_vec())
    }

    /// The peer's bucket digests of `collection` (in bucket order), its tombstone reclamation
    /// horizon, and whether it is catching up after a restore. Asked for as frames, read as they
    /// arrive; a peer of an earlier build answers JSON.
    pub async fn digests(
        &self,
        peer: &str,
        collection: &str,
    ) -> Result<(Vec<BucketDigest>, Option<Hlc>, bool), RepairError> {
        let accept = format!("{DIGESTS_MEDIA_TYPE}, application/json;q=0.5");
        let mut response = self
            .send(peer, |c, base| {
                c.get(format!("{base}/v1/peer/digests"))
                    .query(&[("collection", collection)])
                    .header(reqwest::header::ACCEPT, accept)
            })
            .await?;
        let failed = |cause: String| peer_failed(peer, cause);
        let hlc = |text: &str| {
            text.parse()
                .map(Hlc::from_u64)
                .map_err(|_| failed(format!("{text:?} is not an HLC")))
        };
        let headers = response.headers();
        if headers
            .get(reqwest::header::CONTENT_TYPE)
            .map(|v| v.as_bytes())
            != Some(DIGESTS_MEDIA_TYPE.as_bytes())
        {
            let body: DigestsBody = read_json(peer, response).await?;
            let digests = body
                .buckets
                .iter()
                .map(|entry| {
                    entry
                        .digest()
                        .ok_or_else(|| failed(format!("{:?} is not a hash", entry.hash)))
                })
                .collect::<Result<_, RepairError>>()?;
            let reclaimed = body.reclaimed_through.as_deref().map(hlc).transpose()?;
            return Ok((digests, reclaimed, body.restoring));
        }
        let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
        let reclaimed = text(RECLAIMED_THROUGH_HEADER).map(hlc).transpose()?;
        let restoring = text(RESTORING_HEADER) == Some("true");
        let mut frames = crate::record::digest_frames::Decoder::default();
        while let Some(piece) = response
            .chunk()
            .await
            .map_err(|e| failed(crate::logging::chain(&e)))?
        {
            frames.feed(&piece).map_err(|e| failed(e.to_string()))?;
        }
        let digests = frames.finish().map_err(|e| failed(e.to_string()))?;
        Ok((digests, reclaimed, restoring))
    }

    pub async fn hashes(
        &self,
        peer: &str,
        collection: &str,
        buckets: &[i32],
        after: Option<HashCursor>,
    ) -> Result<(Vec<BucketHash>, Option<HashCursor>), RepairError> {
        let body: HashesBody = self
            .call(peer, |c, base| {
                c.post(format!("{base}/v1/peer/hashes"))
                    .query(&[("collection", collection)])
                    .json(&HashesRequest {
                        buckets: buckets.to_vec(),
                        after,
                        limit: Some(HASH_PAGE),
                    })
            })
            .await?;
        let entries = body
            .entries
            .into_iter()
            .map(|(bucket, key, hash)| {
                let hash = StateHash::from_hex(&hash)
                    .ok_or_else(|| peer_failed(peer, format!("{hash:?} is not a state hash")))?;
                Ok(BucketHash { bucket, key, hash })
            })
            .collect::<Result<_, RepairError>>()?;
        Ok((entries, body.next))
    }

    /// The states of `keys` (sorted) that the peer holds, in key order, up to its byte limit;
    /// and how many of `keys` were asked for: all of them, or the first [`EARLIER_FETCH_KEYS`]
    /// from a peer that refused more (once refused, this client asks it for no more).
    pub async fn states(
        &self,
        peer: &str,
        collection: &str,
        keys: &[String],
    ) -> Result<(Vec<(String, RecordState)>, usize), RepairError> {
        let ask = |keys: &[String]| {
            let request = StatesRequest {
                keys: keys.to_vec(),
            };
            self.call::<StatesBody>(peer, move |c, base| {
                c.post(format!("{base}/v1/peer/states"))
                    .query(&[("collection", collection)])
                    .json(&request)
            })
        };
        let earlier = |keys: &[String]| keys.len().min(EARLIER_FETCH_KEYS);
        let known_earlier = self
            .earlier_builds
            .lock()
            .expect("peer client lock")
            .contains(peer);
        if known_earlier {
            let asked = earlier(keys);
            return Ok((ask(&keys[..asked]).await?.records, asked));
        }
        match ask(keys).await {
            Err(RepairError::Peer { cause, .. })
                if keys.len() > EARLIER_FETCH_KEYS && cause.contains("too-many-keys") =>
            {
                self.earlier_builds
                    .lock()
                    .expect("peer client lock")
                    .insert(peer.to_owned());
                let asked = earlier(keys);
                Ok((ask(&keys[..asked]).await?.records, asked))
            }
            answer => Ok((answer?.records, keys.len())),
        }
    }

    /// A page of the records of `collection` that `peer` holds after `after`, in key order, and
    /// the `after` of the next page (`None` on the last). `None` from a peer of a build that
    /// cannot page through its records: remembered, and not asked again.
    pub async fn states_after(
        &self,
        peer: &str,
        collection: &str,
        after: Option<&str>,
    ) -> Result<Option<StatesPageBody>, RepairError> {
        let request = StatesPageRequest {
            after: after.map(str::to_owned),
        };
        self.call_if_known(
            &self.without_pages,
            peer,
            "/v1/peer/states-after",
            collection,
            &request,
            "collections held nothing of here are compared and listed",
        )
        .await
    }

    /// The states of the records `peer` holds with one of `wanted`'s buckets and hashes (sorted
    /// by bucket), in bucket order up to its byte limit, and whether that is all of them. `None`
    /// from a peer of a build that cannot look records up by hash: remembered, and not asked
    /// again.
    pub async fn states_by_hash(
        &self,
        peer: &str,
        collection: &str,
        wanted: &[(i32, StateHash)],
    ) -> Result<Option<(Vec<(String, RecordState)>, bool)>, RepairError> {
        let request = HashedStatesRequest {
            wanted: wanted
                .iter()
                .map(|(bucket, hash)| WantedState {
                    bucket: *bucket,
                    hash: hash.to_hex(),
                })
                .collect(),
        };
        let body: Option<HashedStatesBody> = self
            .call_if_known(
                &self.without_hash_lookup,
                peer,
                "/v1/peer/states-by-hash",
                collection,
                &request,
                "its differing buckets are listed whole",
            )
            .await?;
        Ok(body.map(|body| (body.records, body.complete)))
    }

    /// POST `request` to `path` about `collection` at `peer`, a call that earlier builds do not
    /// know: `None` when the peer answers 404, which is remembered in `without` (and logged with
    /// `instead`, what the round does without the call), so the peer is not asked again.
    async fn call_if_known<T: serde::de::DeserializeOwned>(
        &self,
        without: &std::sync::Mutex<std::collections::BTreeSet<String>>,
        peer: &str,
        path: &str,
        collection: &str,
        request: &impl Serialize,
        instead: &str,
    ) -> Result<Option<T>, RepairError> {
        if without.lock().expect("peer client lock").contains(peer) {
            return Ok(None);
        }
        let response = self
            .send_any(peer, |c, base| {
                c.post(format!("{base}{path}"))
                    .query(&[("collection", collection)])
                    .json(request)
            })
            .await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            tracing::info!(%peer, %path, "the peer does not know this call (an earlier build): {instead}");
            without
                .lock()
                .expect("peer client lock")
                .insert(peer.to_owned());
            return Ok(None);
        }
        Ok(Some(
            read_json(peer, succeeded(peer, response).await?).await?,
        ))
    }
}

/// A peer's JSON answer, read whole.
async fn read_json<T: serde::de::DeserializeOwned>(
    peer: &str,
    response: reqwest::Response,
) -> Result<T, RepairError> {
    response
        .json()
        .await
        .map_err(|e| peer_failed(peer, crate::logging::chain(&e)))
}

/// `response`, if it is a 2xx; otherwise an error with its status and body.
async fn succeeded(
    peer: &str,
    response: reqwest::Response,
) -> Result<reqwest::Response, RepairError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let text = response.text().await.unwrap_or_default();
    Err(peer_failed(peer, format!("{status}: {text}")))
}

fn peer_failed(peer: &str, cause: String) -> RepairError {
    RepairError::Peer {
        peer: peer.to_owned(),
        cause,
    }
}

/// One anti-entropy round: pull from `peer` every record whose state differs here.
pub async fn round(region: &Region, peer: &str) -> Result<RepairReport, RepairError> {
    let started = Instant::now();
    let client = PeerClient::new(region);
    let mut report = RepairReport {
        peer: peer.to_owned(),
        ..Default::default()
    };
    region.replication.repair_started(peer);
    let result = pull_everything(region, &client, peer, &mut report).await;
    report.seconds = started.elapsed().as_secs_f64();
    match &result {
        Ok(()) => {
            tracing::info!(region = region.id(), %peer, buckets_differing = report.buckets_differing,
                records_repaired = report.records_repaired, seconds = report.seconds, "repair round complete");
            region.replication.repair_finished(peer, &report);
            region.caught_up_with(peer);
        }
        Err(error) => {
            tracing::warn!(region = region.id(), %peer, %error, "repair round failed");
            region.replication.repair_failed(peer, &error.to_string());
        }
    }
    result.map(|()| report)
}

async fn pull_everything(
    region: &Region,
    client: &PeerClient,
    peer: &str,
    report: &mut RepairReport,
) -> Result<(), RepairError> {
    let throttle = Throttle::new(region.config.repair.max_records_per_sec);
    let comparing = Instant::now();
    // Modules first: a binding pulled below is of no use without its module.
    let held: std::collections::BTreeSet<String> =
        region.store.module_hashes().await?.into_iter().collect();
    for sha256 in client.modules(peer).await? {
        if held.contains(&sha256) {
            continue;
        }
        let module = client.module(peer, &sha256).await?;
        if crate::resolve::module_sha256(&module) != sha256 {
            tracing::error!(region = region.id(), %peer, %sha256, "a module fetched by repair does not hash to its name; discarded");
            continue;
        }
        if region.store.adopt_module(&sha256, &module).await? {
            report.modules_fetched += 1;
            region.resolvers.changed.notify_one();
        }
    }
    // Compare every collection first, so the round knows how many records it has to go through
    // and can show its progress against that.
    let mut plan = Vec::new();
    let mut to_compare = 0;
    // A region restored from a backup, catching up: it alone deletes what a peer lacks.
    let restored = !region.catching_up().is_empty();
    let mut collections = client.collections(peer).await?;
    if restored {
        // A collection the peer holds nothing of may hold what a restore brought back here.
        for ours in region.store.collections_with_records().await? {
            if !collections.contains(&ours) {
                collections.push(ours);
            }
        }
    }
    for collection in collections {
        report.collections += 1;
        // Both sides scan their collection at once.
        let (ours, theirs) = tokio::join!(
            region.store.bucket_digests(&collection),
            client.digests(peer, &collection)
        );
        let ours: BTreeMap<i32, BucketDigest> = ours?.into_iter().map(|d| (d.bucket, d)).collect();
        let (theirs, reclaimed, restoring) = theirs?;
        report.peer_restoring |= restoring;
        // Only a region restored from a backup deletes what a peer lacks: elsewhere, a record a
        // peer lacks is one it lost, and the peer's own round brings it back.
        let reclaimed = reclaimed.filter(|_| restored);
        // From a restored peer, nothing every region had applied: it may be what a reclaimed
        // tombstone superseded. Pulled once the peer has caught up, if it still holds it.
        let too_old = if restoring {
            region.store.reclaimed_through().await?
        } else {
            None
        };
        if let Some(horizon) = reclaimed {
            // Buckets the peer holds nothing of: what is here and old enough is gone there.
            let listed: std::collections::BTreeSet<i32> =
                theirs.iter().map(|entry| entry.bucket).collect();
            let ours_only: Vec<i32> = ours
                .keys()
                .copied()
                .filter(|bucket| !listed.contains(bucket))
                .collect();
            report.records_pruned +=
                prune_buckets(region, peer, &collection, &ours_only, horizon).await?;
        }
        report.buckets_compared += theirs.len() as u64;
        // Buckets where the peer holds one record more are looked up by hash first: if nothing
        // else differs there, that record's hash is the XOR of the two digests. Never in a
        // restored region deleting what the peer lacks: that needs every key listed.
        let mut lone: Vec<LoneBucket> = Vec::new();
        let mut to_list: Vec<(i32, i64)> = Vec::new();
        for entry in &theirs {
            let (count_here, hash_here) = ours
                .get(&entry.bucket)
                .map_or((0, StateHash::default()), |d| (d.count, d.hash));
            if count_here == entry.count && entry.hash == hash_here {
                continue;
            }
            report.buckets_differing += 1;
            to_compare += entry.count.max(0) as u64;
            if reclaimed.is_none() && entry.count == count_here + 1 {
                lone.push(LoneBucket {
                    bucket: entry.bucket,
                    hash: entry.hash.xor(hash_here),
                    count: entry.count,
                })
            } else {
                to_list.push((entry.bucket, entry.count));
            }
        }
        if lone.is_empty() && to_list.is_empty() {
            continue;
        }
        lone.sort_unstable_by_key(|lone| lone.bucket);
        // Nothing of it here: every record the peer holds is wanted, so it is copied page by
        // page rather than compared.
        let copy = ours.is_empty();
        plan.push((collection, copy, lone, to_list, reclaimed, too_old));
    }
    report.seconds_comparing = comparing.elapsed().as_secs_f64();
    let meter = Meter::new(region, peer, to_compare);
    for (collection, copy, lone, to_list, reclaimed, too_old) in plan {
        pull_collection(
            region,
            client,
            peer,
            &collection,
            copy,
            &lone,
            to_list,
            reclaimed,
            too_old,
            report,
            &throttle,
            &meter,
        )
        .await?;
    }
    meter.show(true);
    Ok(())
}

/// A round's progress, counted by its stages as they run, shown in the peer's status at most
/// every [`Meter::SHOW_EVERY`] and logged every [`Meter::LOG_EVERY`].
struct Meter<'a> {
    region: &'a Region,
    peer: &'a str,
    to_compare: u64,
    compared: AtomicU64,
    copied: AtomicU64,
    started: Instant,
    shown: std::sync::Mutex<(Instant, Instant)>,
}

impl<'a> Meter<'a> {
    const SHOW_EVERY: Duration = Duration::from_millis(250);
    const LOG_EVERY: Duration = Duration::from_secs(5);

    fn new(region: &'a Region, peer: &'a str, to_compare: u64) -> Meter<'a> {
        let now = Instant::now();
        let meter = Meter {
            region,
            peer,
            to_compare,
            compared: AtomicU64::new(0),
            copied: AtomicU64::new(0),
            started: now,
            shown: std::sync::Mutex::new((now, now)),
        };
        meter.show(true);
        meter
    }

    fn compared(&self, records: u64) {
        self.compared.fetch_add(records, Ordering::Relaxed);
        self.show(false);
    }

    fn copied(&self, records: u64) {
        self.copied.fetch_add(records, Ordering::Relaxed);
        self.show(false);
    }

    fn show(&self, now: bool) {
        let progress = {
            let mut shown = self.shown.lock().expect("meter lock");
            if !now && shown.0.elapsed() < Self::SHOW_EVERY {
                return;
            }
            shown.0 = Instant::now();
            let progress = RepairProgress::new(
                self.to_compare,
                self.compared.load(Ordering::Relaxed),
                self.copied.load(Ordering::Relaxed),
                self.started.elapsed().as_secs_f64(),
            );
            if shown.1.elapsed() >= Self::LOG_EVERY {
                shown.1 = Instant::now();
                tracing::info!(region = self.region.id(), peer = %self.peer,
                    compared = progress.records_compared, of = progress.records_to_compare,
                    copied = progress.records_copied, per_second = progress.per_second.round(),
                    seconds_left = progress.seconds_left.map(f64::round), "repair progress");
            }
            progress
        };
        self.region.replication.repair_progress(self.peer, progress);
    }
}

/// Key batches listed ahead of the fetches, and fetched batches ahead of the merge: enough to keep
/// every stage busy, few enough that memory stays at a few batches whatever the collection's size.
const KEY_BATCHES_AHEAD: usize = 8;
const FETCHES_IN_FLIGHT: usize = 3;
/// Fetched answers waiting for the merge: room for a whole merge transaction and the fetches in
/// flight, so fetching goes on while a transaction gathers.
const FETCHED_AHEAD: usize = MERGE_RECORDS / FETCH_KEYS + FETCHES_IN_FLIGHT;
/// Fetched records merged in one apply transaction: several fetches' worth, so the per-transaction
/// cost (four round trips before the first row is written, the commit) is shared, yet the apply
/// lock is held for tens of milliseconds. Measured at 200 to 400 records a transaction, that cost
/// was half of the merge.
const MERGE_RECORDS: usize = 1_000;
/// Merge transactions of a round running at once ([`crate::storage::Store::begin_merge`]): one
/// waits for PostgreSQL (a commit's flush, a row's lock) while another runs, which one at a time
/// left the cores idle. A new region copied 300,000 records at 27,000–29,000 a second with one,
/// 35,000–37,000 with two and 40,000 with three.
const MERGES_IN_FLIGHT: usize = 3;

/// Wall-clock time during which at least one of several overlapping merges ran.
#[derive(Default)]
struct BusyClock {
    /// Merges running, since when at least one has, and the seconds of earlier busy spells.
    state: std::sync::Mutex<(usize, Option<Instant>, f64)>,
}

impl BusyClock {
    fn start(&self) {
        let mut state = self.state.lock().expect("busy clock lock");
        if state.0 == 0 {
            state.1 = Some(Instant::now());
        }
        state.0 += 1;
    }

    fn stop(&self) {
        let mut state = self.state.lock().expect("busy clock lock");
        state.0 -= 1;
        if state.0 == 0 {
            if let Some(since) = state.1.take() {
                state.2 += since.elapsed().as_secs_f64();
            }
        }
    }

    fn seconds(&self) -> f64 {
        self.state.lock().expect("busy clock lock").2
    }
}

/// What listing found, kept apart from the merge's figures while both run.
#[derive(Default)]
struct Listed {
    keys_compared: u64,
    records_found_by_hash: u64,
    records_paged: u64,
    records_skipped: u64,
    records_pruned: u64,
    seconds: f64,
}

/// Delete the rows of `buckets` (which `peer` holds nothing of) that every region had applied
/// everything of by the peer's reclamation `horizon` ([`crate::storage::Store::prune_reclaimed`]).
async fn prune_buckets(
    region: &Region,
    peer: &str,
    collection: &str,
    buckets: &[i32],
    horizon: Hlc,
) -> Result<u64, RepairError> {
    let mut pruned = 0;
    for set in buckets.chunks(HASH_PAGE as usize) {
        let mut after: Option<HashCursor> = None;
        loop {
            let page = region
                .store
                .bucket_hashes(collection, set, after.as_ref(), HASH_PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(HashCursor {
                bucket: last.bucket,
                key: last.key.clone(),
            });
            let keys: Vec<String> = page.iter().map(|entry| entry.key.clone()).collect();
            pruned += prune(region, peer, collection, &keys, horizon).await?;
            if (page.len() as i64) < HASH_PAGE {
                break;
            }
        }
    }
    Ok(pruned)
}

/// Delete the rows of `keys` (which `peer` does not hold) at or below its reclamation `horizon`.
async fn prune(
    region: &Region,
    peer: &str,
    collection: &str,
    keys: &[String],
    horizon: Hlc,
) -> Result<u64, StorageError> {
    // System collections are never reclaimed nor purged: a row missing there is missing.
    if keys.is_empty() || collection.starts_with(crate::record::policy::SYSTEM_PREFIX) {
        return Ok(0);
    }
    let pruned = region
        .store
        .prune_reclaimed(collection, keys, horizon)
        .await?;
    if pruned > 0 {
        for key in keys {
            region.forget_cached(collection, key);
        }
        tracing::warn!(region = region.id(), %peer, %collection, pruned,
            "deleted records the peer no longer holds although every region had applied them: they came back with a restored database");
    }
    Ok(pruned)
}

/// Repair the differing buckets of one collection in three overlapping stages: fetch the `lone`
/// buckets' one record by hash, then list the peer's hashes of the other buckets (`to_list`, and
/// the lone ones where that found nothing) and pick the keys that differ here; fetch those keys'
/// states ([`FETCHES_IN_FLIGHT`] requests at once); merge the fetched states, [`MERGE_RECORDS`]
/// to a transaction and [`MERGES_IN_FLIGHT`] transactions at once. Bounded channels link the stages, so a slow merge
/// slows the listing instead of piling up memory.
#[allow(clippy::too_many_arguments)]
async fn pull_collection(
    region: &Region,
    client: &PeerClient,
    peer: &str,
    collection: &str,
    copy: bool,
    lone: &[LoneBucket],
    to_list: Vec<(i32, i64)>,
    reclaimed: Option<Hlc>,
    too_old: Option<Hlc>,
    report: &mut RepairReport,
    throttle: &Throttle,
    meter: &Meter<'_>,
) -> Result<(), RepairError> {
    use futures_util::StreamExt;

    let (keys_tx, keys_rx) = tokio::sync::mpsc::channel::<Vec<String>>(KEY_BATCHES_AHEAD);
    let (states_tx, states_rx) =
        tokio::sync::mpsc::channel::<Vec<(String, RecordState)>>(FETCHED_AHEAD);

    let found_tx = states_tx.clone();
    let listing = async move {
        let mut listed = Listed::default();
        let marked = region.store.unrepairable(peer, collection).await?;
        if copy
            && copy_pages(
                client,
                peer,
                collection,
                &marked,
                &found_tx,
                &mut listed,
                meter,
            )
            .await?
        {
            return Ok(listed);
        }
        let mut to_list = to_list;
        to_list.extend(
            fetch_by_hash(
                client,
                peer,
                collection,
                lone,
                &marked,
                found_tx,
                &mut listed,
                meter,
            )
            .await?,
        );
        to_list.sort_unstable();
        list_differing(
            region,
            client,
            peer,
            collection,
            &listing_sets(&to_list),
            reclaimed,
            &marked,
            &keys_tx,
            &mut listed,
            meter,
        )
        .await?;
        Ok::<_, RepairError>(listed)
    };
    let fetching = async move {
        let key_batches = futures_util::stream::unfold(keys_rx, |mut rx| async move {
            rx.recv().await.map(|batch| (batch, rx))
        });
        let mut fetched = std::pin::pin!(key_batches
            .map(|keys| fetch_states(client, peer, collection, keys))
            .buffer_unordered(FETCHES_IN_FLIGHT));
        while let Some(states) = fetched.next().await {
            for states in states? {
                if states_tx.send(states).await.is_err() {
                    return Ok(()); // the merge stopped on an error of its own
                }
            }
        }
        Ok::<_, RepairError>(())
    };
    let merging = async {
        let gathered = futures_util::stream::unfold(states_rx, |mut rx| async move {
            let mut states = rx.recv().await?;
            // Gather a whole transaction's worth, unless the fetches are over.
            while states.len() < MERGE_RECORDS {
                match rx.recv().await {
                    Some(more) => states.extend(more),
                    None => break,
                }
            }
            Some((states, rx))
        });
        // Paced before each merge begins, never while one holds its transaction open.
        let paced = AtomicU64::new(0);
        let busy = BusyClock::default();
        let (paced, busy) = (&paced, &busy);
        let mut merges = std::pin::pin!(gathered
            .map(|mut states| async move {
                let mut merged = RepairReport {
                    records_fetched: states.len() as u64,
                    ..Default::default()
                };
                let due = paced.fetch_add(states.len() as u64, Ordering::Relaxed);
                throttle.pace(due + states.len() as u64).await;
                if let Some(horizon) = too_old {
                    states
                        .retain(|(_, state)| state.max_hlc().is_none_or(|newest| newest > horizon));
                    merged.records_skipped = merged.records_fetched - states.len() as u64;
                    if states.is_empty() {
                        return Ok(merged);
                    }
                }
                let copied = states.len() as u64;
                busy.start();
                let result = merge_or_mark(region, peer, collection, states, &mut merged).await;
                busy.stop();
                result?;
                meter.copied(copied);
                Ok::<_, RepairError>(merged)
            })
            .buffer_unordered(MERGES_IN_FLIGHT));
        while let Some(merged) = merges.next().await {
            let merged = merged?;
            report.records_fetched += merged.records_fetched;
            report.records_skipped += merged.records_skipped;
            report.records_repaired += merged.records_repaired;
            report.records_unrepairable += merged.records_unrepairable;
        }
        report.seconds_merging += busy.seconds();
        Ok::<_, RepairError>(())
    };
    let (listed, (), ()) = tokio::try_join!(listing, fetching, merging)?;
    report.keys_compared += listed.keys_compared;
    report.records_found_by_hash += listed.records_found_by_hash;
    report.records_paged += listed.records_paged;
    report.records_skipped += listed.records_skipped;
    report.records_pruned += listed.records_pruned;
    report.seconds_listing += listed.seconds;
    Ok(())
}

/// Copy a collection this region holds nothing of: page through the peer's records in key order
/// and send every one to the merge, with no digest compared, no key listed and no lookup by key
/// (each page is one range scan of the peer's primary key). The next page is asked for while
/// this one goes to the merge. Returns false, having sent nothing, when the peer cannot page
/// (an earlier build): the collection is then compared and listed like any other.
///
/// Measured on the two-core reference machine, a late region's first copy of about 115,000
/// records took 5.6 s this way and 9.4 s the other (one run each), where the peer's lookups by
/// hash and by key lists took 12.7 s of statement time against 1.4 s for its pages.
async fn copy_pages(
    client: &PeerClient,
    peer: &str,
    collection: &str,
    marked: &std::collections::HashMap<String, StateHash>,
    states_tx: &tokio::sync::mpsc::Sender<Vec<(String, RecordState)>>,
    listed: &mut Listed,
    meter: &Meter<'_>,
) -> Result<bool, RepairError> {
    let timed_page = |after: Option<String>| async move {
        let asked = Instant::now();
        let page = client
            .states_after(peer, collection, after.as_deref())
            .await;
        (page, asked.elapsed().as_secs_f64())
    };
    let (first, waited) = timed_page(None).await;
    listed.seconds += waited;
    let Some(mut page) = first? else {
        return Ok(false);
    };
    let mut after: Option<String> = None;
    loop {
        let StatesPageBody { mut records, next } = page;
        // Keys are in byte order (the "C" collation): a page that does not move past the last
        // one would be asked for forever.
        if next.is_some() && next <= after {
            return Err(peer_failed(
                peer,
                "the peer's pages of records did not move forward".into(),
            ));
        }
        meter.compared(records.len() as u64);
        if !marked.is_empty() {
            let before = records.len();
            // Hashed only where a mark is: hashing is a large share of a copy's CPU.
            records.retain(|(key, state)| {
                marked
                    .get(key)
                    .is_none_or(|mark| *mark != crate::record::digest::state_hash(state))
            });
            listed.records_skipped += (before - records.len()) as u64;
        }
        listed.records_paged += records.len() as u64;
        let send = async { records.is_empty() || states_tx.send(records).await.is_ok() };
        let Some(next) = next else {
            send.await;
            return Ok(true);
        };
        after = Some(next.clone());
        let (sent, (fetched, waited)) = tokio::join!(send, timed_page(Some(next)));
        listed.seconds += waited;
        if !sent {
            return Ok(true); // the merge stopped on an error of its own
        }
        page = fetched?.ok_or_else(|| {
            peer_failed(peer, "the peer stopped paging through its records".into())
        })?;
    }
}

/// A bucket where the peer holds one record more than this region: if nothing else differs
/// there, `hash`, the XOR of the two digests, is that record's hash. `count` is the peer's.
struct LoneBucket {
    bucket: i32,
    hash: StateHash,
    count: i64,
}

/// Fetch by its hash the one record each of `lone` (sorted by bucket) lacks here, without listing
/// the bucket ([`FETCH_KEYS`] buckets a request, [`FETCHES_IN_FLIGHT`] requests at once), and send
/// it to the merge. Returns the buckets where the peer holds no record with that hash (more than
/// one record differs there) or cannot look records up by hash, with the peer's counts: those
/// are listed.
#[allow(clippy::too_many_arguments)]
async fn fetch_by_hash(
    client: &PeerClient,
    peer: &str,
    collection: &str,
    lone: &[LoneBucket],
    marked: &std::collections::HashMap<String, StateHash>,
    found_tx: tokio::sync::mpsc::Sender<Vec<(String, RecordState)>>,
    listed: &mut Listed,
    meter: &Meter<'_>,
) -> Result<Vec<(i32, i64)>, RepairError> {
    use futures_util::StreamExt;
    let mut to_list = Vec::new();
    // The futures are made first: a stream's closure over these borrows would not be `Send`.
    let lookups: Vec<_> = lone
        .chunks(FETCH_KEYS)
        .map(|chunk| async move { (chunk, look_up(client, peer, collection, chunk).await) })
        .collect();
    let mut lookups =
        std::pin::pin!(futures_util::stream::iter(lookups).buffered(FETCHES_IN_FLIGHT));
    let mut waited = Instant::now();
    while let Some((chunk, found)) = lookups.next().await {
        let Some(found) = found? else {
            to_list.extend(chunk.iter().map(|lone| (lone.bucket, lone.count)));
            continue;
        };
        let mut hit = vec![false; chunk.len()];
        let mut states = Vec::with_capacity(found.len());
        for (key, state) in found {
            // A record of a bucket not asked for would be the peer's mistake: left to listing.
            let Ok(at) = chunk.binary_search_by_key(&bucket_of(&key), |lone| lone.bucket) else {
                continue;
            };
            hit[at] = true;
            if marked.get(&key) == Some(&chunk[at].hash) {
                listed.records_skipped += 1;
            } else {
                states.push((key, state));
            }
        }
        listed.records_found_by_hash += states.len() as u64;
        for (lone, hit) in chunk.iter().zip(hit) {
            if hit {
                meter.compared(lone.count.max(0) as u64);
            } else {
                to_list.push((lone.bucket, lone.count));
            }
        }
        listed.seconds += waited.elapsed().as_secs_f64();
        if !states.is_empty() && found_tx.send(states).await.is_err() {
            break; // the merge stopped on an error of its own
        }
        waited = Instant::now();
    }
    Ok(to_list)
}

/// Ask `peer` for the records of `wanted` by hash, again for the rest after an answer the byte
/// limit cut short; `None` if it cannot look records up by hash.
async fn look_up(
    client: &PeerClient,
    peer: &str,
    collection: &str,
    wanted: &[LoneBucket],
) -> Result<Option<Vec<(String, RecordState)>>, RepairError> {
    let mut found = Vec::new();
    let mut rest = wanted;
    while !rest.is_empty() {
        let pairs: Vec<(i32, StateHash)> = rest.iter().map(|l| (l.bucket, l.hash)).collect();
        let Some((states, complete)) = client.states_by_hash(peer, collection, &pairs).await?
        else {
            return Ok(None);
        };
        let last = states.last().map(|(key, _)| bucket_of(key));
        found.extend(states);
        match last {
            Some(last) if !complete => rest = &rest[rest.partition_point(|l| l.bucket <= last)..],
            _ => break,
        }
    }
    Ok(Some(found))
}

/// Buckets listed together in sets of about a page of records (the peer's counts say how many
/// each holds), so a listing costs per page, and each page's statement reads about a page of rows.
fn listing_sets(buckets: &[(i32, i64)]) -> Vec<Vec<i32>> {
    let mut sets: Vec<Vec<i32>> = Vec::new();
    let mut records = 0;
    for &(bucket, count) in buckets {
        match sets.last_mut() {
            Some(set) if records + count <= HASH_PAGE => set.push(bucket),
            _ => {
                sets.push(vec![bucket]);
                records = 0;
            }
        }
        records += count;
    }
    sets
}

/// Page through the peer's hashes of each of `bucket_sets`, and send the keys that differ here
/// (and are not marked unrepairable at the peer's current state) in sorted batches of
/// [`FETCH_KEYS`]. The next page is asked for while this one is compared here.
#[allow(clippy::too_many_arguments)]
async fn list_differing(
    region: &Region,
    client: &PeerClient,
    peer: &str,
    collection: &str,
    bucket_sets: &[Vec<i32>],
    reclaimed: Option<Hlc>,
    marked: &std::collections::HashMap<String, StateHash>,
    keys_tx: &tokio::sync::mpsc::Sender<Vec<String>>,
    listed: &mut Listed,
    meter: &Meter<'_>,
) -> Result<(), RepairError> {
    let request = |set: usize, after: Option<HashCursor>| {
        client.hashes(peer, collection, &bucket_sets[set], after)
    };
    if bucket_sets.is_empty() {
        return Ok(());
    }
    let (mut set, mut after): (usize, Option<HashCursor>) = (0, None);
    let mut fetched = request(set, None).await?;
    let mut wanted: Vec<String> = Vec::new();
    loop {
        let listing = Instant::now();
        let (page, next) = fetched;
        let last_page = next.is_none();
        // The page after this one: the set's next, or the next set's first.
        let following = match next {
            Some(cursor) => Some((set, Some(cursor))),
            None if set + 1 < bucket_sets.len() => Some((set + 1, None)),
            None => None,
        };
        let compare = region
            .store
            .compare_page(collection, &page, after.as_ref(), last_page);
        let (comparison, fetched_next) = match &following {
            Some((next_set, next_after)) => {
                let (comparison, fetched) =
                    tokio::join!(compare, request(*next_set, next_after.clone()));
                (comparison?, Some(fetched?))
            }
            None => (compare.await?, None),
        };
        listed.keys_compared += page.len() as u64;
        if let Some(horizon) = reclaimed {
            listed.records_pruned +=
                prune(region, peer, collection, &comparison.ours_only, horizon).await?;
        }
        meter.compared(page.len() as u64);
        listed.seconds += listing.elapsed().as_secs_f64();
        for theirs in comparison.differing {
            if marked.get(&theirs.key) == Some(&theirs.hash) {
                listed.records_skipped += 1;
            } else {
                wanted.push(theirs.key);
            }
        }
        let done = following.is_none();
        while wanted.len() >= FETCH_KEYS || (done && !wanted.is_empty()) {
            let mut batch: Vec<String> = wanted.drain(..wanted.len().min(FETCH_KEYS)).collect();
            batch.sort_unstable(); // the peer answers in key order, which `fetch_states` relies on
            if keys_tx.send(batch).await.is_err() {
                return Ok(()); // a later stage stopped on an error of its own
            }
        }
        match (following, fetched_next) {
            (Some((next_set, next_after)), Some(next_page)) => {
                (set, after, fetched) = (next_set, next_after, next_page);
            }
            _ => return Ok(()),
        }
    }
}

/// Fetch `keys`' states (sorted) from the peer, in several answers if they are large.
async fn fetch_states(
    client: &PeerClient,
    peer: &str,
    collection: &str,
    keys: Vec<String>,
) -> Result<Vec<Vec<(String, RecordState)>>, RepairError> {
    let mut answers = Vec::new();
    let mut wanted = &keys[..];
    while !wanted.is_empty() {
        let (states, asked) = client.states(peer, collection, wanted).await?;
        // An answer stops at the byte limit, after at least one record: what follows its last
        // record is asked for again. An empty answer means the peer holds none of those asked.
        let done = match states.last() {
            Some((last, _)) => wanted
                .iter()
                .position(|k| k == last)
                .map_or(wanted.len(), |i| i + 1),
            None => asked,
        };
        wanted = &wanted[done..];
        if !states.is_empty() {
            answers.push(states);
        }
    }
    Ok(answers)
}

/// Merge fetched states; if the batch fails for a reason other than an unavailable database,
/// merge them one by one and mark those that fail alone, so one bad record never stalls repair.
/// Dead letters of the merged keys from this peer are settled: the merge covers their events.
async fn merge_or_mark(
    region: &Region,
    peer: &str,
    collection: &str,
    states: Vec<(String, RecordState)>,
    report: &mut RepairReport,
) -> Result<(), StorageError> {
    let keys: Vec<String> = states.iter().map(|(key, _)| key.clone()).collect();
    match merge_states(region, peer, collection, &states).await {
        Ok(changed) => report.records_repaired += changed,
        Err(error @ StorageError::Unavailable(_)) => return Err(error),
        Err(_) => {
            let mut merged = Vec::new();
            for one in states.chunks(1) {
                let (key, state) = &one[0];
                match merge_states(region, peer, collection, one).await {
                    Ok(changed) => {
                        report.records_repaired += changed;
                        merged.push(key.clone());
                    }
                    Err(error @ StorageError::Unavailable(_)) => return Err(error),
                    Err(error) => {
                        tracing::error!(region = region.id(), %peer, %collection, %key, %error,
                            "record cannot be merged; marked as a dead letter and skipped until the peer's state changes");
                        let payload = serde_json::to_vec(&state).expect("states serialize");
                        region
                            .store
                            .mark_unrepairable(
                                peer,
                                collection,
                                key,
                                crate::record::digest::state_hash(state),
                                &payload,
                                &error.to_string(),
                            )
                            .await?;
                        region.replication.dead_lettered(peer, 1);
                        report.records_unrepairable += 1;
                    }
                }
            }
            region
                .store
                .clear_dead_letters(peer, collection, &merged)
                .await?;
            return Ok(());
        }
    }
    region
        .store
        .clear_dead_letters(peer, collection, &keys)
        .await
}

/// Merge a peer's states through the replicated-event apply; returns how many records changed.
pub async fn merge_states(
    region: &Region,
    peer: &str,
    collection: &str,
    states: &[(String, RecordState)],
) -> Result<u64, StorageError> {
    let changes: Vec<Change> = states
        .iter()
        .flat_map(|(key, state)| {
            state.versions.iter().map(move |version| {
                Change::Record(Event::new(
                    peer,
                    collection,
                    key,
                    state.home.clone(),
                    version.clone(),
                ))
            })
        })
        .collect();
    let applied = apply_with_retries(region, peer, &changes, &[], &[]).await?;
    Ok(applied.records_changed as u64)
}

/// Keeps a round under `max_records_per_sec`, so repair never starves the region's writes.
struct Throttle {
    started: Instant,
    per_second: u64,
}

impl Throttle {
    fn new(per_second: u64) -> Throttle {
        Throttle {
            started: Instant::now(),
            per_second: per_second.max(1),
        }
    }

    async fn pace(&self, records: u64) {
        let due = Duration::from_secs_f64(records as f64 / self.per_second as f64);
        if let Some(wait) = due.checked_sub(self.started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}

/// The periodic rounds: against every peer, every `repair.interval_secs`, and whenever asked; a
/// new region's first copy comes first ([`crate::membership::bootstrap`]).
pub async fn run(region: std::sync::Arc<Region>) {
    if region.is_bootstrapping() {
        crate::membership::bootstrap(&region).await;
    }
    let every = Duration::from_secs(region.config.repair.interval_secs.max(1));
    loop {
        // A restored region retries its catch-up rounds soon: it is not ready until they complete.
        let wait = if region.catching_up().is_empty() {
            every
        } else {
            Duration::from_secs(1)
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = region.repair_wanted.notified() => {}
        }
        for peer in region.members.peers() {
            // A failed round is logged and shown in the status; the next one tries again.
            let _ = round(&region, &peer.id).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Listing sets keep every bucket once, in order; each holds at most a page of records
        /// unless one bucket alone holds more; and a set ends only where the next bucket would
        /// have taken it past a page.
        #[test]
        fn listing_sets_cover_the_buckets_in_pages(
            counts in proptest::collection::vec(0i64..(2 * HASH_PAGE), 0..200)
        ) {
            let buckets: Vec<(i32, i64)> =
                counts.iter().enumerate().map(|(i, c)| (i as i32 * 3, *c)).collect();
            let count_of = |bucket: i32| buckets[(bucket / 3) as usize].1;
            let sets = listing_sets(&buckets);
            let flat: Vec<i32> = sets.iter().flatten().copied().collect();
            prop_assert_eq!(flat, buckets.iter().map(|(b, _)| *b).collect::<Vec<_>>());
            for (i, set) in sets.iter().enumerate() {
                prop_assert!(!set.is_empty());
                let records: i64 = set.iter().map(|b| count_of(*b)).sum();
                prop_assert!(records <= HASH_PAGE || set.len() == 1);
                if let Some(next) = sets.get(i + 1) {
                    prop_assert!(records + count_of(next[0]) > HASH_PAGE);
                }
            }
        }
    }
}
