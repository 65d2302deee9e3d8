//! Accept loops, connection lifecycle and graceful shutdown.
//!
//! The caller binds the listeners and passes them in with a shutdown future, so tests run the
//! whole server on port 0. Each listener has its own accept loop:
//!
//! - A connection needs a permit before it is accepted: `server.max_connections` for the public
//!   listeners, a small fixed number for the admin listener so metrics stay reachable under
//!   load. Beyond the cap, clients wait in the kernel's backlog instead of being refused.
//! - On the public listener, TLS (when configured) must complete within
//!   `server.tls_handshake_timeout`, using the acceptor in force at accept time: a reload
//!   changes the certificate for new connections only.
//! - hyper-util's auto builder serves HTTP/1.1 and HTTP/2 (ALPN `h2`, or prior knowledge on
//!   plain listeners). A connection with no request in flight for `server.idle_timeout` is
//!   closed gracefully; a request head must arrive whole within `server.header_read_timeout`
//!   of the connection's start, and on a kept-alive HTTP/1 connection within that time of its
//!   first byte (see `Activity::next_idle_check`).
//!
//! When the shutdown future completes, every loop stops accepting and closes its listener, and
//! open connections finish their in-flight requests (HTTP/1 closes after the response, HTTP/2
//! sends GOAWAY) within `server.shutdown_grace`; whatever is still open then is cut off.

mod activity;
mod woken;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use self::activity::{Activity, Answering, IdleLimits};
use self::woken::Woken;

use crate::auth::ClientCert;
use crate::gateway::{AppState, Peer, handle, handle_admin};
use http_body_util::Either;

/// Open connections on the admin listener at most.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// The listeners the gateway serves, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// The route; HTTPS when `server.tls` is configured.
    pub public: TcpListener,
    /// The route over plain HTTP beside an HTTPS `public` (`server.plain_listen`).
    pub plain: Option<TcpListener>,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub admin: TcpListener,
}

impl Listeners {
    /// Bind every listener the configuration names; errors name the address and its key.
    pub async fn bind(config: &crate::config::Config) -> Result<Self, BindError> {
        let plain = match config.server.plain_listen {
            Some(addr) => Some(bind(addr, "server.plain_listen").await?),
            None => None,
        };
        Ok(Self {
            public: bind(config.server.listen, "server.listen").await?,
            plain,
            admin: bind(config.admin.listen, "admin.listen").await?,
        })
    }
}

/// A listener that could not be bound. `Display` names the address and its key (the cause is
/// the source, printed once after it); a busy port says what to do.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({key}){}", self.hint())]
pub struct BindError {
    pub addr: SocketAddr,
    pub key: &'static str,
    #[source]
    pub source: std::io::Error,
}

impl BindError {
    fn hint(&self) -> &'static str {
        match self.source.kind() {
            std::io::ErrorKind::AddrInUse => {
                ": another process listens there; stop it, or pick another port (port 0, e.g. 127.0.0.1:0, takes a free one)"
            }
            std::io::ErrorKind::PermissionDenied => {
                ": ports below 1024 need CAP_NET_BIND_SERVICE (the systemd unit grants it)"
            }
            _ => "",
        }
    }
}

async fn bind(addr: SocketAddr, key: &'static str) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, key, source })
}

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listener {
    Public,
    Plain,
    Admin,
}

