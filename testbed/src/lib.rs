//! dormant's real Kubernetes testbed.
//!
//! Starts etcd, kube-apiserver (TLS, RBAC, service-account tokens, optional
//! audit webhook), kube-controller-manager, kube-scheduler and kwok (fake
//! nodes whose pods become Running and Ready after a configurable delay) on
//! loopback, from the pinned binaries that `hack/testbed.sh install` builds.
//! Test users have their own client certificates. See `../shared/TESTING.md`.
//!
//! A test binary shares one cluster ([`Cluster::shared`]) and isolates its
//! tests by namespace; tests that need special API server flags start their
//! own ([`Cluster::start`]). Every process dies with its [`Cluster`], and with
//! the test process itself.

pub mod audit;
pub mod bench;
pub mod kubelet;
pub mod netns;
pub mod pki;
pub mod process;
pub mod real_vcluster;
pub mod spawner;
pub mod vcluster;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;

use crate::pki::{Ca, CertPair};
use crate::process::{Proc, free_port, http_ok};

/// Runs `work` on a thread of its own with a tokio runtime of its own (a
/// supervisor that outlives the test's own runtime); its failure, written
/// out, goes to `failed`.
pub(crate) fn runtime_thread<F>(
    name: String,
    work: F,
    failed: impl FnOnce(String) + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: std::future::Future<Output = Result<()>> + Send + 'static,
{
    std::thread::Builder::new().name(name).spawn(move || {
        let result = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(work));
        if let Err(e) = result {
            failed(format!("{e:#}"));
        }
    })
}

/// The user agent of the test robot, a poller that keeps a cluster awake
/// for ever unless a policy ignores it (not a GitOps controller: the agent
/// ignores those by itself).
pub const ROBOT_USER_AGENT: &str = "kubewatch/v0.1.0 (linux/amd64) kubernetes/v0.31.0";

/// Where the pinned binaries live; fails with the install command when any
/// is missing.
#[derive(Clone, Debug)]
pub struct Bins {
    pub dir: PathBuf,
}

impl Bins {
    pub fn repo_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    pub fn locate() -> Result<Bins> {
        static BINS: OnceLock<std::result::Result<Bins, String>> = OnceLock::new();
        BINS.get_or_init(|| Self::find_in(None).map_err(|e| format!("{e:#}"))).clone().map_err(|e| anyhow!(e))
    }

    /// Checks the binaries in `dir` (default: where `hack/testbed.sh` installs
    /// them, or `$DORMANT_TESTBED_DIR`).
    pub fn find_in(dir: Option<&Path>) -> Result<Bins> {
        let script = Self::repo_root().join("hack/testbed.sh");
        let run = |arg: &str| {
            let mut cmd = Command::new(&script);
            cmd.arg(arg);
            if let Some(d) = dir {
                cmd.env("DORMANT_TESTBED_DIR", d);
            }
            cmd.output().with_context(|| format!("run {}", script.display()))
        };
        let out = run("dir")?;
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let check = run("check")?;
        if !check.status.success() {
            bail!(
                "the testbed is not installed: {}\n\
                 install it (about 9 minutes the first time, cached afterwards) with:\n\n    hack/testbed.sh install\n",
                String::from_utf8_lossy(&check.stderr).trim()
            );
        }
        Ok(Bins { dir })
    }

    /// promtool (built by `hack/testbed.sh install` beside the testbed).
    pub fn promtool() -> Result<PathBuf> {
        Self::tool("promtool")
    }

    /// KEDA's ScaledObject CRD (fetched by `hack/testbed.sh install`).
    pub fn keda_crd() -> Result<PathBuf> {
        Self::tool("keda-crd")
    }

    /// The real vcluster's folder: `vcluster`, `kine`, `chart/` (built by
    /// `hack/testbed.sh install`).
    pub fn vcluster_dir() -> Result<PathBuf> {
        Self::tool("vcluster-dir")
    }

