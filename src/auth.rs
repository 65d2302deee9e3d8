//! Who may read what: API keys and client certificates per account, and the admin token for
//! the cache endpoints.
//!
//! Keys are held only as SHA-256 digests (config files carry `api_key_hashes`, or `api_keys`
//! that are hashed when loaded), a presented key is hashed and compared with every digest in
//! constant time, and a key is named in logs only by its key id: `key:` and the first eight hex
//! digits of its digest, which an operator can match against the configured hashes.
//!
//! With `server.tls.client_ca`, every connection on the TLS listener carries a certificate that
//! CA issued ([`ClientCert`]). An account with `client_names` is opened by a certificate whose
//! common name or DNS alternative name is one of them; an account with neither keys nor names
//! is opened by any such certificate. The audit log names the certificate by its subject.

use std::fmt;
use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName};

/// The other header a client may present its key in (a name, not a `&str`: a `&str` is
/// parsed into a name again on every lookup).
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// A SHA-256 digest of a key.
pub use crate::crypto::Digest;

pub use crate::config::Access;

/// A client certificate that `server.tls.client_ca` verified at the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// The subject as RFC 4514 text (`CN=crm-widget, O=Example`), control characters replaced:
    /// how logs name the client.
    pub subject: Arc<str>,
    /// The subject's common names and the certificate's DNS alternative names, lowercase: what
    /// `client_names` are matched against.
    pub names: Vec<String>,
}

impl ClientCert {
    /// Read the subject and names of a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| format!("cannot parse the client certificate: {e}"))?;
        let subject = cert.subject();
        let common_names = subject.iter_common_name().filter_map(|cn| cn.as_str().ok());
        let alternative = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| san.value.general_names.as_slice())
            .unwrap_or_default();
        let dns_names = alternative.iter().filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(*dns),
            _ => None,
        });
        let names = common_names
            .chain(dns_names)
            .map(str::to_ascii_lowercase)
            .collect();
        let subject: String = subject
            .to_string()
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        Ok(Self {
            subject: subject.into(),
            names,
        })
    }
}

/// Who a request came from, as it may be logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Client {
    /// A key, by its id.
    Key(KeyId),
    /// A client certificate, by its subject.
    Certificate(Arc<str>),
    /// No key and no certificate (an open account).
    Anonymous,
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Client::Key(id) => id.fmt(f),
            Client::Certificate(subject) => write!(f, "cert:{subject}"),
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
        f.write_str(&crate::crypto::hex(&self.0))
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
    #[error(
        "send one credential: this request has {0} Authorization or X-Api-Key headers; send either one Authorization: Bearer <key> or one X-Api-Key: <key>"
    )]
    SeveralCredentials(usize),
    #[error(
        "this account is read with a client certificate: connect over TLS with a certificate issued by the gateway's client CA"
    )]
    CertificateRequired,
    #[error(
        "this client certificate is not allowed for this account: its names are not in the account's client_names"
    )]
    CertificateNotAllowed,
}

/// SHA-256 of a key.
pub fn digest(key: &[u8]) -> Digest {
    crate::crypto::sha256(key)
}

/// Equal digests, compared without an early exit.
pub use crate::crypto::digests_equal;

/// The one key a request presents: `Authorization: Bearer <key>` (scheme in any case) or
/// `X-Api-Key: <key>`. Several such headers, or one of each, are refused rather than tried in
/// turn: trying each would let one request test many guesses against one rate-limit token.
fn presented(headers: &HeaderMap) -> Result<Option<&[u8]>, AuthError> {
    let mut authorization = headers.get_all(AUTHORIZATION).iter();
    let mut api_key = headers.get_all(X_API_KEY).iter();
    let (first, second) = (authorization.next(), api_key.next());
    let count = usize::from(first.is_some())
        + usize::from(second.is_some())
        + authorization.count()
        + api_key.count();
    if count > 1 {
        return Err(AuthError::SeveralCredentials(count));
    }
    let bearer = first.and_then(|value| {
        let (scheme, rest) = value.as_bytes().split_at_checked(7)?;
        scheme
            .eq_ignore_ascii_case(b"bearer ")
            .then(|| rest.trim_ascii())
    });
    let key = bearer.or_else(|| second.map(|value| value.as_bytes().trim_ascii()));
    Ok(key.filter(|key| !key.is_empty()))
}

