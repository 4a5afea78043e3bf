//! An app's own reasons to reload: `watch` (a file changed) and `cron_restart` (a time came).
//! Both replace workers the way `reload` does (zero downtime), counted as `watch` or `cron`.
//!
//! The supervisor arms them while the app runs and disarms them when every worker is stopped,
//! when the app is deleted, and before re-arming with a changed configuration
//! ([`Triggers::sync`]). Watching is a thread per watched app (walking a tree and waiting on
//! inotify are blocking work, kept off the runtime that proxies); the schedule is a task that
//! sleeps. Neither holds the app: each keeps a `Weak` and ends when it is gone.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use balancer_config::{App, CronRestart, Watch};
use tokio_util::sync::CancellationToken;

use crate::status::RestartReason;
use crate::supervisor::AppSupervisor;
use crate::watch::{Rules, Stopper, WatchReport, Watcher};

/// The longest the schedule sleeps before looking at the clock again, so a clock that is set
/// (NTP, a suspended VM) moves the next reload with it.
const CRON_RECHECK: Duration = Duration::from_secs(60);

/// What `show` says about an app's triggers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TriggerStatus {
    /// Running: the app has a worker that is not stopped. A stopped app neither watches nor
    /// follows its schedule; `start` arms them again.
    pub armed: bool,
    /// `watch`, when configured.
    pub watch: Option<WatchStatus>,
    /// `cron_restart`, when configured.
    pub cron: Option<CronStatus>,
}

/// The watch of an app.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchStatus {
    /// The watched paths.
    pub paths: Vec<PathBuf>,
    /// Every ignore pattern in force, the defaults first.
    pub ignore: Vec<String>,
    /// The debounce.
    pub delay: Duration,
    /// What the watches cover; `None` while the tree is still being walked (or not armed).
    pub report: Option<WatchReport>,
}

/// The schedule of an app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronStatus {
    /// As written.
    pub pattern: String,
    /// The next reload (machine local time when printed); `None` when not armed.
    pub next: Option<SystemTime>,
}

/// The triggers of one app (kept by its supervisor).
#[derive(Default)]
pub(crate) struct Triggers {
    armed: Option<Armed>,
}

/// What is armed, and with which configuration.
struct Armed {
    watch: Option<Watch>,
    cron: Option<CronRestart>,
    /// The files the watch never counts (the app's logs), part of its configuration.
    logs: Vec<PathBuf>,
    live: Arc<Live>,
}

/// Shared with the thread and the task.
#[derive(Default)]
struct Live {
    /// Cancelled on disarm: the task ends, and a reload the trigger asked for is dropped.
    token: CancellationToken,
    /// Wakes the watch thread out of its wait, once it has a watcher.
    stopper: Mutex<Option<Stopper>>,
    report: Mutex<Option<Arc<Mutex<WatchReport>>>>,
    ignore: Mutex<Vec<String>>,
    next_cron: Mutex<Option<SystemTime>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Live {
    fn disarm(&self) {
        self.token.cancel();
        if let Some(stopper) = lock(&self.stopper).take() {
            stopper.stop();
        }
    }
}

impl Drop for Triggers {
    fn drop(&mut self) {
        if let Some(armed) = self.armed.take() {
            armed.live.disarm();
        }
    }
}

/// What the supervisor knows that the triggers need.
pub(crate) struct Context {
    /// The app, for messages and reloads.
    pub(crate) sup: Weak<AppSupervisor>,
    /// Whether the app runs (some worker is not stopped) and has not been shut down.
    pub(crate) running: bool,
    /// `$BALANCER_HOME`: never watched.
    pub(crate) home: PathBuf,
    /// The app's log files: never counted as changes.
    pub(crate) logs: Vec<PathBuf>,
}

impl Triggers {
    /// Arms what `app` asks for while it runs, disarms otherwise; a configuration that did not
    /// change leaves the armed triggers alone (no new walk of the tree).
    pub(crate) fn sync(&mut self, app: &App, ctx: Context) {
        let wanted = ctx.running && (app.watch.is_some() || app.cron_restart.is_some());
        if let Some(armed) = &self.armed
            && wanted
            && armed.watch == app.watch
            && armed.cron == app.cron_restart
            && armed.logs == ctx.logs
        {
            return;
        }
        if let Some(armed) = self.armed.take() {
            armed.live.disarm();
        }
        if !wanted {
            return;
        }
        let live = Arc::new(Live::default());
        if let Some(watch) = &app.watch {
            let rules = Rules::new(watch, &app.cwd, vec![ctx.home.clone()], ctx.logs.clone());
            *lock(&live.ignore) = rules.patterns();
            let (live, sup, watch, name) = (
                Arc::clone(&live),
                ctx.sup.clone(),
                watch.clone(),
                app.name.clone(),
            );
            let rt = tokio::runtime::Handle::current();
            let spawned = std::thread::Builder::new()
                .name(format!("watch-{}", app.name))
                .spawn(move || watch_thread(rules, watch.delay, live, sup, rt, name));
            if let Err(e) = spawned {
                tracing::warn!(app = %app.name, "cannot start watching: {e}");
            }
        }
        if let Some(cron) = &app.cron_restart {
            tokio::spawn(cron_task(
                cron.pattern.clone(),
                Arc::clone(&live),
                ctx.sup.clone(),
                app.name.clone(),
            ));
        }
        self.armed = Some(Armed {
            watch: app.watch.clone(),
            cron: app.cron_restart.clone(),
            logs: ctx.logs,
            live,
        });
    }

