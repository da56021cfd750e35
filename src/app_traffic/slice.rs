//! dormant's EndpointSlice for a held Service, as pure functions.
//!
//! While a target sleeps, each Service dormant holds gets one more
//! EndpointSlice beside the ones Kubernetes' EndpointSlice controller
//! keeps: labelled `kubernetes.io/service-name: <service>` and
//! `endpointslice.kubernetes.io/managed-by: dormant.dev`, listing the
//! agent's addresses, and for each TCP port of the Service (by name) a
//! port of the agent's own. kube-proxy and ingress controllers send the
//! Service's traffic to the ready endpoints of all its slices; with the
//! workloads at zero, those are dormant's. The port tells the agent which
//! Service and port a connection is for, so nothing a client sends (a
//! `Host` header) can point it at another target.
//!
//! The Service itself is never changed, so there is nothing to restore
//! and nothing for a GitOps controller to revert: waking deletes the slice.
//! The slice is its own record (its ports, its target), and is owned by
//! the Service (garbage-collected with it).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::ops::RangeInclusive;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde_json::{Value, json};

use crate::target::TargetRef;
use crate::vocab::{ENDPOINTSLICE_MANAGER, SLICE_TARGET, SLICE_WAKING_SINCE, WAITING_PAGE};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label that says who keeps an EndpointSlice.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// What Kubernetes' own EndpointSlice controller puts in [`MANAGED_BY_LABEL`].
pub const CONTROLLER: &str = "endpointslice-controller.k8s.io";

/// The name of dormant's slice for Service `service` (the controller names
/// its own `<service>-<random>`).
pub fn name(service: &str) -> String {
    format!("{service}-dormant")
}

/// The label selector of every slice dormant made.
pub fn selector() -> String {
    format!("{MANAGED_BY_LABEL}={ENDPOINTSLICE_MANAGER}")
}

/// One port of a held Service: the Service port's name, the agent's port
/// that stands for it, and its application protocol.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HeldPort {
    pub name: String,
    pub listen: u16,
    pub app_protocol: Option<String>,
}

/// One held Service port, as a listener sees it: which target, Service and
/// port a connection to `listen` is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub target: TargetRef,
    pub namespace: String,
    pub service: String,
    pub port: String,
    pub listen: u16,
    pub app_protocol: Option<String>,
    /// The Service asked for the waiting page (`dormant.dev/waiting-page`,
    /// copied onto the slice when it was made).
    pub waiting_page: bool,
}

impl Route {
    /// The upstream speaks HTTP/2 without TLS (gRPC, `kubernetes.io/h2c`).
    pub fn h2c(&self) -> bool {
        matches!(self.app_protocol.as_deref(), Some("kubernetes.io/h2c" | "h2c" | "grpc"))
    }
}

/// Why no slice can be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("no free port left in {}-{} for the Service's {needed} port(s)", .range.start(), .range.end())]
    PortsExhausted { range: RangeInclusive<u16>, needed: usize },
    #[error("the agent has no {0} address to advertise")]
    NoAddress(&'static str),
}

/// The Service's TCP ports: (name, appProtocol).
fn tcp_ports(svc: &Service) -> Vec<(String, Option<String>)> {
    svc.spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .map(|p| (p.name.clone().unwrap_or_default(), p.app_protocol.clone()))
        .collect()
}

/// Gives each TCP port of `svc` an agent port: the one `existing` (the
/// slice as it is) gives its name, else the lowest in `range` that is
/// neither in `used` nor given here.
pub fn assign(
    svc: &Service,
    existing: &[HeldPort],
    used: &BTreeSet<u16>,
    range: &RangeInclusive<u16>,
) -> Result<Vec<HeldPort>, Error> {
    let wanted = tcp_ports(svc);
    let mut taken: BTreeSet<u16> = used.clone();
    let mut free = range.clone().filter(|p| !used.contains(p));
    let mut out = Vec::with_capacity(wanted.len());
    for (name, app_protocol) in wanted {
        let listen = match existing.iter().find(|h| h.name == name && range.contains(&h.listen)) {
            Some(h) => h.listen,
            None => loop {
                let p = free
                    .next()
                    .ok_or(Error::PortsExhausted { range: range.clone(), needed: tcp_ports(svc).len() })?;
                if !taken.contains(&p) && !existing.iter().any(|h| h.listen == p) {
                    break p;
                }
            },
        };
        taken.insert(listen);
        out.push(HeldPort { name, listen, app_protocol });
    }
    out.sort();
    Ok(out)
}

