//! `balancer upgrade`: the master's binary replaced under a continuous load of fresh TCP
//! connections and keep-alive (and fresh) HTTP requests, counting every failure; the
//! rollbacks (a binary that exits 1, one that hangs); SIGUSR2; systemd's MAINPID=; a daemon;
//! UDP flows; a reuseport group's steering across the hand-over.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::http::{HttpLoad, Kind};
use crate::support::*;

/// A TCP app (`pid_server.js`) and an HTTP app (`http_server.js`), two workers each.
fn two_apps(tcp: u16, http: u16) -> String {
    format!(
        "{}{}",
        pid_app("tcp", tcp, 2, ""),
        app_toml(
            "web",
            "http_server.js",
            &format!("http://127.0.0.1:{http}"),
            2,
            "health = { check = \"http\", path = \"/pid\" }",
        )
    )
}

/// The master answering on `home`'s admin socket, by `ping`.
fn master_pid(home: &std::path::Path) -> u32 {
    let (code, out, err) = cli(home, &["ping"]);
    assert_eq!(code, 0, "ping: {out}{err}");
    out.split("pid ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in {out:?}"))
}

/// Every worker pid `jlist` shows.
fn worker_pids(home: &std::path::Path) -> Vec<u32> {
    jlist(home)
        .iter()
        .filter_map(|w| w["pid"].as_u64())
        .map(|p| p as u32)
        .collect()
}

/// Kills a master the test did not start itself (the one an upgrade started) when dropped.
struct Reap(Vec<u32>);

impl Drop for Reap {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if alive(pid) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }
}

/// Both loads at once: fresh TCP connections, and HTTP keep-alive and fresh GETs.
struct Loads {
    tcp: Load,
    http: HttpLoad,
}

impl Loads {
    fn start(tcp: SocketAddr, http: SocketAddr) -> Loads {
        Loads {
            tcp: Load::start(tcp, 2),
            http: HttpLoad::start(
                http,
                &[Kind::KeepAliveGet, Kind::KeepAliveGet, Kind::FreshGet],
            ),
        }
    }

    /// (tcp ok, tcp failed, http ok, http failed), after asserting nothing failed. The loads
    /// run on a moment first, so they also cover the last master serving alone.
    fn finish(self, what: &str) -> (u64, u64, u64, u64) {
        std::thread::sleep(Duration::from_millis(300));
        let (tok, tfailed, _) = self.tcp.finish();
        let (hok, hfailed, seen, errors) = self.http.finish();
        eprintln!(
            "{what}: TCP {tok} ok, {tfailed} failed; HTTP {hok} ok, {hfailed} failed ({} pids)",
            seen.len()
        );
        assert_eq!(tfailed, 0, "{what}: failed TCP connections");
        assert_eq!(hfailed, 0, "{what}: failed HTTP requests: {errors:?}");
        assert!(tok > 50 && hok > 50, "{what}: the load really ran");
        (tok, tfailed, hok, hfailed)
    }
}

/// `balancer kill`, then the master `last` gone.
fn kill_and_wait(home: &std::path::Path, last: u32) {
    let (code, _, err) = cli(home, &["kill"]);
    assert_eq!(code, 0, "kill: {err}");
    assert_eq!(wait_dead(&[last], PATIENCE), Vec::<u32>::new());
}

