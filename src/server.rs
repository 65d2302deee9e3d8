//! Accept loops for the public and admin listeners, and graceful shutdown.
//!
//! The caller binds the listeners and passes them in together with a shutdown future, so tests
//! run the whole server on port 0. Each connection is served by hyper-util's auto builder
//! (HTTP/1.1, and HTTP/2 with prior knowledge) inside a span naming the client address. When the
//! shutdown future completes, both listeners stop accepting and open connections are told to
//! finish their in-flight requests, for at most [`SHUTDOWN_GRACE`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use crate::proxy::{AppState, handle, handle_admin};

/// How long open connections get to finish after shutdown is requested.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy)]
enum Listener {
    Public,
    Admin,
}

/// Serve both listeners until `shutdown` completes, then drain.
pub async fn run(
    public: TcpListener,
    admin: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    state.set_ready(true);
    tracing::info!(
        public = %display_addr(&public),
        admin = %display_addr(&admin),
        accounts = state.accounts.len(),
        "miralix-gateway serving"
    );
    tokio::pin!(shutdown);
    loop {
        let (accepted, listener) = tokio::select! {
            accepted = public.accept() => (accepted, Listener::Public),
            accepted = admin.accept() => (accepted, Listener::Admin),
            () = &mut shutdown => break,
        };
        match accepted {
            Ok((stream, peer)) => serve(&builder, &graceful, &state, stream, peer, listener),
            // Running out of file descriptors and similar are transient: keep accepting.
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    state.set_ready(false);
    drop((public, admin));
    tracing::info!(
        connections = graceful.count(),
        "shutting down: no new connections, draining open ones"
    );
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace period; closing them");
    }
}

fn serve(
    builder: &auto::Builder<TokioExecutor>,
    graceful: &GracefulShutdown,
    state: &Arc<AppState>,
    stream: TcpStream,
    peer: SocketAddr,
    listener: Listener,
) {
    // Responses are small and written whole; waiting for more data only adds latency.
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    let span = tracing::info_span!("conn", client.addr = %peer, listener = ?listener);
    let state = state.clone();
    match listener {
        Listener::Public => {
            let service = service_fn(move |request: hyper::Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(state, request).await) }
            });
            let connection = builder.serve_connection(io, service).into_owned();
            spawn_connection(graceful.watch(connection), span);
        }
        Listener::Admin => {
            let service = service_fn(move |request: hyper::Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle_admin(state, request).await) }
            });
            let connection = builder.serve_connection(io, service).into_owned();
            spawn_connection(graceful.watch(connection), span);
        }
    }
}

fn spawn_connection<C, E>(connection: C, span: tracing::Span)
where
    C: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    tokio::spawn(
        async move {
            // Clients that reset or time out are routine for a proxy; not worth a warning.
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        }
        .instrument(span),
    );
}

fn display_addr(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|e| format!("<{e}>"), |a| a.to_string())
}
