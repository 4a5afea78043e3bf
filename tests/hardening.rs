//! Faults, bad input and a hostile home: one admin request never stops the data plane, files
//! the master is told to read are bounded, and a home (or admin socket) someone else controls
//! is refused.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// One request on a fresh admin connection; the reply line (empty if none came in time).
fn admin(home: &std::path::Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(home.join("admin.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(bytes).unwrap();
    let mut line = String::new();
    let _ = BufReader::new(s).read_line(&mut line);
    line
}

/// `VmHWM` (peak resident memory) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn no_admin_request_stops_the_data_plane() {
    let port = free_port();
    let b = Balancer::start(&pid_app("web", port, 2, ""));
    b.wait_ready("web", 2);
    b.wait_running();
    let home = b.home();
    let load = Load::start(loopback(port), 3);

    // A device with no end, and a FIFO nobody writes: refused at once, nothing read.
    let zero = admin(&home, b"{\"cmd\":\"start\",\"file\":\"/dev/zero\"}\n");
    assert!(
        zero.contains(r#""ok":false"#) && zero.contains("not a regular file"),
        "{zero}"
    );
    let fifo = b.dir.path().join("fifo.toml");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let started = Instant::now();
    let request = format!("{{\"cmd\":\"reload\",\"file\":\"{}\"}}\n", fifo.display());
    let reply = admin(&home, request.as_bytes());
    assert!(reply.contains("not a regular file"), "{reply}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "no wait for a writer"
    );

    // Bytes that are not UTF-8 get an error reply, and the connection goes on.
    let mut s = UnixStream::connect(home.join("admin.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"\xff\xfe{\"cmd\":\"ping\"}\n{\"cmd\":\"ping\"}\n")
        .unwrap();
    let mut lines = BufReader::new(s).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(
        first.contains("not UTF-8") && first.contains("\"code\":2"),
        "{first}"
    );
    let second = lines.next().unwrap().unwrap();
    assert!(
        second.contains(&b.pid().to_string()),
        "still served: {second}"
    );

    // Counts that would wrap or that say two things.
    for to in ["+9223372036854775807", "+-1", "-99999999999"] {
        let request = format!("{{\"cmd\":\"scale\",\"app\":\"web\",\"to\":\"{to}\"}}\n");
        let reply = admin(&home, request.as_bytes());
        assert!(reply.contains("bad worker count"), "{to}: {reply}");
    }
    let reply = admin(
        &home,
        b"{\"cmd\":\"scale\",\"app\":\"web\",\"to\":\"-5\"}\n",
    );
    assert!(reply.contains("cannot scale to -3 workers"), "{reply}");

    // `logs --lines 1` on a large log reads its end only.
    let before = peak_rss_kib(b.pid());
    let log = home.join("logs/web-0-out.log");
    let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    let block = "a log line that fills the file\n".repeat(4096);
    for _ in 0..400 {
        file.write_all(block.as_bytes()).unwrap();
    }
    file.write_all(b"the last line\n").unwrap();
    let size = file.metadata().unwrap().len();
    assert!(size > 40 << 20, "{size}");
    let (code, out, err) = b.cli(&["logs", "web", "--lines", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("web-0 | the last line"), "{out}");
    assert_eq!(out.lines().filter(|l| l.contains("a log line")).count(), 0);
    let grown = peak_rss_kib(b.pid()).saturating_sub(before);
    eprintln!(
        "peak RSS grew {grown} KiB while tailing a {} MiB log",
        size >> 20
    );
    assert!(grown < 16 * 1024, "peak RSS grew {grown} KiB");

    let (ok, failed, _) = load.finish();
    eprintln!("load during the bad requests: {ok} ok, {failed} failed");
    assert!(ok > 0);
    assert_eq!(failed, 0);
    assert!(admin(&home, b"{\"cmd\":\"ping\"}\n").contains(r#""ok":true"#));
}

#[test]
fn a_home_others_can_write_to_is_refused_and_nothing_starts() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o777)).unwrap();
    let file = write_file(
        dir.path(),
        "balancer.toml",
        &pid_app("web", free_port(), 1, ""),
    );
    let out = Command::new(binary())
        .arg("run")
        .arg(&file)
        .env("BALANCER_HOME", &home)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("others may write to it") && stderr.contains("chmod go-w"),
        "{stderr}"
    );
    assert!(!home.join("admin.sock").exists());
    assert!(!home.join("logs").exists(), "nothing was created in it");
}

#[test]
fn check_finds_a_program_that_is_not_installed() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(
        dir.path(),
        "balancer.toml",
        "[[app]]\nname = \"api\"\ncommand = [\"no-such-server-anywhere\", \"--port\", \"1\"]\n",
    );
    let out = Command::new(binary())
        .arg("check")
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(":3:11: `command`: `no-such-server-anywhere` is not a program in PATH"),
        "{stderr}"
    );
}

/// A server on the admin socket that answers everything with "done", as another user.
const IMPOSTOR: &str = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o666)
os.setgid(65534)
os.setuid(65534)
s.listen(4)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    try:
        c.recv(65536)
        c.sendall(b'{"ok":true,"message":"stopping every app and the master"}\n')
    except OSError:
        pass
    c.close()
