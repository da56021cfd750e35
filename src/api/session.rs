//! Signed values the API hands to browsers and takes back: the session
//! cookie, the CSRF token bound to it, and the one-time sign-in ticket that
//! `dormant ui` mints. Each is `payload.tag`, the tag an HMAC-SHA256 over a
//! purpose and the payload with the agent's key, so a value made for one
//! purpose never passes for another, and none can be made without the key.
//!
//! The key comes from a file (the chart generates a Secret and mounts it
//! into every replica, so a session made by one replica is good at all of
//! them), else it is random for this process.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use chrono::{DateTime, Utc};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use super::authn::Identity;

/// The session cookie's name. `__Secure-`: browsers accept it only from an
/// HTTPS answer with `Secure`.
pub const COOKIE: &str = "__Secure-dormant-session";
/// The cookie of a browser that has no session yet: binds the sign-in
/// form's CSRF token (so nobody can sign a victim in as themselves).
pub const PRE_COOKIE: &str = "__Secure-dormant-pre";
/// How long a session lasts.
pub const SESSION_LIFE: chrono::Duration = chrono::Duration::hours(1);
/// How long a one-time sign-in link lasts.
pub const TICKET_LIFE: chrono::Duration = chrono::Duration::seconds(120);
/// A cookie's value may not be longer (browsers keep 4096 bytes per
/// cookie, name and attributes included).
pub const MAX_COOKIE: usize = 3800;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to read the session key from {path}")]
    ReadKey {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the session key in {path} is too short: {len} bytes, at least 32 needed")]
    ShortKey { path: String, len: usize },
}

/// The agent's signing key.
pub struct Keys {
    key: hmac::Key,
    /// Whether it came from a file (shared by replicas) or is this
    /// process's own.
    pub shared: bool,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").field("shared", &self.shared).finish_non_exhaustive()
    }
}

