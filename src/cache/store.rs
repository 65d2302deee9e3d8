//! The in-memory tier: stored answers in a byte-bounded moka cache.
//!
//! Every entry is weighed at what it really holds ([`super::weight`]), leaves memory when it
//! can no longer be served ([`CachedResponse::retain_for`]), and its removal is counted by
//! cause. This is the seam a second tier (a shared or a disk store) plugs in behind: the
//! cache asks a [`MemoryStore`] first and stores every answer it keeps here.

use std::sync::Arc;
use std::time::Duration;

use moka::notification::RemovalCause;
use moka::ops::compute::Op;

use super::{CacheKey, CachedResponse, weight};
use crate::metrics::EvictionCounters;

/// The stored answers, bounded by `cache.max_bytes`. Cheap to clone: clones share the store.
#[derive(Clone)]
pub struct MemoryStore {
    entries: moka::future::Cache<CacheKey, Arc<CachedResponse>, KeyHasher>,
}

/// How keys are hashed: foldhash, with a seed drawn per process, rather than moka's default
/// SipHash, which took about 2.5% of a hit's instructions (callgrind) to hash a key of a few
/// short fields. A key is built only for an authenticated request, from normalized and
/// length-capped parts, and a random seed leaves no fixed set of colliding keys to send.
type KeyHasher = foldhash::fast::RandomState;

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
            .build_with_hasher(KeyHasher::default());
        Self { entries }
    }

    pub async fn get(&self, key: &CacheKey) -> Option<Arc<CachedResponse>> {
        self.entries.get(key).await
    }

    /// Store `entry` for `key`. Under the key's lock, like [`MemoryStore::replace`], so that
    /// a replacement decided on what was stored cannot cross it.
    pub async fn insert(&self, key: CacheKey, entry: Arc<CachedResponse>) {
        self.entries
            .entry(key)
            .and_compute_with(|_| std::future::ready(Op::Put(entry)))
            .await;
    }

    /// Put `entry` (or, with `None`, nothing) in place of `expected` if that very entry is
    /// still what `key` holds; whether it was. A fill that answered with a provisional entry
    /// finishes it this way, and so never brings back a key purged, or stores over a newer
    /// answer fetched, while it was finishing.
    pub async fn replace(
        &self,
        key: &CacheKey,
        expected: &Arc<CachedResponse>,
        entry: Option<Arc<CachedResponse>>,
    ) -> bool {
        let mut held = false;
        self.entries
            .entry_by_ref(key)
            .and_compute_with(|stored| {
                held = stored.is_some_and(|stored| Arc::ptr_eq(stored.value(), expected));
                std::future::ready(match (held, entry) {
                    (true, Some(entry)) => Op::Put(entry),
                    (true, None) => Op::Remove,
                    (false, _) => Op::Nop,
                })
            })
            .await;
        held
    }

    /// Remove `key` under its lock (see [`MemoryStore::insert`]); whether it was stored.
    pub async fn remove(&self, key: &CacheKey) -> bool {
        let result = self
            .entries
            .entry_by_ref(key)
            .and_compute_with(|_| std::future::ready(Op::Remove))
            .await;
        matches!(result, moka::ops::compute::CompResult::Removed(_))
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
            if self.remove(&key).await {
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::cache::record::tests::entry;
    use crate::cache::tests::key;
    use crate::metrics::Metrics;

    #[tokio::test]
    async fn a_replacement_lands_only_on_the_entry_it_was_made_for() {
        let store = MemoryStore::new(1 << 20, Metrics::new().evictions());
        let list = r#"[{"QueueCallId":1}]"#;
        let one = || Arc::new(entry(Instant::now(), list));
        let (first, finished, newer) = (one(), one(), one());
        store.insert(key("1"), first.clone()).await;
        assert!(
            store
                .replace(&key("1"), &first, Some(finished.clone()))
                .await
        );
        let held = store.get(&key("1")).await.unwrap();
        assert!(Arc::ptr_eq(&held, &finished));

        // A newer answer was stored meanwhile: it stays.
        store.insert(key("1"), newer.clone()).await;
        assert!(
            !store
                .replace(&key("1"), &finished, Some(first.clone()))
                .await
        );
        assert!(Arc::ptr_eq(&store.get(&key("1")).await.unwrap(), &newer));
        assert!(!store.replace(&key("1"), &finished, None).await);
        assert!(store.get(&key("1")).await.is_some(), "not removed either");

        // Purged meanwhile: nothing comes back.
        assert_eq!(store.remove_matching(|_| true).await, 1);
        assert!(!store.replace(&key("1"), &newer, Some(finished)).await);
        assert!(store.get(&key("1")).await.is_none());

        store.insert(key("2"), first.clone()).await;
        assert!(store.replace(&key("2"), &first, None).await);
        assert!(store.get(&key("2")).await.is_none());
    }
}
