//! Per-app operations: one [`AppSupervisor`] per app, running `scale`, `reload`, `stop`,
//! `start`, `restart`, worker removal and shutdown one at a time, over the app's slots
//! ([`crate::slot`]). Also [`SpawnContext`], what every supervisor of a master shares.
//!
//! The supervisor decides *which* slots exist; each slot's task decides what its worker does
//! (crash restarts need no lock). The sequences are in `workers/LIFECYCLE.md`, "Operations";
//! keep the two in step.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use balancer_config::{App, Policy, Signal};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::logs::LogPaths;
use crate::pool::Pool;
use crate::reuseport::{Group, Rescue};
use crate::slot::{Slot, SlotSpec};
use crate::stats::{MEMORY_SAMPLES, Sampler};
use crate::status::{RestartCounts, RestartReason, Target, WorkerState, WorkerStatus};
use crate::triggers::{TriggerStatus, Triggers};

/// Why an operation on an app did not (entirely) succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// Workers that were started did not become ready; each entry says which and why.
    #[error("{}", join(.0))]
    NotReady(Vec<NotReady>),
    /// No worker of this app has that id.
    #[error("app {app} has no worker {id}")]
    NoSuchWorker {
        /// The app.
        app: String,
        /// The id asked for.
        id: u32,
    },
}

/// One worker that did not become ready after an operation started it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady {
    /// The worker's id.
    pub id: u32,
    /// Where its first start ended (`waiting-restart`, `errored`, `stopped`); `None` when its
    /// task ended without saying.
    pub state: Option<WorkerState>,
    /// Why, as the slot recorded it.
    pub reason: Option<String>,
}

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.state {
            Some(state) => write!(
                f,
                "worker {} {}: {}",
                self.id,
                state.as_str(),
                self.reason.as_deref().unwrap_or("no reason given")
            ),
            None => f.write_str("worker task ended"),
        }
    }
}

/// `a; b; c`: several failures in one message line.
fn join(failures: &[NotReady]) -> String {
    failures
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Slots being drained and stopped in the background: what to wait for, what to stop listing.
struct Retiring {
    watches: Vec<watch::Receiver<WorkerStatus>>,
    stops: Vec<JoinHandle<()>>,
}

/// What every supervisor of a master shares.
pub struct SpawnContext {
    /// `$BALANCER_HOME`: logs go to `home/logs`.
    pub home: PathBuf,
    /// Hands out worker ids across all apps of the master.
    pub ids: AtomicU32,
    /// The `balancer` binary, run as the worker shim around every worker (`None` only in this
    /// crate's unit tests, which have no such binary).
    pub shim: Option<PathBuf>,
    /// Where connections rescued from leaving reuseport sockets go (the data plane).
    pub rescue: Rescue,
    /// Samples every worker's CPU and memory (one thread for the whole master).
    pub sampler: Arc<Sampler>,
    /// Reuseport sockets a previous master handed over (`upgrade`), by public address, in
    /// the kernel's order: the group made for that address adopts them.
    pub adopted: std::sync::Mutex<Vec<(std::net::SocketAddr, Vec<std::os::fd::OwnedFd>)>>,
    /// Where "app X wants to listen on ADDR" goes when a worker of an app with no `listen`
    /// binds a port (the data plane creates the listener: see [`crate::capture::Learn`]).
    pub learn: std::sync::OnceLock<crate::capture::Learn>,
}

impl std::fmt::Debug for SpawnContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpawnContext")
            .field("home", &self.home)
            .field("shim", &self.shim)
            .finish_non_exhaustive()
    }
}

impl SpawnContext {
    /// The context of a master living in `home`, with `shim` as its own binary and `rescue`
    /// carrying connections rescued from leaving reuseport sockets.
    pub fn new(home: PathBuf, shim: Option<PathBuf>, rescue: Rescue) -> Arc<Self> {
        Arc::new(SpawnContext {
            home,
            ids: AtomicU32::new(0),
            shim,
            rescue,
            sampler: Arc::new(Sampler::default()),
            adopted: std::sync::Mutex::new(Vec::new()),
            learn: std::sync::OnceLock::new(),
        })
    }
}

/// Supervises every worker of one app and owns its pool.
///
/// Operations (`scale`, `reload`, `stop`, …) run one at a time per app; crash restarts happen
/// inside each slot's task and need no lock.
pub struct AppSupervisor {
    app: ArcSwap<App>,
    env: Arc<SpawnContext>,
    pool: Arc<Pool>,
    /// Reuseport policy: one socket group per listener, shared by every incarnation.
    groups: Mutex<Vec<Arc<Group>>>,
    /// The app's worker slots, in creation order.
    slots: Mutex<Vec<Slot>>,
    /// Slots replaced by a reload or removed by a scale-down, still draining: shown by `ls`.
    retiring: Mutex<Vec<watch::Receiver<WorkerStatus>>>,
    ops: tokio::sync::Mutex<()>,
    /// `watch` and `cron_restart`, armed while the app runs (`triggers.rs`).
    triggers: Mutex<Triggers>,
    /// Set by [`shutdown`](Self::shutdown): nothing re-arms the triggers after it.
    shut: AtomicBool,
    me: Weak<AppSupervisor>,
}

