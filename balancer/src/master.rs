//! The master: owns the apps (their supervisors and public listeners), applies configuration
//! changes, carries out the admin socket's operations, and shuts everything down in order —
//! stop accepting, drain, stop workers.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use balancer_config::{App, Config, Listener, LoadOptions, Policy};
use balancer_workers::reuseport::Group;
use balancer_workers::{AppSupervisor, OpError, SpawnContext, Target, WorkerStatus};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::home::{HomeLock, LockError};
use crate::listener::{self, Bound};
use crate::proxy::{Route, RouteSettings};

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

/// Why the master could not run.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    /// A public listener could not be bound; nothing was started.
    #[error("cannot listen on {listener} (app {app})")]
    Bind {
        /// The listener, as written in the config.
        listener: String,
        /// The app that owns it.
        app: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The home could not be prepared or is taken by another master.
    #[error(transparent)]
    Home(#[from] LockError),
    /// The admin socket could not be created.
    #[error("cannot create the admin socket {0}")]
    Admin(PathBuf, #[source] io::Error),
}

/// Where an app's configuration came from, so `reload FILE` knows which apps the file owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A balancer.toml (absolute path).
    File(PathBuf),
    /// Built from command-line arguments.
    CommandLine,
}

/// Whether `apply` replaces workers of apps that did not change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// `start FILE`: start new apps, apply changes, leave unchanged apps alone.
    Start,
    /// `reload FILE`: like `Start`, and reload unchanged apps too (a deploy changed their code).
    Reload,
}

/// One public listener of an app.
struct ListenerEntry {
    config: Listener,
    route: Arc<Route>,
    stop: CancellationToken,
}

/// One app: its supervisor, listeners and origin.
struct AppEntry {
    sup: Arc<AppSupervisor>,
    listeners: Vec<ListenerEntry>,
    source: Source,
}

/// The running master.
pub struct Master {
    home: PathBuf,
    load: LoadOptions,
    env: Arc<SpawnContext>,
    apps: Mutex<Vec<AppEntry>>,
    /// One configuration change at a time (operations on single apps lock in their supervisor).
    changes: tokio::sync::Mutex<()>,
    abort_connections: CancellationToken,
    connections: TaskTracker,
    shutdown: CancellationToken,
}

/// What the master needs to run.
#[derive(Debug)]
pub struct MasterOptions {
    /// `$BALANCER_HOME`: the lock, the admin socket and the logs live here.
    pub home: PathBuf,
    /// Cancelled to begin a graceful shutdown (SIGTERM/SIGINT, or `kill` on the admin socket).
    pub shutdown: CancellationToken,
    /// Receives the master's phases.
    pub phase: watch::Sender<Phase>,
    /// CPU count and default policy for configs loaded later (`start FILE`).
    pub load: LoadOptions,
    /// Reload every app when this is notified (SIGHUP in the binary).
    pub reload_all: Option<Arc<tokio::sync::Notify>>,
}

/// Runs the master until `opts.shutdown` is cancelled and everything has stopped.
///
/// Takes the home's lock (one master per home), binds every public listener of `config` before
/// any worker starts (a taken port fails the start cleanly), serves the admin socket, and serves
/// until told to stop.
pub async fn run(config: Config, source: Source, opts: MasterOptions) -> Result<(), MasterError> {
    let _ = opts.phase.send(Phase::Starting);
    let lock = HomeLock::acquire(&opts.home)?;
    let master = Arc::new(Master {
        home: opts.home.clone(),
        load: opts.load.clone(),
        env: SpawnContext::new(
            opts.home.clone(),
            std::env::current_exe().unwrap_or_else(|_| PathBuf::from("balancer")),
            Arc::new(crate::proxy::tcp::rescue),
        ),
        apps: Mutex::new(Vec::new()),
        changes: tokio::sync::Mutex::new(()),
        abort_connections: CancellationToken::new(),
        connections: TaskTracker::new(),
        shutdown: opts.shutdown.clone(),
    });

    let bound = bind_all(&config.apps)?;
    for (app, sockets) in config.apps.into_iter().zip(bound) {
        master.add_app(app, sockets, source.clone());
    }

    let admin_path = lock.admin_socket();
    let admin = crate::admin::server::bind(&admin_path)
        .map_err(|e| MasterError::Admin(admin_path.clone(), e))?;
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(crate::admin::server::serve(
        admin,
        Arc::clone(&master),
        admin_stop.clone(),
    ));
    if let Some(notify) = opts.reload_all.clone() {
        let master = Arc::clone(&master);
        tokio::spawn(async move {
            loop {
                notify.notified().await;
                tracing::info!("reloading every app (SIGHUP)");
                match master.reload("all").await {
                    Ok(done) => tracing::info!("{done}"),
                    Err(e) => tracing::error!("reload failed: {e}"),
                }
            }
        });
    }

    let _ = opts.phase.send(Phase::Running);
    tracing::info!(
        apps = master.apps().len(),
        home = %opts.home.display(),
        "master running (pid {})",
        std::process::id()
    );

    opts.shutdown.cancelled().await;
    let _ = opts.phase.send(Phase::ShuttingDown);
    master.shutdown().await;
    admin_stop.cancel();
    let _ = admin_task.await;
    drop(lock);
    let _ = opts.phase.send(Phase::Stopped);
    tracing::info!("master stopped");
    Ok(())
}

