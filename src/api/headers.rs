//! The headers locus speaks, and the strict parsing of the ones clients send. A header that does
//! not parse is a 400, never ignored: a dropped `If-Match` would turn a conditional write into a
//! blind overwrite.

use axum::body::{Body, Bytes};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, IF_MATCH, IF_NONE_MATCH};
use axum::http::{HeaderMap, HeaderName};

use super::error::ApiError;
use crate::clock::version::{ETag, SessionToken};
use crate::service::Precondition;

pub const LOCUS_REGION: HeaderName = HeaderName::from_static("locus-region");
pub const LOCUS_HOME: HeaderName = HeaderName::from_static("locus-home");
pub const LOCUS_FAILOVER: HeaderName = HeaderName::from_static("locus-failover");
pub const LOCUS_SESSION: HeaderName = HeaderName::from_static("locus-session");
pub const LOCUS_FORWARDED_BY: HeaderName = HeaderName::from_static("locus-forwarded-by");
pub const LOCUS_SIBLINGS: HeaderName = HeaderName::from_static("locus-siblings");
/// `deleted` on a read whose resolver resolved the record's concurrent versions to deleted.
pub const LOCUS_RESOLVED: HeaderName = HeaderName::from_static("locus-resolved");
/// The resolver that made the view a read got.
pub const LOCUS_RESOLVER: HeaderName = HeaderName::from_static("locus-resolver");
/// `pending` on a read of a record whose set of versions changed and whose resolver has not run
/// on it yet: the view is the one readers had before the change.
pub const LOCUS_RESOLUTION: HeaderName = HeaderName::from_static("locus-resolution");
/// The id of the conflict-log entry behind a read's view.
pub const LOCUS_CONFLICT: HeaderName = HeaderName::from_static("locus-conflict");
/// A read's bound on staleness, in milliseconds: served here only when every peer's heartbeats
/// say this region is that fresh, and at the record's home otherwise.
pub const LOCUS_MAX_STALENESS: HeaderName = HeaderName::from_static("locus-max-staleness");
/// A client's key for a write: a retry with the same key gets the first outcome.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// `true` on an answer that replays the outcome of an earlier request with the same key.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
pub const RETRY_AFTER: HeaderName = HeaderName::from_static("retry-after");

fn text<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Result<Option<&'h str>, ApiError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str().map_err(|_| {
                ApiError::bad_request("bad-header", format!("{name} is not visible ASCII"))
            })
        })
        .transpose()
}

pub fn precondition(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    let if_match = text(headers, &IF_MATCH)?;
    let if_none_match = text(headers, &IF_NONE_MATCH)?;
    match (if_match, if_none_match) {
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "bad-precondition",
            "send If-Match or If-None-Match, not both",
        )),
        (Some(tag), None) => ETag::decode(tag)
            .map(|ETag(context)| Precondition::IfMatch(context))
            .map_err(|e| ApiError::bad_request("bad-precondition", format!("If-Match: {e}"))),
        (None, Some(value)) if value.trim() == "*" => Ok(Precondition::IfNoneMatchAny),
        (None, Some(_)) => Err(ApiError::bad_request(
            "bad-precondition",
            "If-None-Match supports only \"*\"",
        )),
        (None, None) => Ok(Precondition::None),
    }
}

pub fn session(headers: &HeaderMap) -> Result<Option<SessionToken>, ApiError> {
    text(headers, &LOCUS_SESSION)?
        .map(|t| {
            SessionToken::decode(t)
                .map_err(|e| ApiError::bad_request("bad-session", format!("Locus-Session: {e}")))
        })
        .transpose()
}

/// `Idempotency-Key`: 1 to 255 visible ASCII characters (a UUID is the usual choice), with the
/// fingerprint of the request it comes with.
pub fn idempotency_key(
    headers: &HeaderMap,
    method: &axum::http::Method,
    collection: &str,
    key: &str,
    body: &[u8],
) -> Result<Option<crate::service::IdempotencyKey>, ApiError> {
    let Some(value) = text(headers, &IDEMPOTENCY_KEY)? else {
        return Ok(None);
    };
    if value.is_empty() || value.len() > 255 || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::bad_request(
            "bad-idempotency-key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        ));
    }
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for part in [
        method.as_str().as_bytes(),
        collection.as_bytes(),
        key.as_bytes(),
        body,
    ] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    Ok(Some(crate::service::IdempotencyKey {
        key: value.to_owned(),
        fingerprint: hash.finalize().iter().map(|b| format!("{b:02x}")).collect(),
    }))
}

/// `Locus-Max-Staleness`: milliseconds, a whole number.
pub fn max_staleness(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    text(headers, &LOCUS_MAX_STALENESS)?
        .map(|value| {
            value.trim().parse::<u64>().map_err(|_| {
                ApiError::bad_request(
                    "bad-staleness",
                    format!("Locus-Max-Staleness must be whole milliseconds, not {value:?}"),
                )
            })
        })
        .transpose()
}

/// `Locus-Home`, which must name a region of the deployment.
pub fn home_hint(
    headers: &HeaderMap,
    is_region: impl Fn(&str) -> bool,
) -> Result<Option<String>, ApiError> {
    match text(headers, &LOCUS_HOME)?.map(str::trim) {
        None => Ok(None),
        Some(region) if is_region(region) => Ok(Some(region.to_owned())),
        Some(region) => Err(ApiError::bad_request(
            "unknown-region",
            format!("Locus-Home names the unknown region {region:?}"),
        )),
    }
}

pub fn forwarded_by(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    text(headers, &LOCUS_FORWARDED_BY)
}

/// Require a JSON content type: `application/json` or any `application/*+json`.
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let value = text(headers, &CONTENT_TYPE)?.unwrap_or_default();
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let is_json = essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"));
    if is_json {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(format!(
            "the body must be application/json, not {value:?}"
        )))
    }
}

/// Read the whole body, refusing more than `limit` bytes (before reading, when the length is declared).
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let declared = text(headers, &CONTENT_LENGTH)?.and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    axum::body::to_bytes(body, limit).await.map_err(|error| {
        let too_large =
            std::iter::successors(Some(&error as &dyn std::error::Error), |e| e.source())
                .any(|e| e.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::PayloadTooLarge { limit }
        } else {
            ApiError::bad_request("bad-body", format!("the body could not be read: {error}"))
        }
    })
}

/// A JSON request body: the content type must say JSON, and the body fit in `limit` bytes.
pub async fn json_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    require_json(headers)?;
    read_body(headers, body, limit).await
}

/// Parse a JSON body (a value, or a request type); the error says where it broke.
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::bad_request("malformed-json", format!("the body is not valid JSON: {e}"))
    })
}

/// Parse a record's value and admit it in its canonical form ([`crate::record::value`]).
pub fn parse_record_value(bytes: &[u8]) -> Result<serde_json::Value, ApiError> {
    crate::record::value::admit(parse_json(bytes)?)
        .map_err(|e| ApiError::bad_request("bad-value", e.to_string()))
}

/// Compare secrets in time independent of where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    match text(headers, &axum::http::header::AUTHORIZATION)? {
        None => Ok(None),
        Some(value) => match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                Ok(Some(token.trim()))
            }
            _ => Err(ApiError::Unauthorized),
        },
    }
}
