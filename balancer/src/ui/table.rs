//! Tables: `ls` (one row per worker) and `show` (an app's resolved config, log files, workers,
//! their CPU and memory since start, and why each worker last stopped or restarted).
//!
//! One fixed comfy-table style everywhere. Off a terminal there is no color and no wrapping, so
//! scripts and tests see the same text every time.

use std::fmt::Write as _;

use comfy_table::{Cell, CellAlignment, Color, ContentArrangement, Table, presets};
use serde_json::Value;

use super::{Output, bytes, percent, uptime};
use crate::protocol::{AppInfo, WorkerInfo};

/// The `ls` header; `↺` is restarts, as in PM2. `cpu` and `mem` are the whole process tree's.
const WORKER_HEADER: [&str; 12] = [
    "id",
    "app",
    "inst",
    "pid",
    "policy",
    "status",
    "↺",
    "cpu",
    "mem",
    "uptime",
    "conns",
    "listeners",
];

/// Columns of numbers, aligned right.
const NUMERIC_COLUMNS: [usize; 7] = [0, 2, 3, 6, 7, 8, 10];

/// `show`'s usage table: now, and lowest/mean/highest since the process started.
const USAGE_HEADER: [&str; 8] = [
    "id",
    "cpu",
    "cpu min/avg/max",
    "mem",
    "mem min/avg/max",
    "procs",
    "cpu time",
    "restarts by reason",
];

fn new_table(output: Output) -> Table {
    let mut table = Table::new();
    table.load_style(presets::UTF8_FULL_CONDENSED);
    match output {
        Output::Plain => {
            table
                .force_no_tty()
                .set_content_arrangement(ContentArrangement::Disabled);
        }
        Output::Terminal => {
            table.set_content_arrangement(ContentArrangement::Dynamic);
        }
    }
    table
}

/// The color of a status on a terminal: green serving, red given up on, grey stopped, yellow
/// on its way somewhere.
fn status_cell(status: &str) -> Cell {
    let color = match status {
        "ready" => Color::Green,
        "errored" => Color::Red,
        "stopped" => Color::DarkGrey,
        _ => Color::Yellow,
    };
    Cell::new(status).fg(color)
}

