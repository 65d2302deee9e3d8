//! What a fetch's task does with what it brings: the entry it makes (lifetime, entity tag,
//! gzip copy, the too-large rule), stored in memory and written through to the second tier,
//! a failure remembered for the backoff, and the flight landed: with the box's checked bytes
//! as soon as they are stored, when a compressed copy or a parsed list is still to be made,
//! or else with the finished entry.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use http::StatusCode;

use super::flight::{Finishing, Flight};
use super::policy::{self, Lifetime};
use super::tier::{FetchTerms, Filled};
use super::{
    CacheKey, CachedResponse, Failure, FetchKind, FetchResult, Fetched, Previous, ResponseCache,
    StoredList, background, conditional, encoding, weight,
};
use crate::recordings::RecordingList;
use crate::upstream::UpstreamError;

#[cfg(test)]
thread_local! {
    /// Tests only: while set, an entry finished for nobody by a task on this thread (a
    /// `#[tokio::test]` runs its tasks on its own thread) waits until the sender says `true`,
    /// so a test can act while the entry is still being finished, whatever the timing.
    pub(super) static FINISH_GATE: std::cell::RefCell<Option<tokio::sync::watch::Receiver<bool>>> =
        const { std::cell::RefCell::new(None) };
}

/// Who waits for an entry being finished, which decides where its gzip copy and parse are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// A client: made at normal priority, on the worker (see `encoding::gzip_for_storage`).
    Client,
    /// Nobody: the entry's clients were answered with its first bytes already. Made in one job
    /// on a background thread at the lowest CPU priority (see `cache::background`), or as for
    /// a client when those threads have enough waiting.
    Nobody,
}

/// How a fill's answer from the box went out to its waiting clients.
enum Answered {
    /// Finished first; the flight is still waiting for it.
    Finished(Arc<CachedResponse>, Flight),
    /// The flight landed with this first answer (stored, provisional), to be finished yet;
    /// the guard counts the fill as in flight meanwhile.
    First {
        first: Arc<CachedResponse>,
        finishing: Finishing,
        unparsed: Option<Instant>,
    },
}

/// Where a fill's flight stands once the box's answer is in.
enum Landing {
    /// Still waiting: landed once the entry is stored (or the failure remembered).
    Waiting(Flight),
    /// Landed early with this provisional entry; the guard counts the fill as in flight until
    /// the finished entry has replaced it.
    Landed {
        first: Arc<CachedResponse>,
        _finishing: Finishing,
    },
}

impl ResponseCache {
    /// Run `fetch` for `flight` as a task of its own (through the fleet's lease when the tier
    /// is shared), store what it brings by the policy, and land the flight with it.
    pub(super) fn spawn_fetch<Fut>(
        &self,
        key: CacheKey,
        flight: Flight,
        (kind, terms): (FetchKind, FetchTerms),
        fetch: Fut,
        previous: Previous,
    ) where
        Fut: Future<Output = Result<Fetched, UpstreamError>> + Send + 'static,
    {
        let cache = self.clone();
        tokio::spawn(async move {
            // The fetch runs in a task of its own so that a panic in it still releases the
            // waiters below instead of leaving the key in flight forever.
            let fetch = async move {
                tokio::spawn(fetch)
                    .await
                    .unwrap_or(Err(UpstreamError::Aborted))
            };
            let filled = cache
                .fill_from_box(&key, kind == FetchKind::Forced, terms, fetch)
                .await;
            let (result, generation, from_box, flight) = match filled {
                Ok(Filled::Box(Ok(fetched), generation)) => {
                    let status = fetched.reply.status.as_u16();
                    // An operator's refresh answers with the finished entry.
                    let early = kind != FetchKind::Forced;
                    match cache
                        .answer_first(&key, fetched, &previous, flight, early)
                        .await
                    {
                        Answered::Finished(entry, flight) => (
                            Ok(entry),
                            generation,
                            Some(status),
                            Landing::Waiting(flight),
                        ),
                        Answered::First {
                            first,
                            finishing,
                            unparsed,
                        } => {
                            // Written through as the clients got it (the reader parses and
                            // compresses every record anyway): the fleet waiting on the
                            // lease, or a restart, never waits for a finishing that runs
                            // at the lowest priority and may come late.
                            let answer = Ok(first.clone());
                            cache.write_through(&key, generation, &answer, status, unparsed);
                            let entry = cache
                                .finish(
                                    &key,
                                    CachedResponse::clone(&first),
                                    unparsed,
                                    Waiting::Nobody,
                                )
                                .await;
                            let landed = Landing::Landed {
                                first,
                                _finishing: finishing,
                            };
                            (Ok(entry), None, None, landed)
                        }
                    }
                }
                Ok(Filled::Box(Err(error), generation)) => {
                    let status = error.status().as_u16();
                    (
                        Err(error),
                        generation,
                        Some(status),
                        Landing::Waiting(flight),
                    )
                }
                Ok(Filled::Tier(entry)) => (Ok(entry), None, None, Landing::Waiting(flight)),
                Err(error) => (Err(error), None, None, Landing::Waiting(flight)),
            };
            let provisional = match &flight {
                Landing::Landed { first, .. } => Some(first),
                Landing::Waiting(_) => None,
            };
            cache.keep(&key, &result, provisional).await;
            // Not written through yet (an entry that landed first was, as it landed; whether
            // memory still holds it decides nothing there: a purge reaches the tier too).
            if let Some(status) = from_box {
                cache.write_through(&key, generation, &result, status, None);
            }
            // Stored first, then landed (unless it landed with the first answer): a request
            // arriving in between joins this flight, one arriving after finds the stored entry
            // (or the failure).
            if let Landing::Waiting(flight) = flight {
                flight.land(result);
            }
        });
    }

