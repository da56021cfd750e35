//! `dormant agent`: the wiring of the parts, in phases, and the order in
//! which they stop.
//!
//! 1. **Caches**: the reflectors fill the stores; their changes go to the
//!    controller and, broadcast, to the proxy (which waits on a control
//!    plane becoming Ready).
//! 2. **Activity**: the ledger and its flusher, the observer the receivers
//!    report through.
//! 3. **Servers** every replica runs: the audit webhook, the proxy, the
//!    admin port.
//! 4. **Leading**, once the caches have synced: leader election, and the
//!    controller (which acts only while this replica leads).
//!
//! Stopping ([`Running::stop`]) goes the other way round, so that nothing
//! is lost: the controller first (no new writes), then the servers (no new
//! activity), then the ledger writes what it holds, then the caches, and
//! last the Lease is released for a standby.

mod leadership;
pub mod settings;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use kube::Client;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::activity::flush::AnnotationFlusher;
use crate::activity::ledger::Ledger;
use crate::activity::observe::{Observer, RulesCache};
use crate::admin::Admin;
use crate::annotate::Annotator;
use crate::client::{Patcher, Throttle};
use crate::controller::{self, Config, Context};
use crate::metrics::Metrics;
use crate::policy::ignore::IgnoreRules;
use crate::scaler::Scaler;
use crate::target::index::TargetIndex;
use crate::target::stores::{self, Change, Stores};
use crate::tls::limits::{Connections, Counts};
pub use settings::{AgentArgs, ApiSettings, AuditSettings, LogFormat, ProxySettings, Settings};

/// Runs the agent until SIGTERM or Ctrl-C.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let settings = args
        .validate()
        .map_err(|errors| anyhow::anyhow!("invalid configuration:\n  {}", errors.join("\n  ")))?;
    let shutdown = shutdown_signal();
    let client = crate::client::client().await?;
    run_with(settings, client, shutdown).await
}

/// Runs the agent with `client` until `shutdown` completes.
pub async fn run_with(
    settings: Settings,
    client: Client,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    check_crd(&client).await?;
    let caches = Caches::start(&client, settings.vcluster_yaml);
    let parts = Parts::new(&settings, &client, &caches).await;
    let servers = Servers::start(&settings, &client, &caches, &parts).await?;
    let mut running = Running { caches, parts, servers, leading: None };

    // Leader election starts only once the caches have synced: a replica
    // whose caches never sync (a kind its RBAC does not allow, say) must
    // not win the Lease and hold it with no controller running.
    let mut shutdown = std::pin::pin!(shutdown);
    let synced = tokio::select! {
        r = running.caches.stores.wait_ready() => match r {
            Ok(()) => true,
            Err(e) => {
                running.stop().await;
                return Err(anyhow::Error::new(e).context("the caches never synced"));
            }
        },
        () = &mut shutdown => false,
    };
    if synced {
        running.servers.ready.store(true, Ordering::Release);
        tracing::info!(identity = %settings.identity, "caches synced; agent ready");
        match Leading::start(&settings, &client, &mut running).await {
            Ok(leading) => running.leading = Some(leading),
            Err(e) => {
                running.stop().await;
                return Err(e);
            }
        }
        shutdown.await;
    }
    tracing::info!("shutting down");
    running.stop().await;
    Ok(())
}

/// Phase 1: the reflector stores and where their changes go.
struct Caches {
    stores: Stores,
    reflectors: Vec<JoinHandle<()>>,
    fan_out: JoinHandle<()>,
    /// To the controller (taken when it starts).
    to_controller: mpsc::UnboundedSender<Change>,
    controller_changes: Option<mpsc::UnboundedReceiver<Change>>,
    /// To the proxy's wake gate.
    broadcast: broadcast::Sender<Change>,
}

/// How often each vcluster's `vcluster.yaml` is read again (`--vcluster-yaml`).
const VCLUSTER_YAML_INTERVAL: Duration = Duration::from_secs(30);

impl Caches {
    fn start(client: &Client, vcluster_yaml: bool) -> Caches {
        let (stores, writers) = stores::stores();
        let (to_controller, controller_changes) = mpsc::unbounded_channel::<Change>();
        let (watch_tx, mut watch_rx) = mpsc::unbounded_channel::<Change>();
        let (broadcast, _) = broadcast::channel::<Change>(1024);
        let mut reflectors = writers.spawn(client.clone(), watch_tx.clone());
        if vcluster_yaml {
            reflectors.push(tokio::spawn(stores::refresh_vcluster_configs(
                stores.clone(),
                client.clone(),
                watch_tx,
                VCLUSTER_YAML_INTERVAL,
            )));
        }
        let fan_out = {
            let (to_controller, to_proxy) = (to_controller.clone(), broadcast.clone());
            tokio::spawn(async move {
                while let Some(c) = watch_rx.recv().await {
                    let _ = to_proxy.send(c.clone());
                    if to_controller.send(c).is_err() {
                        break;
                    }
                }
            })
        };
        Caches {
            stores,
            reflectors,
            fan_out,
            to_controller,
            controller_changes: Some(controller_changes),
            broadcast,
        }
    }
}

