//! The running master: the registry of apps (each one's supervisor and public listeners), the
//! operations the admin socket asks for, and the shutdown order — stop accepting, drain, stop
//! workers.
//!
//! [`run`] boots it and handles signals, [`apply`](Master::apply) (in `apply.rs`) diffs a
//! configuration against what runs, `admin.rs` serves the socket, and [`views`] turns
//! supervisor state into the protocol's `ls`/`show` rows. The children use this module's types;
//! this module uses none of theirs.

mod admin;
mod apply;
pub mod dump;
mod learn;
pub mod metrics;
pub mod notify;
mod reaper;
pub mod run;
pub mod upgrade;
pub mod views;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use balancer_config::{App, Config, ConfigErrors, Listener, LoadOptions};
use balancer_workers::{AppSupervisor, Chain, OpError, SpawnContext, Target, WorkerStatus};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::home::LockError;
use crate::protocol::{Load, Reply, ScaleTo};
use crate::proxy::Route;

/// Connections still open after every worker has stopped get this long to end on their own.
const LINGER_AFTER_STOP: Duration = Duration::from_secs(1);

/// Where the master is in its life; published so callers (and tests) wait on phases, not sleeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Binding listeners and starting workers.
    Starting,
    /// Serving.
    Running,
    /// Stopped accepting; draining connections and stopping workers.
    ShuttingDown,
    /// Everything stopped.
    Stopped,
}

/// A public listener that could not be bound (at start, or when a config is applied).
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {listener} (app {app})")]
pub struct BindError {
    /// The listener, as written in the config.
    pub listener: String,
    /// The app that owns it.
    pub app: String,
    /// The cause.
    #[source]
    pub source: io::Error,
}

