//! `dormant agent`'s configuration: every flag with a `DORMANT_*`
//! environment fallback, all checked at once into [`Settings`] (every bad
//! value reported together, before anything starts).

use std::collections::{BTreeSet, HashSet};
use std::net::{Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::policy::duration::{self, SleepAfter};
use crate::policy::{Defaults, Pricing, schedule};
use crate::target::Scope;
use crate::tls::limits::Limits;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

/// `dormant agent` flags.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// Namespace the agent runs in (its Lease lives here; never a target).
    #[arg(long, env = "DORMANT_NAMESPACE", default_value = "dormant")]
    pub namespace: String,
    /// This replica's name in the Lease and in Events (default: $POD_NAME, then the host name).
    #[arg(long, env = "DORMANT_IDENTITY")]
    pub identity: Option<String>,
    /// Address of the admin port (/livez, /readyz, /metrics, /status). It
    /// has no authentication, so it stays on loopback unless told where to
    /// listen (the chart passes the pod's IP: probes and Prometheus reach
    /// it there). An IPv6 address may come without brackets, as the
    /// downward API gives it: `fd00::7:9090`.
    #[arg(long, env = "DORMANT_ADMIN_ADDR", default_value = "127.0.0.1:9090", value_parser = listen_addr)]
    pub admin_addr: SocketAddr,
    /// Connections the admin port holds at once (at the cap, the one idle
    /// the longest is closed to make room).
    #[arg(long, env = "DORMANT_ADMIN_MAX_CONNECTIONS", default_value_t = 64)]
    pub admin_max_connections: usize,
    /// How long a TLS handshake may take (proxy and audit webhook).
    #[arg(long, env = "DORMANT_TLS_HANDSHAKE_TIMEOUT", default_value = "10s")]
    pub tls_handshake_timeout: String,
    /// How long an HTTP/1.1 client has to send a request head, idle
    /// keep-alive connections included (every listener).
    #[arg(long, env = "DORMANT_HEADER_READ_TIMEOUT", default_value = "30s")]
    pub header_read_timeout: String,
    /// How long a connection may stay open with no request in flight
    /// (every listener; HTTP/2 PINGs do not count).
    #[arg(long, env = "DORMANT_CONNECTION_IDLE_TIMEOUT", default_value = "90s")]
    pub connection_idle_timeout: String,
    /// Name of the Lease used for leader election.
    #[arg(long, env = "DORMANT_LEASE_NAME", default_value = "dormant-controller")]
    pub lease_name: String,
    /// How long a leader's Lease lasts without renewal (a standby takes over after it).
    #[arg(long, env = "DORMANT_LEASE_DURATION", default_value = "15s")]
    pub lease_duration: String,
    /// Requests per second dormant makes to the API server (watches aside).
    #[arg(long, env = "DORMANT_QPS", default_value_t = 50)]
    pub qps: u32,
    /// Requests allowed in a burst above the QPS.
    #[arg(long, env = "DORMANT_BURST", default_value_t = 100)]
    pub burst: u32,
    /// Targets reconciled at once.
    #[arg(long, env = "DORMANT_CONCURRENCY", default_value_t = 16)]
    pub concurrency: usize,
    /// A reconcile that takes longer (an API server that stopped answering)
    /// is abandoned and retried with backoff.
    #[arg(long, env = "DORMANT_RECONCILE_TIMEOUT", default_value = "2m")]
    pub reconcile_timeout: String,
    /// How often each target's last activity is written to it, at most.
    #[arg(long, env = "DORMANT_FLUSH_INTERVAL", default_value = "5s")]
    pub flush_interval: String,
    /// Activities queued between the receivers and the ledger.
    #[arg(long, env = "DORMANT_ACTIVITY_QUEUE", default_value_t = 10_000)]
    pub activity_queue: usize,
    /// Idle time before sleep for targets no policy or annotation covers.
    #[arg(long, env = "DORMANT_DEFAULT_SLEEP_AFTER", default_value = "never")]
    pub default_sleep_after: String,
    /// Time zone for schedules that name none.
    #[arg(long, env = "DORMANT_DEFAULT_TIMEZONE", default_value = "UTC")]
    pub default_timezone: String,
    /// How long a held request waits for its target to wake, unless the policy says otherwise.
    #[arg(long, env = "DORMANT_DEFAULT_WAKE_TIMEOUT", default_value = "2m")]
    pub default_wake_timeout: String,
    /// Default price of one CPU core for an hour (savings figures).
    #[arg(long, env = "DORMANT_CPU_CORE_HOUR", default_value_t = 0.0316)]
    pub cpu_core_hour: f64,
    /// Default price of one GiB of memory for an hour.
    #[arg(long, env = "DORMANT_MEMORY_GIB_HOUR", default_value_t = 0.0042)]
    pub memory_gib_hour: f64,
    /// Currency of the default prices.
    #[arg(long, env = "DORMANT_CURRENCY", default_value = "USD")]
    pub currency: String,
    /// Namespaces that are never targets (the agent's own is added).
    #[arg(
        long,
        env = "DORMANT_EXCLUDE_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system,kube-public,kube-node-lease"
    )]
    pub exclude_namespaces: Vec<String>,
    /// Only namespaces whose labels match this selector (kubectl `-l` syntax) hold targets.
    #[arg(long, env = "DORMANT_NAMESPACE_SELECTOR")]
    pub namespace_selector: Option<String>,
    /// Only these namespaces hold targets (comma-separated; unset: every
    /// namespace not excluded). The chart sets it in its `namespaces` RBAC
    /// mode to the namespaces it grants writes in, so the agent never
    /// tries to act where it would be refused.
    #[arg(long = "namespaces", env = "DORMANT_NAMESPACES", value_delimiter = ',')]
    pub only_namespaces: Vec<String>,
    /// Decide and report, never scale.
    #[arg(long, env = "DORMANT_DRY_RUN")]
    pub dry_run: bool,
    /// Let SleepPolicies' `deleteAfter` delete namespace targets that slept
    /// that long (warned `deleteWarning` before). Off: never deletes.
    #[arg(long, env = "DORMANT_ENABLE_DELETE_AFTER")]
    pub enable_delete_after: bool,
    /// Address of the audit webhook (HTTPS); off when unset.
    #[arg(long, env = "DORMANT_AUDIT_ADDR")]
    pub audit_addr: Option<SocketAddr>,
    /// PEM certificate the audit webhook serves (reloaded when it changes).
    #[arg(long, env = "DORMANT_AUDIT_CERT")]
    pub audit_cert: Option<std::path::PathBuf>,
    /// PEM private key of that certificate.
    #[arg(long, env = "DORMANT_AUDIT_KEY")]
    pub audit_key: Option<std::path::PathBuf>,
    /// File with the bearer tokens API servers present (one per line; a mounted Secret).
    #[arg(long, env = "DORMANT_AUDIT_TOKEN_FILE")]
    pub audit_token_file: Option<std::path::PathBuf>,
    /// CA whose client certificates authenticate API servers.
    #[arg(long, env = "DORMANT_AUDIT_CLIENT_CA")]
    pub audit_client_ca: Option<std::path::PathBuf>,
    /// Largest audit batch accepted, in bytes (also after decompression).
    #[arg(long, env = "DORMANT_AUDIT_MAX_BODY", default_value_t = DEFAULT_AUDIT_MAX_BODY)]
    pub audit_max_body: usize,
    /// Memory audit batches may take at once, in bytes: each is charged
    /// what it may cost once decoded before its body is read.
    #[arg(long, env = "DORMANT_AUDIT_MAX_INFLIGHT_BYTES", default_value_t = DEFAULT_AUDIT_MAX_INFLIGHT_BYTES)]
    pub audit_max_inflight_bytes: usize,
    /// Audit batches read and decoded at once.
    #[arg(long, env = "DORMANT_AUDIT_MAX_REQUESTS", default_value_t = 8)]
    pub audit_max_requests: usize,
    /// How long a batch may wait for room before it is answered 503 with
    /// Retry-After (kube-apiserver sends it again).
    #[arg(long, env = "DORMANT_AUDIT_MAX_WAIT", default_value = "2s")]
    pub audit_max_wait: String,
    /// How long a batch's body may take to arrive once it has room.
    #[arg(long, env = "DORMANT_AUDIT_BODY_TIMEOUT", default_value = "10s")]
    pub audit_body_timeout: String,
    /// Connections the audit webhook holds at once.
    #[arg(long, env = "DORMANT_AUDIT_MAX_CONNECTIONS", default_value_t = 256)]
    pub audit_max_connections: usize,
    /// Address of the wake-on-request proxy for vclusters (HTTPS); off when unset.
    #[arg(long, env = "DORMANT_PROXY_ADDR")]
    pub proxy_addr: Option<SocketAddr>,
    /// PEM certificate the proxy serves (reloaded when it changes).
    #[arg(long, env = "DORMANT_PROXY_CERT")]
    pub proxy_cert: Option<std::path::PathBuf>,
    /// PEM private key of that certificate.
    #[arg(long, env = "DORMANT_PROXY_KEY")]
    pub proxy_key: Option<std::path::PathBuf>,
    /// Also route by host name `<name>.<namespace>.<base-domain>`.
    #[arg(long, env = "DORMANT_PROXY_BASE_DOMAIN")]
    pub proxy_base_domain: Option<String>,
    /// Requests that may wait for one waking vcluster; more get 503.
    #[arg(long, env = "DORMANT_PROXY_MAX_WAITING", default_value_t = 1000)]
    pub proxy_max_waiting: usize,
    /// How often the proxy re-reads a vcluster's `vc-<name>` Secret (its CA
    /// and admin credential) and upstream; unchanged, connections stay.
    #[arg(long, env = "DORMANT_PROXY_UPSTREAM_REFRESH", default_value = "1m")]
    pub proxy_upstream_refresh: String,
    /// Serve the API and web page under /dormant/ on the proxy's listener
    /// (`--api=false` turns them off).
    #[arg(long, env = "DORMANT_API", default_value_t = true, action = clap::ArgAction::Set)]
    pub api: bool,
    /// File with the key that signs the page's sessions (at least 32 bytes;
    /// the same for every replica). Without it each replica makes its own,
    /// and a session works only at the replica that made it.
    #[arg(long, env = "DORMANT_API_SESSION_KEY_FILE")]
    pub api_session_key_file: Option<std::path::PathBuf>,
    /// CA of the client certificate an auth proxy (oauth2-proxy) presents;
    /// its user headers are trusted only on such connections.
    #[arg(long, env = "DORMANT_API_AUTH_PROXY_CA")]
    pub api_auth_proxy_ca: Option<std::path::PathBuf>,
    /// Common names that auth proxy's certificate may have (any when empty).
    #[arg(long, env = "DORMANT_API_AUTH_PROXY_NAMES", value_delimiter = ',')]
    pub api_auth_proxy_names: Vec<String>,
    /// How often the cluster's client CA (kube-system/extension-apiserver-authentication) is read again.
    #[arg(long, env = "DORMANT_API_CLIENT_CA_REFRESH", default_value = "1m")]
    pub api_client_ca_refresh: String,
    /// Client connections the proxy holds at once (at the cap, the one
    /// idle the longest is closed to make room).
    #[arg(long, env = "DORMANT_PROXY_MAX_CONNECTIONS", default_value_t = DEFAULT_PROXY_MAX_CONNECTIONS)]
    pub proxy_max_connections: usize,
    /// Streams an HTTP/2 client connection may have open at once.
    #[arg(long, env = "DORMANT_PROXY_MAX_STREAMS", default_value_t = 100)]
    pub proxy_max_streams: u32,
    /// Connections to vclusters' API servers open at once, all together
    /// (at the cap, the one idle the longest is closed to make room).
    #[arg(long, env = "DORMANT_PROXY_MAX_UPSTREAM_CONNECTIONS", default_value_t = DEFAULT_PROXY_MAX_UPSTREAM)]
    pub proxy_max_upstream_connections: usize,
    /// Requests one client connection may have in flight to vclusters
    /// (each on an upstream connection of its own).
    #[arg(long, env = "DORMANT_PROXY_MAX_UPSTREAM_PER_CONNECTION", default_value_t = 100)]
    pub proxy_max_upstream_per_connection: usize,
    /// At most one wake per vcluster this often for requests whose bearer
    /// token cannot be checked while it sleeps (not a ServiceAccount token
    /// its keys verify, nor one its API server accepted lately); `never`
    /// refuses them all.
    #[arg(long, env = "DORMANT_PROXY_UNVERIFIED_WAKE_EVERY", default_value = "10m")]
    pub proxy_unverified_wake_every: String,
    /// Log format.
    #[arg(long, env = "DORMANT_LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub app_traffic: crate::app_traffic::AppTrafficArgs,
    /// Name users in `dormant_activity_sources_total` (the admin port needs
    /// no credential; off, the metric names only their tool).
    #[arg(long, env = "DORMANT_METRICS_USER_NAMES")]
    pub metrics_user_names: bool,
    /// Count the requests of GitOps controllers (Argo CD's application
    /// controller, Flux's controllers) as use. Off by default: they poll
    /// and re-apply all day, and would keep every target they manage awake.
    #[arg(long, env = "DORMANT_COUNT_GITOPS_REQUESTS")]
    pub count_gitops_requests: bool,
    /// Pause the Argo CD Applications that deploy a sleeping namespace
    /// (`argocd.argoproj.io/skip-reconcile`, an alpha feature of Argo CD ≥
    /// 2.7), so that Argo CD does not scale its workloads back up; only an
    /// Application all of whose workloads and destination sleep. Given back
    /// exactly at wake.
    #[arg(long, env = "DORMANT_PAUSE_ARGOCD_APPLICATIONS")]
    pub pause_argocd_applications: bool,
    /// Argo CD's own namespace (where its Applications live unless their
    /// tracking names another).
    #[arg(long, env = "DORMANT_ARGOCD_NAMESPACE", default_value = "argocd")]
    pub argocd_namespace: String,
    /// Read vCluster Platform's `sleepmode.loft.sh/*` sleep settings on
    /// namespaces, vclusters and workloads, under dormant's own
    /// annotations (which win, field by field): sleep-after, the
    /// schedules and their timezone, the ignore family,
    /// ignore-active-connections, and exclude on workloads.
    #[arg(long, env = "DORMANT_VCLUSTER_PLATFORM_ANNOTATIONS")]
    pub vcluster_platform_annotations: bool,
    /// Also read each vcluster's own `vcluster.yaml` sleep settings (the
    /// `sleepMode` section, or its older and newer forms, in its
    /// `vc-config-<name>` Secret), under the annotations, wherever the
    /// Platform's settings are read (this flag above, or a policy's
    /// `vclusterPlatformAnnotations`). Needs `get` on those Secrets.
    #[arg(long, env = "DORMANT_VCLUSTER_YAML")]
    pub vcluster_yaml: bool,
}

