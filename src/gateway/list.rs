//! Serving a cached list (an agent's or a queue's recordings, or the agent directory): the
//! cache lookup, `fromQueueCallId` selection from the stored full list, and `If-None-Match`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;

use super::fetch::list_fetcher;
use super::respond::cached_response;
use super::{AccessEntry, Account, AppState};
use crate::cache::{CacheKey, CacheStatus, CachedResponse, StaleReason, conditional, encoding};
use crate::config::CacheConfig;
use crate::error::ProxyError;
use crate::route::ListQuery;
use crate::upstream::UpstreamError;

/// A list from the cache. A `fromQueueCallId` request is answered from the subject's full
/// list (see [`crate::recordings`]) unless caching is off on a box that understands the
/// parameter, or the box's list cannot be read as recordings.
pub(super) async fn list_response<B>(
    state: &AppState,
    (cache, ttl): (&CacheConfig, Option<Duration>),
    account: &Account,
    query: ListQuery,
    request: &Request<B>,
    access: &mut AccessEntry,
) -> Result<Response<Full<Bytes>>, ProxyError> {
    let api = account.settings.api_version;
    let from = query
        .from_queue_call_id
        .filter(|_| !api.has_from_queue_call_id() || !cache.ttl.is_zero());
    // Answered from the full list when selecting (the request's own query kept for the box,
    // should the list not be one of recordings); otherwise the request's own key.
    let (full, query) = match from {
        Some(_) => {
            let full = ListQuery {
                from_queue_call_id: None,
                ..query.clone()
            };
            (full, Some(query))
        }
        None => (query, None),
    };
    let gzip = encoding::accepts_gzip(request.headers().get_all(ACCEPT_ENCODING).iter());
    let (mut outcome, mut entry) = lookup(state, (cache, ttl), account, full, access).await?;
    if let (Some(from), Some(query)) = (from, query) {
        match entry.elements() {
            Some(list) => {
                account.metrics.selections.inc();
                entry = CachedResponse::select(&entry, &list, from, gzip, cache).await;
            }
            // An unknown agent (or another stored error) is the answer for every id.
            None if entry.status != StatusCode::OK => {}
            None if api.has_from_queue_call_id() => {
                // The box's list has no numeric QueueCallIds: let the box do the filtering,
                // and cache its answer as it is.
                (outcome, entry) = lookup(state, (cache, ttl), account, query, access).await?;
            }
            None => return Err(ProxyError::CannotEmulate),
        }
    }
    let mut response = cached_response(
        &entry,
        outcome.status,
        outcome.stale_because.as_ref(),
        outcome.tier,
        outcome.judged_at.unwrap_or_else(|| state.cache.now()),
        gzip,
    );
    let etag = response.headers().get(ETAG);
    if let Some(etag) = etag {
        let if_none_match: Vec<&[u8]> = request
            .headers()
            .get_all(IF_NONE_MATCH)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        if !if_none_match.is_empty() && conditional::none_match(&if_none_match, etag) {
            not_modified(&mut response);
        }
    }
    Ok(response)
}

/// How long a `200` for `query` is fresh when not `cache.ttl`: the agent directory's
/// `cache.directory_ttl` (recordings lists have none of their own).
pub(super) fn directory_ttl(cache: &CacheConfig, query: &ListQuery) -> Option<Duration> {
    (!query.subject.is_recordings()).then_some(cache.directory_ttl)
}

/// How one cache lookup went, without its result (which is returned beside it).
pub(super) struct Lookup {
    status: CacheStatus,
    stale_because: Option<UpstreamError>,
    /// The second tier the entry was brought from for this request, if any.
    tier: Option<&'static str>,
    /// For a fresh hit, the instant it was judged fresh at (see [`crate::cache::Outcome`]).
    judged_at: Option<Instant>,
}

/// Look `query` up in the cache (fetching it if need be; a `200` is fresh for `ttl` when
/// given, else `cache.ttl`), counting the outcome and noting it for the access log.
pub(super) async fn lookup(
    state: &AppState,
    (cache, ttl): (&CacheConfig, Option<Duration>),
    account: &Account,
    query: ListQuery,
    access: &mut AccessEntry,
) -> Result<(Lookup, Arc<CachedResponse>), ProxyError> {
    let key = CacheKey {
        account: account.name.clone(),
        query,
    };
    // Clones for the fetch task are made only when this request starts a fetch.
    let trace = &access.trace;
    let terms = account.fetch_terms();
    let fetch = list_fetcher(account, (&state.cache, cache, ttl), || trace.forwarded());
    let outcome = state.cache.get_or_fetch(key, terms, fetch).await;
    access.cache = outcome.status;
    let metrics = &account.metrics;
    match outcome.status {
        CacheStatus::Hit => metrics.hits.inc(),
        CacheStatus::Miss => metrics.misses.inc(),
        CacheStatus::Collapsed => metrics.coalesced.inc(),
        CacheStatus::Stale(StaleReason::Revalidating) => metrics.stale_revalidate.inc(),
        CacheStatus::Stale(StaleReason::Error) => metrics.stale_error.inc(),
        // The box was not asked: neither a hit nor a miss (requests_total still counts it).
        CacheStatus::Backoff | CacheStatus::Skipped => 0,
    };
    if outcome.refresh_started {
        metrics.refreshes.inc();
    }
    let entry = outcome
        .result
        .inspect_err(|e| access.upstream_status = e.upstream_status())?;
    access.upstream_status = match (&outcome.stale_because, outcome.status) {
        (Some(error), _) => error.upstream_status(),
        (None, CacheStatus::Miss | CacheStatus::Collapsed) => Some(entry.status),
        (None, _) => None,
    };
    access.tier = outcome.tier;
    let lookup = Lookup {
        status: outcome.status,
        stale_because: outcome.stale_because,
        tier: outcome.tier,
        judged_at: outcome.judged_at,
    };
    Ok((lookup, entry))
}

/// Turn a `200` answer into `304 Not Modified`: the same caching headers and `ETag`, no body
/// and no representation metadata.
pub(super) fn not_modified(response: &mut Response<Full<Bytes>>) {
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    *response.body_mut() = Full::new(Bytes::new());
    let headers = response.headers_mut();
    headers.remove(CONTENT_TYPE);
    headers.remove(CONTENT_ENCODING);
}
