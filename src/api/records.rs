//! Record endpoints: read, write, delete, list.
//!
//! A write that belongs to another region is forwarded there and the client gets the home's answer.
//! When the home is unreachable, the collection's policy decides: 503 (default) or a failover write
//! kept here and reconciled later by the conflict strategy. Conditional writes never fail over:
//! their condition can only be judged by the home.

use crate::config::Scope;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{OriginalUri, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, Problem};
use super::forward::ForwardError;
use super::headers::{
    self, IDEMPOTENT_REPLAYED, LOCUS_FAILOVER, LOCUS_RESOLUTION, LOCUS_SESSION, LOCUS_SIBLINGS,
};
use super::{cursor, ApiQuery, CollectionPath, RecordPath, SharedState};
use crate::clock::hlc::Hlc;
use crate::clock::staleness::Freshness;
use crate::clock::version::{ETag, SessionToken, VersionVector};
use crate::record::names::{self, prefix_upper_bound};
use crate::record::policy::{OnHomeUnreachable, Strategy};
use crate::record::resolution::Resolution;
use crate::record::view::{materialized_view, resolution_pending, View};
use crate::record::visible_record;
use crate::record::{RecordState, Version};
use crate::service::{Route, WriteOp, WriteOutcome, WriteRequest, Written};

/// A record as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RecordBody {
    pub collection: String,
    pub key: String,
    /// Any JSON value (null for a deleted record).
    #[schema(value_type = Value)]
    pub value: Value,
    pub home: String,
    #[schema(value_type = Object)]
    pub version: VersionVector,
    #[schema(value_type = String)]
    pub hlc: Hlc,
    pub deleted: bool,
}

/// A record with concurrent versions, under the `siblings` strategy.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SiblingsBody {
    pub collection: String,
    pub key: String,
    pub home: String,
    pub siblings: Vec<Version>,
}

/// One page of a listing. Each entry is a record, or a siblings document under `siblings`. Under
/// the `resolver` strategy, an entry whose resolver has not run yet on its current concurrent
/// versions shows the view from before they changed and carries `"resolution_pending": true` (a
/// GET of it answers `Locus-Resolution: pending`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RecordPage {
    #[schema(value_type = Vec<Object>)]
    pub records: Vec<Value>,
    /// The cursor of the next page; `null` on the last page.
    pub next: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// This region's replica.
    #[default]
    Local,
    /// The home region's leader.
    Home,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ReadParams {
    /// `home` reads at the record's home leader.
    #[param(inline)]
    pub consistency: Option<Consistency>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Only keys that start with this.
    pub prefix: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<u32>,
    /// The `next` of the previous page.
    pub cursor: Option<String>,
}

const DEFAULT_PAGE: u32 = 100;
/// How often a read waiting for its session's write looks again.
const SESSION_POLL: Duration = Duration::from_millis(10);
const MAX_PAGE: u32 = 1000;
/// A page stops after examining this many rows (tombstones included) and returns what it has,
/// with a cursor, so a prefix full of deletes cannot make one request scan without end.
const MAX_ROWS_EXAMINED: usize = 10_000;

fn record_body(collection: &str, key: &str, home: &str, version: &Version) -> RecordBody {
    RecordBody {
        collection: collection.to_owned(),
        key: key.to_owned(),
        value: version.value.clone(),
        home: home.to_owned(),
        version: version.vector.clone(),
        hlc: version.hlc,
        deleted: version.deleted,
    }
}

/// A resolver's view as a record: its value, with the causal context and greatest HLC of the
/// versions it resolved, so a write made with its ETag supersedes all of them.
fn resolved_body(collection: &str, key: &str, state: &RecordState, value: &Value) -> RecordBody {
    RecordBody {
        collection: collection.to_owned(),
        key: key.to_owned(),
        value: value.clone(),
        home: state.home.region.clone(),
        version: state.causal_context(),
        hlc: state.max_hlc().unwrap_or_default(),
        deleted: false,
    }
}

fn etag_header(state: &RecordState) -> HeaderValue {
    HeaderValue::from_str(&ETag(state.causal_context()).encode()).expect("base64 is header-safe")
}

