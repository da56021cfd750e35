//! dormant's vocabulary on the cluster and on the wire: every annotation
//! key it reads or writes, the labels it recognises, the header that opts
//! a request out, and the field manager its writes carry. One place, so
//! that what dormant writes and what it reads can never drift apart.
//! Parsing the values is [`crate::policy::annotations`]' job.

/// Every dormant annotation starts with this.
pub const PREFIX: &str = "dormant.dev/";

// Set by users on a target (the namespace, or the vcluster's StatefulSet/Deployment).
pub const POLICY: &str = "dormant.dev/policy";
pub const SLEEP_AFTER: &str = "dormant.dev/sleep-after";
pub const SLEEP_SCHEDULE: &str = "dormant.dev/sleep-schedule";
pub const WAKE_SCHEDULE: &str = "dormant.dev/wake-schedule";
pub const TIMEZONE: &str = "dormant.dev/timezone";
pub const DISABLED: &str = "dormant.dev/disabled";
/// `finish` or `suspend`: what a sleep does to a Job still running.
pub const RUNNING_JOBS: &str = "dormant.dev/running-jobs";
pub const FORCE_SLEEP: &str = "dormant.dev/force-sleep";
pub const PREVENT_WAKEUP_UNTIL: &str = "dormant.dev/prevent-wakeup-until";
pub const UPSTREAM: &str = "dormant.dev/upstream";
pub const IGNORE_USER_AGENTS: &str = "dormant.dev/ignore-user-agents";
pub const IGNORE_USERS: &str = "dormant.dev/ignore-users";
pub const IGNORE_GROUPS: &str = "dormant.dev/ignore-groups";
pub const IGNORE_VERBS: &str = "dormant.dev/ignore-verbs";
pub const IGNORE_RESOURCES: &str = "dormant.dev/ignore-resources";
pub const IGNORE_OWN_SERVICE_ACCOUNTS: &str = "dormant.dev/ignore-own-service-accounts";
/// `"true"`: a browser asking for a sleeping target's app gets a page that
/// shows the wake's progress instead of a held request (also on a Service).
pub const WAITING_PAGE: &str = "dormant.dev/waiting-page";

// Written by dormant on a target.
pub const STATE: &str = "dormant.dev/state";
pub const LAST_ACTIVITY: &str = "dormant.dev/last-activity";
pub const LAST_ACTIVITY_BY: &str = "dormant.dev/last-activity-by";
pub const ASLEEP_SINCE: &str = "dormant.dev/asleep-since";
pub const FIRST_SEEN: &str = "dormant.dev/first-seen";
pub const ASLEEP_REQUESTS: &str = "dormant.dev/asleep-requests";
pub const ACTIVITY_SOURCES: &str = "dormant.dev/activity-sources";
/// When the proxy last asked to wake the target for a request whose
/// credential it could not check while the target slept (its budget of
/// those is one per interval, read from here by every replica).
pub const UNVERIFIED_WAKE: &str = "dormant.dev/unverified-wake";
/// The second copy of every record a sleep made: `{"Deployment/web": "3",
/// "CronJob/report": "false"}`, each workload's `replicas-before-sleep` or
/// `suspend-before-sleep`. Written before the workloads change, cleared
/// once the target is awake: a wake restores from either copy.
pub const SLEEP_RECORD: &str = "dormant.dev/sleep-record";
/// The target's weekly rhythm of counted use (`crate::foresight::profile`),
/// written by the flusher with the activity.
pub const ACTIVITY_PROFILE: &str = "dormant.dev/activity-profile";

// On a workload (set by users: `exclude`; the rest written by dormant in
// the same patch that scales, suspends or pauses).
pub const EXCLUDE: &str = "dormant.dev/exclude";
pub const REPLICAS_BEFORE_SLEEP: &str = "dormant.dev/replicas-before-sleep";
pub const SUSPEND_BEFORE_SLEEP: &str = "dormant.dev/suspend-before-sleep";
pub const KEDA_PAUSED_BEFORE_SLEEP: &str = "dormant.dev/keda-paused-replicas-before-sleep";
pub const KEDA_JOB_PAUSED_BEFORE_SLEEP: &str = "dormant.dev/keda-paused-before-sleep";
/// dormant's record of the GitOps marks it set: a JSON object from each
/// mark's key to the value the object had before (`null`: none).
pub const GITOPS_BEFORE_SLEEP: &str = "dormant.dev/gitops-before-sleep";

