//! The `SleepPolicy` custom resource (cluster-scoped, `dormant.dev/v1alpha1`).
//! The CRD in `charts/dormant/crds/` is generated from these types
//! (`dormant crd`); the schema's patterns let the API server refuse obvious
//! mistakes, and [`super::Policy::from_resource`] checks the rest.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Durations: `30s`, `15m`, `2h`, `1d`, `1h30m`; `0` or `never` switch off.
pub const DURATION_PATTERN: &str = r"^(never|0|([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?)$";
/// Five whitespace-separated cron fields, or an `@daily`-style alias.
pub const CRON_PATTERN: &str = r"^(@[a-z]+|\S+\s+\S+\s+\S+\s+\S+\s+\S+)$";

/// When targets sleep and wake, and which activity does not count.
// clippy reads the repeated `type_ = …` inside the printcolumns as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "dormant.dev",
    version = "v1alpha1",
    kind = "SleepPolicy",
    plural = "sleeppolicies",
    shortname = "sp",
    category = "dormant",
    status = "SleepPolicyStatus",
    printcolumn(name = "Priority", type_ = "integer", json_path = ".spec.priority"),
    printcolumn(name = "Sleep-After", type_ = "string", json_path = ".spec.sleepAfter"),
    printcolumn(name = "Timezone", type_ = "string", json_path = ".spec.timezone", priority = "1"),
    printcolumn(name = "Targets", type_ = "integer", json_path = ".status.targets"),
    printcolumn(
        name = "Valid",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Valid\")].status"
    ),
    printcolumn(name = "Dry-Run", type_ = "boolean", json_path = ".spec.dryRun", priority = "1"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct SleepPolicySpec {
    /// Which targets this policy governs. Empty: every namespace and vcluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<TargetSelector>,
    /// Among several matching policies the highest priority wins; ties go to
    /// the name that sorts first (and are reported).
    #[serde(default)]
    pub priority: i32,
    /// Idle time before a target sleeps (`30m`, `2h`); `never` or `0` disables idle sleep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub sleep_after: Option<String>,
    /// Forced sleep and wake instants (5-field cron, in `timezone`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<ScheduleSpec>,
    /// IANA time zone for the schedules (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+)*$"))]
    pub timezone: Option<String>,
    /// How targets wake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake: Option<WakeSpec>,
    /// Activity that does not count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore: Option<IgnoreSpec>,
    /// Workloads matching this label selector are never scaled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude: Option<LabelSelector>,
    /// What running costs, for the savings figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing: Option<PricingSpec>,
    /// What a sleep does to a Job still running in a namespace target:
    /// `Finish` (default) lets it run to completion, while the namespace's
    /// CronJobs are suspended so that no new one starts; `Suspend` suspends
    /// it (its pods are deleted and the work they had done is lost) and
    /// resumes it at wake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_jobs: Option<RunningJobs>,
    /// Decide and report, but never scale anything.
    #[serde(default)]
    pub dry_run: bool,
    /// Read vCluster Platform's `sleepmode.loft.sh/*` settings on the
    /// targets this policy governs (and `sleepmode.loft.sh/exclude` on their
    /// workloads), under dormant's own, as the agent flag
    /// `--vcluster-platform-annotations` does for every target. A namespace
    /// becomes a target by this policy's selector, not by carrying the
    /// Platform's annotations.
    #[serde(default)]
    pub vcluster_platform_annotations: bool,
    /// Delete a target asleep this long: a namespace with everything in
    /// it, a vcluster by its Helm release's objects. Only when the agent runs with `--enable-delete-after`; never in
    /// dry-run, never a disabled target or one annotated
    /// `dormant.dev/protect: "true"`; always warned `deleteWarning` before
    /// (a Warning Event and the annotation `dormant.dev/delete-at`). Waking
    /// the target cancels it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub delete_after: Option<String>,
    /// How long before a deletion dormant warns (default 24h); the deletion
    /// is never sooner than this after the warning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub delete_warning: Option<String>,
}

/// What a sleep does to a Job still running (`spec.runningJobs`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RunningJobs {
    /// Let it run to completion; no new Job starts (CronJobs are suspended).
    #[default]
    Finish,
    /// Suspend it (its pods go, with the work they had done) and resume it at wake.
    Suspend,
}

