//! A kubelet for the pods a test asks it to run (the chart's Deployment,
//! its uninstall Job): it registers a Node of its own, tainted so that
//! only pods that tolerate it land there, and runs each container of each
//! pod bound to it as a local process, from the pod's spec as the API
//! server holds it:
//!
//! - the image's program: each image repository the test names stands for
//!   a local binary (the entrypoint); `command` replaces it, `args` follow,
//!   `$(VAR)` expanded from the container's environment;
//! - the environment a kubelet gives, and only that (`env -i`): the
//!   container's `env` (values, field references, Secret and ConfigMap
//!   keys), `KUBERNETES_SERVICE_HOST`/`_PORT` at the API server, `HOSTNAME`;
//! - the volumes, bind-mounted at their paths in a private mount namespace
//!   (`unshare --mount --propagation private`): Secret and ConfigMap
//!   volumes written as the kubelet writes them (each file a link through
//!   `..data`, which one rename swaps when the object changes, so a rotated
//!   Secret reaches a running process), projected volumes (a
//!   service-account token from the TokenRequest API bound to the pod, the
//!   cluster CA, the namespace), emptyDirs; the binary at
//!   `/usr/local/bin/<name>` (a tmpfs there, in that namespace only);
//! - the user and group the security context names (`setpriv`);
//! - probes: HTTP and TCP readiness and liveness, with the spec's delays,
//!   periods and thresholds; the pod's `Ready` follows the readiness probe,
//!   a failing liveness probe restarts the container;
//! - the restart policy: `Always` restarts an exited container (after a
//!   second), `Never` and `OnFailure` end in `Succeeded` or `Failed`;
//! - a pod being deleted: SIGTERM, SIGKILL after its grace period, and the
//!   pod removed once its process has ended.
//!
//! Not done: init containers, exec probes, HTTPS probes, resource limits,
//! a read-only root file system; a pod that needs one is marked failed
//! with the reason, so a test sees it rather than a silent difference.
//!
//! The pods share the host's network namespace (as `hostNetwork` pods do),
//! each with a loopback address of its own as its IP (`127.x.y.z`): a port
//! bound on the pod's IP is the pod's alone, and the pod reaches the API
//! server and the testbed's other loopback servers as they are. Two pods
//! that listen on one port of every interface (`0.0.0.0`) collide, so
//! tests give each release its own ports. The EndpointSlice controller
//! refuses loopback addresses, so Services do not list these pods: tests
//! reach a pod at its IP.
//!
//! [`Kubelet::start_in`] gives each pod a network namespace of its own
//! instead, as a real kubelet's network plugin does, with an address of
//! [`POD_RANGE`] on its `eth0`, one end of a veth pair whose other end is
//! in the test's network namespace (the "hub"): an address an
//! EndpointSlice accepts, so Services list these pods as a cluster's
//! would; every pod may listen on any port of `0.0.0.0` (two pods of a
//! rolling update side by side). The hub routes each pod's address to its
//! veth; a pod's default route leads to the hub, so what is local there
//! (the test's app, its other addresses) answers the pod. The probes and
//! the test's clients dial from the hub. Inside each pod a forwarder on
//! loopback carries the API server's port to the host's, as the pods dial
//! `KUBERNETES_SERVICE_HOST` 127.0.0.1.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Node, Pod, Probe, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::netns::NetNs;
use crate::process::{Proc, signal};
use crate::{Cluster, lock, spawner};

/// The taint on the kubelet's Node (value: the node's name), and its label.
pub const TAINT: &str = "testbed.dormant.dev/kubelet";

/// The pods' addresses with network namespaces ([`Kubelet::start_in`]).
pub const POD_RANGE: &str = "10.251.0.0/16";

/// The hub's own address, the source of what it sends to the pods.
const HUB_ADDRESS: &str = "10.251.255.254";

/// Connects from inside the pods' network namespace.
type Dial = Arc<dyn Fn(SocketAddrV4) -> io::Result<std::net::TcpStream> + Send + Sync>;

/// The test's network namespace the pods' veths lead to.
#[derive(Clone)]
struct PodNetwork {
    hub: PathBuf,
    dial: Dial,
}

/// A pod's own network namespace and its forwarder to the API server;
/// dropped with the pod, which takes the veth pair with it.
struct PodNamespace {
    ns: NetNs,
    forward: tokio::task::JoinHandle<io::Result<()>>,
}

impl Drop for PodNamespace {
    fn drop(&mut self) {
        self.forward.abort();
    }
}

/// What the test sees of a pod the kubelet runs.
#[derive(Clone, Debug, Default)]
pub struct PodView {
    /// Its IP: a loopback address of its own (or one of [`POD_RANGE`]).
    pub ip: String,
    /// `Running`, `Succeeded`, `Failed`.
    pub phase: String,
    pub ready: bool,
    pub restarts: u32,
    /// The log of each start of its first container, in order.
    pub logs: Vec<PathBuf>,
    /// Readiness and liveness probes that passed.
    pub probes_passed: u32,
    /// Why the kubelet could not run it, if so.
    pub error: Option<String>,
}

