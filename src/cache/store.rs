//! The in-memory tier: stored answers in a byte-bounded moka cache.
//!
//! Every entry is weighed at what it really holds ([`super::weight`]), leaves memory when it
//! can no longer be served ([`CachedResponse::retain_for`]), and its removal is counted by
//! cause. This is the seam a second tier (a shared or a disk store) plugs in behind: the
//! cache asks a [`MemoryStore`] first and stores every answer it keeps here.

use std::sync::Arc;
use std::time::Duration;

use moka::notification::RemovalCause;

use super::{CacheKey, CachedResponse, weight};
use crate::metrics::EvictionCounters;

/// The stored answers, bounded by `cache.max_bytes`. Cheap to clone: clones share the store.
#[derive(Clone)]
pub struct MemoryStore {
    entries: moka::future::Cache<CacheKey, Arc<CachedResponse>>,
}

/// Per-entry lifetime for moka: an entry leaves memory when it is of no more use.
struct EntryExpiry;

impl moka::Expiry<CacheKey, Arc<CachedResponse>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<CachedResponse>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        value.retain_for
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        value: &Arc<CachedResponse>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        value.retain_for
    }
}

/// Bytes an entry costs (see [`weight`]).
fn weigh(key: &CacheKey, value: &Arc<CachedResponse>) -> u32 {
    weight::entry(key, value)
}

impl MemoryStore {
    /// A store of at most `max_bytes` (as weighed); removals are counted in `evictions`.
    pub fn new(max_bytes: u64, evictions: EvictionCounters) -> Self {
        let entries = moka::future::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(weigh)
            .expire_after(EntryExpiry)
            .support_invalidation_closures()
            .eviction_listener(move |_key, _value, cause| {
                let counter = match cause {
                    RemovalCause::Expired => &evictions.expired,
                    RemovalCause::Size => &evictions.size,
                    RemovalCause::Explicit => &evictions.explicit,
                    // Replaced by a newer answer for the same key: nothing was lost.
                    RemovalCause::Replaced => return,
                };
                counter.inc();
            })
            .build();
        Self { entries }
    }

    pub async fn get(&self, key: &CacheKey) -> Option<Arc<CachedResponse>> {
        self.entries.get(key).await
    }

    pub async fn insert(&self, key: CacheKey, entry: Arc<CachedResponse>) {
        self.entries.insert(key, entry).await;
    }

    pub async fn remove(&self, key: &CacheKey) {
        self.entries.invalidate(key).await;
    }

    /// Remove every entry whose key matches; how many went.
    pub async fn remove_matching(&self, matches: impl Fn(&CacheKey) -> bool) -> usize {
        let keys: Vec<CacheKey> = self
            .entries
            .iter()
            .filter(|(key, _)| matches(key))
            .map(|(key, _)| CacheKey::clone(&key))
            .collect();
        let mut removed = 0;
        for key in keys {
            if self.entries.remove(&key).await.is_some() {
                removed += 1;
            }
        }
        removed
    }

    /// Drop every entry of `account`, without waiting (counted as explicit removals).
    pub fn invalidate_account(&self, account: &str) {
        let account: Arc<str> = account.into();
        // Fails only without `support_invalidation_closures`, which the builder sets.
        let _ = self
            .entries
            .invalidate_entries_if(move |key, _| key.account == account);
    }

    /// Every stored entry (a snapshot as moka iterates; entries may come and go meanwhile).
    pub fn entries(&self) -> impl Iterator<Item = (Arc<CacheKey>, Arc<CachedResponse>)> + '_ {
        self.entries.iter()
    }

    /// Entries stored.
    pub fn entry_count(&self) -> u64 {
        self.entries.entry_count()
    }

    /// Their weight, against `cache.max_bytes`.
    pub fn weighted_size(&self) -> u64 {
        self.entries.weighted_size()
    }

    /// Apply moka's pending bookkeeping, so counts are current.
    pub async fn sync(&self) {
        self.entries.run_pending_tasks().await;
    }
}