/// Defaults that fit the chart's 256 MiB memory limit with margin; the
/// arithmetic is in docs/proxy.md ("Limits").
pub const DEFAULT_AUDIT_MAX_BODY: usize = 4 << 20;
pub const DEFAULT_AUDIT_MAX_INFLIGHT_BYTES: usize = 48 << 20;
pub const DEFAULT_PROXY_MAX_CONNECTIONS: usize = 1024;
pub const DEFAULT_PROXY_MAX_UPSTREAM: usize = 512;

/// Validated agent settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub namespace: String,
    pub identity: String,
    pub admin_addr: SocketAddr,
    pub admin_limits: Limits,
    pub lease_name: String,
    pub lease_duration: Duration,
    pub qps: NonZeroU32,
    pub burst: NonZeroU32,
    pub concurrency: usize,
    pub reconcile_timeout: Duration,
    pub flush_interval: Duration,
    pub activity_queue: usize,
    pub defaults: Defaults,
    pub scope: Scope,
    pub dry_run: bool,
    pub enable_delete_after: bool,
    pub metrics_user_names: bool,
    pub count_gitops_requests: bool,
    /// Read vclusters' `vcluster.yaml` sleep settings.
    pub vcluster_yaml: bool,
    /// Argo CD's namespace, when its Applications are paused.
    pub argocd: Option<String>,
    pub audit: Option<AuditSettings>,
    pub proxy: Option<ProxySettings>,
    pub app_traffic: Option<crate::app_traffic::AppTrafficSettings>,
    /// The API and page, served on the proxy's listener (so only with it).
    pub api: Option<ApiSettings>,
    /// `--namespace-selector` as given (explain shows it).
    pub namespace_selector: Option<String>,
}

