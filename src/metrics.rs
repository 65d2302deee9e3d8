//! Prometheus metrics, exposed in the text format on the admin listener's `/metrics`.
//!
//! Per-account series are resolved once into an [`AccountMetrics`] when the account is set up,
//! so the hit path only bumps an atomic and never allocates a label set.

mod audio;
pub mod exposition;
mod process;

use std::fmt::Write as _;
use std::sync::OnceLock;

use http::StatusCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

pub use self::audio::{AccountAudio, AudioMetrics, AudioStoreMetrics};
use crate::upstream::ListFetch;
use crate::upstream::protect::ProtectionMetrics;

/// Upper bounds (seconds) of the upstream latency histogram: a list on a long history can take
/// tens of seconds, while a box on the local network answers a short list or a `404` in well
/// under a millisecond, which the lowest bounds keep apart from a box that has started to slow.
const UPSTREAM_BUCKETS: [f64; 18] = [
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    20.0, 30.0, 60.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountLabels {
    account: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    account: String,
    /// The box's status code, or `timeout` / `connect_error` / `transport_error` / `aborted`.
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    account: String,
    /// `revalidate` (within stale_while_revalidate) or `error` (the box failed).
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FetchLabels {
    account: String,
    /// `full`, `delta` or `filtered` (see [`ListFetch`]).
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    /// The access log's `cache` value: `hit`, `miss`, `collapsed`, `stale-revalidating`,
    /// `stale-error`, `backoff` or `none`.
    cache: &'static str,
}

/// The `cache` values of the request duration histogram, resolved up front.
pub const CACHE_VALUES: [&str; 7] = [
    "hit",
    "miss",
    "collapsed",
    "stale-revalidating",
    "stale-error",
    "backoff",
    "none",
];

/// Upper bounds (seconds) of the client request histogram: a hit takes well under a
/// millisecond, a miss as long as the box.
const REQUEST_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
];

fn request_histogram() -> Histogram {
    Histogram::new(REQUEST_BUCKETS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabels {
    /// `shared` (Redis or Valkey) or `disk`.
    tier: &'static str,
}

/// Upper bounds (seconds) of the second tier's command latency: a Redis round trip on a LAN
/// is well under a millisecond; the default command timeout is 100 ms.
const TIER_BUCKETS: [f64; 10] = [
    0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
];

fn tier_histogram() -> Histogram {
    Histogram::new(TIER_BUCKETS)
}

/// The second tier's series (see `cache::tier`).
#[derive(Clone, Debug)]
pub struct TierMetrics {
    /// 1 while the tier answers, 0 while it is skipped (down, slow, or its breaker open).
    pub up: Gauge,
    pub hits: Counter,
    pub misses: Counter,
    pub errors: Counter,
    pub stores: Counter,
    /// Fills refused because a newer lease holder had taken the key over.
    pub fills_rejected: Counter,
    pub command_seconds: Histogram,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    /// `expired`, `size` or `explicit`.
    cause: &'static str,
}

/// Counters the cache's eviction listener bumps.
#[derive(Clone, Debug)]
pub struct EvictionCounters {
    pub expired: Counter,
    pub size: Counter,
    pub explicit: Counter,
}

fn upstream_histogram() -> Histogram {
    Histogram::new(UPSTREAM_BUCKETS)
}

/// All metrics of one gateway process.
pub struct Metrics {
    registry: Registry,
    hits: Family<AccountLabels, Counter>,
    misses: Family<AccountLabels, Counter>,
    coalesced: Family<AccountLabels, Counter>,
    upstream_requests: Family<UpstreamLabels, Counter>,
    upstream_duration: Family<AccountLabels, Histogram, fn() -> Histogram>,
    requests: Family<StatusLabels, Counter>,
    /// `requests` resolved per status code on first use, so counting takes no lock.
    requests_by_status: Box<[OnceLock<Counter>]>,
    cache_entries: Gauge,
    cache_bytes: Gauge,
    cache_max_bytes: Gauge,
    stale: Family<ReasonLabels, Counter>,
    refreshes: Family<AccountLabels, Counter>,
    refresh_failures: Family<AccountLabels, Counter>,
    evictions: Family<CauseLabels, Counter>,
    upstream_in_flight: Family<AccountLabels, Gauge>,
    breaker_state: Family<AccountLabels, Gauge>,
    queue_rejections: Family<AccountLabels, Counter>,
    abandoned: Family<AccountLabels, Counter>,
    breaker_rejections: Family<AccountLabels, Counter>,
    list_fetches: Family<FetchLabels, Counter>,
    list_fetch_bytes: Family<FetchLabels, Counter>,
    selections: Family<AccountLabels, Counter>,
    audio_bytes: Family<AccountLabels, Counter>,
    rate_limited: Counter,
    tier_up: Family<TierLabels, Gauge>,
    tier_hits: Family<TierLabels, Counter>,
    tier_misses: Family<TierLabels, Counter>,
    tier_errors: Family<TierLabels, Counter>,
    tier_stores: Family<TierLabels, Counter>,
    tier_fills_rejected: Family<TierLabels, Counter>,
    tier_command_seconds: Family<TierLabels, Histogram, fn() -> Histogram>,
    build_info: Family<BuildLabels, Gauge>,
    request_duration: Family<CacheLabels, Histogram, fn() -> Histogram>,
    /// `request_duration` per [`CACHE_VALUES`], resolved once.
    request_duration_by_cache: Vec<Histogram>,
    pub audio: AudioMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        // The standard process metrics keep their usual names; everything else is prefixed.
        let mut root = Registry::default();
        root.register_collector(Box::new(process::ProcessCollector::new()));
        let registry = root.sub_registry_with_prefix("miralix_gateway");
        let request_duration: Family<CacheLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(request_histogram);
        let request_duration_by_cache = CACHE_VALUES
            .iter()
            .map(|cache| {
                request_duration
                    .get_or_create(&CacheLabels { cache })
                    .clone()
            })
            .collect();
        let metrics = Self {
            hits: Family::default(),
            misses: Family::default(),
            coalesced: Family::default(),
            upstream_requests: Family::default(),
            upstream_duration: Family::new_with_constructor(upstream_histogram),
            requests: Family::default(),
            requests_by_status: (0..1000).map(|_| OnceLock::new()).collect(),
            cache_entries: Gauge::default(),
            cache_bytes: Gauge::default(),
            cache_max_bytes: Gauge::default(),
            stale: Family::default(),
            refreshes: Family::default(),
            refresh_failures: Family::default(),
            evictions: Family::default(),
            upstream_in_flight: Family::default(),
            breaker_state: Family::default(),
            queue_rejections: Family::default(),
            abandoned: Family::default(),
            breaker_rejections: Family::default(),
            list_fetches: Family::default(),
            list_fetch_bytes: Family::default(),
            selections: Family::default(),
            audio_bytes: Family::default(),
            rate_limited: Counter::default(),
            tier_up: Family::default(),
            tier_hits: Family::default(),
            tier_misses: Family::default(),
            tier_errors: Family::default(),
            tier_stores: Family::default(),
            tier_fills_rejected: Family::default(),
            tier_command_seconds: Family::new_with_constructor(tier_histogram),
            build_info: Family::default(),
            request_duration,
            request_duration_by_cache,
            audio: AudioMetrics::default(),
            registry: Registry::default(),
        };
        metrics.audio.register(registry);
        registry.register(
            "cache_hits",
            "Requests answered from a fresh cache entry",
            metrics.hits.clone(),
        );
        registry.register(
            "cache_misses",
            "Requests that led an upstream fetch",
            metrics.misses.clone(),
        );
        registry.register(
            "cache_coalesced",
            "Requests that waited for another request's upstream fetch instead of starting one",
            metrics.coalesced.clone(),
        );
        registry.register(
            "upstream_requests",
            "Requests sent to the Miralix box, by outcome",
            metrics.upstream_requests.clone(),
        );
        registry.register_with_unit(
            "upstream_request_duration",
            "Time until the Miralix box's complete answer (or failure)",
            Unit::Seconds,
            metrics.upstream_duration.clone(),
        );
        registry.register(
            "requests",
            "Responses sent on the public listener, by status",
            metrics.requests.clone(),
        );
        registry.register(
            "cache_entries",
            "Entries currently stored in the cache",
            metrics.cache_entries.clone(),
        );
        registry.register(
            "cache_bytes",
            "Bytes currently held by the cache, as weighed against cache.max_bytes",
            metrics.cache_bytes.clone(),
        );
        registry.register(
            "cache_max_bytes",
            "cache.max_bytes: the bound cache_bytes is held under",
            metrics.cache_max_bytes.clone(),
        );
        registry.register(
            "cache_stale_served",
            "Requests answered from a stale entry, by reason (revalidate, error)",
            metrics.stale.clone(),
        );
        registry.register(
            "cache_refreshes",
            "Background refreshes of stale entries started",
            metrics.refreshes.clone(),
        );
        registry.register(
            "cache_refresh_failures",
            "Background refreshes that failed (the stale entry was kept)",
            metrics.refresh_failures.clone(),
        );
        registry.register(
            "cache_evictions",
            "Entries removed from memory, by cause (expired, size, explicit)",
            metrics.evictions.clone(),
        );
        registry.register(
            "upstream_in_flight",
            "Requests to the Miralix box in progress",
            metrics.upstream_in_flight.clone(),
        );
        registry.register(
            "upstream_breaker_state",
            "Circuit breaker per account: 0 closed, 1 half-open, 2 open",
            metrics.breaker_state.clone(),
        );
        registry.register(
            "upstream_queue_rejections",
            "Fetches refused because max_concurrent_requests stayed busy for queue_timeout",
            metrics.queue_rejections.clone(),
        );
        registry.register(
            "upstream_abandoned",
            "Fetches dropped while they waited for a free slot, because every client waiting for them had gone; they never reached the box",
            metrics.abandoned.clone(),
        );
        registry.register(
            "upstream_breaker_rejections",
            "Fetches refused at once because the circuit breaker was open",
            metrics.breaker_rejections.clone(),
        );
        registry.register(
            "upstream_list_fetches",
            "Lists received from the Miralix box, by kind: full, delta (fromQueueCallId=<highest stored id>), filtered (a client's fromQueueCallId passed on) or other (the agent directory and allowlisted reads)",
            metrics.list_fetches.clone(),
        );
        registry.register_with_unit(
            "upstream_list",
            "Body bytes of the lists received from the Miralix box, by kind",
            Unit::Bytes,
            metrics.list_fetch_bytes.clone(),
        );
        registry.register(
            "cache_selections",
            "Requests with fromQueueCallId answered by selecting from a stored full list",
            metrics.selections.clone(),
        );
        registry.register_with_unit(
            "audio",
            "Audio bytes received from the Miralix box (streamed to clients, or into the audio store)",
            Unit::Bytes,
            metrics.audio_bytes.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests answered 429 by the per-client-address rate limit",
            metrics.rate_limited.clone(),
        );
        registry.register(
            "cache_tier_up",
            "Second cache tier: 1 while it answers, 0 while it is skipped (down, slow or its breaker open)",
            metrics.tier_up.clone(),
        );
        registry.register(
            "cache_tier_hits",
            "Lookups the second tier answered with a servable entry",
            metrics.tier_hits.clone(),
        );
        registry.register(
            "cache_tier_misses",
            "Lookups the second tier had nothing servable for",
            metrics.tier_misses.clone(),
        );
        registry.register(
            "cache_tier_errors",
            "Second-tier commands that failed, timed out or were skipped by its breaker",
            metrics.tier_errors.clone(),
        );
        registry.register(
            "cache_tier_stores",
            "Entries written to the second tier",
            metrics.tier_stores.clone(),
        );
        registry.register(
            "cache_tier_fills_rejected",
            "Fills refused because their lease had expired and another gateway had taken the key over",
            metrics.tier_fills_rejected.clone(),
        );
        registry.register_with_unit(
            "cache_tier_command_duration",
            "Time each second-tier command took",
            Unit::Seconds,
            metrics.tier_command_seconds.clone(),
        );
        metrics
            .build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "build_info",
            "Always 1; the version label is the gateway's version",
            metrics.build_info.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "Time from a request's arrival on the public listener to its answer's head, by how the cache answered it",
            Unit::Seconds,
            metrics.request_duration.clone(),
        );
        Self {
            registry: root,
            ..metrics
        }
    }

    /// The bound `cache_bytes` is held under (`cache.max_bytes`, fixed at start-up).
    pub fn set_cache_max_bytes(&self, max_bytes: u64) {
        self.cache_max_bytes
            .set(i64::try_from(max_bytes).unwrap_or(i64::MAX));
    }

    /// Time one request on the public listener took, by its access log `cache` value.
    pub fn record_request_duration(&self, cache: &str, seconds: f64) {
        if let Some(index) = CACHE_VALUES.iter().position(|c| *c == cache) {
            self.request_duration_by_cache[index].observe(seconds);
        }
    }

    /// The series of the second tier named `tier` (`shared` or `disk`), resolved once.
    pub fn tier(&self, tier: &'static str) -> TierMetrics {
        let labels = TierLabels { tier };
        let up = self.tier_up.get_or_create(&labels).clone();
        let hits = self.tier_hits.get_or_create(&labels).clone();
        let misses = self.tier_misses.get_or_create(&labels).clone();
        let errors = self.tier_errors.get_or_create(&labels).clone();
        let stores = self.tier_stores.get_or_create(&labels).clone();
        let fills_rejected = self.tier_fills_rejected.get_or_create(&labels).clone();
        let command_seconds = self.tier_command_seconds.get_or_create(&labels).clone();
        TierMetrics {
            up,
            hits,
            misses,
            errors,
            stores,
            fills_rejected,
            command_seconds,
        }
    }

    /// The series of one account, resolved once.
    pub fn account(&self, account: &str) -> AccountMetrics {
        let labels = AccountLabels {
            account: account.to_owned(),
        };
        let reason = |reason| ReasonLabels {
            account: account.to_owned(),
            reason,
        };
        // One statement per series: a `get_or_create` guard lives until the end of its
        // statement, and a second one on the same family within it would deadlock.
        let stale_revalidate = self.stale.get_or_create(&reason("revalidate")).clone();
        let stale_error = self.stale.get_or_create(&reason("error")).clone();
        let fetch = |kind: ListFetch| FetchLabels {
            account: account.to_owned(),
            kind: kind.as_str(),
        };
        let kinds = [
            ListFetch::Full,
            ListFetch::Delta,
            ListFetch::Filtered,
            ListFetch::Other,
        ];
        let list_fetches = kinds.map(|kind| self.list_fetches.get_or_create(&fetch(kind)).clone());
        let list_fetch_bytes =
            kinds.map(|kind| self.list_fetch_bytes.get_or_create(&fetch(kind)).clone());
        AccountMetrics {
            account: account.to_owned(),
            hits: self.hits.get_or_create(&labels).clone(),
            misses: self.misses.get_or_create(&labels).clone(),
            coalesced: self.coalesced.get_or_create(&labels).clone(),
            stale_revalidate,
            stale_error,
            refreshes: self.refreshes.get_or_create(&labels).clone(),
            refresh_failures: self.refresh_failures.get_or_create(&labels).clone(),
            upstream_duration: self.upstream_duration.get_or_create(&labels).clone(),
            upstream_requests: self.upstream_requests.clone(),
            list_fetches,
            list_fetch_bytes,
            selections: self.selections.get_or_create(&labels).clone(),
            audio_bytes: self.audio_bytes.get_or_create(&labels).clone(),
            audio: self.audio.account(account),
        }
    }

    /// The series an account's upstream protection keeps current.
    pub fn protection(&self, account: &str) -> ProtectionMetrics {
        let labels = AccountLabels {
            account: account.to_owned(),
        };
        ProtectionMetrics {
            in_flight: self.upstream_in_flight.get_or_create(&labels).clone(),
            breaker_state: self.breaker_state.get_or_create(&labels).clone(),
            queue_rejections: self.queue_rejections.get_or_create(&labels).clone(),
            abandoned: self.abandoned.get_or_create(&labels).clone(),
            breaker_rejections: self.breaker_rejections.get_or_create(&labels).clone(),
        }
    }

    /// The counters the cache's eviction listener bumps.
    pub fn evictions(&self) -> EvictionCounters {
        // One statement per series (see `account`).
        let expired = self
            .evictions
            .get_or_create(&CauseLabels { cause: "expired" })
            .clone();
        let size = self
            .evictions
            .get_or_create(&CauseLabels { cause: "size" })
            .clone();
        let explicit = self
            .evictions
            .get_or_create(&CauseLabels { cause: "explicit" })
            .clone();
        EvictionCounters {
            expired,
            size,
            explicit,
        }
    }

    /// Count one request refused by the rate limit.
    pub fn record_rate_limited(&self) {
        self.rate_limited.inc();
    }

    /// Count one response sent on the public listener.
    pub fn record_response(&self, status: StatusCode) {
        let code = status.as_u16();
        // `StatusCode` is always 100..=999, so the slot exists.
        self.requests_by_status[usize::from(code)]
            .get_or_init(|| {
                self.requests
                    .get_or_create(&StatusLabels { status: code })
                    .clone()
            })
            .inc();
    }

    /// The exposition, OpenMetrics or classic 0.0.4 text (see [`exposition`]), with the
    /// cache gauges set to the given values first.
    pub fn render(&self, cache_entries: u64, cache_bytes: u64, openmetrics: bool) -> String {
        self.cache_entries
            .set(i64::try_from(cache_entries).unwrap_or(i64::MAX));
        self.cache_bytes
            .set(i64::try_from(cache_bytes).unwrap_or(i64::MAX));
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            // Encoding into a String cannot fail; say so in the output rather than panic.
            let _ = writeln!(text, "# metrics encoding failed");
        }
        match openmetrics {
            true => text,
            false => exposition::to_text_004(&text),
        }
    }
}

