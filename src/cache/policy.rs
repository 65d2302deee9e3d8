//! Pure freshness rules: what is stored for how long, and whether an entry is still fresh.
//!
//! No I/O and no clock reads here: every function takes `now`, so the rules are unit-tested
//! without time passing.

use std::time::{Duration, Instant};

use http::StatusCode;

use crate::config::CacheConfig;

/// How long a response with this upstream status may be stored, or `None` when it must not be.
///
/// Only a `200` list and a `404` (unknown agent) are stored; a zero TTL means "never store".
/// A `400` or `403` passes through uncached: it depends on the request or on the licence, which
/// may change at any moment.
pub fn ttl_for(status: StatusCode, cache: &CacheConfig) -> Option<Duration> {
    let ttl = match status {
        StatusCode::OK => cache.ttl,
        StatusCode::NOT_FOUND => cache.negative_ttl,
        _ => return None,
    };
    (!ttl.is_zero()).then_some(ttl)
}

/// Freshness of a stored entry at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Servable; `remaining` until it expires.
    Fresh { remaining: Duration },
    /// Must be fetched again.
    Expired,
}

/// An entry fetched at `fetched_at` and fresh for `ttl` is fresh strictly before the deadline.
pub fn freshness(fetched_at: Instant, ttl: Duration, now: Instant) -> Freshness {
    let expires_at = fetched_at + ttl;
    if now < expires_at {
        Freshness::Fresh {
            remaining: expires_at - now,
        }
    } else {
        Freshness::Expired
    }
}

/// Age of an entry at `now` (zero if the clock reads earlier than the fetch).
pub fn age(fetched_at: Instant, now: Instant) -> Duration {
    now.saturating_duration_since(fetched_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(ttl: u64, negative_ttl: u64) -> CacheConfig {
        CacheConfig {
            ttl: Duration::from_secs(ttl),
            negative_ttl: Duration::from_secs(negative_ttl),
            max_bytes: 1 << 20,
        }
    }

    #[test]
    fn only_lists_and_unknown_agents_are_stored() {
        let c = cache(30, 5);
        assert_eq!(ttl_for(StatusCode::OK, &c), Some(Duration::from_secs(30)));
        assert_eq!(
            ttl_for(StatusCode::NOT_FOUND, &c),
            Some(Duration::from_secs(5))
        );
        for status in [400, 401, 403, 500, 502, 503, 204, 301] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(ttl_for(status, &c), None, "{status}");
        }
    }

    #[test]
    fn zero_ttl_means_never_stored() {
        let c = cache(0, 0);
        assert_eq!(ttl_for(StatusCode::OK, &c), None);
        assert_eq!(ttl_for(StatusCode::NOT_FOUND, &c), None);
    }

    #[test]
    fn fresh_until_the_deadline_then_expired() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(30);
        assert_eq!(freshness(t0, ttl, t0), Freshness::Fresh { remaining: ttl });
        assert_eq!(
            freshness(t0, ttl, t0 + Duration::from_secs(29)),
            Freshness::Fresh {
                remaining: Duration::from_secs(1)
            }
        );
        assert_eq!(freshness(t0, ttl, t0 + ttl), Freshness::Expired);
        assert_eq!(
            freshness(t0, ttl, t0 + Duration::from_secs(90)),
            Freshness::Expired
        );
    }

    #[test]
    fn age_never_goes_negative() {
        let t0 = Instant::now();
        assert_eq!(age(t0 + Duration::from_secs(5), t0), Duration::ZERO);
        assert_eq!(age(t0, t0 + Duration::from_secs(5)), Duration::from_secs(5));
    }
}
