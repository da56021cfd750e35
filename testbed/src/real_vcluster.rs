//! The real loft-sh/vcluster (v0.30.0, its k8s distro), run on the testbed.
//!
//! The host objects are what `helm template` of the vcluster module's own
//! chart renders from a vcluster.yaml (Secrets, Services, RBAC, the
//! StatefulSet with its `data` claim), applied as they are; kwok runs the
//! control-plane pod as a fake pod. A supervisor plays the kubelet for that
//! one container: when the pod is Ready it starts the real `vcluster start`
//! as a host process, and kills it when the pod goes away (holding a
//! finalizer on the pod until the process is dead, as a kubelet deletes a
//! pod only once its containers have stopped), so a sleeping vcluster
//! really is down and a wake really takes its start-up time. The
//! supervisor gives the process what a kubelet would give the container:
//!
//! - the container's volume mounts, each bind-mounted in a private mount
//!   namespace (`unshare --mount --propagation private`): Secret volumes
//!   written out from the Secret (`vc-config-<name>` at
//!   `/var/lib/vcluster`, any `addVolumes` Secret such as the audit
//!   webhook's), the `data` claim's PersistentVolume (a hostPath folder that
//!   outlives the pod, so the vcluster's objects survive sleep), emptyDirs
//!   as fresh folders, `binaries` as the testbed's own kube-apiserver and
//!   kube-controller-manager (what the chart's init container would copy
//!   from its image), and the service-account volume as a token of the
//!   pod's ServiceAccount from the TokenRequest API (bound to the pod), the
//!   host CA and the namespace; plus `/usr/local/bin/kine`, which the image
//!   carries;
//! - the container's environment, field references resolved from the pod
//!   (`POD_NAME`, `POD_IP`, `NODE_NAME`, `NODE_IP`, …), and
//!   `KUBERNETES_SERVICE_HOST`/`_PORT` pointing at the host API server;
//! - a network namespace of its own ([`crate::netns`]): vcluster's ports
//!   are fixed (8443, 6443, 10257), so two vclusters on one machine each
//!   need one. Forwarders carry the host API server's port and the audit
//!   webhook's into it, and its proxy (8443) out to [`RealVCluster::server`]
//!   on the host's loopback, which the StatefulSet's `dormant.dev/upstream`
//!   annotation names;
//! - a private PID namespace (`unshare --pid --fork --kill-child`): killing
//!   the process kills the API server, controller-manager and kine it
//!   started, and the whole tree dies with the test process
//!   (`PR_SET_PDEATHSIG` from [`crate::spawner`]).
//!
//! `docs/real-vcluster.md` explains each choice. The stand-in
//! ([`crate::vcluster`]) stays for tests that need speed.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod, Secret};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use serde_json::json;

use crate::netns::{self, NetNs};
use crate::process::{Proc, free_port};
use crate::{AuditWebhook, Bins, Cluster, lock, spawner};

/// The vcluster proxy's port inside its network namespace (fixed by vcluster).
const PROXY_PORT: u16 = 8443;

/// Held on the control-plane pod while its process runs: kwok deletes a
/// terminating pod at once, where a kubelet deletes it only once its
/// containers have stopped. With it, the pod is gone (and the StatefulSet
/// counts no replica) only after the process is dead, as on a real node.
const FINALIZER: &str = "testbed.dormant.dev/vcluster-process";

/// vcluster 0.30 passes kube-controller-manager the controller names of
/// Kubernetes ≤ 1.33 (`-nodeipam`, `-cloud-node-lifecycle`, …), which 1.37
/// refuses; these are the same exclusions under their 1.37 names.
pub const CONTROLLERS_1_37: &str = "--controllers=*,-node-ipam-controller,-node-lifecycle-controller,\
-persistentvolume-binder-controller,-persistentvolume-attach-detach-controller,\
-persistentvolume-expander-controller,-ttl-controller";

/// The audit policy a user would give the vcluster's API server (as in
/// `docs/audit-webhook.md`).
pub const AUDIT_POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: None
  resources:
  - {group: coordination.k8s.io, resources: [leases]}
  - {group: "", resources: [events]}
  - {group: events.k8s.io, resources: [events]}
- level: None
  nonResourceURLs: ["/healthz*", "/livez*", "/readyz*", "/version", "/metrics"]
