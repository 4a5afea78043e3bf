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

use balancer_config::App;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::sleep;

use crate::health::{Hysteresis, Transition, probe};
use crate::logs::LogPaths;
use crate::pool::{Pool, WorkerHandle};
use crate::process::{Exit, Process, SpawnSpec, private_port};

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

struct Slot {
    status: watch::Receiver<WorkerStatus>,
    control: watch::Sender<Control>,
    task: JoinHandle<()>,
}

/// Supervises every worker of one app and owns its pool.
pub struct AppSupervisor {
    app: Arc<App>,
    home: PathBuf,
    pool: Arc<Pool>,
    ids: Arc<AtomicU32>,
    slots: Mutex<Vec<Slot>>,
}

impl AppSupervisor {
    /// Starts `app.instances` workers. `ids` hands out worker ids across all apps of a master;
    /// `home` is `$BALANCER_HOME` (logs go to `home/logs`).
    pub fn start(app: App, home: PathBuf, ids: Arc<AtomicU32>) -> Arc<Self> {
        let sup = Arc::new(AppSupervisor {
            app: Arc::new(app),
            home,
            pool: Arc::new(Pool::new()),
            ids,
            slots: Mutex::new(Vec::new()),
        });
        for instance in 0..sup.app.instances {
            sup.add_slot(instance);
        }
        sup
    }

    /// The app as configured.
    pub fn app(&self) -> &App {
        &self.app
    }

    /// The ready workers, for the listeners.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// A snapshot of every worker's status, ordered by id.
    pub fn statuses(&self) -> Vec<WorkerStatus> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = slots.iter().map(|s| s.status.borrow().clone()).collect();
        all.sort_by_key(|s| s.id);
        all
    }

    /// Drains and stops every worker (concurrently), then returns.
    pub async fn shutdown(&self) {
        let slots = std::mem::take(&mut *self.slots.lock().unwrap_or_else(|e| e.into_inner()));
        for slot in &slots {
            let _ = slot.control.send(Control::Stop);
        }
        for slot in slots {
            if let Err(e) = slot.task.await {
                tracing::error!(app = %self.app.name, "worker task failed: {e}");
            }
        }
    }

    fn add_slot(&self, instance: u32) {
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let initial = WorkerStatus {
            id,
            app: self.app.name.clone(),
            instance,
            state: WorkerState::Starting,
            pid: None,
            addrs: Vec::new(),
            since: None,
            restarts: 0,
            last_exit: None,
            reason: None,
            handle: None,
        };
        let (status_tx, status) = watch::channel(initial);
        let (control, control_rx) = watch::channel(Control::Run);
        let worker = SlotTask {
            app: Arc::clone(&self.app),
            pool: Arc::clone(&self.pool),
            logs: LogPaths::new(&self.home, &self.app.name, instance),
            status: status_tx,
            control: control_rx,
            restart: RestartPolicy::new(&self.app),
        };
        let task = tokio::spawn(worker.run());
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Slot {
                status,
                control,
                task,
            });
    }
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
    app: Arc<App>,
    pool: Arc<Pool>,
    logs: LogPaths,
    status: watch::Sender<WorkerStatus>,
    control: watch::Receiver<Control>,
    restart: RestartPolicy,
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
                    (outcome, started.elapsed())
                }
                Err(reason) => (Outcome::NeverReady(reason), Duration::ZERO),
            };
            let (exit, reason) = match outcome {
                Outcome::Stopped => return,
                Outcome::Exited(exit) => (Some(exit), format!("exited with {exit}")),
                Outcome::NeverReady(reason) => (None, reason),
            };
            let app = &self.app;
            let Some(delay) = self.restart.after_exit(uptime) else {
                let why = if app.autorestart {
                    format!(
                        "{} unstable exits in a row (each under min_uptime {:?}); last: {reason}",
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

    /// Reserves private ports and starts one incarnation.
    fn spawn(&self) -> Result<(Process, Arc<WorkerHandle>), String> {
        let addrs = self
            .app
            .listen
            .iter()
            .map(|_| private_port().map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p))))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("cannot reserve a private port: {e}"))?;
        let status = self.status.borrow().clone();
        let spec = SpawnSpec {
            app: &self.app,
            instance: status.instance,
            addrs: &addrs,
            logs: &self.logs,
        };
        let process = Process::spawn(&spec).map_err(|e| {
            let reason = error_chain(&e);
            tracing::error!(app = %self.app.name, id = status.id, "{reason}");
            reason
        })?;
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
                probe(&health.check, probe_addr, health.timeout).await
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
                            self.pool.insert(Arc::clone(handle));
                            tracing::info!(app = %app.name, id = handle.id, instance = handle.instance, pid = handle.pid, "worker ready");
                            self.set(|s| { s.state = WorkerState::Ready; s.reason = None; });
                        }
                        Some(Transition::Down) => {
                            self.pool.remove(handle);
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
    async fn drain_and_stop(&self, mut process: Process, handle: &Arc<WorkerHandle>) {
        let app = &self.app;
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

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
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
