//! The gateway's request handling: every phase of a request on the public listener, in order,
//! and the admin listener.
//!
//! ```text
//! handle ─► admit (rate limit 429, Host and target form 400) ─► route::parse (400/404/414)
//!        ─► method and body (405/413) ─► account (404) ─► auth::check (401/403)
//!        ─► serve: list::respond (cache, fromQueueCallId, If-None-Match) or audio::respond
//!        ─► respond (cache headers, JSON errors, HEAD) ─► one access-log and audit event
//! ```
//!
//! [`handle`] is infallible: it calls `handle_inner`, turns a [`ProxyError`] into its JSON
//! answer, counts the response and writes the one access-log event of the request. The
//! phases live in their own files: [`state`] (the reloadable generation and [`AppState`]),
//! `admit`, `list`, `fetch` (what a miss asks the box), `audio`, `respond` and `admin`.

mod admin;
mod admit;
mod audio;
mod fetch;
mod list;
mod respond;
pub mod state;
mod status;
mod trace;

pub use self::admin::handle_admin;
pub use self::audio::AudioBody;
use self::audio::audio_response;
use self::list::list_response;
pub use self::respond::{CACHE_STATUS, X_CACHE};
use self::respond::{NOSNIFF, X_CONTENT_TYPE_OPTIONS, error_response, strip_body};
pub use self::state::{Account, AppState, BuildProblem, Generation, ReloadReport, StateError};
use self::trace::{Trace, X_REQUEST_ID};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};

use crate::auth::{self, AuthError, Client, ClientCert};
use crate::cache::CacheStatus;
use crate::error::ProxyError;
use crate::route::{self, ListQuery, ListRequest, Route, RouteError, Subject};
use crate::telemetry::{ACCESS_LOG, AUDIT_LOG};

/// The body of every answer: whole bytes, or audio streamed from the box.
pub type Body = Either<Full<Bytes>, AudioBody>;

/// What the access-log event reports besides method, path, status and duration.
#[derive(Debug)]
struct AccessEntry {
    /// The request id and trace context, kept or made on arrival.
    trace: Trace,
    cache: CacheStatus,
    /// The second tier the answer was brought from, if any.
    tier: Option<&'static str>,
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
    let started = Instant::now();
    let mut access = AccessEntry {
        trace: Trace::of(request.headers()),
        cache: CacheStatus::Skipped,
        tier: None,
        upstream_status: None,
        account: None,
        client: None,
        resource: None,
    };
    let mut response = match handle_inner(&state, &request, &peer, &mut access).await {
        Ok(response) => response,
        Err(error) => {
            // A request refused before its account was resolved is still logged under the
            // account its path names, when that is one (only on this error path).
            if access.account.is_none() {
                access.account = request
                    .uri()
                    .path()
                    .strip_prefix("/mot/")
                    .and_then(|rest| rest.split('/').next())
                    .and_then(|name| {
                        state
                            .generation()
                            .accounts
                            .get(name)
                            .map(|a| a.name.clone())
                    });
            }
            error_response(&error, access.cache).map(Either::Left)
        }
    };
    // A 304 has no body, and no length to announce for one.
    if request.method() == Method::HEAD && response.status() != StatusCode::NOT_MODIFIED {
        strip_body(&mut response);
    }
    let headers = response.headers_mut();
    headers.insert(X_CONTENT_TYPE_OPTIONS, NOSNIFF.clone());
    headers.insert(X_REQUEST_ID, access.trace.request_id.clone());
    state.metrics.record_response(response.status());
    let elapsed = started.elapsed().as_secs_f64();
    state
        .metrics
        .record_request_duration(access.cache.as_str(), elapsed);
    if let (Some(client), Some(resource)) = (&access.client, &access.resource) {
        tracing::info!(
            target: AUDIT_LOG,
            request_id = access.trace.request_id(),
            trace_id = access.trace.trace_id(),
            account = access.account.as_deref().unwrap_or_default(),
            client = %client,
            resource = %resource,
            status = response.status().as_u16(),
            "read"
        );
    }
    if !tracing::enabled!(target: ACCESS_LOG, tracing::Level::INFO) {
        return response;
    }
    tracing::info!(
        target: ACCESS_LOG,
        request_id = access.trace.request_id(),
        trace_id = access.trace.trace_id(),
        method = %request.method(),
        // With the query: a fromQueueCallId hit is not a full-list hit.
        path = %request.uri().path_and_query().map_or("", |p| p.as_str()),
        account = access.account.as_deref().unwrap_or_default(),
        client = access.client.as_ref().map(tracing::field::display),
        status = response.status().as_u16(),
        cache = access.cache.as_str(),
        tier = access.tier,
        upstream_status = access.upstream_status.map(|s| s.as_u16()),
        // A number, in microsecond steps.
        duration_ms = (elapsed * 1e6).round() / 1e3,
        "request"
    );
    response
}

