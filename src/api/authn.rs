//! Who is calling, in the host cluster's own terms. In this order, as
//! kube-apiserver's authenticators run:
//!
//! 1. the **auth proxy** (oauth2-proxy and the like): a connection whose
//!    client certificate passes the configured auth-proxy CA (and names)
//!    may say who its user is in `X-Remote-User`/`X-Remote-Group` or
//!    `X-Forwarded-User`/`X-Forwarded-Groups`; from anyone else those
//!    headers mean nothing;
//! 2. a **client certificate** signed by the cluster's client CA, read as
//!    aggregated API servers read it (`client-ca-file` of
//!    `kube-system/extension-apiserver-authentication`, read again every
//!    minute);
//! 3. a **bearer token**, which the host API server judges (TokenReview),
//!    remembered briefly under its SHA-256 (never the token itself);
//! 4. the web page's **session cookie** (see [`super::session`]).

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::HeaderMap;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::{Api, PostParams};
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::CertificateDer;

use super::session::{self, Keys, Session};
use crate::auth::{bearer_token, subject};

/// Where kube-apiserver publishes the client CA for aggregated API servers.
pub const CLIENT_CA_NAMESPACE: &str = "kube-system";
pub const CLIENT_CA_CONFIGMAP: &str = "extension-apiserver-authentication";
pub const CLIENT_CA_KEY: &str = "client-ca-file";

/// How long a token the API server accepted is believed without asking again.
pub const TOKEN_TTL: Duration = Duration::from_secs(20);
/// How long a refused token is refused without asking again.
pub const REFUSED_TTL: Duration = Duration::from_secs(5);
/// Tokens remembered at most.
const TOKEN_CAPACITY: usize = 4096;
/// The longest bearer token checked (a projected token is about 1 KiB).
const MAX_TOKEN: usize = 16 * 1024;

/// How a caller proved who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    Token,
    Certificate,
    AuthProxy,
}

/// A caller as the host cluster knows them: what a SubjectAccessReview is
/// asked about.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Vec<String>>,
    pub via: Via,
}

/// A caller, and what binds their CSRF tokens when their credential is
/// one a browser sends by itself (a session cookie, a browser's client
/// certificate, an auth proxy's headers).
#[derive(Debug, Clone)]
pub struct Caller {
    pub who: Identity,
    /// `Some` for credentials a browser sends unasked: unsafe requests
    /// must then carry a CSRF token bound to this.
    pub binding: Option<String>,
    /// The session, when the caller came with the cookie.
    pub session: Option<Session>,
}

/// Why nobody could be authenticated: each says what is missing.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Unauthenticated {
    #[error(
        "no credentials: send a bearer token or a client certificate signed by the cluster's client CA (the CLI sends your kubeconfig's), or sign in on the page"
    )]
    NoCredentials,
    #[error(
        "the cluster did not accept the bearer token ({0}); get a fresh one (for example `kubectl create token`)"
    )]
    TokenRefused(String),
    #[error("the bearer token is longer than {MAX_TOKEN} bytes")]
    TokenTooLong,
    #[error(
        "the client certificate is not signed by the cluster's client CA ({CLIENT_CA_NAMESPACE}/{CLIENT_CA_CONFIGMAP} {CLIENT_CA_KEY}): {0}"
    )]
    BadCertificate(String),
    #[error("the client certificate names no user (its subject has no common name)")]
    NoCommonName,
    #[error(
        "client certificates cannot be checked: the cluster's client CA could not be read from {CLIENT_CA_NAMESPACE}/{CLIENT_CA_CONFIGMAP}; use a bearer token"
    )]
    NoClientCa,
    #[error("the auth proxy named no user (X-Remote-User or X-Forwarded-User)")]
    ProxyNamedNoUser,
    #[error("the session has expired or is not valid: sign in again")]
    SessionExpired,
}

