//! Ignore rules: activity that must not keep a target awake (controllers,
//! GitOps pollers, health checks). Matching is a pure function of one
//! activity record.

use crate::vocab::IGNORED_USER_AGENT_MARK;

/// What ignore rules look at in a request: who made it, with what, and
/// what it touched. Activity records implement it; this module matches
/// them without knowing where they came from.
pub trait Request {
    fn user(&self) -> &str;
    fn groups(&self) -> &[String];
    fn user_agent(&self) -> &str;
    fn verb(&self) -> &str;
    /// `(group, resource, subresource, name)` for a resource request.
    fn resource(&self) -> Option<(&str, &str, &str, &str)>;
    /// The request path (what non-resource rules match).
    fn path(&self) -> &str;
}

/// Matches `*` as any run of characters (including none); every other
/// character literally.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    glob_match_by(pattern, text, |p, t| p == t)
}

/// [`glob_match`], ASCII letters compared without case.
pub fn glob_match_ignore_case(pattern: &str, text: &str) -> bool {
    glob_match_by(pattern, text, |p, t| p.eq_ignore_ascii_case(&t))
}

/// Byte-wise, without allocating (this runs for every rule on every
/// request and audit event). Byte-wise is the same as character-wise: `*`
/// is ASCII, and a UTF-8 literal never matches starting inside another
/// character. Greedy with backtracking to the last `*`: linear for one
/// star, O(len(p) * len(t)) at worst.
fn glob_match_by(pattern: &str, text: &str, eq: impl Fn(u8, u8) -> bool) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && eq(p[pi], t[ti]) {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

/// A resource rule, read like RBAC: `resource[/subresource][.group]`, each
/// part a glob. Without a group it matches the core group only (as
/// `kubectl get pods` means core pods). `pods` does not cover `pods/log`;
/// `pods/*` covers every subresource and `pods*` both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceRule {
    pub group: String,
    /// `resource` or `resource/subresource`.
    pub resource: String,
    /// Empty means any name.
    pub names: Vec<String>,
    /// Empty means any verb (vCluster Platform's `ignore-resource-verbs`
    /// names both a resource and its verbs).
    pub verbs: Vec<String>,
}

impl ResourceRule {
    /// Parses `pods`, `deployments.apps`, `leases.coordination.k8s.io`,
    /// `serviceaccounts/token`, `*.metrics.k8s.io`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (resource, group) = match s.split_once('.') {
            Some((r, g)) => (r, g),
            None => (s, ""),
        };
        if resource.is_empty() || resource.starts_with('/') || resource.ends_with('/') {
            return Err(format!("resource rule {s:?} is not of the form resource[/subresource][.group]"));
        }
        Ok(ResourceRule {
            group: group.to_string(),
            resource: resource.to_string(),
            names: vec![],
            verbs: vec![],
        })
    }

    fn matches(&self, group: &str, resource: &str, name: &str, verb: &str) -> bool {
        glob_match(&self.group, group)
            && glob_match(&self.resource, resource)
            && (self.names.is_empty() || self.names.iter().any(|n| glob_match(n, name)))
            && (self.verbs.is_empty() || self.verbs.iter().any(|v| glob_match(v, verb)))
    }

    /// The rule as written in annotations.
    pub fn pattern(&self) -> String {
        let mut p = self.resource.clone();
        if !self.group.is_empty() {
            p = format!("{p}.{}", self.group);
        }
        if !self.names.is_empty() {
            p = format!("{p} (names {})", self.names.join(","));
        }
        if !self.verbs.is_empty() {
            p = format!("{p} (verbs {})", self.verbs.join(","));
        }
        p
    }
}

/// Which kind of rule ignored an activity (a metric label and part of the
/// `explain` output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuleKind {
    User,
    Group,
    UserAgent,
    Verb,
    Resource,
    NonResourceUrl,
}

