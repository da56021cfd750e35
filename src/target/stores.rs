//! Reflector stores of everything targets are made of, and the changes
//! that make a target worth looking at again. The agent reads these on
//! every hot path; the CLI fills the same stores from one list call each.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex, RwLock};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, PodSpec, PodTemplateSpec};
use kube::api::{Api, ListParams};
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::cached::{Deployment, ReplicaSet, StatefulSet};
use super::workload::AsWorkload;
use super::{
    Scope, Target, TargetKind, TargetObject, TargetRef, WorkloadView, is_vcluster_control_plane,
    vcluster_etcd_of,
};
use crate::policy::{Candidate, SleepPolicy, loft};
use crate::vocab::MANAGED_BY_LABEL;
use crate::vocab::PREFIX;

/// Something changed that may change what these targets should be.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Change {
    Target(TargetRef),
    /// A namespace changed: its namespace target and every vcluster in it.
    Namespace(String),
    /// A policy changed: every target.
    All,
}

/// Read handles of the reflector stores.
#[derive(Clone)]
pub struct Stores {
    pub namespaces: Store<Namespace>,
    pub statefulsets: Store<StatefulSet>,
    pub deployments: Store<Deployment>,
    pub replicasets: Store<ReplicaSet>,
    pub cronjobs: Store<CronJob>,
    pub jobs: Store<Job>,
    /// Only pods labelled `vcluster.loft.sh/managed-by`.
    pub synced_pods: Store<Pod>,
    pub policies: Store<SleepPolicy>,
    /// Which objects of each namespaced cache live in which namespace.
    by_namespace: ByNamespace,
    /// The policies as read, shared by every copy of these stores.
    parsed: Arc<Mutex<Parsed>>,
    /// Each vcluster's `vcluster.yaml` sleep settings, as read by
    /// [`refresh_vcluster_configs`] (only with `--vcluster-yaml`).
    vcluster_configs: Arc<Mutex<VClusterConfigs>>,
}

/// (namespace, name) of a vcluster → its `vcluster.yaml` sleep settings.
type VClusterConfigs = HashMap<(String, String), Result<loft::Overlay, Vec<loft::ConfigError>>>;

/// Every SleepPolicy read into a resolver [`Candidate`], kept until a
/// policy's spec changes (keyed by each one's name and generation: the
/// status dormant writes does not make them read again).
#[derive(Default)]
struct Parsed {
    key: Vec<(String, Option<i64>)>,
    candidates: Vec<Arc<Candidate>>,
}

/// The names of a cache's objects by namespace, kept from the same watch
/// events as the cache itself. Looking at a namespace reads its own
/// objects only: scanning whole caches for them made the agent's CPU per
/// evaluation grow with the cluster (a namespace of 50 workloads among
/// 50,000 read about 150,000 cached objects every time it changed).
#[derive(Clone, Default)]
struct NamespaceIndex(Arc<RwLock<Names>>);

type NamesByNamespace = HashMap<String, BTreeSet<String>>;

#[derive(Default)]
struct Names {
    live: NamesByNamespace,
    /// Filled by a (re)list and put in place when it is done, as the
    /// cache's own writer does: until then the old names stand.
    relist: Option<NamesByNamespace>,
}

impl NamespaceIndex {
    fn apply<K: Resource>(&self, event: &watcher::Event<K>) {
        // Most events update an object already named: nothing is copied.
        fn add<K: Resource>(names: &mut NamesByNamespace, o: &K) {
            let meta = o.meta();
            if let (Some(ns), Some(name)) = (&meta.namespace, &meta.name)
                && !names.get(ns).is_some_and(|n| n.contains(name))
            {
                names.entry(ns.clone()).or_default().insert(name.clone());
            }
        }
        let mut names = self.0.write().unwrap_or_else(|e| e.into_inner());
        match event {
            watcher::Event::Apply(o) => add(&mut names.live, o),
            watcher::Event::Delete(o) => {
                let meta = o.meta();
                if let (Some(ns), Some(name)) = (&meta.namespace, &meta.name)
                    && let Some(n) = names.live.get_mut(ns)
                {
                    n.remove(name);
                    if n.is_empty() {
                        names.live.remove(ns);
                    }
                }
            }
            watcher::Event::Init => names.relist = Some(HashMap::new()),
            watcher::Event::InitApply(o) => add(names.relist.get_or_insert_default(), o),
            watcher::Event::InitDone => {
                if let Some(fresh) = names.relist.take() {
                    names.live = fresh;
                }
            }
        }
    }

