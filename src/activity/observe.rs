//! The one way activity enters dormant: an observed use of a target is
//! judged — a request nobody authenticated, a vcluster's syncer, a target's
//! own service accounts, the built-in ignore rules and the target's
//! effective policy's — counted in the metrics, and, unless ignored,
//! queued for the ledger. The audit webhook and the proxy both report
//! through here, and nothing else decides whether a use counts.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::ledger::{Ledger, MAX_SOURCES};
use super::{Activity, Source};
use prometheus_client::metrics::counter::Counter;

use crate::metrics::{ActivityLabels, Metrics, SourceLabels};
use crate::policy::Defaults;
use crate::policy::ignore::{IgnoreRules, ignored_by, own_service_account};
use crate::target::effective::effective;
use crate::target::{Scope, Stores, TargetRef};

/// Per-target ignore rules from the effective policy, resolved from the
/// stores and cached for a few seconds (so receivers never resolve a policy
/// per event, and a policy change applies within the TTL).
pub struct RulesCache {
    stores: Stores,
    defaults: Defaults,
    scope: Scope,
    ttl: Duration,
    cache: RwLock<HashMap<TargetRef, (Instant, Arc<IgnoreRules>)>>,
}

impl RulesCache {
    pub fn new(stores: Stores, defaults: Defaults, scope: Scope, ttl: Duration) -> Self {
        RulesCache { stores, defaults, scope, ttl, cache: RwLock::new(HashMap::new()) }
    }

    /// The policy's ignore rules for `t`: none beyond the built-in ones
    /// when it has no valid policy (see [`crate::target::effective`]).
    pub fn get(&self, t: &TargetRef) -> Arc<IgnoreRules> {
        if let Some((at, rules)) = self.cache.read().unwrap_or_else(|e| e.into_inner()).get(t)
            && at.elapsed() < self.ttl
        {
            return rules.clone();
        }
        let rules = match effective(&self.stores, &self.defaults, &self.scope, t) {
            Ok(Some(g)) => g.policy.ignore.value,
            Ok(None) | Err(_) => IgnoreRules::default(),
        };
        let rules = Arc::new(rules);
        self.cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(t.clone(), (Instant::now(), rules.clone()));
        rules
    }
}

/// What happened to an observed activity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Counted,
    /// Ignored, by the rule its metric label names.
    Ignored(&'static str),
    /// Counted, but the ledger's queue was full.
    Dropped,
}

/// Filters, counts and records activity.
pub struct Observer {
    pub ledger: Ledger,
    pub builtin: IgnoreRules,
    pub rules: RulesCache,
    pub metrics: Arc<Metrics>,
    sources: SourceCounters,
    /// Name users in the metric's `source` label; else only their tool.
    user_names: bool,
}

/// The "who keeps it awake" counters, by target and source: at most
/// [`MAX_SOURCES`] sources per target get their own series (the rest count
/// as [`OTHER_SOURCES`]), so a busy target cannot grow the metric without
/// bound; and a request finds its counter without allocating.
#[derive(Default)]
struct SourceCounters(RwLock<HashMap<TargetRef, HashMap<String, Counter>>>);

/// The `rule` label of a request its API server could not authenticate
/// (401): an expired CI token polling forever must not keep a target awake.
pub const UNAUTHENTICATED: &str = "unauthenticated";

/// The `rule` label of a request its API server refused to authorize
/// (403): any pod's token can ask for any namespace's objects, and must
/// not keep them awake without a right to them.
pub const FORBIDDEN: &str = "forbidden";

/// The `rule` label of a request its API server did not serve: throttled
/// (429) or failed (5xx). Nothing says who asked, or that anyone was let in.
pub const NOT_SERVED: &str = "not-served";

/// Why a request answered `code` is nobody's use, as a `rule` label; `None`
/// for an answer that shows an authenticated, authorized caller got
/// through (any 1xx-4xx but 401, 403 and 429).
pub fn refused_by_answer(code: u16) -> Option<&'static str> {
    match code {
        401 => Some(UNAUTHENTICATED),
        403 => Some(FORBIDDEN),
        429 | 500.. => Some(NOT_SERVED),
        _ => None,
    }
}

