//! What the proxy can prove about a bearer token while the vcluster it is
//! for sleeps (its API server, the only one that can judge it, is down):
//!
//! - a **ServiceAccount token** is checked against the vcluster's own
//!   service-account keys (its `/openid/v1/jwks`, read with its admin
//!   credential while it was awake): a good signature and an unexpired
//!   token prove it, and name the account; a token that claims to be a
//!   ServiceAccount's and fails is refused;
//! - a token its API server **accepted** (answered other than 401/403)
//!   within [`REMEMBER`] is taken again; one it **refused** (401) within
//!   [`REMEMBER`] is refused again;
//! - anything else (an OIDC token, a token never seen) proves nothing: it
//!   may wake a vcluster only within a small budget (see
//!   [`super::admit`]), and never counts as its use before its API server
//!   has answered it.
//!
//! Tokens are remembered as keyed hashes, never as themselves.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::target::TargetRef;

/// How long an answer about a token is remembered.
pub const REMEMBER: Duration = Duration::from_secs(24 * 60 * 60);
/// How long a vcluster's service-account keys are used before they are
/// read again (while it is awake).
pub const KEYS_FRESH: Duration = Duration::from_secs(60 * 60);
/// At most this many (target, token) pairs per memory; beyond it the
/// oldest goes.
const CAPACITY: usize = 4096;

/// What is known of a bearer token, for one vcluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    /// A ServiceAccount token the vcluster's keys verify: its account.
    ServiceAccount { user: String, groups: Vec<String> },
    /// Its API server accepted it within [`REMEMBER`].
    Accepted,
    /// Its API server refused it within [`REMEMBER`], or it claims to be a
    /// ServiceAccount token and the vcluster's keys reject it.
    Refused(&'static str),
    /// Nothing here can tell.
    Unknown,
}

/// The keys, the memories and the verdicts cached per token.
#[derive(Default)]
pub struct Proofs {
    refused: Memory<()>,
    accepted: Memory<()>,
    /// Verdicts on ServiceAccount tokens (a signature check costs tens of
    /// microseconds: once per token, not per request).
    verdicts: Memory<Verdict>,
    keys: RwLock<HashMap<TargetRef, Arc<Keys>>>,
    /// When each target's keys were last asked for.
    asked: Mutex<HashMap<TargetRef, Instant>>,
}

/// A failed read of a vcluster's keys is tried again this much later.
const KEYS_RETRY: Duration = Duration::from_secs(60);

/// A vcluster's service-account verification keys.
pub struct Keys {
    pub set: JwkSet,
    pub read: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Valid {
        user: String,
        groups: Vec<String>,
    },
    Invalid(&'static str),
    /// Not a ServiceAccount token (or none of its claims say so).
    NotOne,
}

impl Proofs {
    /// What is known of `token` for `t` now.
    pub fn prove(&self, t: &TargetRef, token: &str, now: Instant) -> Proof {
        if self.refused.get(t, token, now).is_some() {
            return Proof::Refused("its API server refused this token");
        }
        match self.service_account(t, token, now) {
            Some(Verdict::Valid { user, groups }) => return Proof::ServiceAccount { user, groups },
            Some(Verdict::Invalid(why)) => return Proof::Refused(why),
            Some(Verdict::NotOne) | None => {}
        }
        if self.accepted.get(t, token, now).is_some() { Proof::Accepted } else { Proof::Unknown }
    }

    /// The account a ServiceAccount token verified by `t`'s keys names, if
    /// it is one (for the activity record).
    pub fn identity(&self, t: &TargetRef, token: &str, now: Instant) -> Option<(String, Vec<String>)> {
        match self.service_account(t, token, now)? {
            Verdict::Valid { user, groups } => Some((user, groups)),
            _ => None,
        }
    }

    /// `t`'s API server answered a request bearing `token`: refused (401)
    /// or taken.
    pub fn answered(&self, t: &TargetRef, token: &str, refused: bool, now: Instant) {
        if refused {
            self.accepted.forget(t, token);
            self.refused.insert(t, token, (), now);
        } else {
            self.refused.forget(t, token);
            if self.accepted.get(t, token, now).is_none_or(|at| now.saturating_duration_since(at) > REFRESH) {
                self.accepted.insert(t, token, (), now);
            }
        }
    }

    /// Whether any token is remembered refused (read without a lock).
    pub fn any_refused(&self) -> bool {
        !self.refused.is_empty()
    }

