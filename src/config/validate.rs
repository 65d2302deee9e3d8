//! From the raw file to the typed configuration: every key checked, every problem recorded
//! under its key, so one pass reports all of them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::account::*;
use super::*;

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
        let directory_ttl = problems.check(
            "cache.directory_ttl",
            duration_or(&self.cache.directory_ttl, DEFAULT_DIRECTORY_TTL),
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
        let admin_token = SecretSource {
            inline: admin.token,
            file: admin.token_file,
            credential: admin.token_credential,
        }
        .read(
            "admin.token",
            Needed::Optional,
            context,
            &mut problems,
            token_digest,
        );
        let tier = validate_tier(self.cache.shared, self.cache.disk, context, &mut problems);
        let audio = match self.cache.audio {
            Some(raw) => validate_audio(raw, &mut problems).map(Some),
            None => Some(None),
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
                directory_ttl: directory_ttl?,
                max_bytes: max_bytes?,
                max_entry_bytes: max_entry_bytes?,
                stale_while_revalidate: stale_while_revalidate?,
                stale_if_error: stale_if_error?,
                error_backoff: error_backoff?,
                full_refresh_interval: full_refresh_interval?,
                gzip: self.cache.gzip.unwrap_or(true),
                gzip_min_bytes: gzip_min_bytes?,
                gzip_level: gzip_level?,
                tier: tier?,
                audio: audio?,
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

/// `[cache.shared]` or `[cache.disk]`, never both. `None`: a problem was recorded.
fn validate_tier(
    shared: Option<RawShared>,
    disk: Option<RawDisk>,
    context: &LoadContext,
    problems: &mut Problems,
) -> Option<Option<TierConfig>> {
    match (shared, disk) {
        (None, None) => Some(None),
        (Some(_), Some(_)) => {
            problems.push(
                "cache",
                "both [cache.shared] and [cache.disk] are set; configure at most one second tier: [cache.shared] (a Redis or Valkey server shared by a fleet of gateways) or [cache.disk] (a local store, for a single instance that should restart warm)",
            );
            None
        }
        (Some(raw), None) => {
            let origin = match (&raw.url_file, &raw.url_credential) {
                (Some(_), _) => "cache.shared.url_file",
                (_, Some(_)) => "cache.shared.url_credential",
                _ => "cache.shared.url",
            };
            let url = SecretSource {
                inline: raw.url,
                file: raw.url_file,
                credential: raw.url_credential,
            }
            .read(
                "cache.shared.url",
                Needed::Required,
                context,
                problems,
                redis_url,
            )
            .flatten();
            let ca_pem = match &raw.ca_file {
                Some(path) => problems
                    .check(
                        "cache.shared.ca_file",
                        read_certificates(path).and_then(|_| {
                            std::fs::read(path)
                                .map_err(|e| format!("cannot read {}: {e}", path.display()))
                        }),
                    )
                    .map(Some),
                None => Some(None),
            };
            let key_prefix = raw
                .key_prefix
                .unwrap_or_else(|| DEFAULT_KEY_PREFIX.to_owned());
            let prefix_ok = !key_prefix.is_empty()
                && key_prefix.len() <= 64
                && key_prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !prefix_ok {
                problems.push(
                    "cache.shared.key_prefix",
                    "must be 1 to 64 letters, digits, '-', '_' or '.'",
                );
            }
            let timeout = problems.check(
                "cache.shared.timeout",
                duration_or(&raw.timeout, DEFAULT_SHARED_TIMEOUT).and_then(|d| {
                    if d.is_zero() || d > Duration::from_secs(10) {
                        Err("must be more than 0 and at most 10s".to_owned())
                    } else {
                        Ok(d)
                    }
                }),
            );
            Some(Some(TierConfig::Shared(SharedTierConfig {
                url: url?,
                url_origin: origin.to_owned(),
                ca_pem: ca_pem?,
                key_prefix: prefix_ok.then_some(key_prefix)?,
                timeout: timeout?,
            })))
        }
        (None, Some(raw)) => {
            let path = match raw.path {
                Some(path) if path.is_absolute() || path.components().count() > 0 => Some(path),
                _ => {
                    problems.push(
                        "cache.disk.path",
                        "missing: the file the disk tier keeps, e.g. \"/var/lib/miralix-gateway/cache.redb\"",
                    );
                    None
                }
            };
            let max_bytes = problems.check(
                "cache.disk.max_bytes",
                parse_size(raw.max_bytes, DEFAULT_DISK_MAX_BYTES),
            );
            Some(Some(TierConfig::Disk(DiskTierConfig {
                path: path?,
                max_bytes: max_bytes?,
            })))
        }
    }
}

/// `[cache.audio]`: a directory and its bounds.
fn validate_audio(raw: RawAudio, problems: &mut Problems) -> Option<AudioStoreConfig> {
    let path = match raw.path {
        Some(path) if path.components().count() > 0 => Some(path),
        _ => {
            problems.push(
                "cache.audio.path",
                "missing: the directory the audio store keeps, e.g. \"/var/lib/miralix-gateway/audio\"",
            );
            None
        }
    };
    let max_bytes = problems.check(
        "cache.audio.max_bytes",
        parse_size(raw.max_bytes, DEFAULT_AUDIO_MAX_BYTES),
    );
    let max_file_bytes = max_bytes.and_then(|max_bytes| {
        let file = problems.check(
            "cache.audio.max_file_bytes",
            parse_size(raw.max_file_bytes, max_bytes / 8),
        )?;
        if file > max_bytes {
            problems.push(
                "cache.audio.max_file_bytes",
                format!("must not exceed cache.audio.max_bytes ({max_bytes} bytes)"),
            );
        }
        Some(file)
    });
    // Zero is a choice here (keep nothing in memory), not a mistake.
    let max_memory_bytes = problems.check(
        "cache.audio.max_memory_bytes",
        parse_bytes(raw.max_memory_bytes, DEFAULT_AUDIO_MAX_MEMORY_BYTES),
    );
    Some(AudioStoreConfig {
        path: path?,
        max_bytes: max_bytes?,
        max_file_bytes: max_file_bytes?,
        max_memory_bytes: max_memory_bytes?,
    })
}

pub(super) fn validate_server(
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
        transparent_huge_pages: raw.transparent_huge_pages.unwrap_or(false),
        rate_limit: rate_limit?,
    })
}