/// The `ls` table: one row per worker, in the order given.
pub fn workers(workers: &[WorkerInfo], output: Output) -> String {
    let mut table = new_table(output);
    table.set_header(WORKER_HEADER);
    for w in workers {
        table.add_row(vec![
            Cell::new(w.id),
            Cell::new(&w.app),
            Cell::new(w.instance),
            Cell::new(w.pid.map_or_else(|| "-".to_owned(), |p| p.to_string())),
            Cell::new(&w.policy),
            status_cell(&w.status),
            Cell::new(w.restarts),
            Cell::new(w.cpu.map_or_else(|| "-".to_owned(), percent)),
            Cell::new(w.memory.map_or_else(|| "-".to_owned(), bytes)),
            Cell::new(w.uptime_ms.map_or_else(|| "-".to_owned(), uptime)),
            Cell::new(w.connections),
            Cell::new(w.listeners.join(", ")),
        ]);
    }
    for index in NUMERIC_COLUMNS {
        if let Some(column) = table.column_mut(index) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table.to_string()
}

/// `show`'s usage rows: each running worker's CPU and memory now and since it started, its
/// tree's size and CPU time, and its restarts by reason.
pub fn usage(workers: &[WorkerInfo], output: Output) -> String {
    let mut table = new_table(output);
    table.set_header(USAGE_HEADER);
    for w in workers {
        let dash = || "-".to_owned();
        let h = w.history;
        let by = w.restarts_by;
        let reasons = [
            ("crash", by.crash),
            ("memory", by.memory),
            ("reload", by.reload),
            ("restart", by.restart),
            ("watch", by.watch),
            ("cron", by.cron),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{r} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
        table.add_row(vec![
            Cell::new(w.id),
            Cell::new(w.cpu.map_or_else(dash, percent)),
            Cell::new(h.map_or_else(dash, |h| {
                format!(
                    "{} / {} / {}",
                    percent(h.cpu_min),
                    percent(h.cpu_avg),
                    percent(h.cpu_max)
                )
            })),
            Cell::new(w.memory.map_or_else(dash, bytes)),
            Cell::new(h.map_or_else(dash, |h| {
                format!(
                    "{} / {} / {}",
                    bytes(h.memory_min),
                    bytes(h.memory_avg),
                    bytes(h.memory_max)
                )
            })),
            Cell::new(w.processes.map_or_else(dash, |p| p.to_string())),
            Cell::new(w.cpu_seconds.map_or_else(dash, |s| format!("{s:.2}s"))),
            Cell::new(if reasons.is_empty() { dash() } else { reasons }),
        ]);
    }
    for index in [0, 1, 3, 5, 6] {
        if let Some(column) = table.column_mut(index) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table.to_string()
}

/// Why each worker is not simply running, one line per worker that has something to say:
/// `worker 3 (web #1) errored: <reason>; last exit: <how>; last restart: <why>`.
pub fn worker_notes(workers: &[WorkerInfo]) -> Vec<String> {
    workers
        .iter()
        .filter(|w| w.reason.is_some() || w.last_exit.is_some() || w.last_restart.is_some())
        .map(|w| {
            let mut line = format!("worker {} ({} #{}) {}", w.id, w.app, w.instance, w.status);
            let mut sep = ": ";
            if let Some(reason) = &w.reason {
                let _ = write!(line, "{sep}{reason}");
                sep = "; ";
            }
            if let Some(exit) = &w.last_exit {
                let _ = write!(line, "{sep}last exit: {exit}");
                sep = "; ";
            }
            if let Some(why) = &w.last_restart {
                let _ = write!(line, "{sep}last restart: {why}");
            }
            line
        })
        .collect()
}

/// The `show` page of an app: its resolved config as key/value rows (nested tables flattened to
/// `health.check`), its log files, its workers, and why any of them last stopped.
pub fn app(app: &AppInfo, output: Output) -> String {
    let mut rows = Vec::new();
    flatten(&app.config, "", &mut rows);
    for (instance, out, err) in &app.logs {
        rows.push((format!("out log #{instance}"), out.display().to_string()));
        rows.push((format!("err log #{instance}"), err.display().to_string()));
    }
    let mut config = new_table(output);
    config.set_header(["key", "value"]);
    config.add_rows(rows.into_iter().map(|(k, v)| [k, v]));

    let mut page = format!("app {}\n{config}\n", app.name);
    let q = &app.queue;
    let _ = writeln!(
        page,
        "queue: {} waiting; {} waited, mean {} ms, max {} ms",
        q.waiting, q.queued, q.wait_mean_ms, q.wait_max_ms
    );
    for line in trigger_lines(app) {
        page.push_str(&line);
        page.push('\n');
    }
    let _ = write!(page, "\nworkers\n{}\n", workers(&app.workers, output));
    let _ = write!(
        page,
        "\nusage since start\n{}\n",
        usage(&app.workers, output)
    );
    let notes = worker_notes(&app.workers);
    if !notes.is_empty() {
        page.push_str("\nlast exits\n");
        for note in notes {
            page.push_str(&note);
            page.push('\n');
        }
    }
    page
}

/// What `watch` and `cron_restart` do now: what is watched (or why not all of it), and when
/// the next scheduled reload comes. Nothing for an app that has neither.
pub fn trigger_lines(app: &AppInfo) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(w) = &app.watch {
        let paths: Vec<String> = w.paths.iter().map(|p| p.display().to_string()).collect();
        let mut line = format!(
            "watch: {} (ignoring {}; delay {} ms)",
            paths.join(", "),
            w.ignore.join(", "),
            w.delay_ms
        );
        match (w.active, w.directories) {
            (false, _) => line += ": paused while every worker is stopped",
            (true, None) => line += ": setting up",
            (true, Some(n)) => {
                let _ = write!(
                    line,
                    ": {n} directories watched, set up in {} ms",
                    w.setup_ms.unwrap_or(0)
                );
            }
        }
        lines.push(line);
        if let Some(warning) = &w.warning {
            lines.push(format!("watch warning: {warning}"));
        }
        if w.unwatched_count > 0 {
            let named: Vec<String> = w
                .unwatched
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            let more = w.unwatched_count.saturating_sub(named.len());
            let tail = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            lines.push(format!("not watched: {}{tail}", named.join(", ")));
        }
    }
    if let Some(c) = &app.cron {
        lines.push(match (&c.next, c.active) {
            (Some(next), true) => format!("cron_restart: {} (next reload {next})", c.pattern),
            _ => format!(
                "cron_restart: {} (paused while every worker is stopped)",
                c.pattern
            ),
        });
    }
    lines
}

/// Turns a JSON value into `(dotted.key, text)` rows: objects and lists of objects recurse
/// (`health.check`, `listen[0].url`), everything else is one row.
fn flatten(value: &Value, prefix: &str, rows: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, value) in map {
                let key = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(value, &key, rows);
            }
        }
        Value::Array(items) if items.iter().any(|v| v.is_array() || v.is_object()) => {
            for (index, item) in items.iter().enumerate() {
                flatten(item, &format!("{prefix}[{index}]"), rows);
            }
        }
        _ => {
            let key = if prefix.is_empty() { "config" } else { prefix };
            rows.push((key.to_owned(), text(value)));
        }
    }
}

