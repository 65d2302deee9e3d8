//! Protecting one box: at most `max_concurrent_requests` requests at once (a bounded queue wait
//! beyond that), and a circuit breaker that fails fast after `breaker_failures` consecutive
//! failures, for `breaker_cooldown`, then lets one probe through.
//!
//! [`Breaker`] is a pure state machine: every transition takes `now`, so tests drive it with an
//! injected clock.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Semaphore;

use crate::clock::Clock;
use crate::config::UpstreamSettings;
use crate::upstream::UpstreamError;

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow.
    Closed,
    /// Requests fail fast until the cool-down ends.
    Open,
    /// The cool-down ended: one probe decides between closed and open.
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }

    /// The value of the `upstream_breaker_state` gauge.
    pub fn as_gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

/// What the breaker says to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead (closed).
    Allowed,
    /// Go ahead as the one probe (half-open).
    Probe,
    /// Fail fast; the breaker may let a probe through after `retry_after`.
    Rejected { retry_after: Duration },
}

/// Consecutive-failure circuit breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    failures_to_open: u32,
    cooldown: Duration,
    consecutive_failures: u32,
    opened_at: Option<Instant>,
    probing: bool,
}

impl Breaker {
    pub fn new(failures_to_open: u32, cooldown: Duration) -> Self {
        Self {
            failures_to_open: failures_to_open.max(1),
            cooldown,
            consecutive_failures: 0,
            opened_at: None,
            probing: false,
        }
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        match self.opened_at {
            None => BreakerState::Closed,
            Some(at) if now < at + self.cooldown => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// May a request go to the box at `now`?
    pub fn admit(&mut self, now: Instant) -> Admission {
        match (self.state(now), self.opened_at) {
            (BreakerState::Closed, _) => Admission::Allowed,
            (BreakerState::HalfOpen, _) if !self.probing => {
                self.probing = true;
                Admission::Probe
            }
            (_, Some(at)) => Admission::Rejected {
                // While a probe is out, ask clients back after a second.
                retry_after: (at + self.cooldown)
                    .saturating_duration_since(now)
                    .max(Duration::from_secs(1)),
            },
            (_, None) => Admission::Allowed,
        }
    }

    /// Record the outcome of a request admitted with `admission`.
    pub fn record(&mut self, admission: Admission, success: bool, now: Instant) {
        match (admission, success) {
            (Admission::Probe, true) => self.close(),
            (Admission::Probe, false) => {
                self.probing = false;
                self.opened_at = Some(now);
            }
            // Late answers to requests admitted before the breaker opened change nothing.
            (Admission::Allowed, _) if self.opened_at.is_some() => {}
            (Admission::Allowed, true) => self.consecutive_failures = 0,
            (Admission::Allowed, false) => {
                self.consecutive_failures += 1;
                if self.consecutive_failures >= self.failures_to_open {
                    self.opened_at = Some(now);
                }
            }
            (Admission::Rejected { .. }, _) => {}
        }
    }

    /// A probe that never reached the box (it waited too long in the queue) decides nothing.
    pub fn abandon(&mut self, admission: Admission) {
        if admission == Admission::Probe {
            self.probing = false;
        }
    }

    fn close(&mut self) {
        self.consecutive_failures = 0;
        self.opened_at = None;
        self.probing = false;
    }
}

/// The metrics protection keeps current.
#[derive(Debug, Clone, Default)]
pub struct ProtectionMetrics {
    pub in_flight: Gauge,
    pub breaker_state: Gauge,
    pub queue_rejections: Counter,
    /// Fetches dropped in the queue because nobody waited for them any more.
    pub abandoned: Counter,
    pub breaker_rejections: Counter,
}

/// A request the breaker let through. Recording its outcome consumes it; dropped before that
/// (a queue timeout, a dropped future, a panic), it decides nothing, so a probe frees the
/// breaker for the next one.
struct Admitted<'a> {
    protection: &'a Protection,
    admission: Admission,
    decided: bool,
}

impl Admitted<'_> {
    fn record(mut self, success: bool) {
        let now = self.protection.clock.now();
        self.protection
            .breaker()
            .record(self.admission, success, now);
        self.decided = true;
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if !self.decided {
            self.protection.breaker().abandon(self.admission);
        }
        self.protection.publish_state();
    }
}

