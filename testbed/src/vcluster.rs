//! A stand-in for a vcluster, small and real where it matters.
//!
//! It creates what the vcluster Helm chart creates in the host namespace: a
//! StatefulSet labelled `app=vcluster`, `release=<name>`, its Service and a
//! `vc-<name>` Secret holding a kubeconfig. Its API server is a second, real
//! kube-apiserver on the testbed's etcd (prefix `/vc-<namespace>-<name>`),
//! and, as with a real vcluster, it lives and dies with the control-plane pod:
//! a supervisor watches the StatefulSet's pod, starts the API server when the
//! pod is Ready and kills it when the pod goes away. So a sleeping vcluster
//! really refuses connections, and a wake really takes the API server's
//! start-up time.
//!
//! While awake, the supervisor also plays the syncer's part for pods: each Pod
//! in the vcluster's API server gets a host pod `<pod>-x-<namespace>-x-<name>`
//! labelled `vcluster.loft.sh/managed-by=<name>` (with the virtual pod's owners
//! in `vcluster.loft.sh/owner-references`, as the real syncer writes them), and
//! host pods whose vcluster pod is gone are deleted. The real vcluster
//! ([`crate::real_vcluster`]) runs where fidelity matters; this one where
//! speed does.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;

use crate::process::{Proc, free_port};
use crate::{AuditWebhook, Cluster, kubeconfig_yaml, lock, spawner};

pub const MANAGED_BY: &str = "vcluster.loft.sh/managed-by";

#[derive(Clone, Debug, Default)]
pub struct VClusterOptions {
    /// Pods created in the vcluster's `default` namespace once its API server
    /// first comes up (each becomes a synced host pod).
    pub pods: usize,
    /// Send the vcluster API server's audit events here.
    pub audit: Option<AuditWebhook>,
    /// Extra annotations on the StatefulSet (the vcluster target).
    pub annotations: Vec<(String, String)>,
    /// Client certificates signed by a CA of its own, not the one that
    /// signed its serving certificate, as k3s-based vclusters have: the
    /// Secret's `client-certificate` is then the admin certificate followed
    /// by that CA (as in k3s's `client-admin.crt`), and its
    /// `certificate-authority` only the serving CA.
    pub own_client_ca: bool,
}

/// A running vcluster stand-in. Dropping it stops its supervisor and API
/// server (the host objects stay; delete the namespace to remove them).
pub struct VCluster {
    pub namespace: String,
    pub name: String,
    /// Its API server's URL on loopback (`https://127.0.0.1:<port>`).
    pub server: String,
    /// An admin kubeconfig for its API server, as in the `vc-<name>` Secret.
    pub kubeconfig: PathBuf,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    stop: AtomicBool,
    starts: AtomicU32,
    /// The API server process runs (from its start, before it is ready,
    /// until it is killed).
    running: AtomicBool,
    apiserver: Mutex<Option<Proc>>,
    error: Mutex<Option<String>>,
}

