//! The per-request handler of the public listener: route, cache, upstream, response.
//!
//! ```text
//! request ─► route::parse ─► account lookup ─► ResponseCache::get_or_fetch ─► response headers
//!              │ 400/404/414     │ 404            │ hit: stored Bytes            X-Cache, Age,
//!              ▼                 ▼                │ miss: one UpstreamClient     Cache-Status,
//!            JSON error ◄────────┴────────────────┘ fetch, shared by waiters    Cache-Control
//! ```
//!
//! [`handle`] is infallible: it calls `handle_inner`, turns a [`ProxyError`] into its JSON
//! answer, counts the response and writes the one access-log event of the request.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{AGE, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use tokio_rustls::TlsAcceptor;

use crate::cache::conditional;
use crate::cache::policy::{self, Freshness};
use crate::cache::{CacheKey, CacheStatus, CachedResponse, FetchKind, ResponseCache, StaleReason};
use crate::clock::Clock;
use crate::config::{AccountConfig, Config};
use crate::error::{ProxyError, json_error};
use crate::metrics::{AccountMetrics, Metrics};
use crate::route::{self, AgentQuery, Route};
use crate::server;
use crate::upstream::protect::{BreakerState, Protection};
use crate::upstream::{self, UpstreamClient, UpstreamError};

/// `X-Cache: HIT|MISS`, the header most dashboards and curl users look at.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
/// RFC 9211 `Cache-Status`.
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
/// The tracing target of the one event per request.
pub const ACCESS_LOG: &str = "miralix_gateway::access";
/// The cache's name in `Cache-Status`.
const CACHE_NAME: &str = "miralix-gateway";

/// One configured account, ready to serve.
#[derive(Debug, Clone)]
pub struct Account {
    pub name: Arc<str>,
    pub client: UpstreamClient,
    pub metrics: AccountMetrics,
    /// Concurrency limit and circuit breaker for this account's box.
    pub protection: Arc<Protection>,
    /// The settings the client was built from, to tell on reload whether it can be kept.
    settings: AccountConfig,
}

/// What a reload can replace: the configuration, the accounts' clients and the TLS acceptor.
pub struct Runtime {
    pub config: Config,
    pub accounts: HashMap<String, Account>,
    /// Set when `server.tls` is configured: new public connections are TLS.
    pub tls: Option<TlsAcceptor>,
}

impl Runtime {
    /// Build a runtime for `config`, reusing `previous`'s client for every unchanged account.
    fn build(
        config: Config,
        previous: Option<&Runtime>,
        metrics: &Metrics,
        clock: &Arc<dyn Clock>,
    ) -> Result<Self, StateError> {
        let mut accounts = HashMap::new();
        for (name, settings) in &config.accounts {
            let kept = previous
                .and_then(|p| p.accounts.get(name))
                .filter(|old| old.settings == *settings);
            let account = match kept {
                Some(old) => old.clone(),
                None => Account {
                    name: name.as_str().into(),
                    client: UpstreamClient::new(name, settings).map_err(|source| {
                        StateError::Account {
                            account: name.clone(),
                            source,
                        }
                    })?,
                    metrics: metrics.account(name),
                    protection: Arc::new(Protection::new(
                        &settings.upstream,
                        clock.clone(),
                        metrics.protection(name),
                    )),
                    settings: settings.clone(),
                },
            };
            accounts.insert(name.clone(), account);
        }
        let tls = match &config.server.tls {
            Some(identity) => Some(server::tls::acceptor(identity).map_err(StateError::Tls)?),
            None => None,
        };
        Ok(Self {
            config,
            accounts,
            tls,
        })
    }
}

/// Everything a request needs, built once and shared by every connection.
pub struct AppState {
    runtime: ArcSwap<Runtime>,
    pub cache: ResponseCache,
    pub metrics: Metrics,
    clock: Arc<dyn Clock>,
    ready: AtomicBool,
    /// Reloads run one at a time.
    reloading: tokio::sync::Mutex<()>,
}

impl AppState {
    /// Build the clients, cache and metrics for a validated configuration.
    pub fn new(config: Config, clock: Arc<dyn Clock>) -> Result<Self, StateError> {
        let metrics = Metrics::new();
        let cache = ResponseCache::new(config.cache.clone(), clock.clone(), metrics.evictions());
        let runtime = Runtime::build(config, None, &metrics, &clock)?;
        Ok(Self {
            runtime: ArcSwap::from_pointee(runtime),
            cache,
            metrics,
            clock,
            ready: AtomicBool::new(false),
            reloading: tokio::sync::Mutex::new(()),
        })
    }

