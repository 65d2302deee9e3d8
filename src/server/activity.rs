//! What a connection's task knows of its requests: how many are in flight, when the last was
//! answered and the next head began, how many the client cancelled, and from these, when the
//! connection has idled past its limits (`Activity::next_idle_check`, a pure function of `now`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::ServerConfig;

/// Requests in flight on one connection, and when the last one ended; requests started and
/// cancelled by the client before their answer.
pub(super) struct Activity {
    in_flight: AtomicUsize,
    /// When the connection was accepted; `last_done` counts from here.
    opened: Instant,
    /// When the last request was answered, in nanoseconds after `opened`.
    last_done: AtomicU64,
    /// When the first bytes since the last answer (or the start) arrived, in nanoseconds
    /// after `opened`; 0 while none have: the start of the next request head, on HTTP/1.
    head_began: AtomicU64,
    pub(super) requests: AtomicUsize,
    pub(super) cancelled: AtomicUsize,
    /// Raised once the client has cancelled too many of its requests.
    pub(super) too_many_cancelled: tokio::sync::Notify,
    /// Set when the server stops: answers from then on close the connection.
    pub(super) stopping: AtomicBool,
    /// Set by the connection's first HTTP/2 request (see `Activity::next_idle_check`).
    http2: AtomicBool,
}

/// One request until its handler has produced an answer. Dropped before that, the client
/// cancelled it (an HTTP/2 stream reset, a closed connection): a client that keeps starting
/// requests only to cancel them makes the gateway, and maybe the box, work for nothing
/// ("rapid reset", "made you reset").
pub(super) struct Answering {
    activity: Arc<Activity>,
    max_cancelled: usize,
    answered: bool,
}

impl Answering {
    pub(super) fn new(activity: Arc<Activity>, max_cancelled: usize) -> Self {
        activity.requests.fetch_add(1, Ordering::AcqRel);
        Self {
            activity,
            max_cancelled,
            answered: false,
        }
    }

    /// The handler produced an answer; whether the server is stopping by now.
    pub(super) fn answered(mut self) -> bool {
        self.answered = true;
        self.activity.stopping.load(Ordering::Acquire)
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let cancelled = self.activity.cancelled.fetch_add(1, Ordering::AcqRel) + 1;
        let requests = self.activity.requests.load(Ordering::Acquire);
        if too_many_cancelled(cancelled, requests, self.max_cancelled) {
            self.activity.too_many_cancelled.notify_one();
        }
    }
}

/// At least `max` cancelled, and more than half of all requests: a client whose requests are
/// mostly answered may cancel some now and then.
fn too_many_cancelled(cancelled: usize, requests: usize, max: usize) -> bool {
    cancelled >= max && cancelled * 2 > requests
}

/// Marks a request as in flight until dropped, even if the client goes away mid-request.
pub(super) struct Busy(Arc<Activity>);

impl Busy {
    /// The request came over HTTP/2: from now on the connection may idle `server.idle_timeout`.
    pub(super) fn mark_http2(&self) {
        self.0.http2.store(true, Ordering::Relaxed);
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let done = self.0.since_opened(Instant::now());
        self.0.last_done.store(done, Ordering::Release);
        // The next head begins with the next bytes. Bytes of it already read (a client that
        // pipelines) are a head hyper reads at once, or a partial one held to `idle_timeout`
        // until more arrive.
        self.0.head_began.store(0, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    pub(super) fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            opened: Instant::now(),
            last_done: AtomicU64::new(0),
            head_began: AtomicU64::new(0),
            requests: AtomicUsize::new(0),
            cancelled: AtomicUsize::new(0),
            too_many_cancelled: tokio::sync::Notify::new(),
            stopping: AtomicBool::new(false),
            http2: AtomicBool::new(false),
        }
    }

    pub(super) fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    /// `at` in nanoseconds after `opened`, at least 1 (0 stands for "not yet").
    fn since_opened(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.opened).as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX).max(1)
    }

    fn at(&self, nanos: u64) -> Instant {
        self.opened + Duration::from_nanos(nanos)
    }

    /// The transport read some bytes. The first since the last answer begin the next request
    /// head: one clock reading per request, where a timer would be armed and dropped.
    pub(super) fn bytes_arrived(&self) {
        if self.head_began.load(Ordering::Relaxed) == 0 {
            let now = self.since_opened(Instant::now());
            self.head_began.store(now, Ordering::Release);
        }
    }

    /// When the connection is next checked for idleness, or `None` when it has been idle past
    /// its limit and closes now:
    ///
    /// - before its first request, the client has `server.header_read_timeout` from the
    ///   connection's start to send a whole head (and no more than `server.idle_timeout`);
    /// - once it has made an HTTP/2 request, it may idle `server.idle_timeout` after its last
    ///   answer;
    /// - an HTTP/1 connection kept alive may wait `server.idle_timeout` after its last answer
    ///   for the first byte of its next request, and from that byte has
    ///   `server.header_read_timeout` to send the rest of the head, so a client that trickles
    ///   a head in, or sends half of one, is closed when that runs out. A first byte wakes no
    ///   timer: the check comes again a head timeout later at most;
    /// - with a request in flight, a head timeout from now, when it is checked again.
    ///
    /// hyper could enforce the head timeout itself, but arms and drops a timer for every
    /// request to do it, which cost about a tenth of the user-space CPU of a hit at 7,000
    /// requests/s (bench/README.md, "What was tried"), and counts the wait for the next
    /// request's first byte against it.
    pub(super) fn next_idle_check(&self, limits: IdleLimits, now: Instant) -> Option<Instant> {
        let IdleLimits { idle, head } = limits;
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Some(now + head.min(idle));
        }
        let last_done = self.at(self.last_done.load(Ordering::Acquire));
        let head_began = self.head_began.load(Ordering::Acquire);
        let (deadline, recheck) = if self.requests.load(Ordering::Acquire) == 0 {
            (self.opened + head.min(idle), None)
        } else if self.http2.load(Ordering::Relaxed) {
            (last_done + idle, None)
        } else if head_began != 0 {
            (self.at(head_began) + head, None)
        } else {
            (last_done + idle, Some(now + head))
        };
        (deadline > now).then(|| recheck.map_or(deadline, |at| at.min(deadline)))
    }
}

