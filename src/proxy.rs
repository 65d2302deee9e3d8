//! The per-request handlers: the public listener (route, cache, upstream, response; audio
//! streamed through) and the admin listener (metrics, health, purge and refresh).
//!
//! ```text
//! request ─► rate limit, Host, target form ─► route::parse ─► account lookup ─► auth::check
//!              │ 429/400                        │ 400/404/414     │ 404           │ 401/403
//!              ▼                                ▼                 ▼               ▼
//!            JSON error ◄───────────────────────┴─────────────────┴───────────────┘
//!
//! then ResponseCache::get_or_fetch (hit: stored Bytes; miss: one UpstreamClient fetch, shared
//! by waiters) and the response headers X-Cache, Age, Cache-Status, Cache-Control.
//! ```
//!
//! [`handle`] is infallible: it calls `handle_inner`, turns a [`ProxyError`] into its JSON
//! answer, counts the response and writes the one access-log event of the request.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{
    ACCEPT_ENCODING, AGE, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, ETAG,
    IF_NONE_MATCH, VARY,
};
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::auth::{self, AuthError, Client, ClientCert};
use crate::cache::policy::{self, Freshness};
use crate::cache::{
    CacheKey, CacheStatus, CachedResponse, FetchKind, Fetched, Previous, ResponseCache,
    StaleReason, StoredList, Waiters, conditional, encoding,
};
use crate::clock::Clock;
use crate::config::{AccountConfig, CacheConfig, Config};
use crate::error::{ProxyError, json_error};
use crate::limit::RateLimiter;
use crate::metrics::{AccountMetrics, Metrics};
use crate::recordings::RecordingList;
use crate::route::{self, AgentQuery, CacheTarget, Route};
use crate::telemetry::{ACCESS_LOG, AUDIT_LOG};
use crate::tls;
use crate::upstream::protect::{BreakerState, Protection};
use crate::upstream::{self, ListFetch, UpstreamClient, UpstreamError, UpstreamReply};

/// `X-Cache: HIT|MISS`, the header most dashboards and curl users look at.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
/// RFC 9211 `Cache-Status`.
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
/// Sent on every answer: a client must take a body for what `Content-Type` says it is, never
/// guess (a list or an error message must not be rendered as a page).
const X_CONTENT_TYPE_OPTIONS: HeaderName = HeaderName::from_static("x-content-type-options");
const NOSNIFF: HeaderValue = HeaderValue::from_static("nosniff");
/// The cache's name in `Cache-Status`.
const CACHE_NAME: &str = "miralix-gateway";

/// The body of every answer: whole bytes, or audio streamed from the box.
pub type Body = Either<Full<Bytes>, AudioBody>;

/// One configured account, ready to serve.
#[derive(Debug, Clone)]
pub struct Account {
    pub name: Arc<str>,
    pub client: UpstreamClient,
    pub metrics: AccountMetrics,
    /// Concurrency limit and circuit breaker for this account's box.
    pub protection: Arc<Protection>,
    /// Audio downloads in progress, at most `upstream.max_audio_streams`.
    pub audio_streams: Arc<Semaphore>,
    /// The settings the client was built from, to tell on reload whether it can be kept.
    settings: AccountConfig,
}

