//! One `[accounts.<name>]` table: its box, its secret, its upstream settings (inheriting
//! `[upstream]`) and who may read it.

use std::net::SocketAddr;
use std::time::Duration;

use rustls::pki_types::ServerName;

use super::validate::*;
use super::*;

pub(super) fn validate_account(
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
    let shared_secret = SecretSource {
        inline: raw.shared_secret,
        file: raw.shared_secret_file,
        credential: raw.shared_secret_credential,
    }
    .read(
        &key("shared_secret"),
        Needed::Required,
        context,
        problems,
        secret_from_bytes,
    )
    .flatten();
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
    let directory_states = problems.check(
        &key("directory_states"),
        directory_states(raw.directory_states),
    );
    let passthrough = match raw.passthrough {
        Some(raw) => {
            super::passthrough::validate_passthrough(&format!("accounts.{name}"), raw, problems)
        }
        None => Some(Vec::new()),
    };
    Some(AccountConfig {
        access: Access::Open,
        passthrough: passthrough?,
        directory_states: directory_states?,
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

/// The directory's `state` allowlist: values a query may carry as they are (letters, digits,
/// `-`, `_`, `.`), no two the same but for case.
fn directory_states(raw: Option<Vec<String>>) -> Result<Vec<Box<str>>, String> {
    let Some(states) = raw else {
        return Ok(DEFAULT_DIRECTORY_STATES.map(Box::from).to_vec());
    };
    let mut seen: Vec<Box<str>> = Vec::with_capacity(states.len());
    for state in states {
        let plain = (1..=64).contains(&state.len())
            && state
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !plain {
            return Err(format!(
                "\"{}\" is not a state value: 1 to 64 letters, digits, '-', '_' or '.'",
                state.escape_debug()
            ));
        }
        if seen.iter().any(|s| s.eq_ignore_ascii_case(&state)) {
            return Err(format!("\"{state}\" is listed twice"));
        }
        seen.push(state.into_boxed_str());
    }
    Ok(seen)
}

/// `[upstream]` (prefix `upstream`) or an account's overrides of it (prefix `accounts.<name>`).
pub(super) fn validate_upstream(
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

pub(super) fn parse_api_version(value: Option<&str>) -> Result<ApiVersion, String> {
    match value.map(str::trim) {
        None | Some("7" | "7.0" | "7.1" | "7.2" | "7.3") => Ok(ApiVersion::V7),
        Some("6.5") => Ok(ApiVersion::V6_5),
        Some(other) => Err(format!(
            "\"{other}\" is not a supported API version: expected \"7\" (7.0 and later) or \"6.5\""
        )),
    }
}

pub(super) fn parse_base_url(value: &str) -> Result<reqwest::Url, String> {
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

/// Who may read an account: its keys and client certificate names, or anyone when that was
/// asked for or only loopback listeners and listeners requiring client certificates expose it.
pub(super) fn validate_access(
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
        match key_digest(secret.expose()) {
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
        match parse_digest(hex) {
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
