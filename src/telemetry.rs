//! The tracing subscriber: the only process-wide state the gateway sets.
//!
//! Logs go to stderr as text (colours only on a terminal) or as one JSON object per line.
//! `RUST_LOG` selects levels and targets; the default is `info`. The access log is the target
//! `miralix_gateway::access`, so `RUST_LOG=info,miralix_gateway::access=off` silences it.
//!
//! The audit log (who read which agent's list, cache purges and refreshes, refused admin calls)
//! is the target `miralix_gateway::audit`. With `log.audit_file` it goes to that file instead of
//! stderr, as JSON lines, whatever `RUST_LOG` says; the file is opened for appending and opened
//! again on every reload (SIGHUP), so log rotation only needs to move it and send SIGHUP.
//!
//! When stderr is the journal (systemd's `JOURNAL_STREAM` names it), each line starts with its
//! syslog priority (`<4>` for a warning), which journald takes as the entry's priority and
//! strips: `journalctl -p warning` finds the warnings, and journald's rate limit, kept per
//! priority, cannot let a flood of access lines crowd them out.
//!
//! The access log never holds up a request: its lines go through a bounded queue to a thread
//! of their own, which writes them out in batches. Should the reader (journald, a pipe) fall
//! behind by [`ACCESS_QUEUE_LINES`], further lines are dropped and counted
//! (`miralix_gateway_access_log_dropped_lines_total`, and a warning every
//! [`DROP_REPORT_EVERY`] while it lasts). Every other line, warnings and the audit log
//! among them, is written at once and never dropped.

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, StderrLock, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{FilterExt, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::writer::MakeWriterExt;

pub use crate::config::LogFormat;

/// The tracing target of the one event per request.
pub const ACCESS_LOG: &str = "miralix_gateway::access";
/// The one rustls message left out of the log by default (see [`init`]).
const QUIET_SNI: &str = "rustls::msgs::handshake=error";

/// Access-log lines waiting for their writer at most (a few hundred bytes each).
pub const ACCESS_QUEUE_LINES: usize = 8192;
/// How the access log's writer batches lines: one write of up to this many bytes.
const ACCESS_BATCH_BYTES: usize = 64 * 1024;
/// How often dropped access lines are reported while lines are being dropped.
pub const DROP_REPORT_EVERY: Duration = Duration::from_secs(10);

/// The access log's writer, made with its first line: a process whose access log is off
/// (as under `RUST_LOG=warn`) never starts its thread or allocates its queue.
static ACCESS_WRITER: OnceLock<NonBlocking> = OnceLock::new();
/// What keeps the access log's thread, until [`LogGuard`] is dropped.
static ACCESS_THREAD: Mutex<Option<WorkerGuard>> = Mutex::new(None);
/// The access log's count of dropped lines, once its writer is made.
static ACCESS_DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// The access log's lines: into the bounded queue of its own thread, made on first use.
struct AccessLog;

impl<'a> MakeWriter<'a> for AccessLog {
    type Writer = NonBlocking;

    fn make_writer(&'a self) -> Self::Writer {
        ACCESS_WRITER
            .get_or_init(|| {
                let (access, thread) = NonBlockingBuilder::default()
                    .lossy(true)
                    .buffered_lines_limit(ACCESS_QUEUE_LINES)
                    .thread_name("access-log")
                    .finish(io::BufWriter::with_capacity(
                        ACCESS_BATCH_BYTES,
                        io::stderr(),
                    ));
                let _ = ACCESS_DROPPED.set(access.error_counter());
                *ACCESS_THREAD.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread);
                access
            })
            .clone()
    }
}

/// Whether [`init`] has installed the subscriber (and with it the access log's writer).
static INSTALLED: OnceLock<()> = OnceLock::new();

/// Access-log lines dropped so far because their reader fell behind; `None` without [`init`].
pub fn access_lines_dropped() -> Option<u64> {
    INSTALLED.get()?;
    Some(
        ACCESS_DROPPED
            .get()
            .map_or(0, |count| count.dropped_lines() as u64),
    )
}

/// Warn every [`DROP_REPORT_EVERY`] in which access lines were dropped. Runs until dropped.
pub async fn report_dropped_access_lines() {
    let mut reported = access_lines_dropped().unwrap_or_default();
    let mut every = tokio::time::interval(DROP_REPORT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let dropped = access_lines_dropped().unwrap_or_default();
        if dropped > reported {
            tracing::warn!(
                dropped = dropped - reported,
                "access log lines dropped in the last {}: their reader (journald, a pipe) took them more slowly than requests came, and lines are dropped rather than requests held up (RUST_LOG=info,miralix_gateway::access=warn turns the access log off)",
                humantime::format_duration(DROP_REPORT_EVERY)
            );
            reported = dropped;
        }
    }
}

/// Keeps the access log's writer thread until dropped; dropping it writes out what is queued.
#[must_use = "dropping it stops the access log's writer"]
pub struct LogGuard;

impl Drop for LogGuard {
    fn drop(&mut self) {
        let thread = ACCESS_THREAD
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(thread);
    }
}

/// The tracing target of the audit log: who read which agent's list or which recording.
pub const AUDIT_LOG: &str = "miralix_gateway::audit";

