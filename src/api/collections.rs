//! Collection policies. A policy is a record of the system collection `_collections`, written
//! through the ordinary write path, so it is versioned and replicated like data. A collection that
//! was never configured still exists, with the default policy, once it holds a record.

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
use crate::record::policy::{Policy, POLICY_COLLECTION, SYSTEM_PREFIX};
use crate::resolve;
use crate::service::{Precondition, Route, WriteOp, WriteOutcome, WriteRequest};

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CollectionBody {
    pub name: String,
    /// Whether a policy was set; `false` means the defaults apply.
    pub configured: bool,
    pub policy: Policy,
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
    s.require_admin(&request_headers)?;
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
        |r| s.region.config.is_region(r),
        |name| bound.iter().any(|b| b == name),
    )
    .map_err(|e| ApiError::bad_request("bad-policy", e.to_string()))?;
    let request = WriteRequest {
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
    s.authorize_records(&request_headers)?;
    if let Some(policy) = s.region.policy(&name).await? {
        return Ok(Json(CollectionBody {
            name,
            configured: true,
            policy,
        }));
    }
    if s.region.store.collection_has_records(&name).await? {
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
    s.authorize_records(&request_headers)?;
    let mut by_name = BTreeMap::new();
    for name in s.region.store.collections_with_records().await? {
        if !name.starts_with(SYSTEM_PREFIX) {
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
