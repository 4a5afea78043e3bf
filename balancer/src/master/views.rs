//! What `ls`, `jlist` and `show` see: the supervisors' state turned into the protocol's rows,
//! and an app's resolved configuration as JSON.

use std::time::{Duration, SystemTime};

use balancer_config::{App, Check};
use balancer_workers::WorkerStatus;

use super::{ControlError, Master};
use crate::protocol::{
    AppInfo, AppSnapshot, CronInfo, QueueInfo, RestartsBy, UsageHistory, WatchInfo, WorkerInfo,
    WorkerSnapshot,
};

/// Every worker of every app, in start order (`ls`/`jlist`).
pub(super) fn all_workers(master: &Master) -> Vec<WorkerInfo> {
    master
        .apps()
        .iter()
        .flat_map(|(app, statuses)| statuses.iter().map(move |s| worker_info(app, s)))
        .collect()
}

/// Every app with its workers and their counters: one frame of a subscription (`monit`).
/// Like [`all_workers`], it reads only what the supervisors and the data plane already hold.
pub(super) fn app_snapshots(master: &Master) -> Vec<AppSnapshot> {
    master
        .apps()
        .iter()
        .map(|(app, statuses)| AppSnapshot {
            name: app.name.clone(),
            instances: app.instances,
            policy: app.policy.as_str().to_owned(),
            balance: app.balance.as_str().to_owned(),
            listeners: app.listen.iter().map(ToString::to_string).collect(),
            config: app_json(app),
            workers: statuses
                .iter()
                .map(|s| WorkerSnapshot {
                    info: worker_info(app, s),
                    connections_total: s.handle.as_ref().map_or(0, |h| h.total()),
                    bytes_total: s.handle.as_ref().map_or(0, |h| h.bytes()),
                })
                .collect(),
        })
        .collect()
}

/// One worker's row. CPU and memory come from the last sample (taken on the sampler's thread),
/// so a row costs no `/proc` read: `ls` stays as fast with them as without.
pub(super) fn worker_info(app: &App, s: &WorkerStatus) -> WorkerInfo {
    let running = s.pid.is_some();
    let usage = s
        .usage
        .as_ref()
        .filter(|_| running)
        .and_then(|u| u.snapshot());
    let by = s.restarts_by;
    WorkerInfo {
        id: s.id,
        app: s.app.clone(),
        instance: s.instance,
        pid: s.pid,
        policy: app.policy.as_str().to_string(),
        status: s.state.as_str().to_string(),
        restarts: s.restarts,
        uptime_ms: s
            .since
            .filter(|_| running)
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        connections: s.live_connections(),
        listeners: app
            .listen
            .iter()
            .map(|l| match l.captured {
                true => format!("{l} (captured)"),
                false => l.to_string(),
            })
            .collect(),
        private: s.addrs.iter().map(|a| a.to_string()).collect(),
        last_exit: s.last_exit.map(|e| e.to_string()),
        reason: s.reason.clone(),
        cpu: usage.map(|u| tenths(u.cpu_percent)),
        memory: usage.map(|u| u.memory),
        cpu_seconds: usage.map(|u| (u.cpu_seconds * 100.0).round() / 100.0),
        processes: usage.map(|u| u.processes),
        history: usage.map(|u| UsageHistory {
            samples: u.samples,
            cpu_min: tenths(u.cpu_min),
            cpu_avg: tenths(u.cpu_avg),
            cpu_max: tenths(u.cpu_max),
            memory_min: u.memory_min,
            memory_avg: u.memory_avg,
            memory_max: u.memory_max,
        }),
        restarts_by: RestartsBy {
            crash: by.crash,
            memory: by.memory,
            reload: by.reload,
            restart: by.restart,
            watch: by.watch,
            cron: by.cron,
        },
        last_restart: s.last_restart.clone(),
    }
}

/// A percentage to one decimal: what a reader can tell apart in a 1 s sample.
fn tenths(percent: f64) -> f64 {
    (percent * 10.0).round() / 10.0
}

/// `show`: the app named `target`, or the app of worker `target` with only that worker.
pub(super) fn show(master: &Master, target: &str) -> Result<AppInfo, ControlError> {
    let by_id = || {
        target
            .parse::<u32>()
            .ok()
            .and_then(|id| master.supervisor_of_worker(id))
    };
    let sup = master
        .supervisor(target)
        .or_else(by_id)
        .ok_or_else(|| ControlError::UnknownTarget(target.to_owned()))?;
    let app = sup.app();
    let mut workers: Vec<WorkerInfo> = sup
        .statuses()
        .iter()
        .map(|s| worker_info(&app, s))
        .collect();
    if let Ok(id) = target.parse::<u32>()
        && app.name != target
    {
        workers.retain(|w| w.id == id);
    }
    Ok(AppInfo {
        name: app.name.clone(),
        config: app_json(&app),
        logs: sup
            .log_paths()
            .into_iter()
            .map(|(i, p)| (i, p.out, p.err))
            .collect(),
        workers,
        queue: queue_info(sup.pool().queue().stats()),
        watch: None,
        cron: None,
    }
    .with_triggers(sup.triggers()))
}

