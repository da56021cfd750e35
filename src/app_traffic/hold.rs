//! The controller's side: at sleep, a slice of dormant's for each Service
//! the target holds ([`super::select`], [`super::slice`]); at wake, each
//! one deleted once its Service's own endpoints are ready again (or the
//! wake has waited past its limit). Every step is idempotent and reads
//! what it needs from the cluster, so a SIGKILL anywhere leaves a state the
//! next leader finishes from:
//!
//! - a slice exists for each held Service from the `sleeping` mark on
//!   (made before any workload scales down, so no request meets a Service
//!   with no endpoint), and is checked again at every reconcile while the
//!   target sleeps: one deleted by hand or by a tool is made again, one
//!   whose Service changed its ports or whose agent moved is patched;
//! - a waking target's slices are stamped with the wake's start (the
//!   stamp survives a restart), released Service by Service, and released
//!   also after the target is marked awake (its reconcile keeps coming
//!   back while one remains).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PostParams};
use kube::discovery::ApiResource;
use kube::runtime::reflector::{ObjectRef, Store};
use serde_json::json;

use super::endpoints::Ready;
use super::select::{Pods, Skip, routed_services, verdict};
use super::slice::{self, Change, HeldPort, SERVICE_NAME_LABEL};
use crate::client::{Patcher, patch_params};
use crate::policy::annotations::rfc3339;
use crate::target::{Scope, Stores, TargetKind, TargetRef, WorkloadKind, WorkloadView};
use crate::vocab::{FIELD_MANAGER, MANAGED_BY_LABEL, SLICE_WAKING_SINCE};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to read the {what} of namespace {namespace}")]
    List {
        what: &'static str,
        namespace: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to write EndpointSlice {namespace}/{name}")]
    Write {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot hold Service {namespace}/{service}")]
    Slice {
        namespace: String,
        service: String,
        #[source]
        source: slice::Error,
    },
}

impl Error {
    /// Short, stable category (metric label).
    pub fn category(&self) -> &'static str {
        match self {
            Error::List { .. } => "read-services",
            Error::Write { .. } => "write-endpointslice",
            Error::Slice { .. } => "hold-service",
        }
    }
}

/// Where the agent answers: what dormant's slices list.
#[derive(Clone)]
pub enum Advertise {
    /// These addresses (an agent outside the cluster, a test).
    Static(Vec<IpAddr>),
    /// The ready endpoints of a Service of the agent's own, from the
    /// EndpointSlices Kubernetes keeps for it: the agent's pods, as they
    /// come and go.
    Service { namespace: String, name: String, slices: Store<EndpointSlice> },
}

impl Advertise {
    /// The addresses now.
    pub fn addresses(&self) -> Vec<IpAddr> {
        match self {
            Advertise::Static(a) => a.clone(),
            Advertise::Service { namespace, name, slices } => {
                let mine: Vec<Arc<EndpointSlice>> = slices.state();
                let mut out: Vec<IpAddr> = mine
                    .iter()
                    .filter(|s| {
                        s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) == Some(name)
                            && s.metadata.namespace.as_ref() == Some(namespace)
                    })
                    .flat_map(|s| s.endpoints.iter().flatten())
                    .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                    .flat_map(|e| e.addresses.iter())
                    .filter_map(|a| a.parse().ok())
                    .collect();
                out.sort();
                out.dedup();
                out
            }
        }
    }
}

/// Whether dormant's slice `s` is this agent's: in a namespace of its
/// scope. Several agents (each limited to its own namespaces) may share a
/// cluster; each serves and numbers only its own slices.
pub fn mine(stores: &Stores, scope: &Scope, s: &EndpointSlice) -> bool {
    s.metadata.namespace.as_deref().is_some_and(|ns| stores.in_scope(scope, ns))
}

/// What a sleep did about app traffic.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Held {
    /// Services whose slice was made now.
    pub made: Vec<String>,
    /// Services whose slice was made again (it was gone while the target
    /// slept) or changed.
    pub mended: Vec<String>,
    /// Services something routes to that cannot be held, and why.
    pub skipped: Vec<(String, String)>,
}

/// What a wake did about app traffic.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Released {
    pub released: Vec<String>,
    /// Released without their endpoints ready: the wake waited too long.
    pub gave_up: Vec<String>,
    /// Still held (their endpoints are not ready yet).
    pub pending: Vec<String>,
}

