//! The shared tier: a Redis or Valkey server that every gateway in front of the same boxes
//! uses, so that a fleet asks the box once per key and a purge reaches every instance.
//!
//! Keys, all under `{key_prefix}:`, each followed by an entry's canonical key
//! ([`CacheKey::canonical`]): `entry:` a hash of the record (`v`), when Redis stored it (`t`,
//! by Redis's own clock) and until when it is fresh (`f`); `lock:` the lease of the instance
//! fetching it from the box, holding its fencing generation; `fence:` the last generation
//! handed out; `fail:` a short marker left by a failed fill. `slots:{account}` is the sorted set
//! of the fleet's box requests in progress. One channel, `{key_prefix}:events`, carries fill
//! and purge notices.
//!
//! Every decision that must be atomic (take the lease, fill only under the newest generation,
//! take a box slot) is one Lua script, and every time is Redis's: the age of an entry never
//! depends on two hosts' clocks agreeing. Every command is bounded by `cache.shared.timeout`
//! and goes through a breaker: after a few failures Redis is skipped, at no cost, until a
//! probe finds it answering again. Nothing here ever fails a request: the callers go on as a
//! single instance would.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedReceiver;

use super::CacheKey;
use super::record::Record;
use super::tier::Found;
use crate::config::SharedTierConfig;
use crate::metrics::TierMetrics;
use crate::upstream::protect::{Admission, Breaker, BreakerState};

mod events;

/// Consecutive failed commands that make the tier skip Redis.
const FAILURES_TO_OPEN: u32 = 3;
/// How long Redis is skipped before one command probes it again.
const COOLDOWN: Duration = Duration::from_secs(2);
/// Keys scanned per `SCAN` round of a purge.
const SCAN_COUNT: usize = 500;
/// How long a fencing counter outlives its last lease: far longer than any lease.
const FENCE_KEEP_MS: u64 = 24 * 3600 * 1000;

/// What taking a key's lease gave.
pub(super) enum Lead {
    /// Another instance filled it meanwhile, and it is fresh.
    Fresh(Found),
    /// Another instance's fill failed moments ago: `(status, message)` of its failure.
    Failed(u16, String),
    /// This instance holds the lease, under this fencing generation: fetch and fill.
    Lease(u64),
    /// Another instance holds it.
    Busy,
}

/// Why a command was not answered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TierError {
    #[error("skipped: the shared tier failed {FAILURES_TO_OPEN} times in a row")]
    Skipped,
    #[error("Redis did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("Redis: {0}")]
    Redis(String),
    /// Redis answered, and refused (an ACL that does not grant the events channel): it is up.
    #[error("Redis refused: {0}")]
    Refused(String),
}

/// One slot of the fleet-wide box cap, held while a box request runs; freed on drop.
pub(super) struct Slot {
    tier: SharedTier,
    account: Arc<str>,
    token: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let (tier, account, token) = (
            self.tier.clone(),
            self.account.clone(),
            std::mem::take(&mut self.token),
        );
        // Freed at once in the background; should Redis not answer, the slot's lease frees it.
        tokio::spawn(async move {
            let key = tier.slots_key(&account);
            let _ = tier
                .call("zrem", async move |mut c: ConnectionManager| {
                    c.zrem::<_, _, ()>(key, token).await
                })
                .await;
        });
    }
}

/// The Redis (or Valkey) tier. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct SharedTier {
    inner: Arc<Inner>,
}

struct Inner {
    manager: ConnectionManager,
    /// This instance's mark on the notices it publishes, so it skips its own.
    origin: String,
    prefix: String,
    timeout: Duration,
    breaker: Mutex<Breaker>,
    metrics: TierMetrics,
    /// Woken by every fill notice, so waiters look again at once.
    filled: Notify,
    scripts: Scripts,
}

struct Scripts {
    read: Script,
    lead: Script,
    fill: Script,
    fail: Script,
    slot: Script,
}

impl std::fmt::Debug for SharedTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: never printed.
        f.debug_struct("SharedTier")
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

