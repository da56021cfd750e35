//! Which of a sleeping target's Services dormant holds traffic for: a pure
//! function of the Services, the Ingresses and Gateway API routes beside
//! them, and what the target's workloads run.
//!
//! A Service is held when something routes application traffic to it — an
//! Ingress or an HTTPRoute/GRPCRoute in its namespace names it as a
//! backend — or it says so itself (`dormant.dev/app-traffic: "true"`), and
//! its pods are the target's: for a namespace, the selector picks the pods
//! of a workload this sleep scales and of none it leaves running; for a
//! vcluster, the vcluster's syncer made the Service
//! (`vcluster.loft.sh/managed-by: <name>`). `dormant.dev/app-traffic:
//! "false"` opts a Service out.
//!
//! Some Services cannot be held, and are said so: a headless Service
//! (clients dial the pods' own addresses, not the Service's ports), one
//! without a selector (its endpoints are not the target's pods), an
//! `ExternalName`, and one without a TCP port.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::Ingress;
use serde_json::Value;

use crate::target::{TargetKind, TargetRef};
use crate::vocab::{APP_TRAFFIC, MANAGED_BY_LABEL};

/// The pods one workload of a namespace target runs, for matching
/// Services' selectors.
#[derive(Debug, Clone, PartialEq)]
pub struct Pods {
    /// `Kind/name`, for messages.
    pub workload: String,
    /// Its pod template's labels.
    pub labels: BTreeMap<String, String>,
    /// The sleep leaves it running (excluded).
    pub stays_up: bool,
}

/// Why a Service is not held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// Nothing routes to it and it did not opt in: not worth a word.
    NotRouted,
    OptedOut,
    Headless,
    NoSelector,
    ExternalName,
    NoTcpPort,
    /// Its pods are not the target's (a namespace Service selecting no
    /// workload this sleep scales; a host Service no vcluster synced).
    NotTheTargets,
    /// It also selects a workload the sleep leaves running: that one
    /// serves it.
    AlsoSelects(String),
}

impl Skip {
    /// Why, for an Event about a Service something routes to; `None` when
    /// there is nothing to say.
    pub fn reason(&self) -> Option<String> {
        Some(match self {
            Skip::NotRouted | Skip::OptedOut => return None,
            Skip::Headless => "it is headless: clients dial its pods' addresses, not dormant".into(),
            Skip::NoSelector => "it has no selector: its endpoints are not the target's pods".into(),
            Skip::ExternalName => "it is an ExternalName".into(),
            Skip::NoTcpPort => "it has no TCP port".into(),
            Skip::NotTheTargets => "it selects no pods this sleep scales down".into(),
            Skip::AlsoSelects(w) => format!("it also selects {w}, which stays up and serves it"),
        })
    }
}

/// Service names that the Ingresses, HTTPRoutes and GRPCRoutes (as JSON)
/// of `namespace` route to in that same namespace.
pub fn routed_services(namespace: &str, ingresses: &[Ingress], routes: &[Value]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for ing in ingresses {
        let Some(spec) = &ing.spec else { continue };
        let default = spec.default_backend.iter().filter_map(|b| b.service.as_ref());
        let rules = spec
            .rules
            .iter()
            .flatten()
            .filter_map(|r| r.http.as_ref())
            .flat_map(|h| h.paths.iter())
            .filter_map(|p| p.backend.service.as_ref());
        out.extend(default.chain(rules).map(|s| s.name.clone()));
    }
    for route in routes {
        let route_ns = route.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or(namespace);
        let refs = route
            .pointer("/spec/rules")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|r| r.get("backendRefs").and_then(Value::as_array))
            .flatten();
        for r in refs {
            let s = |k: &str| r.get(k).and_then(Value::as_str);
            // Gateway API defaults: the core group, kind Service, the
            // route's own namespace.
            let core = s("group").is_none_or(str::is_empty);
            let service = s("kind").is_none_or(|k| k == "Service");
            if core
                && service
                && s("namespace").unwrap_or(route_ns) == namespace
                && let Some(name) = s("name")
            {
                out.insert(name.to_string());
            }
        }
    }
    out
}