/// Check a request, and the certificate of its connection, against an account's access rule.
pub fn check(
    access: &Access,
    headers: &HeaderMap,
    cert: Option<&ClientCert>,
) -> Result<Client, AuthError> {
    let certified = |cert: &ClientCert| Client::Certificate(cert.subject.clone());
    let key = presented(headers)?;
    let (keys, client_names) = match access {
        Access::Open => return Ok(cert.map_or(Client::Anonymous, certified)),
        Access::Restricted { keys, client_names } => (keys, client_names),
    };
    let named = |cert: &&ClientCert| cert.names.iter().any(|name| client_names.contains(name));
    if let Some(cert) = cert.filter(named) {
        return Ok(certified(cert));
    }
    if keys.is_empty() {
        return Err(match cert {
            Some(_) => AuthError::CertificateNotAllowed,
            None => AuthError::CertificateRequired,
        });
    }
    let Some(key) = key else {
        return Err(AuthError::Missing);
    };
    let presented = digest(key);
    // Every configured digest is compared, so the time does not say which one matched.
    let matched = keys.iter().fold(None, |found, known| {
        match digests_equal(&presented, known) {
            true => Some(known),
            false => found,
        }
    });
    match matched {
        Some(known) => Ok(Client::Key(KeyId::of(known))),
        None => Err(AuthError::Invalid),
    }
}

/// The password of `Authorization: Basic <base64 user:password>`: how a browser sends the
/// admin token to the cache listing's page (any user name).
fn basic_password(headers: &HeaderMap) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let (value, None) = (values.next()?, values.next()) else {
        return None;
    };
    let (scheme, encoded) = value.as_bytes().split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"basic ") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim_ascii())
        .ok()?;
    let colon = decoded.iter().position(|b| *b == b':')?;
    Some(decoded[colon + 1..].to_vec())
}

/// Whether a request carries the admin token as `Authorization: Bearer <token>` (or, from a
/// browser, as the password of `Authorization: Basic`), and if not, what it sent instead.
pub fn check_admin_token(token: &Digest, headers: &HeaderMap) -> Result<(), AdminTokenError> {
    if headers.get(X_API_KEY).is_none()
        && let Some(password) = basic_password(headers)
    {
        return match digests_equal(&digest(&password), token) {
            true => Ok(()),
            false => Err(AdminTokenError::Wrong),
        };
    }
    match presented(headers) {
        Err(AuthError::SeveralCredentials(count)) => Err(AdminTokenError::Several(count)),
        Ok(Some(key)) if digests_equal(&digest(key), token) => Ok(()),
        Ok(Some(_)) => Err(AdminTokenError::Wrong),
        _ => Err(AdminTokenError::Missing),
    }
}

