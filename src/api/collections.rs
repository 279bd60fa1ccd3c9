//! Collection policies, and deleting a collection. A policy is a record of the system collection
//! `_collections`, written through the ordinary write path, so it is versioned and replicated like
//! data. A collection that was never configured still exists, with the default policy, once it
//! holds a record. Deleting one writes a replicated horizon ([`crate::deletion`]).

use crate::config::Scope;
use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, Problem};
use super::headers;
use super::{CollectionPath, SharedState};
use crate::record::policy::{Policy, DELETION_COLLECTION, POLICY_COLLECTION, SYSTEM_PREFIX};
use crate::resolve;
use crate::service::{Precondition, Route, WriteOp, WriteOutcome, WriteRequest};

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CollectionBody {
    pub name: String,
    /// Whether a policy was set; `false` means the defaults apply.
    pub configured: bool,
    pub policy: Policy,
}

/// What a deletion did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeletedBody {
    pub collection: String,
    /// The deletion's horizon (an HLC, as a decimal string): every version written at or before
    /// it is gone in every region; writes after it survive. Each region purges the rows in the
    /// background.
    pub deleted_before: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CollectionList {
    pub collections: Vec<CollectionBody>,
}

#[utoipa::path(
    put, path = "/v1/collections/{c}", tag = "collections",
    params(("c" = String, Path, description = "collection")),
    request_body(content = Policy, description = "the policy; omitted fields take their defaults", content_type = "application/json"),
    security(("admin" = [])),
    responses(
        (status = 201, description = "configured for the first time", body = CollectionBody),
        (status = 200, description = "policy replaced", body = CollectionBody),
        (status = 400, description = "unknown field or value, unknown region or resolver", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no admin token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "wrong admin token", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn configure(
    State(s): State<SharedState>,
    CollectionPath(name): CollectionPath,
    request_headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<CollectionBody>), ApiError> {
    s.authorize(&request_headers, Scope::Admin)?;
    let bytes = headers::json_body(
        &request_headers,
        body,
        s.region.config.limits.record_body_bytes,
    )
    .await?;
    let bound: Vec<String> = resolve::bindings(&s.region)
        .await?
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    let policy = Policy::parse(
        &bytes,
        |r| s.region.is_region(r),
        |name| bound.iter().any(|b| b == name),
    )
    .map_err(|e| ApiError::bad_request("bad-policy", e.to_string()))?;
    let request = WriteRequest {
        idempotency: None,
        collection: POLICY_COLLECTION.to_owned(),
        key: name.clone(),
        op: WriteOp::Put(serde_json::to_value(&policy).expect("policies serialize")),
        precondition: Precondition::None,
        home_hint: None,
        route: Route::Client,
    };
    match s.region.write(&request).await? {
        WriteOutcome::Written(written) => {
            let status = if written.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok((
                status,
                Json(CollectionBody {
                    name,
                    configured: true,
                    policy,
                }),
            ))
        }
        WriteOutcome::Forward { .. } => {
            unreachable!("the policy collection is writable in every region")
        }
    }
}

#[utoipa::path(
    get, path = "/v1/collections/{c}", tag = "collections",
    params(("c" = String, Path, description = "collection")),
    responses(
        (status = 200, description = "the collection's policy", body = CollectionBody),
        (status = 404, description = "never configured and empty", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn show(
    State(s): State<SharedState>,
    CollectionPath(name): CollectionPath,
    request_headers: HeaderMap,
) -> Result<Json<CollectionBody>, ApiError> {
    s.authorize(&request_headers, Scope::Read)?;
    if let Some(policy) = s.region.policy(&name).await? {
        return Ok(Json(CollectionBody {
            name,
            configured: true,
            policy,
        }));
    }
    if has_records(&s, &name, s.region.deletion_horizon(&name).await?).await? {
        return Ok(Json(CollectionBody {
            name,
            configured: false,
            policy: Policy::default(),
        }));
    }
    Err(ApiError::NotFound(format!("no collection named {name:?}")))
}

#[utoipa::path(
    get, path = "/v1/collections", tag = "collections",
    responses((status = 200, description = "every configured or non-empty collection, by name", body = CollectionList))
)]
pub async fn list(
    State(s): State<SharedState>,
    request_headers: HeaderMap,
) -> Result<Json<CollectionList>, ApiError> {
    s.authorize(&request_headers, Scope::Read)?;
    let mut by_name = BTreeMap::new();
    let deleted: BTreeMap<String, crate::clock::hlc::Hlc> = s
        .region
        .store
        .list_all(DELETION_COLLECTION)
        .await?
        .into_iter()
        .filter_map(|(name, marker)| marker.max_hlc().map(|horizon| (name, horizon)))
        .collect();
    for name in s.region.store.collections_with_records().await? {
        let shown = !name.starts_with(SYSTEM_PREFIX)
            && has_records(&s, &name, deleted.get(&name).copied()).await?;
        if shown {
            by_name.insert(
                name.clone(),
                CollectionBody {
                    name,
                    configured: false,
                    policy: Policy::default(),
                },
            );
        }
    }
    for (name, policy) in s.region.policies().await? {
        by_name.insert(
            name.clone(),
            CollectionBody {
                name,
                configured: true,
                policy,
            },
        );
    }
    Ok(Json(CollectionList {
        collections: by_name.into_values().collect(),
    }))
}

#[utoipa::path(
    delete, path = "/v1/collections/{c}", tag = "collections",
    params(("c" = String, Path, description = "collection")),
    security(("admin" = [])),
    responses(
        (status = 202, description = "deleted: every record written up to the horizon is gone in every region, and the policy with them; the rows are purged in the background", body = DeletedBody),
        (status = 400, description = "bad or reserved name", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no admin token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "wrong admin token", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn delete(
    State(s): State<SharedState>,
    CollectionPath(name): CollectionPath,
    request_headers: HeaderMap,
) -> Result<(StatusCode, Json<DeletedBody>), ApiError> {
    s.authorize(&request_headers, Scope::Admin)?;
    let horizon = s.region.delete_collection(&name).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(DeletedBody {
            collection: name,
            deleted_before: horizon.as_u64().to_string(),
        }),
    ))
}

/// Whether a reader would find records in `collection`: any row, or, once it was deleted, any
/// row the deletion left (the purge may not have removed the others yet).
async fn has_records(
    s: &SharedState,
    collection: &str,
    deleted_before: Option<crate::clock::hlc::Hlc>,
) -> Result<bool, ApiError> {
    let store = &s.region.store;
    Ok(match deleted_before {
        None => store.collection_has_records(collection).await?,
        Some(horizon) => store.has_records_after(collection, horizon).await?,
    })
}
