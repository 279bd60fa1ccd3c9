//! The conflict log: every time a merge kept concurrent versions, in the order this region
//! detected them. Each region keeps its own log; the stored records converge, the logs say who
//! noticed what and when.

use crate::config::Scope;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, Problem};
use super::{ApiQuery, SharedState};
use crate::storage::apply::LoggedConflict;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ConflictParams {
    pub collection: Option<String>,
    pub key: Option<String>,
    /// The `next` of the previous page (an entry id).
    pub after: Option<i64>,
    /// 1 to 1000 (default 100).
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConflictPage {
    pub conflicts: Vec<LoggedConflict>,
    /// Pass as `after` for the next page; `null` on the last page.
    pub next: Option<i64>,
}

#[utoipa::path(
    get, path = "/v1/conflicts", tag = "conflicts", params(ConflictParams),
    responses(
        (status = 200, description = "conflict-log entries, oldest first", body = ConflictPage),
        (status = 400, description = "bad parameter", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(s): State<SharedState>,
    ApiQuery(params): ApiQuery<ConflictParams>,
    headers: HeaderMap,
) -> Result<Json<ConflictPage>, ApiError> {
    s.authorize(&headers, Scope::Read)?;
    let limit = super::id_page_limit(params.limit)?;
    let rows = s
        .region
        .store
        .conflicts(
            params.collection.as_deref(),
            params.key.as_deref(),
            params.after.unwrap_or(0),
            i64::from(limit) + 1,
        )
        .await?;
    let (conflicts, next) = super::id_page(rows, limit, |c: &LoggedConflict| c.id);
    Ok(Json(ConflictPage { conflicts, next }))
}