    /// The names of the objects in namespace `ns`.
    #[cfg(test)]
    fn names(&self, ns: &str) -> Vec<String> {
        let names = self.0.read().unwrap_or_else(|e| e.into_inner());
        names.live.get(ns).map(|n| n.iter().cloned().collect()).unwrap_or_default()
    }

    /// The objects of `store` in namespace `ns` (one lookup each; the
    /// cache's own lock is never held while this one is written).
    fn objects<K>(&self, store: &Store<K>, ns: &str) -> Vec<Arc<K>>
    where
        K: Resource<DynamicType = ()> + Clone + 'static,
    {
        let names = self.0.read().unwrap_or_else(|e| e.into_inner());
        names
            .live
            .get(ns)
            .into_iter()
            .flatten()
            .filter_map(|name| store.get(&reflector::ObjectRef::new(name).within(ns)))
            .collect()
    }
}

/// A [`NamespaceIndex`] per namespaced cache, shared by the stores and
/// their writers.
#[derive(Clone, Default)]
struct ByNamespace {
    statefulsets: NamespaceIndex,
    deployments: NamespaceIndex,
    replicasets: NamespaceIndex,
    cronjobs: NamespaceIndex,
    jobs: NamespaceIndex,
    synced_pods: NamespaceIndex,
}

/// The writers behind [`Stores`].
pub struct Writers {
    namespaces: Writer<Namespace>,
    statefulsets: Writer<StatefulSet>,
    deployments: Writer<Deployment>,
    replicasets: Writer<ReplicaSet>,
    cronjobs: Writer<CronJob>,
    jobs: Writer<Job>,
    synced_pods: Writer<Pod>,
    policies: Writer<SleepPolicy>,
    by_namespace: ByNamespace,
}

/// Creates empty stores and their writers.
pub fn stores() -> (Stores, Writers) {
    let (namespaces, w_ns) = reflector::store();
    let (statefulsets, w_sts) = reflector::store();
    let (deployments, w_dep) = reflector::store();
    let (replicasets, w_rs) = reflector::store();
    let (cronjobs, w_cj) = reflector::store();
    let (jobs, w_job) = reflector::store();
    let (synced_pods, w_pods) = reflector::store();
    let (policies, w_pol) = reflector::store();
    let by_namespace = ByNamespace::default();
    (
        Stores {
            namespaces,
            statefulsets,
            deployments,
            replicasets,
            cronjobs,
            jobs,
            synced_pods,
            policies,
            by_namespace: by_namespace.clone(),
            parsed: Arc::default(),
            vcluster_configs: Arc::default(),
        },
        Writers {
            namespaces: w_ns,
            statefulsets: w_sts,
            deployments: w_dep,
            replicasets: w_rs,
            cronjobs: w_cj,
            jobs: w_job,
            synced_pods: w_pods,
            policies: w_pol,
            by_namespace,
        },
    )
}

fn synced_pods_params() -> watcher::Config {
    watcher::Config::default().labels(MANAGED_BY_LABEL)
}

/// What the caches keep of an object: what dormant reads of it. The rest
/// is dropped as it arrives: `managedFields`, kubectl's last-applied copy,
/// and most of every pod template. Workloads that scale are read into
/// records of their own instead ([`super::cached`]: at 10,000 targets the
/// caches are most of the agent's memory, and a large cluster has about
/// ten old ReplicaSets per Deployment).
pub trait Trim {
    fn trim(&mut self);
}