/// The `rule` label of events posted for a vcluster dormant does not know
/// (a typo in the webhook's path, a vcluster not yet or no longer there).
pub const UNKNOWN_VCLUSTER: &str = "unknown-vcluster";

/// The `rule` label of a vcluster syncer's requests to its own API server.
pub const VCLUSTER_SYNCER: &str = "builtin-vcluster-syncer";

/// The `rule` label of requests by a target's own service accounts (see
/// [`crate::policy::ignore::own_service_account`]).
pub const OWN_SERVICE_ACCOUNT: &str = "own-service-account";

/// The metric's source label for sources past [`MAX_SOURCES`] of a target.
pub const OTHER_SOURCES: &str = "(other sources)";

impl SourceCounters {
    fn counter(&self, metrics: &Metrics, t: &TargetRef, who: &str) -> Counter {
        if let Some(c) = self.0.read().unwrap_or_else(|e| e.into_inner()).get(t).and_then(|m| m.get(who)) {
            return c.clone();
        }
        let mut all = self.0.write().unwrap_or_else(|e| e.into_inner());
        let known = all.entry(t.clone()).or_default();
        if let Some(c) = known.get(who) {
            return c.clone();
        }
        let label = if known.len() < MAX_SOURCES { who } else { OTHER_SOURCES };
        let c = metrics
            .activity_sources
            .get_or_create(&SourceLabels {
                target: t.to_string(),
                namespace: t.namespace.clone(),
                source: label.to_string(),
            })
            .clone();
        if known.len() < MAX_SOURCES {
            known.insert(who.to_string(), c.clone());
        }
        c
    }
}

impl Observer {
    /// Drops what is kept for targets that no longer exist (`exists` says
    /// false): their "who keeps it awake" series and counters and their
    /// ledger entry. Every replica keeps these, not only the leader, and
    /// short-lived namespaces (a CI preview a day) would otherwise grow the
    /// metric and the agent's memory for as long as it runs.
    pub fn sweep(&self, exists: impl Fn(&TargetRef) -> bool) {
        let gone: Vec<(TargetRef, Vec<String>)> = {
            let mut all = self.sources.0.write().unwrap_or_else(|e| e.into_inner());
            let gone: Vec<TargetRef> = all.keys().filter(|t| !exists(t)).cloned().collect();
            gone.into_iter()
                .filter_map(|t| all.remove(&t).map(|known| (t, known.into_keys().collect())))
                .collect()
        };
        for (t, sources) in gone {
            for source in sources.into_iter().chain([OTHER_SOURCES.to_string()]) {
                self.metrics.activity_sources.remove(&SourceLabels {
                    target: t.to_string(),
                    namespace: t.namespace.clone(),
                    source,
                });
            }
        }
        self.ledger.retain(&exists);
        self.rules.cache.write().unwrap_or_else(|e| e.into_inner()).retain(|t, _| exists(t));
    }

    pub fn new(ledger: Ledger, builtin: IgnoreRules, rules: RulesCache, metrics: Arc<Metrics>) -> Self {
        Observer { ledger, builtin, rules, metrics, sources: SourceCounters::default(), user_names: false }
    }

    /// Names users in `dormant_activity_sources_total`'s `source` label
    /// (`alice (kubectl)`), not only their tool (`(kubectl)`). Off by
    /// default: `/metrics` needs no credential, and user names (some of
    /// them chosen by whoever sends a request) are nobody's business there.
    /// The target's `activity-sources` annotation, behind RBAC, always
    /// names them.
    pub fn with_user_names(mut self, on: bool) -> Self {
        self.user_names = on;
        self
    }

    /// Decides whether `a` counts for `t`, and records it if so.
    /// The proxy passes an `Arc` it keeps (a held request wakes the target
    /// with it); the audit receiver passes one `Arc` for every target an
    /// event is attributed to.
    pub fn observe<A>(&self, t: &TargetRef, a: A) -> Outcome
    where
        A: AsRef<Activity> + Into<Arc<Activity>>,
    {
        match self.judge(t, a.as_ref()) {
            Some(rule) => Outcome::Ignored(rule),
            None => self.record(t, a),
        }
    }

