//! Wake on application traffic. While a target sleeps, each Service of it
//! that an Ingress or a Gateway API route sends traffic to (or that opts
//! in) gets one more EndpointSlice, dormant's, listing the agent's
//! addresses on a port of the agent's own for each Service port
//! ([`slice`], [`select`]). kube-proxy and ingress controllers then send
//! the app's requests to the agent, which records them as use, wakes the
//! target once however many wait, holds them (or shows a browser a page
//! that follows the wake) and forwards them to the Service's own pods once
//! they are ready ([`serve`], [`forward`], [`page`]). At wake the slice is
//! deleted, Service by Service, as its own endpoints come back ([`hold`]):
//! an awake app's traffic never passes through dormant, and the Service
//! itself is never changed (`docs/app-traffic.md` says why).
//!
//! - [`hold`]: the leader's part, called by the controller at sleep and wake;
//! - [`listen`]: every replica's listeners, from dormant's slices;
//! - [`endpoints`]: a Service's own ready endpoints, watched on demand.

pub mod endpoints;
pub mod forward;
pub mod hold;
pub mod listen;
pub mod page;
pub mod select;
pub mod serve;
pub mod settings;
pub mod slice;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::reflector;
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

use crate::activity::observe::Observer;
use crate::annotate::Annotator;
use crate::client::Patcher;
use crate::metrics::Metrics;
use crate::policy::Defaults;
use crate::target::stores::Change;
use crate::target::{Scope, Stores};
pub use hold::{Advertise, Held, Holder, Released};
pub use settings::{AdvertiseSetting, AppTrafficArgs, AppTrafficSettings};

/// How often the listeners are checked against dormant's slices besides
/// the slices' own changes.
const RESYNC: Duration = Duration::from_secs(5);

/// How long after its last request a Service's endpoints stay watched.
const WATCH_IDLE: Duration = Duration::from_secs(600);

/// How long a wake may keep a Service held while its endpoints do not
/// come: as long as a held request may wait for it (see
/// `crate::proxy::wake::wake_limit`), after which the Service is given
/// back as it is.
pub fn give_up_after(wake_timeout: Duration) -> Duration {
    wake_timeout * 3 + Duration::from_secs(60)
}

/// What the agent's wiring hands over.
pub struct Wiring {
    pub settings: AppTrafficSettings,
    /// The agent's own namespace (where an advertised Service lives).
    pub namespace: String,
    pub client: kube::Client,
    pub patcher: Patcher,
    pub stores: Stores,
    pub observer: Arc<Observer>,
    pub annotator: Annotator,
    pub metrics: Arc<Metrics>,
    pub defaults: Defaults,
    pub scope: Scope,
    /// The stores' changes (targets waking).
    pub changes: broadcast::Sender<Change>,
    /// Targets the controller should look at again (a slice of theirs
    /// changed or went, the agent's addresses moved).
    pub to_controller: mpsc::UnboundedSender<Change>,
}

/// The running parts: the leader's [`Holder`] and every replica's
/// listeners.
pub struct AppTraffic {
    pub holder: Arc<Holder>,
    pub listeners: Arc<listen::Listeners>,
    pub app: Arc<serve::App>,
}

