//! The response cache: stored upstream answers keyed by normalized request, with coalescing,
//! stale serving and per-key error backoff.
//!
//! The pieces: [`store`] (the in-memory tier, a byte-bounded moka cache weighed by [`weight`]),
//! `flight` (fetches in progress), `fill` (what a fetch's task stores and lands), [`tier`] (the
//! second tier behind memory: [`shared`] on Redis or `disk` on redb, entries travelling as
//! [`record`]s), [`policy`] (freshness and the delta-or-full rule, pure, taking `now`),
//! [`conditional`] and [`encoding`] (entity tags and gzip).
//!
//! Entries live in a byte-bounded moka cache. Whether an entry may be served is decided by the
//! pure rules in [`policy`] from the injected clock: fresh, stale while a refresh runs, stale
//! because the box fails, or expired. moka's own expiry only bounds memory, at the end of the
//! last window in which an entry could still be served.
//!
//! Concurrent misses on one key share a single upstream fetch: the first request (the leader)
//! spawns the fetch as its own task and registers a `watch` channel in the flight map; later
//! requests subscribe to it and are woken the moment it completes. Because the fetch is a task of
//! its own, a leader whose client hangs up neither cancels nor restarts it. A background refresh
//! of a stale entry is the same kind of flight with nobody waiting, so a key never has two.
//! moka's `try_get_with` would restart the fetch when its leader is dropped, and cannot coalesce
//! the refresh of an entry that is still present, which is why the flight map is our own.
//!
//! A failed fetch never replaces a stored entry. It is remembered for `cache.error_backoff`, and
//! requests for that key in the meantime get the same failure (or the stale entry) without
//! asking the box again.

mod background;
pub mod conditional;
mod disk;
pub mod encoding;
mod fill;
mod flight;
pub mod listing;
pub mod policy;
pub mod record;
pub mod shared;
pub mod store;
pub mod tier;
pub mod weight;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use tokio::sync::watch;

use crate::clock::Clock;
use crate::config::CacheConfig;
use crate::metrics::Metrics;
use crate::recordings::RecordingList;
use crate::route::{ListQuery, Subject};
use crate::upstream::{UpstreamError, UpstreamReply};

pub use self::flight::Waiters;
use self::flight::{Flights, Joined};
use self::policy::{Freshness, Lifetime};
use self::store::MemoryStore;
pub use self::tier::{FetchTerms, Scope, Tier};

/// What identifies one cacheable upstream answer. Built from the normalized request only, so
/// every spelling of one agent maps to the same key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub account: Arc<str>,
    pub query: ListQuery,
}

/// Bytes escaped in a key's identification, so that a canonical key reads back one way and
/// is safe inside a Redis `SCAN MATCH` pattern.
const KEY_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'%')
    .add(b'/')
    .add(b':')
    .add(b'?')
    .add(b'*')
    .add(b'[')
    .add(b']')
    .add(b'\\')
    .add(b'^')
    .add(b'{')
    .add(b'}');

impl CacheKey {
    /// The key as text, the same on every host: `{account}/{type}/{identification}` for an
    /// agent, `{account}/queues/{queueId}` for a queue (each then `?from={id}` for a
    /// `fromQueueCallId` request), `{account}/directory[/{state}]` for the agent directory.
    /// What the second tier stores under.
    pub fn canonical(&self) -> String {
        let mut text = Self::subject_prefix(&self.account, &self.query.subject);
        if let Some(from) = self.query.from_queue_call_id {
            text.push_str(&format!("?from={from}"));
        }
        text
    }

    /// The canonical key of a subject's full list, which its `?from=` keys extend. A bare
    /// directory's key is the prefix of every `state`'s, so purging it purges them all.
    pub fn subject_prefix(account: &str, subject: &Subject) -> String {
        let escaped =
            |text: &str| percent_encoding::utf8_percent_encode(text, KEY_SEGMENT).to_string();
        match subject {
            Subject::Agent {
                id_type,
                identification,
            } => format!("{account}/{}/{}", id_type.as_str(), escaped(identification)),
            Subject::Queue(id) => format!("{account}/queues/{id}"),
            Subject::Directory(None) => format!("{account}/directory"),
            Subject::Directory(Some(state)) => format!("{account}/directory/{}", escaped(state)),
            Subject::Passthrough(target) => format!("{account}/passthrough/{}", escaped(target)),
        }
    }
}

