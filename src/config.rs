//! Configuration: a TOML file plus `MIRALIX_GATEWAY__SECTION__KEY` environment overrides.
//!
//! Loading happens in two steps. [`RawConfig`] mirrors the file with plain strings and options;
//! [`RawConfig::validate`] then turns it into a [`Config`] of typed values (durations, URLs,
//! socket addresses, secrets, certificates) and collects *every* problem it finds, each naming
//! its key and the file, so `check-config` can report them all at once, like `nginx -t`.
//! Unknown keys are problems too. Nothing downstream of this module sees a string that should
//! have been a duration.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;

use crate::auth::{self, Access, Digest};

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

/// One thing wrong with a configuration, at one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key, e.g. `accounts.greenbox.base_url`.
    pub key: String,
    pub message: String,
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read, parsed or typed; values are left out of the message, since
    /// they may be secrets.
    #[error("{origin}: {}", without_values(&.source.to_string()))]
    Load {
        origin: String,
        #[source]
        source: config::ConfigError,
    },
    #[error("{}", render_problems(.origin, .problems))]
    Invalid {
        origin: String,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// Every problem, one per entry (a load error is one problem without a key).
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Load { .. } => vec![self.to_string()],
            ConfigError::Invalid { origin, problems } => problems
                .iter()
                .map(|p| format!("{origin}: {}: {}", p.key, p.message))
                .collect(),
        }
    }
}

/// A parse or type error without the values it quotes: the source lines TOML errors show, and
/// the value in serde's "invalid type: string \"...\", expected ..." (the type is kept).
fn without_values(message: &str) -> String {
    let mut kept = Vec::new();
    for line in message.lines() {
        // `  |`, `3 | shared_secret = "..."`, `  |    ^`: TOML's excerpt of the file.
        let excerpt = line
            .trim_start()
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .trim_start()
            .starts_with('|');
        if !excerpt {
            kept.push(redact_unexpected(line.trim()));
        }
    }
    kept.retain(|line| !line.is_empty());
    // The config crate adds " in <file>" on a line of its own after TOML's message.
    kept.iter().fold(String::new(), |mut joined, line| {
        if !joined.is_empty() {
            joined.push_str(if line.starts_with("in ") { " " } else { ": " });
        }
        joined.push_str(line);
        joined
    })
}

/// `invalid type: string "abc", expected a sequence` -> `invalid type: string, expected a sequence`.
fn redact_unexpected(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(at) = ["invalid type: ", "invalid value: "]
        .iter()
        .filter_map(|marker| rest.find(marker).map(|i| i + marker.len()))
        .min()
    {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        // The kind of value (`string`, `64-bit signed integer`), then the value quoted in `"`
        // (Debug-escaped) or in backticks, unless the message goes on to what was expected.
        let expected = rest.find(", expected").unwrap_or(rest.len());
        let Some(open) = rest.find(['"', '`']).filter(|open| *open < expected) else {
            continue;
        };
        out.push_str(rest[..open].trim_end());
        let quote = rest.as_bytes()[open];
        let mut escaped = false;
        let close = rest[open + 1..].char_indices().find(|&(_, c)| {
            let end = c == char::from(quote) && !escaped;
            escaped = quote == b'"' && c == '\\' && !escaped;
            end
        });
        rest = close.map_or("", |(i, _)| &rest[open + 1 + i + 1..]);
    }
    out.push_str(rest);
    out
}

fn render_problems(origin: &str, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems
        .iter()
        .map(|p| format!("{origin}: {}: {}", p.key, p.message))
        .collect();
    lines.join("\n")
}

/// Load a TOML file, apply environment overrides and validate.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with(path, &LoadContext::from_env())
}

/// [`load`] with an explicit context.
pub fn load_with(path: &Path, context: &LoadContext) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let source = config::File::from(path)
        .format(config::FileFormat::Toml)
        .required(true);
    build(origin, source, context)
}

/// Parse TOML text (the demo's embedded config, tests) with environment overrides.
pub fn from_toml_str(text: &str, origin: &str) -> Result<Config, ConfigError> {
    from_toml_str_with(text, origin, &LoadContext::from_env())
}

/// [`from_toml_str`] with an explicit context.
pub fn from_toml_str_with(
    text: &str,
    origin: &str,
    context: &LoadContext,
) -> Result<Config, ConfigError> {
    build(
        origin.to_owned(),
        config::File::from_str(text, config::FileFormat::Toml),
        context,
    )
}

fn build<S>(origin: String, source: S, context: &LoadContext) -> Result<Config, ConfigError>
where
    S: config::Source + Send + Sync + 'static,
{
    // A problem may come from an override, so say that overrides were in play.
    let env_prefix = format!("{ENV_PREFIX}__");
    let origin = if std::env::vars_os().any(|(k, _)| k.to_string_lossy().starts_with(&env_prefix)) {
        format!("{origin} (with {env_prefix}* environment overrides)")
    } else {
        origin
    };
    let load_error = |source| ConfigError::Load {
        origin: origin.clone(),
        source,
    };
    let merged = config::Config::builder()
        .add_source(source)
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__"),
        )
        .build()
        .map_err(load_error)?;
    let mut unknown = Vec::new();
    let raw: RawConfig = serde_ignored::deserialize(merged, |path| unknown.push(path.to_string()))
        .map_err(load_error)?;
    let mut problems: Vec<Problem> = unknown
        .into_iter()
        .map(|key| Problem {
            key,
            message: "unknown key (see config/example.toml for every accepted key)".into(),
        })
        .collect();
    match raw.validate(context) {
        Ok(config) if problems.is_empty() => Ok(config),
        Ok(_) => Err(ConfigError::Invalid { origin, problems }),
        Err(mut more) => {
            problems.append(&mut more);
            Err(ConfigError::Invalid { origin, problems })
        }
    }
}