    /// Why `a` is nobody's use of `t`, as the `rule` metric label, if it is
    /// not (counted in the metrics); `None` for a use to
    /// [`record`](Self::record). In this order:
    /// - [`UNAUTHENTICATED`], [`FORBIDDEN`], [`NOT_SERVED`]: its API
    ///   server could not tell who made it (401, or audited with no user: an
    ///   expired CI token polling for ever must not keep a target awake),
    ///   refused it (403), or did not serve it (see [`refused_by_answer`]);
    /// - [`VCLUSTER_SYNCER`]: a vcluster's syncer or its start-up deployer,
    ///   reported by the vcluster's own audit webhook;
    /// - [`OWN_SERVICE_ACCOUNT`]: reported by an audit webhook, made by one
    ///   of the target's own service accounts (its workloads), unless its
    ///   policy counts them;
    /// - the built-in ignore rules, then the target's policy's.
    pub fn judge(&self, t: &TargetRef, a: &Activity) -> Option<&'static str> {
        let rule = if a.user.is_empty() {
            UNAUTHENTICATED
        } else if let Some(rule) = a.code.and_then(refused_by_answer) {
            rule
        } else if a.source == Source::Audit && a.in_vcluster && from_vcluster_itself(&a.user, &a.user_agent) {
            VCLUSTER_SYNCER
        } else {
            let rules = self.rules.get(t);
            if a.source == Source::Audit
                && !rules.count_own_service_accounts
                && own_service_account(&a.user, &t.namespace, a.in_vcluster)
            {
                OWN_SERVICE_ACCOUNT
            } else {
                let ignored = ignored_by(&self.builtin, &rules, a)?;
                ignored.kind.label(ignored.builtin)
            }
        };
        self.turn_away(a.source, rule);
        Some(rule)
    }

    /// A request that is nobody's use of any target ([`UNKNOWN_VCLUSTER`],
    /// or [`UNAUTHENTICATED`] once the proxy sees its answer): counted in
    /// metrics only, as ignored by `rule`.
    pub fn turn_away(&self, source: Source, rule: &'static str) {
        let labels = ActivityLabels { source: source.as_str(), outcome: "ignored", rule };
        self.metrics.activity.get_or_create(&labels).inc();
    }

    /// Records activity that [`judge`](Self::judge) let through.
    pub fn record<A>(&self, t: &TargetRef, a: A) -> Outcome
    where
        A: AsRef<Activity> + Into<Arc<Activity>>,
    {
        let source = a.as_ref().source.as_str();
        self.metrics.activity.get_or_create(&ActivityLabels { source, outcome: "counted", rule: "" }).inc();
        let who = a.as_ref().who();
        if self.user_names {
            self.sources.counter(&self.metrics, t, &who).inc();
        } else {
            let tool = format!("({})", short_agent(&a.as_ref().user_agent));
            self.sources.counter(&self.metrics, t, &tool).inc();
        }
        if self.ledger.record_from(t.clone(), a, who) {
            Outcome::Counted
        } else {
            self.metrics.activity_dropped.inc();
            Outcome::Dropped
        }
    }
}

/// True for a request a vcluster makes to its own API server: its syncer,
/// and what it deploys at every start (CoreDNS). They use the same admin
/// credential as the `vc-<name>` kubeconfig people are given (user
/// `kubernetes-super-admin` in vcluster 0.30's k8s distro), and the syncer
/// watches all the time (a watch restarts every few minutes); only their
/// user agents tell them apart: client-go's default, named after the
/// `vcluster` binary, and Go's own default for the deployer (18 requests
/// at a first start, 10 at each wake, seen on the real vcluster).
pub fn from_vcluster_itself(user: &str, user_agent: &str) -> bool {
    user_agent.starts_with("vcluster/")
        || (user == "kubernetes-super-admin" && user_agent.starts_with("Go-http-client/"))
}

