//! `GET /v1/regions`: this region and every peer as this region sees them: whether the peer's API
//! answers, its resolver engine fingerprint, when its last event was applied here, its stream position, the replication lag, and
//! this region's own outbox backlog. What an operator looks at first when regions disagree.

use crate::config::Scope;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ApiError;
use super::{headers, ApiPath, SharedState};
use crate::membership::{self, MemberRecord};
use crate::replication::status::PeerStatus;

#[derive(Debug, Serialize, ToSchema)]
pub struct RegionEntry {
    pub id: String,
    /// Whether this entry is the region that answered.
    #[serde(rename = "self")]
    pub this_region: bool,
    pub api_url: Option<String>,
    /// The peer's API answered a health probe just now (always true for this region).
    pub reachable: bool,
    /// Peers only: this region's running view of the peer, from its probes every second and the
    /// forwards it sent; while down, forwards to it fail at once.
    pub health: Option<crate::peer_health::PeerHealth>,
    /// The region's resolver engine fingerprint (wasmtime build and the limits that decide
    /// outcomes). Regions whose fingerprints differ may resolve one conflict differently.
    pub engine: Option<String>,
    /// When this region last applied an event from the peer.
    pub last_heard: Option<String>,
    /// Peers: the newest heartbeat promise from the peer applied here (milliseconds since the
    /// epoch): every write the peer made with an HLC below it is applied here. This region: the
    /// promise of the last heartbeat it sent (when this process is its publisher).
    pub applied_through_ms: Option<u64>,
    /// Peers: how far this region is behind the peer, from heartbeats: now less
    /// `applied_through_ms`. Grows while nothing arrives, so a stalled consumer shows even when
    /// nobody writes; null before the first heartbeat.
    pub lag_ms: Option<u64>,
    /// Replication from the peer into this region.
    pub replication: Option<PeerStatus>,
    /// This region only: events waiting in the outbox.
    pub outbox_backlog: Option<i64>,
    /// This region only: events JetStream acknowledged since start.
    pub events_published: Option<u64>,
    /// This region only: why publishing is failing, if it is.
    pub publisher_error: Option<String>,
    /// This region only: the version of the NATS server it connected to.
    pub nats_version: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RegionsBody {
    pub deployment: String,
    pub region: String,
    /// The incarnation this region writes as; null while it checks with its peers at start.
    pub incarnation: Option<String>,
    /// Dead letters held here for an operator (`/v1/dead-letters`).
    pub dead_letters: i64,
    /// After a restore: the peers a repair round has yet to complete against before this region
    /// reports ready; empty otherwise.
    pub catching_up_from: Vec<String>,
    /// A new region copying the deployment's data from a peer (its progress is in that peer's
    /// `replication.repair.progress`); it reports ready once the copy is complete.
    pub bootstrapping: bool,
    /// Regions retired from the deployment (`/v1/regions/{id}/retire`).
    pub retired: Vec<String>,
    /// Tombstones stamped before this time (milliseconds since the epoch) are reclaimed here:
    /// every region had applied them. Null until every region's heartbeats have said how far it
    /// has applied every other.
    pub tombstones_reclaimed_through_ms: Option<u64>,
    pub regions: Vec<RegionEntry>,
}

#[utoipa::path(get, path = "/v1/regions", tag = "regions", responses((status = 200, description = "every region of the deployment", body = RegionsBody)))]
pub async fn list(
    State(s): State<SharedState>,
    headers: HeaderMap,
) -> Result<Json<RegionsBody>, ApiError> {
    s.authorize(&headers, Scope::Read)?;
    let region = &s.region;
    let backlog = region.store.outbox_backlog().await?;
    let dead_letters = region.store.dead_letter_count().await?;
    region.replication.set_dead_letters_held(dead_letters);
    region.replication.set_outbox_backlog(backlog);
    let (now_ms, applied_through) = region.applied_through().await?;
    let mut regions = vec![RegionEntry {
        id: region.id().to_owned(),
        this_region: true,
        api_url: None,
        reachable: true,
        health: None,
        engine: Some(region.resolvers.fingerprint().to_owned()),
        last_heard: None,
        applied_through_ms: region.replication.heartbeat_promised_ms(),
        lag_ms: None,
        replication: None,
        outbox_backlog: Some(backlog),
        events_published: Some(region.replication.events_published()),
        publisher_error: region.replication.publisher_error_now(),
        nats_version: region.replication.nats_version(),
    }];
    let peers = &s.peers;
    let members = region.members.peers();
    let probes = members
        .iter()
        .map(|peer| async move { (peer, peers.probe(&peer.id).await) });
    for (peer, health) in futures_util::future::join_all(probes).await {
        let replication = region.replication.peer(&peer.id);
        regions.push(RegionEntry {
            id: peer.id.clone(),
            this_region: false,
            api_url: Some(peer.api_url.clone()),
            reachable: health.is_some(),
            health: Some(region.peer_health.of(&peer.id)),
            engine: health
                .as_ref()
                .and_then(|h| h.get("engine"))
                .and_then(|e| e.as_str())
                .map(str::to_owned),
            last_heard: replication.as_ref().and_then(|r| r.last_applied_at.clone()),
            applied_through_ms: applied_through.get(&peer.id).copied(),
            lag_ms: applied_through
                .get(&peer.id)
                .map(|through| now_ms.saturating_sub(*through)),
            replication,
            outbox_backlog: None,
            events_published: None,
            publisher_error: None,
            nats_version: None,
        });
    }
    Ok(Json(RegionsBody {
        deployment: region.config.deployment.clone(),
        region: region.id().to_owned(),
        incarnation: region
            .settled_actor()
            .map(|actor| actor.incarnation().to_owned()),
        dead_letters,
        catching_up_from: region.catching_up(),
        bootstrapping: region.is_bootstrapping(),
        retired: region.members.retired(),
        tombstones_reclaimed_through_ms: region.replication.reclaimed_through_ms(),
        regions,
    }))
}

/// Most bytes of an announcement: one URL.
const ANNOUNCEMENT_BYTES: usize = 4 * 1024;

#[utoipa::path(put, path = "/v1/peer/members/{id}", tag = "peer",
    params(("id" = String, Path, description = "the region that joins")),
    request_body = MemberRecord,
    responses((status = 204, description = "the region is a member; its record replicates to every region, which adopt it"),
              (status = 400, description = "not a region id, this region itself, or not an http(s) URL", body = super::error::Problem, content_type = "application/problem+json"),
              (status = 409, description = "the region is retired or retiring", body = super::error::Problem, content_type = "application/problem+json"),
              (status = 401, description = "no peer token", body = super::error::Problem, content_type = "application/problem+json")))]
