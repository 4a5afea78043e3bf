//! The observation endpoint (`[balancer] metrics`): `/metrics` scraped after known traffic and
//! parsed whole as Prometheus text, `/status`, `/healthz`, `/readyz` and the page at `/`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use prometheus_parse::{Scrape, Value};

use crate::support::*;
use crate::udp::free_udp_port;

/// One GET over a fresh connection: the status code and the body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, PATIENCE).expect("connect to metrics");
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (code, body.to_string())
}

/// `/metrics`, parsed whole. Every sample line must belong to a family with a `# TYPE`, and
/// every value must be a number: a scrape Prometheus would reject fails here.
fn scrape(addr: SocketAddr) -> Scrape {
    let (code, text) = get(addr, "/metrics");
    assert_eq!(code, 200, "{text}");
    let mut typed = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.push(rest.split(' ').next().unwrap_or_default().to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("`series value`");
        assert!(value.parse::<f64>().is_ok() || value == "+Inf", "{line}");
        let name = series.split('{').next().unwrap_or_default();
        assert!(
            typed.iter().any(|t| name == t
                || ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(t))),
            "{name} has no # TYPE"
        );
    }
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text")
}

/// The value of a counter or gauge sample.
fn number(v: &Value) -> f64 {
    match v {
        Value::Counter(n) | Value::Gauge(n) | Value::Untyped(n) => *n,
        other => panic!("not a number: {other:?}"),
    }
}

/// The sum of `metric`'s samples whose labels include every pair of `labels`.
fn sum(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == metric)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| number(&x.value))
        .sum()
}

/// One echo exchange through pid_server.js: the greeting, `payload` bytes each way, then a
/// half-close and the rest of the echo. Returns the bytes the client received.
fn exchange(addr: SocketAddr, payload: usize) -> u64 {
    let stream = TcpStream::connect_timeout(&addr, PATIENCE).expect("connect");
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut greeting = String::new();
    reader.read_line(&mut greeting).expect("greeting");
    (&stream).write_all(&vec![b'x'; payload]).expect("send");
    stream.shutdown(Shutdown::Write).expect("half-close");
    let mut echo = Vec::new();
    reader.read_to_end(&mut echo).expect("echo");
    assert_eq!(echo.len(), payload, "the whole payload came back");
    (greeting.len() + echo.len()) as u64
}