/// An upstream answer as it is served to clients, whether or not it was stored.
#[derive(Debug, Clone)]
pub struct CachedResponse {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    /// The upstream body, byte for byte; served by cloning the `Bytes` handle.
    pub body: Bytes,
    pub fetched_at: Instant,
    /// How long it may be served; `None` when it was not stored at all.
    pub lifetime: Option<Lifetime>,
    /// How long it stays in memory: until it can no longer be served, and a full list for at
    /// least `cache.full_refresh_interval`, so it can still be the base of a delta refresh
    /// after it expired.
    pub retain_for: Option<Duration>,
    /// Strong entity tag of a stored `200` list, for `If-None-Match`.
    pub etag: Option<HeaderValue>,
    /// The same body gzip-compressed, made once when it was stored.
    pub gzip: Option<Encoded>,
    /// A full `200` recordings list, parsed into its elements.
    pub list: Option<StoredList>,
    /// Served but not stored: it weighs more than `cache.max_entry_bytes`.
    pub too_large: bool,
    /// The second tier it was read back from (`shared`, `disk`), or `None` from the box.
    pub from_tier: Option<&'static str>,
    /// Handed to the waiting clients (and stored) as soon as the box's bytes were checked,
    /// before its compressed copy and parsed list were made; the finished entry replaces it.
    pub provisional: bool,
}

impl CachedResponse {
    /// The parsed elements of a full `200` list: those stored with it, or for a provisional
    /// entry (whose list is still being made) parsed from its body now. `None` when it is
    /// not a list of recordings.
    pub fn elements(&self) -> Option<StoredList> {
        match &self.list {
            Some(list) => Some(list.clone()),
            None if self.provisional && self.status == StatusCode::OK => {
                let recordings = RecordingList::parse(&self.body)?;
                Some(StoredList {
                    recordings: Arc::new(recordings),
                    fetched_whole_at: self.fetched_at,
                })
            }
            None => None,
        }
    }

    /// The answer to `fromQueueCallId=from` selected from this stored full list (`list`, its
    /// parsed elements): the elements after `from`, with a tag of their own, compressed now
    /// only if the client takes gzip. A selection that keeps every element is the stored entry
    /// itself.
    pub async fn select(
        entry: &Arc<Self>,
        list: &StoredList,
        from: u64,
        gzip: bool,
        config: &CacheConfig,
    ) -> Arc<Self> {
        let Some(body) = list.recordings.after(from) else {
            return entry.clone();
        };
        let gzip = match gzip {
            true => encoding::gzip_for_storage(&body, config).await,
            false => None,
        };
        Arc::new(Self {
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
            from_tier: entry.from_tier,
            provisional: entry.provisional,
        })
    }
}

/// A compressed copy of a stored body, with its own entity tag.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub body: Bytes,
    pub etag: HeaderValue,
}

/// The parsed elements of a stored full list, and when the box last sent it whole.
#[derive(Debug, Clone)]
pub struct StoredList {
    pub recordings: Arc<RecordingList>,
    /// Delta refreshes are appended until this is `cache.full_refresh_interval` old.
    pub fetched_whole_at: Instant,
}

/// What a fetch gives the cache: the answer to store and serve, and for a full `200` list its
/// parsed elements.
#[derive(Debug)]
pub struct Fetched {
    pub reply: UpstreamReply,
    pub list: Option<StoredList>,
    /// How long a `200` is fresh when not `cache.ttl` (the agent directory's
    /// `cache.directory_ttl`, a passthrough route's `ttl`).
    pub ttl: Option<Duration>,
    /// A full recordings list the box sent whole at this instant, still to be parsed into its
    /// elements: done after the waiting clients were answered, before it is stored.
    pub unparsed: Option<Instant>,
}

impl Fetched {
    /// An answer stored as it is, with no parsed list, for `cache.ttl`.
    pub fn opaque(reply: UpstreamReply) -> Self {
        Self {
            reply,
            list: None,
            ttl: None,
            unparsed: None,
        }
    }
}

/// Why a stale entry was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleReason {
    /// Within `stale_while_revalidate`: served at once, refreshed in the background.
    Revalidating,
    /// Within `stale_if_error`: the box failed, so the stored entry stands in.
    Error,
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
    /// Served from a stale entry.
    Stale(StaleReason),
    /// The key failed moments ago: answered with that failure, the box not asked again.
    Backoff,
    /// The request never reached the cache (refused, unknown account, admin paths); logged
    /// as `none`.
    Skipped,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Collapsed => "collapsed",
            CacheStatus::Stale(StaleReason::Revalidating) => "stale-revalidating",
            CacheStatus::Stale(StaleReason::Error) => "stale-error",
            CacheStatus::Backoff => "backoff",
            CacheStatus::Skipped => "none",
        }
    }
}