    /// The configuration, accounts and TLS acceptor in force now.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Switch to `config`, or keep everything as it is if any part of it cannot be built.
    ///
    /// Unchanged accounts keep their client and their cache entries; changed and removed
    /// accounts lose their entries. Settings bound at start-up (listen addresses, connection
    /// cap, cache size, log format) are reported in [`ReloadReport::restart_required`].
    pub async fn reload(&self, config: Config) -> Result<ReloadReport, StateError> {
        let _one_at_a_time = self.reloading.lock().await;
        let old = self.runtime();
        let new = Runtime::build(config, Some(&old), &self.metrics, &self.clock)?;
        let report = ReloadReport::compare(&old, &new);
        self.cache.set_config(new.config.cache.clone());
        self.runtime.store(Arc::new(new));
        for account in report.changed.iter().chain(&report.removed) {
            self.cache.invalidate_account(account);
        }
        Ok(report)
    }

    /// Whether the listeners are serving.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: Vec<String>,
    /// Keys whose new value takes effect only after a restart.
    pub restart_required: Vec<&'static str>,
}

impl ReloadReport {
    fn compare(old: &Runtime, new: &Runtime) -> Self {
        let mut report = Self::default();
        for (name, account) in &new.accounts {
            match old.accounts.get(name) {
                None => report.added.push(name.clone()),
                Some(previous) if previous.settings == account.settings => {
                    report.unchanged.push(name.clone())
                }
                Some(_) => report.changed.push(name.clone()),
            }
        }
        report.removed = old
            .accounts
            .keys()
            .filter(|name| !new.accounts.contains_key(*name))
            .cloned()
            .collect();
        for list in [
            &mut report.added,
            &mut report.changed,
            &mut report.removed,
            &mut report.unchanged,
        ] {
            list.sort();
        }
        let (a, b) = (&old.config, &new.config);
        let checks = [
            ("server.listen", a.server.listen != b.server.listen),
            (
                "server.plain_listen",
                a.server.plain_listen != b.server.plain_listen,
            ),
            (
                "server.max_connections",
                a.server.max_connections != b.server.max_connections,
            ),
            ("admin.listen", a.admin.listen != b.admin.listen),
            ("cache.max_bytes", a.cache.max_bytes != b.cache.max_bytes),
            ("log.format", a.log != b.log),
        ];
        report.restart_required = checks
            .into_iter()
            .filter_map(|(key, differs)| differs.then_some(key))
            .collect();
        report
    }
}

