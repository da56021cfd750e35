//! `dormant agent`: its configuration (every flag with a `DORMANT_*`
//! environment fallback, all validated at once) and the wiring of the
//! parts: stores, ledger, scaler, leader election, controller, admin port.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use kube::Client;
use tokio::sync::mpsc;

use crate::activity::Activity;
use crate::activity::ledger::{Flush, Ledger, SourceCounts};
use crate::activity::observe::{Observer, RulesCache};
use crate::admin::Admin;
use crate::controller::{self, Config, Context};
use crate::metrics::Metrics;
use crate::policy::annotations::{
    ACTIVITY_SOURCES, LAST_ACTIVITY, LAST_ACTIVITY_BY, format_sources, parse_sources, rfc3339, top_sources,
};
use crate::policy::duration::{self, SleepAfter};
use crate::policy::ignore::IgnoreRules;
use crate::policy::{Defaults, Pricing, schedule};
use crate::scaler::{Scaler, Throttle};
use crate::target::index::TargetIndex;
use crate::target::stores::{self, Change, Stores};
use crate::target::{Scope, TargetRef};

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
    /// Address of the admin port (/livez, /readyz, /metrics, /status).
    #[arg(long, env = "DORMANT_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    pub admin_addr: SocketAddr,
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
    /// Decide and report, never scale.
    #[arg(long, env = "DORMANT_DRY_RUN")]
    pub dry_run: bool,
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
    #[arg(long, env = "DORMANT_AUDIT_MAX_BODY", default_value_t = 16 * 1024 * 1024)]
    pub audit_max_body: usize,
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
    /// Log format.
    #[arg(long, env = "DORMANT_LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,
}