/// The file as written: strings and options, validated by [`RawConfig::validate`].
#[derive(Debug, Default, Deserialize)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub cache: RawCache,
    #[serde(default)]
    pub upstream: RawUpstream,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub accounts: BTreeMap<String, RawAccount>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawServer {
    /// Default `0.0.0.0:8080`.
    pub listen: Option<String>,
    pub plain_listen: Option<String>,
    /// Default `10s`.
    pub shutdown_grace: Option<String>,
    /// Default `10s`.
    pub header_read_timeout: Option<String>,
    /// Default `10s`.
    pub tls_handshake_timeout: Option<String>,
    /// Default `60s`.
    pub idle_timeout: Option<String>,
    /// Default 4096.
    pub max_connections: Option<u64>,
    /// Default `16KiB`.
    pub max_request_head_bytes: Option<RawSize>,
    /// Default 100.
    pub max_cancelled_requests: Option<u64>,
    pub tls: Option<RawTls>,
    /// Off unless present.
    pub rate_limit: Option<RawRateLimit>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawRateLimit {
    /// Required: the refill rate per client address.
    pub requests_per_second: Option<f64>,
    /// Default: one second's worth, at least 1.
    pub burst: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawTls {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub key_credential: Option<String>,
    /// PEM CA certificates; when set, clients must present a certificate one of them issued.
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawLog {
    /// `text` (default) or `json`.
    pub format: Option<String>,
    /// Off unless set: audit events then go to stderr with the rest.
    pub audit_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawAdmin {
    /// Default `127.0.0.1:9091`.
    pub listen: Option<String>,
    /// The admin token (for `/cache`) inline; keep the file unreadable to others.
    pub token: Option<Secret>,
    /// Or a file holding it.
    pub token_file: Option<PathBuf>,
    /// Or a systemd credential holding it.
    pub token_credential: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawCache {
    /// Default `30s`.
    pub ttl: Option<String>,
    /// Default `5s`.
    pub negative_ttl: Option<String>,
    /// Default `256MiB`; a string with a unit or a plain number of bytes.
    pub max_bytes: Option<RawSize>,
    /// Default: an eighth of `max_bytes`.
    pub max_entry_bytes: Option<RawSize>,
    /// Default `30s`.
    pub stale_while_revalidate: Option<String>,
    /// Default `10m`.
    pub stale_if_error: Option<String>,
    /// Default `1s`.
    pub error_backoff: Option<String>,
    /// Default `15m`.
    pub full_refresh_interval: Option<String>,
    /// Default true.
    pub gzip: Option<bool>,
    /// Default `1KiB`.
    pub gzip_min_bytes: Option<RawSize>,
    /// Default 6.
    pub gzip_level: Option<u64>,
}

/// A byte size written as `"256MiB"` or as a plain integer.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawUpstream {
    /// Default `30s`.
    pub timeout: Option<String>,
    /// Default `3s`.
    pub connect_timeout: Option<String>,
    /// Default 8.
    pub max_concurrent_requests: Option<u64>,
    /// Default `5s`.
    pub queue_timeout: Option<String>,
    /// Default `64MiB`.
    pub max_body_bytes: Option<RawSize>,
    /// Default 5.
    pub breaker_failures: Option<u64>,
    /// Default `30s`.
    pub breaker_cooldown: Option<String>,
    /// Default 4.
    pub max_audio_streams: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawAccount {
    pub base_url: Option<String>,
    pub shared_secret: Option<Secret>,
    pub shared_secret_file: Option<PathBuf>,
    pub shared_secret_credential: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub pin_sha256: Option<String>,
    pub server_name: Option<String>,
    /// `"7"` (default) or `"6.5"`.
    pub api_version: Option<String>,
    /// Keys clients present, in clear (hashed when loaded).
    pub api_keys: Option<Vec<Secret>>,
    /// SHA-256 hex of each key.
    pub api_key_hashes: Option<Vec<String>>,
    /// Client certificate names (common name or DNS alternative name) that may read it.
    pub client_names: Option<Vec<String>>,
    /// Serve the account without keys on a non-loopback listener.
    pub allow_anonymous: Option<bool>,
    // Overrides of [upstream]; the same keys as `RawUpstream`.
    pub timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub max_concurrent_requests: Option<u64>,
    pub queue_timeout: Option<String>,
    pub max_body_bytes: Option<RawSize>,
    pub breaker_failures: Option<u64>,
    pub breaker_cooldown: Option<String>,
    pub max_audio_streams: Option<u64>,
}

impl RawAccount {
    /// This account's overrides of `[upstream]`.
    fn upstream(&mut self) -> RawUpstream {
        RawUpstream {
            timeout: self.timeout.take(),
            connect_timeout: self.connect_timeout.take(),
            max_concurrent_requests: self.max_concurrent_requests.take(),
            queue_timeout: self.queue_timeout.take(),
            max_body_bytes: self.max_body_bytes.take(),
            breaker_failures: self.breaker_failures.take(),
            breaker_cooldown: self.breaker_cooldown.take(),
            max_audio_streams: self.max_audio_streams.take(),
        }
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret::new)
    }
}

pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9091";
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(5);
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

/// Collects problems while validating, so one pass reports all of them.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// Keep `Ok` values; record an `Err` under `key` and fall back to `None`.
    fn check<T>(&mut self, key: &str, result: Result<T, String>) -> Option<T> {
        result.map_err(|message| self.push(key, message)).ok()
    }
}

impl RawConfig {
    /// Turn the raw file into typed values, reading referenced files (secrets, certificates).
    pub fn validate(self, context: &LoadContext) -> Result<Config, Vec<Problem>> {
        let mut problems = Problems::default();
        let server = validate_server(self.server, context, &mut problems);
        let admin_listen = problems.check(
            "admin.listen",
            parse_addr(self.admin.listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN)),
        );
        let ttl = problems.check("cache.ttl", duration_or(&self.cache.ttl, DEFAULT_TTL));
        let negative_ttl = problems.check(
            "cache.negative_ttl",
            duration_or(&self.cache.negative_ttl, DEFAULT_NEGATIVE_TTL),
        );
        let max_bytes = problems.check(
            "cache.max_bytes",
            parse_size(self.cache.max_bytes, DEFAULT_MAX_BYTES),
        );
        let max_entry_bytes = max_bytes.and_then(|max_bytes| {
            let entry = problems.check(
                "cache.max_entry_bytes",
                parse_size(self.cache.max_entry_bytes, max_bytes / 8),
            )?;
            if entry > max_bytes {
                problems.push(
                    "cache.max_entry_bytes",
                    format!("must not exceed cache.max_bytes ({max_bytes} bytes)"),
                );
            }
            Some(entry)
        });
        let stale_while_revalidate = problems.check(
            "cache.stale_while_revalidate",
            duration_or(
                &self.cache.stale_while_revalidate,
                DEFAULT_STALE_WHILE_REVALIDATE,
            ),
        );
        let stale_if_error = problems.check(
            "cache.stale_if_error",
            duration_or(&self.cache.stale_if_error, DEFAULT_STALE_IF_ERROR),
        );
        let error_backoff = problems.check(
            "cache.error_backoff",
            duration_or(&self.cache.error_backoff, DEFAULT_ERROR_BACKOFF),
        );
        let full_refresh_interval = problems.check(
            "cache.full_refresh_interval",
            duration_or(
                &self.cache.full_refresh_interval,
                DEFAULT_FULL_REFRESH_INTERVAL,
            ),
        );
        let gzip_min_bytes = problems.check(
            "cache.gzip_min_bytes",
            parse_size(self.cache.gzip_min_bytes, DEFAULT_GZIP_MIN_BYTES),
        );
        let gzip_level = problems.check(
            "cache.gzip_level",
            count_in(self.cache.gzip_level, u64::from(DEFAULT_GZIP_LEVEL), 1, 9).map(|n| n as u32),
        );
        // Accounts inherit [upstream]; when it is invalid they are checked against the defaults.
        let upstream = validate_upstream(
            self.upstream,
            &UpstreamSettings::default(),
            "upstream",
            &mut problems,
        )
        .unwrap_or_default();
        let log_format = problems.check("log.format", parse_log_format(self.log.format.as_deref()));
        let audit_file = self
            .log
            .audit_file
            .and_then(|path| problems.check("log.audit_file", audit_file_path(path)));

        if self.accounts.is_empty() {
            problems.push(
                "accounts",
                "no account is configured: add at least one [accounts.<name>] table",
            );
        }
        // Where an account without keys would be reachable from: a listener that is not
        // loopback and does not require client certificates.
        let mutual_tls = server
            .as_ref()
            .and_then(|server| server.tls.as_ref())
            .is_some_and(|tls| tls.client_ca.is_some());
        let exposed: Vec<(&str, SocketAddr)> = match &server {
            Some(server) => std::iter::once(("server.listen", server.listen))
                .filter(|_| !mutual_tls)
                .chain(server.plain_listen.map(|a| ("server.plain_listen", a)))
                .filter(|(_, addr)| !addr.ip().is_loopback())
                .collect(),
            None => Vec::new(),
        };
        let mut accounts = BTreeMap::new();
        for (name, mut raw) in self.accounts {
            let access = validate_access(&name, &mut raw, &exposed, mutual_tls, &mut problems);
            if let Some(account) = validate_account(&name, raw, &upstream, context, &mut problems)
                && let Some(access) = access
            {
                accounts.insert(name, AccountConfig { access, ..account });
            }
        }
        let admin = self.admin;
        let sources = [
            admin.token.is_some(),
            admin.token_file.is_some(),
            admin.token_credential.is_some(),
        ];
        let admin_token = match (admin.token, admin.token_file, admin.token_credential) {
            _ if sources.iter().filter(|set| **set).count() > 1 => {
                problems.push(
                    "admin.token",
                    "set at most one of token, token_file and token_credential",
                );
                None
            }
            (Some(token), _, _) => problems
                .check("admin.token", token_digest(token.expose().as_bytes()))
                .map(Some),
            (_, Some(path), _) => problems
                .check("admin.token_file", read_token_file(&path))
                .map(Some),
            (_, _, Some(name)) => problems
                .check(
                    "admin.token_credential",
                    read_credential(context, &name).and_then(|bytes| token_digest(&bytes)),
                )
                .map(Some),
            (None, None, None) => Some(None),
        };

        if let (Some(server), Some(admin)) = (&server, admin_listen) {
            let mut taken = vec![("server.listen", server.listen)];
            taken.extend(server.plain_listen.map(|a| ("server.plain_listen", a)));
            for (key, addr) in taken {
                if addr == admin && addr.port() != 0 {
                    problems.push("admin.listen", format!("{addr} is already used by {key}"));
                }
            }
            if server.plain_listen == Some(server.listen) && server.listen.port() != 0 {
                problems.push("server.plain_listen", "must differ from server.listen");
            }
        }

        let cache = (|| {
            Some(CacheConfig {
                ttl: ttl?,
                negative_ttl: negative_ttl?,
                max_bytes: max_bytes?,
                max_entry_bytes: max_entry_bytes?,
                stale_while_revalidate: stale_while_revalidate?,
                stale_if_error: stale_if_error?,
                error_backoff: error_backoff?,
                full_refresh_interval: full_refresh_interval?,
                gzip: self.cache.gzip.unwrap_or(true),
                gzip_min_bytes: gzip_min_bytes?,
                gzip_level: gzip_level?,
            })
        })();
        match (server, admin_listen, cache, log_format, admin_token) {
            (Some(server), Some(admin), Some(cache), Some(format), Some(token))
                if problems.0.is_empty() =>
            {
                Ok(Config {
                    server,
                    admin: AdminConfig {
                        listen: admin,
                        token,
                    },
                    cache,
                    log: LogConfig { format, audit_file },
                    accounts,
                })
            }
            _ => Err(problems.0),
        }
    }
}

fn validate_server(
    raw: RawServer,
    context: &LoadContext,
    problems: &mut Problems,
) -> Option<ServerConfig> {
    let listen = problems.check(
        "server.listen",
        parse_addr(raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN)),
    );
    let plain_listen = match raw.plain_listen.as_deref() {
        Some(addr) => problems.check("server.plain_listen", parse_addr(addr).map(Some)),
        None => Some(None),
    };
    let mut duration = |key: &str, value: &Option<String>, default: Duration| {
        problems.check(key, positive_duration_or(value, default))
    };
    let shutdown_grace = duration(
        "server.shutdown_grace",
        &raw.shutdown_grace,
        DEFAULT_SHUTDOWN_GRACE,
    );
    let header_read_timeout = duration(
        "server.header_read_timeout",
        &raw.header_read_timeout,
        DEFAULT_HEADER_READ_TIMEOUT,
    );
    let tls_handshake_timeout = duration(
        "server.tls_handshake_timeout",
        &raw.tls_handshake_timeout,
        DEFAULT_TLS_HANDSHAKE_TIMEOUT,
    );
    let idle_timeout = duration(
        "server.idle_timeout",
        &raw.idle_timeout,
        DEFAULT_IDLE_TIMEOUT,
    );
    let max_connections = match raw.max_connections {
        None => Some(DEFAULT_MAX_CONNECTIONS),
        // A semaphore holds at most u32::MAX >> 3 permits; far beyond any file-descriptor limit.
        Some(n @ 1..=1_000_000) => usize::try_from(n).ok(),
        Some(n) => {
            problems.push(
                "server.max_connections",
                format!("{n} is out of range: expected 1 to 1000000"),
            );
            None
        }
    };
    let max_request_head_bytes = problems.check(
        "server.max_request_head_bytes",
        parse_size(
            raw.max_request_head_bytes,
            DEFAULT_MAX_REQUEST_HEAD_BYTES as u64,
        )
        .and_then(|bytes| match bytes {
            // hyper needs room for at least 8 KiB of buffered head.
            8192..=1_048_576 => Ok(bytes as usize),
            _ => Err(format!("{bytes} is out of range: expected 8KiB to 1MiB")),
        }),
    );
    let max_cancelled_requests = problems.check(
        "server.max_cancelled_requests",
        count_in(
            raw.max_cancelled_requests,
            DEFAULT_MAX_CANCELLED_REQUESTS,
            1,
            1_000_000,
        )
        .map(|n| n as usize),
    );
    let tls = match raw.tls {
        Some(tls) => validate_tls(tls, context, problems).map(Some),
        None => Some(None),
    };
    let rate_limit = match raw.rate_limit {
        Some(limit) => validate_rate_limit(limit, problems).map(Some),
        None => Some(None),
    };
    Some(ServerConfig {
        listen: listen?,
        plain_listen: plain_listen?,
        tls: tls?,
        shutdown_grace: shutdown_grace?,
        header_read_timeout: header_read_timeout?,
        tls_handshake_timeout: tls_handshake_timeout?,
        idle_timeout: idle_timeout?,
        max_connections: max_connections?,
        max_request_head_bytes: max_request_head_bytes?,
        max_cancelled_requests: max_cancelled_requests?,
        rate_limit: rate_limit?,
    })
}

/// Most requests per second (and burst) a rate limit may name.
const MAX_RATE: f64 = 1_000_000.0;

fn validate_rate_limit(raw: RawRateLimit, problems: &mut Problems) -> Option<RateLimit> {
    let rate = match raw.requests_per_second {
        Some(rate) if rate > 0.0 && rate <= MAX_RATE => Some(rate),
        Some(rate) => {
            problems.push(
                "server.rate_limit.requests_per_second",
                format!("{rate} is out of range: expected more than 0 and at most 1000000 (fractions allowed, e.g. 0.5)"),
            );
            None
        }
        None => {
            problems.push(
                "server.rate_limit.requests_per_second",
                "missing: the requests per second each client address may make (remove [server.rate_limit] to turn the limit off)",
            );
            None
        }
    };
    let burst = match raw.burst {
        None => rate.map(|rate| rate.ceil() as u32),
        Some(burst @ 1..=1_000_000) => Some(burst as u32),
        Some(burst) => {
            problems.push(
                "server.rate_limit.burst",
                format!("{burst} is out of range: expected 1 to 1000000"),
            );
            None
        }
    };
    Some(RateLimit {
        requests_per_second: rate?,
        burst: burst?,
    })
}

fn validate_tls(
    raw: RawTls,
    context: &LoadContext,
    problems: &mut Problems,
) -> Option<TlsIdentity> {
    let chain = match &raw.cert {
        Some(path) => problems.check("server.tls.cert", read_certificates(path)),
        None => {
            problems.push(
                "server.tls.cert",
                "missing: the PEM certificate chain to serve",
            );
            None
        }
    };
    let key = match (&raw.key, &raw.key_credential) {
        (Some(path), None) => problems.check(
            "server.tls.key",
            std::fs::read(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
                .and_then(|pem| parse_private_key(&pem, &path.display().to_string())),
        ),
        (None, Some(name)) => problems.check(
            "server.tls.key_credential",
            read_credential(context, name)
                .and_then(|pem| parse_private_key(&pem, &format!("credential \"{name}\""))),
        ),
        (Some(_), Some(_)) => {
            problems.push(
                "server.tls.key",
                "set exactly one of key and key_credential, not both",
            );
            None
        }
        (None, None) => {
            problems.push(
                "server.tls.key",
                "missing: set key (a PEM file) or key_credential (a systemd credential)",
            );
            None
        }
    };
    let client_ca = match raw.client_ca {
        Some(path) => problems
            .check("server.tls.client_ca", read_certificates(&path))
            .map(|roots| Some(ClientCa { path, roots })),
        None => Some(None),
    };
    let (chain, key, cert_path, client_ca) = (chain?, key?, raw.cert?, client_ca?);
    // Whether the key belongs to the certificate is checked when the server configuration is
    // built from this (`crate::tls`), which check-config does too.
    Some(TlsIdentity {
        cert_path,
        chain,
        key,
        client_ca,
    })
}

fn parse_private_key(pem: &[u8], origin: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
        format!("{origin}: no usable private key ({e}); expected a PEM PKCS#8, RSA or EC key")
    })
}