/// Holds and releases targets' Services (the leader's part).
pub struct Holder {
    patcher: Patcher,
    stores: Stores,
    /// dormant's own slices, every one (a watch by label).
    slices: Store<EndpointSlice>,
    ports: RangeInclusive<u16>,
    advertise: Advertise,
    /// This agent's namespaces: slices elsewhere are another agent's, on
    /// its own addresses, and take none of this one's ports.
    scope: Scope,
    /// Ports given out by this process that the store does not show yet.
    /// By slice (namespace, name), so a slice's own ports are never taken
    /// for another's.
    reserved: Mutex<BTreeMap<(String, String), BTreeSet<u16>>>,
    /// Targets whose last hold failed (no address of the agent's yet, an
    /// API error): looked at again when the agent's addresses change.
    failed: Mutex<BTreeSet<TargetRef>>,
}

fn http_routes() -> [ApiResource; 2] {
    ["HTTPRoute", "GRPCRoute"].map(|kind| ApiResource {
        group: "gateway.networking.k8s.io".into(),
        version: "v1".into(),
        api_version: "gateway.networking.k8s.io/v1".into(),
        kind: kind.into(),
        plural: format!("{}s", kind.to_ascii_lowercase()),
    })
}

impl Holder {
    pub fn new(
        patcher: Patcher,
        stores: Stores,
        slices: Store<EndpointSlice>,
        ports: RangeInclusive<u16>,
        advertise: Advertise,
        scope: Scope,
    ) -> Self {
        Holder {
            patcher,
            stores,
            slices,
            ports,
            advertise,
            scope,
            reserved: Mutex::new(BTreeMap::new()),
            failed: Mutex::new(BTreeSet::new()),
        }
    }

    /// The targets to look at again when the agent's own addresses change:
    /// those holding a Service (their slices list the old addresses) and
    /// those whose hold failed (perhaps for want of an address).
    pub fn address_dependent(&self) -> BTreeSet<TargetRef> {
        let mut out: BTreeSet<TargetRef> =
            self.slices.state().iter().filter_map(|s| slice::target(s)).collect();
        out.extend(self.failed.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned());
        out
    }

    /// `t` no longer needs holding (it is awake): a failed hold is moot.
    pub fn clear_failure(&self, t: &TargetRef) {
        self.failed.lock().unwrap_or_else(|e| e.into_inner()).remove(t);
    }

    fn client(&self) -> kube::Client {
        self.patcher.client().clone()
    }

    /// dormant's slices for `t`, as the watch has them.
    pub fn slices_of(&self, t: &TargetRef) -> Vec<Arc<EndpointSlice>> {
        self.slices
            .state()
            .into_iter()
            .filter(|s| {
                s.metadata.namespace.as_deref() == Some(t.namespace.as_str())
                    && slice::target(s).as_ref() == Some(t)
            })
            .collect()
    }

    /// Whether `t` holds any Service now.
    pub fn holds(&self, t: &TargetRef) -> bool {
        !self.slices_of(t).is_empty()
    }

    /// The pods a namespace's workloads run, for matching selectors;
    /// `stays_up` says which the sleep leaves running.
    pub fn pods(&self, workloads: &[WorkloadView], stays_up: impl Fn(&WorkloadView) -> bool) -> Vec<Pods> {
        let labels = |w: &WorkloadView| {
            fn at<K: kube::Resource<DynamicType = ()>>(w: &WorkloadView) -> ObjectRef<K> {
                ObjectRef::new(&w.name).within(&w.namespace)
            }
            let labels = match w.kind {
                WorkloadKind::Deployment => {
                    self.stores.deployments.get(&at(w)).map(|d| d.template_labels.clone())
                }
                WorkloadKind::StatefulSet => {
                    self.stores.statefulsets.get(&at(w)).map(|s| s.template_labels.clone())
                }
                WorkloadKind::ReplicaSet => {
                    self.stores.replicasets.get(&at(w)).map(|r| r.template_labels.clone())
                }
                WorkloadKind::CronJob | WorkloadKind::Job => None,
            };
            labels.unwrap_or_default()
        };
        workloads
            .iter()
            .filter(|w| w.kind.scales())
            .map(|w| Pods {
                workload: format!("{}/{}", w.kind.as_str(), w.name),
                labels: labels(w),
                stays_up: stays_up(w),
            })
            .collect()
    }

