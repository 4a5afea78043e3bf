//! Supervision: one [`AppSupervisor`] per app, one slot task per worker.
//!
//! A slot is a worker identity (id, instance). Its task spawns the process, probes it until it is
//! ready, puts it in the app's [`Pool`], restarts it when it exits (with backoff, until it is
//! `errored`), and drains and stops it when asked. The states and transitions are written down
//! in `workers/LIFECYCLE.md`; keep the two in step.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use balancer_config::{App, Policy, Proto};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::sleep;

use crate::health::{Hysteresis, Transition, probe};
use crate::logs::LogPaths;
use crate::pool::{Pool, WorkerHandle};
use crate::process::{Exit, Process, SpawnSpec, private_port};
use crate::reuseport::{Group, MemberKey, Rescue, Takeover};

/// Backoff grows by this factor after each unstable exit…
const BACKOFF_FACTOR: f64 = 1.5;
/// …up to this delay…
const BACKOFF_CAP: Duration = Duration::from_secs(15);
/// …and starts over once a worker has stayed up this long.
const BACKOFF_RESET: Duration = Duration::from_secs(30);
/// Probe period while a worker is not ready yet, so readiness is noticed quickly.
const STARTING_PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// Where a worker is in its life. See `workers/LIFECYCLE.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Spawned, not yet ready: not in the pool.
    Starting,
    /// Passed its health check: in the pool.
    Ready,
    /// Was ready, then failed `fall` probes: out of the pool, still running, still probed.
    Unhealthy,
    /// Out of the pool, waiting for its live connections to finish.
    Draining,
    /// Sent `kill_signal`, waiting for it to exit.
    Stopping,
    /// Exited on its own; restarts after a delay.
    WaitingRestart,
    /// Stopped on purpose (or exited with `autorestart = false`).
    Stopped,
    /// Crash loop: left down until someone starts it again.
    Errored,
}

impl WorkerState {
    /// The name shown by `ls` and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Unhealthy => "unhealthy",
            WorkerState::Draining => "draining",
            WorkerState::Stopping => "stopping",
            WorkerState::WaitingRestart => "waiting-restart",
            WorkerState::Stopped => "stopped",
            WorkerState::Errored => "errored",
        }
    }
}

/// What `ls`/`show` know about a worker.
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    /// Stable id of the slot.
    pub id: u32,
    /// The app's name.
    pub app: String,
    /// `BALANCER_INSTANCE`.
    pub instance: u32,
    /// Current state.
    pub state: WorkerState,
    /// The running process, if any.
    pub pid: Option<u32>,
    /// Private addresses of the current incarnation.
    pub addrs: Vec<SocketAddr>,
    /// When the current incarnation was spawned.
    pub since: Option<SystemTime>,
    /// How many times the slot was restarted after an exit.
    pub restarts: u32,
    /// How the previous incarnation ended.
    pub last_exit: Option<Exit>,
    /// Why the worker is errored, unhealthy or was restarted, in words.
    pub reason: Option<String>,
    /// The data path's handle, for live-connection counts.
    pub handle: Option<Arc<WorkerHandle>>,
}

impl WorkerStatus {
    /// Connections currently proxied to this worker.
    pub fn live_connections(&self) -> usize {
        self.handle.as_ref().map_or(0, |h| h.live())
    }
}

/// What a slot is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Run,
    Stop,
}

/// Which workers of an app an operation touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Every worker.
    All,
    /// The worker with this id.
    Worker(u32),
}

impl Target {
    fn matches(self, id: u32) -> bool {
        match self {
            Target::All => true,
            Target::Worker(wanted) => wanted == id,
        }
    }
}

/// Why an operation on an app did not (entirely) succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// Workers that were started did not become ready; each entry says which and why.
    #[error("{}", .0.join("; "))]
    NotReady(Vec<String>),
    /// No worker of this app has that id.
    #[error("app {app} has no worker {id}")]
    NoSuchWorker {
        /// The app.
        app: String,
        /// The id asked for.
        id: u32,
    },
}

/// One worker identity and the task that runs it.
struct Slot {
    id: u32,
    instance: u32,
    status: watch::Receiver<WorkerStatus>,
    control: watch::Sender<Control>,
    task: JoinHandle<()>,
}