// delete-after (a SleepPolicy's `deleteAfter`).
/// Set by users on a target: never deleted, whatever its policy says.
pub const PROTECT: &str = "dormant.dev/protect";
/// Written by dormant with its warning: when the target will be deleted.
pub const DELETE_AT: &str = "dormant.dev/delete-at";
/// Written by dormant on a vcluster's control plane, conditional on its
/// version, when the deletion of its release begins: when it began.
pub const DELETING: &str = "dormant.dev/deleting";

/// Every key a target may carry (workload keys too: a vcluster's
/// StatefulSet is both), for typo hints.
pub const TARGET_KEYS: &[&str] = &[
    POLICY,
    SLEEP_AFTER,
    SLEEP_SCHEDULE,
    WAKE_SCHEDULE,
    TIMEZONE,
    DISABLED,
    RUNNING_JOBS,
    FORCE_SLEEP,
    PREVENT_WAKEUP_UNTIL,
    UPSTREAM,
    IGNORE_USER_AGENTS,
    IGNORE_USERS,
    IGNORE_GROUPS,
    IGNORE_VERBS,
    IGNORE_RESOURCES,
    IGNORE_OWN_SERVICE_ACCOUNTS,
    WAITING_PAGE,
    STATE,
    LAST_ACTIVITY,
    LAST_ACTIVITY_BY,
    ASLEEP_SINCE,
    FIRST_SEEN,
    ASLEEP_REQUESTS,
    ACTIVITY_SOURCES,
    UNVERIFIED_WAKE,
    SLEEP_RECORD,
    ACTIVITY_PROFILE,
    EXCLUDE,
    REPLICAS_BEFORE_SLEEP,
    SUSPEND_BEFORE_SLEEP,
    KEDA_PAUSED_BEFORE_SLEEP,
    KEDA_JOB_PAUSED_BEFORE_SLEEP,
    GITOPS_BEFORE_SLEEP,
    PROTECT,
    DELETE_AT,
    DELETING,
];

/// The label the vcluster chart puts on its control plane (`app=vcluster`).
pub const VCLUSTER_APP_LABEL: (&str, &str) = ("app", "vcluster");

/// The `app` label of the etcd StatefulSet a vcluster deploys
/// (`backingStore.etcd.deploy`), with `release=<name>`.
pub const VCLUSTER_ETCD_APP: &str = "vcluster-etcd";

// On a Service (set by users): `"true"` holds its traffic while its target
// sleeps even when no Ingress or HTTPRoute routes to it; `"false"` never.
pub const APP_TRAFFIC: &str = "dormant.dev/app-traffic";

// On dormant's own EndpointSlices (app traffic): the target they hold
// traffic for, and since when it wakes.
pub const SLICE_TARGET: &str = "dormant.dev/target";
pub const SLICE_WAKING_SINCE: &str = "dormant.dev/waking-since";

/// The `endpointslice.kubernetes.io/managed-by` value of the EndpointSlices
/// dormant makes (the built-in controller's is `endpointslice-controller.k8s.io`).
pub const ENDPOINTSLICE_MANAGER: &str = "dormant.dev";

/// The label a vcluster's syncer puts on the host pods it syncs.
pub const MANAGED_BY_LABEL: &str = "vcluster.loft.sh/managed-by";

/// The annotation a vcluster's syncer puts on a host pod whose virtual pod
/// has owners (its ownerReferences, as JSON). A synced pod without it is a
/// bare pod in the vcluster: nothing there would create it again.
pub const OWNER_REFERENCES_ANNOTATION: &str = "vcluster.loft.sh/owner-references";

/// The virtual pod's namespace and name on a synced host pod.
pub const OBJECT_NAMESPACE_ANNOTATION: &str = "vcluster.loft.sh/object-namespace";
pub const OBJECT_NAME_ANNOTATION: &str = "vcluster.loft.sh/object-name";

/// The request header that opts a request through the proxy out of
/// counting as activity.
pub const IGNORE_HEADER: &str = "x-dormant-ignore";

/// What the proxy appends to the user agent of a request sent with
/// [`IGNORE_HEADER`], so that the vcluster's audit webhook does not count
/// it either.
pub const IGNORED_USER_AGENT_MARK: &str = "(dormant-ignore)";

/// The field manager of every write dormant makes: `managedFields` say
/// `dormant`, which GitOps tools and people look for.
pub const FIELD_MANAGER: &str = "dormant";
