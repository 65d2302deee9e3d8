//! The admin listener: `/metrics`, `/healthz`, `/readyz`, and the cache's purge and refresh
//! endpoints under `/cache` (with the admin token).

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};

use super::fetch::list_fetcher;
use super::respond::{NOSNIFF, X_CONTENT_TYPE_OPTIONS, strip_body};
use super::{Account, AppState, Body, status};
use crate::auth::{self};
use crate::cache::{CacheKey, Scope};
use crate::config::CacheConfig;
use crate::error::{ProxyError, json_error};
use crate::metrics::exposition;
use crate::route::{self, CacheTarget, ListQuery};
use crate::telemetry::AUDIT_LOG;
use crate::upstream::protect::BreakerState;

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
                let accept = request.headers().get(http::header::ACCEPT);
                let openmetrics =
                    exposition::wants_openmetrics(accept.and_then(|a| a.to_str().ok()));
                let text = state.metrics.render(
                    state.cache.entry_count(),
                    state.cache.weighted_size(),
                    openmetrics,
                );
                let mut response = Response::new(Full::new(Bytes::from(text)));
                let content_type = match openmetrics {
                    true => exposition::OPENMETRICS,
                    false => exposition::TEXT_004,
                };
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
                response
            }
            "/" => {
                // moka's counts are brought up to date first, as for /metrics.
                state.cache.sync().await;
                status::status_page(&state)
            }
            "/healthz" => plain(StatusCode::OK, "ok\n"),
            "/readyz" => readiness(&state),
            _ => json_error(
                StatusCode::NOT_FOUND,
                "no such admin endpoint: the admin listener serves / (status), /metrics, /healthz, /readyz and /cache",
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

/// `DELETE /cache[/{account}[/agents/{type}/{identification}|/queues/{queueId}|/agents]]`
/// purges and answers how many entries went; `POST .../agents/{type}/{identification}/refresh`
/// (or `.../queues/{queueId}/refresh`, or `.../agents/refresh` for the directory) fetches the
/// whole list now and answers what the box said.
pub(super) async fn cache_admin<B>(
    state: &AppState,
    request: &Request<B>,
) -> Response<Full<Bytes>> {
    let target = match route::parse_cache_target(request.uri().path()) {
        Ok(target) => target,
        Err(error) => return ProxyError::from(error).to_response(),
    };
    let method = request.method();
    let (allow, allowed) = match target {
        CacheTarget::Refresh(_) => ("POST", method == Method::POST),
        CacheTarget::Subject(_) | CacheTarget::Recording { .. } => {
            ("DELETE", method == Method::DELETE)
        }
        CacheTarget::All | CacheTarget::Account(_) => (
            "GET, HEAD, DELETE",
            matches!(*method, Method::GET | Method::HEAD | Method::DELETE),
        ),
    };
    if !allowed {
        let method = method.clone();
        return ProxyError::MethodNotAllowed { method, allow }.to_response();
    }
    let generation = state.generation();
    match &generation.config.admin.token {
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
        generation
            .accounts
            .get(name)
            .ok_or_else(|| ProxyError::UnknownAccount(name.to_owned()))
    };
    let listing = matches!(*method, Method::GET | Method::HEAD);
    let result = async {
        Ok(match target {
            CacheTarget::All if listing => list(state, request, None)?,
            CacheTarget::Account(name) if listing => {
                let name = account(&name)?.name.clone();
                list(state, request, Some(&name))?
            }
            CacheTarget::All => {
                let audio = purge_audio(state, None).await;
                purged(state.cache.purge(&Scope::All).await, audio, "every account")
            }
            CacheTarget::Account(name) => {
                let name = account(&name)?.name.clone();
                let count = state.cache.purge(&Scope::Account(name.to_string())).await;
                let audio = purge_audio(state, Some(&name)).await;
                purged(count, audio, &name)
            }
            CacheTarget::Recording {
                account: name,
                queue_call_id,
            } => {
                let name = account(&name)?.name.clone();
                let key = crate::audio::AudioKey {
                    account: name.clone(),
                    queue_call_id,
                };
                let removed = match state.audio.get() {
                    Some(store) => usize::from(store.remove(&key).await),
                    None => 0,
                };
                tracing::info!(target: AUDIT_LOG, account = %name, queue_call_id, removed, "stored recording purged");
                json_ok(serde_json::json!({ "purged_audio": removed }))
            }
            CacheTarget::Subject(subject) => {
                let name = account(&subject.account)?.name.clone();
                let prefix = CacheKey::subject_prefix(&name, &subject.query.subject);
                let count = state.cache.purge(&Scope::Subject(prefix)).await;
                purged(count, None, &format!("{name} {}", subject.query.subject))
            }
            CacheTarget::Refresh(subject) => {
                let account = account(&subject.account)?;
                refresh_now(state, &generation.config.cache, account, subject.query).await?
            }
        })
    }
    .await;
    result.unwrap_or_else(|error: ProxyError| error.to_response())
}

/// Entries listed at most, unless `?limit=` says otherwise.
const DEFAULT_LIMIT: usize = 1000;
const MAX_LIMIT: usize = 100_000;

/// `GET /cache[/{account}][?account=..][&limit=..][&format=html]`: what is stored, as JSON (or
/// a page). It lists personal identifiers, so it takes the admin token like the rest of
/// `/cache`.
fn list<B>(
    state: &AppState,
    request: &Request<B>,
    account: Option<&str>,
) -> Result<Response<Full<Bytes>>, ProxyError> {
    let mut limit = DEFAULT_LIMIT;
    let mut html = false;
    let mut filter = account.map(str::to_owned);
    for (key, value) in form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes())
    {
        match &*key {
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or(ProxyError::BadListing(format!(
                        "limit must be a whole number from 1 to {MAX_LIMIT}, not {value:?}"
                    )))?
            }
            "account" if account.is_none() => {
                if !state.generation().accounts.contains_key(&*value) {
                    return Err(ProxyError::UnknownAccount(value.into_owned()));
                }
                filter = Some(value.into_owned());
            }
            "format" if value == "html" || value == "json" => html = value == "html",
            _ => {
                return Err(ProxyError::BadListing(format!(
                    "unknown parameter {key:?}={value:?}: the listing takes limit=<1..{MAX_LIMIT}>, format=html|json and, on /cache, account=<name>"
                )));
            }
        }
    }
    let (rows, total) = state.cache.listing(filter.as_deref(), limit);
    if html {
        return Ok(status::listing_page(
            filter.as_deref().unwrap_or("every account"),
            &rows,
            total,
        ));
    }
    let entries: Vec<serde_json::Value> = rows.iter().map(status::listed_json).collect();
    Ok(json_ok(serde_json::json!({
        "total": total,
        "listed": entries.len(),
        "entries": entries,
    })))
}

