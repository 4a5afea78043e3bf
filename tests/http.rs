//! The HTTP data path: per-request round robin, forwarded headers, WebSocket tunnelling, 503
//! with no worker, slowloris and idle timeouts, large streamed bodies, h2c, and reload/scale
//! under HTTP load without a failed request.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::*;

pub(crate) fn http_app(name: &str, port: u16, instances: u32, extra: &str) -> String {
    app_toml(
        name,
        "http_server.js",
        &format!("http://127.0.0.1:{port}"),
        instances,
        extra,
    )
}

fn addr(port: u16) -> SocketAddr {
    loopback(port)
}

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
pub(crate) struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A minimal blocking HTTP/1.1 client over one connection (keep-alive unless told otherwise).
pub(crate) struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    pub(crate) fn connect(addr: SocketAddr) -> io::Result<Client> {
        let stream = TcpStream::connect_timeout(&addr, PATIENCE)?;
        stream.set_read_timeout(Some(PATIENCE))?;
        stream.set_write_timeout(Some(PATIENCE))?;
        stream.set_nodelay(true)?;
        Ok(Client {
            reader: BufReader::new(stream),
        })
    }

    pub(crate) fn stream(&mut self) -> &mut TcpStream {
        self.reader.get_mut()
    }

    /// Sends one request and reads its response.
    fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Reply> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test.local\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if !body.is_empty() {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let stream = self.stream();
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        read_reply(&mut self.reader)
    }

    pub(crate) fn get(&mut self, path: &str) -> io::Result<Reply> {
        self.send("GET", path, &[], b"")
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_line(reader: &mut impl BufRead) -> io::Result<String> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    Ok(line.trim_end().to_string())
}

/// Reads a response head and its body (Content-Length, chunked, or up to EOF).
fn read_reply(reader: &mut impl BufRead) -> io::Result<Reply> {
    let status_line = read_line(reader)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader)?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("bad header {line:?}")))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let mut reply = Reply {
        status,
        headers,
        body: Vec::new(),
    };
    if status == 101 || status == 204 || status == 304 {
        return Ok(reply);
    }
    if let Some(len) = reply.header("content-length") {
        let len: usize = len.parse().map_err(|_| bad("bad content-length"))?;
        reply.body.resize(len, 0);
        reader.read_exact(&mut reply.body)?;
    } else if reply
        .header("transfer-encoding")
        .is_some_and(|te| te.contains("chunked"))
    {
        loop {
            let size = read_line(reader)?;
            let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad(format!("bad chunk size {size:?}")))?;
            if size == 0 {
                while !read_line(reader)?.is_empty() {}
                break;
            }
            let start = reply.body.len();
            reply.body.resize(start + size, 0);
            reader.read_exact(&mut reply.body[start..])?;
            read_line(reader)?;
        }
    } else {
        reader.read_to_end(&mut reply.body)?;
    }
    Ok(reply)
}

/// What one load thread sends.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    /// GETs on one keep-alive connection.
    KeepAliveGet,
    /// A fresh connection per GET.
    FreshGet,
    /// POSTs with a body on one keep-alive connection (the proxy never sends those twice).
    KeepAlivePost,
    /// GETs taking 150 ms on one keep-alive connection (in flight while workers drain).
    SlowGet,
}

/// What one load thread saw: answers per pid, and its errors.
type Tally = (HashMap<String, u64>, Vec<String>);

/// A bounded HTTP load: one thread per kind given. Connections are reopened only after a
/// failure. Every non-200 answer and every I/O error counts as a failure.
pub(crate) struct HttpLoad {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Tally>>,
}