/// Read a systemd credential by name from `$CREDENTIALS_DIRECTORY`.
fn read_credential(context: &LoadContext, name: &str) -> Result<Vec<u8>, String> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(format!("\"{name}\" is not a credential name"));
    }
    let Some(dir) = &context.credentials_dir else {
        return Err(format!(
            "credential \"{name}\" needs $CREDENTIALS_DIRECTORY, which systemd sets for a unit with LoadCredential={name}:<path>"
        ));
    };
    let path = dir.join(name);
    std::fs::read(&path).map_err(|e| format!("cannot read credential {}: {e}", path.display()))
}

/// A path the audit log can be opened at: a file name in a directory that exists.
fn audit_file_path(path: PathBuf) -> Result<PathBuf, String> {
    let named = path.file_name().is_some() && !path.as_os_str().to_string_lossy().ends_with('/');
    if !named {
        return Err(format!(
            "\"{}\" names no file: expected e.g. /var/log/miralix-gateway/audit.log",
            path.display()
        ));
    }
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(directory) if !directory.is_dir() => Err(format!(
            "the directory {} does not exist (the unit's LogsDirectory= creates /var/log/miralix-gateway)",
            directory.display()
        )),
        _ => Ok(path),
    }
}

fn parse_log_format(value: Option<&str>) -> Result<LogFormat, String> {
    match value {
        None | Some("text") => Ok(LogFormat::Text),
        Some("json") => Ok(LogFormat::Json),
        Some(other) => Err(format!(
            "\"{other}\" is not a log format: expected \"text\" or \"json\""
        )),
    }
}

