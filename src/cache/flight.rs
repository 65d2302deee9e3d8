//! Fetches in progress, one per key: the map that coalesces concurrent misses.
//!
//! A request that finds no flight for its key leads one; later requests join it and are woken
//! with its result. The map sits behind a plain mutex that is never held across an `.await`:
//! every operation here is a short critical section. A flight leaves the map when its fetch
//! has stored its result (or its first answer, [`Flight::land_first`]), or when everyone
//! waiting for it has gone ([`Waiters::gone`]); a fetch task that ends without either (it was
//! cancelled) removes its flight in `Drop` and releases its waiters with
//! [`UpstreamError::Aborted`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use super::{CacheKey, FetchResult};
use crate::upstream::UpstreamError;

type Sender = watch::Sender<Option<FetchResult>>;
pub(super) type Receiver = watch::Receiver<Option<FetchResult>>;

/// The flights in progress. Cheap to clone: clones share the map.
#[derive(Clone, Default)]
pub(super) struct Flights {
    map: Arc<Mutex<HashMap<CacheKey, Sender>>>,
    /// How many flights landed with a first answer whose fill is still finishing its entry.
    finishing: Arc<watch::Sender<usize>>,
}

/// What a request finds for its key.
pub(super) enum Joined {
    /// A flight was already under way: wait on it.
    Follower(Receiver),
    /// None was: this request leads the new one and must start its fetch.
    Leader(Flight, Receiver),
}

impl Flights {
    fn lock(&self) -> MutexGuard<'_, HashMap<CacheKey, Sender>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Join the key's flight, or register a new one that the caller leads.
    pub(super) fn join_or_lead(&self, key: &CacheKey) -> Joined {
        let mut map = self.lock();
        if let Some(sender) = map.get(key) {
            return Joined::Follower(sender.subscribe());
        }
        let (sender, receiver) = watch::channel(None);
        map.insert(key.clone(), sender.clone());
        Joined::Leader(self.flight(key, sender), receiver)
    }

    /// Register a flight nobody waits for (a background refresh), unless the key has one.
    pub(super) fn lead_unwatched(&self, key: &CacheKey) -> Option<Flight> {
        let mut map = self.lock();
        if map.contains_key(key) {
            return None;
        }
        let (sender, _) = watch::channel(None);
        map.insert(key.clone(), sender.clone());
        Some(self.flight(key, sender))
    }

    fn flight(&self, key: &CacheKey, sender: Sender) -> Flight {
        Flight {
            key: key.clone(),
            sender,
            flights: self.clone(),
            landed: false,
        }
    }

    /// Remove `sender`'s flight from the map, if it is still the one registered for `key`.
    fn remove(&self, key: &CacheKey, sender: &Sender) {
        let mut map = self.lock();
        if map.get(key).is_some_and(|s| s.same_channel(sender)) {
            map.remove(key);
        }
    }

    /// Requests waiting on a flight, leaders and followers alike.
    pub(super) fn waiting(&self) -> usize {
        self.lock()
            .values()
            .map(watch::Sender::receiver_count)
            .sum()
    }

    /// Flights in progress, background refreshes and fills still finishing the entry they
    /// answered with first included.
    pub(super) fn len(&self) -> usize {
        self.lock().len() + *self.finishing.borrow()
    }

    /// Completes once no fill is finishing the entry its flight landed with.
    pub(super) async fn finished(&self) {
        let mut finishing = self.finishing.subscribe();
        // The sender lives in `self`: the wait cannot fail.
        let _ = finishing.wait_for(|n| *n == 0).await;
    }
}

/// One flight, owned by the task that runs its fetch.
pub(super) struct Flight {
    key: CacheKey,
    sender: Sender,
    flights: Flights,
    /// The result was handed to the waiters.
    landed: bool,
}

impl Flight {
    /// Who waits for this flight, for a fetch that may give up when nobody does.
    pub(super) fn waiters(&self) -> Waiters {
        Waiters(Some(Watched {
            key: self.key.clone(),
            sender: self.sender.clone(),
            flights: self.flights.clone(),
        }))
    }

    /// [`Flight::land`] with the box's checked bytes, stored already, before their compressed
    /// copy and parsed list are made: a request arriving afterwards finds that provisional
    /// entry, or, once it is purged or stale, starts a fetch of its own. The flight still
    /// counts in [`Flights::len`] until the returned guard, held while the entry is finished,
    /// is dropped.
    pub(super) fn land_first(self, answer: FetchResult) -> Finishing {
        let finishing = self.flights.finishing.clone();
        // Counted before the flight leaves the map, so the count never reads zero between.
        finishing.send_modify(|n| *n += 1);
        self.land(answer);
        Finishing(finishing)
    }

