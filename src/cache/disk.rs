//! The disk tier: stored entries kept in an embedded redb file, so that a restart or an
//! upgrade starts warm.
//!
//! Fills are written by one writer task in small transactions, each committed durably: the
//! writer gathers what arrives within [`BATCH_WINDOW`] into one commit, so a `kill -9` loses
//! at most the fills of that window, and a write costs what changed, never the whole cache. On
//! SIGTERM the server's drain ends with [`DiskTier::flush`], so nothing queued is lost. The
//! file holds at most `max_bytes` of records: past that, the least recently stored go first.
//! Ages are judged by this host's wall clock, the only clock a single instance has.
//!
//! A file that cannot be opened as this tier's store (corrupt, truncated, another program's,
//! or another user's, as when the gateway was once run as root) is moved aside with a warning
//! that says which and names both paths, and the gateway starts cold with a new one. It never
//! refuses to start because of its disk tier: when even a new file cannot be made, it runs
//! without one.
//!
//! A write that fails (a full disk, an I/O error) keeps the entries in memory and marks the
//! tier down, with one warning. redb refuses every later transaction of a handle that met an
//! I/O error, so the file is closed and opened again [`REOPEN_EVERY`] until that works (what
//! was committed is read back, as at a start), and the tier is up again with the next write
//! that succeeds.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::record::Record;
use super::tier::{Found, Scope};
use crate::config::DiskTierConfig;
use crate::metrics::TierMetrics;

/// Canonical key -> stored-at (unix ms, 8 bytes LE), keep-until (unix ms, 8 bytes LE), record.
const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries-v1");
/// Fills that arrive within this long of each other share one durable commit.
pub const BATCH_WINDOW: Duration = Duration::from_millis(200);
/// Bytes each stored record costs beyond its own (its key and the table's bookkeeping).
const OVERHEAD: u64 = 128;
/// After a failed write, how often the file is closed and opened again until that works.
pub const REOPEN_EVERY: Duration = Duration::from_secs(5);

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

enum Write {
    Put { key: String, value: Vec<u8> },
    Remove { scope: Scope },
    Flush(oneshot::Sender<()>),
}

/// The disk tier. Cheap to clone: clones share the file and its writer.
#[derive(Clone)]
pub struct DiskTier {
    inner: Arc<Inner>,
}

struct Inner {
    /// The open file; none between a failed write and the file's reopening.
    db: ArcSwapOption<Database>,
    /// Whether the last write succeeded.
    up: AtomicBool,
    writes: mpsc::UnboundedSender<Write>,
    metrics: TierMetrics,
    path: PathBuf,
}

impl std::fmt::Debug for DiskTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskTier")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

/// What the writer knows of the stored records, to keep them under `max_bytes`.
#[derive(Default)]
struct Index {
    /// Key -> (stored at, bytes).
    sizes: HashMap<String, (u64, u64)>,
    /// (stored at, key), oldest first.
    order: BTreeSet<(u64, String)>,
    bytes: u64,
}

impl Index {
    fn insert(&mut self, key: String, stored_at: u64, size: u64) {
        self.remove(&key);
        self.order.insert((stored_at, key.clone()));
        self.sizes.insert(key, (stored_at, size));
        self.bytes += size;
    }

    fn remove(&mut self, key: &str) {
        if let Some((at, size)) = self.sizes.remove(key) {
            self.order.remove(&(at, key.to_owned()));
            self.bytes -= size;
        }
    }

    fn oldest(&self) -> Option<String> {
        self.order.first().map(|(_, key)| key.clone())
    }
}

/// Why the store's file could not be opened.
#[derive(Debug)]
enum OpenError {
    /// Another process holds it (a gateway still closing it, or a second one).
    InUse,
    /// This user may not read or write it: made by another user (a gateway run as root once).
    Denied(std::io::Error),
    /// Not a store redb can use: corrupt, truncated, another program's.
    Unusable(String),
}

