//! Booting the master and living with signals: the runtime, the home lock, the first apps'
//! listeners (all bound before any worker starts), the admin socket, SIGTERM/SIGINT (graceful
//! shutdown, a second one exits at once) and SIGHUP (reload every app); systemd's
//! `Type=notify` messages (`notify.rs`) and, as PID 1, zombie reaping (`reaper.rs`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use balancer_config::{App, Config, LoadOptions};
use balancer_workers::WorkerState;

use crate::protocol::Load;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::apply::bind_for;
use super::{BindError, Master, MasterError, Phase, Source, admin, dump, notify};
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
    /// How the first apps were loaded, for `save` (`None`: they are not saved).
    pub origin: Option<dump::Origin>,
    /// Start what the home's `dump.json` holds once the admin socket serves (`run` with no
    /// file, as the systemd unit runs it). A missing dump is a warning: the master serves
    /// empty, as a daemon does, and `balancer start` fills it.
    pub resurrect: bool,
    /// Upgrade the master when this is notified (SIGUSR2 in the binary).
    pub upgrade: Option<Arc<Notify>>,
}

/// Runs the master until `opts.shutdown` is cancelled and everything has stopped.
///
/// Takes the home's lock (one master per home), binds every public listener of `config` before
/// any worker starts (a taken port fails the start cleanly), serves the admin socket, and serves
/// until told to stop.
pub async fn run(config: Config, source: Source, opts: MasterOptions) -> Result<(), MasterError> {
    let _ = opts.phase.send(Phase::Starting);
    let lock = HomeLock::acquire(&opts.home)?;
    // Before any worker can orphan anything.
    let reaper = super::reaper::spawn_if_init();
    raise_fd_limit();
    let master = new_master(&opts, false);
    master.keep_for_upgrade(std::env::current_exe().ok(), &lock);
    for app in &config.apps {
        balancer_workers::capture::check(app)?;
    }
    master
        .spawn
        .sampler
        .set_interval(config.balancer.sample_interval);
    crate::proxy::uring::set(config.balancer.io).map_err(MasterError::Uring)?;
    let bound = bind_all(&config.apps)?;
    if let Some(origin) = &opts.origin {
        master.remember(config.apps.iter().map(|a| a.name.clone()), origin);
    }
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
    live(
        master,
        lock,
        admin,
        opts,
        Running {
            reaper,
            upkeep_stop,
        },
    )
    .await
}

/// A master with no apps yet, for `opts`. `gated`: its listeners wait for
/// `accept_gate` before their first accept (a master taking over from another).
pub(super) fn new_master(opts: &MasterOptions, gated: bool) -> Arc<Master> {
    let shim = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("balancer"));
    let mut master = Master::new(
        opts.home.clone(),
        opts.load.clone(),
        opts.shutdown.clone(),
        Some(shim),
    );
    if gated {
        master.accept_gate = CancellationToken::new();
    }
    let master = Arc::new(master);
    let _ = master.me.set(Arc::downgrade(&master));
    let _ = master
        .spawn
        .learn
        .set(super::learn::hook(Arc::downgrade(&master)));
    master
}

/// What a booted master keeps running besides its apps, stopped at its end.
pub(super) struct Running {
    /// The PID-1 reaper, when there is one.
    pub(super) reaper: Option<tokio::task::JoinHandle<()>>,
    /// Stops the metrics upkeep.
    pub(super) upkeep_stop: CancellationToken,
}

