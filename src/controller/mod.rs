//! The controller: for each target, derive the desired state from its
//! effective policy, its activity and the cluster, and move the cluster
//! there through the scaler. Level-triggered: a target is looked at when
//! something about it changes (watches, activity) and when its next
//! deadline comes (a timer queue, never a polling loop). Only the elected
//! leader acts.

pub mod evaluate;
mod reconcile;
mod status;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::scheduler::{ScheduleRequest, scheduler};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

pub use evaluate::{Evaluation, Invalid, evaluate};

use crate::activity::ledger::Ledger;
use crate::metrics::Metrics;
use crate::policy::annotations::TargetState;
use crate::policy::decide::Desired;
use crate::policy::{Candidate, Defaults};
use crate::scaler::Scaler;
use crate::target::stores::Change;
use crate::target::{Scope, Stores, TargetKind, TargetRef};

/// How the controller behaves.
#[derive(Debug, Clone)]
pub struct Config {
    pub defaults: Defaults,
    /// Where dormant may act.
    pub scope: Scope,
    /// Decide and report only; never scale.
    pub dry_run: bool,
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
    pub ledger: Ledger,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub config: Config,
    /// When this replica last became the leader: savings before that were
    /// counted by another replica (or process).
    leading_since: Mutex<DateTime<Utc>>,
    leader: watch::Receiver<bool>,
    candidates: Mutex<CandidateCache>,
    summaries: Mutex<HashMap<TargetRef, Summary>>,
    /// The last invalid message reported per target (an Event is published
    /// only when it changes).
    reported_invalid: Mutex<HashMap<TargetRef, String>>,
    /// When each waking target started waking, and why (for the histogram).
    waking: Mutex<HashMap<TargetRef, (tokio::time::Instant, &'static str)>>,
}

/// Parsed policies, keyed by (name, generation) of each: the status
/// dormant writes does not make them parsed again.
type CandidateCache = (Vec<(String, Option<i64>)>, Vec<Arc<Candidate>>);

/// What a finished reconcile reports: the target and its next deadline.
type Done = (TargetRef, Result<Option<DateTime<Utc>>, Error>);

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Context {
    pub fn new(
        stores: Stores,
        scaler: Scaler,
        ledger: Ledger,
        metrics: Arc<Metrics>,
        config: Config,
        leader: watch::Receiver<bool>,
    ) -> Arc<Context> {
        let reporter = Reporter { controller: "dormant".into(), instance: Some(config.identity.clone()) };
        let recorder = Recorder::new(scaler.client().clone(), reporter);
        Arc::new(Context {
            stores,
            scaler,
            ledger,
            recorder,
            metrics,
            config,
            leading_since: Mutex::new(Utc::now()),
            leader,
            candidates: Mutex::new((Vec::new(), Vec::new())),
            summaries: Mutex::new(HashMap::new()),
            reported_invalid: Mutex::new(HashMap::new()),
            waking: Mutex::new(HashMap::new()),
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

    /// Resolver candidates, re-read only when a policy changed.
    pub fn candidates(&self) -> Vec<Arc<Candidate>> {
        let key = crate::target::stores::policy_generations(&self.stores.policies);
        let mut cache = lock(&self.candidates);
        if cache.0 != key || (cache.1.is_empty() && !key.is_empty()) {
            *cache = (key, self.stores.candidates());
        }
        cache.1.clone()
    }

    /// Every target the stores know.
    pub fn all_targets(&self) -> Vec<TargetRef> {
        self.stores.targets(&self.candidates(), &self.config.scope)
    }

    fn expand(&self, change: Change) -> Vec<TargetRef> {
        match change {
            Change::Target(t) => vec![t],
            Change::All => self.all_targets(),
            Change::Namespace(ns) => {
                let mut out = vec![TargetRef::namespace(&ns)];
                use kube::ResourceExt;
                for s in
                    self.stores.statefulsets.state_filter(|s| s.namespace().as_deref() == Some(ns.as_str()))
                {
                    if crate::target::is_vcluster_control_plane(s.labels()) {
                        out.push(TargetRef::vcluster(&ns, &s.name_any()));
                    }
                }
                for d in
                    self.stores.deployments.state_filter(|d| d.namespace().as_deref() == Some(ns.as_str()))
                {
                    if crate::target::is_vcluster_control_plane(d.labels()) {
                        out.push(TargetRef::vcluster(&ns, &d.name_any()));
                    }
                }
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
    #[error("reconcile did not finish within {0:?} (an API request hung?); retrying from a fresh read")]
    Timeout(Duration),
    #[error("reconcile panicked; retrying from a fresh read")]
    Panicked,
}

impl Error {
    pub fn category(&self) -> &'static str {
        match self {
            Error::Scale(e) => e.category(),
            Error::Timeout(_) => "timeout",
            Error::Panicked => "panic",
        }
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
    let (req_tx, mut req_rx) = mpsc::unbounded_channel::<ScheduleRequest<TargetRef>>();
    let requests = futures::stream::poll_fn(move |cx| req_rx.poll_recv(cx));
    let mut queue = scheduler(requests);
    let schedule = |t: TargetRef, at: tokio::time::Instant| {
        let _ = req_tx.send(ScheduleRequest { message: t, run_at: at });
    };
    let mut leader = ctx.leader.clone();
    let mut in_flight: HashSet<TargetRef> = HashSet::new();
    let mut dirty: HashSet<TargetRef> = HashSet::new();
    let mut waiting: VecDeque<TargetRef> = VecDeque::new();
    let mut failures: HashMap<TargetRef, u32> = HashMap::new();
    let mut tasks: JoinSet<Done> = JoinSet::new();
    // Which target each task reconciles, for a task that panics (its
    // result, which names the target, is lost with it).
    let mut task_targets: HashMap<tokio::task::Id, TargetRef> = HashMap::new();
    let mut status_task: Option<tokio::task::JoinHandle<()>> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if ctx.is_leader() {
        ctx.take_lead();
        for t in ctx.all_targets() {
            schedule(t, tokio::time::Instant::now());
        }
    }
    let spawn = |tasks: &mut JoinSet<_>,
                 task_targets: &mut HashMap<tokio::task::Id, TargetRef>,
                 in_flight: &mut HashSet<TargetRef>,
                 t: TargetRef| {
        in_flight.insert(t.clone());
        let ctx = ctx.clone();
        let target = t.clone();
        let handle = tasks.spawn(async move {
            let limit = ctx.config.reconcile_timeout;
            let r = tokio::time::timeout(limit, reconcile::reconcile(&ctx, &t))
                .await
                .unwrap_or(Err(Error::Timeout(limit)));
            (t, r)
        });
        task_targets.insert(handle.id(), target);
    };
    loop {
        tokio::select! {
            change = changes.recv() => match change {
                Some(change) => {
                    for t in ctx.expand(change) {
                        schedule(t, tokio::time::Instant::now());
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
                        schedule(t, tokio::time::Instant::now());
                    }
                } else {
                    ctx.step_down();
                    tracing::info!(identity = %ctx.config.identity, "not the leader; standing by");
                }
            }
            Some(t) = queue.next() => {
                if in_flight.contains(&t) {
                    dirty.insert(t);
                } else if in_flight.len() >= ctx.config.concurrency.max(1) {
                    if !waiting.contains(&t) {
                        waiting.push_back(t);
                    }
                } else {
                    spawn(&mut tasks, &mut task_targets, &mut in_flight, t);
                }
            }
            Some(done) = tasks.join_next_with_id() => {
                let (t, result) = match done {
                    Ok((id, (t, result))) => {
                        task_targets.remove(&id);
                        (t, result)
                    }
                    Err(e) => {
                        // A panic (from a dependency: dormant's own code
                        // returns errors): retried like a failure, so the
                        // target is not left in flight for good.
                        let Some(t) = task_targets.remove(&e.id()) else { continue };
                        tracing::error!(target = %t, error = %e, "reconcile panicked");
                        (t, Err(Error::Panicked))
                    }
                };
                in_flight.remove(&t);
                match result {
                    Ok(next) => {
                        failures.remove(&t);
                        if let Some(at) = next {
                            schedule(t.clone(), at_instant(at));
                        }
                    }
                    Err(e) => {
                        let n = failures.entry(t.clone()).or_default();
                        *n += 1;
                        let backoff = Duration::from_millis(500 * 2u64.pow((*n).min(7)));
                        tracing::warn!(target = %t, error = %e, category = e.category(), retry_in = ?backoff, "reconcile failed");
                        ctx.metrics.reconcile_errors.get_or_create(&crate::metrics::CategoryLabels { category: e.category().into() }).inc();
                        schedule(t.clone(), tokio::time::Instant::now() + backoff);
                    }
                }
                if dirty.remove(&t) {
                    schedule(t, tokio::time::Instant::now());
                }
                while in_flight.len() < ctx.config.concurrency.max(1) {
                    let Some(next) = waiting.pop_front() else { break };
                    if in_flight.contains(&next) {
                        dirty.insert(next);
                    } else {
                        spawn(&mut tasks, &mut task_targets, &mut in_flight, next);
                    }
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
