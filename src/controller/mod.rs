//! The controller: for each target, derive the desired state from its
//! effective policy, its activity and the cluster, and move the cluster
//! there through the scaler. Level-triggered: a target is looked at when
//! something about it changes (watches, activity) and when its next
//! deadline comes (a timer queue, never a polling loop). Only the elected
//! leader acts.

mod delete;
pub mod evaluate;
mod prewake;
mod reconcile;
pub mod runner;
mod status;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, Recorder, Reporter};
use tokio::sync::{mpsc, watch};

pub use evaluate::{Evaluation, Invalid, evaluate};

use crate::activity::ledger::Ledger;
use crate::annotate::Annotator;
use crate::metrics::Metrics;
use crate::policy::Defaults;
use crate::policy::annotations::TargetState;
use crate::policy::decide::Desired;
use crate::scaler::Scaler;
use crate::target::stores::Change;
use crate::target::{Scope, Stores, TargetKind, TargetRef};
use runner::{RunError, Runner};

/// How the controller behaves.
#[derive(Debug, Clone)]
pub struct Config {
    pub defaults: Defaults,
    /// Where dormant may act.
    pub scope: Scope,
    /// Decide and report only; never scale.
    pub dry_run: bool,
    /// Policies' `deleteAfter` may delete targets (`--enable-delete-after`).
    pub delete_after: bool,
    /// Argo CD's namespace, when its Applications are paused while what
    /// they deploy sleeps (`--pause-argocd-applications`).
    pub argocd: Option<String>,
    /// Targets reconciled at once.
    pub concurrency: usize,
    /// A reconcile still running after this is abandoned and retried. Every
    /// step is safe to stop anywhere (the state is written on the target
    /// before workloads change, as for a SIGKILL), so a hung API request
    /// costs one target this long, not the agent its progress.
    pub reconcile_timeout: Duration,
    /// This replica's name (Events' reporting instance).
    pub identity: String,
}

/// What the controller last concluded about a target (for metrics, policy
/// status and the admin API).
#[derive(Debug, Clone)]
pub struct Summary {
    pub kind: TargetKind,
    pub policy: Option<String>,
    pub state: TargetState,
    pub desired: Option<Desired>,
    pub next: Option<DateTime<Utc>>,
    pub invalid: Option<(Option<String>, String)>,
}

/// Everything a reconcile needs.
pub struct Context {
    pub stores: Stores,
    pub scaler: Scaler,
    pub annotator: Annotator,
    pub ledger: Ledger,
    recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub config: Config,
    /// Holds sleeping targets' app traffic (when the agent does).
    pub app_traffic: Option<Arc<crate::app_traffic::Holder>>,
    /// When this replica last became the leader: savings before that were
    /// counted by another replica (or process).
    leading_since: Mutex<DateTime<Utc>>,
    leader: watch::Receiver<bool>,
    summaries: Mutex<HashMap<TargetRef, Summary>>,
    /// The last invalid message reported per target (an Event is published
    /// only when it changes).
    reported_invalid: Mutex<HashMap<TargetRef, String>>,
    /// When each waking target started waking, and why (for the histogram).
    waking: Mutex<HashMap<TargetRef, (tokio::time::Instant, &'static str)>>,
    /// Targets whose state this replica changed, with the state it wrote:
    /// until the cache shows it, another reconcile would act on the old
    /// state again (count a transition twice, publish its Event twice). See
    /// [`reconcile::reconcile`].
    unseen_writes: Mutex<HashMap<TargetRef, (TargetState, tokio::time::Instant)>>,
    /// Pre-wakes not yet used nor slept through, and when each began.
    prewoken: Mutex<HashMap<TargetRef, DateTime<Utc>>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Context {
    /// Publishes an Event, behind the client rate limit as every other
    /// request of the controller (a sleep-all publishes thousands).
    pub(crate) async fn publish(
        &self,
        event: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        self.scaler.throttle().wait().await;
        self.recorder.publish(event, regarding).await
    }

    #[allow(clippy::too_many_arguments)] // the parts the agent wires, each once
    pub fn new(
        stores: Stores,
        scaler: Scaler,
        annotator: Annotator,
        ledger: Ledger,
        metrics: Arc<Metrics>,
        config: Config,
        leader: watch::Receiver<bool>,
        app_traffic: Option<Arc<crate::app_traffic::Holder>>,
    ) -> Arc<Context> {
        let reporter = Reporter { controller: "dormant".into(), instance: Some(config.identity.clone()) };
        let recorder = Recorder::new(scaler.client().clone(), reporter);
        Arc::new(Context {
            stores,
            scaler,
            annotator,
            ledger,
            recorder,
            metrics,
            config,
            app_traffic,
            leading_since: Mutex::new(Utc::now()),
            leader,
            summaries: Mutex::new(HashMap::new()),
            reported_invalid: Mutex::new(HashMap::new()),
            waking: Mutex::new(HashMap::new()),
            unseen_writes: Mutex::new(HashMap::new()),
            prewoken: Mutex::new(HashMap::new()),
        })
    }

    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    /// Since when this replica counts savings (see [`Context::step_down`]).
    pub fn leading_since(&self) -> DateTime<Utc> {
        *lock(&self.leading_since)
    }

    fn take_lead(&self) {
        *lock(&self.leading_since) = Utc::now();
    }

    /// Leadership lost (the replica was paused or cut off from the API
    /// server past its Lease): savings are counted up to now and stop here,
    /// and the per-target series and summaries go, so that only the new
    /// leader reports them. Dashboards sum over replicas; a former leader's
    /// meters would otherwise run on, counting every sleeping target twice
    /// and, after the new leader wakes it, while it is awake. The ledger
    /// stays: every replica records and flushes activity.
    pub(super) fn step_down(&self) {
        self.metrics.cost.accrue(&self.metrics.savings, Utc::now());
        let targets: Vec<TargetRef> = lock(&self.summaries).drain().map(|(t, _)| t).collect();
        for t in &targets {
            self.metrics.forget_target(t);
        }
        status::count_targets(self, &HashMap::new());
        lock(&self.reported_invalid).clear();
        lock(&self.waking).clear();
    }

    /// Every target the stores know.
    pub fn all_targets(&self) -> Vec<TargetRef> {
        self.stores.targets(&self.stores.candidates(), &self.config.scope)
    }

    fn expand(&self, change: Change) -> Vec<TargetRef> {
        match change {
            Change::Target(t) => vec![t],
            Change::All => self.all_targets(),
            Change::Namespace(ns) => {
                let mut out = vec![TargetRef::namespace(&ns)];
                out.extend(self.stores.vclusters_in(&ns));
                out
            }
        }
    }

    /// A snapshot of what the controller concluded per target.
    pub fn summaries(&self) -> HashMap<TargetRef, Summary> {
        lock(&self.summaries).clone()
    }
}

/// Reconcile errors, each with a stable category.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Scale(#[from] crate::scaler::Error),
    #[error(transparent)]
    Annotate(#[from] crate::annotate::Error),
}

impl Error {
    pub fn category(&self) -> &'static str {
        match self {
            Error::Scale(e) => e.category(),
            Error::Annotate(e) => e.category(),
        }
    }
}

/// The metric label of a reconcile that did not succeed.
fn category(e: &RunError<Error>) -> &'static str {
    match e {
        RunError::Failed(e) => e.category(),
        RunError::Timeout(_) => "timeout",
        RunError::Panicked => "panic",
    }
}

