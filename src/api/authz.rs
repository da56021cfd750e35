//! What a caller may do, as the host cluster's RBAC says: one
//! SubjectAccessReview per target and action on the virtual resource
//! `targets` in group `dormant.dev` (verbs `get`, `list`, `sleep`, `wake`),
//! in the target's namespace, named after the target (a vcluster's name,
//! or the namespace's own for a namespace target). Answers are remembered
//! for a few seconds per caller, so a page that polls does not turn into
//! a review per poll.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::Client;
use kube::api::{Api, PostParams};

use super::authn::Identity;
use crate::target::TargetRef;

pub const GROUP: &str = "dormant.dev";
pub const RESOURCE: &str = "targets";
/// How long an answer is remembered.
pub const DECISION_TTL: Duration = Duration::from_secs(5);
const DECISION_CAPACITY: usize = 16_384;
/// Reviews in flight at once for one listing.
const CONCURRENT_REVIEWS: usize = 8;

/// The verbs of `targets.dormant.dev`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    Get,
    List,
    Sleep,
    Wake,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Sleep => "sleep",
            Verb::Wake => "wake",
        }
    }
}

/// The name a target has in reviews.
pub fn review_name(t: &TargetRef) -> &str {
    &t.name
}

/// The 403 message: who may not do what, and what would allow it. It
/// names only what the caller asked about, so it says nothing of whether
/// that target exists.
pub fn denied(who: &Identity, verb: Verb, namespace: &str, name: Option<&str>) -> String {
    let what = match name {
        Some(n) => format!("{RESOURCE}.{GROUP} \"{n}\" in namespace \"{namespace}\""),
        None if namespace.is_empty() => format!("{RESOURCE}.{GROUP} at the cluster scope"),
        None => format!("{RESOURCE}.{GROUP} in namespace \"{namespace}\""),
    };
    let role = match verb {
        Verb::Get | Verb::List => "dormant-viewer (or view)",
        Verb::Sleep | Verb::Wake => "dormant-operator (or edit)",
    };
    format!(
        "{} may not {} {what}: a RoleBinding in that namespace to the ClusterRole {role} grants verb \"{}\" on resource \"{RESOURCE}\" in API group \"{GROUP}\"",
        who.user,
        verb.as_str(),
        verb.as_str()
    )
}

/// Which of `targets` a caller may see, from the answers to: may they
/// list targets everywhere, in each namespace, and get each target.
/// `get_each` is asked only about targets in namespaces they may not list.
pub fn visible(
    targets: &[TargetRef],
    list_everywhere: bool,
    list_in: &HashMap<String, bool>,
    get_each: &HashMap<TargetRef, bool>,
) -> Vec<TargetRef> {
    targets
        .iter()
        .filter(|t| {
            list_everywhere
                || list_in.get(&t.namespace).copied().unwrap_or(false)
                || get_each.get(*t).copied().unwrap_or(false)
        })
        .cloned()
        .collect()
}

pub struct Authorizer {
    client: Client,
    decisions: Mutex<HashMap<[u8; 32], (Instant, bool)>>,
}

impl Authorizer {
    pub fn new(client: Client) -> Self {
        Authorizer { client, decisions: Mutex::new(HashMap::new()) }
    }

