//! Balancing within the rr policy: least_conn against a slow worker, source hashing, per-worker
//! `max_conns` with the master's queue, and the PROXY protocol both ways.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use crate::support::*;

/// A TCP connection to `to` from the loopback address `from` (any 127.0.0.0/8 address is ours).
fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::from((from, 0)).into())
        .expect("bind a loopback source");
    socket
        .connect_timeout(&to.into(), PATIENCE)
        .expect("connect");
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    stream
}

/// The greeting line of `conn_echo.py`: `<pid> <client> active=<n> accepted=<m>`.
fn greeting_of(stream: &TcpStream) -> String {
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .expect("greeting");
    assert!(!line.is_empty(), "closed before the greeting");
    line.trim().to_string()
}

/// The `key=` number of a greeting.
fn number(greeting: &str, key: &str) -> u64 {
    field(greeting, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {greeting:?}"))
}

fn conn_echo(name: &str, listen: &str, instances: u32, extra: &str) -> String {
    format!(
        "\n[[app]]\nname = \"{name}\"\ncommand = [\"python3\", \"{}\"]\ninstances = {instances}\n\
         listen = [{listen}]\n{extra}\n",
        worker("conn_echo.py")
    )
}

#[test]
fn least_conn_gives_a_slow_worker_fewer_of_200_concurrent_requests() {
    let port = free_port();
    let toml = app_toml(
        "lc",
        "slow_http.js",
        &format!("http://127.0.0.1:{port}"),
        3,
        "balance = \"least_conn\"\nenv = { SLOW_INSTANCE = \"0\", SLOW_MS = \"300\" }\n\
         health = { check = \"http\", path = \"/health\" }",
    );
    let b = Balancer::start(&toml);
    b.wait_ready("lc", 3);
    let addr = loopback(port);
    // 20 clients, 10 requests each: 200 requests, 20 in flight at a time.
    let clients: Vec<_> = (0..20)
        .map(|_| {
            thread::spawn(move || {
                (0..10)
                    .map(|_| http_get(addr, "/").expect("a response"))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut by_instance: HashMap<String, usize> = HashMap::new();
    for client in clients {
        for instance in client.join().expect("client") {
            *by_instance.entry(instance).or_default() += 1;
        }
    }
    eprintln!("least_conn, instance 0 slow: {by_instance:?}");
    assert_eq!(by_instance.values().sum::<usize>(), 200);
    let slow = by_instance.get("0").copied().unwrap_or(0);
    let fast = ["1", "2"].map(|i| by_instance.get(i).copied().unwrap_or(0));
    // Round robin would give each ~67. The slow one holds its requests 300 ms, so least_conn
    // sends it far fewer than either fast one.
    assert!(
        fast.iter().all(|&f| slow * 2 < f),
        "slow worker got {slow}, fast ones {fast:?}"
    );
}

#[test]
fn source_keeps_each_client_address_on_one_worker() {
    let port = free_port();
    let toml = conn_echo(
        "src",
        &format!("\"tcp://127.0.0.1:{port}\""),
        3,
        "balance = \"source\"",
    );
    let b = Balancer::start(&toml);
    b.wait_ready("src", 3);
    let addr = loopback(port);
    let mut workers_seen = HashMap::new();
    for x in 2..18u8 {
        let pids: Vec<String> = (0..4)
            .map(|_| {
                let greeting = greeting_of(&connect_from([127, 0, 0, x], addr));
                greeting.split(' ').next().unwrap_or_default().to_string()
            })
            .collect();
        assert!(
            pids.iter().all(|p| *p == pids[0]),
            "127.0.0.{x} moved between workers: {pids:?}"
        );
        *workers_seen.entry(pids[0].clone()).or_insert(0) += 1;
    }
    eprintln!("source: 16 client addresses over workers {workers_seen:?}");
    assert!(
        workers_seen.len() >= 2,
        "every client on one worker: {workers_seen:?}"
    );
}

#[test]
fn max_conns_1_queues_the_excess_and_refuses_none() {
    let port = free_port();
    let toml = conn_echo(
        "mc",
        &format!("\"tcp://127.0.0.1:{port}\""),
        2,
        "max_conns = 1\nhealth = { check = \"tcp\", interval = \"60s\" }",
    );
    let b = Balancer::start(&toml);
    b.wait_ready("mc", 2);
    let addr = loopback(port);
    let hold = Duration::from_millis(600);
    let clients: Vec<_> = (0..4)
        .map(|_| {
            thread::spawn(move || {
                let started = Instant::now();
                let mut stream = TcpStream::connect_timeout(&addr, PATIENCE).expect("connect");
                stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
                let greeting = greeting_of(&stream);
                let waited = started.elapsed();
                thread::sleep(hold);
                // Still served after the hold: the echo answers.
                stream.write_all(b"x").expect("write");
                let mut echo = [0u8; 1];
                stream.read_exact(&mut echo).expect("echo");
                (greeting, waited)
            })
        })
        .collect();
    // While the first two hold their workers, the other two are in the master's queue.
    let show = {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (code, out, err) = b.cli(&["show", "mc"]);
            assert_eq!(code, 0, "{err}");
            if out.contains("queue: 2 waiting") || Instant::now() > deadline {
                break out;
            }
            thread::sleep(Duration::from_millis(20));
        }
    };
    assert!(show.contains("queue: 2 waiting"), "{show}");
    let results: Vec<(String, Duration)> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    eprintln!("max_conns = 1: {results:?}");
    for (greeting, _) in &results {
        assert_eq!(
            number(greeting, "active"),
            1,
            "two at once on a worker: {greeting}"
        );
    }
    let queued = results
        .iter()
        .filter(|(_, waited)| *waited >= hold / 2)
        .count();
    assert_eq!(queued, 2, "two clients waited for a place: {results:?}");
    let (_, out, _) = b.cli(&["show", "mc"]);
    assert!(out.contains("queue: 0 waiting; 2 waited"), "{out}");
}

/// A v2 header from `source` to `destination` (TCP over IPv4), as a front load balancer sends.
fn v2_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (source, destination) else {
        panic!("v4 only");
    };
    let mut h = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    h.extend_from_slice(&s.ip().octets());
    h.extend_from_slice(&d.ip().octets());
    h.extend_from_slice(&s.port().to_be_bytes());
    h.extend_from_slice(&d.port().to_be_bytes());
    h
}

#[test]
fn proxy_protocol_both_ways_and_garbage_never_reaches_a_worker() {
    let [v1, v2, front, http] = [free_port(), free_port(), free_port(), free_port()];
    let toml = conn_echo(
        "pp",
        &format!(
            "{{ url = \"tcp://127.0.0.1:{v1}\", proxy_protocol = \"v1\" }}, \
             {{ url = \"tcp://127.0.0.1:{v2}\", proxy_protocol = \"v2\" }}, \
             {{ url = \"tcp://127.0.0.1:{front}\", proxy_protocol = \"v2\", accept_proxy = true }}"
        ),
        1,
        "env = { EXPECT_PROXY = \"1\" }\nconnect_timeout = \"500ms\"",
    ) + &app_toml(
        "web",
        "http_server.js",
        &format!("http://127.0.0.1:{http}"),
        1,
        "",
    );
    let toml = toml.replace(
        &format!("listen = [\"http://127.0.0.1:{http}\"]"),
        &format!("listen = [{{ url = \"http://127.0.0.1:{http}\", accept_proxy = true }}]"),
    );
    let b = Balancer::start(&toml);
    b.wait_ready("pp", 1);
    b.wait_ready("web", 1);

    // To workers: the Python worker parses the header and echoes the client it names.
    let mut accepted = 0;
    for (port, source) in [(v1, [127, 0, 0, 7]), (v2, [127, 0, 0, 8])] {
        let stream = connect_from(source, loopback(port));
        let me = stream.local_addr().expect("local addr");
        let greeting = greeting_of(&stream);
        assert!(
            greeting.contains(&format!(" {me} ")),
            "{greeting} names {me}"
        );
        accepted += 1;
        assert_eq!(number(&greeting, "accepted"), accepted);
    }

    // From a front load balancer: a crafted v1 and v2 header's client reaches the worker.
    let lb: SocketAddr = "198.51.100.2:443".parse().unwrap();
    for header in [
        b"PROXY TCP4 203.0.113.9 198.51.100.2 5555 443\r\n".to_vec(),
        v2_header("203.0.113.10:6666".parse().unwrap(), lb),
    ] {
        let mut stream = TcpStream::connect(loopback(front)).expect("connect");
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream.write_all(&header).unwrap();
        let greeting = greeting_of(&stream);
        accepted += 1;
        assert!(
            greeting.contains(" 203.0.113.9:5555 ") || greeting.contains(" 203.0.113.10:6666 "),
            "{greeting}"
        );
        assert_eq!(number(&greeting, "accepted"), accepted);
    }

    // Garbage, or a header that never ends: closed (within connect_timeout), no worker sees it.
    for bytes in [
        &b"GET / HTTP/1.0\r\n\r\n"[..],
        &b"PROXY TCP4 203.0.113.9"[..],
    ] {
        let started = Instant::now();
        let mut stream = TcpStream::connect(loopback(front)).expect("connect");
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream.write_all(bytes).unwrap();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        assert!(rest.is_empty(), "got {:?}", String::from_utf8_lossy(&rest));
        assert!(started.elapsed() < PATIENCE);
    }
    let greeting = greeting_of(&connect_from([127, 0, 0, 9], loopback(v1)));
    assert_eq!(number(&greeting, "accepted"), accepted + 1, "{greeting}");

    // http:// with accept_proxy: X-Forwarded-For and Forwarded name the header's client.
    let mut stream = TcpStream::connect(loopback(http)).expect("connect");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
        .write_all(
            b"PROXY TCP4 203.0.113.11 198.51.100.2 7777 80\r\n\
              GET /headers HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains(r#""x-forwarded-for":"203.0.113.11""#),
        "{response}"
    );
    assert!(response.contains("for=203.0.113.11"), "{response}");
    let debug = b.log.all().join("\n");
    assert!(!debug.contains("panicked"), "{debug}");
}

#[test]
fn an_http_listener_sends_each_client_its_own_proxy_header() {
    let port = free_port();
    let toml = app_toml(
        "behind",
        "proxy_http.py",
        &format!("tcp://127.0.0.1:{port}"),
        1,
        "",
    )
    .replace(
        &format!("listen = [\"tcp://127.0.0.1:{port}\"]"),
        &format!("listen = [{{ url = \"http://127.0.0.1:{port}\", proxy_protocol = \"v1\" }}]"),
    );
    let b = Balancer::start(&toml);
    b.wait_ready("behind", 1);
    let addr = loopback(port);
    let mut a = crate::http::Client::connect(addr).unwrap();
    let a_addr = a.stream().local_addr().unwrap().to_string();
    let mut c = crate::http::Client::connect(addr).unwrap();
    let c_addr = c.stream().local_addr().unwrap().to_string();
    // Interleaved on two keep-alive connections: a kept worker connection never carries
    // another client's requests under its header.
    for _ in 0..3 {
        assert_eq!(a.get("/").unwrap().text(), a_addr);
        assert_eq!(c.get("/").unwrap().text(), c_addr);
    }
}
