//! A simulated Miralix OfficeTeam box: the upstream of `demo` and of the integration tests.
//!
//! It serves the recordings route the way the vendor documents it (see `shared/miralix-api.md`):
//! the `X-Miralix-Shared-Secret` check, `fromQueueCallId`, `400` for a bad parameter and `404`
//! for an unknown agent, over HTTPS with a certificate generated at start, or over plain HTTP.
//! Identifications are matched exactly in their canonical form, so a test sees whether the
//! gateway normalized them. Knobs make it slow or failing, and it records every request it
//! received so tests can check what reached the box.

pub mod dataset;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use percent_encoding::percent_decode_str;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

pub use self::dataset::{Agent, Dataset, SimAccount, SyntheticAgents};

/// Path of the simulator's own counters (JSON); not a Miralix route, never counted itself.
pub const STATS_PATH: &str = "/_simulator/stats";

/// `PUT` here with `?ms=N` to change the answer delay of a running simulator (benchmarks).
pub const DELAY_PATH: &str = "/_simulator/delay";

/// `PUT` here with `?mode=...` (see [`Failure::parse`]) to make a running simulator fail.
pub const FAILURE_PATH: &str = "/_simulator/failure";

/// How the simulated box presents itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimulatorTls {
    /// Plain HTTP.
    Plain,
    /// A self-signed end-entity certificate for `localhost`, `127.0.0.1` and `::1`.
    SelfSigned,
    /// A self-signed certificate that also says `CA:TRUE`, as `openssl req -x509` makes by default.
    SelfSignedCa,
    /// A leaf issued by a separate test CA (see [`SimCertificate::ca_pem`]).
    IssuedByCa,
}

/// What a test can make the box do. Applies to every request until changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Failure {
    /// Answer normally.
    #[default]
    None,
    /// Answer with this status and a small JSON error body.
    Status(u16),
    /// Close the connection after reading the request, without answering.
    Close,
    /// Close every new connection at once, before TLS: as if the box were rebooting.
    Refuse,
    /// Send the headers and part of the body, then drop the connection.
    ResetMidBody,
    /// Answer `200` with a JSON array of about this many bytes.
    Oversized(usize),
    /// Answer `200` with a body that is not JSON.
    InvalidJson,
}

impl Failure {
    /// Parse the control endpoint's `mode`: `none`, `close`, `refuse`, `reset`, `invalid-json`,
    /// `oversized-<bytes>` or `status-<code>`.
    pub fn parse(mode: &str) -> Option<Self> {
        Some(match mode {
            "none" => Failure::None,
            "close" => Failure::Close,
            "refuse" => Failure::Refuse,
            "reset" => Failure::ResetMidBody,
            "invalid-json" => Failure::InvalidJson,
            _ => match mode.split_once('-')? {
                ("oversized", bytes) => Failure::Oversized(bytes.parse().ok()?),
                ("status", code) => Failure::Status(code.parse().ok()?),
                _ => return None,
            },
        })
    }
}

/// The simulator's response body: whole, or one that breaks off (for `ResetMidBody`).
type SimBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// Yields its first chunk, then fails, so hyper drops the connection mid-body.
struct BrokenBody(Option<Bytes>);

impl http_body::Body for BrokenBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        std::task::Poll::Ready(Some(match self.get_mut().0.take() {
            Some(chunk) => Ok(http_body::Frame::data(chunk)),
            None => Err(std::io::Error::other("simulated reset mid-body")),
        }))
    }
}

/// The certificate the box presents, for the gateway's trust settings.
#[derive(Debug, Clone)]
pub struct SimCertificate {
    pub leaf_der: CertificateDer<'static>,
    pub leaf_pem: String,
    /// The issuing CA for [`SimulatorTls::IssuedByCa`]; the leaf itself otherwise.
    pub ca_pem: String,
}

/// A request as the box received it.
#[derive(Debug, Clone)]
pub struct ReceivedRequest {
    pub method: Method,
    /// Path and query exactly as sent on the wire.
    pub target: String,
    pub headers: HeaderMap,
}

