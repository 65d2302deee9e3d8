//! The second tier behind memory, and how the cache uses it: a memory miss looks there before
//! anything else (one look per key at a time), a fill from the box is written there, and a
//! purge reaches it. With the shared tier, the one fetch per key of each instance also takes
//! the key's lease in Redis, so that the fleet asks the box once.
//!
//! What comes from the tier is decoded into the same [`CachedResponse`] a fetch makes
//! ([`super::record`]), and put in memory before the freshness rules look at it: fresh, stale
//! and delta-refresh behave exactly as for an entry that never left memory. Any failure of the
//! tier is a miss of the tier, never a failed request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedReceiver;

use super::disk::DiskTier;
use super::flight::Joined;
use super::shared::{Lead, SharedTier};
use super::{CacheKey, CachedResponse, Fetched, ResponseCache, completion, record};
use crate::config::TierConfig;
use crate::metrics::{Metrics, TierMetrics};
use crate::upstream::UpstreamError;

/// What a lookup found in the tier: the record and how long ago it was stored.
pub(super) struct Found {
    pub(super) bytes: Vec<u8>,
    pub(super) elapsed: Duration,
}

/// The configured second tier.
#[derive(Clone, Debug)]
pub enum Tier {
    Shared(SharedTier),
    Disk(DiskTier),
}

/// What the fleet's one box request per key is bound by: how long a lease lasts (the longest
/// a fetch can take), and the account's box cap and queue wait.
#[derive(Debug, Clone, Copy)]
pub struct FetchTerms {
    pub lease: Duration,
    pub box_slots: usize,
    pub queue_timeout: Duration,
}

impl Default for FetchTerms {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(65),
            box_slots: 8,
            queue_timeout: Duration::from_secs(5),
        }
    }
}

/// What a purge removes, as canonical keys ([`CacheKey::canonical`]) see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    Account(String),
    /// A subject's full list and its `fromQueueCallId` entries (the directory: every
    /// `state`'s): the subject's canonical prefix (see [`super::CacheKey::subject_prefix`]).
    Subject(String),
    /// Only a subject's `fromQueueCallId` entries.
    Filtered(String),
    /// One key.
    Exact(String),
}

impl Scope {
    pub fn matches(&self, canonical: &str) -> bool {
        let filtered = |agent: &str| {
            canonical
                .strip_prefix(agent)
                .is_some_and(|rest| rest.starts_with("?from="))
        };
        match self {
            Scope::All => true,
            Scope::Account(account) => canonical
                .strip_prefix(account.as_str())
                .is_some_and(|rest| rest.starts_with('/')),
            Scope::Subject(prefix) => {
                canonical == prefix
                    || filtered(prefix)
                    || canonical
                        .strip_prefix(prefix.as_str())
                        .is_some_and(|rest| rest.starts_with('/'))
            }
            Scope::Filtered(agent) => filtered(agent),
            Scope::Exact(key) => canonical == key,
        }
    }

    /// The fleet notice for this purge (`purge <kind> <prefix>`), parsed back by
    /// [`Scope::from_notice`]. Canonical keys hold no spaces.
    pub fn notice(&self) -> String {
        match self {
            Scope::All => "purge all".to_owned(),
            Scope::Account(a) => format!("purge account {a}"),
            // "agent", the word instances of every version read.
            Scope::Subject(a) => format!("purge agent {a}"),
            Scope::Filtered(a) => format!("purge filtered {a}"),
            Scope::Exact(a) => format!("purge key {a}"),
        }
    }

    pub fn from_notice(notice: &str) -> Option<Self> {
        let rest = notice.strip_prefix("purge ")?;
        let (kind, text) = rest.split_once(' ').unwrap_or((rest, ""));
        Some(match kind {
            "all" => Scope::All,
            "account" => Scope::Account(text.to_owned()),
            "agent" => Scope::Subject(text.to_owned()),
            "filtered" => Scope::Filtered(text.to_owned()),
            "key" => Scope::Exact(text.to_owned()),
            _ => return None,
        })
    }

