//! How the gateway decides to trust the box's certificate.
//!
//! Three ways, chosen per account, and no way to turn verification off:
//! - the system trust store (no `ca_file`, no pin): for a box with a publicly trusted certificate;
//! - `ca_file`: the certificates in it are trust anchors, checked against the URL's host or
//!   `server_name`. A presented leaf that is byte-identical to one of them is trusted as that
//!   exact certificate, so a self-signed certificate works whether or not it says `CA:TRUE`
//!   (webpki refuses a CA certificate used as the end entity);
//! - `pin_sha256`: exactly the certificate with that SHA-256 fingerprint, whatever its name,
//!   issuer or dates; with `ca_file` as well, both must hold.
//!
//! In every case the handshake signature is verified, so the box must hold the private key.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::UpstreamTrust;
use crate::crypto::{fingerprint, provider, sha256};

/// Why a trust configuration could not be turned into a verifier.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("no certificate in ca_file could be used as a trust anchor: {0}")]
    BadAnchor(#[source] rustls::Error),
    #[error(
        "the system trust store has no usable certificates; set ca_file or pin_sha256, or install ca-certificates"
    )]
    NoSystemRoots,
    #[error("could not build the certificate verifier: {0}")]
    Verifier(#[source] rustls::client::VerifierBuilderError),
}

/// A rustls client configuration that verifies the box as `trust` says.
pub fn client_config(trust: &UpstreamTrust) -> Result<rustls::ClientConfig, TrustError> {
    let provider = provider();
    let verifier = BoxVerifier {
        https: true,
        chain: chain_verifier(trust, &provider)?,
        exact: trust.ca_certs.clone(),
        pin: trust.pin_sha256,
        server_name: trust.server_name.clone(),
        algorithms: provider.signature_verification_algorithms,
    };
    Ok(with_verifier(provider, verifier))
}

/// The configuration for an `http://` account: it never makes a TLS connection (redirects are
/// not followed), and if it somehow did, every certificate would be refused.
pub fn plain_http_config() -> rustls::ClientConfig {
    let provider = provider();
    let verifier = BoxVerifier {
        https: false,
        chain: None,
        exact: Vec::new(),
        pin: None,
        server_name: None,
        algorithms: provider.signature_verification_algorithms,
    };
    with_verifier(provider, verifier)
}

fn with_verifier(provider: Arc<CryptoProvider>, verifier: BoxVerifier) -> rustls::ClientConfig {
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

/// The chain verifier, or `None` when a pin alone decides.
fn chain_verifier(
    trust: &UpstreamTrust,
    provider: &Arc<CryptoProvider>,
) -> Result<Option<Arc<WebPkiServerVerifier>>, TrustError> {
    let mut roots = RootCertStore::empty();
    if trust.ca_certs.is_empty() {
        if trust.pin_sha256.is_some() {
            return Ok(None);
        }
        let loaded = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(loaded.certs);
        if roots.is_empty() {
            return Err(TrustError::NoSystemRoots);
        }
    } else {
        for cert in &trust.ca_certs {
            roots.add(cert.clone()).map_err(TrustError::BadAnchor)?;
        }
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map(Some)
        .map_err(TrustError::Verifier)
}

#[derive(Debug)]
struct BoxVerifier {
    /// `false` for an `http://` account, whose client must never trust a certificate.
    https: bool,
    chain: Option<Arc<WebPkiServerVerifier>>,
    /// `ca_file` certificates, trusted as exact leaves too.
    exact: Vec<CertificateDer<'static>>,
    pin: Option<[u8; 32]>,
    server_name: Option<ServerName<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for BoxVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !self.https {
            return Err(rustls::Error::General(
                "this account's base_url is http://; no certificate is trusted".into(),
            ));
        }
        if let Some(pin) = &self.pin {
            let presented = sha256(end_entity);
            if &presented != pin {
                return Err(rustls::Error::General(format!(
                    "certificate pin mismatch: the box presented SHA-256 {}, pin_sha256 is {}",
                    fingerprint(&presented),
                    fingerprint(pin)
                )));
            }
        }
        if self.exact.iter().any(|c| c.as_ref() == end_entity.as_ref()) {
            return Ok(ServerCertVerified::assertion());
        }
        match &self.chain {
            None => Ok(ServerCertVerified::assertion()),
            Some(chain) => chain.verify_server_cert(
                end_entity,
                intermediates,
                self.server_name.as_ref().unwrap_or(server_name),
                ocsp_response,
                now,
            ),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
