//! The testbed's certificates: one CA that signs the API servers' serving
//! certificates and every test user's client certificate (CN = user name,
//! O = groups), plus the service-account signing key.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A PEM certificate with its PEM private key.
#[derive(Clone, Debug)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The testbed's certificate authority. It can mint more certificates at any
/// time, so a test may create a user with any name and groups it needs.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
}

impl Ca {
    pub fn new(common_name: &str) -> Result<Self> {
        let key = KeyPair::generate().context("generate CA key")?;
        let params = ca_params(common_name)?;
        let cert = params.self_signed(&key).context("self-sign CA")?;
        Ok(Ca { cert_pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    /// An intermediate CA signed by this one (its `cert_pem` is its own
    /// certificate only: a client presents it after its own).
    pub fn intermediate(&self, common_name: &str) -> Result<Ca> {
        let key = KeyPair::generate().context("generate intermediate CA key")?;
        let params = ca_params(common_name)?;
        let cert = params.signed_by(&key, &self.issuer).context("sign intermediate CA")?;
        Ok(Ca { cert_pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    /// A serving certificate for loopback API servers (and anything else the
    /// tests serve over TLS on 127.0.0.1).
    pub fn server(&self, extra_names: &[&str]) -> Result<CertPair> {
        let mut names: Vec<String> = [
            "localhost",
            "127.0.0.1",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        names.extend(extra_names.iter().map(|s| s.to_string()));
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, "testbed-server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        self.sign(params)
    }

    /// A client certificate as kube-apiserver reads it: CN is the user name,
    /// each O is a group.
    pub fn client(&self, user: &str, groups: &[&str]) -> Result<CertPair> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, user);
        for group in groups {
            params.distinguished_name.push(DnType::OrganizationName, *group);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Result<CertPair> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// A certificate authority's parameters.
fn ca_params(common_name: &str) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

/// The service-account token signing key pair (ECDSA P-256, PKCS#8 PEM).
pub fn service_account_key() -> Result<CertPair> {
    let key = KeyPair::generate()?;
    Ok(CertPair { cert_pem: key.public_key_pem(), key_pem: key.serialize_pem() })
}