/// The JSON of one record's view, for listings; `None` when a reader would not find it.
fn view_json(
    collection: &str,
    key: &str,
    state: &RecordState,
    resolution: Option<&Resolution>,
    strategy: &Strategy,
) -> Option<Value> {
    let json = match materialized_view(state, strategy, resolution) {
        View::Absent | View::Deleted | View::ResolvedDeleted { .. } => return None,
        View::Value(v) => serde_json::to_value(record_body(collection, key, &state.home.region, v)),
        View::Resolved(value) => serde_json::to_value(resolved_body(collection, key, state, value)),
        View::Siblings(vs) => serde_json::to_value(SiblingsBody {
            collection: collection.to_owned(),
            key: key.to_owned(),
            home: state.home.region.clone(),
            siblings: vs.into_iter().cloned().collect(),
        }),
    };
    Some(json.expect("records serialize"))
}

async fn render(
    region: &crate::service::Region,
    collection: &str,
    key: &str,
    state: Option<&RecordState>,
    resolution: Option<&Resolution>,
    strategy: &Strategy,
) -> Result<Response, ApiError> {
    let Some(state) = state else {
        return Err(ApiError::NotFound("no such record".into()));
    };
    let pending = resolution_pending(state, strategy, resolution);
    let mut response = match materialized_view(state, strategy, resolution) {
        View::Absent | View::Deleted => return Err(ApiError::NotFound("no such record".into())),
        View::ResolvedDeleted { resolver, siblings } => {
            // Rare, and worth a query: the conflict-log entry that holds the versions it hid.
            let conflict = region.store.latest_conflict_id(collection, key).await?;
            return Err(ApiError::ResolvedDeleted {
                resolver: resolver.to_owned(),
                siblings,
                conflict,
                etag: etag_header(state),
                pending,
            });
        }
        View::Value(v) => Json(record_body(collection, key, &state.home.region, v)).into_response(),
        View::Resolved(value) => {
            let mut response = Json(resolved_body(collection, key, state, value)).into_response();
            response
                .headers_mut()
                .insert(LOCUS_SIBLINGS, HeaderValue::from(state.versions.len()));
            response
        }
        View::Siblings(vs) => {
            let count = vs.len();
            let body = SiblingsBody {
                collection: collection.to_owned(),
                key: key.to_owned(),
                home: state.home.region.clone(),
                siblings: vs.into_iter().cloned().collect(),
            };
            let mut response = (StatusCode::MULTIPLE_CHOICES, Json(body)).into_response();
            response
                .headers_mut()
                .insert(LOCUS_SIBLINGS, HeaderValue::from(count));
            response
        }
    };
    response
        .headers_mut()
        .insert(header::ETAG, etag_header(state));
    if pending {
        response
            .headers_mut()
            .insert(LOCUS_RESOLUTION, HeaderValue::from_static("pending"));
    }
    Ok(response)
}

fn forward_error(error: ForwardError, retry_after: u64) -> ApiError {
    match error {
        ForwardError::UnknownPeer(home) | ForwardError::Unreachable { region: home, .. } => {
            ApiError::HomeUnavailable {
                detail: format!("the record's home region {home} is unreachable"),
                home,
                retry_after,
            }
        }
        ForwardError::TimedOut { region } => ApiError::GatewayTimeout { home: region },
        ForwardError::Failed { region, cause } => ApiError::BadGateway {
            home: region,
            cause,
        },
    }
}

