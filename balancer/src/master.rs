//! The master: binds every public listener, starts a supervisor per app, serves until told to
//! stop, then shuts down in order — stop accepting, drain, stop workers.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use balancer_config::{Config, Proto};
use balancer_workers::AppSupervisor;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::listener;
use crate::proxy::tcp::TcpRoute;

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
    /// The home directory could not be created.
    #[error("cannot create home directory {0}")]
    Home(PathBuf, #[source] io::Error),
}

/// What the master needs to run.
#[derive(Debug)]
pub struct MasterOptions {
    /// `$BALANCER_HOME`: logs and (later) the admin socket live here.
    pub home: PathBuf,
    /// Cancelled to begin a graceful shutdown (SIGTERM/SIGINT in the binary).
    pub shutdown: CancellationToken,
    /// Receives the master's phases.
    pub phase: watch::Sender<Phase>,
}

/// Runs the master until `opts.shutdown` is cancelled and everything has stopped.
///
/// Every listener is bound before any worker starts, so a taken port fails the start cleanly.
pub async fn run(config: Config, opts: MasterOptions) -> Result<(), MasterError> {
    std::fs::create_dir_all(&opts.home).map_err(|e| MasterError::Home(opts.home.clone(), e))?;
    let _ = opts.phase.send(Phase::Starting);

    let mut bound = Vec::new();
    for app in &config.apps {
        for (index, l) in app.listen.iter().enumerate() {
            // The config crate refuses other protocols until their listeners exist.
            debug_assert_eq!(l.proto, Proto::Tcp);
            let socket = listener::tcp::bind(l.addr).map_err(|source| MasterError::Bind {
                listener: l.to_string(),
                app: app.name.clone(),
                source,
            })?;
            tracing::info!(app = %app.name, listener = %l, "listening");
            bound.push((app.name.clone(), index, socket));
        }
    }

    let ids = Arc::new(AtomicU32::new(0));
    let supervisors: Vec<Arc<AppSupervisor>> = config
        .apps
        .iter()
        .map(|app| AppSupervisor::start(app.clone(), opts.home.clone(), Arc::clone(&ids)))
        .collect();

    let stop_accepting = CancellationToken::new();
    let abort_connections = CancellationToken::new();
    let connections = TaskTracker::new();
    let accept_loops = TaskTracker::new();
    for (app_name, index, socket) in bound {
        let Some(sup) = supervisors.iter().find(|s| s.app().name == app_name) else {
            continue;
        };
        let app = sup.app();
        let route = Arc::new(TcpRoute {
            app: app.name.clone(),
            pool: Arc::clone(sup.pool()),
            listener_index: index,
            connect_timeout: app.connect_timeout,
            queue_timeout: app.queue_timeout,
        });
        accept_loops.spawn(listener::tcp::serve(
            socket,
            route,
            stop_accepting.clone(),
            abort_connections.clone(),
            connections.clone(),
        ));
    }
    accept_loops.close();
    let _ = opts.phase.send(Phase::Running);
    tracing::info!(
        apps = supervisors.len(),
        workers = config.apps.iter().map(|a| a.instances).sum::<u32>(),
        "master running (pid {})",
        std::process::id()
    );

    opts.shutdown.cancelled().await;
    let _ = opts.phase.send(Phase::ShuttingDown);
    tracing::info!("shutting down: no longer accepting; draining connections");
    stop_accepting.cancel();
    accept_loops.wait().await;

    // Each supervisor drains its workers (≤ drain_timeout: live connections finish) and then
    // stops them (kill_signal, kill_timeout, SIGKILL). Apps shut down side by side.
    let mut stopping = tokio::task::JoinSet::new();
    for sup in &supervisors {
        let sup = Arc::clone(sup);
        stopping.spawn(async move { sup.shutdown().await });
    }
    while stopping.join_next().await.is_some() {}

    connections.close();
    if tokio::time::timeout(LINGER_AFTER_STOP, connections.wait())
        .await
        .is_err()
    {
        tracing::info!(
            open = connections.len(),
            "closing connections left open by clients"
        );
        abort_connections.cancel();
        connections.wait().await;
    }
    let _ = opts.phase.send(Phase::Stopped);
    tracing::info!("master stopped");
    Ok(())
}