    async fn list<K>(
        &self,
        api: Api<K>,
        lp: &ListParams,
        what: &'static str,
        ns: &str,
    ) -> Result<Vec<K>, Error>
    where
        K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        self.patcher.throttle().wait().await;
        match api.list(lp).await {
            Ok(l) => Ok(l.items),
            // A kind the cluster does not serve (no Gateway API): none.
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(Vec::new()),
            Err(source) => Err(Error::List { what, namespace: ns.to_string(), source }),
        }
    }

    /// Makes sure every Service `t` holds has dormant's slice, as it should
    /// be, and that no other slice of `t`'s remains (see the module
    /// documentation). `pods`: a namespace target's (see [`Holder::pods`]).
    pub async fn hold(&self, t: &TargetRef, pods: &[Pods]) -> Result<Held, Error> {
        let held = self.try_hold(t, pods).await;
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_ok() {
            failed.remove(t);
        } else {
            failed.insert(t.clone());
        }
        held
    }

    async fn try_hold(&self, t: &TargetRef, pods: &[Pods]) -> Result<Held, Error> {
        let ns = &t.namespace;
        let c = self.client();
        let all = ListParams::default();
        let services: Vec<Service> = match t.kind {
            TargetKind::Namespace => self.list(Api::namespaced(c.clone(), ns), &all, "Services", ns).await?,
            TargetKind::VCluster => {
                let lp = ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={}", t.name));
                self.list(Api::namespaced(c.clone(), ns), &lp, "Services", ns).await?
            }
        };
        let ingresses: Vec<Ingress> =
            self.list(Api::namespaced(c.clone(), ns), &all, "Ingresses", ns).await?;
        let mut routes = Vec::new();
        for r in http_routes() {
            let api: Api<DynamicObject> = Api::namespaced_with(c.clone(), ns, &r);
            for o in self.list(api, &all, "Gateway API routes", ns).await? {
                routes.extend(serde_json::to_value(o).ok());
            }
        }
        let routed = routed_services(ns, &ingresses, &routes);
        let addresses = self.advertise.addresses();
        let mut held = Held::default();
        let mut keep = BTreeSet::new();
        for svc in &services {
            let name = svc.metadata.name.clone().unwrap_or_default();
            match verdict(t, svc, &routed, pods) {
                Ok(()) => {
                    keep.insert(slice::name(&name));
                    match self.ensure(t, svc, &addresses).await? {
                        Ensured::Made => held.made.push(name),
                        Ensured::Mended => held.mended.push(name),
                        Ensured::AsItWas => {}
                    }
                }
                Err(skip) if routed.contains(&name) && skip != Skip::OptedOut => {
                    if let Some(why) = skip.reason() {
                        held.skipped.push((name, why));
                    }
                }
                Err(_) => {}
            }
        }
        for s in self.slices_of(t) {
            let name = s.metadata.name.clone().unwrap_or_default();
            if !keep.contains(&name) {
                self.delete(ns, &name).await?;
            }
        }
        Ok(held)
    }

    /// The ports of every slice dormant has, but `except`'s.
    fn used_ports(&self, except: (&str, &str)) -> BTreeSet<u16> {
        let mut used: BTreeSet<u16> = BTreeSet::new();
        for s in self.slices.state() {
            if !mine(&self.stores, &self.scope, &s) {
                continue;
            }
            let this = (
                s.metadata.namespace.as_deref().unwrap_or_default(),
                s.metadata.name.as_deref().unwrap_or_default(),
            );
            if this != except {
                used.extend(slice::held_ports(&s).iter().map(|p| p.listen));
            }
        }
        let reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        for ((ns, name), ports) in reserved.iter() {
            if (ns.as_str(), name.as_str()) != except {
                used.extend(ports.iter().copied());
            }
        }
        used
    }

    async fn ensure(&self, t: &TargetRef, svc: &Service, addresses: &[IpAddr]) -> Result<Ensured, Error> {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let service = svc.metadata.name.clone().unwrap_or_default();
        let name = slice::name(&service);
        let api: Api<EndpointSlice> = Api::namespaced(self.client(), &ns);
        let write = |source| Error::Write { namespace: ns.clone(), name: name.clone(), source };
        self.patcher.throttle().wait().await;
        let current = api.get_opt(&name).await.map_err(write)?;
        let existing: Vec<HeldPort> = current.as_ref().map(slice::held_ports).unwrap_or_default();
        let used = self.used_ports((&ns, &name));
        // A port another slice holds too (two leaders at once) is given up.
        let existing: Vec<HeldPort> = existing.into_iter().filter(|p| !used.contains(&p.listen)).collect();
        let bad = |source| Error::Slice { namespace: ns.clone(), service: service.clone(), source };
        let ports = slice::assign(svc, &existing, &used, &self.ports).map_err(bad)?;
        self.reserved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((ns.clone(), name.clone()), ports.iter().map(|p| p.listen).collect());
        let want = slice::desired(svc, t, &ports, addresses).map_err(bad)?;
        let pp = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        self.patcher.throttle().wait().await;
        match current {
            None => match api.create(&pp, &want).await {
                Ok(_) => Ok(Ensured::Made),
                // Made meanwhile (another leader, a retried reconcile): the
                // next reconcile compares it.
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Ensured::AsItWas),
                Err(e) => Err(write(e)),
            },
            Some(cur) => match slice::change(&cur, &want) {
                Change::None => Ok(Ensured::AsItWas),
                Change::Patch(p) => match api.patch(&name, &patch_params(), &Patch::Merge(&p)).await {
                    Ok(_) => Ok(Ensured::Mended),
                    Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Ok(Ensured::AsItWas),
                    Err(e) => Err(write(e)),
                },
                Change::Replace => {
                    self.delete(&ns, &name).await?;
                    api.create(&pp, &want).await.map_err(write)?;
                    Ok(Ensured::Mended)
                }
            },
        }
    }

    async fn delete(&self, ns: &str, name: &str) -> Result<(), Error> {
        self.reserved.lock().unwrap_or_else(|e| e.into_inner()).remove(&(ns.to_string(), name.to_string()));
        let api: Api<EndpointSlice> = Api::namespaced(self.client(), ns);
        self.patcher.throttle().wait().await;
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(source) => Err(Error::Write { namespace: ns.into(), name: name.into(), source }),
        }
    }

    /// Releases each Service `t` holds whose own endpoints are ready, or
    /// whose wake began more than `give_up` ago (stamping the start on the
    /// slices the first time).
    pub async fn release(&self, t: &TargetRef, give_up: Duration) -> Result<Released, Error> {
        let mut out = Released::default();
        let now = Utc::now();
        for s in self.slices_of(t) {
            let ns = s.metadata.namespace.clone().unwrap_or_default();
            let name = s.metadata.name.clone().unwrap_or_default();
            let service = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .cloned()
                .unwrap_or_default();
            let since = match slice::waking_since(&s) {
                Some(at) => at,
                None => {
                    let p = json!({"metadata": {"annotations": {SLICE_WAKING_SINCE: rfc3339(now)}}});
                    let api: Api<EndpointSlice> = Api::namespaced(self.client(), &ns);
                    self.patcher.throttle().wait().await;
                    match api.patch(&name, &patch_params(), &Patch::Merge(&p)).await {
                        Ok(_) => now,
                        Err(kube::Error::Api(e)) if e.code == 404 => now,
                        Err(source) => return Err(Error::Write { namespace: ns, name, source }),
                    }
                }
            };
            let ready = self.ready(&ns, &service).await?;
            let ports = slice::held_ports(&s);
            let serving = ports.iter().any(|p| !ready.of(&p.name).is_empty());
            let waited = (now - since).to_std().unwrap_or_default();
            if serving || waited > give_up {
                self.delete(&ns, &name).await?;
                if serving { &mut out.released } else { &mut out.gave_up }.push(service);
            } else {
                out.pending.push(service);
            }
        }
        Ok(out)
    }

    /// A Service's own ready endpoints, read now.
    async fn ready(&self, ns: &str, service: &str) -> Result<Ready, Error> {
        let api: Api<EndpointSlice> = Api::namespaced(self.client(), ns);
        let lp = ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={service}"));
        let slices = self.list(api, &lp, "EndpointSlices", ns).await?;
        Ok(Ready::from_slices(ns, &slices))
    }

    /// The targets that hold a Service now (their slices need the agent's
    /// addresses when those change).
    pub fn holding(&self) -> BTreeSet<TargetRef> {
        self.slices.state().iter().filter_map(|s| slice::target(s)).collect()
    }
}

enum Ensured {
    Made,
    Mended,
    AsItWas,
}
