//! Where secrets, tokens, keys and certificates come from: inline values, files and systemd
//! credentials, read once when the configuration is loaded.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::crypto::Digest;

use super::*;

pub(super) fn parse_private_key(
    pem: &[u8],
    origin: &str,
) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
        format!("{origin}: no usable private key ({e}); expected a PEM PKCS#8, RSA or EC key")
    })
}

/// Read a systemd credential by name from `$CREDENTIALS_DIRECTORY`.
pub(super) fn read_credential(context: &LoadContext, name: &str) -> Result<Vec<u8>, String> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(format!("\"{name}\" is not a credential name"));
    }
    let Some(dir) = &context.credentials_dir else {
        return Err(format!(
            "credential \"{name}\" needs $CREDENTIALS_DIRECTORY, which systemd sets for a unit with LoadCredential={name}:<path>; to check by hand, run with CREDENTIALS_DIRECTORY=<the directory holding a file named {name}>"
        ));
    };
    let path = dir.join(name);
    std::fs::read(&path).map_err(|e| format!("cannot read credential {}: {e}", path.display()))
}

/// Where a secret may be written: inline as `{name}`, in a file named by `{name}_file`, or in
/// the systemd credential named by `{name}_credential`.
pub(super) struct SecretSource {
    pub(super) inline: Option<Secret>,
    pub(super) file: Option<PathBuf>,
    pub(super) credential: Option<String>,
}

/// Whether a secret must be given.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Needed {
    Required,
    Optional,
}

impl SecretSource {
    /// The one secret given, read and parsed by `parse` (file and credential contents lose
    /// one trailing newline first). `key` is the full key of the inline form, e.g.
    /// `admin.token`; each problem is recorded under the key that caused it. `None`: a
    /// problem was recorded; `Some(None)`: an optional secret was not given.
    pub(super) fn read<T>(
        self,
        key: &str,
        needed: Needed,
        context: &LoadContext,
        problems: &mut Problems,
        parse: impl Fn(&[u8]) -> Result<T, String>,
    ) -> Option<Option<T>> {
        let name = key.rsplit('.').next().unwrap_or(key);
        let (file_key, credential_key) = (format!("{key}_file"), format!("{key}_credential"));
        let given = [
            self.inline.is_some(),
            self.file.is_some(),
            self.credential.is_some(),
        ];
        let trimmed = |bytes: &[u8]| {
            let end = bytes.strip_suffix(b"\n").unwrap_or(bytes);
            parse(end.strip_suffix(b"\r").unwrap_or(end))
        };
        match (self.inline, self.file, self.credential) {
            _ if given.iter().filter(|set| **set).count() > 1 => {
                let how_many = match needed {
                    Needed::Required => "exactly one",
                    Needed::Optional => "at most one",
                };
                problems.push(
                    key,
                    format!("set {how_many} of {name}, {name}_file and {name}_credential"),
                );
                None
            }
            (Some(inline), _, _) => problems
                .check(key, parse(inline.expose().as_bytes()))
                .map(Some),
            (_, Some(path), _) => problems
                .check(
                    &file_key,
                    std::fs::read(&path)
                        .map_err(|e| format!("cannot read {}: {e}", path.display()))
                        .and_then(|bytes| {
                            trimmed(&bytes).map_err(|e| format!("{}: {e}", path.display()))
                        }),
                )
                .map(Some),
            (_, _, Some(credential)) => problems
                .check(
                    &credential_key,
                    read_credential(context, &credential).and_then(|bytes| {
                        trimmed(&bytes).map_err(|e| format!("credential \"{credential}\": {e}"))
                    }),
                )
                .map(Some),
            (None, None, None) if needed == Needed::Required => {
                problems.push(
                    key,
                    format!("missing: set {name}, {name}_file or {name}_credential"),
                );
                None
            }
            (None, None, None) => Some(None),
        }
    }
}

/// The digest of an admin token.
pub(super) fn token_digest(bytes: &[u8]) -> Result<Digest, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the admin token is not UTF-8 text")?;
    key_digest(text).map_err(|e| e.replace("an API key", "the admin token"))
}

/// An account's shared secret.
pub(super) fn secret_from_bytes(bytes: &[u8]) -> Result<Secret, String> {
    let secret = std::str::from_utf8(bytes).map_err(|_| "the shared secret is not UTF-8 text")?;
    check_secret_text(secret)?;
    Ok(Secret::new(secret))
}

/// A Redis URL: `redis://` or `rediss://` with a host. Messages never repeat the URL, which
/// may carry a password.
pub(super) fn redis_url(bytes: &[u8]) -> Result<Secret, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the Redis URL is not UTF-8 text")?;
    let url = reqwest::Url::parse(text.trim()).map_err(|e| {
        format!("not a URL ({e}); expected redis://host:6379/0 or rediss://host:6380/0")
    })?;
    if !matches!(url.scheme(), "redis" | "rediss") {
        return Err(format!(
            "the scheme is \"{}\"; expected redis:// (plain) or rediss:// (TLS)",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the URL names no host; expected redis://host:6379/0".into());
    }
    Ok(Secret::new(text.trim()))
}

pub(super) fn check_secret_text(secret: &str) -> Result<(), String> {
    if secret.is_empty() {
        return Err("the shared secret is empty".into());
    }
    // It is sent as an HTTP header value.
    if http::HeaderValue::from_str(secret).is_err() {
        return Err("the shared secret contains characters not allowed in an HTTP header".into());
    }
    Ok(())
}

pub(super) fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
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

/// Parse a configured `api_key_hashes` entry: 64 hex digits, either case.
pub fn parse_digest(hex: &str) -> Result<Digest, String> {
    let hex = hex.trim();
    crate::crypto::digest_from_hex(hex).ok_or_else(|| {
        format!(
            "\"{}\" is not a SHA-256 digest: expected 64 hex digits, e.g. from `printf %s \"$KEY\" | sha256sum`",
            crate::identity::truncate_for_message(hex)
        )
    })
}

/// Shortest key accepted in `api_keys`: a key must not be guessable.
pub const MIN_KEY_LENGTH: usize = 16;

/// Check a configured `api_keys` entry and hash it.
pub fn key_digest(key: &str) -> Result<Digest, String> {
    if key.len() < MIN_KEY_LENGTH {
        return Err(format!(
            "an API key must be at least {MIN_KEY_LENGTH} characters long"
        ));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("an API key may only contain printable ASCII without spaces".into());
    }
    Ok(crate::crypto::sha256(key.as_bytes()))
}
