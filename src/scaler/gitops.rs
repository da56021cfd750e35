//! GitOps controllers that would scale a sleeping target back up from Git:
//! recognising the workloads Argo CD and Flux manage, the marks that tell
//! them — by their own documented mechanisms — to leave those workloads
//! alone while the target sleeps, and the requests of theirs that never
//! count as use. Like the scaler's replica records, each mark is written in
//! the same patch as what it protects, together with a record of what the
//! object had before, so a crash between any two patches leaves a state from
//! which waking gives every object back exactly what it had.
//!
//! - Flux: `kustomize.toolkit.fluxcd.io/reconcile: disabled` on an in-cluster
//!   object managed by a Kustomization (kustomize-controller then neither
//!   applies nor prunes it), `helm.toolkit.fluxcd.io/driftDetection: disabled`
//!   on one rendered by a HelmRelease (helm-controller's drift correction
//!   skips it; a new release still applies the chart's replicas, which wakes
//!   the target as any scale-up does). They go into the workload's own
//!   sleep and wake patches ([`with_sleep_marks`], [`with_wake_unmarks`]).
//! - Argo CD offers no per-object way to leave a field alone: its
//!   `ignoreDifferences` live in the Application. What dormant can write is
//!   the Application's `argocd.argoproj.io/skip-reconcile: "true"` (an alpha
//!   feature since Argo CD 2.7), which stops all processing of that
//!   Application — so only while every target it deploys to sleeps
//!   ([`may_pause_application`]); paused before the workloads sleep,
//!   resumed after they woke.
//!
//! Pure: views in, merge patches out. The sources of every key are in
//! `docs/vcluster-platform-formats.md` (GitOps section).

use std::collections::{BTreeMap, BTreeSet};

use kube::discovery::ApiResource;
use serde_json::{Map, Value, json};

use crate::target::WorkloadView;
use crate::vocab::{REPLICAS_BEFORE_SLEEP, SUSPEND_BEFORE_SLEEP};

/// Argo CD's resource tracking annotation (`<app>:<group>/<kind>:<ns>/<name>`),
/// the default tracking method since Argo CD 3.0.
pub const ARGOCD_TRACKING_ID: &str = "argocd.argoproj.io/tracking-id";
/// Argo CD's tracking label under label tracking (the default before 3.0).
/// Helm charts set it too, so alone it only suggests Argo CD.
pub const ARGOCD_INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
/// On an Application: `"true"` stops its reconciliation.
pub const ARGOCD_SKIP_RECONCILE: &str = "argocd.argoproj.io/skip-reconcile";
/// Labels kustomize-controller puts on every object a Kustomization applies.
pub const FLUX_KUSTOMIZATION_NAME: &str = "kustomize.toolkit.fluxcd.io/name";
pub const FLUX_KUSTOMIZATION_NAMESPACE: &str = "kustomize.toolkit.fluxcd.io/namespace";
/// Labels helm-controller puts on every object a HelmRelease renders.
pub const FLUX_HELMRELEASE_NAME: &str = "helm.toolkit.fluxcd.io/name";
pub const FLUX_HELMRELEASE_NAMESPACE: &str = "helm.toolkit.fluxcd.io/namespace";
/// On an in-cluster object: `disabled` stops kustomize-controller applying
/// and pruning it; removing the annotation resumes.
pub const FLUX_RECONCILE: &str = "kustomize.toolkit.fluxcd.io/reconcile";
/// On an in-cluster object: `disabled` excludes it from helm-controller's
/// drift detection and correction.
pub const FLUX_DRIFT_DETECTION: &str = "helm.toolkit.fluxcd.io/driftDetection";
pub use crate::vocab::GITOPS_BEFORE_SLEEP;

/// Each mark and the value dormant sets.
const MARKS: &[(&str, &str)] =
    &[(FLUX_RECONCILE, "disabled"), (FLUX_DRIFT_DETECTION, "disabled"), (ARGOCD_SKIP_RECONCILE, "true")];

fn mark_value(key: &str) -> Option<&'static str> {
    MARKS.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

/// How dormant knows a GitOps controller manages an object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Manager {
    /// Argo CD: the Application's instance name (`name`, or
    /// `namespace_name` for an Application outside Argo CD's own namespace)
    /// and whether it comes from the tracking annotation (certain) or only
    /// the instance label (which Helm charts set too).
    ArgoCd {
        instance: String,
        certain: bool,
    },
    FluxKustomization {
        namespace: String,
        name: String,
    },
    FluxHelmRelease {
        namespace: String,
        name: String,
    },
}

