//! The peer API that anti-entropy reads ([`crate::replication::repair`]), and the admin call that
//! starts a round now.
//!
//! Peer endpoints take the peer token: they list every collection, system ones included, and
//! answer whole stored states, which clients have no business reading. Each answer is bounded
//! (a page of hashes, a byte limit on states), so one call never holds much memory on either side.

use crate::config::Scope;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::error::ApiError;
use super::headers::bearer;
use super::{ApiPath, ApiQuery, ApiState, SharedState};
use crate::record::digest::{StateHash, BUCKETS};
use crate::record::digest_frames::{
    self, DIGESTS_MEDIA_TYPE, RECLAIMED_THROUGH_HEADER, RESTORING_HEADER,
};
use crate::record::names;
use crate::replication::repair::{
    self, ActorSeenBody, AppliedBody, CollectionsBody, DigestEntry, DigestsBody, HashedStatesBody,
    HashedStatesRequest, HashesBody, HashesRequest, ModulesBody, RepairReport, StatesBody,
    StatesPageBody, StatesPageRequest, StatesRequest, FETCH_BYTES, FETCH_KEYS, HASH_PAGE,
};
use crate::storage::repair::HashCursor;

impl ApiState {
    /// Region-to-region calls: the peer token.
    pub fn require_peer(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match bearer(headers)? {
            None => Err(ApiError::Unauthorized),
            Some(token) if self.is_peer_token(token) => Ok(()),
            Some(_) => Err(ApiError::Forbidden),
        }
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct CollectionQuery {
    /// A collection, system collections included.
    pub collection: String,
}

fn collection_name(name: &str) -> Result<(), ApiError> {
    names::validate("collection", name)
        .map_err(|e| ApiError::bad_request("bad-name", e.to_string()))
}

/// The JSON body of a peer call about one collection, at most `limit` bytes, once the peer token
/// and the collection's name are checked.
async fn peer_request<T: serde::de::DeserializeOwned>(
    s: &ApiState,
    headers: &HeaderMap,
    query: &CollectionQuery,
    body: axum::body::Body,
    limit: usize,
) -> Result<T, ApiError> {
    s.require_peer(headers)?;
    collection_name(&query.collection)?;
    let bytes = super::headers::json_body(headers, body, limit).await?;
    super::headers::parse_json(&bytes)
}

/// Refuse a request for more than [`FETCH_KEYS`] records.
fn at_most_a_fetch(asked: usize, what: &str) -> Result<(), ApiError> {
    if asked > FETCH_KEYS {
        return Err(ApiError::bad_request(
            "too-many-keys",
            format!("at most {FETCH_KEYS} {what} per request"),
        ));
    }
    Ok(())
}

#[utoipa::path(get, path = "/v1/peer/collections", tag = "peer",
    responses((status = 200, description = "every collection holding records here", body = CollectionsBody),
              (status = 401, description = "no peer token", body = super::error::Problem, content_type = "application/problem+json")))]
pub async fn collections(
    State(s): State<SharedState>,
    headers: HeaderMap,
) -> Result<Json<CollectionsBody>, ApiError> {
    s.require_peer(&headers)?;
    Ok(Json(CollectionsBody {
        collections: s.region.store.collections_with_records().await?,
    }))
}

#[utoipa::path(get, path = "/v1/peer/modules", tag = "peer",
    responses((status = 200, description = "the sha256 of every resolver module held here", body = ModulesBody)))]
pub async fn modules(
    State(s): State<SharedState>,
    headers: HeaderMap,
) -> Result<Json<ModulesBody>, ApiError> {
    s.require_peer(&headers)?;
    Ok(Json(ModulesBody {
        modules: s.region.store.module_hashes().await?,
    }))
}

#[utoipa::path(get, path = "/v1/peer/modules/{sha256}", tag = "peer",
    params(("sha256" = String, Path, description = "the module's sha256")),
    responses((status = 200, description = "the module's bytes", content_type = "application/wasm"),
              (status = 404, description = "not held here", body = super::error::Problem, content_type = "application/problem+json")))]