    /// Redis `SCAN MATCH` patterns (after the key kind's prefix) covering this scope; the
    /// exact agent key is matched by a pattern without wildcards.
    pub(super) fn patterns(&self) -> Vec<String> {
        let escape = |text: &str| {
            let mut escaped = String::with_capacity(text.len());
            for c in text.chars() {
                if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                    escaped.push('\\');
                }
                escaped.push(c);
            }
            escaped
        };
        match self {
            Scope::All => vec!["*".to_owned()],
            Scope::Account(a) => vec![format!("{}/*", escape(a))],
            Scope::Subject(a) => vec![
                escape(a),
                format!("{}\\?from=*", escape(a)),
                format!("{}/*", escape(a)),
            ],
            Scope::Filtered(a) => vec![format!("{}\\?from=*", escape(a))],
            Scope::Exact(a) => vec![escape(a)],
        }
    }
}

impl Tier {
    /// The tier `config` names, if any, and the fleet's purge notices when it is shared.
    /// Never fails: a tier that cannot be used is reported and left out.
    pub async fn open(
        config: Option<&TierConfig>,
        metrics: &Metrics,
    ) -> (Option<Self>, Option<UnboundedReceiver<String>>) {
        match config {
            None => (None, None),
            Some(TierConfig::Shared(shared)) => {
                match SharedTier::open(shared, metrics.tier("shared")) {
                    Ok((tier, notices)) => (Some(Tier::Shared(tier)), Some(notices)),
                    Err(error) => {
                        tracing::warn!(error = %error, "the shared tier cannot be used: running without it");
                        (None, None)
                    }
                }
            }
            Some(TierConfig::Disk(disk)) => (
                DiskTier::open(disk, metrics.tier("disk"))
                    .await
                    .map(Tier::Disk),
                None,
            ),
        }
    }

    /// `shared` or `disk`: the `detail` of `Cache-Status` and the access log's `tier`.
    pub fn name(&self) -> &'static str {
        match self {
            Tier::Shared(_) => "shared",
            Tier::Disk(_) => "disk",
        }
    }

    fn metrics(&self) -> &TierMetrics {
        match self {
            Tier::Shared(shared) => shared.metrics(),
            Tier::Disk(disk) => disk.metrics(),
        }
    }

    /// `up`, or `down` while Redis is skipped or the disk tier's writes fail.
    pub fn state(&self) -> &'static str {
        match self {
            Tier::Shared(shared) if !shared.is_up() => "down",
            Tier::Disk(disk) if !disk.is_up() => "down",
            _ => "up",
        }
    }

    async fn read(&self, key: &CacheKey) -> Option<Found> {
        match self {
            Tier::Shared(shared) => shared.read(key).await.ok().flatten(),
            Tier::Disk(disk) => disk.read(key.canonical()).await,
        }
    }

    /// Wait until every queued write is stored (the disk tier; the shared tier writes at once).
    pub async fn flush(&self) {
        if let Tier::Disk(disk) = self {
            disk.flush().await;
        }
    }
}

/// Where the one fetch of a key got its answer.
pub(super) enum Filled {
    /// The box's answer (or failure): store it, and fill the shared tier (or leave it a
    /// failure marker) under this lease generation.
    Box(Result<Fetched, UpstreamError>, Option<u64>),
    /// Another instance filled the shared tier meanwhile.
    Tier(Arc<CachedResponse>),
}

/// A poll interval between 20 and 60 ms, so that waiting instances do not ask in step.
fn jittered() -> Duration {
    Duration::from_millis(20 + super::shared::random() % 41)
}

impl ResponseCache {
    /// The entry the tier holds for `key`, put in memory; one look per key at a time.
    pub(super) async fn promote(&self, key: &CacheKey) -> Option<Arc<CachedResponse>> {
        let tier = self.tier.get()?;
        match self.loads.join_or_lead(key) {
            Joined::Follower(mut receiver) => completion(&mut receiver).await.ok(),
            Joined::Leader(flight, _receiver) => {
                let entry = match tier.read(key).await {
                    Some(found) => self.decode(tier, key, found).await,
                    None => None,
                };
                match &entry {
                    Some(entry) => {
                        tier.metrics().hits.inc();
                        // Heavier than this instance keeps (written by a peer allowed more,
                        // or before its compressed copy was made): served, not kept.
                        let limit = self.config.load().max_entry_bytes;
                        if u64::from(super::weight::entry(key, entry)) <= limit {
                            self.store.insert(key.clone(), entry.clone()).await;
                        }
                    }
                    None => {
                        tier.metrics().misses.inc();
                    }
                }
                flight.land(entry.clone().ok_or(UpstreamError::Aborted));
                entry
            }
        }
    }

