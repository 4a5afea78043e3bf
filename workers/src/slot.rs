//! One worker slot: the [`Slot`] handle the supervisor keeps, and the task that runs the
//! worker's whole life — spawn, probe until ready, keep its pool membership in step with its
//! health, restart it when it exits (per [`RestartPolicy`]), drain and stop it when asked.
//!
//! The task is the only writer of its [`WorkerStatus`] and of its worker's pool membership;
//! the supervisor only sends it [`Control::Stop`] and watches the status.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use balancer_config::{App, Proto};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::sleep;

use crate::health::{Monitor, ProbeError, Transition, probe};
use crate::logs::LogPaths;
use crate::pool::{Pool, WorkerHandle};
use crate::process::{Exit, Process};
use crate::restart::{RestartPolicy, wait_restart};
use crate::reuseport::{Group, MemberKey, Takeover};
use crate::spawn::{SpawnSpec, private_port, spawn};
use crate::stats::{Sampler, Usage};
use crate::status::{RestartCounts, RestartReason, WorkerState, WorkerStatus};

/// What a slot is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    /// Keep the worker running (and restart it when it exits).
    Run,
    /// Drain and stop it, then end the task.
    Stop,
}

/// Everything a slot's task needs, decided by the supervisor when it creates the slot.
pub(crate) struct SlotSpec {
    /// The worker's id (kept across restarts and reloads).
    pub id: u32,
    /// Its instance number.
    pub instance: u32,
    /// Restarts counted so far, by reason (a reload or restart carries the counts on).
    pub restarts: RestartCounts,
    /// Why the slot was (re)created, when it replaces an earlier worker (`show` says it).
    pub last_restart: Option<String>,
    /// Samples the CPU and memory of each incarnation's tree.
    pub sampler: Arc<Sampler>,
    /// A reload's replacement: it gives up at once if its first process never becomes ready.
    pub probation: bool,
    /// The app's configuration at creation time.
    pub app: Arc<App>,
    /// The app's pool.
    pub pool: Arc<Pool>,
    /// The app's reuseport groups (empty under rr).
    pub groups: Vec<Arc<Group>>,
    /// Where the worker's output goes.
    pub logs: LogPaths,
    /// This binary, run as the worker shim (`None`: no shim; see [`crate::spawn::SpawnSpec`]).
    pub shim: Option<PathBuf>,
    /// Where `ready = "notify"` workers get their `$NOTIFY_SOCKET` (`$BALANCER_HOME/notify`).
    pub notify_dir: PathBuf,
    /// Where a learned public address goes (an app with no `listen`; see [`crate::capture`]).
    pub learn: Option<crate::capture::Learn>,
}

/// One worker identity and the task that runs it.
pub(crate) struct Slot {
    /// The worker's id.
    pub id: u32,
    /// Its instance number.
    pub instance: u32,
    /// What its task publishes.
    pub status: watch::Receiver<WorkerStatus>,
    /// The task's own sender, kept for [`reset_restarts`](Self::reset_restarts) alone.
    status_tx: watch::Sender<WorkerStatus>,
    control: watch::Sender<Control>,
    task: JoinHandle<()>,
}

impl Slot {
    /// Starts the slot's task: the first process is spawned at once.
    pub fn start(spec: SlotSpec) -> Slot {
        let initial = WorkerStatus::new(
            spec.id,
            spec.app.name.clone(),
            spec.instance,
            spec.restarts,
            spec.last_restart,
        );
        let (status_tx, status) = watch::channel(initial);
        let (control, control_rx) = watch::channel(Control::Run);
        let task = SlotTask {
            restart: RestartPolicy::new(&spec.app),
            logs: spec.logs,
            groups: spec.groups,
            members: Vec::new(),
            shim: spec.shim,
            notify_dir: spec.notify_dir,
            learn: spec.learn,
            notify: None,
            capture: None,
            app: spec.app,
            pool: spec.pool,
            sampler: spec.sampler,
            status: status_tx,
            control: control_rx,
            probation: spec.probation,
        };
        let status_tx = task.status.clone();
        Slot {
            id: spec.id,
            instance: spec.instance,
            status,
            status_tx,
            control,
            task: tokio::spawn(task.run()),
        }
    }

    /// Whether its worker is down for good: stopped, errored, or `autorestart` off. The task
    /// writes those states last, so it has ended or is about to; going by the state as well
    /// means a `start` right after a `stop` finds the worker it just stopped.
    pub fn finished(&self) -> bool {
        self.task.is_finished() || self.status.borrow().state.is_down()
    }

    /// Restarts counted so far, by reason.
    pub fn restarts(&self) -> RestartCounts {
        self.status.borrow().restarts_by
    }