pub async fn module(
    State(s): State<SharedState>,
    headers: HeaderMap,
    ApiPath(sha256): ApiPath<String>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    s.require_peer(&headers)?;
    match s.region.store.module(&sha256).await? {
        Some(bytes) => Ok((
            [(axum::http::header::CONTENT_TYPE, "application/wasm")],
            bytes,
        )
            .into_response()),
        None => Err(ApiError::NotFound(format!("no module {sha256:?} here"))),
    }
}

#[utoipa::path(get, path = "/v1/peer/digests", tag = "peer", params(CollectionQuery),
    responses((status = 200, description = "the digest of every non-empty bucket: as JSON, or as binary frames \
(record::digest_frames) to a request that accepts `application/vnd.locus.digests`, with the reclamation horizon \
in `locus-reclaimed-through` and the restore state in `locus-restoring`",
                content((DigestsBody = "application/json"), (Vec<u8> = "application/vnd.locus.digests")),
                headers(("locus-restoring" = String, description = "with frames: `true` while this region catches up after a restore"),
                        ("locus-reclaimed-through" = String, description = "with frames: the tombstone reclamation horizon (an HLC), if any"))),
              (status = 400, description = "bad collection name", body = super::error::Problem, content_type = "application/problem+json")))]
pub async fn digests(
    State(s): State<SharedState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<CollectionQuery>,
) -> Result<Response, ApiError> {
    s.require_peer(&headers)?;
    collection_name(&query.collection)?;
    // Read before the scan, so the frames can follow their headers: a horizon older than the
    // scan only makes a restored asker keep records it could have pruned, until its next round.
    let reclaimed = s.region.store.reclaimed_through().await?;
    let restoring = !s.region.catching_up().is_empty();
    if accepts(&headers, DIGESTS_MEDIA_TYPE) {
        return Ok(digest_frames(&s, &query.collection, reclaimed, restoring));
    }
    let buckets = s.region.store.bucket_digests(&query.collection).await?;
    Ok(Json(DigestsBody {
        buckets: buckets.iter().map(DigestEntry::of).collect(),
        reclaimed_through: reclaimed.map(|hlc| hlc.as_u64().to_string()),
        restoring,
    })
    .into_response())
}

/// Whether the request's `Accept` names `media_type` (an earlier build's client never does).
fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|range| range.split(';').next().unwrap_or("").trim() == media_type)
}

/// The digests as frames, each piece sent as the scan yields it. A scan that fails mid-way
/// aborts the answer before its closing frame, which the asker refuses.
fn digest_frames(
    s: &ApiState,
    collection: &str,
    reclaimed: Option<crate::clock::hlc::Hlc>,
    restoring: bool,
) -> Response {
    /// Digests per piece: about 28 KiB of frames.
    const PIECE: usize = 1024;
    let pieces = s.region.store.bucket_digests_in_pieces(collection, PIECE);
    let region = s.region.id().to_owned();
    // The state: the pieces still to come (none once the answer is closed or cut), and how many
    // digests went out.
    let frames = futures_util::stream::unfold((Some(pieces), 0usize), move |(pieces, sent)| {
        let region = region.clone();
        async move {
            let mut pieces = pieces?;
            let mut bytes = Vec::new();
            match pieces.recv().await {
                Some(Ok(digests)) => {
                    bytes.reserve(digests.len() * digest_frames::FRAME);
                    for digest in &digests {
                        digest_frames::encode(digest, &mut bytes);
                    }
                    Some((Ok(bytes), (Some(pieces), sent + digests.len())))
                }
                None => {
                    digest_frames::encode_end(sent, &mut bytes);
                    Some((Ok(bytes), (None, sent)))
                }
                Some(Err(error)) => {
                    tracing::error!(%region, %error, "bucket digests failed mid-answer; the answer is cut short");
                    Some((
                        Err(std::io::Error::other("bucket digests failed")),
                        (None, sent),
                    ))
                }
            }
        }
    });
    let mut response = Response::new(axum::body::Body::from_stream(frames));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(DIGESTS_MEDIA_TYPE),
    );
    headers.insert(
        RESTORING_HEADER,
        HeaderValue::from_static(if restoring { "true" } else { "false" }),
    );
    if let Some(hlc) = reclaimed {
        headers.insert(RECLAIMED_THROUGH_HEADER, HeaderValue::from(hlc.as_u64()));
    }
    response
}

