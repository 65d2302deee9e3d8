//! Where secrets, tokens, keys and certificates come from: inline values, files and systemd
//! credentials, read once when the configuration is loaded.

use std::path::Path;

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
            "credential \"{name}\" needs $CREDENTIALS_DIRECTORY, which systemd sets for a unit with LoadCredential={name}:<path>"
        ));
    };
    let path = dir.join(name);
    std::fs::read(&path).map_err(|e| format!("cannot read credential {}: {e}", path.display()))
}

pub(super) fn read_secret_file(path: &Path) -> Result<Secret, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    secret_from_bytes(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

pub(super) fn read_token_file(path: &Path) -> Result<Digest, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    token_digest(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// The digest of an admin token read from a file or credential (one trailing newline ignored).
pub(super) fn token_digest(bytes: &[u8]) -> Result<Digest, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the admin token is not UTF-8 text")?;
    key_digest(text.trim_end_matches(['\r', '\n']))
        .map_err(|e| e.replace("an API key", "the admin token"))
}

/// A secret stored in a file or credential.
pub(super) fn secret_from_bytes(bytes: &[u8]) -> Result<Secret, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the shared secret is not UTF-8 text")?;
    // Files written by `echo` or editors end in a newline that is not part of the secret.
    let secret = text.trim_end_matches(['\r', '\n']);
    check_secret_text(secret)?;
    Ok(Secret::new(secret))
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
