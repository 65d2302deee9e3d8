//! The response cache: stored upstream answers keyed by normalized request, with coalescing.
//!
//! Entries live in a byte-bounded moka cache. Concurrent misses on one key share a single
//! upstream fetch: the first request (the leader) spawns the fetch as its own task and registers
//! a `watch` channel in the in-flight map; later requests (collapsed waiters) subscribe to it and
//! are woken the moment the fetch completes. Because the fetch is a task of its own, a leader
//! whose client hangs up does not cancel it for the others, and it is not started a second time.
//! moka's `try_get_with` would restart the fetch when its leader is dropped, and cannot coalesce
//! the refresh of an entry that is still present, which is why the in-flight map is our own.

pub mod policy;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use tokio::sync::{Mutex, watch};

use crate::clock::Clock;
use crate::config::CacheConfig;
use crate::route::AgentQuery;
use crate::upstream::{UpstreamError, UpstreamReply};

use self::policy::Freshness;

/// What identifies one cacheable upstream answer. Built from the normalized request only, so
/// every spelling of one agent maps to the same key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub account: Arc<str>,
    pub query: AgentQuery,
}

/// An upstream answer as it is served to clients, whether or not it was stored.
#[derive(Debug)]
pub struct CachedResponse {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    /// The upstream body, byte for byte; served by cloning the `Bytes` handle.
    pub body: Bytes,
    pub fetched_at: Instant,
    /// How long it is fresh; `None` when it was not stored at all.
    pub ttl: Option<Duration>,
}

/// How a request was answered by the cache; `as_str` is the stable name used in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from a fresh stored entry.
    Hit,
    /// This request led the upstream fetch.
    Miss,
    /// This request waited for another request's upstream fetch.
    Collapsed,
    /// The request never reached the cache (refused, unknown account, admin paths).
    None,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Collapsed => "collapsed",
            CacheStatus::None => "none",
        }
    }
}

/// What every request for a key receives when its fetch completes.
pub type FetchResult = Result<Arc<CachedResponse>, UpstreamError>;

/// Fetches in flight: a sender of each fetch's channel, to subscribe joiners and count them.
type Flights = HashMap<CacheKey, watch::Sender<Option<FetchResult>>>;

/// Stored responses plus the map of fetches in flight. Cheap to clone: clones share state.
#[derive(Clone)]
pub struct ResponseCache {
    store: moka::future::Cache<CacheKey, Arc<CachedResponse>>,
    in_flight: Arc<Mutex<Flights>>,
    /// TTLs in force; replaced on reload (`max_bytes` is fixed when the store is built).
    config: Arc<ArcSwap<CacheConfig>>,
    clock: Arc<dyn Clock>,
}

/// Per-entry lifetime for moka: an entry leaves memory when it can no longer be served.
struct EntryExpiry;

impl moka::Expiry<CacheKey, Arc<CachedResponse>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<CachedResponse>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        value.ttl
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        value: &Arc<CachedResponse>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        value.ttl
    }
}