impl RuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::User => "user",
            RuleKind::Group => "group",
            RuleKind::UserAgent => "user-agent",
            RuleKind::Verb => "verb",
            RuleKind::Resource => "resource",
            RuleKind::NonResourceUrl => "non-resource-url",
        }
    }

    /// The metric label: the kind, prefixed `builtin-` for dormant's own rules.
    pub fn label(self, builtin: bool) -> &'static str {
        match (builtin, self) {
            (false, k) => k.as_str(),
            (true, RuleKind::User) => "builtin-user",
            (true, RuleKind::Group) => "builtin-group",
            (true, RuleKind::UserAgent) => "builtin-user-agent",
            (true, RuleKind::Verb) => "builtin-verb",
            (true, RuleKind::Resource) => "builtin-resource",
            (true, RuleKind::NonResourceUrl) => "builtin-non-resource-url",
        }
    }
}

/// Why an activity was ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    pub kind: RuleKind,
    pub pattern: String,
    /// True for dormant's built-in rules, false for the policy's.
    pub builtin: bool,
}

/// A set of ignore rules. Each list is independent: an activity is ignored
/// when any rule of any list matches it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IgnoreRules {
    pub users: Vec<String>,
    pub groups: Vec<String>,
    /// Matched case-insensitively.
    pub user_agents: Vec<String>,
    pub verbs: Vec<String>,
    pub resources: Vec<ResourceRule>,
    pub non_resource_urls: Vec<String>,
    /// Open upgraded connections (exec, port-forward, watch) do not keep the
    /// target awake.
    pub active_connections: bool,
    /// Requests by the target's own service accounts count (off by default:
    /// see [`own_service_account`]).
    pub count_own_service_accounts: bool,
}

/// True when `user`, reported by an API server's audit webhook, is one of
/// the target's own service accounts: on the host, one in the target's
/// namespace; inside a vcluster (`in_vcluster`), any. That is the target's
/// own workloads calling the API (operators watching, apps reading their
/// ConfigMaps, leader election): they run while it is awake and stop when
/// it sleeps, so they are not anybody using it, and would otherwise keep
/// it awake for ever. Someone else's use through dormant's proxy is never
/// matched here.
pub fn own_service_account(user: &str, namespace: &str, in_vcluster: bool) -> bool {
    match user.strip_prefix("system:serviceaccount:") {
        Some(_) if in_vcluster => true,
        Some(rest) => rest.split_once(':').is_some_and(|(ns, _)| ns == namespace),
        None => false,
    }
}