    /// A file `hack/testbed.sh install` puts beside the testbed.
    fn tool(name: &str) -> Result<PathBuf> {
        let script = Self::repo_root().join("hack/testbed.sh");
        let out =
            Command::new(&script).arg(name).output().with_context(|| format!("run {}", script.display()))?;
        if !out.status.success() {
            bail!(
                "{name} is not installed: {}\ninstall it with:\n\n    hack/testbed.sh install\n",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A user with a client certificate signed by the testbed CA.
#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
    pub cert: CertPair,
    /// A kubeconfig for this user against the host API server.
    pub kubeconfig: PathBuf,
}

/// Where kube-apiserver sends audit events.
#[derive(Clone, Debug)]
pub struct AuditWebhook {
    /// The receiver's HTTPS URL.
    pub url: String,
    /// The CA that signed the receiver's serving certificate.
    pub ca_pem: String,
    /// The bearer token the API server presents.
    pub token: String,
    /// `--audit-webhook-batch-max-wait`.
    pub batch_max_wait: Duration,
}

#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Point kube-apiserver's audit webhook at a receiver.
    pub audit: Option<AuditWebhook>,
    /// How long kwok waits before a pod becomes Running and Ready.
    pub pod_ready_delay: Duration,
    /// Raise the controller-manager's and scheduler's client limits (for
    /// benchmarks with hundreds of targets).
    pub fast_controllers: bool,
    /// Start the controller-manager, scheduler and kwok (else only etcd and
    /// kube-apiserver).
    pub controllers: bool,
    /// Extra kube-controller-manager flags.
    pub controller_manager_args: Vec<String>,
    /// Also write the host API server's audit events (level `Metadata`,
    /// JSON lines) to [`Cluster::audit_log`]: what each user really did.
    pub audit_log: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            audit: None,
            pod_ready_delay: Duration::from_millis(0),
            fast_controllers: false,
            controllers: true,
            controller_manager_args: Vec::new(),
            audit_log: false,
        }
    }
}

/// A running testbed cluster. Dropping it kills every process.
pub struct Cluster {
    pub bins: Bins,
    /// The temp folder with certificates, kubeconfigs, logs and etcd's data.
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
    /// `https://127.0.0.1:<port>`
    pub server: String,
    pub etcd_url: String,
    pub ca: Ca,
    pub ca_file: PathBuf,
    serving: CertPair,
    sa_key: CertPair,
    pub admin: User,
    /// `alice`, in group `team-a`: a developer with no rights until a test
    /// binds some.
    pub alice: User,
    /// `ci-robot` in group `ci`, with no rights of its own (tests bind what
    /// it may do); sends [`ROBOT_USER_AGENT`].
    pub robot: User,
    procs: Mutex<Vec<Proc>>,
    /// kube-apiserver's arguments, to start it again ([`Cluster::start_apiserver`]).
    api_args: Vec<String>,
    pub started_in: Duration,
    /// kwok's kubelet server (exec, logs, port-forward), when controllers run.
    kubelet_port: OnceLock<u16>,
}