impl VCluster {
    /// Creates the host objects of vcluster `name` in `namespace` (which must
    /// exist) and starts its supervisor. Returns once the objects exist; the
    /// control plane comes up when its pod is Ready (see [`VCluster::wait_serving`]).
    pub fn create(cluster: &Cluster, namespace: &str, name: &str, opts: VClusterOptions) -> Result<VCluster> {
        let port = free_port()?;
        let server = format!("https://127.0.0.1:{port}");
        let client_ca = match opts.own_client_ca {
            true => {
                let ca = crate::pki::Ca::new(&format!("{name}-client-ca"))?;
                let file = cluster.dir.join(format!("vc-{namespace}-{name}-client-ca.crt"));
                std::fs::write(&file, &ca.cert_pem)?;
                Some((ca, file))
            }
            false => None,
        };
        let admin = match &client_ca {
            Some((ca, _)) => {
                let leaf = ca.client("system:admin", &["system:masters"])?;
                crate::pki::CertPair {
                    cert_pem: format!("{}{}", leaf.cert_pem, ca.cert_pem),
                    key_pem: leaf.key_pem,
                }
            }
            None => cluster.ca.client("kube:admin", &["system:masters"])?,
        };
        let kubeconfig_text = kubeconfig_yaml(&server, &cluster.ca.cert_pem, "kube:admin", &admin);
        let kubeconfig = cluster.dir.join(format!("vc-{namespace}-{name}.kubeconfig"));
        std::fs::write(&kubeconfig, &kubeconfig_text)?;

        let mut annotations = format!("    dormant.dev/upstream: \"{server}\"\n");
        for (k, v) in &opts.annotations {
            annotations.push_str(&format!("    {k}: {}\n", serde_json::to_string(v)?));
        }
        let objects = format!(
            r#"apiVersion: v1
kind: Secret
metadata:
  name: vc-{name}
  namespace: {namespace}
  labels: {{app: vcluster, release: {name}}}
type: Opaque
stringData:
  config: {config}
  certificate-authority: {ca}
  client-certificate: {cert}
  client-key: {key}
---
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {namespace}
  labels: {{app: vcluster, release: {name}}}
spec:
  type: ClusterIP
  selector: {{app: vcluster, release: {name}}}
  ports:
  - {{name: https, port: 443, targetPort: 8443, protocol: TCP}}
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: {name}
  namespace: {namespace}
  labels: {{app: vcluster, release: {name}}}
  annotations:
{annotations}spec:
  replicas: 1
  serviceName: {name}-headless
  selector:
    matchLabels: {{app: vcluster, release: {name}}}
  template:
    metadata:
      labels: {{app: vcluster, release: {name}}}
    spec:
      containers:
      - name: syncer
        image: ghcr.io/loft-sh/vcluster-pro:0.30.0
        resources:
          requests: {{cpu: 200m, memory: 256Mi}}
"#,
            config = serde_json::to_string(&kubeconfig_text)?,
            ca = serde_json::to_string(&cluster.ca.cert_pem)?,
            cert = serde_json::to_string(&admin.cert_pem)?,
            key = serde_json::to_string(&admin.key_pem)?,
        );
        cluster.kubectl_apply(&cluster.admin, &objects)?;

        let api_args = {
            let mut a =
                cluster.apiserver_args(port, &format!("/vc-{namespace}-{name}"), opts.audit.as_ref())?;
            a.push("--enable-priority-and-fairness=false".into());
            if let Some((_, file)) = &client_ca {
                for arg in a.iter_mut().filter(|arg| arg.starts_with("--client-ca-file=")) {
                    *arg = format!("--client-ca-file={}", file.display());
                }
            }
            a
        };
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            starts: AtomicU32::new(0),
            running: AtomicBool::new(false),
            apiserver: Mutex::new(None),
            error: Mutex::new(None),
        });
        let ctx = Supervisor {
            host_kubeconfig: cluster.admin.kubeconfig.clone(),
            vc_kubeconfig: kubeconfig.clone(),
            apiserver_bin: cluster.bins.path("kube-apiserver"),
            api_args,
            log_dir: cluster.dir.clone(),
            namespace: namespace.into(),
            name: name.into(),
            initial_pods: opts.pods,
            shared: shared.clone(),
        };
        let errors = shared.clone();
        let thread = std::thread::Builder::new().name(format!("vcluster-{name}")).spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(ctx.run()));
            if let Err(e) = result {
                *lock(&errors.error) = Some(format!("{e:#}"));
            }
        })?;
        Ok(VCluster {
            namespace: namespace.into(),
            name: name.into(),
            server,
            kubeconfig,
            shared,
            thread: Some(thread),
        })
    }

    /// How many times its API server has been started.
    pub fn starts(&self) -> u32 {
        self.shared.starts.load(Ordering::SeqCst)
    }

    /// True while its API server process runs, also while it starts (so a
    /// caller waiting for it to stop does not mistake a starting server
    /// for a stopped one).
    pub fn is_serving(&self) -> bool {
        self.shared.running.load(Ordering::SeqCst)
    }

    /// The supervisor's failure, if it failed.
    pub fn error(&self) -> Option<String> {
        lock(&self.shared.error).clone()
    }

    /// Waits until its API server answers `/readyz`.
    pub fn wait_serving(&self, cluster: &Cluster, timeout: Duration) -> Result<()> {
        cluster.wait_for(timeout, &format!("vcluster {}/{} to serve", self.namespace, self.name), || {
            self.is_serving()
                && std::process::Command::new(cluster.bins.path("kubectl"))
                    .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
                    .args(["get", "--raw", "/readyz", "--request-timeout=2s"])
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false)
        })?;
        if let Some(e) = self.error() {
            return Err(anyhow!("vcluster supervisor failed: {e}"));
        }
        Ok(())
    }

    /// Host pod name for vcluster pod `pod` in vcluster namespace `ns`.
    pub fn host_pod_name(&self, pod: &str, ns: &str) -> String {
        format!("{pod}-x-{ns}-x-{}", self.name)
    }
}

impl Drop for VCluster {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(mut p) = lock(&self.shared.apiserver).take() {
            p.kill();
        }
    }
}