impl IgnoreRules {
    /// What a policy adds to the built-in rules, in one line for people
    /// (`explain`, the API and the page).
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        for (k, v) in [
            ("users", &self.users),
            ("groups", &self.groups),
            ("userAgents", &self.user_agents),
            ("verbs", &self.verbs),
            ("nonResourceURLs", &self.non_resource_urls),
        ] {
            if !v.is_empty() {
                parts.push(format!("{k}: {}", v.join(",")));
            }
        }
        if !self.resources.is_empty() {
            let patterns: Vec<String> = self.resources.iter().map(|r| r.pattern()).collect();
            parts.push(format!("resources: {}", patterns.join(",")));
        }
        if self.active_connections {
            parts.push("activeConnections".to_string());
        }
        if self.count_own_service_accounts {
            parts.push("ownServiceAccounts: false (they count)".to_string());
        }
        if parts.is_empty() { "built-in rules only".to_string() } else { parts.join("; ") }
    }

    /// The rules every target gets, so that the cluster's own machinery
    /// never keeps a target awake: dormant itself, the control plane's
    /// controllers and nodes, kube-system service accounts, bookkeeping
    /// resources, and health and version probes.
    pub fn builtin(agent_users: &[String]) -> IgnoreRules {
        let mut users: Vec<String> = agent_users.to_vec();
        users.extend(
            [
                "system:kube-controller-manager",
                "system:kube-scheduler",
                "system:kube-proxy",
                "system:apiserver",
                "system:cloud-controller-manager",
                // k3s's own components (a k3s host, or a k3s-based vcluster's
                // API server reporting to dormant).
                "system:k3s-controller",
                "system:k3s-supervisor",
                "k3s-cloud-controller-manager",
                "system:serviceaccount:kube-system:*",
                "system:node:*",
                "system:anonymous",
                // A vcluster's syncer talks to the host API all the time.
                "system:serviceaccount:*:vc-*",
            ]
            .map(String::from),
        );
        IgnoreRules {
            users,
            groups: vec!["system:nodes".into()],
            user_agents: ["dormant/*".to_string(), format!("*{IGNORED_USER_AGENT_MARK}")]
                .into_iter()
                .chain(HEALTH_CHECKERS.iter().map(|s| s.to_string()))
                .collect(),
            verbs: vec![],
            resources: [
                "leases.coordination.k8s.io",
                "events",
                "events.events.k8s.io",
                "tokenreviews.authentication.k8s.io",
                "subjectaccessreviews.authorization.k8s.io",
                "selfsubjectaccessreviews.authorization.k8s.io",
                "selfsubjectrulesreviews.authorization.k8s.io",
                "localsubjectaccessreviews.authorization.k8s.io",
                "serviceaccounts/token",
            ]
            .iter()
            .filter_map(|r| ResourceRule::parse(r).ok())
            .collect(),
            non_resource_urls: ["/healthz*", "/livez*", "/readyz*", "/version", "/version/", "/metrics"]
                .map(String::from)
                .to_vec(),
            active_connections: false,
            count_own_service_accounts: false,
        }
    }

    /// The first rule that ignores `a`, if any.
    pub fn matches(&self, a: &(impl Request + ?Sized)) -> Option<Ignored> {
        let hit = |kind, pattern: &String| Some(Ignored { kind, pattern: pattern.clone(), builtin: false });
        if let Some(p) = self.users.iter().find(|p| glob_match(p, a.user())) {
            return hit(RuleKind::User, p);
        }
        if let Some(p) = self.groups.iter().find(|p| a.groups().iter().any(|g| glob_match(p, g))) {
            return hit(RuleKind::Group, p);
        }
        if let Some(p) = self.user_agents.iter().find(|p| glob_match_ignore_case(p, a.user_agent())) {
            return hit(RuleKind::UserAgent, p);
        }
        if let Some(p) = self.verbs.iter().find(|p| glob_match(p, a.verb())) {
            return hit(RuleKind::Verb, p);
        }
        match a.resource() {
            Some((group, resource, subresource, name)) => {
                let resource: std::borrow::Cow<'_, str> = if subresource.is_empty() {
                    resource.into()
                } else {
                    format!("{resource}/{subresource}").into()
                };
                if let Some(rule) =
                    self.resources.iter().find(|rule| rule.matches(group, &resource, name, a.verb()))
                {
                    return Some(Ignored {
                        kind: RuleKind::Resource,
                        pattern: rule.pattern(),
                        builtin: false,
                    });
                }
            }
            None => {
                if let Some(p) = self.non_resource_urls.iter().find(|p| glob_match(p, a.path())) {
                    return hit(RuleKind::NonResourceUrl, p);
                }
            }
        }
        None
    }
}

/// Health checkers and uptime monitors, by user agent (matched without
/// case): their requests to an app (through the app-traffic listener) are
/// nobody using it. Load balancers' and probes' own (kubelet, Google Cloud,
/// AWS, Route 53, Envoy, Consul), Prometheus and its blackbox exporter, and
/// the common uptime services. A policy's `ignore.userAgents` adds more.
pub const HEALTH_CHECKERS: &[&str] = &[
    "kube-probe/*",
    "GoogleHC/*",
    "ELB-HealthChecker/*",
    "Amazon-Route53-Health-Check-Service*",
    "Envoy/HC",
    "Consul Health Check*",
    "Prometheus/*",
    "Blackbox Exporter/*",
    "*UptimeRobot/*",
    "*Pingdom.com_bot*",
    "*StatusCake*",
    "*Site24x7*",
    "*Better Uptime Bot*",
    "Uptime-Kuma/*",
    "*DatadogSynthetics*",
    "*NewRelicSynthetics*",
    "*Checkly*",
];

/// Argo CD's and Flux's controllers, whose requests never count as use:
/// their polls and syncs are not anybody using the target (a sync while
/// asleep is applied at wake, by the controller itself). Service accounts
/// as their install manifests name them, in any namespace; user agents as
/// their Kubernetes clients send them (`<binary>/<version> …`), which also
/// covers Flux impersonating a tenant's service account. Argo CD's server
/// (`argocd-server`) is left out on purpose: its requests are a person
/// using the UI (logs, exec, a resource's live manifest).
pub const GITOPS_USERS: &[&str] = &[
    "system:serviceaccount:*:argocd-application-controller",
    "system:serviceaccount:*:argocd-applicationset-controller",
    "system:serviceaccount:*:kustomize-controller",
    "system:serviceaccount:*:helm-controller",
    "system:serviceaccount:*:source-controller",
    "system:serviceaccount:*:notification-controller",
    "system:serviceaccount:*:image-reflector-controller",
    "system:serviceaccount:*:image-automation-controller",
];

