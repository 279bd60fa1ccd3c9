//! The API's one error type. Every failure becomes an RFC 9457 problem document
//! (`application/problem+json`: `type`, `title`, `status`, `detail`). Client errors explain
//! themselves; server errors log their cause and answer without leaking it.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::headers::{
    LOCUS_CONFLICT, LOCUS_HOME, LOCUS_RESOLUTION, LOCUS_RESOLVED, LOCUS_RESOLVER, LOCUS_SIBLINGS,
    RETRY_AFTER,
};
use crate::resolve::ResolverError;
use crate::service::ServiceError;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{detail}")]
    BadRequest { kind: &'static str, detail: String },
    #[error("a bearer token is required")]
    Unauthorized,
    #[error("the bearer token does not grant this")]
    Forbidden,
    #[error("{0}")]
    NotFound(String),
    /// The record's concurrent versions are still stored, but its resolver resolved them to
    /// deleted: a 404 that says so, with what a client needs to look or to supersede them.
    #[error("resolver {resolver:?} resolved the record's {siblings} concurrent versions to deleted{}; a write with the ETag supersedes them",
        conflict.map(|id| format!(" (conflict {id} in /v1/conflicts)")).unwrap_or_default())]
    ResolvedDeleted {
        resolver: String,
        siblings: usize,
        conflict: Option<i64>,
        etag: HeaderValue,
        /// The set changed since and its resolver has not run yet: this is the previous view.
        pending: bool,
    },
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    PreconditionFailed(String),
    /// The request conflicts with the current state (a resolver still in use).
    #[error("{0}")]
    Conflict(String),
    #[error("the body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The value fits the body limit but its replication event would not fit the transport.
    #[error("{0}")]
    EventTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The record's home cannot take the write now (unreachable, or the home is moving).
    #[error("{detail}")]
    HomeUnavailable {
        home: String,
        retry_after: u64,
        detail: String,
    },
    /// A forwarded request got no answer in time: it may or may not have been applied.
    #[error(
        "the home region {home} did not answer in time; the write may or may not have been applied"
    )]
    GatewayTimeout { home: String },
    #[error("the home region {home} failed to answer: {cause}")]
    BadGateway { home: String, cause: String },
    #[error("the record is being written too often to take this write; retry")]
    Contention,
    /// A read carried a session token for a write this region has not applied yet, and was
    /// forwarded here, so it cannot be forwarded again: answering would show stale data.
    #[error(
        "this region has not yet applied the write of the session token (taken at {written_at})"
    )]
    SessionNotApplied {
        written_at: String,
        retry_after: u64,
    },
    /// The region cannot serve well now (a background worker is down).
    #[error("{0}")]
    NotReady(String),
    /// A peer this region called (not to forward a request) failed to answer.
    #[error("{0}")]
    PeerFailed(String),
    /// An `Idempotency-Key` already used for a different request.
    #[error("{0}")]
    IdempotencyKeyReused(String),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
}