/// `kubectl apply`'s copy of the whole object, which dormant never reads.
pub(super) const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Annotations the Deployment controller keeps on its objects (revision,
/// desired and max replicas), which dormant never reads.
const DEPLOYMENT_CONTROLLER: &str = "deployment.kubernetes.io/";

pub(super) fn trim_meta(meta: &mut kube::api::ObjectMeta) {
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.retain(|k, _| k != LAST_APPLIED && !k.starts_with(DEPLOYMENT_CONTROLLER));
        // An emptied map still holds its node.
        if a.is_empty() {
            meta.annotations = None;
        }
    }
}

/// A pod spec down to its containers' names and resources (what the
/// savings are computed from).
fn trim_pod_spec(spec: &mut PodSpec) {
    let containers = std::mem::take(&mut spec.containers)
        .into_iter()
        .map(|c| Container { name: c.name, resources: c.resources, ..Default::default() })
        .collect();
    *spec = PodSpec { containers, ..Default::default() };
}

/// A workload's pod template: its labels (app traffic selects by them)
/// and its containers' resources.
fn trim_template(t: &mut PodTemplateSpec) {
    let labels = t.metadata.as_mut().and_then(|m| m.labels.take());
    t.metadata = labels.map(|labels| kube::api::ObjectMeta { labels: Some(labels), ..Default::default() });
    if let Some(spec) = t.spec.as_mut() {
        trim_pod_spec(spec);
    }
}

impl Trim for Namespace {
    fn trim(&mut self) {
        trim_meta(&mut self.metadata);
    }
}

impl Trim for SleepPolicy {
    fn trim(&mut self) {
        trim_meta(&mut self.metadata);
    }
}

/// Kept only what is read as it was read (see [`super::cached`]).
impl<K> Trim for super::cached::Scalable<K> {
    fn trim(&mut self) {}
}

impl Trim for CronJob {
    /// Its Jobs are cached on their own; the schedule's template is not read.
    fn trim(&mut self) {
        trim_meta(&mut self.metadata);
        if let Some(spec) = self.spec.job_template.spec.as_mut() {
            trim_template(&mut spec.template);
        }
    }
}

impl Trim for Job {
    fn trim(&mut self) {
        trim_meta(&mut self.metadata);
        if let Some(spec) = self.spec.as_mut() {
            trim_template(&mut spec.template);
        }
    }
}

impl Trim for Pod {
    /// A synced pod: its labels, annotations (which virtual pod it stands
    /// for, and its owners) and its containers' resource requests.
    fn trim(&mut self) {
        trim_meta(&mut self.metadata);
        self.status = None;
        if let Some(spec) = self.spec.as_mut() {
            trim_pod_spec(spec);
        }
    }
}

/// Each SleepPolicy's name and generation, sorted: what changes when a
/// policy is added, deleted or its spec changes, and not when only its
/// status does.
pub fn policy_generations(policies: &Store<SleepPolicy>) -> Vec<(String, Option<i64>)> {
    let mut v: Vec<_> = policies.state().iter().map(|p| (p.name_any(), p.metadata.generation)).collect();
    v.sort();
    v
}

/// Runs one reflector, sending a [`Change`] for each object it sees change.
async fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    index: Option<NamespaceIndex>,
    tx: mpsc::UnboundedSender<Change>,
    mut map: impl FnMut(&K) -> Option<Change> + Send + 'static,
) where
    K: Resource<DynamicType = ()> + Trim + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let stream = watcher(api, config)
        .default_backoff()
        .modify(K::trim)
        .reflect(writer)
        .inspect_ok(move |event| {
            if let Some(index) = &index {
                index.apply(event);
            }
        })
        .touched_objects();
    futures::pin_mut!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(obj) => {
                if let Some(change) = map(&obj)
                    && tx.send(change).is_err()
                {
                    return;
                }
            }
            Err(e) => tracing::warn!(kind = %K::kind(&()), error = %e, "watch error; retrying"),
        }
    }
}

fn ns_of<K: ResourceExt>(o: &K) -> String {
    o.namespace().unwrap_or_default()
}

fn workload_change<K: ResourceExt>(o: &K) -> Option<Change> {
    Some(if is_vcluster_control_plane(o.labels()) {
        Change::Target(TargetRef::vcluster(&ns_of(o), &o.name_any()))
    } else if let Some(vc) = vcluster_etcd_of(o.labels()) {
        Change::Target(TargetRef::vcluster(&ns_of(o), vc))
    } else {
        Change::Target(TargetRef::namespace(&ns_of(o)))
    })
}