impl PodView {
    /// The last `lines` lines of its current log.
    pub fn tail(&self, lines: usize) -> String {
        self.logs.last().map(|l| crate::process::tail(l, lines)).unwrap_or_default()
    }
}

struct Shared {
    stop: AtomicBool,
    /// By `namespace/name`.
    pods: Mutex<BTreeMap<String, PodView>>,
    error: Mutex<Option<String>>,
}

/// A Node of its own and the pods bound to it; dropping it stops every
/// process and removes the Node.
pub struct Kubelet {
    pub node: String,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    kubectl: PathBuf,
    kubeconfig: PathBuf,
}

impl Kubelet {
    /// Registers Node `node` and waits until pods may be scheduled to it.
    /// `images` maps image repositories (the image without its tag) to the
    /// local binaries that stand for them.
    pub fn start(cluster: &Cluster, node: &str, images: &[(&str, &Path)]) -> Result<Kubelet> {
        Kubelet::start_with(cluster, node, images, None)
    }

    /// [`Kubelet::start`], each pod in a network namespace of its own with
    /// an address of [`POD_RANGE`], reached from `hub` (see the module
    /// documentation).
    pub fn start_in(cluster: &Cluster, node: &str, images: &[(&str, &Path)], hub: &NetNs) -> Result<Kubelet> {
        hub.ip(&["addr", "replace", &format!("{HUB_ADDRESS}/32"), "dev", "lo"])?;
        let network = PodNetwork { hub: hub.path.clone(), dial: Arc::new(hub.dialer()) };
        Kubelet::start_with(cluster, node, images, Some(network))
    }

    fn start_with(
        cluster: &Cluster,
        node: &str,
        images: &[(&str, &Path)],
        network: Option<PodNetwork>,
    ) -> Result<Kubelet> {
        let dir = cluster.dir.join(format!("kubelet-{node}"));
        std::fs::create_dir_all(&dir)?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            pods: Mutex::new(BTreeMap::new()),
            error: Mutex::new(None),
        });
        let runner = Runner {
            node: node.into(),
            dir,
            kubeconfig: cluster.admin.kubeconfig.clone(),
            api_port: cluster
                .server
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| anyhow!("no port in {}", cluster.server))?,
            images: images.iter().map(|(i, b)| (i.to_string(), b.to_path_buf())).collect(),
            network,
            shared: shared.clone(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let errors = shared.clone();
        let thread = crate::runtime_thread(format!("kubelet-{node}"), runner.run(tx), move |e| {
            *lock(&errors.error) = Some(e);
        })?;
        let kubelet = Kubelet {
            node: node.into(),
            shared,
            thread: Some(thread),
            kubectl: cluster.bins.path("kubectl"),
            kubeconfig: cluster.admin.kubeconfig.clone(),
        };
        match rx.recv_timeout(Duration::from_secs(90)) {
            Ok(Ok(())) => Ok(kubelet),
            Ok(Err(e)) => Err(anyhow!(e)).context(format!("register node {node}")),
            Err(_) => bail!("node {node} not schedulable after 90 s: {:?}", kubelet.error()),
        }
    }

    /// The helm values that put a chart's pods on this node (its
    /// `nodeSelector` and `tolerations`, as a user would for a dedicated node).
    pub fn helm_values(&self) -> String {
        format!(
            "nodeSelector: {{kubernetes.io/hostname: {node}}}\ntolerations: [{{key: {TAINT}, operator: Equal, value: {node}, effect: NoSchedule}}]\n",
            node = self.node
        )
    }

    /// The pod `namespace/name`, once the kubelet has seen it.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<PodView> {
        lock(&self.shared.pods).get(&format!("{namespace}/{name}")).cloned()
    }

    /// Every pod the kubelet runs or ran, by `namespace/name`.
    pub fn pods(&self) -> BTreeMap<String, PodView> {
        lock(&self.shared.pods).clone()
    }

    /// The kubelet's own failure, if any.
    pub fn error(&self) -> Option<String> {
        lock(&self.shared.error).clone()
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::process::Command::new(&self.kubectl)
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(["delete", "node", &self.node, "--wait=false", "--request-timeout=5s"])
            .output();
    }
}

/// Each pod's IP: 127.<from the process id>.<n>, so that two test
/// processes do not hand out the same address; in a network namespace,
/// 10.251.<n>.
fn next_ip(in_namespace: bool) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let second = if in_namespace { 251 } else { 16 + std::process::id() % 200 };
    let first = if in_namespace { 10 } else { 127 };
    format!("{first}.{second}.{}.{}", (n / 250) % 250, n % 250 + 2)
}

struct Runner {
    node: String,
    dir: PathBuf,
    kubeconfig: PathBuf,
    api_port: u16,
    images: Vec<(String, PathBuf)>,
    network: Option<PodNetwork>,
    shared: Arc<Shared>,
}

/// A pod this kubelet runs (its first container; more are refused).
struct Running {
    pod: Pod,
    key: String,
    ip: String,
    dir: PathBuf,
    proc: Option<Proc>,
    starts: u32,
    restart_at: Option<Instant>,
    started_at: Instant,
    /// When SIGTERM was sent, for a pod being deleted.
    terminating: Option<Instant>,
    phase: &'static str,
    ready: bool,
    readiness: ProbeState,
    liveness: ProbeState,
    /// What was last written as its status.
    status: serde_json::Value,
    /// Volumes to keep in step with their Secret or ConfigMap.
    synced: Vec<SyncedVolume>,
    last_sync: Instant,
    error: Option<String>,
    /// Its network namespace, with [`Kubelet::start_in`].
    netns: Option<PodNamespace>,
}