impl ApiError {
    pub fn bad_request(kind: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            kind,
            detail: detail.into(),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) | ApiError::ResolvedDeleted { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::IdempotencyKeyReused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::PayloadTooLarge { .. } | ApiError::EventTooLarge(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::HomeUnavailable { .. }
            | ApiError::Contention
            | ApiError::NotReady(_)
            | ApiError::SessionNotApplied { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::GatewayTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::BadGateway { .. } | ApiError::PeerFailed(_) => StatusCode::BAD_GATEWAY,
            ApiError::Storage(StorageError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// How loudly to log it. A 4xx is the client's business. A 503 the design promises (the
    /// home is unreachable under `reject`, a rehome is under way, a session write has not arrived,
    /// the region is starting) is part of normal operation: worth a line at `info`, not a
    /// warning. A peer that failed or timed out, or a database that is unreachable, is trouble an
    /// operator should see.
    fn severity(&self) -> Severity {
        match self {
            ApiError::HomeUnavailable { .. }
            | ApiError::Contention
            | ApiError::NotReady(_)
            | ApiError::SessionNotApplied { .. } => Severity::Notable,
            ApiError::GatewayTimeout { .. }
            | ApiError::BadGateway { .. }
            | ApiError::PeerFailed(_)
            | ApiError::Storage(_) => Severity::Trouble,
            _ => Severity::Expected,
        }
    }

    /// The problem type's last segment and its title.
    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            ApiError::BadRequest { kind, .. } => (kind, "Bad request"),
            ApiError::Unauthorized => ("unauthorized", "Unauthorized"),
            ApiError::Forbidden => ("forbidden", "Forbidden"),
            ApiError::NotFound(_) => ("not-found", "Not found"),
            ApiError::ResolvedDeleted { .. } => ("resolved-deleted", "Deleted by the resolver"),
            ApiError::MethodNotAllowed(_) => ("method-not-allowed", "Method not allowed"),
            ApiError::PreconditionFailed(_) => ("precondition-failed", "Precondition failed"),
            ApiError::Conflict(_) => ("conflict", "Conflict"),
            ApiError::IdempotencyKeyReused(_) => {
                ("idempotency-key-reused", "Idempotency key reused")
            }
            ApiError::PayloadTooLarge { .. } | ApiError::EventTooLarge(_) => {
                ("payload-too-large", "Payload too large")
            }
            ApiError::UnsupportedMediaType(_) => {
                ("unsupported-media-type", "Unsupported media type")
            }
            ApiError::HomeUnavailable { .. } => ("home-unavailable", "Home region unavailable"),
            ApiError::GatewayTimeout { .. } => ("home-timeout", "Home region timed out"),
            ApiError::BadGateway { .. } => ("home-failed", "Home region failed"),
            ApiError::PeerFailed(_) => ("peer-failed", "Peer region failed"),
            ApiError::NotReady(_) => ("not-ready", "Not ready"),
            ApiError::SessionNotApplied { .. } => {
                ("session-not-applied", "Session write not applied here yet")
            }
            ApiError::Contention => ("contention", "Too much contention"),
            ApiError::Storage(StorageError::Unavailable(_)) => {
                ("storage-unavailable", "Storage unavailable")
            }
            ApiError::Storage(_) => ("internal", "Internal error"),
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(error: ServiceError) -> ApiError {
        match error {
            ServiceError::EventTooLarge { .. } => ApiError::EventTooLarge(error.to_string()),
            ServiceError::NotFound => ApiError::NotFound("no such record".into()),
            ServiceError::PreconditionFailed(why) => ApiError::PreconditionFailed(why.into()),
            ServiceError::NotHome { home } => ApiError::HomeUnavailable {
                detail: format!("this region is not the record's home; its home is {home}"),
                home,
                retry_after: 1,
            },
            ServiceError::Contention => ApiError::Contention,
            ServiceError::IdempotencyKeyReused => {
                ApiError::IdempotencyKeyReused(format!("{error}; use a new key for each new write"))
            }
            ServiceError::IncarnationUnsettled => ApiError::NotReady(error.to_string()),
            ServiceError::Storage(e) => ApiError::Storage(e),
        }
    }
}

impl From<ResolverError> for ApiError {
    fn from(error: ResolverError) -> ApiError {
        match error {
            ResolverError::BadName => ApiError::bad_request("bad-name", error.to_string()),
            ResolverError::Module(e) => ApiError::bad_request("bad-module", e.to_string()),
            ResolverError::NotFound(_) => ApiError::NotFound(error.to_string()),
            ResolverError::InUse { .. } => ApiError::Conflict(error.to_string()),
            ResolverError::Service(e) => e.into(),
            ResolverError::Storage(e) => ApiError::Storage(e),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Severity {
    Expected,
    Notable,
    Trouble,
}

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let (kind, title) = self.kind();
        let detail = if status.is_server_error() && matches!(self, ApiError::Storage(_)) {
            tracing::error!(error = %self, "request failed");
            "the region could not complete the request; the cause is in its log".to_owned()
        } else {
            match self.severity() {
                Severity::Expected => {
                    tracing::debug!(status = status.as_u16(), error = %self, "request answered with an error")
                }
                Severity::Notable => {
                    tracing::info!(status = status.as_u16(), error = %self, "request not completed")
                }
                Severity::Trouble => {
                    tracing::warn!(status = status.as_u16(), error = %self, "request not completed")
                }
            }
            self.to_string()
        };
        let problem = Problem {
            kind: format!("urn:locus:problem:{kind}"),
            title: title.into(),
            status: status.as_u16(),
            detail,
        };
        let mut response = (status, axum::Json(problem)).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        match &self {
            ApiError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::HomeUnavailable {
                home, retry_after, ..
            } => {
                headers.insert(RETRY_AFTER, HeaderValue::from(*retry_after));
                if let Ok(value) = HeaderValue::from_str(home) {
                    headers.insert(LOCUS_HOME, value);
                }
            }
            ApiError::ResolvedDeleted {
                resolver,
                siblings,
                conflict,
                etag,
                pending,
            } => {
                headers.insert(LOCUS_RESOLVED, HeaderValue::from_static("deleted"));
                if *pending {
                    headers.insert(LOCUS_RESOLUTION, HeaderValue::from_static("pending"));
                }
                if let Ok(value) = HeaderValue::from_str(resolver) {
                    headers.insert(LOCUS_RESOLVER, value);
                }
                headers.insert(LOCUS_SIBLINGS, HeaderValue::from(*siblings));
                if let Some(id) = conflict {
                    headers.insert(LOCUS_CONFLICT, HeaderValue::from(*id));
                }
                headers.insert(header::ETAG, etag.clone());
            }
            ApiError::SessionNotApplied { retry_after, .. } => {
                headers.insert(RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            ApiError::Contention | ApiError::Storage(StorageError::Unavailable(_)) => {
                headers.insert(RETRY_AFTER, HeaderValue::from(1));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_answers_are_not_warnings() {
        let expected = [
            ApiError::bad_request("bad-json", "no"),
            ApiError::NotFound("no such record".into()),
            ApiError::PreconditionFailed("stale".into()),
        ];
        for error in expected {
            assert_eq!(error.severity(), Severity::Expected, "{error}");
        }
        let notable = [
            ApiError::HomeUnavailable {
                home: "us".into(),
                retry_after: 1,
                detail: "unreachable".into(),
            },
            ApiError::Contention,
            ApiError::NotReady("starting".into()),
            ApiError::SessionNotApplied {
                written_at: "us".into(),
                retry_after: 1,
            },
        ];
        for error in notable {
            assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(error.severity(), Severity::Notable, "{error}");
        }
        let trouble = [
            ApiError::GatewayTimeout { home: "us".into() },
            ApiError::PeerFailed("refused".into()),
            ApiError::Storage(StorageError::Unavailable(sqlx::Error::PoolTimedOut)),
        ];
        for error in trouble {
            assert_eq!(error.severity(), Severity::Trouble, "{error}");
        }
    }
}