"#;

#[test]
fn the_cli_does_not_trust_a_socket_another_user_serves() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to serve a socket as another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let mut impostor = Command::new("python3")
        .arg("-c")
        .arg(IMPOSTOR)
        .arg(home.join("admin.sock"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(impostor.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "listening");
    let (code, _, err) = cli(&home, &["kill"]);
    let _ = impostor.kill();
    let _ = impostor.wait();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is served by uid 65534"), "{err}");
    assert!(err.contains("refusing to trust it"), "{err}");
}

/// Every process below `root`, by the parent links in `/proc`.
fn tree(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let after = &stat[stat.rfind(')')? + 1..];
            Some((pid, after.split_whitespace().nth(1)?.parse().ok()?))
        })
        .collect();
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for &(pid, ppid) in &parents {
            if ppid == parent && !found.contains(&pid) {
                found.push(pid);
                frontier.push(pid);
            }
        }
    }
    found
}

/// The pids `spawner.js` workers wrote, once `workers` of them have written all four lines.
fn spawned_pids(file: &std::path::Path, workers: usize) -> Vec<u32> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let pids: Vec<u32> = text
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
            .collect();
        if pids.len() >= 4 * workers {
            return pids;
        }
        assert!(Instant::now() < deadline, "spawner pids: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawner_app(port: u16, instances: u32, pids: &std::path::Path, extra: &str) -> String {
    app_toml(
        "careless",
        "spawner.js",
        &format!("tcp://127.0.0.1:{port}"),
        instances,
        &format!(
            "env = {{ PIDS_FILE = \"{}\" }}\nkill_timeout = \"2s\"\ndrain_timeout = \"1s\"\n{extra}",
            pids.display()
        ),
    )
}

#[test]
fn a_sigkilled_master_leaves_no_process_of_any_worker_tree() {
    let port = free_port();
    let scratch = tempfile::tempdir().unwrap();
    let pids_file = scratch.path().join("pids");
    let mut b = Balancer::start(&spawner_app(port, 2, &pids_file, ""));
    b.wait_ready("careless", 2);
    let spawned = spawned_pids(&pids_file, 2);
    // Shims, workers, children, the detached shells and their children.
    let everything = tree(b.pid());
    assert!(everything.len() >= 10, "{everything:?}");
    for pid in &spawned {
        assert!(everything.contains(pid), "{pid} is in the master's tree");
    }
    b.signal(nix::sys::signal::Signal::SIGKILL);
    b.wait_exit();
    let left = wait_dead(&everything, Duration::from_secs(3));
    assert_eq!(
        left,
        Vec::<u32>::new(),
        "alive 3 s after the master's SIGKILL"
    );
}