- level: Metadata
"#;

#[derive(Clone, Debug, Default)]
pub struct RealVClusterOptions {
    /// Send its API server's audit events here (through the vcluster.yaml a
    /// user would write: `apiServer.extraArgs` and a Secret volume).
    pub audit: Option<AuditWebhook>,
    /// Annotations on the StatefulSet (vcluster.yaml's
    /// `controlPlane.statefulSet.annotations`), besides `dormant.dev/upstream`.
    pub annotations: Vec<(String, String)>,
    /// More vcluster.yaml, given to helm after the testbed's (it wins).
    pub values: Option<String>,
}

/// A real vcluster. Dropping it stops its supervisor and process (the host
/// objects stay; delete the namespace to remove them).
pub struct RealVCluster {
    pub namespace: String,
    pub name: String,
    /// Its proxy as the host reaches it: `https://127.0.0.1:<port>`, the
    /// StatefulSet's `dormant.dev/upstream`. Refuses connections while the
    /// vcluster is down.
    pub server: String,
    /// The `vc-<name>` Secret's kubeconfig with `server` in place of
    /// `https://localhost:8443` (written by [`RealVCluster::wait_serving`]).
    pub kubeconfig: PathBuf,
    /// Its folder: `data/` (the PersistentVolume), each start's mounts.
    pub dir: PathBuf,
    /// The vcluster.yaml it was rendered from.
    pub values_file: PathBuf,
    /// What `helm template` rendered.
    pub manifest: String,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    _netns: Arc<NetNs>,
    kubectl: PathBuf,
    host_kubeconfig: PathBuf,
}

struct Shared {
    stop: AtomicBool,
    starts: AtomicU32,
    running: AtomicBool,
    process: Mutex<Option<Proc>>,
    /// The log file of each start, in order.
    logs: Mutex<Vec<PathBuf>>,
    error: Mutex<Option<String>>,
}

impl RealVCluster {
    /// Renders and applies the host objects of vcluster `name` in
    /// `namespace` (which must exist) and starts its supervisor. Returns
    /// once the objects exist; the control plane comes up when its pod is
    /// Ready (see [`RealVCluster::wait_serving`]).
    pub fn create(
        cluster: &Cluster,
        namespace: &str,
        name: &str,
        opts: RealVClusterOptions,
    ) -> Result<RealVCluster> {
        let tools = Bins::vcluster_dir()?;
        let dir = cluster.dir.join(format!("vcluster-{namespace}-{name}"));
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        let port = free_port()?;
        let server = format!("https://127.0.0.1:{port}");
        let netns = Arc::new(NetNs::new(name)?);
        let host_port = port_of(&cluster.server)?;
        let mut outward = vec![host_port];
        if let Some(a) = &opts.audit {
            outward.push(port_of(&a.url)?);
        }
        let outward = outward
            .into_iter()
            .map(|p| Ok((p, netns.listen(p).with_context(|| format!("listen on {p} in the netns"))?)))
            .collect::<Result<Vec<(u16, TcpListener)>>>()?;

        if let Some(audit) = &opts.audit {
            apply_audit_secret(cluster, namespace, audit)?;
        }
        let values_file = dir.join("vcluster.yaml");
        std::fs::write(&values_file, serde_yaml::to_string(&values(&server, &opts))?)?;
        let mut helm = std::process::Command::new(cluster.bins.path("helm"));
        helm.args(["template", name])
            .arg(tools.join("chart"))
            .args(["--namespace", namespace, "--values"])
            .arg(&values_file);
        if let Some(extra) = &opts.values {
            let extra_file = dir.join("vcluster-extra.yaml");
            std::fs::write(&extra_file, extra)?;
            helm.arg("--values").arg(extra_file);
        }
        let out = helm.output().context("run helm template")?;
        if !out.status.success() {
            bail!("helm template failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let manifest = String::from_utf8(out.stdout)?;
        std::fs::write(dir.join("manifest.yaml"), &manifest)?;
        // The volume and its claim first, bound before the pod exists: a pod
        // whose claim is unbound when the scheduler first sees it waits
        // minutes for its next try. (The StatefulSet adopts the claim of the
        // name its template gives.)
        if let Some(size) = data_claim_size(&manifest)? {
            apply_data_volume(cluster, namespace, name, &size, &data)?;
        }
        cluster.kubectl_apply(&cluster.admin, &manifest)?;

        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            starts: AtomicU32::new(0),
            running: AtomicBool::new(false),
            process: Mutex::new(None),
            logs: Mutex::new(Vec::new()),
            error: Mutex::new(None),
        });
        let supervisor = Supervisor {
            host_kubeconfig: cluster.admin.kubeconfig.clone(),
            namespace: namespace.into(),
            name: name.into(),
            dir: dir.clone(),
            log_dir: cluster.dir.clone(),
            vcluster_bin: tools.join("vcluster"),
            kine_bin: tools.join("kine"),
            binaries: cluster.bins.dir.clone(),
            ca_file: cluster.ca_file.clone(),
            host_port,
            proxy_port: port,
            netns: netns.clone(),
            shared: shared.clone(),
        };
        let errors = shared.clone();
        let thread =
            crate::runtime_thread(format!("real-vcluster-{name}"), supervisor.run(outward), move |e| {
                *lock(&errors.error) = Some(e);
            })?;
        Ok(RealVCluster {
            namespace: namespace.into(),
            name: name.into(),
            server,
            kubeconfig: dir.join("admin.kubeconfig"),
            dir,
            values_file,
            manifest,
            shared,
            thread: Some(thread),
            _netns: netns,
            kubectl: cluster.bins.path("kubectl"),
            host_kubeconfig: cluster.admin.kubeconfig.clone(),
        })
    }