#[derive(Default)]
struct ProbeState {
    next: Option<Instant>,
    successes: u32,
    failures: u32,
}

/// A Secret or ConfigMap volume (or a projected one holding a token).
struct SyncedVolume {
    dir: PathBuf,
    sources: Vec<Source>,
    mode: u32,
    /// The generation written last (`..data-<n>`).
    generation: u32,
    files: BTreeMap<String, Vec<u8>>,
}

enum Source {
    Secret { name: String, items: Vec<(String, String)>, optional: bool },
    ConfigMap { name: String, items: Vec<(String, String)>, optional: bool },
    Fixed { path: String, content: Vec<u8> },
}

impl Runner {
    async fn run(self, registered: std::sync::mpsc::Sender<std::result::Result<(), String>>) -> Result<()> {
        let client = crate::client_from_kubeconfig(&self.kubeconfig).await?;
        if let Err(e) = self.register(&client).await {
            let _ = registered.send(Err(format!("{e:#}")));
            return Err(e);
        }
        let _ = registered.send(Ok(()));
        let pods: Api<Pod> = Api::all(client.clone());
        let config = watcher::Config::default().fields(&format!("spec.nodeName={}", self.node));
        let mut events = watcher(pods, config).boxed();
        let mut running: BTreeMap<String, Running> = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut heartbeat = Instant::now();
        loop {
            tokio::select! {
                ev = events.next() => match ev {
                    Some(Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p))) => {
                        let uid = p.metadata.uid.clone().unwrap_or_default();
                        match running.get_mut(&uid) {
                            Some(r) => r.pod = p,
                            None => {
                                let r = self.admit(p);
                                running.insert(uid, r);
                            }
                        }
                    }
                    Some(Ok(watcher::Event::Delete(p))) => {
                        if let Some(mut r) = running.remove(&p.metadata.uid.unwrap_or_default())
                            && let Some(mut proc) = r.proc.take()
                        {
                            proc.kill();
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => eprintln!("kubelet {}: watch error: {e}", self.node),
                    None => return Ok(()),
                },
                _ = tick.tick() => {}
            }
            if self.shared.stop.load(Ordering::SeqCst) {
                for r in running.values_mut() {
                    if let Some(mut p) = r.proc.take() {
                        p.kill();
                    }
                }
                return Ok(());
            }
            if heartbeat.elapsed() > Duration::from_secs(10) {
                heartbeat = Instant::now();
                if let Err(e) = self.heartbeat(&client).await {
                    eprintln!("kubelet {}: heartbeat: {e:#}", self.node);
                }
            }
            let mut gone = Vec::new();
            for (uid, r) in running.iter_mut() {
                match self.step(&client, r).await {
                    Ok(true) => gone.push(uid.clone()),
                    Ok(false) => {}
                    Err(e) => {
                        eprintln!("kubelet {}: pod {}: {e:#}", self.node, r.key);
                        r.error = Some(format!("{e:#}"));
                    }
                }
                let view = PodView {
                    ip: r.ip.clone(),
                    phase: r.phase.into(),
                    ready: r.ready,
                    restarts: r.starts.saturating_sub(1),
                    logs: (1..=r.starts)
                        .map(|n| r.dir.join(format!("{}-{n}.log", log_name(&r.key))))
                        .collect(),
                    probes_passed: r.readiness.successes + r.liveness.successes,
                    error: r.error.clone(),
                };
                lock(&self.shared.pods).insert(r.key.clone(), view);
            }
            for uid in gone {
                running.remove(&uid);
            }
        }
    }

