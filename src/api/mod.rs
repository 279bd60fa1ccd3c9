//! The REST API v1 of one region (axum). Handlers translate HTTP to the [`crate::service`] calls
//! and back; forwarding to a record's home is an HTTP concern, so it lives here too.
//!
//! Every response carries `Locus-Region` (who served it; a forwarded answer keeps the home's), and
//! every error is a problem document. The OpenAPI document is generated from the handlers.

pub mod collections;
pub mod conflicts;
pub mod cursor;
pub mod dead_letters;
pub mod error;
pub mod forward;
pub mod headers;
pub mod health;
pub mod metrics;
pub mod openapi;
pub mod records;
pub mod regions;
pub mod repair;
pub mod resolvers;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{FromRequestParts, MatchedPath, Path, Request, State};
use axum::http::request::Parts;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use axum::Router;

use self::error::ApiError;
use self::forward::Peers;
use self::headers::{bearer, forwarded_by, same_secret, LOCUS_REGION};
use self::metrics::HttpMetrics;
use crate::config::Scope;
use crate::record::names;
use crate::service::{Region, Route};

/// What every handler shares.
pub struct ApiState {
    pub region: Arc<Region>,
    pub peers: Peers,
    pub metrics: HttpMetrics,
    region_header: HeaderValue,
}

pub type SharedState = Arc<ApiState>;

impl ApiState {
    pub fn new(region: Arc<Region>) -> ApiState {
        let peers = Peers::new(region.clone());
        let metrics = HttpMetrics::new(&region.registry);
        let region_header = HeaderValue::from_str(region.id()).expect("region ids are header-safe");
        ApiState {
            region,
            peers,
            metrics,
            region_header,
        }
    }

    /// Whether `token` is the peer token or one still accepted during its rotation.
    pub fn is_peer_token(&self, token: &str) -> bool {
        let config = &self.region.config;
        std::iter::once(&config.peer_token)
            .chain(&config.accepted_peer_tokens)
            .any(|accepted| same_secret(token, accepted.expose()))
    }

    /// Who may make this request. A peer's forwarded request carries the peer token; a client's
    /// needs a token whose scope covers `needed`: `admin_token` covers all, each of `api_tokens`
    /// its own scope. With no `api_tokens` configured, reads and writes are open and only admin
    /// requests need a token. A token that is known but too narrow is 403, none at all 401.
    pub fn authorize(
        &self,
        headers: &axum::http::HeaderMap,
        needed: Scope,
    ) -> Result<Route, ApiError> {
        let config = &self.region.config;
        let token = bearer(headers)?;
        if let Some(peer) = forwarded_by(headers)? {
            if !self.region.members.is_peer(peer) {
                return Err(ApiError::bad_request(
                    "unknown-region",
                    format!("Locus-Forwarded-By names {peer:?}"),
                ));
            }
            return match token {
                None => Err(ApiError::Unauthorized),
                Some(t) if self.is_peer_token(t) => {
                    self.metrics.forwarded_from(peer);
                    Ok(Route::Forwarded)
                }
                Some(_) => Err(ApiError::Forbidden),
            };
        }
        if needed < Scope::Admin && config.api_tokens.is_empty() {
            return Ok(Route::Client);
        }
        let Some(token) = token else {
            return Err(ApiError::Unauthorized);
        };
        let granted = if same_secret(token, config.admin_token.expose()) {
            Some(Scope::Admin)
        } else {
            // Compare with every token, not up to the first match: the time taken says nothing
            // about which token (or how many) a guess came close to.
            config
                .api_tokens
                .iter()
                .filter(|t| same_secret(token, t.token.expose()))
                .map(|t| t.scope)
                .fold(None, |best: Option<Scope>, s| {
                    Some(best.map_or(s, |b| b.max(s)))
                })
        };
        match granted {
            Some(scope) if scope >= needed => Ok(Route::Client),
            _ => Err(ApiError::Forbidden),
        }
    }
}

/// `{c}` of a collection path, validated.
pub struct CollectionPath(pub String);

/// `{c}` and `{key}` of a record path, validated.
pub struct RecordPath {
    pub collection: String,
    pub key: String,
}

fn path_error(rejection: axum::extract::rejection::PathRejection) -> ApiError {
    ApiError::bad_request("bad-path", rejection.body_text())
}

fn name_error(error: names::NameError) -> ApiError {
    ApiError::bad_request("bad-name", error.to_string())
}