/// Polls `/metrics` until `done` holds (panics after `PATIENCE` with the last scrape).
fn scrape_until(addr: SocketAddr, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let s = scrape(addr);
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never seen; last scrape:\n{:#?}",
            s.samples
                .iter()
                .map(|x| (&x.metric, &x.labels, &x.value))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn metrics_count_known_traffic_and_a_crash_exactly() {
    let (port, metrics_port) = (free_port(), free_port());
    let toml = format!(
        "[balancer]\nmetrics = \"127.0.0.1:{metrics_port}\"\nsample_interval = \"200ms\"\n{}",
        pid_app("echo", port, 2, "")
    );
    let b = Balancer::start(&toml);
    b.wait_ready("echo", 2);
    let (public, metrics) = (loopback(port), loopback(metrics_port));
    let listener = format!("tcp://127.0.0.1:{port}");
    let l = [("app", "echo"), ("listener", listener.as_str())];

    // Known traffic: N connections, M bytes to the workers, what came back counted by the
    // client itself.
    let payloads = [1, 1000, 4096, 65_536, 7, 100_000];
    let sent: usize = payloads.iter().sum();
    let received: u64 = payloads.iter().map(|&p| exchange(public, p)).sum();

    // One crash: SIGKILL a worker; the supervisor restarts it.
    let victim = b.ready_pids("echo")[0];
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).expect("kill a worker");

    let n = payloads.len() as f64;
    let s = scrape_until(metrics, "traffic settled and the crash restarted", |s| {
        sum(s, "balancer_tcp_worker_connections_total", &l) == n
            && sum(s, "balancer_tcp_active_connections", &l) == 0.0
            && sum(s, "balancer_worker_restarts_total", &[("reason", "crash")]) == 1.0
            && sum(s, "balancer_worker_ready", &[("app", "echo")]) == 2.0
            && sum(s, "balancer_worker_memory_bytes", &[("app", "echo")]) > 0.0
    });
    assert_eq!(sum(&s, "balancer_tcp_connections_accepted_total", &l), n);
    let to_worker = [("direction", "to_worker")];
    let to_client = [("direction", "to_client")];
    assert_eq!(sum(&s, "balancer_tcp_bytes_total", &to_worker), sent as f64);
    assert_eq!(
        sum(&s, "balancer_tcp_bytes_total", &to_client),
        received as f64
    );
    assert_eq!(sum(&s, "balancer_tcp_connect_errors_total", &l), 0.0);
    assert_eq!(sum(&s, "balancer_tcp_queue_timeouts_total", &l), 0.0);
    assert_eq!(sum(&s, "balancer_tcp_queued_connections", &l), 0.0);
    for reason in ["memory", "reload", "restart"] {
        assert_eq!(
            sum(&s, "balancer_worker_restarts_total", &[("reason", reason)]),
            0.0
        );
    }
    assert_eq!(sum(&s, "balancer_worker_up", &[("app", "echo")]), 2.0);
    // Each of the three incarnations (two, then the crashed one's successor) passed its
    // readiness probe at least once.
    let passed = [("app", "echo"), ("result", "pass")];
    assert!(sum(&s, "balancer_health_checks_total", &passed) >= 3.0);
    // Per-worker series carry the stable id and the instance.
    let per_worker: HashMap<String, f64> = s
        .samples
        .iter()
        .filter(|x| x.metric == "balancer_tcp_worker_connections_total")
        .map(|x| {
            assert!(x.labels.get("instance").is_some(), "{:?}", x.labels);
            (
                x.labels.get("worker").unwrap().to_string(),
                number(&x.value),
            )
        })
        .collect();
    assert_eq!(
        per_worker.len(),
        2,
        "round-robin reached both workers: {per_worker:?}"
    );
    // The master's own process figures.
    assert!(sum(&s, "process_resident_memory_bytes", &[]) > 0.0);
    assert!(sum(&s, "process_open_fds", &[]) >= 3.0);
    assert!(
        s.docs.contains_key("balancer_tcp_bytes_total"),
        "HELP lines"
    );

    // /status: the master, the app and its workers as in jlist, the listeners.
    let (code, body) = get(metrics, "/status");
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(status["master"]["pid"], b.pid());
    assert_eq!(status["master"]["version"], env!("CARGO_PKG_VERSION"));
    let app = &status["apps"][0];
    assert_eq!(app["name"], "echo");
    assert_eq!(app["listeners"][0], listener);
    let workers = app["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 2);
    let jlist = b.jlist();
    for w in workers {
        let same = jlist.iter().find(|j| j["id"] == w["id"]).expect("in jlist");
        assert_eq!(w["pid"], same["pid"]);
        assert_eq!(w["restarts_by"], same["restarts_by"]);
    }

    assert_eq!(get(metrics, "/healthz").0, 200);
    assert_eq!(get(metrics, "/readyz").0, 200);
    assert_eq!(get(metrics, "/nope").0, 404);

    // The page: one self-contained document that reads /status, nothing from elsewhere.
    let (code, page) = get(metrics, "/");
    assert_eq!(code, 200);
    assert!(page.starts_with("<!doctype html>"), "{page:.80}");
    assert!(
        page.contains("fetch(\"status\""),
        "it is drawn from /status"
    );
    for external in ["http://", "https://", "src=", "<link"] {
        assert!(
            !page.contains(external),
            "the page loads nothing: {external}"
        );
    }
}

#[test]
fn readyz_fails_while_an_app_has_no_ready_worker() {
    let metrics_port = free_port();
    let toml = format!(
        "[balancer]\nmetrics = \"127.0.0.1:{metrics_port}\"\n{}",
        app_toml(
            "broken",
            "crash.py",
            &format!("tcp://127.0.0.1:{}", free_port()),
            1,
            "max_restarts = 1\nmin_uptime = \"1s\"\nrestart_delay = \"50ms\"",
        )
    );
    let b = Balancer::start(&toml);
    b.wait_running();
    let metrics = loopback(metrics_port);
    assert_eq!(get(metrics, "/healthz").0, 200, "the master runs");
    let (code, body) = get(metrics, "/readyz");
    assert_eq!(code, 503);
    assert!(body.contains("broken"), "{body}");
    let (_, status) = get(metrics, "/status");
    let status: serde_json::Value = serde_json::from_str(&status).expect("JSON");
    assert_eq!(status["master"]["ready"], false);
}

#[test]
fn http_requests_and_udp_datagrams_are_counted() {
    let (http_port, udp_port, metrics_port) = (free_port(), free_udp_port(), free_port());
    let toml = format!(
        "[balancer]\nmetrics = \"127.0.0.1:{metrics_port}\"\n[[app]]\nname = \"mixed\"\nscript = \"{}\"\ninstances = 1\nlisten = [\"http://127.0.0.1:{http_port}\", {{ url = \"udp://127.0.0.1:{udp_port}\", port_env = \"DNS_PORT\" }}]\n",
        worker("mixed_server.js")
    );
    let b = Balancer::start(&toml);
    b.wait_ready("mixed", 1);
    let pid = b.ready_pids("mixed")[0];

    for _ in 0..3 {
        http_get(loopback(http_port), "/").expect("HTTP through the proxy");
    }
    // UDP: each reply is "<pid> <payload>"; count until every datagram was answered.
    let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let payloads = ["a", "bb", "cccc"];
    let mut answered = Vec::new();
    for p in payloads {
        client
            .send_to(p.as_bytes(), loopback(udp_port))
            .expect("send");
        let mut buf = [0u8; 64];
        let (n, _) = client.recv_from(&mut buf).expect("an answer");
        answered.push(n);
    }
    assert!(answered.iter().all(|&n| n > format!("{pid} ").len()));

    let http = format!("http://127.0.0.1:{http_port}");
    let udp = format!("udp://127.0.0.1:{udp_port}");
    let s = scrape_until(loopback(metrics_port), "HTTP and UDP counted", |s| {
        sum(s, "balancer_http_requests_total", &[("listener", &http)]) == 3.0
            && sum(
                s,
                "balancer_udp_datagrams_total",
                &[("direction", "to_client")],
            ) == 3.0
    });
    let get_2xx = [
        ("listener", http.as_str()),
        ("method", "GET"),
        ("code", "2xx"),
    ];
    assert_eq!(sum(&s, "balancer_http_requests_total", &get_2xx), 3.0);
    assert_eq!(sum(&s, "balancer_http_upstream_errors_total", &[]), 0.0);
    assert_eq!(sum(&s, "balancer_http_no_worker_total", &[]), 0.0);
    let duration_count = s
        .samples
        .iter()
        .find(|x| x.metric == "balancer_http_request_duration_seconds")
        .map(|x| match &x.value {
            Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
            other => panic!("not a histogram: {other:?}"),
        });
    assert_eq!(duration_count, Some(3.0), "every request timed");
    let u = |d: &'static str| [("listener", udp.as_str()), ("direction", d)];
    assert_eq!(
        sum(&s, "balancer_udp_datagrams_total", &u("to_worker")),
        3.0
    );
    let sent: usize = payloads.iter().map(|p| p.len()).sum();
    assert_eq!(
        sum(&s, "balancer_udp_bytes_total", &u("to_worker")),
        sent as f64
    );
    let back: usize = answered.iter().sum();
    assert_eq!(
        sum(&s, "balancer_udp_bytes_total", &u("to_client")),
        back as f64
    );
    assert_eq!(sum(&s, "balancer_udp_flows", &[("listener", &udp)]), 1.0);
    assert_eq!(sum(&s, "balancer_udp_flow_evictions_total", &[]), 0.0);
}
