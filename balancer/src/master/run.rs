//! Booting the master and living with signals: the runtime, the home lock, the first apps'
//! listeners (all bound before any worker starts), the admin socket, SIGTERM/SIGINT (graceful
//! shutdown, a second one exits at once) and SIGHUP (reload every app).

use std::path::PathBuf;
use std::sync::Arc;

use balancer_config::{App, Config, LoadOptions};

use crate::protocol::Load;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::apply::bind_for;
use super::{Master, MasterError, Phase, Source, admin};
use crate::home::{self, HomeLock};
use crate::listener::Bound;

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
    pub reload_all: Option<Arc<Notify>>,
}

/// Runs the master until `opts.shutdown` is cancelled and everything has stopped.
///
/// Takes the home's lock (one master per home), binds every public listener of `config` before
/// any worker starts (a taken port fails the start cleanly), serves the admin socket, and serves
/// until told to stop.
pub async fn run(config: Config, source: Source, opts: MasterOptions) -> Result<(), MasterError> {
    let _ = opts.phase.send(Phase::Starting);
    let lock = HomeLock::acquire(&opts.home)?;
    raise_fd_limit();
    let shim = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("balancer"));
    let master = Arc::new(Master::new(
        opts.home.clone(),
        opts.load.clone(),
        opts.shutdown.clone(),
        Some(shim),
    ));

    let _ = master.me.set(Arc::downgrade(&master));
    master
        .spawn
        .sampler
        .set_interval(config.balancer.sample_interval);
    let bound = bind_all(&config.apps)?;
    if let Some(addr) = config.balancer.metrics {
        master
            .serve_metrics(addr)
            .map_err(|e| MasterError::Metrics(addr, e))?;
    }
    let upkeep_stop = CancellationToken::new();
    tokio::spawn(super::metrics::upkeep(upkeep_stop.clone()));
    for (app, sockets) in config.apps.into_iter().zip(bound) {
        master.add_app(app, sockets, source.clone());
    }

    let admin_path = lock.admin_socket();
    let admin = admin::bind(&admin_path).map_err(|e| MasterError::Admin(admin_path.clone(), e))?;
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin::serve(admin, Arc::clone(&master), admin_stop.clone()));
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
    upkeep_stop.cancel();
    if let Some(endpoint) = master
        .endpoint
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        endpoint.stop();
    }
    let _ = admin_task.await;
    drop(lock);
    let _ = opts.phase.send(Phase::Stopped);
    tracing::info!("master stopped");
    Ok(())
}

/// Below this many descriptors the master says at start that it may run short: every proxied
/// TCP connection takes two, every UDP flow one.
const SMALL_FD_BUDGET: u64 = 4096;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, as nginx and HAProxy do: the default soft
/// limit (often 1024) is far below what a proxy needs, and the hard limit is what the
/// administrator allowed.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!("cannot read RLIMIT_NOFILE: {e}");
            return;
        }
    };
    let mut now = soft;
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                now = hard;
                tracing::debug!(from = soft, to = hard, "raised the open file limit");
            }
            Err(e) => tracing::warn!("cannot raise RLIMIT_NOFILE from {soft} to {hard}: {e}"),
        }
    }
    if now < SMALL_FD_BUDGET {
        tracing::warn!(
            "the open file limit is {now} (hard limit {hard}): about {} proxied connections at once; \
             raise it (`ulimit -Hn`, LimitNOFILE= in a systemd unit)",
            now / 2
        );
    }
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

/// `balancer run FILE` (and `start --no-daemon`): the master in the foreground, owning the
/// file's apps.
pub fn foreground(config: Config) -> Result<(), MasterError> {
    let source =
        Source::File(std::path::absolute(&config.source).unwrap_or_else(|_| config.source.clone()));
    block_on(config, source)
}

/// `balancer daemon`, spawned by `start` with its stdio on `balancer.log`: leave the
/// terminal's session before any thread exists, then run a master with no apps; `start`
/// sends them over the admin socket.
pub fn run_daemon() -> Result<(), MasterError> {
    if let Err(e) = nix::unistd::setsid() {
        tracing::warn!("setsid: {e}");
    }
    // Hold no directory busy; every path the daemon gets is absolute.
    let _ = std::env::set_current_dir("/");
    let home = home::from_env();
    let config = Config {
        source: home.join(home::PID_FILE),
        balancer: Default::default(),
        apps: Vec::new(),
    };
    // No apps yet: the source only names where this empty config came from.
    let source = Source::File(config.source.clone());
    block_on(config, source)
}

/// Builds the runtime and runs the master on it, with the process's signals wired in.
fn block_on(config: Config, source: Source) -> Result<(), MasterError> {
    let setup = |what| move |source| MasterError::Setup { what, source };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("balancer")
        .build()
        .map_err(setup("async runtime"))?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        spawn_signal_handler(shutdown.clone()).map_err(setup("SIGTERM/SIGINT handler"))?;
        let reload_all = Arc::new(Notify::new());
        spawn_reload_on_sighup(Arc::clone(&reload_all)).map_err(setup("SIGHUP handler"))?;
        let (phase, _) = watch::channel(Phase::Starting);
        let opts = MasterOptions {
            home: home::from_env(),
            shutdown,
            phase,
            load: Load::options(None, None).0,
            reload_all: Some(reload_all),
        };
        run(config, source, opts).await
    })
}

/// First SIGTERM/SIGINT: graceful shutdown. A second one: leave at once (workers die with us,
/// through PR_SET_PDEATHSIG).
fn spawn_signal_handler(shutdown: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let mut received = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            received += 1;
            if received == 1 {
                tracing::info!("signal received: graceful shutdown (send it again to force)");
                shutdown.cancel();
            } else {
                tracing::warn!("second signal: exiting now");
                std::process::exit(130);
            }
        }
    });
    Ok(())
}

/// SIGHUP reloads every app, like HAProxy and nginx.
fn spawn_reload_on_sighup(reload_all: Arc<Notify>) -> std::io::Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            reload_all.notify_one();
        }
    });
    Ok(())
}
