//! Dead letters, for an operator: what replication and repair set aside (events a peer's stream
//! delivered that could not be applied even alone, records repair could not merge), to list,
//! retry once the cause is fixed, or discard. Admin token.

use crate::config::Scope;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, Problem};
use super::{ApiPath, ApiQuery, SharedState};
use crate::replication::consumer::{retry_dead_letter, RetryOutcome};
use crate::storage::dead_letters::DeadLetter;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterParams {
    /// The `next` of the previous page (a dead-letter id).
    pub after: Option<i64>,
    /// 1 to 1000 (default 100).
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterPage {
    pub dead_letters: Vec<DeadLetter>,
    /// Pass as `after` for the next page; `null` on the last page.
    pub next: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RetryBody {
    pub id: i64,
    /// `applied`: the dead letter is gone.
    pub outcome: String,
}

#[utoipa::path(
    get, path = "/v1/dead-letters", tag = "replication", params(DeadLetterParams),
    responses(
        (status = 200, description = "dead letters, oldest first", body = DeadLetterPage),
        (status = 400, description = "bad parameter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no admin token", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(s): State<SharedState>,
    ApiQuery(params): ApiQuery<DeadLetterParams>,
    headers: HeaderMap,
) -> Result<Json<DeadLetterPage>, ApiError> {
    s.authorize(&headers, Scope::Admin)?;
    let limit = super::id_page_limit(params.limit)?;
    let rows = s
        .region
        .store
        .dead_letters(params.after.unwrap_or(0), i64::from(limit) + 1)
        .await?;
    let (dead_letters, next) = super::id_page(rows, limit, |d: &DeadLetter| d.id);
    Ok(Json(DeadLetterPage { dead_letters, next }))
}

#[utoipa::path(
    post, path = "/v1/dead-letters/{id}/retry", tag = "replication",
    params(("id" = i64, Path, description = "a dead letter's id")),
    responses(
        (status = 200, description = "applied; the dead letter is gone", body = RetryBody),
        (status = 401, description = "no admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such dead letter", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "it fails again (the detail says why); it stays, its attempts counted", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn retry(
    State(s): State<SharedState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<RetryBody>, ApiError> {
    s.authorize(&headers, Scope::Admin)?;
    match retry_dead_letter(&s.region, id).await? {
        None => Err(ApiError::NotFound(format!("no dead letter {id}"))),
        Some(RetryOutcome::Applied) => Ok(Json(RetryBody {
            id,
            outcome: "applied".into(),
        })),
        Some(RetryOutcome::StillFails(error)) => Err(ApiError::Conflict(format!(
            "dead letter {id} fails again: {error}"
        ))),
    }
}

#[utoipa::path(
    delete, path = "/v1/dead-letters/{id}", tag = "replication",
    params(("id" = i64, Path, description = "a dead letter's id")),
    responses(
        (status = 204, description = "discarded"),
        (status = 401, description = "no admin token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such dead letter", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn discard(
    State(s): State<SharedState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<i64>,
) -> Result<StatusCode, ApiError> {
    s.authorize(&headers, Scope::Admin)?;
    if s.region.store.discard_dead_letter(id).await? {
        tracing::info!(
            region = s.region.id(),
            id,
            "dead letter discarded by an operator"
        );
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("no dead letter {id}")))
    }
}