/// What every request for a key receives when its fetch completes.
pub type FetchResult = Result<Arc<CachedResponse>, UpstreamError>;

/// Why a fetch runs: requests wait for it, it refreshes a stale entry in the background, or an
/// operator asked for it (which never settles for a delta).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchKind {
    Miss,
    Refresh,
    Forced,
}

/// The entry stored for a key when its fetch starts, if any: the base of a delta refresh.
pub type Previous = Option<Arc<CachedResponse>>;

/// The answer to one lookup.
#[derive(Debug)]
pub struct Outcome {
    pub status: CacheStatus,
    /// The entry to serve, or the failure to report.
    pub result: FetchResult,
    /// For a stale answer served because the box failed: that failure.
    pub stale_because: Option<UpstreamError>,
    /// This lookup started a background refresh.
    pub refresh_started: bool,
    /// The second tier (`shared` or `disk`) this lookup brought the entry from, if it did.
    pub tier: Option<&'static str>,
    /// For a fresh hit, the instant its freshness was judged at: the answer's `Age` and
    /// `max-age` are taken at the same instant, without reading the clock again.
    pub judged_at: Option<Instant>,
}

impl Outcome {
    fn new(status: CacheStatus, result: FetchResult) -> Self {
        Self {
            status,
            result,
            stale_because: None,
            refresh_started: false,
            tier: None,
            judged_at: None,
        }
    }
}

/// A failed fetch, remembered for the error backoff.
#[derive(Debug)]
struct Failure {
    error: UpstreamError,
    at: Instant,
}

/// Stored responses plus the map of fetches in flight. Cheap to clone: clones share state.
#[derive(Clone)]
pub struct ResponseCache {
    store: MemoryStore,
    failures: moka::future::Cache<CacheKey, Arc<Failure>>,
    in_flight: Flights,
    /// Keys already warned about for answers too large to store: one warning per key.
    warned_too_large: moka::future::Cache<CacheKey, ()>,
    /// TTLs and windows in force; replaced on reload (`max_bytes` is fixed when built).
    config: Arc<ArcSwap<CacheConfig>>,
    clock: Arc<dyn Clock>,
    /// The second tier, once opened (see [`ResponseCache::open_tier`]), when one is
    /// configured and usable.
    tier: Arc<std::sync::OnceLock<Tier>>,
    /// Looks into the tier in progress: one per key at a time.
    loads: Flights,
}

/// The result a flight ends with; `Aborted` if it ended without one.
async fn completion(receiver: &mut watch::Receiver<Option<FetchResult>>) -> FetchResult {
    match receiver.wait_for(Option::is_some).await {
        Ok(done) => done.clone().unwrap_or(Err(UpstreamError::Aborted)),
        Err(_) => Err(UpstreamError::Aborted),
    }
}

/// Keys remembered as failing at most; far more than the keys that can fail within a backoff.
const MAX_REMEMBERED_FAILURES: u64 = 100_000;

impl ResponseCache {
    /// A cache bounded by `config.max_bytes`; removals are counted in `metrics`. Its second
    /// tier is opened by [`ResponseCache::open_tier`], when the server starts.
    pub fn new(config: CacheConfig, clock: Arc<dyn Clock>, metrics: &Metrics) -> Self {
        let store = MemoryStore::new(config.max_bytes, metrics.evictions());
        // The backoff itself is judged by the injected clock; this only bounds memory, with
        // room for a longer backoff set by a reload.
        let failures = moka::future::Cache::builder()
            .max_capacity(MAX_REMEMBERED_FAILURES)
            .time_to_live(config.error_backoff.max(Duration::from_secs(60)))
            .build();
        Self {
            store,
            failures,
            warned_too_large: moka::future::Cache::new(MAX_REMEMBERED_FAILURES),
            in_flight: Flights::default(),
            config: Arc::new(ArcSwap::from_pointee(config)),
            clock,
            tier: Arc::default(),
            loads: Flights::default(),
        }
    }

