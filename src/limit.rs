//! Per-client-address rate limit on the public listeners (`[server.rate_limit]`, off by default).
//!
//! Each client IP address has a token bucket: it holds up to `burst` tokens, refills at
//! `requests_per_second`, and a request takes one token or is answered `429` with the whole
//! seconds until the next token as `Retry-After`. The check runs before routing and
//! authentication, so floods of bad requests and key guessing are limited too.
//!
//! Buckets live in a few mutex-guarded shards. A bucket that has refilled is the same as no
//! bucket, so a shard drops its full buckets whenever it has doubled in size since the last
//! sweep: memory follows the addresses active within the last `burst / requests_per_second`
//! seconds, and the sweeps cost amortized O(1) per request.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::RateLimit;

const SHARDS: usize = 16;
/// A shard is not swept below this many buckets.
const MIN_SWEEP: usize = 1024;

/// The token buckets of every client address.
#[derive(Debug)]
pub struct RateLimiter {
    settings: RateLimit,
    hasher: std::collections::hash_map::RandomState,
    shards: [Mutex<Shard>; SHARDS],
}

#[derive(Debug, Default)]
struct Shard {
    buckets: HashMap<IpAddr, Bucket>,
    /// Sweep when the shard holds this many buckets.
    sweep_at: usize,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// A request over the limit: when the client may try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub retry_after: Duration,
}

impl RateLimiter {
    pub fn new(settings: RateLimit) -> Self {
        Self {
            settings,
            hasher: Default::default(),
            shards: std::array::from_fn(|_| {
                Mutex::new(Shard {
                    buckets: HashMap::new(),
                    sweep_at: MIN_SWEEP,
                })
            }),
        }
    }

    pub fn settings(&self) -> RateLimit {
        self.settings
    }

    /// Take a token for a request from `client` at `now`.
    pub fn check(&self, client: IpAddr, now: Instant) -> Result<(), Limited> {
        let RateLimit {
            requests_per_second: rate,
            burst,
        } = self.settings;
        let burst = f64::from(burst);
        let shard = &self.shards[self.hasher.hash_one(client) as usize % SHARDS];
        let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        if shard.buckets.len() >= shard.sweep_at {
            shard
                .buckets
                .retain(|_, bucket| bucket.refilled(now, rate, burst) < burst);
            shard.sweep_at = (shard.buckets.len() * 2).max(MIN_SWEEP);
        }
        let bucket = shard.buckets.entry(client).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        bucket.tokens = bucket.refilled(now, rate, burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = Duration::from_secs_f64((1.0 - bucket.tokens) / rate);
        Err(Limited { retry_after: wait })
    }

    /// Take one more token from `client`'s bucket, if it has one: a failed key check costs a
    /// request of its own, so key guessing is slowed twice as much as ordinary traffic.
    pub fn charge(&self, client: IpAddr, now: Instant) {
        let _ = self.check(client, now);
    }

    /// Client addresses with a bucket that has not refilled yet.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).buckets.len())
            .sum()
    }
}

impl Bucket {
    /// The tokens at `now`: what was left plus the refill since, up to `burst`.
    fn refilled(&self, now: Instant, rate: f64, burst: f64) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        (self.tokens + elapsed * rate).min(burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::retry_after_seconds;

    fn limiter(rate: f64, burst: u32) -> RateLimiter {
        RateLimiter::new(RateLimit {
            requests_per_second: rate,
            burst,
        })
    }

    #[test]
    fn a_burst_is_allowed_then_requests_follow_the_rate() {
        let limiter = limiter(2.0, 3);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "::1".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.check(a, t0), Ok(()));
        }
        let limited = limiter.check(a, t0).unwrap_err();
        assert_eq!(limited.retry_after, Duration::from_millis(500));
        assert_eq!(retry_after_seconds(limited.retry_after), 1);
        // Another address has its own bucket.
        assert_eq!(limiter.check(b, t0), Ok(()));
        // Half a second later one token is back, and only one.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(limiter.check(a, t1), Ok(()));
        assert!(limiter.check(a, t1).is_err());
        // A long pause refills up to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(limiter.check(a, t2), Ok(()));
        }
        assert!(limiter.check(a, t2).is_err());
    }

    #[test]
    fn slow_rates_ask_for_whole_seconds() {
        let limiter = limiter(0.1, 1);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let now = Instant::now();
        assert_eq!(limiter.check(ip, now), Ok(()));
        let limited = limiter.check(ip, now).unwrap_err();
        assert_eq!(retry_after_seconds(limited.retry_after), 10);
        let later = now + Duration::from_millis(9_500);
        let limited = limiter.check(ip, later).unwrap_err();
        assert_eq!(retry_after_seconds(limited.retry_after), 1);
    }

    #[test]
    fn refilled_buckets_are_swept() {
        let limiter = limiter(10.0, 1);
        let now = Instant::now();
        let many = 20 * MIN_SWEEP as u32;
        for n in 0..many {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(n));
            assert_eq!(limiter.check(ip, now), Ok(()));
        }
        assert_eq!(
            limiter.tracked(),
            many as usize,
            "all are empty, none swept"
        );
        // A second later every bucket is full again; new clients sweep them away.
        let later = now + Duration::from_secs(1);
        for n in many..2 * many {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(n));
            assert_eq!(limiter.check(ip, later), Ok(()));
        }
        assert!(
            limiter.tracked() < (many + many / 2) as usize,
            "{} buckets kept",
            limiter.tracked()
        );
    }
}