impl HttpLoad {
    pub(crate) fn start(addr: SocketAddr, kinds: &[Kind]) -> HttpLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let threads = kinds
            .iter()
            .map(|&kind| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                std::thread::spawn(move || {
                    let (method, path, headers, body): (_, _, &[(&str, &str)], &[u8]) = match kind {
                        Kind::KeepAliveGet => ("GET", "/pid", &[], b""),
                        Kind::FreshGet => ("GET", "/pid", &[("Connection", "close")], b""),
                        Kind::KeepAlivePost => ("POST", "/pid", &[], b"field=value&other=1"),
                        Kind::SlowGet => ("GET", "/slow?ms=150", &[], b""),
                    };
                    let keep_alive = !matches!(kind, Kind::FreshGet);
                    let mut seen = HashMap::new();
                    let mut errors = Vec::new();
                    let mut conn: Option<Client> = None;
                    let started = Instant::now();
                    // Bounded in count and time whatever happens.
                    for _ in 0..20_000 {
                        if stop.load(Ordering::Relaxed)
                            || started.elapsed() > Duration::from_secs(90)
                        {
                            break;
                        }
                        let result = (|| {
                            let client = match &mut conn {
                                Some(c) if keep_alive => c,
                                _ => conn.insert(Client::connect(addr)?),
                            };
                            client.send(method, path, headers, body)
                        })();
                        match result {
                            Ok(reply) if reply.status == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                *seen.entry(reply.text()).or_default() += 1;
                                // The server closes after a response that says so (RFC 9112).
                                if reply
                                    .header("connection")
                                    .is_some_and(|v| v.eq_ignore_ascii_case("close"))
                                {
                                    conn = None;
                                }
                            }
                            Ok(reply) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                errors.push(format!(
                                    "{method} {path}: {} {}",
                                    reply.status,
                                    reply.text()
                                ));
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                errors.push(format!("{method} {path}: {e}"));
                                conn = None;
                            }
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    (seen, errors)
                })
            })
            .collect();
        HttpLoad {
            stop,
            ok,
            failed,
            threads,
        }
    }

    /// Stops the load; returns (ok, failed, answers per pid, first errors).
    pub(crate) fn finish(self) -> (u64, u64, HashMap<String, u64>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut seen = HashMap::new();
        let mut errors = Vec::new();
        for t in self.threads {
            let (s, e) = t.join().unwrap();
            for (pid, n) in s {
                *seen.entry(pid).or_default() += n;
            }
            errors.extend(e);
        }
        errors.truncate(10);
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            seen,
            errors,
        )
    }
}

#[test]
fn one_keep_alive_connection_spreads_its_requests_over_workers() {
    let port = free_port();
    let b = Balancer::start(&http_app("web", port, 3, ""));
    let pids = b.wait_ready("web", 3);
    let mut client = Client::connect(addr(port)).unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..10 {
        let reply = client
            .get("/pid")
            .expect("a response on the same connection");
        assert_eq!(reply.status, 200, "{reply:?}");
        assert!(
            reply.header("keep-alive").is_none(),
            "hop-by-hop Keep-Alive from the worker is stripped: {reply:?}"
        );
        *seen.entry(reply.text()).or_default() += 1;
    }
    assert!(seen.len() >= 2, "one connection, several workers: {seen:?}");
    for pid in seen.keys() {
        assert!(
            pids.iter().any(|p| p.to_string() == *pid),
            "{pid} is a worker"
        );
    }
}

#[test]
fn workers_see_forwarded_headers_and_no_hop_by_hop_ones() {
    let port = free_port();
    let b = Balancer::start(&http_app("web", port, 1, ""));
    b.wait_ready("web", 1);
    let mut client = Client::connect(addr(port)).unwrap();

    let reply = client
        .send(
            "GET",
            "/headers",
            &[
                ("Connection", "keep-alive, X-Hop"),
                ("X-Hop", "must not pass"),
                ("Keep-Alive", "timeout=30"),
                ("X-End-To-End", "passes"),
            ],
            b"",
        )
        .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    let h = &seen["headers"];
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{h}");
    assert_eq!(h["x-forwarded-proto"], "http", "{h}");
    assert_eq!(h["x-forwarded-host"], "test.local", "{h}");
    assert_eq!(
        h["forwarded"], "for=127.0.0.1;proto=http;host=test.local",
        "{h}"
    );
    assert_eq!(h["host"], "test.local", "{h}");
    assert_eq!(h["x-end-to-end"], "passes", "{h}");
    assert!(
        h.get("x-hop").is_none(),
        "Connection-listed header stripped: {h}"
    );
    assert!(h.get("keep-alive").is_none(), "{h}");
    // The worker's own Connection-listed header does not reach the client either.
    assert!(reply.header("x-worker-secret").is_none(), "{reply:?}");

    // Earlier proxies' X-Forwarded-For and Forwarded are appended to.
    let reply = client
        .send(
            "GET",
            "/headers",
            &[
                ("X-Forwarded-For", "203.0.113.9"),
                ("Forwarded", "for=203.0.113.9"),
            ],
            b"",
        )
        .unwrap();
    let seen: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    let h = &seen["headers"];
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1", "{h}");
    assert_eq!(
        h["forwarded"], "for=203.0.113.9, for=127.0.0.1;proto=http;host=test.local",
        "{h}"
    );
}