    /// May `who` do `verb` on targets in `namespace` ("" for every
    /// namespace), named `name` (any when `None`)?
    pub async fn allowed(
        &self,
        who: &Identity,
        verb: Verb,
        namespace: &str,
        name: Option<&str>,
    ) -> Result<bool, kube::Error> {
        let key = decision_key(who, verb, namespace, name);
        let now = Instant::now();
        if let Some((at, allowed)) = self.lock().get(&key)
            && now.duration_since(*at) < DECISION_TTL
        {
            return Ok(*allowed);
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(who.user.clone()),
                uid: who.uid.clone(),
                groups: Some(who.groups.clone()),
                extra: (!who.extra.is_empty()).then(|| who.extra.clone()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(GROUP.into()),
                    resource: Some(RESOURCE.into()),
                    verb: Some(verb.as_str().into()),
                    namespace: (!namespace.is_empty()).then(|| namespace.to_string()),
                    name: name.map(String::from),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        let allowed = answer.status.is_some_and(|s| s.allowed && s.denied != Some(true));
        let mut decisions = self.lock();
        if decisions.len() >= DECISION_CAPACITY {
            decisions.retain(|_, (at, _)| now.duration_since(*at) < DECISION_TTL);
            if decisions.len() >= DECISION_CAPACITY {
                decisions.clear();
            }
        }
        decisions.insert(key, (now, allowed));
        Ok(allowed)
    }

    /// The targets `who` may see: all of them with `list` everywhere, those
    /// of each namespace where they may `list`, and each one they may `get`.
    pub async fn visible(
        &self,
        who: &Identity,
        targets: &[TargetRef],
    ) -> Result<Vec<TargetRef>, kube::Error> {
        if targets.is_empty() {
            return Ok(vec![]);
        }
        if self.allowed(who, Verb::List, "", None).await? {
            return Ok(targets.to_vec());
        }
        let namespaces: Vec<String> = {
            let mut n: Vec<String> = targets.iter().map(|t| t.namespace.clone()).collect();
            n.sort();
            n.dedup();
            n
        };
        let list_in: HashMap<String, bool> = futures::stream::iter(namespaces)
            .map(|ns| async move {
                let allowed = self.allowed(who, Verb::List, &ns, None).await;
                allowed.map(|a| (ns, a))
            })
            .buffer_unordered(CONCURRENT_REVIEWS)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        let rest: Vec<TargetRef> = targets
            .iter()
            .filter(|t| !list_in.get(&t.namespace).copied().unwrap_or(false))
            .cloned()
            .collect();
        let get_each: HashMap<TargetRef, bool> = futures::stream::iter(rest)
            .map(|t: TargetRef| async move {
                let allowed = self.allowed(who, Verb::Get, &t.namespace, Some(review_name(&t))).await;
                allowed.map(|a| (t, a))
            })
            .buffer_unordered(CONCURRENT_REVIEWS)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        Ok(visible(targets, false, &list_in, &get_each))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], (Instant, bool)>> {
        self.decisions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A digest of everything a review is about (who, with all their groups
/// and extras, and what): two reviews share an answer only when the API
/// server would be asked exactly the same.
fn decision_key(who: &Identity, verb: Verb, namespace: &str, name: Option<&str>) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut field = |s: &str| {
        ctx.update(&(s.len() as u64).to_le_bytes());
        ctx.update(s.as_bytes());
    };
    field(&who.user);
    field(who.uid.as_deref().unwrap_or(""));
    field(&who.groups.len().to_string());
    for g in &who.groups {
        field(g);
    }
    let extra: &BTreeMap<String, Vec<String>> = &who.extra;
    for (k, vs) in extra {
        field(k);
        field(&vs.len().to_string());
        for v in vs {
            field(v);
        }
    }
    field(verb.as_str());
    field(namespace);
    field(name.unwrap_or("\0any"));
    let d = ctx.finish();
    let mut k = [0u8; 32];
    k.copy_from_slice(d.as_ref());
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::authn::Via;

    fn who(user: &str, groups: &[&str]) -> Identity {
        Identity {
            user: user.into(),
            uid: None,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            extra: BTreeMap::new(),
            via: Via::Token,
        }
    }

    #[test]
    fn a_caller_sees_what_they_may_list_by_namespace_or_get_by_name() {
        let a1 = TargetRef::vcluster("team-a", "dev");
        let a2 = TargetRef::namespace("team-a");
        let b1 = TargetRef::vcluster("team-b", "ci");
        let b2 = TargetRef::vcluster("team-b", "qa");
        let all = [a1.clone(), a2.clone(), b1.clone(), b2.clone()];
        let none = HashMap::new();
        assert_eq!(visible(&all, true, &none, &HashMap::new()), all.to_vec());
        assert!(visible(&all, false, &none, &HashMap::new()).is_empty());
        let list_in = HashMap::from([("team-a".to_string(), true), ("team-b".to_string(), false)]);
        assert_eq!(visible(&all, false, &list_in, &HashMap::new()), vec![a1.clone(), a2.clone()]);
        let get_each = HashMap::from([(b2.clone(), true), (b1.clone(), false)]);
        assert_eq!(visible(&all, false, &list_in, &get_each), vec![a1, a2, b2]);
    }

    #[test]
    fn a_denial_says_who_what_and_which_role_grants_it_without_saying_whether_it_exists() {
        let m = denied(&who("bob", &["team-b"]), Verb::Sleep, "team-a", Some("dev"));
        assert_eq!(
            m,
            "bob may not sleep targets.dormant.dev \"dev\" in namespace \"team-a\": a RoleBinding in that namespace to the ClusterRole dormant-operator (or edit) grants verb \"sleep\" on resource \"targets\" in API group \"dormant.dev\""
        );
        assert!(denied(&who("bob", &[]), Verb::Get, "team-a", None).contains("dormant-viewer"));
        assert!(denied(&who("bob", &[]), Verb::List, "", None).contains("at the cluster scope"));
    }

    #[test]
    fn reviews_share_an_answer_only_when_everything_asked_is_the_same() {
        let alice = who("alice", &["team-a"]);
        let k = decision_key(&alice, Verb::Get, "team-a", Some("dev"));
        assert_eq!(k, decision_key(&alice.clone(), Verb::Get, "team-a", Some("dev")));
        let mut more = alice.clone();
        more.groups.push("admins".into());
        let mut extra = alice.clone();
        extra.extra.insert("scopes".into(), vec!["x".into()]);
        let split = who("alice", &["team", "-a"]);
        for other in [
            decision_key(&more, Verb::Get, "team-a", Some("dev")),
            decision_key(&extra, Verb::Get, "team-a", Some("dev")),
            decision_key(&split, Verb::Get, "team-a", Some("dev")),
            decision_key(&alice, Verb::Wake, "team-a", Some("dev")),
            decision_key(&alice, Verb::Get, "team-b", Some("dev")),
            decision_key(&alice, Verb::Get, "team-a", None),
            decision_key(&alice, Verb::Get, "team-adev", Some("")),
        ] {
            assert_ne!(k, other);
        }
    }
}