/// The GitOps controllers that manage an object with these labels and
/// annotations (an object rendered by a HelmRelease that a Kustomization
/// applies carries only the HelmRelease's labels).
pub fn managers(labels: &BTreeMap<String, String>, annotations: &BTreeMap<String, String>) -> Vec<Manager> {
    let mut out = Vec::new();
    match annotations.get(ARGOCD_TRACKING_ID).and_then(|id| id.split_once(':')) {
        Some((instance, _)) if !instance.is_empty() => {
            out.push(Manager::ArgoCd { instance: instance.to_string(), certain: true })
        }
        _ => {
            if let Some(instance) = labels.get(ARGOCD_INSTANCE_LABEL).filter(|v| !v.is_empty()) {
                out.push(Manager::ArgoCd { instance: instance.clone(), certain: false });
            }
        }
    }
    let pair = |name: &str, namespace: &str| {
        let name = labels.get(name).filter(|v| !v.is_empty())?;
        Some((labels.get(namespace).cloned().unwrap_or_default(), name.clone()))
    };
    if let Some((namespace, name)) = pair(FLUX_KUSTOMIZATION_NAME, FLUX_KUSTOMIZATION_NAMESPACE) {
        out.push(Manager::FluxKustomization { namespace, name });
    }
    if let Some((namespace, name)) = pair(FLUX_HELMRELEASE_NAME, FLUX_HELMRELEASE_NAMESPACE) {
        out.push(Manager::FluxHelmRelease { namespace, name });
    }
    out
}

/// The (namespace, name) of the Application an Argo CD instance name
/// designates: `namespace_name` for an Application in another namespace
/// (names of both cannot contain `_`), else `name` in `control_plane_ns`.
pub fn application_key(instance: &str, control_plane_ns: &str) -> (String, String) {
    match instance.split_once('_') {
        Some((ns, name)) => (ns.to_string(), name.to_string()),
        None => (control_plane_ns.to_string(), instance.to_string()),
    }
}

/// The per-object marks a workload needs while asleep: Flux's, for the
/// Flux objects it belongs to. Argo CD's mark goes on the Application.
fn flux_marks(w: &WorkloadView) -> Vec<&'static str> {
    let mut keys = Vec::new();
    for m in managers(&w.labels, &w.annotations) {
        match m {
            Manager::FluxKustomization { .. } => keys.push(FLUX_RECONCILE),
            Manager::FluxHelmRelease { .. } => keys.push(FLUX_DRIFT_DETECTION),
            Manager::ArgoCd { .. } => {}
        }
    }
    keys
}

/// Merges the merge patch `b` into the merge patch `a` (RFC 7386
/// composition): applying the result equals applying `a`, then `b`.
pub fn compose(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(existing @ Value::Object(_)) if v.is_object() => compose(existing, v),
                    _ => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (a, b) => *a = b,
    }
}

/// An annotations-only merge patch at `resource_version`.
fn annotations_patch(resource_version: &Option<String>, annotations: Map<String, Value>) -> Value {
    serde_json::json!({ "metadata": crate::client::metadata(resource_version, Value::Object(annotations)) })
}