/// One request at the box, counted in the in-flight gauge until dropped.
struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Concurrency limit and circuit breaker for one account's box.
pub struct Protection {
    permits: Semaphore,
    queue_timeout: Duration,
    breaker: Mutex<Breaker>,
    clock: Arc<dyn Clock>,
    metrics: ProtectionMetrics,
}

impl std::fmt::Debug for Protection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Protection")
            .field("available", &self.permits.available_permits())
            .field("breaker", &self.breaker())
            .finish_non_exhaustive()
    }
}

impl Protection {
    pub fn new(
        settings: &UpstreamSettings,
        clock: Arc<dyn Clock>,
        metrics: ProtectionMetrics,
    ) -> Self {
        Self {
            permits: Semaphore::new(settings.max_concurrent_requests),
            queue_timeout: settings.queue_timeout,
            breaker: Mutex::new(Breaker::new(
                settings.breaker_failures,
                settings.breaker_cooldown,
            )),
            clock,
            metrics,
        }
    }

    fn breaker(&self) -> MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long a fetch may wait for a free slot.
    pub fn queue_timeout(&self) -> Duration {
        self.queue_timeout
    }

    /// Requests to the box in progress now.
    pub fn in_flight(&self) -> i64 {
        self.metrics.in_flight.get()
    }

    /// The breaker's state now.
    pub fn state(&self) -> BreakerState {
        self.breaker().state(self.clock.now())
    }

    /// Run `request` if the breaker admits it and a slot frees up within the queue timeout.
    ///
    /// While it waits for a slot, the request is dropped as soon as `abandoned` completes
    /// (everyone who wanted its answer has gone): it would only add to the box's load. Once it
    /// has a slot it runs to the end whatever happens to its clients.
    ///
    /// Whatever it raises is lowered in `Drop`: a request that panics, or whose future is
    /// dropped, leaves the in-flight gauge where it was and frees the breaker's probe.
    pub async fn run<T, F>(
        &self,
        request: F,
        abandoned: impl Future<Output = ()>,
    ) -> Result<T, UpstreamError>
    where
        F: Future<Output = Result<T, UpstreamError>>,
    {
        let admission = self.breaker().admit(self.clock.now());
        self.publish_state();
        if let Admission::Rejected { retry_after } = admission {
            self.metrics.breaker_rejections.inc();
            return Err(UpstreamError::CircuitOpen { retry_after });
        }
        let admitted = Admitted {
            protection: self,
            admission,
            decided: false,
        };
        let queued = tokio::time::timeout(self.queue_timeout, self.permits.acquire());
        let _permit = tokio::select! {
            // A free slot is taken even when the clients have just gone: what it brings is
            // stored for whoever asks next.
            biased;
            acquired = queued => match acquired {
                Ok(Ok(permit)) => permit,
                _ => {
                    self.metrics.queue_rejections.inc();
                    return Err(UpstreamError::QueueTimeout(self.queue_timeout));
                }
            },
            () = abandoned => {
                self.metrics.abandoned.inc();
                return Err(UpstreamError::Abandoned);
            }
        };
        let in_flight = InFlight::enter(&self.metrics.in_flight);
        let result = request.await;
        drop(in_flight);
        let success = match &result {
            Ok(_) => true,
            Err(error) => !error.is_box_failure(),
        };
        admitted.record(success);
        result
    }