/// The API's validated settings.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub keys: Arc<crate::api::session::Keys>,
    pub auth_proxy_ca: Option<Arc<crate::tls::ReloadingClientVerifier>>,
    pub auth_proxy_names: Vec<String>,
    pub client_ca_refresh: Duration,
}

/// The proxy's validated settings.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub addr: SocketAddr,
    /// The serving certificate, loaded once when the flags are checked.
    pub cert: Arc<crate::tls::ReloadingCert>,
    pub base_domain: Option<String>,
    pub max_waiting: usize,
    pub upstream_refresh: Duration,
    pub limits: Limits,
    pub max_upstream_connections: usize,
    pub max_upstream_per_connection: usize,
    /// `Duration::MAX` for never.
    pub unverified_wake_every: Duration,
}

/// The audit webhook's validated settings.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub addr: SocketAddr,
    /// The serving certificate, loaded once when the flags are checked.
    pub cert: Arc<crate::tls::ReloadingCert>,
    pub token_file: Option<std::path::PathBuf>,
    pub client_ca: Option<Arc<crate::tls::ReloadingClientVerifier>>,
    pub max_body: usize,
    pub max_inflight_bytes: usize,
    pub max_requests: usize,
    pub max_wait: Duration,
    pub body_timeout: Duration,
    pub limits: Limits,
}