/// Delete the stored recordings of one account (or all) from the audio store, if there is one.
async fn purge_audio(state: &AppState, account: Option<&str>) -> Option<usize> {
    Some(state.audio.get()?.invalidate_account(account).await)
}

/// The answer to a purge: the entries that went from this instance's memory, from the shared
/// tier when there is one (the fleet's other instances drop theirs on its notice), and the
/// recordings deleted from the audio store when it was purged too.
pub(super) fn purged(
    (count, shared): (usize, Option<Result<usize, String>>),
    audio: Option<usize>,
    scope: &str,
) -> Response<Full<Bytes>> {
    let mut body = serde_json::json!({ "purged": count });
    if let Some(audio) = audio {
        body["purged_audio"] = audio.into();
    }
    match &shared {
        Some(Ok(shared)) => {
            tracing::info!(target: AUDIT_LOG, scope, entries = count, shared, "cache purged");
            body["purged_shared"] = (*shared).into();
        }
        Some(Err(error)) => {
            tracing::warn!(target: AUDIT_LOG, scope, entries = count, error = %error, "cache purged here only: the shared tier did not answer");
            body["shared_error"] = format!(
                "{error}: purged on this instance only; the others keep their copies until they expire, and Redis keeps its entries"
            )
            .into();
        }
        None => tracing::info!(target: AUDIT_LOG, scope, entries = count, "cache purged"),
    }
    json_ok(body)
}

/// Fetch one agent's or queue's whole list (or the directory) now, replacing what is stored;
/// its entries for a forwarded `fromQueueCallId` go too, as they may be older than the new
/// list. The directory is stored for `cache.directory_ttl`, as when a client fetched it.
pub(super) async fn refresh_now(
    state: &AppState,
    cache: &CacheConfig,
    account: &Account,
    query: ListQuery,
) -> Result<Response<Full<Bytes>>, ProxyError> {
    let list_key = CacheKey::subject_prefix(&account.name, &query.subject);
    let ttl = super::list::directory_ttl(cache, &query);
    let (dropped, _) = state.cache.purge(&Scope::Filtered(list_key.clone())).await;
    let key = CacheKey {
        account: account.name.clone(),
        query,
    };
    let subject = key.query.subject.to_string();
    let outcome = state
        .cache
        .fetch_now(
            key,
            account.fetch_terms(),
            list_fetcher(account, (&state.cache, cache, ttl), Default::default),
        )
        .await;
    let entry = outcome.result?;
    // The fleet's other instances drop their copies and read the new list from the tier.
    state.cache.announce(&Scope::Exact(list_key)).await;
    tracing::info!(
        target: AUDIT_LOG,
        account = %account.name,
        subject,
        status = entry.status.as_u16(),
        "cache refreshed"
    );
    Ok(json_ok(serde_json::json!({
        "refreshed": entry.lifetime.is_some(),
        "status": entry.status.as_u16(),
        "recordings": entry.elements().map(|l| l.recordings.len()),
        "bytes": entry.body.len(),
        "purged": dropped,
    })))
}

pub(super) fn json_ok(body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `/readyz`: 200 while the listeners serve and at least one account's box can be asked (its
/// circuit breaker is not open); the body lists every account's breaker.
pub(super) fn readiness(state: &AppState) -> Response<Full<Bytes>> {
    let generation = state.generation();
    let mut names: Vec<&String> = generation.accounts.keys().collect();
    names.sort();
    let mut body = String::new();
    let mut reachable = false;
    for name in names {
        let breaker = generation.accounts[name].protection.state();
        reachable |= breaker != BreakerState::Open;
        body.push_str(&format!("account {name}: breaker {}\n", breaker.as_str()));
    }
    // The second tier never makes the gateway unready: without it, it serves as one instance.
    if let Some(tier) = state.cache.tier() {
        body.push_str(&format!("cache tier {}: {}\n", tier.name(), tier.state()));
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

pub(super) fn plain(status: StatusCode, text: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(text.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