/// A region joining the deployment announces itself to the regions of its configuration
/// ([`crate::membership`]).
pub async fn announce(
    State(s): State<SharedState>,
    request_headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    s.require_peer(&request_headers)?;
    crate::config::validate_region_id("id", &id)
        .map_err(|e| ApiError::bad_request("unknown-region", e.to_string()))?;
    if id == s.region.id() {
        return Err(ApiError::bad_request(
            "unknown-region",
            format!("{id:?} is this region itself"),
        ));
    }
    let bytes = headers::json_body(&request_headers, body, ANNOUNCEMENT_BYTES).await?;
    let record: MemberRecord = headers::parse_json(&bytes)?;
    if !record.api_url.starts_with("http://") && !record.api_url.starts_with("https://") {
        return Err(ApiError::bad_request(
            "bad-url",
            format!("{:?} is not an http(s) URL", record.api_url),
        ));
    }
    if record.state != membership::MemberState::Active || record.rehome_to.is_some() {
        return Err(ApiError::bad_request(
            "bad-body",
            "an announcement is of an active region: {\"api_url\": \"...\"}",
        ));
    }
    match membership::record_announced(&s.region, &id, &record).await? {
        None => Err(ApiError::Conflict(format!(
            "{id} is retired or retiring; a retired region id is not reused"
        ))),
        Some(wrote) => {
            if wrote {
                tracing::info!(peer = %id, url = %record.api_url, "region announced itself; recorded as a member");
            }
            Ok(StatusCode::NO_CONTENT)
        }
    }
}

#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetireBody {
    /// The region that homes the retired region's records from now on.
    pub rehome_to: String,
    /// The region is gone for good (its disk lost): a survivor, the one that answers, takes over
    /// its records. Without it, the request must reach the retiring region itself.
    #[serde(default)]
    pub gone: bool,
}

/// Most bytes of a retirement request.
const RETIRE_BYTES: usize = 4 * 1024;

#[utoipa::path(post, path = "/v1/regions/{id}/retire", tag = "regions",
    params(("id" = String, Path, description = "the region to retire")),
    request_body = RetireBody,
    responses((status = 200, description = "the region is retired: its records are homed in `rehome_to`, its stream and consumers removed", body = membership::RetireReport),
              (status = 400, description = "bad body or successor", body = super::error::Problem, content_type = "application/problem+json"),
              (status = 401, description = "no admin token", body = super::error::Problem, content_type = "application/problem+json"),
              (status = 404, description = "not a region of this deployment", body = super::error::Problem, content_type = "application/problem+json"),
              (status = 409, description = "sent to a region other than the one retiring without `gone`, or `gone` for a region that answers", body = super::error::Problem, content_type = "application/problem+json"),
              (status = 503, description = "a step did not complete in time (the outbox did not drain, replication lags); retrying is safe", body = super::error::Problem, content_type = "application/problem+json")))]
/// Retire a region ([`membership::retire`]): sent to the region itself, or with `gone` to a
/// survivor when the region is lost for good. Safe to retry.
pub async fn retire(
    State(s): State<SharedState>,
    request_headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    body: Body,
) -> Result<Json<membership::RetireReport>, ApiError> {
    s.authorize(&request_headers, Scope::Admin)?;
    let bytes = headers::json_body(&request_headers, body, RETIRE_BYTES).await?;
    let request: RetireBody = headers::parse_json(&bytes)?;
    membership::retire(&s.region, &id, &request.rehome_to, request.gone)
        .await
        .map(Json)
        .map_err(|error| match error {
            membership::RetireError::UnknownRegion(_) => ApiError::NotFound(error.to_string()),
            membership::RetireError::BadSuccessor(_) => {
                ApiError::bad_request("unknown-region", error.to_string())
            }
            membership::RetireError::WrongRegion(_) => ApiError::Conflict(error.to_string()),
            membership::RetireError::Stalled(_) => ApiError::NotReady(error.to_string()),
            membership::RetireError::Repair(_) => ApiError::PeerFailed(error.to_string()),
            membership::RetireError::Service(e) => e.into(),
            membership::RetireError::Storage(e) => ApiError::Storage(e),
        })
}
