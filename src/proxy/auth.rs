//! Step 2, authenticate: who the caller is, as far as the proxy can tell
//! before the upstream answers. A client certificate is verified here,
//! against the client CA of the vcluster the request is for; a bearer
//! token is passed through for the upstream to judge; without either, the
//! request may still be forwarded to an awake vcluster but wakes nothing.

use http::HeaderMap;

use super::error::ProxyError;
use super::upstream::Upstreams;
use crate::auth::{bearer_token, service_account, subject};
use crate::target::TargetRef;
use crate::tls::Conn;

/// Who the caller is, as far as the proxy can tell.
#[derive(Debug, Clone, PartialEq)]
pub enum Caller {
    /// Verified client certificate: forwarded with impersonation.
    Certificate {
        user: String,
        groups: Vec<String>,
    },
    /// A bearer token, passed through untouched; for a ServiceAccount
    /// token, the account it names (not verified: used only to attribute
    /// activity, never to authorize).
    Bearer {
        service_account: Option<(String, Vec<String>)>,
    },
    Anonymous,
}

impl Caller {
    /// The user and groups activity is recorded under. Whether a token is
    /// valid is the upstream's to know; a ServiceAccount token names its
    /// account, which is all the activity record and ignore rules need.
    /// Other tokens are attributed exactly by the vcluster's audit webhook.
    pub fn identity(&self) -> (String, Vec<String>) {
        match self {
            Caller::Certificate { user, groups } => (user.clone(), groups.clone()),
            Caller::Bearer { service_account: Some((user, groups)) } => (user.clone(), groups.clone()),
            Caller::Bearer { service_account: None } => ("(bearer token)".to_string(), vec![]),
            Caller::Anonymous => ("system:anonymous".to_string(), vec![]),
        }
    }
}

/// Who sent a request for `t` on `conn` with `headers`.
pub async fn authenticate<S>(
    conn: &Conn<S>,
    headers: &HeaderMap,
    t: &TargetRef,
    upstreams: &Upstreams,
) -> Result<Caller, ProxyError> {
    match conn.peer.as_deref().and_then(<[_]>::split_first) {
        Some((cert, intermediates)) => {
            let up = upstreams.get(t).await.map_err(|e| ProxyError::Upstream(t.clone(), e.to_string()))?;
            up.client_verifier
                .verify_client_cert(cert, intermediates, rustls_pki_types::UnixTime::now())
                .map_err(|e| ProxyError::BadClientCert(t.clone(), e.to_string()))?;
            let (user, groups) =
                subject(cert).ok_or_else(|| ProxyError::BadClientCert(t.clone(), "no common name".into()))?;
            Ok(Caller::Certificate { user, groups })
        }
        None => Ok(match bearer_token(headers) {
            Some(token) => Caller::Bearer { service_account: service_account(token) },
            None => Caller::Anonymous,
        }),
    }
}
