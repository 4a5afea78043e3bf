//! The UDP data path end to end: flows pinned to workers, large datagrams, a worker killed, a
//! flood of source ports against `max_flows`, and a reload under load. Workers answer every
//! datagram with `<pid> <payload>`, so each answer says who served it.

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::*;

/// A loopback UDP port that was free a moment ago.
pub(crate) fn free_udp_port() -> u16 {
    crate::support::test_port(|port| {
        UdpSocket::bind(("127.0.0.1", port)).is_ok() && UdpSocket::bind(("0.0.0.0", port)).is_ok()
    })
}

fn public(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

pub(crate) fn udp_app(name: &str, script: &str, port: u16, instances: u32, extra: &str) -> String {
    app_toml(
        name,
        script,
        &format!("udp://127.0.0.1:{port}"),
        instances,
        extra,
    )
}

/// `clients` threads, each its own client address, asking every 10 ms until `stop` (at most
/// 10,000 requests or 60 s); each ends with (answered, lost, the pid that answered last).
pub(crate) fn udp_load(
    port: u16,
    clients: usize,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<(u32, u32, Option<String>)>> {
    use std::sync::atomic::Ordering;
    (0..clients)
        .map(|i| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let client = Client::new(port);
                let started = Instant::now();
                let (mut ok, mut lost, mut last) = (0u32, 0u32, None);
                // Bounded in count and time whatever happens.
                for seq in 0..10_000 {
                    if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(60) {
                        break;
                    }
                    match client.ask(format!("c{i} #{seq}").as_bytes(), Duration::from_secs(1)) {
                        Some(pid) => {
                            ok += 1;
                            last = Some(pid);
                        }
                        None => {
                            lost += 1;
                            eprintln!("client {i}: request #{seq} got no answer");
                        }
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                (ok, lost, last)
            })
        })
        .collect()
}

/// One client address: a socket connected to the public port, so it only accepts datagrams
/// that come back from the public address.
pub(crate) struct Client {
    socket: UdpSocket,
}

impl Client {
    pub(crate) fn new(port: u16) -> Client {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind a client");
        socket.connect(public(port)).expect("connect a client");
        Client { socket }
    }

    /// Sends `payload` and waits up to `within` for the answer to it (answers to earlier,
    /// timed-out requests are skipped); returns the answering pid.
    pub(crate) fn ask(&self, payload: &[u8], within: Duration) -> Option<String> {
        if let Err(e) = self.socket.send(payload) {
            eprintln!("send: {e}");
            return None;
        }
        let deadline = Instant::now() + within;
        let mut buf = vec![0; 65_536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.socket.set_read_timeout(Some(left)).expect("timeout");
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let answer = &buf[..n];
                    let Some(space) = answer.iter().position(|&b| b == b' ') else {
                        continue;
                    };
                    if &answer[space + 1..] == payload {
                        return Some(String::from_utf8_lossy(&answer[..space]).into_owned());
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None;
                }
                // An ICMP error about an earlier datagram: keep waiting for this one.
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
}

/// Open file descriptors of a process.
pub(crate) fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident memory of a process, in KiB.
pub(crate) fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn each_client_stays_on_one_worker_and_clients_spread_over_workers() {
    let port = free_udp_port();
    let b = Balancer::start(&udp_app("dns", "udp_echo.js", port, 3, ""));
    let pids: HashSet<String> = b
        .wait_ready("dns", 3)
        .iter()
        .map(|p| p.to_string())
        .collect();
    let clients: Vec<Client> = (0..6).map(|_| Client::new(port)).collect();
    let mut owner: Vec<Option<String>> = vec![None; clients.len()];
    // Interleaved, so that flows are all live at once.
    for round in 0..20 {
        for (i, c) in clients.iter().enumerate() {
            let pid = c
                .ask(format!("c{i} r{round}").as_bytes(), PATIENCE)
                .unwrap_or_else(|| panic!("client {i} got no answer in round {round}"));
            assert!(pids.contains(&pid), "answered by {pid}, not a worker");
            match &owner[i] {
                None => owner[i] = Some(pid),
                Some(first) => assert_eq!(first, &pid, "client {i} moved in round {round}"),
            }
        }
    }
    let used: HashSet<_> = owner.iter().flatten().collect();
    eprintln!("flows by worker: {owner:?}");
    assert!(used.len() >= 2, "flows spread over workers: {owner:?}");

    // The answer comes from the public address itself (checked without a connected socket).
    let loose = UdpSocket::bind("127.0.0.1:0").unwrap();
    loose.set_read_timeout(Some(PATIENCE)).unwrap();
    loose.send_to(b"where from", public(port)).unwrap();
    let mut buf = [0; 64];
    let (n, from) = loose.recv_from(&mut buf).unwrap();
    assert_eq!(from, public(port));
    assert!(buf[..n].ends_with(b" where from"));
}

#[test]
fn a_60_kb_datagram_and_a_maximal_one_round_trip_intact() {
    let port = free_udp_port();
    let b = Balancer::start(&udp_app("big", "udp_echo.py", port, 1, ""));
    let pid = b.wait_ready("big", 1)[0].to_string();
    let c = Client::new(port);
    // The answer adds "<pid> " and must still fit one datagram (65,507 bytes).
    for size in [60_000, 65_400] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        // `ask` only accepts an answer whose body equals the payload byte for byte.
        let answer = c.ask(&payload, PATIENCE);
        assert_eq!(answer.as_deref(), Some(pid.as_str()), "{size} bytes");
    }
}

#[test]
fn clients_of_a_worker_killed_with_sigkill_are_answered_by_another() {
    let port = free_udp_port();
    let b = Balancer::start(&udp_app("kill", "udp_echo.py", port, 2, ""));
    let pids = b.wait_ready("kill", 2);
    let clients: Vec<Client> = (0..6).map(|_| Client::new(port)).collect();
    let before: Vec<String> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            c.ask(format!("c{i} hello").as_bytes(), PATIENCE)
                .expect("an answer")
        })
        .collect();
    let victim = pids[0];
    let victims: Vec<usize> = (0..clients.len())
        .filter(|&i| before[i] == victim.to_string())
        .collect();
    assert!(!victims.is_empty(), "some flows on {victim}: {before:?}");

    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    assert!(wait_dead(&[victim], PATIENCE).is_empty());
    // The first datagram after the death bounces off the dead worker's port; the proxy resends
    // it to another worker. A datagram can only be lost if it was already queued in the dead
    // worker's socket: allow a bounded retry for that.
    let mut retries = 0;
    for (i, c) in clients.iter().enumerate() {
        let mut answer = None;
        for attempt in 0..10 {
            answer = c.ask(
                format!("c{i} after {attempt}").as_bytes(),
                Duration::from_secs(2),
            );
            if answer.is_some() {
                break;
            }
            retries += 1;
        }
        let pid = answer.unwrap_or_else(|| panic!("client {i} never answered after the kill"));
        assert_ne!(
            pid,
            victim.to_string(),
            "client {i} still on the dead worker"
        );
        if !victims.contains(&i) {
            assert_eq!(
                pid, before[i],
                "client {i} was not on the victim and stays put"
            );
        }
    }
    eprintln!(
        "after kill -9 of {victim}: {retries} retries for {} moved flows",
        victims.len()
    );
    assert!(!alive(victim));
}