/// `{ms since stored, record}` for a stored entry; `{-1, ''}` for none. By Redis's clock.
const READ: &str = r"
local v = redis.call('HMGET', KEYS[1], 'v', 't')
if not v[1] then return {-1, ''} end
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
return {ms - tonumber(v[2]), v[1]}
";

/// Take the lease of a key: `{2, record, ms}` fresh meanwhile, `{3, failure}` a failure
/// marker, `{0}` busy, `{1, generation}` taken. `ARGV[2] == '1'` checks freshness and the
/// failure marker first (a forced refresh does not).
const LEAD: &str = r"
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
if ARGV[2] == '1' then
  local e = redis.call('HMGET', KEYS[1], 'v', 't', 'f')
  if e[1] and tonumber(e[3]) > ms then return {2, e[1], ms - tonumber(e[2])} end
  local failed = redis.call('GET', KEYS[4])
  if failed then return {3, failed, 0} end
end
if redis.call('EXISTS', KEYS[2]) == 1 then return {0, '', 0} end
local gen = redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
redis.call('SET', KEYS[2], gen, 'PX', ARGV[1])
return {1, tostring(gen), 0}
";

/// Store a record under generation `ARGV[1]`, only if no newer lease was handed out since;
/// release the lease and tell the fleet. 1 stored, 0 refused.
const FILL: &str = r"
if tonumber(redis.call('GET', KEYS[3]) or '0') ~= tonumber(ARGV[1]) then return 0 end
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', ARGV[2], 't', ms, 'f', ms + tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('DEL', KEYS[4])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
";

/// Leave a failure marker for `ARGV[3]` ms under generation `ARGV[1]`, release the lease and
/// tell the fleet. 1 left, 0 refused (a newer lease holder decides).
const FAIL: &str = r"
if tonumber(redis.call('GET', KEYS[3]) or '0') ~= tonumber(ARGV[1]) then return 0 end
if tonumber(ARGV[3]) > 0 then redis.call('SET', KEYS[4], ARGV[2], 'PX', ARGV[3]) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
";