    /// `t`'s keys need reading: none yet, or older than [`KEYS_FRESH`]; and
    /// none asked for within [`KEYS_RETRY`] (one read at a time, and a
    /// vcluster whose keys cannot be read is not asked on every request).
    /// Records the ask when true.
    pub fn want_keys(&self, t: &TargetRef, now: Instant) -> bool {
        let fresh = self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(t)
            .is_some_and(|k| now.saturating_duration_since(k.read) < KEYS_FRESH);
        if fresh {
            return false;
        }
        let mut asked = self.asked.lock().unwrap_or_else(|e| e.into_inner());
        match asked.get(t) {
            Some(at) if now.saturating_duration_since(*at) < KEYS_RETRY => false,
            _ => {
                asked.insert(t.clone(), now);
                true
            }
        }
    }

    /// The keys read for `t`.
    pub fn learned(&self, t: &TargetRef, set: JwkSet, now: Instant) {
        self.keys
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(t.clone(), Arc::new(Keys { set, read: now }));
        // Verdicts were made with the old keys.
        self.verdicts.retain_target(t);
    }

    /// Reads `t`'s keys again at the next chance (it woke: they may have
    /// changed while it slept).
    pub fn stale(&self, t: &TargetRef) {
        self.asked.lock().unwrap_or_else(|e| e.into_inner()).remove(t);
        if let Some(k) = self.keys.write().unwrap_or_else(|e| e.into_inner()).get_mut(t) {
            *k =
                Arc::new(Keys { set: k.set.clone(), read: k.read.checked_sub(KEYS_FRESH).unwrap_or(k.read) });
        }
    }

    /// The verdict on `token` as a ServiceAccount token of `t`, cached.
    /// `None` when it claims to be one but `t`'s keys are not known.
    fn service_account(&self, t: &TargetRef, token: &str, now: Instant) -> Option<Verdict> {
        if let Some((_, v)) = self.verdicts.get_with(t, token, now) {
            return Some(v);
        }
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner()).get(t).cloned();
        let verdict = verify(token, keys.as_deref().map(|k| &k.set))?;
        self.verdicts.insert(t, token, verdict.clone(), now);
        Some(verdict)
    }
}

/// An accepted token is written again at most this often (each answered
/// request would otherwise take the lock to move its time).
const REFRESH: Duration = Duration::from_secs(60);

/// The claims a ServiceAccount token carries that are read here.
#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
}

/// The verdict on `token` with `keys`. `None`: it claims to be a
/// ServiceAccount token, and there are no keys to check it with.
fn verify(token: &str, keys: Option<&JwkSet>) -> Option<Verdict> {
    let Some((user, groups)) = crate::auth::service_account(token) else { return Some(Verdict::NotOne) };
    let keys = keys?;
    let Ok(header) = jsonwebtoken::decode_header(token) else { return Some(Verdict::Invalid("not a JWT")) };
    let jwk = match header.kid.as_deref() {
        Some(kid) => keys.find(kid),
        None if keys.keys.len() == 1 => keys.keys.first(),
        None => None,
    };
    let Some(jwk) = jwk else {
        return Some(Verdict::Invalid("a ServiceAccount token not signed by this vcluster's keys"));
    };
    let allowed = [
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
        Algorithm::ES256,
        Algorithm::ES384,
    ];
    if !allowed.contains(&header.alg) {
        return Some(Verdict::Invalid(
            "a ServiceAccount token with an algorithm Kubernetes does not sign with",
        ));
    }
    let Ok(key) = DecodingKey::from_jwk(jwk) else {
        return Some(Verdict::Invalid("a ServiceAccount token not signed by this vcluster's keys"));
    };
    let mut validation = Validation::new(header.alg);
    // Audiences are the API server's to check; legacy tokens have no exp.
    validation.validate_aud = false;
    validation.required_spec_claims = HashSet::new();
    validation.leeway = 30;
    match jsonwebtoken::decode::<Claims>(token, &key, &validation) {
        Ok(data) if data.claims.sub == user => Some(Verdict::Valid { user, groups }),
        Ok(_) => Some(Verdict::Invalid("a ServiceAccount token whose subject changed")),
        Err(e) => Some(Verdict::Invalid(match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => "an expired ServiceAccount token",
            jsonwebtoken::errors::ErrorKind::ImmatureSignature => "a ServiceAccount token not valid yet",
            _ => "a ServiceAccount token not signed by this vcluster's keys",
        })),
    }
}

