//! Liveness, readiness and metrics. Readiness means PostgreSQL answers: a region whose database is
//! gone cannot take writes, while a NATS outage only delays replication (the outbox absorbs it).

use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};

use super::error::{ApiError, Problem};
use super::SharedState;
use crate::storage::StorageError;

#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "the process is up; names its region and resolver engine fingerprint")))]
pub async fn healthz(State(s): State<SharedState>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "region": s.region.id(),
        "engine": s.region.resolvers.fingerprint(),
    }))
}

#[utoipa::path(
    get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "PostgreSQL answers"),
        (status = 503, description = "PostgreSQL is unreachable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn readyz(State(s): State<SharedState>) -> Result<Json<Value>, ApiError> {
    match tokio::time::timeout(Duration::from_secs(2), s.region.store.ping()).await {
        Ok(Ok(())) => Ok(Json(json!({ "status": "ready", "region": s.region.id() }))),
        Ok(Err(error)) => Err(ApiError::Storage(match error {
            StorageError::Database(e) => StorageError::Unavailable(e),
            other => other,
        })),
        Err(_) => Err(ApiError::Storage(StorageError::Unavailable(
            sqlx::Error::PoolTimedOut,
        ))),
    }
}

#[utoipa::path(get, path = "/metrics", tag = "health", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(s): State<SharedState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}