fn validate_account(
    name: &str,
    mut raw: RawAccount,
    defaults: &UpstreamSettings,
    context: &LoadContext,
    problems: &mut Problems,
) -> Option<AccountConfig> {
    let upstream = validate_upstream(
        raw.upstream(),
        defaults,
        &format!("accounts.{name}"),
        problems,
    );
    let key = |field: &str| format!("accounts.{name}.{field}");
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        problems.push(
            format!("accounts.{name}"),
            "an account name may only contain letters, digits, '-', '_' and '.'",
        );
    }
    let base_url = match raw.base_url {
        Some(url) => problems.check(&key("base_url"), parse_base_url(&url)),
        None => {
            problems.push(
                key("base_url"),
                "missing: the box's URL, e.g. \"https://192.168.1.10\"",
            );
            None
        }
    };
    let sources = [
        raw.shared_secret.is_some(),
        raw.shared_secret_file.is_some(),
        raw.shared_secret_credential.is_some(),
    ];
    let shared_secret = match (
        raw.shared_secret,
        raw.shared_secret_file,
        raw.shared_secret_credential,
    ) {
        _ if sources.iter().filter(|set| **set).count() > 1 => {
            problems.push(
                key("shared_secret"),
                "set exactly one of shared_secret, shared_secret_file and shared_secret_credential",
            );
            None
        }
        (Some(secret), _, _) => problems.check(&key("shared_secret"), non_empty_secret(secret)),
        (_, Some(path), _) => problems.check(&key("shared_secret_file"), read_secret_file(&path)),
        (_, _, Some(credential)) => problems.check(
            &key("shared_secret_credential"),
            read_credential(context, &credential).and_then(|bytes| {
                secret_from_bytes(&bytes).map_err(|e| format!("credential \"{credential}\": {e}"))
            }),
        ),
        (None, None, None) => {
            problems.push(
                key("shared_secret"),
                "missing: set shared_secret, shared_secret_file or shared_secret_credential",
            );
            None
        }
    };
    let ca_certs = match &raw.ca_file {
        Some(path) => problems.check(&key("ca_file"), read_certificates(path)),
        None => Some(Vec::new()),
    };
    let pin_sha256 = match &raw.pin_sha256 {
        Some(pin) => problems.check(&key("pin_sha256"), parse_pin(pin).map(Some)),
        None => Some(None),
    };
    let server_name = match raw.server_name {
        Some(name) => problems.check(
            &key("server_name"),
            ServerName::try_from(name.clone())
                .map(Some)
                .map_err(|_| format!("\"{name}\" is not a valid DNS name or IP address")),
        ),
        None => Some(None),
    };
    if let Some(url) = &base_url
        && url.scheme() == "http"
        && (raw.ca_file.is_some()
            || raw.pin_sha256.is_some()
            || matches!(server_name, Some(Some(_))))
    {
        problems.push(
            key("base_url"),
            "ca_file, pin_sha256 and server_name need an https:// base_url",
        );
    }
    let api_version = problems.check(
        &key("api_version"),
        parse_api_version(raw.api_version.as_deref()),
    );
    Some(AccountConfig {
        access: Access::Open,
        api_version: api_version?,
        base_url: base_url?,
        shared_secret: shared_secret?,
        trust: UpstreamTrust {
            ca_certs: ca_certs?,
            pin_sha256: pin_sha256?,
            server_name: server_name?,
        },
        upstream: upstream?,
    })
}