impl<S: Send + Sync> FromRequestParts<S> for CollectionPath {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(collection) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(path_error)?;
        names::validate_user_collection(&collection).map_err(name_error)?;
        Ok(CollectionPath(collection))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RecordPath {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path((collection, key)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(path_error)?;
        names::validate_user_collection(&collection).map_err(name_error)?;
        names::validate("key", &key).map_err(name_error)?;
        Ok(RecordPath { collection, key })
    }
}

/// The page size of a listing paged by entry id (the conflict log, dead letters): 1 to 1000,
/// 100 when not given.
pub fn id_page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    let limit = limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request(
            "bad-query",
            "limit must be between 1 and 1000",
        ));
    }
    Ok(limit)
}

/// Cut rows fetched as `limit + 1` to a page of `limit`, and the `next` cursor (the last id of the
/// page) when there are more.
pub fn id_page<T>(mut rows: Vec<T>, limit: u32, id: impl Fn(&T) -> i64) -> (Vec<T>, Option<i64>) {
    if rows.len() <= limit as usize {
        return (rows, None);
    }
    rows.truncate(limit as usize);
    let next = rows.last().map(id);
    (rows, next)
}

/// Path parameters, with a problem document when they do not parse.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(value) = Path::<T>::from_request_parts(parts, state)
            .await
            .map_err(path_error)?;
        Ok(ApiPath(value))
    }
}

/// Query parameters, with a problem document when they do not parse.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e| ApiError::bad_request("bad-query", e.body_text()))
    }
}

/// Count and time every request by route and status; stamp `Locus-Region` on every response that
/// does not already carry one (a forwarded answer keeps the home's).
async fn observe(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().clone();
    let mut response = next.run(request).await;
    state.metrics.observe(
        &route,
        method.as_str(),
        response.status().as_u16(),
        started.elapsed(),
    );
    response
        .headers_mut()
        .entry(LOCUS_REGION)
        .or_insert_with(|| state.region_header.clone());
    response
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed("this endpoint does not take that method".into())
}

pub fn router(state: SharedState) -> Router {
    Router::new()
        .route("/v1/collections", get(collections::list))
        .route(
            "/v1/collections/{c}",
            get(collections::show)
                .put(collections::configure)
                .delete(collections::delete),
        )
        .route("/v1/collections/{c}/records", get(records::list))
        .route(
            "/v1/collections/{c}/records/{key}",
            get(records::get).put(records::put).delete(records::delete),
        )
        .route(
            "/v1/collections/{c}/records/{key}/rehome",
            axum::routing::post(records::rehome),
        )
        .route("/v1/resolvers", get(resolvers::list))
        .route(
            "/v1/resolvers/{name}",
            get(resolvers::show)
                .put(resolvers::upload)
                .delete(resolvers::remove),
        )
        .route(
            "/v1/resolvers/{name}/dry-run",
            axum::routing::post(resolvers::dry_run),
        )
        .route("/v1/conflicts", get(conflicts::list))
        .route("/v1/dead-letters", get(dead_letters::list))
        .route(
            "/v1/dead-letters/{id}/retry",
            axum::routing::post(dead_letters::retry),
        )
        .route(
            "/v1/dead-letters/{id}",
            axum::routing::delete(dead_letters::discard),
        )
        .route("/v1/regions", get(regions::list))
        .route(
            "/v1/regions/{id}/repair",
            axum::routing::post(repair::repair_now),
        )
        .route("/v1/peer/actors/{actor}", get(repair::actor_seen))
        .route(
            "/v1/regions/{id}/retire",
            axum::routing::post(regions::retire),
        )
        .route(
            "/v1/peer/members/{id}",
            axum::routing::put(regions::announce),
        )
        .route("/v1/peer/applied", get(repair::applied))
        .route("/v1/peer/collections", get(repair::collections))
        .route("/v1/peer/modules", get(repair::modules))
        .route("/v1/peer/modules/{sha256}", get(repair::module))
        .route("/v1/peer/digests", get(repair::digests))
        .route("/v1/peer/hashes", axum::routing::post(repair::hashes))
        .route("/v1/peer/states", axum::routing::post(repair::states))
        .route(
            "/v1/peer/states-after",
            axum::routing::post(repair::states_after),
        )
        .route(
            "/v1/peer/states-by-hash",
            axum::routing::post(repair::states_by_hash),
        )
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(openapi::document))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}
