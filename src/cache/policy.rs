//! Pure freshness rules: what is stored for how long, and whether an entry is still fresh.
//!
//! No I/O and no clock reads here: every function takes `now`, so the rules are unit-tested
//! without time passing.

use std::time::{Duration, Instant};

use http::StatusCode;

use crate::config::CacheConfig;

/// How long a response with this upstream status may be stored, or `None` when it must not be.
///
/// Only a `200` (stored for `ok_ttl`: `cache.ttl` for a recordings list) and a `404` (unknown
/// agent) are stored; a zero TTL means "never store". A `400` or `403` passes through
/// uncached: it depends on the request or on the licence, which may change at any moment.
pub fn ttl_for(status: StatusCode, ok_ttl: Duration, cache: &CacheConfig) -> Option<Duration> {
    let ttl = match status {
        StatusCode::OK => ok_ttl,
        StatusCode::NOT_FOUND => cache.negative_ttl,
        _ => return None,
    };
    (!ttl.is_zero()).then_some(ttl)
}

/// The lifetime of a stored entry, fixed when it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    pub fetched_at: Instant,
    /// Fresh for this long.
    pub ttl: Duration,
    /// Then served at once while it is refreshed, for this long.
    pub stale_while_revalidate: Duration,
    /// Then (counted from the end of `ttl` too) served when the box fails, for this long.
    pub stale_if_error: Duration,
}

impl Lifetime {
    pub fn fresh_until(&self) -> Instant {
        self.fetched_at + self.ttl
    }

    /// After this, the entry can never be served again, so it need not stay in memory.
    pub fn servable_for(&self) -> Duration {
        self.ttl + self.stale_while_revalidate.max(self.stale_if_error)
    }
}

/// What an entry may be used for at `now`.
///
/// ```text
/// fetched_at      fresh_until        + stale_while_revalidate
///     |--- Fresh ---|--- StaleRevalidate ---|
///                   |------------ StaleIfError ------------|--- Expired ...
///                                       + stale_if_error
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Servable; `remaining` until it goes stale.
    Fresh { remaining: Duration },
    /// Serve it at once and refresh it in the background.
    StaleRevalidate,
    /// Fetch again; serve it only if that fetch fails.
    StaleIfError,
    /// Must be fetched again; never served.
    Expired,
}

pub fn freshness(lifetime: &Lifetime, now: Instant) -> Freshness {
    let fresh_until = lifetime.fresh_until();
    if now < fresh_until {
        return Freshness::Fresh {
            remaining: fresh_until - now,
        };
    }
    let stale_for = now - fresh_until;
    if stale_for < lifetime.stale_while_revalidate {
        Freshness::StaleRevalidate
    } else if stale_for < lifetime.stale_if_error {
        Freshness::StaleIfError
    } else {
        Freshness::Expired
    }
}

/// Whether a failure recorded at `failed_at` still holds requests back from the box at `now`.
pub fn in_backoff(failed_at: Instant, backoff: Duration, now: Instant) -> bool {
    now < failed_at + backoff
}

/// Age of an entry at `now` (zero if the clock reads earlier than the fetch).
pub fn age(fetched_at: Instant, now: Instant) -> Duration {
    now.saturating_duration_since(fetched_at)
}

/// How a fetch asks the box for an agent's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListPlan {
    /// The whole list (or the client's own `fromQueueCallId`, passed on).
    Whole,
    /// Only the recordings after this id, appended to the stored list.
    DeltaAfter(u64),
}

/// What the delta-or-full rule knows of a fetch.
#[derive(Debug, Clone, Copy)]
pub struct FetchFacts {
    /// An operator asked for this refresh: it never settles for a delta.
    pub forced: bool,
    /// The key is a client's `fromQueueCallId` passed on, not an agent's full list.
    pub filtered: bool,
    /// The box understands `fromQueueCallId` (API 7 and later).
    pub box_filters: bool,
    /// The stored full list this fetch would extend, if any.
    pub stored: Option<StoredFacts>,
}

/// A stored `200` full list, as the rule sees it.
#[derive(Debug, Clone, Copy)]
pub struct StoredFacts {
    /// Its highest `QueueCallId`; `None` for an empty list.
    pub highest_id: Option<u64>,
    /// When the box last sent it whole.
    pub fetched_whole_at: Instant,
}