impl AgentArgs {
    /// Checks every flag; reports every bad value at once.
    pub fn validate(&self) -> Result<Settings, Vec<String>> {
        let mut errors = Vec::new();
        let mut dur = |flag: &str, v: &str, min: Duration| duration_flag(flag, v, min, &mut errors);
        let lease_duration = dur("lease-duration", &self.lease_duration, Duration::from_secs(2));
        let flush_interval = dur("flush-interval", &self.flush_interval, Duration::from_secs(1));
        let reconcile_timeout = dur("reconcile-timeout", &self.reconcile_timeout, Duration::from_secs(1));
        let wake_timeout = dur("default-wake-timeout", &self.default_wake_timeout, Duration::from_secs(1));
        let sleep_after = self.default_sleep_after.parse::<SleepAfter>().unwrap_or_else(|e| {
            errors.push(format!("--default-sleep-after: {e}"));
            SleepAfter::Never
        });
        let timezone = schedule::parse_timezone(&self.default_timezone).unwrap_or_else(|e| {
            errors.push(format!("--default-timezone: {e}"));
            chrono_tz::UTC
        });
        let qps = NonZeroU32::new(self.qps).unwrap_or_else(|| {
            errors.push("--qps: must be at least 1".into());
            NonZeroU32::MIN
        });
        let burst = NonZeroU32::new(self.burst.max(self.qps)).unwrap_or(NonZeroU32::MIN);
        if self.concurrency == 0 {
            errors.push("--concurrency: must be at least 1".into());
        }
        if self.activity_queue == 0 {
            errors.push("--activity-queue: must be at least 1".into());
        }
        for (flag, v) in [("cpu-core-hour", self.cpu_core_hour), ("memory-gib-hour", self.memory_gib_hour)] {
            if !v.is_finite() || v < 0.0 {
                errors.push(format!("--{flag} {v}: must be a price of 0 or more"));
            }
        }
        if self.currency.len() != 3 || !self.currency.chars().all(|c| c.is_ascii_uppercase()) {
            errors.push(format!(
                "--currency {:?}: expected an ISO 4217 code such as USD or EUR",
                self.currency
            ));
        }
        let selector = match self.namespace_selector.as_deref().map(crate::target::scope::parse_selector) {
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                errors.push(format!("--namespace-selector: {e}"));
                None
            }
            None => None,
        };
        let base = self.base_limits(&mut errors);
        if self.admin_max_connections == 0 {
            errors.push("--admin-max-connections: must be at least 1".into());
        }
        let admin_limits = Limits { max_connections: self.admin_max_connections, ..base };
        let only = self.validate_only_namespaces(&mut errors);
        let audit = self.validate_audit(base, &mut errors);
        let proxy = self.validate_proxy(base, &mut errors);
        let app_traffic = self.app_traffic.validate(&mut errors);
        let api = self.validate_api(proxy.is_some(), &mut errors);
        if self.namespace.is_empty() {
            errors.push("--namespace: must not be empty".into());
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let identity = self
            .identity
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string())
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("dormant-{}", std::process::id()));
        let mut excluded_namespaces: HashSet<String> =
            crate::target::scope::namespace_names(&self.exclude_namespaces);
        excluded_namespaces.insert(self.namespace.clone());
        Ok(Settings {
            namespace: self.namespace.clone(),
            identity,
            admin_addr: self.admin_addr,
            admin_limits,
            lease_name: self.lease_name.clone(),
            lease_duration,
            qps,
            burst,
            concurrency: self.concurrency,
            reconcile_timeout,
            flush_interval,
            activity_queue: self.activity_queue,
            defaults: Defaults {
                sleep_after,
                timezone,
                wake_timeout,
                pricing: Pricing {
                    cpu_core_hour: self.cpu_core_hour,
                    memory_gib_hour: self.memory_gib_hour,
                    currency: self.currency.clone(),
                },
            },
            scope: Scope {
                excluded: excluded_namespaces,
                selector,
                only,
                platform_annotations: self.vcluster_platform_annotations,
            },
            dry_run: self.dry_run,
            enable_delete_after: self.enable_delete_after,
            metrics_user_names: self.metrics_user_names,
            count_gitops_requests: self.count_gitops_requests,
            argocd: self.pause_argocd_applications.then(|| self.argocd_namespace.clone()),
            vcluster_yaml: self.vcluster_yaml,
            audit,
            proxy,
            app_traffic,
            api,
            namespace_selector: self.namespace_selector.clone(),
        })
    }
}