/// `[upstream]` (prefix `upstream`) or an account's overrides of it (prefix `accounts.<name>`).
fn validate_upstream(
    raw: RawUpstream,
    defaults: &UpstreamSettings,
    prefix: &str,
    problems: &mut Problems,
) -> Option<UpstreamSettings> {
    let key = |field: &str| format!("{prefix}.{field}");
    let mut duration = |field: &str, value: &Option<String>, default: Duration| {
        problems.check(&key(field), positive_duration_or(value, default))
    };
    let timeout = duration("timeout", &raw.timeout, defaults.timeout);
    let connect_timeout = duration(
        "connect_timeout",
        &raw.connect_timeout,
        defaults.connect_timeout,
    );
    let queue_timeout = duration("queue_timeout", &raw.queue_timeout, defaults.queue_timeout);
    let breaker_cooldown = duration(
        "breaker_cooldown",
        &raw.breaker_cooldown,
        defaults.breaker_cooldown,
    );
    let max_concurrent_requests = problems.check(
        &key("max_concurrent_requests"),
        count_in(
            raw.max_concurrent_requests,
            defaults.max_concurrent_requests as u64,
            1,
            10_000,
        )
        .map(|n| n as usize),
    );
    let breaker_failures = problems.check(
        &key("breaker_failures"),
        count_in(
            raw.breaker_failures,
            u64::from(defaults.breaker_failures),
            1,
            1_000,
        )
        .map(|n| n as u32),
    );
    let max_audio_streams = problems.check(
        &key("max_audio_streams"),
        count_in(
            raw.max_audio_streams,
            defaults.max_audio_streams as u64,
            1,
            10_000,
        )
        .map(|n| n as usize),
    );
    let max_body_bytes = problems.check(
        &key("max_body_bytes"),
        parse_size(raw.max_body_bytes, defaults.max_body_bytes),
    );
    Some(UpstreamSettings {
        timeout: timeout?,
        connect_timeout: connect_timeout?,
        max_concurrent_requests: max_concurrent_requests?,
        queue_timeout: queue_timeout?,
        max_body_bytes: max_body_bytes?,
        breaker_failures: breaker_failures?,
        breaker_cooldown: breaker_cooldown?,
        max_audio_streams: max_audio_streams?,
    })
}

fn parse_api_version(value: Option<&str>) -> Result<ApiVersion, String> {
    match value.map(str::trim) {
        None | Some("7" | "7.0" | "7.1" | "7.2" | "7.3") => Ok(ApiVersion::V7),
        Some("6.5") => Ok(ApiVersion::V6_5),
        Some(other) => Err(format!(
            "\"{other}\" is not a supported API version: expected \"7\" (7.0 and later) or \"6.5\""
        )),
    }
}

fn count_in(value: Option<u64>, default: u64, min: u64, max: u64) -> Result<u64, String> {
    match value.unwrap_or(default) {
        n if (min..=max).contains(&n) => Ok(n),
        n => Err(format!("{n} is out of range: expected {min} to {max}")),
    }
}

fn parse_addr(value: &str) -> Result<SocketAddr, String> {
    value.parse().map_err(|_| {
        format!("\"{value}\" is not a socket address: expected IP:PORT, e.g. \"0.0.0.0:8080\" or \"[::1]:8080\"")
    })
}

fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value).map_err(|e| {
        format!("\"{value}\" is not a duration ({e}): expected e.g. \"30s\", \"5m\", \"1h 30m\"")
    })
}

fn duration_or(value: &Option<String>, default: Duration) -> Result<Duration, String> {
    value.as_deref().map_or(Ok(default), parse_duration)
}

fn positive_duration_or(value: &Option<String>, default: Duration) -> Result<Duration, String> {
    match duration_or(value, default)? {
        d if d.is_zero() => Err("must be longer than zero".into()),
        d => Ok(d),
    }
}

fn parse_size(value: Option<RawSize>, default: u64) -> Result<u64, String> {
    let bytes = match value {
        None => return Ok(default),
        Some(RawSize::Bytes(n)) => n,
        Some(RawSize::Text(text)) => text
            .trim()
            .parse::<bytesize::ByteSize>()
            .map_err(|_| {
                format!("\"{text}\" is not a size: expected bytes or a unit, e.g. \"256MiB\", \"1GiB\", 1048576")
            })?
            .as_u64(),
    };
    if bytes == 0 {
        return Err("must be larger than zero".into());
    }
    Ok(bytes)
}

fn parse_base_url(value: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(value).map_err(|e| {
        format!("\"{value}\" is not a URL ({e}): expected e.g. \"https://192.168.1.10\"")
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "scheme \"{}\" is not supported: use https:// or http://",
            url.scheme()
        ));
    }
    if url.host().is_none() {
        return Err("the URL has no host".into());
    }
    // Credentials in the URL would end up in logs and error messages.
    if !url.username().is_empty() || url.password().is_some() {
        return Err("the URL must not contain a user name or password; the shared secret goes in shared_secret".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("the URL must not have a query or fragment".into());
    }
    Ok(url)
}

fn non_empty_secret(secret: Secret) -> Result<Secret, String> {
    check_secret_text(secret.expose())?;
    Ok(secret)
}

fn read_secret_file(path: &Path) -> Result<Secret, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    secret_from_bytes(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Who may read an account: its keys and client certificate names, or anyone when that was
/// asked for or only loopback listeners and listeners requiring client certificates expose it.
fn validate_access(
    name: &str,
    raw: &mut RawAccount,
    exposed: &[(&str, SocketAddr)],
    mutual_tls: bool,
    problems: &mut Problems,
) -> Option<Access> {
    let key = |field: &str| format!("accounts.{name}.{field}");
    let mut digests = Vec::new();
    let mut valid = true;
    for (index, secret) in raw.api_keys.take().unwrap_or_default().iter().enumerate() {
        match auth::key_digest(secret.expose()) {
            Ok(digest) => digests.push(digest),
            Err(message) => {
                problems.push(key(&format!("api_keys[{index}]")), message);
                valid = false;
            }
        }
    }
    for (index, hex) in raw
        .api_key_hashes
        .take()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        match auth::parse_digest(hex) {
            Ok(digest) => digests.push(digest),
            Err(message) => {
                problems.push(key(&format!("api_key_hashes[{index}]")), message);
                valid = false;
            }
        }
    }
    let mut client_names = Vec::new();
    for (index, name) in raw
        .client_names
        .take()
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let field = key(&format!("client_names[{index}]"));
        if !mutual_tls {
            problems.push(
                field,
                "client_names needs server.tls.client_ca, the CA that issues client certificates",
            );
            valid = false;
            break;
        }
        let name = name.trim();
        if name.is_empty() || name.chars().any(char::is_control) {
            problems.push(
                field,
                format!(
                    "{name:?} is not a certificate name: expected a common name or DNS name, e.g. \"crm.apps.example\""
                ),
            );
            valid = false;
            continue;
        }
        client_names.push(name.to_ascii_lowercase());
    }
    let anonymous = raw.allow_anonymous.take().unwrap_or(false);
    if anonymous && !(digests.is_empty() && client_names.is_empty()) {
        problems.push(
            key("allow_anonymous"),
            "allow_anonymous = true with api keys or client_names configured: they would be pointless; remove one or the other",
        );
        return None;
    }
    if !valid {
        return None;
    }
    if !(digests.is_empty() && client_names.is_empty()) {
        return Some(Access::Restricted {
            keys: digests,
            client_names,
        });
    }
    if let Some((listener, addr)) = exposed.first().filter(|_| !anonymous) {
        problems.push(
            key("api_key_hashes"),
            format!(
                "this account has no API keys and {listener} = {addr} is not a loopback address and does not require client certificates, so anyone who can reach the gateway could read its recordings: add api_key_hashes (SHA-256 hex of each key) or api_keys, set server.tls.client_ca, or set allow_anonymous = true to serve it without keys on purpose"
            ),
        );
        return None;
    }
    Some(Access::Open)
}