    /// A record read back as an entry; `None` (counted, and dropped from the disk) when it
    /// cannot be, or is past use.
    async fn decode(
        &self,
        tier: &Tier,
        key: &CacheKey,
        found: Found,
    ) -> Option<Arc<CachedResponse>> {
        let config = self.config.load_full();
        let now = self.clock.now();
        match record::decode(key, &found.bytes, found.elapsed, &config, now).await {
            Ok(mut entry) => {
                if let Some(entry) = Arc::get_mut(&mut entry) {
                    entry.from_tier = Some(tier.name());
                }
                let lifetime = entry.lifetime?;
                (super::policy::freshness(&lifetime, now) != super::policy::Freshness::Expired
                    || entry.list.is_some())
                .then_some(entry)
            }
            Err(error) => {
                tier.metrics().errors.inc();
                tracing::warn!(tier = tier.name(), key = %key.canonical(), error = %error, "a stored record could not be read back; it is ignored");
                if let Tier::Disk(disk) = tier {
                    disk.remove_matching(Scope::Exact(key.canonical()));
                }
                None
            }
        }
    }

    /// The fetch of `key` for the fleet: with the shared tier up, take the key's lease (or
    /// wait for whoever holds it, or take what they stored); otherwise just `fetch`. An
    /// `Err` is a failure that never reached the box (another instance's, or the fleet's
    /// box cap stayed full).
    pub(super) async fn fill_from_box<Fut>(
        &self,
        key: &CacheKey,
        forced: bool,
        terms: FetchTerms,
        fetch: Fut,
    ) -> Result<Filled, UpstreamError>
    where
        Fut: std::future::Future<Output = Result<Fetched, UpstreamError>>,
    {
        let shared = match self.tier.get() {
            Some(Tier::Shared(shared)) if !shared.is_skipped() => shared,
            _ => return Ok(Filled::Box(fetch.await, None)),
        };
        // Past the lease (plus a margin), whoever held it is gone: stop waiting.
        let give_up = Instant::now() + terms.lease + Duration::from_secs(1);
        let generation = loop {
            match shared.lead(key, terms.lease, !forced).await {
                Err(_) => return Ok(Filled::Box(fetch.await, None)),
                Ok(Lead::Lease(generation)) => break generation,
                Ok(Lead::Fresh(found)) => {
                    let tier = Tier::Shared(shared.clone());
                    return Ok(match self.decode(&tier, key, found).await {
                        Some(entry) => {
                            shared.metrics().hits.inc();
                            Filled::Tier(entry)
                        }
                        // A record that cannot be read back (another version's, damaged):
                        // asking again would find the same one, so the box is asked.
                        None => Filled::Box(fetch.await, None),
                    });
                }
                Ok(Lead::Failed(status, message)) => {
                    return Err(UpstreamError::FailedElsewhere {
                        status,
                        message: message.into(),
                    });
                }
                Ok(Lead::Busy) if Instant::now() >= give_up => {
                    return Ok(Filled::Box(fetch.await, None));
                }
                Ok(Lead::Busy) => shared.wait_for_fill(jittered()).await,
            }
        };
        // The fleet's box cap: a slot in Redis, or this instance's own cap when Redis fails.
        let account = key.account.clone();
        let queued_until = Instant::now() + terms.queue_timeout;
        let _slot = loop {
            match shared
                .take_slot(&account, terms.box_slots, terms.lease)
                .await
            {
                Ok(Some(slot)) => break Some(slot),
                Err(_) => break None,
                Ok(None) if Instant::now() >= queued_until => {
                    let error = UpstreamError::QueueTimeout(terms.queue_timeout);
                    let _ = shared
                        .fail(key, generation, 503, &error.to_string(), Duration::ZERO)
                        .await;
                    return Err(error);
                }
                Ok(None) => tokio::time::sleep(jittered()).await,
            }
        };
        Ok(Filled::Box(fetch.await, Some(generation)))
    }