/// Random bytes, base64url.
pub fn random_id(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    // SystemRandom fails only where the OS has no random source at all.
    if SystemRandom::new().fill(&mut b).is_err() {
        let fallback = std::collections::hash_map::RandomState::new();
        use std::hash::{BuildHasher, Hasher};
        for chunk in b.chunks_mut(8) {
            let mut h = fallback.build_hasher();
            h.write_u64(Utc::now().timestamp_nanos_opt().unwrap_or_default() as u64);
            let v = h.finish().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    B64.encode(b)
}

impl Keys {
    /// The key in `path` (trimmed; at least 32 bytes).
    pub fn from_file(path: &std::path::Path) -> Result<Keys, Error> {
        let text = std::fs::read(path)
            .map_err(|source| Error::ReadKey { path: path.display().to_string(), source })?;
        let trimmed = text.trim_ascii();
        if trimmed.len() < 32 {
            return Err(Error::ShortKey { path: path.display().to_string(), len: trimmed.len() });
        }
        Ok(Keys { key: hmac::Key::new(hmac::HMAC_SHA256, trimmed), shared: true })
    }

    /// A key of this process alone.
    pub fn random() -> Keys {
        let k = random_id(32);
        Keys { key: hmac::Key::new(hmac::HMAC_SHA256, k.as_bytes()), shared: false }
    }

    fn tag(&self, purpose: &str, data: &[u8]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(purpose.as_bytes());
        ctx.update(&[0]);
        ctx.update(data);
        ctx.sign()
    }

    /// `payload.tag` for `purpose`.
    fn seal(&self, purpose: &str, payload: &[u8]) -> String {
        let body = B64.encode(payload);
        let tag = self.tag(purpose, body.as_bytes());
        format!("{body}.{}", B64.encode(tag.as_ref()))
    }

    /// The payload of a sealed value whose tag is right for `purpose`
    /// (checked in constant time).
    fn open(&self, purpose: &str, sealed: &str) -> Option<Vec<u8>> {
        let (body, tag) = sealed.split_once('.')?;
        let tag = B64.decode(tag).ok()?;
        let mut ctx_data = Vec::with_capacity(purpose.len() + 1 + body.len());
        ctx_data.extend_from_slice(purpose.as_bytes());
        ctx_data.push(0);
        ctx_data.extend_from_slice(body.as_bytes());
        hmac::verify(&self.key, &ctx_data, &tag).ok()?;
        B64.decode(body).ok()
    }

    /// A session cookie's value for `who`, valid until `expires`; `None`
    /// when it would not fit in a cookie (an identity with very many
    /// groups).
    pub fn session(&self, who: &Identity, expires: DateTime<Utc>) -> Option<(Session, String)> {
        let s = Session { sid: random_id(18), who: who.clone(), exp: expires.timestamp() };
        let payload = serde_json::to_vec(&s).ok()?;
        let sealed = self.seal("session", &payload);
        (sealed.len() <= MAX_COOKIE).then_some((s, sealed))
    }

    /// The session a cookie's value holds, if it is ours and not expired.
    pub fn open_session(&self, value: &str, now: DateTime<Utc>) -> Option<Session> {
        if value.len() > MAX_COOKIE {
            return None;
        }
        let s: Session = serde_json::from_slice(&self.open("session", value)?).ok()?;
        (s.exp > now.timestamp()).then_some(s)
    }

    /// A CSRF token for forms and scripts of the page whose visitor is
    /// bound by `binding` (a session id, a pre-session nonce, or a user an
    /// auth proxy names), good until `expires`.
    pub fn csrf(&self, binding: &str, expires: DateTime<Utc>) -> String {
        let exp = expires.timestamp().to_string();
        let tag = self.tag("csrf", format!("{binding}\0{exp}").as_bytes());
        format!("{exp}.{}", B64.encode(tag.as_ref()))
    }

    /// Whether `token` is a CSRF token for `binding` that has not expired.
    pub fn check_csrf(&self, binding: &str, token: &str, now: DateTime<Utc>) -> bool {
        let Some((exp, tag)) = token.split_once('.') else { return false };
        let (Ok(exp_secs), Ok(tag)) = (exp.parse::<i64>(), B64.decode(tag)) else { return false };
        if exp_secs <= now.timestamp() {
            return false;
        }
        let data = format!("csrf\0{binding}\0{exp}");
        hmac::verify(&self.key, data.as_bytes(), &tag).is_ok()
    }

    /// A one-time sign-in ticket for `who`.
    pub fn ticket(&self, who: &Identity, now: DateTime<Utc>) -> Option<String> {
        let t = Ticket { nonce: random_id(18), who: who.clone(), exp: (now + TICKET_LIFE).timestamp() };
        let sealed = self.seal("ticket", &serde_json::to_vec(&t).ok()?);
        (sealed.len() <= MAX_COOKIE).then_some(sealed)
    }

    /// The ticket `value` holds, if it is ours and not expired (whether it
    /// was used already is [`Used`]'s to say).
    pub fn open_ticket(&self, value: &str, now: DateTime<Utc>) -> Option<Ticket> {
        if value.len() > MAX_COOKIE {
            return None;
        }
        let t: Ticket = serde_json::from_slice(&self.open("ticket", value)?).ok()?;
        (t.exp > now.timestamp()).then_some(t)
    }
}

/// What a session cookie holds: who signed in, and until when.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Session {
    /// Random: binds the session's CSRF tokens.
    pub sid: String,
    pub who: Identity,
    /// Unix seconds.
    pub exp: i64,
}

/// What a one-time sign-in link holds.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Ticket {
    pub nonce: String,
    pub who: Identity,
    pub exp: i64,
}

/// Tickets already used (by nonce) on this replica, until they expire.
/// Bounded: a full set refuses new sign-ins by ticket rather than forget
/// one that is still valid.
#[derive(Default)]
pub struct Used {
    nonces: Mutex<HashMap<String, i64>>,
}

/// Tickets remembered at most.
const USED_CAPACITY: usize = 10_000;

impl Used {
    /// Marks `t` used; false when it was already, or when too many valid
    /// tickets are remembered.
    pub fn take(&self, t: &Ticket, now: DateTime<Utc>) -> bool {
        let mut n = self.nonces.lock().unwrap_or_else(|e| e.into_inner());
        let now = now.timestamp();
        n.retain(|_, exp| *exp > now);
        if n.contains_key(&t.nonce) || n.len() >= USED_CAPACITY {
            return false;
        }
        n.insert(t.nonce.clone(), t.exp);
        true
    }
}