/// Why a configuration could not be put into service.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("accounts.{account}: {source}")]
    Account {
        account: String,
        #[source]
        source: upstream::BuildError,
    },
    #[error("server.tls: {0}")]
    Tls(String),
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
    // The clock is read for the access log only when that log is on.
    let started = tracing::enabled!(target: ACCESS_LOG, tracing::Level::INFO).then(Instant::now);
    let mut exchange = Exchange {
        cache: CacheStatus::None,
        upstream_status: None,
        account: None,
    };
    let mut response = match handle_inner(&state, &request, &mut exchange).await {
        Ok(response) => response,
        Err(error) => error_response(&error, exchange.cache),
    };
    // A 304 has no body, and no length to announce for one.
    if request.method() == Method::HEAD && response.status() != StatusCode::NOT_MODIFIED {
        strip_body(&mut response);
    }
    state.metrics.record_response(response.status());
    let Some(started) = started else {
        return response;
    };
    tracing::info!(
        target: ACCESS_LOG,
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
    let runtime = state.runtime.load();
    let account = runtime
        .accounts
        .get(recordings.account.as_ref())
        .ok_or_else(|| ProxyError::UnknownAccount(recordings.account.into_owned()))?;
    exchange.account = Some(account.name.clone());

    let key = CacheKey {
        account: account.name.clone(),
        query: recordings.query,
    };
    // Clones for the fetch task are made only when this request starts a fetch.
    let outcome = state
        .cache
        .get_or_fetch(key, |key, kind| fetch(account, key.query.clone(), kind))
        .await;
    exchange.cache = outcome.status;
    let metrics = &account.metrics;
    match outcome.status {
        CacheStatus::Hit => metrics.hits.inc(),
        CacheStatus::Miss => metrics.misses.inc(),
        CacheStatus::Collapsed => metrics.coalesced.inc(),
        CacheStatus::Stale(StaleReason::Revalidating) => metrics.stale_revalidate.inc(),
        CacheStatus::Stale(StaleReason::Error) => metrics.stale_error.inc(),
        // The box was not asked: neither a hit nor a miss (requests_total still counts it).
        CacheStatus::Backoff | CacheStatus::None => 0,
    };
    if outcome.refresh_started {
        metrics.refreshes.inc();
    }
    let entry = outcome
        .result
        .inspect_err(|e| exchange.upstream_status = e.upstream_status())?;
    exchange.upstream_status = match (&outcome.stale_because, outcome.status) {
        (Some(error), _) => error.upstream_status(),
        (None, CacheStatus::Miss | CacheStatus::Collapsed) => Some(entry.status),
        (None, _) => None,
    };
    let mut response = cached_response(
        &entry,
        outcome.status,
        outcome.stale_because.as_ref(),
        state.cache.now(),
    );
    if let Some(etag) = &entry.etag {
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

/// Turn a `200` answer into `304 Not Modified`: the same caching headers and `ETag`, no body.
fn not_modified(response: &mut Response<Full<Bytes>>) {
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    *response.body_mut() = Full::new(Bytes::new());
    response.headers_mut().remove(CONTENT_TYPE);
}

/// One upstream fetch for `account`, through its protection, timed and counted. Runs as a task
/// of its own, so it owns clones of what it needs.
fn fetch(
    account: &Account,
    query: AgentQuery,
    kind: FetchKind,
) -> impl Future<Output = Result<upstream::UpstreamReply, UpstreamError>> + Send + 'static {
    let (client, metrics, protection) = (
        account.client.clone(),
        account.metrics.clone(),
        account.protection.clone(),
    );
    async move {
        let started = Instant::now();
        // reqwest's timeout bounds each attempt; this bounds the whole fetch (a retry and the
        // queue included), so no fetch, and no refresh, can hang on.
        let limit = client.timeout() * 2 + protection.queue_timeout() + Duration::from_secs(1);
        let result = protection
            .run(async {
                tokio::time::timeout(limit, client.fetch(&query))
                    .await
                    .unwrap_or(Err(UpstreamError::Timeout(limit)))
            })
            .await;
        let outcome = match &result {
            Ok(reply) => reply.status.as_u16().to_string(),
            Err(error) => {
                // Logged here, once per fetch, not once per request that waited on it.
                tracing::warn!(
                    account = %client.account(),
                    error = %error.detail(),
                    refresh = kind == FetchKind::Refresh,
                    "upstream fetch failed"
                );
                if kind == FetchKind::Refresh {
                    metrics.refresh_failures.inc();
                }
                upstream_outcome(error)
            }
        };
        metrics.record_upstream(&outcome, started.elapsed().as_secs_f64());
        result
    }
}

/// The `status` label of `upstream_requests_total`: the box's status, or what went wrong.
fn upstream_outcome(error: &UpstreamError) -> String {
    error
        .upstream_status()
        .map_or_else(|| error.kind().to_owned(), |s| s.as_u16().to_string())
}

/// The stored (or just fetched) answer with the cache's headers.
fn cached_response(
    entry: &CachedResponse,
    status: CacheStatus,
    stale_because: Option<&UpstreamError>,
    now: Instant,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(entry.body.clone()));
    *response.status_mut() = entry.status;
    // Room for the headers below (and hyper's `date`), so the map is allocated once.
    *response.headers_mut() = http::HeaderMap::with_capacity(8);
    let age = policy::age(entry.fetched_at, now).as_secs();
    let remaining = entry.lifetime.map(|l| match policy::freshness(&l, now) {
        Freshness::Fresh { remaining } => remaining.as_secs(),
        _ => 0,
    });
    let cache_status = match (status, remaining) {
        (CacheStatus::Hit, Some(ttl)) => format!("{CACHE_NAME}; hit; ttl={ttl}"),
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
    if let Some(etag) = &entry.etag {
        headers.insert(ETAG, etag.clone());
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
        Some(remaining) => header_value(format!("private, max-age={remaining}")),
        None => HeaderValue::from_static("no-store"),
    };
    headers.insert(CACHE_CONTROL, cache_control);
    response
}

/// `; fwd-status=503` when the box answered, `; detail=timeout` (etc.) when it did not.
fn failure_params(error: Option<&UpstreamError>) -> String {
    match error {
        Some(error) => match error.upstream_status() {
            Some(status) => format!("; fwd-status={}", status.as_u16()),
            None => format!("; detail={}", error.kind()),
        },
        None => String::new(),
    }
}

/// An error answer; upstream failures also say, in the cache headers, what the box did.
fn error_response(error: &ProxyError, cache: CacheStatus) -> Response<Full<Bytes>> {
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
        "/readyz" => readiness(&state),
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

/// `/readyz`: 200 while the listeners serve and at least one account's box can be asked (its
/// circuit breaker is not open); the body lists every account's breaker.
fn readiness(state: &AppState) -> Response<Full<Bytes>> {
    let runtime = state.runtime();
    let mut names: Vec<&String> = runtime.accounts.keys().collect();
    names.sort();
    let mut body = String::new();
    let mut reachable = false;
    for name in names {
        let breaker = runtime.accounts[name].protection.state();
        reachable |= breaker != BreakerState::Open;
        body.push_str(&format!("account {name}: breaker {}\n", breaker.as_str()));
    }
    let (status, verdict) = match (state.is_ready(), reachable) {
        (true, true) => (StatusCode::OK, "ready"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "not ready: not serving"),
        (true, false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: every account's breaker is open",
        ),
    };
    plain(status, format!("{verdict}\n{body}"))
}

fn plain(status: StatusCode, text: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(text.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