/// Serve every listener until `shutdown` completes, then drain and return.
pub async fn run(listeners: Listeners, state: Arc<AppState>, shutdown: impl Future<Output = ()>) {
    state.open_tier().await;
    state.open_audio();
    state.keep_sampling();
    let max_connections = state.generation().config.server.max_connections;
    let public_permits = Arc::new(Semaphore::new(max_connections));
    let admin_permits = Arc::new(Semaphore::new(ADMIN_MAX_CONNECTIONS));
    let (stop, stopped) = watch::channel(false);
    let (closed, mut all_closed) = mpsc::channel::<()>(3);
    tracing::info!(
        public = %local(&listeners.public),
        plain = listeners.plain.as_ref().map(local),
        admin = %local(&listeners.admin),
        tls = state.generation().tls.is_some(),
        accounts = state.generation().accounts.len(),
        "miralix-gateway serving"
    );
    let mut loops = JoinSet::new();
    let mut spawn = |listener, kind, permits| {
        let accept = AcceptLoop {
            listener,
            kind,
            permits,
            state: state.clone(),
            stop: stopped.clone(),
            closed: closed.clone(),
        };
        loops.spawn(accept.run());
    };
    spawn(listeners.public, Listener::Public, public_permits.clone());
    if let Some(plain) = listeners.plain {
        spawn(plain, Listener::Plain, public_permits);
    }
    spawn(listeners.admin, Listener::Admin, admin_permits);
    drop(closed);
    state.set_ready(true);

    shutdown.await;
    stop.send_replace(true);
    // Every loop reports once its listener is closed: from then on connects are refused.
    while all_closed.recv().await.is_some() {}
    state.set_ready(false);
    tracing::info!("stopped accepting; draining open connections");
    while loops.join_next().await.is_some() {}
    tracing::info!("all connections closed");
    // Entries still being finished after their answer (on the background threads) are
    // stored and queued for the second tier first, within the grace.
    let grace = state.generation().config.server.shutdown_grace;
    if tokio::time::timeout(grace, state.cache.finished())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "entries still being finished after shutdown_grace; they are not written to the second tier"
        );
    }
    // What the disk tier has queued is written before the process goes: a SIGTERM loses
    // nothing.
    state.cache.flush().await;
}

/// Completes once shutdown has been requested (or the server is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await; drop it here.
    let _ = stop.wait_for(|stop| *stop).await;
}

fn local(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|e| format!("<{e}>"), |a| a.to_string())
}

struct AcceptLoop {
    listener: TcpListener,
    kind: Listener,
    permits: Arc<Semaphore>,
    state: Arc<AppState>,
    stop: watch::Receiver<bool>,
    closed: mpsc::Sender<()>,
}

impl AcceptLoop {
    async fn run(mut self) {
        let mut connections = JoinSet::new();
        loop {
            let permit = tokio::select! {
                permit = self.permits.clone().acquire_owned() => {
                    permit.expect("the semaphore is never closed")
                }
                () = stopped(&mut self.stop) => break,
            };
            let (stream, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    // Out of file descriptors and the like: transient, so keep accepting.
                    Err(error) => {
                        tracing::warn!(%error, listener = ?self.kind, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = stopped(&mut self.stop) => break,
            };
            while connections.try_join_next().is_some() {}
            let span = tracing::info_span!("conn", client.addr = %peer, listener = ?self.kind);
            let connection = Connection {
                kind: self.kind,
                peer: Peer {
                    addr: peer,
                    cert: None,
                },
                state: self.state.clone(),
                stop: self.stop.clone(),
                _permit: permit,
            };
            // Boxed: a connection's future is still a few KiB (the TLS handshake's state), and
            // tokio copies a task's future into its cell when it is spawned and its stage again
            // when it ends; a box is copied once.
            connections.spawn(Box::pin(connection.serve(stream)).instrument(span));
        }
        drop(self.listener);
        drop(self.closed);
        let grace = self.state.generation().config.server.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                listener = ?self.kind,
                open = connections.len(),
                ?grace,
                "connections still open after shutdown_grace; closing them"
            );
            connections.abort_all();
        }
    }
}

/// One accepted connection; holds its permit until it ends.
struct Connection {
    kind: Listener,
    peer: Peer,
    state: Arc<AppState>,
    stop: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
}

