//! Supervision seen from outside: crash loops, shutdown, and workers dying with the master.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::*;

fn two_node_workers(port: u16) -> String {
    node_web(port, 2)
}

#[test]
fn sigterm_drains_stops_every_worker_and_exits_zero() {
    let port = free_port();
    let mut b = Balancer::start(&two_node_workers(port));
    let pids = b.wait_ready("web", 2);
    let body = http_get(([127, 0, 0, 1], port).into(), "/").expect("served");
    assert!(body.contains("\"pid\""), "{body}");
    b.signal(Signal::SIGTERM);
    let status = b.wait_exit();
    assert_eq!(status.code(), Some(0), "clean exit");
    assert_eq!(wait_dead(&pids, Duration::from_secs(5)), Vec::<u32>::new());
    b.log
        .wait_for(1, "master stopped", |l| l.contains("master stopped"));
}

#[test]
fn sigkill_of_the_master_takes_its_workers_down() {
    let port = free_port();
    let mut b = Balancer::start(&two_node_workers(port));
    let pids = b.wait_ready("web", 2);
    b.signal(Signal::SIGKILL);
    b.wait_exit();
    assert_eq!(wait_dead(&pids, Duration::from_secs(10)), Vec::<u32>::new());
}

#[test]
fn a_crash_loop_ends_errored_while_the_master_stays_idle() {
    let port = free_port();
    let toml = format!(
        r#"
[[app]]
name = "broken"
script = "{}"
listen = ["tcp://127.0.0.1:{port}"]
max_restarts = 8
min_uptime = "10s"
exp_backoff_restart_delay = "100ms"
"#,
        worker("crash.py")
    );
    let b = Balancer::start(&toml);
    b.log
        .wait_for(1, "master running", |l| l.contains("master running"));
    let (ticks0, t0) = (cpu_ticks(b.pid()), Instant::now());
    let errored = b
        .log
        .wait_for(1, "worker errored", |l| l.contains("worker errored"));
    let (ticks, wall) = (cpu_ticks(b.pid()) - ticks0, t0.elapsed());
    assert!(
        errored[0].contains("8 unstable exits in a row"),
        "{}",
        errored[0]
    );
    assert!(errored[0].contains("exit code 3"), "{}", errored[0]);
    let starts = b.started_pids().len();
    assert_eq!(starts, 8, "one start and seven restarts");
    // Clock ticks are 1/100 s: the master used under a fifth of one core while looping.
    let cpu = Duration::from_millis(ticks * 10);
    eprintln!("crash loop: {starts} starts in {wall:?}, master cpu {cpu:?}");
    assert!(
        wall >= Duration::from_secs(2),
        "backoff spaced the restarts: {wall:?}"
    );
    assert!(cpu < wall / 5, "master cpu {cpu:?} over {wall:?}");
    // Once errored, nothing more happens.
    let before = cpu_ticks(b.pid());
    std::thread::sleep(Duration::from_secs(1));
    assert!(cpu_ticks(b.pid()) - before <= 5);
    assert_eq!(b.started_pids().len(), 8);
}

#[test]
fn a_port_already_taken_fails_the_start_with_exit_1_and_starts_nothing() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let mut b = Balancer::start(&two_node_workers(port));
    let status = b.wait_exit();
    assert_eq!(status.code(), Some(1));
    // The reader thread may still be collecting the dead master's last lines: wait for them.
    let wanted = format!("cannot listen on tcp://127.0.0.1:{port}");
    b.log.wait_for(1, &wanted, |l| l.contains(&wanted));
    assert!(b.started_pids().is_empty());
}