/// Starts the watch of dormant's slices, the listeners that follow it, and
/// (with `service:<name>`) the watch of the agent's own addresses.
pub fn start(w: Wiring) -> (AppTraffic, Vec<JoinHandle<()>>) {
    let mut tasks = Vec::new();
    let (slices, writer) = reflector::store::<EndpointSlice>();
    let mut follow = None;
    let advertise = match &w.settings.advertise {
        AdvertiseSetting::Addresses(a) => Advertise::Static(a.clone()),
        AdvertiseSetting::Service(name) => {
            let (store, writer) = reflector::store::<EndpointSlice>();
            let api: Api<EndpointSlice> = Api::namespaced(w.client.clone(), &w.namespace);
            let config = watcher::Config::default().labels(&format!("{}={name}", slice::SERVICE_NAME_LABEL));
            follow = Some((api, config, writer));
            Advertise::Service { namespace: w.namespace.clone(), name: name.clone(), slices: store }
        }
    };
    let holder = Arc::new(Holder::new(
        w.patcher.clone(),
        w.stores.clone(),
        slices.clone(),
        w.settings.ports.clone(),
        advertise,
        w.scope.clone(),
    ));
    if let Some((api, config, writer)) = follow {
        tasks.push(tokio::spawn(follow_addresses(
            api,
            config,
            writer,
            holder.clone(),
            w.to_controller.clone(),
        )));
    }
    let (stores, scope) = (w.stores.clone(), w.scope.clone());
    let app = Arc::new(serve::App::new(serve::Parts {
        stores: w.stores,
        observer: w.observer,
        annotator: w.annotator,
        metrics: w.metrics,
        defaults: w.defaults,
        scope: w.scope,
        endpoints: endpoints::Endpoints::new(w.client.clone()),
        changes: w.changes,
        max_waiting: w.settings.max_waiting,
    }));
    let listeners = Arc::new(listen::Listeners::new(
        app.clone(),
        w.settings.bind,
        w.settings.ports.clone(),
        w.settings.max_connections,
    ));
    let api: Api<EndpointSlice> = Api::all(w.client);
    let config = watcher::Config::default().labels(&slice::selector());
    let mine = move |s: &EndpointSlice| hold::mine(&stores, &scope, s);
    tasks.push(tokio::spawn(follow_slices(api, config, writer, listeners.clone(), mine, w.to_controller)));
    tasks.push(tokio::spawn({
        let app = app.clone();
        async move {
            let mut tick = tokio::time::interval(WATCH_IDLE / 4);
            loop {
                tick.tick().await;
                app.sweep(WATCH_IDLE);
            }
        }
    }));
    (AppTraffic { holder, listeners, app }, tasks)
}

/// Keeps the store of dormant's slices, the listeners in step with it, and
/// tells the controller about the targets whose slices change.
async fn follow_slices(
    api: Api<EndpointSlice>,
    config: watcher::Config,
    writer: reflector::store::Writer<EndpointSlice>,
    listeners: Arc<listen::Listeners>,
    mine: impl Fn(&EndpointSlice) -> bool,
    to_controller: mpsc::UnboundedSender<Change>,
) {
    let reader = writer.as_reader();
    // The scope is read from the namespaces' store, which may sync after
    // the slices: the listeners are brought in step now and then too.
    let mut resync = tokio::time::interval(RESYNC);
    let stream = watcher(api, config)
        .default_backoff()
        .modify(|s: &mut EndpointSlice| {
            kube::ResourceExt::managed_fields_mut(s).clear();
        })
        .reflect(writer);
    futures::pin_mut!(stream);
    loop {
        let event = tokio::select! {
            e = stream.next() => match e {
                Some(e) => e,
                None => break,
            },
            _ = resync.tick() => {
                listeners.sync(reader.state().iter().map(|s| s.as_ref()).filter(|s| mine(s))).await;
                continue;
            }
        };
        let touched: Vec<EndpointSlice> = match event {
            Ok(watcher::Event::Apply(s) | watcher::Event::Delete(s)) => vec![s],
            Ok(watcher::Event::InitDone) => reader.state().iter().map(|s| EndpointSlice::clone(s)).collect(),
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "watch of dormant's EndpointSlices failed; retrying");
                continue;
            }
        };
        listeners.sync(reader.state().iter().map(|s| s.as_ref()).filter(|s| mine(s))).await;
        for t in touched.iter().filter(|s| mine(s)).filter_map(slice::target) {
            let _ = to_controller.send(Change::Target(t));
        }
    }
}

/// Keeps the store of the agent's own Service's slices, and has every
/// target that holds a Service looked at again when the agent's addresses
/// change (a rollout): their slices must follow. So is every target whose
/// hold failed: a sleep begun before the agent's own pod was listed ready
/// had no address to hold with.
async fn follow_addresses(
    api: Api<EndpointSlice>,
    config: watcher::Config,
    writer: reflector::store::Writer<EndpointSlice>,
    holder: Arc<Holder>,
    to_controller: mpsc::UnboundedSender<Change>,
) {
    let stream = watcher(api, config).default_backoff().reflect(writer).touched_objects();
    futures::pin_mut!(stream);
    while let Some(item) = stream.next().await {
        if item.is_err() {
            continue;
        }
        for t in holder.address_dependent() {
            let _ = to_controller.send(Change::Target(t));
        }
    }
}
