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
use crate::upstream::trust::provider;

/// A rustls server configuration for `identity`; fails when the key does not fit the chain.
pub fn server_config(identity: &TlsIdentity) -> Result<ServerConfig, String> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?;
    let builder = match &identity.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for (index, cert) in ca.roots.iter().enumerate() {
                roots.add(cert.clone()).map_err(|e| {
                    format!(
                        "{}: certificate {} is not a usable CA certificate: {e}",
                        ca.path.display(),
                        index + 1
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider())
                .build()
                .map_err(|e| {
                    format!("{}: cannot verify clients with it: {e}", ca.path.display())
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "the private key does not belong to the certificate in {}",
                identity.cert_path.display()
            ),
            other => format!(
                "cannot use the certificate in {} with this key: {other}",
                identity.cert_path.display()
            ),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The acceptor for new connections.
pub fn acceptor(identity: &TlsIdentity) -> Result<TlsAcceptor, String> {
    server_config(identity).map(|config| TlsAcceptor::from(Arc::new(config)))
}