/// Phase 2: the writers and the activity path.
struct Parts {
    metrics: Arc<Metrics>,
    scaler: Scaler,
    annotator: Annotator,
    ledger: Ledger,
    observer: Arc<Observer>,
    index: Arc<TargetIndex>,
    ledger_task: JoinHandle<()>,
    stop_ledger: oneshot::Sender<()>,
}

/// The client rate limit of the agent's writers, counted in its metrics.
fn throttle(settings: &Settings, metrics: &Metrics) -> Throttle {
    Throttle::counted(
        settings.qps,
        settings.burst,
        metrics.kube_requests.clone(),
        metrics.kube_throttled.clone(),
    )
}

impl Parts {
    async fn new(settings: &Settings, client: &Client, caches: &Caches) -> Parts {
        let metrics = Arc::new(Metrics::new());
        let patcher = Patcher::new(client.clone(), throttle(settings, &metrics));
        let (scaler, annotator) = (Scaler::new(patcher.clone()), Annotator::new(patcher));
        let (ledger, ledger_worker) = Ledger::new(settings.activity_queue);
        // dormant's own requests never count as activity.
        let own_user = crate::client::whoami(client).await;
        tracing::info!(user = %own_user, "dormant's own identity (ignored as activity)");
        let mut builtin = IgnoreRules::builtin(&[own_user]);
        if !settings.count_gitops_requests {
            crate::policy::ignore::add_gitops_rules(&mut builtin);
        }
        let stores = &caches.stores;
        let observer = Arc::new(
            Observer::new(
                ledger.clone(),
                builtin,
                RulesCache::new(
                    stores.clone(),
                    settings.defaults.clone(),
                    settings.scope.clone(),
                    Duration::from_secs(5),
                ),
                metrics.clone(),
            )
            .with_user_names(settings.metrics_user_names),
        );
        let index =
            Arc::new(TargetIndex::new(stores.clone(), settings.scope.clone(), Duration::from_secs(2)));
        let notify = caches.to_controller.clone();
        let flusher = AnnotationFlusher {
            stores: stores.clone(),
            annotator: annotator.clone(),
            defaults: settings.defaults.clone(),
            scope: settings.scope.clone(),
        };
        let (stop_ledger, ledger_stopped) = oneshot::channel::<()>();
        let ledger_task = tokio::spawn(ledger_worker.run(
            move |t| {
                let _ = notify.send(Change::Target(t));
            },
            flusher,
            settings.flush_interval,
            async {
                let _ = ledger_stopped.await;
            },
        ));
        Parts { metrics, scaler, annotator, ledger, observer, index, ledger_task, stop_ledger }
    }
}

/// Phase 3: what every replica serves.
struct Servers {
    tasks: Vec<JoinHandle<()>>,
    /// The app-traffic listeners' holder, which the controller drives.
    app_traffic: Option<Arc<crate::app_traffic::Holder>>,
    /// `/readyz`: the caches have synced.
    ready: Arc<AtomicBool>,
    /// `/status` reads the controller's context once there is one.
    controller: crate::admin::Controller,
}