/// Validated agent settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub namespace: String,
    pub identity: String,
    pub admin_addr: SocketAddr,
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
    pub audit: Option<AuditSettings>,
    pub proxy: Option<ProxySettings>,
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
        let audit = self.validate_audit(&mut errors);
        let proxy = self.validate_proxy(&mut errors);
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
            self.exclude_namespaces.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        excluded_namespaces.insert(self.namespace.clone());
        Ok(Settings {
            namespace: self.namespace.clone(),
            identity,
            admin_addr: self.admin_addr,
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
            scope: Scope { excluded: excluded_namespaces, selector },
            dry_run: self.dry_run,
            audit,
            proxy,
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

impl AgentArgs {
    fn validate_proxy(&self, errors: &mut Vec<String>) -> Option<ProxySettings> {
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
        Some(ProxySettings {
            addr,
            cert: serving?,
            base_domain,
            max_waiting: self.proxy_max_waiting,
            upstream_refresh,
        })
    }

    fn validate_audit(&self, errors: &mut Vec<String>) -> Option<AuditSettings> {
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
        Some(AuditSettings {
            addr,
            cert: serving?,
            token_file: self.audit_token_file.clone(),
            client_ca,
            max_body: self.audit_max_body,
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

/// The user agent of every request dormant makes.
pub fn user_agent() -> String {
    format!("dormant/{}", env!("CARGO_PKG_VERSION"))
}

/// A client from the environment (in-cluster, or `$KUBECONFIG`), sending
/// dormant's user agent.
pub async fn client() -> anyhow::Result<Client> {
    crate::tls::install_default_provider();
    let config = kube::Config::infer().await.context("no Kubernetes configuration found")?;
    client_from(config)
}

/// A client from `config`, sending dormant's user agent.
pub fn client_from(mut config: kube::Config) -> anyhow::Result<Client> {
    crate::tls::install_default_provider();
    if let Ok(v) = user_agent().parse() {
        config.headers.push((http::header::USER_AGENT, v));
    }
    Client::try_from(config).context("failed to build a Kubernetes client")
}

/// Writes the ledger's newest activity to the target's annotations (only
/// when newer than what is there: another replica may have written later),
/// and adds the counts since the last flush to `activity-sources`.
pub struct AnnotationFlusher {
    pub stores: Stores,
    pub scaler: Scaler,
}

impl Flush for AnnotationFlusher {
    async fn flush(
        &self,
        target: TargetRef,
        activity: Activity,
        sources: SourceCounts,
    ) -> Result<(), String> {
        let Some(t) = self.stores.target(&target) else { return Ok(()) };
        // From what the object holds, at that version: another replica (or
        // the controller) may write between the read and this patch.
        self.scaler
            .update_target_annotations(&t.object, |current| activity_changes(current, &activity, &sources))
            .await
            .map(|_| ())
            .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))
    }
}

/// The annotations that record `activity` and add `sources` to the counts
/// in `current`. The counts recorded there halve at every midnight (UTC)
/// since the last recorded activity, so who uses a target now outweighs
/// who used it weeks ago, and sources that stopped drop out.
fn activity_changes(
    current: &std::collections::BTreeMap<String, String>,
    activity: &Activity,
    sources: &SourceCounts,
) -> std::collections::BTreeMap<&'static str, Option<String>> {
    // Only the two values this write builds on, each on its own: a typo in
    // any other annotation of the target must not make them unreadable
    // (last-activity would move back, the counts start again).
    let last = current
        .get(LAST_ACTIVITY)
        .and_then(|v| chrono::DateTime::parse_from_rfc3339(v.trim()).ok())
        .map(|t| t.with_timezone(&chrono::Utc));
    let recorded = current.get(ACTIVITY_SOURCES).map(|v| parse_sources(v)).unwrap_or_default();
    let mut changes = std::collections::BTreeMap::new();
    if last.is_none_or(|c| c < activity.at) {
        changes.insert(LAST_ACTIVITY, Some(rfc3339(activity.at)));
        changes.insert(LAST_ACTIVITY_BY, Some(activity.summary()));
    }
    if !sources.is_empty() {
        // Midnights crossed: the same halvings however often it is flushed.
        let halvings =
            last.map_or(0, |c| (activity.at.date_naive() - c.date_naive()).num_days().clamp(0, 63));
        let mut counts: std::collections::HashMap<String, u64> =
            recorded.into_iter().map(|(who, n)| (who, n >> halvings)).filter(|(_, n)| *n > 0).collect();
        for (who, n) in sources {
            *counts.entry(who.clone()).or_default() += n;
        }
        changes.insert(ACTIVITY_SOURCES, Some(format_sources(&top_sources(counts))));
    }
    changes
}

/// Runs the agent until SIGTERM or Ctrl-C.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let settings = args
        .validate()
        .map_err(|errors| anyhow::anyhow!("invalid configuration:\n  {}", errors.join("\n  ")))?;
    let shutdown = shutdown_signal();
    let client = client().await?;
    run_with(settings, client, shutdown).await
}

/// Runs the agent with `client` until `shutdown` completes.
pub async fn run_with(
    settings: Settings,
    client: Client,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    check_crd(&client).await?;
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));

    let (stores, writers) = stores::stores();
    let (change_tx, change_rx) = mpsc::unbounded_channel::<Change>();
    // Store changes go to the controller and, broadcast, to the proxy's
    // wake gate (which waits for a control plane to become Ready).
    let (watch_tx, mut watch_rx) = mpsc::unbounded_channel::<Change>();
    let (broadcast_tx, _) = tokio::sync::broadcast::channel::<Change>(1024);
    let reflectors = writers.spawn(client.clone(), watch_tx);
    let fan_out = {
        let (to_controller, to_proxy) = (change_tx.clone(), broadcast_tx.clone());
        tokio::spawn(async move {
            while let Some(c) = watch_rx.recv().await {
                let _ = to_proxy.send(c.clone());
                if to_controller.send(c).is_err() {
                    break;
                }
            }
        })
    };

    let throttle = Throttle::new(settings.qps, settings.burst);
    let scaler = Scaler::new(client.clone(), throttle);
    let (ledger, ledger_worker) = Ledger::new(settings.activity_queue);
    // dormant's own requests never count as activity.
    let own_user = crate::cli::targets::whoami(&client).await;
    tracing::info!(user = %own_user, "dormant's own identity (ignored as activity)");
    let observer = Arc::new(Observer::new(
        ledger.clone(),
        IgnoreRules::builtin(&[own_user]),
        RulesCache::new(
            stores.clone(),
            settings.defaults.clone(),
            settings.scope.clone(),
            Duration::from_secs(5),
        ),
        metrics.clone(),
    ));
    let index = Arc::new(TargetIndex::new(stores.clone(), settings.scope.clone(), Duration::from_secs(2)));
    let mut servers = Vec::new();
    if let Some(audit) = &settings.audit {
        let clients =
            audit.client_ca.clone().map(|v| v as Arc<dyn rustls::server::danger::ClientCertVerifier>);
        let tls = crate::tls::server_config_with_resolver(audit.cert.clone(), clients)?;
        let receiver = Arc::new(crate::audit::Receiver {
            observer: observer.clone(),
            index: index.clone(),
            metrics: metrics.clone(),
            tokens: audit.token_file.clone().map(crate::audit::Tokens::from_file).transpose()?,
            client_certs: audit.client_ca.is_some(),
            max_body: audit.max_body,
        });
        let listener = tokio::net::TcpListener::bind(audit.addr)
            .await
            .with_context(|| format!("failed to listen on {} for the audit webhook", audit.addr))?;
        tracing::info!(addr = %listener.local_addr()?, "audit webhook listening");
        servers.push(tokio::spawn(receiver.serve(listener, tokio_rustls::TlsAcceptor::from(Arc::new(tls)))));
    }
    if let Some(p) = &settings.proxy {
        let tls = crate::proxy::tls_config(p.cert.clone())?;
        let proxy = Arc::new(crate::proxy::Proxy::new(
            stores.clone(),
            crate::proxy::upstream::Upstreams::new(client.clone(), stores.clone(), p.upstream_refresh),
            crate::proxy::gate::Gate::new(p.max_waiting, metrics.proxy_waiting.clone()),
            observer.clone(),
            metrics.clone(),
            scaler.clone(),
            settings.defaults.clone(),
            settings.scope.clone(),
            broadcast_tx.clone(),
            p.base_domain.clone(),
        ));
        let listener = tokio::net::TcpListener::bind(p.addr)
            .await
            .with_context(|| format!("failed to listen on {} for the proxy", p.addr))?;
        tracing::info!(addr = %listener.local_addr()?, "vcluster proxy listening");
        servers.push(tokio::spawn(proxy.clone().track()));
        servers.push(tokio::spawn(proxy.serve_tls(listener, tokio_rustls::TlsAcceptor::from(Arc::new(tls)))));
    }
    let notify_tx = change_tx.clone();
    let flusher = AnnotationFlusher { stores: stores.clone(), scaler: scaler.clone() };
    let (stop_ledger, ledger_stopped) = tokio::sync::oneshot::channel::<()>();
    let ledger_task = tokio::spawn(ledger_worker.run(
        move |t| {
            let _ = notify_tx.send(Change::Target(t));
        },
        flusher,
        settings.flush_interval,
        async {
            let _ = ledger_stopped.await;
        },
    ));

    let listener = crate::admin::bind(settings.admin_addr)
        .await
        .with_context(|| format!("failed to listen on {}", settings.admin_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "admin port listening");
    // The controller's context exists once this replica may lead: `/status`
    // reads it when there is one.
    let status_ctx: Arc<std::sync::OnceLock<std::sync::Weak<Context>>> = Arc::default();
    let admin = Arc::new(Admin {
        metrics: metrics.clone(),
        ready: ready.clone(),
        status: Box::new({
            let status_ctx = status_ctx.clone();
            move || match status_ctx.get().and_then(std::sync::Weak::upgrade) {
                Some(ctx) => status_json(&ctx),
                None => serde_json::Value::Null,
            }
        }),
    });
    let admin_task = tokio::spawn(admin.serve(listener));

    // Leader election starts only once the caches have synced: a replica
    // whose caches never sync (a kind its RBAC does not allow, say) must
    // not win the Lease and hold it with no controller running.
    let mut shutdown = std::pin::pin!(shutdown);
    let synced = tokio::select! {
        r = stores.wait_ready() => {
            r.context("the caches never synced")?;
            true
        }
        () = &mut shutdown => false,
    };
    let mut running = None;
    if synced {
        ready.store(true, Ordering::Release);
        tracing::info!(identity = %settings.identity, "caches synced; agent ready");
        let lease_secs = settings.lease_duration.as_secs().max(2);
        let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &settings.lease_name)
            .with_namespace(&settings.namespace)
            .with_identity(&settings.identity)
            .with_duration(lease_secs)
            .with_grace((lease_secs / 3).max(1))
            .build()
            .await
            .with_context(|| {
                format!("failed to set up leader election in namespace {}", settings.namespace)
            })?;
        let (leader, lease_task) = manager.watch().await;
        let config = Config {
            defaults: settings.defaults.clone(),
            scope: settings.scope.clone(),
            dry_run: settings.dry_run,
            concurrency: settings.concurrency,
            reconcile_timeout: settings.reconcile_timeout,
            identity: settings.identity.clone(),
        };
        let ctx = Context::new(stores.clone(), scaler, ledger, metrics, config, leader);
        let _ = status_ctx.set(Arc::downgrade(&ctx));
        let controller = tokio::spawn(controller::run(ctx, change_rx));
        let sweeper = tokio::spawn({
            let stores = stores.clone();
            async move {
                let mut tick = tokio::time::interval(SWEEP_EVERY);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    observer.sweep(|t| stores.object(t).is_some());
                }
            }
        });
        running = Some((controller, sweeper, lease_task));
        shutdown.await;
    }
    tracing::info!("shutting down");
    let lease_task = match running {
        Some((controller, sweeper, lease_task)) => {
            sweeper.abort();
            controller.abort();
            let _ = controller.await;
            Some(lease_task)
        }
        None => None,
    };
    admin_task.abort();
    for s in servers {
        s.abort();
    }
    // The activity not yet written is written now (on a standby it exists
    // nowhere else), within a limit.
    let _ = stop_ledger.send(());
    let ledger_abort = ledger_task.abort_handle();
    if tokio::time::timeout(LEDGER_FINAL_FLUSH, ledger_task).await.is_err() {
        tracing::warn!(limit = ?LEDGER_FINAL_FLUSH, "the last activity flush did not finish; some activity is lost");
        ledger_abort.abort();
    }
    for r in reflectors {
        r.abort();
    }
    fan_out.abort();
    drop(change_tx);
    // The controller held the last Lease receiver; dropping it releases the Lease.
    if let Some(lease_task) = lease_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), lease_task).await;
    }
    Ok(())
}

