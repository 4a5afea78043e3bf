//! Deploying and keeping it running: `save` / `resurrect` (also after a SIGKILL of the master
//! in the middle of saves), the systemd unit `startup` prints, the master's sd_notify messages
//! to a socket standing in for systemd, workers with `ready = "notify"`, and the master as PID 1
//! of a PID namespace reaping the zombies re-parented to it.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::*;

/// Kills the daemon of a home by the pid in its pid file, if a test failed before `kill`.
struct DaemonGuard(PathBuf);

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        if let Some(pid) = daemon_pid(&self.0) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

fn daemon_pid(home: &Path) -> Option<u32> {
    std::fs::read_to_string(home.join("balancer.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `app -> (workers, statuses)` from `jlist`.
fn apps(home: &Path) -> BTreeMap<String, Vec<String>> {
    let mut apps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for w in jlist(home) {
        apps.entry(w["app"].as_str().unwrap_or_default().to_owned())
            .or_default()
            .push(w["status"].as_str().unwrap_or_default().to_owned());
    }
    apps
}

/// Waits until `pred` holds for the home's apps, or panics with what they were.
fn wait_apps(home: &Path, what: &str, pred: impl Fn(&BTreeMap<String, Vec<String>>) -> bool) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let now = apps(home);
        if pred(&now) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: apps are {now:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn all(statuses: Option<&Vec<String>>, n: usize, status: &str) -> bool {
    statuses.is_some_and(|s| s.len() == n && s.iter().all(|x| x == status))
}

#[test]
fn save_kill_resurrect_brings_back_every_app_its_scale_and_stopped_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let _guard = DaemonGuard(home.clone());
    let (p1, p2) = (free_port(), free_port());
    let file = write_file(dir.path(), "balancer.toml", &pid_app("web", p1, 1, ""));
    let file = file.display().to_string();
    let (code, _, err) = cli(&home, &["start", &file]);
    assert_eq!(code, 0, "{err}");
    let listen = format!("tcp://127.0.0.1:{p2}");
    let script = worker("pid_server.js");
    let (code, _, err) = cli(&home, &["start", &script, "-n", "solo", "-l", &listen]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cli(&home, &["scale", "web", "3"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cli(&home, &["stop", "solo"]);
    assert_eq!(code, 0, "{err}");

    let (code, out, err) = cli(&home, &["save"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("saved 2 apps"), "{out}");
    let dump = home.join("dump.json");
    let mode = std::fs::metadata(&dump).expect("dump").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "env values may be secrets");

    let (code, _, err) = cli(&home, &["kill"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cli(&home, &["resurrect"]);
    assert_eq!(code, 0, "{err}");
    let now = apps(&home);
    assert!(
        all(now.get("web"), 3, "ready"),
        "scaled count kept: {now:?}"
    );
    assert!(all(now.get("solo"), 1, "stopped"), "still stopped: {now:?}");
    assert!(greeting(loopback(p1)).is_ok(), "web serves again");

    // A second resurrect finds everything running and changes nothing.
    let (code, _, err) = cli(&home, &["resurrect"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(apps(&home), now);
    let (code, _, err) = cli(&home, &["kill"]);
    assert_eq!(code, 0, "{err}");

    // What the systemd unit runs: `balancer run` with no file, in the foreground, brings the
    // dump back and only then tells systemd it is ready.
    let systemd = FakeSystemd::bind(dir.path());
    let mut run = Command::new(binary())
        .arg("run")
        .env("BALANCER_HOME", &home)
        .env("NOTIFY_SOCKET", &systemd.path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("balancer run");
    let mut pings = 0;
    let ready = systemd.next(&mut pings);
    assert!(ready.starts_with("READY=1"), "{ready}");
    assert_eq!(
        apps(&home),
        now,
        "the foreground master resurrected the dump"
    );
    kill(Pid::from_raw(run.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    assert!(run.wait().expect("run exits").success());
}

#[test]
fn a_sigkilled_master_during_saves_leaves_a_whole_dump_that_resurrects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let _guard = DaemonGuard(home.clone());
    let port = free_port();
    let listen = format!("tcp://127.0.0.1:{port}");
    let (code, _, err) = cli(
        &home,
        &[
            "start",
            &worker("pid_server.js"),
            "-n",
            "web",
            "-i",
            "2",
            "-l",
            &listen,
        ],
    );
    assert_eq!(code, 0, "{err}");
    for round in 0..3 {
        let master = daemon_pid(&home).expect("daemon pid");
        // Saves back to back on their own socket connections, while the master is SIGKILLed.
        let saver = {
            let home = home.clone();
            std::thread::spawn(move || {
                let mut saved = 0;
                while saved < 200 {
                    let out = Command::new(binary())
                        .arg("save")
                        .env("BALANCER_HOME", &home)
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                    if !out.is_ok_and(|s| s.success()) {
                        break;
                    }
                    saved += 1;
                }
                saved
            })
        };
        std::thread::sleep(Duration::from_millis(300 + 100 * round));
        kill(Pid::from_raw(master as i32), Signal::SIGKILL).expect("SIGKILL the master");
        let saved = saver.join().expect("saver");
        assert!(
            saved > 0,
            "round {round}: no save went through before the kill"
        );
        let text = std::fs::read_to_string(home.join("dump.json")).expect("a dump is there");
        let dump: serde_json::Value = serde_json::from_str(&text).expect("the dump is whole JSON");
        assert_eq!(dump["apps"][0]["name"], "web", "round {round}: {text}");
        assert_eq!(dump["apps"][0]["instances"], 2, "round {round}: {text}");
        let leftovers: Vec<_> = std::fs::read_dir(&home)
            .expect("home")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(
            leftovers.len() <= 1,
            "at most the one temporary file of the killed save: {leftovers:?}"
        );
        assert!(wait_dead(&[master], PATIENCE).is_empty());
        // `start` with no argument resurrects, as `resurrect` does.
        let (code, _, err) = cli(&home, &["start"]);
        assert_eq!(code, 0, "round {round}: {err}");
        wait_apps(&home, "resurrected", |a| all(a.get("web"), 2, "ready"));
    }
    let (code, _, err) = cli(&home, &["kill"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let (code, unit, err) = cli(&home, &["startup", "systemd"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        unit.contains("Type=notify\n") && unit.contains("WatchdogSec="),
        "{unit}"
    );
    assert!(err.contains("--install"), "says how to install it: {err}");
    let (code, _, err) = cli(&home, &["startup", "upstart"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not supported yet"), "{err}");

    let Some(analyze) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        eprintln!("SKIPPED: systemd-analyze is not installed (apt-get install -y systemd)");
        return;
    };
    let path = write_file(dir.path(), "balancer.service", &unit);
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .expect("run systemd-analyze");
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    // Lines about the machine's own units (none runs here) are not about ours.
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("balancer.service"))
        .collect();
    assert!(out.status.success() && ours.is_empty(), "{text}");
}

/// Receives sd_notify datagrams as systemd would.
struct FakeSystemd {
    socket: UnixDatagram,
    path: PathBuf,
}

impl FakeSystemd {
    fn bind(dir: &Path) -> FakeSystemd {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(PATIENCE))
            .expect("read timeout");
        FakeSystemd { socket, path }
    }

    /// The next message that is not a watchdog ping (those are counted into `pings`).
    fn next(&self, pings: &mut u32) -> String {
        let mut buf = [0u8; 4096];
        loop {
            let n = self
                .socket
                .recv(&mut buf)
                .expect("a notify message in time");
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            if text == "WATCHDOG=1" {
                *pings += 1;
            } else {
                return text;
            }
        }
    }
}

#[test]
fn the_master_tells_systemd_ready_reloading_stopping_and_pings_the_watchdog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let systemd = FakeSystemd::bind(dir.path());
    let port = free_port();
    let notify = systemd.path.display().to_string();
    let mut b = Balancer::start_with(
        &pid_app("web", port, 2, ""),
        &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "200000")],
    );
    let mut pings = 0;
    let ready = systemd.next(&mut pings);
    assert!(ready.starts_with("READY=1"), "{ready}");
    assert_eq!(
        ready_pids(&b.jlist(), "web").len(),
        2,
        "READY=1 comes once the first workers are ready"
    );
    // The workers do not get the master's channel to systemd.
    for pid in b.ready_pids("web") {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
        let environ = String::from_utf8_lossy(&environ);
        assert!(!environ.contains("NOTIFY_SOCKET="), "worker {pid} has it");
        assert!(!environ.contains("WATCHDOG_USEC="), "worker {pid} has it");
    }

    b.signal(Signal::SIGHUP);
    let reloading = systemd.next(&mut pings);
    let mut lines = reloading.lines();
    assert_eq!(lines.next(), Some("RELOADING=1"), "{reloading}");
    let stamp = lines
        .next()
        .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|s| s.parse::<u64>().ok());
    assert!(stamp.is_some_and(|s| s > 0), "{reloading}");
    assert_eq!(systemd.next(&mut pings), "READY=1", "after the reload");

    // Pings every WATCHDOG_USEC / 2 = 100ms; wait for two more past this point.
    let before = pings;
    let mut buf = [0u8; 64];
    while pings < before + 2 {
        let n = systemd.socket.recv(&mut buf).expect("a ping in time");
        assert_eq!(&buf[..n], b"WATCHDOG=1");
        pings += 1;
    }

    b.signal(Signal::SIGTERM);
    assert_eq!(systemd.next(&mut pings), "STOPPING=1");
    assert!(b.wait_exit().success());
}

#[test]
fn a_worker_with_ready_notify_is_ready_only_once_it_sends_ready() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gate = dir.path().join("gate");
    let port = free_port();
    let toml = app_toml(
        "slow",
        "notify_ready.py",
        &format!("tcp://127.0.0.1:{port}"),
        1,
        &format!(
            "ready = \"notify\"\nlisten_timeout = \"60s\"\nenv = {{ READY_GATE = \"{}\" }}",
            gate.display()
        ),
    );
    let b = Balancer::start(&toml);
    b.wait_running();
    b.log
        .wait_for(1, "worker started", |l| l.contains("worker started"));
    // Its port is open and answering, yet it is not ready: it has not said READY=1.
    let deadline = Instant::now() + PATIENCE;
    let private = loop {
        let workers = b.jlist();
        let private = workers[0]["private"][0].as_str().map(str::to_owned);
        if let Some(addr) = private.and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            && greeting(addr).is_ok()
        {
            break addr;
        }
        assert!(
            Instant::now() < deadline,
            "the worker never listened: {workers:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(500));
    let workers = b.jlist();
    assert_eq!(
        workers[0]["status"], "starting",
        "no READY=1 yet ({private} answers)"
    );

    std::fs::write(&gate, "").expect("open the gate");
    let pids = b.wait_ready("slow", 1);
    assert_eq!(
        greeting(loopback(port)).expect("proxied"),
        pids[0].to_string()
    );
    let out = std::fs::read_to_string(b.home().join("logs/slow-0-out.log")).unwrap_or_default();
    assert!(
        out.contains("sent READY=1"),
        "the worker sent it itself: {out}"
    );
}

/// `(state, ppid)` of a process, from `/proc`.
fn state_ppid(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    Some((f.next()?.chars().next()?, f.next()?.parse().ok()?))
}

/// The children of `parent`, with their states.
fn children(parent: u32) -> Vec<(u32, char)> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|pid| {
                    let (state, ppid) = state_ppid(pid)?;
                    (ppid == parent).then_some((pid, state))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn as_pid_1_the_master_reaps_orphaned_zombies_and_exits_cleanly_on_sigterm() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: needs root for a new PID namespace (unshare --pid)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let toml = app_toml(
        "z",
        "zombies.py",
        &format!("tcp://127.0.0.1:{port}"),
        1,
        "env = { ZOMBIES = \"3\" }",
    );
    let file = write_file(dir.path(), "balancer.toml", &toml);
    let mut unshare = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(binary())
        .arg("run")
        .arg(&file)
        .env("BALANCER_HOME", dir.path().join("home"))
        .env("BALANCER_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unshare");
    let log = Lines::collect(unshare.stderr.take().expect("stderr"), "pid1");
    let guard = scopeguard(unshare.id());
    log.wait_for(1, "PID 1 notice", |l| l.contains("running as PID 1"));
    log.wait_for(1, "worker ready", |l| l.contains("worker ready"));

    // Outside the namespace: unshare → master (PID 1 inside) → shim → worker → 3 zombies.
    let find = |parent: u32| children(parent).into_iter().map(|(p, _)| p).next();
    let master = find(unshare.id()).expect("the master");
    let shim = find(master).expect("the shim");
    let worker = find(shim).expect("the worker");
    let deadline = Instant::now() + PATIENCE;
    while children(worker).iter().filter(|(_, s)| *s == 'Z').count() < 3 {
        assert!(Instant::now() < deadline, "the worker left no zombies");
        std::thread::sleep(Duration::from_millis(50));
    }
    let zombies: Vec<u32> = children(worker).into_iter().map(|(p, _)| p).collect();

    // Kill the shim: the worker dies with it (PDEATHSIG) and it and its zombies are
    // re-parented to PID 1, the master, which must reap them all.
    kill(Pid::from_raw(shim as i32), Signal::SIGKILL).expect("kill the shim");
    let mut gone = zombies.clone();
    gone.push(worker);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left: Vec<u32> = gone
            .iter()
            .copied()
            .filter(|p| state_ppid(*p).is_some())
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not reaped: {left:?} (children of the master: {:?})",
            children(master)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The shim's own exit went to the supervisor, which restarts the worker.
    log.wait_for(2, "a new worker ready", |l| l.contains("worker ready"));
    assert!(greeting(loopback(port)).is_ok());

    kill(Pid::from_raw(master as i32), Signal::SIGTERM).expect("SIGTERM the master");
    let status = unshare.wait().expect("unshare exits");
    std::mem::forget(guard);
    assert_eq!(status.code(), Some(0), "graceful exit is 0");
    // The log is read on its own thread: its last lines may arrive after the exit is seen.
    log.wait_for(1, "master stopped", |l| l.contains("master stopped"));
}

/// SIGKILLs `pid` (the unshare process, whose `--kill-child` takes the namespace down) on drop.
fn scopeguard(pid: u32) -> impl Drop {
    struct Guard(u32);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = kill(Pid::from_raw(self.0 as i32), Signal::SIGKILL);
        }
    }
    Guard(pid)
}

#[test]
fn the_container_example_is_a_valid_config() {
    let file = example("container/balancer.toml");
    let (code, out, err) = cli(Path::new("/nonexistent-balancer-home"), &["check", &file]);
    assert_eq!(code, 0, "{out}{err}");
    let dockerfile = std::fs::read_to_string(example("container/Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile.contains(
            "ENTRYPOINT [\"/usr/local/bin/balancer\", \"run\", \"/app/container/balancer.toml\"]"
        ),
        "the container runs the master as PID 1 on this file"
    );
}

/// `balancer ARGS…` as an unprivileged user (nobody, when the tests run as root) with its
/// config directory in `dir`, so `startup --install` writes a user unit there and never
/// under /etc.
fn as_user(dir: &Path, args: &[&str]) -> (i32, String, String) {
    use std::os::unix::process::CommandExt;
    let config = dir.join("config");
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .env("HOME", dir)
        .env("XDG_CONFIG_HOME", &config)
        .env("BALANCER_HOME", dir.join("home"))
        .env("USER", "tester")
        .stdin(Stdio::null());
    if nix::unistd::geteuid().is_root() {
        for d in [dir, &config] {
            std::fs::create_dir_all(d).expect("mkdir");
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        }
        cmd.uid(65534).gid(65534);
    }
    let out = cmd.output().expect("run balancer");
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

#[test]
fn startup_install_writes_a_user_unit_and_unstartup_removes_only_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = dir.path().join("config/systemd/user/balancer.service");
    let (code, out, err) = as_user(dir.path(), &["startup", "--install"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&unit.display().to_string()), "{out}");
    assert!(
        err.contains("systemctl --user enable --now balancer") && err.contains("enable-linger"),
        "says how to enable it: {err}"
    );
    let text = std::fs::read_to_string(&unit).expect("the unit");
    assert!(text.contains("WantedBy=default.target"), "{text}");
    assert!(text.contains(&format!(
        "BALANCER_HOME={}",
        dir.path().join("home").display()
    )));

    let (code, out, err) = as_user(dir.path(), &["unstartup"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!unit.exists(), "removed");
    let (code, out, _) = as_user(dir.path(), &["unstartup"]);
    assert_eq!(code, 0);
    assert!(out.contains("nothing to remove"), "{out}");

    std::fs::write(&unit, "[Service]\nExecStart=/bin/true\n").expect("someone else's unit");
    let (code, _, err) = as_user(dir.path(), &["unstartup"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not written by `balancer startup`"), "{err}");
    assert!(unit.exists(), "left alone");
}

#[test]
fn resurrect_without_a_dump_and_start_with_options_but_no_target_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let (code, _, err) = cli(&home, &["resurrect"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no dump at") && err.contains("balancer save"),
        "{err}"
    );
    let (code, _, err) = cli(&home, &["start"]);
    assert_eq!(code, 1, "{err}");
    let (code, _, err) = cli(&home, &["start", "-n", "web", "-i", "2"]);
    assert_eq!(code, 2, "never a resurrect that ignores -n and -i: {err}");
    assert!(!home.join("balancer.pid").exists(), "no master was started");
}