    /// The running process's usage (none while it is not running or not sampled).
    pub fn usage(&self) -> Option<Arc<Usage>> {
        let status = self.status.borrow();
        status.usage.clone().filter(|_| status.pid.is_some())
    }

    /// Its state now.
    pub fn state(&self) -> WorkerState {
        self.status.borrow().state
    }

    /// `balancer reset`: the restart count back to zero (PM2's ↺ column). The restart
    /// policy's own count of unstable exits is not touched: a crash loop stays one.
    pub fn reset_restarts(&self) {
        self.status_tx.send_modify(|s| s.restarts = 0);
    }

    /// Asks the task to drain and stop its worker, without waiting (the slot stays usable).
    pub fn request_stop(&self) {
        let _ = self.control.send(Control::Stop);
    }

    /// Drains and stops the worker, and waits for the task to end.
    pub async fn stop(self) {
        self.request_stop();
        if let Err(e) = self.task.await {
            tracing::error!(id = self.id, "worker task failed: {e}");
        }
    }
}

/// How one incarnation ended, as far as the slot loop cares.
enum Ended {
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
    sampler: Arc<Sampler>,
    logs: LogPaths,
    status: watch::Sender<WorkerStatus>,
    control: watch::Receiver<Control>,
    restart: RestartPolicy,
    /// Reuseport policy: the groups of the app's listeners (empty under rr)…
    groups: Vec<Arc<Group>>,
    /// …and the current incarnation's socket in each.
    members: Vec<(Arc<Group>, MemberKey)>,
    /// This binary, run as the worker shim.
    shim: Option<PathBuf>,
    /// Where notify sockets go, and the current incarnation's (`ready = "notify"`).
    notify_dir: PathBuf,
    notify: Option<crate::notify::NotifySocket>,
    /// The task answering the current incarnation's captured binds ([`crate::capture`]).
    capture: Option<JoinHandle<()>>,
    /// Where a learned public address goes.
    learn: Option<crate::capture::Learn>,
}