/// Adds to `base` (or to `set` alone) the marks `keys`, recording in
/// [`GITOPS_BEFORE_SLEEP`] what each was, unless the object already carries
/// the record.
fn mark(
    rv: &Option<String>,
    annotations: &BTreeMap<String, String>,
    keys: &[&'static str],
    base: Option<Value>,
) -> Option<Value> {
    if keys.is_empty() || annotations.contains_key(GITOPS_BEFORE_SLEEP) {
        return base;
    }
    let record: Map<String, Value> =
        keys.iter().map(|k| (k.to_string(), annotations.get(*k).map_or(Value::Null, |v| json!(v)))).collect();
    let mut set: Map<String, Value> =
        keys.iter().filter_map(|k| Some((k.to_string(), json!(mark_value(k)?)))).collect();
    set.insert(GITOPS_BEFORE_SLEEP.into(), json!(Value::Object(record).to_string()));
    let marks = annotations_patch(rv, set);
    Some(match base {
        Some(mut p) => {
            compose(&mut p, marks);
            p
        }
        None => marks,
    })
}

/// Reads [`GITOPS_BEFORE_SLEEP`]: each mark's key and previous value.
fn read_record(raw: &str) -> Result<Vec<(String, Option<String>)>, String> {
    let bad = || format!("{GITOPS_BEFORE_SLEEP}={raw:?} is not a record of GitOps marks");
    let Ok(Value::Object(map)) = serde_json::from_str::<Value>(raw) else { return Err(bad()) };
    map.into_iter()
        .map(|(k, v)| match (mark_value(&k), v) {
            (Some(_), Value::Null) => Ok((k, None)),
            (Some(_), Value::String(s)) => Ok((k, Some(s))),
            _ => Err(bad()),
        })
        .collect()
}

/// A workload's record of GitOps marks, if it has one, is readable: checked
/// before anything changes, so a bad one (a hand edit, a tool's rewrite)
/// leaves its whole target alone rather than failing a wake half-way.
/// `Err`: the record as found.
pub fn check_record(annotations: &BTreeMap<String, String>) -> Result<(), String> {
    match annotations.get(GITOPS_BEFORE_SLEEP) {
        Some(raw) if read_record(raw).is_err() => Err(raw.clone()),
        _ => Ok(()),
    }
}

/// Why [`check_record`] refuses a record.
pub const BAD_RECORD: &str = "expected the JSON object dormant writes: each GitOps mark's key and its value before the sleep (or null)";

/// Removes the marks and the record, giving each mark key back the value it
/// had before — unless someone changed it while asleep (then their value
/// stays, as for a hand-scaled workload). An unreadable record is an
/// error, and the caller changes nothing.
fn unmark(
    rv: &Option<String>,
    annotations: &BTreeMap<String, String>,
    base: Option<Value>,
) -> Result<Option<Value>, String> {
    let Some(raw) = annotations.get(GITOPS_BEFORE_SLEEP) else { return Ok(base) };
    let mut set = Map::new();
    for (key, before) in read_record(raw)? {
        if annotations.get(&key).map(String::as_str) == mark_value(&key) {
            set.insert(key, before.map_or(Value::Null, Value::String));
        }
    }
    set.insert(GITOPS_BEFORE_SLEEP.into(), Value::Null);
    let unmarks = annotations_patch(rv, set);
    Ok(Some(match base {
        Some(mut p) => {
            compose(&mut p, unmarks);
            p
        }
        None => unmarks,
    }))
}

/// `base` (the workload's sleep patch from [`super::plan::sleep_patch`],
/// if any) with Flux's marks for `w` added, so ONE patch both scales and
/// marks. Marks are also added alone to a workload dormant already put to
/// sleep without them, and never to one it leaves running (`excluded`, or
/// no sleep record and nothing to do).
pub fn with_sleep_marks(w: &WorkloadView, excluded: bool, base: Option<Value>) -> Option<Value> {
    let asleep =
        w.annotations.contains_key(REPLICAS_BEFORE_SLEEP) || w.annotations.contains_key(SUSPEND_BEFORE_SLEEP);
    if excluded || (base.is_none() && !asleep) {
        return base;
    }
    mark(&w.resource_version, &w.annotations, &flux_marks(w), base)
}

/// `base` (the workload's wake patch from [`super::plan::wake_patch`], if
/// any) with the GitOps marks removed and their previous values given back,
/// in the same patch. An unreadable record is an error: the caller leaves
/// the workload untouched, as for an unreadable replica record.
pub fn with_wake_unmarks(w: &WorkloadView, base: Option<Value>) -> Result<Option<Value>, String> {
    unmark(&w.resource_version, &w.annotations, base)
}

/// One Argo CD Application as dormant sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApplicationView {
    pub namespace: String,
    pub name: String,
    pub resource_version: Option<String>,
    pub annotations: BTreeMap<String, String>,
    /// `spec.destination.namespace`.
    pub destination_namespace: Option<String>,
}

pub fn application_resource() -> ApiResource {
    ApiResource {
        group: "argoproj.io".into(),
        version: "v1alpha1".into(),
        api_version: "argoproj.io/v1alpha1".into(),
        kind: "Application".into(),
        plural: "applications".into(),
    }
}