impl Cluster {
    /// The cluster shared by every test in this test binary.
    ///
    /// # Panics
    /// When the testbed cannot start; the message says why (for a missing
    /// binary, the command that installs it).
    pub fn shared() -> &'static Cluster {
        static SHARED: OnceLock<std::result::Result<Cluster, String>> = OnceLock::new();
        match SHARED.get_or_init(|| Cluster::start(ClusterOptions::default()).map_err(|e| format!("{e:#}"))) {
            Ok(c) => c,
            Err(e) => panic!("testbed cluster failed to start: {e}"),
        }
    }

    /// Starts a cluster of its own (blocking, about 6 s). A start that fails
    /// (a free port taken by someone else between probing and binding, say)
    /// is retried twice with new ports and a new folder.
    pub fn start(opts: ClusterOptions) -> Result<Cluster> {
        let mut last = None;
        for attempt in 1..=3 {
            match Self::start_once(opts.clone()) {
                Ok(c) => return Ok(c),
                Err(e) => {
                    eprintln!("testbed: start attempt {attempt} failed: {e:#}");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("the testbed did not start")))
    }

    fn start_once(opts: ClusterOptions) -> Result<Cluster> {
        let started = Instant::now();
        let bins = Bins::locate()?;
        sweep_stale_folders();
        let tmp = tempfile::Builder::new().prefix(FOLDER_PREFIX).tempdir()?;
        let dir = tmp.path().to_path_buf();
        std::fs::write(dir.join(OWNER_FILE), std::process::id().to_string())?;
        let ca = Ca::new("dormant-testbed-ca")?;
        let ca_file = dir.join("ca.crt");
        std::fs::write(&ca_file, &ca.cert_pem)?;
        let serving = ca.server(&[])?;
        let sa_key = pki::service_account_key()?;
        write_pair(&dir, "apiserver", &serving)?;
        write_pair(&dir, "sa", &sa_key)?;

        let api_port = free_port()?;
        let server = format!("https://127.0.0.1:{api_port}");
        let mk_user = |name: &str, groups: &[&str]| -> Result<User> {
            let cert = ca.client(name, groups)?;
            let kubeconfig = write_kubeconfig(&dir, name, &server, &ca_file, &cert)?;
            Ok(User {
                name: name.to_string(),
                groups: groups.iter().map(|g| g.to_string()).collect(),
                cert,
                kubeconfig,
            })
        };
        let admin = mk_user("admin", &["system:masters"])?;
        let alice = mk_user("alice", &["team-a"])?;
        let robot = mk_user("ci-robot", &["ci"])?;

        let mut procs = Vec::new();
        let etcd_port = free_port()?;
        let peer_port = free_port()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = spawner::spawn(
            "etcd",
            &bins.path("etcd"),
            &args(&[
                "--name=default",
                &format!("--data-dir={}", dir.join("etcd").display()),
                &format!("--listen-client-urls={etcd_url}"),
                &format!("--advertise-client-urls={etcd_url}"),
                &format!("--listen-peer-urls={peer_url}"),
                &format!("--initial-advertise-peer-urls={peer_url}"),
                &format!("--initial-cluster=default={peer_url}"),
                "--unsafe-no-fsync",
                "--log-level=warn",
            ]),
            &dir,
        )?;
        etcd.wait_ready(Duration::from_secs(30), || http_ok(etcd_port, "/health"))?;
        procs.push(etcd);

        let mut cluster = Cluster {
            bins,
            dir,
            _tmp: tmp,
            server,
            etcd_url,
            ca,
            ca_file,
            serving,
            sa_key,
            admin,
            alice,
            robot,
            procs: Mutex::new(Vec::new()),
            api_args: Vec::new(),
            started_in: Duration::ZERO,
            kubelet_port: OnceLock::new(),
        };
        let mut api_args = cluster.apiserver_args(api_port, "/registry", opts.audit.as_ref())?;
        if opts.audit_log {
            let policy = cluster.audit_policy(api_port)?;
            api_args.retain(|a| !a.starts_with("--audit-policy-file="));
            api_args.push(format!("--audit-policy-file={}", policy.display()));
            api_args.push(format!("--audit-log-path={}", cluster.audit_log().display()));
            api_args.push("--audit-log-format=json".into());
            // Written before the response returns: a test reads it right after.
            api_args.push("--audit-log-mode=blocking".into());
        }
        let mut api =
            spawner::spawn("kube-apiserver", &cluster.bins.path("kube-apiserver"), &api_args, &cluster.dir)?;
        let admin_kc = cluster.admin.kubeconfig.clone();
        let kubectl = cluster.bins.path("kubectl");
        api.wait_ready(Duration::from_secs(60), || readyz(&kubectl, &admin_kc))?;
        procs.push(api);
        cluster.api_args = api_args;
        *lock(&cluster.procs) = procs;

        if opts.controllers {
            cluster.start_controllers(&opts)?;
        }
        cluster.started_in = started.elapsed();
        Ok(cluster)
    }

    /// Arguments for a kube-apiserver on this cluster's etcd, CA and users;
    /// another `etcd_prefix` makes it a separate cluster (a vcluster's own
    /// API server).
    pub fn apiserver_args(
        &self,
        port: u16,
        etcd_prefix: &str,
        audit: Option<&AuditWebhook>,
    ) -> Result<Vec<String>> {
        let d = &self.dir;
        let mut a = args(&[
            &format!("--etcd-servers={}", self.etcd_url),
            &format!("--etcd-prefix={etcd_prefix}"),
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            &format!("--secure-port={port}"),
            &format!("--tls-cert-file={}", d.join("apiserver.crt").display()),
            &format!("--tls-private-key-file={}", d.join("apiserver.key").display()),
            &format!("--client-ca-file={}", self.ca_file.display()),
            &format!("--service-account-key-file={}", d.join("sa.crt").display()),
            &format!("--service-account-signing-key-file={}", d.join("sa.key").display()),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range=10.96.0.0/24",
            "--authorization-mode=Node,RBAC",
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true",
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            "--v=1",
        ]);
        if let Some(audit) = audit {
            let policy = self.audit_policy(port)?;
            let ca = d.join(format!("audit-ca-{port}.crt"));
            std::fs::write(&ca, &audit.ca_pem)?;
            let kc = d.join(format!("audit-webhook-{port}.kubeconfig"));
            std::fs::write(
                &kc,
                format!(
                    "apiVersion: v1\nkind: Config\nclusters:\n- name: receiver\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: apiserver\n  user:\n    token: {}\ncontexts:\n- name: default\n  context:\n    cluster: receiver\n    user: apiserver\ncurrent-context: default\n",
                    audit.url,
                    ca.display(),
                    audit.token
                ),
            )?;
            a.push(format!("--audit-policy-file={}", policy.display()));
            a.push(format!("--audit-webhook-config-file={}", kc.display()));
            a.push(format!("--audit-webhook-batch-max-wait={}ms", audit.batch_max_wait.as_millis()));
        }
        Ok(a)
    }

    /// Writes the audit policy of the API server on `port` (every request
    /// at `Metadata`, from `ResponseStarted` on) and returns its path.
    fn audit_policy(&self, port: u16) -> Result<PathBuf> {
        let policy = self.dir.join(format!("audit-policy-{port}.yaml"));
        std::fs::write(
            &policy,
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n",
        )?;
        Ok(policy)
    }

    /// The host API server's audit log (JSON lines, one `audit.k8s.io/v1`
    /// Event each), written when the cluster started with
    /// [`ClusterOptions::audit_log`].
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("kube-apiserver-audit.log")
    }

    fn start_controllers(&self, opts: &ClusterOptions) -> Result<()> {
        let d = &self.dir;
        let cm = self.ca.client("system:kube-controller-manager", &[])?;
        let cm_kc = write_kubeconfig(d, "kube-controller-manager", &self.server, &self.ca_file, &cm)?;
        let sched = self.ca.client("system:kube-scheduler", &[])?;
        let sched_kc = write_kubeconfig(d, "kube-scheduler", &self.server, &self.ca_file, &sched)?;
        let mut limits = Vec::new();
        if opts.fast_controllers {
            limits = args(&["--kube-api-qps=1000", "--kube-api-burst=2000"]);
        }
        let mut cm_args = args(&[
            &format!("--kubeconfig={}", cm_kc.display()),
            "--controllers=*,-nodeipam",
            "--leader-elect=false",
            "--secure-port=0",
            &format!("--service-account-private-key-file={}", d.join("sa.key").display()),
            &format!("--root-ca-file={}", self.ca_file.display()),
            "--use-service-account-credentials=true",
            // HPA reacts within seconds instead of 15 s (tests watch it pause and resume).
            "--horizontal-pod-autoscaler-sync-period=2s",
            "--v=1",
        ]);
        cm_args.extend(limits.iter().cloned());
        if opts.fast_controllers {
            cm_args.extend(args(&["--concurrent-deployment-syncs=20", "--concurrent-replicaset-syncs=20"]));
        }
        cm_args.extend(opts.controller_manager_args.iter().cloned());
        let mut sched_args = args(&[
            &format!("--kubeconfig={}", sched_kc.display()),
            "--leader-elect=false",
            "--secure-port=0",
            "--v=1",
        ]);
        sched_args.extend(limits);

        let cm = spawner::spawn(
            "kube-controller-manager",
            &self.bins.path("kube-controller-manager"),
            &cm_args,
            d,
        )?;
        let sched = spawner::spawn("kube-scheduler", &self.bins.path("kube-scheduler"), &sched_args, d)?;
        let mut kwok_conf = self.kwok_stages(opts.pod_ready_delay)?;
        let shell = self.dir.join("kwok-cluster-exec-shell.yaml");
        std::fs::write(&shell, SHELL_EXEC)?;
        kwok_conf.push(shell);
        let ready_again = self.dir.join("kwok-pod-ready-again.yaml");
        std::fs::write(&ready_again, POD_READY_AGAIN)?;
        kwok_conf.push(ready_again);
        let kubelet_port = free_port()?;
        let _ = self.kubelet_port.set(kubelet_port);
        // kwok plays the kubelets: it gets a node's identity (group
        // system:nodes), with cluster-admin rights to manage every fake node.
        let kwok_user = self.ca.client("system:node:kwok", &["system:nodes", "system:masters"])?;
        let kwok_kc = write_kubeconfig(d, "kwok", &self.server, &self.ca_file, &kwok_user)?;
        let mut kwok_args = args(&[
            &format!("--kubeconfig={}", kwok_kc.display()),
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--node-ip=127.0.0.1",
            // Without a lease the node only reports every minute and the
            // node-lifecycle controller marks it (and its pods) not ready in between.
            "--node-lease-duration-seconds=40",
            "--cidr=10.244.0.0/16",
            &format!("--server-address=127.0.0.1:{}", kubelet_port),
        ]);
        for f in kwok_conf {
            kwok_args.push(format!("--config={}", f.display()));
        }
        let kwok = spawner::spawn("kwok", &self.bins.path("kwok"), &kwok_args, d)?;
        lock(&self.procs).extend([cm, sched, kwok]);

        self.kubectl_apply(&self.admin, FAKE_NODE)?;
        // A Node starts with the not-ready taint; the node-lifecycle controller
        // removes it once kwok reports the node Ready.
        self.wait_for(Duration::from_secs(60), "the fake node to be Ready and untainted", || {
            let out = self.kubectl_out(
                &self.admin,
                &[
                    "get",
                    "node",
                    "kwok-node-0",
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status} {.spec.taints}",
                ],
            );
            matches!(out, Ok(s) if s.trim() == "True")
        })?;
        // The service-account controller creates `default` in each namespace; pods need it.
        self.wait_for(Duration::from_secs(60), "the default service account", || {
            self.kubectl_out(&self.admin, &["get", "serviceaccount", "default", "-n", "default"]).is_ok()
        })?;
        Ok(())
    }

    /// kwok's own stage files (from its module), with the pod-ready stage's
    /// delay set to `delay`.
    fn kwok_stages(&self, delay: Duration) -> Result<Vec<PathBuf>> {
        let stages = self.bins.path("kwok-stages");
        let mut out = Vec::new();
        for rel in [
            "node/fast/node-initialize.yaml",
            "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
            "pod/fast/pod-ready.yaml",
            "pod/fast/pod-complete.yaml",
            "pod/fast/pod-delete.yaml",
        ] {
            let src = stages.join(rel);
            let text = std::fs::read_to_string(&src)
                .with_context(|| format!("read kwok stage {}", src.display()))?;
            let text = if rel.ends_with("pod-ready.yaml") && !delay.is_zero() {
                let mut doc: serde_yaml::Value = serde_yaml::from_str(&text)?;
                let spec = doc
                    .get_mut("spec")
                    .and_then(|s| s.as_mapping_mut())
                    .ok_or_else(|| anyhow!("kwok stage {rel} has no spec"))?;
                let mut d = serde_yaml::Mapping::new();
                d.insert("durationMilliseconds".into(), (delay.as_millis() as u64).into());
                spec.insert("delay".into(), serde_yaml::Value::Mapping(d));
                serde_yaml::to_string(&doc)?
            } else {
                text
            };
            let dst = self.dir.join(format!("kwok-{}", rel.replace('/', "-")));
            std::fs::write(&dst, text)?;
            out.push(dst);
        }
        Ok(out)
    }

    /// The port of kwok's kubelet server on 127.0.0.1 (it answers exec into
    /// pods named `shell` by running the command here, and port-forward to
    /// their port 7 with an echo); `None` without controllers.
    pub fn kubelet_port(&self) -> Option<u16> {
        self.kubelet_port.get().copied()
    }

    /// Mints a user with its own client certificate and kubeconfig.
    pub fn user(&self, name: &str, groups: &[&str]) -> Result<User> {
        let cert = self.ca.client(name, groups)?;
        let kubeconfig = write_kubeconfig(&self.dir, name, &self.server, &self.ca_file, &cert)?;
        Ok(User {
            name: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            cert,
            kubeconfig,
        })
    }

    /// The serving certificate the API servers use (also fine for any test
    /// server on 127.0.0.1).
    pub fn serving_cert(&self) -> &CertPair {
        &self.serving
    }

    pub fn service_account_key(&self) -> &CertPair {
        &self.sa_key
    }

    /// A kube client acting as `user`.
    pub async fn client_for(&self, user: &User) -> Result<kube::Client> {
        client_from_kubeconfig(&user.kubeconfig).await
    }

    /// A kube client acting as the admin.
    pub async fn client(&self) -> Result<kube::Client> {
        self.client_for(&self.admin).await
    }

    /// `kubectl --kubeconfig <user's>`.
    pub fn kubectl(&self, user: &User) -> Command {
        let mut cmd = Command::new(self.bins.path("kubectl"));
        cmd.arg(format!("--kubeconfig={}", user.kubeconfig.display()));
        cmd
    }

    /// Runs kubectl as `user`; Ok(stdout) on success, Err(stderr) otherwise.
    pub fn kubectl_out(&self, user: &User, a: &[&str]) -> std::result::Result<String, String> {
        let out = self.kubectl(user).args(a).output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// `kubectl apply -f -` with `yaml` as `user`.
    pub fn kubectl_apply(&self, user: &User, yaml: &str) -> Result<String> {
        use std::io::Write;
        let mut child = self
            .kubectl(user)
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?.write_all(yaml.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("kubectl apply failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Polls `cond` every 100 ms until it holds or `timeout` passes.
    /// Waits until CustomResourceDefinition `name` is Established (unlike
    /// `kubectl wait --for=condition=Established`, which fails instead of
    /// waiting when it looks before the CRD has any conditions).
    pub fn wait_established(&self, name: &str) -> Result<()> {
        let path = r#"jsonpath={.status.conditions[?(@.type=="Established")].status}"#;
        self.wait_for(Duration::from_secs(60), &format!("CRD {name} to be Established"), || {
            self.kubectl_out(&self.admin, &["get", "crd", name, "-o", path]).is_ok_and(|s| s.trim() == "True")
        })
    }

    pub fn wait_for(&self, timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
        let start = Instant::now();
        while !cond() {
            if start.elapsed() > timeout {
                let mut procs = lock(&self.procs);
                let mut logs = String::new();
                for p in procs.iter_mut() {
                    if let Some(status) = p.exited() {
                        logs.push_str(&format!("\n{} exited with {status}:\n{}", p.name, p.tail(20)));
                    }
                }
                bail!("timed out after {timeout:?} waiting for {what}{logs}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Kills kube-apiserver (SIGKILL: no graceful shutdown, every
    /// connection cut). Every other process (etcd, the controllers, kwok)
    /// keeps running; [`Cluster::start_apiserver`] brings it back.
    pub fn kill_apiserver(&self) -> Result<()> {
        let mut procs = lock(&self.procs);
        let api = procs
            .iter_mut()
            .find(|p| p.name == "kube-apiserver")
            .ok_or_else(|| anyhow!("no kube-apiserver to kill"))?;
        api.kill();
        Ok(())
    }

    /// Starts kube-apiserver again after [`Cluster::kill_apiserver`], with
    /// the same arguments on the same port; returns once it is ready.
    pub fn start_apiserver(&self) -> Result<()> {
        let mut procs = lock(&self.procs);
        let i = procs
            .iter()
            .position(|p| p.name == "kube-apiserver")
            .ok_or_else(|| anyhow!("no kube-apiserver to start again"))?;
        let mut api =
            spawner::spawn("kube-apiserver", &self.bins.path("kube-apiserver"), &self.api_args, &self.dir)?;
        let kubectl = self.bins.path("kubectl");
        api.wait_ready(Duration::from_secs(60), || readyz(&kubectl, &self.admin.kubeconfig))?;
        procs[i] = api;
        Ok(())
    }

    /// Process ids of every process this cluster started (for leak checks).
    pub fn pids(&self) -> Vec<u32> {
        lock(&self.procs).iter().map(Proc::pid).collect()
    }

    /// The process id of the process named `name` (`kube-apiserver`, …).
    pub fn pid_of(&self, name: &str) -> Option<u32> {
        lock(&self.procs).iter().find(|p| p.name == name).map(Proc::pid)
    }

    /// Logs of a process by name (`kube-apiserver`, `kwok`, …), last lines.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        process::tail(&self.dir.join(format!("{name}.log")), lines)
    }

    /// Creates a namespace with a unique name (`<prefix>-<n>`), optionally
    /// labelled, and returns its name.
    pub fn namespace(&self, prefix: &str, labels: &[(&str, &str)]) -> Result<String> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id() % 10000);
        let mut yaml = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n");
        yaml.push_str("    testbed: \"true\"\n");
        for (k, v) in labels {
            yaml.push_str(&format!("    {k}: \"{v}\"\n"));
        }
        self.kubectl_apply(&self.admin, &yaml)?;
        Ok(name)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Kill in reverse: kwok, scheduler, controller-manager, apiserver, etcd.
        let mut procs = lock(&self.procs);
        while let Some(mut p) = procs.pop() {
            p.kill();
        }
    }
}

/// kwok runs `kubectl exec` into a pod named `shell` (in any namespace, of
/// any cluster whose Node points at kwok's server) as a local command, and
/// answers `kubectl port-forward` to its port 7 with `cat` (echo): real exec
/// and port-forward streams end to end, without a container runtime.
const SHELL_EXEC: &str = r#"apiVersion: kwok.x-k8s.io/v1alpha1
kind: ClusterExec
metadata:
  name: testbed-shell
spec:
  selector:
    matchNames: [shell]
  execs:
  - local: {}
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: ClusterPortForward
metadata:
  name: testbed-echo
spec:
  selector:
    matchNames: [shell]
  forwards:
  - ports: [7]
    command: [cat]
"#;

/// A kubelet keeps reporting the conditions of its running pods; kwok's
/// stages set them once. When something else replaces a running pod's
/// conditions (the real vcluster's syncer copies its virtual pod's
/// conditions onto the host pod), this stage puts Ready back, as the
/// kubelet's next status update would.
const POD_READY_AGAIN: &str = r#"apiVersion: kwok.x-k8s.io/v1alpha1
kind: Stage
metadata:
  name: testbed-pod-ready-again
spec:
  resourceRef:
    apiGroup: v1
    kind: Pod
  selector:
    matchExpressions:
    - key: '.metadata.deletionTimestamp'
      operator: 'DoesNotExist'
    - key: '.status.phase'
      operator: 'In'
      values: ['Running']
    - key: '.status.conditions.[] | select( .type == "Ready" ) | .status'
      operator: 'NotIn'
      values: ['True']
  next:
    statusTemplate: |
      {{ $now := Now }}
      conditions:
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Initialized
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: Ready
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: ContainersReady
      - lastTransitionTime: {{ $now | Quote }}
        status: "True"
        type: PodScheduled
"#;

/// The one kwok node every simulated pod runs on: room for the engine
/// bench's 50,000 namespace workloads (one pod each, 200m and 256Mi
/// requested) and more; 20,000 pods left 30,000 of them unschedulable.
const FAKE_NODE: &str = r#"apiVersion: v1
kind: Node
metadata:
  name: kwok-node-0
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    kubernetes.io/hostname: kwok-node-0
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
status:
  allocatable: {cpu: "100000", memory: 1Pi, pods: "100000", ephemeral-storage: 100Ti}
  capacity: {cpu: "100000", memory: 1Pi, pods: "100000", ephemeral-storage: 100Ti}
"#;

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

const FOLDER_PREFIX: &str = "dormant-testbed-";
/// In each cluster's folder: the id of the test process that owns it.
const OWNER_FILE: &str = "owner.pid";

/// Removes the folders of clusters whose test process has ended. A shared
/// cluster lives in a `static`, which Rust never drops, so its folder (etcd's
/// data, logs: ~100 MB) would otherwise outlive every test run.
pub fn sweep_stale_folders() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in entries.flatten() {
        let path = e.path();
        if !e.file_name().to_string_lossy().starts_with(FOLDER_PREFIX) || !path.is_dir() {
            continue;
        }
        let owner =
            std::fs::read_to_string(path.join(OWNER_FILE)).ok().and_then(|p| p.trim().parse::<u32>().ok());
        // Folders without an owner file are from before it existed, or are
        // being set up this instant: only ones older than a minute go.
        let ended = match owner {
            Some(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
            None => e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(60)),
        };
        if ended {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

fn write_pair(dir: &Path, name: &str, pair: &CertPair) -> Result<()> {
    std::fs::write(dir.join(format!("{name}.crt")), &pair.cert_pem)?;
    std::fs::write(dir.join(format!("{name}.key")), &pair.key_pem)?;
    Ok(())
}

/// A self-contained kubeconfig (certificates embedded) for `user` at `server`.
pub fn kubeconfig_yaml(server: &str, ca_pem: &str, user: &str, cert: &CertPair) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: testbed\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: {user}\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: {user}\n  context:\n    cluster: testbed\n    user: {user}\ncurrent-context: {user}\n",
        b64(ca_pem),
        b64(&cert.cert_pem),
        b64(&cert.key_pem),
    )
}

fn write_kubeconfig(
    dir: &Path,
    user: &str,
    server: &str,
    ca_file: &Path,
    cert: &CertPair,
) -> Result<PathBuf> {
    let ca_pem = std::fs::read_to_string(ca_file)?;
    let path = dir.join(format!("{}.kubeconfig", user.replace(':', "_")));
    std::fs::write(&path, kubeconfig_yaml(server, &ca_pem, user, cert))?;
    Ok(path)
}

/// `kubectl get --raw /readyz` answers `ok`.
fn readyz(kubectl: &Path, kubeconfig: &Path) -> bool {
    Command::new(kubectl)
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(["get", "--raw", "/readyz", "--request-timeout=2s"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(path)?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}