    /// How many times `vcluster start` has been started.
    pub fn starts(&self) -> u32 {
        self.shared.starts.load(Ordering::SeqCst)
    }

    /// True while its process runs, also while it starts.
    pub fn is_running(&self) -> bool {
        self.shared.running.load(Ordering::SeqCst)
    }

    /// The supervisor's failure (or the last unexpected exit), if any.
    pub fn error(&self) -> Option<String> {
        lock(&self.shared.error).clone()
    }

    /// The process id of `vcluster start` while it runs.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.shared.process).as_ref().map(Proc::pid)
    }

    /// Resident memory of the vcluster's whole process tree (vcluster,
    /// kube-apiserver, kube-controller-manager, kine), in KiB; 0 when down.
    pub fn rss_kib(&self) -> u64 {
        self.pid().map(tree_rss_kib).unwrap_or(0)
    }

    /// The log files of each start, in order.
    pub fn logs(&self) -> Vec<PathBuf> {
        lock(&self.shared.logs).clone()
    }

    /// Every start's log, one after the other.
    pub fn log_text(&self) -> String {
        self.logs()
            .iter()
            .map(|p| format!("==> {} <==\n{}", p.display(), std::fs::read_to_string(p).unwrap_or_default()))
            .collect()
    }

    /// Waits until the syncer has written the `vc-<name>` Secret and its
    /// proxy answers `/readyz` with that Secret's credentials; writes
    /// [`RealVCluster::kubeconfig`].
    pub fn wait_serving(&self, cluster: &Cluster, timeout: Duration) -> Result<()> {
        let what = format!("real vcluster {}/{} to serve", self.namespace, self.name);
        let start = std::time::Instant::now();
        let mut kubeconfig = None;
        while start.elapsed() < timeout {
            if let Some(e) = self.error() {
                return Err(anyhow!("{what}: {e}\n{}", tail(&self.log_text(), 40)));
            }
            if kubeconfig.is_none() {
                kubeconfig = self.secret_kubeconfig(cluster).ok();
                if let Some(text) = &kubeconfig {
                    std::fs::write(&self.kubeconfig, text)?;
                }
            }
            if kubeconfig.is_some() && self.is_running() && self.readyz(cluster) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let host = cluster
            .kubectl_out(
                &cluster.admin,
                &["get", "statefulset,pods,pvc,events", "-n", &self.namespace, "-o", "wide"],
            )
            .unwrap_or_else(|e| e);
        Err(anyhow!(
            "timed out after {timeout:?} waiting for {what}\nin its namespace:\n{host}\nits log:\n{}",
            tail(&self.log_text(), 40)
        ))
    }

    /// `kubectl get --raw /readyz` through [`RealVCluster::server`] answers.
    pub fn readyz(&self, cluster: &Cluster) -> bool {
        std::process::Command::new(cluster.bins.path("kubectl"))
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(["get", "--raw", "/readyz", "--request-timeout=2s"])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// The `vc-<name>` Secret's kubeconfig, its server replaced by [`RealVCluster::server`].
    fn secret_kubeconfig(&self, cluster: &Cluster) -> Result<String> {
        let b64 = cluster
            .kubectl_out(
                &cluster.admin,
                &[
                    "get",
                    "secret",
                    &format!("vc-{}", self.name),
                    "-n",
                    &self.namespace,
                    "-o",
                    "jsonpath={.data.config}",
                ],
            )
            .map_err(|e| anyhow!(e))?;
        use base64::Engine as _;
        let text = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64.trim())?)?;
        let mut doc: serde_yaml::Value = serde_yaml::from_str(&text)?;
        let clusters = doc
            .get_mut("clusters")
            .and_then(|c| c.as_sequence_mut())
            .ok_or_else(|| anyhow!("vc-{} kubeconfig has no clusters", self.name))?;
        for c in clusters {
            if let Some(m) = c.get_mut("cluster").and_then(|c| c.as_mapping_mut()) {
                m.insert("server".into(), self.server.clone().into());
            }
        }
        Ok(serde_yaml::to_string(&doc)?)
    }

    /// Host pod name for vcluster pod `pod` in vcluster namespace `ns`.
    pub fn host_pod_name(&self, pod: &str, ns: &str) -> String {
        format!("{pod}-x-{ns}-x-{}", self.name)
    }
}