struct Supervisor {
    host_kubeconfig: PathBuf,
    vc_kubeconfig: PathBuf,
    apiserver_bin: PathBuf,
    api_args: Vec<String>,
    log_dir: PathBuf,
    namespace: String,
    name: String,
    initial_pods: usize,
    shared: Arc<Shared>,
}

impl Supervisor {
    async fn run(self) -> Result<()> {
        let host = crate::client_from_kubeconfig(&self.host_kubeconfig).await?;
        let pods: Api<Pod> = Api::namespaced(host.clone(), &self.namespace);
        let selector = format!("app=vcluster,release={}", self.name);
        let mut events = watcher(pods.clone(), watcher::Config::default().labels(&selector)).boxed();
        let mut control_plane: Option<Pod> = None;
        let mut syncer: Option<tokio::task::JoinHandle<()>> = None;
        let mut seeded = false;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                ev = events.next() => {
                    match ev {
                        Some(Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p))) => control_plane = Some(p),
                        Some(Ok(watcher::Event::Delete(_))) => control_plane = None,
                        Some(Ok(_)) => {}
                        Some(Err(e)) => { eprintln!("vcluster {}: watch error: {e}", self.name); }
                        None => return Ok(()),
                    }
                }
                // Only to notice `stop`; pod changes arrive through the watch.
                _ = tick.tick() => {}
            }
            if self.shared.stop.load(Ordering::SeqCst) {
                if let Some(s) = syncer.take() {
                    s.abort();
                }
                return Ok(());
            }
            let up = control_plane.as_ref().is_some_and(pod_ready);
            let running = lock(&self.shared.apiserver).is_some();
            if up && !running {
                let mut proc = spawner::spawn(
                    &format!("vcluster-{}-{}-apiserver", self.namespace, self.name),
                    &self.apiserver_bin,
                    &self.api_args,
                    &self.log_dir,
                )?;
                self.shared.running.store(true, Ordering::SeqCst);
                self.shared.starts.fetch_add(1, Ordering::SeqCst);
                let vc = wait_client(&self.vc_kubeconfig, &mut proc).await.inspect_err(|_| {
                    self.shared.running.store(false, Ordering::SeqCst);
                })?;
                *lock(&self.shared.apiserver) = Some(proc);
                if !seeded {
                    seeded = true;
                    seed_pods(&vc, self.initial_pods).await?;
                }
                syncer = Some(tokio::spawn(sync_pods(
                    vc,
                    pods.clone(),
                    self.namespace.clone(),
                    self.name.clone(),
                )));
            } else if !up && running {
                if let Some(s) = syncer.take() {
                    s.abort();
                }
                if let Some(mut p) = lock(&self.shared.apiserver).take() {
                    p.kill();
                }
                self.shared.running.store(false, Ordering::SeqCst);
            }
        }
    }
}

