//! Liveness, readiness and metrics. Readiness means PostgreSQL answers and every background worker
//! runs: a region whose database is gone cannot take writes, and one whose publisher or consumer
//! died would take writes that never replicate. A NATS outage is no reason: it only delays
//! replication (the outbox absorbs it), and a worker retrying on it is running.

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
        (status = 200, description = "PostgreSQL answers and every worker runs"),
        (status = 503, description = "PostgreSQL is unreachable, a worker is down (named in the detail), the region is still settling its incarnation at start, or its database was restored and a repair round against some peer (named) has not completed yet", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn readyz(State(s): State<SharedState>) -> Result<Json<Value>, ApiError> {
    if s.region.settled_actor().is_none() {
        return Err(ApiError::NotReady(
            "checking with the peers whether this region's database was restored".into(),
        ));
    }
    if s.region.is_bootstrapping() {
        let copying = s.region.members.peers().into_iter().find_map(|peer| {
            s.region
                .replication
                .repair_progress_now(&peer.id)
                .map(|progress| (peer.id, progress))
        });
        return Err(ApiError::NotReady(match copying {
            Some((peer, p)) => format!(
                "new region: copying the deployment's data from {peer}: {} of {} records compared, {} copied, {:.0}/s{}",
                p.records_compared,
                p.records_to_compare,
                p.records_copied,
                p.per_second,
                p.seconds_left
                    .map(|s| format!(", about {s:.0} s left"))
                    .unwrap_or_default()
            ),
            None => "new region: attaching to the peers' streams before copying their data".into(),
        }));
    }
    let catching_up = s.region.catching_up();
    if !catching_up.is_empty() {
        return Err(ApiError::NotReady(format!(
            "the database was restored from a backup; repairing from {} before serving",
            catching_up.join(", ")
        )));
    }
    let down = s.region.supervisor.down_now();
    if !down.is_empty() {
        let named: Vec<String> = down
            .iter()
            .map(|(worker, why)| format!("{worker} ({why})"))
            .collect();
        return Err(ApiError::NotReady(format!(
            "background workers down, restarting: {}",
            named.join(", ")
        )));
    }
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
    // Gauges read from PostgreSQL are refreshed per scrape; an unreachable database leaves them
    // at their last value (and `/readyz` says why).
    if let Ok(backlog) = s.region.store.outbox_backlog().await {
        s.region.replication.set_outbox_backlog(backlog);
    }
    if let Ok(held) = s.region.store.dead_letter_count().await {
        s.region.replication.set_dead_letters_held(held);
    }
    if let Ok(pending) = s.region.store.count_left_to_resolve().await {
        s.region.resolvers.set_pending(pending);
    }
    let _ = s.region.applied_through().await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}