/// Whether a Service selector `selector` picks pods labelled `labels`
/// (every pair present; an empty selector picks nothing here: such a
/// Service has no selector).
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether `target` holds `svc`'s traffic while it sleeps (see the module
/// documentation). `routed`: the Service names something routes to;
/// `pods`: a namespace target's workloads (unused for a vcluster).
pub fn verdict(
    target: &TargetRef,
    svc: &Service,
    routed: &BTreeSet<String>,
    pods: &[Pods],
) -> Result<(), Skip> {
    let name = svc.metadata.name.as_deref().unwrap_or_default();
    let opted = svc.metadata.annotations.as_ref().and_then(|a| a.get(APP_TRAFFIC)).map(|v| v.trim());
    match opted {
        Some("false") => return Err(Skip::OptedOut),
        Some("true") => {}
        _ if routed.contains(name) => {}
        _ => return Err(Skip::NotRouted),
    }
    let Some(spec) = &svc.spec else { return Err(Skip::NoSelector) };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Err(Skip::ExternalName);
    }
    if spec.cluster_ip.as_deref() == Some("None") {
        return Err(Skip::Headless);
    }
    let selector = spec.selector.clone().unwrap_or_default();
    if selector.is_empty() {
        return Err(Skip::NoSelector);
    }
    let tcp = spec.ports.iter().flatten().any(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP");
    if !tcp {
        return Err(Skip::NoTcpPort);
    }
    match target.kind {
        TargetKind::VCluster => {
            let synced = svc.metadata.labels.as_ref().and_then(|l| l.get(MANAGED_BY_LABEL));
            if synced.map(String::as_str) != Some(target.name.as_str()) {
                return Err(Skip::NotTheTargets);
            }
        }
        TargetKind::Namespace => {
            let picked: Vec<&Pods> = pods.iter().filter(|p| selects(&selector, &p.labels)).collect();
            if let Some(up) = picked.iter().find(|p| p.stays_up) {
                return Err(Skip::AlsoSelects(up.workload.clone()));
            }
            if picked.is_empty() {
                return Err(Skip::NotTheTargets);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(v: Value) -> Service {
        serde_json::from_value(v).unwrap()
    }

    fn web(extra: Value) -> Service {
        let mut v = json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        });
        merge(&mut v, extra);
        service(v)
    }

    /// RFC 7386, as the API server applies a merge patch.
    fn merge(a: &mut Value, b: Value) {
        match (a, b) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    match a.get_mut(&k) {
                        Some(existing) if v.is_object() => merge(existing, v),
                        _ => {
                            a.insert(k, v);
                        }
                    }
                }
            }
            (a, b) => *a = b,
        }
    }

    fn pods(labels: &[(&str, &str)], stays_up: bool) -> Pods {
        Pods {
            workload: "Deployment/web".into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            stays_up,
        }
    }

    #[test]
    fn ingresses_and_routes_name_the_services_they_route_to_in_their_namespace() {
        let ing: Ingress = serde_json::from_value(json!({
            "metadata": {"name": "shop", "namespace": "shop"},
            "spec": {
                "defaultBackend": {"service": {"name": "fallback", "port": {"number": 80}}},
                "rules": [{"host": "shop.example.com", "http": {"paths": [
                    {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"name": "http"}}}},
                    {"path": "/files", "pathType": "Prefix", "backend": {"resource": {"kind": "Bucket", "name": "b"}}},
                ]}}],
            },
        }))
        .unwrap();
        let route = json!({
            "metadata": {"name": "api", "namespace": "shop"},
            "spec": {"rules": [
                {"backendRefs": [{"name": "api", "port": 8080}, {"name": "other", "namespace": "elsewhere", "port": 80}]},
                {"backendRefs": [{"group": "example.com", "kind": "Bucket", "name": "not-a-service"}]},
                {"backendRefs": [{"group": "", "kind": "Service", "name": "grpc", "port": 9000}]},
            ]},
        });
        let routed = routed_services("shop", &[ing], &[route]);
        assert_eq!(routed, ["api", "fallback", "grpc", "web"].map(String::from).into_iter().collect());
    }

    #[test]
    fn a_routed_service_of_the_targets_pods_is_held_and_every_other_case_says_why_not() {
        let t = TargetRef::namespace("shop");
        let routed: BTreeSet<String> = ["web".to_string()].into();
        let mine = [pods(&[("app", "web"), ("tier", "front")], false)];
        assert_eq!(verdict(&t, &web(json!({})), &routed, &mine), Ok(()));
        // Not routed: held only when it opts in.
        assert_eq!(verdict(&t, &web(json!({})), &BTreeSet::new(), &mine), Err(Skip::NotRouted));
        let opt_in = web(json!({"metadata": {"annotations": {APP_TRAFFIC: "true"}}}));
        assert_eq!(verdict(&t, &opt_in, &BTreeSet::new(), &mine), Ok(()));
        let opt_out = web(json!({"metadata": {"annotations": {APP_TRAFFIC: "false"}}}));
        assert_eq!(verdict(&t, &opt_out, &routed, &mine), Err(Skip::OptedOut));
        let cases = [
            (json!({"spec": {"clusterIP": "None"}}), Skip::Headless),
            (json!({"spec": {"selector": null}}), Skip::NoSelector),
            (json!({"spec": {"type": "ExternalName", "externalName": "x.example.com"}}), Skip::ExternalName),
            (json!({"spec": {"ports": [{"port": 53, "protocol": "UDP"}]}}), Skip::NoTcpPort),
            (json!({"spec": {"selector": {"app": "api"}}}), Skip::NotTheTargets),
        ];
        for (patch, want) in cases {
            let r = verdict(&t, &web(patch.clone()), &routed, &mine);
            assert_eq!(r, Err(want.clone()), "{patch}");
            assert!(want.reason().is_some(), "{want:?} is worth a word");
        }
        // A Service that also selects a workload the sleep leaves running.
        let both = [pods(&[("app", "web")], false), pods(&[("app", "web")], true)];
        let r = verdict(&t, &web(json!({})), &routed, &both);
        assert_eq!(r, Err(Skip::AlsoSelects("Deployment/web".into())));
        assert!(r.unwrap_err().reason().unwrap().contains("stays up"));
    }

    #[test]
    fn a_vclusters_services_are_the_host_services_its_syncer_made() {
        let t = TargetRef::vcluster("team-a", "dev");
        let routed: BTreeSet<String> = ["web".to_string()].into();
        let synced = web(json!({"metadata": {"labels": {MANAGED_BY_LABEL: "dev"}}}));
        assert_eq!(verdict(&t, &synced, &routed, &[]), Ok(()));
        let other = web(json!({"metadata": {"labels": {MANAGED_BY_LABEL: "prod"}}}));
        assert_eq!(verdict(&t, &other, &routed, &[]), Err(Skip::NotTheTargets));
        assert_eq!(verdict(&t, &web(json!({})), &routed, &[]), Err(Skip::NotTheTargets));
    }

    #[test]
    fn an_empty_selector_selects_nothing() {
        let labels: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
        assert!(!selects(&BTreeMap::new(), &labels));
        assert!(selects(&labels, &labels));
    }
}
