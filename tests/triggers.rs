//! `watch` and `cron_restart` end to end: a file edited under load (a Node worker) and a
//! schedule every two seconds (a Python worker) replace the workers as reloads do, fail no
//! request, never stack, and stop with the app.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::*;

/// Each worker's count of restarts for `reason` (`watch`, `cron`), by id, for `app`.
fn restarts_by(b: &Balancer, app: &str, reason: &str) -> Vec<(u64, u64)> {
    let mut counts: Vec<(u64, u64)> = b
        .jlist()
        .iter()
        .filter(|w| w["app"] == app && w["status"] == "ready")
        .map(|w| {
            (
                w["id"].as_u64().unwrap_or(0),
                w["restarts_by"][reason].as_u64().unwrap_or(0),
            )
        })
        .collect();
    counts.sort_unstable();
    counts.dedup_by_key(|(id, _)| *id);
    counts
}

/// Polls until `pred` holds (within [`PATIENCE`] × `factor`), or fails saying `what`.
fn eventually(what: &str, factor: u32, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE * factor;
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `balancer show APP` as text.
fn show(b: &Balancer, app: &str) -> String {
    let (code, out, err) = b.cli(&["show", app]);
    assert_eq!(code, 0, "{out}{err}");
    out
}

/// A greeter whose greeting is written in its own source: editing it is a new version.
/// It listens after `READY_MS`, so a reload takes long enough to write files during it.
fn greeter(version: &str) -> String {
    format!(
        "'use strict';\nconst VERSION = '{version}';\nconst net = require('net');\n\
         const server = net.createServer((s) => {{ s.on('error', () => {{}}); \
         s.end(VERSION + ' ' + process.pid + '\\n'); }});\n\
         setTimeout(() => server.listen(Number(process.env.PORT), '127.0.0.1'), 400);\n\
         process.on('SIGTERM', () => server.close(() => process.exit(0)));\n"
    )
}

/// Writes `text` to `path` as an editor does: a temporary file renamed over it.
fn save(path: &Path, text: &str) {
    // A dot-file, as editors use: ignored by default, so the rename is the one change.
    let tmp = path.with_file_name(".server.js.new");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[test]
fn an_edit_under_load_reloads_to_the_new_code_with_no_failed_request() {
    let port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let app = dir.path().join("app");
    std::fs::create_dir_all(app.join("node_modules/dep")).unwrap();
    std::fs::create_dir_all(app.join("logs")).unwrap();
    let script = app.join("server.js");
    std::fs::write(&script, greeter("v1")).unwrap();
    // watch = true: the app's cwd, which also holds its log files (each spawn creates one): they
    // are never counted, or every reload would bring another.
    let toml = format!(
        "[[app]]\nname = \"w\"\nscript = \"{}\"\ncwd = \"{}\"\ninstances = 2\n\
         listen = [\"tcp://127.0.0.1:{port}\"]\nwatch = true\nignore_watch = [\"*.tmp\"]\n\
         watch_delay = \"300ms\"\nlisten_timeout = \"30s\"\nout_file = \"logs/w-out.log\"\n\
         error_file = \"logs/w-err.log\"\n",
        script.display(),
        app.display()
    );
    let b = Balancer::start(&toml);
    b.wait_running();
    b.wait_ready("w", 2);
    eventually("the watch to be set up", 1, || {
        show(&b, "w").contains("directories watched")
    });
    let page = show(&b, "w");
    assert!(
        page.contains("ignoring node_modules, .*, *.tmp; delay 300 ms): 2 directories watched"),
        "node_modules costs no watch: {page}"
    );
    let load = Load::start(loopback(port), 4);

    // Ignored paths do not reload.
    std::fs::write(app.join("notes.tmp"), "x").unwrap();
    std::fs::write(app.join("node_modules/dep/index.js"), "x").unwrap();
    std::fs::write(app.join(".env"), "x").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let counts = restarts_by(&b, "w", "watch");
    assert!(
        counts.iter().all(|(_, n)| *n == 0),
        "ignored paths: {counts:?}"
    );

    // An edit: both workers are replaced by the new code.
    save(&script, &greeter("v2"));
    eventually("a reload on the edit", 2, || {
        let counts = restarts_by(&b, "w", "watch");
        counts.len() == 2 && counts.iter().all(|(_, n)| *n == 1)
    });
    eventually("v2 to answer", 1, || {
        greeting(loopback(port)).is_ok_and(|g| g.starts_with("v2 "))
    });

    // Twenty writes while a reload runs queue one more reload, not twenty.
    save(&script, &greeter("v3"));
    b.log.wait_for(2, "the second watch reload", |l| {
        l.contains("watch: server.js changed: reloading")
    });
    for i in 0..20 {
        std::fs::write(app.join(format!("f{i}.js")), format!("// {i}")).unwrap();
    }
    eventually("the queued reload", 3, || {
        restarts_by(&b, "w", "watch").iter().all(|(_, n)| *n == 3)
    });
    // Nothing more comes: the burst was one reload.
    std::thread::sleep(Duration::from_millis(2000));
    let counts = restarts_by(&b, "w", "watch");
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(
        counts.iter().all(|(_, n)| *n == 3),
        "at most one extra reload: {counts:?}"
    );
    assert!(greeting(loopback(port)).unwrap().starts_with("v3 "));

    let (ok, failed, seen) = load.finish();
    eprintln!(
        "watch reloads under load: {ok} ok, {failed} failed, {} greetings",
        seen.len()
    );
    assert_eq!(failed, 0, "failed requests during watch reloads");
    assert!(seen.keys().any(|g| g.starts_with("v1 ")) && seen.keys().any(|g| g.starts_with("v3 ")));

    // Stopped, the app is not watched; started, it is again.
    let (code, out, err) = b.cli(&["stop", "w"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(show(&b, "w").contains("paused while every worker is stopped"));
    save(&script, &greeter("v4"));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        b.jlist().iter().all(|w| w["status"] == "stopped"),
        "a change does not start a stopped app"
    );
    let (code, out, err) = b.cli(&["start", "w"]);
    assert_eq!(code, 0, "{out}{err}");
    eventually("v4 after start", 1, || {
        greeting(loopback(port)).is_ok_and(|g| g.starts_with("v4 "))
    });
    let before = restarts_by(&b, "w", "watch");
    save(&script, &greeter("v5"));
    eventually("a reload after start", 2, || {
        let now = restarts_by(&b, "w", "watch");
        now.len() == 2 && now.iter().zip(&before).all(|(n, b)| n.1 == b.1 + 1)
    });
}

#[test]
fn cron_restart_reloads_on_schedule_under_load_and_stops_with_the_app() {
    let port = free_port();
    let metrics = free_port();
    let toml = format!("[balancer]\nmetrics = \"127.0.0.1:{metrics}\"\n")
        + &app_toml(
            "c",
            "conn_echo.py",
            &format!("tcp://127.0.0.1:{port}"),
            2,
            "cron_restart = \"*/2 * * * * *\"\n",
        );
    let b = Balancer::start(&toml);
    b.wait_running();
    b.wait_ready("c", 2);
    let page = show(&b, "c");
    assert!(
        page.contains("cron_restart: */2 * * * * * (next reload 20"),
        "{page}"
    );
    let load = Load::start(loopback(port), 4);
    eventually("two scheduled reloads of every worker", 3, || {
        let counts = restarts_by(&b, "c", "cron");
        counts.len() == 2 && counts.iter().all(|(_, n)| *n >= 2)
    });
    let (ok, failed, _) = load.finish();
    eprintln!("cron reloads under load: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "failed requests during scheduled reloads");
    assert!(ok > 50, "the load ran: {ok}");
    let text = http_get(loopback(metrics), "/metrics").expect("metrics");
    let cron: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("balancer_worker_restarts_total") && l.contains("reason=\"cron\"")
        })
        .collect();
    assert_eq!(cron.len(), 2, "one series per worker: {cron:?}");
    assert!(
        cron.iter()
            .all(|l| l.rsplit(' ').next().and_then(|n| n.parse::<f64>().ok()) >= Some(2.0)),
        "{cron:?}"
    );

    let (code, out, err) = b.cli(&["stop", "c"]);
    assert_eq!(code, 0, "{out}{err}");
    let total = |b: &Balancer| -> u64 {
        b.jlist()
            .iter()
            .filter(|w| w["app"] == "c")
            .map(|w| w["restarts_by"]["cron"].as_u64().unwrap_or(0))
            .sum()
    };
    let stopped_at = total(&b);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        total(&b),
        stopped_at,
        "no scheduled reload of a stopped app"
    );
    assert!(b.jlist().iter().all(|w| w["status"] == "stopped"));
    assert!(show(&b, "c").contains("(paused while every worker is stopped)"));
}
