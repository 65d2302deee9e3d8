//! The client that talks to one account's Miralix box.
//!
//! One [`UpstreamClient`] per account, built once at start-up: a reqwest client over rustls with
//! the account's trust settings (see [`trust`]), timeouts, and the shared secret as a default
//! header. Requests are built from the normalized request only, so no client header, cookie or
//! secret can reach the box. Upstream statuses are mapped here into a reply that passes through
//! or an [`UpstreamError`].

pub mod protect;
pub mod trust;

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use http::header::{ACCEPT, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Limited};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use serde::de::IgnoredAny;

use crate::config::AccountConfig;
use crate::route::{FROM_QUEUE_CALL_ID, ListQuery, Subject};

/// The header the box authenticates requests with.
pub const SHARED_SECRET_HEADER: &str = "x-miralix-shared-secret";

/// The `Content-Type` of every list served: what the body was checked to be.
pub const JSON_UTF8: &str = "application/json; charset=utf-8";

/// Sent upstream so the box's logs show who is calling.
pub const USER_AGENT: &str = concat!("miralix-gateway/", env!("CARGO_PKG_VERSION"));

/// Characters escaped in the identification path segment: everything that is not allowed raw in
/// a URL path segment, plus `/`, `%`, `?`, `#` and `;`. `@` and `:` stay raw, as in the vendor's
/// examples (`sipUri/sip:lp1@company.local`).
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b';')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// Client headers passed on to the box with an audio download: ranges and validators.
pub const AUDIO_REQUEST_HEADERS: [http::HeaderName; 4] = [
    http::header::RANGE,
    http::header::IF_RANGE,
    http::header::IF_NONE_MATCH,
    http::header::IF_MODIFIED_SINCE,
];

/// The box's audio answer headers passed back to the client; nothing else (no cookies, no
/// server banners) gets through.
pub const AUDIO_RESPONSE_HEADERS: [http::HeaderName; 8] = [
    http::header::CONTENT_TYPE,
    http::header::CONTENT_LENGTH,
    http::header::CONTENT_RANGE,
    http::header::ACCEPT_RANGES,
    http::header::ETAG,
    http::header::LAST_MODIFIED,
    http::header::CONTENT_DISPOSITION,
    http::header::CACHE_CONTROL,
];

/// A box's answer that is passed on to clients (`200`, `404`, `400`, `403`).
#[derive(Debug, Clone)]
pub struct UpstreamReply {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

/// Which kind of list request went to the box, for metrics.
/// The trace context passed on to the box with a request: the request id and W3C
/// `traceparent` of the client request that caused it.
#[derive(Debug, Clone, Default)]
pub struct Forwarded {
    pub request_id: Option<HeaderValue>,
    pub traceparent: Option<HeaderValue>,
}

impl Forwarded {
    fn apply(&self, mut request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        if let Some(id) = &self.request_id {
            request = request.header("x-request-id", id.clone());
        }
        if let Some(traceparent) = &self.traceparent {
            request = request.header("traceparent", traceparent.clone());
        }
        request
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListFetch {
    /// The whole list.
    Full,
    /// `fromQueueCallId=<highest stored id>`, to refresh a stored list.
    Delta,
    /// A client's `fromQueueCallId`, passed on as it is.
    Filtered,
    /// Not a recordings list: the agent directory, or an allowlisted read.
    Other,
}

impl ListFetch {
    pub fn as_str(self) -> &'static str {
        match self {
            ListFetch::Full => "full",
            ListFetch::Delta => "delta",
            ListFetch::Filtered => "filtered",
            ListFetch::Other => "other",
        }
    }
}

/// Why the box could not give a usable answer. `Display` is safe to show clients: it never
/// names the box's address or the secret; the `source` (for logs) may name the address.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("the Miralix box did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error(
        "could not connect to the Miralix box within {} (TCP connect and TLS handshake, upstream.connect_timeout)",
        humantime::format_duration(*.0)
    )]
    ConnectTimeout(Duration),
    #[error("could not connect to the Miralix box or verify its TLS certificate")]
    Connect(#[source] Arc<reqwest::Error>),
    #[error("the connection to the Miralix box failed before a complete answer arrived")]
    Transport(#[source] Arc<reqwest::Error>),
    #[error("the box rejected the configured shared secret")]
    RejectedSecret,
    #[error("the Miralix box answered {0}")]
    Status(StatusCode),
    #[error("the Miralix box sent more than the {} bytes allowed (upstream.max_body_bytes)", .0)]
    BodyTooLarge(u64),
    #[error("the Miralix box answered 200 with a body that is not JSON")]
    InvalidBody,
    #[error(
        "the Miralix box is already answering as many requests as allowed, and none finished within {}",
        humantime::format_duration(*.0)
    )]
    QueueTimeout(Duration),
    #[error("the Miralix box is failing; requests to it are paused (circuit breaker open)")]
    CircuitOpen { retry_after: Duration },
    #[error("the upstream request was aborted")]
    Aborted,
    /// Dropped while it waited for a slot: every client waiting for it had gone.
    #[error("the upstream request was dropped: every client waiting for it had gone")]
    Abandoned,
    /// Not the box's failure: its answer was too large to store, and it is not asked again
    /// for this key until the error backoff has passed.
    #[error(
        "the box's answer for this agent ({weight} bytes) is larger than the cache stores (cache.max_entry_bytes = {limit}); it is fetched again after cache.error_backoff"
    )]
    TooLargeToCache {
        weight: u64,
        limit: u64,
        retry_after: Duration,
    },
    /// The one fetch of this key in the fleet (on another gateway) failed moments ago; its
    /// failure stands for `cache.error_backoff` instead of every instance asking again.
    #[error("{message} (the fetch another gateway of this fleet made moments ago)")]
    FailedElsewhere { status: u16, message: Arc<str> },
}