impl SlotTask {
    async fn run(mut self) {
        loop {
            if self.stop_requested() {
                self.set(|s| s.state = WorkerState::Stopped);
                return;
            }
            let (outcome, uptime) = match self.spawn().await {
                Ok((process, handle, usage)) => {
                    let started = process.started();
                    let outcome = self.supervise(process, &handle).await;
                    usage.stop();
                    self.pool.remove(&handle);
                    handle.mark_gone();
                    // In the background: a replacement may be what takes the queued connections.
                    for (group, key) in std::mem::take(&mut self.members) {
                        tokio::spawn(async move { group.leave(key, None).await });
                    }
                    (outcome, started.elapsed())
                }
                Err(reason) => (Ended::NeverReady(reason), Duration::ZERO),
            };
            let (exit, reason, uptime) = match outcome {
                Ended::Stopped => return,
                Ended::Exited(exit) => (Some(exit), format!("exited with {exit}"), uptime),
                // Never ready is never stable, however long it ran.
                Ended::NeverReady(reason) => (None, reason, Duration::ZERO),
            };
            let app = &self.app;
            if self.probation {
                let why = format!("replacement never became ready: {reason}");
                tracing::warn!(app = %app.name, id = self.id(), "{why}");
                self.went_down(WorkerState::Errored, exit, why);
                return;
            }
            let Some(delay) = self.restart.after_exit(uptime) else {
                let why = if app.autorestart {
                    format!(
                        "{} unstable exits in a row (each under min_uptime {:?} or never ready); last: {reason}",
                        self.restart.unstable(),
                        app.min_uptime
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
                self.went_down(state, exit, why);
                return;
            };
            tracing::info!(app = %app.name, id = self.id(), ?delay, "worker {reason}; restarting");
            self.went_down(WorkerState::WaitingRestart, exit, reason);
            wait_restart(delay, stop_requested(&mut self.control)).await;
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

    /// The one status update for "the process is gone and the slot moves on to `state`":
    /// no pid, no handle, the exit (if it was seen) kept for `show`, and why. Going to
    /// `waiting-restart` counts a restart, in the same update, so nobody sees one without the
    /// other.
    fn went_down(&self, state: WorkerState, exit: Option<Exit>, reason: String) {
        self.set(|s| {
            s.state = state;
            s.pid = None;
            s.handle = None;
            s.usage = None;
            s.last_exit = exit.or(s.last_exit);
            if state == WorkerState::WaitingRestart {
                s.count_restart(RestartReason::Crash, format!("crash: {reason}"));
            }
            s.reason = Some(reason);
        });
    }

    /// Reserves private ports (rr) or sockets in the groups (reuseport) and starts one
    /// incarnation.
    async fn spawn(&mut self) -> Result<(Process, Arc<WorkerHandle>, Arc<Usage>), String> {
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
        self.notify = None;
        if self.app.ready == balancer_config::Ready::Notify {
            match crate::notify::NotifySocket::bind(&self.notify_dir, &self.app.name, status.id) {
                Ok(socket) => self.notify = Some(socket),
                Err(e) => {
                    self.forget_members();
                    return Err(e.to_string());
                }
            }
        }
        let mode = crate::capture::mode(&self.app, self.learn.as_ref(), &addrs, &sockets);
        let capture = mode.is_some();
        let spec = SpawnSpec {
            app: &self.app,
            instance: status.instance,
            addrs: &addrs,
            logs: &self.logs,
            sockets: &sockets,
            shim: self.shim.as_deref(),
            notify_socket: self.notify.as_ref().map(|n| n.path()),
            capture,
        };
        let process = spawn(&spec).await.map_err(|e| {
            let reason = crate::Chain(&e).to_string();
            tracing::error!(app = %self.app.name, id = status.id, "{reason}");
            reason
        });
        drop(sockets);
        let mut process = match process {
            Ok(process) => process,
            Err(reason) => {
                self.forget_members();
                return Err(reason);
            }
        };
        if let Some(old) = self.capture.take() {
            old.abort();
        }
        if let (Some(fd), Some(mode)) = (process.take_capture(), mode) {
            self.capture = Some(crate::capture::notify::spawn(
                fd,
                self.app.name.clone(),
                status.id,
                mode,
            ));
        }
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
        let usage = self.sampler.watch_adopted(
            process.pid(),
            process.shim_pid(),
            self.app.max_memory_restart,
        );
        self.set(|s| {
            s.state = WorkerState::Starting;
            s.pid = Some(process.pid());
            s.addrs = addrs;
            s.since = Some(SystemTime::now());
            s.handle = Some(Arc::clone(&handle));
            s.usage = Some(Arc::clone(&usage));
        });
        Ok((process, handle, usage))
    }

    /// The end of a stop asked for: the handle stays, so `show` can still read its counters.
    fn stopped(&self, exit: Exit) {
        self.set(|s| {
            s.state = WorkerState::Stopped;
            s.pid = None;
            s.last_exit = Some(exit);
        });
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
    async fn probe_once(&self, proto: Proto, addr: SocketAddr) -> Result<(), ProbeError> {
        let health = &self.app.health;
        match self.members.first() {
            Some((group, key)) => Ok(group.probe(*key, &health.check, health.timeout).await?),
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
    async fn supervise(&mut self, mut process: Process, handle: &Arc<WorkerHandle>) -> Ended {
        let app = Arc::clone(&self.app);
        let health = &app.health;
        let mut monitor = Monitor::new(health.rise, health.fall, health.interval).counting(
            &app.name,
            handle.id,
            handle.instance,
        );
        let ready_deadline = Instant::now() + app.listen_timeout;
        let mut ever_ready = false;
        let probe_addr = handle
            .addrs
            .first()
            .copied()
            .unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        let probe_proto = app.listen.first().map_or(Proto::Tcp, |l| l.proto);
        let mut control = self.control.clone();
        // Nothing to probe: a worker without listeners is ready once it has stayed up a moment
        // (a process that exits at once must not pass a reload's probation).
        let settled =
            tokio::time::Instant::from_std(process.started()) + app.min_uptime.min(SETTLE_MAX);
        // `ready = "notify"`: no probe counts before the worker said READY=1.
        let notified = self.notify.as_ref().map(|n| n.ready());
        loop {
            let this = &*self;
            let notified = &notified;
            let next_transition = monitor.next_transition(move || async move {
                if let Some(mut notified) = notified.clone()
                    && notified.wait_for(|ready| *ready).await.is_err()
                {
                    return Err(ProbeError::from("the notify socket closed".to_owned()));
                }
                if this.app.listen.is_empty() {
                    tokio::time::sleep_until(settled).await;
                    return Ok(());
                }
                this.probe_once(probe_proto, probe_addr).await
            });
            let deadline = async {
                if ever_ready {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep_until(ready_deadline.into()).await;
            };
            // Every branch but the probes' ends this incarnation's supervision, so the probe
            // loop is only ever cancelled for good.
            tokio::select! {
                exit = process.wait() => {
                    let uptime = process.started().elapsed();
                    tracing::warn!(app = %app.name, id = handle.id, pid = handle.pid, ?uptime, "worker exited with {exit}");
                    return Ended::Exited(exit);
                }
                _ = stop_requested(&mut control) => {
                    self.drain_and_stop(process, handle).await;
                    return Ended::Stopped;
                }
                _ = deadline => {
                    let why = match &notified {
                        Some(n) if !*n.borrow() => "it sent no READY=1 to its NOTIFY_SOCKET (ready = \"notify\")".to_owned(),
                        _ => monitor.last_failure().to_string(),
                    };
                    let reason = format!("not ready within listen_timeout {:?} ({why})", app.listen_timeout);
                    tracing::warn!(app = %app.name, id = handle.id, pid = handle.pid, "worker {reason}");
                    self.set(|s| s.state = WorkerState::Stopping);
                    process.stop(app.kill_signal, app.kill_timeout).await;
                    return Ended::NeverReady(reason);
                }
                transition = next_transition => match transition {
                    Transition::Up => {
                        ever_ready = true;
                        self.probation = false;
                        self.pool.insert(Arc::clone(handle));
                        self.set_group_readiness(true);
                        tracing::info!(app = %app.name, id = handle.id, instance = handle.instance, pid = handle.pid, "worker ready");
                        self.set(|s| { s.state = WorkerState::Ready; s.reason = None; });
                    }
                    Transition::Down => {
                        self.pool.remove(handle);
                        self.set_group_readiness(false);
                        let reason = monitor.last_failure().to_string();
                        tracing::warn!(app = %app.name, id = handle.id, pid = handle.pid, "worker unhealthy: {reason}");
                        self.set(|s| { s.state = WorkerState::Unhealthy; s.reason = Some(reason); });
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
            // The master holds none of the worker's connections; the kernel knows them. Let
            // those finish (≤ drain_timeout) before kill_signal, so a worker with default
            // signal handling does not drop what it is serving.
            let ports: Vec<u16> = app
                .listen
                .iter()
                .filter(|l| l.proto != Proto::Udp)
                .map(|l| l.addr.port())
                .collect();
            tokio::select! {
                held = connections_closed(handle.pid, ports) => if held > 0 {
                    tracing::info!(app = %app.name, id = handle.id, "drained {held} connection(s)");
                },
                _ = sleep(app.drain_timeout) => {
                    tracing::warn!(app = %app.name, id = handle.id,
                        "drain_timeout {:?} passed with connections still open", app.drain_timeout);
                }
                _ = process.wait() => {}
            }
            let exit = process.stop(app.kill_signal, app.kill_timeout).await;
            self.set(|s| s.state = WorkerState::Stopping);
            self.leave_groups(takeovers).await;
            tracing::info!(app = %app.name, id = handle.id, pid = handle.pid, "worker stopped ({exit})");
            self.stopped(exit);
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
        self.stopped(exit);
    }
}

/// The longest a worker without listeners waits, running, before it counts as ready
/// (`min_uptime` if shorter).
const SETTLE_MAX: Duration = Duration::from_millis(500);

/// How often a draining reuseport worker's connections are looked at.
const CONNECTIONS_POLL: Duration = Duration::from_millis(100);

/// Resolves once the worker `pid` (and its descendants) holds no established connection on
/// any of `ports`, by the kernel's socket table; returns how many it held at first. When the
/// table cannot be read, resolves at once (the worker then gets `kill_signal` right away).
async fn connections_closed(pid: u32, ports: Vec<u16>) -> usize {
    let held = move || -> std::io::Result<usize> {
        let mut inodes = crate::sockdiag::socket_inodes(pid);
        for child in crate::shim::descendants(nix::unistd::Pid::from_raw(pid as i32)) {
            inodes.extend(crate::sockdiag::socket_inodes(child.as_raw() as u32));
        }
        let mut count = 0;
        for port in &ports {
            count += crate::sockdiag::established_on(*port)?
                .iter()
                .filter(|s| inodes.contains(&s.inode))
                .count();
        }
        Ok(count)
    };
    let mut first = None;
    loop {
        let held = held.clone();
        match tokio::task::spawn_blocking(held).await {
            Ok(Ok(0)) => return first.unwrap_or(0),
            Ok(Ok(n)) => {
                first.get_or_insert(n);
            }
            Ok(Err(e)) => {
                tracing::debug!("cannot read the kernel's socket table ({e}); not waiting");
                return 0;
            }
            Err(_) => return 0,
        }
        sleep(CONNECTIONS_POLL).await;
    }
}

/// Resolves when a stop is requested, or when nobody can request anything any more.
async fn stop_requested(control: &mut watch::Receiver<Control>) {
    // Map the guard away inside: it holds a lock and must not live across the caller's awaits.
    let _ = control.wait_for(|c| *c == Control::Stop).await.map(|_| ());
}