#[utoipa::path(post, path = "/v1/peer/hashes", tag = "peer", params(CollectionQuery),
    request_body = HashesRequest,
    responses((status = 200, description = "a page of the chosen buckets' (bucket, key, hash) triples", body = HashesBody),
              (status = 400, description = "bad collection, bucket or limit", body = super::error::Problem, content_type = "application/problem+json")))]
pub async fn hashes(
    State(s): State<SharedState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<CollectionQuery>,
    body: axum::body::Body,
) -> Result<Json<HashesBody>, ApiError> {
    let request: HashesRequest = peer_request(&s, &headers, &query, body, 1024 * 1024).await?;
    let limit = request.limit.unwrap_or(HASH_PAGE);
    if !(1..=HASH_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(
            "bad-limit",
            format!("limit must be 1 to {HASH_PAGE}"),
        ));
    }
    if request.buckets.len() > BUCKETS as usize {
        return Err(ApiError::bad_request(
            "too-many-buckets",
            format!("at most {BUCKETS} buckets per request"),
        ));
    }
    let entries = s
        .region
        .store
        .bucket_hashes(
            &query.collection,
            &request.buckets,
            request.after.as_ref(),
            limit,
        )
        .await?;
    let next = (entries.len() as i64 == limit)
        .then(|| {
            entries.last().map(|last| HashCursor {
                bucket: last.bucket,
                key: last.key.clone(),
            })
        })
        .flatten();
    Ok(Json(HashesBody {
        entries: entries
            .into_iter()
            .map(|entry| (entry.bucket, entry.key, entry.hash.to_hex()))
            .collect(),
        next,
    }))
}

#[utoipa::path(post, path = "/v1/peer/states", tag = "peer", params(CollectionQuery),
    request_body = StatesRequest,
    responses((status = 200, description = "the stored states of the keys held here, up to a byte limit", body = StatesBody),
              (status = 400, description = "bad collection or too many keys", body = super::error::Problem, content_type = "application/problem+json")))]
pub async fn states(
    State(s): State<SharedState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<CollectionQuery>,
    body: axum::body::Body,
) -> Result<Json<StoredStates>, ApiError> {
    // Room for FETCH_KEYS keys of the longest name, every byte of it escaped.
    let request: StatesRequest = peer_request(&s, &headers, &query, body, 2 * 1024 * 1024).await?;
    at_most_a_fetch(request.keys.len(), "keys")?;
    let records = s
        .region
        .store
        .states_of(&query.collection, &request.keys, FETCH_BYTES)
        .await?;
    Ok(Json(StoredStates { records }))
}

#[utoipa::path(post, path = "/v1/peer/states-after", tag = "peer", params(CollectionQuery),
    request_body = StatesPageRequest,
    responses((status = 200, description = "a page of the collection's stored states in key order, after a key, up to a byte limit", body = StatesPageBody),
              (status = 400, description = "bad collection or key", body = super::error::Problem, content_type = "application/problem+json")))]
pub async fn states_after(
    State(s): State<SharedState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<CollectionQuery>,
    body: axum::body::Body,
) -> Result<Json<StoredStatesPage>, ApiError> {
    let request: StatesPageRequest = peer_request(&s, &headers, &query, body, 64 * 1024).await?;
    if let Some(after) = &request.after {
        names::validate("key", after)
            .map_err(|e| ApiError::bad_request("bad-name", e.to_string()))?;
    }
    let (records, last) = s
        .region
        .store
        .states_after(
            &query.collection,
            request.after.as_deref().unwrap_or(""),
            FETCH_KEYS as i64,
            FETCH_BYTES,
        )
        .await?;
    let next = match records.last() {
        Some((key, _)) if !last => Some(key.clone()),
        _ => None,
    };
    Ok(Json(StoredStatesPage { records, next }))
}

#[utoipa::path(post, path = "/v1/peer/states-by-hash", tag = "peer", params(CollectionQuery),
    request_body = HashedStatesRequest,
    responses((status = 200, description = "the stored states of the records held here with the given bucket and hash, up to a byte limit", body = HashedStatesBody),
              (status = 400, description = "bad collection, bad hash or too many pairs", body = super::error::Problem, content_type = "application/problem+json")))]