    /// Registers the Node, says it is Ready, and waits until the scheduler
    /// may use it (the not-ready taint gone).
    async fn register(&self, client: &kube::Client) -> Result<()> {
        let nodes: Api<Node> = Api::all(client.clone());
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": self.node, "labels": {
                "kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux", TAINT: self.node,
            }},
            "spec": {"taints": [{"key": TAINT, "value": self.node, "effect": "NoSchedule"}]},
        }))?;
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e).context("create the Node"),
        }
        self.heartbeat(client).await?;
        let start = Instant::now();
        loop {
            let n = nodes.get(&self.node).await?;
            let taints = n.spec.and_then(|s| s.taints).unwrap_or_default();
            if !taints.iter().any(|t| t.key.starts_with("node.kubernetes.io/")) {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(80) {
                bail!("node {} still tainted: {taints:?}", self.node);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The Node's status (Ready, capacity) and its Lease, renewed.
    async fn heartbeat(&self, client: &kube::Client) -> Result<()> {
        let now = serde_json::to_value(Time(Timestamp::now()))?;
        let nodes: Api<Node> = Api::all(client.clone());
        let condition = |t: &str, s: &str, reason: &str| {
            json!({"type": t, "status": s, "reason": reason, "message": "testbed kubelet",
                "lastHeartbeatTime": now, "lastTransitionTime": now})
        };
        let capacity = json!({"cpu": "8", "memory": "32Gi", "pods": "110", "ephemeral-storage": "100Gi"});
        let status = json!({"status": {
            "capacity": capacity, "allocatable": capacity,
            "conditions": [
                condition("Ready", "True", "KubeletReady"),
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID"),
            ],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.node}],
            "nodeInfo": {"kubeletVersion": "testbed", "operatingSystem": "linux", "architecture": std::env::consts::ARCH,
                "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "", "osImage": "",
                "containerRuntimeVersion": "testbed://local-processes", "kubeProxyVersion": ""},
        }});
        nodes
            .patch_status(&self.node, &PatchParams::default(), &Patch::Merge(status))
            .await
            .context("Node status")?;
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(client.clone(), "kube-node-lease");
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": self.node, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": self.node, "leaseDurationSeconds": 40,
                "renewTime": serde_json::to_value(MicroTime(Timestamp::now()))?},
        });
        leases
            .patch(&self.node, &PatchParams::apply("testbed-kubelet").force(), &Patch::Apply(lease))
            .await
            .context("node Lease")?;
        Ok(())
    }

    fn admit(&self, pod: Pod) -> Running {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let key = format!("{ns}/{name}");
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let dir = self.dir.join(format!("{ns}-{name}-{}", uid.get(..8).unwrap_or(&uid)));
        Running {
            pod,
            key,
            ip: next_ip(self.network.is_some()),
            dir,
            proc: None,
            starts: 0,
            restart_at: Some(Instant::now()),
            started_at: Instant::now(),
            terminating: None,
            phase: "Pending",
            ready: false,
            readiness: ProbeState::default(),
            liveness: ProbeState::default(),
            status: serde_json::Value::Null,
            synced: Vec::new(),
            last_sync: Instant::now(),
            error: None,
            netns: None,
        }
    }

    /// A network namespace for the pod at `ip`: a veth pair from the hub,
    /// the routes both ways, and the API server's port on its loopback.
    fn pod_namespace(&self, net: &PodNetwork, ip: &str) -> Result<PodNamespace> {
        let ns = NetNs::new(&format!("pod-{ip}"))?;
        let veth = format!("dh{}", ip.split('.').skip(2).collect::<Vec<_>>().join("-"));
        crate::netns::ip_in(
            &net.hub,
            &["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns.holder_id()?],
        )?;
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", "default", "dev", "eth0"])?;
        crate::netns::ip_in(&net.hub, &["link", "set", &veth, "up"])?;
        crate::netns::ip_in(
            &net.hub,
            &["route", "replace", &format!("{ip}/32"), "dev", &veth, "src", HUB_ADDRESS],
        )?;
        let api_port = self.api_port;
        let inside = ns.listen(api_port)?;
        let forward = tokio::spawn(crate::netns::forward(inside, move || {
            std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, api_port))
        }));
        Ok(PodNamespace { ns, forward })
    }

    /// One look at a pod: start, probe, restart, stop. True once it is gone.
    async fn step(&self, client: &kube::Client, r: &mut Running) -> Result<bool> {
        let pods: Api<Pod> =
            Api::namespaced(client.clone(), r.pod.metadata.namespace.as_deref().unwrap_or_default());
        let name = r.pod.metadata.name.clone().unwrap_or_default();
        if r.pod.metadata.deletion_timestamp.is_some() {
            let grace = r.pod.metadata.deletion_grace_period_seconds.unwrap_or(30).max(0) as u64;
            if let Some(proc) = r.proc.as_mut() {
                let at = *r.terminating.get_or_insert_with(|| {
                    let _ = signal(proc.pid(), libc::SIGTERM);
                    Instant::now()
                });
                if proc.exited().is_none() && at.elapsed() < Duration::from_secs(grace) {
                    return Ok(false);
                }
                proc.kill();
                r.proc = None;
            }
            let uid = r.pod.metadata.uid.clone();
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions { uid, resource_version: None }),
                ..Default::default()
            };
            return match pods.delete(&name, &params).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(true),
                Err(e) => Err(e).context("remove the pod"),
            };
        }
        if r.phase == "Succeeded" || r.phase == "Failed" {
            return Ok(false);
        }
        let container = r.pod.spec.as_ref().and_then(|s| s.containers.first().cloned());
        let Some(container) = container else { return Ok(false) };
        // An exited container: restart, or the pod's end.
        let exited = r.proc.as_mut().and_then(Proc::exited);
        if let Some(status) = exited {
            r.proc = None;
            r.ready = false;
            let policy =
                r.pod.spec.as_ref().and_then(|s| s.restart_policy.clone()).unwrap_or_else(|| "Always".into());
            match (policy.as_str(), status.success()) {
                ("Always", _) | ("OnFailure", false) => {
                    r.restart_at = Some(Instant::now() + Duration::from_secs(1))
                }
                (_, true) => r.phase = "Succeeded",
                (_, false) => r.phase = "Failed",
            }
        }
        if r.proc.is_none()
            && r.phase != "Succeeded"
            && r.phase != "Failed"
            && r.restart_at.is_some_and(|at| Instant::now() >= at)
        {
            r.restart_at = None;
            match self.start(client, r, &container).await {
                Ok(proc) => {
                    r.proc = Some(proc);
                    r.phase = "Running";
                    r.started_at = Instant::now();
                    r.readiness = ProbeState::default();
                    r.liveness = ProbeState::default();
                }
                Err(e) => {
                    r.phase = "Failed";
                    r.error = Some(format!("{e:#}"));
                }
            }
        }
        if r.proc.is_some() {
            if r.last_sync.elapsed() > Duration::from_secs(1) {
                r.last_sync = Instant::now();
                self.sync_volumes(client, r).await?;
            }
            // Readiness: Ready follows it (no probe: ready once started).
            match &container.readiness_probe {
                None => r.ready = true,
                Some(p) => {
                    if let Some(ok) =
                        probe_due(&mut r.readiness, p, r.started_at, &r.ip, &container, self.dial()).await
                    {
                        let (success, failure) = (
                            p.success_threshold.unwrap_or(1) as u32,
                            p.failure_threshold.unwrap_or(3) as u32,
                        );
                        if ok && r.readiness.successes >= success {
                            r.ready = true;
                        }
                        if !ok && r.readiness.failures >= failure {
                            r.ready = false;
                        }
                    }
                }
            }
            if let Some(p) = &container.liveness_probe
                && let Some(false) =
                    probe_due(&mut r.liveness, p, r.started_at, &r.ip, &container, self.dial()).await
                && r.liveness.failures >= p.failure_threshold.unwrap_or(3) as u32
                && let Some(mut proc) = r.proc.take()
            {
                eprintln!("kubelet {}: pod {}: liveness probe failed, restarting", self.node, r.key);
                proc.kill();
                r.ready = false;
                r.restart_at = Some(Instant::now() + Duration::from_secs(1));
            }
        }
        let status = pod_status(r, &container);
        if status != r.status {
            match pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await {
                Ok(_) => r.status = status,
                Err(kube::Error::Api(e)) if e.code == 404 => return Ok(true),
                Err(e) => return Err(e).context("pod status"),
            }
        }
        Ok(false)
    }

    /// Starts the pod's container as a local process.
    async fn start(&self, client: &kube::Client, r: &mut Running, container: &Container) -> Result<Proc> {
        let pod = &r.pod.clone();
        let spec = pod.spec.as_ref().ok_or_else(|| anyhow!("pod has no spec"))?;
        if spec.containers.len() > 1 || spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
            bail!("the testbed kubelet runs pods of one container and no init containers");
        }
        let image = container.image.clone().unwrap_or_default();
        let repository =
            image.rsplit_once(':').filter(|(_, tag)| !tag.contains('/')).map_or(image.as_str(), |(r, _)| r);
        let binary = self
            .images
            .iter()
            .find(|(i, _)| i == repository)
            .map(|(_, b)| b.clone())
            .ok_or_else(|| anyhow!("the testbed has no binary for image {image}"))?;
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        r.starts += 1;
        let n = r.starts;
        let run = r.dir.join(format!("run-{n}"));
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&run)?;

        // Volumes (written once per start, then kept in step).
        r.synced.clear();
        let mut mounts: Vec<(PathBuf, String, bool)> = Vec::new();
        let volumes = spec.volumes.clone().unwrap_or_default();
        for vm in container.volume_mounts.iter().flatten() {
            let vol = volumes
                .iter()
                .find(|v| v.name == vm.name)
                .ok_or_else(|| anyhow!("volume mount {} has no volume", vm.name))?;
            let folder = run.join("volumes").join(&vol.name);
            std::fs::create_dir_all(&folder)?;
            let items = |items: &Option<Vec<k8s_openapi::api::core::v1::KeyToPath>>| {
                items.iter().flatten().map(|i| (i.key.clone(), i.path.clone())).collect::<Vec<_>>()
            };
            let mut sources = Vec::new();
            let mut mode = 0o644;
            if let Some(s) = &vol.secret {
                sources.push(Source::Secret {
                    name: s.secret_name.clone().unwrap_or_default(),
                    items: items(&s.items),
                    optional: s.optional.unwrap_or(false),
                });
                mode = s.default_mode.unwrap_or(0o644) as u32;
            } else if let Some(c) = &vol.config_map {
                sources.push(Source::ConfigMap {
                    name: c.name.clone(),
                    items: items(&c.items),
                    optional: c.optional.unwrap_or(false),
                });
                mode = c.default_mode.unwrap_or(0o644) as u32;
            } else if let Some(p) = &vol.projected {
                mode = p.default_mode.unwrap_or(0o644) as u32;
                for s in p.sources.iter().flatten() {
                    if let Some(t) = &s.service_account_token {
                        let token = pod_token(client, pod, t.audience.clone(), t.expiration_seconds).await?;
                        sources.push(Source::Fixed { path: t.path.clone(), content: token.into_bytes() });
                    } else if let Some(c) = &s.config_map {
                        sources.push(Source::ConfigMap {
                            name: c.name.clone(),
                            items: items(&c.items),
                            optional: c.optional.unwrap_or(false),
                        });
                    } else if let Some(sec) = &s.secret {
                        sources.push(Source::Secret {
                            name: sec.name.clone(),
                            items: items(&sec.items),
                            optional: sec.optional.unwrap_or(false),
                        });
                    } else if let Some(d) = &s.downward_api {
                        for item in d.items.iter().flatten() {
                            let f = item
                                .field_ref
                                .as_ref()
                                .ok_or_else(|| anyhow!("downward API item {} without a field", item.path))?;
                            let value = crate::real_vcluster::field(pod, &f.field_path)?;
                            sources
                                .push(Source::Fixed { path: item.path.clone(), content: value.into_bytes() });
                        }
                    } else {
                        bail!("projected volume {} has a source the testbed does not write", vol.name);
                    }
                }
            } else if vol.empty_dir.is_some() {
                set_mode(&folder, 0o777)?;
            } else {
                bail!("volume {} is of a kind the testbed does not mount", vol.name);
            }
            if !sources.is_empty() {
                let mut v = SyncedVolume {
                    dir: folder.clone(),
                    sources,
                    mode,
                    generation: 0,
                    files: BTreeMap::new(),
                };
                sync_volume(client, &ns, &mut v).await?;
                r.synced.push(v);
            }
            mounts.push((folder, vm.mount_path.clone(), vm.read_only.unwrap_or(false)));
        }
        // Mounted last: /tmp may hold the folders the others come from.
        mounts.sort_by_key(|(_, dst, _)| dst == "/tmp");

        // The environment.
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()),
            ("HOSTNAME".into(), pod.metadata.name.clone().unwrap_or_default()),
            ("HOME".into(), "/".into()),
            ("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into()),
            ("KUBERNETES_SERVICE_PORT".into(), self.api_port.to_string()),
        ];
        if container.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
            bail!("envFrom is not supported by the testbed kubelet");
        }
        for e in container.env.iter().flatten() {
            let from = e.value_from.as_ref();
            let value = if let Some(v) = &e.value {
                expand(v, &env)
            } else if let Some(f) = from.and_then(|f| f.field_ref.as_ref()) {
                if f.field_path == "status.podIP" {
                    r.ip.clone()
                } else if f.field_path == "status.hostIP" {
                    "127.0.0.1".into()
                } else {
                    crate::real_vcluster::field(pod, &f.field_path)?
                }
            } else if let Some(s) = from.and_then(|f| f.secret_key_ref.as_ref()) {
                let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
                let secret = secrets
                    .get(&s.name)
                    .await
                    .with_context(|| format!("Secret {} for ${}", s.name, e.name))?;
                let v = secret
                    .data
                    .unwrap_or_default()
                    .remove(&s.key)
                    .ok_or_else(|| anyhow!("no key {} in Secret {}", s.key, s.name))?;
                String::from_utf8(v.0)?
            } else if let Some(c) = from.and_then(|f| f.config_map_key_ref.as_ref()) {
                let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
                let cm = cms
                    .get(&c.name)
                    .await
                    .with_context(|| format!("ConfigMap {} for ${}", c.name, e.name))?;
                cm.data
                    .unwrap_or_default()
                    .remove(&c.key)
                    .ok_or_else(|| anyhow!("no key {} in ConfigMap {}", c.key, c.name))?
            } else if from.is_some() {
                bail!("env {} comes from a source the testbed does not resolve", e.name);
            } else {
                String::new()
            };
            env.retain(|(k, _)| *k != e.name);
            env.push((e.name.clone(), value));
        }

        // The program.
        let program_name = binary.file_name().and_then(|n| n.to_str()).unwrap_or("program").to_string();
        let program = format!("/usr/local/bin/{program_name}");
        let mut argv: Vec<String> = match &container.command {
            Some(c) if !c.is_empty() => c.iter().map(|a| expand(a, &env)).collect(),
            _ => vec![program.clone()],
        };
        argv.extend(container.args.iter().flatten().map(|a| expand(a, &env)));
        if spec.security_context.as_ref().and_then(|s| s.run_as_user).is_some_and(|u| u < 0) {
            bail!("a negative runAsUser");
        }
        let user = container
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_user)
            .or_else(|| spec.security_context.as_ref().and_then(|s| s.run_as_user));
        let group = container
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_group)
            .or_else(|| spec.security_context.as_ref().and_then(|s| s.run_as_group))
            .or(user);

        let q = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let mut script = String::from("set -e\n");
        script.push_str(&format!(
            "mount -t tmpfs tmpfs /usr/local/bin\ntouch {p}\nmount --bind {b} {p}\n",
            p = q(&program),
            b = q(&binary.display().to_string())
        ));
        for (src, dst, ro) in &mounts {
            let (src, dst) = (q(&src.display().to_string()), q(dst));
            script.push_str(&format!("mkdir -p {dst}\nmount --bind {src} {dst}\n"));
            if *ro {
                script.push_str(&format!("mount -o remount,bind,ro {dst}\n"));
            }
        }
        script.push_str("cd /\nexec ");
        if let Some(u) = user {
            script.push_str(&format!(
                "setpriv --reuid={u} --regid={} --clear-groups --pdeathsig=keep ",
                group.unwrap_or(u)
            ));
        }
        script.push_str("env -i");
        for (k, v) in &env {
            script.push_str(&format!(" {}", q(&format!("{k}={v}"))));
        }
        for a in &argv {
            script.push_str(&format!(" {}", q(a)));
        }
        script.push('\n');
        std::fs::write(run.join("start.sh"), &script)?;
        let mut args: Vec<String> = ["--mount", "--propagation=private", "--", "/bin/sh", "-c", &script]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let log = format!("{}-{n}", log_name(&r.key));
        match &self.network {
            None => spawner::spawn(&log, Path::new("unshare"), &args, &r.dir),
            Some(net) => {
                if r.netns.is_none() {
                    r.netns = Some(self.pod_namespace(net, &r.ip).context("the pod's network")?);
                }
                let path = r.netns.as_ref().map(|p| p.ns.path.display().to_string()).unwrap_or_default();
                let mut inside = vec![format!("--net={path}"), "--".into(), "unshare".into()];
                inside.append(&mut args);
                spawner::spawn(&log, Path::new("nsenter"), &inside, &r.dir)
            }
        }
    }

    fn dial(&self) -> Option<&Dial> {
        self.network.as_ref().map(|n| &n.dial)
    }

    async fn sync_volumes(&self, client: &kube::Client, r: &mut Running) -> Result<()> {
        let ns = r.pod.metadata.namespace.clone().unwrap_or_default();
        for v in &mut r.synced {
            sync_volume(client, &ns, v).await?;
        }
        Ok(())
    }
}

