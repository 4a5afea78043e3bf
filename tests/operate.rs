//! Operating a running master: the CLI over the admin socket, reload and scale under load with
//! failed requests counted, draining, the daemon, and what `ls`/`jlist`/`show` say.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::support::*;

fn addr(port: u16) -> SocketAddr {
    loopback(port)
}

#[test]
fn scale_and_three_reloads_under_load_fail_no_request() {
    let port = free_port();
    let b = Balancer::start(&pid_app("web", port, 1, ""));
    b.wait_ready("web", 1);
    b.wait_running();
    let load = Load::start(addr(port), 4);

    let (code, out, err) = b.cli(&["scale", "web", "+2"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(b.ready_pids("web").len(), 3);

    for round in 1..=3 {
        let before = b.ready_pids("web");
        let (code, out, err) = b.cli(&["reload", "web"]);
        assert_eq!(code, 0, "reload {round}: {out}{err}");
        let after = b.ready_pids("web");
        assert_eq!(after.len(), 3, "reload {round}: {after:?}");
        for pid in &after {
            assert!(
                !before.contains(pid),
                "reload {round}: pid {pid} survived: {before:?} → {after:?}"
            );
        }
    }

    let (code, out, err) = b.cli(&["scale", "web", "1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(b.ready_pids("web").len(), 1);

    let (ok, failed, seen) = load.finish();
    eprintln!(
        "scale +2, 3 reloads, scale 1 under load: {ok} ok, {failed} failed, {} pids",
        seen.len()
    );
    assert_eq!(failed, 0, "failed requests during scale and reload");
    assert!(ok > 100, "the load really ran: {ok}");
    assert!(
        seen.len() >= 1 + 2 + 9,
        "answers came from every generation: {seen:?}"
    );
}

#[test]
fn a_reload_to_workers_that_never_become_ready_fails_and_the_old_ones_keep_serving() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let script = write_file(
        dir.path(),
        "app.js",
        &format!("require({:?});\n", worker("pid_server.js")),
    );
    let toml = app_toml(
        "web",
        &script.display().to_string(),
        &format!("tcp://127.0.0.1:{port}"),
        2,
        "listen_timeout = \"3s\"",
    );
    let b = Balancer::start(&toml);
    b.wait_ready("web", 2);
    b.wait_running();
    let before = b.ready_pids("web");
    let load = Load::start(addr(port), 4);

    // The deploy is broken: the app now exits at start.
    std::fs::write(
        &script,
        "console.error('broken deploy'); process.exit(1);\n",
    )
    .unwrap();
    let (code, out, err) = b.cli(&["reload", "web"]);
    assert_eq!(code, 1, "a failed reload exits 1: {out}{err}");
    assert!(err.contains("never became ready"), "says why: {err}");

    // A second bad reload, timed out rather than crashed: it listens nowhere.
    std::fs::write(&script, "setInterval(() => {}, 1000);\n").unwrap();
    let (code, _, err) = b.cli(&["reload", "web"]);
    assert_eq!(code, 1);
    assert!(err.contains("listen_timeout"), "says why: {err}");

    std::thread::sleep(Duration::from_millis(300));
    let (ok, failed, seen) = load.finish();
    eprintln!("failed reloads under load: {ok} ok, {failed} failed, {seen:?}");
    assert_eq!(failed, 0);
    assert_eq!(b.ready_pids("web"), before, "the old workers still serve");
    for pid in &before {
        assert!(seen.contains_key(&pid.to_string()));
    }
}

#[test]
fn a_draining_worker_keeps_its_connections_until_drain_timeout_then_stops() {
    let port = free_port();
    let b = Balancer::start(&pid_app(
        "web",
        port,
        1,
        "drain_timeout = \"3s\"\nkill_timeout = \"1s\"",
    ));
    let old = b.wait_ready("web", 1)[0];
    b.wait_running();
    let mut long = TcpStream::connect(addr(port)).unwrap();
    long.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut reader = BufReader::new(long.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), old.to_string());

    let home = b.home();
    let reload = std::thread::spawn(move || cli(&home, &["reload", "web"]));
    let new = b.wait_ready("web", 2)[1];
    let drain_started = Instant::now();
    // New connections go to the new worker at once…
    assert_eq!(greeting(addr(port)).unwrap(), new.to_string());
    // …while the old one still serves the long connection, well inside drain_timeout.
    std::thread::sleep(Duration::from_millis(1500));
    long.write_all(b"still there?\n").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "still there?\n");
    assert!(alive(old));
    assert!(drain_started.elapsed() < Duration::from_secs(3));

    // After drain_timeout the old worker gets SIGTERM, then SIGKILL after kill_timeout.
    let (code, out, err) = reload.join().unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(drain_started.elapsed() >= Duration::from_millis(2500));
    assert_eq!(
        wait_dead(&[old], Duration::from_secs(10)),
        Vec::<u32>::new()
    );
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    b.log
        .wait_for(1, "drain_timeout", |l| l.contains("drain_timeout"));
}

/// Sends raw bytes to the admin socket and reads one reply line (or EOF).
fn raw_admin(home: &std::path::Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(home.join("admin.sock")).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(bytes).unwrap();
    let mut line = String::new();
    let _ = BufReader::new(s).read_line(&mut line);
    line
}

#[test]
fn the_admin_socket_is_private_and_shrugs_off_bad_clients() {
    let port = free_port();
    let b = Balancer::start(&pid_app("web", port, 1, ""));
    b.wait_ready("web", 1);
    b.wait_running();
    let sock = b.home().join("admin.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // A half-written request, left hanging while others are served.
    let mut half = UnixStream::connect(&sock).unwrap();
    half.write_all(br#"{"cmd":"pi"#).unwrap();

    let garbage = raw_admin(&b.home(), b"this is not json\n");
    assert!(garbage.contains(r#""ok":false"#), "{garbage}");
    let unknown = raw_admin(&b.home(), b"{\"cmd\":\"explode\"}\n");
    assert!(
        unknown.contains(r#""ok":false"#) && unknown.contains("explode"),
        "{unknown}"
    );
    let mut huge = vec![b'x'; 200 * 1024];
    huge.push(b'\n');
    let huge_reply = raw_admin(&b.home(), &huge);
    assert!(
        huge_reply.is_empty() || huge_reply.contains(r#""ok":false"#),
        "{huge_reply}"
    );
    let binary = raw_admin(&b.home(), &[0xff, 0xfe, 0x00, b'\n']);
    assert!(
        binary.is_empty() || binary.contains(r#""ok":false"#),
        "{binary}"
    );

    let pong = raw_admin(&b.home(), b"{\"cmd\":\"ping\"}\n");
    assert!(
        pong.contains(r#""ok":true"#) && pong.contains(&b.pid().to_string()),
        "{pong}"
    );
    assert!(greeting(addr(port)).is_ok(), "the master still proxies");
    let (code, _, _) = b.cli(&["ls"]);
    assert_eq!(code, 0);
    drop(half);
}

/// Kills a daemon by the pid in its home, if a test failed before `balancer kill`.
struct DaemonGuard(std::path::PathBuf);

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.0.join("balancer.pid"))
            && let Ok(pid) = pid.trim().parse::<i32>()
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[test]
fn start_from_a_shell_that_exits_keeps_serving_and_kill_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let _guard = DaemonGuard(home.clone());
    let port = free_port();
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} start {} -n web -i 2 -l tcp://127.0.0.1:{port}",
            binary(),
            worker("pid_server.js")
        ))
        .env("BALANCER_HOME", &home)
        .stdin(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    // The shell is gone; the daemon serves.
    let daemon: u32 = std::fs::read_to_string(home.join("balancer.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pids = ready_pids(&jlist(&home), "web");
    assert_eq!(pids.len(), 2, "start returns once the workers are ready");
    let pid = greeting(addr(port)).unwrap();
    assert!(pids.iter().any(|p| p.to_string() == pid));
    // The daemon is in a session of its own, detached from any terminal.
    let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(daemon as i32))).unwrap();
    assert_eq!(sid.as_raw(), daemon as i32);
    let (code, _, err) = cli(&home, &["start", "x.js"]);
    assert_ne!(code, 0, "{err}");

    let (code, out, err) = cli(&home, &["kill"]);
    assert_eq!(code, 0, "{out}{err}");
    let mut all: Vec<u32> = pids.iter().map(|p| *p as u32).collect();
    all.push(daemon);
    assert_eq!(wait_dead(&all, Duration::from_secs(20)), Vec::<u32>::new());
    // No master: an empty table and a hint, exit 0, as PM2.
    let (code, _, err) = cli(&home, &["ls"]);
    assert_eq!(code, 0);
    assert!(err.contains("no master is running"), "{err}");
}

#[test]
fn ls_jlist_and_show_tell_ready_from_errored_and_why() {
    let port = free_port();
    let toml = format!(
        "{}\n[[app]]\nname = \"broken\"\nscript = \"{}\"\nmax_restarts = 2\n",
        pid_app("good", port, 2, ""),
        worker("crash.py")
    );
    let b = Balancer::start(&toml);
    b.wait_ready("good", 2);
    b.wait_running();
    b.log
        .wait_for(1, "worker errored", |l| l.contains("worker errored"));

    let workers = b.jlist();
    assert_eq!(workers.len(), 3, "{workers:?}");
    let broken = workers.iter().find(|w| w["app"] == "broken").unwrap();
    assert_eq!(broken["status"], "errored");
    assert!(broken["pid"].is_null());
    let reason = broken["reason"].as_str().unwrap();
    assert!(
        reason.contains("unstable exits") && reason.contains("exit code 3"),
        "{reason}"
    );
    assert_eq!(b.ready_pids("good").len(), 2);
    for w in workers.iter().filter(|w| w["app"] == "good") {
        assert_eq!(w["listeners"][0], format!("tcp://127.0.0.1:{port}"));
        assert_eq!(w["policy"], "rr");
    }

    let (code, ls, _) = b.cli(&["ls"]);
    assert_eq!(code, 0);
    assert!(
        ls.contains("errored") && ls.contains("ready") && ls.contains("broken"),
        "{ls}"
    );

    let (code, show, _) = b.cli(&["show", "broken"]);
    assert_eq!(code, 0);
    assert!(show.contains("unstable exits"), "{show}");
    assert!(show.contains("broken-0-err.log"), "{show}");
    assert!(show.contains("kill_timeout"), "the resolved config: {show}");

    let (code, _, err) = b.cli(&["show", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn stop_start_restart_and_delete_by_name_and_id() {
    let port = free_port();
    let b = Balancer::start(&pid_app("web", port, 2, "queue_timeout = \"20s\""));
    b.wait_ready("web", 2);
    b.wait_running();
    let id = b.jlist()[0]["id"].as_u64().unwrap().to_string();

    let (code, _, err) = b.cli(&["stop", &id]);
    assert_eq!(code, 0, "{err}");
    let workers = b.jlist();
    assert_eq!(
        workers.iter().filter(|w| w["status"] == "stopped").count(),
        1
    );
    assert_eq!(b.ready_pids("web").len(), 1);

    let (code, _, err) = b.cli(&["stop", "web"]);
    assert_eq!(code, 0, "{err}");
    assert!(b.ready_pids("web").is_empty());
    // Stopped, the port still takes connections (connect succeeds now, with no worker) and
    // holds them: this one is answered once the app is started below.
    let mut waiting = TcpStream::connect(addr(port)).expect("the stopped app's port is open");
    let (code, _, err) = b.cli(&["start", "web"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(b.ready_pids("web").len(), 2);
    waiting.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut greeting_line = String::new();
    BufReader::new(&mut waiting)
        .read_line(&mut greeting_line)
        .unwrap();
    let greeted: u64 = greeting_line.trim().parse().expect("a worker's pid");
    assert!(b.ready_pids("web").contains(&greeted));
    // Closed, or the restart below would wait drain_timeout for it.
    drop(waiting);

    let before = b.ready_pids("web");
    let (code, _, err) = b.cli(&["restart", "web"]);
    assert_eq!(code, 0, "{err}");
    let after = b.ready_pids("web");
    assert_eq!(after.len(), 2);
    assert!(after.iter().all(|p| !before.contains(p)));
    assert!(b.jlist().iter().all(|w| w["restarts"].as_u64() == Some(1)));

    let (code, _, err) = b.cli(&["delete", "web"]);
    assert_eq!(code, 0, "{err}");
    assert!(b.jlist().is_empty());
    assert!(
        TcpStream::connect(addr(port)).is_err(),
        "a deleted app's port is closed"
    );
    let (code, _, _) = b.cli(&["stop", "web"]);
    assert_eq!(code, 1, "no such app any more");
}

#[test]
fn reload_of_a_changed_file_applies_new_removed_and_resized_apps() {
    let (p1, p2) = (free_port(), free_port());
    let mut b = Balancer::start(&format!(
        "{}{}",
        pid_app("one", p1, 1, ""),
        pid_app("two", p2, 1, "")
    ));
    b.wait_ready("one", 1);
    b.wait_ready("two", 1);
    b.wait_running();
    let file = b.dir.path().join("balancer.toml");
    let p3 = free_port();
    std::fs::write(
        &file,
        format!(
            "{}{}",
            pid_app("one", p1, 3, ""),
            pid_app("three", p3, 1, "")
        ),
    )
    .unwrap();
    let load = Load::start(addr(p1), 2);
    let (code, out, err) = b.cli(&["reload", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let (_, failed, _) = load.finish();
    assert_eq!(failed, 0, "app one stayed up through the reload");
    let workers = b.jlist();
    assert_eq!(ready_pids(&workers, "one").len(), 3);
    assert_eq!(ready_pids(&workers, "three").len(), 1);
    assert!(workers.iter().all(|w| w["app"] != "two"), "two was removed");
    assert!(greeting(addr(p3)).is_ok());
    assert!(TcpStream::connect(addr(p2)).is_err());

    // A bad file changes nothing and says where it is wrong.
    std::fs::write(&file, "[[app]]\nname = \"one\"\ninstnces = 2\n").unwrap();
    let (code, _, err) = b.cli(&["reload", file.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("balancer.toml:3:1"), "{err}");
    assert_eq!(b.ready_pids("one").len(), 3);

    b.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(b.wait_exit().code(), Some(0));
}

#[test]
fn a_second_master_on_the_same_home_is_refused() {
    let port = free_port();
    let b = Balancer::start(&pid_app("web", port, 1, ""));
    b.wait_running();
    let second = std::process::Command::new(binary())
        .args(["run", b.dir.path().join("balancer.toml").to_str().unwrap()])
        .env("BALANCER_HOME", b.home())
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("already running"), "{err}");
    assert!(greeting(addr(port)).is_ok());
}

#[test]
fn logs_shows_what_workers_print_and_flush_empties_it() {
    let port = free_port();
    let b = Balancer::start(&node_web(port, 1));
    let pid = b.wait_ready("web", 1)[0];
    b.wait_running();
    let (code, out, err) = b.cli(&["logs", "web", "--lines", "5"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("(pid {pid}) listening")), "{out}");
    let (code, _, err) = b.cli(&["flush", "web"]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = b.cli(&["logs", "web", "--lines", "5"]);
    assert!(!out.contains("listening"), "flushed: {out}");
    let out_log = b.home().join("logs/web-0-out.log");
    assert_eq!(std::fs::metadata(out_log).unwrap().len(), 0);
}

#[test]
fn sighup_to_the_master_reloads_every_app_without_failing_a_request() {
    let (p1, p2) = (free_port(), free_port());
    let b = Balancer::start(&format!(
        "{}{}",
        pid_app("one", p1, 2, ""),
        pid_app("two", p2, 1, "")
    ));
    b.wait_ready("one", 2);
    b.wait_ready("two", 1);
    b.wait_running();
    let before: Vec<u64> = [b.ready_pids("one"), b.ready_pids("two")].concat();
    let load = Load::start(addr(p1), 2);
    b.signal(nix::sys::signal::Signal::SIGHUP);
    b.wait_ready("one", 4);
    b.wait_ready("two", 2);
    // The reload is done once every old worker has stopped.
    assert!(
        wait_dead(
            &before.iter().map(|p| *p as u32).collect::<Vec<_>>(),
            PATIENCE
        )
        .is_empty()
    );
    let (ok, failed, _) = load.finish();
    assert_eq!(failed, 0, "{ok} ok");
    let after: Vec<u64> = [b.ready_pids("one"), b.ready_pids("two")].concat();
    assert_eq!(after.len(), 3);
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{before:?} → {after:?}"
    );
}