    /// Open the second tier `config` names, once, inside the runtime (the shared tier starts
    /// following the fleet's notices). Never fails: a tier that cannot be used is reported
    /// and left out. `check-config` never calls it, so checking touches neither Redis nor
    /// the disk.
    pub async fn open_tier(&self, config: Option<&crate::config::TierConfig>, metrics: &Metrics) {
        if self.tier.get().is_some() {
            return;
        }
        let (tier, notices) = Tier::open(config, metrics).await;
        if let Some(tier) = tier
            && self.tier.set(tier).is_ok()
            && let Some(notices) = notices
        {
            self.follow_notices(notices);
        }
    }

    /// The second tier in use, if any.
    pub fn tier(&self) -> Option<&Tier> {
        self.tier.get()
    }

    /// Wait until what the tier has queued is stored (on shutdown).
    pub async fn flush(&self) {
        if let Some(tier) = self.tier.get() {
            tier.flush().await;
        }
    }

    /// Use new TTLs and windows for entries stored from now on.
    pub fn set_config(&self, config: CacheConfig) {
        self.config.store(Arc::new(config));
    }

    /// Drop every entry of `account` (its upstream settings changed or it was removed).
    pub fn invalidate_account(&self, account: &str) {
        self.store.invalidate_account(account);
    }

    /// The clock freshness is judged by.
    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    /// Serve `key` from the cache, or join or lead the one upstream fetch for it.
    ///
    /// `fetch` is called (with the key) only when a fetch starts, and its future runs as a task
    /// of its own.
    pub async fn get_or_fetch<F, Fut>(&self, key: CacheKey, terms: FetchTerms, fetch: F) -> Outcome
    where
        F: FnOnce(&CacheKey, FetchKind, Previous, Waiters) -> Fut,
        Fut: Future<Output = Result<Fetched, UpstreamError>> + Send + 'static,
    {
        let mut fallback = None;
        let mut stored = self.store.get(&key).await;
        let mut tier = None;
        if stored.is_none()
            && let Some(entry) = self.promote(&key).await
        {
            tier = self.tier.get().map(Tier::name);
            stored = Some(entry);
        }
        let mut outcome = self.answer(key, terms, fetch, stored, &mut fallback).await;
        // A fetch that found another instance's fill answered from the tier: a hit there.
        if let (CacheStatus::Miss | CacheStatus::Collapsed, Ok(entry)) =
            (outcome.status, &outcome.result)
            && let Some(name) = entry.from_tier
        {
            outcome.status = CacheStatus::Hit;
            tier = Some(name);
        }
        let outcome = Outcome { tier, ..outcome };
        match (outcome.result, fallback) {
            (Err(error), Some(stale)) => Outcome {
                stale_because: Some(error),
                ..Outcome::new(CacheStatus::Stale(StaleReason::Error), Ok(stale))
            },
            (result, _) => Outcome { result, ..outcome },
        }
    }

    /// The answer for `key` given what memory holds for it (`stored`); an entry that may
    /// stand in should the fetch fail goes to `fallback`.
    async fn answer<F, Fut>(
        &self,
        key: CacheKey,
        terms: FetchTerms,
        fetch: F,
        stored: Previous,
        fallback: &mut Previous,
    ) -> Outcome
    where
        F: FnOnce(&CacheKey, FetchKind, Previous, Waiters) -> Fut,
        Fut: Future<Output = Result<Fetched, UpstreamError>> + Send + 'static,
    {
        if let Some(entry) = &stored
            && let Some(lifetime) = entry.lifetime
        {
            let now = self.clock.now();
            match policy::freshness(&lifetime, now) {
                Freshness::Fresh { .. } => {
                    return Outcome {
                        judged_at: Some(now),
                        ..Outcome::new(CacheStatus::Hit, Ok(entry.clone()))
                    };
                }
                Freshness::StaleRevalidate => {
                    let entry = entry.clone();
                    let refresh_started = self.refresh(key, terms, fetch, stored).await;
                    let stale = CacheStatus::Stale(StaleReason::Revalidating);
                    return Outcome {
                        refresh_started,
                        ..Outcome::new(stale, Ok(entry))
                    };
                }
                Freshness::StaleIfError => *fallback = Some(entry.clone()),
                Freshness::Expired => {}
            }
        }
        match self.recent_failure(&key).await {
            Some(error) => Outcome::new(CacheStatus::Backoff, Err(error)),
            None => self.join_or_lead(key, terms, fetch, stored).await,
        }
    }