/// One masked client frame (RFC 6455 §5.2).
fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Reads one unmasked server frame: (opcode, payload).
fn ws_read(reader: &mut impl Read) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0; 2];
    reader.read_exact(&mut head)?;
    let len = match head[1] & 0x7f {
        126 => {
            let mut n = [0; 2];
            reader.read_exact(&mut n)?;
            u16::from_be_bytes(n) as usize
        }
        127 => return Err(bad("unexpected 64-bit frame")),
        n => n as usize,
    };
    let mut payload = vec![0; len];
    reader.read_exact(&mut payload)?;
    Ok((head[0] & 0x0f, payload))
}

#[test]
fn a_websocket_echo_is_tunnelled_both_ways() {
    let port = free_port();
    let b = Balancer::start(&http_app("ws", port, 2, ""));
    b.wait_ready("ws", 2);
    let mut client = Client::connect(addr(port)).unwrap();
    client
        .stream()
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: test.local\r\nUpgrade: websocket\r\n\
              Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
    let reply = read_reply(&mut client.reader).unwrap();
    assert_eq!(reply.status, 101, "{reply:?}");
    assert_eq!(
        reply.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{reply:?}"
    );
    assert!(
        reply
            .header("upgrade")
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
    );

    let long = "balancer ✓ ".repeat(40);
    for message in ["hello", long.as_str()] {
        client
            .stream()
            .write_all(&ws_frame(0x1, message.as_bytes()))
            .unwrap();
        let (opcode, payload) = ws_read(&mut client.reader).unwrap();
        assert_eq!(opcode, 0x1);
        assert_eq!(String::from_utf8(payload).unwrap(), message);
    }
    // Close handshake: the worker answers the close frame and ends the connection.
    client
        .stream()
        .write_all(&ws_frame(0x8, &1000u16.to_be_bytes()))
        .unwrap();
    let (opcode, _) = ws_read(&mut client.reader).unwrap();
    assert_eq!(opcode, 0x8);
    let mut rest = Vec::new();
    client.reader.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "nothing after the close: {rest:?}");
}