/// The value of cookie `name` in a request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// A `Set-Cookie` value: HttpOnly, Secure, SameSite=Strict, for the API's
/// paths only; `max_age` 0 removes it.
pub fn set_cookie(name: &str, value: &str, max_age: i64) -> String {
    format!("{name}={value}; Path=/dormant/; Max-Age={max_age}; HttpOnly; Secure; SameSite=Strict")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::authn::Via;

    fn alice() -> Identity {
        Identity {
            user: "alice".into(),
            uid: None,
            groups: vec!["team-a".into(), "system:authenticated".into()],
            extra: Default::default(),
            via: Via::Token,
        }
    }

    fn keys() -> Keys {
        Keys { key: hmac::Key::new(hmac::HMAC_SHA256, b"0123456789abcdef0123456789abcdef"), shared: true }
    }

    #[test]
    fn a_session_opens_with_its_key_until_it_expires_and_never_when_touched() {
        let (k, now) = (keys(), Utc::now());
        let (s, cookie) = k.session(&alice(), now + SESSION_LIFE).unwrap();
        assert_eq!(k.open_session(&cookie, now), Some(s.clone()));
        assert_eq!(k.open_session(&cookie, now + SESSION_LIFE), None, "expired");
        // Another key (another installation) cannot read it.
        assert_eq!(Keys::random().open_session(&cookie, now), None);
        // A payload changed by the browser (say, to another user) fails.
        let (body, tag) = cookie.split_once('.').unwrap();
        let mut forged: Session = serde_json::from_slice(&B64.decode(body).unwrap()).unwrap();
        forged.who.user = "admin".into();
        forged.who.groups.push("system:masters".into());
        let forged = format!("{}.{tag}", B64.encode(serde_json::to_vec(&forged).unwrap()));
        assert_eq!(k.open_session(&forged, now), None);
        for junk in ["", ".", "a.b", "%%%.%%%", &format!("{body}."), &format!(".{tag}")] {
            assert_eq!(k.open_session(junk, now), None, "{junk:?}");
        }
    }

    #[test]
    fn a_value_sealed_for_one_purpose_never_passes_for_another() {
        let (k, now) = (keys(), Utc::now());
        let ticket = k.ticket(&alice(), now).unwrap();
        assert!(k.open_ticket(&ticket, now).is_some());
        assert_eq!(k.open_session(&ticket, now), None, "a ticket is no session");
        let (_, cookie) = k.session(&alice(), now + SESSION_LIFE).unwrap();
        assert_eq!(k.open_ticket(&cookie, now), None, "a session is no ticket");
        assert!(k.open_ticket(&ticket, now + TICKET_LIFE).is_none(), "expired");
    }

    #[test]
    fn a_csrf_token_is_good_only_for_its_binding_and_until_it_expires() {
        let (k, now) = (keys(), Utc::now());
        let token = k.csrf("sid-1", now + SESSION_LIFE);
        assert!(k.check_csrf("sid-1", &token, now));
        assert!(!k.check_csrf("sid-2", &token, now), "another session's token");
        assert!(!k.check_csrf("sid-1", &token, now + SESSION_LIFE), "expired");
        assert!(!Keys::random().check_csrf("sid-1", &token, now), "another key");
        // Its expiry cannot be moved: the tag covers it.
        let (_, tag) = token.split_once('.').unwrap();
        let later = format!("{}.{tag}", (now + SESSION_LIFE * 10).timestamp());
        assert!(!k.check_csrf("sid-1", &later, now + SESSION_LIFE * 2));
        for junk in ["", "x", "1.", ".x", "99999999999.AAAA"] {
            assert!(!k.check_csrf("sid-1", junk, now), "{junk:?}");
        }
    }

    #[test]
    fn a_ticket_is_used_once() {
        let (k, now) = (keys(), Utc::now());
        let t = k.open_ticket(&k.ticket(&alice(), now).unwrap(), now).unwrap();
        let used = Used::default();
        assert!(used.take(&t, now));
        assert!(!used.take(&t, now), "the second use is refused");
        let other = k.open_ticket(&k.ticket(&alice(), now).unwrap(), now).unwrap();
        assert!(used.take(&other, now), "another ticket of the same user works");
    }

    #[test]
    fn an_identity_too_big_for_a_cookie_gets_no_session() {
        let mut who = alice();
        who.groups = (0..500).map(|i| format!("group-with-a-long-name-{i}")).collect();
        assert!(keys().session(&who, Utc::now() + SESSION_LIFE).is_none());
    }

    #[test]
    fn cookies_are_read_from_every_cookie_header_and_set_strictly() {
        let mut h = http::HeaderMap::new();
        h.append(http::header::COOKIE, "a=1; __Secure-dormant-session=abc.def".parse().unwrap());
        h.append(http::header::COOKIE, "b=2".parse().unwrap());
        assert_eq!(cookie(&h, COOKIE), Some("abc.def"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "c"), None);
        let set = set_cookie(COOKIE, "v", 3600);
        for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/dormant/", "Max-Age=3600"] {
            assert!(set.contains(attr), "{set}");
        }
    }
}