/// Authentication could not be done now (the answer is 503 or 429, not 401).
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("failed to review the token with the cluster")]
    TokenReview(#[source] kube::Error),
    #[error("too many new tokens to check at once; retry in a second")]
    TooManyReviews,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthnError {
    #[error(transparent)]
    Unauthenticated(#[from] Unauthenticated),
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
}

/// An auth proxy trusted to name its users in headers.
pub struct AuthProxy {
    pub verifier: Arc<dyn ClientCertVerifier>,
    /// Common names its certificate may have (any when empty).
    pub names: Vec<String>,
}

type Remembered = (Instant, Result<Identity, Unauthenticated>);

pub struct Authenticator {
    client: Client,
    keys: Arc<Keys>,
    auth_proxy: Option<AuthProxy>,
    client_ca: RwLock<Option<Arc<dyn ClientCertVerifier>>>,
    tokens: Mutex<HashMap<[u8; 32], Remembered>>,
    /// TokenReviews for tokens not remembered: a stranger sending random
    /// tokens must not turn into a flood on the API server.
    reviews: DefaultDirectRateLimiter,
}

impl Authenticator {
    pub fn new(client: Client, keys: Arc<Keys>, auth_proxy: Option<AuthProxy>) -> Self {
        let per_second = NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(50).unwrap_or(NonZeroU32::MIN);
        Authenticator {
            client,
            keys,
            auth_proxy,
            client_ca: RwLock::new(None),
            tokens: Mutex::new(HashMap::new()),
            reviews: RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst)),
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Reads the cluster's client CA now and then every `every`, for as
    /// long as the future runs. A read that fails keeps the CA read before.
    pub async fn keep_client_ca(self: Arc<Self>, every: Duration) {
        loop {
            match self.read_client_ca().await {
                Ok(v) => *self.client_ca.write().unwrap_or_else(|e| e.into_inner()) = Some(v),
                Err(e) => tracing::warn!(
                    error = %crate::error::chain(&*e),
                    "cannot read the cluster's client CA ({CLIENT_CA_NAMESPACE}/{CLIENT_CA_CONFIGMAP}); client certificates are checked against the one read before, if any"
                ),
            }
            tokio::time::sleep(every).await;
        }
    }

    async fn read_client_ca(
        &self,
    ) -> Result<Arc<dyn ClientCertVerifier>, Box<dyn std::error::Error + Send + Sync>> {
        let cm = Api::<ConfigMap>::namespaced(self.client.clone(), CLIENT_CA_NAMESPACE)
            .get(CLIENT_CA_CONFIGMAP)
            .await?;
        let pem = cm
            .data
            .and_then(|d| d.get(CLIENT_CA_KEY).cloned())
            .ok_or_else(|| format!("the ConfigMap has no {CLIENT_CA_KEY}"))?;
        let cas = crate::tls::certs_from_pem(pem.as_bytes(), "client CA")?;
        let roots = crate::tls::root_store(&cas)?;
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            crate::tls::provider(),
        )
        .build()?;
        Ok(v)
    }

    /// Who sent a request on a connection whose client presented `peer`
    /// (its own certificate first), with `headers`.
    pub async fn authenticate(
        &self,
        peer: Option<&[CertificateDer<'static>]>,
        headers: &HeaderMap,
    ) -> Result<Caller, AuthnError> {
        let chain = peer.and_then(<[_]>::split_first);
        let now = rustls_pki_types::UnixTime::now();
        // 1. The auth proxy, by its certificate.
        if let (Some((cert, rest)), Some(p)) = (chain, &self.auth_proxy)
            && p.verifier.verify_client_cert(cert, rest, now).is_ok()
            && let Some((cn, _)) = subject(cert)
            && (p.names.is_empty() || p.names.contains(&cn))
        {
            let who = proxied_identity(headers).ok_or(Unauthenticated::ProxyNamedNoUser)?;
            return Ok(Caller { binding: Some(format!("user\0{}", who.user)), who, session: None });
        }
        // 2. A client certificate of the cluster's.
        let mut cert_problem = None;
        if let Some((cert, rest)) = chain {
            match self.check_certificate(cert, rest, now) {
                Ok(who) => {
                    return Ok(Caller { binding: Some(format!("user\0{}", who.user)), who, session: None });
                }
                Err(e) => cert_problem = Some(e),
            }
        }
        // 3. A bearer token.
        if let Some(token) = bearer_token(headers) {
            let who = self.review(token).await?;
            return Ok(Caller { who, binding: None, session: None });
        }
        // 4. The page's session.
        if let Some(value) = session::cookie(headers, session::COOKIE) {
            return match self.keys.open_session(value, Utc::now()) {
                Some(s) => Ok(Caller { who: s.who.clone(), binding: Some(s.sid.clone()), session: Some(s) }),
                None => Err(cert_problem.unwrap_or(Unauthenticated::SessionExpired).into()),
            };
        }
        Err(cert_problem.unwrap_or(Unauthenticated::NoCredentials).into())
    }

    fn check_certificate(
        &self,
        cert: &CertificateDer<'_>,
        rest: &[CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<Identity, Unauthenticated> {
        let verifier = self.client_ca.read().unwrap_or_else(|e| e.into_inner()).clone();
        let verifier = verifier.ok_or(Unauthenticated::NoClientCa)?;
        verifier
            .verify_client_cert(cert, rest, now)
            .map_err(|e| Unauthenticated::BadCertificate(e.to_string()))?;
        let (user, mut groups) = subject(cert).ok_or(Unauthenticated::NoCommonName)?;
        // kube-apiserver adds it to everyone it authenticates.
        if !groups.iter().any(|g| g == "system:authenticated") {
            groups.push("system:authenticated".into());
        }
        Ok(Identity { user, uid: None, groups, extra: BTreeMap::new(), via: Via::Certificate })
    }

    /// The identity the host API server gives `token`, remembered for a
    /// little while.
    pub async fn review(&self, token: &str) -> Result<Identity, AuthnError> {
        if token.len() > MAX_TOKEN {
            return Err(Unauthenticated::TokenTooLong.into());
        }
        let key: [u8; 32] = {
            let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
            let mut k = [0u8; 32];
            k.copy_from_slice(d.as_ref());
            k
        };
        let now = Instant::now();
        if let Some((at, r)) = self.lock_tokens().get(&key) {
            let ttl = if r.is_ok() { TOKEN_TTL } else { REFUSED_TTL };
            if now.duration_since(*at) < ttl {
                return r.clone().map_err(AuthnError::from);
            }
        }
        if self.reviews.check().is_err() {
            return Err(Unavailable::TooManyReviews.into());
        }
        let review = TokenReview {
            spec: TokenReviewSpec { token: token.to_string(), audiences: None },
            ..Default::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(Unavailable::TokenReview)?;
        let status = answer.status.unwrap_or_default();
        let result = match (status.authenticated, status.user) {
            (Some(true), Some(u)) if u.username.as_deref().is_some_and(|n| !n.is_empty()) => Ok(Identity {
                user: u.username.unwrap_or_default(),
                uid: u.uid.filter(|s| !s.is_empty()),
                groups: u.groups.unwrap_or_default(),
                extra: u.extra.unwrap_or_default(),
                via: Via::Token,
            }),
            _ => Err(Unauthenticated::TokenRefused(
                status.error.filter(|e| !e.is_empty()).unwrap_or_else(|| "not authenticated".into()),
            )),
        };
        self.remember(key, now, result.clone());
        result.map_err(AuthnError::from)
    }

    fn lock_tokens(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Remembered>> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers a review; a full cache first drops what expired, then the
    /// oldest.
    fn remember(&self, key: [u8; 32], now: Instant, r: Result<Identity, Unauthenticated>) {
        let mut tokens = self.lock_tokens();
        if tokens.len() >= TOKEN_CAPACITY && !tokens.contains_key(&key) {
            tokens.retain(|_, (at, _)| now.duration_since(*at) < TOKEN_TTL);
            if tokens.len() >= TOKEN_CAPACITY
                && let Some(oldest) = tokens.iter().min_by_key(|(_, (at, _))| *at).map(|(k, _)| *k)
            {
                tokens.remove(&oldest);
            }
        }
        tokens.insert(key, (now, r));
    }
}

/// The user and groups an auth proxy names: Kubernetes' front-proxy
/// headers (`X-Remote-User`, one `X-Remote-Group` per group) or
/// oauth2-proxy's (`X-Forwarded-User`, comma-separated
/// `X-Forwarded-Groups`).
pub fn proxied_identity(headers: &HeaderMap) -> Option<Identity> {
    let value =
        |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty());
    let user = value("x-remote-user").or_else(|| value("x-forwarded-user"))?.to_string();
    let mut groups: Vec<String> = headers
        .get_all("x-remote-group")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|g| g.trim().to_string())
        .chain(
            headers
                .get_all("x-forwarded-groups")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(|g| g.trim().to_string()),
        )
        .filter(|g| !g.is_empty())
        .collect();
    groups.dedup();
    if !groups.iter().any(|g| g == "system:authenticated") {
        groups.push("system:authenticated".into());
    }
    Some(Identity { user, uid: None, groups, extra: BTreeMap::new(), via: Via::AuthProxy })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_auth_proxy_names_users_in_either_header_style() {
        let mut h = HeaderMap::new();
        assert_eq!(proxied_identity(&h), None, "no user, nobody");
        h.insert("x-forwarded-user", "alice@example.com".parse().unwrap());
        h.insert("x-forwarded-groups", "team-a, admins,".parse().unwrap());
        let who = proxied_identity(&h).unwrap();
        assert_eq!(who.user, "alice@example.com");
        assert_eq!(who.groups, ["team-a", "admins", "system:authenticated"]);
        let mut h = HeaderMap::new();
        h.insert("x-remote-user", "bob".parse().unwrap());
        h.append("x-remote-group", "team-b".parse().unwrap());
        h.append("x-remote-group", "ci".parse().unwrap());
        let who = proxied_identity(&h).unwrap();
        assert_eq!((who.user.as_str(), who.groups.len(), who.via), ("bob", 3, Via::AuthProxy));
        h.insert("x-remote-user", "  ".parse().unwrap());
        assert_eq!(proxied_identity(&h), None, "an empty name is no user");
    }
}
