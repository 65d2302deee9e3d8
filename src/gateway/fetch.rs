//! The fetch behind a cache key: a delta after the highest stored id when a stored list can
//! be extended, the whole list otherwise, each request to the box through its protection.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;

use super::Account;
use super::respond::upstream_outcome;
use super::status::RecentErrors;
use crate::cache::policy::{self, FetchFacts, ListPlan, StoredFacts};
use crate::cache::{
    CacheKey, CachedResponse, FetchKind, Fetched, Previous, ResponseCache, StoredList, Waiters,
};
use crate::config::CacheConfig;
use crate::metrics::AccountMetrics;
use crate::recordings::RecordingList;
use crate::route::ListQuery;
use crate::upstream::protect::Protection;
use crate::upstream::{Forwarded, ListFetch, UpstreamClient, UpstreamError, UpstreamReply};

/// What decides between a delta and a full refresh, read when the fetch is set up.
#[derive(Debug, Clone, Copy)]
pub(super) struct RefreshPlan {
    pub(super) full_refresh_interval: Duration,
    pub(super) now: Instant,
    /// How long a `200` is fresh when not `cache.ttl`: the directory's `cache.directory_ttl`,
    /// a passthrough route's `ttl`.
    pub(super) ttl: Option<Duration>,
}

impl RefreshPlan {
    pub(super) fn of(cache: &CacheConfig, now: Instant) -> Self {
        Self {
            full_refresh_interval: cache.full_refresh_interval,
            now,
            ttl: None,
        }
    }
}

/// What the cache calls when a request for `account` starts a fetch: [`fetch_list`], with the
/// refresh plan of `config` (a `200` fresh for `ttl` when given) read at that moment, so a hit
/// reads no clock for it, and the trace context `forwarded` gives.
pub(super) fn list_fetcher<'a>(
    account: &'a Account,
    (cache, config, ttl): (&'a ResponseCache, &'a CacheConfig, Option<Duration>),
    forwarded: impl FnOnce() -> Forwarded + 'a,
) -> impl FnOnce(&CacheKey, FetchKind, Previous, Waiters) -> ListFetchTask + 'a {
    move |key, kind, previous, waiters| {
        let plan = RefreshPlan {
            ttl,
            ..RefreshPlan::of(config, cache.now())
        };
        let query = key.query.clone();
        Box::pin(fetch_list(
            account,
            query,
            kind,
            previous,
            waiters,
            plan,
            forwarded(),
        ))
    }
}

/// A fetch as the cache spawns it (boxed once per fetch, so [`list_fetcher`] can name it).
pub(super) type ListFetchTask =
    std::pin::Pin<Box<dyn Future<Output = Result<Fetched, UpstreamError>> + Send + 'static>>;

/// The fetch behind a cache key, run as a task of its own (so it owns clones of what it
/// needs).
///
/// A full list whose stored copy was fetched whole less than `full_refresh_interval` ago is
/// refreshed by delta: `fromQueueCallId=<highest stored id>`, the answer appended. A delta
/// the box cannot answer with a list falls back to a full fetch; a `404` means the agent is
/// gone and replaces the list. The directory and passthrough reads are opaque JSON: always
/// fetched whole.
pub(super) fn fetch_list(
    account: &Account,
    query: ListQuery,
    kind: FetchKind,
    previous: Previous,
    waiters: Waiters,
    plan: RefreshPlan,
    forwarded: Forwarded,
) -> impl Future<Output = Result<Fetched, UpstreamError>> + Send + 'static {
    let box_ = BoxRequest {
        client: account.client.clone(),
        metrics: account.metrics.clone(),
        protection: account.protection.clone(),
        forwarded,
        errors: account.errors.clone(),
    };
    // The stored full list a delta would extend: a `200` parsed into its elements.
    let base = previous
        .filter(|previous| previous.status == StatusCode::OK)
        .and_then(|previous| Some((previous.list.clone()?, previous)));
    let facts = FetchFacts {
        forced: kind == FetchKind::Forced,
        filtered: query.from_queue_call_id.is_some(),
        box_filters: account.settings.api_version.has_from_queue_call_id(),
        stored: base.as_ref().map(|(list, _)| StoredFacts {
            highest_id: list.recordings.max_id(),
            fetched_whole_at: list.fetched_whole_at,
        }),
    };
    let delta_base = match policy::plan_list_fetch(facts, plan.full_refresh_interval, plan.now) {
        ListPlan::DeltaAfter(max) => base.map(|(list, previous)| (previous, list, max)),
        ListPlan::Whole => None,
    };
    async move {
        let result = async {
            if let Some((previous, list, max)) = delta_base {
                let delta = ListQuery {
                    from_queue_call_id: Some(max),
                    ..query.clone()
                };
                let reply = box_.send(&delta, ListFetch::Delta, kind, &waiters).await?;
                match reply.status {
                    StatusCode::OK => {
                        if let Some(new) = RecordingList::parse(&reply.body) {
                            return Ok(merged(&previous, list, &new, reply));
                        }
                    }
                    StatusCode::NOT_FOUND => return Ok(Fetched::opaque(reply)),
                    _ => {}
                }
                tracing::info!(
                    account = %box_.client.account(),
                    status = reply.status.as_u16(),
                    "the box did not answer a delta with a list; fetching the whole list"
                );
            }
            let what = match (query.subject.is_recordings(), query.from_queue_call_id) {
                (false, _) => ListFetch::Other,
                (true, Some(_)) => ListFetch::Filtered,
                (true, None) => ListFetch::Full,
            };
            let reply = box_.send(&query, what, kind, &waiters).await?;
            if !query.subject.is_recordings() {
                return Ok(Fetched {
                    ttl: plan.ttl,
                    ..Fetched::opaque(reply)
                });
            }
            // A whole list is parsed into its elements after the waiting clients have it.
            let whole = what == ListFetch::Full && reply.status == StatusCode::OK;
            Ok(Fetched {
                unparsed: whole.then_some(plan.now),
                ..Fetched::opaque(reply)
            })
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
pub(super) fn merged(
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
            ttl: None,
            unparsed: None,
        },
        Some((recordings, body)) => Fetched {
            reply: UpstreamReply { body, ..reply },
            list: Some(StoredList {
                recordings: Arc::new(recordings),
                fetched_whole_at: list.fetched_whole_at,
            }),
            ttl: None,
            unparsed: None,
        },
    }
}

/// What one request to the box needs: the client, its protection, the metrics, and the trace
/// context of the client request that caused it.
pub(super) struct BoxRequest {
    client: UpstreamClient,
    metrics: AccountMetrics,
    protection: Arc<Protection>,
    forwarded: Forwarded,
    errors: Arc<RecentErrors>,
}

impl BoxRequest {
    /// One list request, through the protection, bounded, timed and counted.
    async fn send(
        &self,
        query: &ListQuery,
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
                    tokio::time::timeout(limit, client.get_list(query, &self.forwarded))
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
                self.errors
                    .record(format!("{} fetch: {}", what.as_str(), error.detail()));
                upstream_outcome(error)
            }
        };
        self.metrics
            .record_upstream(&outcome, started.elapsed().as_secs_f64());
        result
    }
}