impl ApplicationView {
    pub fn from_json(v: &Value) -> Option<Self> {
        let meta = v.get("metadata")?;
        let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(String::from);
        let annotations: BTreeMap<String, String> = meta
            .get("annotations")
            .and_then(Value::as_object)
            .map(|a| a.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
            .unwrap_or_default();
        Some(ApplicationView {
            namespace: s(meta, "namespace")?,
            name: s(meta, "name")?,
            resource_version: s(meta, "resourceVersion"),
            annotations,
            destination_namespace: v
                .get("spec")
                .and_then(|s| s.get("destination"))
                .and_then(|d| s(d, "namespace")),
        })
    }

    pub fn id(&self) -> String {
        format!("Application/{}/{}", self.namespace, self.name)
    }

    /// Paused by dormant (carries its record).
    pub fn paused(&self) -> bool {
        self.annotations.contains_key(GITOPS_BEFORE_SLEEP)
    }
}

impl crate::client::Patchable for ApplicationView {
    fn id(&self) -> String {
        ApplicationView::id(self)
    }
    fn namespace(&self) -> &str {
        &self.namespace
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn api_resource(&self) -> ApiResource {
        application_resource()
    }
    fn reread(&self, v: &Value) -> Option<Self> {
        ApplicationView::from_json(v)
    }
}

/// The Argo CD Applications (namespace, name) that manage any of
/// `workloads`, each with the namespaces of the workloads it tracks — what
/// [`may_pause_application`] needs. Only the tracking annotation counts,
/// unless `label_tracking` (Argo CD set to label tracking) lets the
/// instance label, which Helm charts set too, count as well.
pub fn applications_of<'a>(
    workloads: impl IntoIterator<Item = &'a WorkloadView>,
    control_plane_ns: &str,
    label_tracking: bool,
) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut apps: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for w in workloads {
        for m in managers(&w.labels, &w.annotations) {
            if let Manager::ArgoCd { instance, certain } = m
                && (certain || label_tracking)
            {
                apps.entry(application_key(&instance, control_plane_ns))
                    .or_default()
                    .insert(w.namespace.clone());
            }
        }
    }
    apps
}

/// Whether dormant may pause `app`: pausing stops every deployment it
/// makes, so only when its destination namespace and the namespace of every
/// workload it tracks belong to targets that sleep (`sleeping`: namespaces
/// whose namespace target, or every vcluster in them, is asleep or going to
/// sleep). An Application with no destination namespace (cluster-scoped
/// resources, or namespaces set per object) is never paused.
pub fn may_pause_application<'a>(
    app: &ApplicationView,
    tracked_workload_namespaces: impl IntoIterator<Item = &'a str>,
    sleeping: &BTreeSet<String>,
) -> bool {
    let Some(dest) = app.destination_namespace.as_deref().filter(|d| !d.is_empty()) else { return false };
    sleeping.contains(dest) && tracked_workload_namespaces.into_iter().all(|ns| sleeping.contains(ns))
}

/// Pauses `app` (`argocd.argoproj.io/skip-reconcile: "true"`), recording
/// what it had, unless it already carries dormant's record. Patch it before
/// the sleep patches of its workloads.
pub fn pause_application_patch(app: &ApplicationView) -> Option<Value> {
    mark(&app.resource_version, &app.annotations, &[ARGOCD_SKIP_RECONCILE], None)
}