/// Why the master could not run.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    /// A public listener could not be bound; nothing was started.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The home could not be prepared or is taken by another master.
    #[error(transparent)]
    Home(#[from] LockError),
    /// The admin socket could not be created.
    #[error("cannot create the admin socket {0}")]
    Admin(PathBuf, #[source] io::Error),
    /// The metrics endpoint could not listen; nothing was started.
    #[error("cannot serve metrics on {0}")]
    Metrics(std::net::SocketAddr, #[source] io::Error),
    /// `io = "io_uring"` where the kernel refuses io_uring; nothing was started.
    #[error("io = \"io_uring\": the kernel refuses io_uring (use io = \"auto\" or \"epoll\")")]
    Uring(#[source] &'static io::Error),
    /// A new master (`take-over`) could not take over; the old one serves on.
    #[error("cannot take over from the old master: {0}")]
    TakeOver(String),
    /// An app needs capture where there is none (or it is off); nothing was started.
    #[error(transparent)]
    Capture(#[from] balancer_workers::capture::CaptureError),
    /// The async runtime or a signal handler could not be set up.
    #[error("cannot set up the master's {what}")]
    Setup {
        /// What failed.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Why an operation asked of the master failed. The exit code the CLI uses follows from the
/// variant ([`exit_code`](Self::exit_code)), never from where the error was raised.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No app has that name and no worker that id.
    #[error("no app or worker id named {0:?}")]
    UnknownTarget(String),
    /// No app has that name.
    #[error("no app named {0:?}")]
    UnknownApp(String),
    /// A configuration the master was asked to load is wrong; nothing changed.
    #[error("{0}")]
    BadConfig(ConfigErrors),
    /// A new public listener could not be bound; nothing changed.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// `start SCRIPT -n NAME` where an app of that name runs already (PM2 refuses too).
    #[error(
        "app {app:?} is already running (started from {from}); add -f (--force) to replace it, \
         or pick another name with -n"
    )]
    AlreadyRunning {
        /// The app.
        app: String,
        /// Where the running app came from.
        from: String,
    },
    /// Some apps of an `all` (or several-app) operation succeeded and some failed: the reply
    /// says which, app by app.
    #[error(
        "{} of {} apps failed:\n{}",
        failed.len(),
        failed.len() + done.len(),
        done.iter().map(|d| format!("  ok: {d}")).chain(failed.iter().map(|e| format!("  failed: {e}"))).collect::<Vec<_>>().join("\n")
    )]
    Partial {
        /// What succeeded, one message per app.
        done: Vec<String>,
        /// What failed, one error per app.
        failed: Vec<ControlError>,
    },
    /// `send-signal` named no signal we know.
    #[error("{0}")]
    BadSignal(String),
    /// The count asked for cannot be had.
    #[error("{0}")]
    BadScale(String),
    /// An app's supervisor could not carry the operation out.
    #[error("{app}: {error}")]
    App {
        /// The app.
        app: String,
        /// What its supervisor said.
        error: OpError,
    },
    /// The metrics endpoint could not listen; nothing changed.
    #[error("cannot serve metrics on {addr}")]
    Metrics {
        /// `[balancer] metrics`.
        addr: std::net::SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `io = "io_uring"` where the kernel refuses io_uring; nothing changed.
    #[error("io = \"io_uring\": the kernel refuses io_uring (use io = \"auto\" or \"epoll\")")]
    Uring(#[source] &'static io::Error),
    /// A log file could not be emptied.
    #[error("cannot empty {}", path.display())]
    Flush {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `save` could not write the dump; the previous one is intact.
    #[error(transparent)]
    Save(dump::DumpError),
    /// `resurrect` found no dump.
    #[error("no dump at {} (write one with `balancer save`)", .0.display())]
    NoDump(PathBuf),
    /// `upgrade` did not happen; this master carries on.
    #[error(transparent)]
    Upgrade(#[from] upgrade::UpgradeError),
    /// An app needs capture where there is none (or it is off); nothing changed.
    #[error(transparent)]
    Capture(#[from] balancer_workers::capture::CaptureError),
    /// The operation touched several apps and more than one failed.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Several(Vec<ControlError>),
}

impl ControlError {
    /// 2 for a request or configuration that is wrong in itself, 1 for an operation that failed.
    pub fn exit_code(&self) -> u8 {
        match self {
            ControlError::BadConfig(_) | ControlError::BadSignal(_) | ControlError::Capture(_) => 2,
            ControlError::Several(all) | ControlError::Partial { failed: all, .. } => {
                all.iter().map(Self::exit_code).max().unwrap_or(1)
            }
            _ => 1,
        }
    }

    fn app(app: &AppSupervisor, error: OpError) -> Self {
        ControlError::App {
            app: app.app().name.clone(),
            error,
        }
    }

    /// All of `errors` as one (none: `None`).
    fn all(mut errors: Vec<ControlError>) -> Option<Self> {
        match errors.len() {
            0 => None,
            1 => errors.pop(),
            _ => Some(ControlError::Several(errors)),
        }
    }
}

impl From<ControlError> for Reply {
    fn from(error: ControlError) -> Self {
        Reply::Failed {
            error: Chain(&error).to_string(),
            code: error.exit_code(),
        }
    }
}

/// The outcome of an operation: what was done, in words, or why not.
pub type OpResult = Result<String, ControlError>;

/// The outcome of an operation on several apps: every success, or what failed and (when
/// some succeeded) what did not, app by app.
fn gather(done: Vec<String>, failures: Vec<ControlError>) -> OpResult {
    if failures.is_empty() {
        Ok(done.join("; "))
    } else if done.is_empty() {
        Err(ControlError::all(failures).unwrap_or(ControlError::Several(Vec::new())))
    } else {
        Err(ControlError::Partial {
            done,
            failed: failures,
        })
    }
}

/// Whether `apply` replaces workers of apps that did not change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// `start FILE`: start new apps, apply changes, leave unchanged apps alone.
    Start,
    /// `reload FILE`: like `Start`, and reload unchanged apps too (a deploy changed their code).
    Reload,
}

/// Where an app's configuration came from, so `reload FILE` knows which apps the file owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A balancer.toml (absolute path).
    File(PathBuf),
    /// `balancer start SCRIPT|COMMAND`: one app built from command-line arguments. Each such
    /// app is its own source (named after it), so starting another one never deletes it.
    CommandLine(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(path) => write!(f, "{}", path.display()),
            Source::CommandLine(_) => f.write_str("the command line"),
        }
    }
}

/// One public listener of an app.
struct ListenerEntry {
    config: Listener,
    route: Arc<Route>,
    stop: CancellationToken,
    /// A duplicate of the public socket (close-on-exec), for `upgrade` to hand over (`None`:
    /// the duplicate could not be made, out of descriptors; `upgrade` says so).
    socket: Option<std::os::fd::OwnedFd>,
}

/// One app: its supervisor, listeners and origin.
struct AppEntry {
    sup: Arc<AppSupervisor>,
    listeners: Vec<ListenerEntry>,
    source: Source,
}

/// A target named on the command line, resolved to supervisors.
type Resolved = Vec<(Arc<AppSupervisor>, Target)>;

/// The running master.
pub struct Master {
    home: PathBuf,
    load: LoadOptions,
    spawn: Arc<SpawnContext>,
    apps: Mutex<Vec<AppEntry>>,
    /// One configuration change at a time (operations on single apps lock in their supervisor).
    changes: tokio::sync::Mutex<()>,
    abort_connections: CancellationToken,
    connections: TaskTracker,
    /// Descriptors for proxied connections, shared by every listener.
    budget: crate::proxy::FdBudget,
    /// The most flows one UDP listener may keep with this descriptor budget.
    flow_cap: u32,
    shutdown: CancellationToken,
    /// How each app was started, by name, for `save` (see `dump.rs`).
    origins: Mutex<Vec<(String, dump::Origin)>>,
    /// The metrics endpoint, once a config named `[balancer] metrics`.
    endpoint: Mutex<Option<metrics::Endpoint>>,
    /// This master, for the endpoint's tasks (set by [`run`] once it is in an `Arc`).
    me: std::sync::OnceLock<std::sync::Weak<Master>>,
    /// Listeners wait for this before their first accept: open at once, except in a master
    /// that is taking over from another (`upgrade.rs`), which must not take a connection
    /// until it is committed to serve it.
    accept_gate: CancellationToken,
    /// What `upgrade` needs from the boot: the binary's path and the home lock's descriptor.
    upgrade: upgrade::Handles,
    /// Public addresses learned from workers' binds (capture with no `listen`).
    learned: learn::Learned,
}

/// Descriptors kept out of the connection budget: the admin socket and its clients, health
/// probes, log files opened for spawns, listeners, the runtime's own, the splice pipes of
/// bulk transfers (at most 64, `proxy/splice.rs`).
const RESERVED_FDS: u64 = 256;
/// The smallest connection budget, however low the limit (in descriptors).
const MIN_BUDGET_FDS: u64 = 32;

/// The descriptors this process may spend on connections: its open file limit less
/// [`RESERVED_FDS`].
fn fd_budget() -> u64 {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    soft.saturating_sub(RESERVED_FDS).max(MIN_BUDGET_FDS)
}

impl Master {
    /// A master with no apps yet, living in `home`, reading configs with `load`, running its
    /// workers under `shim` (this binary; `None` in unit tests, which have none).
    fn new(
        home: PathBuf,
        load: LoadOptions,
        shutdown: CancellationToken,
        shim: Option<PathBuf>,
    ) -> Self {
        let fds = fd_budget();
        let permits = usize::try_from(fds)
            .unwrap_or(usize::MAX)
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        // Installed before any listener exists, so every route's handles count.
        metrics::recorder();
        Master {
            budget: Arc::new(tokio::sync::Semaphore::new(permits)),
            // UDP flows take one descriptor each, from the same limit: a quarter of it each.
            flow_cap: u32::try_from(fds / 4).unwrap_or(u32::MAX).max(16),
            spawn: SpawnContext::new(home.clone(), shim, Arc::new(crate::proxy::tcp::rescue)),
            home,
            load,
            apps: Mutex::new(Vec::new()),
            changes: tokio::sync::Mutex::new(()),
            abort_connections: CancellationToken::new(),
            connections: TaskTracker::new(),
            shutdown,
            origins: Mutex::new(Vec::new()),
            endpoint: Mutex::new(None),
            me: std::sync::OnceLock::new(),
            accept_gate: {
                let open = CancellationToken::new();
                open.cancel();
                open
            },
            upgrade: upgrade::Handles::default(),
            learned: learn::Learned::default(),
        }
    }

    /// Serves the metrics endpoint at `addr` (`[balancer] metrics`). Already there: nothing
    /// changes; at another address: the new one is bound first, then the old one stops, so a
    /// taken address leaves the endpoint where it was.
    fn serve_metrics(&self, addr: std::net::SocketAddr) -> io::Result<()> {
        let mut endpoint = self.endpoint.lock().unwrap_or_else(|e| e.into_inner());
        if endpoint.as_ref().is_some_and(|e| e.addr == addr) {
            return Ok(());
        }
        let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) else {
            return Err(io::Error::other("the master is not running"));
        };
        let fresh = match self.upgrade.inherited_metrics(addr) {
            Some(socket) => metrics::start_on(socket, me)?,
            None => metrics::start(addr, me)?,
        };
        if let Some(old) = endpoint.replace(fresh) {
            old.stop();
        }
        Ok(())
    }

    /// Where the metrics endpoint listens, if it does.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.endpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|e| e.addr)
    }

    /// `$BALANCER_HOME`.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// How this master reads configs: its CPU count and default policy.
    pub fn load_options(&self) -> &LoadOptions {
        &self.load
    }

    /// Cancels the master's run (the admin `kill`).
    pub fn request_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// The apps in start order, with each one's current config and worker statuses.
    pub fn apps(&self) -> Vec<(Arc<App>, Vec<WorkerStatus>)> {
        self.entries()
            .iter()
            .map(|e| (e.sup.app(), e.sup.statuses()))
            .collect()
    }

    /// The supervisor of the app named `name`.
    pub fn supervisor(&self, name: &str) -> Option<Arc<AppSupervisor>> {
        self.entries()
            .iter()
            .find(|e| e.sup.app().name == name)
            .map(|e| Arc::clone(&e.sup))
    }

    /// The app owning worker `id`.
    pub fn supervisor_of_worker(&self, id: u32) -> Option<Arc<AppSupervisor>> {
        self.entries()
            .iter()
            .find(|e| e.sup.has_worker(id))
            .map(|e| Arc::clone(&e.sup))
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Vec<AppEntry>> {
        self.apps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `all`, a worker id, or an app name.
    pub fn resolve(&self, target: &str) -> Result<Resolved, ControlError> {
        if target == "all" {
            return Ok(self
                .entries()
                .iter()
                .map(|e| (Arc::clone(&e.sup), Target::All))
                .collect());
        }
        if let Some(sup) = self.supervisor(target) {
            return Ok(vec![(sup, Target::All)]);
        }
        if let Ok(id) = target.parse::<u32>()
            && let Some(sup) = self.supervisor_of_worker(id)
        {
            return Ok(vec![(sup, Target::Worker(id))]);
        }
        Err(ControlError::UnknownTarget(target.to_owned()))
    }

    /// How a request's [`Load`] reads a file here: its `--env`, and its default policy or ours.
    fn options(&self, load: &Load) -> LoadOptions {
        load.apply_to(&self.load)
    }

    /// Loads a balancer.toml, off the runtime's threads: reading a file may block, and the
    /// master must go on proxying meanwhile.
    pub async fn load(&self, file: &Path, load: &Load) -> Result<Config, ControlError> {
        let (file, opts) = (file.to_path_buf(), self.options(load));
        match tokio::task::spawn_blocking(move || balancer_config::load(&file, &opts)).await {
            Ok(loaded) => loaded.map_err(ControlError::BadConfig),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Parses balancer.toml text built by the CLI; relative paths are relative to `cwd`.
    pub fn parse(&self, toml: &str, cwd: &Path, load: &Load) -> Result<Config, ControlError> {
        balancer_config::parse(toml, &cwd.join("(command line)"), &self.options(load))
            .map_err(ControlError::BadConfig)
    }

    /// Runs `op` on every supervisor `target` names; the messages of those that succeeded, or
    /// every failure.
    async fn each(
        &self,
        target: &str,
        op: impl AsyncFn(Arc<AppSupervisor>, Target) -> Result<String, OpError>,
    ) -> OpResult {
        let resolved = self.resolve(target)?;
        if resolved.is_empty() {
            return Ok("no apps".into());
        }
        let mut done = Vec::new();
        let mut failures = Vec::new();
        for (sup, t) in resolved {
            match op(Arc::clone(&sup), t).await {
                Ok(message) => done.push(message),
                Err(e) => failures.push(ControlError::app(&sup, e)),
            }
        }
        gather(done, failures)
    }

    /// Like [`each`](Self::each), for an operation that does not wait.
    fn each_now(
        &self,
        target: &str,
        op: impl Fn(&AppSupervisor, Target) -> Result<String, OpError>,
    ) -> OpResult {
        let mut done = Vec::new();
        let mut failures = Vec::new();
        for (sup, t) in self.resolve(target)? {
            match op(&sup, t) {
                Ok(message) => done.push(message),
                Err(e) => failures.push(ControlError::app(&sup, e)),
            }
        }
        if done.is_empty() && failures.is_empty() {
            return Ok("no apps".into());
        }
        gather(done, failures)
    }

    /// Drain and stop (the app stays listed, its listeners keep holding connections).
    pub async fn stop(&self, target: &str) -> OpResult {
        self.each(target, async |sup, t| sup.stop(t).await).await
    }

    /// Start stopped or errored workers again.
    pub async fn start_stopped(&self, target: &str) -> OpResult {
        self.each(target, async |sup, t| sup.start_stopped(t).await)
            .await
    }

    /// Stop then start.
    pub async fn restart(&self, target: &str) -> OpResult {
        self.each(target, async |sup, t| sup.restart(t).await).await
    }

    /// Zero-downtime replacement of workers.
    pub async fn reload(&self, target: &str) -> OpResult {
        self.reload_reporting(target, &|_| {}).await
    }

    /// [`reload`](Self::reload), telling `progress` how each app's reload goes.
    pub async fn reload_reporting(
        &self,
        target: &str,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> OpResult {
        let resolved = self.resolve(target)?;
        if resolved.is_empty() {
            return Ok("no apps".into());
        }
        let mut done = Vec::new();
        let mut failures = Vec::new();
        for (sup, t) in resolved {
            match sup.reload_reporting(None, t, progress).await {
                Ok(message) => done.push(message),
                Err(e) => failures.push(ControlError::app(&sup, e)),
            }
        }
        gather(done, failures)
    }

    /// Restart counters back to zero.
    pub fn reset(&self, target: &str) -> OpResult {
        self.each_now(target, |sup, t| sup.reset(t))
    }

    /// `send-signal SIGNAL TARGET`: the signal to each targeted worker's process.
    pub fn signal(&self, target: &str, signal: &str) -> OpResult {
        let signal = balancer_config::parse_signal(signal).map_err(ControlError::BadSignal)?;
        self.each_now(target, |sup, t| sup.signal(t, signal))
    }

    /// Delete apps (or one worker).
    pub async fn delete(&self, target: &str) -> OpResult {
        let resolved = self.resolve(target)?;
        let mut done = Vec::new();
        for (sup, t) in resolved {
            match t {
                Target::Worker(id) => done.push(
                    sup.remove_worker(id)
                        .await
                        .map_err(|e| ControlError::app(&sup, e))?,
                ),
                Target::All => done.push(self.delete_app(&sup.app().name).await?),
            }
        }
        Ok(done.join("; "))
    }

    /// `scale APP N|+N|-N|max`.
    pub async fn scale(&self, app: &str, to: ScaleTo) -> OpResult {
        let sup = self
            .supervisor(app)
            .ok_or_else(|| ControlError::UnknownApp(app.to_owned()))?;
        let wanted = to
            .resolve(sup.worker_count(), self.load.cpus)
            .map_err(ControlError::BadScale)?;
        sup.scale(wanted)
            .await
            .map_err(|e| ControlError::app(&sup, e))
    }

    /// Drains and stops an app's workers, closes its listeners and forgets it.
    async fn delete_app(&self, name: &str) -> OpResult {
        let entry = {
            let mut entries = self.entries();
            let pos = entries
                .iter()
                .position(|e| e.sup.app().name == name)
                .ok_or_else(|| ControlError::UnknownApp(name.to_owned()))?;
            entries.remove(pos)
        };
        for l in &entry.listeners {
            l.stop.cancel();
        }
        entry.sup.shutdown().await;
        Ok(format!("deleted {name}"))
    }

    /// Stop accepting, drain and stop every app, then end the connections clients still hold.
    ///
    /// After an `upgrade` handed everything over, the order changes: the workers stay in their
    /// pools while this master's own client connections finish (up to the longest
    /// `drain_timeout`; an idle HTTP keep-alive connection gets its next answer with
    /// `Connection: close`), since a request on them still needs a worker here.
    async fn shutdown(&self) {
        let handed_over = self.upgrade.handed_over();
        tracing::info!("shutting down: no longer accepting; draining connections");
        if handed_over {
            crate::proxy::http::close_keep_alive_on_stop();
        }
        let entries = std::mem::take(&mut *self.entries());
        for l in entries.iter().flat_map(|e| &e.listeners) {
            l.stop.cancel();
        }
        if handed_over {
            let longest = entries
                .iter()
                .map(|e| e.sup.app().drain_timeout)
                .max()
                .unwrap_or_default();
            self.connections.close();
            if tokio::time::timeout(longest, self.connections.wait())
                .await
                .is_err()
            {
                tracing::info!(
                    open = self.connections.len(),
                    "drain_timeout reached with client connections still open"
                );
            }
        }
        // Each supervisor drains its workers (≤ drain_timeout: live connections finish) and then
        // stops them (kill_signal, kill_timeout, SIGKILL). Apps shut down side by side.
        let mut stopping = tokio::task::JoinSet::new();
        for e in &entries {
            let sup = Arc::clone(&e.sup);
            stopping.spawn(async move { sup.shutdown().await });
        }
        while stopping.join_next().await.is_some() {}
        // The workers have exited; what they wrote last may still be in the log relay's pipes.
        let _ = tokio::task::spawn_blocking(|| {
            balancer_workers::logs::relay::drain(std::time::Duration::from_secs(3))
        })
        .await;

        self.connections.close();
        if tokio::time::timeout(LINGER_AFTER_STOP, self.connections.wait())
            .await
            .is_err()
        {
            tracing::info!(
                open = self.connections.len(),
                "closing connections left open by clients"
            );
            self.abort_connections.cancel();
            self.connections.wait().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_error() {
        let bad = ControlError::BadConfig(ConfigErrors(vec![]));
        assert_eq!(bad.exit_code(), 2);
        assert_eq!(ControlError::UnknownApp("x".into()).exit_code(), 1);
        let both = ControlError::Several(vec![ControlError::UnknownApp("x".into()), bad]);
        assert_eq!(both.exit_code(), 2);
        assert_eq!(
            both.to_string(),
            "no app named \"x\"; ",
            "each failure in turn"
        );
    }
}