/// Waits until the master answering on `home` is not `old`; returns it.
fn wait_new_master(home: &std::path::Path, old: u32) -> u32 {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let pid = master_pid(home);
        if pid != old {
            return pid;
        }
        assert!(Instant::now() < deadline, "no new master after {old}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Checks one completed hand-over from `old` (with `old_workers`) to `new`: the old master
/// and every one of its workers gone, the new master serving with workers of its own.
fn handed_over(home: &std::path::Path, old: u32, old_workers: &[u32], new: u32) {
    assert_ne!(new, old);
    assert_eq!(
        wait_dead(&[old], PATIENCE),
        Vec::<u32>::new(),
        "old master gone"
    );
    assert_eq!(
        wait_dead(old_workers, PATIENCE),
        Vec::<u32>::new(),
        "no orphaned worker of the old master"
    );
    let now = worker_pids(home);
    assert_eq!(now.len(), 4, "{now:?}");
    assert!(now.iter().all(|p| !old_workers.contains(p)), "{now:?}");
    let pid_file = std::fs::read_to_string(home.join("balancer.pid")).expect("pid file");
    assert_eq!(
        pid_file.trim(),
        new.to_string(),
        "the pid file names the new master"
    );
}

/// Stands in for systemd: reads sd_notify datagrams as they come (a sender blocks once ten
/// are queued), keeping every message.
fn fake_systemd(socket: UnixDatagram) -> Lines {
    let (tx, rx) = std::os::unix::net::UnixStream::pair().expect("pair");
    std::thread::spawn(move || {
        let mut tx = tx;
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).replace('\n', " ");
            if std::io::Write::write_all(&mut tx, format!("{text}\n").as_bytes()).is_err() {
                return;
            }
        }
    });
    Lines::collect(rx, "systemd")
}

#[test]
fn upgrade_then_sigusr2_under_load_fail_no_request_and_leave_no_orphan() {
    let (tcp, http) = (free_port(), free_port());
    let systemd_dir = tempfile::tempdir().expect("tempdir");
    let notify = systemd_dir.path().join("notify.sock");
    let systemd = fake_systemd(UnixDatagram::bind(&notify).expect("bind the notify socket"));
    let notify = notify.display().to_string();
    let mut b = Balancer::start_with(
        &two_apps(tcp, http),
        &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "400000")],
    );
    b.wait_ready("tcp", 2);
    b.wait_ready("web", 2);
    b.wait_running();
    let home = b.home();
    let first = b.pid();
    let first_workers = worker_pids(&home);
    let loads = Loads::start(loopback(tcp), loopback(http));
    std::thread::sleep(Duration::from_millis(300));

    let (code, out, err) = b.cli(&["upgrade"]);
    assert_eq!(code, 0, "upgrade: {out}{err}");
    assert!(out.contains("every worker ready"), "progress: {out}");
    assert!(out.contains("took over"), "{out}");
    let second = wait_new_master(&home, first);
    let mut reap = Reap(vec![second]);
    assert!(out.contains(&format!("master pid {second}")), "{out}");
    let (_, ls, _) = cli(&home, &["ls"]);
    assert!(
        ls.contains(&format!("master pid {second}, version ")),
        "{ls}"
    );
    assert_eq!(b.wait_exit().code(), Some(0), "the old master exits 0");
    handed_over(&home, first, &first_workers, second);
    // systemd is told the new main pid, never that the service stops, and the watchdog
    // pings go on once the old master is gone.
    let mainpid = format!("MAINPID={second}");
    systemd.wait_for(1, "MAINPID= for the new master", |m| m == mainpid);
    let told = systemd.all();
    assert!(told.iter().all(|m| !m.contains("STOPPING=1")), "{told:?}");
    let pings = told.iter().filter(|m| *m == "WATCHDOG=1").count();
    systemd.wait_for(pings + 3, "watchdog pings after the hand-over", |m| {
        m == "WATCHDOG=1"
    });
    std::thread::sleep(Duration::from_millis(300));

    // SIGUSR2 to the new master: the same, from the signal.
    let second_workers = worker_pids(&home);
    kill(Pid::from_raw(second as i32), Signal::SIGUSR2).expect("SIGUSR2");
    let third = wait_new_master(&home, second);
    reap.0.push(third);
    handed_over(&home, second, &second_workers, third);
    loads.finish("upgrade, then SIGUSR2");

    kill_and_wait(&home, third);
}