impl From<redb::DatabaseError> for OpenError {
    fn from(error: redb::DatabaseError) -> Self {
        match error {
            redb::DatabaseError::DatabaseAlreadyOpen => OpenError::InUse,
            redb::DatabaseError::Storage(redb::StorageError::Io(io))
                if io.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                OpenError::Denied(io)
            }
            other => OpenError::Unusable(other.to_string()),
        }
    }
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::InUse => f.write_str("in use by another process"),
            OpenError::Denied(error) => error.fmt(f),
            OpenError::Unusable(error) => f.write_str(error),
        }
    }
}

fn unusable(error: impl std::fmt::Display) -> OpenError {
    OpenError::Unusable(error.to_string())
}

/// Open the file at `path`, or say why it cannot be this tier's store.
fn open_store(path: &Path) -> Result<(Database, Index), OpenError> {
    let db = Database::create(path)?;
    let mut index = Index::default();
    let now = unix_ms(SystemTime::now());
    let mut spent = Vec::new();
    {
        let txn = db.begin_write().map_err(unusable)?;
        {
            let table = txn.open_table(ENTRIES).map_err(unusable)?;
            for item in table.iter().map_err(unusable)? {
                let (key, value) = item.map_err(unusable)?;
                let value = value.value();
                let (Some(stored), Some(until)) = (field(value, 0), field(value, 8)) else {
                    spent.push(key.value().to_owned());
                    continue;
                };
                if until <= now {
                    spent.push(key.value().to_owned());
                } else {
                    index.insert(
                        key.value().to_owned(),
                        stored,
                        value.len() as u64 + OVERHEAD,
                    );
                }
            }
        }
        {
            let mut table = txn.open_table(ENTRIES).map_err(unusable)?;
            for key in &spent {
                table.remove(key.as_str()).map_err(unusable)?;
            }
        }
        txn.commit().map_err(unusable)?;
    }
    Ok((db, index))
}

/// [`open_store`] on the blocking pool: it reads every stored key, and redb may repair the file.
async fn open_blocking(path: &Path) -> Result<(Database, Index), OpenError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || open_store(&path))
        .await
        .unwrap_or_else(|error| Err(unusable(error)))
}

