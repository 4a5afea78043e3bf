//! `monit`'s feed: the admin socket's `subscribe` request against a real master with real
//! workers (snapshots stream, counters move with traffic, logs arrive, bad requests are
//! refused and the master goes on), and `balancer monit` without a master or a terminal.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

use crate::support::*;

/// A connection to the admin socket, read line by line.
struct Admin {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Admin {
    fn connect(home: &Path) -> Admin {
        let stream = UnixStream::connect(home.join("admin.sock")).expect("admin socket");
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        Admin {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        }
    }

    fn send(&mut self, line: &str) {
        writeln!(self.writer, "{line}").expect("send a request");
    }

    fn reply(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("a reply");
        assert!(!line.is_empty(), "the master hung up");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    /// Reads frames until `pred` holds for one (panics after `PATIENCE`); returns it.
    fn frame_until(
        &mut self,
        what: &str,
        mut pred: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let reply = self.reply();
            assert_eq!(reply["ok"], true, "{reply}");
            let frame = reply["snapshot"].clone();
            assert!(frame.is_object(), "not a snapshot: {reply}");
            if pred(&frame) {
                return frame;
            }
            assert!(Instant::now() < deadline, "{what}: never; last {frame:#}");
        }
    }
}

fn app<'a>(frame: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    frame["apps"]
        .as_array()
        .and_then(|apps| apps.iter().find(|a| a["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

fn sum(app: &serde_json::Value, field: &str) -> u64 {
    app["workers"]
        .as_array()
        .map_or(0, |ws| ws.iter().filter_map(|w| w[field].as_u64()).sum())
}

#[test]
fn a_subscription_streams_snapshots_whose_counters_and_logs_move() {
    let (web_port, echo_port) = (free_port(), free_port());
    let toml = format!(
        "[balancer]\nsample_interval = \"200ms\"\n{}{}",
        node_web(web_port, 1),
        pid_app("echo", echo_port, 2, "")
    );
    let b = Balancer::start(&toml);
    b.wait_ready("web", 1);
    b.wait_ready("echo", 2);
    let mut sub = Admin::connect(&b.home());
    sub.send(r#"{"cmd":"subscribe","interval_ms":200,"logs":"web"}"#);

    // The first frame: both apps as `jlist` has them, and web's past lines.
    let first = sub.frame_until("a first frame", |_| true);
    let names: Vec<_> = first["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["web", "echo"], "{first:#}");
    let echo = app(&first, "echo");
    assert_eq!(echo["policy"], "rr");
    assert_eq!(echo["listeners"][0], format!("tcp://127.0.0.1:{echo_port}"));
    assert_eq!(echo["workers"].as_array().unwrap().len(), 2);
    assert_eq!(
        sum(echo, "connections_total"),
        0,
        "no traffic yet: {echo:#}"
    );
    assert!(echo["workers"][0]["pid"].as_u64().is_some(), "{echo:#}");
    assert!(echo["workers"][0]["restarts_by"].is_object(), "{echo:#}");
    assert!(
        first["logs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["app"] == "web" && l["line"].as_str().unwrap().contains("listening")),
        "web's past lines: {first:#}"
    );

    // Traffic: 6 connections, each greeted with the worker's pid.
    for _ in 0..6 {
        greeting(loopback(echo_port)).expect("a greeting");
    }
    let moved = sub.frame_until("echo's counters to move", |f| {
        let echo = app(f, "echo");
        sum(echo, "connections_total") == 6 && sum(echo, "bytes_total") > 0
    });
    let t0 = first["elapsed_ms"].as_u64().unwrap();
    assert!(
        moved["elapsed_ms"].as_u64().unwrap() > t0,
        "the clock moves"
    );
    assert!(
        app(&moved, "echo")["workers"][0]["memory"].as_u64() > Some(0),
        "memory from the sampler: {moved:#}"
    );

    // New lines: a second web worker logs as it starts, in its own (new) file.
    let (code, _, err) = b.cli(&["scale", "web", "+1"]);
    assert_eq!(code, 0, "{err}");
    sub.frame_until("the new worker's log line", |f| {
        f["logs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["instance"] == 1 && l["line"].as_str().unwrap().contains("listening"))
    });

    // Another line ends the stream; the connection then serves requests again.
    sub.send(r#"{"cmd":"ping"}"#);
    sub.send(r#"{"cmd":"ping"}"#);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let reply = sub.reply();
        if reply.get("pid").is_some() {
            assert_eq!(reply["pid"], b.pid());
            break;
        }
        assert!(reply.get("snapshot").is_some(), "{reply}");
        assert!(Instant::now() < deadline, "no pong after the stream ended");
    }
}

#[test]
fn a_bad_subscription_is_refused_and_the_master_goes_on() {
    let port = free_port();
    let b = Balancer::start(&pid_app("echo", port, 1, ""));
    b.wait_ready("echo", 1);
    let mut admin = Admin::connect(&b.home());
    for (request, code, says) in [
        (
            r#"{"cmd":"subscribe","interval_ms":5}"#,
            2,
            "between 100 and 60000",
        ),
        (
            r#"{"cmd":"subscribe","interval_ms":"fast"}"#,
            2,
            "bad request",
        ),
        (r#"{"cmd":"subscribe","every":1}"#, 2, "every"),
        (r#"{"cmd":"subscribe","logs":"nope"}"#, 1, "nope"),
    ] {
        admin.send(request);
        let reply = admin.reply();
        assert_eq!(reply["ok"], false, "{request}: {reply}");
        assert_eq!(reply["code"], code, "{request}: {reply}");
        assert!(
            reply["error"].as_str().unwrap().contains(says),
            "{request}: {reply}"
        );
    }
    admin.send(r#"{"cmd":"list"}"#);
    let listed = admin.reply();
    assert_eq!(
        listed["workers"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );

    // A subscriber that hangs up mid-stream costs the master nothing either.
    let mut gone = Admin::connect(&b.home());
    gone.send(r#"{"cmd":"subscribe","interval_ms":100}"#);
    gone.frame_until("a frame", |_| true);
    drop(gone);
    let (code, out, err) = b.cli(&["ping"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        greeting(loopback(port)).is_ok(),
        "the listener still serves"
    );
}

#[test]
fn monit_without_a_master_or_a_terminal_says_so() {
    let home = tempfile::tempdir().unwrap();
    let (code, _, err) = cli(home.path(), &["monit"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no master is running"), "{err}");

    let b = Balancer::start(&pid_app("echo", free_port(), 1, ""));
    b.wait_running();
    let (code, _, err) = b.cli(&["monit"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("needs a terminal"), "{err}");
    let (code, _, err) = b.cli(&["monit", "--interval", "5"]);
    assert_eq!(code, 2, "{err}");
}

/// A tmux server of this test's own (its socket in the test's directory), killed on drop.
struct Tmux {
    socket: std::path::PathBuf,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tmux");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Captures the pane until `pred` holds (panics after `PATIENCE`); returns the screen.
    fn screen_until(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let screen = self.run(&["capture-pane", "-p", "-t", "monit"]);
            if pred(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: never; screen:\n{screen}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

/// `balancer monit` in a real 80×24 terminal (tmux): it draws every pane, a key sequence
/// (down, tab, +, y) scales the selected app through the master, and `q` restores the terminal
/// and exits 0. Skipped, saying so, where tmux is not installed (`.ci/run` installs it).
#[test]
fn monit_in_a_real_terminal_scales_the_selected_app() {
    if std::process::Command::new("tmux")
        .arg("-V")
        .output()
        .is_err()
    {
        eprintln!("skipped: tmux is not installed (apt-get install tmux)");
        return;
    }
    let toml = format!(
        "{}{}",
        pid_app("web", free_port(), 2, ""),
        pid_app("api", free_port(), 1, "")
    );
    let b = Balancer::start(&toml);
    b.wait_ready("web", 2);
    b.wait_ready("api", 1);
    let tmux = Tmux {
        socket: b.dir.path().join("tmux.sock"),
    };
    let command = format!(
        "env BALANCER_HOME={} TERM=xterm-256color {} monit --interval 200; echo EXIT=$?; sleep 60",
        b.home().display(),
        binary()
    );
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "monit",
        "-x",
        "80",
        "-y",
        "24",
        &command,
    ]);
    tmux.screen_until("the dashboard", |s| {
        s.contains("Processes") && s.contains("api-0") && s.contains("web conn/s")
    });
    // down, down: api's worker (rows: web-0, web-1, api-0); tab: the logs pane; +: ask.
    for key in ["Down", "Down", "Tab", "+"] {
        tmux.run(&["send-keys", "-t", "monit", key]);
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let asked = tmux.screen_until("the confirmation line", |s| s.contains("y/n"));
    assert!(asked.contains("scale api from 1 to 2?"), "{asked}");
    assert_eq!(b.ready_pids("api").len(), 1, "nothing sent before y");
    tmux.run(&["send-keys", "-t", "monit", "y"]);
    let done = tmux.screen_until("the scale's outcome", |s| {
        s.contains("scaled api from 1 to 2") && s.contains("api-1")
    });
    for line in done.lines() {
        assert!(
            line.chars().count() <= 80,
            "a line wider than the terminal: {line}"
        );
    }
    tmux.run(&["send-keys", "-t", "monit", "q"]);
    let quit = tmux.screen_until("monit to exit", |s| s.contains("EXIT="));
    assert!(quit.contains("EXIT=0"), "{quit}");
    assert!(
        !quit.contains("Processes"),
        "the alternate screen is gone: {quit}"
    );
}
