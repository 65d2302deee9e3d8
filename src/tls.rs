//! TLS termination on the public listener.
//!
//! TLS 1.2 and 1.3 with the ring provider, ALPN `h2` and `http/1.1`. With `client_ca`, a client
//! must present a certificate that CA issued, or the handshake fails. The acceptor is rebuilt on
//! reload, so new handshakes use the new certificate and client CA while open connections keep
//! theirs.

use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsIdentity;
use crate::crypto::provider;

/// Why the TLS configuration could not be built, with the key to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct TlsError {
    pub key: &'static str,
    pub message: String,
}

fn problem(key: &'static str, message: String) -> TlsError {
    TlsError { key, message }
}

/// A rustls server configuration for `identity`; fails when the key does not fit the chain or
/// the client CA cannot verify anything.
pub fn server_config(identity: &TlsIdentity) -> Result<ServerConfig, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| problem("server.tls", format!("cannot set up TLS: {e}")))?;
    let builder = match &identity.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for (index, cert) in ca.roots.iter().enumerate() {
                roots.add(cert.clone()).map_err(|e| {
                    let message = format!(
                        "{}: certificate {} is not a usable CA certificate: {e}",
                        ca.path.display(),
                        index + 1
                    );
                    problem("server.tls.client_ca", message)
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider())
                .build()
                .map_err(|e| {
                    let message =
                        format!("{}: cannot verify clients with it: {e}", ca.path.display());
                    problem("server.tls.client_ca", message)
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| {
            let message = match e {
                rustls::Error::InconsistentKeys(_) => format!(
                    "the private key does not belong to the certificate in {}",
                    identity.cert_path.display()
                ),
                other => format!(
                    "cannot use the certificate in {} with this key: {other}",
                    identity.cert_path.display()
                ),
            };
            problem("server.tls.key", message)
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The acceptor for new connections.
pub fn acceptor(identity: &TlsIdentity) -> Result<TlsAcceptor, TlsError> {
    server_config(identity).map(|config| TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    fn identity(key: &rcgen::KeyPair, cert_key: &rcgen::KeyPair) -> TlsIdentity {
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let cert = params.self_signed(cert_key).unwrap();
        TlsIdentity {
            cert_path: "/etc/miralix-gateway/cert.pem".into(),
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            client_ca: None,
        }
    }

    #[test]
    fn a_key_that_does_not_belong_to_the_certificate_names_the_key_and_the_file() {
        let key = rcgen::KeyPair::generate().unwrap();
        let config = server_config(&identity(&key, &key)).unwrap();
        assert_eq!(
            config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        let other = rcgen::KeyPair::generate().unwrap();
        let error = server_config(&identity(&other, &key)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "server.tls.key: the private key does not belong to the certificate in /etc/miralix-gateway/cert.pem"
        );
    }
}
