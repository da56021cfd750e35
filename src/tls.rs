//! TLS plumbing shared by the audit endpoint and the proxy: PEM loading and
//! rustls configurations (ring provider only).

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to read PEM from {path}")]
    ReadPem {
        path: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("failed to parse PEM {what}")]
    ParsePem {
        what: &'static str,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("no certificate found in {0}")]
    NoCertificate(String),
    #[error("failed to build TLS configuration")]
    Config(#[source] rustls::Error),
    #[error("failed to build client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The process-wide crypto provider. Only `ring` is compiled in; installing
/// it explicitly avoids rustls guessing (two providers make it panic).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process default provider (idempotent). Libraries
/// that build their own configurations (kube's client) rely on it.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn certs_from_pem(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|source| Error::ParsePem { what, source })?;
    if certs.is_empty() {
        return Err(Error::NoCertificate(what.to_string()));
    }
    Ok(certs)
}

pub fn key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|source| Error::ParsePem { what: "private key", source })
}

pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|source| Error::ReadPem { path: path.display().to_string(), source })?;
    if certs.is_empty() {
        return Err(Error::NoCertificate(path.display().to_string()));
    }
    Ok(certs)
}

pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|source| Error::ReadPem { path: path.display().to_string(), source })
}

pub fn root_store(cas: &[CertificateDer<'static>]) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca.clone()).map_err(Error::Config)?;
    }
    Ok(roots)
}

/// A server configuration with `certs`/`key`, offering h2 and http/1.1.
/// With `client_cas`, client certificates signed by one of them are verified
/// when offered (but not required, so bearer-token clients still connect).
pub fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_cas: Option<&[CertificateDer<'static>]>,
) -> Result<rustls::ServerConfig> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(Error::Config)?;
    let builder = match client_cas {
        Some(cas) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(cas)?), provider())
                    .allow_unauthenticated()
                    .build()
                    .map_err(Error::Verifier)?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(Error::Config)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