/// Handles to one account's series.
#[derive(Clone, Debug)]
pub struct AccountMetrics {
    account: String,
    pub hits: Counter,
    pub misses: Counter,
    pub coalesced: Counter,
    pub stale_revalidate: Counter,
    pub stale_error: Counter,
    pub refreshes: Counter,
    pub refresh_failures: Counter,
    upstream_duration: Histogram,
    upstream_requests: Family<UpstreamLabels, Counter>,
    /// By [`ListFetch`] in declaration order: full, delta, filtered.
    list_fetches: [Counter; 4],
    list_fetch_bytes: [Counter; 4],
    pub selections: Counter,
    pub audio_bytes: Counter,
    pub audio: AccountAudio,
}

impl AccountMetrics {
    /// Count one recordings list received from the box, and its body bytes.
    pub fn record_list_fetch(&self, kind: ListFetch, bytes: usize) {
        let index = kind as usize;
        self.list_fetches[index].inc();
        self.list_fetch_bytes[index].inc_by(bytes as u64);
    }

    /// Record one upstream request: its outcome label and how long it took.
    pub fn record_upstream(&self, outcome: &str, seconds: f64) {
        self.upstream_duration.observe(seconds);
        self.upstream_requests
            .get_or_create(&UpstreamLabels {
                account: self.account.clone(),
                status: outcome.to_owned(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_box_answering_in_a_fraction_of_a_millisecond_is_told_apart_from_a_slow_one() {
        let metrics = Metrics::new();
        let greenbox = metrics.account("greenbox");
        greenbox.record_upstream("200", 0.0003);
        greenbox.record_upstream("200", 0.004);
        let text = metrics.render(0, 0, false);
        let bucket = |le: &str| {
            let prefix = format!(
                "miralix_gateway_upstream_request_duration_seconds_bucket{{le=\"{le}\",account=\"greenbox\"}} "
            );
            let line = text.lines().find(|line| line.starts_with(&prefix));
            line.unwrap_or_else(|| panic!("no bucket le={le} in\n{text}"))[prefix.len()..]
                .to_owned()
        };
        assert_eq!(bucket("0.00025"), "0");
        assert_eq!(bucket("0.0005"), "1");
        assert_eq!(bucket("0.0025"), "1");
        assert_eq!(bucket("0.005"), "2");
    }

    #[test]
    fn exposition_names_match_the_documented_ones() {
        let metrics = Metrics::new();
        let greenbox = metrics.account("greenbox");
        greenbox.hits.inc();
        greenbox.misses.inc();
        greenbox.record_upstream("200", 0.02);
        metrics.record_response(StatusCode::OK);
        metrics.record_request_duration("hit", 0.0002);
        let text = metrics.render(3, 4096, false);
        for line in [
            "miralix_gateway_cache_hits_total{account=\"greenbox\"} 1",
            "miralix_gateway_cache_misses_total{account=\"greenbox\"} 1",
            "miralix_gateway_cache_coalesced_total{account=\"greenbox\"} 0",
            "miralix_gateway_upstream_requests_total{account=\"greenbox\",status=\"200\"} 1",
            "miralix_gateway_upstream_request_duration_seconds_count{account=\"greenbox\"} 1",
            "miralix_gateway_requests_total{status=\"200\"} 1",
            "miralix_gateway_cache_entries 3",
            "miralix_gateway_cache_bytes 4096",
            "# TYPE miralix_gateway_cache_hits_total counter",
            "miralix_gateway_build_info{version=\"",
            "miralix_gateway_request_duration_seconds_count{cache=\"hit\"} 1",
            "# TYPE process_cpu_seconds_total counter",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "0.0.4 text"
        );
        let openmetrics = metrics.render(3, 4096, true);
        assert!(
            openmetrics.ends_with("# EOF\n"),
            "OpenMetrics ends in # EOF"
        );
        assert!(openmetrics.contains("# TYPE miralix_gateway_cache_hits counter"));
    }
}
