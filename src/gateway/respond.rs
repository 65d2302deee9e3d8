//! The answer's headers: `X-Cache`, `Cache-Status`, `Age`, `Cache-Control`, `ETag` and
//! `Vary` for a cached answer, the same for an upstream failure, and HEAD without a body.

use std::time::Instant;

use bytes::Bytes;
use http::header::{
    AGE, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, ETAG, VARY,
};
use http::{HeaderName, HeaderValue, Response};
use http_body_util::{Either, Full};

use super::Body;
use crate::cache::policy::{self, Freshness};
use crate::cache::{CacheStatus, CachedResponse, StaleReason};
use crate::error::ProxyError;
use crate::upstream::UpstreamError;

/// `X-Cache: HIT|MISS`, the header most dashboards and curl users look at.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
/// RFC 9211 `Cache-Status`.
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
/// Sent on every answer: a client must take a body for what `Content-Type` says it is, never
/// guess (a list or an error message must not be rendered as a page).
pub(super) const X_CONTENT_TYPE_OPTIONS: HeaderName =
    HeaderName::from_static("x-content-type-options");
pub(super) const NOSNIFF: HeaderValue = HeaderValue::from_static("nosniff");
/// The cache's name in `Cache-Status`.
pub(super) const CACHE_NAME: &str = "miralix-gateway";

/// The `status` label of `upstream_requests_total`: the box's status, or what went wrong.
pub(super) fn upstream_outcome(error: &UpstreamError) -> String {
    error
        .upstream_status()
        .map_or_else(|| error.kind().to_owned(), |s| s.as_u16().to_string())
}

/// The stored (or just fetched) answer with the cache's headers.
pub(super) fn cached_response(
    entry: &CachedResponse,
    status: CacheStatus,
    stale_because: Option<&UpstreamError>,
    tier: Option<&str>,
    now: Instant,
    accepts_gzip: bool,
) -> Response<Full<Bytes>> {
    let (body, etag, gzip) = match (&entry.gzip, accepts_gzip) {
        (Some(gzip), true) => (&gzip.body, Some(&gzip.etag), true),
        _ => (&entry.body, entry.etag.as_ref(), false),
    };
    let mut response = Response::new(Full::new(body.clone()));
    *response.status_mut() = entry.status;
    // Room for the headers below (and hyper's `date`), so the map is allocated once.
    *response.headers_mut() = http::HeaderMap::with_capacity(8);
    let age = policy::age(entry.fetched_at, now).as_secs();
    let remaining = entry.lifetime.map(|l| match policy::freshness(&l, now) {
        Freshness::Fresh { remaining } => remaining.as_secs(),
        _ => 0,
    });
    let mut cache_status = match (status, remaining) {
        (CacheStatus::Hit, Some(ttl)) => with_number(&[CACHE_NAME, "; hit; ttl="], ttl),
        (CacheStatus::Stale(StaleReason::Revalidating), _) => {
            format!("{CACHE_NAME}; hit; stale; fwd=stale")
        }
        (CacheStatus::Stale(StaleReason::Error), _) => {
            format!(
                "{CACHE_NAME}; hit; stale; fwd=miss{}",
                failure_params(stale_because)
            )
        }
        (CacheStatus::Collapsed, Some(_)) => format!("{CACHE_NAME}; fwd=miss; collapsed; stored"),
        (CacheStatus::Collapsed, None) if entry.too_large => {
            format!("{CACHE_NAME}; fwd=miss; collapsed; detail=too-large")
        }
        (_, None) if entry.too_large => format!("{CACHE_NAME}; fwd=miss; detail=too-large"),
        (CacheStatus::Collapsed, None) => format!(
            "{CACHE_NAME}; fwd=miss; fwd-status={}; collapsed",
            entry.status.as_u16()
        ),
        (_, Some(_)) => format!("{CACHE_NAME}; fwd=miss; stored"),
        (_, None) => format!(
            "{CACHE_NAME}; fwd=miss; fwd-status={}",
            entry.status.as_u16()
        ),
    };
    if let Some(tier) = tier {
        cache_status.push_str("; detail=");
        cache_status.push_str(tier);
    }
    let headers = response.headers_mut();
    if let Some(content_type) = &entry.content_type {
        headers.insert(CONTENT_TYPE, content_type.clone());
    }
    if let Some(etag) = etag {
        headers.insert(ETAG, etag.clone());
        // A stored list may be served compressed to other clients.
        headers.insert(VARY, HeaderValue::from_static("accept-encoding"));
    }
    if gzip {
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    let x_cache = match status {
        CacheStatus::Hit => "HIT",
        CacheStatus::Stale(_) => "STALE",
        _ => "MISS",
    };
    headers.insert(X_CACHE, HeaderValue::from_static(x_cache));
    headers.insert(CACHE_STATUS, header_value(cache_status));
    headers.insert(AGE, HeaderValue::from(age));
    let cache_control = match remaining {
        Some(remaining) => header_value(with_number(&["private, max-age="], remaining)),
        None => HeaderValue::from_static("no-store"),
    };
    headers.insert(CACHE_CONTROL, cache_control);
    response
}

/// `; fwd-status=503` when the box answered, `; detail=timeout` (etc.) when it did not.
pub(super) fn failure_params(error: Option<&UpstreamError>) -> String {
    match error {
        Some(error) => match error.upstream_status() {
            Some(status) => format!("; fwd-status={}", status.as_u16()),
            None => format!("; detail={}", error.kind()),
        },
        None => String::new(),
    }
}

/// An error answer; upstream failures also say, in the cache headers, what the box did.
pub(super) fn error_response(error: &ProxyError, cache: CacheStatus) -> Response<Full<Bytes>> {
    let mut response = error.to_response();
    if let ProxyError::Upstream(upstream) = error {
        let mut cache_status = format!("{CACHE_NAME}; fwd=miss{}", failure_params(Some(upstream)));
        match cache {
            CacheStatus::Collapsed => cache_status.push_str("; collapsed"),
            // RFC 9211 `detail`: this failure is a remembered one; the box was not asked.
            CacheStatus::Backoff => cache_status.push_str("; detail=backoff"),
            _ => {}
        }
        let headers = response.headers_mut();
        headers.insert(X_CACHE, HeaderValue::from_static("MISS"));
        headers.insert(CACHE_STATUS, header_value(cache_status));
    }
    response
}

/// A HEAD answer: the GET answer's headers, including its length, without the body. An
/// answer that already names its length (audio: the box's) keeps it.
pub(super) fn strip_body(response: &mut Response<Body>) {
    let Either::Left(full) = response.body() else {
        return;
    };
    let length = http_body::Body::size_hint(full).exact().unwrap_or(0);
    if !response.headers().contains_key(CONTENT_LENGTH) {
        response
            .headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(length));
    }
    *response.body_mut() = Either::Left(Full::new(Bytes::new()));
}

/// `parts` then `n`, without `format!`'s machinery: the hit path builds two of these.
fn with_number(parts: &[&str], n: u64) -> String {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(n);
    let mut text =
        String::with_capacity(parts.iter().map(|p| p.len()).sum::<usize>() + digits.len());
    parts.iter().for_each(|part| text.push_str(part));
    text.push_str(digits);
    text
}

pub(super) fn header_value(text: String) -> HeaderValue {
    HeaderValue::try_from(text).expect("built from ASCII tokens and digits")
}
