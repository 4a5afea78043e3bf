//! Seeing workers: CPU and memory of each worker's whole process tree in `ls`/`jlist`/`show`,
//! and `max_memory_restart` enforced as a reload-style replacement, with failed requests
//! counted under load.

use std::time::{Duration, Instant};

use crate::support::*;

/// Polls `jlist` until `pred` holds for the first worker of `app` (panics after `PATIENCE`,
/// showing the last worker seen); returns that worker.
fn wait_worker(
    b: &Balancer,
    app: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let workers = b.jlist();
        let w = workers
            .iter()
            .find(|w| w["app"] == app)
            .cloned()
            .unwrap_or_default();
        if pred(&w) {
            return w;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never happened; last: {w:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Resident memory of one process alone, from `/proc/PID/statm` (pages × 4 KiB is enough here).
fn own_rss(pid: u64) -> u64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).expect("statm");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn ls_jlist_and_show_count_the_whole_process_tree() {
    let port = free_port();
    let toml = format!(
        "[balancer]\nsample_interval = \"200ms\"\n{}",
        app_toml("tree", "tree.py", &format!("tcp://127.0.0.1:{port}"), 1, "")
    );
    let b = Balancer::start(&toml);
    b.wait_ready("tree", 1);
    // The child holds 64 MiB and burns CPU; the main process holds a few MiB and sleeps.
    let w = wait_worker(&b, "tree", "the child is counted", |w| {
        w["processes"] == 2
            && w["memory"].as_u64() > Some(64 << 20)
            && w["cpu_seconds"].as_f64() > Some(0.2)
    });
    let pid = w["pid"].as_u64().unwrap();
    let main_alone = own_rss(pid);
    let tree = w["memory"].as_u64().unwrap();
    assert!(
        tree >= main_alone + (60 << 20),
        "tree {tree} counts the child's 64 MiB over the main pid's {main_alone}"
    );
    assert!(w["cpu"].as_f64().is_some_and(|c| c >= 0.0), "{w:#}");
    let h = &w["history"];
    assert!(h["samples"].as_u64() >= Some(1), "{w:#}");
    assert!(
        h["memory_min"].as_u64() <= h["memory_avg"].as_u64(),
        "{h:#}"
    );
    assert!(
        h["memory_avg"].as_u64() <= h["memory_max"].as_u64(),
        "{h:#}"
    );
    assert!(h["cpu_max"].as_f64() >= h["cpu_min"].as_f64(), "{h:#}");
    assert_eq!(
        w["restarts_by"],
        serde_json::json!({"crash": 0, "memory": 0, "reload": 0, "restart": 0, "watch": 0, "cron": 0})
    );

    let (code, out, err) = b.cli(&["ls"]);
    assert_eq!(code, 0, "{err}");
    let cells = |line: &str| -> Vec<String> {
        line.trim_matches(|c| c == '│' || c == ' ')
            .split('┆')
            .map(|c| c.trim().to_owned())
            .collect()
    };
    let header = cells(out.lines().nth(1).unwrap_or_default());
    assert_eq!(header[7..9], ["cpu", "mem"], "{out}");
    let row = out
        .lines()
        .find(|l| l.contains(&format!(" {pid} ")))
        .map(cells)
        .unwrap_or_else(|| panic!("no row for {pid}:\n{out}"));
    assert!(row[7].ends_with('%') && row[8].ends_with(" MiB"), "{row:?}");

    let (code, out, err) = b.cli(&["show", "tree"]);
    assert_eq!(code, 0, "{err}");
    let usage = out
        .split("usage since start\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no usage section:\n{out}"));
    let row = usage.lines().nth(3).unwrap_or_default();
    assert!(
        row.matches(" / ").count() == 4,
        "cpu and mem min/avg/max: {row}"
    );
    assert!(row.contains("┆     2 ┆"), "two processes: {row}");
}

#[test]
fn a_worker_over_max_memory_restart_is_replaced_like_a_reload_and_no_request_fails() {
    let port = free_port();
    let toml = format!(
        "[balancer]\nsample_interval = \"250ms\"\n{}",
        app_toml(
            "leaky",
            "grow.js",
            &format!("tcp://127.0.0.1:{port}"),
            2,
            "max_memory_restart = \"100M\"\nenv = { GROW_MB = \"8\", GROW_CAP_MB = \"160\" }",
        )
    );
    let b = Balancer::start(&toml);
    let first = b.wait_ready("leaky", 2);
    b.wait_running();
    let load = Load::start(loopback(port), 4);

    // Both workers leak: wait until each has been replaced at least once.
    let deadline = Instant::now() + PATIENCE;
    let workers = loop {
        let workers = b.jlist();
        let replaced = workers
            .iter()
            .filter(|w| w["restarts_by"]["memory"].as_u64() >= Some(1) && w["status"] == "ready")
            .count();
        if replaced >= 2 {
            break workers;
        }
        assert!(Instant::now() < deadline, "not both replaced: {workers:#?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let replaced = workers
        .iter()
        .find(|w| w["status"] == "ready")
        .cloned()
        .unwrap();
    let (ok, failed, _) = load.finish();
    eprintln!("memory replacements under load: {ok} ok, {failed} failed");
    assert_eq!(
        failed, 0,
        "failed requests while replacing over-limit workers"
    );
    assert!(ok > 50, "the load really ran: {ok}");

    let pid = replaced["pid"].as_u64().unwrap() as u32;
    assert!(!first.contains(&pid), "a new process: {pid} vs {first:?}");
    assert!(
        replaced["last_restart"]
            .as_str()
            .is_some_and(|r| r.starts_with("memory: tree RSS")
                && r.contains("over max_memory_restart 100.0 MiB")),
        "{replaced:#}"
    );
    assert_eq!(
        replaced["restarts_by"]["crash"], 0,
        "not a kill-and-restart"
    );
    assert!(
        b.log
            .all()
            .iter()
            .any(|l| l.contains("over max_memory_restart") && l.contains("replacing it")),
        "the master says why"
    );
    let (code, out, err) = b.cli(&["show", "leaky"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("last restart: memory: tree RSS"), "{out}");
    // The replaced workers were drained and stopped, not left running.
    assert_eq!(
        wait_dead(&first, PATIENCE),
        [] as [u32; 0],
        "over-limit workers are gone"
    );
}

#[test]
fn a_memory_replacement_that_cannot_become_ready_leaves_the_old_worker_serving() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("started");
    let toml = format!(
        "[balancer]\nsample_interval = \"200ms\"\n{}",
        app_toml(
            "stuck",
            "grow.js",
            &format!("tcp://127.0.0.1:{port}"),
            1,
            &format!(
                "max_memory_restart = \"100M\"\nlisten_timeout = \"3s\"\n\
                 env = {{ GROW_MB = \"8\", GROW_CAP_MB = \"160\", ONCE_MARK = {:?} }}",
                mark.display().to_string()
            ),
        )
    );
    let b = Balancer::start(&toml);
    let old = b.wait_ready("stuck", 1)[0];
    b.log.wait_for(1, "a failed memory replacement", |l| {
        l.contains("memory replacement failed, the old worker keeps serving")
    });
    assert_eq!(greeting(loopback(port)).unwrap(), old.to_string());
    let w = &b.jlist()[0];
    assert_eq!(w["pid"], old, "{w:#}");
    assert_eq!(w["status"], "ready", "{w:#}");
    assert_eq!(w["restarts_by"]["memory"], 0, "{w:#}");
    assert!(
        w["memory"].as_u64() > Some(100 << 20),
        "still over the limit: {w:#}"
    );
}