/// What a reload can replace: the configuration, the accounts' clients and the TLS acceptor.
pub struct Runtime {
    pub config: Config,
    pub accounts: HashMap<String, Account>,
    /// Set when `server.tls` is configured: new public connections are TLS.
    pub tls: Option<TlsAcceptor>,
    /// Set when `server.rate_limit` is configured; kept across reloads that do not change it.
    pub limiter: Option<Arc<RateLimiter>>,
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
        // Every problem is collected, so check-config and a refused reload list them all.
        let mut problems = Vec::new();
        for (name, settings) in &config.accounts {
            let kept = previous
                .and_then(|p| p.accounts.get(name))
                .filter(|old| old.settings.same_upstream(settings));
            let account = match kept {
                // The same box: keep the client and the protection; take the new keys.
                Some(old) => Account {
                    settings: settings.clone(),
                    ..old.clone()
                },
                None => Account {
                    name: name.as_str().into(),
                    client: match UpstreamClient::new(name, settings) {
                        Ok(client) => client,
                        Err(source) => {
                            problems.push(BuildProblem::Account {
                                account: name.clone(),
                                source,
                            });
                            continue;
                        }
                    },
                    metrics: metrics.account(name),
                    protection: Arc::new(Protection::new(
                        &settings.upstream,
                        clock.clone(),
                        metrics.protection(name),
                    )),
                    audio_streams: Arc::new(Semaphore::new(settings.upstream.max_audio_streams)),
                    settings: settings.clone(),
                },
            };
            accounts.insert(name.clone(), account);
        }
        let tls = match config.server.tls.as_ref().map(tls::acceptor) {
            Some(Ok(acceptor)) => Some(acceptor),
            Some(Err(error)) => {
                problems.push(BuildProblem::Tls(error));
                None
            }
            None => None,
        };
        if !problems.is_empty() {
            return Err(StateError(problems));
        }
        let limiter = config.server.rate_limit.map(|settings| {
            previous
                .and_then(|p| p.limiter.clone())
                .filter(|kept| kept.settings() == settings)
                .unwrap_or_else(|| Arc::new(RateLimiter::new(settings)))
        });
        Ok(Self {
            config,
            accounts,
            tls,
            limiter,
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
    /// The configuration the process started with: settings bound at start-up keep these
    /// values until a restart, whatever later reloads read.
    started: Config,
    /// Reloads run one at a time.
    reloading: tokio::sync::Mutex<()>,
}

impl AppState {
    /// Build the clients, cache and metrics for a validated configuration.
    pub fn new(config: Config, clock: Arc<dyn Clock>) -> Result<Self, StateError> {
        let metrics = Metrics::new();
        let cache = ResponseCache::new(config.cache.clone(), clock.clone(), metrics.evictions());
        let started = config.clone();
        let runtime = Runtime::build(config, None, &metrics, &clock)?;
        Ok(Self {
            started,
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
        let report = ReloadReport::compare(&old, &new, &self.started);
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
    /// What changed from `old` to `new`; restart-only keys are compared with `started`, the
    /// values actually in force, not with the last file read.
    fn compare(old: &Runtime, new: &Runtime, started: &Config) -> Self {
        let mut report = Self::default();
        for (name, account) in &new.accounts {
            match old.accounts.get(name) {
                None => report.added.push(name.clone()),
                Some(previous) if previous.settings.same_upstream(&account.settings) => {
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
        let (a, b) = (started, &new.config);
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
            ("log.format", a.log.format != b.log.format),
            ("log.audit_file", a.log.audit_file != b.log.audit_file),
        ];
        report.restart_required = checks
            .into_iter()
            .filter_map(|(key, differs)| differs.then_some(key))
            .collect();
        report
    }
}

/// Why a configuration could not be put into service: every problem building it found.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct StateError(pub Vec<BuildProblem>);

impl StateError {
    /// Each problem, naming its key.
    pub fn problems(&self) -> &[BuildProblem] {
        &self.0
    }
}

/// One part of a configuration that could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildProblem {
    #[error("accounts.{account}: {source}")]
    Account {
        account: String,
        #[source]
        source: upstream::BuildError,
    },
    #[error(transparent)]
    Tls(tls::TlsError),
}

/// What the access-log event reports besides method, path, status and duration.
#[derive(Debug)]
struct Exchange {
    cache: CacheStatus,
    upstream_status: Option<StatusCode>,
    account: Option<Arc<str>>,
    /// Who was let in (by key id), once authenticated.
    client: Option<Client>,
    /// What was read, canonical, for the audit log.
    resource: Option<String>,
}

/// What the server knows of the connection a request came on.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    /// Its verified certificate, on a listener with `server.tls.client_ca`.
    pub cert: Option<Arc<ClientCert>>,
}

/// Answer one request on the public listener. Never fails: errors become JSON answers.
pub async fn handle<B: http_body::Body>(
    state: Arc<AppState>,
    request: Request<B>,
    peer: Peer,
) -> Response<Body> {
    // The clock is read for the access log only when that log is on.
    let started = tracing::enabled!(target: ACCESS_LOG, tracing::Level::INFO).then(Instant::now);
    let mut exchange = Exchange {
        cache: CacheStatus::None,
        upstream_status: None,
        account: None,
        client: None,
        resource: None,
    };
    let mut response = match handle_inner(&state, &request, &peer, &mut exchange).await {
        Ok(response) => response,
        Err(error) => error_response(&error, exchange.cache).map(Either::Left),
    };
    // A 304 has no body, and no length to announce for one.
    if request.method() == Method::HEAD && response.status() != StatusCode::NOT_MODIFIED {
        strip_body(&mut response);
    }
    response
        .headers_mut()
        .insert(X_CONTENT_TYPE_OPTIONS, NOSNIFF.clone());
    state.metrics.record_response(response.status());
    if let (Some(client), Some(resource)) = (&exchange.client, &exchange.resource) {
        tracing::info!(
            target: AUDIT_LOG,
            account = exchange.account.as_deref().unwrap_or_default(),
            client = %client,
            resource = %resource,
            status = response.status().as_u16(),
            "read"
        );
    }
    let Some(started) = started else {
        return response;
    };
    tracing::info!(
        target: ACCESS_LOG,
        method = %request.method(),
        path = %request.uri().path(),
        account = exchange.account.as_deref().unwrap_or_default(),
        client = exchange.client.as_ref().map(tracing::field::display),
        status = response.status().as_u16(),
        cache = exchange.cache.as_str(),
        upstream_status = exchange.upstream_status.map(|s| s.as_u16()),
        duration_ms = %format_args!("{:.3}", started.elapsed().as_secs_f64() * 1000.0),
        "request"
    );
    response
}

/// The rate limit, first of all: it also holds back floods of bad requests and key guesses.
fn admit(state: &AppState, runtime: &Runtime, peer: &Peer) -> Result<(), ProxyError> {
    let Some(limiter) = &runtime.limiter else {
        return Ok(());
    };
    limiter
        .check(peer.addr.ip(), state.clock.now())
        .map_err(|limited| {
            state.metrics.record_rate_limited();
            tracing::debug!(client.addr = %peer.addr, "rate limited");
            ProxyError::RateLimited(limited)
        })
}

async fn handle_inner<B: http_body::Body>(
    state: &AppState,
    request: &Request<B>,
    peer: &Peer,
    exchange: &mut Exchange,
) -> Result<Response<Body>, ProxyError> {
    let runtime = state.runtime.load();
    admit(state, &runtime, peer)?;
    // RFC 9112 3.2: an HTTP/1.1 request with no Host, or several, is answered 400. (The value
    // is never used: the box's address comes from the configuration.)
    if request.version() == http::Version::HTTP_11 {
        let hosts = request.headers().get_all(http::header::HOST).iter().count();
        if hosts != 1 {
            return Err(ProxyError::HostHeader(hosts));
        }
    }
    // Origin-form or absolute-form (RFC 9112 3.2); authority-form and asterisk-form name no
    // resource here, and user information only serves to disguise a URL (RFC 9110 4.2.4).
    let target = request.uri();
    let web_scheme = |scheme: &http::uri::Scheme| {
        *scheme == http::uri::Scheme::HTTP || *scheme == http::uri::Scheme::HTTPS
    };
    if !target.path().starts_with('/')
        || target.scheme().is_some_and(|scheme| !web_scheme(scheme))
        || target
            .authority()
            .is_some_and(|authority| authority.as_str().contains('@'))
    {
        return Err(ProxyError::RequestTarget);
    }
    let route = route::parse(request.uri().path(), request.uri().query())?;
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Err(ProxyError::MethodNotAllowed {
            method: request.method().clone(),
            allow: "GET, HEAD",
        });
    }
    // A GET with a body is malformed for this API, and smuggling attempts carry one (hyper
    // frames a message with both Content-Length and Transfer-Encoding by the latter, as RFC
    // 9112 says, so that case lands here too).
    if !request.body().is_end_stream() {
        return Err(ProxyError::BodyNotAccepted);
    }
    let name = match &route {
        Route::Recordings(recordings) => &recordings.account,
        Route::Audio { account, .. } => account,
    };
    let account = runtime
        .accounts
        .get(name.as_ref())
        .ok_or_else(|| ProxyError::UnknownAccount(name.clone().into_owned()))?;
    exchange.account = Some(account.name.clone());
    // Before anything is looked up: an unauthenticated request learns nothing, not even
    // whether an agent is cached.
    let client = auth::check(
        &account.settings.access,
        request.headers(),
        peer.cert.as_deref(),
    )
    .map_err(|refused| {
        // A wrong key costs the client a second token: guessing runs at half the rate.
        if let (AuthError::Invalid, Some(limiter)) = (&refused, &runtime.limiter) {
            limiter.charge(peer.addr.ip(), state.clock.now());
        }
        ProxyError::Unauthorized(refused)
    })?;
    exchange.client = Some(client);
    // Named for the audit log only when it is on: the hit path does not allocate for it.
    let audited = tracing::enabled!(target: AUDIT_LOG, tracing::Level::INFO);
    match route {
        Route::Recordings(recordings) => {
            let query = &recordings.query;
            if audited {
                let mut resource = format!(
                    "agents/{}/{}/recordings",
                    query.id_type.as_str(),
                    query.identification
                );
                if let Some(from) = query.from_queue_call_id {
                    resource.push_str(&format!("?{}={from}", route::FROM_QUEUE_CALL_ID));
                }
                exchange.resource = Some(resource);
            }
            let response = recordings_response(
                state,
                &runtime.config.cache,
                account,
                recordings.query,
                request,
                exchange,
            )
            .await?;
            Ok(response.map(Either::Left))
        }
        Route::Audio { queue_call_id, .. } => {
            if audited {
                exchange.resource = Some(format!("queues/calls/recordings/{queue_call_id}"));
            }
            audio_response(account, queue_call_id, request, exchange).await
        }
    }
}

/// A recordings list from the cache. A `fromQueueCallId` request is answered from the agent's
/// full list (see [`crate::recordings`]) unless caching is off on a box that understands the
/// parameter, or the box's list cannot be read as recordings.
async fn recordings_response<B>(
    state: &AppState,
    cache: &CacheConfig,
    account: &Account,
    query: AgentQuery,
    request: &Request<B>,
    exchange: &mut Exchange,
) -> Result<Response<Full<Bytes>>, ProxyError> {
    let api = account.settings.api_version;
    let from = query
        .from_queue_call_id
        .filter(|_| !api.has_from_queue_call_id() || !cache.ttl.is_zero());
    // Answered from the full list when selecting; otherwise the request's own key.
    let full = AgentQuery {
        from_queue_call_id: query.from_queue_call_id.filter(|_| from.is_none()),
        ..query.clone()
    };
    let gzip = encoding::accepts_gzip(request.headers().get_all(ACCEPT_ENCODING).iter());
    let (mut outcome, mut entry) = lookup(state, cache, account, full, exchange).await?;
    if let Some(from) = from {
        match &entry.list {
            Some(list) => {
                account.metrics.selections.inc();
                entry = select(&entry, list, from, gzip, cache).await;
            }
            // An unknown agent (or another stored error) is the answer for every id.
            None if entry.status != StatusCode::OK => {}
            None if api.has_from_queue_call_id() => {
                // The box's list has no numeric QueueCallIds: let the box do the filtering,
                // and cache its answer as it is.
                (outcome, entry) = lookup(state, cache, account, query, exchange).await?;
            }
            None => return Err(ProxyError::CannotEmulate),
        }
    }
    let mut response = cached_response(
        &entry,
        outcome.status,
        outcome.stale_because.as_ref(),
        state.cache.now(),
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

/// How one cache lookup went, without its result (which is returned beside it).
struct Lookup {
    status: CacheStatus,
    stale_because: Option<UpstreamError>,
}

/// Look `query` up in the cache (fetching it if need be), counting the outcome and noting it
/// for the access log.
async fn lookup(
    state: &AppState,
    cache: &CacheConfig,
    account: &Account,
    query: AgentQuery,
    exchange: &mut Exchange,
) -> Result<(Lookup, Arc<CachedResponse>), ProxyError> {
    let key = CacheKey {
        account: account.name.clone(),
        query,
    };
    let refresh = RefreshPlan {
        full_refresh_interval: cache.full_refresh_interval,
        now: state.cache.now(),
    };
    // Clones for the fetch task are made only when this request starts a fetch.
    let outcome = state
        .cache
        .get_or_fetch(key, |key, kind, previous, waiters| {
            fetch(account, key.query.clone(), kind, previous, waiters, refresh)
        })
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
    let lookup = Lookup {
        status: outcome.status,
        stale_because: outcome.stale_because,
    };
    Ok((lookup, entry))
}

/// The answer to `fromQueueCallId=from` selected from a stored full list: its elements after
/// `from`, with a tag of its own, compressed now only if this client takes gzip. A selection
/// that keeps every element is the stored entry itself.
async fn select(
    entry: &Arc<CachedResponse>,
    list: &StoredList,
    from: u64,
    gzip: bool,
    cache: &CacheConfig,
) -> Arc<CachedResponse> {
    let Some(body) = list.recordings.after(from) else {
        return entry.clone();
    };
    let gzip = match gzip {
        true => encoding::gzip_for_storage(&body, cache).await,
        false => None,
    };
    Arc::new(CachedResponse {
        status: entry.status,
        content_type: entry.content_type.clone(),
        etag: entry.etag.as_ref().map(|_| conditional::entity_tag(&body)),
        gzip,
        list: None,
        body,
        fetched_at: entry.fetched_at,
        lifetime: entry.lifetime,
        retain_for: entry.retain_for,
        too_large: entry.too_large,
    })
}

/// Turn a `200` answer into `304 Not Modified`: the same caching headers and `ETag`, no body
/// and no representation metadata.
fn not_modified(response: &mut Response<Full<Bytes>>) {
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    *response.body_mut() = Full::new(Bytes::new());
    let headers = response.headers_mut();
    headers.remove(CONTENT_TYPE);
    headers.remove(CONTENT_ENCODING);
}

/// What decides between a delta and a full refresh, read when the fetch is set up.
#[derive(Debug, Clone, Copy)]
struct RefreshPlan {
    full_refresh_interval: Duration,
    now: Instant,
}

/// The fetch behind a cache key, run as a task of its own (so it owns clones of what it
/// needs).
///
/// A full list whose stored copy was fetched whole less than `full_refresh_interval` ago is
/// refreshed by delta: `fromQueueCallId=<highest stored id>`, the answer appended. A delta
/// the box cannot answer with a list falls back to a full fetch; a `404` means the agent is
/// gone and replaces the list.
fn fetch(
    account: &Account,
    query: AgentQuery,
    kind: FetchKind,
    previous: Previous,
    waiters: Waiters,
    plan: RefreshPlan,
) -> impl Future<Output = Result<Fetched, UpstreamError>> + Send + 'static {
    let box_ = BoxCall {
        client: account.client.clone(),
        metrics: account.metrics.clone(),
        protection: account.protection.clone(),
    };
    let delta_base = previous
        .filter(|_| {
            kind != FetchKind::Forced
                && query.from_queue_call_id.is_none()
                && account.settings.api_version.has_from_queue_call_id()
        })
        .and_then(|previous| {
            let list = previous.list.clone()?;
            let max = list.recordings.max_id()?;
            let age = plan.now.saturating_duration_since(list.fetched_whole_at);
            (previous.status == StatusCode::OK && age < plan.full_refresh_interval)
                .then_some((previous, list, max))
        });
    async move {
        let result = async {
            if let Some((previous, list, max)) = delta_base {
                let delta = AgentQuery {
                    from_queue_call_id: Some(max),
                    ..query.clone()
                };
                let reply = box_.ask(&delta, ListFetch::Delta, kind, &waiters).await?;
                match reply.status {
                    StatusCode::OK => {
                        if let Some(new) = RecordingList::parse(&reply.body) {
                            return Ok(merged(&previous, list, &new, reply));
                        }
                    }
                    StatusCode::NOT_FOUND => return Ok(Fetched { reply, list: None }),
                    _ => {}
                }
                tracing::info!(
                    account = %box_.client.account(),
                    status = reply.status.as_u16(),
                    "the box did not answer a delta with a list; fetching the whole list"
                );
            }
            let what = match query.from_queue_call_id {
                Some(_) => ListFetch::Filtered,
                None => ListFetch::Full,
            };
            let reply = box_.ask(&query, what, kind, &waiters).await?;
            let list = (what == ListFetch::Full && reply.status == StatusCode::OK)
                .then(|| RecordingList::parse(&reply.body))
                .flatten()
                .map(|recordings| StoredList {
                    recordings: Arc::new(recordings),
                    fetched_whole_at: plan.now,
                });
            Ok(Fetched { reply, list })
        }
        .await;
        if result.is_err() && kind == FetchKind::Refresh {
            box_.metrics.refresh_failures.inc();
        }
        result
    }
}

/// A stored list with a delta's new elements appended; when there are none, the stored body
/// as it is (so its tag and compressed copy are kept).
fn merged(
    previous: &CachedResponse,
    list: StoredList,
    new: &RecordingList,
    reply: UpstreamReply,
) -> Fetched {
    match list.recordings.merge(new) {
        None => Fetched {
            reply: UpstreamReply {
                status: StatusCode::OK,
                content_type: previous.content_type.clone(),
                body: previous.body.clone(),
            },
            list: Some(list),
        },
        Some((recordings, body)) => Fetched {
            reply: UpstreamReply { body, ..reply },
            list: Some(StoredList {
                recordings: Arc::new(recordings),
                fetched_whole_at: list.fetched_whole_at,
            }),
        },
    }
}

/// What one request to the box needs: the client, its protection and the metrics.
struct BoxCall {
    client: UpstreamClient,
    metrics: AccountMetrics,
    protection: Arc<Protection>,
}

impl BoxCall {
    /// One list request, through the protection, bounded, timed and counted.
    async fn ask(
        &self,
        query: &AgentQuery,
        what: ListFetch,
        kind: FetchKind,
        waiters: &Waiters,
    ) -> Result<UpstreamReply, UpstreamError> {
        let (client, protection) = (&self.client, &self.protection);
        let started = Instant::now();
        // reqwest's timeout bounds each attempt; this bounds the whole fetch (a retry and the
        // queue included), so no fetch, and no refresh, can hang on.
        let limit = client.timeout() * 2 + protection.queue_timeout() + Duration::from_secs(1);
        let result = protection
            .run(
                async {
                    tokio::time::timeout(limit, client.fetch(query))
                        .await
                        .unwrap_or(Err(UpstreamError::Timeout(limit)))
                },
                waiters.gone(),
            )
            .await;
        let outcome = match &result {
            Ok(reply) => {
                self.metrics.record_list_fetch(what, reply.body.len());
                reply.status.as_u16().to_string()
            }
            Err(UpstreamError::Abandoned) => {
                tracing::debug!(
                    account = %client.account(),
                    fetch = what.as_str(),
                    "fetch dropped before it reached the box: nobody waits for it any more"
                );
                UpstreamError::Abandoned.kind().to_owned()
            }
            Err(error) => {
                // Logged here, once per fetch, not once per request that waited on it.
                tracing::warn!(
                    account = %client.account(),
                    error = %error.detail(),
                    refresh = kind == FetchKind::Refresh,
                    fetch = what.as_str(),
                    "upstream fetch failed"
                );
                upstream_outcome(error)
            }
        };
        self.metrics
            .record_upstream(&outcome, started.elapsed().as_secs_f64());
        result
    }
}

/// One recording's audio, streamed from the box as it arrives: never buffered whole, never
/// cached. At most `upstream.max_audio_streams` run at once per account.
async fn audio_response<B>(
    account: &Account,
    queue_call_id: u64,
    request: &Request<B>,
    exchange: &mut Exchange,
) -> Result<Response<Body>, ProxyError> {
    let permit = account
        .audio_streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| ProxyError::AudioBusy(account.settings.upstream.max_audio_streams))?;
    let started = Instant::now();
    let head = request.method() == Method::HEAD;
    let upstream = account.client.audio(queue_call_id, request.headers()).await;
    let outcome = match &upstream {
        Ok(response) => response.status().as_u16().to_string(),
        Err(error) => {
            tracing::warn!(
                account = %account.name,
                error = %error.detail(),
                queue_call_id,
                "audio download failed"
            );
            upstream_outcome(error)
        }
    };
    account
        .metrics
        .record_upstream(&outcome, started.elapsed().as_secs_f64());
    let upstream = upstream.inspect_err(|e| exchange.upstream_status = e.upstream_status())?;
    exchange.upstream_status = Some(upstream.status());
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = upstream.status();
    let headers = response.headers_mut();
    for name in upstream::AUDIO_RESPONSE_HEADERS {
        for value in upstream.headers().get_all(&name) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers.insert(
        CACHE_STATUS,
        HeaderValue::from_static("miralix-gateway; fwd=bypass"),
    );
    if head {
        // The box was asked with GET (not every box answers HEAD); its headers, the length
        // included, describe the body a GET gets, which is what HEAD must say. Dropping the
        // download here closes that one connection to the box.
        drop(upstream);
        return Ok(response.map(Either::Left));
    }
    let body = AudioBody {
        inner: reqwest::Body::from(upstream),
        bytes: account.metrics.audio_bytes.clone(),
        _permit: permit,
        hold: None,
    };
    Ok(response.map(|_| Either::Right(body)))
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

/// A HEAD answer: the GET answer's headers, including its length, without the body. An
/// answer that already names its length (audio: the box's) keeps it.
fn strip_body(response: &mut Response<Body>) {
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

fn header_value(text: String) -> HeaderValue {
    HeaderValue::try_from(text).expect("built from ASCII tokens and digits")
}

/// Answer one request on the admin listener: `/metrics`, `/healthz`, `/readyz`, and the
/// cache's purge and refresh endpoints under `/cache`.
pub async fn handle_admin<B>(state: Arc<AppState>, request: Request<B>) -> Response<Body> {
    let path = request.uri().path();
    let response = if path == "/cache" || path.starts_with("/cache/") {
        cache_admin(&state, &request).await
    } else if request.method() != Method::GET && request.method() != Method::HEAD {
        ProxyError::MethodNotAllowed {
            method: request.method().clone(),
            allow: "GET, HEAD",
        }
        .to_response()
    } else {
        match path {
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
                "no such admin endpoint: the admin listener serves /metrics, /healthz, /readyz and /cache",
            ),
        }
    };
    let mut response = response.map(Either::Left);
    if request.method() == Method::HEAD {
        strip_body(&mut response);
    }
    response
        .headers_mut()
        .insert(X_CONTENT_TYPE_OPTIONS, NOSNIFF.clone());
    response
}

/// `DELETE /cache[/{account}[/agents/{type}/{identification}]]` purges and answers how many
/// entries went; `POST /cache/{account}/agents/{type}/{identification}/refresh` fetches the
/// agent's whole list now and answers what the box said.
async fn cache_admin<B>(state: &AppState, request: &Request<B>) -> Response<Full<Bytes>> {
    let target = match route::parse_cache_target(request.uri().path()) {
        Ok(target) => target,
        Err(error) => return ProxyError::from(error).to_response(),
    };
    let method = request.method();
    let allow = match target {
        CacheTarget::AgentRefresh(_) => "POST",
        _ => "DELETE",
    };
    if method.as_str() != allow {
        let method = method.clone();
        return ProxyError::MethodNotAllowed { method, allow }.to_response();
    }
    let runtime = state.runtime();
    match &runtime.config.admin.token {
        None => return ProxyError::AdminDisabled.to_response(),
        Some(token) => {
            if let Err(refused) = auth::check_admin_token(token, request.headers()) {
                tracing::warn!(
                    target: AUDIT_LOG,
                    path = request.uri().path(),
                    reason = %refused,
                    "cache control refused"
                );
                return ProxyError::AdminToken(refused).to_response();
            }
        }
    }
    let account = |name: &str| {
        runtime
            .accounts
            .get(name)
            .ok_or_else(|| ProxyError::UnknownAccount(name.to_owned()))
    };
    let result = async {
        Ok(match target {
            CacheTarget::All => purged(state.cache.purge(|_| true).await, "every account"),
            CacheTarget::Account(name) => {
                let name = account(&name)?.name.clone();
                let count = state.cache.purge(|key| key.account == name).await;
                purged(count, &name)
            }
            CacheTarget::Agent(agent) => {
                let name = account(&agent.account)?.name.clone();
                let count = state
                    .cache
                    .purge(|key| key.account == name && same_agent(&key.query, &agent.query))
                    .await;
                purged(count, &format!("{name} {}", describe(&agent.query)))
            }
            CacheTarget::AgentRefresh(agent) => {
                let account = account(&agent.account)?;
                refresh_now(state, &runtime.config.cache, account, agent.query).await?
            }
        })
    }
    .await;
    result.unwrap_or_else(|error: ProxyError| error.to_response())
}

/// Whether two queries name the same agent, whatever their `fromQueueCallId`.
fn same_agent(a: &AgentQuery, b: &AgentQuery) -> bool {
    a.id_type == b.id_type && a.identification == b.identification
}

/// `id 103`, `email derek.a@company.local`: an agent for messages.
fn describe(query: &AgentQuery) -> String {
    format!("{} {}", query.id_type.as_str(), query.identification)
}

fn purged(count: usize, scope: &str) -> Response<Full<Bytes>> {
    tracing::info!(target: AUDIT_LOG, scope, entries = count, "cache purged");
    let body = serde_json::json!({ "purged": count });
    json_ok(body)
}

/// Fetch one agent's whole list now, replacing what is stored; the agent's entries for a
/// forwarded `fromQueueCallId` go too, as they may be older than the new list.
async fn refresh_now(
    state: &AppState,
    cache: &CacheConfig,
    account: &Account,
    query: AgentQuery,
) -> Result<Response<Full<Bytes>>, ProxyError> {
    let name = account.name.clone();
    let filtered = |key: &CacheKey| {
        key.account == name
            && key.query.from_queue_call_id.is_some()
            && same_agent(&key.query, &query)
    };
    let dropped = state.cache.purge(filtered).await;
    let plan = RefreshPlan {
        full_refresh_interval: cache.full_refresh_interval,
        now: state.cache.now(),
    };
    let key = CacheKey {
        account: account.name.clone(),
        query,
    };
    let agent = describe(&key.query);
    let outcome = state
        .cache
        .fetch_now(key, |key, kind, previous, waiters| {
            fetch(account, key.query.clone(), kind, previous, waiters, plan)
        })
        .await;
    let entry = outcome.result?;
    tracing::info!(
        target: AUDIT_LOG,
        account = %account.name,
        agent,
        status = entry.status.as_u16(),
        "cache refreshed"
    );
    Ok(json_ok(serde_json::json!({
        "refreshed": entry.lifetime.is_some(),
        "status": entry.status.as_u16(),
        "recordings": entry.list.as_ref().map(|l| l.recordings.len()),
        "bytes": entry.body.len(),
        "purged": dropped,
    })))
}

fn json_ok(body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
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

/// An audio body passed on from the box as it arrives, holding its stream slot (and whatever
/// else must live as long as the transfer) until it ends.
pub struct AudioBody {
    inner: reqwest::Body,
    bytes: Counter,
    _permit: OwnedSemaphorePermit,
    hold: Option<Box<dyn Send + Sync>>,
}

impl AudioBody {
    /// Keep `value` alive until the body is done (the server's "request in flight" mark).
    pub fn hold(&mut self, value: impl Send + Sync + 'static) {
        self.hold = Some(Box::new(value));
    }
}

impl std::fmt::Debug for AudioBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AudioBody").finish_non_exhaustive()
    }
}

impl http_body::Body for AudioBody {
    type Data = Bytes;
    type Error = reqwest::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, reqwest::Error>>> {
        let this = self.get_mut();
        let frame = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &frame
            && let Some(data) = frame.data_ref()
        {
            this.bytes.inc_by(data.len() as u64);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