pub async fn states_by_hash(
    State(s): State<SharedState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<CollectionQuery>,
    body: axum::body::Body,
) -> Result<Json<StoredHashedStates>, ApiError> {
    let request: HashedStatesRequest =
        peer_request(&s, &headers, &query, body, 1024 * 1024).await?;
    at_most_a_fetch(request.wanted.len(), "pairs")?;
    let wanted = request
        .wanted
        .iter()
        .map(|wanted| {
            StateHash::from_hex(&wanted.hash)
                .map(|hash| (wanted.bucket, hash))
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "bad-hash",
                        format!("{:?} is not 32 hex digits", wanted.hash),
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (records, complete) = s
        .region
        .store
        .states_by_hash(&query.collection, &wanted, FETCH_BYTES)
        .await?;
    Ok(Json(StoredHashedStates { records, complete }))
}

/// [`HashedStatesBody`] as the peer sends it: the states as stored.
#[derive(serde::Serialize)]
pub struct StoredHashedStates {
    records: Vec<(String, Box<serde_json::value::RawValue>)>,
    complete: bool,
}

/// [`StatesPageBody`] as the peer sends it: the states as stored.
#[derive(serde::Serialize)]
pub struct StoredStatesPage {
    records: Vec<(String, Box<serde_json::value::RawValue>)>,
    next: Option<String>,
}

/// [`StatesBody`] as the peer sends it: the states as stored, not decoded and encoded again.
#[derive(serde::Serialize)]
pub struct StoredStates {
    records: Vec<(String, Box<serde_json::value::RawValue>)>,
}

#[utoipa::path(get, path = "/v1/peer/actors/{actor}", tag = "peer",
    params(("actor" = String, Path, description = "a region incarnation, `<region>.<incarnation>`")),
    responses((status = 200, description = "the highest outbox id applied here from that actor", body = ActorSeenBody)))]
pub async fn actor_seen(
    State(s): State<SharedState>,
    headers: HeaderMap,
    ApiPath(actor): ApiPath<String>,
) -> Result<Json<ActorSeenBody>, ApiError> {
    s.require_peer(&headers)?;
    let highest_outbox_id = s.region.store.highest_outbox_id_seen(&actor).await?;
    Ok(Json(ActorSeenBody {
        actor,
        highest_outbox_id,
    }))
}

#[utoipa::path(get, path = "/v1/peer/applied", tag = "peer",
    responses((status = 200, description = "per origin, the sequence of its stream through which everything was applied here", body = AppliedBody),
              (status = 401, description = "no peer token", body = super::error::Problem, content_type = "application/problem+json")))]
pub async fn applied(
    State(s): State<SharedState>,
    headers: HeaderMap,
) -> Result<Json<AppliedBody>, ApiError> {
    s.require_peer(&headers)?;
    Ok(Json(AppliedBody {
        streams: s.region.store.applied_prefixes().await?,
    }))
}

#[utoipa::path(post, path = "/v1/regions/{id}/repair", tag = "regions",
    params(("id" = String, Path, description = "the peer to pull from")),
    responses((status = 200, description = "the round ran to its end", body = RepairReport),
              (status = 401, description = "no admin token", body = super::error::Problem, content_type = "application/problem+json"),
              (status = 404, description = "not a peer of this region", body = super::error::Problem, content_type = "application/problem+json"),
              (status = 502, description = "the peer did not answer", body = super::error::Problem, content_type = "application/problem+json")))]
pub async fn repair_now(
    State(s): State<SharedState>,
    headers: HeaderMap,
    ApiPath(peer): ApiPath<String>,
) -> Result<Json<RepairReport>, ApiError> {
    s.authorize(&headers, Scope::Admin)?;
    if !s.region.members.is_peer(&peer) {
        return Err(ApiError::NotFound(format!(
            "{peer:?} is not a peer of this region"
        )));
    }
    match repair::round(&s.region, &peer).await {
        Ok(report) => Ok(Json(report)),
        Err(repair::RepairError::Storage(e)) => Err(ApiError::Storage(e)),
        Err(error @ repair::RepairError::Peer { .. }) => {
            Err(ApiError::PeerFailed(error.to_string()))
        }
        Err(repair::RepairError::UnknownPeer(peer)) => Err(ApiError::NotFound(format!(
            "{peer:?} is not a peer of this region"
        ))),
    }
}