fn field(value: &[u8], at: usize) -> Option<u64> {
    let bytes: [u8; 8] = value.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

impl DiskTier {
    /// The tier for `config`; `None` (after a warning) when no store can be opened or made.
    /// The file is read on the blocking pool, and a wait for another holder to let go of it
    /// never blocks the runtime (that holder may be a task of this very process).
    pub async fn open(config: &DiskTierConfig, metrics: TierMetrics) -> Option<Self> {
        let path = &config.path;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Err(error) = std::fs::create_dir_all(dir)
        {
            tracing::warn!(path = %dir.display(), error = %error, "cannot create the disk tier's directory: running without a disk tier");
            return None;
        }
        // A gateway that is still closing the file (a restart in progress) lets go of it
        // within moments.
        let mut opened = open_blocking(path).await;
        for _ in 0..20 {
            match &opened {
                Err(OpenError::InUse) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    opened = open_blocking(path).await;
                }
                _ => break,
            }
        }
        // What is wrong with the file, and the word its name gets when it is moved aside.
        let (problem, label) = match &opened {
            Ok(_) => ("", ""),
            Err(OpenError::InUse) => {
                tracing::warn!(path = %path.display(), "the disk tier's file is in use by another gateway process: running without a disk tier");
                return None;
            }
            Err(OpenError::Denied(error)) if !path.exists() => {
                tracing::warn!(path = %path.display(), error = %error, "cannot create the disk tier's file: its directory is not writable by this user: running without a disk tier");
                return None;
            }
            Err(OpenError::Denied(_)) => (
                "this user may not open the disk tier's file (was the gateway run as root once?)",
                "other-user",
            ),
            Err(OpenError::Unusable(_)) => (
                "the disk tier's file is not a usable store (corrupt, truncated or another program's)",
                "corrupt",
            ),
        };
        let (db, index) = match opened {
            Ok(opened) => opened,
            Err(error) => {
                let aside = aside_path(path, label);
                if let Err(rename) = std::fs::rename(path, &aside) {
                    tracing::warn!(path = %path.display(), error = %error, rename = %rename, "{problem}, and it cannot be moved aside: running without a disk tier");
                    return None;
                }
                tracing::warn!(
                    path = %path.display(),
                    moved_to = %aside.display(),
                    error = %error,
                    "{problem}: moved aside, starting cold with a new one"
                );
                match open_blocking(path).await {
                    Ok(opened) => opened,
                    Err(error) => {
                        tracing::warn!(path = %path.display(), error = %error, "cannot make a new disk tier file: running without a disk tier");
                        return None;
                    }
                }
            }
        };
        tracing::info!(
            path = %path.display(),
            entries = index.sizes.len(),
            bytes = index.bytes,
            "disk tier opened"
        );
        metrics.up.set(1);
        let (writes, queue) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            db: ArcSwapOption::from_pointee(db),
            up: AtomicBool::new(true),
            writes,
            metrics,
            path: path.clone(),
        });
        tokio::spawn(write_loop(
            Arc::downgrade(&inner),
            queue,
            index,
            config.max_bytes,
        ));
        Some(Self { inner })
    }

    /// Whether its writes succeed (the last one did).
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Relaxed)
    }

    pub fn metrics(&self) -> &TierMetrics {
        &self.inner.metrics
    }

    /// The record stored under `key`, and how long ago it was stored.
    pub(super) async fn read(&self, key: String) -> Option<Found> {
        let db = self.inner.db.load_full()?;
        let read = tokio::task::spawn_blocking(move || -> Result<Option<Vec<u8>>, String> {
            let txn = db.begin_read().map_err(|e| e.to_string())?;
            let table = match txn.open_table(ENTRIES) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(e.to_string()),
            };
            let value = table.get(key.as_str()).map_err(|e| e.to_string())?;
            Ok(value.map(|v| v.value().to_vec()))
        })
        .await;
        let value = match read {
            Ok(Ok(value)) => value?,
            Ok(Err(error)) => {
                self.inner.metrics.errors.inc();
                tracing::warn!(error = %error, "disk tier read failed");
                return None;
            }
            Err(_) => return None,
        };
        let now = unix_ms(SystemTime::now());
        let (stored, until) = (field(&value, 0)?, field(&value, 8)?);
        if until <= now {
            return None;
        }
        Some(Found {
            bytes: value[16..].to_vec(),
            elapsed: Duration::from_millis(now.saturating_sub(stored)),
        })
    }

    /// Queue `record` for `key`; it is on disk within [`BATCH_WINDOW`].
    pub(super) fn store(&self, key: String, record: &Record) {
        let now = SystemTime::now();
        let mut value = Vec::with_capacity(16 + record.bytes.len());
        value.extend_from_slice(&unix_ms(now).to_le_bytes());
        value.extend_from_slice(&unix_ms(now + record.keep_for).to_le_bytes());
        value.extend_from_slice(&record.bytes);
        let _ = self.inner.writes.send(Write::Put { key, value });
    }

    /// Queue the removal of every record in `scope`.
    pub(super) fn remove_matching(&self, scope: Scope) {
        let _ = self.inner.writes.send(Write::Remove { scope });
    }

    /// Wait until everything queued so far is on disk.
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.inner.writes.send(Write::Flush(done)).is_ok() {
            let _ = flushed.await;
        }
    }
}

/// `cache.redb` -> `cache.redb.<label>-<unix seconds>` (`corrupt`, `other-user`).
fn aside_path(path: &Path, label: &str) -> PathBuf {
    let seconds = unix_ms(SystemTime::now()) / 1000;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{label}-{seconds}"));
    path.with_file_name(name)
}