impl AppSupervisor {
    /// Starts `app.instances` workers (without waiting for them: see
    /// [`wait_started`](Self::wait_started)).
    pub fn start(app: App, env: Arc<SpawnContext>) -> Arc<Self> {
        let instances = app.instances;
        let sup = Arc::new_cyclic(|me| AppSupervisor {
            app: ArcSwap::from_pointee(app),
            env,
            pool: Arc::new(Pool::new()),
            groups: Mutex::new(Vec::new()),
            slots: Mutex::new(Vec::new()),
            retiring: Mutex::new(Vec::new()),
            ops: tokio::sync::Mutex::new(()),
            triggers: Mutex::new(Triggers::default()),
            shut: AtomicBool::new(false),
            me: me.clone(),
        });
        let slots: Vec<Slot> = (0..instances)
            .map(|instance| sup.spawn_slot(None, instance, RestartCounts::default(), None, false))
            .collect();
        sup.slots().extend(slots);
        sup.sync_triggers();
        tokio::spawn(guard_memory(Arc::downgrade(&sup), sup.env.sampler.ticks()));
        sup
    }

    /// The app as currently configured.
    pub fn app(&self) -> Arc<App> {
        self.app.load_full()
    }

    /// The ready workers, for the listeners.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Whether a worker with this id belongs to the app.
    pub fn has_worker(&self, id: u32) -> bool {
        self.slots().iter().any(|s| s.id == id)
    }

    /// Every worker's status, ordered by id (draining leftovers of a reload or scale-down too).
    pub fn statuses(&self) -> Vec<WorkerStatus> {
        let mut all: Vec<_> = self
            .slots()
            .iter()
            .map(|s| s.status.borrow().clone())
            .collect();
        all.extend(self.retiring().iter().map(|rx| rx.borrow().clone()));
        all.sort_by_key(|s| (s.id, s.state == WorkerState::Ready));
        all
    }

    /// The log files of each instance.
    pub fn log_paths(&self) -> Vec<(u32, LogPaths)> {
        let app = self.app();
        let mut instances: Vec<u32> = self.slots().iter().map(|s| s.instance).collect();
        instances.sort_unstable();
        instances.dedup();
        instances
            .into_iter()
            .map(|i| (i, LogPaths::for_app(&self.env.home, &app, i)))
            .collect()
    }

    /// Waits until every current worker has become ready or failed its first start.
    pub async fn wait_started(&self) -> Result<(), OpError> {
        let _op = self.ops.lock().await;
        let watches: Vec<_> = self.slots().iter().map(|s| s.status.clone()).collect();
        first_outcomes(watches).await
    }

    /// Sets the worker count: new workers join when ready (this returns when they are, or with
    /// why not); surplus workers go newest first, drained, then stopped.
    pub async fn scale(&self, to: u32) -> Result<String, OpError> {
        let _op = self.ops.lock().await;
        self.scale_locked(to).await
    }

    async fn scale_locked(&self, to: u32) -> Result<String, OpError> {
        // The count is part of the configuration: a later reload keeps it.
        let mut app = App::clone(&self.app());
        if app.instances != to {
            app.instances = to;
            app.instances_spec = balancer_config::Instances::Count(to);
            self.app.store(Arc::new(app));
        }
        let name = self.app().name.clone();
        let current = self.slots().len() as u32;
        if to > current {
            let mut used: Vec<u32> = self.slots().iter().map(|s| s.instance).collect();
            let mut watches = Vec::new();
            for _ in current..to {
                let instance = (0..).find(|i| !used.contains(i)).unwrap_or(0);
                used.push(instance);
                let slot = self.spawn_slot(None, instance, RestartCounts::default(), None, false);
                watches.push(slot.status.clone());
                self.slots().push(slot);
            }
            first_outcomes(watches).await?;
            Ok(format!("scaled {name} from {current} to {to}: all ready"))
        } else if to < current {
            let victims = {
                let mut slots = self.slots();
                slots.sort_by_key(|s| s.id);
                slots.split_off(to as usize)
            };
            self.retire(victims).await;
            Ok(format!("scaled {name} from {current} down to {to}"))
        } else {
            Ok(format!("{name} already has {to} workers"))
        }
    }

    /// How many worker slots the app has (running or not; draining leftovers excluded).
    pub fn worker_count(&self) -> u32 {
        self.slots().len() as u32
    }

    /// Takes a configuration that differs only in its worker count, and scales to it.
    pub async fn rescale(&self, app: App) -> Result<String, OpError> {
        let _op = self.ops.lock().await;
        let to = app.instances;
        self.app.store(Arc::new(app));
        let result = self.scale_locked(to).await;
        self.sync_triggers();
        result
    }

    /// Zero-downtime replacement of the targeted workers, `reload_batch` at a time: start the
    /// replacement, wait until it is ready, swap it into the pool, then drain and stop the old
    /// one. With `new`, the app's configuration changes first (and its worker count after).
    /// A replacement that never becomes ready is stopped, the old worker keeps serving, the
    /// previous configuration is restored, and the reload fails with the reason.
    pub async fn reload(&self, new: Option<App>, target: Target) -> Result<String, OpError> {
        self.reload_reporting(new, target, &|_| {}).await
    }