/// How often what is kept per target is dropped for targets that are gone.
const SWEEP_EVERY: Duration = Duration::from_secs(300);

/// How long a stopping agent may spend writing the activity it holds.
const LEDGER_FINAL_FLUSH: Duration = Duration::from_secs(5);

/// Fails clearly when the SleepPolicy CRD is missing (a watch would retry forever).
async fn check_crd(client: &Client) -> anyhow::Result<()> {
    let api: kube::Api<crate::policy::SleepPolicy> = kube::Api::all(client.clone());
    match api.list(&kube::api::ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Err(anyhow::anyhow!(
            "the SleepPolicy CRD (sleeppolicies.dormant.dev) is not installed; install the Helm chart, or: \
             dormant crd | kubectl apply -f -"
        )),
        Err(e) => Err(anyhow::Error::new(e).context("cannot reach the Kubernetes API")),
    }
}

fn status_json(ctx: &Context) -> serde_json::Value {
    let mut rows: Vec<serde_json::Value> = ctx
        .summaries()
        .into_iter()
        .map(|(t, s)| {
            serde_json::json!({
                "target": t.to_string(),
                "kind": t.kind.as_str(),
                "state": s.state.as_str(),
                "desired": s.desired.map(|d| format!("{d:?}").to_lowercase()),
                "policy": s.policy,
                "next": s.next.map(rfc3339),
                "invalid": s.invalid.map(|(_, m)| m),
            })
        })
        .collect();
    rows.sort_by(|a, b| a["target"].as_str().cmp(&b["target"].as_str()));
    serde_json::json!({ "leader": ctx.is_leader(), "targets": rows })
}

