//! The audio store: recordings' audio kept on local disk (`[cache.audio]`), since a
//! recording never changes once it exists.
//!
//! A request for a recording that is not stored joins the download under way for it, or
//! starts one: a task of its own that asks the box for the whole file and writes it to a
//! temporary file under `tmp/`, while every waiting client reads that file as it grows. A
//! client that hangs up does not stop the download. Once the body is complete (as long as
//! `Content-Length` said, or a cleanly ended chunked body) it is flushed, renamed into place
//! and indexed; an interrupted download is deleted, and the clients reading it see their
//! answer break off, never a short file passed off as whole. Box answers other than `200`
//! are passed on and not stored.
//!
//! The index is a moka cache weighed in file bytes with least-recently-used eviction; an
//! evicted file is deleted (a client still reading it keeps its open handle). At start-up the
//! directory is scanned in the background: whole files are indexed again, leftovers of
//! interrupted downloads deleted. A store that cannot be opened is reported, and audio is
//! passed through as without one.

mod directory;
pub mod file;
mod handoff;
pub mod range;
pub mod spill;
mod stream;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{
    CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_TYPE, ETAG, HeaderName, LAST_MODIFIED,
};
use tokio::sync::{OwnedSemaphorePermit, watch};

use self::file::{BODY_OFFSET, Meta};
pub use self::handoff::Handoff;
use self::spill::Spill;
pub use self::stream::FileStream;
use crate::config::AudioStoreConfig;
use crate::metrics::AudioStoreMetrics;
use crate::upstream::UpstreamError;

/// One recording of one account.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AudioKey {
    pub account: Arc<str>,
    pub queue_call_id: u64,
}

/// A recording on disk.
#[derive(Debug)]
pub struct Stored {
    pub path: PathBuf,
    pub meta: Meta,
}

/// A box answer other than a storable `200`, passed on to everyone who waited for it.
#[derive(Debug)]
pub struct BoxAnswer {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// How a download is going; every client waiting for it watches this.
#[derive(Debug, Clone)]
pub enum Progress {
    /// The box has not answered yet.
    Asking,
    /// The body is being written; `written` bytes of it have arrived, in `file` (or, from
    /// where the disk refused them, in `spill`).
    Writing {
        meta: Arc<Meta>,
        file: Arc<File>,
        written: u64,
        spill: Option<Arc<Spill>>,
    },
    /// All of it has arrived, in `file` and `spill` (stored, unless it was too large to keep
    /// or the disk refused part of it).
    Complete {
        meta: Arc<Meta>,
        file: Arc<File>,
        spill: Option<Arc<Spill>>,
    },
    /// The box's answer broke off; the partial file is gone.
    Broken(String),
    /// The box answered something else; not stored.
    Answered(Arc<BoxAnswer>),
    Failed(UpstreamError),
    /// The store could not keep the recording (no temporary file could be made, or no room
    /// for it on disk or in memory): the box's unread answer goes to one client that wants all
    /// of it, and every other client asks the box itself, as without a store.
    Unavailable(Option<Handoff>),
    /// The account's audio streams were all busy: nobody asked the box.
    Busy,
}

/// What a lookup found.
pub enum Found {
    /// A whole stored file, opened.
    Stored(Arc<Stored>, Arc<File>),
    /// A download to follow, and the [`Leader`] when this request must start it.
    Download(watch::Receiver<Progress>, Option<Leader>),
}

/// The right, and the duty, to run a download (see [`AudioStore::download`]). However it
/// ends (run to its end, never run, a panic) its drop takes the download out of the map and
/// leaves no client waiting.
pub struct Leader {
    key: AudioKey,
    progress: watch::Sender<Progress>,
    store: AudioStore,
    started: bool,
}

impl Drop for Leader {
    fn drop(&mut self) {
        let mut downloads = self
            .store
            .inner
            .downloads
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        downloads.remove(&self.key);
        drop(downloads);
        let started = self.started;
        self.progress.send_if_modified(|progress| match progress {
            Progress::Asking if !started => {
                *progress = Progress::Busy;
                true
            }
            Progress::Asking | Progress::Writing { .. } => {
                *progress = Progress::Broken("the download stopped".to_owned());
                true
            }
            _ => false,
        });
    }
}

/// The store: the directory, the index and the downloads under way.
#[derive(Clone)]
pub struct AudioStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    /// Held for as long as the store is open: see [`claim`].
    _lock: File,
    max_file_bytes: u64,
    index: moka::future::Cache<AudioKey, Arc<Stored>>,
    downloads: Mutex<HashMap<AudioKey, watch::Receiver<Progress>>>,
    metrics: AudioStoreMetrics,
    /// Whether the last attempt to store a download failed (a full disk): said once.
    failing: AtomicBool,
    /// The memory all downloads the disk refused may hold together.
    spill_budget: Arc<spill::Budget>,
}

