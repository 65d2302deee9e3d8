//! The validated configuration: plain typed data (durations, addresses, URLs, secrets,
//! certificates) and the defaults. It reads no file and builds nothing.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::crypto::Digest;

/// Prefix of environment overrides: `MIRALIX_GATEWAY__CACHE__TTL=10s` sets `cache.ttl`.
pub const ENV_PREFIX: &str = "MIRALIX_GATEWAY";

/// The validated configuration the gateway runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub cache: CacheConfig,
    pub log: LogConfig,
    /// Accounts by the `{account}` route segment.
    pub accounts: BTreeMap<String, AccountConfig>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where internal apps connect; HTTPS when `tls` is set.
    pub listen: SocketAddr,
    /// An extra plain-HTTP listener serving the same route (e.g. loopback health checks).
    pub plain_listen: Option<SocketAddr>,
    /// Certificate and key that turn `listen` into HTTPS.
    pub tls: Option<TlsIdentity>,
    /// How long in-flight requests may take to finish after a stop signal.
    pub shutdown_grace: Duration,
    /// How long a client may take to send a complete request head.
    pub header_read_timeout: Duration,
    /// How long a client may take to complete the TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// How long a connection may sit with no request in flight before it is closed.
    pub idle_timeout: Duration,
    /// Open connections on the public listeners at most; further clients wait in the backlog.
    pub max_connections: usize,
    /// Largest request head (request line and headers) accepted; larger ones get `431`.
    pub max_request_head_bytes: usize,
    /// A connection on which clients cancelled this many requests before their answer (HTTP/2
    /// stream resets, most of them), more than half of its requests, is sent GOAWAY and closed.
    pub max_cancelled_requests: usize,
    /// Whether the process keeps the host's transparent huge pages (off by default: see
    /// [`crate::server::huge_pages`]).
    pub transparent_huge_pages: bool,
    /// Requests per client address on the public listeners (`[server.rate_limit]`).
    pub rate_limit: Option<RateLimit>,
}

/// A token bucket per client IP address: `burst` requests at once, refilled at
/// `requests_per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub requests_per_second: f64,
    pub burst: u32,
}

/// A certificate chain and its private key, for terminating TLS.
pub struct TlsIdentity {
    /// Where the chain came from, for messages.
    pub cert_path: PathBuf,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The CA that must have issued every client's certificate (`server.tls.client_ca`).
    pub client_ca: Option<ClientCa>,
}

/// Certificates that issue client certificates: with them, a TLS client must present one.
#[derive(Debug, Clone)]
pub struct ClientCa {
    /// Where they came from, for messages.
    pub path: PathBuf,
    pub roots: Vec<CertificateDer<'static>>,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        Self {
            cert_path: self.cert_path.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            client_ca: self.client_ca.clone(),
        }
    }
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("cert_path", &self.cert_path)
            .field("certificates", &self.chain.len())
            .field("key", &"<redacted>")
            .field("client_ca", &self.client_ca.as_ref().map(|ca| &ca.path))
            .finish()
    }
}

/// Logging settings that are not covered by `RUST_LOG`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// Where audit events go instead of stderr, as JSON lines.
    pub audit_file: Option<PathBuf>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; colours only on a terminal.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// What validation needs from the process environment, passed in so tests need not set it.
#[derive(Debug, Clone, Default)]
pub struct LoadContext {
    /// `$CREDENTIALS_DIRECTORY`, where systemd puts `LoadCredential=` files.
    pub credentials_dir: Option<PathBuf>,
}

