//! The TCP data path: round robin, echo with half-close, crashes under load, queueing.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::*;

#[test]
fn round_robin_splits_fresh_connections_between_two_workers() {
    let port = free_port();
    let b = Balancer::start(&pid_app("rr", port, 2, ""));
    let pids = b.wait_ready("rr", 2);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..100 {
        *seen.entry(greeting(addr).expect("greeting")).or_default() += 1;
    }
    assert_eq!(seen.len(), 2, "two distinct workers answered: {seen:?}");
    for pid in &pids {
        let n = seen.get(&pid.to_string()).copied().unwrap_or(0);
        assert!(
            (40..=60).contains(&n),
            "worker {pid} got {n} of 100: {seen:?}"
        );
    }
}

#[test]
fn line_protocol_echoes_through_the_proxy_with_half_close() {
    let port = free_port();
    let toml = format!(
        r#"
[[app]]
name = "echo"
script = "{}"
listen = ["tcp://127.0.0.1:{port}"]
"#,
        example("python/echo_server.py")
    );
    let b = Balancer::start(&toml);
    let pid = b.wait_ready("echo", 1)[0];
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(b"hello\nbalancer \xe2\x9c\x93\n").unwrap();
    // Half-close: our write side ends, the read side must still get everything the worker says.
    stream.shutdown(Shutdown::Write).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert_eq!(
        reply,
        format!("echo: hello\necho: balancer ✓\nbye from {pid}\n")
    );
}

#[test]
fn kill_9_of_a_worker_under_load_is_survived_and_the_worker_replaced() {
    let port = free_port();
    let b = Balancer::start(&pid_app("crashy", port, 2, ""));
    let pids = b.wait_ready("crashy", 2);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let clients = 4;
    let load = Load::start(addr, clients);
    std::thread::sleep(Duration::from_millis(500));
    let victim = pids[0];
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    // The replacement becomes ready while the load goes on.
    let ready = b.wait_ready("crashy", 3);
    let replacement = ready[2];
    assert!(!pids.contains(&replacement));
    std::thread::sleep(Duration::from_millis(500));
    let before_kill_ok = load.ok.load(Ordering::Relaxed);
    let (ok, failed, seen) = load.finish();
    eprintln!("kill -9 under load: {ok} ok, {failed} failed, by pid {seen:?}");
    assert!(before_kill_ok > 0);
    // Only connections in flight on the killed worker may fail: at most one per client.
    assert!(failed <= clients as u64, "{failed} failed connections");
    assert!(
        seen.contains_key(&replacement.to_string()),
        "the replacement serves: {seen:?}"
    );
    assert!(!alive(victim));
}

#[test]
fn a_connection_waits_for_a_worker_that_becomes_ready_within_queue_timeout() {
    let port = free_port();
    let toml = pid_app(
        "slow",
        port,
        1,
        r#"env = { READY_DELAY_MS = "1500" }
queue_timeout = "20s""#,
    );
    let b = Balancer::start(&toml);
    b.log.wait_for(1, "listening", |l| l.contains("listening"));
    let started = Instant::now();
    // The listener is open before any worker is ready: the connection is held, not refused.
    let pid = greeting(([127, 0, 0, 1], port).into()).expect("held until the worker was ready");
    let waited = started.elapsed();
    let ready = b.wait_ready("slow", 1);
    assert_eq!(pid, ready[0].to_string());
    assert!(
        waited >= Duration::from_millis(500),
        "answered after {waited:?}: was it held?"
    );
}

#[test]
fn with_no_worker_a_connection_is_closed_after_queue_timeout_and_the_port_stays_open() {
    let port = free_port();
    let b = Balancer::start(&pid_app("none", port, 0, r#"queue_timeout = "300ms""#));
    b.log
        .wait_for(1, "master running", |l| l.contains("master running"));
    for _ in 0..2 {
        let started = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("the port stays open");
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(buf.is_empty());
        assert!(started.elapsed() >= Duration::from_millis(250));
    }
    b.log
        .wait_for(2, "queue timeout warnings", |l| l.contains("queue_timeout"));
}