impl AppInfo {
    /// `show`'s view of the app's `watch` and `cron_restart`.
    fn with_triggers(mut self, t: balancer_workers::triggers::TriggerStatus) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.watch = t.watch.map(|w| {
            let report = w.report.unwrap_or_default();
            WatchInfo {
                active: t.armed,
                paths: w.paths,
                ignore: w.ignore,
                delay_ms: ms(w.delay),
                directories: report.setup.map(|_| report.watched),
                setup_ms: report.setup.map(ms),
                unwatched: report.unwatched,
                unwatched_count: report.unwatched_count,
                warning: report.warning,
            }
        });
        self.cron = t.cron.map(|c| CronInfo {
            pattern: c.pattern,
            active: t.armed,
            next: c.next.map(|t| {
                chrono::DateTime::<chrono::Local>::from(t)
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
            }),
        });
        self
    }
}

/// The queue's figures in `show`'s units.
fn queue_info(stats: balancer_workers::QueueStats) -> QueueInfo {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    QueueInfo {
        waiting: stats.waiting,
        queued: stats.queued,
        wait_mean_ms: ms(stats
            .wait_total
            .checked_div(u32::try_from(stats.queued).unwrap_or(u32::MAX))
            .unwrap_or_default()),
        wait_max_ms: ms(stats.wait_max),
    }
}

/// The resolved configuration of an app, every default applied, as `show` prints it.
pub fn app_json(app: &App) -> serde_json::Value {
    let secs = |d: Duration| humantime::format_duration(d).to_string();
    let check = match &app.health.check {
        Check::Tcp => serde_json::json!({ "check": "tcp" }),
        Check::Http { path } => serde_json::json!({ "check": "http", "path": path }),
        Check::None => serde_json::json!({ "check": "none" }),
    };
    let mut health = check;
    health["interval"] = secs(app.health.interval).into();
    health["timeout"] = secs(app.health.timeout).into();
    health["rise"] = app.health.rise.into();
    health["fall"] = app.health.fall.into();
    serde_json::json!({
        "name": app.name,
        "program": app.program,
        "args": app.args,
        "cwd": app.cwd,
        "instances": app.instances,
        "listen": app.listen.iter().map(|l| serde_json::json!({
            "url": l.to_string(), "port_env": l.port_env,
            "proxy_protocol": l.proxy_protocol.map(|v| v.as_str()),
            "accept_proxy": l.accept_proxy,
            "captured_from_app": l.captured,
        })).collect::<Vec<_>>(),
        "policy": app.policy.as_str(),
        "balance": app.balance.as_str(),
        "max_conns": app.max_conns,
        "env": app.env,
        "health": health,
        "ready": app.ready.as_str(),
        "kill_signal": app.kill_signal.as_str(),
        "kill_timeout": secs(app.kill_timeout),
        "drain_timeout": secs(app.drain_timeout),
        "listen_timeout": secs(app.listen_timeout),
        "queue_timeout": secs(app.queue_timeout),
        "connect_timeout": secs(app.connect_timeout),
        "autorestart": app.autorestart,
        "max_restarts": app.max_restarts,
        "min_uptime": secs(app.min_uptime),
        "restart_delay": secs(app.restart_delay),
        "exp_backoff_restart_delay": app.exp_backoff_restart_delay.map(secs),
        "max_memory_restart": app.max_memory_restart,
        "reload_batch": app.reload_batch,
        "out_file": app.out_file,
        "error_file": app.error_file,
        "time": app.logs.time.is_some(),
        "log_date_format": app.logs.time,
        "merge_logs": app.logs.merge,
        "log_max_size": app.logs.rotate.map(|r| r.max_size),
        "log_retain": app.logs.rotate.map(|r| r.retain),
        "log_compress": app.logs.rotate.map(|r| r.compress),
        "capture": app.capture,
        "watch": app.watch.as_ref().map(|w| w.paths.clone()),
        "ignore_watch": app.watch.as_ref().map(|w| w.ignore.clone()),
        "watch_delay": app.watch.as_ref().map(|w| secs(w.delay)),
        "cron_restart": app.cron_restart.as_ref().map(|c| c.pattern.clone()),
    })
}