#[test]
fn an_app_with_no_instance_answers_503_after_queue_timeout() {
    let port = free_port();
    let b = Balancer::start(&http_app("none", port, 0, r#"queue_timeout = "300ms""#));
    b.wait_running();
    let mut client = Client::connect(addr(port)).unwrap();
    for _ in 0..2 {
        let started = Instant::now();
        let reply = client.get("/pid").unwrap();
        let waited = started.elapsed();
        assert_eq!(reply.status, 503, "{reply:?}");
        assert!(!reply.body.is_empty(), "a short text body");
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
            "held for queue_timeout: {waited:?}"
        );
    }
}

#[test]
fn a_slow_request_head_is_cut_off_by_the_header_timeout() {
    let port = free_port();
    let b = Balancer::start(&http_app("web", port, 1, r#"http_header_timeout = "1s""#));
    b.wait_ready("web", 1);

    let mut slow = TcpStream::connect(addr(port)).unwrap();
    slow.set_write_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let started = Instant::now();
    let head = b"GET /pid HTTP/1.1\r\nHost: test.local\r\n";
    let mut cut_off = None;
    let mut served_meanwhile = false;
    // A byte every 100 ms, then header lines forever (bounded at 15 s): the head never ends.
    let mut bytes = head
        .iter()
        .copied()
        .chain(std::iter::repeat(b"X-Slow: 1\r\n").flatten().copied());
    while started.elapsed() < Duration::from_secs(15) {
        let byte = bytes.next().unwrap();
        if slow.write_all(&[byte]).is_err() {
            cut_off = Some(started.elapsed());
            break;
        }
        // Meanwhile a normal client is served.
        if !served_meanwhile && started.elapsed() > Duration::from_millis(500) {
            let reply = Client::connect(addr(port)).unwrap().get("/pid").unwrap();
            assert_eq!(reply.status, 200);
            served_meanwhile = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let cut_off = cut_off.expect("the slow client was cut off");
    assert!(served_meanwhile);
    assert!(
        cut_off >= Duration::from_millis(900) && cut_off < Duration::from_secs(10),
        "cut off after {cut_off:?}"
    );
    let reply = Client::connect(addr(port)).unwrap().get("/pid").unwrap();
    assert_eq!(reply.status, 200, "still serving: {reply:?}");
}

#[test]
fn an_oversized_request_head_gets_431_and_a_normal_one_passes() {
    let port = free_port();
    let b = Balancer::start(&http_app("web", port, 1, r#"http_max_header_size = "16K""#));
    b.wait_ready("web", 1);
    let big = "x".repeat(12_000);
    let reply = Client::connect(addr(port))
        .unwrap()
        .send("GET", "/pid", &[("X-Big", &big)], b"")
        .unwrap();
    assert_eq!(reply.status, 200, "12 KB of headers fit in 16K");
    let huge = "x".repeat(40_000);
    let reply = Client::connect(addr(port))
        .unwrap()
        .send("GET", "/pid", &[("X-Huge", &huge)], b"");
    match reply {
        Ok(reply) => assert_eq!(reply.status, 431, "{reply:?}"),
        // hyper may close before the client finished writing: a reset is a refusal too.
        Err(e) => assert!(
            matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "{e}"
        ),
    }
}

#[test]
fn a_quiet_keep_alive_connection_lasts_the_idle_timeout_not_the_header_timeout() {
    let port = free_port();
    let b = Balancer::start(&http_app(
        "web",
        port,
        1,
        "http_header_timeout = \"1s\"\nhttp_idle_timeout = \"3s\"",
    ));
    b.wait_ready("web", 1);
    let mut client = Client::connect(addr(port)).unwrap();
    assert_eq!(client.get("/pid").unwrap().status, 200);
    // Idle longer than the header timeout: still open.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(client.get("/pid").unwrap().status, 200);
    // A request longer than both timeouts is not cut either.
    assert_eq!(client.get("/slow?ms=3500").unwrap().status, 200);
    // Idle past the idle timeout: closed by the proxy.
    let idle_from = Instant::now();
    let mut byte = [0; 1];
    let n = client
        .reader
        .read(&mut byte)
        .expect("a clean close, not a reset");
    assert_eq!(n, 0, "EOF");
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(2500) && idle < Duration::from_secs(10),
        "closed after {idle:?} idle"
    );
}

#[test]
fn a_large_post_body_streams_through_intact() {
    let port = free_port();
    let b = Balancer::start(&http_app("web", port, 2, ""));
    b.wait_ready("web", 2);
    // 4 MiB of varied bytes, hashed here and by the worker as it streams in.
    let body: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let expected = sha256_hex(&body);
    let mut client = Client::connect(addr(port)).unwrap();
    let writer = {
        let mut stream = client.stream().try_clone().unwrap();
        let body = body.clone();
        std::thread::spawn(move || {
            write!(
                stream,
                "POST /sum HTTP/1.1\r\nHost: test.local\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )?;
            for chunk in body.chunks(64 * 1024) {
                stream.write_all(chunk)?;
            }
            io::Result::Ok(())
        })
    };
    let reply = read_reply(&mut client.reader).unwrap();
    writer.join().unwrap().unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.text(), format!("{} {expected}", body.len()));

    // Chunked upload, then a second request on the same connection.
    let chunked_body = &body[..1_000_003];
    let stream = client.stream();
    stream
        .write_all(b"POST /sum HTTP/1.1\r\nHost: test.local\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    for chunk in chunked_body.chunks(100_000) {
        write!(stream, "{:x}\r\n", chunk.len()).unwrap();
        stream.write_all(chunk).unwrap();
        stream.write_all(b"\r\n").unwrap();
    }
    stream.write_all(b"0\r\n\r\n").unwrap();
    let reply = read_reply(&mut client.reader).unwrap();
    assert_eq!(
        reply.text(),
        format!("{} {}", chunked_body.len(), sha256_hex(chunked_body))
    );
    assert_eq!(client.get("/pid").unwrap().status, 200);
}

/// SHA-256 by `sha256sum`, so the test needs no hashing crate.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

#[test]
fn h2c_prior_knowledge_is_proxied_to_http1_workers() {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;

    let port = free_port();
    let b = Balancer::start(&http_app("web", port, 2, ""));
    b.wait_ready("web", 2);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let seen = rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(addr(port)).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let mut seen = Vec::new();
        for _ in 0..4 {
            let req = hyper::Request::get(format!("http://test.local:{port}/headers"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            let response = tokio::time::timeout(PATIENCE, sender.send_request(req))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(response.status(), 200);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            seen.push(serde_json::from_slice::<serde_json::Value>(&body).unwrap());
        }
        seen
    });
    let pids: std::collections::HashSet<_> = seen.iter().map(|s| s["pid"].to_string()).collect();
    assert_eq!(pids.len(), 2, "one h2 connection, both workers: {seen:?}");
    assert_eq!(seen[0]["headers"]["host"], format!("test.local:{port}"));
    assert_eq!(seen[0]["headers"]["x-forwarded-for"], "127.0.0.1");
}

#[test]
fn reload_and_scale_under_http_load_fail_no_request() {
    on_both_paths(reload_and_scale_on);
}

fn reload_and_scale_on(io: &str) {
    let (port, metrics) = (free_port(), free_port());
    let b = Balancer::start(&with_io(io, metrics, &http_app("web", port, 2, "")));
    b.wait_ready("web", 2);
    b.wait_running();
    let load = HttpLoad::start(
        addr(port),
        &[
            Kind::KeepAliveGet,
            Kind::FreshGet,
            Kind::KeepAlivePost,
            Kind::SlowGet,
        ],
    );
    std::thread::sleep(Duration::from_millis(300));

    for round in 1..=2 {
        let before = b.ready_pids("web");
        let (code, out, err) = b.cli(&["reload", "web"]);
        assert_eq!(code, 0, "reload {round}: {out}{err}");
        let after = b.ready_pids("web");
        assert_eq!(after.len(), 2, "reload {round}: {after:?}");
        assert!(
            after.iter().all(|p| !before.contains(p)),
            "reload {round}: {before:?} → {after:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    let (code, out, err) = b.cli(&["scale", "web", "+2"]);
    assert_eq!(code, 0, "scale +2: {out}{err}");
    assert_eq!(b.ready_pids("web").len(), 4);
    std::thread::sleep(Duration::from_millis(300));

    let (code, out, err) = b.cli(&["scale", "web", "1"]);
    assert_eq!(code, 0, "scale 1: {out}{err}");
    assert_eq!(b.ready_pids("web").len(), 1);
    std::thread::sleep(Duration::from_millis(300));

    let (ok, failed, seen, errors) = load.finish();
    eprintln!(
        "2 reloads, scale +2, scale 1 under HTTP load: {ok} ok, {failed} failed, {} pids: {seen:?}",
        seen.len()
    );
    assert_eq!(failed, 0, "failed requests: {errors:?}");
    assert!(ok > 100, "the load really ran: {ok}");
    assert!(
        seen.len() >= 2 + 2 + 2 + 2,
        "answers from every generation: {seen:?}"
    );
    assert_moved(io, metrics, 1);
}

#[test]
fn a_worker_killed_under_get_load_costs_no_request() {
    on_both_paths(a_worker_killed_on);
}

fn a_worker_killed_on(io: &str) {
    let (port, metrics) = (free_port(), free_port());
    let b = Balancer::start(&with_io(io, metrics, &http_app("web", port, 2, "")));
    let pids = b.wait_ready("web", 2);
    let load = HttpLoad::start(
        addr(port),
        &[
            Kind::KeepAliveGet,
            Kind::FreshGet,
            Kind::SlowGet,
            Kind::SlowGet,
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    // Requests in flight on it fail before any response byte: bodiless GETs are sent again.
    kill(Pid::from_raw(pids[0] as i32), Signal::SIGKILL).unwrap();
    b.log.wait_for(3, "a replacement ready", |l| {
        l.contains("worker ready") && field(l, "app").as_deref() == Some("web")
    });
    std::thread::sleep(Duration::from_millis(500));
    let (ok, failed, seen, errors) = load.finish();
    eprintln!("kill -9 under GET load: {ok} ok, {failed} failed: {seen:?}");
    assert_eq!(failed, 0, "failed requests: {errors:?}");
    assert!(seen.contains_key(&pids[0].to_string()), "{seen:?}");
    assert!(seen.len() >= 3, "the replacement served too: {seen:?}");
    assert_moved(io, metrics, 1);
}

#[test]
fn sigterm_lets_a_request_in_flight_finish_then_closes_its_connection() {
    on_both_paths(sigterm_in_flight_on);
}

fn sigterm_in_flight_on(io: &str) {
    let (port, metrics) = (free_port(), free_port());
    let mut b = Balancer::start(&with_io(io, metrics, &http_app("web", port, 1, "")));
    let pid = b.wait_ready("web", 1)[0];
    b.wait_running();
    let mut client = Client::connect(addr(port)).unwrap();
    // Two requests served: with io_uring the connection is on a ring for the slow one.
    for _ in 0..2 {
        assert_eq!(client.get("/pid").unwrap().status, 200);
    }
    assert_moved(io, metrics, 1);
    let slow = std::thread::spawn(move || {
        let reply = client.get("/slow?ms=1500");
        // After the response, the proxy closes the connection it no longer serves.
        let mut rest = Vec::new();
        let eof = client.reader.read_to_end(&mut rest).map(|_| rest);
        (reply, eof)
    });
    std::thread::sleep(Duration::from_millis(300));
    b.signal(Signal::SIGTERM);
    let (reply, eof) = slow.join().unwrap();
    let reply = reply.expect("the request in flight was answered");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), pid.to_string());
    assert_eq!(eof.expect("a clean close"), Vec::<u8>::new());
    assert_eq!(b.wait_exit().code(), Some(0));
}