impl Drop for RealVCluster {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(mut p) = lock(&self.shared.process).take() {
            p.kill();
        }
        // Nothing plays its kubelet any more: let its pod go.
        let _ = std::process::Command::new(&self.kubectl)
            .arg(format!("--kubeconfig={}", self.host_kubeconfig.display()))
            .args(["patch", "pod", &format!("{}-0", self.name), "-n", &self.namespace, "--type=merge"])
            .args(["-p", r#"{"metadata":{"finalizers":null}}"#, "--request-timeout=5s"])
            .output();
    }
}

/// The testbed's vcluster.yaml: the k8s distro with 1.37's controller names,
/// the embedded database (kine + sqlite on the `data` volume), no
/// telemetry, and, with `audit`, the same audit configuration as
/// `docs/audit-webhook.md` shows users.
fn values(server: &str, opts: &RealVClusterOptions) -> serde_json::Value {
    let mut annotations = serde_json::Map::new();
    annotations.insert("dormant.dev/upstream".into(), server.into());
    for (k, v) in &opts.annotations {
        annotations.insert(k.clone(), v.clone().into());
    }
    let mut api_server_args: Vec<String> = Vec::new();
    let mut persistence = json!({});
    if let Some(audit) = &opts.audit {
        api_server_args = vec![
            "--audit-policy-file=/etc/dormant/audit-policy.yaml".into(),
            "--audit-webhook-config-file=/etc/dormant/webhook.kubeconfig".into(),
            format!("--audit-webhook-batch-max-wait={}ms", audit.batch_max_wait.as_millis()),
        ];
        persistence = json!({
            "addVolumes": [{"name": "dormant-audit", "secret": {"secretName": "dormant-audit-vcluster"}}],
            "addVolumeMounts": [{"name": "dormant-audit", "mountPath": "/etc/dormant", "readOnly": true}],
        });
    }
    json!({
        "controlPlane": {
            "distro": {"k8s": {
                "enabled": true,
                "apiServer": {"extraArgs": api_server_args},
                "controllerManager": {"extraArgs": [CONTROLLERS_1_37]},
            }},
            "backingStore": {"database": {"embedded": {"enabled": true}}},
            "statefulSet": {"annotations": annotations, "persistence": persistence},
        },
        "telemetry": {"enabled": false},
    })
}

/// The Secret `dormant-audit-vcluster` a user creates for the vcluster's
/// audit webhook: the policy and the webhook kubeconfig.
fn apply_audit_secret(cluster: &Cluster, namespace: &str, audit: &AuditWebhook) -> Result<()> {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: dormant\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: kube-apiserver\n  user:\n    token: {}\ncontexts:\n- name: default\n  context: {{cluster: dormant, user: kube-apiserver}}\ncurrent-context: default\n",
        audit.url,
        b64(&audit.ca_pem),
        audit.token
    );
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "dormant-audit-vcluster", "namespace": namespace},
        "stringData": {"audit-policy.yaml": AUDIT_POLICY, "webhook.kubeconfig": kubeconfig},
    });
    cluster.kubectl_apply(&cluster.admin, &serde_json::to_string(&secret)?)?;
    Ok(())
}