impl std::fmt::Display for RunningJobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunningJobs::Finish => "Finish",
            RunningJobs::Suspend => "Suspend",
        })
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetSelector {
    /// Namespaces (and the vclusters in them) whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Which kinds of target: `Namespace`, `VCluster`. Default: both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinds: Option<Vec<TargetKindSpec>>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TargetKindSpec {
    Namespace,
    VCluster,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleSpec {
    /// When to put targets to sleep (5-field cron).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = CRON_PATTERN))]
    pub sleep: Option<String>,
    /// When to wake them (5-field cron).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = CRON_PATTERN))]
    pub wake: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WakeSpec {
    /// A request to a sleeping target wakes it (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_request: Option<bool>,
    /// A schedule's wake instant wakes it (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_schedule: Option<bool>,
    /// How long a held request waits for the target to wake (default 2m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub timeout: Option<String>,
    /// Wake each target ahead of its predicted first use of the day, learned
    /// from its activity profile (opt-in: present means on; `{}` takes the
    /// defaults).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predictive: Option<PredictiveSpec>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PredictiveSpec {
    /// How long before the predicted first use to wake, and how long past
    /// the latest usual first use to wait for one (default 10m, at most 12h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub lead: Option<String>,
    /// Wake ahead only when at least this fraction of the recent such days
    /// (the same weekday in the last 8 weeks) had a first use (default 0.8;
    /// more than 0, at most 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub confidence: Option<f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IgnoreSpec {
    /// User names (`*` globs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// Group names (`*` globs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// User agents (`*` globs, case-insensitive).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_agents: Vec<String>,
    /// Verbs (`get`, `list`, `watch`, …; `*` globs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verbs: Vec<String>,
    /// Resources, optionally by API group and name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<ResourceRuleSpec>,
    /// Paths of non-resource requests (`/healthz*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty", rename = "nonResourceURLs")]
    pub non_resource_urls: Vec<String>,
    /// Open exec, attach, port-forward and watch connections do not keep a target awake.
    #[serde(default)]
    pub active_connections: bool,
    /// Requests a target's own service accounts make, as an API server's
    /// audit webhook reports them, do not keep it awake: on the host, those
    /// of the target's namespace; inside a vcluster, all of them. They are
    /// the target's own workloads (operators, leader election, apps reading
    /// their ConfigMaps). Set false to count them.
    #[serde(default = "yes")]
    pub own_service_accounts: bool,
}

fn yes() -> bool {
    true
}

impl Default for IgnoreSpec {
    /// As an empty `ignore: {}` reads.
    fn default() -> Self {
        IgnoreSpec {
            users: vec![],
            groups: vec![],
            user_agents: vec![],
            verbs: vec![],
            resources: vec![],
            non_resource_urls: vec![],
            active_connections: false,
            own_service_accounts: true,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceRuleSpec {
    /// API group; empty or absent for the core group; `*` for any.
    #[serde(default)]
    pub group: String,
    /// Resource, optionally with subresource (`pods`, `pods/log`, `*`).
    #[schemars(length(min = 1))]
    pub resource: String,
    /// Object names; empty for any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PricingSpec {
    /// Price of one CPU core for one hour.
    #[schemars(range(min = 0.0))]
    pub cpu_core_hour: f64,
    /// Price of one GiB of memory for one hour.
    #[serde(rename = "memoryGiBHour")]
    #[schemars(range(min = 0.0))]
    pub memory_gib_hour: f64,
    /// ISO 4217 code (default USD).
    #[serde(default = "default_currency")]
    #[schemars(regex(pattern = r"^[A-Z]{3}$"))]
    pub currency: String,
}

fn default_currency() -> String {
    "USD".into()
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SleepPolicyStatus {
    /// How many targets this policy governs.
    #[serde(default)]
    pub targets: i32,
    /// `Valid`: whether dormant could read the policy, with reason and message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Targets this policy selects but could not apply, with the reason
    /// (first 20).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_targets: Vec<FailedTarget>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct FailedTarget {
    pub target: String,
    pub reason: String,
}
