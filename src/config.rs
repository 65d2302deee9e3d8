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
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Deserialize;

/// Prefix of environment overrides: `MIRALIX_GATEWAY__CACHE__TTL=10s` sets `cache.ttl`.
pub const ENV_PREFIX: &str = "MIRALIX_GATEWAY";

/// The validated configuration the gateway runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub cache: CacheConfig,
    /// Accounts by the `{account}` route segment.
    pub accounts: BTreeMap<String, AccountConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Where internal apps connect.
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// How long a `200` list is served from the cache. Zero: coalesce, but never store.
    pub ttl: Duration,
    /// How long a `404` (unknown agent) is remembered. Zero: never.
    pub negative_ttl: Duration,
    /// Bound on the bytes held by the cache (bodies plus keys).
    pub max_bytes: u64,
}

/// One OfficeTeam account (the box's "domain") and how to reach its box.
#[derive(Debug, Clone)]
pub struct AccountConfig {
    /// The base URL of the box; `/mot/{account}/...` is appended to its path.
    pub base_url: reqwest::Url,
    pub shared_secret: Secret,
    pub trust: UpstreamTrust,
    pub timeout: Duration,
    pub connect_timeout: Duration,
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
    #[error("{origin}: {source}")]
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

fn render_problems(origin: &str, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems
        .iter()
        .map(|p| format!("{origin}: {}: {}", p.key, p.message))
        .collect();
    lines.join("\n")
}

/// Load a TOML file, apply environment overrides and validate.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let source = config::File::from(path)
        .format(config::FileFormat::Toml)
        .required(true);
    build(origin, source)
}

/// Parse TOML text (the demo's embedded config, tests) with environment overrides.
pub fn from_toml_str(text: &str, origin: &str) -> Result<Config, ConfigError> {
    build(
        origin.to_owned(),
        config::File::from_str(text, config::FileFormat::Toml),
    )
}