/// Most requests per second (and burst) a rate limit may name.
pub(super) const MAX_RATE: f64 = 1_000_000.0;

pub(super) fn validate_rate_limit(raw: RawRateLimit, problems: &mut Problems) -> Option<RateLimit> {
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

pub(super) fn validate_tls(
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

/// A path the audit log can be opened at: a file name in a directory that exists.
pub(super) fn audit_file_path(path: PathBuf) -> Result<PathBuf, String> {
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

pub(super) fn parse_log_format(value: Option<&str>) -> Result<LogFormat, String> {
    match value {
        None | Some("text") => Ok(LogFormat::Text),
        Some("json") => Ok(LogFormat::Json),
        Some(other) => Err(format!(
            "\"{other}\" is not a log format: expected \"text\" or \"json\""
        )),
    }
}

pub(super) fn count_in(
    value: Option<u64>,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, String> {
    match value.unwrap_or(default) {
        n if (min..=max).contains(&n) => Ok(n),
        n => Err(format!("{n} is out of range: expected {min} to {max}")),
    }
}

pub(super) fn parse_addr(value: &str) -> Result<SocketAddr, String> {
    value.parse().map_err(|_| {
        format!("\"{value}\" is not a socket address: expected IP:PORT, e.g. \"0.0.0.0:8080\" or \"[::1]:8080\"")
    })
}

pub(super) fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value).map_err(|e| {
        format!("\"{value}\" is not a duration ({e}): expected e.g. \"30s\", \"5m\", \"1h 30m\"")
    })
}

pub(super) fn duration_or(value: &Option<String>, default: Duration) -> Result<Duration, String> {
    value.as_deref().map_or(Ok(default), parse_duration)
}

pub(super) fn positive_duration_or(
    value: &Option<String>,
    default: Duration,
) -> Result<Duration, String> {
    match duration_or(value, default)? {
        d if d.is_zero() => Err("must be longer than zero".into()),
        d => Ok(d),
    }
}

pub(super) fn parse_size(value: Option<RawSize>, default: u64) -> Result<u64, String> {
    let bytes = parse_bytes(value, default)?;
    if bytes == 0 {
        return Err("must be larger than zero".into());
    }
    Ok(bytes)
}

/// A size that may be zero.
fn parse_bytes(value: Option<RawSize>, default: u64) -> Result<u64, String> {
    Ok(match value {
        None => default,
        Some(RawSize::Bytes(n)) => n,
        Some(RawSize::Text(text)) => text
            .trim()
            .parse::<bytesize::ByteSize>()
            .map_err(|_| {
                format!("\"{text}\" is not a size: expected bytes or a unit, e.g. \"256MiB\", \"1GiB\", 1048576")
            })?
            .as_u64(),
    })
}

/// Accept `FD:C8:0A:...` (openssl's fingerprint output) or plain hex, any case.
pub fn parse_pin(value: &str) -> Result<[u8; 32], String> {
    // openssl prints `sha256 Fingerprint=AB:CD:...` (or `SHA256 Fingerprint=`): pasted as it
    // is, the label is dropped.
    let value = value.trim();
    let value = match value.split_once('=') {
        Some((label, pin)) if label.trim().eq_ignore_ascii_case("sha256 fingerprint") => pin,
        _ => value,
    };
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