impl Slot {
    /// Whether its task has ended (stopped, errored, or autorestart off).
    fn finished(&self) -> bool {
        self.task.is_finished()
    }

    fn restarts(&self) -> u32 {
        self.status.borrow().restarts
    }

    async fn stop(self) {
        let _ = self.control.send(Control::Stop);
        if let Err(e) = self.task.await {
            tracing::error!(id = self.id, "worker task failed: {e}");
        }
    }
}

/// What every supervisor of a master shares.
pub struct SpawnContext {
    /// `$BALANCER_HOME`: logs go to `home/logs`.
    pub home: PathBuf,
    /// Hands out worker ids across all apps of the master.
    pub ids: AtomicU32,
    /// The `balancer` binary, run as `exec-shim` for reuseport workers.
    pub shim: PathBuf,
    /// Where connections rescued from leaving reuseport sockets go (the data plane).
    pub rescue: Rescue,
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
    pub fn new(home: PathBuf, shim: PathBuf, rescue: Rescue) -> Arc<Self> {
        Arc::new(SpawnContext {
            home,
            ids: AtomicU32::new(0),
            shim,
            rescue,
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
}

impl AppSupervisor {
    /// Starts `app.instances` workers (without waiting for them: see
    /// [`wait_started`](Self::wait_started)).
    pub fn start(app: App, env: Arc<SpawnContext>) -> Arc<Self> {
        let instances = app.instances;
        let sup = Arc::new(AppSupervisor {
            app: ArcSwap::from_pointee(app),
            env,
            pool: Arc::new(Pool::new()),
            groups: Mutex::new(Vec::new()),
            slots: Mutex::new(Vec::new()),
            retiring: Mutex::new(Vec::new()),
            ops: tokio::sync::Mutex::new(()),
        });
        let slots: Vec<Slot> = (0..instances)
            .map(|instance| sup.spawn_slot(None, instance, 0, false))
            .collect();
        sup.slots_mut().extend(slots);
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
        self.slots_mut().iter().any(|s| s.id == id)
    }

    /// Every worker's status, ordered by id (draining leftovers of a reload or scale-down too).
    pub fn statuses(&self) -> Vec<WorkerStatus> {
        let mut all: Vec<_> = self
            .slots_mut()
            .iter()
            .map(|s| s.status.borrow().clone())
            .collect();
        all.extend(self.retiring_mut().iter().map(|rx| rx.borrow().clone()));
        all.sort_by_key(|s| (s.id, s.state == WorkerState::Ready));
        all
    }

    /// The log files of each instance.
    pub fn log_paths(&self) -> Vec<(u32, LogPaths)> {
        let name = self.app().name.clone();
        let mut instances: Vec<u32> = self.slots_mut().iter().map(|s| s.instance).collect();
        instances.sort_unstable();
        instances.dedup();
        instances
            .into_iter()
            .map(|i| (i, LogPaths::new(&self.env.home, &name, i)))
            .collect()
    }

    /// Waits until every current worker has become ready or failed its first start.
    pub async fn wait_started(&self) -> Result<(), OpError> {
        let _op = self.ops.lock().await;
        let watches: Vec<_> = self.slots_mut().iter().map(|s| s.status.clone()).collect();
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
        let current = self.slots_mut().len() as u32;
        if to > current {
            let mut used: Vec<u32> = self.slots_mut().iter().map(|s| s.instance).collect();
            let mut watches = Vec::new();
            for _ in current..to {
                let instance = (0..).find(|i| !used.contains(i)).unwrap_or(0);
                used.push(instance);
                let slot = self.spawn_slot(None, instance, 0, false);
                watches.push(slot.status.clone());
                self.slots_mut().push(slot);
            }
            first_outcomes(watches).await?;
            Ok(format!("scaled {name} from {current} to {to}: all ready"))
        } else if to < current {
            let victims = {
                let mut slots = self.slots_mut();
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
        self.slots_mut().len() as u32
    }

    /// Takes a configuration that differs only in its worker count, and scales to it.
    pub async fn rescale(&self, app: App) -> Result<String, OpError> {
        let _op = self.ops.lock().await;
        let to = app.instances;
        self.app.store(Arc::new(app));
        self.scale_locked(to).await
    }

    /// Zero-downtime replacement of the targeted workers, `reload_batch` at a time: start the
    /// replacement, wait until it is ready, swap it into the pool, then drain and stop the old
    /// one. With `new`, the app's configuration changes first (and its worker count after).
    /// A replacement that never becomes ready is stopped, the old worker keeps serving, the
    /// previous configuration is restored, and the reload fails with the reason.
    pub async fn reload(&self, new: Option<App>, target: Target) -> Result<String, OpError> {
        let _op = self.ops.lock().await;
        let previous = self.app();
        if let Some(new) = new {
            self.app.store(Arc::new(new));
        }
        let app = self.app();
        let chosen: Vec<(u32, u32, u32, bool)> = self
            .slots_mut()
            .iter()
            .filter(|s| target.matches(s.id))
            .map(|s| (s.id, s.instance, s.restarts(), s.finished()))
            .collect();
        if let Target::Worker(id) = target
            && chosen.is_empty()
        {
            return Err(self.no_such_worker(id));
        }
        let mut draining = Vec::new();
        let mut replaced = 0;
        for batch in chosen.chunks(app.reload_batch.max(1) as usize) {
            let fresh: Vec<Slot> = batch
                .iter()
                .map(|&(id, instance, restarts, finished)| {
                    // A worker that is not running has nothing to protect: no probation.
                    self.spawn_slot(Some(id), instance, restarts + 1, !finished)
                })
                .collect();
            let outcomes =
                futures_join(fresh.iter().map(|s| first_outcome(s.status.clone()))).await;
            let mut failures = Vec::new();
            for (slot, outcome) in fresh.into_iter().zip(outcomes) {
                match outcome {
                    Ok(()) => {
                        replaced += 1;
                        if let Some(old) = self.swap_slot(slot) {
                            draining.push(old);
                        }
                    }
                    Err(why) => {
                        failures.push(why);
                        slot.stop().await;
                    }
                }
            }
            if !failures.is_empty() {
                self.app.store(previous);
                self.retire(draining).await;
                tracing::warn!(app = %app.name, "reload failed; the old workers keep serving");
                return Err(OpError::NotReady(failures));
            }
        }
        self.retire(draining).await;
        if target == Target::All && self.slots_mut().len() as u32 != app.instances {
            self.scale_locked(app.instances).await?;
        }
        Ok(format!("reloaded {replaced} worker(s) of {}", app.name))
    }

    /// Drains and stops the targeted workers; they stay listed as `stopped`.
    pub async fn stop(&self, target: Target) -> Result<String, OpError> {
        let _op = self.ops.lock().await;
        self.stop_locked(target).await
    }

    async fn stop_locked(&self, target: Target) -> Result<String, OpError> {
        let (controls, watches): (Vec<_>, Vec<_>) = {
            let slots = self.slots_mut();
            let chosen: Vec<_> = slots.iter().filter(|s| target.matches(s.id)).collect();
            if let Target::Worker(id) = target
                && chosen.is_empty()
            {
                return Err(self.no_such_worker(id));
            }
            chosen
                .iter()
                .map(|s| (s.control.clone(), s.status.clone()))
                .unzip()
        };
        for control in &controls {
            let _ = control.send(Control::Stop);
        }
        for mut status in watches {
            let _ = status.wait_for(|s| is_down(s.state)).await.map(|_| ());
        }
        Ok(format!(
            "stopped {} worker(s) of {}",
            controls.len(),
            self.app().name
        ))
    }

    /// Starts stopped or errored workers again (running ones are left alone).
    pub async fn start_stopped(&self, target: Target) -> Result<String, OpError> {
        let _op = self.ops.lock().await;
        self.start_locked(target, false).await
    }

    async fn start_locked(&self, target: Target, count_restart: bool) -> Result<String, OpError> {
        let chosen: Vec<(u32, u32, u32)> = self
            .slots_mut()
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
            let restarts = restarts + u32::from(count_restart);
            let slot = self.spawn_slot(Some(*id), *instance, restarts, false);
            watches.push(slot.status.clone());
            if let Some(old) = self.swap_slot(slot) {
                old.stop().await;
            }
        }
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
        Ok(format!("restarted {}", self.app().name))
    }

    /// Drains, stops and forgets one worker.
    pub async fn remove_worker(&self, id: u32) -> Result<String, OpError> {
        let _op = self.ops.lock().await;
        let victims: Vec<Slot> = {
            let mut slots = self.slots_mut();
            let (victims, kept) = std::mem::take(&mut *slots)
                .into_iter()
                .partition(|s| s.id == id);
            *slots = kept;
            victims
        };
        if victims.is_empty() {
            return Err(self.no_such_worker(id));
        }
        self.retire(victims).await;
        Ok(format!("deleted worker {id} of {}", self.app().name))
    }

    /// Drains and stops every worker (concurrently), then returns.
    pub async fn shutdown(&self) {
        let _op = self.ops.lock().await;
        let slots = std::mem::take(&mut *self.slots_mut());
        self.retire(slots).await;
    }

    fn no_such_worker(&self, id: u32) -> OpError {
        OpError::NoSuchWorker {
            app: self.app().name.clone(),
            id,
        }
    }

    fn slots_mut(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts `slot` in place of the slot with the same id (returned), or appends it.
    fn swap_slot(&self, slot: Slot) -> Option<Slot> {
        let mut slots = self.slots_mut();
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
        let watches: Vec<_> = slots.iter().map(|s| s.status.clone()).collect();
        self.retiring_mut().extend(watches.iter().cloned());
        futures_join(slots.into_iter().map(Slot::stop)).await;
        self.retiring_mut()
            .retain(|rx| !watches.iter().any(|w| w.same_channel(rx)));
    }

    fn retiring_mut(&self) -> std::sync::MutexGuard<'_, Vec<watch::Receiver<WorkerStatus>>> {
        self.retiring.lock().unwrap_or_else(|e| e.into_inner())
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
                groups.push(Arc::clone(&g));
                g
            })
            .collect()
    }

    fn spawn_slot(&self, id: Option<u32>, instance: u32, restarts: u32, probation: bool) -> Slot {
        let app = self.app();
        let id = id.unwrap_or_else(|| self.env.ids.fetch_add(1, Ordering::Relaxed));
        let initial = WorkerStatus {
            id,
            app: app.name.clone(),
            instance,
            state: WorkerState::Starting,
            pid: None,
            addrs: Vec::new(),
            since: None,
            restarts,
            last_exit: None,
            reason: None,
            handle: None,
        };
        let (status_tx, status) = watch::channel(initial);
        let (control, control_rx) = watch::channel(Control::Run);
        let worker = SlotTask {
            restart: RestartPolicy::new(&app),
            logs: LogPaths::new(&self.env.home, &app.name, instance),
            groups: self.groups_for(&app),
            members: Vec::new(),
            shim: self.env.shim.clone(),
            app,
            pool: Arc::clone(&self.pool),
            status: status_tx,
            control: control_rx,
            probation,
        };
        Slot {
            id,
            instance,
            status,
            control,
            task: tokio::spawn(worker.run()),
        }
    }
}

fn is_down(state: WorkerState) -> bool {
    matches!(state, WorkerState::Stopped | WorkerState::Errored)
}

/// Resolves once the worker is ready (`Ok`) or its first start failed (`Err` with why).
async fn first_outcome(mut status: watch::Receiver<WorkerStatus>) -> Result<(), String> {
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
        .map(|s| (s.state, s.id, s.reason.clone()));
    match outcome {
        Ok((WorkerState::Ready, _, _)) => Ok(()),
        Ok((state, id, reason)) => Err(format!(
            "worker {id} {}: {}",
            state.as_str(),
            reason.unwrap_or_else(|| "no reason given".into())
        )),
        Err(_) => Err("worker task ended".into()),
    }
}

async fn first_outcomes(watches: Vec<watch::Receiver<WorkerStatus>>) -> Result<(), OpError> {
    let failures: Vec<String> = futures_join(watches.into_iter().map(first_outcome))
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

/// How one incarnation ended, as far as the slot loop cares.
enum Outcome {
    /// The process exited by itself.
    Exited(Exit),
    /// It never passed its health check within `listen_timeout`; it has been stopped.
    NeverReady(String),
    /// A stop was requested; the worker has been drained and stopped.
    Stopped,
}

struct SlotTask {
    /// A reload's replacement: if its first process never becomes ready, give up at once
    /// (the old worker is still serving) instead of entering the restart loop.
    probation: bool,
    app: Arc<App>,
    pool: Arc<Pool>,
    logs: LogPaths,
    status: watch::Sender<WorkerStatus>,
    control: watch::Receiver<Control>,
    restart: RestartPolicy,
    /// Reuseport policy: the groups of the app's listeners (empty under rr)…
    groups: Vec<Arc<Group>>,
    /// …and the current incarnation's socket in each.
    members: Vec<(Arc<Group>, MemberKey)>,
    /// This binary, for `exec-shim`.
    shim: PathBuf,
}

impl SlotTask {
    async fn run(mut self) {
        loop {
            if self.stop_requested() {
                self.set(|s| s.state = WorkerState::Stopped);
                return;
            }
            let (outcome, uptime) = match self.spawn() {
                Ok((process, handle)) => {
                    let started = process.started();
                    let outcome = self.supervise(process, &handle).await;
                    self.pool.remove(&handle);
                    handle.mark_gone();
                    // In the background: a replacement may be what takes the queued connections.
                    for (group, key) in std::mem::take(&mut self.members) {
                        tokio::spawn(async move { group.leave(key, None).await });
                    }
                    (outcome, started.elapsed())
                }
                Err(reason) => (Outcome::NeverReady(reason), Duration::ZERO),
            };
            let (exit, reason, uptime) = match outcome {
                Outcome::Stopped => return,
                Outcome::Exited(exit) => (Some(exit), format!("exited with {exit}"), uptime),
                // Never ready is never stable, however long it ran.
                Outcome::NeverReady(reason) => (None, reason, Duration::ZERO),
            };
            let app = &self.app;
            if self.probation {
                let why = format!("replacement never became ready: {reason}");
                tracing::warn!(app = %app.name, id = self.id(), "{why}");
                self.set(|s| {
                    s.state = WorkerState::Errored;
                    s.pid = None;
                    s.handle = None;
                    s.last_exit = exit.or(s.last_exit);
                    s.reason = Some(why);
                });
                return;
            }
            let Some(delay) = self.restart.after_exit(uptime) else {
                let why = if app.autorestart {
                    format!(
                        "{} unstable exits in a row (each under min_uptime {:?} or never ready); last: {reason}",
                        self.restart.unstable, app.min_uptime
                    )
                } else {
                    format!("{reason}; autorestart is off")
                };
                let state = if app.autorestart {
                    WorkerState::Errored
                } else {
                    WorkerState::Stopped
                };
                tracing::warn!(app = %app.name, id = self.id(), "worker {}: {why}", state.as_str());
                self.set(|s| {
                    s.state = state;
                    s.pid = None;
                    s.handle = None;
                    s.last_exit = exit.or(s.last_exit);
                    s.reason = Some(why);
                });
                return;
            };
            tracing::info!(app = %app.name, id = self.id(), ?delay, "worker {reason}; restarting");
            self.set(|s| {
                s.state = WorkerState::WaitingRestart;
                s.pid = None;
                s.handle = None;
                s.last_exit = exit.or(s.last_exit);
                s.reason = Some(reason);
                s.restarts += 1;
            });
            tokio::select! {
                _ = sleep(delay) => {}
                _ = stop_requested(&mut self.control) => {}
            }
        }
    }

    fn id(&self) -> u32 {
        self.status.borrow().id
    }

    fn stop_requested(&self) -> bool {
        *self.control.borrow() == Control::Stop
    }

    fn set(&self, change: impl FnOnce(&mut WorkerStatus)) {
        self.status.send_modify(change);
    }

    /// Reserves private ports (rr) or sockets in the groups (reuseport) and starts one
    /// incarnation.
    fn spawn(&mut self) -> Result<(Process, Arc<WorkerHandle>), String> {
        let (addrs, sockets) = if self.groups.is_empty() {
            let addrs = self
                .app
                .listen
                .iter()
                .map(|l| private_port(l.proto).map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p))))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("cannot reserve a private port: {e}"))?;
            (addrs, Vec::new())
        } else {
            let mut sockets = Vec::new();
            for group in &self.groups {
                match group.join() {
                    Ok((key, fd)) => {
                        self.members.push((Arc::clone(group), key));
                        sockets.push(fd);
                    }
                    Err(e) => {
                        let reason = format!(
                            "cannot create a reuseport socket on {}: {e}",
                            group.listener()
                        );
                        self.forget_members();
                        return Err(reason);
                    }
                }
            }
            (Vec::new(), sockets)
        };
        let status = self.status.borrow().clone();
        let spec = SpawnSpec {
            app: &self.app,
            instance: status.instance,
            addrs: &addrs,
            logs: &self.logs,
            sockets: &sockets,
            shim: &self.shim,
        };
        let process = Process::spawn(&spec).map_err(|e| {
            let reason = crate::Chain(&e).to_string();
            tracing::error!(app = %self.app.name, id = status.id, "{reason}");
            reason
        });
        drop(sockets);
        let process = match process {
            Ok(process) => process,
            Err(reason) => {
                self.forget_members();
                return Err(reason);
            }
        };
        let handle = Arc::new(WorkerHandle::new(
            status.id,
            status.instance,
            process.pid(),
            addrs.clone(),
        ));
        tracing::info!(
            app = %self.app.name, id = status.id, instance = status.instance, pid = process.pid(),
            ports = ?addrs.iter().map(|a| a.port()).collect::<Vec<_>>(),
            "worker started"
        );
        self.set(|s| {
            s.state = WorkerState::Starting;
            s.pid = Some(process.pid());
            s.addrs = addrs;
            s.since = Some(SystemTime::now());
            s.handle = Some(Arc::clone(&handle));
        });
        Ok((process, handle))
    }

    /// Leaves every group in the background (the worker never ran).
    fn forget_members(&mut self) {
        for (group, key) in std::mem::take(&mut self.members) {
            tokio::spawn(async move { group.leave(key, None).await });
        }
    }

    /// Leaves every group, rescuing connections queued on the worker's sockets first.
    async fn leave_groups(&mut self, takeovers: Vec<Option<Takeover>>) {
        let mut takeovers = takeovers.into_iter();
        for (group, key) in std::mem::take(&mut self.members) {
            group.leave(key, takeovers.next().flatten()).await;
        }
    }

    /// One health probe: of the private port (rr), or through the first reuseport socket.
    async fn probe_once(&self, proto: Proto, addr: SocketAddr) -> Result<(), String> {
        let health = &self.app.health;
        match self.members.first() {
            Some((group, key)) => group.probe(*key, &health.check, health.timeout).await,
            None => probe(&health.check, proto, addr, health.timeout).await,
        }
    }

    fn set_group_readiness(&self, ready: bool) {
        for (group, key) in &self.members {
            group.set_ready(*key, ready);
        }
    }

    /// Probes the worker, keeps its pool membership in step with its health, and returns when it
    /// exits, never becomes ready, or is asked to stop.
    async fn supervise(&mut self, mut process: Process, handle: &Arc<WorkerHandle>) -> Outcome {
        let app = Arc::clone(&self.app);
        let health = &app.health;
        let mut hysteresis = Hysteresis::new(health.rise, health.fall);
        let ready_deadline = Instant::now() + app.listen_timeout;
        let mut ever_ready = false;
        let mut last_failure = String::from("no health probe answered yet");
        let probe_addr = handle
            .addrs
            .first()
            .copied()
            .unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        let probe_proto = app.listen.first().map_or(Proto::Tcp, |l| l.proto);
        let mut first_probe = true;
        let mut control = self.control.clone();
        loop {
            let period = if first_probe {
                Duration::ZERO
            } else if hysteresis.is_up() {
                health.interval
            } else {
                health.interval.min(STARTING_PROBE_INTERVAL)
            };
            first_probe = false;
            let next_probe = async {
                sleep(period).await;
                if app.listen.is_empty() {
                    // Nothing to probe: a worker without listeners is ready once it runs.
                    return Ok(());
                }
                self.probe_once(probe_proto, probe_addr).await
            };
            let deadline = async {
                if ever_ready {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep_until(ready_deadline.into()).await;
            };
            tokio::select! {
                exit = process.wait() => {
                    let uptime = process.started().elapsed();
                    tracing::warn!(app = %app.name, id = handle.id, pid = handle.pid, ?uptime, "worker exited with {exit}");
                    return Outcome::Exited(exit);
                }
                _ = stop_requested(&mut control) => {
                    self.drain_and_stop(process, handle).await;
                    return Outcome::Stopped;
                }
                _ = deadline => {
                    let reason = format!(
                        "not ready within listen_timeout {:?} ({last_failure})", app.listen_timeout
                    );
                    tracing::warn!(app = %app.name, id = handle.id, pid = handle.pid, "worker {reason}");
                    self.set(|s| s.state = WorkerState::Stopping);
                    process.stop(app.kill_signal, app.kill_timeout).await;
                    return Outcome::NeverReady(reason);
                }
                result = next_probe => {
                    let ok = result.is_ok();
                    if let Err(e) = result {
                        last_failure = e;
                    }
                    match hysteresis.record(ok) {
                        Some(Transition::Up) => {
                            ever_ready = true;
                            self.probation = false;
                            self.pool.insert(Arc::clone(handle));
                            self.set_group_readiness(true);
                            tracing::info!(app = %app.name, id = handle.id, instance = handle.instance, pid = handle.pid, "worker ready");
                            self.set(|s| { s.state = WorkerState::Ready; s.reason = None; });
                        }
                        Some(Transition::Down) => {
                            self.pool.remove(handle);
                            self.set_group_readiness(false);
                            tracing::warn!(app = %app.name, id = handle.id, pid = handle.pid, "worker unhealthy: {last_failure}");
                            let reason = last_failure.clone();
                            self.set(|s| { s.state = WorkerState::Unhealthy; s.reason = Some(reason); });
                        }
                        None => {}
                    }
                }
            }
        }
    }

    /// Out of the pool, wait for live connections (≤ `drain_timeout`), then graceful stop.
    ///
    /// Under reuseport the master cannot see a worker's connections: new ones are steered away
    /// from its sockets, what is queued there is taken over, and the worker itself finishes its
    /// in-flight work after `kill_signal`, for up to `drain_timeout` (or `kill_timeout`, if
    /// longer) before SIGKILL.
    async fn drain_and_stop(&mut self, mut process: Process, handle: &Arc<WorkerHandle>) {
        let app = Arc::clone(&self.app);
        if !self.members.is_empty() {
            self.pool.remove(handle);
            handle.start_draining();
            let takeovers: Vec<Option<Takeover>> = self
                .members
                .iter()
                .map(|(group, key)| group.start_leaving(*key))
                .collect();
            self.set(|s| s.state = WorkerState::Draining);
            let grace = app.drain_timeout.max(app.kill_timeout);
            let exit = process.stop(app.kill_signal, grace).await;
            self.set(|s| s.state = WorkerState::Stopping);
            self.leave_groups(takeovers).await;
            tracing::info!(app = %app.name, id = handle.id, pid = handle.pid, "worker stopped ({exit})");
            self.set(|s| {
                s.state = WorkerState::Stopped;
                s.pid = None;
                s.last_exit = Some(exit);
            });
            return;
        }
        self.pool.remove(handle);
        let live = handle.start_draining();
        self.set(|s| s.state = WorkerState::Draining);
        if live > 0 {
            tracing::info!(app = %app.name, id = handle.id, live, "draining worker");
            tokio::select! {
                _ = handle.idle() => {}
                _ = sleep(app.drain_timeout) => {
                    tracing::warn!(app = %app.name, id = handle.id, live = handle.live(),
                        "drain_timeout {:?} passed with connections still live", app.drain_timeout);
                }
                _ = process.wait() => {}
            }
        }
        self.set(|s| s.state = WorkerState::Stopping);
        let exit = process.stop(app.kill_signal, app.kill_timeout).await;
        tracing::info!(app = %app.name, id = handle.id, pid = handle.pid, "worker stopped ({exit})");
        self.set(|s| {
            s.state = WorkerState::Stopped;
            s.pid = None;
            s.last_exit = Some(exit);
        });
    }
}

