//! Forwarding a request to the record's home region: one hop, named (`Locus-Forwarded-By`) and
//! authenticated with the peer token, so the home never forwards it again.
//!
//! Failures are told apart by what the client may conclude. A peer that never accepted the
//! connection got nothing, so the write may fail over (policy permitting). A peer that took the
//! request and did not answer in time may have applied it: that is a 504, never a failover write,
//! or the client could see one write applied twice under two versions.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderName, Method, StatusCode};
use axum::response::Response;

use super::headers::{IDEMPOTENCY_KEY, LOCUS_FORWARDED_BY, LOCUS_HOME, LOCUS_SESSION};
use crate::peer_health::Signal;
use crate::service::Region;

/// Request headers a forward carries over from the client.
fn forwarded_headers() -> [HeaderName; 7] {
    [
        header::CONTENT_TYPE,
        header::IF_MATCH,
        header::IF_NONE_MATCH,
        header::ACCEPT,
        LOCUS_HOME,
        LOCUS_SESSION,
        IDEMPOTENCY_KEY,
    ]
}

/// Response headers that describe one hop's connection, not the answer.
fn is_hop_header(name: &HeaderName) -> bool {
    [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::CONTENT_LENGTH,
    ]
    .contains(name)
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("region {0} is not a peer of this region")]
    UnknownPeer(String),
    /// Nothing was delivered: connection refused, no route, connect timeout.
    #[error("region {region} is unreachable: {cause}")]
    Unreachable { region: String, cause: String },
    /// The request was sent and no answer came in time: the outcome is unknown.
    #[error("region {region} did not answer in time")]
    TimedOut { region: String },
    /// The connection broke after the request was sent, or the answer was unreadable.
    #[error("region {region} failed: {cause}")]
    Failed { region: String, cause: String },
}

pub struct Peers {
    client: reqwest::Client,
    /// Where each peer is reached: the deployment's membership, which grows while the region runs.
    region: Arc<Region>,
}

impl Peers {
    pub fn new(region: Arc<Region>) -> Peers {
        let config = &region.config;
        let client = region
            .peer_trust
            .client(config)
            .timeout(config.request_timeout())
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .build()
            .expect("an HTTP client with plain settings builds");
        Peers { client, region }
    }

    /// Send `method path_and_query` with `body` to `region` and return its answer as ours.
    pub async fn forward(
        &self,
        region: &str,
        method: Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Response, ForwardError> {
        let base = self
            .region
            .members
            .url(region)
            .ok_or_else(|| ForwardError::UnknownPeer(region.to_owned()))?;
        if let Some(reason) = self.region.peer_health.fail_fast(region) {
            // Known down: nothing would be delivered, so the answer is the same as after a
            // connect timeout, without the wait.
            return Err(ForwardError::Unreachable {
                region: region.to_owned(),
                cause: format!("known to be down: {reason}"),
            });
        }
        let mut request = self
            .client
            .request(method, format!("{base}{path_and_query}"))
            .bearer_auth(self.region.config.peer_token.expose())
            .header(LOCUS_FORWARDED_BY, self.region.id())
            .body(body);
        for name in forwarded_headers() {
            for value in headers.get_all(&name) {
                request = request.header(&name, value);
            }
        }
        let answer = request.send().await.map_err(|e| self.classify(region, e))?;
        self.region.peer_health.record(region, Signal::Answered);
        let status =
            StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let answer_headers = answer.headers().clone();
        let bytes = answer.bytes().await.map_err(|e| self.classify(region, e))?;
        let mut response = Response::new(Body::from(bytes));
        *response.status_mut() = status;
        for (name, value) in &answer_headers {
            if !is_hop_header(name) {
                response.headers_mut().append(name, value.clone());
            }
        }
        Ok(response)
    }

    /// Whether `region`'s API answers its health check within a moment.
    /// The peer's `/healthz` document, or `None` when it does not answer.
    pub async fn probe(&self, region: &str) -> Option<serde_json::Value> {
        let base = self.region.members.url(region)?;
        let probe = self
            .client
            .get(format!("{base}/healthz"))
            .timeout(std::time::Duration::from_millis(800));
        let response = probe.send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        Some(response.json().await.unwrap_or_default())
    }

    fn classify(&self, region: &str, error: reqwest::Error) -> ForwardError {
        let region = region.to_owned();
        if error.is_connect() {
            let cause = crate::logging::chain(&error);
            // What the client's 503 does not say: which connection failed, and why.
            tracing::warn!(peer = %region, %cause, "cannot reach the peer");
            self.region.peer_health.record(
                &region,
                Signal::Unreachable {
                    cause: cause.clone(),
                    slow: error.is_timeout(),
                },
            );
            ForwardError::Unreachable { region, cause }
        } else if error.is_timeout() {
            self.region.peer_health.record(&region, Signal::TimedOut);
            ForwardError::TimedOut { region }
        } else {
            ForwardError::Failed {
                region,
                cause: crate::logging::chain(&error),
            }
        }
    }
}
