//! PM2 parity on the command line: many apps started one by one, same-name refusal and `-f`,
//! `reload all` with stopped, deleted and failing parts, PM2's start flags reaching the worker
//! and the supervisor, and the verbs' small promises (`restart ID`, `flush`, `ls` with no
//! master, PM2-only flags).

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::*;

/// A sleeper app (no listener: ready as soon as it runs), as balancer.toml.
fn sleeper_toml(name: &str, instances: u32, extra: &str) -> String {
    format!(
        "\n[[app]]\nname = \"{name}\"\ncommand = [\"sleep\", \"1000\"]\ninstances = {instances}\nkill_timeout = \"1s\"\n{extra}\n"
    )
}

/// `app`'s workers in a `jlist`.
fn workers_of<'a>(all: &'a [serde_json::Value], app: &str) -> Vec<&'a serde_json::Value> {
    all.iter().filter(|w| w["app"] == app).collect()
}

/// The lines `pm2_flags.py` recorded in `dir`, once there are at least `n` (bounded wait).
fn records(dir: &Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(dir.join("record.jsonl")).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} records in {}, wanted {n}",
            lines.len(),
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until every worker of `app` has status `status`.
fn wait_status(b: &Balancer, app: &str, status: &str) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let all = b.jlist();
        let mine: Vec<serde_json::Value> = workers_of(&all, app).into_iter().cloned().collect();
        if !mine.is_empty() && mine.iter().all(|w| w["status"] == status) {
            return mine;
        }
        assert!(
            Instant::now() < deadline,
            "{app} never all {status}: {mine:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn file_containing(path: &Path, needle: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} never had {needle:?}: {text:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_dozen_apps_started_one_by_one_all_live_and_a_taken_name_needs_force() {
    let port = free_port();
    let b = Balancer::start(&pid_app("ws", port, 1, ""));
    b.wait_ready("ws", 1);
    b.wait_running();
    let dir = tempfile::tempdir().unwrap();
    let script = write_file(dir.path(), "job.sh", "#!/bin/sh\nexec sleep 1000\n");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let script = script.display().to_string();

    for i in 0..12 {
        let name = format!("job{i}");
        let (code, out, err) = b.cli(&["start", &script, "-n", &name]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains(&format!("started {name}")), "{out}");
        assert!(
            !out.contains("deleted"),
            "one start deleted another app: {out}"
        );
    }
    let all = b.jlist();
    for i in 0..12 {
        let mine = workers_of(&all, &format!("job{i}"));
        assert_eq!(mine.len(), 1, "job{i}: {all:?}");
        assert!(
            mine[0]["pid"].as_u64().is_some_and(|p| alive(p as u32)),
            "{mine:?}"
        );
    }
    let (code, table, _) = b.cli(&["ls"]);
    assert_eq!(code, 0);
    for i in 0..12 {
        assert!(
            table.contains(&format!("job{i}")),
            "ls lacks job{i}:\n{table}"
        );
    }
    assert!(table.contains("ws"), "{table}");

    // The same name again, from the command line or over a file's app: refused, nothing moves.
    let before = b.jlist();
    let (code, out, err) = b.cli(&["start", &script, "-n", "job3"]);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("\"job3\" is already running") && err.contains("-f"),
        "{err}"
    );
    let other = free_port();
    let (code, _, err) = b.cli(&["start", &script, "-n", "ws", "-l", &other.to_string()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("balancer.toml"),
        "names where ws came from: {err}"
    );
    let ids = |all: &[serde_json::Value]| -> Vec<String> {
        all.iter()
            .map(|w| format!("{} {} {} {}", w["app"], w["id"], w["pid"], w["listeners"]))
            .collect()
    };
    assert_eq!(
        ids(&b.jlist()),
        ids(&before),
        "a refused start changes nothing"
    );
    assert!(
        greeting(loopback(port)).is_ok(),
        "ws still serves its own listener"
    );

    // -f replaces (a zero-downtime reload with the new config), and only that app.
    let old = workers_of(&before, "job3")[0]["pid"].as_u64().unwrap();
    let (code, out, err) = b.cli(&["start", &script, "-n", "job3", "-f", "-i", "2"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("deleted"), "{out}");
    let all = b.jlist();
    let job3 = workers_of(&all, "job3");
    assert_eq!(job3.len(), 2, "{job3:?}");
    assert!(
        job3.iter().all(|w| w["pid"].as_u64() != Some(old)),
        "{job3:?}"
    );
    assert_eq!(
        all.len(),
        before.len() + 1,
        "the other apps are all still there"
    );
}

#[test]
fn reload_all_reports_each_app_and_keeps_stopped_and_deleted_workers_so() {
    let toml = sleeper_toml("a", 3, "")
        + &sleeper_toml("b", 1, "")
        // Crashes at once and stays errored: its reload cannot succeed.
        + "\n[[app]]\nname = \"c\"\ncommand = [\"sh\", \"-c\", \"exit 3\"]\nmax_restarts = 0\nlisten_timeout = \"2s\"\n";
    let b = Balancer::start(&toml);
    b.wait_running();
    wait_status(&b, "a", "ready");
    wait_status(&b, "c", "errored");

    let (code, out, err) = b.cli(&["stop", "b"]);
    assert_eq!(code, 0, "{out}{err}");
    let victim = workers_of(&b.jlist(), "a")[1]["id"]
        .as_u64()
        .unwrap()
        .to_string();
    let (code, out, err) = b.cli(&["delete", &victim]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("deleted worker {victim} of a")),
        "{out}"
    );

    let (code, out, err) = b.cli(&["reload", "all"]);
    assert_eq!(code, 1, "one app failed: {out}{err}");
    assert!(err.contains("1 of 3 apps failed"), "{err}");
    // Progress as it goes, one line per batch, with what is draining and for how long at most.
    assert!(out.contains("a: 1/2 ready, draining worker "), "{out}");
    assert!(out.contains("a: 2/2 ready, draining worker "), "{out}");
    assert!(out.contains("(0 live connections, up to 30s)"), "{out}");
    assert!(err.contains("ok: reloaded 2 worker(s) of a"), "{err}");
    assert!(
        err.contains("ok: reloaded 0 worker(s) of b (1 stopped, left stopped)"),
        "{err}"
    );
    assert!(err.contains("failed: c:"), "{err}");

    let all = b.jlist();
    let a = workers_of(&all, "a");
    assert_eq!(a.len(), 2, "the deleted worker stays deleted: {a:?}");
    assert!(
        a.iter().all(|w| w["id"] != victim.parse::<u64>().unwrap()),
        "{a:?}"
    );
    let b_workers = workers_of(&all, "b");
    assert_eq!(b_workers.len(), 1);
    assert_eq!(b_workers[0]["status"], "stopped", "{b_workers:?}");
}