/// The master's life once its apps are added and it holds the lock and the admin socket
/// (booted by [`run`], or taken over from another master): serve the admin socket, answer
/// signals (SIGHUP reloads, SIGUSR2 upgrades), tell systemd, and shut down in order.
pub(super) async fn live(
    master: Arc<Master>,
    mut lock: HomeLock,
    admin: tokio::net::UnixListener,
    opts: MasterOptions,
    running: Running,
) -> Result<(), MasterError> {
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin::serve(admin, Arc::clone(&master), admin_stop.clone()));
    if opts.resurrect {
        match master.resurrect().await {
            Ok(done) => tracing::info!("resurrected: {done}"),
            Err(e @ super::ControlError::NoDump(_)) => tracing::warn!("{e}; starting empty"),
            Err(e) => tracing::error!("resurrect: {}", balancer_workers::Chain(&e)),
        }
    }
    let systemd = notify::Notifier::from_env().map(Arc::new);
    if let Some(notify) = opts.reload_all.clone() {
        let master = Arc::clone(&master);
        let systemd = systemd.clone();
        tokio::spawn(async move {
            loop {
                notify.notified().await;
                tracing::info!("reloading every app (SIGHUP)");
                if let Some(systemd) = &systemd {
                    systemd.reloading();
                }
                match master.reload("all").await {
                    Ok(done) => tracing::info!("{done}"),
                    Err(e) => tracing::error!("reload failed: {e}"),
                }
                if let Some(systemd) = &systemd {
                    systemd.send("READY=1");
                }
            }
        });
    }
    if let Some(upgrade) = opts.upgrade.clone() {
        spawn_upgrade_on_signal(Arc::clone(&master), upgrade);
    }
    if let Some(systemd) = &systemd {
        spawn_systemd_tasks(Arc::clone(&master), Arc::clone(systemd));
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
    let handed_over = master.upgrade.handed_over();
    if let Some(systemd) = &systemd
        && !handed_over
    {
        // After an upgrade the service is not stopping: its main pid is the new master.
        systemd.send("STOPPING=1");
    }
    master.shutdown().await;
    admin_stop.cancel();
    running.upkeep_stop.cancel();
    if let Some(endpoint) = master
        .endpoint
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        endpoint.stop();
    }
    let _ = admin_task.await;
    if handed_over {
        lock.hand_over();
    }
    drop(lock);
    if let Some(reaper) = running.reaper {
        reaper.abort();
    }
    let _ = opts.phase.send(Phase::Stopped);
    tracing::info!("master stopped");
    Ok(())
}

/// SIGUSR2 upgrades the master in place, as nginx does: the same as `balancer upgrade` with
/// its defaults, progress and outcome in the master's log.
fn spawn_upgrade_on_signal(master: Arc<Master>, signalled: Arc<Notify>) {
    tokio::spawn(async move {
        loop {
            signalled.notified().await;
            tracing::info!("upgrading the master (SIGUSR2)");
            let timeout = Duration::from_millis(crate::protocol::UPGRADE_TIMEOUT_MS);
            let report = |line: String| tracing::info!("upgrade: {line}");
            match master.upgrade(None, timeout, &report).await {
                Ok(done) => tracing::info!("{done}"),
                Err(e) => tracing::error!("upgrade failed: {}", balancer_workers::Chain(&e)),
            }
        }
    });
}

/// How often the master looks whether its first workers have all settled, for `READY=1`.
const SETTLE_POLL: Duration = Duration::from_millis(50);

/// `READY=1` once no worker of the first apps is still starting (each is ready, or has failed
/// and waits for a restart or is errored: systemd should not hold the boot for a broken app),
/// and the `WATCHDOG=1` pings. The pings come from a task on the runtime, so a runtime that
/// stops making progress stops them and systemd restarts the master.
fn spawn_systemd_tasks(master: Arc<Master>, systemd: Arc<notify::Notifier>) {
    let longest = master
        .apps()
        .iter()
        .map(|(app, _)| app.listen_timeout)
        .max()
        .unwrap_or_default();
    let ready = Arc::clone(&systemd);
    tokio::spawn(async move {
        // listen_timeout bounds every start; the second is slack for the restart bookkeeping.
        let deadline = tokio::time::Instant::now() + longest + Duration::from_secs(1);
        while tokio::time::Instant::now() < deadline && still_starting(&master) {
            tokio::time::sleep(SETTLE_POLL).await;
        }
        ready.send(&format!("READY=1\nMAINPID={}", std::process::id()));
    });
    if let Some(every) = systemd.watchdog() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                systemd.send("WATCHDOG=1");
            }
        });
    }
}

/// Whether any worker is still on its first way up.
fn still_starting(master: &Master) -> bool {
    master
        .apps()
        .iter()
        .flat_map(|(_, workers)| workers)
        .any(|w| w.state == WorkerState::Starting)
}

