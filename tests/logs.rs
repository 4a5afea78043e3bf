//! Relayed logs end to end: timestamps, merged files, size rotation with compression, and a
//! flooding worker next to proxied traffic, with real workers writing through the master.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::*;

/// A no-listener app of `instances` workers running `script` with `extra` keys.
fn quiet_app(name: &str, script: &str, instances: u32, extra: &str) -> String {
    format!(
        "\n[[app]]\nname = \"{name}\"\nscript = \"{}\"\ninstances = {instances}\n{extra}\n",
        worker(script)
    )
}

/// The rotated files of `base` (oldest first) then `base`, each read whole (gunzipped), once a
/// consistent view is had: a compression in progress has a file under two names for a moment.
fn all_files(base: &Path) -> (Vec<PathBuf>, String) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(found) = try_all_files(base) {
            return found;
        }
        assert!(Instant::now() < deadline, "no stable view of {base:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn try_all_files(base: &Path) -> Option<(Vec<PathBuf>, String)> {
    let dir = base.parent()?;
    let name = base.file_name()?.to_str()?;
    let mut stamps: Vec<(String, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).ok()? {
        let file = entry.ok()?.file_name().into_string().ok()?;
        let Some(rest) = file.strip_prefix(&format!("{name}.")) else {
            continue;
        };
        if rest.ends_with(".tmp") {
            // Being compressed: its plain twin is still there.
            continue;
        }
        let stamp = rest.strip_suffix(".gz").unwrap_or(rest).to_owned();
        match stamps.iter_mut().find(|(s, _)| *s == stamp) {
            // Both names exist between the rename of the .gz and the removal of the plain one.
            Some(slot) if file.ends_with(".gz") => slot.1 = dir.join(&file),
            Some(_) => {}
            None => stamps.push((stamp, dir.join(&file))),
        }
    }
    stamps.sort();
    let mut text = String::new();
    let mut files = Vec::new();
    for (_, path) in stamps {
        let bytes = std::fs::read(&path).ok()?;
        if path.extension().is_some_and(|e| e == "gz") {
            flate2::read::GzDecoder::new(&bytes[..])
                .read_to_string(&mut text)
                .ok()?;
        } else {
            text.push_str(std::str::from_utf8(&bytes).ok()?);
        }
        files.push(path);
    }
    text.push_str(&std::fs::read_to_string(base).ok()?);
    files.push(base.to_path_buf());
    Some((files, text))
}

/// Splits `<timestamp>: rest` with the default RFC 3339 format; panics on a line without one.
fn stamped(line: &str) -> (chrono::DateTime<chrono::FixedOffset>, &str) {
    let (stamp, rest) = chrono::DateTime::parse_and_remainder(line, "%Y-%m-%dT%H:%M:%S%.3f%:z")
        .unwrap_or_else(|e| panic!("no timestamp ({e}) in {line:?}"));
    (
        stamp,
        rest.strip_prefix(": ").expect("': ' after the stamp"),
    )
}