fn build<S>(origin: String, source: S) -> Result<Config, ConfigError>
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
    match raw.validate() {
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
    pub accounts: BTreeMap<String, RawAccount>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawServer {
    /// Default `0.0.0.0:8080`.
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawAdmin {
    /// Default `127.0.0.1:9091`.
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawCache {
    /// Default `30s`.
    pub ttl: Option<String>,
    /// Default `5s`.
    pub negative_ttl: Option<String>,
    /// Default `256MiB`; a string with a unit or a plain number of bytes.
    pub max_bytes: Option<RawSize>,
}

/// A byte size written as `"256MiB"` or as a plain integer.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
pub struct RawUpstream {
    /// Default `30s`.
    pub timeout: Option<String>,
    /// Default `3s`.
    pub connect_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawAccount {
    pub base_url: Option<String>,
    pub shared_secret: Option<Secret>,
    pub shared_secret_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub pin_sha256: Option<String>,
    pub server_name: Option<String>,
    pub timeout: Option<String>,
    pub connect_timeout: Option<String>,
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
    /// Turn the raw file into typed values, reading referenced files (secrets, CA certificates).
    pub fn validate(self) -> Result<Config, Vec<Problem>> {
        let mut problems = Problems::default();
        let listen = problems.check(
            "server.listen",
            parse_addr(self.server.listen.as_deref().unwrap_or(DEFAULT_LISTEN)),
        );
        let admin_listen = problems.check(
            "admin.listen",
            parse_addr(self.admin.listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN)),
        );
        let ttl = problems.check("cache.ttl", duration_or(&self.cache.ttl, DEFAULT_TTL));
        let negative_ttl = problems.check(
            "cache.negative_ttl",
            duration_or(&self.cache.negative_ttl, DEFAULT_NEGATIVE_TTL),
        );
        let max_bytes = problems.check("cache.max_bytes", parse_size(self.cache.max_bytes));
        let timeout = problems.check(
            "upstream.timeout",
            positive_duration_or(&self.upstream.timeout, DEFAULT_TIMEOUT),
        );
        let connect_timeout = problems.check(
            "upstream.connect_timeout",
            positive_duration_or(&self.upstream.connect_timeout, DEFAULT_CONNECT_TIMEOUT),
        );

        if self.accounts.is_empty() {
            problems.push(
                "accounts",
                "no account is configured: add at least one [accounts.<name>] table",
            );
        }
        let mut accounts = BTreeMap::new();
        for (name, raw) in self.accounts {
            let defaults = (
                timeout.unwrap_or(DEFAULT_TIMEOUT),
                connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            );
            if let Some(account) = validate_account(&name, raw, defaults, &mut problems) {
                accounts.insert(name, account);
            }
        }

        if let (Some(a), Some(b)) = (listen, admin_listen)
            && a == b
            && a.port() != 0
        {
            problems.push(
                "admin.listen",
                format!("the admin listener must not share server.listen ({a})"),
            );
        }

        match (listen, admin_listen, ttl, negative_ttl, max_bytes) {
            (Some(listen), Some(admin), Some(ttl), Some(negative_ttl), Some(max_bytes))
                if problems.0.is_empty() =>
            {
                Ok(Config {
                    server: ServerConfig { listen },
                    admin: AdminConfig { listen: admin },
                    cache: CacheConfig {
                        ttl,
                        negative_ttl,
                        max_bytes,
                    },
                    accounts,
                })
            }
            _ => Err(problems.0),
        }
    }
}

fn validate_account(
    name: &str,
    raw: RawAccount,
    (default_timeout, default_connect_timeout): (Duration, Duration),
    problems: &mut Problems,
) -> Option<AccountConfig> {
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
    let shared_secret = match (raw.shared_secret, raw.shared_secret_file) {
        (Some(secret), None) => problems.check(&key("shared_secret"), non_empty_secret(secret)),
        (None, Some(path)) => problems.check(&key("shared_secret_file"), read_secret_file(&path)),
        (Some(_), Some(_)) => {
            problems.push(
                key("shared_secret"),
                "set exactly one of shared_secret and shared_secret_file, not both",
            );
            None
        }
        (None, None) => {
            problems.push(
                key("shared_secret"),
                "missing: set shared_secret or shared_secret_file",
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
    let timeout = problems.check(
        &key("timeout"),
        positive_duration_or(&raw.timeout, default_timeout),
    );
    let connect_timeout = problems.check(
        &key("connect_timeout"),
        positive_duration_or(&raw.connect_timeout, default_connect_timeout),
    );
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
    Some(AccountConfig {
        base_url: base_url?,
        shared_secret: shared_secret?,
        trust: UpstreamTrust {
            ca_certs: ca_certs?,
            pin_sha256: pin_sha256?,
            server_name: server_name?,
        },
        timeout: timeout?,
        connect_timeout: connect_timeout?,
    })
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

fn parse_size(value: Option<RawSize>) -> Result<u64, String> {
    let bytes = match value {
        None => return Ok(DEFAULT_MAX_BYTES),
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
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    // Files written by `echo` or editors end in a newline that is not part of the secret.
    let secret = text.trim_end_matches(['\r', '\n']);
    check_secret_text(secret).map_err(|e| format!("{}: {e}", path.display()))?;
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
    let expected = "expected the SHA-256 fingerprint of the box's certificate as 64 hex digits, \
                    optionally colon-separated (openssl x509 -noout -fingerprint -sha256)";
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(expected.into());
    }
    let mut pin = [0u8; 32];
    for (i, byte) in pin.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| expected.to_owned())?;
    }
    Ok(pin)
}

/// Format a SHA-256 fingerprint the way openssl prints it (`AB:CD:...`).
pub fn format_pin(pin: &[u8; 32]) -> String {
    pin.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [accounts.greenbox]
        base_url = "https://192.168.1.10"
        shared_secret = "s3cret"
    "#;

    #[test]
    fn defaults_apply() {
        let config = from_toml_str(MINIMAL, "test.toml").unwrap();
        assert_eq!(config.server.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(config.admin.listen, DEFAULT_ADMIN_LISTEN.parse().unwrap());
        assert_eq!(config.cache.ttl, DEFAULT_TTL);
        assert_eq!(config.cache.negative_ttl, DEFAULT_NEGATIVE_TTL);
        assert_eq!(config.cache.max_bytes, DEFAULT_MAX_BYTES);
        let account = &config.accounts["greenbox"];
        assert_eq!(account.timeout, DEFAULT_TIMEOUT);
        assert_eq!(account.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(account.trust, UpstreamTrust::default());
    }

    #[test]
    fn sizes_accept_units_and_integers() {
        assert_eq!(
            parse_size(Some(RawSize::Text("256MiB".into()))),
            Ok(256 << 20)
        );
        assert_eq!(parse_size(Some(RawSize::Text("1 GiB".into()))), Ok(1 << 30));
        assert_eq!(parse_size(Some(RawSize::Text("4096".into()))), Ok(4096));
        assert_eq!(parse_size(Some(RawSize::Bytes(1000))), Ok(1000));
        assert!(parse_size(Some(RawSize::Text("lots".into()))).is_err());
        assert!(parse_size(Some(RawSize::Bytes(0))).is_err());
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