/// The storage the StatefulSet's `data` claim template asks for, if it has one.
fn data_claim_size(manifest: &str) -> Result<Option<String>> {
    for doc in manifest.split("\n---") {
        let v: serde_yaml::Value = serde_yaml::from_str(doc)?;
        if v.get("kind").and_then(|k| k.as_str()) != Some("StatefulSet") {
            continue;
        }
        let templates =
            v.get("spec").and_then(|s| s.get("volumeClaimTemplates")).and_then(|t| t.as_sequence());
        for t in templates.into_iter().flatten() {
            if t.get("metadata").and_then(|m| m.get("name")).and_then(|n| n.as_str()) == Some("data") {
                let size = t
                    .get("spec")
                    .and_then(|s| s.get("resources"))
                    .and_then(|r| r.get("requests"))
                    .and_then(|r| r.get("storage"))
                    .and_then(|s| s.as_str())
                    .unwrap_or("5Gi");
                return Ok(Some(size.to_string()));
            }
        }
    }
    Ok(None)
}

/// A PersistentVolume for the StatefulSet's claim `data-<name>-0` (a
/// hostPath folder, as a local-path provisioner would make) and that claim,
/// bound to each other. It outlives the pod, so the vcluster's sqlite
/// database does.
fn apply_data_volume(cluster: &Cluster, namespace: &str, name: &str, size: &str, path: &Path) -> Result<()> {
    let pv_name = format!("vcluster-{namespace}-{name}-data");
    let claim = format!("data-{name}-0");
    let objects = [
        json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": pv_name, "labels": {"testbed": "true"}},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": path.display().to_string(), "type": "Directory"},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        }),
        json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace, "labels": {"app": "vcluster", "release": name}},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "",
                "volumeName": pv_name,
                "resources": {"requests": {"storage": size}},
            },
        }),
    ];
    for o in objects {
        cluster.kubectl_apply(&cluster.admin, &serde_json::to_string(&o)?)?;
    }
    cluster.wait_for(Duration::from_secs(60), &format!("claim {namespace}/{claim} to be bound"), || {
        cluster
            .kubectl_out(
                &cluster.admin,
                &["get", "pvc", &claim, "-n", namespace, "-o", "jsonpath={.status.phase}"],
            )
            .is_ok_and(|p| p.trim() == "Bound")
    })
}

fn port_of(url: &str) -> Result<u16> {
    url.strip_prefix("https://")
        .and_then(|rest| rest.split('/').next())
        .and_then(|hostport| hostport.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow!("no port in {url}"))
}

struct Supervisor {
    host_kubeconfig: PathBuf,
    namespace: String,
    name: String,
    dir: PathBuf,
    log_dir: PathBuf,
    vcluster_bin: PathBuf,
    kine_bin: PathBuf,
    binaries: PathBuf,
    ca_file: PathBuf,
    host_port: u16,
    proxy_port: u16,
    netns: Arc<NetNs>,
    shared: Arc<Shared>,
}