    /// Store a fill's `result` by the policy, or remember its failure for the backoff. An entry
    /// that replaces the `provisional` one its flight landed with (stored, and the key's
    /// failure forgotten, when it was handed out) is stored only if memory still holds that
    /// one; when it does not (the key was purged, or a newer answer stored, while the entry
    /// was finishing), nothing is stored.
    async fn keep(
        &self,
        key: &CacheKey,
        result: &FetchResult,
        provisional: Option<&Arc<CachedResponse>>,
    ) {
        let config = self.config.load_full();
        // What later requests for the key meet during the backoff, if anything.
        let backoff = match result {
            Ok(entry) if entry.lifetime.is_some() => {
                if let Some(first) = provisional {
                    self.store.replace(key, first, Some(entry.clone())).await;
                    return;
                }
                self.failures.invalidate(key).await;
                self.store.insert(key.clone(), entry.clone()).await;
                None
            }
            Ok(entry) if entry.too_large => {
                // The first answer may have been stored before its weight was known.
                match provisional {
                    Some(first) if !self.store.replace(key, first, None).await => return,
                    Some(_) => {}
                    None => {
                        self.store.remove(key).await;
                    }
                }
                // Those who waited get the answer; the box is not asked for it again until
                // the backoff has passed, so one oversized agent cannot hammer it.
                self.warn_too_large(key, entry).await;
                Some(UpstreamError::TooLargeToCache {
                    weight: u64::from(weight::entry(key, entry)),
                    limit: config.max_entry_bytes,
                    retry_after: config.error_backoff,
                })
            }
            Ok(_) => None,
            // Nobody asked for it any more: not a failure of the key.
            Err(UpstreamError::Abandoned) => None,
            Err(error) => Some(error.clone()),
        };
        if let Some(error) = backoff.filter(|_| !config.error_backoff.is_zero()) {
            let failure = Failure {
                error,
                at: self.clock.now(),
            };
            self.failures.insert(key.clone(), Arc::new(failure)).await;
        }
    }

    /// What the box sent, answered. When a compressed copy or a parsed list is still to be
    /// made for an answer that is stored (and `early` allows it), the checked bytes are stored
    /// as a provisional entry (which later requests hit) and the flight lands with them, so
    /// the waiting clients are answered at once; the caller finishes the entry afterwards.
    /// Otherwise the entry is finished first and the flight is handed back still waiting: an
    /// answer that is not stored is finished before anyone gets it.
    async fn answer_first(
        &self,
        key: &CacheKey,
        fetched: Fetched,
        previous: &Previous,
        flight: Flight,
        early: bool,
    ) -> Answered {
        let unparsed = fetched.unparsed;
        let first = self.first_answer(key, fetched, previous.as_deref());
        if !(early && first.provisional && first.lifetime.is_some()) {
            let entry = self.finish(key, first, unparsed, Waiting::Client).await;
            return Answered::Finished(entry, flight);
        }
        let first = Arc::new(first);
        self.failures.invalidate(key).await;
        self.store.insert(key.clone(), first.clone()).await;
        let finishing = flight.land_first(Ok(first.clone()));
        Answered::First {
            first,
            finishing,
            unparsed,
        }
    }

    /// Log, once per key, that an answer was too large to store.
    async fn warn_too_large(&self, key: &CacheKey, entry: &CachedResponse) {
        if self.warned_too_large.contains_key(key) {
            return;
        }
        self.warned_too_large.insert(key.clone(), ()).await;
        tracing::warn!(
            account = %key.account,
            subject = %key.query.subject,
            bytes = weight::entry(key, entry),
            max_entry_bytes = self.config.load().max_entry_bytes,
            "an answer is too large to cache: served, not stored, and fetched again at most once per cache.error_backoff; raise cache.max_entry_bytes (or cache.max_bytes) to cache it"
        );
    }