impl std::fmt::Debug for AudioStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AudioStore")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl AudioStore {
    /// Open the store in `config.path` (made if missing) and start indexing what is there.
    /// `None`, with a warning, when the directory cannot be used.
    pub fn open(config: &AudioStoreConfig, metrics: AudioStoreMetrics) -> Option<Self> {
        let tmp = file::tmp_dir(&config.path);
        let lock = match directory::claim(&config.path) {
            Ok(lock) => lock,
            Err(why) => {
                tracing::warn!(
                    path = %config.path.display(),
                    reason = %why,
                    "the audio store's directory cannot be used; audio is passed through from the box, not stored"
                );
                return None;
            }
        };
        let made = std::fs::create_dir_all(&tmp)
            .and_then(|()| directory::clear(&tmp))
            .and_then(|()| {
                let probe = tmp.join(".probe");
                File::create(&probe)?;
                std::fs::remove_file(probe)
            });
        if let Err(error) = made {
            tracing::warn!(
                path = %config.path.display(),
                error = %error,
                "the audio store's directory cannot be used; audio is passed through from the box, not stored"
            );
            return None;
        }
        metrics.max_bytes.set(config.max_bytes as i64);
        // Weighed in KiB, so one weight (a u32) covers files up to 4 TiB.
        let index = moka::future::Cache::builder()
            .max_capacity(config.max_bytes / 1024)
            .weigher(|_: &AudioKey, stored: &Arc<Stored>| {
                let bytes = BODY_OFFSET + stored.meta.length.unwrap_or(0);
                u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
            })
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .support_invalidation_closures()
            .eviction_listener(|_, stored: Arc<Stored>, _| {
                // Every stored file has a name of its own, so this never removes a newer one.
                let _ = std::fs::remove_file(&stored.path);
            })
            .build();
        let store = Self {
            inner: Arc::new(Inner {
                dir: config.path.clone(),
                _lock: lock,
                max_file_bytes: config.max_file_bytes,
                index,
                downloads: Mutex::new(HashMap::new()),
                metrics,
                failing: AtomicBool::new(false),
                spill_budget: Arc::new(spill::Budget::new(config.max_memory_bytes)),
            }),
        };
        let scanning = store.clone();
        tokio::spawn(async move { scanning.scan().await });
        Some(store)
    }

    /// The stored file for `key`, or the download to follow (started by the caller when it is
    /// handed the [`Leader`]).
    pub async fn find(&self, key: &AudioKey) -> Found {
        loop {
            if let Some(stored) = self.inner.index.get(key).await {
                let path = stored.path.clone();
                match tokio::task::spawn_blocking(move || File::open(path)).await {
                    Ok(Ok(file)) => return Found::Stored(stored, Arc::new(file)),
                    // Removed behind the store's back: fetched again.
                    _ => self.inner.index.invalidate(key).await,
                }
            }
            if let Some(found) = self.join_or_lead(key) {
                return found;
            }
        }
    }

    /// The download under way for `key`, or a new one led by the caller; `None` when a
    /// download was stored since the index was read (the caller reads the index again).
    fn join_or_lead(&self, key: &AudioKey) -> Option<Found> {
        let mut downloads = self
            .inner
            .downloads
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(progress) = downloads.get(key) {
            return Some(Found::Download(progress.clone(), None));
        }
        // A download is indexed before it leaves the map: checked under the map's lock, so a
        // key is never downloaded twice because of that moment.
        if self.inner.index.contains_key(key) {
            return None;
        }
        let (progress, watching) = watch::channel(Progress::Asking);
        downloads.insert(key.clone(), watching.clone());
        let leader = Leader {
            key: key.clone(),
            progress,
            store: self.clone(),
            started: false,
        };
        Some(Found::Download(watching, Some(leader)))
    }

    /// Run the download `leader` was handed as a task of its own: `answer` asks the box for
    /// the whole file (or says why it could not), and the body is written as it arrives. It
    /// holds `permit` (the account's audio stream slot) until it ends.
    pub fn download(
        &self,
        mut leader: Leader,
        answer: impl Future<Output = Result<reqwest::Response, UpstreamError>> + Send + 'static,
        permit: OwnedSemaphorePermit,
        box_bytes: prometheus_client::metrics::counter::Counter,
    ) {
        let store = self.clone();
        leader.started = true;
        tokio::spawn(async move {
            let progress = &leader.progress;
            let response = match answer.await {
                Ok(response) => response,
                Err(error) => {
                    progress.send_replace(Progress::Failed(error));
                    return;
                }
            };
            if response.status() != http::StatusCode::OK {
                let answer = passed_on(response).await;
                progress.send_replace(answer);
                return;
            }
            let unread = store
                .write(leader.key.clone(), response, progress, box_bytes)
                .await;
            if let Some(response) = unread {
                let handoff = Handoff::new(response, permit);
                progress.send_replace(Progress::Unavailable(Some(handoff)));
            }
        });
    }

    /// Write a `200`'s body to a temporary file as it arrives, then store it. Gives the
    /// answer back unread when it can be kept neither on disk nor in memory.
    async fn write(
        &self,
        key: AudioKey,
        mut response: reqwest::Response,
        progress: &watch::Sender<Progress>,
        box_bytes: prometheus_client::metrics::counter::Counter,
    ) -> Option<reqwest::Response> {
        let mut meta = meta_of(&key, &response);
        let keep = meta.length.is_none_or(|l| l <= self.inner.max_file_bytes);
        let tmp = file::tmp_dir(&self.inner.dir).join(file::unique_name(key.queue_call_id));
        let Some(header) = meta.header() else {
            return Some(response);
        };
        let created = {
            let (tmp, length) = (tmp.clone(), meta.length);
            blocking(move || {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&tmp)?;
                // The recording's whole room, taken before its first byte, so that the disk
                // cannot fill half-way through it.
                if let Some(length) = length
                    && let Err(refused) = directory::reserve(&file, BODY_OFFSET + length)
                {
                    return Ok((file, Some(refused)));
                }
                file.write_all_at(&header, 0)?;
                Ok((file, None))
            })
            .await
        };
        // Set once the disk refuses a write: the rest of the body is kept in memory.
        let mut spill: Option<Arc<Spill>> = None;
        let file = match created {
            Ok((file, None)) => Arc::new(file),
            // No room for it: the recording is not stored, and the clients waiting for it
            // share one download from memory when it fits there; otherwise the answer is handed on.
            Ok((file, Some(error))) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                self.store_failed(&tmp, &error);
                let budget = self.inner.spill_budget.clone();
                match meta.length.and_then(|length| Spill::new(0, budget, length)) {
                    Some(all) => spill = Some(Arc::new(all)),
                    None => return Some(response),
                }
                Arc::new(file)
            }
            Err(error) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                self.store_failed(&tmp, &error);
                return Some(response);
            }
        };
        let shared = Arc::new(meta.clone());
        progress.send_replace(Progress::Writing {
            meta: shared.clone(),
            file: file.clone(),
            written: 0,
            spill: spill.clone(),
        });
        let mut written = 0u64;
        let broken = loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let len = chunk.len() as u64;
                    if spill.is_none() {
                        let (file, piece, offset) =
                            (file.clone(), chunk.clone(), BODY_OFFSET + written);
                        if let Err(error) =
                            blocking(move || file.write_all_at(&piece, offset)).await
                        {
                            match self.spill_from(&tmp, &error, written, meta.length, progress) {
                                Ok(spilled) => spill = Some(spilled),
                                Err(reason) => break Some(reason),
                            }
                        }
                    }
                    if let Some(spill) = &spill
                        && !spill.push(written, chunk)
                    {
                        break Some(format!(
                            "the disk refused {} from byte {}, and the memory for such downloads ({} bytes for all of them) is spent",
                            tmp.display(),
                            spill.from,
                            self.inner.spill_budget.limit()
                        ));
                    }
                    written += len;
                    box_bytes.inc_by(len);
                    progress.send_modify(|p| {
                        if let Progress::Writing { written: w, .. } = p {
                            *w = written;
                        }
                    });
                }
                Ok(None) => match meta.length {
                    Some(expected) if expected != written => {
                        break Some(format!("{written} of {expected} bytes arrived"));
                    }
                    _ => break None,
                },
                Err(error) => break Some(format!("the box's answer broke off: {error}")),
            }
        };
        if let Some(reason) = broken {
            tracing::warn!(account = %key.account, queue_call_id = key.queue_call_id, reason, "audio download interrupted; nothing stored");
            let _ = tokio::fs::remove_file(&tmp).await;
            progress.send_replace(Progress::Broken(reason));
            return None;
        }
        meta.length = Some(written);
        let complete = Arc::new(meta.clone());
        let keep = keep && written <= self.inner.max_file_bytes && spill.is_none();
        let stored = match keep {
            true => self.commit(&key, meta, file.clone(), tmp).await,
            false => {
                let _ = tokio::fs::remove_file(&tmp).await;
                false
            }
        };
        if stored {
            self.inner.metrics.downloads_stored.inc();
        }
        progress.send_replace(Progress::Complete {
            meta: complete,
            file,
            spill,
        });
        None
    }

    /// The disk refused the body from byte `at` on (`error`): a spill for the rest, for the
    /// clients following the download, when the memory for such downloads has room for it.
    fn spill_from(
        &self,
        tmp: &Path,
        error: &std::io::Error,
        at: u64,
        length: Option<u64>,
        progress: &watch::Sender<Progress>,
    ) -> Result<Arc<Spill>, String> {
        self.store_failed(tmp, error);
        let rest = length.map_or(0, |l| l.saturating_sub(at));
        let Some(spill) = Spill::new(at, self.inner.spill_budget.clone(), rest) else {
            return Err(format!("writing {}: {error}", tmp.display()));
        };
        let spill = Arc::new(spill);
        progress.send_modify(|p| {
            if let Progress::Writing { spill: s, .. } = p {
                *s = Some(spill.clone());
            }
        });
        Ok(spill)
    }

    /// Flush a complete download, rename it into place and index it.
    async fn commit(&self, key: &AudioKey, meta: Meta, file: Arc<File>, tmp: PathBuf) -> bool {
        let path = self.inner.dir.join(tmp.file_name().unwrap_or_default());
        let header = meta.header();
        let done = {
            let (tmp, path) = (tmp.clone(), path.clone());
            blocking(move || {
                if let Some(header) = header {
                    file.write_all_at(&header, 0)?;
                }
                file.sync_data()?;
                std::fs::rename(&tmp, &path)
            })
            .await
        };
        if let Err(error) = done {
            let _ = tokio::fs::remove_file(&tmp).await;
            self.store_failed(&path, &error);
            return false;
        }
        if self.inner.failing.swap(false, Ordering::Relaxed) {
            tracing::info!(dir = %self.inner.dir.display(), "the audio store stores recordings again");
        }
        self.insert(key.clone(), Stored { path, meta }).await;
        true
    }

    /// A recording the store could not take (a full disk): said once until one is stored.
    fn store_failed(&self, path: &Path, error: &std::io::Error) {
        self.inner.metrics.store_failures.inc();
        if self.inner.failing.swap(true, Ordering::Relaxed) {
            tracing::debug!(path = %path.display(), error = %error, "cannot store a recording");
            return;
        }
        tracing::warn!(
            path = %path.display(),
            error = %error,
            "cannot store recordings in the audio store (a full disk?): audio passes through from the box until one can be stored again"
        );
    }

    async fn insert(&self, key: AudioKey, stored: Stored) {
        let index = &self.inner.index;
        index.insert(key, Arc::new(stored)).await;
        // Evict now, so the directory stays within max_bytes.
        index.run_pending_tasks().await;
        self.publish();
    }

    fn publish(&self) {
        let index = &self.inner.index;
        let metrics = &self.inner.metrics;
        metrics.bytes.set((index.weighted_size() * 1024) as i64);
        metrics.files.set(index.entry_count() as i64);
    }

    /// Forget (and delete) every stored recording of `account`, or of every account: after a
    /// reload that points it at another box (the same id may be another recording there), or
    /// an operator's purge. How many there were.
    pub async fn invalidate_account(&self, account: Option<&str>) -> usize {
        let account: Option<Arc<str>> = account.map(Into::into);
        let matches = move |key: &AudioKey| account.as_ref().is_none_or(|a| key.account == *a);
        let index = &self.inner.index;
        let count = index.iter().filter(|(key, _)| matches(key)).count();
        let _ = index.invalidate_entries_if(move |key, _| matches(key));
        index.run_pending_tasks().await;
        self.publish();
        count
    }

    /// Forget (and delete) one stored recording; whether it was stored.
    pub async fn remove(&self, key: &AudioKey) -> bool {
        let removed = self.inner.index.remove(key).await.is_some();
        self.inner.index.run_pending_tasks().await;
        self.publish();
        removed
    }

    /// Index the whole files already in the directory, oldest first (so they are evicted
    /// first), and delete what is not whole.
    async fn scan(&self) {
        let dir = self.inner.dir.clone();
        let found = blocking(move || Ok(directory::stored(&dir)))
            .await
            .unwrap_or_default();
        let count = found.len();
        for (path, meta) in found {
            let key = AudioKey {
                account: meta.account.as_str().into(),
                queue_call_id: meta.queue_call_id,
            };
            let stored = Arc::new(Stored { path, meta });
            // A download that finished during the scan is newer: the older file goes.
            let entry = self
                .inner
                .index
                .entry(key)
                .or_insert_with(async { stored.clone() })
                .await;
            if !entry.is_fresh() {
                let _ = tokio::fs::remove_file(&stored.path).await;
            }
        }
        self.inner.index.run_pending_tasks().await;
        self.publish();
        tracing::info!(dir = %self.inner.dir.display(), recordings = count, "audio store indexed");
    }

    /// The stored recordings, their bytes and the bound, for the status page.
    pub fn usage(&self) -> (u64, u64, u64) {
        let index = &self.inner.index;
        let max = self.inner.metrics.max_bytes.get() as u64;
        (index.entry_count(), index.weighted_size() * 1024, max)
    }

    /// Wait until the index has settled (evictions done): for tests.
    pub async fn sync(&self) {
        self.inner.index.run_pending_tasks().await;
        self.publish();
    }
}