impl Connection {
    async fn serve(mut self, stream: TcpStream) {
        // Responses are small and written whole; waiting for more data only adds latency.
        let _ = stream.set_nodelay(true);
        let generation = self.state.generation();
        let handshake_timeout = generation.config.server.tls_handshake_timeout;
        match (self.kind, generation.tls.clone()) {
            (Listener::Public, Some(acceptor)) => {
                drop(generation);
                match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        // Present only when the acceptor required one and rustls verified it.
                        if let Some(der) =
                            tls.get_ref().1.peer_certificates().and_then(|c| c.first())
                        {
                            match ClientCert::from_der(der) {
                                Ok(cert) => self.peer.cert = Some(Arc::new(cert)),
                                Err(error) => {
                                    tracing::warn!(%error, "closing a connection whose verified client certificate cannot be read");
                                    return;
                                }
                            }
                        }
                        // Boxed: the TLS stream makes this future large, and a plain
                        // connection should not carry (and copy) its room.
                        Box::pin(self.serve_http(tls)).await
                    }
                    Ok(Err(error)) => tracing::debug!(%error, "TLS handshake failed"),
                    Err(_) => tracing::debug!(?handshake_timeout, "TLS handshake timed out"),
                }
            }
            _ => {
                drop(generation);
                self.serve_http(stream).await;
            }
        }
    }

    async fn serve_http<I>(mut self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // Read from the configuration, not cloned: its server section holds the TLS key.
        let generation = self.state.generation();
        let limits = IdleLimits::of(&generation.config.server);
        let max_cancelled = generation.config.server.max_cancelled_requests;
        let max_head_bytes = generation.config.server.max_request_head_bytes;
        drop(generation);
        let activity = Arc::new(Activity::new());
        let service = {
            let (state, activity, kind) = (self.state.clone(), activity.clone(), self.kind);
            let peer = self.peer.clone();
            service_fn(move |request: hyper::Request<Incoming>| {
                let busy = activity.begin();
                let answering = Answering::new(activity.clone(), max_cancelled);
                let state = state.clone();
                let peer = peer.clone();
                async move {
                    let _busy = busy;
                    let http1 = request.version() <= http::Version::HTTP_11;
                    if !http1 {
                        _busy.mark_http2();
                    }
                    let mut response = match kind {
                        Listener::Admin => handle_admin(state, request).await,
                        Listener::Public | Listener::Plain => handle(state, request, peer).await,
                    };
                    // A stopping server answers what it was sent and closes after it; a
                    // client told so opens a new connection instead of sending on this one.
                    // (HTTP/2 hears it as GOAWAY.)
                    if answering.answered() && http1 {
                        response.headers_mut().insert(
                            http::header::CONNECTION,
                            http::HeaderValue::from_static("close"),
                        );
                    }
                    // A streamed body outlives the handler: the connection stays busy (not
                    // idle) until the body ends.
                    if let Either::Right(audio) = response.body_mut() {
                        audio.hold(_busy);
                    }
                    Ok::<_, Infallible>(response)
                }
            })
        };
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // A head larger than this, or with more than 100 headers, is answered 431 by hyper.
        // No timer of hyper's own for HTTP/1: the connection's idle timer bounds the wait for a
        // request head (see `Activity::next_idle_check`), where hyper would arm and drop a
        // timer per request.
        builder
            .http1()
            .header_read_timeout(None)
            .max_buf_size(max_head_bytes)
            .max_headers(100);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(max_head_bytes).unwrap_or(u32::MAX));
        let (give_back, returned) = oneshot::channel();
        let io = Lingering {
            io: Some(io),
            give_back: Some(give_back),
            activity: activity.clone(),
        };
        let mut connection = Box::pin(builder.serve_connection(TokioIo::new(io), service));
        let mut closing = false;
        // When a stop was asked for: the connection closes `SHUTDOWN_SETTLE` later.
        let mut stop_at = None;
        loop {
            let now = Instant::now();
            let idle_at = activity.next_idle_check(limits, now).unwrap_or(now);
            // The connection's rare events, polled only when one of them wakes (see
            // `woken`), not on every read and write of the connection.
            let (stop, cancelling) = (&mut self.stop, &activity.too_many_cancelled);
            let events = Woken::new(async move {
                if closing {
                    return std::future::pending().await;
                }
                tokio::select! {
                    () = stopped(stop), if stop_at.is_none() => Event::Stop,
                    () = tokio::time::sleep_until(stop_at.unwrap_or_else(Instant::now)), if stop_at.is_some() => Event::Settled,
                    () = cancelling.notified() => Event::Cancelling,
                    () = tokio::time::sleep_until(idle_at) => Event::Idle,
                }
            });
            let event = tokio::select! {
                // The connection first: a request that has already arrived is read (and then
                // answered, with `Connection: close`) before a stop closes an idle connection.
                biased;
                result = connection.as_mut() => {
                    // Resets and timeouts by clients are routine for a proxy; not warnings.
                    if let Err(error) = result {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                    break;
                }
                event = events => event,
            };
            match event {
                Event::Stop => {
                    // From now on every answer says `Connection: close` (see the service).
                    activity.stopping.store(true, Ordering::Release);
                    stop_at = Some(Instant::now() + SHUTDOWN_SETTLE);
                }
                Event::Settled => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                Event::Cancelling => {
                    tracing::warn!(
                        cancelled = activity.cancelled.load(Ordering::Acquire),
                        requests = activity.requests.load(Ordering::Acquire),
                        "closing a connection whose client cancels most of its requests (server.max_cancelled_requests)"
                    );
                    // GOAWAY for HTTP/2: streams already open are answered, no new ones start.
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                Event::Idle => {
                    // Checked again: a request may have come, or a head begun, meanwhile.
                    if activity.next_idle_check(limits, Instant::now()).is_none() {
                        tracing::debug!("closing idle connection");
                        closing = true;
                        // hyper closes an HTTP/1 connection gracefully only once it has read
                        // a request head; one that never sent a whole head, with nothing to
                        // answer, is closed here.
                        if activity.requests.load(Ordering::Acquire) == 0 {
                            break;
                        }
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
        }
        drop(connection);
        // We closed a connection the client may still be sending on: see `linger`. Boxed, as
        // it is rare: the connection's future does not carry its read buffer.
        if closing && let Ok(io) = returned.await {
            Box::pin(linger(io)).await;
        }
    }
}

/// What a connection waits for besides its own end.
enum Event {
    /// The server stops: answers say `Connection: close` from now on.
    Stop,
    /// `SHUTDOWN_SETTLE` after the stop: the connection is closed.
    Settled,
    /// The client cancels most of its requests.
    Cancelling,
    /// The time `Activity::next_idle_check` gave has come.
    Idle,
}

/// How long after a stop signal a connection is closed: long enough for a request the client
/// had already sent (in the socket, not yet seen by the event loop) to be read and answered
/// with `Connection: close`, short enough to count as closing idle connections at once.
const SHUTDOWN_SETTLE: Duration = Duration::from_millis(20);

/// How long a connection the gateway closed is still read from, at most.
const LINGER: Duration = Duration::from_secs(1);

/// Close a connection the gateway decided to close (shutdown, idle timeout, GOAWAY) so that a
/// request the client sent at the same moment meets a clean end of stream, not a reset: the
/// write side is shut (FIN), then whatever still arrives is read and discarded until the
/// client closes too, for at most [`LINGER`]. Closing a socket with unread data in it would
/// make the kernel answer with RST, which clients report as a failed request instead of a
/// closed idle connection they may retry on a new one.
async fn linger<I: AsyncRead + AsyncWrite + Unpin>(mut io: I) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = io.shutdown().await;
    let _ = tokio::time::timeout(LINGER, async {
        let mut discard = [0u8; 4096];
        while let Ok(1..) = io.read(&mut discard).await {}
    })
    .await;
}

/// The connection's transport, handed back to the connection task when hyper lets go of it,
/// so the task can [`linger`] on it.
/// Its reads also tell the connection's [`Activity`] when a request head begins.
struct Lingering<I> {
    io: Option<I>,
    give_back: Option<oneshot::Sender<I>>,
    activity: Arc<Activity>,
}

impl<I> Lingering<I> {
    fn io(&mut self) -> std::pin::Pin<&mut I>
    where
        I: Unpin,
    {
        std::pin::Pin::new(self.io.as_mut().expect("present until dropped"))
    }
}

impl<I> Drop for Lingering<I> {
    fn drop(&mut self) {
        if let (Some(io), Some(give_back)) = (self.io.take(), self.give_back.take()) {
            let _ = give_back.send(io);
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Lingering<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = self.io().poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_arrived();
        }
        read
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Lingering<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.io().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.io().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.io().poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.io().poll_shutdown(cx)
    }
}

/// Opt the process out of transparent huge pages unless `keep` (`server.transparent_huge_pages`).
///
/// Where the host has them "always", the allocator's heap, which grows as the cache fills, is
/// faulted in and zeroed 2 MiB at a time: in the benchmark's layout that put a p99 of about 5 ms
/// on sequential misses against about 1 ms without (bench/README.md, "History"), and a 2 MiB
/// page the heap only partly uses still counts in full against the memory bound. The setting
/// covers every thread, from the next page fault on. A kernel or filter that refuses the call
/// leaves the host's setting, with a warning.
pub fn huge_pages(keep: bool) {
    if keep {
        return;
    }
    match rustix::thread::disable_transparent_huge_pages(true) {
        Ok(()) => tracing::debug!("transparent huge pages are off for this process"),
        Err(error) => tracing::warn!(
            %error,
            "cannot opt out of transparent huge pages; the host's setting applies (server.transparent_huge_pages)"
        ),
    }
}