/// Starts the reflector of one kind of workload, indexed by namespace.
fn workloads<K>(
    client: &Client,
    writer: Writer<K>,
    index: &NamespaceIndex,
    tx: &mpsc::UnboundedSender<Change>,
) -> tokio::task::JoinHandle<()>
where
    K: Resource<DynamicType = ()> + Trim + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let config = watcher::Config::default();
    tokio::spawn(reflect(
        Api::all(client.clone()),
        config,
        writer,
        Some(index.clone()),
        tx.clone(),
        workload_change,
    ))
}

impl Writers {
    /// Starts a reflector per kind; each sends its changes to `tx`. The
    /// tasks end when `tx`'s receiver is dropped.
    pub fn spawn(
        self,
        client: Client,
        tx: mpsc::UnboundedSender<Change>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let wc = watcher::Config::default;
        let ix = self.by_namespace;
        vec![
            tokio::spawn(reflect(
                Api::all(client.clone()),
                wc(),
                self.namespaces,
                None,
                tx.clone(),
                |o: &Namespace| Some(Change::Namespace(o.name_any())),
            )),
            workloads(&client, self.statefulsets, &ix.statefulsets, &tx),
            workloads(&client, self.deployments, &ix.deployments, &tx),
            workloads(&client, self.replicasets, &ix.replicasets, &tx),
            workloads(&client, self.cronjobs, &ix.cronjobs, &tx),
            workloads(&client, self.jobs, &ix.jobs, &tx),
            tokio::spawn(reflect(
                Api::all(client.clone()),
                synced_pods_params(),
                self.synced_pods,
                Some(ix.synced_pods.clone()),
                tx.clone(),
                |p: &Pod| {
                    Some(match p.labels().get(MANAGED_BY_LABEL) {
                        Some(vc) => Change::Target(TargetRef::vcluster(&ns_of(p), vc)),
                        None => Change::Namespace(ns_of(p)),
                    })
                },
            )),
            tokio::spawn({
                // Every target is looked at again when a policy's spec
                // changes, one is added or one goes; not when only its
                // status does (dormant writes that itself, every few
                // seconds while targets change).
                let policies = self.policies.as_reader();
                let mut last = Vec::new();
                reflect(Api::all(client), wc(), self.policies, None, tx, move |_: &SleepPolicy| {
                    let now = policy_generations(&policies);
                    (now != last).then(|| {
                        // Named in the log: a pass over every target has
                        // a cause an operator can find.
                        let changed: std::collections::BTreeSet<&str> = now
                            .iter()
                            .filter(|p| !last.contains(p))
                            .chain(last.iter().filter(|p| !now.contains(p)))
                            .map(|(name, _)| name.as_str())
                            .collect();
                        tracing::info!(policies = ?changed, "SleepPolicies changed; looking at every target again");
                        last = now;
                        Change::All
                    })
                })
            }),
        ]
    }