/// The address family of `svc` (its first `ipFamilies`, else IPv4) as an
/// EndpointSlice `addressType`.
fn family(svc: &Service) -> &'static str {
    match svc.spec.as_ref().and_then(|s| s.ip_families.as_ref()).and_then(|f| f.first()).map(String::as_str) {
        Some("IPv6") => "IPv6",
        _ => "IPv4",
    }
}

/// Whether `svc` asks for the waiting page.
fn wants_page(svc: &Service) -> bool {
    svc.metadata.annotations.as_ref().and_then(|a| a.get(WAITING_PAGE)).is_some_and(|v| v.trim() == "true")
}

/// What dormant's slice for `svc` should be: `ports` on each of
/// `addresses` (those of the Service's family), held for `target`.
pub fn desired(
    svc: &Service,
    target: &TargetRef,
    ports: &[HeldPort],
    addresses: &[IpAddr],
) -> Result<EndpointSlice, Error> {
    let family = family(svc);
    let mut addrs: Vec<String> = addresses
        .iter()
        .filter(|a| if family == "IPv6" { a.is_ipv6() } else { a.is_ipv4() })
        .map(IpAddr::to_string)
        .collect();
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(Error::NoAddress(family));
    }
    let service = svc.metadata.name.clone().unwrap_or_default();
    let owner = svc.metadata.uid.clone().map(|uid| OwnerReference {
        api_version: "v1".into(),
        kind: "Service".into(),
        name: service.clone(),
        uid,
        controller: Some(false),
        block_owner_deletion: Some(false),
    });
    Ok(EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name(&service)),
            namespace: svc.metadata.namespace.clone(),
            labels: Some(BTreeMap::from([
                (SERVICE_NAME_LABEL.to_string(), service.clone()),
                (MANAGED_BY_LABEL.to_string(), ENDPOINTSLICE_MANAGER.to_string()),
            ])),
            annotations: Some(
                [(SLICE_TARGET.to_string(), target.to_string())]
                    .into_iter()
                    .chain(wants_page(svc).then(|| (WAITING_PAGE.to_string(), "true".to_string())))
                    .collect(),
            ),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        address_type: family.into(),
        endpoints: Some(
            addrs
                .into_iter()
                .map(|a| Endpoint {
                    addresses: vec![a],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        serving: Some(true),
                        terminating: Some(false),
                    }),
                    ..Default::default()
                })
                .collect(),
        ),
        ports: Some(
            ports
                .iter()
                .map(|p| EndpointPort {
                    name: Some(p.name.clone()),
                    port: Some(i32::from(p.listen)),
                    protocol: Some("TCP".into()),
                    app_protocol: p.app_protocol.clone(),
                })
                .collect(),
        ),
    })
}

/// The ports a slice holds, as written.
pub fn held_ports(slice: &EndpointSlice) -> Vec<HeldPort> {
    let mut out: Vec<HeldPort> = slice
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            Some(HeldPort {
                name: p.name.clone().unwrap_or_default(),
                listen: u16::try_from(p.port?).ok()?,
                app_protocol: p.app_protocol.clone(),
            })
        })
        .collect();
    out.sort();
    out
}

/// The addresses a slice lists, sorted.
fn addresses(slice: &EndpointSlice) -> Vec<String> {
    let mut v: Vec<String> =
        slice.endpoints.iter().flatten().flat_map(|e| e.addresses.iter().cloned()).collect();
    v.sort();
    v
}

fn annotation<'a>(slice: &'a EndpointSlice, key: &str) -> Option<&'a str> {
    slice.metadata.annotations.as_ref()?.get(key).map(String::as_str)
}

/// The target a slice of dormant's holds traffic for.
pub fn target(slice: &EndpointSlice) -> Option<TargetRef> {
    annotation(slice, SLICE_TARGET)?.parse().ok()
}