/// Bytes an entry costs: its body, its key, and a fixed allowance for the bookkeeping.
fn weigh(key: &CacheKey, value: &Arc<CachedResponse>) -> u32 {
    const OVERHEAD: usize = 256;
    let bytes = value.body.len() + key.query.identification.len() + key.account.len() + OVERHEAD;
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

impl ResponseCache {
    pub fn new(config: CacheConfig, clock: Arc<dyn Clock>) -> Self {
        let store = moka::future::Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(weigh)
            .expire_after(EntryExpiry)
            .support_invalidation_closures()
            .build();
        Self {
            store,
            in_flight: Arc::default(),
            config: Arc::new(ArcSwap::from_pointee(config)),
            clock,
        }
    }

    /// Use new TTLs for entries stored from now on.
    pub fn set_config(&self, config: CacheConfig) {
        self.config.store(Arc::new(config));
    }

    /// Drop every entry of `account` (its upstream settings changed or it was removed).
    pub fn invalidate_account(&self, account: &str) {
        let account: Arc<str> = account.into();
        // Fails only without `support_invalidation_closures`, which the builder sets.
        let _ = self
            .store
            .invalidate_entries_if(move |key, _| key.account == account);
    }

    /// The clock freshness is judged by.
    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    /// Serve `key` from a fresh entry, or join or lead the one upstream fetch for it.
    ///
    /// `fetch` is called (with the key) only by the leader, and its future runs as a task of
    /// its own.
    pub async fn get_or_fetch<F, Fut>(&self, key: CacheKey, fetch: F) -> (CacheStatus, FetchResult)
    where
        F: FnOnce(&CacheKey) -> Fut,
        Fut: Future<Output = Result<UpstreamReply, UpstreamError>> + Send + 'static,
    {
        if let Some(entry) = self.fresh(&key).await {
            return (CacheStatus::Hit, Ok(entry));
        }
        let (status, mut receiver) = {
            let mut flights = self.in_flight.lock().await;
            if let Some(flight) = flights.get(&key) {
                (CacheStatus::Collapsed, flight.subscribe())
            } else if let Some(entry) = self.fresh(&key).await {
                // A fetch completed between the lookup above and taking the lock.
                return (CacheStatus::Hit, Ok(entry));
            } else {
                let (sender, receiver) = watch::channel(None);
                flights.insert(key.clone(), sender.clone());
                let fetch = fetch(&key);
                self.spawn_fetch(key, sender, fetch);
                (CacheStatus::Miss, receiver)
            }
        };
        let result = match receiver.wait_for(Option::is_some).await {
            Ok(done) => done.clone().unwrap_or_else(|| Err(UpstreamError::Aborted)),
            Err(_) => Err(UpstreamError::Aborted),
        };
        (status, result)
    }

    async fn fresh(&self, key: &CacheKey) -> Option<Arc<CachedResponse>> {
        let entry = self.store.get(key).await?;
        let ttl = entry.ttl?;
        match policy::freshness(entry.fetched_at, ttl, self.clock.now()) {
            Freshness::Fresh { .. } => Some(entry),
            Freshness::Expired => None,
        }
    }

    fn spawn_fetch<Fut>(
        &self,
        key: CacheKey,
        sender: watch::Sender<Option<FetchResult>>,
        fetch: Fut,
    ) where
        Fut: Future<Output = Result<UpstreamReply, UpstreamError>> + Send + 'static,
    {
        let cache = self.clone();
        tokio::spawn(async move {
            // The fetch runs in a task of its own so that a panic in it still releases the
            // waiters below instead of leaving the key in flight forever.
            let reply = tokio::spawn(fetch)
                .await
                .unwrap_or(Err(UpstreamError::Aborted));
            let result = reply.map(|reply| {
                Arc::new(CachedResponse {
                    ttl: policy::ttl_for(reply.status, &cache.config.load()),
                    status: reply.status,
                    content_type: reply.content_type,
                    body: reply.body,
                    fetched_at: cache.clock.now(),
                })
            });
            if let Ok(entry) = &result
                && entry.ttl.is_some()
            {
                cache.store.insert(key.clone(), entry.clone()).await;
            }
            // Store first, then leave the in-flight map: a request arriving in between joins
            // this flight, one arriving after finds the stored entry.
            cache.in_flight.lock().await.remove(&key);
            sender.send_replace(Some(result));
        });
    }

    /// Requests currently waiting for an upstream fetch, leaders and collapsed waiters alike.
    pub async fn waiting(&self) -> usize {
        let flights = self.in_flight.lock().await;
        flights.values().map(watch::Sender::receiver_count).sum()
    }

    /// Entries currently stored.
    pub fn entry_count(&self) -> u64 {
        self.store.entry_count()
    }

    /// Weighted size (bytes, as counted by the weigher) of the stored entries.
    pub fn weighted_size(&self) -> u64 {
        self.store.weighted_size()
    }

    /// Apply moka's pending bookkeeping so counts are current (used before reporting them).
    pub async fn sync(&self) {
        self.store.run_pending_tasks().await;
    }
}