#[test]
fn restart_of_one_worker_says_so_flush_empties_deleted_apps_logs_and_ls_needs_no_master() {
    let empty = tempfile::tempdir().unwrap();
    let (code, out, err) = cli(empty.path(), &["ls"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("id") && out.contains("app"),
        "an empty table: {out}"
    );
    assert_eq!(err.lines().count(), 1, "one hint: {err}");
    assert!(err.contains("no master"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().display().to_string();
    let toml = format!(
        "\n[[app]]\nname = \"r\"\nscript = \"{}\"\ncwd = \"{rec}\"\ninstances = 2\nargs = [\"sleep\"]\nkill_timeout = \"1s\"\n",
        worker("pm2_flags.py")
    ) + &sleeper_toml("gone", 1, "");
    let b = Balancer::start(&toml);
    b.wait_running();
    wait_status(&b, "r", "ready");
    let id = workers_of(&b.jlist(), "r")[1]["id"]
        .as_u64()
        .unwrap()
        .to_string();
    records(dir.path(), 2);
    let (code, out, err) = b.cli(&["restart", &id]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("restarted worker {id} of r")),
        "{out}"
    );
    let restarts = |b: &Balancer| -> Vec<u64> {
        workers_of(&b.jlist(), "r")
            .iter()
            .filter_map(|w| w["restarts"].as_u64())
            .collect()
    };
    assert_eq!(restarts(&b), [0, 1]);
    let (code, out, err) = b.cli(&["reset", "r"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(restarts(&b), [0, 0], "reset zeroes the counters");

    // send-signal (and PM2's spelling) reaches every running worker's process.
    records(dir.path(), 3);
    let (code, out, err) = b.cli(&["send-signal", "SIGUSR2", "r"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("sent SIGUSR2 to 2 worker(s) of r"), "{out}");
    let (code, _, err) = b.cli(&["sendSignal", "usr2", &id]);
    assert_eq!(code, 0, "{err}");
    let got = records(dir.path(), 6);
    let pid = workers_of(&b.jlist(), "r")[1]["pid"].clone();
    let signalled: Vec<_> = got.iter().filter(|r| r["signal"] == "USR2").collect();
    assert_eq!(signalled.len(), 3, "{got:?}");
    assert_eq!(
        signalled.iter().filter(|r| r["pid"] == pid).count(),
        2,
        "{got:?}"
    );
    let (code, _, err) = b.cli(&["send-signal", "SIGNOPE", "r"]);
    assert_eq!(code, 2, "{err}");

    // `gone` writes a line, is deleted; `flush` (all) still empties its files.
    let log = b.home().join("logs/r-0-out.log");
    file_containing(&log, "out line");
    let gone = b.home().join("logs/gone-0-out.log");
    std::fs::write(&gone, "left behind\n").unwrap();
    let (code, _, err) = b.cli(&["delete", "gone"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = b.cli(&["flush"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        std::fs::read_to_string(&gone).unwrap(),
        "",
        "deleted app's log flushed"
    );
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "");
}

#[test]
fn pm2_flags_that_balancer_lacks_are_refused_naming_the_key() {
    let home = tempfile::tempdir().unwrap();
    let script = worker("pm2_flags.py");
    // --watch and --cron-restart are keys of the app's balancer.toml, checked here like it.
    let (code, _, err) = cli(
        home.path(),
        &[
            "start",
            &script,
            "--watch",
            "--time",
            "--cron-restart",
            "0 25 * * *",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("`cron_restart`: Number out of bounds in \"0 25 * * *\""),
        "{err}"
    );
    assert!(!err.contains("not supported yet"), "all built: {err}");
    let (code, _, err) = cli(home.path(), &["start", &script, "--no-vizion"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("no balancer equivalent (no balancer.toml key)"),
        "{err}"
    );
    let (code, _, err) = cli(home.path(), &["start", &script, "--kill-signal", "SIGINT"]);
    assert_eq!(code, 2);
    assert!(err.contains("balancer.toml key is `kill_signal`"), "{err}");
    assert!(
        !home.path().join("admin.sock").exists(),
        "no master was started"
    );
}

#[test]
fn pm2_start_flags_reach_the_worker_and_the_supervisor() {
    let b = Balancer::start(&sleeper_toml("base", 1, ""));
    b.wait_running();
    let script = worker("pm2_flags.py");

    // interpreter, interpreter_args, cwd, out_file/error_file, kill_timeout, max_memory_restart.
    let one = tempfile::tempdir().unwrap();
    let cwd = one.path().display().to_string();
    let (code, out, err) = b.cli(&[
        "start",
        &script,
        "-n",
        "flags",
        "--interpreter",
        "python3",
        "--node-args",
        "-X dev",
        "--cwd",
        &cwd,
        "-o",
        "o.log",
        "-e",
        "e.log",
        "--kill-timeout",
        "1s",
        "--max-memory-restart",
        "300M",
        "--",
        "stubborn",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let rec = &records(one.path(), 1)[0];
    assert_eq!(rec["argv"][0], script.as_str());
    assert_eq!(rec["argv"][1], "stubborn");
    assert_eq!(rec["dev_mode"], true, "--interpreter-args reached python3");
    assert_eq!(rec["cwd"], cwd.as_str());
    file_containing(&one.path().join("o.log"), "out line from");
    file_containing(&one.path().join("e.log"), "err line from");
    assert!(
        !b.home().join("logs/flags-0-out.log").exists(),
        "the default path unused"
    );
    let (_, show, _) = b.cli(&["show", "flags"]);
    assert!(show.contains("o.log"), "show names the out file: {show}");
    let config: serde_json::Value = {
        let (_, json, _) = cli_json(&b, "flags");
        json
    };
    assert_eq!(config["max_memory_restart"], 300 * 1024 * 1024);
    assert_eq!(config["kill_timeout"], "1s");
    // kill_timeout measured: the worker ignores SIGTERM, so stop waits it out, then SIGKILLs.
    let started = Instant::now();
    let (code, _, err) = b.cli(&["stop", "flags"]);
    assert_eq!(code, 0, "{err}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1),
        "stopped after {took:?}, before kill_timeout"
    );
    assert!(
        took < Duration::from_secs(5),
        "stopped after {took:?}: default 5s used?"
    );

    // restart_delay (measured between starts), max_restarts + min_uptime (errored after
    // max_restarts unstable exits in a row).
    let two = tempfile::tempdir().unwrap();
    let (_, out, err) = b.cli(&[
        "start",
        &script,
        "-n",
        "crashy",
        "--cwd",
        &two.path().display().to_string(),
        "--restart-delay",
        "1200",
        "--max-restarts",
        "3",
        "--min-uptime",
        "10s",
        "--",
        "crash",
    ]);
    wait_status(&b, "crashy", "errored");
    eprintln!("{out}{err}");
    records(two.path(), 3);
    std::thread::sleep(Duration::from_millis(300));
    let starts = records(two.path(), 3);
    assert_eq!(
        starts.len(),
        3,
        "errored at the 3rd unstable exit (max_restarts = 3): {starts:?}"
    );
    for pair in starts.windows(2) {
        let gap = pair[1]["t"].as_f64().unwrap() - pair[0]["t"].as_f64().unwrap();
        assert!(
            gap >= 1.2,
            "restarted after {gap:.3}s, restart_delay is 1.2s"
        );
    }

    // --no-autorestart and --log (one file for both streams).
    let three = tempfile::tempdir().unwrap();
    let (_, out, err) = b.cli(&[
        "start",
        &script,
        "-n",
        "once",
        "--cwd",
        &three.path().display().to_string(),
        "--no-autorestart",
        "--log",
        "all.log",
        "--",
        "crash",
    ]);
    wait_status(&b, "once", "stopped");
    let text = file_containing(&three.path().join("all.log"), "err line from");
    assert!(
        text.contains("out line from"),
        "both streams in one file: {text}{out}{err}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(records(three.path(), 1).len(), 1, "never restarted");

    // -x (fork mode): one worker, no listener of ours; the app binds its own port.
    let four = tempfile::tempdir().unwrap();
    let port = free_port();
    let (code, out, err) = b.cli(&[
        "start",
        &script,
        "-n",
        "forked",
        "-x",
        "--cwd",
        &four.path().display().to_string(),
        "--",
        "listen",
        &port.to_string(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let rec = &records(four.path(), 1)[0];
    assert!(rec["port"].is_null(), "no private PORT in fork mode: {rec}");
    let deadline = Instant::now() + PATIENCE;
    let answer = loop {
        if let Ok(mut s) = TcpStream::connect(loopback(port)) {
            let mut text = String::new();
            let _ = s.read_to_string(&mut text);
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the forked app never bound {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(answer.starts_with("fork "), "{answer}");
    let all = b.jlist();
    let forked = workers_of(&all, "forked");
    assert_eq!(forked.len(), 1);
    assert_eq!(forked[0]["listeners"].as_array().map(Vec::len), Some(0));
}

/// `show NAME`'s resolved config, from the admin socket's JSON.
fn cli_json(b: &Balancer, app: &str) -> (i32, serde_json::Value, String) {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(b.home().join("admin.sock")).unwrap();
    writeln!(s, "{{\"cmd\":\"show\",\"target\":\"{app}\"}}").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
    (0, reply["app"]["config"].clone(), line)
}

#[test]
fn ecosystem_writes_a_sample_that_checks_completions_and_help_have_examples() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let file = dir.path().join("balancer.toml");
    let file_arg = file.display().to_string();
    let (code, out, err) = cli(&home, &["ecosystem", &file_arg]);
    assert_eq!(code, 0, "{out}{err}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.lines().filter(|l| l.contains('#')).count() > 10,
        "commented: {text}"
    );
    write_file(dir.path(), "app.js", "");
    let (code, out, err) = cli(&home, &["check", &file_arg]);
    assert_eq!(code, 0, "the sample is a valid balancer.toml: {out}{err}");
    let (code, _, err) = cli(&home, &["init", &file_arg]);
    assert_eq!(code, 2, "never overwrites: {err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);

    for shell in ["bash", "zsh", "fish"] {
        let (code, out, _) = cli(&home, &["completions", shell]);
        assert_eq!(code, 0);
        assert!(
            out.contains("send-signal") && out.contains("ecosystem"),
            "{shell}: {out}"
        );
    }
    let (code, out, _) = cli(&home, &["start", "--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("Examples:") && out.contains("balancer start server.js -i max"),
        "{out}"
    );
    assert!(out.contains("--max-memory-restart"), "{out}");
}

/// Copies `tests/fixtures/NAME` into `to` (the apps write their logs next to the file).
fn fixture(name: &str, to: &Path) -> std::path::PathBuf {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    let dir = to.join(name);
    copy(&root().join("tests/fixtures").join(name), &dir);
    dir
}

#[test]
fn the_seeds_pm2_ecosystem_files_start_and_import() {
    let b = Balancer::start(&sleeper_toml("base", 1, ""));
    b.wait_running();
    let tmp = tempfile::tempdir().unwrap();
    let eco = fixture("pm2-000", tmp.path()).join("ecosystem.config.js");
    let process = fixture("pm2-004", tmp.path()).join("process.json");
    let list = fixture("pm2-004-list", tmp.path()).join("test.json");
    let arg = |p: &std::path::PathBuf| p.display().to_string();

    // ecosystem.config.js, evaluated by node, with --env production picking env_production.
    let (code, out, err) = b.cli(&["start", &arg(&eco), "--env", "production"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("started app") && out.contains("started worker"),
        "{out}"
    );
    assert!(
        !out.contains("ecosystem.config"),
        "the file is not run as a script: {out}"
    );
    file_containing(
        &b.home().join("logs/app-0-out.log"),
        "\"node_env\":\"production\"",
    );
    let (code, _, err) = b.cli(&["start", &arg(&eco)]);
    assert_ne!(code, 0, "already running without -f");
    assert!(err.contains("already running"), "{err}");

    // process.json (a comment in it, as PM2 allows): its out_file used, each dropped key named.
    let (code, out, err) = b.cli(&["start", &arg(&process)]);
    assert_eq!(code, 0, "{out}{err}");
    for key in ["pid_file", "ignoreWatch"] {
        assert!(
            err.contains(&format!("warning: `{key}` (app `jackblog-api`, line")),
            "{key}: {err}"
        );
    }
    assert!(
        err.contains("`pid_file` (app `jackblog-api`, line 9)"),
        "{err}"
    );
    let log = process.parent().unwrap().join("logs/pm2-out.log");
    file_containing(&log, "\"node_env\":\"production\"");

    // The multi-app list: instances as "max" and "4", args as a string.
    let (code, out, err) = b.cli(&["start", &arg(&list)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("`max` (app `echo`, line 4): no balancer equivalent"),
        "{err}"
    );
    let all = b.jlist();
    assert_eq!(workers_of(&all, "api").len(), 4);
    assert_eq!(workers_of(&all, "bus").len(), 1);
    assert!(!workers_of(&all, "echo").is_empty());
    for app in ["app", "worker", "jackblog-api", "echo", "api", "bus"] {
        for w in workers_of(&all, app) {
            assert!(
                w["pid"].as_u64().is_some_and(|p| alive(p as u32)),
                "{app}: {w}"
            );
        }
    }
    file_containing(
        &b.home().join("logs/echo-0-out.log"),
        "\"argv\":[\"-d\",\"1\"]",
    );

    // import: balancer.toml on stdout that checks next to the original, comments for the rest.
    for file in [&eco, &process, &list] {
        let (code, toml, err) = b.cli(&["import", &arg(file)]);
        assert_eq!(code, 0, "{err}");
        let out = file.with_file_name("balancer.toml");
        std::fs::write(&out, &toml).unwrap();
        let (code, ok, err) = b.cli(&["check", &arg(&out)]);
        assert_eq!(code, 0, "{}: {toml}\n{ok}{err}", file.display());
    }
    let app_js = eco.with_file_name("app.js");
    let (code, _, err) = b.cli(&["import", &arg(&app_js)]);
    assert_eq!(code, 2, "a script is not evaluated as a config: {err}");
    let (_, toml, _) = b.cli(&["import", &arg(&process)]);
    assert!(
        toml.contains("# pid_file = \"./logs/jackblog-api.pid\"  # not carried over"),
        "{toml}"
    );
}
