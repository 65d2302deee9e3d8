//! The primitives the rest of the crate builds on: SHA-256, hex in and out, constant-time
//! comparison of digests, and the one rustls crypto provider. Imports nothing from the crate.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use subtle::ConstantTimeEq;

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> Digest {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// `bytes` as lowercase hex digits.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    text
}

/// A digest the way `openssl x509 -fingerprint -sha256` prints it: `AB:CD:...`.
pub fn fingerprint(digest: &Digest) -> String {
    hex(digest)
        .to_ascii_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|pair| std::str::from_utf8(pair).unwrap_or_default())
        .collect::<Vec<_>>()
        .join(":")
}

/// A SHA-256 digest written as 64 hex digits (either case), or `None`.
pub fn digest_from_hex(hex: &str) -> Option<Digest> {
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Whether two digests are equal, in time that does not depend on where they differ.
pub fn digests_equal(a: &Digest, b: &Digest) -> bool {
    a.ct_eq(b).into()
}

/// The crypto provider of every TLS configuration the gateway builds (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_fingerprints_read_like_openssl() {
        let digest = sha256(b"abc");
        let text = hex(&digest);
        assert_eq!(
            text,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(digest_from_hex(&text), Some(digest));
        assert_eq!(digest_from_hex(&text.to_ascii_uppercase()), Some(digest));
        assert_eq!(digest_from_hex(&text[1..]), None);
        assert_eq!(digest_from_hex(&format!("{}g", &text[1..])), None);
        assert!(fingerprint(&digest).starts_with("BA:78:16:BF:"));
        assert_eq!(fingerprint(&digest).len(), 32 * 3 - 1);
    }

    #[test]
    fn digests_compare_equal_only_when_equal() {
        let a = sha256(b"a");
        let mut b = a;
        assert!(digests_equal(&a, &b));
        b[31] ^= 1;
        assert!(!digests_equal(&a, &b));
    }
}