/// Why a cache-control request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AdminTokenError {
    #[error(
        "cache control needs the admin token (admin.token): send it as Authorization: Bearer <token>"
    )]
    Missing,
    #[error("the admin token is not valid (admin.token)")]
    Wrong,
    #[error(
        "send one credential: this request has {0} Authorization or X-Api-Key headers; send one Authorization: Bearer <admin token>"
    )]
    Several(usize),
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
        let access = Access::keys(vec![digest(b"other-key-0000000"), digest(KEY.as_bytes())]);
        let id = KeyId::of(&digest(KEY.as_bytes()));
        for good in [
            headers(&[("authorization", &format!("Bearer {KEY}"))]),
            headers(&[("authorization", &format!("bearer   {KEY} "))]),
            headers(&[("x-api-key", KEY)]),
        ] {
            assert_eq!(check(&access, &good, None), Ok(Client::Key(id)), "{good:?}");
        }
        // One credential per request: several are refused, not tried in turn.
        let bearer = format!("Bearer {KEY}");
        for several in [
            headers(&[("x-api-key", "wrong"), ("x-api-key", KEY)]),
            headers(&[
                ("authorization", "Bearer wrong"),
                ("authorization", &bearer),
            ]),
            headers(&[("authorization", &bearer), ("x-api-key", KEY)]),
        ] {
            assert_eq!(
                check(&access, &several, None),
                Err(AuthError::SeveralCredentials(2)),
                "{several:?}"
            );
            assert!(check(&Access::Open, &several, None).is_err());
        }
        assert_eq!(check(&access, &headers(&[]), None), Err(AuthError::Missing));
        assert_eq!(
            check(
                &access,
                &headers(&[("authorization", &format!("Basic {KEY}"))]),
                None
            ),
            Err(AuthError::Missing)
        );
        assert_eq!(
            check(&access, &headers(&[("authorization", "Bearer ")]), None),
            Err(AuthError::Missing)
        );
        assert_eq!(
            check(&access, &headers(&[("x-api-key", &KEY[1..])]), None),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            check(&Access::Open, &headers(&[]), None),
            Ok(Client::Anonymous)
        );
    }

    fn cert(subject: &str, names: &[&str]) -> ClientCert {
        ClientCert {
            subject: subject.into(),
            names: names.iter().map(|n| n.to_string()).collect(),
        }
    }

    #[test]
    fn certificates_open_accounts_by_name_or_when_no_rule_is_set() {
        let crm = cert("CN=crm", &["crm", "crm.apps.example"]);
        let qa = cert("CN=qa", &["qa"]);
        let by_name = Access::Restricted {
            keys: Vec::new(),
            client_names: vec!["crm.apps.example".into()],
        };
        let none = headers(&[]);
        assert_eq!(
            check(&by_name, &none, Some(&crm)),
            Ok(Client::Certificate("CN=crm".into()))
        );
        assert_eq!(
            check(&by_name, &none, Some(&qa)),
            Err(AuthError::CertificateNotAllowed)
        );
        assert_eq!(
            check(&by_name, &none, None),
            Err(AuthError::CertificateRequired)
        );
        // A name or a key: either opens an account that has both.
        let both = Access::Restricted {
            keys: vec![digest(KEY.as_bytes())],
            client_names: vec!["crm".into()],
        };
        assert!(matches!(
            check(&both, &none, Some(&crm)),
            Ok(Client::Certificate(_))
        ));
        let keyed = headers(&[("x-api-key", KEY)]);
        assert!(matches!(
            check(&both, &keyed, Some(&qa)),
            Ok(Client::Key(_))
        ));
        assert_eq!(check(&both, &none, Some(&qa)), Err(AuthError::Missing));
        // Keys alone are not opened by a certificate.
        let keys = Access::keys(vec![digest(KEY.as_bytes())]);
        assert_eq!(check(&keys, &none, Some(&crm)), Err(AuthError::Missing));
        assert_eq!(
            check(&Access::Open, &none, Some(&qa)),
            Ok(Client::Certificate("CN=qa".into()))
        );
        assert_eq!(
            Client::Certificate("CN=qa".into()).to_string(),
            "cert:CN=qa"
        );
    }

    #[test]
    fn certificate_names_are_read_from_the_subject_and_alternative_names() {
        let mut params =
            rcgen::CertificateParams::new(vec!["CRM.Apps.Example".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "CRM widget\nforged");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Example");
        let key = rcgen::KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let cert = ClientCert::from_der(&der).unwrap();
        assert_eq!(cert.names, ["crm widget\nforged", "crm.apps.example"]);
        assert!(
            cert.subject.contains("CN=CRM widget?forged"),
            "{}",
            cert.subject
        );
        assert!(cert.subject.contains("O=Example"), "{}", cert.subject);
        assert!(ClientCert::from_der(b"not a certificate").is_err());
    }

    #[test]
    fn key_ids_show_the_digest_prefix_only() {
        let d = digest(KEY.as_bytes());
        let shown = KeyId::of(&d).to_string();
        assert!(shown.starts_with("key:") && shown.len() == 12, "{shown}");
        assert!(!shown.contains(KEY));
        assert!(format!("{:?}", Access::keys(vec![d])).contains("1 keys"));
    }

    #[test]
    fn configured_digests_and_keys_are_checked() {
        let hex = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08";
        use crate::config::{key_digest, parse_digest};
        assert_eq!(parse_digest(hex).unwrap(), digest(b"test"));
        assert!(parse_digest("abc").is_err());
        assert!(parse_digest(&"g".repeat(64)).is_err());
        assert!(key_digest("short").is_err());
        assert!(key_digest("with space 0123456789").is_err());
        assert_eq!(key_digest(KEY).unwrap(), digest(KEY.as_bytes()));
    }
}