/// (target, token) pairs with a value and when they were written, as keyed
/// hashes, bounded in number and in age.
struct Memory<V> {
    keys: RandomState,
    entries: Mutex<HashMap<u64, (Instant, TargetRef, V)>>,
    /// `entries.len()`, read without the lock: most requests forward to an
    /// awake target while nothing is refused, and pay nothing here.
    len: AtomicUsize,
}

impl<V> Default for Memory<V> {
    fn default() -> Self {
        Memory { keys: RandomState::new(), entries: Mutex::new(HashMap::new()), len: AtomicUsize::new(0) }
    }
}

impl<V: Clone> Memory<V> {
    /// A keyed hash of the target and the token's length, first 16 and
    /// last 48 bytes: bounded work however long the token (a JWT can be
    /// kilobytes, and an accepted token is looked up for every answered
    /// request). Sharing another token's entry takes a token of the same
    /// length with the same first 16 and last 48 bytes: for a JWT those are
    /// its signature's, for a random token all of it, which nobody who
    /// does not hold that token can make.
    fn key(&self, t: &TargetRef, token: &str) -> u64 {
        let b = token.as_bytes();
        let mut h = self.keys.build_hasher();
        t.hash(&mut h);
        b.len().hash(&mut h);
        if b.len() <= 64 {
            h.write(b);
        } else {
            h.write(&b[..16]);
            h.write(&b[b.len() - 48..]);
        }
        h.finish()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Instant, TargetRef, V)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_empty(&self) -> bool {
        self.len.load(Ordering::Relaxed) == 0
    }

    fn insert(&self, t: &TargetRef, token: &str, v: V, now: Instant) {
        let key = self.key(t, token);
        let mut entries = self.lock();
        if entries.len() >= CAPACITY && !entries.contains_key(&key) {
            entries.retain(|_, (at, _, _)| now.saturating_duration_since(*at) < REMEMBER);
            if entries.len() >= CAPACITY
                && let Some(oldest) = entries.iter().min_by_key(|(_, (at, _, _))| *at).map(|(k, _)| *k)
            {
                entries.remove(&oldest);
            }
        }
        entries.insert(key, (now, t.clone(), v));
        self.len.store(entries.len(), Ordering::Relaxed);
    }

    fn get_with(&self, t: &TargetRef, token: &str, now: Instant) -> Option<(Instant, V)> {
        if self.is_empty() {
            return None;
        }
        let key = self.key(t, token);
        self.lock()
            .get(&key)
            .filter(|(at, _, _)| now.saturating_duration_since(*at) < REMEMBER)
            .map(|(at, _, v)| (*at, v.clone()))
    }

    fn get(&self, t: &TargetRef, token: &str, now: Instant) -> Option<Instant> {
        self.get_with(t, token, now).map(|(at, _)| at)
    }

    fn forget(&self, t: &TargetRef, token: &str) {
        if self.is_empty() {
            return;
        }
        let key = self.key(t, token);
        let mut entries = self.lock();
        entries.remove(&key);
        self.len.store(entries.len(), Ordering::Relaxed);
    }