/// `kubectl/v1.37.2 (linux/amd64) kubernetes/abc` → `kubectl`: the product
/// only, so versions do not multiply metric series.
pub fn short_agent(ua: &str) -> &str {
    let product = ua.split([' ', '/']).next().unwrap_or_default();
    if product.is_empty() { "unknown" } else { product }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activity::Source;
    use chrono::Utc;

    fn activity(user: &str) -> Activity {
        Activity {
            at: Utc::now(),
            source: Source::Proxy,
            user: user.into(),
            groups: vec![],
            user_agent: "kubectl/v1.37.2".into(),
            verb: "list".into(),
            resource: None,
            path: "/api".into(),
            code: None,
            in_vcluster: true,
        }
    }

    #[test]
    fn each_target_gets_at_most_max_sources_series_and_the_rest_count_as_other() {
        let (stores, _writers) = crate::target::stores::stores();
        let metrics = Arc::new(Metrics::new());
        let (ledger, _worker) = Ledger::new(10_000);
        let rules = RulesCache::new(stores, Defaults::default(), Scope::default(), Duration::from_secs(5));
        let o = Observer::new(ledger, IgnoreRules::default(), rules, metrics.clone()).with_user_names(true);
        let t = TargetRef::vcluster("team-a", "dev");
        for i in 0..MAX_SOURCES + 8 {
            assert_eq!(o.observe(&t, activity(&format!("user-{i}"))), Outcome::Counted);
        }
        // Sources seen first keep their own series and go on counting.
        assert_eq!(o.observe(&t, activity("user-0")), Outcome::Counted);
        let text = metrics.encode();
        let series: Vec<&str> =
            text.lines().filter(|l| l.starts_with("dormant_activity_sources_total{")).collect();
        assert_eq!(series.len(), MAX_SOURCES + 1, "{series:#?}");
        let value = |source: &str| {
            series
                .iter()
                .find(|l| l.contains(&format!("source=\"{source}\"")))
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_string)
        };
        assert_eq!(value("user-0 (kubectl)").as_deref(), Some("2"));
        assert_eq!(value(OTHER_SOURCES).as_deref(), Some("8"));
        assert_eq!(value(&format!("user-{} (kubectl)", MAX_SOURCES)), None);
    }

    #[tokio::test]
    async fn what_is_kept_for_a_target_goes_with_it() {
        let (stores, _writers) = crate::target::stores::stores();
        let metrics = Arc::new(Metrics::new());
        let (ledger, worker) = Ledger::new(10_000);
        let task = tokio::spawn(worker.run(
            |_| {},
            crate::activity::ledger::NoFlush,
            Duration::from_secs(3600),
            std::future::pending(),
        ));
        let rules = RulesCache::new(stores, Defaults::default(), Scope::default(), Duration::from_secs(5));
        let o = Observer::new(ledger.clone(), IgnoreRules::default(), rules, metrics.clone())
            .with_user_names(true);
        let (gone, kept) = (TargetRef::namespace("preview-1"), TargetRef::namespace("team-a"));
        for t in [&gone, &kept] {
            for user in ["alice", "bob"] {
                assert_eq!(o.observe(t, activity(user)), Outcome::Counted);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        let series = |t: &TargetRef| {
            metrics
                .encode()
                .lines()
                .filter(|l| {
                    l.starts_with("dormant_activity_sources_total{") && l.contains(&format!("target=\"{t}\""))
                })
                .count()
        };
        assert_eq!((series(&gone), series(&kept)), (2, 2));
        assert!(ledger.newest(&gone).is_some());

        o.sweep(|t| *t == kept);
        assert_eq!((series(&gone), series(&kept)), (0, 2));
        assert!(ledger.newest(&gone).is_none());
        assert!(ledger.newest(&kept).is_some());
        assert!(!o.rules.cache.read().unwrap().contains_key(&gone));
        drop((o, ledger));
        task.abort();
    }

    #[test]
    fn metrics_name_tools_not_users_unless_asked() {
        let (stores, _writers) = crate::target::stores::stores();
        let metrics = Arc::new(Metrics::new());
        let (ledger, _worker) = Ledger::new(100);
        let rules = RulesCache::new(stores, Defaults::default(), Scope::default(), Duration::from_secs(5));
        let o = Observer::new(ledger.clone(), IgnoreRules::default(), rules, metrics.clone());
        let t = TargetRef::namespace("team-a");
        assert_eq!(o.observe(&t, activity("alice")), Outcome::Counted);
        let text = metrics.encode();
        let series: Vec<&str> =
            text.lines().filter(|l| l.starts_with("dormant_activity_sources_total{")).collect();
        assert_eq!(series.len(), 1, "{series:?}");
        assert!(series[0].contains(r#"source="(kubectl)""#) && !series[0].contains("alice"), "{series:?}");
    }
}