/// See [`GITOPS_USERS`].
pub const GITOPS_USER_AGENTS: &[&str] = &[
    "argocd-application-controller/*",
    "argocd-applicationset-controller/*",
    "kustomize-controller/*",
    "helm-controller/*",
    "source-controller/*",
    "notification-controller/*",
    "image-reflector-controller/*",
    "image-automation-controller/*",
];

/// Adds the GitOps controllers to a rule set (the built-in rules, so they
/// apply by default; a flag can leave them out).
pub fn add_gitops_rules(rules: &mut IgnoreRules) {
    rules.users.extend(GITOPS_USERS.iter().map(|s| s.to_string()));
    rules.user_agents.extend(GITOPS_USER_AGENTS.iter().map(|s| s.to_string()));
}

/// The built-in rules, then the policy's: the first that matches wins.
pub fn ignored_by(
    builtin: &IgnoreRules,
    policy: &IgnoreRules,
    a: &(impl Request + ?Sized),
) -> Option<Ignored> {
    builtin.matches(a).map(|i| Ignored { builtin: true, ..i }).or_else(|| policy.matches(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request as the rules see it.
    #[derive(Debug, Clone)]
    struct Req {
        user: String,
        groups: Vec<String>,
        user_agent: String,
        verb: String,
        resource: Option<(String, String, String, String)>,
        path: String,
    }

    impl Request for Req {
        fn user(&self) -> &str {
            &self.user
        }
        fn groups(&self) -> &[String] {
            &self.groups
        }
        fn user_agent(&self) -> &str {
            &self.user_agent
        }
        fn verb(&self) -> &str {
            &self.verb
        }
        fn resource(&self) -> Option<(&str, &str, &str, &str)> {
            self.resource.as_ref().map(|(g, r, s, n)| (g.as_str(), r.as_str(), s.as_str(), n.as_str()))
        }
        fn path(&self) -> &str {
            &self.path
        }
    }

    impl Req {
        fn summary(&self) -> String {
            format!("{} {} {:?} ({})", self.user, self.verb, self.resource, self.user_agent)
        }
    }

    fn activity(
        user: &str,
        groups: &[&str],
        ua: &str,
        verb: &str,
        res: Option<(&str, &str, &str, &str)>,
    ) -> Req {
        Req {
            user: user.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            user_agent: ua.into(),
            verb: verb.into(),
            resource: res.map(|(g, r, s, n)| (g.into(), r.into(), s.into(), n.into())),
            path: res.map_or("/healthz".to_string(), |_| "/api/v1/namespaces/team-a/pods".to_string()),
        }
    }

    #[test]
    fn globs_match_stars_anywhere() {
        for (p, t, want) in [
            ("*", "", true),
            ("*", "anything", true),
            ("argocd*", "argocd-application-controller/v2", true),
            ("*controller*", "argocd-application-controller/v2", true),
            ("system:serviceaccount:kube-system:*", "system:serviceaccount:kube-system:job-controller", true),
            ("system:serviceaccount:kube-system:*", "system:serviceaccount:team-a:ci", false),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("", "", true),
            ("", "x", false),
            ("**", "x", true),
            ("kübectl*", "kübectl/v1", true),
            ("*ö", "aö", true),
            ("*ö", "aó", false),
            ("ö*", "öü", true),
        ] {
            assert_eq!(glob_match(p, t), want, "{p} vs {t}");
        }
        assert!(glob_match_ignore_case("ArgoCD*", "argocd-application-controller/v2"));
        assert!(!glob_match("ArgoCD*", "argocd-application-controller/v2"));
    }

    /// The obvious recursive matcher over characters: the reference the
    /// byte-wise one must agree with.
    fn reference(p: &[char], t: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('*', rest)) => (0..=t.len()).any(|i| reference(rest, &t[i..])),
            Some((c, rest)) => t.first() == Some(c) && reference(rest, &t[1..]),
        }
    }

    proptest::proptest! {
        #[test]
        fn globs_agree_with_the_character_wise_reference(p in "[ab*ö]{0,8}", t in "[abö]{0,10}") {
            let (pc, tc): (Vec<char>, Vec<char>) = (p.chars().collect(), t.chars().collect());
            proptest::prop_assert_eq!(glob_match(&p, &t), reference(&pc, &tc), "{} vs {}", p, t);
        }
    }

    #[test]
    fn resource_rules_parse_group_and_name() {
        assert_eq!(
            ResourceRule::parse("deployments.apps").unwrap(),
            ResourceRule {
                group: "apps".into(),
                resource: "deployments".into(),
                names: vec![],
                verbs: vec![]
            }
        );
        assert_eq!(
            ResourceRule::parse("leases.coordination.k8s.io").unwrap(),
            ResourceRule {
                group: "coordination.k8s.io".into(),
                resource: "leases".into(),
                names: vec![],
                verbs: vec![]
            }
        );
        assert_eq!(
            ResourceRule::parse("pods/log").unwrap(),
            ResourceRule { group: "".into(), resource: "pods/log".into(), names: vec![], verbs: vec![] }
        );
        assert!(ResourceRule::parse(".apps").is_err());
        assert!(ResourceRule::parse("pods/").is_err());
    }

    #[test]
    fn a_resource_rule_with_verbs_ignores_only_those_verbs_on_that_resource() {
        let rules = IgnoreRules {
            resources: vec![ResourceRule {
                verbs: vec!["create".into(), "update".into()],
                ..ResourceRule::parse("configmaps").unwrap()
            }],
            ..IgnoreRules::default()
        };
        let cm = Some(("", "configmaps", "", "settings"));
        assert_eq!(
            rules.matches(&activity("bob", &[], "kubectl", "create", cm)).map(|i| i.kind),
            Some(RuleKind::Resource)
        );
        assert_eq!(
            rules.matches(&activity("bob", &[], "kubectl", "update", cm)).map(|i| i.pattern),
            Some("configmaps (verbs create,update)".to_string())
        );
        assert_eq!(rules.matches(&activity("bob", &[], "kubectl", "get", cm)), None, "another verb counts");
        assert_eq!(
            rules.matches(&activity("bob", &[], "kubectl", "create", Some(("", "secrets", "", "x")))),
            None
        );
    }

    #[test]
    fn own_service_accounts_are_the_namespaces_on_the_host_and_all_inside_a_vcluster() {
        for (user, ns, in_vcluster, own) in [
            ("system:serviceaccount:team-a:operator", "team-a", false, true),
            ("system:serviceaccount:team-b:ci", "team-a", false, false),
            ("system:serviceaccount:team-ab:x", "team-a", false, false),
            ("system:serviceaccount:team-a", "team-a", false, false),
            ("alice", "team-a", false, false),
            ("system:serviceaccount:default:app", "team-a", true, true),
            ("alice", "team-a", true, false),
        ] {
            assert_eq!(
                own_service_account(user, ns, in_vcluster),
                own,
                "{user} in {ns} (vcluster: {in_vcluster})"
            );
        }
    }

    #[test]
    fn each_kind_of_rule_ignores_what_it_names_and_nothing_else() {
        let rules = IgnoreRules {
            users: vec!["system:serviceaccount:argocd:*".into()],
            groups: vec!["monitoring".into()],
            user_agents: vec!["ArgoCD*".into(), "argocd-application-controller/*".into()],
            verbs: vec!["watch".into()],
            resources: vec![
                ResourceRule::parse("configmaps").unwrap(),
                ResourceRule::parse("*.metrics.k8s.io").unwrap(),
            ],
            non_resource_urls: vec!["/openapi/*".into()],
            active_connections: false,
            count_own_service_accounts: false,
        };
        let pods = Some(("", "pods", "", "web-0"));
        let table: Vec<(Req, Option<RuleKind>)> = vec![
            (activity("alice", &["team-a"], "kubectl/v1.37.2", "list", pods), None),
            (activity("system:serviceaccount:argocd:app", &[], "x", "get", pods), Some(RuleKind::User)),
            (activity("bob", &["monitoring"], "x", "get", pods), Some(RuleKind::Group)),
            (
                activity("bob", &[], "argocd-application-controller/v2.14.9", "get", pods),
                Some(RuleKind::UserAgent),
            ),
            (activity("bob", &[], "argocd-server/v2", "get", pods), Some(RuleKind::UserAgent)),
            (activity("bob", &[], "kubectl", "watch", pods), Some(RuleKind::Verb)),
            (
                activity("bob", &[], "kubectl", "get", Some(("", "configmaps", "", "x"))),
                Some(RuleKind::Resource),
            ),
            (activity("bob", &[], "kubectl", "get", Some(("apps", "configmaps", "", "x"))), None),
            (
                activity("bob", &[], "kubectl", "list", Some(("metrics.k8s.io", "pods", "", ""))),
                Some(RuleKind::Resource),
            ),
            (activity("bob", &[], "kubectl", "get", Some(("", "pods", "log", "web-0"))), None),
            (activity("bob", &[], "kubectl", "get", None), None),
        ];
        for (a, want) in table {
            assert_eq!(rules.matches(&a).map(|i| i.kind), want, "{}", a.summary());
        }
        let mut openapi = activity("bob", &[], "kubectl", "get", None);
        openapi.path = "/openapi/v3".into();
        assert_eq!(rules.matches(&openapi).map(|i| i.kind), Some(RuleKind::NonResourceUrl));
    }

    #[test]
    fn builtin_rules_ignore_the_control_plane_and_dormant_but_not_people() {
        let builtin = IgnoreRules::builtin(&["system:serviceaccount:dormant:dormant".to_string()]);
        let none = IgnoreRules::default();
        let pods = Some(("", "pods", "", ""));
        for (a, ignored) in [
            (activity("alice", &["team-a", "system:authenticated"], "kubectl/v1.37.2", "list", pods), false),
            (activity("system:serviceaccount:dormant:dormant", &[], "dormant/0.1", "patch", pods), true),
            (activity("system:kube-controller-manager", &[], "kcm", "list", pods), true),
            (
                activity(
                    "system:serviceaccount:kube-system:replicaset-controller",
                    &[],
                    "kcm",
                    "create",
                    pods,
                ),
                true,
            ),
            (activity("system:node:n1", &["system:nodes"], "kubelet", "get", pods), true),
            (activity("system:k3s-controller", &[], "k3s/v1.33.1+k3s1", "watch", pods), true),
            (
                activity("alice", &[], "kubectl", "update", Some(("coordination.k8s.io", "leases", "", "x"))),
                true,
            ),
            (activity("alice", &[], "kubectl", "create", Some(("", "events", "", ""))), true),
            (
                activity(
                    "alice",
                    &[],
                    "kubectl",
                    "create",
                    Some(("", "serviceaccounts", "token", "default")),
                ),
                true,
            ),
            (activity("alice", &[], "kubectl", "get", Some(("", "serviceaccounts", "", "default"))), false),
            (activity("alice", &[], "kubectl", "get", None), true),
        ] {
            assert_eq!(ignored_by(&builtin, &none, &a).is_some(), ignored, "{}", a.summary());
        }
    }

    #[test]
    fn gitops_controllers_never_count_as_use_but_people_and_argocd_server_do() {
        let mut rules = IgnoreRules::default();
        add_gitops_rules(&mut rules);
        let a = |user: &str, ua: &str| activity(user, &[], ua, "list", None);
        for (user, ua, ignored) in [
            ("system:serviceaccount:argocd:argocd-application-controller", "x", true),
            ("system:serviceaccount:flux-system:kustomize-controller", "x", true),
            (
                "system:serviceaccount:team-a:deployer",
                "kustomize-controller/v1.5.1 (linux/amd64) kubernetes/$Format",
                true,
            ),
            ("system:serviceaccount:gitops:helm-controller", "x", true),
            ("alice", "argocd-application-controller/v2.14.9 (linux/amd64)", true),
            ("system:serviceaccount:argocd:argocd-server", "argocd-server/v2.14.9", false),
            ("alice", "kubectl/v1.33.1 (linux/amd64) kubernetes/8adc0f0", false),
        ] {
            assert_eq!(rules.matches(&a(user, ua)).is_some(), ignored, "{user} {ua}");
        }
    }
}