    fn retain_target(&self, t: &TargetRef) {
        let mut entries = self.lock();
        entries.retain(|_, (_, target, _)| target != t);
        self.len.store(entries.len(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn target(name: &str) -> TargetRef {
        TargetRef::vcluster("team-a", name)
    }

    /// An EC P-256 key pair in PKCS#8, its JWK set, and a signer.
    struct Signer {
        key: jsonwebtoken::EncodingKey,
        kid: String,
        set: JwkSet,
    }

    fn signer(kid: &str) -> Signer {
        let pair = testbed::pki::service_account_key().unwrap();
        let der = pem_der(&pair.key_pem);
        let key = jsonwebtoken::EncodingKey::from_ec_der(&der);
        // The public point from the PKCS#8 private key, as kube-apiserver
        // publishes it.
        let rng = ring::rand::SystemRandom::new();
        let kp = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &der,
            &rng,
        )
        .unwrap();
        use ring::signature::KeyPair as _;
        let point = kp.public_key().as_ref();
        let b = |s: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let set: JwkSet = serde_json::from_value(serde_json::json!({"keys": [{
            "use": "sig", "kty": "EC", "kid": kid, "crv": "P-256", "alg": "ES256",
            "x": b(&point[1..33]), "y": b(&point[33..65]),
        }]}))
        .unwrap();
        Signer { key, kid: kid.into(), set }
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD.decode(body).unwrap()
    }

    impl Signer {
        fn token(&self, sub: &str, exp_in: i64) -> String {
            let mut header = jsonwebtoken::Header::new(Algorithm::ES256);
            header.kid = Some(self.kid.clone());
            let exp = chrono::Utc::now().timestamp() + exp_in;
            let claims = serde_json::json!({"iss": "https://kubernetes.default.svc.cluster.local", "sub": sub, "exp": exp});
            jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
        }
    }

    #[test]
    fn a_service_account_token_is_proven_only_by_the_vclusters_own_keys() {
        let (ours, theirs) = (signer("ours"), signer("theirs"));
        let p = Proofs::default();
        let t = target("dev");
        let now = Instant::now();
        let sa = "system:serviceaccount:ci:deployer";
        let good = ours.token(sa, 3600);
        // No keys yet: it claims to be one, and nothing can tell.
        assert_eq!(p.prove(&t, &good, now), Proof::Unknown);
        assert!(p.want_keys(&t, now));
        assert!(!p.want_keys(&t, now), "one read at a time");
        assert!(p.want_keys(&t, now + KEYS_RETRY), "a failed read is tried again a minute later");
        p.learned(&t, ours.set.clone(), now);
        assert!(!p.want_keys(&t, now + KEYS_RETRY * 2), "fresh keys are not read again");
        assert!(p.want_keys(&t, now + KEYS_FRESH + KEYS_RETRY), "old ones are");
        match p.prove(&t, &good, now) {
            Proof::ServiceAccount { user, .. } => assert_eq!(user, sa),
            other => panic!("{other:?}"),
        }
        assert_eq!(p.identity(&t, &good, now).map(|(u, _)| u).as_deref(), Some(sa));
        // Another key (same kid forged or not), expired, or tampered: refused.
        let mut forged = theirs.token(sa, 3600);
        assert!(matches!(p.prove(&t, &forged, now), Proof::Refused(_)), "signed by another key, another kid");
        let same_kid = Signer { kid: "ours".into(), ..signer("x") };
        forged = same_kid.token(sa, 3600);
        assert_eq!(
            p.prove(&t, &forged, now),
            Proof::Refused("a ServiceAccount token not signed by this vcluster's keys")
        );
        assert_eq!(
            p.prove(&t, &ours.token(sa, -3600), now),
            Proof::Refused("an expired ServiceAccount token")
        );
        let mut parts: Vec<String> = good.split('.').map(String::from).collect();
        parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
            r#"{{"sub":"system:serviceaccount:kube-system:admin","exp":{}}}"#,
            chrono::Utc::now().timestamp() + 600
        ));
        assert!(matches!(p.prove(&t, &parts.join("."), now), Proof::Refused(_)), "a changed payload");
        // Another vcluster's keys are its own.
        assert_eq!(p.prove(&target("other"), &good, now), Proof::Unknown);
        // A token that is no ServiceAccount's proves nothing by itself...
        assert_eq!(p.prove(&t, "opaque-oidc-token", now), Proof::Unknown);
        // ...until its API server takes it, or refuses it.
        p.answered(&t, "opaque-oidc-token", false, now);
        assert_eq!(p.prove(&t, "opaque-oidc-token", now), Proof::Accepted);
        p.answered(&t, "opaque-oidc-token", true, now);
        assert!(matches!(p.prove(&t, "opaque-oidc-token", now), Proof::Refused(_)));
        assert_eq!(p.prove(&t, "opaque-oidc-token", now + REMEMBER), Proof::Unknown, "forgotten after a day");
    }

    #[test]
    fn beyond_capacity_the_oldest_answer_goes() {
        let p = Proofs::default();
        let t0 = Instant::now();
        for i in 0..CAPACITY {
            p.answered(&target("dev"), &format!("token-{i}"), true, t0 + Duration::from_millis(i as u64));
        }
        let later = t0 + Duration::from_secs(10);
        p.answered(&target("dev"), "newest", true, later);
        assert_eq!(p.refused.lock().len(), CAPACITY);
        assert_eq!(p.prove(&target("dev"), "token-0", later), Proof::Unknown);
        assert!(matches!(p.prove(&target("dev"), "token-1", later), Proof::Refused(_)));
        assert!(matches!(p.prove(&target("dev"), "newest", later), Proof::Refused(_)));
    }
}