/// Binds every listener of `apps`, all or nothing. Reuseport apps get no master socket (their
/// workers each get their own); their addresses are only checked to be shareable.
fn bind_all(apps: &[App]) -> Result<Vec<Vec<Bound>>, MasterError> {
    apps.iter()
        .map(|app| {
            app.listen
                .iter()
                .filter_map(|l| {
                    bind_for(app, l)
                        .map_err(|source| MasterError::Bind {
                            listener: l.to_string(),
                            app: app.name.clone(),
                            source,
                        })
                        .transpose()
                })
                .collect()
        })
        .collect()
}

/// The master's socket for `listener` of `app`: bound under rr, `None` under reuseport (after
/// checking that the address can be shared).
fn bind_for(app: &App, listener: &Listener) -> std::io::Result<Option<Bound>> {
    match app.policy {
        Policy::RoundRobin => listener::bind(listener).map(Some),
        Policy::ReusePort => Group::check_bind(listener).map(|()| None),
    }
}

/// Whether two listeners are served by the same socket (their env var names may differ).
fn same_socket(a: &Listener, b: &Listener) -> bool {
    a.addr == b.addr && a.proto == b.proto
}

fn route_settings(app: &App, listener_index: usize) -> RouteSettings {
    RouteSettings {
        listener_index,
        connect_timeout: app.connect_timeout,
        queue_timeout: app.queue_timeout,
        udp: app.udp,
        http: app.http,
    }
}

/// A target named on the command line, resolved to supervisors.
type Resolved = Vec<(Arc<AppSupervisor>, Target)>;