impl Supervisor {
    async fn run(self, outward: Vec<(u16, TcpListener)>) -> Result<()> {
        // Out of the namespace, for as long as it lives: the host API server,
        // the audit webhook.
        for (port, listener) in outward {
            tokio::spawn(netns::forward(listener, move || TcpStream::connect((Ipv4Addr::LOCALHOST, port))));
        }
        let host = crate::client_from_kubeconfig(&self.host_kubeconfig).await?;
        let pods: Api<Pod> = Api::namespaced(host.clone(), &self.namespace);
        let selector = format!("app=vcluster,release={}", self.name);
        let mut events = watcher(pods.clone(), watcher::Config::default().labels(&selector)).boxed();
        let mut control_plane: Option<Pod> = None;
        let mut inward: Option<tokio::task::JoinHandle<()>> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                ev = events.next() => {
                    match ev {
                        Some(Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p))) => control_plane = Some(p),
                        Some(Ok(watcher::Event::Delete(_))) => control_plane = None,
                        Some(Ok(_)) => {}
                        Some(Err(e)) => eprintln!("real vcluster {}: watch error: {e}", self.name),
                        None => return Ok(()),
                    }
                }
                _ = tick.tick() => {}
            }
            if self.shared.stop.load(Ordering::SeqCst) {
                if let Some(t) = inward.take() {
                    t.abort();
                }
                return Ok(());
            }
            let up = control_plane.as_ref().filter(|p| pod_ready(p));
            let exited = lock(&self.shared.process).as_mut().and_then(Proc::exited);
            if let Some(status) = exited {
                // As a kubelet would: the container restarts while the pod stays.
                let tail = lock(&self.shared.process).take().map(|p| p.tail(30)).unwrap_or_default();
                eprintln!("real vcluster {}: exited with {status}:\n{tail}", self.name);
                *lock(&self.shared.error) = Some(format!("vcluster exited with {status}:\n{tail}"));
                self.shared.running.store(false, Ordering::SeqCst);
                if let Some(t) = inward.take() {
                    t.abort();
                }
            }
            let running = lock(&self.shared.process).is_some();
            match (up, running) {
                (Some(pod), false) => {
                    let started = match hold(&pods, pod).await {
                        // Changed since this event: the next one brings it.
                        Ok(false) => continue,
                        Ok(true) => {
                            let n = self.shared.starts.fetch_add(1, Ordering::SeqCst) + 1;
                            self.start(&host, pod, n).await
                        }
                        Err(e) => Err(e),
                    };
                    match started {
                        Ok(proc) => {
                            *lock(&self.shared.process) = Some(proc);
                            self.shared.running.store(true, Ordering::SeqCst);
                            inward = Some(tokio::spawn(serve_proxy(self.netns.clone(), self.proxy_port)));
                        }
                        Err(e) => {
                            eprintln!("real vcluster {}: start failed: {e:#}", self.name);
                            *lock(&self.shared.error) = Some(format!("start failed: {e:#}"));
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
                (None, true) => {
                    if let Some(t) = inward.take() {
                        t.abort();
                    }
                    if let Some(mut p) = lock(&self.shared.process).take() {
                        p.kill();
                    }
                    self.shared.running.store(false, Ordering::SeqCst);
                }
                _ => {}
            }
            // Its process is dead: a terminating pod may go.
            let terminating = control_plane.as_ref().filter(|p| p.metadata.deletion_timestamp.is_some());
            if let Some(p) = terminating.filter(|p| held(p) && lock(&self.shared.process).is_none())
                && let Err(e) = release(&pods, p).await
            {
                eprintln!("real vcluster {}: releasing its pod: {e:#}", self.name);
            }
        }
    }

    /// Starts `vcluster start` for `pod` as a kubelet would start its
    /// `syncer` container.
    async fn start(&self, host: &kube::Client, pod: &Pod, n: u32) -> Result<Proc> {
        let run = self.dir.join(format!("run-{n}"));
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&run)?;
        let spec = pod.spec.as_ref().ok_or_else(|| anyhow!("pod has no spec"))?;
        let container = spec
            .containers
            .iter()
            .find(|c| c.name == "syncer")
            .ok_or_else(|| anyhow!("pod has no syncer container"))?;

        // The service-account volume: a token bound to this pod.
        let sa_dir = run.join("serviceaccount");
        std::fs::create_dir_all(&sa_dir)?;
        let token = crate::kubelet::pod_token(host, pod, None, Some(86400)).await?;
        std::fs::write(sa_dir.join("token"), token)?;
        std::fs::copy(&self.ca_file, sa_dir.join("ca.crt"))?;
        std::fs::write(sa_dir.join("namespace"), &self.namespace)?;

        let mut mounts: Vec<Mount> = Vec::new();
        let volumes = spec.volumes.clone().unwrap_or_default();
        for vm in container.volume_mounts.iter().flatten() {
            let vol = volumes
                .iter()
                .find(|v| v.name == vm.name)
                .ok_or_else(|| anyhow!("volume mount {} has no volume", vm.name))?;
            let read_only = vm.read_only.unwrap_or(false);
            let src = if vol.name == "binaries" {
                // What the chart's init container copies from the
                // kubernetes image: the testbed's own binaries.
                self.binaries.clone()
            } else if let Some(secret) = &vol.secret {
                let folder = run.join("volumes").join(&vol.name);
                self.write_secret(host, secret.secret_name.as_deref().unwrap_or_default(), &folder).await?;
                folder
            } else if let Some(claim) = &vol.persistent_volume_claim {
                self.claim_path(host, &claim.claim_name).await?
            } else if vol
                .projected
                .as_ref()
                .is_some_and(|p| p.sources.iter().flatten().any(|s| s.service_account_token.is_some()))
            {
                sa_dir.clone()
            } else if vol.empty_dir.is_some() {
                let folder = run.join("volumes").join(&vol.name);
                std::fs::create_dir_all(&folder)?;
                folder
            } else {
                bail!("volume {} is of a kind the testbed does not mount", vol.name);
            };
            mounts.push(Mount { src, dst: vm.mount_path.clone(), read_only });
        }
        let sa_path = "/var/run/secrets/kubernetes.io/serviceaccount";
        if !mounts.iter().any(|m| m.dst == sa_path) {
            mounts.push(Mount { src: sa_dir.clone(), dst: sa_path.into(), read_only: true });
        }
        // Mounted last: /tmp holds the folders the other mounts come from.
        mounts.sort_by_key(|m| m.dst == "/tmp");

        let mut env: Vec<(String, String)> = vec![
            ("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into()),
            ("KUBERNETES_SERVICE_PORT".into(), self.host_port.to_string()),
            ("KUBECONFIG".into(), String::new()),
        ];
        for e in container.env.iter().flatten() {
            let value = match (&e.value, e.value_from.as_ref().and_then(|f| f.field_ref.as_ref())) {
                (Some(v), _) => v.clone(),
                (None, Some(f)) => field(pod, &f.field_path)?,
                (None, None) => String::new(),
            };
            env.push((e.name.clone(), value));
        }

        let script = mount_script(&mounts, &self.kine_bin, &self.vcluster_bin);
        std::fs::write(run.join("start.sh"), &script)?;
        let args: Vec<String> = vec![
            format!("--net={}", self.netns.path.display()),
            "--".into(),
            "unshare".into(),
            "--mount".into(),
            "--propagation=private".into(),
            "--pid".into(),
            "--fork".into(),
            "--kill-child".into(),
            "--mount-proc".into(),
            "--".into(),
            "/bin/sh".into(),
            "-c".into(),
            script,
        ];
        let log_name = format!("vcluster-{}-{}-{n}", self.namespace, self.name);
        let proc = spawner::spawn_with_env(&log_name, Path::new("nsenter"), &args, &env, &self.log_dir)?;
        lock(&self.shared.logs).push(proc.log.clone());
        Ok(proc)
    }

    /// Writes Secret `name`'s keys as files into `folder` (a Secret volume).
    async fn write_secret(&self, host: &kube::Client, name: &str, folder: &Path) -> Result<()> {
        let secrets: Api<Secret> = Api::namespaced(host.clone(), &self.namespace);
        let secret = secrets.get(name).await.with_context(|| format!("read Secret {name} for its volume"))?;
        std::fs::create_dir_all(folder)?;
        for (key, value) in secret.data.unwrap_or_default() {
            std::fs::write(folder.join(key), value.0)?;
        }
        Ok(())
    }

    /// The folder of the hostPath PersistentVolume bound to claim `claim`.
    async fn claim_path(&self, host: &kube::Client, claim: &str) -> Result<PathBuf> {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(host.clone(), &self.namespace);
        let volumes: Api<PersistentVolume> = Api::all(host.clone());
        let pvc = claims.get(claim).await.with_context(|| format!("read claim {claim}"))?;
        let pv_name = pvc
            .spec
            .and_then(|s| s.volume_name)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| anyhow!("claim {claim} is not bound"))?;
        let pv = volumes.get(&pv_name).await?;
        pv.spec
            .and_then(|s| s.host_path)
            .map(|h| PathBuf::from(h.path))
            .ok_or_else(|| anyhow!("volume {pv_name} is not a hostPath volume"))
    }
}