/// PM2's restart rules, made stricter: every run shorter than `min_uptime` counts, wherever it
/// happens, and `max_restarts` of them in a row end in `errored`.
#[derive(Debug, Clone)]
struct RestartPolicy {
    autorestart: bool,
    max_restarts: u32,
    min_uptime: Duration,
    restart_delay: Duration,
    backoff_base: Option<Duration>,
    /// Consecutive unstable exits.
    unstable: u32,
    /// The previous backoff delay (zero when none is running).
    backoff: Duration,
}

impl RestartPolicy {
    fn new(app: &App) -> Self {
        RestartPolicy {
            autorestart: app.autorestart,
            max_restarts: app.max_restarts,
            min_uptime: app.min_uptime,
            restart_delay: app.restart_delay,
            backoff_base: app.exp_backoff_restart_delay,
            unstable: 0,
            backoff: Duration::ZERO,
        }
    }

    /// Records an exit after `uptime`; returns the delay before the next start, or `None` when
    /// the worker must stay down.
    fn after_exit(&mut self, uptime: Duration) -> Option<Duration> {
        if uptime < self.min_uptime {
            self.unstable += 1;
        } else {
            self.unstable = 0;
        }
        if uptime >= BACKOFF_RESET {
            self.backoff = Duration::ZERO;
        }
        if !self.autorestart || (self.unstable > 0 && self.unstable >= self.max_restarts) {
            return None;
        }
        let backoff = match self.backoff_base {
            None => Duration::ZERO,
            Some(base) if self.backoff.is_zero() => base,
            Some(_) => self.backoff.mul_f64(BACKOFF_FACTOR).min(BACKOFF_CAP),
        };
        self.backoff = backoff;
        Some(self.restart_delay.max(backoff))
    }
}

