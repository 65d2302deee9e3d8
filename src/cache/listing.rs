//! What the cache holds, as the operator's cache listing and status page show it: one row per
//! entry (its key, status, size, age, time left and state), and per-account totals.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::policy::{self, Freshness};
use super::{CacheKey, ResponseCache, weight};

/// One stored entry, as listed.
#[derive(Debug, Clone)]
pub struct Listed {
    pub key: Arc<CacheKey>,
    pub status: u16,
    /// Body bytes.
    pub bytes: usize,
    /// Recordings in a stored full list.
    pub recordings: Option<usize>,
    pub age: Duration,
    /// Until it goes stale (zero once it has).
    pub ttl_left: Duration,
    /// `fresh`, `stale` (served while refreshed, or when the box fails), or `kept as delta
    /// base` (past serving, kept so that a refresh can be a delta).
    pub state: &'static str,
}

/// An account's share of the cache.
#[derive(Debug, Clone, Copy, Default)]
pub struct Share {
    pub entries: u64,
    /// As weighed against `cache.max_bytes`.
    pub bytes: u64,
}

impl ResponseCache {
    /// The stored entries of `account` (every account's for `None`), ordered by key, at most
    /// `limit`; and how many there were in all.
    pub fn listing(&self, account: Option<&str>, limit: usize) -> (Vec<Listed>, usize) {
        let now = self.clock.now();
        let mut rows: Vec<Listed> = self
            .store
            .entries()
            .filter(|(key, _)| account.is_none_or(|a| *key.account == *a))
            .filter_map(|(key, entry)| {
                let lifetime = entry.lifetime?;
                let (state, ttl_left) = match policy::freshness(&lifetime, now) {
                    Freshness::Fresh { remaining } => ("fresh", remaining),
                    Freshness::StaleRevalidate | Freshness::StaleIfError => {
                        ("stale", Duration::ZERO)
                    }
                    Freshness::Expired if entry.list.is_some() => {
                        ("kept as delta base", Duration::ZERO)
                    }
                    Freshness::Expired => return None,
                };
                Some(Listed {
                    status: entry.status.as_u16(),
                    bytes: entry.body.len(),
                    recordings: entry.list.as_ref().map(|l| l.recordings.len()),
                    age: policy::age(entry.fetched_at, now),
                    ttl_left,
                    state,
                    key,
                })
            })
            .collect();
        let total = rows.len();
        rows.sort_by_cached_key(|row| row.key.canonical());
        rows.truncate(limit);
        (rows, total)
    }

    /// Entries and weighed bytes per account.
    pub fn shares(&self) -> HashMap<Arc<str>, Share> {
        let mut shares: HashMap<Arc<str>, Share> = HashMap::new();
        for (key, entry) in self.store.entries() {
            let share = shares.entry(key.account.clone()).or_default();
            share.entries += 1;
            share.bytes += u64::from(weight::entry(&key, &entry));
        }
        shares
    }
}