#[test]
fn a_flood_of_source_ports_stays_within_max_flows() {
    let port = free_udp_port();
    let b = Balancer::start(&udp_app("flood", "udp_echo.js", port, 2, "max_flows = 100"));
    b.wait_ready("flood", 2);
    b.wait_running();
    let master = b.pid();
    // Warm up the allocator and the runtime's threads with a first flow.
    assert!(Client::new(port).ask(b"warm", PATIENCE).is_some());
    let (fds_before, rss_before) = (fd_count(master), rss_kib(master));

    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(fd_count(master), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    // 3000 distinct source ports, 100 at a time (the test's own descriptors stay bounded). All
    // ephemeral on 127.0.0.1, where they must never take a port a worker of a test running
    // alongside is about to bind (private ports come from below the ephemeral range).
    let mut answered = 0;
    for _batch in 0..30 {
        let sockets: Vec<UdpSocket> = (0..100)
            .map(|_| UdpSocket::bind("127.0.0.1:0").expect("bind"))
            .collect();
        for s in &sockets {
            let _ = s.send_to(b"flood", public(port));
        }
        std::thread::sleep(Duration::from_millis(20));
        let mut buf = [0; 64];
        for s in &sockets {
            s.set_nonblocking(true).unwrap();
            while s.recv(&mut buf).is_ok() {
                answered += 1;
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    let (fds_after, rss_after) = (fd_count(master), rss_kib(master));
    let live: u64 = b
        .jlist()
        .iter()
        .filter(|w| w["app"] == "flood")
        .filter_map(|w| w["connections"].as_u64())
        .sum();
    eprintln!(
        "flood of 3000 source ports, max_flows 100: {answered} answered; master fds {fds_before} → peak {peak} → {fds_after}; \
         rss {rss_before} → {rss_after} KiB; live flows {live}"
    );
    // One descriptor per flow, plus a little slack for relays being torn down.
    assert!(
        peak <= fds_before + 100 + 10,
        "fds peaked at {peak} (before: {fds_before})"
    );
    assert!(live <= 100, "{live} live flows");
    assert!(
        rss_after < rss_before + 32 * 1024,
        "rss grew from {rss_before} to {rss_after} KiB"
    );
    assert!(answered > 0);
    // Still serving a fresh client.
    assert!(Client::new(port).ask(b"fresh", PATIENCE).is_some());
}

#[test]
fn a_reload_under_udp_load_loses_no_request() {
    let port = free_udp_port();
    // Flow moves are logged at debug: they explain a lost request, should one be lost.
    let b = Balancer::start_with(
        &udp_app("dns", "udp_echo.py", port, 2, r#"drain_timeout = "1s""#),
        &[(
            "BALANCER_LOG",
            "info,balancer_workers=debug,balancer::proxy=debug",
        )],
    );
    b.wait_ready("dns", 2);
    b.wait_running();
    let old = b.ready_pids("dns");

    let stop = Arc::new(AtomicBool::new(false));
    let load = udp_load(port, 4, &stop);
    std::thread::sleep(Duration::from_millis(500));
    let (code, out, err) = b.cli(&["reload", "dns"]);
    assert_eq!(code, 0, "{out}{err}");
    let new = b.ready_pids("dns");
    assert_eq!(new.len(), 2);
    assert!(new.iter().all(|p| !old.contains(p)), "{old:?} → {new:?}");
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);

    let results: Vec<_> = load.into_iter().map(|t| t.join().unwrap()).collect();
    eprintln!("reload under udp load: (ok, lost, last pid) per client: {results:?}");
    let lost: u32 = results.iter().map(|r| r.1).sum();
    let new: HashSet<String> = new.iter().map(|p| p.to_string()).collect();
    for (i, (ok, _, last)) in results.iter().enumerate() {
        assert!(*ok > 10, "client {i} got only {ok} answers");
        let last = last.as_ref().expect("an answer");
        assert!(
            new.contains(last),
            "client {i} still served by {last} after the reload"
        );
    }
    assert_eq!(lost, 0, "requests lost during the reload");
}

#[test]
fn a_mixed_http_and_udp_app_gets_both_port_variables_and_serves_both() {
    let (http_port, udp_port) = (free_port(), free_udp_port());
    let toml = format!(
        "[[app]]\nname = \"mixed\"\nscript = \"{}\"\ninstances = 2\nlisten = [\"http://127.0.0.1:{http_port}\", {{ url = \"udp://127.0.0.1:{udp_port}\", port_env = \"DNS_PORT\" }}]\n",
        worker("mixed_server.js")
    );
    let b = Balancer::start(&toml);
    let pids = b.wait_ready("mixed", 2);
    b.wait_running();

    let body = http_get(public(http_port), "/").expect("HTTP through the proxy");
    let json: serde_json::Value = serde_json::from_str(body.trim()).expect("json");
    let pid = json["pid"].as_u64().unwrap() as u32;
    assert!(pids.contains(&pid));
    let worker_ports: Vec<u16> = ["PORT", "DNS_PORT"]
        .iter()
        .map(|k| json[k].as_str().expect(k).parse().unwrap())
        .collect();
    assert!(
        worker_ports
            .iter()
            .all(|p| ![http_port, udp_port].contains(p)),
        "private ports: {json}"
    );
    let private = b
        .jlist()
        .into_iter()
        .find(|w| w["pid"].as_u64() == Some(u64::from(pid)))
        .unwrap()["private"]
        .clone();
    assert_eq!(
        private,
        serde_json::json!([
            format!("127.0.0.1:{}", worker_ports[0]),
            format!("127.0.0.1:{}", worker_ports[1])
        ])
    );

    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut answered = 0;
    for i in 0..10 {
        client
            .send_to(format!("q{i}").as_bytes(), public(udp_port))
            .unwrap();
        let mut buf = [0u8; 256];
        if let Ok((n, from)) = client.recv_from(&mut buf) {
            assert_eq!(
                from,
                public(udp_port),
                "replies come from the public address"
            );
            let reply = String::from_utf8_lossy(&buf[..n]).to_string();
            let (who, payload) = reply.split_once(' ').unwrap();
            assert!(pids.iter().any(|p| p.to_string() == who), "{reply}");
            assert_eq!(payload, format!("q{i}"));
            answered += 1;
        }
    }
    assert!(answered >= 9, "{answered} of 10 datagrams answered");
}