/// Resolves when a stop is requested, or when nobody can request anything any more.
async fn stop_requested(control: &mut watch::Receiver<Control>) {
    // Map the guard away inside: it holds a lock and must not live across the caller's awaits.
    let _ = control.wait_for(|c| *c == Control::Stop).await.map(|_| ());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_restarts: u32, base: Option<u64>) -> RestartPolicy {
        RestartPolicy {
            autorestart: true,
            max_restarts,
            min_uptime: Duration::from_secs(1),
            restart_delay: Duration::ZERO,
            backoff_base: base.map(Duration::from_millis),
            unstable: 0,
            backoff: Duration::ZERO,
        }
    }

    #[test]
    fn unstable_exits_in_a_row_end_in_errored() {
        let mut p = policy(3, None);
        let quick = Duration::from_millis(10);
        assert!(p.after_exit(quick).is_some());
        assert!(p.after_exit(quick).is_some());
        assert!(
            p.after_exit(quick).is_none(),
            "third unstable exit: errored"
        );
    }

    #[test]
    fn a_stable_run_resets_the_streak_at_any_time() {
        let mut p = policy(2, None);
        assert!(p.after_exit(Duration::from_millis(10)).is_some());
        assert!(p.after_exit(Duration::from_secs(5)).is_some(), "stable run");
        assert!(p.after_exit(Duration::from_millis(10)).is_some());
        assert!(p.after_exit(Duration::from_millis(10)).is_none());
    }

    #[test]
    fn backoff_grows_by_half_caps_and_resets_after_30s_up() {
        let mut p = policy(1000, Some(100));
        let quick = Duration::from_millis(10);
        let delays: Vec<_> = (0..4)
            .map(|_| p.after_exit(quick).unwrap().as_millis())
            .collect();
        assert_eq!(delays, [100, 150, 225, 337]);
        for _ in 0..20 {
            p.after_exit(quick);
        }
        assert_eq!(p.after_exit(quick), Some(BACKOFF_CAP));
        assert_eq!(
            p.after_exit(Duration::from_secs(31)),
            Some(Duration::from_millis(100)),
            "30 s up resets the backoff"
        );
    }

    #[test]
    fn autorestart_off_never_restarts() {
        let mut p = policy(16, None);
        p.autorestart = false;
        assert!(p.after_exit(Duration::from_secs(100)).is_none());
    }
}