    /// Fills the stores from one list call per kind (for the CLI).
    pub async fn fill(mut self, client: Client) -> Result<(), kube::Error> {
        async fn fill_one<K>(
            api: Api<K>,
            lp: &ListParams,
            w: &mut Writer<K>,
            index: Option<&NamespaceIndex>,
        ) -> Result<(), kube::Error>
        where
            K: Resource<DynamicType = ()> + Trim + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        {
            let list = api.list(lp).await?;
            let mut apply = |event: watcher::Event<K>| {
                w.apply_watcher_event(&event);
                if let Some(index) = index {
                    index.apply(&event);
                }
            };
            apply(watcher::Event::Init);
            for mut o in list.items {
                o.trim();
                apply(watcher::Event::InitApply(o));
            }
            apply(watcher::Event::InitDone);
            Ok(())
        }
        let all = ListParams::default();
        let c = &client;
        let ix = &self.by_namespace;
        fill_one(Api::all(c.clone()), &all, &mut self.namespaces, None).await?;
        fill_one(Api::all(c.clone()), &all, &mut self.statefulsets, Some(&ix.statefulsets)).await?;
        fill_one(Api::all(c.clone()), &all, &mut self.deployments, Some(&ix.deployments)).await?;
        fill_one(Api::all(c.clone()), &all, &mut self.replicasets, Some(&ix.replicasets)).await?;
        fill_one(Api::all(c.clone()), &all, &mut self.cronjobs, Some(&ix.cronjobs)).await?;
        fill_one(Api::all(c.clone()), &all, &mut self.jobs, Some(&ix.jobs)).await?;
        fill_one(
            Api::all(c.clone()),
            &ListParams::default().labels(MANAGED_BY_LABEL),
            &mut self.synced_pods,
            Some(&ix.synced_pods),
        )
        .await?;
        match fill_one(Api::all(c.clone()), &all, &mut self.policies, None).await {
            // Without the CRD there are simply no policies.
            Err(kube::Error::Api(e)) if e.code == 404 => {
                self.policies.apply_watcher_event(&watcher::Event::Init);
                self.policies.apply_watcher_event(&watcher::Event::InitDone);
                Ok(())
            }
            other => other,
        }
    }
}