#[test]
fn a_crash_a_reload_and_a_stop_leave_no_stray() {
    let port = free_port();
    let scratch = tempfile::tempdir().unwrap();
    let pids_file = scratch.path().join("pids");
    let b = Balancer::start(&spawner_app(port, 1, &pids_file, ""));
    b.wait_ready("careless", 1);
    b.wait_running();

    // A reload: the old worker's tree goes, detached shell and all.
    let first = spawned_pids(&pids_file, 1);
    let (code, _, err) = b.cli(&["reload", "careless"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        wait_dead(&first, Duration::from_secs(5)),
        Vec::<u32>::new(),
        "after reload"
    );

    // A crash (the worker is killed outright): what it left behind goes too.
    let second: Vec<u32> = spawned_pids(&pids_file, 2)[4..].to_vec();
    let worker = ready_pids(&b.jlist(), "careless")[0] as u32;
    assert!(second.contains(&worker), "{second:?} {worker}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(
        wait_dead(&second, Duration::from_secs(5)),
        Vec::<u32>::new(),
        "after a crash"
    );

    // A stop of the restarted worker.
    let third: Vec<u32> = spawned_pids(&pids_file, 3)[8..].to_vec();
    let deadline = Instant::now() + PATIENCE;
    while !ready_pids(&b.jlist(), "careless")
        .iter()
        .any(|p| third.contains(&(*p as u32)))
    {
        assert!(
            Instant::now() < deadline,
            "the restarted worker is not ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, _, err) = b.cli(&["stop", "careless"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        wait_dead(&third, Duration::from_secs(5)),
        Vec::<u32>::new(),
        "after stop"
    );
    assert!(
        tree(b.pid()).is_empty(),
        "nothing runs under the master: {:?}",
        tree(b.pid())
    );
}

#[test]
fn a_stopped_worker_leaves_rotation_and_no_new_request_hangs() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let port = free_port();
    let health =
        "health = { check = \"tcp\", interval = \"500ms\", timeout = \"500ms\", fall = 2 }";
    let b = Balancer::start(&pid_app("web", port, 2, health));
    let pids = b.wait_ready("web", 2);
    b.wait_running();
    let stopped = pids[0];
    kill(Pid::from_raw(stopped as i32), Signal::SIGSTOP).unwrap();
    let at = Instant::now();
    b.log.wait_for(1, "worker unhealthy", |l| {
        l.contains("worker unhealthy") && field(l, "pid").as_deref() == Some(&stopped.to_string())
    });
    let took = at.elapsed();
    eprintln!("a SIGSTOPped worker left rotation after {took:?} (fall 2 × interval 500ms)");
    // fall × interval, plus the probe timeouts, plus scheduling on a busy machine.
    assert!(took < Duration::from_secs(6), "{took:?}");
    let mut answers = Vec::new();
    for _ in 0..20 {
        answers.push(greeting(loopback(port)).expect("no request hangs"));
    }
    assert!(
        answers.iter().all(|a| *a == pids[1].to_string()),
        "only the running worker answers: {answers:?}"
    );
    kill(Pid::from_raw(stopped as i32), Signal::SIGCONT).unwrap();
}

#[test]
fn a_reuseport_reload_of_workers_that_drain_nothing_fails_no_request() {
    let port = free_port();
    let toml = app_toml(
        "naive",
        "naive_fd.js",
        &format!("tcp://127.0.0.1:{port}"),
        2,
        "policy = \"reuseport\"\nkill_timeout = \"2s\"\ndrain_timeout = \"5s\"",
    );
    let b = Balancer::start(&toml);
    b.wait_ready("naive", 2);
    b.wait_running();
    let load = Load::start(loopback(port), 4);
    std::thread::sleep(Duration::from_millis(300));
    for round in 0..3 {
        let (code, _, err) = b.cli(&["reload", "naive"]);
        assert_eq!(code, 0, "reload {round}: {err}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failed, seen) = load.finish();
    eprintln!(
        "reuseport reloads of naive workers: {ok} ok, {failed} failed, {} pids",
        seen.len()
    );
    assert!(ok > 0 && seen.len() >= 4, "{seen:?}");
    assert_eq!(failed, 0);
}

#[test]
fn clients_that_hang_up_while_queued_free_their_descriptors_at_once() {
    let port = free_port();
    let b = Balancer::start(&pid_app("web", port, 1, "queue_timeout = \"30s\""));
    b.wait_ready("web", 1);
    b.wait_running();
    let (code, _, err) = b.cli(&["stop", "web"]);
    assert_eq!(code, 0, "{err}");
    let baseline = crate::udp::fd_count(b.pid());
    let clients: Vec<_> = (0..200)
        .map(|_| std::net::TcpStream::connect(loopback(port)).unwrap())
        .collect();
    let deadline = Instant::now() + PATIENCE;
    while crate::udp::fd_count(b.pid()) < baseline + 150 {
        assert!(
            Instant::now() < deadline,
            "the queued connections were not accepted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let held = crate::udp::fd_count(b.pid());
    drop(clients);
    let closed = Instant::now();
    while crate::udp::fd_count(b.pid()) > baseline + 5 {
        assert!(
            closed.elapsed() < Duration::from_secs(5),
            "still {} fds, {baseline} before (queue_timeout is 30 s)",
            crate::udp::fd_count(b.pid())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "200 queued clients hung up: master fds {baseline} → {held} → {} in {:?}",
        crate::udp::fd_count(b.pid()),
        closed.elapsed()
    );
    // And none of them reaches a worker once one is ready again.
    let (code, _, err) = b.cli(&["start", "web"]);
    assert_eq!(code, 0, "{err}");
    assert!(greeting(loopback(port)).is_ok());
}

#[test]
fn memory_comes_back_after_rounds_of_idle_connections() {
    const CONNECTIONS: usize = 2000;
    let port = free_port();
    let b = Balancer::start(&pid_app("web", port, 2, ""));
    b.wait_ready("web", 2);
    b.wait_running();
    let mut held = Vec::new();
    for round in 0..5 {
        let clients: Vec<std::net::TcpStream> = (0..CONNECTIONS)
            .map(|_| std::net::TcpStream::connect(loopback(port)).unwrap())
            .collect();
        for c in &clients {
            // The greeting: each connection is proxied end to end, then left idle.
            c.set_read_timeout(Some(PATIENCE)).unwrap();
            let mut line = String::new();
            BufReader::new(c).read_line(&mut line).unwrap();
        }
        held.push(crate::udp::rss_kib(b.pid()));
        drop(clients);
        let deadline = Instant::now() + PATIENCE;
        while crate::udp::fd_count(b.pid()) > 40 {
            assert!(
                Instant::now() < deadline,
                "connections not closed (round {round})"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    eprintln!("master RSS with {CONNECTIONS} idle connections, rounds 1–5: {held:?} KiB");
    let (first, last) = (held[0], held[4]);
    assert!(
        last * 5 <= first * 6,
        "RSS grew from {first} to {last} KiB over 5 rounds: {held:?}"
    );
}

#[test]
fn past_the_descriptor_budget_connections_wait_and_probes_still_pass() {
    let (tcp, udp) = (free_port(), crate::udp::free_udp_port());
    // 200 descriptors: the master keeps its own 256 before any goes to connections, so only
    // the floor of 32 does (16 connections at once: 150 clients would need 300), and a UDP
    // listener keeps at most 16 flows.
    let toml = pid_app(
        "web",
        tcp,
        2,
        "health = { check = \"tcp\", interval = \"300ms\" }",
    ) + &crate::udp::udp_app("dns", "udp_echo.py", udp, 1, "");
    let b = Balancer::start_under(&toml, &[], &["prlimit", "--nofile=200:200", "--"]);
    b.wait_ready("web", 2);
    b.wait_ready("dns", 1);
    b.wait_running();
    b.log.wait_for(1, "max_flows held", |l| {
        l.contains("max_flows 4096 held to 16 by the open file limit")
    });
    let clients: Vec<_> = (0..150)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = std::net::TcpStream::connect(loopback(tcp))?;
                s.set_read_timeout(Some(PATIENCE))?;
                let mut line = String::new();
                BufReader::new(&mut s).read_line(&mut line)?;
                std::thread::sleep(Duration::from_millis(300));
                Ok::<_, std::io::Error>(line)
            })
        })
        .collect();
    let answered = clients
        .into_iter()
        .map(|t| t.join())
        .filter(|r| matches!(r, Ok(Ok(line)) if !line.is_empty()))
        .count();
    assert_eq!(
        answered, 150,
        "every client served, the excess after a wait"
    );
    let log = b.log.all();
    assert!(
        !log.iter().any(|l| l.contains("worker unhealthy")),
        "no probe failed for want of descriptors"
    );
    assert!(
        !log.iter().any(|l| l.contains("Too many open files")),
        "no EMFILE"
    );
}

#[test]
fn clients_that_leave_a_silent_worker_free_both_descriptors_at_once() {
    let port = free_port();
    let b = Balancer::start(&app_toml(
        "silent",
        "silent.py",
        &format!("tcp://127.0.0.1:{port}"),
        1,
        "",
    ));
    b.wait_ready("silent", 1);
    b.wait_running();
    let baseline = crate::udp::fd_count(b.pid());
    for _ in 0..300 {
        drop(std::net::TcpStream::connect(loopback(port)).unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while crate::udp::fd_count(b.pid()) > baseline + 5 {
        assert!(
            Instant::now() < deadline,
            "the master still holds {} fds ({baseline} before)",
            crate::udp::fd_count(b.pid())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_udp_flood_within_a_small_descriptor_limit_loses_nothing() {
    let port = crate::udp::free_udp_port();
    // 1024 descriptors: the default max_flows (4096) is held to what the limit allows, so new
    // clients evict idle flows instead of failing to get a socket.
    let b = Balancer::start_under(
        &crate::udp::udp_app("dns", "udp_echo.py", port, 2, ""),
        &[],
        &["prlimit", "--nofile=1024:1024", "--"],
    );
    b.wait_ready("dns", 2);
    b.wait_running();
    b.log.wait_for(1, "max_flows held", |l| {
        l.contains("max_flows 4096 held to")
    });
    let mut lost = 0;
    for i in 0..5000 {
        let client = crate::udp::Client::new(port);
        if client
            .ask(format!("flood {i}").as_bytes(), Duration::from_secs(2))
            .is_none()
        {
            lost += 1;
        }
    }
    eprintln!("5000 clients, one datagram each, under nofile 1024: {lost} lost");
    assert_eq!(lost, 0);
}

#[test]
fn sigterm_during_a_big_spawn_stops_everything_in_bounded_time() {
    let toml = "[[app]]\nname = \"many\"\ncommand = [\"sleep\", \"1000\"]\ninstances = 300\n\
                kill_timeout = \"2s\"\n";
    let mut b = Balancer::start(toml);
    b.log
        .wait_for(20, "workers starting", |l| l.contains("worker started"));
    let started = Instant::now();
    b.signal(nix::sys::signal::Signal::SIGTERM);
    let status = b.wait_exit();
    let took = started.elapsed();
    eprintln!("SIGTERM with up to 300 workers starting: master exited {status} in {took:?}");
    assert!(status.success(), "{status}");
    let left = wait_dead(&b.started_pids(), Duration::from_secs(5));
    assert_eq!(left, Vec::<u32>::new(), "every worker stopped");
}