    /// What `show` prints.
    pub(crate) fn status(&self, app: &App) -> TriggerStatus {
        let live = self.armed.as_ref().map(|a| &a.live);
        TriggerStatus {
            armed: live.is_some(),
            watch: app.watch.as_ref().map(|w| WatchStatus {
                paths: w.paths.clone(),
                ignore: live.map_or_else(
                    || Rules::new(w, &app.cwd, Vec::new(), Vec::new()).patterns(),
                    |l| lock(&l.ignore).clone(),
                ),
                delay: w.delay,
                report: live
                    .and_then(|l| lock(&l.report).clone())
                    .map(|r| lock(&r).clone()),
            }),
            cron: app.cron_restart.as_ref().map(|c| CronStatus {
                pattern: c.pattern.clone(),
                next: live.and_then(|l| *lock(&l.next_cron)),
            }),
        }
    }
}

/// The watch: walk, watch, and reload on each debounced change until disarmed.
fn watch_thread(
    rules: Rules,
    delay: Duration,
    live: Arc<Live>,
    sup: Weak<AppSupervisor>,
    rt: tokio::runtime::Handle,
    name: String,
) {
    let cwd = rules.cwd().to_path_buf();
    let mut watcher = match Watcher::start(rules) {
        Ok(w) => w,
        Err(e) => {
            let why = crate::Chain(&e).to_string();
            tracing::warn!(app = %name, "{why}; the app runs on, unwatched");
            let report = WatchReport {
                warning: Some(format!("{why}; not watching")),
                ..WatchReport::default()
            };
            *lock(&live.report) = Some(Arc::new(Mutex::new(report)));
            return;
        }
    };
    {
        let mut stopper = lock(&live.stopper);
        if live.token.is_cancelled() {
            return;
        }
        *stopper = Some(watcher.stopper());
        *lock(&live.report) = Some(watcher.report_handle());
    }
    let report = lock(&watcher.report_handle()).clone();
    tracing::info!(
        app = %name,
        directories = report.watched,
        setup_ms = report.setup.map_or(0, |d| d.as_millis()),
        "watching for changes"
    );
    while let Some(path) = watcher.next_change(delay) {
        let Some(sup) = sup.upgrade() else { return };
        let shown = path
            .strip_prefix(&cwd)
            .unwrap_or(&path)
            .display()
            .to_string();
        let why = format!("watch: {shown} changed");
        tracing::info!(app = %name, "{why}: reloading");
        match rt.block_on(sup.reload_for(RestartReason::Watch, why, &live.token)) {
            None => return,
            Some(Ok(message)) => tracing::info!(app = %name, "{message} (watch)"),
            Some(Err(e)) => tracing::warn!(
                app = %name,
                "reload on change failed, the old workers keep serving: {e}"
            ),
        }
    }
}

/// The schedule: sleep until the next time, reload, repeat. A reload that runs past the next
/// time skips it (the next one is computed when the reload is over): reloads never stack.
async fn cron_task(pattern: String, live: Arc<Live>, sup: Weak<AppSupervisor>, name: String) {
    let Ok(cron) = balancer_config::parse_cron(&pattern) else {
        return;
    };
    loop {
        let next = match cron.find_next_occurrence(&chrono::Local::now(), false) {
            Ok(next) => next,
            Err(e) => {
                tracing::warn!(app = %name, "cron_restart {pattern:?} has no next time: {e}");
                return;
            }
        };
        *lock(&live.next_cron) = Some(SystemTime::from(next));
        loop {
            let left = (next - chrono::Local::now()).to_std().unwrap_or_default();
            if left.is_zero() {
                break;
            }
            tokio::select! {
                () = live.token.cancelled() => return,
                () = tokio::time::sleep(left.min(CRON_RECHECK)) => {}
            }
        }
        let Some(app) = sup.upgrade() else { return };
        let why = format!(
            "cron: {pattern} at {}",
            next.format("%Y-%m-%d %H:%M:%S %:z")
        );
        tracing::info!(app = %name, "{why}: reloading");
        match app.reload_for(RestartReason::Cron, why, &live.token).await {
            None => return,
            Some(Ok(message)) => tracing::info!(app = %name, "{message} (cron)"),
            Some(Err(e)) => tracing::warn!(
                app = %name,
                "scheduled reload failed, the old workers keep serving: {e}"
            ),
        }
    }
}
