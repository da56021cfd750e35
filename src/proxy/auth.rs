//! Step 2, authenticate: who the caller is, as far as the proxy can tell
//! before the upstream answers. A client certificate is verified here,
//! against the client CA of the vcluster the request is for; a bearer
//! token is passed through for the upstream to judge; without either, the
//! request may still be forwarded to an awake vcluster but wakes nothing.

use http::HeaderMap;

use super::error::ProxyError;
use super::proof::Proofs;
use super::upstream::Upstreams;
use crate::auth::{bearer_token, subject};
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
    /// token the vcluster's keys verify, the account it names (to attribute
    /// activity and apply ignore rules; never to authorize, which is the
    /// upstream's alone).
    Bearer {
        verified: Option<(String, Vec<String>)>,
    },
    Anonymous,
}

impl Caller {
    /// The user and groups activity is recorded under: only what was
    /// verified (a claim in a token nobody checked is no name). Other
    /// tokens are attributed exactly by the vcluster's audit webhook.
    pub fn identity(&self) -> (String, Vec<String>) {
        match self {
            Caller::Certificate { user, groups } => (user.clone(), groups.clone()),
            Caller::Bearer { verified: Some((user, groups)) } => (user.clone(), groups.clone()),
            Caller::Bearer { verified: None } => ("(bearer token)".to_string(), vec![]),
            Caller::Anonymous => ("system:anonymous".to_string(), vec![]),
        }
    }
}

/// Who sent a request for `t` on `conn` with `headers`. A certificate
/// that `t` does not trust is refused here, with the same answer as any
/// other unauthenticated request (the reason goes to the logs).
pub async fn authenticate<S>(
    conn: &Conn<S>,
    headers: &HeaderMap,
    t: &TargetRef,
    upstreams: &Upstreams,
    proofs: &Proofs,
) -> Result<Caller, ProxyError> {
    match conn.peer.as_deref().and_then(<[_]>::split_first) {
        Some((cert, intermediates)) => {
            let up = upstreams.get(t).await.map_err(|e| ProxyError::from_upstream(t, &e))?;
            if let Err(e) =
                up.client_verifier.verify_client_cert(cert, intermediates, rustls_pki_types::UnixTime::now())
            {
                tracing::debug!(target = %t, error = %e, "client certificate refused");
                return Err(ProxyError::Unauthorized);
            }
            let Some((user, groups)) = subject(cert) else {
                tracing::debug!(target = %t, "client certificate without a common name refused");
                return Err(ProxyError::Unauthorized);
            };
            Ok(Caller::Certificate { user, groups })
        }
        None => Ok(match bearer_token(headers) {
            Some(token) => Caller::Bearer { verified: proofs.identity(t, token, std::time::Instant::now()) },
            None => Caller::Anonymous,
        }),
    }
}
