//! The reuseport policy: workers accept on SO_REUSEPORT sockets handed over by the master, the
//! master stays out of the data path, and draining loses no queued connection.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::*;

const REUSEPORT: &[(&str, &str)] = &[("BALANCER_SCHED_POLICY", "reuseport")];

fn fd_app(name: &str, script: &str, port: u16, instances: u32, extra: &str) -> String {
    app_toml(
        name,
        script,
        &format!("tcp://127.0.0.1:{port}"),
        instances,
        extra,
    )
}

fn addr(port: u16) -> SocketAddr {
    loopback(port)
}

/// Bytes the process has read and written through syscalls (`/proc/PID/io`).
fn io_bytes(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("read /proc/PID/io");
    io.lines()
        .filter(|l| l.starts_with("rchar:") || l.starts_with("wchar:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

#[test]
fn workers_accept_on_fd_3_the_kernel_spreads_and_the_master_stays_out() {
    let port = free_port();
    let b = Balancer::start_with(&fd_app("web", "fd_server.js", port, 4, ""), REUSEPORT);
    let pids = b.wait_ready("web", 4);
    b.wait_running();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..80 {
        let line = greeting(addr(port)).expect("greeting");
        let fields: Vec<&str> = line.split(' ').collect();
        let pid = fields[0].to_string();
        assert_eq!(fields[1], "LISTEN_FDS=1", "{line}");
        assert_eq!(
            fields[2],
            format!("LISTEN_PID={pid}"),
            "LISTEN_PID is the worker's own pid"
        );
        assert_eq!(fields[3], "LISTEN_FDNAMES=PORT", "{line}");
        *seen.entry(pid).or_default() += 1;
    }
    assert!(
        seen.len() >= 3,
        "connections reached {} workers: {seen:?}",
        seen.len()
    );
    assert!(
        seen.keys()
            .all(|p| pids.iter().any(|q| q.to_string() == *p))
    );
    assert!(b.jlist().iter().all(|w| w["policy"] == "reuseport"));

    // 8 MiB through a worker and back: none of it through the master.
    let before = io_bytes(b.pid());
    let mut s = TcpStream::connect(addr(port)).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let chunk = vec![b'x'; 1 << 20];
    let writer = std::thread::spawn(move || {
        for _ in 0..8 {
            s.write_all(&chunk).unwrap();
        }
        s
    });
    let mut back = vec![0u8; 8 << 20];
    reader.read_exact(&mut back).unwrap();
    drop(writer.join().unwrap());
    let through_master = io_bytes(b.pid()) - before;
    eprintln!(
        "8 MiB echoed through a reuseport worker; the master read+wrote {through_master} bytes"
    );
    assert!(
        through_master < 256 * 1024,
        "{through_master} bytes passed through the master"
    );
}

/// Bursts of simultaneous fresh connections, fired while something else happens.
fn bursts(
    port: u16,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        for _ in 0..200 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let burst: Vec<_> = (0..16)
                .map(|_| {
                    let (ok, failed) = (Arc::clone(&ok), Arc::clone(&failed));
                    std::thread::spawn(move || match greeting(addr(port)) {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    })
                })
                .collect();
            for t in burst {
                let _ = t.join();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
    })
}

#[test]
fn scale_reload_and_kill_9_under_load_lose_no_queued_connection() {
    let port = free_port();
    let b = Balancer::start_with(
        &fd_app("web", "fd_server.js", port, 3, "kill_timeout = \"2s\""),
        REUSEPORT,
    );
    b.wait_ready("web", 3);
    b.wait_running();
    let load = Load::start(addr(port), 4);
    let stop_bursts = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let burst = bursts(port, Arc::clone(&stop_bursts));

    for step in [
        &["scale", "web", "1"][..],
        &["reload", "web"],
        &["scale", "web", "3"],
    ] {
        let (code, out, err) = b.cli(step);
        assert_eq!(code, 0, "{step:?}: {out}{err}");
    }
    assert_eq!(b.ready_pids("web").len(), 3);
    stop_bursts.store(true, Ordering::Relaxed);
    let (burst_ok, burst_failed) = burst.join().unwrap();
    let failed_before_kill = load.failed.load(Ordering::Relaxed);
    let ok_before_kill = load.ok.load(Ordering::Relaxed);
    eprintln!(
        "reuseport scale 1, reload, scale 3: load {ok_before_kill} ok / {failed_before_kill} failed; \
         bursts {burst_ok} ok / {burst_failed} failed"
    );
    assert_eq!(failed_before_kill, 0);
    assert_eq!(burst_failed, 0);
    assert!(burst_ok > 0 && ok_before_kill > 0);

    let victim = b.ready_pids("web")[0];
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    // 3 at first, 1 from the reload (at scale 1), 2 from scale 3, then the replacement.
    b.wait_ready("web", 3 + 1 + 2 + 1);
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failed, _) = load.finish();
    eprintln!("after kill -9 of one reuseport worker: {ok} ok, {failed} failed in all");
    assert!(
        failed <= 4,
        "at most the killed worker's in-flight connections: {failed}"
    );
}

#[test]
fn a_python_worker_on_fd_3_and_a_udp_app_in_reuseport_mode() {
    let (tcp, udp) = (free_port(), free_port());
    // An http:// listener is a plain TCP socket under reuseport: the worker speaks for itself.
    let toml = format!(
        "{}\n[[app]]\nname = \"dns\"\nscript = \"{}\"\ninstances = 2\nlisten = [\"udp://127.0.0.1:{udp}\"]\npolicy = \"reuseport\"\n",
        app_toml(
            "py",
            "fd_server.py",
            &format!("http://127.0.0.1:{tcp}"),
            2,
            "policy = \"reuseport\""
        ),
        worker("fd_udp.py")
    );
    let b = Balancer::start(&toml);
    let pids = b.wait_ready("py", 2);
    b.wait_ready("dns", 2);
    let line = greeting(addr(tcp)).unwrap();
    assert!(
        pids.iter()
            .any(|p| line.starts_with(&format!("{p} LISTEN_FDS=1 LISTEN_PID={p} "))),
        "{line}"
    );

    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut answered = 0;
    for i in 0..20 {
        client
            .send_to(format!("q{i}").as_bytes(), ("127.0.0.1", udp))
            .unwrap();
        let mut buf = [0u8; 1024];
        if let Ok(n) = client.recv(&mut buf) {
            let reply = String::from_utf8_lossy(&buf[..n]).to_string();
            assert!(reply.ends_with(&format!(" q{i}")), "{reply}");
            answered += 1;
        }
    }
    assert!(answered >= 19, "{answered} of 20 datagrams answered");
    assert!(b.jlist().iter().all(|w| w["policy"] == "reuseport"));
}

#[test]
fn the_config_policy_beats_the_environment_which_beats_the_default() {
    let port = free_port();
    let toml = fd_app("web", "fd_server.js", port, 1, "policy = \"reuseport\"");
    let b = Balancer::start_with(&toml, &[("BALANCER_SCHED_POLICY", "rr")]);
    b.wait_ready("web", 1);
    assert_eq!(b.jlist()[0]["policy"], "reuseport");
    drop(b);

    let port = free_port();
    let b = Balancer::start_with(
        &format!(
            "[[app]]\nname = \"rr\"\nscript = \"{}\"\nlisten = [\"tcp://127.0.0.1:{port}\"]\n",
            worker("pid_server.js")
        ),
        &[],
    );
    b.wait_ready("rr", 1);
    assert_eq!(b.jlist()[0]["policy"], "rr");
}

#[test]
fn a_worker_that_ignores_its_inherited_socket_never_becomes_ready_and_show_says_why() {
    let port = free_port();
    let b = Balancer::start_with(
        &fd_app(
            "deaf",
            "ignore_fd.js",
            port,
            1,
            "listen_timeout = \"3s\"\nmax_restarts = 2\nkill_timeout = \"1s\"",
        ),
        REUSEPORT,
    );
    b.log
        .wait_for(1, "worker errored", |l| l.contains("worker errored"));
    assert!(b.log.all().iter().all(|l| !l.contains("worker ready")));
    let (code, show, _) = b.cli(&["show", "deaf"]);
    assert_eq!(code, 0);
    assert!(
        show.contains("fd 3") && show.contains("worker contract"),
        "{show}"
    );
}