    /// [`reload`](Self::reload), telling `progress` after each batch how far it is and what is
    /// draining ("web: 1/4 ready, draining worker 3 (2 live connections, up to 30s)"), so a user
    /// waiting on a long drain sees why.
    pub async fn reload_reporting(
        &self,
        new: Option<App>,
        target: Target,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<String, OpError> {
        let _op = self.ops.lock().await;
        let cause = (RestartReason::Reload, "reload".to_owned());
        let result = self.reload_locked(new, target, cause, progress).await;
        // A new configuration may watch other paths, or none.
        self.sync_triggers();
        result
    }

    /// A reload asked for by the app's own `watch` or `cron_restart` (see `triggers.rs`),
    /// counted as `reason`. `None` when they were disarmed while it waited for another
    /// operation (the app was stopped or deleted): nothing is reloaded then.
    pub(crate) async fn reload_for(
        &self,
        reason: RestartReason,
        why: String,
        armed: &tokio_util::sync::CancellationToken,
    ) -> Option<Result<String, OpError>> {
        let _op = self.ops.lock().await;
        if armed.is_cancelled() {
            return None;
        }
        Some(
            self.reload_locked(None, Target::All, (reason, why), &|_| {})
                .await,
        )
    }

    /// What `watch` and `cron_restart` are doing, for `show`.
    pub fn triggers(&self) -> TriggerStatus {
        let app = self.app();
        lock(&self.triggers).status(&app)
    }

    /// Arms the triggers while some worker is not stopped (and the app was not shut down),
    /// disarms them otherwise, re-arms them when their configuration changed.
    fn sync_triggers(&self) {
        let app = self.app();
        let running = !self.shut.load(Ordering::SeqCst) && {
            let slots = self.slots();
            slots.is_empty() || slots.iter().any(|s| s.state() != WorkerState::Stopped)
        };
        let logs = self
            .log_paths()
            .into_iter()
            .flat_map(|(_, p)| [p.out, p.err])
            .collect();
        let ctx = crate::triggers::Context {
            sup: self.me.clone(),
            running,
            home: self.env.home.clone(),
            logs,
        };
        lock(&self.triggers).sync(&app, ctx);
    }

    /// `max_memory_restart`: replaces worker `id` the way [`reload`](Self::reload) does, counted
    /// as a `memory` restart with `why` as its cause. Returns `Ok(false)` when the worker is no
    /// longer there or no longer ready (someone else replaced or stopped it meanwhile).
    pub async fn replace_for_memory(&self, id: u32, why: String) -> Result<bool, OpError> {
        let _op = self.ops.lock().await;
        let ready = self
            .slots()
            .iter()
            .any(|s| s.id == id && s.state() == WorkerState::Ready);
        if !ready {
            return Ok(false);
        }
        let cause = (RestartReason::Memory, format!("memory: {why}"));
        self.reload_locked(None, Target::Worker(id), cause, &|_| {})
            .await
            .map(|_| true)
    }

    async fn reload_locked(
        &self,
        new: Option<App>,
        target: Target,
        (reason, why): (RestartReason, String),
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<String, OpError> {
        let previous = self.app();
        if let Some(new) = new {
            self.app.store(Arc::new(new));
        }
        let app = self.app();
        // `reload all` (or of the app) leaves workers someone stopped stopped, as PM2 does;
        // only a worker named by its id is reloaded whatever its state.
        let stopped = |s: &Slot| s.status.borrow().state == WorkerState::Stopped;
        let (chosen, left_stopped): (Vec<_>, Vec<_>) = self
            .slots()
            .iter()
            .filter(|s| target.matches(s.id))
            .map(|s| (s.id, s.instance, s.restarts(), s.finished(), stopped(s)))
            .partition(|c| target != Target::All || !c.4);
        let chosen: Vec<(u32, u32, RestartCounts, bool)> = chosen
            .into_iter()
            .map(|(id, instance, restarts, finished, _)| (id, instance, restarts, finished))
            .collect();
        if let Target::Worker(id) = target
            && chosen.is_empty()
        {
            return Err(self.no_such_worker(id));
        }
        // Each batch's old workers drain in the background while the next batch starts, and
        // are listed by `statuses` meanwhile; the reload waits for all of them at the end.
        let mut draining: Vec<Retiring> = Vec::new();
        let mut replaced = 0;
        for batch in chosen.chunks(app.reload_batch.max(1) as usize) {
            let fresh: Vec<Slot> = batch
                .iter()
                .map(|&(id, instance, restarts, finished)| {
                    // A worker that is not running has nothing to protect: no probation.
                    let restarts = restarts.with(reason);
                    self.spawn_slot(Some(id), instance, restarts, Some(why.clone()), !finished)
                })
                .collect();
            let outcomes =
                futures_join(fresh.iter().map(|s| first_outcome(s.status.clone()))).await;
            let mut failures = Vec::new();
            let mut old = Vec::new();
            for (slot, outcome) in fresh.into_iter().zip(outcomes) {
                match outcome {
                    Ok(()) => {
                        replaced += 1;
                        old.extend(self.swap_slot(slot));
                    }
                    Err(why) => {
                        failures.push(why);
                        slot.stop().await;
                    }
                }
            }
            if !old.is_empty() {
                progress(draining_line(&app, replaced, chosen.len(), &old));
            }
            draining.push(self.start_retiring(old));
            if !failures.is_empty() {
                for batch in draining {
                    self.finish_retiring(batch).await;
                }
                self.app.store(previous);
                tracing::warn!(app = %app.name, "reload failed; the old workers keep serving");
                return Err(OpError::NotReady(failures));
            }
        }
        for batch in draining {
            self.finish_retiring(batch).await;
        }
        if target == Target::All && self.slots().len() as u32 != app.instances {
            self.scale_locked(app.instances).await?;
        }
        let mut message = format!("reloaded {replaced} worker(s) of {}", app.name);
        if !left_stopped.is_empty() {
            message += &format!(" ({} stopped, left stopped)", left_stopped.len());
        }
        Ok(message)
    }

    /// Drains and stops the targeted workers; they stay listed as `stopped`.
    pub async fn stop(&self, target: Target) -> Result<String, OpError> {
        let _op = self.ops.lock().await;
        self.stop_locked(target).await
    }

    async fn stop_locked(&self, target: Target) -> Result<String, OpError> {
        let watches: Vec<_> = {
            let slots = self.slots();
            let chosen: Vec<_> = slots.iter().filter(|s| target.matches(s.id)).collect();
            if let Target::Worker(id) = target
                && chosen.is_empty()
            {
                return Err(self.no_such_worker(id));
            }
            for slot in &chosen {
                slot.request_stop();
            }
            chosen.iter().map(|s| s.status.clone()).collect()
        };
        let stopped = watches.len();
        for mut status in watches {
            let _ = status.wait_for(|s| s.state.is_down()).await.map(|_| ());
        }
        // Every worker stopped: so is watching and the schedule, until `start`.
        self.sync_triggers();
        Ok(format!(
            "stopped {} worker(s) of {}",
            stopped,
            self.app().name
        ))
    }

    /// Starts stopped or errored workers again (running ones are left alone).
    pub async fn start_stopped(&self, target: Target) -> Result<String, OpError> {
        let _op = self.ops.lock().await;
        self.start_locked(target, false).await
    }

    async fn start_locked(&self, target: Target, count_restart: bool) -> Result<String, OpError> {
        let chosen: Vec<(u32, u32, RestartCounts)> = self
            .slots()
            .iter()
            .filter(|s| target.matches(s.id) && s.finished())
            .map(|s| (s.id, s.instance, s.restarts()))
            .collect();
        if let Target::Worker(id) = target
            && !self.has_worker(id)
        {
            return Err(self.no_such_worker(id));
        }
        let mut watches = Vec::new();
        for (id, instance, restarts) in &chosen {
            let (restarts, why) = if count_restart {
                (
                    restarts.with(RestartReason::Restart),
                    Some("restart".to_owned()),
                )
            } else {
                (*restarts, None)
            };
            let slot = self.spawn_slot(Some(*id), *instance, restarts, why, false);
            watches.push(slot.status.clone());
            if let Some(old) = self.swap_slot(slot) {
                old.stop().await;
            }
        }
        self.sync_triggers();
        first_outcomes(watches).await?;
        Ok(format!(
            "started {} worker(s) of {}",
            chosen.len(),
            self.app().name
        ))
    }

    /// Stop, then start (connections to the stopped workers may be refused meanwhile, as in
    /// PM2; `reload` is the zero-downtime way).
    pub async fn restart(&self, target: Target) -> Result<String, OpError> {
        let _op = self.ops.lock().await;
        self.stop_locked(target).await?;
        self.start_locked(target, true).await?;
        Ok(match target {
            Target::Worker(id) => format!("restarted worker {id} of {}", self.app().name),
            Target::All => format!("restarted {}", self.app().name),
        })
    }

    /// Sets the targeted workers' restart counts back to zero.
    pub fn reset(&self, target: Target) -> Result<String, OpError> {
        let slots = self.slots();
        let chosen: Vec<&Slot> = slots.iter().filter(|s| target.matches(s.id)).collect();
        if let Target::Worker(id) = target
            && chosen.is_empty()
        {
            return Err(self.no_such_worker(id));
        }
        chosen.iter().for_each(|s| s.reset_restarts());
        Ok(format!(
            "reset the restart count of {} worker(s) of {}",
            chosen.len(),
            self.app().name
        ))
    }

    /// Sends `signal` to the process of each targeted worker that is running (not its group:
    /// as PM2's `sendSignal`, the worker decides what its children get).
    pub fn signal(&self, target: Target, signal: Signal) -> Result<String, OpError> {
        let slots = self.slots();
        let chosen: Vec<&Slot> = slots.iter().filter(|s| target.matches(s.id)).collect();
        if let Target::Worker(id) = target
            && chosen.is_empty()
        {
            return Err(self.no_such_worker(id));
        }
        let mut sent = 0;
        for slot in chosen {
            let Some(pid) = slot.status.borrow().pid else {
                continue;
            };
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            if nix::sys::signal::kill(pid, signal).is_ok() {
                sent += 1;
            }
        }
        Ok(format!(
            "sent {} to {sent} worker(s) of {}",
            signal.as_str(),
            self.app().name
        ))
    }

    /// Drains, stops and forgets one worker.
    pub async fn remove_worker(&self, id: u32) -> Result<String, OpError> {
        let _op = self.ops.lock().await;
        let victims: Vec<Slot> = {
            let mut slots = self.slots();
            let (victims, kept) = std::mem::take(&mut *slots)
                .into_iter()
                .partition(|s| s.id == id);
            *slots = kept;
            victims
        };
        if victims.is_empty() {
            return Err(self.no_such_worker(id));
        }
        // Sticky, like a scale down by one: a later reload or rescale must not bring it back.
        let mut app = App::clone(&self.app());
        app.instances = app.instances.saturating_sub(1);
        app.instances_spec = balancer_config::Instances::Count(app.instances);
        self.app.store(Arc::new(app));
        self.retire(victims).await;
        Ok(format!("deleted worker {id} of {}", self.app().name))
    }

    /// Drains and stops every worker (concurrently), then returns.
    pub async fn shutdown(&self) {
        let _op = self.ops.lock().await;
        self.shut.store(true, Ordering::SeqCst);
        self.sync_triggers();
        let slots = std::mem::take(&mut *self.slots());
        self.retire(slots).await;
    }

    fn no_such_worker(&self, id: u32) -> OpError {
        OpError::NoSuchWorker {
            app: self.app().name.clone(),
            id,
        }
    }

    /// The app's slots (for reading and for changing the list).
    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts `slot` in place of the slot with the same id (returned), or appends it.
    fn swap_slot(&self, slot: Slot) -> Option<Slot> {
        let mut slots = self.slots();
        match slots.iter_mut().find(|s| s.id == slot.id) {
            Some(existing) => Some(std::mem::replace(existing, slot)),
            None => {
                slots.push(slot);
                None
            }
        }
    }

    /// Drains and stops `slots` side by side; they stay visible to `ls` until stopped.
    async fn retire(&self, slots: Vec<Slot>) {
        let retiring = self.start_retiring(slots);
        self.finish_retiring(retiring).await;
    }

    /// Starts draining and stopping `slots` in the background, listed by
    /// [`statuses`](Self::statuses) until [`finish_retiring`](Self::finish_retiring).
    fn start_retiring(&self, slots: Vec<Slot>) -> Retiring {
        let watches: Vec<_> = slots.iter().map(|s| s.status.clone()).collect();
        self.retiring().extend(watches.iter().cloned());
        Retiring {
            watches,
            stops: slots.into_iter().map(|s| tokio::spawn(s.stop())).collect(),
        }
    }

    /// Waits until every slot of `retiring` has stopped, then stops listing them.
    async fn finish_retiring(&self, retiring: Retiring) {
        for stop in retiring.stops {
            if let Err(e) = stop.await
                && e.is_panic()
            {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        self.retiring()
            .retain(|rx| !retiring.watches.iter().any(|w| w.same_channel(rx)));
    }

    fn retiring(&self) -> std::sync::MutexGuard<'_, Vec<watch::Receiver<WorkerStatus>>> {
        self.retiring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The app's reuseport socket groups (none under rr), for `upgrade`.
    pub fn groups(&self) -> Vec<Arc<Group>> {
        self.groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The socket groups of `app`'s listeners under the reuseport policy (none under rr),
    /// reusing the group of a listener the app already had.
    fn groups_for(&self, app: &App) -> Vec<Arc<Group>> {
        if app.policy != Policy::ReusePort {
            return Vec::new();
        }
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        app.listen
            .iter()
            .map(|l| {
                if let Some(g) = groups
                    .iter()
                    .find(|g| g.listener().addr == l.addr && g.listener().proto == l.proto)
                {
                    return Arc::clone(g);
                }
                let g = Group::new(l.clone(), Arc::clone(&self.env.rescue));
                let mut adopted = self.env.adopted.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(pos) = adopted.iter().position(|(addr, _)| *addr == l.addr)
                    && l.proto != balancer_config::Proto::Udp
                {
                    g.adopt(adopted.remove(pos).1);
                }
                groups.push(Arc::clone(&g));
                g
            })
            .collect()
    }

    /// Creates a slot (a new id unless `id` is given) running the app's current configuration.
    fn spawn_slot(
        &self,
        id: Option<u32>,
        instance: u32,
        restarts: RestartCounts,
        last_restart: Option<String>,
        probation: bool,
    ) -> Slot {
        let app = self.app();
        Slot::start(SlotSpec {
            id: id.unwrap_or_else(|| self.env.ids.fetch_add(1, Ordering::Relaxed)),
            instance,
            restarts,
            last_restart,
            sampler: Arc::clone(&self.env.sampler),
            probation,
            logs: LogPaths::for_app(&self.env.home, &app, instance),
            groups: self.groups_for(&app),
            shim: self.env.shim.clone(),
            notify_dir: self.env.home.join("notify"),
            learn: self.env.learn.get().cloned(),
            pool: Arc::clone(&self.pool),
            app,
        })
    }
}

/// `max_memory_restart`, enforced: after every sample round, each ready worker whose tree has
/// been over the app's limit for [`MEMORY_SAMPLES`] samples in a row is replaced as a reload
/// replaces it (the new one ready first, then the old one drained). A replacement that cannot
/// become ready leaves the old worker serving, with a warning, and the count starts again: the
/// next attempt comes `MEMORY_SAMPLES` samples later, not at every tick. Ends with the app.
async fn guard_memory(sup: std::sync::Weak<AppSupervisor>, mut ticks: watch::Receiver<u64>) {
    while ticks.changed().await.is_ok() {
        let Some(sup) = sup.upgrade() else { return };
        let Some(limit) = sup.app().max_memory_restart else {
            continue;
        };
        let over: Vec<(u32, u64, Arc<crate::stats::Usage>)> = sup
            .slots()
            .iter()
            .filter(|s| s.state() == WorkerState::Ready)
            .filter_map(|s| s.usage().map(|u| (s.id, u)))
            .filter_map(|(id, u)| {
                let snap = u.snapshot()?;
                (snap.over_limit >= MEMORY_SAMPLES).then_some((id, snap.memory, u))
            })
            .collect();
        for (id, memory, usage) in over {
            let name = sup.app().name.clone();
            let why = format!(
                "tree RSS {} over max_memory_restart {} for {MEMORY_SAMPLES} samples",
                mib(memory),
                mib(limit)
            );
            tracing::warn!(app = %name, id, "worker {why}: replacing it");
            match sup.replace_for_memory(id, why).await {
                Ok(true) => tracing::info!(app = %name, id, "worker replaced (memory)"),
                Ok(false) => {}
                Err(e) => {
                    usage.reset_over_limit();
                    tracing::warn!(
                        app = %name, id,
                        "memory replacement failed, the old worker keeps serving: {e}"
                    );
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bytes as MiB with one decimal, for messages.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// "web: 1/4 ready, draining worker 3 (2 live connections, up to 30s)".
fn draining_line(app: &App, ready: usize, total: usize, old: &[Slot]) -> String {
    let ids: Vec<String> = old.iter().map(|s| s.id.to_string()).collect();
    let live: usize = old
        .iter()
        .map(|s| s.status.borrow().live_connections())
        .sum();
    let plural = |n: usize, one: &str, many: &str| {
        if n == 1 {
            one.to_owned()
        } else {
            many.to_owned()
        }
    };
    format!(
        "{}: {ready}/{total} ready, draining {} {} ({live} live {}, up to {:?})",
        app.name,
        plural(ids.len(), "worker", "workers"),
        ids.join(", "),
        plural(live, "connection", "connections"),
        app.drain_timeout
    )
}

/// Resolves once the worker is ready (`Ok`) or its first start failed (`Err` with why).
async fn first_outcome(mut status: watch::Receiver<WorkerStatus>) -> Result<(), NotReady> {
    let id = status.borrow().id;
    let outcome = status
        .wait_for(|s| {
            matches!(
                s.state,
                WorkerState::Ready
                    | WorkerState::WaitingRestart
                    | WorkerState::Errored
                    | WorkerState::Stopped
            )
        })
        .await
        .map(|s| (s.state, s.reason.clone()));
    match outcome {
        Ok((WorkerState::Ready, _)) => Ok(()),
        Ok((state, reason)) => Err(NotReady {
            id,
            state: Some(state),
            reason,
        }),
        Err(_) => Err(NotReady {
            id,
            state: None,
            reason: None,
        }),
    }
}

async fn first_outcomes(watches: Vec<watch::Receiver<WorkerStatus>>) -> Result<(), OpError> {
    let failures: Vec<NotReady> = futures_join(watches.into_iter().map(first_outcome))
        .await
        .into_iter()
        .filter_map(Result::err)
        .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(OpError::NotReady(failures))
    }
}

/// Runs futures side by side (as tasks) and returns their outputs in order.
async fn futures_join<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let tasks: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(tasks.len());
    for task in tasks {
        match task.await {
            Ok(output) => outputs.push(output),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    outputs
}

#[cfg(test)]
mod tests {
    //! Real (tiny) worker processes: `sleep` for apps without listeners (ready once spawned), a
    //! shell + Python TCP server for one that must be probed. Every test ends with `shutdown`
    //! and is bounded by [`BOUND`]; no assertion depends on how fast the machine is.

    use std::path::Path;
    use std::time::Duration;

    use balancer_config::LoadOptions;

    use super::*;

    const BOUND: Duration = Duration::from_secs(60);

    /// The first app of `toml`, as if read from a balancer.toml in `dir`.
    fn app(dir: &Path, toml: &str) -> App {
        let opts = LoadOptions {
            env: None,
            default_policy: Policy::default(),
            cpus: 2,
        };
        let config = balancer_config::parse(toml, &dir.join("balancer.toml"), &opts)
            .unwrap_or_else(|e| panic!("{e}"));
        config.apps.into_iter().next().expect("one app")
    }

    fn sleeper(dir: &Path, instances: u32) -> App {
        app(
            dir,
            &format!("[[app]]\nname = \"t\"\ncommand = \"sleep 1000\"\ninstances = {instances}\n"),
        )
    }

    fn context(home: &Path) -> Arc<SpawnContext> {
        SpawnContext::new(home.into(), None, Arc::new(|_, _| {}))
    }

    fn states(sup: &AppSupervisor) -> Vec<(u32, WorkerState)> {
        sup.statuses().iter().map(|s| (s.id, s.state)).collect()
    }

    fn pids(sup: &AppSupervisor) -> Vec<u32> {
        sup.statuses().iter().filter_map(|s| s.pid).collect()
    }

    async fn bounded<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(BOUND, f).await.expect("bounded")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scale_up_joins_when_ready_and_scale_down_drops_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let sup = AppSupervisor::start(sleeper(dir.path(), 1), context(dir.path()));
        bounded(async {
            sup.wait_started().await.unwrap();
            let first = sup.statuses()[0].id;
            let msg = sup.scale(3).await.unwrap();
            assert_eq!(msg, "scaled t from 1 to 3: all ready");
            assert!(states(&sup).iter().all(|(_, s)| *s == WorkerState::Ready));
            assert_eq!((sup.worker_count(), sup.pool().len()), (3, 3));
            assert_eq!(sup.app().instances, 3, "the count is part of the config");
            let instances: Vec<u32> = sup.statuses().iter().map(|s| s.instance).collect();
            assert_eq!(instances, [0, 1, 2]);

            let msg = sup.scale(1).await.unwrap();
            assert_eq!(msg, "scaled t from 3 down to 1");
            assert_eq!(states(&sup), [(first, WorkerState::Ready)], "oldest kept");
            assert_eq!(sup.pool().len(), 1);
            assert_eq!(sup.scale(1).await.unwrap(), "t already has 1 workers");

            sup.shutdown().await;
            assert!(sup.statuses().is_empty());
            assert!(sup.pool().is_empty());
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_start_and_restart_keep_the_slot() {
        let dir = tempfile::tempdir().unwrap();
        let sup = AppSupervisor::start(sleeper(dir.path(), 2), context(dir.path()));
        bounded(async {
            sup.wait_started().await.unwrap();
            let (a, b) = (sup.statuses()[0].id, sup.statuses()[1].id);
            let before = pids(&sup);

            assert_eq!(
                sup.stop(Target::Worker(a)).await.unwrap(),
                "stopped 1 worker(s) of t"
            );
            assert_eq!(
                states(&sup),
                [(a, WorkerState::Stopped), (b, WorkerState::Ready)]
            );
            assert_eq!(sup.statuses()[0].pid, None);
            assert_eq!(sup.pool().len(), 1);
            let err = sup.stop(Target::Worker(999)).await.unwrap_err();
            assert_eq!(err.to_string(), "app t has no worker 999");

            assert_eq!(
                sup.start_stopped(Target::All).await.unwrap(),
                "started 1 worker(s) of t",
                "running workers are left alone"
            );
            assert!(states(&sup).iter().all(|(_, s)| *s == WorkerState::Ready));
            assert_eq!(sup.statuses()[1].pid, Some(before[1]));
            assert_ne!(sup.statuses()[0].pid, Some(before[0]));

            let before = pids(&sup);
            assert_eq!(sup.restart(Target::All).await.unwrap(), "restarted t");
            let after = sup.statuses();
            assert_eq!(after.iter().map(|s| s.id).collect::<Vec<_>>(), [a, b]);
            assert!(after.iter().all(|s| s.state == WorkerState::Ready));
            assert!(after.iter().all(|s| s.restarts == 1), "{after:?}");
            assert!(after.iter().all(|s| !before.contains(&s.pid.unwrap())));

            sup.shutdown().await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn remove_worker_forgets_one_slot() {
        let dir = tempfile::tempdir().unwrap();
        let sup = AppSupervisor::start(sleeper(dir.path(), 2), context(dir.path()));
        bounded(async {
            sup.wait_started().await.unwrap();
            let id = sup.statuses()[1].id;
            assert!(sup.has_worker(id));
            assert_eq!(
                sup.remove_worker(id).await.unwrap(),
                format!("deleted worker {id} of t")
            );
            assert!(!sup.has_worker(id));
            assert_eq!((sup.worker_count(), sup.pool().len()), (1, 1));
            let err = sup.remove_worker(id).await.unwrap_err();
            assert_eq!(
                err,
                OpError::NoSuchWorker {
                    app: "t".into(),
                    id
                }
            );
            sup.shutdown().await;
            assert_eq!(sup.worker_count(), 0);
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reload_replaces_every_worker_and_keeps_ids() {
        let dir = tempfile::tempdir().unwrap();
        let sup = AppSupervisor::start(sleeper(dir.path(), 2), context(dir.path()));
        bounded(async {
            sup.wait_started().await.unwrap();
            let ids: Vec<u32> = sup.statuses().iter().map(|s| s.id).collect();
            let before = pids(&sup);
            let msg = sup.reload(None, Target::All).await.unwrap();
            assert_eq!(msg, "reloaded 2 worker(s) of t");
            let after = sup.statuses();
            assert_eq!(after.iter().map(|s| s.id).collect::<Vec<_>>(), ids);
            assert!(
                after
                    .iter()
                    .all(|s| s.state == WorkerState::Ready && s.restarts == 1)
            );
            assert!(after.iter().all(|s| !before.contains(&s.pid.unwrap())));
            assert_eq!(sup.pool().len(), 2);
            sup.shutdown().await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_reload_keeps_the_old_workers_and_the_old_config() {
        let dir = tempfile::tempdir().unwrap();
        let sup = AppSupervisor::start(sleeper(dir.path(), 2), context(dir.path()));
        bounded(async {
            sup.wait_started().await.unwrap();
            let before = pids(&sup);
            let first = sup.statuses()[0].id;
            // With a listener to probe, so it cannot pass as "ready once spawned" before its exit
            // is seen.
            let broken = app(
                dir.path(),
                "[[app]]\nname = \"t\"\ncommand = \"false\"\ninstances = 2\n\
                 listen = [\"tcp://127.0.0.1:1\"]\n",
            );
            let err = sup.reload(Some(broken), Target::All).await.unwrap_err();
            let OpError::NotReady(failures) = &err else {
                panic!("{err:?}")
            };
            assert_eq!(failures.len(), 1, "the reload stops at the first batch");
            assert_eq!(failures[0].id, first);
            assert_eq!(failures[0].state, Some(WorkerState::Errored));
            assert_eq!(
                err.to_string(),
                format!(
                    "worker {first} errored: replacement never became ready: exited with exit code 1"
                )
            );
            assert_eq!(pids(&sup), before, "the old workers keep serving");
            assert!(sup.app().program.ends_with("sleep"), "config restored");
            sup.shutdown().await;
        })
        .await;
    }

    /// LIFECYCLE.md, reload step 4: a batch's old workers drain while the next batch starts,
    /// and `statuses` lists them meanwhile; the reload returns once every drain is over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reload_drains_each_batch_while_the_next_one_starts() {
        let dir = tempfile::tempdir().unwrap();
        // Takes a second to listen (so a batch's start is visible) and ignores SIGTERM (so
        // its stop lasts kill_timeout).
        let script = dir.path().join("worker.sh");
        std::fs::write(
            &script,
            "trap '' TERM\nsleep 1\nexec python3 -c '\nimport os, socket\n\
             s = socket.socket()\ns.bind((\"127.0.0.1\", int(os.environ[\"PORT\"])))\ns.listen(16)\n\
             while True: s.accept()[0].close()\n'\n",
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let toml = format!(
            "[[app]]\nname = \"t\"\ncommand = [\"sh\", {:?}]\ninstances = 2\nreload_batch = 1\n\
             listen = [\"tcp://127.0.0.1:{port}\"]\nkill_timeout = \"2s\"\nlisten_timeout = \"30s\"\n",
            script.display().to_string()
        );
        let sup = AppSupervisor::start(app(dir.path(), &toml), context(dir.path()));
        bounded(async {
            sup.wait_started().await.unwrap();
            let before = pids(&sup);
            let reload = tokio::spawn({
                let sup = Arc::clone(&sup);
                async move { sup.reload(None, Target::All).await }
            });
            let mut overlapped = false;
            while !reload.is_finished() {
                let now = sup.statuses();
                let leaving = now
                    .iter()
                    .any(|s| matches!(s.state, WorkerState::Draining | WorkerState::Stopping));
                // A worker of the next batch still serving from before the reload: its
                // replacement has yet to start or is starting (it is listed once swapped in).
                let unreplaced = now.iter().any(|s| {
                    s.state == WorkerState::Ready && s.pid.is_some_and(|p| before.contains(&p))
                });
                overlapped |= leaving && unreplaced;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(reload.await.unwrap().unwrap(), "reloaded 2 worker(s) of t");
            assert!(
                overlapped,
                "a replaced worker is listed as draining/stopping while the next batch starts"
            );
            let after = sup.statuses();
            assert_eq!(after.len(), 2, "every drain is over: {after:?}");
            assert!(after.iter().all(|s| s.state == WorkerState::Ready));
            assert!(after.iter().all(|s| !before.contains(&s.pid.unwrap())));
            sup.shutdown().await;
        })
        .await;
    }

    /// `triggers.rs`: armed while the app runs, disarmed by `stop` and `shutdown`, armed again
    /// by `start`; a change under the watched cwd reloads every worker, counted as `watch`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn triggers_follow_the_app_and_a_change_reloads_it() {
        let dir = tempfile::tempdir().unwrap();
        let toml = "[[app]]\nname = \"t\"\ncommand = \"sleep 1000\"\ninstances = 2\n\
                    watch = true\nwatch_delay = \"50ms\"\ncron_restart = \"0 3 * * *\"\n";
        // The home is elsewhere: only the test's own write is in the watched cwd.
        let home = tempfile::tempdir().unwrap();
        let sup = AppSupervisor::start(app(dir.path(), toml), context(home.path()));
        bounded(async {
            sup.wait_started().await.unwrap();
            let t = sup.triggers();
            assert!(t.armed);
            assert!(t.cron.as_ref().unwrap().next.is_some(), "{t:?}");
            // Until the tree is walked the report is not there; then the write counts.
            while sup.triggers().watch.unwrap().report.is_none() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let before = pids(&sup);
            std::fs::write(dir.path().join("app.js"), "changed").unwrap();
            loop {
                let now = sup.statuses();
                if now.len() == 2
                    && now
                        .iter()
                        .all(|s| s.restarts_by.watch == 1 && s.state == WorkerState::Ready)
                {
                    assert!(now.iter().all(|s| !before.contains(&s.pid.unwrap())));
                    assert_eq!(
                        now[0].last_restart.as_deref(),
                        Some("watch: app.js changed")
                    );
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }

            sup.stop(Target::All).await.unwrap();
            let t = sup.triggers();
            assert!(
                !t.armed && t.cron.unwrap().next.is_none(),
                "stopped: disarmed"
            );
            sup.start_stopped(Target::All).await.unwrap();
            assert!(sup.triggers().armed, "started: armed again");
            // A new configuration without the keys disarms; with other ones, re-arms.
            let plain = "[[app]]\nname = \"t\"\ncommand = \"sleep 1000\"\ninstances = 2\n";
            sup.reload(Some(app(dir.path(), plain)), Target::All)
                .await
                .unwrap();
            let t = sup.triggers();
            assert!(!t.armed && t.watch.is_none() && t.cron.is_none(), "{t:?}");
            let cron = format!("{plain}cron_restart = \"@daily\"\n");
            sup.reload(Some(app(dir.path(), &cron)), Target::All)
                .await
                .unwrap();
            let t = sup.triggers();
            assert!(t.armed && t.watch.is_none() && t.cron.is_some(), "{t:?}");
            sup.stop(Target::Worker(sup.statuses()[0].id))
                .await
                .unwrap();
            assert!(sup.triggers().armed, "one worker still runs");
            sup.shutdown().await;
            assert!(!sup.triggers().armed);
        })
        .await;
    }
}