/// SIGTERM or SIGINT. The handlers are installed here, at once, not when
/// the future is first polled: a SIGTERM while the agent starts (caches
/// syncing) must stop it cleanly too, not kill it with the default action.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    async move {
        let wait = |s: Option<tokio::signal::unix::Signal>| async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = wait(term.take()) => {}
            () = wait(int.take()) => {}
        }
    }
}

/// Starts `tracing` in the chosen format (`RUST_LOG` filters; default info).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_lease_manager=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::activity::Source;

    fn alice_at(at: &str) -> Activity {
        Activity {
            at: at.parse().unwrap(),
            source: Source::Proxy,
            user: "alice".into(),
            groups: vec![],
            user_agent: "kubectl".into(),
            verb: "get".into(),
            resource: None,
            path: "/api".into(),
        }
    }

    fn annotations(last: &str, sources: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LAST_ACTIVITY.to_string(), last.to_string()),
            (ACTIVITY_SOURCES.to_string(), sources.to_string()),
        ])
    }

    fn sources_after(current: &BTreeMap<String, String>, at: &str, n: u64) -> serde_json::Value {
        let counts = SourceCounts::from([("alice (kubectl)".to_string(), n)]);
        let changes = activity_changes(current, &alice_at(at), &counts);
        serde_json::from_str(changes[ACTIVITY_SOURCES].as_deref().unwrap()).unwrap()
    }

    #[test]
    fn recorded_counts_halve_at_each_midnight_and_stopped_sources_drop_out() {
        let current = annotations("2026-11-24T23:59:00Z", r#"{"bob (ci)": 8, "carol (k9s)": 1}"#);
        assert_eq!(
            sources_after(&current, "2026-11-25T00:01:00Z", 3),
            serde_json::json!({"alice (kubectl)": 3, "bob (ci)": 4})
        );
        assert_eq!(
            sources_after(&current, "2026-11-27T12:00:00Z", 3),
            serde_json::json!({"alice (kubectl)": 3, "bob (ci)": 1})
        );
        assert_eq!(
            sources_after(&current, "2026-12-30T12:00:00Z", 3),
            serde_json::json!({"alice (kubectl)": 3})
        );
    }

    #[test]
    fn flushes_within_one_day_add_up_exactly() {
        let mut current = annotations("2026-11-25T00:00:00Z", r#"{"bob (ci)": 5}"#);
        for minute in 1..=30 {
            let at = format!("2026-11-25T10:{minute:02}:00Z");
            let counts = SourceCounts::from([("alice (kubectl)".to_string(), 1)]);
            for (k, v) in activity_changes(&current, &alice_at(&at), &counts) {
                current.insert(k.to_string(), v.unwrap());
            }
        }
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&current[ACTIVITY_SOURCES]).unwrap(),
            serde_json::json!({"alice (kubectl)": 30, "bob (ci)": 5})
        );
        assert_eq!(current[LAST_ACTIVITY], rfc3339("2026-11-25T10:30:00Z".parse().unwrap()));
    }

    #[test]
    fn a_typo_in_another_annotation_changes_nothing_here() {
        let mut current = annotations("2026-11-26T08:00:00Z", r#"{"bob (ci)": 8}"#);
        current.insert("dormant.dev/sleep-afer".into(), "1h".into());
        assert!(crate::policy::annotations::TargetAnnotations::parse(&current).is_err());
        let counts = SourceCounts::from([("alice (kubectl)".to_string(), 2)]);
        let changes = activity_changes(&current, &alice_at("2026-11-26T07:00:00Z"), &counts);
        assert!(!changes.contains_key(LAST_ACTIVITY), "moved last-activity back: {changes:?}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(changes[ACTIVITY_SOURCES].as_deref().unwrap()).unwrap(),
            serde_json::json!({"alice (kubectl)": 2, "bob (ci)": 8})
        );
    }

    #[test]
    fn an_older_flush_from_another_replica_neither_decays_nor_moves_last_activity_back() {
        let current = annotations("2026-11-26T08:00:00Z", r#"{"bob (ci)": 8}"#);
        let counts = SourceCounts::from([("alice (kubectl)".to_string(), 2)]);
        let changes = activity_changes(&current, &alice_at("2026-11-24T08:00:00Z"), &counts);
        assert!(!changes.contains_key(LAST_ACTIVITY));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(changes[ACTIVITY_SOURCES].as_deref().unwrap()).unwrap(),
            serde_json::json!({"alice (kubectl)": 2, "bob (ci)": 8})
        );
    }
}