impl UpstreamError {
    /// The box's status code, when it answered at all.
    pub fn upstream_status(&self) -> Option<StatusCode> {
        match self {
            UpstreamError::RejectedSecret => Some(StatusCode::UNAUTHORIZED),
            UpstreamError::Status(status) => Some(*status),
            _ => None,
        }
    }

    /// Whether this says the box is failing (counts towards opening the circuit breaker), as
    /// opposed to the gateway holding the request back.
    pub fn is_box_failure(&self) -> bool {
        !matches!(
            self,
            UpstreamError::QueueTimeout(_)
                | UpstreamError::CircuitOpen { .. }
                | UpstreamError::Aborted
                | UpstreamError::Abandoned
                | UpstreamError::TooLargeToCache { .. }
                | UpstreamError::FailedElsewhere { .. }
        )
    }

    /// When a client may try again, for the errors that have an answer to that.
    /// The status a client gets for this failure (the one mapping; `error.rs` uses it).
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Timeout(_) | UpstreamError::ConnectTimeout(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            UpstreamError::QueueTimeout(_)
            | UpstreamError::CircuitOpen { .. }
            | UpstreamError::TooLargeToCache { .. } => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamError::FailedElsewhere { status, .. } => StatusCode::from_u16(*status)
                .ok()
                .filter(StatusCode::is_server_error)
                .unwrap_or(StatusCode::BAD_GATEWAY),
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            UpstreamError::QueueTimeout(_) => Some(Duration::from_secs(1)),
            UpstreamError::CircuitOpen { retry_after }
            | UpstreamError::TooLargeToCache { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// A short token naming the failure, for `Cache-Status` and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::ConnectTimeout(_) => "connect_timeout",
            UpstreamError::Connect(_) => "connect_error",
            UpstreamError::Transport(_) => "transport_error",
            UpstreamError::RejectedSecret => "rejected_secret",
            UpstreamError::Status(_) => "error_status",
            UpstreamError::BodyTooLarge(_) => "body_too_large",
            UpstreamError::InvalidBody => "invalid_body",
            UpstreamError::QueueTimeout(_) => "queue_timeout",
            UpstreamError::CircuitOpen { .. } => "circuit_open",
            UpstreamError::Aborted => "aborted",
            UpstreamError::Abandoned => "abandoned",
            UpstreamError::TooLargeToCache { .. } => "too-large",
            UpstreamError::FailedElsewhere { .. } => "failed_elsewhere",
        }
    }

    /// The error with every source, for logs.
    pub fn detail(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }
}

