//! Bearer tokens a vcluster's API server refused (401), remembered per
//! target so that a sleeping vcluster is not woken for them again.
//!
//! The proxy cannot judge a token while the API server sleeps, so any token
//! wakes it; an expired CI credential polling every few minutes would wake
//! the vcluster on every poll once it slept. A token the upstream answered
//! 401 is remembered (as a keyed hash, never the token) for [`REMEMBER`];
//! while the target sleeps, requests with it get 401 at once. A later answer
//! other than 401 to the same token (the target awake) forgets it.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::target::TargetRef;

/// How long a refused token stays refused without being tried again awake.
pub const REMEMBER: Duration = Duration::from_secs(24 * 60 * 60);
/// At most this many (target, token) pairs; beyond it the oldest goes.
const CAPACITY: usize = 4096;

#[derive(Default)]
pub struct Refused {
    keys: RandomState,
    /// When each (target, token) key was last refused.
    entries: Mutex<HashMap<u64, Instant>>,
    /// `entries.len()`, read without the lock: most requests forward to an
    /// awake target while nothing is remembered, and pay nothing here
    /// (not even reading their token again).
    len: AtomicUsize,
}

impl Refused {
    /// A keyed hash of the target and the token's length, first 16 and
    /// last 48 bytes: bounded work however long the token (a JWT can be
    /// kilobytes, and [`Refused::forget`] runs for every answered bearer
    /// request while anything is remembered). Two tokens of one length
    /// that share those bytes are not told apart, which for a JWT (its
    /// signature last) or a random token does not happen.
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Instant>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The upstream of `t` answered a request bearing `token` with 401.
    pub fn insert(&self, t: &TargetRef, token: &str, now: Instant) {
        let key = self.key(t, token);
        let mut entries = self.lock();
        if entries.len() >= CAPACITY && !entries.contains_key(&key) {
            entries.retain(|_, at| now.saturating_duration_since(*at) < REMEMBER);
            if entries.len() >= CAPACITY
                && let Some(oldest) = entries.iter().min_by_key(|(_, at)| **at).map(|(k, _)| *k)
            {
                entries.remove(&oldest);
            }
        }
        entries.insert(key, now);
        self.len.store(entries.len(), Ordering::Relaxed);
    }

    /// Nothing is remembered (read without the lock).
    pub fn is_empty(&self) -> bool {
        self.len.load(Ordering::Relaxed) == 0
    }

    /// When the upstream of `t` last refused `token`, if within [`REMEMBER`].
    pub fn refused(&self, t: &TargetRef, token: &str, now: Instant) -> Option<Instant> {
        if self.is_empty() {
            return None;
        }
        let key = self.key(t, token);
        self.lock().get(&key).copied().filter(|at| now.saturating_duration_since(*at) < REMEMBER)
    }

    /// The upstream of `t` took `token` (answered other than 401).
    pub fn forget(&self, t: &TargetRef, token: &str) {
        if self.is_empty() {
            return;
        }
        let key = self.key(t, token);
        let mut entries = self.lock();
        entries.remove(&key);
        self.len.store(entries.len(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(name: &str) -> TargetRef {
        TargetRef::vcluster("team-a", name)
    }

    #[test]
    fn a_refused_token_is_refused_for_its_target_only_until_forgotten_or_expired() {
        let r = Refused::default();
        let t0 = Instant::now();
        assert_eq!(r.refused(&target("dev"), "old", t0), None);
        r.insert(&target("dev"), "old", t0);
        assert_eq!(r.refused(&target("dev"), "old", t0 + Duration::from_secs(60)), Some(t0));
        assert_eq!(r.refused(&target("dev"), "other", t0), None, "another token");
        let jwt = |sig: &str| format!("eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.{}.{sig}", "x".repeat(600));
        r.insert(&target("dev"), &jwt(&"a".repeat(86)), t0);
        assert_eq!(r.refused(&target("dev"), &jwt(&"a".repeat(86)), t0), Some(t0));
        assert_eq!(r.refused(&target("dev"), &jwt(&"b".repeat(86)), t0), None, "another signature");
        assert_eq!(r.refused(&target("ci"), "old", t0), None, "another vcluster");
        assert_eq!(r.refused(&target("dev"), "old", t0 + REMEMBER), None, "expired");
        r.forget(&target("dev"), "old");
        assert_eq!(r.refused(&target("dev"), "old", t0), None, "forgotten");
    }

    #[test]
    fn beyond_capacity_the_oldest_goes() {
        let r = Refused::default();
        let t0 = Instant::now();
        for i in 0..CAPACITY {
            r.insert(&target("dev"), &format!("token-{i}"), t0 + Duration::from_millis(i as u64));
        }
        let later = t0 + Duration::from_secs(10);
        r.insert(&target("dev"), "newest", later);
        assert_eq!(r.lock().len(), CAPACITY);
        assert_eq!(r.refused(&target("dev"), "token-0", later), None);
        assert!(r.refused(&target("dev"), "token-1", later).is_some());
        assert_eq!(r.refused(&target("dev"), "newest", later), Some(later));
    }
}