    /// The failure of this key's last fetch, while its backoff lasts.
    async fn recent_failure(&self, key: &CacheKey) -> Option<UpstreamError> {
        let failure = self.failures.get(key).await?;
        let backoff = self.config.load().error_backoff;
        policy::in_backoff(failure.at, backoff, self.clock.now()).then(|| failure.error.clone())
    }

    async fn join_or_lead<F, Fut>(
        &self,
        key: CacheKey,
        terms: FetchTerms,
        fetch: F,
        previous: Previous,
    ) -> Outcome
    where
        F: FnOnce(&CacheKey, FetchKind, Previous, Waiters) -> Fut,
        Fut: Future<Output = Result<Fetched, UpstreamError>> + Send + 'static,
    {
        let (status, mut receiver) = match self.in_flight.join_or_lead(&key) {
            Joined::Follower(receiver) => (CacheStatus::Collapsed, receiver),
            Joined::Leader(flight, receiver) => {
                // A fetch may have stored its answer between the lookup and here.
                if let Some(entry) = self.fresh(&key).await {
                    flight.land(Ok(entry.clone()));
                    return Outcome::new(CacheStatus::Hit, Ok(entry));
                }
                let fetch = fetch(&key, FetchKind::Miss, previous.clone(), flight.waiters());
                self.spawn_fetch(key, flight, (FetchKind::Miss, terms), fetch, previous);
                (CacheStatus::Miss, receiver)
            }
        };
        Outcome::new(status, completion(&mut receiver).await)
    }

    /// Start a background refresh of `key` unless one is running or the key is backing off.
    async fn refresh<F, Fut>(
        &self,
        key: CacheKey,
        terms: FetchTerms,
        fetch: F,
        previous: Previous,
    ) -> bool
    where
        F: FnOnce(&CacheKey, FetchKind, Previous, Waiters) -> Fut,
        Fut: Future<Output = Result<Fetched, UpstreamError>> + Send + 'static,
    {
        if self.recent_failure(&key).await.is_some() {
            return false;
        }
        let Some(flight) = self.in_flight.lead_unwatched(&key) else {
            return false;
        };
        // Nobody waits for a refresh by design; it is never dropped for that.
        let fetch = fetch(
            &key,
            FetchKind::Refresh,
            previous.clone(),
            Waiters::always(),
        );
        self.spawn_fetch(key, flight, (FetchKind::Refresh, terms), fetch, previous);
        true
    }

    /// Fetch `key` now, whatever is stored and whatever its backoff says, and wait for the
    /// result; joins a fetch already in flight instead of starting a second one.
    pub async fn fetch_now<F, Fut>(&self, key: CacheKey, terms: FetchTerms, fetch: F) -> Outcome
    where
        F: FnOnce(&CacheKey, FetchKind, Previous, Waiters) -> Fut,
        Fut: Future<Output = Result<Fetched, UpstreamError>> + Send + 'static,
    {
        let previous = self.store.get(&key).await;
        let mut receiver = match self.in_flight.join_or_lead(&key) {
            Joined::Follower(receiver) => receiver,
            Joined::Leader(flight, receiver) => {
                let fetch = fetch(&key, FetchKind::Forced, previous.clone(), Waiters::always());
                self.spawn_fetch(key, flight, (FetchKind::Forced, terms), fetch, previous);
                receiver
            }
        };
        Outcome::new(CacheStatus::Miss, completion(&mut receiver).await)
    }

    /// Remove every stored entry (and remembered failure) in `scope`, here, in the second
    /// tier and (through it) on every instance of the fleet; returns how many entries went
    /// from memory here, and from the shared tier. A fetch in flight is not stopped: what it
    /// brings is stored as usual.
    pub async fn purge(&self, scope: &Scope) -> (usize, Option<Result<usize, String>>) {
        let removed = self.purge_memory(scope).await;
        (removed, self.purge_tier(scope).await)
    }

    /// Remove `scope` from this instance's memory only.
    async fn purge_memory(&self, scope: &Scope) -> usize {
        let matches = |key: &CacheKey| scope.matches(&key.canonical());
        let removed = self.store.remove_matching(matches).await;
        let failed: Vec<CacheKey> = self
            .failures
            .iter()
            .filter(|(key, _)| matches(key))
            .map(|(key, _)| CacheKey::clone(&key))
            .collect();
        for key in failed {
            self.failures.invalidate(&key).await;
        }
        removed
    }