/// Why an account's client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Trust(#[from] trust::TrustError),
    #[error("could not build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// The client for one account's box.
#[derive(Debug, Clone)]
pub struct UpstreamClient {
    http: reqwest::Client,
    /// For audio downloads: no limit on the whole transfer, only on each wait for data.
    streaming: reqwest::Client,
    /// The base URL's text without a trailing slash; the route is appended to it.
    base: Arc<str>,
    account: Arc<str>,
    timeout: Duration,
    connect_timeout: Duration,
    max_body_bytes: u64,
}

impl UpstreamClient {
    pub fn new(account: &str, config: &AccountConfig) -> Result<Self, BuildError> {
        let mut secret = HeaderValue::from_str(config.shared_secret.expose())
            .expect("validated as a header value when the config was loaded");
        secret.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(SHARED_SECRET_HEADER, secret);
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));

        let tls = if config.base_url.scheme() == "https" {
            trust::client_config(&config.trust)?
        } else {
            trust::plain_http_config()
        };
        let builder = || {
            reqwest::Client::builder()
                .default_headers(headers.clone())
                .user_agent(USER_AGENT)
                .connect_timeout(config.upstream.connect_timeout)
                // A redirect from the box is unexpected and would carry the secret elsewhere.
                .redirect(reqwest::redirect::Policy::none())
                // The box sits on the local network; an environment proxy would only get in the way.
                .no_proxy()
                .http1_only()
                .tls_backend_preconfigured(tls.clone())
        };
        let http = builder()
            .timeout(config.upstream.timeout)
            .build()
            .map_err(BuildError::Client)?;
        // A recording of a long call may take minutes to pass on to a slow client; what must
        // not happen is the box going quiet, so each read is bounded instead of the whole.
        let streaming = builder()
            .read_timeout(config.upstream.timeout)
            .build()
            .map_err(BuildError::Client)?;
        Ok(Self {
            http,
            streaming,
            base: config.base_url.as_str().trim_end_matches('/').into(),
            account: account.into(),
            timeout: config.upstream.timeout,
            connect_timeout: config.upstream.connect_timeout,
            max_body_bytes: config.upstream.max_body_bytes,
        })
    }

    /// The per-attempt timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The account this client serves.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// The upstream URL for a normalized request: the canonical identification as one segment.
    pub fn url_for(&self, request: &ListQuery) -> String {
        let account = utf8_percent_encode(&self.account, SEGMENT);
        let mut url = match &request.subject {
            Subject::Agent {
                id_type,
                identification,
            } => format!(
                "{}/mot/{account}/agents/{}/{}/recordings",
                self.base,
                id_type.as_str(),
                utf8_percent_encode(identification, SEGMENT),
            ),
            Subject::Queue(id) => {
                format!("{}/mot/{account}/queues/{id}/calls/recordings", self.base)
            }
            Subject::Passthrough(target) => format!("{}/mot/{account}/{target}", self.base),
            Subject::Directory(state) => {
                let mut url = format!("{}/mot/{account}/agents", self.base);
                if let Some(state) = state {
                    url.push_str("?state=");
                    url.extend(form_urlencoded::byte_serialize(state.as_bytes()));
                }
                url
            }
        };
        if let Some(from) = request.from_queue_call_id {
            url.push_str(&format!("?{FROM_QUEUE_CALL_ID}={from}"));
        }
        url
    }

    /// The upstream URL of one recording's audio.
    pub fn audio_url(&self, queue_call_id: u64) -> String {
        format!(
            "{}/mot/{}/queues/calls/recordings/{queue_call_id}",
            self.base,
            utf8_percent_encode(&self.account, SEGMENT),
        )
    }

    /// Start the download of one recording's audio: the box's answer with its body unread, for
    /// the caller to stream on. Only the headers in [`AUDIO_REQUEST_HEADERS`] are passed on
    /// from `client_headers`.
    ///
    /// Always a GET, also for a client's HEAD: a box need not answer HEAD (some answer `501`),
    /// and the caller drops the body of a HEAD after the headers.
    pub async fn audio(
        &self,
        queue_call_id: u64,
        client_headers: &HeaderMap,
        forwarded: &Forwarded,
    ) -> Result<reqwest::Response, UpstreamError> {
        let url = self.audio_url(queue_call_id);
        let mut request = forwarded.apply(self.streaming.get(&url));
        request = request.header(ACCEPT, HeaderValue::from_static("*/*"));
        for name in AUDIO_REQUEST_HEADERS {
            for value in client_headers.get_all(&name) {
                request = request.header(&name, value.clone());
            }
        }
        let response = request.send().await.map_err(|e| self.classify(e))?;
        match response.status() {
            StatusCode::OK
            | StatusCode::PARTIAL_CONTENT
            | StatusCode::NOT_MODIFIED
            | StatusCode::NOT_FOUND
            | StatusCode::RANGE_NOT_SATISFIABLE => Ok(response),
            StatusCode::UNAUTHORIZED => Err(UpstreamError::RejectedSecret),
            other => Err(UpstreamError::Status(other)),
        }
    }

    /// Fetch one recordings list and map the box's status.
    ///
    /// A request that failed before any byte of an answer arrived (connection refused or reset,
    /// TLS failure) is sent once more after a short random pause: a GET is safe to repeat. A
    /// timeout is not retried; the box is slow, not gone.
    pub async fn get_list(
        &self,
        request: &ListQuery,
        forwarded: &Forwarded,
    ) -> Result<UpstreamReply, UpstreamError> {
        let url = self.url_for(request);
        let get = || forwarded.apply(self.http.get(&url));
        let response = match get().send().await {
            Ok(response) => response,
            Err(error) if error.is_timeout() => return Err(self.classify(error)),
            Err(error) => {
                tracing::debug!(account = %self.account, error = %error, "retrying once");
                tokio::time::sleep(retry_pause()).await;
                get().send().await.map_err(|e| self.classify(e))?
            }
        };
        let status = response.status();
        match status {
            StatusCode::OK
            | StatusCode::NOT_FOUND
            | StatusCode::BAD_REQUEST
            | StatusCode::FORBIDDEN => {
                let mut content_type = response.headers().get(CONTENT_TYPE).map(owned_header);
                let body = self.read_body(response).await?;
                if status == StatusCode::OK {
                    if !is_json_text(&body) {
                        return Err(UpstreamError::InvalidBody);
                    }
                    // Served for what it was checked to be, whatever the box labelled it.
                    content_type = Some(HeaderValue::from_static(JSON_UTF8));
                }
                Ok(UpstreamReply {
                    status,
                    content_type,
                    body,
                })
            }
            StatusCode::UNAUTHORIZED => Err(UpstreamError::RejectedSecret),
            other => Err(UpstreamError::Status(other)),
        }
    }

    /// The whole body, refusing (without reading further) one beyond `max_body_bytes`.
    ///
    /// The body is copied once into an allocation of exactly its size. The pieces hyper hands
    /// over are views into its connection read buffer (8 KiB or more, shared with the answer's
    /// head), so keeping one of them would keep that whole buffer alive for as long as the
    /// entry is stored, while the cache's weigher counts only the view.
    async fn read_body(&self, response: reqwest::Response) -> Result<Bytes, UpstreamError> {
        let limit = self.max_body_bytes;
        if response
            .content_length()
            .is_some_and(|length| length > limit)
        {
            return Err(UpstreamError::BodyTooLarge(limit));
        }
        let cap = usize::try_from(limit).unwrap_or(usize::MAX);
        let collected = Limited::new(reqwest::Body::from(response), cap)
            .collect()
            .await
            .map_err(|error| match error.downcast::<reqwest::Error>() {
                Ok(error) => self.classify(*error),
                // The only other error `Limited` yields is its own length limit.
                Err(_) => UpstreamError::BodyTooLarge(limit),
            })?;
        Ok(owned(collected.aggregate()))
    }

    fn classify(&self, error: reqwest::Error) -> UpstreamError {
        // reqwest's connect timeout bounds the TCP connect and the TLS handshake.
        if error.is_connect() && error.is_timeout() {
            UpstreamError::ConnectTimeout(self.connect_timeout)
        } else if error.is_timeout() {
            UpstreamError::Timeout(self.timeout)
        } else if error.is_connect() {
            UpstreamError::Connect(Arc::new(error))
        } else {
            UpstreamError::Transport(Arc::new(error))
        }
    }
}