impl Servers {
    async fn start(
        settings: &Settings,
        client: &Client,
        caches: &Caches,
        parts: &Parts,
    ) -> anyhow::Result<Servers> {
        let mut tasks = Vec::new();
        let ready = Arc::new(AtomicBool::new(false));
        if let Some(audit) = &settings.audit {
            let clients =
                audit.client_ca.clone().map(|v| v as Arc<dyn rustls::server::danger::ClientCertVerifier>);
            let tls = crate::tls::server_config_with_resolver(audit.cert.clone(), clients)?;
            let receiver = Arc::new(crate::audit::Receiver {
                observer: parts.observer.clone(),
                index: parts.index.clone(),
                metrics: parts.metrics.clone(),
                tokens: audit.token_file.clone().map(crate::audit::Tokens::from_file).transpose()?,
                client_certs: audit.client_ca.is_some(),
                max_body: audit.max_body,
                budget: crate::audit::budget::Budget::new(
                    audit.max_inflight_bytes,
                    audit.max_requests,
                    audit.max_wait,
                    parts.metrics.audit_inflight_bytes.clone(),
                ),
                body_timeout: audit.body_timeout,
            });
            let listener = tokio::net::TcpListener::bind(audit.addr)
                .await
                .with_context(|| format!("failed to listen on {} for the audit webhook", audit.addr))?;
            tracing::info!(addr = %listener.local_addr()?, "audit webhook listening");
            let connections = Connections::new(audit.limits, listener_counts(&parts.metrics, "audit"));
            tasks.push(tokio::spawn(receiver.serve(
                listener,
                tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
                connections,
            )));
        }
        if let Some(p) = &settings.proxy {
            let tls = crate::proxy::tls::config(p.cert.clone())?;
            let proxy = Arc::new(crate::proxy::Proxy::new(crate::proxy::Parts {
                stores: caches.stores.clone(),
                upstreams: crate::proxy::upstream::Upstreams::new(
                    client.clone(),
                    caches.stores.clone(),
                    p.upstream_refresh,
                    crate::proxy::upstream::UpstreamLimits {
                        max_connections: p.max_upstream_connections,
                        max_per_client: p.max_upstream_per_connection,
                        open: parts.metrics.proxy_upstream_connections.clone(),
                    },
                ),
                gate: crate::proxy::gate::Gate::new(p.max_waiting, parts.metrics.proxy_waiting.clone()),
                observer: parts.observer.clone(),
                metrics: parts.metrics.clone(),
                annotator: parts.annotator.clone(),
                defaults: settings.defaults.clone(),
                scope: settings.scope.clone(),
                changes: caches.broadcast.clone(),
                base_domain: p.base_domain.clone(),
                unverified_wake_every: p.unverified_wake_every,
            }));
            let listener = tokio::net::TcpListener::bind(p.addr)
                .await
                .with_context(|| format!("failed to listen on {} for the proxy", p.addr))?;
            tracing::info!(addr = %listener.local_addr()?, "vcluster proxy listening");
            tasks.push(tokio::spawn(proxy.clone().track()));
            let api = settings.api.as_ref().map(|a| {
                let api = Arc::new(crate::api::Api::new(crate::api::Parts {
                    client: client.clone(),
                    stores: caches.stores.clone(),
                    defaults: settings.defaults.clone(),
                    scope: settings.scope.clone(),
                    namespace_selector: settings.namespace_selector.clone(),
                    ledger: parts.ledger.clone(),
                    annotator: parts.annotator.clone(),
                    metrics: parts.metrics.clone(),
                    keys: a.keys.clone(),
                    auth_proxy: a.auth_proxy_ca.clone().map(|ca| crate::api::authn::AuthProxy {
                        verifier: ca,
                        names: a.auth_proxy_names.clone(),
                    }),
                    ready: ready.clone(),
                    identity: settings.identity.clone(),
                }));
                tasks.push(tokio::spawn(api.authenticator().keep_client_ca(a.client_ca_refresh)));
                if !a.keys.shared {
                    tracing::warn!(
                        "no --api-session-key-file: page sessions work only at the replica that made them"
                    );
                }
                tracing::info!("API and web page under {}", crate::api::PREFIX);
                api
            });
            let connections = Connections::new(p.limits, listener_counts(&parts.metrics, "proxy"));
            tasks.push(tokio::spawn(serve_proxy(
                listener,
                tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
                connections,
                proxy,
                api,
            )));
        }
        let app_traffic = settings.app_traffic.clone().map(|a| {
            let (app, started) = crate::app_traffic::start(crate::app_traffic::Wiring {
                settings: a,
                namespace: settings.namespace.clone(),
                client: client.clone(),
                patcher: Patcher::new(client.clone(), throttle(settings, &parts.metrics)),
                stores: caches.stores.clone(),
                observer: parts.observer.clone(),
                annotator: parts.annotator.clone(),
                metrics: parts.metrics.clone(),
                defaults: settings.defaults.clone(),
                scope: settings.scope.clone(),
                changes: caches.broadcast.clone(),
                to_controller: caches.to_controller.clone(),
            });
            tasks.extend(started);
            app.holder
        });
        let listener = crate::admin::bind(settings.admin_addr)
            .await
            .with_context(|| format!("failed to listen on {}", settings.admin_addr))?;
        tracing::info!(addr = %listener.local_addr()?, "admin port listening");
        let controller = crate::admin::Controller::default();
        let admin = Arc::new(Admin {
            metrics: parts.metrics.clone(),
            ready: ready.clone(),
            controller: controller.clone(),
        });
        let connections = Connections::new(settings.admin_limits, listener_counts(&parts.metrics, "admin"));
        tasks.push(tokio::spawn(admin.serve(listener, connections)));
        Ok(Servers { tasks, app_traffic, ready, controller })
    }
}

