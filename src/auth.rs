//! Who may read what: API keys per account, and the admin token for the cache endpoints.
//!
//! Keys are held only as SHA-256 digests (config files carry `api_key_hashes`, or `api_keys`
//! that are hashed when loaded), a presented key is hashed and compared with every digest in
//! constant time, and a key is named in logs only by its key id: `key:` and the first eight hex
//! digits of its digest, which an operator can match against the configured hashes.

use std::fmt;

use http::HeaderMap;
use http::header::AUTHORIZATION;

/// The other header a client may present its key in.
pub const X_API_KEY: &str = "x-api-key";

/// A SHA-256 digest of a key.
pub type Digest = [u8; 32];

/// Who may read an account's recordings.
#[derive(Clone, PartialEq, Eq)]
pub enum Access {
    /// Only clients presenting one of these keys (held as digests).
    Keys(Vec<Digest>),
    /// Anyone who can reach the listener (loopback, or `allow_anonymous = true`).
    Open,
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Access::Keys(keys) => write!(f, "Keys({} keys)", keys.len()),
            Access::Open => f.write_str("Open"),
        }
    }
}

/// Who a request came from, as it may be logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// A key, by its id.
    Key(KeyId),
    /// No key (an open account).
    Anonymous,
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Client::Key(id) => id.fmt(f),
            Client::Anonymous => f.write_str("anonymous"),
        }
    }
}

/// The first four bytes of a key's digest: enough to tell keys apart in logs, useless for
/// guessing the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyId([u8; 4]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("key:")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl KeyId {
    pub fn of(digest: &Digest) -> Self {
        Self([digest[0], digest[1], digest[2], digest[3]])
    }
}

/// Why a request was not let in. `Display` is the message sent to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "an API key is required for this account: send it as Authorization: Bearer <key> or X-Api-Key: <key>"
    )]
    Missing,
    #[error("the API key is not valid for this account")]
    Invalid,
}

/// SHA-256 of a key.
pub fn digest(key: &[u8]) -> Digest {
    crate::upstream::trust::sha256(key)
}

/// Equal digests, compared without an early exit.
pub fn digests_equal(a: &Digest, b: &Digest) -> bool {
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// The keys a request presents: `Authorization: Bearer <key>` (scheme in any case) and
/// `X-Api-Key: <key>`, each line of each.
fn presented(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    let bearer = headers.get_all(AUTHORIZATION).iter().filter_map(|value| {
        let value = value.as_bytes();
        let (scheme, rest) = value.split_at_checked(7)?;
        scheme
            .eq_ignore_ascii_case(b"bearer ")
            .then(|| rest.trim_ascii())
    });
    let api_key = headers
        .get_all(X_API_KEY)
        .iter()
        .map(|value| value.as_bytes().trim_ascii());
    bearer.chain(api_key).filter(|key| !key.is_empty())
}

/// Check a request against an account's access rule.
pub fn check(access: &Access, headers: &HeaderMap) -> Result<Client, AuthError> {
    let Access::Keys(keys) = access else {
        return Ok(Client::Anonymous);
    };
    let mut any = false;
    for key in presented(headers) {
        any = true;
        let presented = digest(key);
        // Every configured digest is compared, so the time does not say which one matched.
        let matched = keys.iter().fold(None, |found, known| {
            match digests_equal(&presented, known) {
                true => Some(known),
                false => found,
            }
        });
        if let Some(known) = matched {
            return Ok(Client::Key(KeyId::of(known)));
        }
    }
    Err(if any {
        AuthError::Invalid
    } else {
        AuthError::Missing
    })
}

/// Whether a request carries the admin token as `Authorization: Bearer <token>`.
pub fn admin_token_matches(token: &Digest, headers: &HeaderMap) -> bool {
    presented(headers).any(|key| digests_equal(&digest(key), token))
}

/// Parse a configured `api_key_hashes` entry: 64 hex digits, either case.
pub fn parse_digest(hex: &str) -> Result<Digest, String> {
    let hex = hex.trim();
    crate::config::sha256_from_hex(hex).ok_or_else(|| {
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
    Ok(digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const KEY: &str = "k3y-0123456789abcdef";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn keys_are_taken_from_either_header() {
        let access = Access::Keys(vec![digest(b"other-key-0000000"), digest(KEY.as_bytes())]);
        let id = KeyId::of(&digest(KEY.as_bytes()));
        for good in [
            headers(&[("authorization", &format!("Bearer {KEY}"))]),
            headers(&[("authorization", &format!("bearer   {KEY} "))]),
            headers(&[("x-api-key", KEY)]),
            headers(&[("x-api-key", "wrong"), ("x-api-key", KEY)]),
        ] {
            assert_eq!(check(&access, &good), Ok(Client::Key(id)), "{good:?}");
        }
        assert_eq!(check(&access, &headers(&[])), Err(AuthError::Missing));
        assert_eq!(
            check(
                &access,
                &headers(&[("authorization", &format!("Basic {KEY}"))])
            ),
            Err(AuthError::Missing)
        );
        assert_eq!(
            check(&access, &headers(&[("authorization", "Bearer ")])),
            Err(AuthError::Missing)
        );
        assert_eq!(
            check(&access, &headers(&[("x-api-key", &KEY[1..])])),
            Err(AuthError::Invalid)
        );
        assert_eq!(check(&Access::Open, &headers(&[])), Ok(Client::Anonymous));
    }

    #[test]
    fn key_ids_show_the_digest_prefix_only() {
        let d = digest(KEY.as_bytes());
        let shown = KeyId::of(&d).to_string();
        assert!(shown.starts_with("key:") && shown.len() == 12, "{shown}");
        assert!(!shown.contains(KEY));
        assert!(format!("{:?}", Access::Keys(vec![d])).contains("1 keys"));
    }

    #[test]
    fn configured_digests_and_keys_are_checked() {
        let hex = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08";
        assert_eq!(parse_digest(hex).unwrap(), digest(b"test"));
        assert!(parse_digest("abc").is_err());
        assert!(parse_digest(&"g".repeat(64)).is_err());
        assert!(key_digest("short").is_err());
        assert!(key_digest("with space 0123456789").is_err());
        assert_eq!(key_digest(KEY).unwrap(), digest(KEY.as_bytes()));
    }
}
