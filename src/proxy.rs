//! The per-request handler of the public listener: route, cache, upstream, response.
//!
//! ```text
//! request ─► route::parse ─► account lookup ─► ResponseCache::get_or_fetch ─► response headers
//!              │ 400/404/414     │ 404            │ hit: stored Bytes            X-Cache, Age,
//!              ▼                 ▼                │ miss: one UpstreamClient     Cache-Status,
//!            JSON error ◄────────┴────────────────┘ fetch, shared by waiters    Cache-Control
//! ```
//!
//! [`handle`] is infallible: it calls [`handle_inner`], turns a [`ProxyError`] into its JSON
//! answer, counts the response and writes the one access-log event of the request.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http::header::{AGE, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;

use crate::cache::policy::{self, Freshness};
use crate::cache::{CacheKey, CacheStatus, CachedResponse, ResponseCache};
use crate::clock::Clock;
use crate::config::Config;
use crate::error::{ProxyError, json_error};
use crate::metrics::{AccountMetrics, Metrics};
use crate::route::{self, RecordingsRequest, Route};
use crate::upstream::{self, UpstreamClient, UpstreamError};

/// `X-Cache: HIT|MISS`, the header most dashboards and curl users look at.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
/// RFC 9211 `Cache-Status`.
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
/// The cache's name in `Cache-Status`.
const CACHE_NAME: &str = "miralix-gateway";

/// One configured account, ready to serve.
#[derive(Debug)]
pub struct Account {
    pub name: Arc<str>,
    pub client: UpstreamClient,
    pub metrics: AccountMetrics,
}

/// Everything a request needs, built once and shared by every connection.
pub struct AppState {
    pub accounts: HashMap<String, Account>,
    pub cache: ResponseCache,
    pub metrics: Metrics,
    ready: AtomicBool,
}

impl AppState {
    /// Build the clients, cache and metrics for a validated configuration.
    pub fn new(config: &Config, clock: Arc<dyn Clock>) -> Result<Self, StateError> {
        let metrics = Metrics::new();
        let mut accounts = HashMap::new();
        for (name, account) in &config.accounts {
            let client = UpstreamClient::new(name, account).map_err(|source| StateError {
                account: name.clone(),
                source,
            })?;
            accounts.insert(
                name.clone(),
                Account {
                    name: name.as_str().into(),
                    client,
                    metrics: metrics.account(name),
                },
            );
        }
        Ok(Self {
            accounts,
            cache: ResponseCache::new(config.cache.clone(), clock),
            metrics,
            ready: AtomicBool::new(false),
        })
    }

    /// Whether both listeners are serving.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }
}

/// An account whose upstream client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("accounts.{account}: {source}")]
pub struct StateError {
    pub account: String,
    #[source]
    pub source: upstream::BuildError,
}

/// What the access-log event reports besides method, path, status and duration.
#[derive(Debug)]
struct Exchange {
    cache: CacheStatus,
    upstream_status: Option<StatusCode>,
    account: Option<Arc<str>>,
}

/// Answer one request on the public listener. Never fails: errors become JSON answers.
pub async fn handle<B>(state: Arc<AppState>, request: Request<B>) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let mut exchange = Exchange {
        cache: CacheStatus::None,
        upstream_status: None,
        account: None,
    };
    let mut response = match handle_inner(&state, &request, &mut exchange).await {
        Ok(response) => response,
        Err(error) => error_response(&error, exchange.cache),
    };
    if request.method() == Method::HEAD {
        strip_body(&mut response);
    }
    state.metrics.record_response(response.status());
    tracing::info!(
        target: "miralix_gateway::access",
        method = %request.method(),
        path = %request.uri().path(),
        account = exchange.account.as_deref().unwrap_or_default(),
        status = response.status().as_u16(),
        cache = exchange.cache.as_str(),
        upstream_status = exchange.upstream_status.map(|s| s.as_u16()),
        duration_ms = %format_args!("{:.3}", started.elapsed().as_secs_f64() * 1000.0),
        "request"
    );
    response
}

async fn handle_inner<B>(
    state: &AppState,
    request: &Request<B>,
    exchange: &mut Exchange,
) -> Result<Response<Full<Bytes>>, ProxyError> {
    let Route::Recordings(recordings) = route::parse(request.uri().path(), request.uri().query())?;
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Err(ProxyError::MethodNotAllowed(request.method().clone()));
    }
    let account = state
        .accounts
        .get(&recordings.account)
        .ok_or_else(|| ProxyError::UnknownAccount(recordings.account.clone()))?;
    exchange.account = Some(account.name.clone());

    let key = CacheKey {
        account: account.name.clone(),
        id_type: recordings.id_type,
        identification: recordings.identification.as_str().into(),
        from_queue_call_id: recordings.from_queue_call_id,
    };
    let client = account.client.clone();
    let metrics = account.metrics.clone();
    let (status, result) = state
        .cache
        .get_or_fetch(key, move || fetch(client, metrics, recordings))
        .await;
    exchange.cache = status;
    match status {
        CacheStatus::Hit => account.metrics.hits.inc(),
        CacheStatus::Miss => account.metrics.misses.inc(),
        CacheStatus::Collapsed => account.metrics.coalesced.inc(),
        CacheStatus::None => 0,
    };
    let entry = result.inspect_err(|e| exchange.upstream_status = e.upstream_status())?;
    if status != CacheStatus::Hit {
        exchange.upstream_status = Some(entry.status);
    }
    Ok(cached_response(&entry, status, state.cache.now()))
}