fn pod_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The stand-in's own client (its readiness check, the seeding, the pod
/// syncer), sending the user agent the real syncer sends (`vcluster/…`):
/// dormant tells a vcluster's own requests from people's by it, and the
/// syncer's list and watch at every start must not count as use (or race
/// a test's request for the newest use) here either.
async fn wait_client(kubeconfig: &std::path::Path, proc: &mut Proc) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?;
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static("vcluster/0.30.0 (dormant testbed stand-in)"),
    ));
    let client = kube::Client::try_from(config)?;
    for _ in 0..600 {
        if let Some(status) = proc.exited() {
            return Err(anyhow!("vcluster API server exited with {status}:\n{}", proc.tail(20)));
        }
        let req = http::Request::get("/readyz").body(Vec::new())?;
        if client.request_text(req).await.is_ok() {
            return Ok(client);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(anyhow!("vcluster API server not ready after 60s:\n{}", proc.tail(20)))
}

async fn seed_pods(vc: &kube::Client, n: usize) -> Result<()> {
    // The vcluster's `default` namespace appears with its API server; wait for it.
    let nss: Api<Namespace> = Api::all(vc.clone());
    for _ in 0..100 {
        if nss.get_opt("default").await?.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // No controller-manager runs for the vcluster, so create the service
    // account that pod admission requires.
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(vc.clone(), "default");
    let sa = serde_json::from_value(json!({"metadata": {"name": "default"}}))?;
    match sas.create(&PostParams::default(), &sa).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e).context("create vcluster service account"),
    }
    let pods: Api<Pod> = Api::namespaced(vc.clone(), "default");
    for i in 0..n {
        let pod: Pod = serde_json::from_value(json!({
            // Owned, as a Deployment's pods are: the syncer records the
            // owner on the host pod, and dormant deletes only such pods at
            // sleep. (No controller-manager runs here, so the owner itself
            // need not exist.)
            "metadata": {"name": format!("app-{i}"), "labels": {"app": "demo"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "app",
                    "uid": "00000000-0000-0000-0000-0000000000a1", "controller": true}]},
            "spec": {"containers": [{"name": "app", "image": "nginx:1.27",
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}
        }))?;
        pods.create(&PostParams::default(), &pod).await.context("create vcluster pod")?;
    }
    Ok(())
}

/// The syncer's pod loop: host pods mirror the vcluster's pods.
async fn sync_pods(vc: kube::Client, host_pods: Api<Pod>, namespace: String, name: String) {
    let vc_pods: Api<Pod> = Api::all(vc);
    let mut events = watcher(vc_pods, watcher::Config::default()).boxed();
    let mut want: Wanted = Wanted::new();
    let mut init: Wanted = Wanted::new();
    while let Some(ev) = events.next().await {
        match ev {
            Ok(watcher::Event::Init) => init.clear(),
            Ok(watcher::Event::InitApply(p)) => {
                init.insert(key(&p), owners(&p));
            }
            Ok(watcher::Event::InitDone) => want = std::mem::take(&mut init),
            Ok(watcher::Event::Apply(p)) => {
                if p.metadata.deletion_timestamp.is_none() {
                    want.insert(key(&p), owners(&p));
                } else {
                    want.remove(&key(&p));
                }
            }
            Ok(watcher::Event::Delete(p)) => {
                want.remove(&key(&p));
            }
            Err(_) => continue,
        }
        if let Err(e) = reconcile_host_pods(&host_pods, &want, &namespace, &name).await {
            eprintln!("vcluster {name}: syncing pods: {e:#}");
        }
    }
}

/// The vcluster's pods by namespace and name, with their owners as the
/// syncer writes them on the host pod (`vcluster.loft.sh/owner-references`).
type Wanted = BTreeMap<(String, String), Option<String>>;

fn key(p: &Pod) -> (String, String) {
    (p.metadata.namespace.clone().unwrap_or_default(), p.metadata.name.clone().unwrap_or_default())
}

fn owners(p: &Pod) -> Option<String> {
    p.metadata.owner_references.as_ref().filter(|o| !o.is_empty()).and_then(|o| serde_json::to_string(o).ok())
}

async fn reconcile_host_pods(host_pods: &Api<Pod>, want: &Wanted, namespace: &str, name: &str) -> Result<()> {
    let lp = ListParams::default().labels(&format!("{MANAGED_BY}={name}"));
    let have = host_pods.list(&lp).await?;
    let mut present = BTreeSet::new();
    for p in have.items {
        let pod_name = p.metadata.name.clone().unwrap_or_default();
        let ann = p.metadata.annotations.clone().unwrap_or_default();
        let origin = (
            ann.get("vcluster.loft.sh/object-namespace").cloned().unwrap_or_default(),
            ann.get("vcluster.loft.sh/object-name").cloned().unwrap_or_default(),
        );
        if want.contains_key(&origin) && p.metadata.deletion_timestamp.is_none() {
            present.insert(origin);
        } else if p.metadata.deletion_timestamp.is_none() {
            let _ = host_pods.delete(&pod_name, &DeleteParams::default()).await;
        }
    }
    for ((ns, pod), owners) in want.iter().filter(|(k, _)| !present.contains(*k)) {
        let host_name = format!("{pod}-x-{ns}-x-{name}");
        let mut annotations =
            json!({"vcluster.loft.sh/object-name": pod, "vcluster.loft.sh/object-namespace": ns});
        if let Some(o) = owners {
            annotations["vcluster.loft.sh/owner-references"] = json!(o);
        }
        let p: Pod = serde_json::from_value(json!({
            "metadata": {
                "name": host_name,
                "namespace": namespace,
                "labels": {MANAGED_BY: name, "vcluster.loft.sh/namespace": ns},
                "annotations": annotations,
            },
            "spec": {"containers": [{"name": "app", "image": "nginx:1.27",
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}
        }))?;
        match host_pods.create(&PostParams::default(), &p).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The `vc-<name>` Secret's kubeconfig, as a user would extract it.
pub async fn secret_kubeconfig(client: &kube::Client, namespace: &str, name: &str) -> Result<String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let s = secrets.get(&format!("vc-{name}")).await?;
    let data = s.data.unwrap_or_default();
    let config = data.get("config").ok_or_else(|| anyhow!("vc-{name} has no config key"))?;
    Ok(String::from_utf8(config.0.clone())?)
}

/// Replica count of the vcluster's StatefulSet.
pub async fn replicas(client: &kube::Client, namespace: &str, name: &str) -> Result<i32> {
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    Ok(sts.get(name).await?.spec.replicas.unwrap_or(1))
}