#[utoipa::path(
    get, path = "/v1/collections/{c}/records/{key}", tag = "records",
    params(("c" = String, Path, description = "collection"), ("key" = String, Path, description = "record key"), ReadParams,
           ("Locus-Session" = Option<String>, Header, description = "session token from a write: read your writes"),
           ("Locus-Max-Staleness" = Option<u64>, Header, description = "milliseconds: served here when every region's heartbeats say this replica is at most that old, at the record's home otherwise")),
    responses(
        (status = 200, description = "the record; under the resolver strategy, a record whose concurrent versions changed and whose resolver has not run on them yet shows the view from before the change, with `Locus-Resolution: pending`", body = RecordBody),
        (status = 300, description = "concurrent versions (siblings strategy)", body = SiblingsBody),
        (status = 404, description = "absent or deleted; a record whose resolver resolved its concurrent versions to deleted answers the problem type `resolved-deleted` with `Locus-Resolved: deleted`, `Locus-Resolver`, `Locus-Siblings`, `Locus-Conflict` (the conflict-log entry) and an `ETag` whose write supersedes the versions", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the home is unreachable (consistency=home), or a forwarded read's session write is not applied here yet", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn get(
    State(s): State<SharedState>,
    RecordPath { collection, key }: RecordPath,
    ApiQuery(params): ApiQuery<ReadParams>,
    OriginalUri(uri): OriginalUri,
    request_headers: HeaderMap,
) -> Result<Response, ApiError> {
    let route = s.authorize(&request_headers, Scope::Read)?;
    let session =
        headers::session(&request_headers)?.filter(|t| t.collection == collection && t.key == key);
    let max_staleness = headers::max_staleness(&request_headers)?;
    let (mut state, mut resolution, policy) = s.region.read(&collection, &key).await?;

    // Read your writes: wait (bounded) for this region to apply the session's write, and only
    // then fall back to reading at the home.
    let covers = |state: &Option<RecordState>, token: &SessionToken| {
        state
            .as_ref()
            .is_some_and(|st| st.causal_context().covers(&token.version))
    };
    let mut lagging = session.as_ref().is_some_and(|token| !covers(&state, token));
    if lagging && params.consistency != Some(Consistency::Home) {
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(s.region.config.replication.session_wait_ms);
        while lagging && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(SESSION_POLL).await;
            (state, resolution, _) = s.region.read(&collection, &key).await?;
            lagging = session.as_ref().is_some_and(|token| !covers(&state, token));
        }
    }
    // A forwarded read cannot go on to another region: rather than stale data, a 503.
    if lagging && route != Route::Client {
        let written_at = session.map(|t| t.written_at).unwrap_or_default();
        return Err(ApiError::SessionNotApplied {
            written_at,
            retry_after: s.region.config.forwarding.retry_after_secs,
        });
    }
    let too_stale = match max_staleness {
        Some(max_ms) if route == Route::Client && !lagging => {
            match s.region.freshness(max_ms).await? {
                Freshness::Fresh => false,
                Freshness::Stale { region, behind_ms } => {
                    tracing::debug!(%collection, %key, stale = %region, ?behind_ms, max_ms, "too stale here; reading at the home");
                    true
                }
            }
        }
        _ => false,
    };
    if route == Route::Client
        && (params.consistency == Some(Consistency::Home) || lagging || too_stale)
    {
        // A lagging read goes where the session's write was taken (sure to hold it, whatever the
        // homing); a consistent read goes to the home.
        let target = if lagging && params.consistency != Some(Consistency::Home) {
            session.as_ref().map(|t| t.written_at.clone())
        } else {
            state
                .as_ref()
                .map(|st| st.home.region.clone())
                .or_else(|| policy.default_home.clone())
        };
        if let Some(home) = target.filter(|h| h != s.region.id()) {
            let path = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
            return s
                .peers
                .forward(&home, Method::GET, path, &request_headers, Bytes::new())
                .await
                .map_err(|e| forward_error(e, s.region.config.forwarding.retry_after_secs));
        }
    }
    render(
        &s.region,
        &collection,
        &key,
        state.as_ref(),
        resolution.as_ref(),
        &policy.strategy(),
    )
    .await
}