/// The proxy's listener: paths under [`crate::api::PREFIX`] go to the API
/// (when it runs), everything else to the proxy. Neither knows the other.
async fn serve_proxy(
    listener: tokio::net::TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    connections: Arc<Connections>,
    proxy: Arc<crate::proxy::Proxy>,
    api: Option<Arc<crate::api::Api>>,
) {
    use futures::FutureExt as _;
    use futures::future::Either;
    use http_body_util::BodyExt as _;
    crate::tls::serve_https(
        listener,
        tls,
        connections,
        move |req: http::Request<hyper::body::Incoming>, conn| match &api {
            Some(api) if crate::api::handles(req.uri().path()) => Either::Left(
                api.clone()
                    .handle(req, conn)
                    .map(|r| r.map(|b| b.map_err(|never: std::convert::Infallible| match never {}).boxed())),
            ),
            _ => Either::Right(proxy.clone().handle(req, conn)),
        },
    )
    .await
}

/// The handles `listener` reports its connections through.
fn listener_counts(metrics: &Metrics, listener: &'static str) -> Counts {
    let labels = crate::metrics::ListenerLabels { listener };
    Counts {
        open: metrics.listener_connections.get_or_create(&labels).clone(),
        evicted: metrics.listener_evictions.get_or_create(&labels).clone(),
        refused: metrics.listener_refused.get_or_create(&labels).clone(),
    }
}

/// Phase 4: leader election and the controller.
struct Leading {
    controller: JoinHandle<()>,
    sweeper: JoinHandle<()>,
    /// Holds the Lease; ends (releasing it) once the controller, the last
    /// receiver of its leadership, is gone.
    lease: JoinHandle<Result<kube_lease_manager::LeaseManager, kube_lease_manager::LeaseManagerError>>,
}

impl Leading {
    async fn start(settings: &Settings, client: &Client, running: &mut Running) -> anyhow::Result<Leading> {
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
        let (leader, lease) = manager.watch().await;
        let spec = leadership::LeaseSpec {
            namespace: settings.namespace.clone(),
            name: settings.lease_name.clone(),
            identity: settings.identity.clone(),
            duration: Duration::from_secs(lease_secs),
        };
        let leader = leadership::guard(client.clone(), spec, leader);
        let config = Config {
            defaults: settings.defaults.clone(),
            scope: settings.scope.clone(),
            dry_run: settings.dry_run,
            delete_after: settings.enable_delete_after,
            argocd: settings.argocd.clone(),
            concurrency: settings.concurrency,
            reconcile_timeout: settings.reconcile_timeout,
            identity: settings.identity.clone(),
        };
        let parts = &running.parts;
        let ctx = Context::new(
            running.caches.stores.clone(),
            parts.scaler.clone(),
            parts.annotator.clone(),
            parts.ledger.clone(),
            parts.metrics.clone(),
            config,
            leader,
            running.servers.app_traffic.clone(),
        );
        let _ = running.servers.controller.set(Arc::downgrade(&ctx));
        let changes = running.caches.controller_changes.take().context("the controller was started twice")?;
        let controller = tokio::spawn(controller::run(ctx, changes));
        let sweeper = tokio::spawn({
            let (stores, observer) = (running.caches.stores.clone(), parts.observer.clone());
            async move {
                let mut tick = tokio::time::interval(SWEEP_EVERY);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    observer.sweep(|t| stores.object(t).is_some());
                }
            }
        });
        Ok(Leading { controller, sweeper, lease })
    }
}

/// Everything that runs.
struct Running {
    caches: Caches,
    parts: Parts,
    servers: Servers,
    leading: Option<Leading>,
}

impl Running {
    /// Stops everything, in the one order that loses nothing:
    /// 1. the controller and the sweeper: no new writes to targets;
    /// 2. the servers: no new activity comes in;
    /// 3. the ledger writes the activity it holds (on a standby it exists
    ///    nowhere else), within [`LEDGER_FINAL_FLUSH`];
    /// 4. the caches;
    /// 5. the Lease is released (its manager ends once the controller, the
    ///    last receiver of its leadership, is gone), so a standby takes
    ///    over at once rather than after the Lease runs out.
    async fn stop(self) {
        let Running { caches, parts, servers, leading } = self;
        let lease = match leading {
            Some(Leading { controller, sweeper, lease }) => {
                sweeper.abort();
                controller.abort();
                let _ = controller.await;
                Some(lease)
            }
            None => None,
        };
        for s in servers.tasks {
            s.abort();
        }
        let _ = parts.stop_ledger.send(());
        let ledger_abort = parts.ledger_task.abort_handle();
        if tokio::time::timeout(LEDGER_FINAL_FLUSH, parts.ledger_task).await.is_err() {
            tracing::warn!(limit = ?LEDGER_FINAL_FLUSH, "the last activity flush did not finish; some activity is lost");
            ledger_abort.abort();
        }
        for r in caches.reflectors {
            r.abort();
        }
        caches.fan_out.abort();
        drop(caches.to_controller);
        if let Some(lease) = lease {
            let _ = tokio::time::timeout(Duration::from_secs(5), lease).await;
        }
    }
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