impl LoadContext {
    pub fn from_env() -> Self {
        Self {
            credentials_dir: std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Where `/metrics`, `/healthz`, `/readyz` and `/cache` are served.
    pub listen: SocketAddr,
    /// SHA-256 of the token `/cache` requests must present; without one they are refused.
    pub token: Option<Digest>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// How long a `200` list is served from the cache. Zero: coalesce, but never store.
    pub ttl: Duration,
    /// How long a `404` (unknown agent) is remembered. Zero: never.
    pub negative_ttl: Duration,
    /// How long the agent directory (`/agents[?state=..]`) is served from the cache. Zero:
    /// coalesce, but never store.
    pub directory_ttl: Duration,
    /// Bound on the bytes held by the cache (bodies plus keys).
    pub max_bytes: u64,
    /// An answer weighing more than this is served but not stored (default: an eighth of
    /// `max_bytes`), so one huge agent cannot evict everything else.
    pub max_entry_bytes: u64,
    /// After `ttl`, how long an entry is still served at once while one background refresh runs.
    pub stale_while_revalidate: Duration,
    /// After `ttl`, how long an entry is served when the box fails instead of the error.
    pub stale_if_error: Duration,
    /// After a failed fetch, how long requests for that key get the failure without asking the box.
    pub error_backoff: Duration,
    /// A stored full list is refreshed by delta (`fromQueueCallId=<highest id>`) until it was
    /// last fetched whole this long ago; then it is fetched whole. Zero: always whole.
    pub full_refresh_interval: Duration,
    /// Stored `200` lists are also kept gzip-compressed for clients that accept it.
    pub gzip: bool,
    /// Smaller bodies are not compressed.
    pub gzip_min_bytes: u64,
    /// 1 (fastest) to 9 (smallest).
    pub gzip_level: u32,
    /// The audio store (`[cache.audio]`), if any. Bound at start-up.
    pub audio: Option<AudioStoreConfig>,
    /// The second tier behind memory (`[cache.shared]` or `[cache.disk]`), if any. Bound at
    /// start-up: a reload that changes it is reported as needing a restart.
    pub tier: Option<TierConfig>,
}

/// `[cache.audio]`: recordings' audio kept on local disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudioStoreConfig {
    /// The directory the store keeps (made if missing).
    pub path: std::path::PathBuf,
    /// Bound on the stored files' bytes; the least recently used go first.
    pub max_bytes: u64,
    /// A recording larger than this is served, not stored.
    pub max_file_bytes: u64,
    /// The most memory all downloads the disk refused may hold together, for the clients
    /// following them (`0`: none is kept; such a recording reaches each client from the box).
    pub max_memory_bytes: u64,
}

/// The second cache tier: at most one of the two is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TierConfig {
    Shared(SharedTierConfig),
    Disk(DiskTierConfig),
}

/// `[cache.shared]`: a Redis or Valkey server every gateway in front of the same boxes shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedTierConfig {
    /// `redis://` or `rediss://` URL; a secret, since it may carry a password.
    pub url: Secret,
    /// Where the URL came from (`cache.shared.url`, `..._file` or `..._credential`), for
    /// messages that must not show the URL itself.
    pub url_origin: String,
    /// PEM trust anchors for `rediss://` (`None`: the system's roots).
    pub ca_pem: Option<Vec<u8>>,
    /// Every key the gateway writes starts with this and a colon.
    pub key_prefix: String,
    /// Bound on each Redis command; past it the request goes on without the tier.
    pub timeout: Duration,
}

/// `[cache.disk]`: an embedded store on local disk, so a restart starts warm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskTierConfig {
    pub path: std::path::PathBuf,
    /// Bound on the stored records' bytes; the least recently stored go first.
    pub max_bytes: u64,
}

/// One OfficeTeam account (the box's "domain") and how to reach its box.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountConfig {
    /// The base URL of the box; `/mot/{account}/...` is appended to its path.
    pub base_url: reqwest::Url,
    pub shared_secret: Secret,
    pub trust: UpstreamTrust,
    pub upstream: UpstreamSettings,
    /// Which API the box speaks; 6.5 has no `fromQueueCallId`.
    pub api_version: ApiVersion,
    /// Who may read this account through the gateway.
    pub access: Access,
    /// The `state` values the agent directory passes on to the box, matched without regard
    /// to case and sent as spelled here.
    pub directory_states: Vec<Box<str>>,
    /// More read-only routes passed on to the box (`[[accounts.<name>.passthrough]]`).
    pub passthrough: Vec<super::PassthroughRoute>,
}

impl AccountConfig {
    /// Whether the box is reached the same way: everything but `access`, which can change
    /// without touching the client or the cached entries.
    pub fn same_upstream(&self, other: &AccountConfig) -> bool {
        self.base_url == other.base_url
            && self.shared_secret == other.shared_secret
            && self.trust == other.trust
            && self.upstream == other.upstream
            && self.api_version == other.api_version
    }
}

/// The OfficeTeam API version of a box, as far as the gateway cares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ApiVersion {
    /// No query parameters: `fromQueueCallId` is emulated from the full list.
    V6_5,
    /// 7.0 and later: `fromQueueCallId` is understood (and used for delta refreshes).
    #[default]
    V7,
}

impl ApiVersion {
    /// Whether the box understands `fromQueueCallId`.
    pub fn has_from_queue_call_id(self) -> bool {
        self == ApiVersion::V7
    }
}