/// The audit log file; cheap to clone, and every clone writes to the file last opened.
#[derive(Clone)]
pub struct AuditFile {
    path: PathBuf,
    file: Arc<ArcSwap<File>>,
}

impl std::fmt::Debug for AuditFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditFile")
            .field("path", &self.path)
            .finish()
    }
}

impl AuditFile {
    /// Open `path` for appending, creating it readable by the owner and group only.
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            path: path.to_owned(),
            file: Arc::new(ArcSwap::from_pointee(open_append(path)?)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Open the path again (after log rotation moved the file); on failure the old file stays.
    pub fn reopen(&self) -> io::Result<()> {
        self.file.store(Arc::new(open_append(&self.path)?));
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
}

/// One event's write: the whole line goes out in one `write` on an append-only file.
pub struct AuditWriter(Arc<File>);

impl Write for AuditWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.0).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self.0).flush()
    }
}

impl<'a> MakeWriter<'a> for AuditFile {
    type Writer = AuditWriter;

    fn make_writer(&'a self) -> Self::Writer {
        AuditWriter(self.file.load_full())
    }
}

/// stderr, for the log: each line in one write, prefixed with its syslog priority when stderr
/// is the journal.
#[derive(Debug, Clone, Copy)]
struct Stderr {
    journal: bool,
}

impl Stderr {
    fn new() -> Self {
        Self {
            journal: std::env::var("JOURNAL_STREAM").is_ok_and(|named| is_stderr(&named)),
        }
    }
}

/// Whether `named` (`JOURNAL_STREAM`: device and inode, in decimal, with a colon between) is
/// this process's stderr, rather than a stream a parent was given and stderr later redirected.
fn is_stderr(named: &str) -> bool {
    let Some((dev, ino)) = named.split_once(':') else {
        return false;
    };
    let Ok(meta) = io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .and_then(|fd| File::from(fd).metadata())
    else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// The syslog priority prefix journald reads for an event of `level` (`<3>` error to `<7>`
/// debug); none for info, the stream's own default.
fn priority(level: tracing::Level) -> Option<&'static [u8]> {
    match level {
        tracing::Level::ERROR => Some(b"<3>"),
        tracing::Level::WARN => Some(b"<4>"),
        tracing::Level::INFO => None,
        tracing::Level::DEBUG | tracing::Level::TRACE => Some(b"<7>"),
    }
}

/// One event's line on stderr, under stderr's lock.
struct StderrLine {
    lock: StderrLock<'static>,
    prefix: Option<&'static [u8]>,
}

impl Write for StderrLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(prefix) = self.prefix.take() else {
            return self.lock.write(buf);
        };
        // Prefix and line in one write: a journal entry is the stream up to a newline.
        let mut line = Vec::with_capacity(prefix.len() + buf.len());
        line.extend_from_slice(prefix);
        line.extend_from_slice(buf);
        self.lock.write_all(&line)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.lock.flush()
    }
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = StderrLine;

    fn make_writer(&'a self) -> Self::Writer {
        StderrLine {
            lock: io::stderr().lock(),
            prefix: None,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        StderrLine {
            lock: io::stderr().lock(),
            prefix: self.journal.then(|| priority(*meta.level())).flatten(),
        }
    }
}

/// Install the global subscriber. Fails only if one is already installed. Keep the guard for
/// as long as the process logs.
pub fn init(
    format: LogFormat,
    audit: Option<AuditFile>,
) -> Result<LogGuard, tracing_subscriber::util::TryInitError> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // rustls warns on every handshake whose client sends an IP address as SNI (RFC 6066 allows
    // host names only; it is ignored and the one certificate is served). Internal apps that
    // connect by address do that on every connection: not the operator's to act on, so kept
    // out of the log unless RUST_LOG names rustls itself.
    if !std::env::var("RUST_LOG").is_ok_and(|value| value.contains("rustls")) {
        filter = filter.add_directive(QUIET_SNI.parse().expect("a valid directive"));
    }
    // With an audit file, audit events go there and not to stderr.
    let separate = audit.is_some();
    // Targets, not a closure: its interest is decided once per callsite, so a disabled
    // `enabled!` or event costs a cached lookup on the hit path, not a filter call.
    let everything = Targets::new().with_default(tracing::level_filters::LevelFilter::TRACE);
    let stderr_filter = filter.and(match separate {
        true => everything.with_target(AUDIT_LOG, tracing::level_filters::LevelFilter::OFF),
        false => everything,
    });
    // Access lines are info, which goes to the journal without a prefix.
    let writer = AccessLog
        .with_filter(|meta: &tracing::Metadata<'_>| meta.target() == ACCESS_LOG)
        .or_else(Stderr::new());
    let stderr = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(stderr_filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            // The span list alone: `span` would repeat its last element on every line.
            .with_current_span(false)
            .with_span_list(true)
            .with_writer(writer)
            .with_filter(stderr_filter)
            .boxed(),
    };
    let audit = audit.map(|file| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(file)
            .with_filter(Targets::new().with_target(AUDIT_LOG, tracing::Level::INFO))
    });
    tracing_subscriber::registry()
        .with(stderr)
        .with(audit)
        .try_init()?;
    let _ = INSTALLED.set(());
    Ok(LogGuard)
}