/// The writer: gathers the writes of one [`BATCH_WINDOW`] into one durable commit; after a
/// failed one, opens the file again every [`REOPEN_EVERY`] until that works.
async fn write_loop(
    tier: Weak<Inner>,
    mut queue: mpsc::UnboundedReceiver<Write>,
    index: Index,
    max_bytes: u64,
) {
    let index = Arc::new(Mutex::new(index));
    let mut reopen_at: Option<tokio::time::Instant> = None;
    loop {
        let first = match reopen_at {
            Some(at) => match tokio::time::timeout_at(at, queue.recv()).await {
                Ok(first) => first,
                Err(_) => {
                    let Some(inner) = tier.upgrade() else { return };
                    reopen_at = reopen(inner, index.clone()).await;
                    continue;
                }
            },
            None => queue.recv().await,
        };
        let Some(first) = first else { return };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + BATCH_WINDOW;
        // A flush ends the window at once: whoever waits for it waits for the disk only.
        while !matches!(batch.last(), Some(Write::Flush(_))) {
            match tokio::time::timeout_at(deadline, queue.recv()).await {
                Ok(Some(write)) => batch.push(write),
                Ok(None) | Err(_) => break,
            }
        }
        // Only the tier holds the file open, so that it is closed the moment the tier goes:
        // the writer holds it only while it commits, and lets whoever waits for a flush go
        // once it holds it no more.
        let Some(inner) = tier.upgrade() else { return };
        if reopen_at.is_some_and(|at| at <= tokio::time::Instant::now()) {
            reopen_at = reopen(inner.clone(), index.clone()).await;
        }
        // No file open (it failed and could not be opened again yet): the entries stay in
        // memory, and whoever waits for a flush is let go.
        let Some(db) = inner.db.load_full() else {
            continue;
        };
        let (held, counted) = (index.clone(), inner.metrics.clone());
        let (flushed, batch) = batch
            .into_iter()
            .partition::<Vec<_>, _>(|write| matches!(write, Write::Flush(_)));
        let committed = tokio::task::spawn_blocking(move || {
            let mut index = held.lock().unwrap_or_else(|e| e.into_inner());
            commit(&db, batch, &mut index, max_bytes, &counted)
        })
        .await;
        note_commit(&inner, committed, &mut reopen_at);
        drop(inner);
        for write in flushed {
            if let Write::Flush(done) = write {
                let _ = done.send(());
            }
        }
    }
}

/// Mark the tier up or down by how its last commit went; after a failed one, when to open
/// the file again.
fn note_commit(
    inner: &Inner,
    committed: Result<Result<(), String>, tokio::task::JoinError>,
    reopen_at: &mut Option<tokio::time::Instant>,
) {
    match committed {
        Ok(Ok(())) if !inner.up.swap(true, Ordering::Relaxed) => {
            inner.metrics.up.set(1);
            tracing::info!(path = %inner.path.display(), "disk tier writes again");
        }
        Ok(Ok(())) | Err(_) => {}
        Ok(Err(error)) => {
            inner.metrics.errors.inc();
            if inner.up.swap(false, Ordering::Relaxed) {
                inner.metrics.up.set(0);
                tracing::warn!(
                    path = %inner.path.display(),
                    error = %error,
                    "disk tier write failed (a full disk?): the entries stay in memory; the file is opened again every {} until a write succeeds",
                    humantime::format_duration(REOPEN_EVERY)
                );
            } else {
                tracing::debug!(error = %error, "disk tier write failed again");
            }
            // redb refuses every later transaction of a handle that met an I/O error.
            inner.db.store(None);
            *reopen_at = Some(tokio::time::Instant::now() + REOPEN_EVERY);
        }
    }
}