    /// The entry for a fetched answer as the waiting clients get it at once: its lifetime
    /// and entity tag, and the previous entry's compressed copy when the body is the same
    /// bytes (a refresh that brought nothing new). `provisional` when a compressed copy or a
    /// parsed list is still to be made (by [`ResponseCache::finish`]).
    pub(super) fn first_answer(
        &self,
        key: &CacheKey,
        fetched: Fetched,
        previous: Option<&CachedResponse>,
    ) -> CachedResponse {
        let Fetched {
            reply,
            list,
            ttl,
            unparsed,
        } = fetched;
        let config = self.config.load();
        let now = self.clock.now();
        let ok_ttl = ttl.unwrap_or(config.ttl);
        let lifetime = policy::ttl_for(reply.status, ok_ttl, &config).map(|ttl| Lifetime {
            fetched_at: now,
            ttl,
            stale_while_revalidate: config.stale_while_revalidate,
            stale_if_error: config.stale_if_error,
        });
        let stored_list = lifetime.is_some() && reply.status == StatusCode::OK;
        let same_bytes = previous.filter(|p| p.etag.is_some() && p.body == reply.body);
        let etag = stored_list.then(|| match same_bytes {
            Some(previous) => previous.etag.clone(),
            None => Some(conditional::entity_tag(&reply.body)),
        });
        let gzip = same_bytes
            .and_then(|p| p.gzip.clone())
            .filter(|_| config.gzip);
        let compress =
            stored_list && gzip.is_none() && encoding::worth_compressing(&reply.body, &config);
        let will_list = list.is_some() || (unparsed.is_some() && reply.status == StatusCode::OK);
        let retain_for = lifetime.map(|l| match will_list {
            true => l.servable_for().max(config.full_refresh_interval),
            false => l.servable_for(),
        });
        let mut entry = CachedResponse {
            lifetime,
            retain_for,
            etag: etag.flatten(),
            gzip,
            // Kept even when not stored: this one answer may still be selected from.
            list,
            status: reply.status,
            content_type: reply.content_type,
            body: reply.body,
            fetched_at: now,
            too_large: false,
            from_tier: None,
            provisional: compress || (unparsed.is_some() && reply.status == StatusCode::OK),
        };
        mark_too_large(key, &mut entry, config.max_entry_bytes);
        entry
    }

    /// The entry to store and land: the first answer with its compressed copy and, for a full
    /// list the box sent whole (`unparsed`), its parsed elements. An entry weighing more than
    /// `max_entry_bytes` is marked `too_large` and given no lifetime: it is served, not stored.
    /// When nobody is waiting for it, the parse and the compression run as one job on a
    /// background thread.
    async fn finish(
        &self,
        key: &CacheKey,
        mut entry: CachedResponse,
        unparsed: Option<Instant>,
        waiting: Waiting,
    ) -> Arc<CachedResponse> {
        #[cfg(test)]
        if waiting == Waiting::Nobody
            && let Some(mut gate) = FINISH_GATE.with(|gate| gate.borrow().clone())
        {
            let _ = gate.wait_for(|open| *open).await;
        }
        let config = self.config.load_full();
        let fetched_whole_at = unparsed.filter(|_| entry.status == StatusCode::OK);
        let stored_list = entry.lifetime.is_some() && entry.status == StatusCode::OK;
        let compress = stored_list
            && entry.gzip.is_none()
            && encoding::worth_compressing(&entry.body, &config);
        let parse = fetched_whole_at.is_some();
        let queued = match waiting {
            Waiting::Nobody if parse || compress => {
                let (body, level) = (entry.body.clone(), config.gzip_level);
                background::try_run(move || {
                    let parsed = parse.then(|| RecordingList::parse(&body)).flatten();
                    let gzip = compress
                        .then(|| encoding::gzip_copy(&body, level))
                        .flatten();
                    (parsed, gzip)
                })
            }
            _ => None,
        };
        let (parsed, gzip) = match queued {
            // A panic in the job (its answer never comes) leaves the entry unparsed and
            // uncompressed, as a parse that found no list would.
            Some(answer) => answer.await.unwrap_or_default(),
            None => {
                let parsed = parse.then(|| RecordingList::parse(&entry.body)).flatten();
                let gzip = match compress {
                    true => encoding::gzip_for_storage(&entry.body, &config).await,
                    false => None,
                };
                (parsed, gzip)
            }
        };
        if let Some(fetched_whole_at) = fetched_whole_at {
            entry.list = parsed.map(|recordings| StoredList {
                recordings: Arc::new(recordings),
                fetched_whole_at,
            });
            if entry.list.is_none()
                && let (Some(lifetime), Some(retain_for)) = (entry.lifetime, &mut entry.retain_for)
            {
                // Not a list of recordings after all: kept no longer than it can be served.
                *retain_for = lifetime.servable_for();
            }
        }
        if compress {
            entry.gzip = gzip;
        }
        entry.provisional = false;
        mark_too_large(key, &mut entry, config.max_entry_bytes);
        Arc::new(entry)
    }
}

/// An entry weighing more than `max_entry_bytes` is served, not stored: no lifetime, no tag.
fn mark_too_large(key: &CacheKey, entry: &mut CachedResponse, max_entry_bytes: u64) {
    if entry.lifetime.is_some() && u64::from(weight::entry(key, entry)) > max_entry_bytes {
        entry.too_large = true;
        entry.lifetime = None;
        entry.retain_for = None;
        entry.etag = None;
    }
}