/// The delta-or-full rule. A stored full list is extended by delta, asking only for the
/// recordings after its highest id, until it was last fetched whole `full_refresh_interval`
/// ago: a delta cannot see a deleted recording or a late call with a lower id, so it is
/// fetched whole again then. Everything else is fetched whole.
pub fn plan_list_fetch(
    facts: FetchFacts,
    full_refresh_interval: Duration,
    now: Instant,
) -> ListPlan {
    let FetchFacts {
        forced,
        filtered,
        box_filters,
        stored,
    } = facts;
    let Some(stored) = stored.filter(|_| !forced && !filtered && box_filters) else {
        return ListPlan::Whole;
    };
    match stored.highest_id {
        Some(highest) if age(stored.fetched_whole_at, now) < full_refresh_interval => {
            ListPlan::DeltaAfter(highest)
        }
        _ => ListPlan::Whole,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn cache(ttl: u64, negative_ttl: u64) -> CacheConfig {
        CacheConfig {
            ttl: Duration::from_secs(ttl),
            negative_ttl: Duration::from_secs(negative_ttl),
            directory_ttl: Duration::from_secs(60),
            max_bytes: 1 << 20,
            max_entry_bytes: 1 << 20,
            stale_while_revalidate: Duration::from_secs(30),
            stale_if_error: Duration::from_secs(600),
            error_backoff: Duration::from_secs(1),
            full_refresh_interval: Duration::from_secs(900),
            gzip: true,
            gzip_min_bytes: 1024,
            gzip_level: 6,
            tier: None,
            audio: None,
        }
    }

    #[test]
    fn only_lists_and_unknown_agents_are_stored() {
        let c = cache(30, 5);
        assert_eq!(
            ttl_for(StatusCode::OK, c.ttl, &c),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            ttl_for(StatusCode::NOT_FOUND, c.ttl, &c),
            Some(Duration::from_secs(5))
        );
        for status in [400, 401, 403, 500, 502, 503, 204, 301] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(ttl_for(status, c.ttl, &c), None, "{status}");
        }
    }

    #[test]
    fn zero_ttl_means_never_stored() {
        let c = cache(0, 0);
        assert_eq!(ttl_for(StatusCode::OK, c.ttl, &c), None);
        assert_eq!(ttl_for(StatusCode::NOT_FOUND, c.ttl, &c), None);
    }

    fn lifetime(t0: Instant) -> Lifetime {
        Lifetime {
            fetched_at: t0,
            ttl: Duration::from_secs(30),
            stale_while_revalidate: Duration::from_secs(30),
            stale_if_error: Duration::from_secs(600),
        }
    }

    #[test]
    fn the_timeline_from_fresh_to_expired() {
        let t0 = Instant::now();
        let l = lifetime(t0);
        let at = |secs| freshness(&l, t0 + Duration::from_secs(secs));
        assert_eq!(
            at(0),
            Freshness::Fresh {
                remaining: Duration::from_secs(30)
            }
        );
        assert_eq!(
            at(29),
            Freshness::Fresh {
                remaining: Duration::from_secs(1)
            }
        );
        assert_eq!(at(30), Freshness::StaleRevalidate);
        assert_eq!(at(59), Freshness::StaleRevalidate);
        assert_eq!(at(60), Freshness::StaleIfError);
        assert_eq!(at(629), Freshness::StaleIfError);
        assert_eq!(at(630), Freshness::Expired);
        assert_eq!(l.servable_for(), Duration::from_secs(630));
    }

    #[test]
    fn zero_windows_go_straight_from_fresh_to_expired() {
        let t0 = Instant::now();
        let l = Lifetime {
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            ..lifetime(t0)
        };
        assert_eq!(
            freshness(&l, t0 + Duration::from_secs(30)),
            Freshness::Expired
        );
        assert_eq!(l.servable_for(), Duration::from_secs(30));
    }

    #[test]
    fn a_longer_revalidate_window_wins_over_stale_if_error() {
        let t0 = Instant::now();
        let l = Lifetime {
            stale_while_revalidate: Duration::from_secs(120),
            stale_if_error: Duration::from_secs(60),
            ..lifetime(t0)
        };
        assert_eq!(
            freshness(&l, t0 + Duration::from_secs(100)),
            Freshness::StaleRevalidate
        );
        assert_eq!(
            freshness(&l, t0 + Duration::from_secs(150)),
            Freshness::Expired
        );
    }

    #[test]
    fn backoff_holds_until_it_ends() {
        let t0 = Instant::now();
        assert!(in_backoff(t0, Duration::from_secs(1), t0));
        assert!(!in_backoff(
            t0,
            Duration::from_secs(1),
            t0 + Duration::from_secs(1)
        ));
        assert!(!in_backoff(t0, Duration::ZERO, t0));
    }

    #[test]
    fn age_never_goes_negative() {
        let t0 = Instant::now();
        assert_eq!(age(t0 + Duration::from_secs(5), t0), Duration::ZERO);
        assert_eq!(age(t0, t0 + Duration::from_secs(5)), Duration::from_secs(5));
    }

    #[test]
    fn a_stored_list_is_extended_by_delta_until_it_is_due_whole() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(900);
        let stored = StoredFacts {
            highest_id: Some(150_039),
            fetched_whole_at: t0,
        };
        let facts = FetchFacts {
            forced: false,
            filtered: false,
            box_filters: true,
            stored: Some(stored),
        };
        let plan = |facts: FetchFacts, now| plan_list_fetch(facts, interval, now);
        assert_eq!(plan(facts, t0), ListPlan::DeltaAfter(150_039));
        let just_before = t0 + interval - Duration::from_millis(1);
        assert_eq!(plan(facts, just_before), ListPlan::DeltaAfter(150_039));
        assert_eq!(plan(facts, t0 + interval), ListPlan::Whole, "due whole");
        assert_eq!(plan_list_fetch(facts, Duration::ZERO, t0), ListPlan::Whole);
        for whole in [
            FetchFacts {
                forced: true,
                ..facts
            },
            FetchFacts {
                filtered: true,
                ..facts
            },
            FetchFacts {
                box_filters: false,
                ..facts
            },
            FetchFacts {
                stored: None,
                ..facts
            },
            FetchFacts {
                stored: Some(StoredFacts {
                    highest_id: None,
                    ..stored
                }),
                ..facts
            },
        ] {
            assert_eq!(plan(whole, t0), ListPlan::Whole, "{whole:?}");
        }
    }
}