/// The box's non-`200` answer, its body read (up to 64 KiB) for every client that waited.
async fn passed_on(response: reqwest::Response) -> Progress {
    const LIMIT: usize = 64 * 1024;
    let status = response.status();
    let mut headers = http::HeaderMap::new();
    for name in [CONTENT_TYPE, CACHE_CONTROL] {
        if let Some(value) = response.headers().get(&name) {
            headers.insert(name, value.clone());
        }
    }
    let mut body = Vec::new();
    let mut response = response;
    while let Ok(Some(chunk)) = response.chunk().await {
        body.extend_from_slice(&chunk[..chunk.len().min(LIMIT - body.len())]);
        if body.len() >= LIMIT {
            break;
        }
    }
    Progress::Answered(Arc::new(BoxAnswer {
        status,
        headers,
        body: Bytes::from(body),
    }))
}

/// What a `200` from the box will be stored and served as.
fn meta_of(key: &AudioKey, response: &reqwest::Response) -> Meta {
    let header = |name: HeaderName| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() <= 512)
            .map(str::to_owned)
    };
    let length = response.content_length();
    let etag = header(ETAG)
        .filter(|tag| tag.starts_with('"') && tag.ends_with('"') && tag.len() > 1)
        .unwrap_or_else(|| match length {
            Some(length) => format!("\"mgw-{}-{length}\"", key.queue_call_id),
            None => format!("\"mgw-{}\"", key.queue_call_id),
        });
    let seconds = |time: SystemTime| {
        time.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    let last_modified = header(LAST_MODIFIED)
        .and_then(|date| httpdate::parse_http_date(&date).ok())
        .unwrap_or_else(SystemTime::now);
    Meta {
        account: key.account.to_string(),
        queue_call_id: key.queue_call_id,
        length,
        content_type: header(CONTENT_TYPE),
        content_disposition: header(CONTENT_DISPOSITION),
        cache_control: header(CACHE_CONTROL),
        etag,
        last_modified: seconds(last_modified),
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}