/// The two limits on a connection with no request in flight (see `Activity::next_idle_check`).
#[derive(Clone, Copy)]
pub(super) struct IdleLimits {
    /// `server.idle_timeout`.
    idle: Duration,
    /// `server.header_read_timeout`.
    head: Duration,
}

impl IdleLimits {
    pub(super) fn of(settings: &ServerConfig) -> Self {
        Self {
            idle: settings.idle_timeout,
            head: settings.header_read_timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_closed_only_when_most_of_many_requests_were_cancelled() {
        assert!(!too_many_cancelled(99, 100, 100));
        assert!(too_many_cancelled(100, 100, 100));
        assert!(too_many_cancelled(100, 199, 100));
        assert!(!too_many_cancelled(100, 200, 100), "half is not most");
        assert!(
            !too_many_cancelled(500, 10_000, 100),
            "a busy, mostly answered client"
        );
    }

    const LIMITS: IdleLimits = IdleLimits {
        idle: Duration::from_secs(60),
        head: Duration::from_secs(10),
    };

    /// An activity with one HTTP/1 request answered `done` after the connection opened.
    fn answered_at(done: Duration) -> Arc<Activity> {
        let activity = Arc::new(Activity::new());
        activity.requests.store(1, Ordering::Release);
        let at = activity.opened + done;
        activity
            .last_done
            .store(activity.since_opened(at), Ordering::Release);
        activity
    }

    #[test]
    fn a_new_connection_has_the_head_timeout_for_its_first_request() {
        let activity = Activity::new();
        let start = activity.opened;
        assert_eq!(
            activity.next_idle_check(LIMITS, start),
            Some(start + LIMITS.head)
        );
        assert_eq!(activity.next_idle_check(LIMITS, start + LIMITS.head), None);
    }

    #[test]
    fn a_kept_alive_http1_connection_waits_idle_timeout_for_its_next_first_byte() {
        let activity = answered_at(Duration::from_secs(1));
        let done = activity.opened + Duration::from_secs(1);
        // Checked again a head timeout on, in case a head begins meanwhile; open until then.
        let later = done + LIMITS.head * 3;
        assert_eq!(
            activity.next_idle_check(LIMITS, later),
            Some(later + LIMITS.head)
        );
        assert_eq!(
            activity.next_idle_check(LIMITS, done + LIMITS.idle - Duration::from_secs(1)),
            Some(done + LIMITS.idle)
        );
        assert_eq!(activity.next_idle_check(LIMITS, done + LIMITS.idle), None);
    }

    #[test]
    fn a_begun_head_has_the_head_timeout_from_its_first_byte() {
        let activity = answered_at(Duration::from_secs(1));
        let first_byte = activity.opened + Duration::from_secs(40);
        activity
            .head_began
            .store(activity.since_opened(first_byte), Ordering::Release);
        let deadline = first_byte + LIMITS.head;
        assert_eq!(activity.next_idle_check(LIMITS, first_byte), Some(deadline));
        assert_eq!(activity.next_idle_check(LIMITS, deadline), None);
    }

    #[test]
    fn an_answer_ends_the_head_and_a_request_in_flight_is_never_idle() {
        let activity = Arc::new(Activity::new());
        activity.requests.store(1, Ordering::Release);
        activity.bytes_arrived();
        let busy = activity.begin();
        let much_later = activity.opened + LIMITS.idle * 10;
        assert_eq!(
            activity.next_idle_check(LIMITS, much_later),
            Some(much_later + LIMITS.head)
        );
        drop(busy);
        assert_eq!(activity.head_began.load(Ordering::Acquire), 0);
        let now = Instant::now();
        assert!(activity.next_idle_check(LIMITS, now).is_some());
    }

    #[test]
    fn an_http2_connection_idles_idle_timeout_after_its_last_answer() {
        let activity = answered_at(Duration::from_secs(1));
        activity.http2.store(true, Ordering::Relaxed);
        let done = activity.opened + Duration::from_secs(1);
        assert_eq!(
            activity.next_idle_check(LIMITS, done + LIMITS.head * 2),
            Some(done + LIMITS.idle)
        );
        assert_eq!(activity.next_idle_check(LIMITS, done + LIMITS.idle), None);
    }
}