/// One value as a cell: strings unquoted, lists of plain values joined with ", ", nothing as
/// `-`, anything deeper as compact JSON.
fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "-".to_owned(),
        Value::Object(map) if map.is_empty() => "-".to_owned(),
        Value::Array(items) if items.iter().all(|v| !v.is_array() && !v.is_object()) => {
            items.iter().map(text).collect::<Vec<_>>().join(", ")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: u32, instance: u32, status: &str) -> WorkerInfo {
        WorkerInfo {
            id,
            app: "web".into(),
            instance,
            pid: Some(4000 + id),
            policy: "rr".into(),
            status: status.into(),
            restarts: 3,
            uptime_ms: Some(125_000),
            connections: 3,
            listeners: vec!["tcp://0.0.0.0:8080".into(), "http://0.0.0.0:8081".into()],
            private: vec!["127.0.0.1:40001".into()],
            last_exit: None,
            reason: None,
            cpu: Some(1.5),
            memory: Some(47_395_635),
            cpu_seconds: Some(2.31),
            processes: Some(2),
            history: Some(crate::protocol::UsageHistory {
                samples: 125,
                cpu_min: 0.0,
                cpu_avg: 1.8,
                cpu_max: 37.5,
                memory_min: 41_000_000,
                memory_avg: 45_500_000,
                memory_max: 49_000_000,
            }),
            restarts_by: crate::protocol::RestartsBy {
                memory: 1,
                reload: 2,
                ..Default::default()
            },
            last_restart: Some(
                "memory: tree RSS 130.2 MiB over max_memory_restart 100.0 MiB for 3 samples".into(),
            ),
        }
    }

    fn errored() -> WorkerInfo {
        WorkerInfo {
            pid: None,
            restarts: 16,
            uptime_ms: None,
            connections: 0,
            last_exit: Some("exit status 1".into()),
            reason: Some("16 unstable restarts (each under min_uptime 1s)".into()),
            cpu: None,
            memory: None,
            cpu_seconds: None,
            processes: None,
            history: None,
            restarts_by: crate::protocol::RestartsBy {
                crash: 16,
                ..Default::default()
            },
            last_restart: Some("crash: exited with exit code 1".into()),
            ..worker(12, 1, "errored")
        }
    }

    #[test]
    fn ls_is_one_row_per_worker() {
        let text = workers(&[worker(0, 0, "ready"), errored()], Output::Plain);
        insta::assert_snapshot!("ls", text);
        assert!(!text.contains('\x1b'), "no escape codes off a terminal");
    }

    #[test]
    fn an_empty_ls_is_just_the_header() {
        let text = workers(&[], Output::Plain);
        insta::assert_snapshot!("ls_empty", text);
    }

    #[test]
    fn notes_say_why_a_worker_is_errored() {
        assert_eq!(
            worker_notes(&[worker(0, 0, "ready"), errored()]),
            [
                "worker 0 (web #0) ready: last restart: memory: tree RSS 130.2 MiB over \
                 max_memory_restart 100.0 MiB for 3 samples",
                "worker 12 (web #1) errored: 16 unstable restarts (each under min_uptime 1s); \
              last exit: exit status 1; last restart: crash: exited with exit code 1"
            ]
        );
        let only_exit = WorkerInfo {
            last_exit: Some("signal SIGKILL".into()),
            last_restart: None,
            ..worker(3, 0, "starting")
        };
        assert_eq!(
            worker_notes(&[only_exit]),
            ["worker 3 (web #0) starting: last exit: signal SIGKILL"]
        );
    }

    #[test]
    fn show_flattens_the_config_and_lists_logs_workers_and_exits() {
        let info = AppInfo {
            name: "web".into(),
            config: serde_json::json!({
                "name": "web",
                "program": "node",
                "args": ["/srv/server.js", "--port=x"],
                "env": {"NODE_ENV": "production"},
                "health": {"check": "tcp", "interval_ms": 1000},
                "instances": 2,
                "max_memory_restart": null,
                "listen": [{"url": "tcp://0.0.0.0:8080", "port_env": "PORT"}],
                "watch": [],
            }),
            logs: vec![(
                0,
                "/h/logs/web-0-out.log".into(),
                "/h/logs/web-0-err.log".into(),
            )],
            workers: vec![worker(0, 0, "ready"), errored()],
            queue: Default::default(),
            watch: None,
            cron: None,
        };
        let text = app(&info, Output::Plain);
        insta::assert_snapshot!("show", text);
        assert!(
            text.contains("│ 12 ┆ web ┆    1 ┆    - ┆ rr     ┆ errored ┆ 16 ┆    - ┆        - ┆")
        );
        assert!(text.contains(
            "│  0 ┆ 1.5% ┆ 0.0% / 1.8% / 37.5% ┆ 45.2 MiB ┆ 39.1 MiB / 43.4 MiB / 46.7 MiB ┆     2 ┆    2.31s ┆ memory 1, reload 2"
        ));
        assert!(text.ends_with(
            "\nworker 12 (web #1) errored: 16 unstable restarts (each under \
             min_uptime 1s); last exit: exit status 1; last restart: crash: exited with exit code 1\n"
        ));
    }

    #[test]
    fn triggers_say_what_is_watched_what_is_not_and_the_next_reload() {
        let mut info = AppInfo {
            name: "web".into(),
            config: serde_json::json!({}),
            logs: vec![],
            workers: vec![],
            queue: Default::default(),
            watch: Some(crate::protocol::WatchInfo {
                active: true,
                paths: vec!["/srv/web".into()],
                ignore: vec!["node_modules".into(), ".*".into(), "*.log".into()],
                delay_ms: 1000,
                directories: Some(120),
                setup_ms: Some(35),
                unwatched: vec!["/srv/web/a".into(), "/srv/web/b".into()],
                unwatched_count: 7,
                warning: Some("inotify watch limit reached (…)".into()),
            }),
            cron: Some(crate::protocol::CronInfo {
                pattern: "0 3 * * *".into(),
                active: true,
                next: Some("2026-12-02T03:00:00+00:00".into()),
            }),
        };
        assert_eq!(
            trigger_lines(&info),
            [
                "watch: /srv/web (ignoring node_modules, .*, *.log; delay 1000 ms): 120 \
                 directories watched, set up in 35 ms",
                "watch warning: inotify watch limit reached (…)",
                "not watched: /srv/web/a, /srv/web/b and 5 more",
                "cron_restart: 0 3 * * * (next reload 2026-12-02T03:00:00+00:00)",
            ]
        );
        info.watch.as_mut().unwrap().active = false;
        info.cron.as_mut().unwrap().active = false;
        let lines = trigger_lines(&info);
        assert!(
            lines[0].ends_with(": paused while every worker is stopped"),
            "{lines:?}"
        );
        assert_eq!(
            lines[3],
            "cron_restart: 0 3 * * * (paused while every worker is stopped)"
        );
        assert!(app(&info, Output::Plain).contains("\ncron_restart: 0 3 * * *"));
    }
}