#[test]
fn a_hundred_thousand_lines_across_rotations_are_all_there_once_in_order() {
    let b = Balancer::start(&quiet_app(
        "rot",
        "log_lines.py",
        2,
        "env = { LINES = \"50000\" }\ntime = true\nmerge_logs = true\n\
         log_max_size = \"1M\"\nlog_retain = 100\nlog_compress = true",
    ));
    b.wait_ready("rot", 2);
    let base = b.home().join("logs/rot-out.log");
    // Wait for both instances to finish and every rotated file to be compressed.
    let deadline = Instant::now() + PATIENCE * 4;
    let (files, text) = loop {
        let (files, text) = all_files(&base);
        let done = text.lines().filter(|l| l.contains("] done ")).count();
        let plain = files[..files.len() - 1]
            .iter()
            .filter(|f| f.extension().is_none_or(|e| e != "gz"))
            .count();
        if done == 2 && plain == 0 {
            break (files, text);
        }
        assert!(
            Instant::now() < deadline,
            "{done} of 2 done, {plain} rotated files not compressed"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        files.len() >= 6,
        "at least 5 rotations: {:?}",
        files.iter().map(|f| f.file_name()).collect::<Vec<_>>()
    );
    let mut next: HashMap<String, u64> = HashMap::new();
    let mut count = 0;
    for line in text.lines() {
        let (_, rest) = stamped(line);
        let (tag, body) = rest.split_once(' ').expect("tag");
        if body.starts_with("done ") {
            continue;
        }
        let fields: Vec<&str> = body.split(' ').collect();
        assert_eq!(fields.len(), 3, "torn line: {line:?}");
        assert_eq!(fields[2], "p".repeat(24), "torn line: {line:?}");
        assert_eq!(
            tag,
            format!("[rot-{}]", fields[0]),
            "tagged with its instance"
        );
        let seq: u64 = fields[1].parse().unwrap();
        let expected = next.entry(fields[0].to_owned()).or_default();
        assert_eq!(seq, *expected, "instance {}: lost or reordered", fields[0]);
        *expected += 1;
        count += 1;
    }
    assert_eq!(count, 100_000);
    assert_eq!(next.values().copied().collect::<Vec<_>>(), [50_000, 50_000]);
}

#[test]
fn time_and_merge_logs_tag_instances_and_logs_interleaves_by_time() {
    let b = Balancer::start(&quiet_app(
        "tick",
        "log_lines.py",
        2,
        "env = { LINES = \"60\", STDERR_EVERY = \"3\" }\n\
         log_date_format = \"%Y-%m-%d %H:%M:%S%.6f\"\nmerge_logs = true",
    ));
    b.wait_ready("tick", 2);
    let out = b.home().join("logs/tick-out.log");
    let err = b.home().join("logs/tick-err.log");
    let deadline = Instant::now() + PATIENCE;
    while std::fs::read_to_string(&out)
        .unwrap_or_default()
        .matches("] done ")
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "workers never finished");
        std::thread::sleep(Duration::from_millis(50));
    }
    for path in [&out, &err] {
        let text = std::fs::read_to_string(path).unwrap();
        for line in text.lines() {
            let (_, rest) =
                chrono::NaiveDateTime::parse_and_remainder(line, "%Y-%m-%d %H:%M:%S%.6f")
                    .unwrap_or_else(|e| panic!("{e}: {line:?}"));
            assert!(
                rest.starts_with(": [tick-0] ") || rest.starts_with(": [tick-1] "),
                "{line:?}"
            );
        }
    }
    let (code, stdout, stderr) = b.cli(&["logs", "tick", "--lines", "200", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let logs: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(logs.len(), 122, "every line of both files, once: {stdout}");
    let mut last = chrono::NaiveDateTime::MIN;
    let mut seen = std::collections::HashSet::new();
    for log in &logs {
        let line = log["line"].as_str().unwrap();
        let (at, rest) =
            chrono::NaiveDateTime::parse_and_remainder(line, "%Y-%m-%d %H:%M:%S%.6f").unwrap();
        assert!(at >= last, "in time order: {line}");
        last = at;
        let instance = log["instance"].as_u64().unwrap();
        assert!(rest.starts_with(&format!(": [tick-{instance}] ")), "{log}");
        seen.insert((instance, log["stream"].as_str().unwrap().to_owned()));
    }
    assert_eq!(seen.len(), 4, "both instances, both streams: {seen:?}");

    // Restarts give each new process fresh pipes; the old ones close at their end of file,
    // so the master's descriptors come back to what they were.
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", b.pid()))
            .unwrap()
            .count()
    };
    let before = fds();
    for round in 1..=2 {
        let (code, _, stderr) = b.cli(&["restart", "tick"]);
        assert_eq!(code, 0, "{stderr}");
        let deadline = Instant::now() + PATIENCE;
        while std::fs::read_to_string(&out)
            .unwrap_or_default()
            .matches("] done ")
            .count()
            < 2 + 2 * round
        {
            assert!(
                Instant::now() < deadline,
                "restarted workers never finished"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let deadline = Instant::now() + PATIENCE;
    while fds() > before {
        assert!(Instant::now() < deadline, "{} fds, {before} before", fds());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_flooding_worker_does_not_stop_proxied_traffic() {
    let port = free_port();
    let toml = format!(
        "{}{}",
        pid_app("quiet", port, 2, ""),
        quiet_app(
            "flood",
            "flood.py",
            1,
            "time = true\nlog_max_size = \"1M\"\nlog_retain = 2",
        )
    );
    let b = Balancer::start(&toml);
    b.wait_ready("quiet", 2);
    b.wait_ready("flood", 1);
    let base = b.home().join("logs/flood-0-out.log");
    let load = Load::start(loopback(port), 4);
    let deadline = Instant::now() + PATIENCE;
    // The flood has gone through the relay (timestamped, rotated) while the load ran.
    let rotated = || {
        std::fs::read_dir(b.home().join("logs"))
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                let name = name.to_string_lossy();
                name.starts_with("flood-0-out.log.") && !name.ends_with(".tmp")
            })
            .count()
    };
    while rotated() < 2 || load.ok.load(std::sync::atomic::Ordering::Relaxed) < 200 {
        assert!(Instant::now() < deadline, "{} rotations", rotated());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, failed, _) = load.finish();
    assert_eq!(failed, 0, "{ok} ok");
    // The current file fills again right after each rotation: wait for two whole lines.
    let line = loop {
        let text = std::fs::read_to_string(&base).unwrap_or_default();
        if let Some(line) = text.lines().nth(1).filter(|_| text.lines().count() > 2) {
            break line.to_owned();
        }
        assert!(Instant::now() < deadline, "no flood lines in {base:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let (_, rest) = stamped(&line);
    assert!(rest.starts_with("flood xxx"), "{line:?}");
    // Pruning runs behind the relay (on a thread of its own): once the flood stops, it
    // catches up to `log_retain = 2`.
    let (code, _, stderr) = b.cli(&["stop", "flood"]);
    assert_eq!(code, 0, "{stderr}");
    while rotated() > 2 {
        assert!(
            Instant::now() < deadline,
            "{} rotated files kept",
            rotated()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn what_workers_write_as_the_master_stops_reaches_the_file() {
    let mut b = Balancer::start(&quiet_app("last", "last_words.py", 1, "time = true"));
    b.wait_ready("last", 1);
    let out = b.home().join("logs/last-0-out.log");
    let deadline = Instant::now() + PATIENCE;
    while !std::fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("started 0")
    {
        assert!(Instant::now() < deadline, "the worker never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    b.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(b.wait_exit().success());
    // Read when the master has exited: the relay wrote the partial last line, as a line.
    let text = std::fs::read_to_string(&out).unwrap();
    let last = text.lines().last().unwrap();
    assert_eq!(stamped(last).1, "bye 0", "{text:?}");
    assert!(text.ends_with('\n'));
}
