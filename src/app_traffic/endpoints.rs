//! Where a held Service's own pods answer: the ready endpoints of the
//! EndpointSlices Kubernetes' EndpointSlice controller keeps for it, by
//! port name, from a watch started when the Service first gets traffic
//! through dormant and stopped once it has had none for a while.
//!
//! Only what that controller made counts (dormant's own slice is the way
//! in, not a way out), and only endpoints that name a Pod in the Service's
//! namespace: dormant forwards to a target's own pods and nowhere else.
//! Whoever may write EndpointSlices could still point the Service (and so
//! kube-proxy, and dormant) elsewhere; Kubernetes' default roles do not
//! allow it (CVE-2021-25740).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio::sync::watch;

use super::slice::{CONTROLLER, MANAGED_BY_LABEL, SERVICE_NAME_LABEL};

/// The ready endpoints of one Service, by port name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ready {
    /// The watch has listed the Service's slices at least once.
    pub known: bool,
    by_port: BTreeMap<String, Vec<SocketAddr>>,
}

impl Ready {
    /// The ready endpoints of port `name`.
    pub fn of(&self, name: &str) -> &[SocketAddr] {
        self.by_port.get(name).map_or(&[], Vec::as_slice)
    }

    /// Reads the Service's slices in `namespace`; see the module
    /// documentation for which endpoints count.
    pub fn from_slices<'a>(namespace: &str, slices: impl IntoIterator<Item = &'a EndpointSlice>) -> Ready {
        let mut by_port: BTreeMap<String, Vec<SocketAddr>> = BTreeMap::new();
        for s in slices {
            let labels = s.metadata.labels.as_ref();
            if labels.and_then(|l| l.get(MANAGED_BY_LABEL)).map(String::as_str) != Some(CONTROLLER) {
                continue;
            }
            let pods = s.endpoints.iter().flatten().filter(|e| {
                // Unset means ready (the API's own reading).
                let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                let pod = e.target_ref.as_ref().is_some_and(|r| {
                    r.kind.as_deref() == Some("Pod")
                        && r.namespace.as_deref().is_none_or(|ns| ns == namespace)
                });
                ready && pod
            });
            let ips: Vec<IpAddr> =
                pods.flat_map(|e| e.addresses.iter()).filter_map(|a| a.parse().ok()).collect();
            for p in s.ports.iter().flatten() {
                let Some(port) = p.port.and_then(|p| u16::try_from(p).ok()) else { continue };
                let entry = by_port.entry(p.name.clone().unwrap_or_default()).or_default();
                entry.extend(ips.iter().map(|ip| SocketAddr::new(*ip, port)));
            }
        }
        for v in by_port.values_mut() {
            v.sort();
            v.dedup();
        }
        Ready { known: true, by_port }
    }
}

struct Watched {
    rx: watch::Receiver<Ready>,
    task: tokio::task::JoinHandle<()>,
    used: Instant,
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The watches of the Services that get traffic through dormant.
pub struct Endpoints {
    client: kube::Client,
    watched: Mutex<HashMap<(String, String), Watched>>,
}

impl Endpoints {
    pub fn new(client: kube::Client) -> Self {
        Endpoints { client, watched: Mutex::new(HashMap::new()) }
    }

    /// The ready endpoints of Service `namespace/service`, as they change;
    /// starts watching them if nobody does.
    pub fn watch(&self, namespace: &str, service: &str) -> watch::Receiver<Ready> {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let key = (namespace.to_string(), service.to_string());
        if let Some(w) = watched.get_mut(&key)
            && !w.task.is_finished()
        {
            w.used = Instant::now();
            return w.rx.clone();
        }
        let (tx, rx) = watch::channel(Ready::default());
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), namespace);
        let config = watcher::Config::default().labels(&format!("{SERVICE_NAME_LABEL}={service}"));
        let ns = namespace.to_string();
        let task = tokio::spawn(async move {
            let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
            let mut listing: BTreeMap<String, EndpointSlice> = BTreeMap::new();
            let stream = watcher(api, config).default_backoff();
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                let name = |s: &EndpointSlice| s.metadata.name.clone().unwrap_or_default();
                match event {
                    Ok(watcher::Event::Apply(s)) => {
                        slices.insert(name(&s), s);
                    }
                    Ok(watcher::Event::Delete(s)) => {
                        slices.remove(&name(&s));
                    }
                    Ok(watcher::Event::Init) => {
                        listing.clear();
                        continue;
                    }
                    Ok(watcher::Event::InitApply(s)) => {
                        listing.insert(name(&s), s);
                        continue;
                    }
                    Ok(watcher::Event::InitDone) => slices = std::mem::take(&mut listing),
                    Err(e) => {
                        tracing::debug!(namespace = %ns, error = %e, "endpoint slice watch error; retrying");
                        continue;
                    }
                }
                let ready = Ready::from_slices(&ns, slices.values());
                tx.send_if_modified(|r| {
                    let changed = *r != ready;
                    *r = ready;
                    changed
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        watched.insert(key, Watched { rx: rx.clone(), task, used: Instant::now() });
        rx
    }

    /// Stops the watches nobody asked for in `idle`.
    pub fn sweep(&self, idle: Duration) {
        self.watched.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, w| w.used.elapsed() < idle);
    }

    /// Services watched now.
    pub fn watching(&self) -> usize {
        self.watched.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(managed_by: &str, endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": "web-x", "namespace": "shop", "labels": {MANAGED_BY_LABEL: managed_by, SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }))
        .unwrap()
    }

    #[test]
    fn only_ready_pods_of_the_services_namespace_in_the_controllers_slices_count() {
        let pod = |ns: &str| json!({"kind": "Pod", "namespace": ns, "name": "web-1"});
        let theirs = slice(
            CONTROLLER,
            json!([
                {"addresses": ["10.1.0.1"], "conditions": {"ready": true}, "targetRef": pod("shop")},
                {"addresses": ["10.1.0.2"], "targetRef": pod("shop")},
                {"addresses": ["10.1.0.3"], "conditions": {"ready": false}, "targetRef": pod("shop")},
                {"addresses": ["10.1.0.4"], "conditions": {"ready": true}, "targetRef": pod("elsewhere")},
                {"addresses": ["10.1.0.5"], "conditions": {"ready": true}},
                {"addresses": ["169.254.169.254"], "conditions": {"ready": true}, "targetRef": {"kind": "Node", "name": "n"}},
            ]),
        );
        let forged = slice("someone", json!([{"addresses": ["10.9.9.9"], "targetRef": pod("shop")}]));
        let ours = slice("dormant.dev", json!([{"addresses": ["10.0.0.7"]}]));
        let r = Ready::from_slices("shop", [&theirs, &forged, &ours]);
        assert!(r.known);
        let want: Vec<SocketAddr> = vec!["10.1.0.1:8080".parse().unwrap(), "10.1.0.2:8080".parse().unwrap()];
        assert_eq!(r.of("http"), want.as_slice());
        assert!(r.of("grpc").is_empty());
        assert!(!Ready::default().known);
    }
}