/// Open the tier's file again after a failed write (on the blocking pool: redb may repair
/// it first), reading back what was committed; when that fails too, when to try next.
async fn reopen(inner: Arc<Inner>, index: Arc<Mutex<Index>>) -> Option<tokio::time::Instant> {
    let path = inner.path.clone();
    match tokio::task::spawn_blocking(move || open_store(&path)).await {
        Ok(Ok((db, reread))) => {
            *index.lock().unwrap_or_else(|e| e.into_inner()) = reread;
            inner.db.store(Some(Arc::new(db)));
            tracing::debug!(path = %inner.path.display(), "disk tier file opened again");
            None
        }
        Ok(Err(error)) => {
            tracing::debug!(error = %error, "the disk tier's file cannot be opened again yet");
            Some(tokio::time::Instant::now() + REOPEN_EVERY)
        }
        Err(_) => Some(tokio::time::Instant::now() + REOPEN_EVERY),
    }
}

fn commit(
    db: &Database,
    batch: Vec<Write>,
    index: &mut Index,
    max_bytes: u64,
    metrics: &TierMetrics,
) -> Result<(), String> {
    let mut stored = 0;
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut table = txn.open_table(ENTRIES).map_err(|e| e.to_string())?;
        for write in batch {
            match write {
                Write::Put { key, value } => {
                    let size = value.len() as u64 + OVERHEAD;
                    if size > max_bytes {
                        continue;
                    }
                    table
                        .insert(key.as_str(), value.as_slice())
                        .map_err(|e| e.to_string())?;
                    index.insert(key, field(&value, 0).unwrap_or(0), size);
                    stored += 1;
                    while index.bytes > max_bytes {
                        let Some(oldest) = index.oldest() else { break };
                        table.remove(oldest.as_str()).map_err(|e| e.to_string())?;
                        index.remove(&oldest);
                    }
                }
                Write::Remove { scope } => {
                    let keys: Vec<String> = index
                        .sizes
                        .keys()
                        .filter(|key| scope.matches(key))
                        .cloned()
                        .collect();
                    for key in keys {
                        table.remove(key.as_str()).map_err(|e| e.to_string())?;
                        index.remove(&key);
                    }
                }
                // Answered by the writer once the commit is done.
                Write::Flush(_) => {}
            }
        }
    }
    txn.commit().map_err(|e| e.to_string())?;
    metrics.stores.inc_by(stored);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file another handle of this process holds is waited for without blocking the
    /// runtime, so the task holding it can let go (a writer still closing the file when the
    /// tier is opened again).
    #[tokio::test]
    async fn a_file_held_by_a_task_of_this_runtime_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.redb");
        let held = Database::create(&path).unwrap();
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            drop(held);
        });
        let config = DiskTierConfig {
            path,
            max_bytes: 1 << 20,
        };
        let metrics = crate::metrics::Metrics::new().tier("disk");
        let tier = DiskTier::open(&config, metrics).await;
        assert!(tier.is_some(), "opened once the other handle let go");
    }

    /// What `open` does with a file it cannot open depends on why: wait for a gateway still
    /// closing it, name the owner problem, or move a broken file aside.
    #[test]
    fn open_errors_are_told_apart() {
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let storage = |io| redb::DatabaseError::Storage(redb::StorageError::Io(io));
        assert!(matches!(
            OpenError::from(redb::DatabaseError::DatabaseAlreadyOpen),
            OpenError::InUse
        ));
        assert!(matches!(
            OpenError::from(storage(denied)),
            OpenError::Denied(_)
        ));
        let truncated = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert!(matches!(
            OpenError::from(storage(truncated)),
            OpenError::Unusable(_)
        ));
        let corrupt = redb::StorageError::Corrupted("bad magic".into());
        let error = OpenError::from(redb::DatabaseError::Storage(corrupt));
        assert!(matches!(&error, OpenError::Unusable(text) if text.contains("bad magic")));
    }
}