#[derive(Debug)]
struct Knobs {
    delay: Duration,
    failure: Failure,
}

#[derive(Debug)]
struct SimState {
    dataset: Dataset,
    knobs: Mutex<Knobs>,
    received: Mutex<Vec<ReceivedRequest>>,
    count: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// While `false`, answers wait (the request is already recorded); see [`Simulator::hold`].
    gate: watch::Sender<bool>,
}

/// A running simulated box; stops when dropped.
#[derive(Debug)]
pub struct Simulator {
    addr: SocketAddr,
    scheme: &'static str,
    certificate: Option<SimCertificate>,
    state: Arc<SimState>,
    task: JoinHandle<()>,
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why the simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimulatorError {
    #[error("cannot bind the simulator to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot generate the simulator's certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("cannot build the simulator's TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

impl Simulator {
    /// Start a simulated box on `addr` (port 0 for any free port).
    pub async fn start(
        addr: SocketAddr,
        tls: SimulatorTls,
        dataset: Dataset,
    ) -> Result<Self, SimulatorError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| SimulatorError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| SimulatorError::Bind { addr, source })?;
        let (certificate, acceptor) = match tls {
            SimulatorTls::Plain => (None, None),
            _ => {
                let (certificate, key) = generate_certificate(tls)?;
                let config =
                    rustls::ServerConfig::builder_with_provider(crate::upstream::trust::provider())
                        .with_safe_default_protocol_versions()?
                        .with_no_client_auth()
                        .with_single_cert(vec![certificate.leaf_der.clone()], key)?;
                (Some(certificate), Some(TlsAcceptor::from(Arc::new(config))))
            }
        };
        let state = Arc::new(SimState {
            dataset,
            knobs: Mutex::new(Knobs {
                delay: Duration::ZERO,
                failure: Failure::None,
            }),
            received: Mutex::default(),
            count: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            gate: watch::Sender::new(true),
        });
        let task = tokio::spawn(accept_loop(listener, acceptor, state.clone()));
        Ok(Self {
            addr,
            scheme: if certificate.is_some() {
                "https"
            } else {
                "http"
            },
            certificate,
            state,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT` (or `http://`), the `base_url` a gateway account points at.
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    pub fn certificate(&self) -> Option<&SimCertificate> {
        self.certificate.as_ref()
    }

    /// Delay every answer by `delay` (after the request is recorded).
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.state.knobs).delay = delay;
    }

    pub fn set_failure(&self, failure: Failure) {
        lock(&self.state.knobs).failure = failure;
    }

    /// Hold every answer until [`Simulator::release`]; requests are still counted on arrival.
    pub fn hold(&self) {
        self.state.gate.send_replace(false);
    }

    pub fn release(&self) {
        self.state.gate.send_replace(true);
    }

    /// Requests received so far (on the recordings route or not).
    pub fn request_count(&self) -> usize {
        self.state.count.load(Ordering::SeqCst)
    }

    /// The most requests it was answering at the same time.
    pub fn max_concurrency(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Every request received so far, oldest first.
    pub fn received(&self) -> Vec<ReceivedRequest> {
        lock(&self.state.received).clone()
    }

    /// Wait until at least `n` requests have arrived, for at most `timeout`.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut gate = self.state.gate.subscribe();
        while self.request_count() < n {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            // Every arrival nudges the gate channel, and the subscription predates the check.
            if tokio::time::timeout_at(deadline, gate.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn generate_certificate(
    tls: SimulatorTls,
) -> Result<(SimCertificate, PrivateKeyDer<'static>), rcgen::Error> {
    let names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let key = KeyPair::generate()?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let mut params = CertificateParams::new(names)?;
    let certificate = match tls {
        SimulatorTls::IssuedByCa => {
            let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            ca_params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "miralix-gateway test CA");
            let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
            let leaf = params.signed_by(&key, &ca)?;
            SimCertificate {
                leaf_der: leaf.der().clone(),
                leaf_pem: leaf.pem(),
                ca_pem: ca.pem(),
            }
        }
        _ => {
            if tls == SimulatorTls::SelfSignedCa {
                params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            }
            let leaf = params.self_signed(&key)?;
            SimCertificate {
                leaf_der: leaf.der().clone(),
                leaf_pem: leaf.pem(),
                ca_pem: leaf.pem(),
            }
        }
    };
    Ok((certificate, key_der))
}

async fn accept_loop(listener: TcpListener, acceptor: Option<TlsAcceptor>, state: Arc<SimState>) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        if lock(&state.knobs).failure == Failure::Refuse {
            drop(stream);
            continue;
        }
        let builder = builder.clone();
        let acceptor = acceptor.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { answer(&state, request).await }
            });
            match acceptor {
                Some(acceptor) => {
                    // A client that refuses our certificate ends the handshake; nothing to do.
                    if let Ok(tls) = acceptor.accept(stream).await {
                        let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                    }
                }
                None => {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
}

/// The simulated answer. An `Err` makes hyper close the connection without answering, which is
/// how [`Failure::Close`] is simulated.
async fn answer(
    state: &SimState,
    request: Request<Incoming>,
) -> Result<Response<SimBody>, std::io::Error> {
    match control(state, &request) {
        Some(response) => Ok(whole(response)),
        None => serve(state, request).await,
    }
}

/// The simulator's own endpoints (stats, delay, failure), or `None` for everything else.
fn control(state: &SimState, request: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let query = || form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes());
    if request.uri().path() == FAILURE_PATH && request.method() == Method::PUT {
        let failure = query()
            .find(|(key, _)| key == "mode")
            .and_then(|(_, mode)| Failure::parse(&mode));
        return Some(match failure {
            Some(failure) => {
                let text = format!("{failure:?}");
                lock(&state.knobs).failure = failure;
                json(
                    StatusCode::OK,
                    serde_json::json!({ "failure": text }).to_string(),
                )
            }
            None => message(
                StatusCode::BAD_REQUEST,
                "expected ?mode=none|close|refuse|reset|invalid-json|oversized-<bytes>|status-<code>",
            ),
        });
    }
    if request.uri().path() == DELAY_PATH && request.method() == Method::PUT {
        let ms = query()
            .find(|(key, _)| key == "ms")
            .and_then(|(_, value)| value.parse::<u64>().ok());
        return Some(match ms {
            Some(ms) => {
                lock(&state.knobs).delay = Duration::from_millis(ms);
                json(
                    StatusCode::OK,
                    serde_json::json!({ "delay_ms": ms }).to_string(),
                )
            }
            None => message(StatusCode::BAD_REQUEST, "expected ?ms=<milliseconds>"),
        });
    }
    if request.uri().path() == STATS_PATH {
        let stats = serde_json::json!({
            "requests": state.count.load(Ordering::SeqCst),
            "max_concurrency": state.max_in_flight.load(Ordering::SeqCst),
        });
        return Some(json(StatusCode::OK, stats.to_string()));
    }
    None
}

fn whole(response: Response<Full<Bytes>>) -> Response<SimBody> {
    response.map(|body| body.map_err(|never| match never {}).boxed())
}

/// A request for the Miralix API: recorded, counted, delayed and failed as the knobs say.
async fn serve(
    state: &SimState,
    request: Request<Incoming>,
) -> Result<Response<SimBody>, std::io::Error> {
    let _in_flight = InFlight::enter(state);
    let target = request.uri().path_and_query().map_or_else(
        || request.uri().path().to_owned(),
        |pq| pq.as_str().to_owned(),
    );
    lock(&state.received).push(ReceivedRequest {
        method: request.method().clone(),
        target,
        headers: request.headers().clone(),
    });
    state.count.fetch_add(1, Ordering::SeqCst);
    // Nudge anyone in `wait_for_requests` without changing the gate.
    state.gate.send_modify(|_| {});

    let mut gate = state.gate.subscribe();
    let _ = gate.wait_for(|open| *open).await;
    let (delay, failure) = {
        let knobs = lock(&state.knobs);
        (knobs.delay, knobs.failure.clone())
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match failure {
        Failure::None => Ok(whole(route(state, &request))),
        // A rebooting box drops the connections it had, too.
        Failure::Close | Failure::Refuse => {
            Err(std::io::Error::other("simulated connection close"))
        }
        Failure::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Ok(whole(message(status, "simulated failure")))
        }
        Failure::ResetMidBody => {
            let full = route(state, &request);
            let (parts, body) = full.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let half = bytes.slice(..bytes.len() / 2);
            let mut response = Response::from_parts(parts, BrokenBody(Some(half)).boxed());
            response
                .headers_mut()
                .insert(http::header::CONTENT_LENGTH, bytes.len().into());
            Ok(response)
        }
        Failure::Oversized(size) => {
            let element =
                r#"{"QueueCallId":1,"Padding":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"},"#;
            let mut body = String::with_capacity(size + element.len());
            body.push('[');
            while body.len() < size {
                body.push_str(element);
            }
            body.pop();
            body.push(']');
            Ok(whole(json(StatusCode::OK, body)))
        }
        Failure::InvalidJson => Ok(whole(json(
            StatusCode::OK,
            r#"[{"QueueCallId":47610,"AgentName":"Claus"#.to_owned(),
        ))),
    }
}

/// Counts a request as being answered until dropped.
struct InFlight<'a>(&'a SimState);

impl<'a> InFlight<'a> {
    fn enter(state: &'a SimState) -> Self {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn route(state: &SimState, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return message(
            StatusCode::METHOD_NOT_ALLOWED,
            "The requested resource does not support this method.",
        );
    }
    let segments: Vec<&str> = request.uri().path().split('/').collect();
    let [
        "",
        "mot",
        account,
        "agents",
        id_type,
        identification,
        "recordings",
    ] = segments[..]
    else {
        return message(
            StatusCode::NOT_FOUND,
            "No HTTP resource was found that matches the request URI.",
        );
    };
    let Some(account) = state.dataset.accounts.get(account) else {
        return message(StatusCode::NOT_FOUND, "Unknown domain.");
    };
    let presented = request
        .headers()
        .get("x-miralix-shared-secret")
        .map(HeaderValue::as_bytes);
    if presented != Some(account.shared_secret.as_bytes()) {
        return message(
            StatusCode::UNAUTHORIZED,
            "Authorization has been denied for this request.",
        );
    }
    let Ok(identification) = percent_decode_str(identification).decode_utf8() else {
        return message(
            StatusCode::BAD_REQUEST,
            "The identification is not valid UTF-8.",
        );
    };
    let matches: fn(&Agent, &str) -> bool = match id_type {
        "sipUri" => |a, v| a.sip_uri == v,
        "id" => |a, v| a.id.to_string() == v,
        "email" => |a, v| a.email == v,
        "syncId" => |a, v| a.sync_id == v,
        _ => return message(StatusCode::BAD_REQUEST, "Invalid identification type."),
    };
    let mut from = None;
    for (key, value) in form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes())
    {
        if key == "fromQueueCallId" {
            match value.parse::<u64>() {
                Ok(n) => from = Some(n),
                Err(_) => {
                    return message(
                        StatusCode::BAD_REQUEST,
                        "The value of fromQueueCallId is not valid.",
                    );
                }
            }
        }
    }
    if let Some(agent) = account.agents.iter().find(|a| matches(a, &identification)) {
        return json(StatusCode::OK, agent.recordings_after(from));
    }
    let synthetic = state
        .dataset
        .synthetic
        .filter(|_| id_type == "id")
        .and_then(|s| s.agent(identification.parse().ok()?));
    match synthetic {
        Some(agent) => json(StatusCode::OK, agent.recordings_after(from)),
        None => message(StatusCode::NOT_FOUND, "Agent not found."),
    }
}

fn message(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    json(status, serde_json::json!({ "Message": text }).to_string())
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}