struct Mount {
    src: PathBuf,
    dst: String,
    read_only: bool,
}

/// The shell script run inside the new mount namespace: bind every mount,
/// then become `vcluster start`.
fn mount_script(mounts: &[Mount], kine: &Path, vcluster: &Path) -> String {
    let q = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut s = String::from("set -e\n");
    for m in mounts {
        let (src, dst) = (q(&m.src.display().to_string()), q(&m.dst));
        s.push_str(&format!("mkdir -p {dst}\nmount --bind {src} {dst}\n"));
        if m.read_only || m.dst == "/binaries" {
            s.push_str(&format!("mount -o remount,bind,ro {dst}\n"));
        }
    }
    // The image carries kine at /usr/local/bin/kine: a tmpfs there (in this
    // namespace only) holds the mount point, so nothing is left on the host.
    s.push_str(&format!(
        "mount -t tmpfs tmpfs /usr/local/bin\ntouch /usr/local/bin/kine\nmount --bind {} /usr/local/bin/kine\n",
        q(&kine.display().to_string())
    ));
    s.push_str(&format!("exec {} start\n", q(&vcluster.display().to_string())));
    s
}

/// A pod field as the downward API gives it.
pub(crate) fn field(pod: &Pod, path: &str) -> Result<String> {
    let status = pod.status.as_ref();
    let spec = pod.spec.as_ref();
    let v = match path {
        "metadata.name" => pod.metadata.name.clone(),
        "metadata.namespace" => pod.metadata.namespace.clone(),
        "metadata.uid" => pod.metadata.uid.clone(),
        "status.podIP" => status.and_then(|s| s.pod_ip.clone()),
        "status.hostIP" => status.and_then(|s| s.host_ip.clone()),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()),
        other => bail!("field reference {other} is not supported by the testbed"),
    };
    Ok(v.unwrap_or_default())
}