#[test]
fn upgrade_to_a_copied_binary_and_two_that_fail_keep_every_request() {
    let (tcp, http) = (free_port(), free_port());
    let mut b = Balancer::start(&two_apps(tcp, http));
    b.wait_ready("tcp", 2);
    b.wait_ready("web", 2);
    b.wait_running();
    let home = b.home();
    let first = b.pid();
    let first_workers = worker_pids(&home);
    let exits = write_file(
        b.dir.path(),
        "exits.sh",
        "#!/bin/sh\necho 'not a balancer' >&2\nexit 1\n",
    );
    let hangs = write_file(b.dir.path(), "hangs.sh", "#!/bin/sh\nexec sleep 600\n");
    for script in [&exits, &hangs] {
        std::fs::set_permissions(script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let copy = b.dir.path().join("balancer-copy");
    std::fs::copy(binary(), &copy).expect("copy the binary");
    let loads = Loads::start(loopback(tcp), loopback(http));
    std::thread::sleep(Duration::from_millis(300));

    let (code, out, err) = b.cli(&["upgrade", "--binary", exits.to_str().unwrap()]);
    assert_eq!(code, 1, "a binary that exits 1: {out}{err}");
    assert!(err.contains("exited with exit code 1"), "{err}");
    assert_eq!(master_pid(&home), first, "the old master serves on");

    let started = Instant::now();
    let (code, out, err) = b.cli(&[
        "upgrade",
        "--binary",
        hangs.to_str().unwrap(),
        "--timeout",
        "2s",
    ]);
    assert_eq!(code, 1, "a binary that hangs: {out}{err}");
    assert!(err.contains("did not take over within 2s"), "{err}");
    assert!(started.elapsed() < PATIENCE, "bounded by its timeout");
    assert_eq!(master_pid(&home), first, "the old master serves on");
    assert_eq!(worker_pids(&home), first_workers, "and its workers too");
    std::thread::sleep(Duration::from_millis(300));

    let (code, out, err) = b.cli(&["upgrade", "--binary", copy.to_str().unwrap()]);
    assert_eq!(code, 0, "upgrade --binary COPY: {out}{err}");
    let second = wait_new_master(&home, first);
    let _reap = Reap(vec![second]);
    let exe = std::fs::read_link(format!("/proc/{second}/exe")).expect("exe");
    assert_eq!(exe, copy, "the new master runs the copy");
    assert_eq!(b.wait_exit().code(), Some(0));
    handed_over(&home, first, &first_workers, second);
    loads.finish("two failed upgrades, then --binary COPY");

    kill_and_wait(&home, second);
}

#[test]
fn a_reuseport_group_keeps_steering_across_an_upgrade_and_after_it() {
    let port = free_port();
    let mut b = Balancer::start_with(
        &app_toml(
            "rp",
            "fd_server.js",
            &format!("tcp://127.0.0.1:{port}"),
            2,
            "policy = \"reuseport\"",
        ),
        &[("BALANCER_LOG", "info,balancer_workers=debug,balancer=debug")],
    );
    b.wait_ready("rp", 2);
    b.wait_running();
    let home = b.home();
    let first = b.pid();
    let old_workers = worker_pids(&home);
    let load = Load::start(loopback(port), 3);
    std::thread::sleep(Duration::from_millis(300));

    let (code, out, err) = b.cli(&["upgrade"]);
    assert_eq!(code, 0, "upgrade: {out}{err}");
    let second = wait_new_master(&home, first);
    let _reap = Reap(vec![second]);
    assert_eq!(b.wait_exit().code(), Some(0));
    assert_eq!(
        wait_dead(&old_workers, PATIENCE),
        Vec::<u32>::new(),
        "no orphan"
    );
    b.log.wait_for(1, "the old sockets left", |l| {
        l.contains("its reuseport sockets have left their groups")
    });
    // The new master steers the group alone now: a reload and a scale lose nothing either.
    let (code, out, err) = cli(&home, &["reload", "rp"]);
    assert_eq!(code, 0, "reload after the upgrade: {out}{err}");
    let (code, out, err) = cli(&home, &["scale", "rp", "3"]);
    assert_eq!(code, 0, "scale after the upgrade: {out}{err}");
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failed, seen) = load.finish();
    eprintln!(
        "reuseport upgrade, reload, scale 3: TCP {ok} ok, {failed} failed, {} pids",
        seen.len()
    );
    assert_eq!(failed, 0, "failed connections");
    assert!(ok > 50, "the load really ran: {ok}");
    let now: Vec<String> = worker_pids(&home).iter().map(u32::to_string).collect();
    assert_eq!(now.len(), 3, "{now:?}");
    let pid = greeting(loopback(port)).expect("served");
    assert!(
        now.iter().any(|p| pid.starts_with(p.as_str())),
        "{pid} from {now:?}"
    );
    let (code, _, err) = cli(&home, &["kill"]);
    assert_eq!(code, 0, "kill: {err}");
}

#[test]
fn upgrade_under_udp_load_loses_no_request_and_flows_move_to_the_new_workers() {
    use crate::udp::{free_udp_port, udp_app, udp_load};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let port = free_udp_port();
    let mut b = Balancer::start(&udp_app("dns", "udp_echo.py", port, 2, ""));
    b.wait_ready("dns", 2);
    b.wait_running();
    let home = b.home();
    let first = b.pid();
    let old_workers = worker_pids(&home);
    let stop = Arc::new(AtomicBool::new(false));
    let load = udp_load(port, 3, &stop);
    std::thread::sleep(Duration::from_millis(500));
    let (code, out, err) = b.cli(&["upgrade"]);
    assert_eq!(code, 0, "upgrade: {out}{err}");
    let second = wait_new_master(&home, first);
    let _reap = Reap(vec![second]);
    assert_eq!(b.wait_exit().code(), Some(0));
    assert_eq!(wait_dead(&old_workers, PATIENCE), Vec::<u32>::new());
    let new_workers: Vec<String> = worker_pids(&home).iter().map(u32::to_string).collect();
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    let results: Vec<_> = load.into_iter().map(|t| t.join().unwrap()).collect();
    let ok: u32 = results.iter().map(|r| r.0).sum();
    let lost: u32 = results.iter().map(|r| r.1).sum();
    eprintln!("upgrade under UDP load: {ok} answered, {lost} lost; per client {results:?}");
    assert_eq!(lost, 0, "requests lost during the upgrade");
    for (i, (ok, _, last)) in results.iter().enumerate() {
        assert!(*ok > 10, "client {i} got only {ok} answers");
        let last = last.as_ref().expect("an answer");
        assert!(
            new_workers.contains(last),
            "client {i} last served by {last}, not a new worker"
        );
    }
    let (code, _, err) = cli(&home, &["kill"]);
    assert_eq!(code, 0, "kill: {err}");
}

#[test]
fn a_daemon_is_upgraded_to_a_daemon_that_keeps_its_command_line_app_and_scale() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let port = free_port();
    let (code, out, err) = cli(
        &home,
        &[
            "start",
            &worker("pid_server.js"),
            "-n",
            "web",
            "-i",
            "1",
            "-l",
            &port.to_string(),
        ],
    );
    assert_eq!(code, 0, "start: {out}{err}");
    let old = master_pid(&home);
    let mut reap = Reap(vec![old]);
    let (code, out, err) = cli(&home, &["scale", "web", "2"]);
    assert_eq!(code, 0, "scale: {out}{err}");
    let old_workers = worker_pids(&home);
    let load = Load::start(loopback(port), 2);
    std::thread::sleep(Duration::from_millis(300));

    let (code, out, err) = cli(&home, &["upgrade"]);
    assert_eq!(code, 0, "upgrade: {out}{err}");
    let new = wait_new_master(&home, old);
    reap.0.push(new);
    assert_eq!(
        wait_dead(&[old], PATIENCE),
        Vec::<u32>::new(),
        "old daemon gone"
    );
    assert_eq!(
        wait_dead(&old_workers, PATIENCE),
        Vec::<u32>::new(),
        "no orphan"
    );
    let workers = jlist(&home);
    assert_eq!(
        ready_pids(&workers, "web").len(),
        2,
        "the scale held: {workers:?}"
    );
    // Still a daemon: in the old one's session (no terminal), logging to balancer.log.
    let sid = nix::unistd::getsid(Some(Pid::from_raw(new as i32))).unwrap();
    assert_eq!(sid.as_raw(), old as i32, "the daemon's session");
    let log = std::fs::read_to_string(home.join("balancer.log")).unwrap();
    assert!(
        log.contains(&format!("master running (pid {new})")),
        "{log}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failed, _) = load.finish();
    eprintln!("daemon upgrade: TCP {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "failed connections");
    assert!(ok > 50, "the load really ran: {ok}");

    kill_and_wait(&home, new);
}