/// How the gateway treats one box: timeouts, limits and the circuit breaker. `[upstream]` sets
/// the defaults; each account may override every key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSettings {
    /// The whole request, from connecting to the last body byte.
    pub timeout: Duration,
    /// TCP connect plus TLS handshake.
    pub connect_timeout: Duration,
    /// Requests to the box at once; further fetches queue.
    pub max_concurrent_requests: usize,
    /// How long a fetch may wait in that queue before it fails with `503`.
    pub queue_timeout: Duration,
    /// A larger body is refused with `502` and never stored.
    pub max_body_bytes: u64,
    /// Consecutive failures that open the circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker fails fast before it lets one probe through.
    pub breaker_cooldown: Duration,
    /// Audio downloads streamed from the box at once; further ones get `503`.
    pub max_audio_streams: usize,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_concurrent_requests: DEFAULT_MAX_CONCURRENT_REQUESTS,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            breaker_failures: DEFAULT_BREAKER_FAILURES,
            breaker_cooldown: DEFAULT_BREAKER_COOLDOWN,
            max_audio_streams: DEFAULT_MAX_AUDIO_STREAMS,
        }
    }
}

/// How the box's certificate is verified. There is deliberately no "accept anything" option.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTrust {
    /// Certificates from `ca_file`; empty means the system trust store.
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// SHA-256 of the exact leaf certificate the box must present.
    pub pin_sha256: Option<[u8; 32]>,
    /// Name verified in the certificate instead of the URL's host.
    pub server_name: Option<ServerName<'static>>,
}

impl Config {
    /// The keys whose secret is still a placeholder from the example (`change-me`, ...):
    /// worth a warning, since the box will refuse it.
    pub fn placeholder_secrets(&self) -> Vec<String> {
        let placeholder = |secret: &str| {
            let s = secret.to_ascii_lowercase();
            s.starts_with("change-me") || s.starts_with("changeme") || s == "secret" || s == "xxx"
        };
        self.accounts
            .iter()
            .filter(|(_, account)| placeholder(account.shared_secret.expose()))
            .map(|(name, _)| format!("accounts.{name}.shared_secret"))
            .collect()
    }
}

/// A secret that never shows itself in `Debug` or `Display` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<str>);

impl Secret {
    pub fn new(value: impl Into<Box<str>>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9091";
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(5);
pub const DEFAULT_AUDIO_MAX_BYTES: u64 = 4 << 30;
pub const DEFAULT_AUDIO_MAX_MEMORY_BYTES: u64 = 16 << 20;
pub const DEFAULT_DIRECTORY_TTL: Duration = Duration::from_secs(60);
/// The agent directory's `state` values the vendor's clients use.
pub const DEFAULT_DIRECTORY_STATES: [&str; 3] = ["any", "loggedIn", "loggedOut"];
pub const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default for `server.max_cancelled_requests`.
pub const DEFAULT_MAX_CANCELLED_REQUESTS: u64 = 100;
pub const DEFAULT_MAX_REQUEST_HEAD_BYTES: usize = 16 * 1024;
pub const DEFAULT_STALE_WHILE_REVALIDATE: Duration = Duration::from_secs(30);
pub const DEFAULT_STALE_IF_ERROR: Duration = Duration::from_secs(600);
pub const DEFAULT_ERROR_BACKOFF: Duration = Duration::from_secs(1);
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 8;
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;
pub const DEFAULT_BREAKER_FAILURES: u32 = 5;
pub const DEFAULT_BREAKER_COOLDOWN: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_AUDIO_STREAMS: usize = 4;
pub const DEFAULT_FULL_REFRESH_INTERVAL: Duration = Duration::from_secs(15 * 60);
pub const DEFAULT_GZIP_MIN_BYTES: u64 = 1024;
pub const DEFAULT_GZIP_LEVEL: u32 = 6;
pub const DEFAULT_KEY_PREFIX: &str = "miralix-gateway";
pub const DEFAULT_SHARED_TIMEOUT: Duration = Duration::from_millis(100);
pub const DEFAULT_DISK_MAX_BYTES: u64 = 1024 * 1024 * 1024;

/// Who may read an account's recordings.
#[derive(Clone, PartialEq, Eq)]
pub enum Access {
    /// Only clients presenting one of these keys (held as digests), or a client certificate
    /// with one of these names (lowercase).
    Restricted {
        keys: Vec<Digest>,
        client_names: Vec<String>,
    },
    /// Anyone who can reach the listener: loopback, a listener that requires client
    /// certificates, or `allow_anonymous = true`.
    Open,
}

impl Access {
    /// Only these keys.
    pub fn keys(keys: Vec<Digest>) -> Self {
        Access::Restricted {
            keys,
            client_names: Vec::new(),
        }
    }
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Access::Restricted { keys, client_names } => f
                .debug_struct("Restricted")
                .field("keys", &format_args!("{} keys", keys.len()))
                .field("client_names", client_names)
                .finish(),
            Access::Open => f.write_str("Open"),
        }
    }
}