/// A token of `pod`'s ServiceAccount from the TokenRequest API, bound to
/// the pod (as a kubelet writes the service-account volume).
pub(crate) async fn pod_token(
    client: &kube::Client,
    pod: &Pod,
    audience: Option<String>,
    seconds: Option<i64>,
) -> Result<String> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let sa =
        pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {
            "audiences": audience.into_iter().collect::<Vec<_>>(),
            "expirationSeconds": seconds.unwrap_or(3607),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                "name": pod.metadata.name, "uid": pod.metadata.uid},
        }
    }))?;
    sas.create_token_request(&sa, &PostParams::default(), &request)
        .await
        .with_context(|| format!("TokenRequest for ServiceAccount {ns}/{sa}"))?
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| anyhow!("TokenRequest answered no token"))
}

fn log_name(key: &str) -> String {
    format!("pod-{}", key.replace('/', "-"))
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Reads a volume's sources and, if anything changed, writes them as the
/// kubelet's atomic writer does: the files into a new `..data-<n>` folder,
/// `..data` swapped to it in one rename, each top-level name a link
/// through `..data`.
async fn sync_volume(client: &kube::Client, ns: &str, v: &mut SyncedVolume) -> Result<()> {
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let pick = |all: BTreeMap<String, Vec<u8>>,
                items: &[(String, String)],
                files: &mut BTreeMap<String, Vec<u8>>| {
        if items.is_empty() {
            files.extend(all);
        } else {
            for (key, path) in items {
                if let Some(c) = all.get(key) {
                    files.insert(path.clone(), c.clone());
                }
            }
        }
    };
    for s in &v.sources {
        match s {
            Source::Fixed { path, content } => {
                files.insert(path.clone(), content.clone());
            }
            Source::Secret { name, items, optional } => {
                let api: Api<Secret> = Api::namespaced(client.clone(), ns);
                match api.get_opt(name).await? {
                    Some(s) => {
                        let all = s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
                        pick(all, items, &mut files);
                    }
                    None if *optional => {}
                    None => bail!("Secret {ns}/{name} for a volume does not exist"),
                }
            }
            Source::ConfigMap { name, items, optional } => {
                let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
                match api.get_opt(name).await? {
                    Some(c) => {
                        let mut all: BTreeMap<String, Vec<u8>> = c
                            .data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, v.into_bytes()))
                            .collect();
                        all.extend(c.binary_data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)));
                        pick(all, items, &mut files);
                    }
                    None if *optional => {}
                    None => bail!("ConfigMap {ns}/{name} for a volume does not exist"),
                }
            }
        }
    }
    if files == v.files && v.generation > 0 {
        return Ok(());
    }
    v.generation += 1;
    let data = v.dir.join(format!("..data-{}", v.generation));
    std::fs::create_dir_all(&data)?;
    set_mode(&data, 0o755)?;
    for (path, content) in &files {
        if path.split('/').any(|p| p == ".." || p.is_empty()) {
            bail!("volume file path {path:?}");
        }
        let file = data.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&file, content)?;
        set_mode(&file, v.mode)?;
    }
    let tmp = v.dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..data-{}", v.generation), &tmp)?;
    std::fs::rename(&tmp, v.dir.join("..data"))?;
    for top in files.keys().filter_map(|p| p.split('/').next()) {
        let link = v.dir.join(top);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{top}"), &link)?;
        }
    }
    if v.generation > 1 {
        let _ = std::fs::remove_dir_all(v.dir.join(format!("..data-{}", v.generation - 1)));
    }
    v.files = files;
    Ok(())
}