impl Master {
    /// `$BALANCER_HOME`.
    pub fn home(&self) -> &Path {
        &self.home
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
    pub fn resolve(&self, target: &str) -> Result<Resolved, String> {
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
        Err(format!("no app or worker id named {target:?}"))
    }

    /// Loads a balancer.toml with the master's CPU count and default policy.
    pub fn load(&self, file: &Path, env: Option<String>) -> Result<Config, String> {
        let opts = LoadOptions {
            env,
            ..self.load.clone()
        };
        balancer_config::load(file, &opts).map_err(|e| e.to_string())
    }

    /// Parses balancer.toml text built by the CLI.
    pub fn parse(&self, toml: &str, cwd: &Path, env: Option<String>) -> Result<Config, String> {
        let opts = LoadOptions {
            env,
            ..self.load.clone()
        };
        balancer_config::parse(toml, &cwd.join("(command line)"), &opts).map_err(|e| e.to_string())
    }

    fn add_app(&self, app: App, sockets: Vec<Bound>, source: Source) -> Arc<AppSupervisor> {
        let sup = AppSupervisor::start(app.clone(), Arc::clone(&self.env));
        let listeners = app
            .listen
            .iter()
            .zip(sockets)
            .enumerate()
            .map(|(index, (config, socket))| {
                self.serve_listener(&sup, config.clone(), index, socket)
            })
            .collect();
        self.entries().push(AppEntry {
            sup: Arc::clone(&sup),
            listeners,
            source,
        });
        sup
    }

    fn serve_listener(
        &self,
        sup: &Arc<AppSupervisor>,
        config: Listener,
        index: usize,
        socket: Bound,
    ) -> ListenerEntry {
        let app = sup.app();
        let route = Arc::new(Route::new(
            app.name.clone(),
            Arc::clone(sup.pool()),
            route_settings(&app, index),
        ));
        let stop = CancellationToken::new();
        tracing::info!(app = %app.name, listener = %config, "listening");
        tokio::spawn(listener::serve(
            config.proto,
            socket,
            listener::ServeContext {
                route: Arc::clone(&route),
                stop: stop.clone(),
                abort: self.abort_connections.clone(),
                tracker: self.connections.clone(),
            },
        ));
        ListenerEntry {
            config,
            route,
            stop,
        }
    }

    /// Applies a configuration: new apps start, changed apps reload with their new config (and
    /// new worker count), apps that `source` brought earlier but the config no longer has are
    /// deleted. With [`Apply::Reload`], unchanged apps are reloaded too. New listeners are all
    /// bound before anything changes, so a taken port changes nothing.
    pub async fn apply(
        &self,
        config: Config,
        source: Source,
        mode: Apply,
    ) -> Result<String, String> {
        let _change = self.changes.lock().await;
        // Bind first: every listener that no current app already holds.
        let mut fresh = Vec::new();
        for app in &config.apps {
            let held = self.held_listeners(&app.name);
            let mut sockets = Vec::new();
            for l in app
                .listen
                .iter()
                .filter(|l| !held.iter().any(|h| same_socket(h, l)))
            {
                let socket = listener::bind(l)
                    .map_err(|e| format!("cannot listen on {l} (app {}): {e}", app.name))?;
                sockets.push((l.clone(), socket));
            }
            fresh.push(sockets);
        }

        let mut done = Vec::new();
        let mut failures = Vec::new();
        let names: Vec<String> = config.apps.iter().map(|a| a.name.clone()).collect();
        for (app, sockets) in config.apps.into_iter().zip(fresh) {
            let name = app.name.clone();
            match self.supervisor(&name) {
                None => {
                    let sockets = sockets.into_iter().map(|(_, s)| s).collect();
                    let sup = self.add_app(app, sockets, source.clone());
                    match sup.wait_started().await {
                        Ok(()) => done.push(format!("started {name}")),
                        Err(e) => failures.push(format!("{name}: {e}")),
                    }
                }
                Some(sup) => {
                    let current = sup.app();
                    let same_but_count = App {
                        instances: current.instances,
                        instances_spec: current.instances_spec,
                        ..app.clone()
                    } == *current;
                    let result = if same_but_count && mode == Apply::Start {
                        if app.instances == current.instances {
                            Ok(format!("{name} unchanged"))
                        } else {
                            sup.rescale(app.clone()).await
                        }
                    } else {
                        sup.reload(Some(app.clone()), Target::All).await
                    };
                    match result {
                        Ok(message) => {
                            self.rewire_listeners(&sup, &app, sockets);
                            self.set_source(&name, source.clone());
                            done.push(message);
                        }
                        Err(e) => failures.push(format!("{name}: {e}")),
                    }
                }
            }
        }
        // Apps this source brought before that it no longer lists.
        let gone: Vec<String> = self
            .entries()
            .iter()
            .filter(|e| e.source == source && !names.contains(&e.sup.app().name))
            .map(|e| e.sup.app().name.clone())
            .collect();
        for name in gone {
            done.push(self.delete_app(&name).await?);
        }
        if failures.is_empty() {
            Ok(done.join("; "))
        } else {
            Err(failures.join("; "))
        }
    }

    /// The listeners app `name` holds now (none if there is no such app).
    fn held_listeners(&self, name: &str) -> Vec<Listener> {
        self.entries()
            .iter()
            .find(|e| e.sup.app().name == name)
            .map(|e| e.listeners.iter().map(|l| l.config.clone()).collect())
            .unwrap_or_default()
    }

    fn set_source(&self, name: &str, source: Source) {
        if let Some(e) = self.entries().iter_mut().find(|e| e.sup.app().name == name) {
            e.source = source;
        }
    }

    /// After a reload changed `app`: keep the listeners it still has (re-pointed at the right
    /// private port), serve the newly bound ones, close the ones it dropped.
    fn rewire_listeners(
        &self,
        sup: &Arc<AppSupervisor>,
        app: &App,
        mut fresh: Vec<(Listener, Bound)>,
    ) {
        let old = {
            let mut entries = self.entries();
            let Some(entry) = entries.iter_mut().find(|e| Arc::ptr_eq(&e.sup, sup)) else {
                return;
            };
            std::mem::take(&mut entry.listeners)
        };
        let mut kept = Vec::new();
        let mut old = old;
        for (index, config) in app.listen.iter().enumerate() {
            if let Some(pos) = old.iter().position(|l| same_socket(&l.config, config)) {
                let mut entry = old.remove(pos);
                entry.route.update(route_settings(app, index));
                entry.config = config.clone();
                kept.push(entry);
            } else if let Some(pos) = fresh.iter().position(|(l, _)| l == config) {
                let (_, socket) = fresh.remove(pos);
                kept.push(self.serve_listener(sup, config.clone(), index, socket));
            }
        }
        for closed in old {
            tracing::info!(app = %app.name, listener = %closed.config, "listener closed");
            closed.stop.cancel();
        }
        if let Some(entry) = self.entries().iter_mut().find(|e| Arc::ptr_eq(&e.sup, sup)) {
            entry.listeners = kept;
        }
    }

    /// Drains and stops an app's workers, closes its listeners and forgets it.
    async fn delete_app(&self, name: &str) -> Result<String, String> {
        let entry = {
            let mut entries = self.entries();
            let pos = entries
                .iter()
                .position(|e| e.sup.app().name == name)
                .ok_or_else(|| format!("no app named {name:?}"))?;
            entries.remove(pos)
        };
        for l in &entry.listeners {
            l.stop.cancel();
        }
        entry.sup.shutdown().await;
        Ok(format!("deleted {name}"))
    }

    async fn each(
        &self,
        target: &str,
        op: impl AsyncFn(Arc<AppSupervisor>, Target) -> Result<String, OpError>,
    ) -> Result<String, String> {
        let resolved = self.resolve(target)?;
        if resolved.is_empty() {
            return Ok("no apps".into());
        }
        let mut done = Vec::new();
        let mut failures = Vec::new();
        for (sup, t) in resolved {
            match op(Arc::clone(&sup), t).await {
                Ok(message) => done.push(message),
                Err(e) => failures.push(format!("{}: {e}", sup.app().name)),
            }
        }
        if failures.is_empty() {
            Ok(done.join("; "))
        } else {
            Err(failures.join("; "))
        }
    }

    /// Drain and stop (the app stays listed, its listeners keep holding connections).
    pub async fn stop(&self, target: &str) -> Result<String, String> {
        self.each(target, async |sup, t| sup.stop(t).await).await
    }

    /// Start stopped or errored workers again.
    pub async fn start_stopped(&self, target: &str) -> Result<String, String> {
        self.each(target, async |sup, t| sup.start_stopped(t).await)
            .await
    }

    /// Stop then start.
    pub async fn restart(&self, target: &str) -> Result<String, String> {
        self.each(target, async |sup, t| sup.restart(t).await).await
    }

    /// Zero-downtime replacement of workers.
    pub async fn reload(&self, target: &str) -> Result<String, String> {
        self.each(target, async |sup, t| sup.reload(None, t).await)
            .await
    }

    /// Delete apps (or one worker).
    pub async fn delete(&self, target: &str) -> Result<String, String> {
        let resolved = self.resolve(target)?;
        let mut done = Vec::new();
        for (sup, t) in resolved {
            match t {
                Target::Worker(id) => {
                    done.push(sup.remove_worker(id).await.map_err(|e| e.to_string())?)
                }
                _ => done.push(self.delete_app(&sup.app().name).await?),
            }
        }
        Ok(done.join("; "))
    }

    /// `scale APP N|+N|-N|max`.
    pub async fn scale(&self, app: &str, to: &str) -> Result<String, String> {
        let sup = self
            .supervisor(app)
            .ok_or_else(|| format!("no app named {app:?}"))?;
        let wanted = parse_scale(to, i64::from(sup.worker_count()), self.load.cpus)?;
        sup.scale(wanted).await.map_err(|e| e.to_string())
    }

    /// Stop accepting, drain and stop every app, then end the connections clients still hold.
    async fn shutdown(&self) {
        tracing::info!("shutting down: no longer accepting; draining connections");
        let entries = std::mem::take(&mut *self.entries());
        for l in entries.iter().flat_map(|e| &e.listeners) {
            l.stop.cancel();
        }
        // Each supervisor drains its workers (≤ drain_timeout: live connections finish) and then
        // stops them (kill_signal, kill_timeout, SIGKILL). Apps shut down side by side.
        let mut stopping = tokio::task::JoinSet::new();
        for e in &entries {
            let sup = Arc::clone(&e.sup);
            stopping.spawn(async move { sup.shutdown().await });
        }
        while stopping.join_next().await.is_some() {}

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

/// `N`, `+N`, `-N` or `max`, against the current count and the CPU count.
pub fn parse_scale(to: &str, current: i64, cpus: u32) -> Result<u32, String> {
    let bad = || format!("bad worker count {to:?}: expected N, +N, -N or max");
    let wanted = if to == "max" {
        i64::from(cpus)
    } else if let Some(n) = to.strip_prefix('+') {
        current + n.parse::<i64>().map_err(|_| bad())?
    } else if let Some(n) = to.strip_prefix('-') {
        current - n.parse::<i64>().map_err(|_| bad())?
    } else {
        to.parse::<i64>().map_err(|_| bad())?
    };
    if wanted < 0 {
        return Err(format!("cannot scale to {wanted} workers"));
    }
    u32::try_from(wanted).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_counts() {
        assert_eq!(parse_scale("3", 1, 8), Ok(3));
        assert_eq!(parse_scale("+2", 1, 8), Ok(3));
        assert_eq!(parse_scale("-1", 3, 8), Ok(2));
        assert_eq!(parse_scale("max", 1, 8), Ok(8));
        assert!(parse_scale("-4", 3, 8).is_err());
        assert!(parse_scale("lots", 3, 8).is_err());
    }
}