/// The phases of one request, in order; each returns the error that answers it.
async fn handle_inner<B: http_body::Body>(
    state: &AppState,
    request: &Request<B>,
    peer: &Peer,
    access: &mut AccessEntry,
) -> Result<Response<Body>, ProxyError> {
    let generation = state.generation.load();
    admit::rate_limit(state, &generation, peer)?;
    admit::request_form(request)?;
    let (path, query) = (request.uri().path(), request.uri().query());
    let route = match route::parse(path, query) {
        Err(RouteError::NotFound) => passthrough_route(&generation, path, query)?,
        parsed => parsed?,
    };
    admit::method_and_body(request)?;
    let account = account_for(&generation, &route)?;
    access.account = Some(account.name.clone());
    // Before anything is looked up: an unauthenticated request learns nothing, not even
    // whether an agent is cached.
    access.client = Some(authorize(state, &generation, account, request, peer)?);
    match route {
        Route::List(list) => {
            let query = allowed_state(account, list.query)?;
            access.resource = audited(|| list_resource(&query));
            let cache = &generation.config.cache;
            let ttl = list::directory_ttl(cache, &query);
            let response =
                list_response(state, (cache, ttl), account, query, request, access).await?;
            Ok(response.map(Either::Left))
        }
        Route::Passthrough(read, ttl) => {
            access.resource = audited(|| list_resource(&read.query));
            let cache = (&generation.config.cache, Some(ttl));
            let response =
                list_response(state, cache, account, read.query, request, access).await?;
            Ok(response.map(Either::Left))
        }
        Route::Audio { queue_call_id, .. } => {
            access.resource = audited(|| format!("queues/calls/recordings/{queue_call_id}"));
            audio_response(state, account, queue_call_id, request, access).await
        }
    }
}

/// The configured account the route names.
fn account_for<'a>(
    generation: &'a Generation,
    route: &Route<'_>,
) -> Result<&'a Account, ProxyError> {
    let name = match route {
        Route::List(list) | Route::Passthrough(list, _) => &list.account,
        Route::Audio { account, .. } => account,
    };
    generation
        .accounts
        .get(name.as_ref())
        .ok_or_else(|| ProxyError::UnknownAccount(name.clone().into_owned()))
}

/// The client, if the account's access rule lets it in.
fn authorize<B>(
    state: &AppState,
    generation: &Generation,
    account: &Account,
    request: &Request<B>,
    peer: &Peer,
) -> Result<Client, ProxyError> {
    auth::check(
        &account.settings.access,
        request.headers(),
        peer.cert.as_deref(),
    )
    .map_err(|refused| {
        // A wrong key costs the client a second token: guessing runs at half the rate.
        if let (AuthError::Invalid, Some(limiter)) = (&refused, &generation.limiter) {
            limiter.charge(peer.addr.ip(), state.clock.now());
        }
        ProxyError::Unauthorized(refused)
    })
}

/// The resource for the audit log, named only when that log is on: the hit path does not
/// allocate for it.
fn audited(name: impl FnOnce() -> String) -> Option<String> {
    tracing::enabled!(target: AUDIT_LOG, tracing::Level::INFO).then(name)
}

/// A path the gateway does not serve itself, if the account it names allows it
/// (`[[accounts.<name>.passthrough]]`); otherwise still not found, and never forwarded.
fn passthrough_route<'a>(
    generation: &Generation,
    path: &'a str,
    query: Option<&str>,
) -> Result<Route<'a>, ProxyError> {
    let not_found = || ProxyError::Route(RouteError::NotFound);
    let (name, rest) = path
        .strip_prefix("/mot/")
        .and_then(|rest| rest.split_once('/'))
        .ok_or_else(not_found)?;
    let name = percent_encoding::percent_decode_str(name)
        .decode_utf8()
        .map_err(|_| not_found())?;
    let account = generation.accounts.get(&*name).ok_or_else(not_found)?;
    let matched = route::passthrough::find(&account.settings.passthrough, rest, query)
        .map_err(ProxyError::Passthrough)?
        .ok_or_else(not_found)?;
    let read = ListRequest {
        account: name,
        query: ListQuery {
            subject: Subject::Passthrough(matched.target.into_boxed_str()),
            from_queue_call_id: None,
        },
    };
    Ok(Route::Passthrough(read, matched.ttl))
}

/// The directory's `state` as the account's allowlist spells it; a value not on the list is
/// refused before it reaches the cache or the box.
fn allowed_state(account: &Account, mut query: ListQuery) -> Result<ListQuery, ProxyError> {
    if let Subject::Directory(Some(given)) = &query.subject {
        let states = &account.settings.directory_states;
        let Some(state) = states.iter().find(|s| s.eq_ignore_ascii_case(given)) else {
            return Err(ProxyError::DirectoryState {
                given: crate::identity::truncate_for_message(given),
                allowed: states.join(", "),
            });
        };
        query.subject = Subject::Directory(Some(state.clone()));
    }
    Ok(query)
}

/// `agents/id/103/recordings[?fromQueueCallId=N]`, `queues/4/calls/recordings`,
/// `agents[?state=any]`: canonical.
fn list_resource(query: &ListQuery) -> String {
    let mut resource = match &query.subject {
        Subject::Agent {
            id_type,
            identification,
        } => format!("agents/{}/{identification}/recordings", id_type.as_str()),
        Subject::Queue(id) => format!("queues/{id}/calls/recordings"),
        Subject::Directory(None) => "agents".to_owned(),
        Subject::Directory(Some(state)) => format!("agents?state={state}"),
        Subject::Passthrough(target) => target.to_string(),
    };
    if let Some(from) = query.from_queue_call_id {
        resource.push_str(&format!("?{}={from}", route::FROM_QUEUE_CALL_ID));
    }
    resource
}