    /// Leave the map, then wake every waiter with `result`. The caller stores the result
    /// first, so a request arriving in between joins this flight and one arriving after
    /// finds what was stored.
    pub(super) fn land(mut self, result: FetchResult) {
        self.flights.remove(&self.key, &self.sender);
        self.sender.send_replace(Some(result));
        self.landed = true;
    }
}

/// A fill finishing the entry its flight answered with first (see [`Flight::land_first`]).
pub(super) struct Finishing(Arc<watch::Sender<usize>>);

impl Drop for Finishing {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        if !self.landed {
            self.flights.remove(&self.key, &self.sender);
            self.sender.send_replace(Some(Err(UpstreamError::Aborted)));
        }
    }
}

/// Who still waits for a fetch. A fetch queued for a box slot gives up when
/// [`Waiters::gone`] completes, so clients that hung up, reset their stream or timed out
/// leave no work behind for the box.
pub struct Waiters(Option<Watched>);

/// The requests subscribed to a miss's flight.
struct Watched {
    key: CacheKey,
    sender: Sender,
    flights: Flights,
}

impl Waiters {
    /// For a fetch that must run whoever waits: a background refresh or an operator's refresh.
    pub fn always() -> Self {
        Waiters(None)
    }

    /// Completes once nobody waits any more, and withdraws the flight from the map at that
    /// moment, so a request arriving afterwards leads a fetch of its own instead of joining one
    /// that is being dropped. Never completes for [`Waiters::always`].
    pub async fn gone(&self) {
        let Some(Watched {
            key,
            sender,
            flights,
        }) = &self.0
        else {
            return std::future::pending().await;
        };
        loop {
            sender.closed().await;
            // Followers subscribe under this lock, so the count cannot rise while it is held.
            let mut map = flights.lock();
            if sender.receiver_count() == 0 {
                if map.get(key).is_some_and(|s| s.same_channel(sender)) {
                    map.remove(key);
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::key;

    #[test]
    fn the_first_request_leads_and_the_rest_follow_until_it_lands() {
        let flights = Flights::default();
        let Joined::Leader(flight, leader) = flights.join_or_lead(&key("1")) else {
            panic!("the first request leads");
        };
        let Joined::Follower(follower) = flights.join_or_lead(&key("1")) else {
            panic!("the second follows");
        };
        assert!(matches!(
            flights.join_or_lead(&key("2")),
            Joined::Leader(..)
        ));
        assert_eq!(
            flights.waiting(),
            3 - 1,
            "key 2's leader dropped its receiver"
        );
        assert!(
            flights.lead_unwatched(&key("1")).is_none(),
            "one flight per key"
        );
        flight.land(Err(UpstreamError::RejectedSecret));
        for receiver in [leader, follower] {
            assert!(matches!(
                *receiver.borrow(),
                Some(Err(UpstreamError::RejectedSecret))
            ));
        }
        // Key 2's flight was dropped unlanded: gone from the map as well.
        assert_eq!(flights.len(), 0);
        assert!(matches!(
            flights.join_or_lead(&key("1")),
            Joined::Leader(..)
        ));
    }

    #[test]
    fn a_flight_dropped_before_it_lands_releases_its_waiters() {
        let flights = Flights::default();
        let flight = flights.lead_unwatched(&key("1")).unwrap();
        let Joined::Follower(follower) = flights.join_or_lead(&key("1")) else {
            panic!("joins the refresh");
        };
        drop(flight);
        assert!(matches!(
            *follower.borrow(),
            Some(Err(UpstreamError::Aborted))
        ));
        assert_eq!(flights.len(), 0);
    }

    #[test]
    fn a_flight_landed_first_counts_until_its_entry_is_finished() {
        let flights = Flights::default();
        let Joined::Leader(flight, receiver) = flights.join_or_lead(&key("1")) else {
            panic!("leads");
        };
        let finishing = flight.land_first(Err(UpstreamError::RejectedSecret));
        assert!(matches!(
            *receiver.borrow(),
            Some(Err(UpstreamError::RejectedSecret))
        ));
        assert_eq!(flights.len(), 1, "still finishing");
        assert!(
            matches!(flights.join_or_lead(&key("1")), Joined::Leader(..)),
            "a new request no longer joins it"
        );
        drop(finishing);
        assert_eq!(flights.len(), 0);
    }

    #[test]
    fn a_late_landing_leaves_a_newer_flight_alone() {
        let flights = Flights::default();
        let Joined::Leader(old, receiver) = flights.join_or_lead(&key("1")) else {
            panic!("leads");
        };
        drop(receiver);
        // Withdrawn (as when its waiters left), and a new request leads a new flight.
        flights.remove(&key("1"), &old.sender);
        let Joined::Leader(_new, _receiver) = flights.join_or_lead(&key("1")) else {
            panic!("a new flight");
        };
        old.land(Err(UpstreamError::Abandoned));
        assert_eq!(flights.len(), 1, "the newer flight stays");
    }
}
