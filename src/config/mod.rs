//! Configuration: a TOML file plus `MIRALIX_GATEWAY__SECTION__KEY` environment overrides.
//!
//! Loading happens in two steps. [`RawConfig`] mirrors the file with plain strings and options;
//! [`RawConfig::validate`] then turns it into a [`Config`] of typed values (durations, URLs,
//! socket addresses, secrets, certificates) and collects *every* problem it finds, each naming
//! its key and the file, so `check-config` can report them all at once, like `nginx -t`.
//! Unknown keys are problems too. Nothing downstream of this module sees a string that should
//! have been a duration.
//!
//! The pieces: `model` (the typed configuration, plain data), `raw` (the serde structs),
//! `validate` (from one to the other) and `sources` (files and credentials).

mod account;
mod model;
mod passthrough;
mod raw;
mod sources;
mod suggest;
mod validate;

pub use self::model::*;
pub use self::passthrough::{Check, PassthroughRoute, Segment, parse_pattern};
pub use self::raw::*;
use self::sources::*;
pub use self::sources::{MIN_KEY_LENGTH, key_digest, parse_digest};
pub use self::validate::{format_pin, parse_pin};

use std::path::Path;

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
    // Read once more for the lines of unknown keys (a missing file is reported by the load).
    let text = std::fs::read_to_string(path).ok();
    build(origin, source, text.as_deref(), context)
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
        Some(text),
        context,
    )
}

fn build<S>(
    origin: String,
    source: S,
    text: Option<&str>,
    context: &LoadContext,
) -> Result<Config, ConfigError>
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
        .map(|key| {
            let line = text
                .and_then(|t| suggest::line_of(t, &key))
                .map_or_else(String::new, |n| format!(" (line {n})"));
            let hint = match suggest::did_you_mean(&key) {
                Some(meant) => format!("; did you mean `{meant}`?"),
                None => " (see config/example.toml for every accepted key)".to_owned(),
            };
            Problem {
                message: format!("unknown key{line}{hint}"),
                key,
            }
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

#[cfg(test)]
mod tests {
    use super::account::*;
    use super::validate::*;
    use super::*;
    use crate::auth::{self, Access};
    use std::path::PathBuf;

    const MINIMAL: &str = r#"
        [accounts.greenbox]
        base_url = "https://192.168.1.10"
        shared_secret = "s3cret"
        api_key_hashes = ["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
    "#;

    /// The problems `text` (with [`MINIMAL`]'s account after it) is refused for.
    fn problems_of(text: &str) -> String {
        let text = format!("{text}\n{MINIMAL}");
        match from_toml_str(&text, "test.toml") {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn the_audio_store_may_keep_no_memory_for_downloads_its_disk_refused() {
        let load = |extra: &str| {
            let text = format!("[cache.audio]\npath = \"/tmp/a\"\n{extra}\n{MINIMAL}");
            from_toml_str(&text, "test.toml").map(|c| c.cache.audio.unwrap().max_memory_bytes)
        };
        assert_eq!(load("").unwrap(), DEFAULT_AUDIO_MAX_MEMORY_BYTES);
        assert_eq!(load("max_memory_bytes = 0").unwrap(), 0);
        assert_eq!(load("max_memory_bytes = \"0B\"").unwrap(), 0);
        assert_eq!(load("max_memory_bytes = \"64MiB\"").unwrap(), 64 << 20);
        let bad = problems_of("[cache.audio]\npath = \"/tmp/a\"\nmax_memory_bytes = \"lots\"");
        assert!(
            bad.contains("cache.audio.max_memory_bytes") && bad.contains("is not a size"),
            "{bad}"
        );
    }

    #[test]
    fn a_second_tier_is_shared_or_disk_never_both_and_its_url_stays_secret() {
        let both = problems_of(
            "[cache.shared]\nurl = \"redis://h:6379\"\n[cache.disk]\npath = \"/tmp/c.redb\"",
        );
        assert!(
            both.contains("both [cache.shared] and [cache.disk]"),
            "{both}"
        );
        let password = "pw-do-not-show-91";
        let text = format!(
            "[cache.shared]\nurl = \"redis://:{password}@10.0.0.5:6379/0\"\ntimeout = \"250ms\"\n{MINIMAL}"
        );
        let config = from_toml_str(&text, "test.toml").unwrap();
        let Some(TierConfig::Shared(shared)) = &config.cache.tier else {
            panic!("a shared tier")
        };
        assert_eq!(shared.key_prefix, DEFAULT_KEY_PREFIX);
        assert_eq!(shared.timeout, std::time::Duration::from_millis(250));
        assert!(
            !format!("{config:?}").contains(password),
            "Debug hides the URL"
        );
        for (bad, says) in [
            ("url = \"http://h:6379\"", "expected redis://"),
            (
                "url = \"redis://:pw-do-not-show-91@\"",
                "expected redis://host",
            ),
            (
                "url = \"redis://h\"\nurl_file = \"/x\"",
                "exactly one of url, url_file and url_credential",
            ),
            ("", "missing: set url, url_file or url_credential"),
            (
                "url = \"redis://h\"\nkey_prefix = \"a b\"",
                "cache.shared.key_prefix",
            ),
            (
                "url = \"redis://h\"\ntimeout = \"0s\"",
                "cache.shared.timeout",
            ),
        ] {
            let problems = problems_of(&format!("[cache.shared]\n{bad}"));
            assert!(problems.contains(says), "{bad}: {problems}");
            assert!(!problems.contains(password), "{problems}");
        }
        let disk = problems_of("[cache.disk]\nmax_bytes = \"1GiB\"");
        assert!(disk.contains("cache.disk.path: missing"), "{disk}");
    }

    #[test]
    fn a_pin_pasted_from_openssl_and_sizes_and_placeholders() {
        let pin = "12:6A:".to_owned() + &"AB:".repeat(29) + "CD";
        let pasted = format!("sha256 Fingerprint={pin}");
        assert_eq!(parse_pin(&pasted), parse_pin(&pin));
        assert!(parse_pin(&pin).is_ok());
        assert!(parse_pin("md5 Fingerprint=12:34").is_err());
        let text = MINIMAL.replace("s3cret", "change-me");
        let config = from_toml_str(&text, "test.toml").unwrap();
        assert_eq!(
            config.placeholder_secrets(),
            ["accounts.greenbox.shared_secret"]
        );
    }

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