/// A duration flag's value, at least `min`; a bad one is reported in
/// `errors` (and `min` stands in for it).
fn duration_flag(flag: &str, v: &str, min: Duration, errors: &mut Vec<String>) -> Duration {
    match duration::parse(v) {
        Ok(d) if d >= min => d,
        Ok(_) => {
            errors.push(format!("--{flag} {v}: must be at least {}", duration::format(min)));
            min
        }
        Err(e) => {
            errors.push(format!("--{flag}: {e}"));
            min
        }
    }
}

/// A listening address: `ip:port`, `[ipv6]:port`, or an IPv6 address
/// followed by `:port` without brackets (what `$(POD_IP):9090` becomes in
/// an IPv6 pod).
fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.rsplit_once(':')
        .and_then(|(ip, port)| Some(SocketAddr::new(ip.parse::<Ipv6Addr>().ok()?.into(), port.parse().ok()?)))
        .ok_or_else(|| format!("{s:?}: expected an address and a port, such as 127.0.0.1:9090 or [::1]:9090"))
}

/// Whether `s` is a namespace name (an RFC 1123 label).
fn is_namespace_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl AgentArgs {
    fn validate_api(&self, proxy: bool, errors: &mut Vec<String>) -> Option<ApiSettings> {
        let set = [
            ("api-session-key-file", self.api_session_key_file.is_some()),
            ("api-auth-proxy-ca", self.api_auth_proxy_ca.is_some()),
            ("api-auth-proxy-names", !self.api_auth_proxy_names.is_empty()),
        ];
        if !self.api || self.proxy_addr.is_none() {
            for (flag, set) in set {
                if set {
                    errors.push(format!(
                        "--{flag} needs --proxy-addr and --api (the API is served on the proxy's listener)"
                    ));
                }
            }
            return None;
        }
        let keys = match &self.api_session_key_file {
            Some(f) => match crate::api::session::Keys::from_file(f) {
                Ok(k) => Some(k),
                Err(e) => {
                    errors.push(format!("--api-session-key-file: {}", crate::error::chain(&e)));
                    None
                }
            },
            None => Some(crate::api::session::Keys::random()),
        };
        let auth_proxy_ca = match &self.api_auth_proxy_ca {
            Some(f) => match crate::tls::ReloadingClientVerifier::new(f, Duration::from_secs(5)) {
                Ok(v) => Some(Arc::new(v)),
                Err(e) => {
                    errors.push(format!("--api-auth-proxy-ca: {e}"));
                    None
                }
            },
            None => None,
        };
        if !self.api_auth_proxy_names.is_empty() && self.api_auth_proxy_ca.is_none() {
            errors.push("--api-auth-proxy-names needs --api-auth-proxy-ca".into());
        }
        let client_ca_refresh = duration_flag(
            "api-client-ca-refresh",
            &self.api_client_ca_refresh,
            Duration::from_secs(1),
            errors,
        );
        proxy.then_some(())?;
        Some(ApiSettings {
            keys: Arc::new(keys?),
            auth_proxy_ca,
            auth_proxy_names: self
                .api_auth_proxy_names
                .iter()
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect(),
            client_ca_refresh,
        })
    }

    /// The timeouts every listener shares, with the defaults of the rest.
    fn base_limits(&self, errors: &mut Vec<String>) -> Limits {
        let second = Duration::from_secs(1);
        Limits {
            max_connections: 1,
            handshake_timeout: duration_flag(
                "tls-handshake-timeout",
                &self.tls_handshake_timeout,
                second,
                errors,
            ),
            header_read_timeout: duration_flag(
                "header-read-timeout",
                &self.header_read_timeout,
                second,
                errors,
            ),
            idle_timeout: duration_flag(
                "connection-idle-timeout",
                &self.connection_idle_timeout,
                second,
                errors,
            ),
            max_streams: 100,
        }
    }

    /// `--namespaces`: `None` when unset; a name that is no namespace, or
    /// that is also excluded (it could never hold a target), is an error.
    fn validate_only_namespaces(&self, errors: &mut Vec<String>) -> Option<BTreeSet<String>> {
        let names: BTreeSet<String> = crate::target::scope::namespace_names(&self.only_namespaces);
        if names.is_empty() {
            return None;
        }
        for n in &names {
            if !is_namespace_name(n) {
                errors.push(format!("--namespaces: {n:?} is not a namespace name"));
            } else if *n == self.namespace || self.exclude_namespaces.iter().any(|e| e.trim() == n) {
                errors.push(format!(
                    "--namespaces: {n} is excluded (--exclude-namespaces, or the agent's own --namespace)"
                ));
            }
        }
        Some(names)
    }

    fn validate_proxy(&self, base: Limits, errors: &mut Vec<String>) -> Option<ProxySettings> {
        let Some(addr) = self.proxy_addr else {
            for (flag, set) in [
                ("proxy-cert", self.proxy_cert.is_some()),
                ("proxy-key", self.proxy_key.is_some()),
                ("proxy-base-domain", self.proxy_base_domain.is_some()),
            ] {
                if set {
                    errors.push(format!("--{flag} needs --proxy-addr"));
                }
            }
            return None;
        };
        let (Some(cert), Some(key)) = (&self.proxy_cert, &self.proxy_key) else {
            errors.push("--proxy-addr needs --proxy-cert and --proxy-key".into());
            return None;
        };
        let serving = serving_cert(cert, key, "--proxy-cert/--proxy-key", errors);
        if self.proxy_max_waiting == 0 {
            errors.push("--proxy-max-waiting: must be at least 1".into());
        }
        let base_domain =
            self.proxy_base_domain.as_ref().map(|d| d.trim().trim_matches('.').to_ascii_lowercase());
        if base_domain.as_ref().is_some_and(|d| d.is_empty() || d.contains(char::is_whitespace)) {
            errors.push("--proxy-base-domain: expected a DNS name such as vc.example.com".into());
        }
        let upstream_refresh = duration_flag(
            "proxy-upstream-refresh",
            &self.proxy_upstream_refresh,
            Duration::from_secs(1),
            errors,
        );
        for (flag, v) in [
            ("proxy-max-connections", self.proxy_max_connections),
            ("proxy-max-streams", self.proxy_max_streams as usize),
            ("proxy-max-upstream-connections", self.proxy_max_upstream_connections),
            ("proxy-max-upstream-per-connection", self.proxy_max_upstream_per_connection),
        ] {
            if v == 0 {
                errors.push(format!("--{flag}: must be at least 1"));
            }
        }
        let unverified_wake_every = match self.proxy_unverified_wake_every.trim() {
            "never" => Duration::MAX,
            every => duration_flag("proxy-unverified-wake-every", every, Duration::from_secs(1), errors),
        };
        Some(ProxySettings {
            addr,
            cert: serving?,
            base_domain,
            max_waiting: self.proxy_max_waiting,
            upstream_refresh,
            limits: Limits {
                max_connections: self.proxy_max_connections,
                max_streams: self.proxy_max_streams,
                ..base
            },
            max_upstream_connections: self.proxy_max_upstream_connections,
            max_upstream_per_connection: self.proxy_max_upstream_per_connection,
            unverified_wake_every,
        })
    }

    fn validate_audit(&self, base: Limits, errors: &mut Vec<String>) -> Option<AuditSettings> {
        let Some(addr) = self.audit_addr else {
            for (flag, set) in [
                ("audit-cert", self.audit_cert.is_some()),
                ("audit-key", self.audit_key.is_some()),
                ("audit-token-file", self.audit_token_file.is_some()),
                ("audit-client-ca", self.audit_client_ca.is_some()),
            ] {
                if set {
                    errors.push(format!("--{flag} needs --audit-addr"));
                }
            }
            return None;
        };
        let (Some(cert), Some(key)) = (&self.audit_cert, &self.audit_key) else {
            errors.push("--audit-addr needs --audit-cert and --audit-key".into());
            return None;
        };
        let serving = serving_cert(cert, key, "--audit-cert/--audit-key", errors);
        if self.audit_token_file.is_none() && self.audit_client_ca.is_none() {
            errors.push("--audit-addr needs --audit-token-file or --audit-client-ca (the webhook always authenticates)".into());
        }
        if let Some(f) = &self.audit_token_file {
            match std::fs::read_to_string(f) {
                Ok(t) if t.trim().is_empty() => {
                    errors.push(format!("--audit-token-file {}: is empty", f.display()))
                }
                Ok(_) => {}
                Err(e) => errors.push(format!("--audit-token-file {}: {e}", f.display())),
            }
        }
        let client_ca = match &self.audit_client_ca {
            Some(f) => match crate::tls::ReloadingClientVerifier::new(f, Duration::from_secs(5)) {
                Ok(c) => Some(Arc::new(c)),
                Err(e) => {
                    errors.push(format!("--audit-client-ca: {e}"));
                    None
                }
            },
            None => None,
        };
        if self.audit_max_body < 1024 {
            errors.push("--audit-max-body: must be at least 1024 bytes".into());
        }
        // The largest batch must fit the budget, or it could never be read.
        let largest = crate::audit::charge(self.audit_max_body);
        if self.audit_max_inflight_bytes < largest {
            errors.push(format!(
                "--audit-max-inflight-bytes {}: must be at least {largest}, what a batch of --audit-max-body {} may take once decoded",
                self.audit_max_inflight_bytes, self.audit_max_body
            ));
        }
        for (flag, v) in [
            ("audit-max-requests", self.audit_max_requests),
            ("audit-max-connections", self.audit_max_connections),
        ] {
            if v == 0 {
                errors.push(format!("--{flag}: must be at least 1"));
            }
        }
        let max_wait = duration_flag("audit-max-wait", &self.audit_max_wait, Duration::from_secs(1), errors);
        let body_timeout =
            duration_flag("audit-body-timeout", &self.audit_body_timeout, Duration::from_secs(1), errors);
        Some(AuditSettings {
            addr,
            cert: serving?,
            token_file: self.audit_token_file.clone(),
            client_ca,
            max_body: self.audit_max_body,
            max_inflight_bytes: self.audit_max_inflight_bytes,
            max_requests: self.audit_max_requests,
            max_wait,
            body_timeout,
            limits: Limits { max_connections: self.audit_max_connections, ..base },
        })
    }
}