/// Take one of `ARGV[1]` box slots for `ARGV[2]` ms as member `ARGV[3]`; slots whose lease
/// ran out are freed first. 1 taken, 0 all busy.
const SLOT: &str = r"
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl SharedTier {
    /// A tier for `config`. It never connects here: the first command does, so the gateway
    /// starts whether Redis is up or not. Fails only on a URL or CA the client cannot use.
    pub fn open(
        config: &SharedTierConfig,
        metrics: TierMetrics,
    ) -> Result<(Self, UnboundedReceiver<String>), String> {
        let url = config.url.expose();
        let client = if config.ca_pem.is_some() || url.starts_with("rediss://") {
            redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: config.ca_pem.clone(),
                },
            )
        } else {
            redis::Client::open(url)
        }
        .map_err(|e| {
            format!(
                "{}: the Redis client cannot use it ({})",
                config.url_origin,
                e.category()
            )
        })?;
        let manager = ConnectionManager::new_lazy_with_config(
            client.clone(),
            redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(config.timeout.max(Duration::from_millis(500))))
                .set_response_timeout(Some(config.timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(1)),
        )
        .map_err(|e| format!("{}: {}", config.url_origin, e.category()))?;
        metrics.up.set(1);
        let tier = Self {
            inner: Arc::new(Inner {
                manager,
                origin: format!("@{}-{:x}", std::process::id(), random()),
                prefix: config.key_prefix.clone(),
                timeout: config.timeout,
                breaker: Mutex::new(Breaker::new(FAILURES_TO_OPEN, COOLDOWN)),
                metrics,
                filled: Notify::new(),
                scripts: Scripts {
                    read: Script::new(READ),
                    lead: Script::new(LEAD),
                    fill: Script::new(FILL),
                    fail: Script::new(FAIL),
                    slot: Script::new(SLOT),
                },
            }),
        };
        let (notices, receiver) = tokio::sync::mpsc::unbounded_channel();
        tier.listen(client, notices);
        Ok((tier, receiver))
    }

    fn key(&self, kind: &str, key: &CacheKey) -> String {
        format!("{}:{kind}:{}", self.inner.prefix, key.canonical())
    }

    /// What the lease scripts read and write for `key`, as their `KEYS[1..4]`: the entry,
    /// the lock, the fencing counter and the failure marker.
    fn lease_keys(&self, key: &CacheKey) -> [String; 4] {
        ["entry", "lock", "fence", "fail"].map(|kind| self.key(kind, key))
    }

    fn slots_key(&self, account: &str) -> String {
        format!("{}:slots:{account}", self.inner.prefix)
    }

    fn channel(&self) -> String {
        format!("{}:events", self.inner.prefix)
    }

    pub fn metrics(&self) -> &TierMetrics {
        &self.inner.metrics
    }

    /// Whether Redis answers: its breaker is closed. Reported as the tier's state.
    pub fn is_up(&self) -> bool {
        self.breaker_state() == BreakerState::Closed
    }

    /// Whether Redis is skipped now: its breaker is open (half-open lets one probe through).
    pub fn is_skipped(&self) -> bool {
        self.breaker_state() == BreakerState::Open
    }

    fn breaker_state(&self) -> BreakerState {
        self.lock_breaker().state(Instant::now())
    }

    /// One command, bounded by the timeout, through the breaker, timed and counted.
    async fn call<T, F, Fut>(&self, what: &'static str, command: F) -> Result<T, TierError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let result = self
            .admitted(what, async {
                let started = Instant::now();
                let command = command(self.inner.manager.clone());
                let bounded = tokio::time::timeout(self.inner.timeout, command).await;
                let result = outcome(bounded, self.inner.timeout);
                self.inner
                    .metrics
                    .command_seconds
                    .observe(started.elapsed().as_secs_f64());
                result
            })
            .await;
        if let Err(TierError::Skipped) = result {
            self.inner.metrics.errors.inc();
        }
        result
    }

    /// Record what a command admitted with `admission` gave: in the breaker, the `up` gauge,
    /// the error count and, when the tier goes down or comes back, the log (once each way: a
    /// failed probe keeps it down without another warning).
    fn settle<T>(&self, what: &'static str, admission: Admission, result: &Result<T, TierError>) {
        let was_up = self.is_up();
        let answered = matches!(result, Ok(_) | Err(TierError::Refused(_)));
        self.lock_breaker()
            .record(admission, answered, Instant::now());
        let up = self.is_up();
        self.inner.metrics.up.set(i64::from(up));
        if let Err(error) = result {
            self.inner.metrics.errors.inc();
            tracing::debug!(command = what, error = %error, "shared tier command failed");
        }
        match (was_up, up) {
            (true, false) => tracing::warn!(
                error = %result.as_ref().err().map(ToString::to_string).unwrap_or_default(),
                "shared tier (Redis) is failing: skipped for now, each gateway serves from its own memory and asks the box itself; it is probed again every {}",
                humantime::format_duration(COOLDOWN)
            ),
            (false, true) => tracing::info!("shared tier (Redis) answers again: sharing resumed"),
            _ => {}
        }
    }

    fn lock_breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.inner.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The record stored for `key`, if any.
    pub(super) async fn read(&self, key: &CacheKey) -> Result<Option<Found>, TierError> {
        let entry = self.key("entry", key);
        let script = &self.inner.scripts.read;
        let (elapsed, bytes): (i64, Vec<u8>) = self
            .call("read", async move |mut c: ConnectionManager| {
                script.key(entry).invoke_async(&mut c).await
            })
            .await?;
        Ok((elapsed >= 0).then(|| Found {
            bytes,
            elapsed: Duration::from_millis(elapsed.unsigned_abs()),
        }))
    }

    /// Take `key`'s lease for `lease`, unless (with `check`) it is fresh or failed meanwhile.
    pub(super) async fn lead(
        &self,
        key: &CacheKey,
        lease: Duration,
        check: bool,
    ) -> Result<Lead, TierError> {
        let keys = self.lease_keys(key);
        let script = &self.inner.scripts.lead;
        let (code, value, elapsed): (i64, Vec<u8>, i64) = self
            .call("lead", async move |mut c: ConnectionManager| {
                script
                    .key(&keys[..])
                    .arg(millis(lease))
                    .arg(if check { "1" } else { "0" })
                    .arg(FENCE_KEEP_MS)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        let text = || String::from_utf8_lossy(&value).into_owned();
        Ok(match code {
            1 => Lead::Lease(text().parse().unwrap_or(0)),
            2 => Lead::Fresh(Found {
                elapsed: Duration::from_millis(elapsed.unsigned_abs()),
                bytes: value.clone(),
            }),
            3 => {
                let failure = text();
                let (status, message) = failure.split_once(' ').unwrap_or(("502", &failure));
                Lead::Failed(status.parse().unwrap_or(502), message.to_owned())
            }
            _ => Lead::Busy,
        })
    }

    /// Store `record` under the lease of `generation`. `Ok(false)`: a newer lease holder took
    /// the key over, and this fill was refused.
    pub(super) async fn fill(
        &self,
        key: &CacheKey,
        generation: u64,
        record: &Record,
    ) -> Result<bool, TierError> {
        let keys = self.lease_keys(key);
        let (channel, notice) = (self.channel(), format!("filled {}", key.canonical()));
        let script = &self.inner.scripts.fill;
        let stored: i64 = self
            .call("fill", async move |mut c: ConnectionManager| {
                script
                    .key(&keys[..])
                    .arg(generation)
                    .arg(&record.bytes[..])
                    .arg(millis(record.fresh_for))
                    .arg(millis(record.keep_for))
                    .arg(channel)
                    .arg(notice)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        self.count_fill(stored == 1);
        Ok(stored == 1)
    }

    /// Record that the fill under `generation` failed with `(status, message)`, for
    /// `backoff`, and release the lease.
    pub(super) async fn fail(
        &self,
        key: &CacheKey,
        generation: u64,
        status: u16,
        message: &str,
        backoff: Duration,
    ) -> Result<bool, TierError> {
        let keys = self.lease_keys(key);
        let failure = format!("{status} {message}");
        let (channel, notice) = (self.channel(), format!("filled {}", key.canonical()));
        let backoff = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX);
        let script = &self.inner.scripts.fail;
        let left: i64 = self
            .call("fail", async move |mut c: ConnectionManager| {
                script
                    .key(&keys[..])
                    .arg(generation)
                    .arg(failure)
                    .arg(backoff)
                    .arg(channel)
                    .arg(notice)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        if left != 1 {
            self.refused();
        }
        Ok(left == 1)
    }

    fn count_fill(&self, stored: bool) {
        match stored {
            true => {
                self.inner.metrics.stores.inc();
            }
            false => self.refused(),
        }
    }

    /// A fill or failure marker refused: its lease had run out and a newer holder decides.
    fn refused(&self) {
        self.inner.metrics.fills_rejected.inc();
        tracing::warn!(
            "a fill was refused: its lease had run out and another gateway had taken the key over (the newer holder's answer stands)"
        );
    }

    /// Wait until another instance reports a fill, or `at_most` (a jittered poll interval).
    pub(super) async fn wait_for_fill(&self, at_most: Duration) {
        let _ = tokio::time::timeout(at_most, self.inner.filled.notified()).await;
    }

    /// Take one of `cap` box slots of `account` for `lease`. `Ok(None)`: all are busy.
    pub(super) async fn take_slot(
        &self,
        account: &Arc<str>,
        cap: usize,
        lease: Duration,
    ) -> Result<Option<Slot>, TierError> {
        let token = format!("{}-{:x}", std::process::id(), random());
        let key = self.slots_key(account);
        let script = &self.inner.scripts.slot;
        let member = token.clone();
        let taken: i64 = self
            .call("slot", async move |mut c: ConnectionManager| {
                script
                    .key(key)
                    .arg(cap)
                    .arg(millis(lease))
                    .arg(member)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok((taken == 1).then(|| Slot {
            tier: self.clone(),
            account: account.clone(),
            token,
        }))
    }

    /// Delete the entries (and failure markers) whose canonical keys match one of `patterns`
    /// (glob patterns, escaped), and tell the fleet with `notice`. How many entries went.
    pub(super) async fn purge(
        &self,
        patterns: &[String],
        notice: &str,
    ) -> Result<usize, TierError> {
        let mut removed = 0;
        for kind in ["entry", "fail"] {
            for pattern in patterns {
                let pattern = format!("{}:{kind}:{pattern}", self.inner.prefix);
                let mut cursor: u64 = 0;
                loop {
                    let pattern = pattern.clone();
                    let (next, keys): (u64, Vec<String>) = self
                        .call("scan", async move |mut c: ConnectionManager| {
                            redis::cmd("SCAN")
                                .arg(cursor)
                                .arg("MATCH")
                                .arg(pattern)
                                .arg("COUNT")
                                .arg(SCAN_COUNT)
                                .query_async(&mut c)
                                .await
                        })
                        .await?;
                    if !keys.is_empty() {
                        let count = keys.len();
                        self.call("unlink", async move |mut c: ConnectionManager| {
                            c.unlink::<_, ()>(keys).await
                        })
                        .await?;
                        if kind == "entry" {
                            removed += count;
                        }
                    }
                    cursor = next;
                    if cursor == 0 {
                        break;
                    }
                }
            }
        }
        self.publish(notice).await?;
        Ok(removed)
    }

    /// Tell every instance `notice` (a purge of their memory copies).
    pub(super) async fn publish(&self, notice: &str) -> Result<(), TierError> {
        let (channel, notice) = (self.channel(), format!("{notice} {}", self.inner.origin));
        self.call("publish", async move |mut c: ConnectionManager| {
            c.publish::<_, _, ()>(channel, notice).await
        })
        .await
    }

    /// `attempt`, made and settled through the breaker like a command if the breaker admits
    /// one now (as its probe when half-open); not made while Redis is skipped.
    async fn admitted<T>(
        &self,
        what: &'static str,
        attempt: impl Future<Output = Result<T, TierError>>,
    ) -> Result<T, TierError> {
        let admission = self.lock_breaker().admit(Instant::now());
        if let Admission::Rejected { .. } = admission {
            return Err(TierError::Skipped);
        }
        // A probe dropped half-way decides nothing: the next attempt probes again.
        let mut probe = ProbeGuard {
            tier: self,
            admission: Some(admission),
        };
        let result = attempt.await;
        let admission = probe.admission.take().unwrap_or(Admission::Allowed);
        self.settle(what, admission, &result);
        result
    }
}

/// What a Redis call bounded by `timeout` gave, as the tier counts it.
fn outcome<T>(
    bounded: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    timeout: Duration,
) -> Result<T, TierError> {
    match bounded {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(TierError::Redis(describe(&error))),
        Err(_) => Err(TierError::Timeout(timeout)),
    }
}

/// A Redis error for the log, without anything of the URL: its category and detail, or for
/// an I/O error the system's own words ("Connection refused (os error 111)").
fn describe(error: &redis::RedisError) -> String {
    // A server error redis-rs has no category for goes by its code (NOPERM).
    let category = match error.category() {
        "" => error.code().unwrap_or("error"),
        category => category,
    };
    match error.detail() {
        Some(detail) => format!("{category} ({detail})"),
        None if error.is_io_error() => format!("{category} ({error})"),
        None => category.to_owned(),
    }
}

/// A breaker probe in progress: dropped before its command finished, it lets another probe.
struct ProbeGuard<'a> {
    tier: &'a SharedTier,
    admission: Option<Admission>,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if let Some(admission) = self.admission.take() {
            self.tier.lock_breaker().abandon(admission);
        }
    }
}

/// A number unlikely to repeat: slot tokens only need to differ between holders.
pub(super) fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}
