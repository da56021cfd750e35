//! Which namespaces dormant may act in: never the excluded ones (the
//! control plane's, dormant's own); when an allow-list is set, only the
//! namespaces it names (the ones the chart's RBAC grants writes in, so
//! dormant never tries to act where it would be refused); and, when a
//! namespace selector is set, only namespaces whose labels match it (to run
//! one agent per shard of a cluster, or to try dormant on a few namespaces
//! first).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use kube::core::{Expression, Selector, SelectorExt};

#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub excluded: HashSet<String>,
    pub selector: Option<Selector>,
    /// The only namespaces that may hold targets (`None`: every one).
    pub only: Option<BTreeSet<String>>,
    /// Read vCluster Platform's `sleepmode.loft.sh/*` settings under
    /// dormant's own (`--vcluster-platform-annotations`): a namespace that
    /// carries them is a target, and they fill what dormant's leave unset.
    pub platform_annotations: bool,
}

impl Scope {
    pub fn allows(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        !self.excluded.contains(namespace)
            && self.only.as_ref().is_none_or(|only| only.contains(namespace))
            && self.selector.as_ref().is_none_or(|s| s.matches(labels))
    }
}

impl Scope {
    /// The scope the namespace flags give (`--namespaces`,
    /// `--namespace-selector`, `--exclude-namespaces`), as `restore`
    /// takes them from the chart's hook; the agent's settings build
    /// theirs with more checks (see `agent::settings`).
    pub fn from_flags(only: &[String], selector: Option<&str>, excluded: &[String]) -> Result<Scope, String> {
        Ok(Scope {
            excluded: namespace_names(excluded),
            selector: selector
                .map(parse_selector)
                .transpose()
                .map_err(|e| format!("--namespace-selector: {e}"))?,
            only: Some(namespace_names::<BTreeSet<_>>(only)).filter(|o| !o.is_empty()),
            platform_annotations: false,
        })
    }
}

/// Namespace names as a comma-separated flag gives them: trimmed, blanks
/// dropped.
pub fn namespace_names<C: FromIterator<String>>(flag: &[String]) -> C {
    flag.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}

/// Parses a label selector as kubectl reads `-l`: `a=b`, `a==b`, `a!=b`,
/// `a`, `!a`, `a in (x,y)`, `a notin (x,y)`, joined by commas.
pub fn parse_selector(s: &str) -> Result<Selector, String> {
    let mut parts = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    parts.push(cur);
    let mut exprs = Vec::new();
    for p in parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        let bad = || format!("invalid selector requirement {p:?}");
        let set = |v: &str| -> Result<BTreeSet<String>, String> {
            let inner = v.trim().strip_prefix('(').and_then(|v| v.strip_suffix(')')).ok_or_else(bad)?;
            Ok(inner.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect())
        };
        let key_ok = |k: &str| !k.is_empty() && !k.contains(char::is_whitespace);
        let e = if let Some((k, v)) = p.split_once(" notin ") {
            Expression::NotIn(k.trim().into(), set(v)?)
        } else if let Some((k, v)) = p.split_once(" in ") {
            Expression::In(k.trim().into(), set(v)?)
        } else if let Some((k, v)) = p.split_once("!=") {
            Expression::NotEqual(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
            Expression::Equal(k.trim().into(), v.trim().into())
        } else if let Some(k) = p.strip_prefix('!') {
            Expression::DoesNotExist(k.trim().into())
        } else {
            Expression::Exists(p.into())
        };
        let key = match &e {
            Expression::In(k, _)
            | Expression::NotIn(k, _)
            | Expression::Equal(k, _)
            | Expression::NotEqual(k, _)
            | Expression::Exists(k)
            | Expression::DoesNotExist(k) => k,
        };
        if !key_ok(key) {
            return Err(bad());
        }
        exprs.push(e);
    }
    Ok(Selector::from_iter(exprs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_namespace_flags_make_the_scope_restore_acts_in() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let scope = Scope::from_flags(&s(&[" a ", "", "b"]), Some("team=x"), &s(&["dormant", " "])).unwrap();
        assert!(scope.allows("a", &labels(&[("team", "x")])));
        assert!(!scope.allows("a", &labels(&[("team", "y")])));
        assert!(!scope.allows("c", &labels(&[("team", "x")])));
        assert!(!scope.allows("dormant", &labels(&[("team", "x")])));
        // No flags: every namespace.
        assert!(Scope::from_flags(&[], None, &[]).unwrap().allows("any", &labels(&[])));
        let bad = Scope::from_flags(&[], Some("a in (x"), &[]).unwrap_err();
        assert!(bad.starts_with("--namespace-selector:"), "{bad}");
    }

    #[test]
    fn selectors_read_like_kubectl() {
        let s = parse_selector("env in (dev, staging),team,!frozen,tier!=critical").unwrap();
        assert!(s.matches(&labels(&[("env", "dev"), ("team", "a")])));
        assert!(!s.matches(&labels(&[("env", "prod"), ("team", "a")])));
        assert!(!s.matches(&labels(&[("env", "dev")])));
        assert!(!s.matches(&labels(&[("env", "dev"), ("team", "a"), ("frozen", "")])));
        assert!(!s.matches(&labels(&[("env", "dev"), ("team", "a"), ("tier", "critical")])));
        assert!(parse_selector("a=b").unwrap().matches(&labels(&[("a", "b")])));
        assert!(parse_selector("a in x").is_err());
        assert!(parse_selector("bad key=1").is_err());
    }

    #[test]
    fn an_allow_list_admits_only_its_namespaces_and_never_an_excluded_one() {
        let scope = Scope {
            excluded: HashSet::from(["kube-system".to_string()]),
            selector: Some(parse_selector("team").unwrap()),
            only: Some(BTreeSet::from(["team-a".to_string(), "kube-system".to_string()])),
            platform_annotations: false,
        };
        let team = labels(&[("team", "a")]);
        assert!(scope.allows("team-a", &team));
        assert!(!scope.allows("team-b", &team), "a namespace the allow-list does not name");
        assert!(!scope.allows("kube-system", &team), "excluded wins over the allow-list");
        assert!(!scope.allows("team-a", &labels(&[])), "the selector still applies");
        assert!(Scope::default().allows("anything", &labels(&[])));
    }
}