/// The leader's upstream request, timed and counted.
async fn fetch(
    client: UpstreamClient,
    metrics: AccountMetrics,
    request: RecordingsRequest,
) -> Result<upstream::UpstreamReply, UpstreamError> {
    let started = Instant::now();
    let result = client.fetch(&request).await;
    let outcome = match &result {
        Ok(reply) => reply.status.as_u16().to_string(),
        Err(error) => {
            // Logged here, once per fetch, not once per request that waited on it.
            tracing::warn!(
                account = %client.account(),
                error = %error.detail(),
                "upstream fetch failed"
            );
            upstream_outcome(error)
        }
    };
    metrics.record_upstream(&outcome, started.elapsed().as_secs_f64());
    result
}

fn upstream_outcome(error: &UpstreamError) -> String {
    match error {
        UpstreamError::Timeout(_) => "timeout".into(),
        UpstreamError::Connect(_) => "connect_error".into(),
        UpstreamError::Transport(_) => "transport_error".into(),
        UpstreamError::Aborted => "aborted".into(),
        UpstreamError::RejectedSecret | UpstreamError::Status(_) => error
            .upstream_status()
            .map_or_else(|| "unknown".into(), |s| s.as_u16().to_string()),
    }
}

/// The stored (or just fetched) answer with the cache's headers.
fn cached_response(
    entry: &CachedResponse,
    status: CacheStatus,
    now: Instant,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(entry.body.clone()));
    *response.status_mut() = entry.status;
    let age = policy::age(entry.fetched_at, now).as_secs();
    let remaining = entry
        .ttl
        .map(|ttl| match policy::freshness(entry.fetched_at, ttl, now) {
            Freshness::Fresh { remaining } => remaining.as_secs(),
            Freshness::Expired => 0,
        });
    let cache_status = match (status, remaining) {
        (CacheStatus::Hit, Some(ttl)) => format!("{CACHE_NAME}; hit; ttl={ttl}"),
        (CacheStatus::Collapsed, Some(_)) => format!("{CACHE_NAME}; fwd=miss; collapsed; stored"),
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
    let headers = response.headers_mut();
    if let Some(content_type) = &entry.content_type {
        headers.insert(CONTENT_TYPE, content_type.clone());
    }
    let x_cache = if status == CacheStatus::Hit {
        "HIT"
    } else {
        "MISS"
    };
    headers.insert(X_CACHE, HeaderValue::from_static(x_cache));
    headers.insert(CACHE_STATUS, header_value(cache_status));
    headers.insert(AGE, HeaderValue::from(age));
    let cache_control = match remaining {
        Some(remaining) => header_value(format!("private, max-age={remaining}")),
        None => HeaderValue::from_static("no-store"),
    };
    headers.insert(CACHE_CONTROL, cache_control);
    response
}

/// An error answer; upstream failures also say, in the cache headers, that the box was asked.
fn error_response(error: &ProxyError, cache: CacheStatus) -> Response<Full<Bytes>> {
    let mut response = error.to_response();
    if let ProxyError::Upstream(upstream) = error {
        let mut cache_status = format!("{CACHE_NAME}; fwd=miss");
        if let Some(status) = upstream.upstream_status() {
            cache_status.push_str(&format!("; fwd-status={}", status.as_u16()));
        }
        if cache == CacheStatus::Collapsed {
            cache_status.push_str("; collapsed");
        }
        let headers = response.headers_mut();
        headers.insert(X_CACHE, HeaderValue::from_static("MISS"));
        headers.insert(CACHE_STATUS, header_value(cache_status));
    }
    response
}

/// A HEAD answer: the GET answer's headers, including its length, without the body.
fn strip_body(response: &mut Response<Full<Bytes>>) {
    let length = http_body::Body::size_hint(response.body())
        .exact()
        .unwrap_or(0);
    response
        .headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(length));
    *response.body_mut() = Full::new(Bytes::new());
}

fn header_value(text: String) -> HeaderValue {
    HeaderValue::try_from(text).expect("built from ASCII tokens and digits")
}

/// Answer one request on the admin listener: `/metrics`, `/healthz`, `/readyz`.
pub async fn handle_admin<B>(state: Arc<AppState>, request: Request<B>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return ProxyError::MethodNotAllowed(request.method().clone()).to_response();
    }
    let mut response = match request.uri().path() {
        "/metrics" => {
            state.cache.sync().await;
            let text = state
                .metrics
                .render(state.cache.entry_count(), state.cache.weighted_size());
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/healthz" => plain(StatusCode::OK, "ok\n"),
        "/readyz" if state.is_ready() => plain(StatusCode::OK, "ready\n"),
        "/readyz" => plain(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => json_error(
            StatusCode::NOT_FOUND,
            "no such admin endpoint: the admin listener serves /metrics, /healthz and /readyz",
        ),
    };
    if request.method() == Method::HEAD {
        strip_body(&mut response);
    }
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