/// The serving certificate from `cert`/`key` (reloaded when they change),
/// or an error naming `flags`.
fn serving_cert(
    cert: &std::path::Path,
    key: &std::path::Path,
    flags: &str,
    errors: &mut Vec<String>,
) -> Option<Arc<crate::tls::ReloadingCert>> {
    crate::tls::ReloadingCert::new(cert, key, Duration::from_secs(5))
        .map(Arc::new)
        .map_err(|e| errors.push(format!("{flags}: {e}")))
        .ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    fn settings(args: &[&str]) -> Result<Settings, Vec<String>> {
        Cli::try_parse_from(std::iter::once("agent").chain(args.iter().copied())).unwrap().agent.validate()
    }

    #[test]
    fn the_admin_port_listens_on_loopback_unless_told_otherwise() {
        assert_eq!(settings(&[]).unwrap().admin_addr, "127.0.0.1:9090".parse().unwrap());
        let pod_ip = |a: &str| settings(&[&format!("--admin-addr={a}")]).map(|s| s.admin_addr);
        assert_eq!(pod_ip("10.1.2.3:9090").unwrap(), "10.1.2.3:9090".parse().unwrap());
        assert_eq!(pod_ip("[fd00::7]:9090").unwrap(), "[fd00::7]:9090".parse().unwrap());
        assert_eq!(
            pod_ip("fd00::7:9090").unwrap(),
            "[fd00::7]:9090".parse().unwrap(),
            "the downward API's IPv6"
        );
        assert!(Cli::try_parse_from(["agent", "--admin-addr=10.1.2.3"]).is_err());
        assert!(Cli::try_parse_from(["agent", "--admin-addr=pod:9090"]).is_err());
    }

    #[test]
    fn namespaces_narrow_the_scope_and_an_excluded_or_bad_one_is_refused() {
        let s = settings(&["--namespaces=team-a, team-b"]).unwrap();
        assert!(s.scope.allows("team-a", &Default::default()));
        assert!(!s.scope.allows("team-c", &Default::default()));
        assert!(settings(&[]).unwrap().scope.only.is_none(), "unset: every namespace not excluded");
        let errors = settings(&["--namespaces=team-a,kube-system,dormant,Team_B"]).unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("kube-system is excluded")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("dormant is excluded")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("\"Team_B\" is not a namespace name")), "{errors:?}");
    }
}