/// Since when the slice's target wakes, as dormant stamped it.
pub fn waking_since(slice: &EndpointSlice) -> Option<chrono::DateTime<chrono::Utc>> {
    annotation(slice, SLICE_WAKING_SINCE)?.parse().ok()
}

/// The routes a slice of dormant's stands for (none when it is not one).
pub fn routes(slice: &EndpointSlice) -> Vec<Route> {
    let labels = slice.metadata.labels.as_ref();
    let ours =
        labels.and_then(|l| l.get(MANAGED_BY_LABEL)).map(String::as_str) == Some(ENDPOINTSLICE_MANAGER);
    let (Some(service), Some(target), Some(namespace)) =
        (labels.and_then(|l| l.get(SERVICE_NAME_LABEL)), target(slice), slice.metadata.namespace.as_ref())
    else {
        return Vec::new();
    };
    if !ours {
        return Vec::new();
    }
    held_ports(slice)
        .into_iter()
        .map(|p| Route {
            target: target.clone(),
            namespace: namespace.clone(),
            service: service.clone(),
            port: p.name,
            listen: p.listen,
            app_protocol: p.app_protocol,
            waiting_page: annotation(slice, WAITING_PAGE) == Some("true"),
        })
        .collect()
}

/// What to do to make `current` (dormant's slice as it is) into `want`.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    None,
    /// A merge patch at the version it was computed from.
    Patch(Value),
    /// The address family changed, which a slice cannot: delete, then
    /// create.
    Replace,
}