/// The periodic status work (gauges, SleepPolicy status) gets this long.
const STATUS_TIMEOUT: Duration = Duration::from_secs(30);

fn at_instant(t: DateTime<Utc>) -> tokio::time::Instant {
    let now = Utc::now();
    let delta = (t - now).to_std().unwrap_or(Duration::ZERO);
    // A millisecond late rather than early: the decision at the deadline
    // must see it as passed.
    tokio::time::Instant::now() + delta + Duration::from_millis(1)
}

/// Runs the controller until `changes` ends. Targets are reconciled when
/// they change, when their deadline comes, and all of them whenever this
/// replica becomes the leader.
pub async fn run(ctx: Arc<Context>, mut changes: mpsc::UnboundedReceiver<Change>) {
    let mut runner = {
        let ctx = ctx.clone();
        Runner::new(ctx.config.concurrency, ctx.config.reconcile_timeout, move |t: TargetRef| {
            let ctx = ctx.clone();
            async move { reconcile::reconcile(&ctx, &t).await.map(|next| next.map(at_instant)) }
        })
    };
    let mut leader = ctx.leader.clone();
    let mut status_task: Option<tokio::task::JoinHandle<()>> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if ctx.is_leader() {
        ctx.take_lead();
        for t in ctx.all_targets() {
            runner.schedule(t, tokio::time::Instant::now());
        }
    }
    loop {
        tokio::select! {
            change = changes.recv() => match change {
                Some(change) => {
                    for t in ctx.expand(change) {
                        runner.schedule(t, tokio::time::Instant::now());
                    }
                }
                None => break,
            },
            changed = leader.changed() => {
                if changed.is_err() {
                    break;
                }
                let is_leader = *leader.borrow_and_update();
                ctx.metrics.leader.set(i64::from(is_leader));
                if is_leader {
                    ctx.take_lead();
                    tracing::info!(identity = %ctx.config.identity, "became the leader; reconciling every target");
                    for t in ctx.all_targets() {
                        runner.schedule(t, tokio::time::Instant::now());
                    }
                } else {
                    ctx.step_down();
                    tracing::info!(identity = %ctx.config.identity, "not the leader; standing by");
                }
            }
            finished = runner.step() => {
                if let Some((t, Err(e))) = finished {
                    let category = category(&e);
                    let retry_in = runner::backoff(runner.failures(&t));
                    tracing::warn!(target = %t, error = %crate::error::Chain(&e), category, ?retry_in, "reconcile failed");
                    let labels = crate::metrics::CategoryLabels { category: category.into() };
                    ctx.metrics.reconcile_errors.get_or_create(&labels).inc();
                }
            }
            _ = tick.tick() => {
                // In its own task: API requests for SleepPolicy status must
                // never hold up reconciles. One at a time.
                if status_task.as_ref().is_none_or(|t| t.is_finished()) {
                    let ctx = ctx.clone();
                    status_task = Some(tokio::spawn(async move {
                        if tokio::time::timeout(STATUS_TIMEOUT, status::tick(&ctx)).await.is_err() {
                            tracing::warn!(timeout = ?STATUS_TIMEOUT, "status update did not finish; will retry");
                        }
                    }));
                }
            }
        }
    }
}