    fn publish_state(&self) {
        self.metrics.breaker_state.set(self.state().as_gauge());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOLDOWN: Duration = Duration::from_secs(30);

    fn protection(clock: &Arc<crate::clock::ManualClock>) -> Arc<Protection> {
        let settings = UpstreamSettings {
            breaker_failures: 1,
            breaker_cooldown: COOLDOWN,
            ..UpstreamSettings::default()
        };
        Arc::new(Protection::new(
            &settings,
            clock.clone(),
            ProtectionMetrics::default(),
        ))
    }

    /// Open the breaker with one failure and let the cool-down pass: the next request probes.
    async fn half_open(clock: &Arc<crate::clock::ManualClock>, p: &Protection) {
        let failed = p
            .run(
                async { Err::<(), _>(UpstreamError::Status(http::StatusCode::BAD_GATEWAY)) },
                std::future::pending(),
            )
            .await;
        assert!(failed.is_err());
        clock.advance(COOLDOWN);
        assert_eq!(p.state(), BreakerState::HalfOpen);
    }

    #[tokio::test]
    async fn a_probe_that_panics_or_is_dropped_leaves_nothing_raised() {
        let clock = Arc::new(crate::clock::ManualClock::new());
        let p = protection(&clock);
        half_open(&clock, &p).await;

        // The probe panics at the box.
        let panicking = p.clone();
        let outcome = tokio::spawn(async move {
            let request = async { panic!("a bug in the fetch") };
            panicking
                .run::<(), _>(request, std::future::pending())
                .await
        })
        .await;
        assert!(outcome.is_err(), "the task panicked");
        assert_eq!(p.metrics.in_flight.get(), 0, "the gauge went down again");
        assert_eq!(p.state(), BreakerState::HalfOpen);

        // The next probe's future is dropped while it is at the box.
        let mut dropped = Box::pin(p.run(
            std::future::pending::<Result<(), UpstreamError>>(),
            std::future::pending(),
        ));
        assert!(futures_poll_once(dropped.as_mut()).await.is_none());
        assert_eq!(p.metrics.in_flight.get(), 1);
        drop(dropped);
        assert_eq!(p.metrics.in_flight.get(), 0);

        // Neither decided anything: the breaker lets one more probe through, and it closes.
        let ok = p.run(async { Ok(()) }, std::future::pending()).await;
        assert!(ok.is_ok());
        assert_eq!(p.state(), BreakerState::Closed);
        assert_eq!(p.metrics.breaker_state.get(), 0);
    }

    /// Poll a future once: its output if it was ready.
    async fn futures_poll_once<F: Future + Unpin>(future: F) -> Option<F::Output> {
        let mut future = future;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut future).poll(cx) {
                std::task::Poll::Ready(output) => Some(output),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, COOLDOWN);
        for _ in 0..2 {
            assert_eq!(b.admit(t0), Admission::Allowed);
            b.record(Admission::Allowed, false, t0);
        }
        b.record(Admission::Allowed, true, t0);
        for _ in 0..2 {
            b.record(Admission::Allowed, false, t0);
        }
        assert_eq!(
            b.state(t0),
            BreakerState::Closed,
            "a success reset the count"
        );
        b.record(Admission::Allowed, false, t0);
        assert_eq!(b.state(t0), BreakerState::Open);
        assert_eq!(
            b.admit(t0 + Duration::from_secs(10)),
            Admission::Rejected {
                retry_after: Duration::from_secs(20)
            }
        );
    }

    #[test]
    fn one_probe_after_the_cooldown_decides() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, COOLDOWN);
        b.record(Admission::Allowed, false, t0);
        let later = t0 + COOLDOWN;
        assert_eq!(b.state(later), BreakerState::HalfOpen);
        assert_eq!(b.admit(later), Admission::Probe);
        assert!(
            matches!(b.admit(later), Admission::Rejected { .. }),
            "one probe at a time"
        );
        b.record(Admission::Probe, false, later);
        assert_eq!(b.state(later), BreakerState::Open, "a failed probe reopens");
        let again = later + COOLDOWN;
        assert_eq!(b.admit(again), Admission::Probe);
        b.record(Admission::Probe, true, again);
        assert_eq!(b.state(again), BreakerState::Closed);
        assert_eq!(b.admit(again), Admission::Allowed);
    }

    #[test]
    fn an_abandoned_probe_frees_the_slot_and_late_answers_change_nothing() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, COOLDOWN);
        b.record(Admission::Allowed, false, t0);
        b.record(Admission::Allowed, true, t0);
        assert_eq!(
            b.state(t0),
            BreakerState::Open,
            "a late success does not close it"
        );
        let later = t0 + COOLDOWN;
        assert_eq!(b.admit(later), Admission::Probe);
        b.abandon(Admission::Probe);
        assert_eq!(b.admit(later), Admission::Probe);
    }
}