/// The bytes of `buf` in one allocation of exactly their size, owned by nothing else.
fn owned(buf: impl Buf) -> Bytes {
    let mut bytes = Vec::with_capacity(buf.remaining());
    bytes.put(buf);
    // Length equals capacity, so this takes the allocation over without copying again.
    Bytes::from(bytes)
}

/// A header value in an allocation of its own: one parsed by hyper is a view into the
/// connection's read buffer, like a body piece (see `UpstreamClient::read_body`).
fn owned_header(value: &HeaderValue) -> HeaderValue {
    let mut copy = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
    copy.set_sensitive(value.is_sensitive());
    copy
}

/// 50 to 150 ms, so that many gateways retrying a rebooted box do not arrive together.
fn retry_pause() -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // A fresh `RandomState` is randomly seeded: a dependency-free source of jitter.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    Duration::from_millis(50 + random % 101)
}

/// Whether `body` is JSON text, as a `200` from the box must be. JSON text is UTF-8 (RFC 8259
/// 8.1); serde_json alone lets invalid UTF-8 inside strings pass when it only skips over them.
pub fn is_json_text(body: &[u8]) -> bool {
    std::str::from_utf8(body).is_ok_and(|text| serde_json::from_str::<IgnoredAny>(text).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Secret, UpstreamTrust};
    use crate::identity::IdType;

    fn client(base: &str, account: &str) -> UpstreamClient {
        let config = AccountConfig {
            base_url: base.parse().unwrap(),
            shared_secret: Secret::new("x"),
            trust: UpstreamTrust::default(),
            upstream: crate::config::UpstreamSettings::default(),
            api_version: crate::config::ApiVersion::V7,
            access: crate::auth::Access::Open,
            directory_states: Vec::new(),
            passthrough: Vec::new(),
        };
        UpstreamClient::new(account, &config).unwrap()
    }

    fn request(id_type: IdType, identification: &str, from: Option<u64>) -> ListQuery {
        ListQuery {
            subject: Subject::Agent {
                id_type,
                identification: identification.into(),
            },
            from_queue_call_id: from,
        }
    }

    #[test]
    fn urls_keep_at_and_colon_raw_and_escape_the_rest() {
        let c = client("http://10.0.0.1/", "greenbox");
        assert_eq!(
            c.url_for(&request(IdType::SipUri, "sip:lp1@company.local", None)),
            "http://10.0.0.1/mot/greenbox/agents/sipUri/sip:lp1@company.local/recordings"
        );
        assert_eq!(
            c.url_for(&request(IdType::Email, "a%b#c?d@x.y", Some(7))),
            "http://10.0.0.1/mot/greenbox/agents/email/a%25b%23c%3Fd@x.y/recordings?fromQueueCallId=7"
        );
        assert_eq!(
            c.url_for(&request(IdType::Email, "åse@firma.dk", None)),
            "http://10.0.0.1/mot/greenbox/agents/email/%C3%A5se@firma.dk/recordings"
        );
    }

    #[test]
    fn queue_and_directory_urls() {
        let c = client("http://10.0.0.1", "greenbox");
        let queue = ListQuery {
            subject: Subject::Queue(4),
            from_queue_call_id: Some(9),
        };
        assert_eq!(
            c.url_for(&queue),
            "http://10.0.0.1/mot/greenbox/queues/4/calls/recordings?fromQueueCallId=9"
        );
        let directory = |state: Option<&str>| ListQuery {
            subject: Subject::Directory(state.map(Into::into)),
            from_queue_call_id: None,
        };
        assert_eq!(
            c.url_for(&directory(None)),
            "http://10.0.0.1/mot/greenbox/agents"
        );
        assert_eq!(
            c.url_for(&directory(Some("a b&c"))),
            "http://10.0.0.1/mot/greenbox/agents?state=a+b%26c"
        );
    }

    #[test]
    fn base_path_is_kept() {
        let c = client("http://box.local:8080/officeteam/", "12986");
        assert_eq!(
            c.url_for(&request(IdType::Id, "103", None)),
            "http://box.local:8080/officeteam/mot/12986/agents/id/103/recordings"
        );
    }
}
