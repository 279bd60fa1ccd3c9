//! Resolver endpoints: upload (binary module or WAT text), list, show, remove, and a dry run that
//! shows what a resolver would make of given versions or of logged conflicts, changing nothing.

use crate::config::Scope;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::error::{ApiError, Problem};
use super::headers;
use super::{ApiPath, SharedState};
use crate::record::resolution::Outcome;
use crate::record::view::lww_winner;
use crate::record::{Home, RecordState, Version};
use crate::resolve::{self, abi, Binding, ResolverError};

/// A resolver as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ResolverBody {
    pub name: String,
    pub sha256: String,
    pub size: u64,
    pub abi: u32,
    /// 1 for the first module bound to this name, then one more per upload that changed it.
    pub version: u64,
}

impl ResolverBody {
    fn new(name: String, binding: Binding) -> ResolverBody {
        ResolverBody {
            name,
            sha256: binding.sha256,
            size: binding.size,
            abi: binding.abi,
            version: binding.version,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ResolverDetail {
    #[serde(flatten)]
    pub resolver: ResolverBody,
    /// Whether this region holds the module in full (it resolves only then).
    pub available: bool,
    /// Collections whose policy names this resolver.
    pub collections: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ResolverList {
    pub resolvers: Vec<ResolverBody>,
}

/// `{"versions":[…]}`, or `{"collection":"c","last":20}` to replay that collection's newest logged
/// conflicts.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DryRunRequest {
    pub versions: Option<Vec<Version>>,
    pub collection: Option<String>,
    /// How many of the newest logged conflicts to replay: 1 to 100 (default 20).
    pub last: Option<u32>,
    /// The key the resolver is told, with `versions` (default `"dry-run"`).
    pub key: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DryRunResult {
    pub key: String,
    /// The logged conflict replayed, if any.
    pub conflict: Option<i64>,
    /// What a reader saw: the logged outcome, or last-writer-wins for given versions.
    #[schema(value_type = Value)]
    pub before: Value,
    /// What this resolver makes of the same versions; `null` when it failed.
    #[schema(value_type = Option<Value>)]
    pub after: Option<Value>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DryRunResponse {
    pub resolver: ResolverBody,
    pub results: Vec<DryRunResult>,
}

#[utoipa::path(
    put, path = "/v1/resolvers/{name}", tag = "resolvers",
    params(("name" = String, Path, description = "resolver name: 1 to 64 of A-Z a-z 0-9 . _ -")),
    request_body(content = Vec<u8>, description = "a WebAssembly module (application/wasm) or WAT text", content_type = "application/wasm"),
    security(("admin" = [])),
    responses(
        (status = 201, description = "bound to a new module", body = ResolverBody),
        (status = 200, description = "already bound to this module", body = ResolverBody),
        (status = 400, description = "not a valid resolver: not wasm, a forbidden import, a missing export, a failed trial call", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no admin token", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "over limits.module_body_bytes", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn upload(
    State(s): State<SharedState>,
    ApiPath(name): ApiPath<String>,
    request_headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<ResolverBody>), ApiError> {
    s.authorize(&request_headers, Scope::Admin)?;
    resolve::validate_name(&name)?;
    let limit = s.region.config.limits.module_body_bytes;
    let bytes = headers::read_body(&request_headers, body, limit).await?;
    let uploaded = resolve::upload(&s.region, &name, bytes.to_vec()).await?;
    tracing::info!(resolver = %name, sha256 = %uploaded.binding.sha256, changed = uploaded.changed, "resolver uploaded");
    let status = if uploaded.changed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(ResolverBody::new(name, uploaded.binding))))
}

#[utoipa::path(
    get, path = "/v1/resolvers", tag = "resolvers",
    responses((status = 200, description = "every bound resolver, by name", body = ResolverList))
)]
pub async fn list(
    State(s): State<SharedState>,
    request_headers: HeaderMap,
) -> Result<Json<ResolverList>, ApiError> {
    s.authorize(&request_headers, Scope::Read)?;
    let resolvers = resolve::bindings(&s.region)
        .await?
        .into_iter()
        .map(|(name, binding)| ResolverBody::new(name, binding))
        .collect();
    Ok(Json(ResolverList { resolvers }))
}

#[utoipa::path(
    get, path = "/v1/resolvers/{name}", tag = "resolvers",
    params(("name" = String, Path, description = "resolver name")),
    responses(
        (status = 200, description = "the resolver", body = ResolverDetail),
        (status = 404, description = "no such resolver", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn show(
    State(s): State<SharedState>,
    ApiPath(name): ApiPath<String>,
    request_headers: HeaderMap,
) -> Result<Json<ResolverDetail>, ApiError> {
    s.authorize(&request_headers, Scope::Read)?;
    resolve::validate_name(&name)?;
    let binding = resolve::binding_of(&s.region, &name)
        .await?
        .ok_or_else(|| ResolverError::NotFound(name.clone()))?;
    let available = s.region.store.module(&binding.sha256).await?.is_some();
    let collections = resolve::collections_using(&s.region, &name).await?;
    Ok(Json(ResolverDetail {
        resolver: ResolverBody::new(name, binding),
        available,
        collections,
    }))
}

#[utoipa::path(
    delete, path = "/v1/resolvers/{name}", tag = "resolvers",
    params(("name" = String, Path, description = "resolver name")),
    security(("admin" = [])),
    responses(
        (status = 204, description = "unbound"),
        (status = 404, description = "no such resolver", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "a collection's policy still names it", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn remove(
    State(s): State<SharedState>,
    ApiPath(name): ApiPath<String>,
    request_headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    s.authorize(&request_headers, Scope::Admin)?;
    resolve::remove(&s.region, &name).await?;
    tracing::info!(resolver = %name, "resolver removed");
    Ok(StatusCode::NO_CONTENT)
}

/// One set of versions to run the resolver on, and what a reader saw for it.
struct DryRunCase {
    key: String,
    conflict: Option<i64>,
    collection: String,
    versions: Vec<Version>,
    before: Value,
}

const DEFAULT_REPLAY: u32 = 20;
const MAX_REPLAY: u32 = 100;

#[utoipa::path(
    post, path = "/v1/resolvers/{name}/dry-run", tag = "resolvers",
    params(("name" = String, Path, description = "resolver name")),
    request_body(content = DryRunRequest, content_type = "application/json"),
    security(("admin" = [])),
    responses(
        (status = 200, description = "old and new outcomes side by side; nothing was changed", body = DryRunResponse),
        (status = 400, description = "bad request", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such resolver", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn dry_run(
    State(s): State<SharedState>,
    ApiPath(name): ApiPath<String>,
    request_headers: HeaderMap,
    body: Body,
) -> Result<Json<DryRunResponse>, ApiError> {
    s.authorize(&request_headers, Scope::Admin)?;
    resolve::validate_name(&name)?;
    let limit = s.region.config.limits.record_body_bytes * 4;
    let bytes = headers::json_body(&request_headers, body, limit).await?;
    let request: DryRunRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request("bad-dry-run", e.to_string()))?;
    let binding = resolve::binding_of(&s.region, &name)
        .await?
        .ok_or_else(|| ResolverError::NotFound(name.clone()))?;
    let compiled = resolve::compiled(&s.region, &binding.sha256)
        .await?
        .ok_or_else(|| {
            ApiError::Conflict(format!(
                "resolver {name:?} is bound to module {}, which has not fully reached this region yet",
                binding.sha256
            ))
        })?;
    let cases: Vec<DryRunCase> = match (request.versions, request.collection) {
        (Some(versions), None) => {
            if request.last.is_some() {
                return Err(ApiError::bad_request(
                    "bad-dry-run",
                    "`last` goes with `collection`, not with `versions`",
                ));
            }
            if versions.is_empty() {
                return Err(ApiError::bad_request(
                    "bad-dry-run",
                    "`versions` must hold at least one version",
                ));
            }
            let key = request.key.unwrap_or_else(|| "dry-run".into());
            let before = lww_outcome(&versions);
            vec![DryRunCase {
                key,
                conflict: None,
                collection: "dry-run".into(),
                versions,
                before,
            }]
        }
        (None, Some(collection)) => {
            let last = request.last.unwrap_or(DEFAULT_REPLAY);
            if !(1..=MAX_REPLAY).contains(&last) {
                return Err(ApiError::bad_request(
                    "bad-dry-run",
                    format!("`last` must be between 1 and {MAX_REPLAY}"),
                ));
            }
            let logged = s
                .region
                .store
                .recent_conflicts(&collection, i64::from(last))
                .await?;
            let mut cases = Vec::with_capacity(logged.len());
            for entry in logged {
                let versions: Vec<Version> =
                    serde_json::from_value(entry.versions).map_err(|e| {
                        ApiError::Storage(crate::storage::StorageError::Corrupt(e.to_string()))
                    })?;
                cases.push(DryRunCase {
                    key: entry.key,
                    conflict: Some(entry.id),
                    collection: collection.clone(),
                    versions,
                    before: entry.outcome,
                });
            }
            cases
        }
        _ => {
            return Err(ApiError::bad_request(
                "bad-dry-run",
                "send either `versions` or `collection` (with an optional `last`)",
            ))
        }
    };
    let mut results = Vec::with_capacity(cases.len());
    for DryRunCase {
        key,
        conflict,
        collection,
        versions,
        before,
    } in cases
    {
        let input = abi::encode_input(&collection, &key, &versions);
        let (after, error) = match s
            .region
            .resolvers
            .call(&name, compiled.clone(), input)
            .await
        {
            Ok(outcome) => (Some(json!(outcome)), None),
            Err(error) => (None, Some(error.to_string())),
        };
        results.push(DryRunResult {
            key,
            conflict,
            before,
            after,
            error,
        });
    }
    Ok(Json(DryRunResponse {
        resolver: ResolverBody::new(name, binding),
        results,
    }))
}

/// What last-writer-wins shows for these versions.
fn lww_outcome(versions: &[Version]) -> Value {
    let mut state = RecordState::new(Home::new(""));
    state.versions = versions.to_vec();
    match lww_winner(&state) {
        Some(v) if !v.deleted => json!(Outcome::value(v.value.clone())),
        _ => json!(Outcome::deleted()),
    }
}