fn read_token_file(path: &Path) -> Result<Digest, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    token_digest(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// The digest of an admin token read from a file or credential (one trailing newline ignored).
fn token_digest(bytes: &[u8]) -> Result<Digest, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the admin token is not UTF-8 text")?;
    auth::key_digest(text.trim_end_matches(['\r', '\n']))
        .map_err(|e| e.replace("an API key", "the admin token"))
}

/// A secret stored in a file or credential.
fn secret_from_bytes(bytes: &[u8]) -> Result<Secret, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the shared secret is not UTF-8 text")?;
    // Files written by `echo` or editors end in a newline that is not part of the secret.
    let secret = text.trim_end_matches(['\r', '\n']);
    check_secret_text(secret)?;
    Ok(Secret::new(secret))
}

fn check_secret_text(secret: &str) -> Result<(), String> {
    if secret.is_empty() {
        return Err("the shared secret is empty".into());
    }
    // It is sent as an HTTP header value.
    if http::HeaderValue::from_str(secret).is_err() {
        return Err("the shared secret contains characters not allowed in an HTTP header".into());
    }
    Ok(())
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file ({e})", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no \"BEGIN CERTIFICATE\" block found",
            path.display()
        ));
    }
    Ok(certs)
}

/// Accept `FD:C8:0A:...` (openssl's fingerprint output) or plain hex, any case.
pub fn parse_pin(value: &str) -> Result<[u8; 32], String> {
    let hex: String = value.chars().filter(|c| *c != ':').collect();
    crate::crypto::digest_from_hex(&hex).ok_or_else(|| {
        "expected the SHA-256 fingerprint of the box's certificate as 64 hex digits, \
         optionally colon-separated (openssl x509 -noout -fingerprint -sha256)"
            .to_owned()
    })
}

