//! The file as written: serde structs of strings and options, unknown keys refused.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::*;

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
    /// Default false: the process opts out of transparent huge pages.
    pub transparent_huge_pages: Option<bool>,
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
    /// Default `60s`.
    pub directory_ttl: Option<String>,
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
    pub shared: Option<RawShared>,
    pub disk: Option<RawDisk>,
    pub audio: Option<RawAudio>,
}

/// One `[[accounts.<name>.passthrough]]` entry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPassthrough {
    /// Under `/mot/{account}/`, with `{name:int|guid|token}` placeholders.
    pub path: Option<String>,
    /// Allowed query parameters: name -> `"int"`, `"guid"`, `"token"` or a list of values.
    pub query: Option<std::collections::BTreeMap<String, RawCheck>>,
    /// How long a `200` is stored; `"0s"`: passed through uncached.
    pub ttl: Option<String>,
}

/// A query parameter's check: a kind, or the values allowed.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawCheck {
    Kind(String),
    Values(Vec<String>),
}

/// `[cache.audio]`.
#[derive(Debug, Default, Deserialize)]
pub struct RawAudio {
    pub path: Option<PathBuf>,
    /// Default `4GiB`.
    pub max_bytes: Option<RawSize>,
    /// Default: an eighth of `max_bytes`.
    pub max_file_bytes: Option<RawSize>,
    /// Default `16MiB`; `0` keeps none.
    pub max_memory_bytes: Option<RawSize>,
}

/// `[cache.shared]`.
#[derive(Debug, Default, Deserialize)]
pub struct RawShared {
    /// `redis://[user:password@]host:port/db` or `rediss://...`.
    pub url: Option<Secret>,
    pub url_file: Option<PathBuf>,
    pub url_credential: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// Default `miralix-gateway`.
    pub key_prefix: Option<String>,
    /// Default `100ms`.
    pub timeout: Option<String>,
}

/// `[cache.disk]`.
#[derive(Debug, Default, Deserialize)]
pub struct RawDisk {
    pub path: Option<PathBuf>,
    /// Default `1GiB`.
    pub max_bytes: Option<RawSize>,
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
    /// The `state` values the agent directory passes on; default `any`, `loggedIn`,
    /// `loggedOut`.
    pub directory_states: Option<Vec<String>>,
    /// More read-only routes passed on to the box.
    pub passthrough: Option<Vec<RawPassthrough>>,
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
    pub(super) fn upstream(&mut self) -> RawUpstream {
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