/// Below this many descriptors the master says at start that it may run short: every proxied
/// TCP connection takes two, every UDP flow one.
const SMALL_FD_BUDGET: u64 = 4096;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, as nginx and HAProxy do: the default soft
/// limit (often 1024) is far below what a proxy needs, and the hard limit is what the
/// administrator allowed.
pub(super) fn raise_fd_limit() {
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
                        .map_err(|source| {
                            MasterError::from(BindError {
                                listener: l.to_string(),
                                app: app.name.clone(),
                                source,
                            })
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
    block_on(config, source, None, false)
}

/// `balancer run FILE [--env NAME]`: [`foreground`], and `save` knows to read `FILE` again.
pub fn foreground_file(config: Config, env: Option<String>) -> Result<(), MasterError> {
    let file = std::path::absolute(&config.source).unwrap_or_else(|_| config.source.clone());
    let origin = dump::Origin::File {
        file: file.clone(),
        env,
        policy: None,
    };
    block_on(config, Source::File(file), Some(origin), false)
}

/// `balancer run` with no file: a foreground master that starts what `dump.json` holds
/// (what the systemd unit `balancer startup` writes runs).
pub fn foreground_resurrect() -> Result<(), MasterError> {
    let home = home::from_env();
    let config = Config {
        source: home::dump_file(&home),
        balancer: Default::default(),
        apps: Vec::new(),
    };
    let source = Source::File(config.source.clone());
    block_on(config, source, None, true)
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
    block_on(config, source, None, false)
}

/// Keeps glibc's allocator to one arena. By default every thread may get its own, and a
/// connection's memory is freed on whichever thread ends it, so after bursts each arena keeps
/// its own high-water mark and the master's RSS ratchets up; with one arena, what a burst freed
/// serves the next one. The per-thread caches in front of it keep small allocations lock-free.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets an allocator parameter; it runs before any other thread of
        // this process exists.
        #[allow(unsafe_code)]
        unsafe {
            nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
        }
    }
}

/// Builds the runtime and runs the master on it, with the process's signals wired in.
fn block_on(
    config: Config,
    source: Source,
    origin: Option<dump::Origin>,
    resurrect: bool,
) -> Result<(), MasterError> {
    with_runtime(origin, resurrect, |opts| run(config, source, opts))
}

/// Builds the runtime and runs `master` on it with the process's signals wired in
/// (SIGTERM/SIGINT, SIGHUP, SIGUSR2).
pub(super) fn with_runtime<F, Fut>(
    origin: Option<dump::Origin>,
    resurrect: bool,
    master: F,
) -> Result<(), MasterError>
where
    F: FnOnce(MasterOptions) -> Fut,
    Fut: std::future::Future<Output = Result<(), MasterError>>,
{
    let setup = |what| move |source| MasterError::Setup { what, source };
    one_malloc_arena();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("balancer")
        .build()
        .map_err(setup("async runtime"))?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        spawn_signal_handler(shutdown.clone()).map_err(setup("SIGTERM/SIGINT handler"))?;
        let reload_all = Arc::new(Notify::new());
        spawn_notify_on(SignalKind::hangup(), Arc::clone(&reload_all))
            .map_err(setup("SIGHUP handler"))?;
        let upgrade = Arc::new(Notify::new());
        spawn_notify_on(SignalKind::user_defined2(), Arc::clone(&upgrade))
            .map_err(setup("SIGUSR2 handler"))?;
        let (phase, _) = watch::channel(Phase::Starting);
        let opts = MasterOptions {
            home: home::from_env(),
            shutdown,
            phase,
            load: Load::options(None, None).0,
            reload_all: Some(reload_all),
            origin,
            resurrect,
            upgrade: Some(upgrade),
        };
        master(opts).await
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

/// SIGHUP reloads every app, like HAProxy and nginx; SIGUSR2 upgrades the master, like nginx.
/// Each notifies its task; a signal that comes while one runs is kept for after it.
fn spawn_notify_on(kind: SignalKind, notify: Arc<Notify>) -> std::io::Result<()> {
    let mut signals = signal(kind)?;
    tokio::spawn(async move {
        while signals.recv().await.is_some() {
            notify.notify_one();
        }
    });
    Ok(())
}