/// Gives `app` back the `skip-reconcile` it had (usually none). Patch it
/// after the wake patches of its workloads. An unreadable record is an
/// error and changes nothing.
pub fn resume_application_patch(app: &ApplicationView) -> Result<Option<Value>, String> {
    unmark(&app.resource_version, &app.annotations, None)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::scaler::plan::{sleep_patch, wake_patch};
    use crate::target::WorkloadKind;
    use proptest::prelude::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn kustomized() -> Vec<(&'static str, &'static str)> {
        vec![(FLUX_KUSTOMIZATION_NAME, "apps"), (FLUX_KUSTOMIZATION_NAMESPACE, "flux-system")]
    }

    fn helmed() -> Vec<(&'static str, &'static str)> {
        vec![(FLUX_HELMRELEASE_NAME, "web"), (FLUX_HELMRELEASE_NAMESPACE, "team-a")]
    }

    /// A Deployment as the API server would return it.
    fn deployment(name: &str, replicas: i32, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Value {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": name, "namespace": "team-a", "resourceVersion": "1",
                "labels": map(labels), "annotations": map(annotations),
            },
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "c", "image": "x"}]}},
            },
        })
    }

    fn view(v: &Value) -> WorkloadView {
        WorkloadView::from_json(WorkloadKind::Deployment, v).unwrap()
    }

    fn application(annotations: &[(&str, &str)]) -> Value {
        json!({
            "apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
            "metadata": {"name": "shop", "namespace": "argocd", "resourceVersion": "7", "annotations": map(annotations)},
            "spec": {"destination": {"namespace": "team-a", "server": "https://kubernetes.default.svc"}},
        })
    }

    /// RFC 7386: what the API server does with a merge patch. The patch's
    /// resourceVersion must be the object's (else the server answers 409),
    /// and every write bumps it.
    fn apply(obj: &mut Value, patch: &Value) {
        let mut patch = patch.clone();
        if let Some(rv) = patch["metadata"].as_object_mut().and_then(|m| m.remove("resourceVersion")) {
            assert_eq!(
                rv, obj["metadata"]["resourceVersion"],
                "a patch carries the version it was computed from"
            );
        }
        merge(obj, &patch);
        let rv: u64 = obj["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
        obj["metadata"]["resourceVersion"] = json!((rv + 1).to_string());
    }

    fn merge(target: &mut Value, patch: &Value) {
        match patch {
            Value::Object(p) => {
                if !target.is_object() {
                    *target = json!({});
                }
                let t = target.as_object_mut().unwrap();
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
            other => *target = other.clone(),
        }
    }

    fn annotations_of(obj: &Value) -> BTreeMap<String, String> {
        serde_json::from_value(obj["metadata"]["annotations"].clone()).unwrap_or_default()
    }

    #[test]
    fn argo_cd_and_flux_are_recognised_by_their_own_labels_and_annotations() {
        type Pairs = Vec<(&'static str, &'static str)>;
        let table: Vec<(Pairs, Pairs, Vec<Manager>)> = vec![
            (
                vec![],
                vec![(ARGOCD_TRACKING_ID, "shop:apps/Deployment:team-a/web")],
                vec![Manager::ArgoCd { instance: "shop".into(), certain: true }],
            ),
            (
                vec![(ARGOCD_INSTANCE_LABEL, "shop")],
                vec![(ARGOCD_TRACKING_ID, "apps_shop:apps/Deployment:team-a/web")],
                vec![Manager::ArgoCd { instance: "apps_shop".into(), certain: true }],
            ),
            (
                vec![(ARGOCD_INSTANCE_LABEL, "shop")],
                vec![],
                vec![Manager::ArgoCd { instance: "shop".into(), certain: false }],
            ),
            (
                kustomized(),
                vec![],
                vec![Manager::FluxKustomization { namespace: "flux-system".into(), name: "apps".into() }],
            ),
            (
                helmed(),
                vec![],
                vec![Manager::FluxHelmRelease { namespace: "team-a".into(), name: "web".into() }],
            ),
            (
                vec![("app", "web"), (FLUX_KUSTOMIZATION_NAME, "")],
                vec![(ARGOCD_TRACKING_ID, "garbage")],
                vec![],
            ),
        ];
        for (labels, annotations, want) in table {
            assert_eq!(managers(&map(&labels), &map(&annotations)), want, "{labels:?} {annotations:?}");
        }
        assert_eq!(application_key("shop", "argocd"), ("argocd".into(), "shop".into()));
        assert_eq!(application_key("apps_shop", "argocd"), ("apps".into(), "shop".into()));
    }

    #[test]
    fn one_patch_scales_a_flux_workload_to_zero_and_marks_it() {
        let w = view(&deployment("web", 3, &kustomized(), &[]));
        let p = with_sleep_marks(&w, false, sleep_patch(&w, false).unwrap()).unwrap();
        assert_eq!(
            p,
            json!({
                "metadata": {"resourceVersion": "1", "annotations": {
                    REPLICAS_BEFORE_SLEEP: "3",
                    FLUX_RECONCILE: "disabled",
                    GITOPS_BEFORE_SLEEP: "{\"kustomize.toolkit.fluxcd.io/reconcile\":null}",
                }},
                "spec": {"replicas": 0},
            })
        );
        let w = view(&deployment("web", 1, &helmed(), &[(FLUX_DRIFT_DETECTION, "enabled")]));
        let p = with_sleep_marks(&w, false, sleep_patch(&w, false).unwrap()).unwrap();
        assert_eq!(p["metadata"]["annotations"][FLUX_DRIFT_DETECTION], json!("disabled"));
        assert_eq!(
            p["metadata"]["annotations"][GITOPS_BEFORE_SLEEP],
            json!("{\"helm.toolkit.fluxcd.io/driftDetection\":\"enabled\"}")
        );
    }

    #[test]
    fn no_marks_where_dormant_changes_nothing() {
        let plain = view(&deployment("web", 3, &[], &[]));
        assert_eq!(
            with_sleep_marks(&plain, false, sleep_patch(&plain, false).unwrap()),
            sleep_patch(&plain, false).unwrap(),
            "not GitOps-managed"
        );
        let w = view(&deployment("web", 3, &kustomized(), &[]));
        assert_eq!(
            with_sleep_marks(&w, true, sleep_patch(&w, true).unwrap()),
            None,
            "excluded workloads keep running, unmarked"
        );
        let argo =
            view(&deployment("web", 3, &[], &[(ARGOCD_TRACKING_ID, "shop:apps/Deployment:team-a/web")]));
        let p = with_sleep_marks(&argo, false, sleep_patch(&argo, false).unwrap()).unwrap();
        assert!(
            !p["metadata"]["annotations"].as_object().unwrap().contains_key(GITOPS_BEFORE_SLEEP),
            "Argo CD's mark is on the Application"
        );
    }

    #[test]
    fn a_workload_asleep_without_marks_gets_them_alone_and_marking_twice_changes_nothing() {
        let asleep = view(&deployment("web", 0, &kustomized(), &[(REPLICAS_BEFORE_SLEEP, "2")]));
        assert_eq!(sleep_patch(&asleep, false), Ok(None));
        let p = with_sleep_marks(&asleep, false, None).unwrap();
        assert_eq!(p.get("spec"), None);
        assert_eq!(p["metadata"]["annotations"][FLUX_RECONCILE], json!("disabled"));
        let mut obj = deployment("web", 0, &kustomized(), &[(REPLICAS_BEFORE_SLEEP, "2")]);
        apply(&mut obj, &p);
        assert_eq!(with_sleep_marks(&view(&obj), false, None), None);
    }

    #[test]
    fn waking_gives_back_exactly_what_the_annotation_was() {
        for before in [None, Some("enabled"), Some("disabled"), Some("Disabled ")] {
            let ann: Vec<(&str, &str)> = before.map(|b| (FLUX_RECONCILE, b)).into_iter().collect();
            let original = deployment("web", 2, &kustomized(), &ann);
            let mut obj = original.clone();
            let w = view(&obj);
            apply(&mut obj, &with_sleep_marks(&w, false, sleep_patch(&w, false).unwrap()).unwrap());
            assert_eq!(annotations_of(&obj).get(FLUX_RECONCILE).map(String::as_str), Some("disabled"));
            let w = view(&obj);
            apply(&mut obj, &with_wake_unmarks(&w, wake_patch(&w).unwrap()).unwrap().unwrap());
            assert_eq!(annotations_of(&obj), annotations_of(&original), "{before:?}");
            assert_eq!(obj["spec"]["replicas"], json!(2));
            assert_eq!(with_wake_unmarks(&view(&obj), None), Ok(None), "nothing left to do");
        }
    }

    #[test]
    fn a_mark_changed_while_asleep_stays_and_an_unreadable_record_stops_the_wake() {
        let w = view(&deployment(
            "web",
            0,
            &kustomized(),
            &[
                (REPLICAS_BEFORE_SLEEP, "2"),
                (FLUX_RECONCILE, "enabled"),
                (GITOPS_BEFORE_SLEEP, "{\"kustomize.toolkit.fluxcd.io/reconcile\":null}"),
            ],
        ));
        let p = with_wake_unmarks(&w, wake_patch(&w).unwrap()).unwrap().unwrap();
        let a = p["metadata"]["annotations"].as_object().unwrap();
        assert!(!a.contains_key(FLUX_RECONCILE), "their value stays: {p}");
        assert_eq!(a[GITOPS_BEFORE_SLEEP], Value::Null);
        for bad in ["disabled", "{\"app\":null}", "{\"kustomize.toolkit.fluxcd.io/reconcile\":3}", "[]"] {
            let w = view(&deployment(
                "web",
                0,
                &kustomized(),
                &[(REPLICAS_BEFORE_SLEEP, "2"), (GITOPS_BEFORE_SLEEP, bad)],
            ));
            let e = with_wake_unmarks(&w, wake_patch(&w).unwrap()).unwrap_err();
            assert!(e.contains(GITOPS_BEFORE_SLEEP) && e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn argo_cd_applications_are_paused_and_given_back_their_setting() {
        for before in [None, Some("false"), Some("true")] {
            let ann: Vec<(&str, &str)> = before.map(|b| (ARGOCD_SKIP_RECONCILE, b)).into_iter().collect();
            let original = application(&ann);
            let mut obj = original.clone();
            let app = ApplicationView::from_json(&obj).unwrap();
            assert!(!app.paused());
            let p = pause_application_patch(&app).unwrap();
            assert_eq!(p["metadata"]["resourceVersion"], json!("7"));
            apply(&mut obj, &p);
            let app = ApplicationView::from_json(&obj).unwrap();
            assert_eq!(app.annotations[ARGOCD_SKIP_RECONCILE], "true");
            assert!(app.paused());
            assert_eq!(pause_application_patch(&app), None, "pausing twice changes nothing");
            apply(&mut obj, &resume_application_patch(&app).unwrap().unwrap());
            assert_eq!(annotations_of(&obj), annotations_of(&original), "{before:?}");
            assert_eq!(resume_application_patch(&ApplicationView::from_json(&obj).unwrap()), Ok(None));
        }
        assert_eq!(application_resource().api_version, "argoproj.io/v1alpha1");
        assert_eq!(ApplicationView::from_json(&json!({"metadata": {"name": "x"}})), None);
    }

    #[test]
    fn applications_are_found_through_the_workloads_they_track() {
        let tracked =
            view(&deployment("web", 1, &[], &[(ARGOCD_TRACKING_ID, "shop:apps/Deployment:team-a/web")]));
        let mut elsewhere =
            view(&deployment("api", 1, &[], &[(ARGOCD_TRACKING_ID, "apps_shop:apps/Deployment:team-b/api")]));
        elsewhere.namespace = "team-b".into();
        let labelled = view(&deployment("db", 1, &[(ARGOCD_INSTANCE_LABEL, "shop")], &[]));
        let apps = applications_of([&tracked, &elsewhere, &labelled], "argocd", false);
        assert_eq!(
            apps,
            BTreeMap::from([
                (("apps".to_string(), "shop".to_string()), BTreeSet::from(["team-b".to_string()])),
                (("argocd".to_string(), "shop".to_string()), BTreeSet::from(["team-a".to_string()])),
            ])
        );
        let with_labels = applications_of([&tracked, &labelled], "argocd", true);
        assert_eq!(with_labels.len(), 1, "both name argocd/shop");
    }

    #[test]
    fn an_application_is_paused_only_when_everything_it_deploys_to_sleeps() {
        let app = ApplicationView::from_json(&application(&[])).unwrap();
        let sleeping: BTreeSet<String> = ["team-a".to_string()].into();
        assert!(may_pause_application(&app, ["team-a", "team-a"], &sleeping));
        assert!(
            !may_pause_application(&app, ["team-a", "team-b"], &sleeping),
            "it also deploys to an awake namespace"
        );
        assert!(!may_pause_application(&app, [], &BTreeSet::new()));
        let mut anywhere = app.clone();
        anywhere.destination_namespace = None;
        assert!(!may_pause_application(&anywhere, ["team-a"], &sleeping));
    }

    proptest! {
        /// Merge patches compose: one combined patch does what the two do in turn.
        #[test]
        fn composed_patches_equal_the_two_in_turn(
            x in proptest::collection::btree_map("[ab]", proptest::option::of("[xy]"), 0..3),
            a in proptest::collection::btree_map("[abc]", proptest::option::of("[xy]"), 0..3),
            b in proptest::collection::btree_map("[abc]", proptest::option::of("[xyz]"), 0..3),
        ) {
            let obj = |m: &BTreeMap<String, Option<String>>| json!({"metadata": {"annotations": m}, "spec": {"replicas": 1}});
            let (pa, pb) = (obj(&a), json!({"metadata": {"annotations": b}}));
            let mut turn = obj(&x);
            merge(&mut turn, &pa);
            merge(&mut turn, &pb);
            let mut composed = pa.clone();
            compose(&mut composed, pb);
            let mut once = obj(&x);
            merge(&mut once, &composed);
            prop_assert_eq!(once, turn);
        }

        /// A namespace with Flux- and Argo-CD-managed workloads sleeps and
        /// wakes patch by patch; the agent is killed after any number of
        /// patches of a sleep, then sleeps again, then is killed after any
        /// number of patches of a wake, then wakes again. Every object ends
        /// exactly as it started, and while asleep every workload is at zero
        /// and marked for Flux.
        #[test]
        fn a_sigkill_between_any_two_patches_leaves_a_state_wake_restores_exactly(
            workloads in proptest::collection::vec((0i32..4, 0usize..3, proptest::option::of(prop_oneof!["enabled", "disabled"])), 1..4),
            app_before in proptest::option::of(prop_oneof!["true", "false"]),
            kill_sleep in 0usize..6,
            kill_wake in 0usize..6,
        ) {
            let labels = |kind: usize| match kind { 0 => kustomized(), 1 => helmed(), _ => vec![] };
            let originals: Vec<Value> = workloads.iter().enumerate().map(|(i, (replicas, kind, before))| {
                let mut ann: Vec<(&str, &str)> = vec![(ARGOCD_TRACKING_ID, "shop:apps/Deployment:team-a/w")];
                let key = if *kind == 1 { FLUX_DRIFT_DETECTION } else { FLUX_RECONCILE };
                if let Some(b) = before { ann.push((key, b)); }
                deployment(&format!("w{i}"), *replicas, &labels(*kind), &ann)
            }).collect();
            let app_original = application(&app_before.iter().map(|b| (ARGOCD_SKIP_RECONCILE, b.as_str())).collect::<Vec<_>>());
            let (mut objs, mut app) = (originals.clone(), app_original.clone());

            // Sleep: the Application first, then each workload; `limit` patches at most.
            let sleep = |objs: &mut Vec<Value>, app: &mut Value, limit: usize| {
                let mut n = 0;
                if let Some(p) = pause_application_patch(&ApplicationView::from_json(app).unwrap()) {
                    if n == limit { return; }
                    apply(app, &p);
                    n += 1;
                }
                for obj in objs.iter_mut() {
                    let w = view(obj);
                    if let Some(p) = with_sleep_marks(&w, false, sleep_patch(&w, false).unwrap()) {
                        if n == limit { return; }
                        apply(obj, &p);
                        n += 1;
                    }
                }
            };
            // Wake: each workload, then the Application.
            let wake = |objs: &mut Vec<Value>, app: &mut Value, limit: usize| {
                let mut n = 0;
                for obj in objs.iter_mut() {
                    let w = view(obj);
                    if let Some(p) = with_wake_unmarks(&w, wake_patch(&w).unwrap()).unwrap() {
                        if n == limit { return; }
                        apply(obj, &p);
                        n += 1;
                    }
                }
                if let Some(p) = resume_application_patch(&ApplicationView::from_json(app).unwrap()).unwrap() {
                    if n == limit { return; }
                    apply(app, &p);
                }
            };

            sleep(&mut objs, &mut app, kill_sleep);
            sleep(&mut objs, &mut app, usize::MAX);
            for (obj, (_, kind, _)) in objs.iter().zip(&workloads) {
                prop_assert_eq!(&obj["spec"]["replicas"], &json!(0));
                let a = annotations_of(obj);
                match kind {
                    0 => prop_assert_eq!(a.get(FLUX_RECONCILE).map(String::as_str), Some("disabled")),
                    1 => prop_assert_eq!(a.get(FLUX_DRIFT_DETECTION).map(String::as_str), Some("disabled")),
                    _ => prop_assert!(!a.contains_key(GITOPS_BEFORE_SLEEP)),
                }
            }
            let paused = annotations_of(&app);
            prop_assert_eq!(paused.get(ARGOCD_SKIP_RECONCILE).map(String::as_str), Some("true"));

            wake(&mut objs, &mut app, kill_wake);
            wake(&mut objs, &mut app, usize::MAX);
            for (obj, original) in objs.iter().zip(&originals) {
                prop_assert_eq!(&obj["spec"], &original["spec"]);
                prop_assert_eq!(annotations_of(obj), annotations_of(original));
            }
            prop_assert_eq!(annotations_of(&app), annotations_of(&app_original));
        }
    }

    #[test]
    fn a_record_dormant_did_not_write_is_refused_before_anything_changes() {
        assert!(check_record(&map(&[])).is_ok());
        assert!(
            check_record(&map(&[(GITOPS_BEFORE_SLEEP, r#"{"kustomize.toolkit.fluxcd.io/reconcile":null}"#)]))
                .is_ok()
        );
        for raw in ["disabled", "{}x", r#"{"app":"x"}"#, r#"{"kustomize.toolkit.fluxcd.io/reconcile":1}"#] {
            assert_eq!(check_record(&map(&[(GITOPS_BEFORE_SLEEP, raw)])), Err(raw.to_string()));
        }
    }
}
