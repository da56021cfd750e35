//! The proxy's TLS: its serving certificate, and client certificates
//! requested but checked per request, against the CA of the vcluster the
//! request is for (which the handshake cannot know yet).

use std::sync::Arc;

use rustls_pki_types::CertificateDer;

/// Accepts any client certificate at the TLS layer (checking only that the
/// client holds its key); the chain is verified per request against the
/// CA of the vcluster the request is for, which the handshake cannot know.
#[derive(Debug)]
pub struct DeferredClientCert {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl Default for DeferredClientCert {
    fn default() -> Self {
        DeferredClientCert { provider: crate::tls::provider() }
    }
}

impl rustls::server::danger::ClientCertVerifier for DeferredClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The proxy's TLS configuration: its certificate (reloaded on change),
/// h2 and http/1.1, client certificates requested but optional.
pub fn config(cert: Arc<crate::tls::ReloadingCert>) -> Result<rustls::ServerConfig, crate::tls::Error> {
    crate::tls::server_config_with_resolver(cert, Some(Arc::new(DeferredClientCert::default())))
}