    /// After a fetch: write a stored entry to the tier (under the lease it was fetched
    /// with), or leave the fleet a failure marker. In the background: nobody waits on it.
    /// `unparsed`: when the box sent the list whole, for an entry whose list is not parsed yet.
    pub(super) fn write_through(
        &self,
        key: &CacheKey,
        generation: Option<u64>,
        result: &Result<Arc<CachedResponse>, UpstreamError>,
        status: u16,
        unparsed: Option<Instant>,
    ) {
        let Some(tier) = self.tier.get().cloned() else {
            return;
        };
        let config = self.config.load_full();
        let record = match result {
            Ok(entry) => record::encode(key, entry, unparsed, &config, self.clock.now()),
            Err(_) => None,
        };
        let (key, error) = (key.clone(), result.as_ref().err().cloned());
        match tier {
            Tier::Disk(disk) => {
                if let Some(record) = record {
                    disk.store(key.canonical(), &record);
                }
            }
            Tier::Shared(shared) => {
                let Some(generation) = generation else { return };
                tokio::spawn(async move {
                    let _ = match (record, error) {
                        (Some(record), _) => shared.fill(&key, generation, &record).await,
                        (None, Some(error)) if error.is_box_failure() => {
                            shared
                                .fail(
                                    &key,
                                    generation,
                                    status,
                                    &error.to_string(),
                                    config.error_backoff,
                                )
                                .await
                        }
                        // Not stored (a 400, too large): just free the lease.
                        _ => {
                            shared
                                .fail(&key, generation, status, "", Duration::ZERO)
                                .await
                        }
                    };
                });
            }
        }
    }

    /// Remove `scope` from the tier and tell the fleet: for the shared tier, how many entries
    /// went there, or why it could not be reached; `None` otherwise (the disk's removals are
    /// queued, not counted).
    pub(super) async fn purge_tier(&self, scope: &Scope) -> Option<Result<usize, String>> {
        match self.tier.get()? {
            Tier::Shared(shared) => Some(
                shared
                    .purge(&scope.patterns(), &scope.notice())
                    .await
                    .map_err(|e| e.to_string()),
            ),
            Tier::Disk(disk) => {
                disk.remove_matching(scope.clone());
                None
            }
        }
    }

    /// Tell the fleet's other instances to drop `scope` from memory (they read it from the
    /// tier next time), without touching the tier.
    pub async fn announce(&self, scope: &Scope) {
        if let Some(Tier::Shared(shared)) = self.tier.get() {
            let _ = shared.publish(&scope.notice()).await;
        }
    }

    /// Apply the fleet's purge notices to this instance's memory, for as long as it runs.
    pub(super) fn follow_notices(&self, mut notices: UnboundedReceiver<String>) {
        let cache = self.clone();
        tokio::spawn(async move {
            while let Some(notice) = notices.recv().await {
                if let Some(scope) = Scope::from_notice(&notice) {
                    let removed = cache.purge_memory(&scope).await;
                    tracing::debug!(notice, removed, "fleet purge applied");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_match_what_they_name_and_round_trip_as_notices() {
        let agent = Scope::Subject("greenbox/id/10".into());
        assert!(agent.matches("greenbox/id/10"));
        assert!(agent.matches("greenbox/id/10?from=5"));
        assert!(!agent.matches("greenbox/id/103"), "another agent");
        let directory = Scope::Subject("greenbox/directory".into());
        assert!(directory.matches("greenbox/directory"));
        assert!(directory.matches("greenbox/directory/any"));
        assert!(!directory.matches("greenbox/directoryx"));
        let queue = Scope::Subject("greenbox/queues/4".into());
        assert!(queue.matches("greenbox/queues/4?from=9"));
        assert!(!queue.matches("greenbox/queues/42"), "another queue");
        let filtered = Scope::Filtered("greenbox/id/10".into());
        assert!(!filtered.matches("greenbox/id/10"));
        assert!(filtered.matches("greenbox/id/10?from=5"));
        let account = Scope::Account("greenbox".into());
        assert!(account.matches("greenbox/id/10"));
        assert!(!account.matches("greenbox2/id/10"));
        for scope in [Scope::All, account, agent, filtered] {
            assert_eq!(Scope::from_notice(&scope.notice()), Some(scope));
        }
        assert_eq!(Scope::from_notice("filled greenbox/id/1"), None);
        assert_eq!(
            Scope::Subject("a/email/x*y".into()).patterns(),
            vec![
                "a/email/x\\*y".to_owned(),
                "a/email/x\\*y\\?from=*".to_owned(),
                "a/email/x\\*y/*".to_owned()
            ]
        );
    }
}