#[utoipa::path(
    put, path = "/v1/collections/{c}/records/{key}", tag = "records",
    params(("c" = String, Path, description = "collection"), ("key" = String, Path, description = "record key"),
           ("If-Match" = Option<String>, Header, description = "ETag: write only if unchanged"),
           ("If-None-Match" = Option<String>, Header, description = "`*`: create only"),
           ("Locus-Home" = Option<String>, Header, description = "home region of a new record"),
           ("Idempotency-Key" = Option<String>, Header, description = "a retry with the same key gets the first outcome (`Idempotent-Replayed: true`) instead of writing again; kept a day")),
    request_body(content = Object, description = "the record's JSON value", content_type = "application/json"),
    responses(
        (status = 201, description = "created", body = RecordBody),
        (status = 200, description = "updated", body = RecordBody),
        (status = 400, description = "malformed JSON, name or header", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "precondition failed", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "the Idempotency-Key was used for another request", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "body over the limit", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "home unreachable", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "home did not answer in time; outcome unknown", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn put(
    State(s): State<SharedState>,
    RecordPath { collection, key }: RecordPath,
    OriginalUri(uri): OriginalUri,
    request_headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let route = s.authorize(&request_headers, Scope::Write)?;
    let bytes = headers::json_body(
        &request_headers,
        body,
        s.region.config.limits.record_body_bytes,
    )
    .await?;
    let value = headers::parse_record_value(&bytes)?;
    let request = WriteRequest {
        idempotency: headers::idempotency_key(
            &request_headers,
            &Method::PUT,
            &collection,
            &key,
            &bytes,
        )?,
        collection,
        key,
        op: WriteOp::Put(value),
        precondition: headers::precondition(&request_headers)?,
        home_hint: headers::home_hint(&request_headers, |r| s.region.is_region(r))?,
        route,
    };
    write(&s, request, Method::PUT, &uri, &request_headers, bytes).await
}

#[utoipa::path(
    delete, path = "/v1/collections/{c}/records/{key}", tag = "records",
    params(("c" = String, Path, description = "collection"), ("key" = String, Path, description = "record key"),
           ("If-Match" = Option<String>, Header, description = "ETag: delete only if unchanged"),
           ("Idempotency-Key" = Option<String>, Header, description = "a retry with the same key gets the first outcome instead of deleting again")),
    responses(
        (status = 204, description = "deleted (a tombstone was written)"),
        (status = 404, description = "absent or already deleted", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "precondition failed", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "the Idempotency-Key was used for another request", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "home unreachable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn delete(
    State(s): State<SharedState>,
    RecordPath { collection, key }: RecordPath,
    OriginalUri(uri): OriginalUri,
    request_headers: HeaderMap,
) -> Result<Response, ApiError> {
    let route = s.authorize(&request_headers, Scope::Write)?;
    let request = WriteRequest {
        idempotency: headers::idempotency_key(
            &request_headers,
            &Method::DELETE,
            &collection,
            &key,
            &[],
        )?,
        collection,
        key,
        op: WriteOp::Delete,
        precondition: headers::precondition(&request_headers)?,
        home_hint: None,
        route,
    };
    write(
        &s,
        request,
        Method::DELETE,
        &uri,
        &request_headers,
        Bytes::new(),
    )
    .await
}

async fn write(
    s: &SharedState,
    mut request: WriteRequest,
    method: Method,
    uri: &axum::http::Uri,
    request_headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (home, policy) = match s.region.write(&request).await? {
        WriteOutcome::Written(written) => return Ok(written_response(&request, written)),
        WriteOutcome::Forward { home, policy } => (home, policy),
    };
    let path = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
    let retry_after = s.region.config.forwarding.retry_after_secs;
    match s
        .peers
        .forward(&home, method, path, request_headers, body)
        .await
    {
        Ok(answer) => Ok(answer),
        Err(ForwardError::Unreachable { .. } | ForwardError::UnknownPeer(_))
            if policy.on_home_unreachable == OnHomeUnreachable::AcceptLocal
                && !request.precondition.is_conditional() =>
        {
            tracing::info!(collection = %request.collection, key = %request.key, %home, "home unreachable; failover write");
            request.route = Route::Failover;
            match s.region.write(&request).await? {
                WriteOutcome::Written(written) => Ok(written_response(&request, written)),
                WriteOutcome::Forward { home, .. } => {
                    Err(forward_error(ForwardError::UnknownPeer(home), retry_after))
                }
            }
        }
        Err(error) => Err(forward_error(error, retry_after)),
    }
}

fn written_response(request: &WriteRequest, written: Written) -> Response {
    let mut response = match (&request.op, written.state.versions.first()) {
        (WriteOp::Put(_), Some(version)) => {
            let status = if written.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let body = record_body(
                &request.collection,
                &request.key,
                &written.state.home.region,
                version,
            );
            (status, Json(body)).into_response()
        }
        _ => StatusCode::NO_CONTENT.into_response(),
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag_header(&written.state));
    headers.insert(
        LOCUS_SESSION,
        HeaderValue::from_str(&written.session.encode()).expect("base64 is header-safe"),
    );
    if written.failover {
        headers.insert(LOCUS_FAILOVER, HeaderValue::from_static("true"));
    }
    if written.replayed {
        headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    response
}

#[utoipa::path(
    get, path = "/v1/collections/{c}/records", tag = "records",
    params(("c" = String, Path, description = "collection"), ListParams),
    responses(
        (status = 200, description = "a page of records in key order", body = RecordPage),
        (status = 400, description = "bad limit or cursor", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(s): State<SharedState>,
    CollectionPath(collection): CollectionPath,
    ApiQuery(params): ApiQuery<ListParams>,
    request_headers: HeaderMap,
) -> Result<Json<RecordPage>, ApiError> {
    s.authorize(&request_headers, Scope::Read)?;
    let limit = params.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(
            "bad-query",
            format!("limit must be between 1 and {MAX_PAGE}"),
        ));
    }
    let limit = limit as usize;
    let prefix = params.prefix.unwrap_or_default();
    if !prefix.is_empty() {
        names::validate("prefix", &prefix)
            .map_err(|e| ApiError::bad_request("bad-query", e.to_string()))?;
    }
    let secret = s.region.config.peer_token.expose();
    let mut after = match &params.cursor {
        Some(c) => Some(
            cursor::decode(secret, &collection, &prefix, c)
                .map_err(|e| ApiError::bad_request("bad-cursor", e.to_string()))?,
        ),
        None => None,
    };
    let strategy = s
        .region
        .policy(&collection)
        .await?
        .unwrap_or_default()
        .strategy();
    let deleted_before = s.region.deletion_horizon(&collection).await?;
    let upper = prefix_upper_bound(&prefix);

    let mut records = Vec::with_capacity(limit);
    let mut examined = 0;
    let batch = (limit + 1).max(64) as i64;
    let next = 'scan: loop {
        let rows = s
            .region
            .store
            .list(
                &collection,
                after.as_deref(),
                &prefix,
                upper.as_deref(),
                batch,
            )
            .await?;
        let exhausted = (rows.len() as i64) < batch;
        for (key, stored, resolution) in rows {
            // What a deletion of the collection removed is not listed, purged or not yet.
            let (state, resolution) = visible_record(stored, resolution, deleted_before);
            let json = state.as_ref().and_then(|state| {
                let mut json = view_json(&collection, &key, state, resolution.as_ref(), &strategy)?;
                if resolution_pending(state, &strategy, resolution.as_ref()) {
                    json["resolution_pending"] = Value::Bool(true);
                }
                Some(json)
            });
            if let Some(json) = json {
                if records.len() == limit {
                    // Another live record follows: this page ends at the last key examined.
                    break 'scan after
                        .as_deref()
                        .map(|k| cursor::encode(secret, &collection, &prefix, k));
                }
                records.push(json);
            }
            after = Some(key);
            examined += 1;
        }
        if exhausted {
            break None;
        }
        if examined >= MAX_ROWS_EXAMINED {
            break after
                .as_deref()
                .map(|k| cursor::encode(secret, &collection, &prefix, k));
        }
    };
    Ok(Json(RecordPage { records, next }))
}

/// Where to move a record's home.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RehomeBody {
    pub region: String,
}

#[utoipa::path(
    post, path = "/v1/collections/{c}/records/{key}/rehome", tag = "records",
    params(("c" = String, Path, description = "collection"), ("key" = String, Path, description = "record key")),
    request_body(content = RehomeBody, content_type = "application/json"),
    responses(
        (status = 200, description = "the record, with its new home", body = RecordBody),
        (status = 400, description = "unknown region or bad body", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such record", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the home is unreachable, or the receiving region no longer leads the record", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn rehome(
    State(s): State<SharedState>,
    RecordPath { collection, key }: RecordPath,
    OriginalUri(uri): OriginalUri,
    request_headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let route = s.authorize(&request_headers, Scope::Write)?;
    let bytes = headers::json_body(&request_headers, body, 4096).await?;
    let target: RehomeBody = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(
            "bad-body",
            format!("expected {{\"region\": \"<id>\"}}: {e}"),
        )
    })?;
    if !s.region.is_region(&target.region) {
        return Err(ApiError::bad_request(
            "unknown-region",
            format!("{:?} is not a region of this deployment", target.region),
        ));
    }
    match s
        .region
        .rehome(&collection, &key, &target.region, route)
        .await?
    {
        WriteOutcome::Written(written) => {
            let winner = crate::record::view::lww_winner(&written.state)
                .expect("a stored record has a version");
            let mut response = Json(record_body(
                &collection,
                &key,
                &written.state.home.region,
                winner,
            ))
            .into_response();
            response
                .headers_mut()
                .insert(header::ETAG, etag_header(&written.state));
            response.headers_mut().insert(
                LOCUS_SESSION,
                HeaderValue::from_str(&written.session.encode()).expect("base64 is header-safe"),
            );
            Ok(response)
        }
        // Forwarded like a write, but never a failover: only the home may move the home.
        WriteOutcome::Forward { home, .. } => {
            let path = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
            s.peers
                .forward(&home, Method::POST, path, &request_headers, bytes)
                .await
                .map_err(|e| forward_error(e, s.region.config.forwarding.retry_after_secs))
        }
    }
}