/// `$(VAR)` replaced by its value where VAR is defined, `$$` by `$`, as
/// the kubelet expands command, args and env values.
fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some((_, v)) = env.iter().rev().find(|(k, _)| *k == inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Runs `probe` if it is due; `Some(passed)` when it ran.
async fn probe_due(
    state: &mut ProbeState,
    probe: &Probe,
    started: Instant,
    ip: &str,
    container: &Container,
    dial: Option<&Dial>,
) -> Option<bool> {
    let now = Instant::now();
    let first = started + Duration::from_secs(probe.initial_delay_seconds.unwrap_or(0).max(0) as u64);
    if now < state.next.unwrap_or(first) {
        return None;
    }
    state.next = Some(now + Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64));
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    let port = |p: &IntOrString| -> Option<u16> {
        match p {
            IntOrString::Int(n) => u16::try_from(*n).ok(),
            IntOrString::String(name) => container
                .ports
                .iter()
                .flatten()
                .find(|cp| cp.name.as_deref() == Some(name))
                .and_then(|cp| u16::try_from(cp.container_port).ok()),
        }
    };
    let ip: Ipv4Addr = ip.parse().ok()?;
    let passed = if let Some(h) = &probe.http_get {
        let scheme_ok = h.scheme.as_deref().is_none_or(|s| s == "HTTP");
        match port(&h.port) {
            Some(p) if scheme_ok => {
                let host = h.host.clone().unwrap_or_else(|| ip.to_string());
                let path = h.path.clone().unwrap_or_else(|| "/".into());
                let get = async {
                    let s = connect(&host, p, dial).await?;
                    http_status(s, &host, p, &path).await
                };
                tokio::time::timeout(timeout, get)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|c| (200..400).contains(&c))
            }
            _ => false,
        }
    } else if let Some(t) = &probe.tcp_socket {
        match port(&t.port) {
            Some(p) => tokio::time::timeout(timeout, connect(&ip.to_string(), p, dial))
                .await
                .is_ok_and(|c| c.is_some()),
            None => false,
        }
    } else {
        false
    };
    if passed {
        state.successes += 1;
        state.failures = 0;
    } else {
        state.failures += 1;
        state.successes = 0;
    }
    Some(passed)
}