    async fn fresh(&self, key: &CacheKey) -> Option<Arc<CachedResponse>> {
        let entry = self.store.get(key).await?;
        let lifetime = entry.lifetime?;
        match policy::freshness(&lifetime, self.clock.now()) {
            Freshness::Fresh { .. } => Some(entry),
            _ => None,
        }
    }

    /// Requests currently waiting for an upstream fetch, leaders and collapsed waiters alike.
    pub fn waiting(&self) -> usize {
        self.in_flight.waiting()
    }

    /// Fetches in flight, including background refreshes and fills still finishing the entry
    /// they answered with first.
    pub fn fetches_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Completes once every fill that answered first has finished its entry (compressed,
    /// parsed, stored and written through to the second tier).
    pub async fn finished(&self) {
        self.in_flight.finished().await;
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
        self.store.sync().await;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::identity::IdType;

    fn cache_with(clock: Arc<ManualClock>) -> ResponseCache {
        ResponseCache::new(policy::tests::cache(30, 5), clock, &Metrics::new())
    }

    fn cache() -> ResponseCache {
        cache_with(Arc::new(ManualClock::new()))
    }

    /// Agent `id/<id>` of the test account.
    pub(crate) fn key(id: &str) -> CacheKey {
        CacheKey {
            account: "greenbox".into(),
            query: ListQuery {
                subject: Subject::Agent {
                    id_type: IdType::Id,
                    identification: id.into(),
                },
                from_queue_call_id: None,
            },
        }
    }

    fn found() -> Result<Fetched, UpstreamError> {
        Ok(Fetched {
            reply: UpstreamReply {
                status: StatusCode::NOT_FOUND,
                content_type: None,
                body: Bytes::from_static(b"{}"),
            },
            list: None,
            ttl: None,
            unparsed: None,
        })
    }

    /// Let the spawned fetch tasks run until `done` holds, checked every 2 ms for at most 10 s
    /// (an entry is finished on a background thread, outside this runtime).
    async fn settle(cache: &ResponseCache, done: impl Fn(usize) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done(cache.fetches_in_flight()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the fetches did not settle"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    #[tokio::test]
    async fn a_fetch_that_panics_fails_its_waiters_and_leaves_no_flight_behind() {
        let clock = Arc::new(ManualClock::new());
        let cache = cache_with(clock.clone());
        let outcome = cache
            .get_or_fetch(key("1"), FetchTerms::default(), |_, _, _, _| async {
                panic!("a bug in the fetch");
                #[allow(unreachable_code)]
                found()
            })
            .await;
        assert_eq!(outcome.status, CacheStatus::Miss);
        assert!(matches!(outcome.result, Err(UpstreamError::Aborted)));
        assert_eq!(cache.fetches_in_flight(), 0);
        // Remembered like any failure for the error backoff, then fetched again.
        let held_back = cache
            .get_or_fetch(key("1"), FetchTerms::default(), |_, _, _, _| async {
                found()
            })
            .await;
        assert_eq!(held_back.status, CacheStatus::Backoff);
        clock.advance(Duration::from_secs(1));
        let again = cache
            .get_or_fetch(key("1"), FetchTerms::default(), |_, _, _, _| async {
                found()
            })
            .await;
        assert_eq!(again.status, CacheStatus::Miss);
        assert_eq!(again.result.unwrap().status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn a_flight_whose_waiters_all_left_is_withdrawn_and_a_new_one_can_start() {
        let cache = cache();
        let (gone_tx, gone_rx) = tokio::sync::oneshot::channel();
        let leader = {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .get_or_fetch(
                        key("2"),
                        FetchTerms::default(),
                        |_, _, _, waiters| async move {
                            waiters.gone().await;
                            let _ = gone_tx.send(());
                            Err(UpstreamError::Abandoned)
                        },
                    )
                    .await
            })
        };
        settle(&cache, |n| n == 1).await;
        assert_eq!(cache.waiting(), 1);
        leader.abort();
        gone_rx.await.expect("the fetch saw that nobody waits");
        settle(&cache, |n| n == 0).await;
        // A dropped fetch is no failure: the next request leads a fetch of its own.
        let next = cache
            .get_or_fetch(key("2"), FetchTerms::default(), |_, _, _, _| async {
                found()
            })
            .await;
        assert_eq!(next.status, CacheStatus::Miss);
        assert!(next.result.is_ok());
    }

    /// A `200` recordings list of `n` elements, as the box sends it whole.
    fn whole_list(n: u64) -> Result<Fetched, UpstreamError> {
        let elements: Vec<String> = (1..=n)
            .map(|id| format!(r#"{{"QueueCallId":{id},"Caller":"+4512345678"}}"#))
            .collect();
        Ok(Fetched {
            reply: UpstreamReply {
                status: StatusCode::OK,
                content_type: None,
                body: Bytes::from(format!("[{}]", elements.join(","))),
            },
            list: None,
            ttl: None,
            unparsed: Some(Instant::now()),
        })
    }

    #[tokio::test]
    async fn a_miss_is_answered_first_and_a_purge_while_it_finishes_is_not_undone() {
        let cache = cache();
        // The finishing held until the purge is done: on a busy host it could otherwise be
        // over before this task runs again.
        let (open, gate) = tokio::sync::watch::channel(false);
        fill::FINISH_GATE.with(|held| *held.borrow_mut() = Some(gate));
        let first = cache
            .get_or_fetch(key("1"), FetchTerms::default(), |_, _, _, _| async {
                whole_list(400)
            })
            .await;
        assert_eq!(first.status, CacheStatus::Miss);
        let entry = first.result.unwrap();
        assert!(entry.provisional, "answered before it was finished");
        assert!(entry.gzip.is_none() && entry.list.is_none());
        assert_eq!(entry.elements().unwrap().recordings.len(), 400);
        // Its flight has landed: the key can be fetched again at once.
        assert!(cache.in_flight.lead_unwatched(&key("1")).is_some());
        assert_eq!(cache.fetches_in_flight(), 1, "still finishing the entry");
        assert_eq!(cache.purge(&Scope::All).await.0, 1);
        open.send(true).unwrap();
        settle(&cache, |n| n == 0).await;
        assert!(
            cache.store.get(&key("1")).await.is_none(),
            "the finished entry did not bring the purged key back"
        );

        // Left alone, the finished entry replaces the first answer.
        let again = cache
            .get_or_fetch(key("1"), FetchTerms::default(), |_, _, _, _| async {
                whole_list(400)
            })
            .await;
        assert!(again.result.unwrap().provisional);
        settle(&cache, |n| n == 0).await;
        let stored = cache.store.get(&key("1")).await.unwrap();
        assert!(!stored.provisional);
        assert!(stored.gzip.is_some());
        assert_eq!(stored.list.as_ref().unwrap().recordings.len(), 400);
    }

    /// The first answer of a miss is written through to the second tier as it was answered:
    /// a restart, or the fleet waiting on the key's lease, never waits for the finishing,
    /// which runs at the lowest CPU priority and may come late.
    #[tokio::test]
    async fn a_miss_answered_first_is_written_through_before_it_is_finished() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache();
        let disk = crate::config::DiskTierConfig {
            path: dir.path().join("cache.redb"),
            max_bytes: 1 << 24,
        };
        let tier = crate::config::TierConfig::Disk(disk);
        cache.open_tier(Some(&tier), &Metrics::new()).await;
        // The finishing held until the disk has been read.
        let (open, gate) = tokio::sync::watch::channel(false);
        fill::FINISH_GATE.with(|held| *held.borrow_mut() = Some(gate));
        let first = cache
            .get_or_fetch(key("1"), FetchTerms::default(), |_, _, _, _| async {
                whole_list(400)
            })
            .await;
        assert!(first.result.unwrap().provisional);
        cache.flush().await;
        assert_eq!(cache.fetches_in_flight(), 1, "still finishing the entry");
        let Some(Tier::Disk(disk)) = cache.tier() else {
            panic!("the disk tier is open")
        };
        let found = disk.read(key("1").canonical()).await;
        assert!(found.is_some(), "on disk before the entry was finished");

        open.send(true).unwrap();
        settle(&cache, |n| n == 0).await;
        let stored = cache.store.get(&key("1")).await.unwrap();
        assert!(!stored.provisional && stored.gzip.is_some());
    }

    #[tokio::test]
    async fn a_refresh_is_never_dropped_for_want_of_waiters() {
        let waiters = Waiters::always();
        let gone = tokio::select! {
            biased;
            () = waiters.gone() => "gone",
            () = tokio::task::yield_now() => "still wanted",
        };
        assert_eq!(gone, "still wanted");
    }
}
