//! The soak: 100 reloads and 20 scale cycles under mixed load — TCP connection-per-request,
//! HTTP keep-alive (and fresh connections) through an `http://` listener, and UDP — with
//! the failed requests and the master's memory and descriptors at start and end.
//!
//! Not run by `cargo test` (it takes minutes):
//! `cargo test --test integration soak -- --ignored --nocapture`
//! (`SOAK_RELOADS=N` for a shorter or longer run; scale cycles are one per five reloads).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::http::{HttpLoad, Kind, http_app};
use crate::support::*;
use crate::udp::{Client, fd_count, free_udp_port, rss_kib, udp_app};

#[test]
#[ignore = "a soak of several minutes: run it by hand"]
fn soak_reloads_and_scales_under_mixed_load() {
    let reloads: usize = std::env::var("SOAK_RELOADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    let (tcp, web, dns) = (free_port(), free_port(), free_udp_port());
    let quick = "drain_timeout = \"2s\"\nkill_timeout = \"2s\"";
    let toml = pid_app("tcp", tcp, 2, quick)
        + &http_app("web", web, 2, quick)
        + &udp_app("dns", "udp_echo.py", dns, 2, "drain_timeout = \"1s\"");
    let b = Balancer::start(&toml);
    for app in ["tcp", "web", "dns"] {
        b.wait_ready(app, 2);
    }
    b.wait_running();
    let master = b.pid();
    let (rss_start, fds_start) = (rss_kib(master), fd_count(master));

    let tcp_load = Load::start(loopback(tcp), 2);
    let http_load = HttpLoad::start(loopback(web), &[Kind::KeepAliveGet, Kind::FreshGet]);
    let stop = Arc::new(AtomicBool::new(false));
    let (udp_ok, udp_lost) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let udp: Vec<_> = (0..2)
        .map(|i| {
            let (stop, ok, lost) = (stop.clone(), udp_ok.clone(), udp_lost.clone());
            std::thread::spawn(move || {
                let client = Client::new(dns);
                let started = Instant::now();
                for seq in 0..1_000_000u64 {
                    if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(1800)
                    {
                        break;
                    }
                    let asked = format!("c{i} #{seq}");
                    match client.ask(asked.as_bytes(), Duration::from_secs(2)) {
                        Some(_) => ok.fetch_add(1, Ordering::Relaxed),
                        None => lost.fetch_add(1, Ordering::Relaxed),
                    };
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();

    let started = Instant::now();
    let apps = ["tcp", "web", "dns"];
    for round in 0..reloads {
        let app = apps[round % apps.len()];
        let (code, _, err) = b.cli(&["reload", app]);
        assert_eq!(code, 0, "reload {round} of {app}: {err}");
        if round % 5 == 4 {
            for to in ["3", "2"] {
                let (code, _, err) = b.cli(&["scale", "tcp", to]);
                assert_eq!(code, 0, "scale tcp {to}: {err}");
            }
        }
    }
    let took = started.elapsed();
    let (rss_end, fds_end) = (rss_kib(master), fd_count(master));
    let (tcp_ok, tcp_failed, _) = tcp_load.finish();
    let (http_ok, http_failed, _, errors) = http_load.finish();
    stop.store(true, Ordering::Relaxed);
    for t in udp {
        t.join().unwrap();
    }
    let (udp_ok, udp_lost) = (
        udp_ok.load(Ordering::Relaxed),
        udp_lost.load(Ordering::Relaxed),
    );
    eprintln!(
        "soak: {reloads} reloads and {} scale cycles in {took:?}\n\
         tcp: {tcp_ok} ok, {tcp_failed} failed\n\
         http: {http_ok} ok, {http_failed} failed {errors:?}\n\
         udp: {udp_ok} answered, {udp_lost} lost\n\
         master: RSS {rss_start} → {rss_end} KiB, fds {fds_start} → {fds_end}",
        reloads / 5
    );
    assert_eq!((tcp_failed, http_failed, udp_lost), (0, 0, 0));
}