/// A connection to host:port, from inside the pods' network namespace
/// when they have one (`host` must then be an IPv4 address).
async fn connect(host: &str, port: u16, dial: Option<&Dial>) -> Option<tokio::net::TcpStream> {
    let Some(dial) = dial else {
        return tokio::net::TcpStream::connect((host, port)).await.ok();
    };
    let addr = SocketAddrV4::new(host.parse().ok()?, port);
    let dial = dial.clone();
    let s = tokio::task::spawn_blocking(move || dial(addr)).await.ok()?.ok()?;
    s.set_nonblocking(true).ok()?;
    tokio::net::TcpStream::from_std(s).ok()
}

/// The status code of `GET path` over `s` to host:port, as kube-probe asks it.
async fn http_status(mut s: tokio::net::TcpStream, host: &str, port: u16, path: &str) -> Option<u16> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/testbed\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        let n = s.read(&mut buf[got..]).await.ok()?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let line = std::str::from_utf8(&buf[..got]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The pod's status as this kubelet sees it.
fn pod_status(r: &Running, container: &Container) -> serde_json::Value {
    let t = |b: bool| if b { "True" } else { "False" };
    let running = r.proc.is_some();
    let mut conditions = vec![
        json!({"type": "PodScheduled", "status": "True"}),
        json!({"type": "Initialized", "status": "True"}),
        json!({"type": "ContainersReady", "status": t(r.ready && running)}),
        json!({"type": "Ready", "status": t(r.ready && running)}),
    ];
    if let Some(e) = &r.error {
        conditions.push(
            json!({"type": "TestbedKubelet", "status": "False", "reason": "Unsupported", "message": e}),
        );
    }
    let state = match (running, r.phase) {
        (true, _) => json!({"running": {}}),
        (false, "Succeeded") => json!({"terminated": {"exitCode": 0, "reason": "Completed"}}),
        (false, "Failed") => json!({"terminated": {"exitCode": 1, "reason": "Error", "message": r.error}}),
        _ => json!({"waiting": {"reason": "ContainerCreating"}}),
    };
    json!({"status": {
        "phase": r.phase,
        "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
        "podIP": r.ip, "podIPs": [{"ip": r.ip}],
        "conditions": conditions,
        "containerStatuses": [{
            "name": container.name, "image": container.image, "imageID": "",
            "ready": r.ready && running, "started": running,
            "restartCount": r.starts.saturating_sub(1), "state": state,
        }],
    }})
}

#[cfg(test)]
mod tests {
    use super::expand;

    #[test]
    fn variables_expand_as_the_kubelet_expands_them() {
        let env = vec![("POD_IP".to_string(), "127.0.0.5".to_string()), ("A".to_string(), "x".to_string())];
        assert_eq!(expand("--admin-addr=$(POD_IP):9090", &env), "--admin-addr=127.0.0.5:9090");
        assert_eq!(expand("$(MISSING) $$(A) $(A)$", &env), "$(MISSING) $(A) x$");
        assert_eq!(expand("$(A", &env), "$(A");
    }
}
