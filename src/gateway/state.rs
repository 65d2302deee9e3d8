//! What a request needs and a reload replaces: the accounts with their clients and protection,
//! the TLS acceptor and the rate limiter of one configuration generation, and [`AppState`],
//! which holds the generation in force, the cache and the metrics.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use super::status::{RecentErrors, Samples};
use crate::cache::{FetchTerms, ResponseCache};
use crate::clock::Clock;
use crate::config::{AccountConfig, Config};
use crate::limit::RateLimiter;
use crate::metrics::{AccountMetrics, Metrics};
use crate::tls;
use crate::upstream::protect::Protection;
use crate::upstream::{self, UpstreamClient};

/// One configured account, ready to serve.
#[derive(Debug, Clone)]
pub struct Account {
    pub(crate) name: Arc<str>,
    pub(crate) client: UpstreamClient,
    pub(crate) metrics: AccountMetrics,
    /// Concurrency limit and circuit breaker for this account's box.
    pub(crate) protection: Arc<Protection>,
    /// Audio downloads in progress, at most `upstream.max_audio_streams`.
    pub(crate) audio_streams: Arc<Semaphore>,
    /// The settings the client was built from, to tell on reload whether it can be kept.
    pub(super) settings: AccountConfig,
    /// The last few box errors, for the status page.
    pub(super) errors: Arc<RecentErrors>,
}

impl Account {
    /// What the fleet's one box request per key is bound by for this account: a lease as long
    /// as the longest a fetch can take (see `fetch::BoxRequest::send`) plus a margin, and the
    /// box's cap and queue wait.
    pub(crate) fn fetch_terms(&self) -> FetchTerms {
        let upstream = &self.settings.upstream;
        FetchTerms {
            lease: upstream.timeout * 2 + upstream.queue_timeout + Duration::from_secs(2),
            box_slots: upstream.max_concurrent_requests,
            queue_timeout: upstream.queue_timeout,
        }
    }
}

/// What a reload can replace: the configuration, the accounts' clients and the TLS acceptor.
pub struct Generation {
    pub config: Config,
    /// Looked up by the name in every request's path. With foldhash: SipHash's resistance to
    /// chosen collisions protects a table that grows from input, and this one is the
    /// configuration's.
    pub(crate) accounts: HashMap<String, Account, foldhash::fast::RandomState>,
    /// Set when `server.tls` is configured: new public connections are TLS.
    pub(crate) tls: Option<TlsAcceptor>,
    /// Set when `server.rate_limit` is configured; kept across reloads that do not change it.
    pub(crate) limiter: Option<Arc<RateLimiter>>,
}

impl Generation {
    /// Build a generation for `config`, reusing `previous`'s client for every unchanged account.
    fn build(
        config: Config,
        previous: Option<&Generation>,
        metrics: &Metrics,
        clock: &Arc<dyn Clock>,
    ) -> Result<Self, StateError> {
        let mut accounts = HashMap::default();
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
                    errors: Arc::default(),
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
    pub(super) generation: ArcSwap<Generation>,
    pub(crate) cache: ResponseCache,
    pub(crate) metrics: Metrics,
    pub(super) clock: Arc<dyn Clock>,
    ready: AtomicBool,
    /// The configuration the process started with: settings bound at start-up keep these
    /// values until a restart, whatever later reloads read.
    started: Config,
    /// Reloads run one at a time.
    reloading: tokio::sync::Mutex<()>,
    /// When the state was built: the status page's uptime.
    pub(super) started_at: std::time::Instant,
    /// The status page's recent counters.
    pub(super) samples: Samples,
    /// The audio store (`[cache.audio]`), once opened.
    pub(super) audio: std::sync::OnceLock<crate::audio::AudioStore>,
}

impl AppState {
    /// Build the clients, cache and metrics for a validated configuration.
    pub fn new(config: Config, clock: Arc<dyn Clock>) -> Result<Self, StateError> {
        let metrics = Metrics::new();
        metrics.set_cache_max_bytes(config.cache.max_bytes);
        let cache = ResponseCache::new(config.cache.clone(), clock.clone(), &metrics);
        let started = config.clone();
        let generation = Generation::build(config, None, &metrics, &clock)?;
        Ok(Self {
            started,
            generation: ArcSwap::from_pointee(generation),
            cache,
            metrics,
            clock,
            ready: AtomicBool::new(false),
            reloading: tokio::sync::Mutex::new(()),
            started_at: std::time::Instant::now(),
            samples: Samples::default(),
            audio: std::sync::OnceLock::new(),
        })
    }

    /// The configuration, accounts and TLS acceptor in force now.
    pub fn generation(&self) -> Arc<Generation> {
        self.generation.load_full()
    }

    /// Switch to `config`, or keep everything as it is if any part of it cannot be built.
    ///
    /// Unchanged accounts keep their client and their cache entries; changed and removed
    /// accounts lose their entries. Settings bound at start-up (listen addresses, connection
    /// cap, cache size, log format) are reported in [`ReloadReport::restart_required`].
    pub async fn reload(&self, config: Config) -> Result<ReloadReport, StateError> {
        let _one_at_a_time = self.reloading.lock().await;
        let old = self.generation();
        let new = Generation::build(config, Some(&old), &self.metrics, &self.clock)?;
        let report = ReloadReport::compare(&old, &new, &self.started);
        self.cache.set_config(new.config.cache.clone());
        self.generation.store(Arc::new(new));
        for account in report.changed.iter().chain(&report.removed) {
            self.cache.invalidate_account(account);
            if let Some(store) = self.audio.get() {
                store.invalidate_account(Some(account)).await;
            }
        }
        Ok(report)
    }

    /// Sample the status page's counters every few seconds, for as long as `self` lives.
    pub fn keep_sampling(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(super::status::SAMPLE_EVERY);
            loop {
                every.tick().await;
                match weak.upgrade() {
                    Some(state) => state.sample(),
                    None => return,
                }
            }
        });
    }

    /// Open the cache's second tier (the one the process started with), inside the runtime.
    pub async fn open_tier(&self) {
        self.cache
            .open_tier(self.started.cache.tier.as_ref(), &self.metrics)
            .await;
    }

    /// Open the audio store the process started with, if any, inside the runtime.
    pub fn open_audio(&self) {
        let Some(config) = &self.started.cache.audio else {
            return;
        };
        if self.audio.get().is_some() {
            return;
        }
        if let Some(store) = crate::audio::AudioStore::open(config, self.metrics.audio.store()) {
            let _ = self.audio.set(store);
        }
    }

    /// Wait until the audio store's index has settled (evictions done), if there is one.
    pub async fn sync_audio(&self) {
        if let Some(store) = self.audio.get() {
            store.sync().await;
        }
    }

    /// Requests waiting for a box fetch now, leaders and collapsed waiters alike: what tests
    /// and the status page watch to know a miss is under way.
    pub fn waiting(&self) -> usize {
        self.cache.waiting()
    }

    /// Box fetches in flight now, background refreshes included.
    pub fn fetches_in_flight(&self) -> usize {
        self.cache.fetches_in_flight()
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
    fn compare(old: &Generation, new: &Generation, started: &Config) -> Self {
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
            (
                "server.transparent_huge_pages",
                a.server.transparent_huge_pages != b.server.transparent_huge_pages,
            ),
            ("admin.listen", a.admin.listen != b.admin.listen),
            ("cache.max_bytes", a.cache.max_bytes != b.cache.max_bytes),
            ("cache.shared / cache.disk", a.cache.tier != b.cache.tier),
            ("cache.audio", a.cache.audio != b.cache.audio),
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