fn held(p: &Pod) -> bool {
    p.metadata.finalizers.iter().flatten().any(|f| f == FINALIZER)
}

/// Puts [`FINALIZER`] on the control-plane pod; false when the pod changed
/// since `p` was read (or is gone).
async fn hold(pods: &Api<Pod>, p: &Pod) -> Result<bool> {
    if held(p) {
        return Ok(true);
    }
    let mut finalizers = p.metadata.finalizers.clone().unwrap_or_default();
    finalizers.push(FINALIZER.into());
    let patch =
        json!({"metadata": {"finalizers": finalizers, "resourceVersion": p.metadata.resource_version}});
    let name = p.metadata.name.as_deref().unwrap_or_default();
    match pods.patch(name, &PatchParams::default(), &Patch::Merge(patch)).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(false),
        Err(e) => Err(e).context("hold the control-plane pod"),
    }
}

/// Takes [`FINALIZER`] off the control-plane pod.
async fn release(pods: &Api<Pod>, p: &Pod) -> Result<()> {
    let finalizers: Vec<String> =
        p.metadata.finalizers.iter().flatten().filter(|f| *f != FINALIZER).cloned().collect();
    let patch =
        json!({"metadata": {"finalizers": finalizers, "resourceVersion": p.metadata.resource_version}});
    let name = p.metadata.name.as_deref().unwrap_or_default();
    match pods.patch(name, &PatchParams::default(), &Patch::Merge(patch)).await {
        Ok(_) => Ok(()),
        // Gone, or changed since: the next event brings it again.
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e).context("release the control-plane pod"),
    }
}

fn pod_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Serves the vcluster's proxy on the host's 127.0.0.1:`port` once it
/// listens inside; until then the port refuses connections, as a Service
/// with no ready endpoint does.
async fn serve_proxy(ns: Arc<NetNs>, port: u16) {
    if !netns::wait_listening(&ns, PROXY_PORT, Duration::from_secs(600)).await {
        return;
    }
    let mut listener = None;
    for _ in 0..50 {
        match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            Ok(l) => {
                listener = Some(l);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let Some(listener) = listener else {
        eprintln!("real vcluster: cannot listen on 127.0.0.1:{port}");
        return;
    };
    let _ = netns::forward(listener, ns.connector(PROXY_PORT)).await;
}

/// The sum of the resident memory of `pid` and all its descendants, in KiB.
pub fn tree_rss_kib(pid: u32) -> u64 {
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        // After the parenthesised command name: state, then ppid.
        let ppid =
            stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            children.entry(ppid).or_default().push(p);
        }
    }
    let mut total = 0;
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        total += crate::process::rss_kib(p);
        todo.extend(children.get(&p).into_iter().flatten());
    }
    total
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
