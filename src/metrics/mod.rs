//! Metrics: one registry for the agent, typed label sets, and the cost
//! model that turns what sleeping scaled down into money saved.
//!
//! Names follow `dormant_<component>_<thing>_<unit>`; labels are low
//! cardinality (target, namespace, policy, trigger — never URLs).

pub mod cost;

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::target::TargetRef;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub kind: String,
    pub state: String,
}

/// Identifies one target in per-target series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub target: String,
    pub kind: String,
    pub namespace: String,
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SavingsLabels {
    pub target: String,
    pub kind: String,
    pub namespace: String,
    pub policy: String,
    pub currency: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    pub kind: String,
    /// `sleep` or `wake`.
    pub direction: String,
    /// `idle`, `schedule`, `predicted`, `request`, `manual`, `new`.
    pub trigger: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabels {
    pub trigger: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CategoryLabels {
    pub category: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActivityLabels {
    /// `audit`, `proxy`, `cli`, `scale`.
    pub source: &'static str,
    /// `counted` or `ignored`.
    pub outcome: &'static str,
    /// For ignored activity, the kind of rule (`user`, `user-agent`, …, with
    /// a `builtin-` prefix for dormant's own rules); empty otherwise.
    pub rule: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub target: String,
    pub namespace: String,
    /// `user (user agent)` of the activity.
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyLabels {
    /// `forwarded`, `held`, `timeout`, `overloaded`, `prevented`, `invalid`,
    /// `unauthenticated`, `upstream-error`, `api-unavailable`, `not-found`.
    pub outcome: &'static str,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    /// One of the API's fixed route names (`targets`, `target`, `sleep`,
    /// `wake`, `page`, ...): never a path or a name a caller chose.
    pub route: &'static str,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `proxy`, `audit` or `admin`.
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `namespace` or `vcluster`.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PreWakeLabels {
    pub kind: String,
    /// `used` (a use came before it slept again: a cold start avoided) or
    /// `unused`.
    pub outcome: &'static str,
}

/// Every metric the agent exports.
pub struct Metrics {
    pub registry: Registry,
    pub targets: Family<StateLabels, Gauge>,
    pub target_asleep: Family<TargetLabels, Gauge>,
    pub target_asleep_seconds: Family<TargetLabels, Gauge<f64, AtomicU64>>,
    pub target_cpu_cores: Family<TargetLabels, Gauge<f64, AtomicU64>>,
    pub target_memory_bytes: Family<TargetLabels, Gauge<f64, AtomicU64>>,
    pub savings: Family<SavingsLabels, Counter<f64, AtomicU64>>,
    pub transitions: Family<TransitionLabels, Counter>,
    pub wake_duration: Family<TriggerLabels, Histogram>,
    pub reconcile_errors: Family<CategoryLabels, Counter>,
    /// Targets deleted by a policy's `deleteAfter`.
    pub deleted_targets: Counter,
    pub reconcile_duration: Histogram,
    /// From the instant a target should have fallen asleep (its idle
    /// deadline or sleep instant) to dormant starting to scale it down.
    pub sleep_lag: Histogram,
    pub activity: Family<ActivityLabels, Counter>,
    pub activity_sources: Family<SourceLabels, Counter>,
    pub activity_dropped: Counter,
    pub audit_batches: Family<OutcomeLabels, Counter>,
    pub audit_events: Counter,
    pub audit_batch_duration: Histogram,
    pub proxy_requests: Family<ProxyLabels, Counter>,
    pub proxy_duration: Family<OutcomeLabels, Histogram>,
    pub proxy_waiting: Gauge,
    /// The app-traffic listener (labels as the proxy's).
    pub app_requests: Family<ProxyLabels, Counter>,
    pub app_duration: Family<OutcomeLabels, Histogram>,
    pub app_waiting: Gauge,
    pub api_requests: Family<ApiLabels, Counter>,
    /// Connections to vclusters' API servers open now.
    pub proxy_upstream_connections: Gauge,
    /// Bytes audit batches hold now (their charge).
    pub audit_inflight_bytes: Gauge,
    pub listener_connections: Family<ListenerLabels, Gauge>,
    pub listener_evictions: Family<ListenerLabels, Counter>,
    pub listener_refused: Family<ListenerLabels, Counter>,
    /// Wakes asked for by requests whose credential could not be checked
    /// while their vcluster slept: `requested`, or `refused` (over budget).
    pub proxy_unverified_wakes: Family<OutcomeLabels, Counter>,
    pub leader: Gauge,
    /// dormant's own API requests (watches aside), counted as they pass
    /// its rate limit, and the seconds they waited there.
    pub kube_requests: Counter,
    pub kube_throttled: Counter<f64, AtomicU64>,
    /// Wakes ahead of a predicted first use (`wake.predictive`), completed.
    pub prewakes: Family<KindLabels, Counter>,
    /// What became of them: used or unused.
    pub prewake_outcomes: Family<PreWakeLabels, Counter>,
    /// The awake hours they cost: from the wake to the first use, or to the
    /// sleep when none came.
    pub prewake_awake_hours: Family<KindLabels, Counter<f64, AtomicU64>>,
    /// Per-target series currently exported, to remove them when a target
    /// goes or changes policy.
    exported: Mutex<HashMap<TargetRef, TargetLabels>>,
    pub cost: cost::Meter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn wake_buckets() -> impl Iterator<Item = f64> {
    // 50 ms .. ~7 min
    exponential_buckets(0.05, 2.0, 14)
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dormant");
        let targets = Family::<StateLabels, Gauge>::default();
        registry.register("targets", "Targets by kind and state", targets.clone());
        let target_asleep = Family::<TargetLabels, Gauge>::default();
        registry.register("target_asleep", "1 while the target is asleep, else 0", target_asleep.clone());
        let target_asleep_seconds = Family::<TargetLabels, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "target_asleep",
            "How long the target has been asleep (0 while awake)",
            Unit::Seconds,
            target_asleep_seconds.clone(),
        );
        let target_cpu_cores = Family::<TargetLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "target_requested_cpu_cores",
            "CPU requested by what sleeping scaled down (0 while awake)",
            target_cpu_cores.clone(),
        );
        let target_memory_bytes = Family::<TargetLabels, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "target_requested_memory",
            "Memory requested by what sleeping scaled down (0 while awake)",
            Unit::Bytes,
            target_memory_bytes.clone(),
        );
        let savings = Family::<SavingsLabels, Counter<f64, AtomicU64>>::default();
        registry.register(
            "savings",
            "Estimated money saved by sleeping, from the policy's pricing, in the currency label",
            savings.clone(),
        );
        let transitions = Family::<TransitionLabels, Counter>::default();
        registry.register("transitions", "Completed sleeps and wakes by trigger", transitions.clone());
        let wake_duration =
            Family::<TriggerLabels, Histogram>::new_with_constructor(|| Histogram::new(wake_buckets()));
        registry.register_with_unit(
            "wake_duration",
            "From the decision to wake until the target is ready",
            Unit::Seconds,
            wake_duration.clone(),
        );
        let reconcile_errors = Family::<CategoryLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed reconciles by error category",
            reconcile_errors.clone(),
        );
        let deleted_targets = Counter::default();
        registry.register(
            "deleted_targets",
            "Targets deleted because they slept longer than their policy's deleteAfter",
            deleted_targets.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register_with_unit(
            "reconcile_duration",
            "Time to reconcile one target",
            Unit::Seconds,
            reconcile_duration.clone(),
        );
        let sleep_lag = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register_with_unit(
            "sleep_lag",
            "From a target's idle deadline or sleep instant to dormant scaling it down",
            Unit::Seconds,
            sleep_lag.clone(),
        );
        let activity = Family::<ActivityLabels, Counter>::default();
        registry.register("activity", "Observed activity by source and outcome", activity.clone());
        let activity_sources = Family::<SourceLabels, Counter>::default();
        registry.register(
            "activity_sources",
            "Counted activity per target by who caused it (who keeps it awake)",
            activity_sources.clone(),
        );
        let activity_dropped = Counter::default();
        registry.register(
            "activity_dropped",
            "Activity dropped because the ledger's queue was full",
            activity_dropped.clone(),
        );
        let audit_batches = Family::<OutcomeLabels, Counter>::default();
        registry.register("audit_batches", "Audit webhook requests by outcome", audit_batches.clone());
        let audit_events = Counter::default();
        registry.register("audit_events", "Audit events decoded", audit_events.clone());
        let audit_batch_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register_with_unit(
            "audit_batch_duration",
            "Time to decode and attribute one audit batch",
            Unit::Seconds,
            audit_batch_duration.clone(),
        );
        let proxy_requests = Family::<ProxyLabels, Counter>::default();
        registry.register(
            "proxy_requests",
            "Proxy requests by outcome and status code",
            proxy_requests.clone(),
        );
        let proxy_duration = Family::<OutcomeLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 20))
        });
        registry.register_with_unit(
            "proxy_request_duration",
            "Proxy request latency until response headers, including any wait for a wake",
            Unit::Seconds,
            proxy_duration.clone(),
        );
        let proxy_unverified_wakes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "proxy_unverified_wakes",
            "Wakes asked for by requests whose credential could not be checked while the vcluster slept, by outcome (requested, refused over budget)",
            proxy_unverified_wakes.clone(),
        );
        let proxy_waiting = Gauge::default();
        registry.register(
            "proxy_waiting_requests",
            "Requests held while their target wakes",
            proxy_waiting.clone(),
        );
        let app_requests = Family::<ProxyLabels, Counter>::default();
        registry.register(
            "app_requests",
            "Application requests through the app-traffic listener by outcome and status code",
            app_requests.clone(),
        );
        let app_duration = Family::<OutcomeLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 20))
        });
        registry.register_with_unit(
            "app_request_duration",
            "App-traffic latency until response headers, including any wait for a wake",
            Unit::Seconds,
            app_duration.clone(),
        );
        let app_waiting = Gauge::default();
        registry.register(
            "app_waiting_requests",
            "Application requests held while their target wakes",
            app_waiting.clone(),
        );
        let api_requests = Family::<ApiLabels, Counter>::default();
        registry.register(
            "api_requests",
            "Requests to the agent's API and web page by route and status code",
            api_requests.clone(),
        );
        let proxy_upstream_connections = Gauge::default();
        registry.register(
            "proxy_upstream_connections",
            "Connections to vclusters' API servers open now",
            proxy_upstream_connections.clone(),
        );
        let audit_inflight_bytes = Gauge::default();
        registry.register_with_unit(
            "audit_inflight",
            "Memory audit batches being read and decoded are charged now",
            Unit::Bytes,
            audit_inflight_bytes.clone(),
        );
        let listener_connections = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "listener_connections",
            "Connections each listener holds now",
            listener_connections.clone(),
        );
        let listener_evictions = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "listener_evictions",
            "Idle connections closed to make room for a new one at the listener's cap",
            listener_evictions.clone(),
        );
        let listener_refused = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "listener_refused_connections",
            "New connections closed at once: the listener was at its cap with every connection busy",
            listener_refused.clone(),
        );
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica runs the controller", leader.clone());
        let kube_requests = Counter::default();
        registry.register(
            "kube_requests",
            "dormant's own Kubernetes API requests (watches aside), as they pass its client rate limit (--qps)",
            kube_requests.clone(),
        );
        let kube_throttled = Counter::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "kube_throttled",
            "Time dormant's own API requests waited for the client rate limit (--qps, --burst)",
            Unit::Seconds,
            kube_throttled.clone(),
        );
        let prewakes = Family::<KindLabels, Counter>::default();
        registry.register(
            "prewakes",
            "Wakes ahead of a predicted first use (wake.predictive)",
            prewakes.clone(),
        );
        let prewake_outcomes = Family::<PreWakeLabels, Counter>::default();
        registry.register(
            "prewake_outcomes",
            "Pre-wakes by outcome: used (a use came while awake: a cold start avoided) or unused (slept again without one)",
            prewake_outcomes.clone(),
        );
        let prewake_awake_hours = Family::<KindLabels, Counter<f64, AtomicU64>>::default();
        registry.register(
            "prewake_awake_hours",
            "Awake hours pre-wakes cost: from the wake to the first use, or to the sleep when none came",
            prewake_awake_hours.clone(),
        );
        Metrics {
            registry,
            targets,
            target_asleep,
            target_asleep_seconds,
            target_cpu_cores,
            target_memory_bytes,
            savings,
            transitions,
            wake_duration,
            reconcile_errors,
            deleted_targets,
            reconcile_duration,
            sleep_lag,
            activity,
            activity_sources,
            activity_dropped,
            audit_batches,
            audit_events,
            audit_batch_duration,
            proxy_requests,
            proxy_duration,
            proxy_waiting,
            app_requests,
            app_duration,
            app_waiting,
            api_requests,
            proxy_upstream_connections,
            audit_inflight_bytes,
            listener_connections,
            listener_evictions,
            listener_refused,
            proxy_unverified_wakes,
            leader,
            kube_requests,
            kube_throttled,
            prewakes,
            prewake_outcomes,
            prewake_awake_hours,
            exported: Mutex::new(HashMap::new()),
            cost: cost::Meter::default(),
        }
    }

    /// Observes a reconcile's duration when dropped: also when its future
    /// is dropped at the timeout, so reconciles that hang are measured.
    pub fn reconcile_timer(&self) -> Timer<'_> {
        Timer { histogram: &self.reconcile_duration, started: std::time::Instant::now() }
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Labels for a target's per-target series; replaces (removes) series
    /// exported under other labels for the same target.
    pub fn target_labels(&self, t: &TargetRef, policy: &str) -> TargetLabels {
        let labels = TargetLabels {
            target: t.to_string(),
            kind: t.kind.as_str().into(),
            namespace: t.namespace.clone(),
            policy: policy.to_string(),
        };
        let mut exported = self.exported.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = exported.insert(t.clone(), labels.clone())
            && old != labels
        {
            self.remove_series(&old);
        }
        labels
    }

    /// Drops a target's per-target series (it no longer exists).
    pub fn forget_target(&self, t: &TargetRef) {
        let old = self.exported.lock().unwrap_or_else(|e| e.into_inner()).remove(t);
        if let Some(old) = old {
            self.remove_series(&old);
        }
        self.cost.stop(t);
    }

    fn remove_series(&self, l: &TargetLabels) {
        self.target_asleep.remove(l);
        self.target_asleep_seconds.remove(l);
        self.target_cpu_cores.remove(l);
        self.target_memory_bytes.remove(l);
    }
}

/// Observes the time since it was made into a histogram when dropped.
pub struct Timer<'a> {
    histogram: &'a Histogram,
    started: std::time::Instant,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}