/// See [`Change`]. A wake's stamp goes: a slice that holds traffic again
/// (a new sleep) starts its next wake afresh.
pub fn change(current: &EndpointSlice, want: &EndpointSlice) -> Change {
    if current.address_type != want.address_type {
        return Change::Replace;
    }
    let same = held_ports(current) == held_ports(want)
        && addresses(current) == addresses(want)
        && target(current) == target(want)
        && annotation(current, WAITING_PAGE) == annotation(want, WAITING_PAGE)
        && waking_since(current).is_none()
        && annotation(current, SLICE_WAKING_SINCE).is_none()
        && current.metadata.labels.as_ref().and_then(|l| l.get(MANAGED_BY_LABEL))
            == want.metadata.labels.as_ref().and_then(|l| l.get(MANAGED_BY_LABEL));
    if same {
        return Change::None;
    }
    let mut meta = crate::client::metadata(
        &current.metadata.resource_version,
        json!({
            SLICE_TARGET: annotation(want, SLICE_TARGET),
            WAITING_PAGE: annotation(want, WAITING_PAGE),
            SLICE_WAKING_SINCE: null,
        }),
    );
    meta["labels"] = json!(want.metadata.labels);
    Change::Patch(json!({
        "metadata": meta,
        "endpoints": want.endpoints,
        "ports": want.ports,
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn service() -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u-1"},
            "spec": {
                "selector": {"app": "web"},
                "ports": [
                    {"name": "http", "port": 80, "targetPort": 8080},
                    {"name": "grpc", "port": 9000, "appProtocol": "kubernetes.io/h2c"},
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                ],
            },
        }))
        .unwrap()
    }

    #[test]
    fn each_tcp_port_gets_a_free_agent_port_and_keeps_it() {
        let range = 20000..=20009;
        let used: BTreeSet<u16> = [20000, 20002].into();
        let ports = assign(&service(), &[], &used, &range).unwrap();
        let by_name: BTreeMap<&str, u16> = ports.iter().map(|p| (p.name.as_str(), p.listen)).collect();
        assert_eq!(by_name, BTreeMap::from([("http", 20001), ("grpc", 20003)]));
        // A slice that already holds a port keeps it (its own port counts
        // as used in the store, as it is).
        let existing = vec![HeldPort { name: "http".into(), listen: 20005, app_protocol: None }];
        let used: BTreeSet<u16> = [20000, 20005].into();
        let again = assign(&service(), &existing, &used, &range).unwrap();
        let by_name: BTreeMap<&str, u16> = again.iter().map(|p| (p.name.as_str(), p.listen)).collect();
        assert_eq!(by_name, BTreeMap::from([("http", 20005), ("grpc", 20001)]));
        let full: BTreeSet<u16> = range.clone().skip(1).collect();
        assert_eq!(
            assign(&service(), &[], &full, &range),
            Err(Error::PortsExhausted { range: range.clone(), needed: 2 })
        );
    }

    #[test]
    fn the_slice_lists_the_agents_addresses_on_the_services_port_names_and_reads_back_as_routes() {
        let t = TargetRef::namespace("shop");
        let ports = assign(&service(), &[], &BTreeSet::new(), &(20000..=20009)).unwrap();
        let addrs: Vec<IpAddr> = vec!["10.0.0.7".parse().unwrap(), "fd00::7".parse().unwrap()];
        let slice = desired(&service(), &t, &ports, &addrs).unwrap();
        let v = serde_json::to_value(&slice).unwrap();
        assert_eq!(v["metadata"]["name"], "web-dormant");
        assert_eq!(v["metadata"]["labels"][SERVICE_NAME_LABEL], "web");
        assert_eq!(v["metadata"]["labels"][MANAGED_BY_LABEL], "dormant.dev");
        assert_eq!(v["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(v["addressType"], "IPv4");
        assert_eq!(
            v["endpoints"],
            json!([{"addresses": ["10.0.0.7"], "conditions": {"ready": true, "serving": true, "terminating": false}}])
        );
        let routes = routes(&slice);
        assert_eq!(routes.len(), 2);
        let grpc = routes.iter().find(|r| r.port == "grpc").unwrap();
        assert_eq!(
            (grpc.target.clone(), grpc.service.as_str(), grpc.namespace.as_str()),
            (t.clone(), "web", "shop")
        );
        assert!(grpc.h2c());
        assert!(!routes.iter().find(|r| r.port == "http").unwrap().h2c());
        // No address of the Service's family: nothing to advertise.
        let v6: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"ipFamilies": ["IPv6"], "selector": {"app": "web"}, "ports": [{"port": 80}]},
        }))
        .unwrap();
        assert_eq!(desired(&v6, &t, &ports, &addrs[..1]).unwrap_err(), Error::NoAddress("IPv6"));
    }

    #[test]
    fn a_slice_that_drifted_is_patched_back_and_a_wake_stamp_goes_at_the_next_sleep() {
        let t = TargetRef::namespace("shop");
        let ports = assign(&service(), &[], &BTreeSet::new(), &(20000..=20009)).unwrap();
        let want = desired(&service(), &t, &ports, &["10.0.0.7".parse().unwrap()]).unwrap();
        let mut current = want.clone();
        current.metadata.resource_version = Some("5".into());
        assert_eq!(change(&current, &want), Change::None);
        // The agent moved (a new pod IP).
        let moved = desired(&service(), &t, &ports, &["10.0.0.8".parse().unwrap()]).unwrap();
        let Change::Patch(p) = change(&current, &moved) else { panic!() };
        assert_eq!(p["metadata"]["resourceVersion"], "5");
        assert_eq!(p["endpoints"][0]["addresses"][0], "10.0.0.8");
        // Stamped by a wake that did not finish.
        current
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(SLICE_WAKING_SINCE.into(), "2026-12-01T10:00:00Z".into());
        let Change::Patch(p) = change(&current, &want) else { panic!() };
        assert_eq!(p["metadata"]["annotations"][SLICE_WAKING_SINCE], Value::Null);
        // A slice of another family cannot be patched.
        current.address_type = "IPv6".into();
        assert_eq!(change(&current, &want), Change::Replace);
    }

    #[test]
    fn slices_of_others_stand_for_no_route() {
        let t = TargetRef::namespace("shop");
        let ports = assign(&service(), &[], &BTreeSet::new(), &(20000..=20009)).unwrap();
        let mut slice = desired(&service(), &t, &ports, &["10.0.0.7".parse().unwrap()]).unwrap();
        slice.metadata.labels.as_mut().unwrap().insert(MANAGED_BY_LABEL.into(), CONTROLLER.into());
        assert!(routes(&slice).is_empty());
    }
}