impl Stores {
    /// Waits until every store has seen its initial list.
    pub async fn wait_ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.namespaces.wait_until_ready().await?;
        self.statefulsets.wait_until_ready().await?;
        self.deployments.wait_until_ready().await?;
        self.replicasets.wait_until_ready().await?;
        self.cronjobs.wait_until_ready().await?;
        self.jobs.wait_until_ready().await?;
        self.synced_pods.wait_until_ready().await?;
        self.policies.wait_until_ready().await?;
        Ok(())
    }

    pub fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        self.namespaces.get(&reflector::ObjectRef::new(ns)).map(|n| n.labels().clone()).unwrap_or_default()
    }

    /// The target's object and namespace, if it exists.
    pub fn target(&self, r: &TargetRef) -> Option<Target> {
        let object = self.object(r)?;
        Some(Target { r: r.clone(), object, namespace_labels: self.namespace_labels(&r.namespace) })
    }

    /// The target's object alone (no copy of its namespace's labels: the
    /// proxy asks for it on every request).
    pub fn object(&self, r: &TargetRef) -> Option<TargetObject> {
        Some(match r.kind {
            TargetKind::Namespace => {
                TargetObject::Namespace(self.namespaces.get(&reflector::ObjectRef::new(&r.namespace))?)
            }
            TargetKind::VCluster => {
                if let Some(s) = self
                    .statefulsets
                    .get(&reflector::ObjectRef::new(&r.name).within(&r.namespace))
                    .filter(|s| is_vcluster_control_plane(s.labels()))
                {
                    TargetObject::StatefulSet(s)
                } else {
                    TargetObject::Deployment(
                        self.deployments
                            .get(&reflector::ObjectRef::new(&r.name).within(&r.namespace))
                            .filter(|d| is_vcluster_control_plane(d.labels()))?,
                    )
                }
            }
        })
    }

    /// Whether `scope` covers namespace `ns` (its labels read in place).
    pub fn in_scope(&self, scope: &Scope, ns: &str) -> bool {
        match self.namespaces.get(&reflector::ObjectRef::new(ns)) {
            Some(n) => scope.allows(ns, n.labels()),
            None => scope.allows(ns, &BTreeMap::new()),
        }
    }

    /// Every target: each vcluster, and each namespace that is annotated,
    /// selected by a policy for namespaces, or holds something dormant put to
    /// sleep. Only namespaces the scope allows.
    pub fn targets(&self, candidates: &[Arc<Candidate>], scope: &Scope) -> Vec<TargetRef> {
        let mut out: Vec<TargetRef> = Vec::new();
        let allowed = |ns: &str| scope.allows(ns, &self.namespace_labels(ns));
        for s in self.statefulsets.state() {
            if is_vcluster_control_plane(s.labels()) && allowed(&ns_of(s.as_ref())) {
                out.push(TargetRef::vcluster(&ns_of(s.as_ref()), &s.name_any()));
            }
        }
        for d in self.deployments.state() {
            if is_vcluster_control_plane(d.labels()) && allowed(&ns_of(d.as_ref())) {
                out.push(TargetRef::vcluster(&ns_of(d.as_ref()), &d.name_any()));
            }
        }
        for ns in self.namespaces.state() {
            let name = ns.name_any();
            if scope.allows(&name, ns.labels()) && self.is_namespace_target(&ns, candidates, scope) {
                out.push(TargetRef::namespace(&name));
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// The `vcluster.yaml` sleep settings of vcluster `namespace/name`, if
    /// they are read and it has any.
    pub fn vcluster_config(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<Result<loft::Overlay, Vec<loft::ConfigError>>> {
        lock(&self.vcluster_configs).get(&(namespace.to_string(), name.to_string())).cloned()
    }

    /// Whether a namespace is a target (see [`Stores::targets`]).
    pub fn is_namespace_target(&self, ns: &Namespace, candidates: &[Arc<Candidate>], scope: &Scope) -> bool {
        let name = ns.name_any();
        ns.annotations().keys().any(|k| {
            k.starts_with(PREFIX)
                || (scope.platform_annotations && k.starts_with(crate::policy::loft::PREFIX))
        }) || candidates.iter().any(|c| c.matches(TargetKind::Namespace, ns.labels()))
            || self.namespace_workloads(&name).iter().any(|w| {
                w.annotations.contains_key(crate::vocab::REPLICAS_BEFORE_SLEEP)
                    || w.annotations.contains_key(crate::vocab::SUSPEND_BEFORE_SLEEP)
            })
    }

    /// The workloads a target scales: a vcluster's control plane (first)
    /// and the etcd it deployed, if any; or the other workloads of a
    /// namespace (not vclusters' control planes or etcds, not objects a
    /// controller owns, finished Jobs included for completeness).
    pub fn workloads(&self, t: &Target) -> Vec<WorkloadView> {
        let control_plane = match &t.object {
            TargetObject::Namespace(_) => return self.namespace_workloads(&t.r.namespace),
            TargetObject::StatefulSet(s) => s.view(),
            TargetObject::Deployment(d) => d.view(),
        };
        let mut out = vec![control_plane];
        let mut etcd: Vec<WorkloadView> = self
            .by_namespace
            .statefulsets
            .objects(&self.statefulsets, &t.r.namespace)
            .iter()
            .filter(|s| vcluster_etcd_of(s.labels()) == Some(t.r.name.as_str()))
            .map(|s| s.view())
            .collect();
        etcd.sort_by(|a, b| a.name.cmp(&b.name));
        out.extend(etcd);
        out
    }

    pub(crate) fn namespace_workloads(&self, ns: &str) -> Vec<WorkloadView> {
        fn collect<K: AsWorkload + Clone + Resource<DynamicType = ()> + 'static>(
            store: &Store<K>,
            index: &NamespaceIndex,
            ns: &str,
            out: &mut Vec<WorkloadView>,
        ) {
            for o in index.objects(store, ns) {
                if is_vcluster_control_plane(o.labels()) || vcluster_etcd_of(o.labels()).is_some() {
                    continue;
                }
                let v = o.view();
                if !v.controlled {
                    out.push(v);
                }
            }
        }
        let mut out = Vec::new();
        let ix = &self.by_namespace;
        collect(&self.deployments, &ix.deployments, ns, &mut out);
        collect(&self.statefulsets, &ix.statefulsets, ns, &mut out);
        collect(&self.replicasets, &ix.replicasets, ns, &mut out);
        collect(&self.cronjobs, &ix.cronjobs, ns, &mut out);
        collect(&self.jobs, &ix.jobs, ns, &mut out);
        out.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
        out
    }

    /// The vclusters whose control planes run in namespace `ns`.
    pub fn vclusters_in(&self, ns: &str) -> Vec<TargetRef> {
        let ix = &self.by_namespace;
        let statefulsets = ix.statefulsets.objects(&self.statefulsets, ns);
        let deployments = ix.deployments.objects(&self.deployments, ns);
        statefulsets
            .iter()
            .map(|s| (s.labels(), s.name_any()))
            .chain(deployments.iter().map(|d| (d.labels(), d.name_any())))
            .filter(|(labels, _)| is_vcluster_control_plane(labels))
            .map(|(_, name)| TargetRef::vcluster(ns, &name))
            .collect()
    }

    /// Host pods synced by vcluster `name` in `ns`.
    pub fn synced_pods(&self, ns: &str, name: &str) -> Vec<Arc<Pod>> {
        let mut pods = self.by_namespace.synced_pods.objects(&self.synced_pods, ns);
        pods.retain(|p| p.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(name));
        pods
    }

    /// Every SleepPolicy as the resolver sees it, read again only when a
    /// policy is added, removed or its spec changes.
    pub fn candidates(&self) -> Vec<Arc<Candidate>> {
        let key = policy_generations(&self.policies);
        let mut parsed = lock(&self.parsed);
        if parsed.key != key || (parsed.candidates.is_empty() && !key.is_empty()) {
            let mut c: Vec<_> = self.policies.state().iter().map(|p| crate::policy::candidate(p)).collect();
            c.sort_by(|a, b| a.name.cmp(&b.name));
            *parsed = Parsed { key, candidates: c };
        }
        parsed.candidates.clone()
    }
}

/// The `config.yaml` of vcluster `namespace/name`'s `vc-config-<name>`
/// Secret: `Ok(None)` when there is none (or it is not text), `Err` when
/// the Secret cannot be read.
pub async fn vcluster_yaml(client: &Client, namespace: &str, name: &str) -> Result<Option<String>, String> {
    use k8s_openapi::api::core::v1::Secret;
    let secret = format!("vc-config-{name}");
    match Api::<Secret>::namespaced(client.clone(), namespace).get_opt(&secret).await {
        Ok(s) => Ok(s.and_then(|s| s.data?.remove("config.yaml")).and_then(|b| String::from_utf8(b.0).ok())),
        Err(kube::Error::Api(e)) => Err(format!("Secret {namespace}/{secret} not read: {}", e.message)),
        Err(e) => Err(format!("Secret {namespace}/{secret} not read: {e}")),
    }
}

/// Keeps every vcluster's `vcluster.yaml` sleep settings (`config.yaml` of
/// its `vc-config-<name>` Secret) in the stores, read every `interval`;
/// a vcluster whose settings change is sent to the controller. A Secret
/// that is gone, unreadable or without sleep settings counts as none.
pub async fn refresh_vcluster_configs(
    stores: Stores,
    client: Client,
    tx: mpsc::UnboundedSender<Change>,
    interval: std::time::Duration,
) {
    let mut warned = false;
    loop {
        let vclusters: Vec<(String, String)> = stores
            .statefulsets
            .state()
            .iter()
            .filter(|s| is_vcluster_control_plane(s.labels()))
            .map(|s| (ns_of(s.as_ref()), s.name_any()))
            .chain(
                stores
                    .deployments
                    .state()
                    .iter()
                    .filter(|d| is_vcluster_control_plane(d.labels()))
                    .map(|d| (ns_of(d.as_ref()), d.name_any())),
            )
            .collect();
        let mut fresh = HashMap::new();
        for (namespace, name) in vclusters {
            let text = match vcluster_yaml(&client, &namespace, &name).await {
                Ok(text) => text,
                Err(e) => {
                    if !warned {
                        tracing::warn!(error = %e, "cannot read vclusters' vc-config Secrets; their vcluster.yaml sleep settings are not applied");
                        warned = true;
                    }
                    None
                }
            };
            let Some(text) = text else { continue };
            match loft::parse_vcluster_config(&text) {
                Ok(o) if o.is_empty() => {}
                read => {
                    fresh.insert((namespace, name), read);
                }
            }
        }
        let changed: Vec<(String, String)> = {
            let mut cache = lock(&stores.vcluster_configs);
            let keys: std::collections::BTreeSet<&(String, String)> =
                cache.keys().chain(fresh.keys()).collect();
            let changed = keys.into_iter().filter(|k| cache.get(*k) != fresh.get(*k)).cloned().collect();
            *cache = fresh;
            changed
        };
        for (namespace, name) in changed {
            if tx.send(Change::Target(TargetRef::vcluster(&namespace, &name))).is_err() {
                return;
            }
        }
        tokio::time::sleep(interval).await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::workload::pod_spec_requests;

    #[test]
    fn the_caches_keep_what_dormant_reads() {
        let rs = |owner: &str| -> ReplicaSet {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web-7d9f", "namespace": "shop", "ownerReferences": serde_json::from_str::<serde_json::Value>(owner).unwrap(),
                    "annotations": {"deployment.kubernetes.io/revision": "4", "deployment.kubernetes.io/desired-replicas": "3"}},
                "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}}, "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [
                    {"name": "c", "image": "nginx", "resources": {"requests": {"cpu": "250m", "memory": "64Mi"}}}
                ]}}},
                "status": {"replicas": 3, "readyReplicas": 2}
            }))
            .unwrap()
        };
        // A Deployment's ReplicaSet: never scaled, read as controlled.
        let owned = rs(
            r#"[{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "u", "controller": true}]"#,
        );
        let v = owned.view();
        assert!(v.controlled);
        assert_eq!((v.replicas, v.current_pods, v.ready_pods), (Some(3), 3, 2));
        // What is never read of it is not kept: its template, its selector
        // (no claims), the Deployment controller's annotations.
        assert!(owned.template_labels.is_empty() && owned.selector.is_empty());
        assert_eq!(owned.metadata.annotations, None);
        // An ownerless one is a workload: everything it is read for is kept.
        let alone = rs("[]");
        let v = alone.view();
        assert!(!v.controlled);
        assert_eq!((v.replicas, v.per_replica.cpu_cores), (Some(3), 0.25));
        assert_eq!(alone.template_labels.get("app").map(String::as_str), Some("web"));

        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "app-x-default-x-dev", "namespace": "shop", "labels": {MANAGED_BY_LABEL: "dev"}},
            "spec": {
                "containers": [{"name": "app", "image": "app:1", "env": [{"name": "A", "value": "b"}],
                    "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}}],
                "volumes": [{"name": "v", "emptyDir": {}}]
            },
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        let requests = pod_spec_requests(pod.spec.as_ref().unwrap());
        pod.trim();
        assert!(pod.status.is_none());
        let spec = pod.spec.as_ref().unwrap();
        assert!(spec.volumes.is_none() && spec.containers[0].env.is_none());
        assert_eq!(pod_spec_requests(spec), requests);
        assert_eq!(pod.labels().get(MANAGED_BY_LABEL).map(String::as_str), Some("dev"));
    }

    #[test]
    fn the_namespace_index_follows_the_watch_and_its_relists() {
        let pod = |ns: &str, name: &str| -> Pod {
            serde_json::from_value(serde_json::json!({"metadata": {"name": name, "namespace": ns}})).unwrap()
        };
        let index = NamespaceIndex::default();
        for (ns, name) in [("a", "web"), ("a", "db"), ("b", "web")] {
            index.apply(&watcher::Event::Apply(pod(ns, name)));
        }
        // An update names the object once.
        index.apply(&watcher::Event::Apply(pod("a", "web")));
        assert_eq!(index.names("a"), ["db", "web"]);
        assert_eq!(index.names("b"), ["web"]);
        assert!(index.names("c").is_empty());
        index.apply(&watcher::Event::Delete(pod("a", "db")));
        assert_eq!(index.names("a"), ["web"]);

        // A relist (the watch was down: b/web went, c/job came). The old
        // names stand until it is done, as the cache's do.
        index.apply(&watcher::Event::<Pod>::Init);
        index.apply(&watcher::Event::InitApply(pod("a", "web")));
        index.apply(&watcher::Event::InitApply(pod("c", "job")));
        assert_eq!(index.names("b"), ["web"]);
        assert!(index.names("c").is_empty());
        index.apply(&watcher::Event::<Pod>::InitDone);
        assert_eq!(index.names("a"), ["web"]);
        assert!(index.names("b").is_empty());
        assert_eq!(index.names("c"), ["job"]);
    }
}