/// Format a SHA-256 fingerprint the way openssl prints it (`AB:CD:...`).
pub fn format_pin(pin: &[u8; 32]) -> String {
    crate::crypto::fingerprint(pin)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [accounts.greenbox]
        base_url = "https://192.168.1.10"
        shared_secret = "s3cret"
        api_key_hashes = ["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
    "#;

    #[test]
    fn defaults_apply() {
        let config = from_toml_str(MINIMAL, "test.toml").unwrap();
        assert_eq!(config.server.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(config.admin.listen, DEFAULT_ADMIN_LISTEN.parse().unwrap());
        assert_eq!(config.cache.ttl, DEFAULT_TTL);
        assert_eq!(config.cache.negative_ttl, DEFAULT_NEGATIVE_TTL);
        assert_eq!(config.cache.max_bytes, DEFAULT_MAX_BYTES);
        assert_eq!(
            config.cache.stale_while_revalidate,
            DEFAULT_STALE_WHILE_REVALIDATE
        );
        assert_eq!(config.cache.stale_if_error, DEFAULT_STALE_IF_ERROR);
        assert_eq!(
            config.cache.full_refresh_interval,
            DEFAULT_FULL_REFRESH_INTERVAL
        );
        assert!(config.cache.gzip);
        assert_eq!(config.cache.gzip_min_bytes, DEFAULT_GZIP_MIN_BYTES);
        assert_eq!(config.cache.gzip_level, DEFAULT_GZIP_LEVEL);
        let account = &config.accounts["greenbox"];
        assert_eq!(account.api_version, ApiVersion::V7);
        assert_eq!(account.upstream, UpstreamSettings::default());
        assert_eq!(account.trust, UpstreamTrust::default());
    }

    #[test]
    fn sizes_accept_units_and_integers() {
        assert_eq!(
            parse_size(Some(RawSize::Text("256MiB".into())), 1),
            Ok(256 << 20)
        );
        assert_eq!(
            parse_size(Some(RawSize::Text("1 GiB".into())), 1),
            Ok(1 << 30)
        );
        assert_eq!(parse_size(Some(RawSize::Text("4096".into())), 1), Ok(4096));
        assert_eq!(parse_size(Some(RawSize::Bytes(1000)), 1), Ok(1000));
        assert!(parse_size(Some(RawSize::Text("lots".into())), 1).is_err());
        assert!(parse_size(Some(RawSize::Bytes(0)), 1).is_err());
    }

    #[test]
    fn an_entry_bound_defaults_to_an_eighth_and_may_not_exceed_the_cache() {
        let account = "[accounts.greenbox]\nbase_url = \"http://box\"\nshared_secret = \"s\"\nallow_anonymous = true\n";
        let config = from_toml_str(
            &format!("[cache]\nmax_bytes = \"8MiB\"\n{account}"),
            "a.toml",
        )
        .unwrap();
        assert_eq!(config.cache.max_entry_bytes, 1 << 20);
        let err = from_toml_str(
            &format!("[cache]\nmax_bytes = \"1MiB\"\nmax_entry_bytes = \"2MiB\"\n{account}"),
            "a.toml",
        )
        .unwrap_err();
        assert!(
            err.problems()
                .iter()
                .any(|p| p.contains("cache.max_entry_bytes: must not exceed")),
            "{err}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = r#"
            [server]
            listen = "nowhere"
            [cache]
            ttl = "soon"
            ttll = "30s"
            max_bytes = "lots"
            [accounts.greenbox]
            base_url = "ftp://box"
            shared_secret = "a"
            shared_secret_file = "/nonexistent"
            pin_sha256 = "12:34"
            colour = "blue"
            api_version = "8"
            max_audio_streams = 0
        "#;
        let err = from_toml_str(text, "bad.toml").unwrap_err();
        let problems = err.problems();
        for key in [
            "cache.ttll",
            "accounts.greenbox.colour",
            "server.listen",
            "cache.ttl",
            "cache.max_bytes",
            "accounts.greenbox.base_url",
            "accounts.greenbox.shared_secret",
            "accounts.greenbox.pin_sha256",
            "accounts.greenbox.api_version",
            "accounts.greenbox.max_audio_streams",
        ] {
            assert!(
                problems
                    .iter()
                    .any(|p| p.starts_with(&format!("bad.toml: {key}: "))),
                "{key} missing from {problems:#?}"
            );
        }
    }

    #[test]
    fn an_account_without_keys_is_open_only_on_loopback_or_when_asked() {
        let account = |extra: &str| {
            format!(
                "[accounts.greenbox]\nbase_url = \"https://10.0.0.1\"\nshared_secret = \"s\"\n{extra}\n"
            )
        };
        let err = from_toml_str(&account(""), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("accounts.greenbox.api_key_hashes: this account has no API keys and server.listen = 0.0.0.0:8080 is not a loopback address"),
            "{err}"
        );
        let loopback = format!("[server]\nlisten = \"127.0.0.1:8080\"\n{}", account(""));
        assert_eq!(
            from_toml_str(&loopback, "t.toml").unwrap().accounts["greenbox"].access,
            Access::Open
        );
        let exposed_plain = format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\nplain_listen = \"[::]:8081\"\n{}",
            account("")
        );
        let err = from_toml_str(&exposed_plain, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.plain_listen = [::]:8081"), "{err}");
        let open = from_toml_str(&account("allow_anonymous = true"), "t.toml").unwrap();
        assert_eq!(open.accounts["greenbox"].access, Access::Open);
        let keyed =
            from_toml_str(&account("api_keys = [\"0123456789abcdef-key\"]"), "t.toml").unwrap();
        assert_eq!(
            keyed.accounts["greenbox"].access,
            Access::keys(vec![auth::digest(b"0123456789abcdef-key")])
        );
        assert!(
            !format!("{keyed:?}").contains("0123456789abcdef-key"),
            "keys never show in Debug"
        );
        for (extra, key) in [
            ("api_keys = [\"short\"]", "api_keys[0]"),
            ("api_key_hashes = [\"abc\"]", "api_key_hashes[0]"),
            (
                "api_keys = [\"0123456789abcdef-key\"]\nallow_anonymous = true",
                "allow_anonymous",
            ),
        ] {
            let err = from_toml_str(&account(extra), "t.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("accounts.greenbox.{key}: ")), "{err}");
        }
    }

    #[test]
    fn the_admin_token_is_read_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        std::fs::write(&path, "admin-token-0123456789\n").unwrap();
        let text = format!("[admin]\ntoken_file = \"{}\"\n{MINIMAL}", path.display());
        let config = from_toml_str(&text, "t.toml").unwrap();
        assert_eq!(
            config.admin.token,
            Some(auth::digest(b"admin-token-0123456789"))
        );
        std::fs::write(&path, "short\n").unwrap();
        let err = from_toml_str(&text, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains("admin.token_file: ")
                && err.contains("the admin token must be at least 16"),
            "{err}"
        );
    }

    #[test]
    fn api_versions_and_gzip_levels() {
        assert_eq!(parse_api_version(Some("6.5")), Ok(ApiVersion::V6_5));
        assert_eq!(parse_api_version(Some("7.3")), Ok(ApiVersion::V7));
        assert_eq!(parse_api_version(None), Ok(ApiVersion::V7));
        let err = parse_api_version(Some("6")).unwrap_err();
        assert!(err.contains("\"6.5\""), "{err}");
        let text = format!("{MINIMAL}\n[cache]\ngzip_level = 10\n");
        let err = from_toml_str(&text, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains("cache.gzip_level: 10 is out of range: expected 1 to 9"),
            "{err}"
        );
    }

    #[test]
    fn accounts_are_required() {
        let err = from_toml_str("[cache]\nttl = \"1s\"\n", "empty.toml").unwrap_err();
        assert!(
            err.to_string().contains("empty.toml: accounts: no account"),
            "{err}"
        );
    }

    #[test]
    fn secret_is_redacted_in_debug_output() {
        let config = from_toml_str(MINIMAL, "test.toml").unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("<redacted>"));
    }

    /// A certificate and key in PEM, and a key that belongs to neither.
    #[test]
    fn parse_and_type_errors_leave_values_out() {
        let secret = "s3cret-value-123";
        for (text, expected) in [
            (
                format!("[accounts.greenbox]\nshared_secret = \"{secret}\n"),
                "TOML parse error at line 2, column",
            ),
            (
                format!("[accounts.greenbox]\nshared_secret = \"{secret}\" \"x\"\n"),
                "unexpected key or value",
            ),
            (
                format!("[accounts.greenbox]\napi_keys = \"{secret}\\\" \\\"\"\n"),
                "invalid type: string, expected a sequence for key `accounts.greenbox.api_keys`",
            ),
            (
                format!("[cache]\ngzip = \"{secret}\"\n"),
                "invalid type: string, expected a boolean",
            ),
            (
                format!("[server]\nmax_connections = -{}\n", &secret[7..].len()),
                "invalid type: 64-bit integer, expected an unsigned",
            ),
        ] {
            let err = from_toml_str(&text, "t.toml").unwrap_err().to_string();
            assert!(!err.contains(secret), "{err}");
            assert!(!err.contains("\"x\""), "{err}");
            assert!(err.contains(expected), "{expected:?} not in {err}");
        }
        assert_eq!(
            redact_unexpected("invalid type: integer `42`, expected a string"),
            "invalid type: integer, expected a string"
        );
    }

    #[test]
    fn the_audit_file_must_be_a_file_in_an_existing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let with = |path: &str| format!("[log]\naudit_file = \"{path}\"\n{MINIMAL}");
        let good = dir.path().join("audit.log");
        let config = from_toml_str(&with(&good.display().to_string()), "t.toml").unwrap();
        assert_eq!(config.log.audit_file, Some(good));
        for (path, expected) in [
            ("", "names no file"),
            ("/var/log/", "names no file"),
            ("/var/log/..", "names no file"),
            (
                "/nonexistent/dir/audit.log",
                "the directory /nonexistent/dir does not exist",
            ),
        ] {
            let err = from_toml_str(&with(path), "t.toml")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("log.audit_file: ") && err.contains(expected),
                "{path}: {err}"
            );
        }
    }

    #[test]
    fn the_rate_limit_is_off_unless_configured_and_checked_when_it_is() {
        assert_eq!(
            from_toml_str(MINIMAL, "t.toml").unwrap().server.rate_limit,
            None
        );
        let with = |limit: &str| format!("[server.rate_limit]\n{limit}\n{MINIMAL}");
        let config = from_toml_str(&with("requests_per_second = 2.5"), "t.toml").unwrap();
        assert_eq!(
            config.server.rate_limit,
            Some(RateLimit {
                requests_per_second: 2.5,
                burst: 3
            })
        );
        for (limit, expected) in [
            (
                "burst = 5",
                "server.rate_limit.requests_per_second: missing",
            ),
            (
                "requests_per_second = 0",
                "server.rate_limit.requests_per_second: 0 is out of range",
            ),
            (
                "requests_per_second = 10\nburst = 0",
                "server.rate_limit.burst: 0 is out of range",
            ),
        ] {
            let err = from_toml_str(&with(limit), "t.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{expected} not in {err}");
        }
    }

    #[test]
    fn client_certificates_guard_the_tls_listener_and_name_accounts() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, not_a_cert) = tls_files(dir.path());
        let text = |client_ca: Option<&Path>, server: &str, account: &str| {
            let client_ca = client_ca.map_or(String::new(), |ca| {
                format!("client_ca = \"{}\"", ca.display())
            });
            format!(
                "[server]\nlisten = \"0.0.0.0:8443\"\n{server}\n[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n{client_ca}\n\
                 [accounts.greenbox]\nbase_url = \"https://10.0.0.1\"\nshared_secret = \"s\"\n{account}\n",
                cert.display(),
                key.display()
            )
        };
        // The self-signed serving certificate doubles as the client CA.
        let config = from_toml_str(&text(Some(&cert), "", ""), "t.toml").unwrap();
        assert_eq!(config.accounts["greenbox"].access, Access::Open);
        let tls = config.server.tls.as_ref().unwrap();
        assert_eq!(tls.client_ca.as_ref().unwrap().roots.len(), 1);
        let named = text(Some(&cert), "", "client_names = [\" CRM.Apps.Example \"]");
        assert_eq!(
            from_toml_str(&named, "t.toml").unwrap().accounts["greenbox"].access,
            Access::Restricted {
                keys: Vec::new(),
                client_names: vec!["crm.apps.example".into()],
            }
        );
        // A plain listener beside it is not guarded by certificates.
        let plain = text(Some(&cert), "plain_listen = \"0.0.0.0:8080\"", "");
        let err = from_toml_str(&plain, "t.toml").unwrap_err().to_string();
        assert!(err.contains("server.plain_listen = 0.0.0.0:8080"), "{err}");
        let cases = [
            (
                text(None, "", "client_names = [\"crm\"]\nallow_anonymous = true"),
                "accounts.greenbox.client_names[0]: client_names needs server.tls.client_ca",
            ),
            (
                text(Some(&cert), "", "client_names = [\"\"]"),
                "accounts.greenbox.client_names[0]: \"\" is not a certificate name",
            ),
            (text(Some(&not_a_cert), "", ""), "server.tls.client_ca: "),
            (
                text(Some(Path::new("/nonexistent/ca.pem")), "", ""),
                "server.tls.client_ca: cannot read /nonexistent/ca.pem",
            ),
        ];
        for (text, expected) in cases {
            let err = from_toml_str(&text, "t.toml").unwrap_err().to_string();
            assert!(err.contains(expected), "{expected} not in {err}");
        }
    }

    fn tls_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        let other = dir.join("other.pem");
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
        std::fs::write(&other, rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
        (cert, key, other)
    }

    fn with_tls(tls: &str) -> String {
        format!("[server.tls]\n{tls}\n{MINIMAL}")
    }

    #[test]
    fn tls_identity_loads_and_redacts_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, _) = tls_files(dir.path());
        let text = with_tls(&format!(
            "cert = \"{}\"\nkey = \"{}\"",
            cert.display(),
            key.display()
        ));
        let config = from_toml_str(&text, "t.toml").unwrap();
        let identity = config.server.tls.as_ref().unwrap();
        assert_eq!(identity.chain.len(), 1);
        let debug = format!("{config:?}");
        assert!(debug.contains("key: \"<redacted>\""), "{debug}");
    }

    #[test]
    fn tls_problems_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        // A key that does not belong to the certificate is found when the server configuration
        // is built: see `crate::tls`.
        let (cert, key, _) = tls_files(dir.path());
        let cases = [
            (
                format!(
                    "cert = \"/nonexistent/cert.pem\"\nkey = \"{}\"",
                    key.display()
                ),
                "server.tls.cert: cannot read /nonexistent/cert.pem".to_owned(),
            ),
            (
                format!(
                    "cert = \"{}\"\nkey = \"{}\"",
                    cert.display(),
                    cert.display()
                ),
                format!("server.tls.key: {}: no usable private key", cert.display()),
            ),
            (
                format!("cert = \"{}\"", cert.display()),
                "server.tls.key: missing".to_owned(),
            ),
        ];
        for (tls, expected) in cases {
            let err = from_toml_str(&with_tls(&tls), "t.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(&expected), "{expected:?} not in {err}");
        }
    }

    #[test]
    fn secrets_and_keys_come_from_systemd_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, _) = tls_files(dir.path());
        std::fs::write(dir.path().join("greenbox"), "from-credential\n").unwrap();
        std::fs::copy(&key, dir.path().join("tls-key")).unwrap();
        let text = format!(
            "[server.tls]\ncert = \"{}\"\nkey_credential = \"tls-key\"\n\
             [accounts.greenbox]\nbase_url = \"https://10.0.0.1\"\nshared_secret_credential = \"greenbox\"\n\
             allow_anonymous = true\n",
            cert.display()
        );
        let context = LoadContext {
            credentials_dir: Some(dir.path().to_owned()),
        };
        let config = from_toml_str_with(&text, "t.toml", &context).unwrap();
        assert_eq!(
            config.accounts["greenbox"].shared_secret.expose(),
            "from-credential"
        );
        assert!(config.server.tls.is_some());

        let err = from_toml_str_with(&text, "t.toml", &LoadContext::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("accounts.greenbox.shared_secret_credential: credential \"greenbox\" needs $CREDENTIALS_DIRECTORY"), "{err}");
        assert!(err.contains("server.tls.key_credential"), "{err}");
        let two = text.replace(
            "shared_secret_credential",
            "shared_secret = \"x\"\nshared_secret_credential",
        );
        let err = from_toml_str_with(&two, "t.toml", &context)
            .unwrap_err()
            .to_string();
        assert!(err.contains("set exactly one of"), "{err}");
    }

    #[test]
    fn server_limits_are_validated() {
        let text = format!(
            "[server]\nmax_connections = 0\nidle_timeout = \"0s\"\n[log]\nformat = \"xml\"\n{MINIMAL}"
        );
        let mut problems = from_toml_str(&text, "t.toml").unwrap_err().problems();
        let clash = format!("[server]\nplain_listen = \"0.0.0.0:8080\"\n{MINIMAL}");
        problems.extend(from_toml_str(&clash, "t.toml").unwrap_err().problems());
        for key in [
            "server.max_connections",
            "server.idle_timeout",
            "server.plain_listen",
            "log.format",
        ] {
            assert!(
                problems
                    .iter()
                    .any(|p| p.starts_with(&format!("t.toml: {key}: "))),
                "{key} missing from {problems:#?}"
            );
        }
    }

    #[test]
    fn pins_parse_in_both_spellings() {
        let hex = "fdc80a".repeat(10) + "abcd";
        let colons = parse_pin(&hex).unwrap();
        assert_eq!(parse_pin(&format_pin(&colons)), Ok(colons));
        assert_eq!(parse_pin(&hex.to_uppercase()), Ok(colons));
        assert!(parse_pin("abcd").is_err());
        assert!(parse_pin(&"zz".repeat(32)).is_err());
    }
}
