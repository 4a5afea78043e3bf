//! The HTTP/1.1 wire behaviour of `http://` listeners, read as raw bytes off a socket: every
//! kind of response framing (chunked, Content-Length, bodiless, close-delimited) arrives whole
//! and leaves the client connection usable, pipelined requests are answered in order, request
//! bodies (Content-Length, chunked, `Expect: 100-continue`) reach the worker intact, and the
//! connection closes exactly when the client (`Connection: close`, HTTP/1.0) or a bad request
//! says so. Whatever parses HTTP/1.1 in the proxy, these must hold.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::http::sha256_hex;
use crate::support::*;

/// The bound on every read and write: a response that is not there by then is not coming.
const WAIT: Duration = Duration::from_secs(10);

/// The byte at offset `i` of a `wire_server.js` `/length` body.
fn length_byte(i: usize) -> u8 {
    ((i * 31 + 7) % 256) as u8
}

/// The body every `raw_close.py` response carries.
fn raw_close_body() -> Vec<u8> {
    let mut body = b"close-delimited\n".to_vec();
    body.extend((0..150_000).map(|i| ((i * 7 + 3) % 251) as u8));
    body
}

/// How a response's body was delimited on the wire (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body by definition (HEAD, 1xx, 204, 304).
    Bodiless,
    Length(usize),
    Chunked,
    /// Up to the end of the connection.
    Close,
}

/// One response head as it came off the wire.
#[derive(Debug)]
struct Head {
    status_line: String,
    status: u16,
    /// Names lower-cased, in wire order.
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn says_close(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }
}

/// A whole response: its head, the interim (1xx) statuses before it, and its decoded body.
#[derive(Debug)]
struct Response {
    head: Head,
    interim: Vec<u16>,
    framing: Framing,
    body: Vec<u8>,
    trailers: Vec<(String, String)>,
}

impl Response {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts the response was framed so that the connection can carry the next one.
    fn assert_kept_alive(&self, what: &str) {
        assert!(
            matches!(
                self.framing,
                Framing::Length(_) | Framing::Chunked | Framing::Bodiless
            ),
            "{what}: framed to keep the connection: {:?}",
            self.head
        );
        assert!(
            !self.head.says_close(),
            "{what}: the proxy keeps the client connection: {:?}",
            self.head
        );
    }
}

/// One client connection driven byte by byte.
struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(port: u16) -> Conn {
        let stream = TcpStream::connect_timeout(&loopback(port), WAIT).expect("connect");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_write_timeout(Some(WAIT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Conn {
            reader: BufReader::new(stream),
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        self.reader
            .get_mut()
            .write_all(bytes)
            .expect("write to the proxy");
    }

    /// Bytes that arrived but were not read yet.
    fn buffered(&self) -> &[u8] {
        self.reader.buffer()
    }

    /// One CRLF-terminated line, without its CRLF.
    fn line(&mut self, what: &str) -> String {
        let mut line = Vec::new();
        match self.reader.read_until(b'\n', &mut line) {
            Ok(0) => panic!("{what}: connection closed"),
            Ok(_) => {}
            Err(e) => panic!("{what}: {e}"),
        }
        assert!(
            line.ends_with(b"\r\n"),
            "{what}: line ends in CRLF: {line:?}"
        );
        line.truncate(line.len() - 2);
        String::from_utf8(line).unwrap_or_else(|e| panic!("{what}: not text: {e}"))
    }

    /// Header lines up to the empty one.
    fn fields(&mut self, what: &str) -> Vec<(String, String)> {
        let mut fields = Vec::new();
        loop {
            let line = self.line(what);
            if line.is_empty() {
                return fields;
            }
            let (name, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("{what}: bad header line {line:?}"));
            fields.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }

    /// One response head (interim or final).
    fn head(&mut self, what: &str) -> Head {
        let status_line = self.line(what);
        assert!(
            status_line.starts_with("HTTP/1."),
            "{what}: a status line: {status_line:?}"
        );
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{what}: bad status line {status_line:?}"));
        Head {
            status_line,
            status,
            headers: self.fields(what),
        }
    }

    /// The next final response (interim 1xx ones skipped, noted), its body read as framed.
    fn response(&mut self, method: &str, what: &str) -> Response {
        let mut interim = Vec::new();
        let head = loop {
            let head = self.head(what);
            if (100..200).contains(&head.status) && head.status != 101 {
                interim.push(head.status);
                continue;
            }
            break head;
        };
        let chunked = head.header("transfer-encoding").map(|te| {
            te.rsplit(',')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
        let length = head.header("content-length");
        assert!(
            chunked.is_none() || length.is_none(),
            "{what}: never both Transfer-Encoding and Content-Length (RFC 9112 §6.2): {head:?}"
        );
        let framing = if method == "HEAD" || matches!(head.status, 101..=199 | 204 | 304) {
            Framing::Bodiless
        } else if let Some(coding) = &chunked {
            assert_eq!(coding, "chunked", "{what}: {head:?}");
            Framing::Chunked
        } else if let Some(length) = length {
            Framing::Length(
                length
                    .parse()
                    .unwrap_or_else(|_| panic!("{what}: {head:?}")),
            )
        } else {
            Framing::Close
        };
        let mut body = Vec::new();
        let mut trailers = Vec::new();
        match framing {
            Framing::Bodiless => {}
            Framing::Length(n) => {
                body.resize(n, 0);
                self.reader
                    .read_exact(&mut body)
                    .unwrap_or_else(|e| panic!("{what}: {n}-byte body: {e}"));
            }
            Framing::Chunked => loop {
                let size_line = self.line(what);
                let size = size_line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size, 16)
                    .unwrap_or_else(|_| panic!("{what}: bad chunk size {size_line:?}"));
                if size == 0 {
                    trailers = self.fields(what);
                    break;
                }
                let start = body.len();
                body.resize(start + size, 0);
                self.reader
                    .read_exact(&mut body[start..])
                    .unwrap_or_else(|e| panic!("{what}: chunk of {size}: {e}"));
                assert_eq!(self.line(what), "", "{what}: CRLF after a chunk");
            },
            Framing::Close => {
                self.reader
                    .read_to_end(&mut body)
                    .unwrap_or_else(|e| panic!("{what}: close-delimited body: {e}"));
            }
        }
        Response {
            head,
            interim,
            framing,
            body,
            trailers,
        }
    }

    /// Sends `GET path` (HTTP/1.1, keep-alive) and reads its response.
    fn get(&mut self, path: &str) -> Response {
        self.write(&request("GET", path, ""));
        self.response("GET", &format!("GET {path}"))
    }

    /// Asserts the proxy closes the connection cleanly now: nothing more, then EOF.
    fn assert_eof(&mut self, what: &str) {
        assert!(
            self.buffered().is_empty(),
            "{what}: bytes after the response: {:?}",
            self.buffered()
        );
        let mut byte = [0; 1];
        match self.reader.get_mut().read(&mut byte) {
            Ok(0) => {}
            Ok(_) => panic!("{what}: more bytes where EOF was due: {byte:?}"),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{what}: the connection stayed open for {WAIT:?}")
            }
            Err(e) => panic!("{what}: {e} instead of a clean close"),
        }
    }
}

/// An HTTP/1.1 request head with `extra` header lines (each ending in CRLF).
fn request(method: &str, path: &str, extra: &str) -> Vec<u8> {
    format!("{method} {path} HTTP/1.1\r\nHost: wire.test\r\n{extra}\r\n").into_bytes()
}

/// The worker id (`instance/pid`) a `wire_server.js` body ends with; checks that it names one
/// of `pids`.
fn worker_of(body: &str, pids: &[u32]) -> String {
    let id = body.split_whitespace().last().unwrap_or("").to_string();
    let pid = id.split('/').nth(1).and_then(|p| p.parse::<u32>().ok());
    assert!(
        pid.is_some_and(|p| pids.contains(&p)),
        "{body:?} names one of the workers {pids:?}"
    );
    id
}

fn wire_app(port: u16, instances: u32) -> String {
    app_toml(
        "wire",
        "wire_server.js",
        &format!("http://127.0.0.1:{port}"),
        instances,
        "",
    )
}

#[test]
fn every_response_framing_arrives_whole_and_keeps_the_connection() {
    on_both_paths(every_framing_on);
}

fn every_framing_on(io: &str) {
    let (port, metrics) = (free_port(), free_port());
    let b = Balancer::start(&with_io(io, metrics, &wire_app(port, 2)));
    let pids = b.wait_ready("wire", 2);
    let mut conn = Conn::open(port);

    // Chunked from the worker: whole, on one connection, both workers in turn.
    let mut seen = std::collections::HashSet::new();
    for round in 0..4 {
        let what = format!("chunked #{round}");
        let r = conn.get("/chunked");
        assert_eq!(r.head.status, 200, "{what}: {r:?}");
        r.assert_kept_alive(&what);
        let id = worker_of(&r.text(), &pids);
        assert_eq!(
            r.text(),
            format!("first chunk from {id}\nsecond chunk from {id}\n"),
            "{what}"
        );
        seen.insert(id);
    }
    assert_eq!(seen.len(), 2, "round robin per request: {seen:?}");

    // HEAD: the length GET would have, no body; the next response follows at once.
    conn.write(&request("HEAD", "/length?n=1000", ""));
    let r = conn.response("HEAD", "HEAD /length");
    assert_eq!(r.head.status, 200, "{r:?}");
    if let Some(length) = r.head.header("content-length") {
        assert_eq!(length, "1000", "HEAD: the GET's length (RFC 9110 §9.3.2)");
    }
    assert!(
        conn.buffered().is_empty(),
        "no HEAD body: {:?}",
        conn.buffered()
    );
    r.assert_kept_alive("HEAD");
    let r = conn.get("/length?n=1000");
    assert_eq!(r.head.status, 200, "GET after HEAD: {r:?}");
    assert_eq!(r.body.len(), 1000);
    assert!(r.body.iter().enumerate().all(|(i, b)| *b == length_byte(i)));

    // 204 and 304: no body, no framing header a 204 must not have, the connection carries on.
    let r = conn.get("/no-content");
    assert_eq!(r.head.status, 204, "{r:?}");
    assert!(
        r.head.header("content-length").is_none(),
        "RFC 9110 §8.6: {r:?}"
    );
    assert!(
        r.head.header("transfer-encoding").is_none(),
        "RFC 9112 §6.1: {r:?}"
    );
    assert!(
        conn.buffered().is_empty(),
        "no 204 body: {:?}",
        conn.buffered()
    );
    r.assert_kept_alive("204");
    let r = conn.get("/not-modified");
    assert_eq!(r.head.status, 304, "{r:?}");
    assert_eq!(r.head.header("etag"), Some("\"wire-v1\""), "{r:?}");
    assert!(
        conn.buffered().is_empty(),
        "no 304 body: {:?}",
        conn.buffered()
    );
    r.assert_kept_alive("304");
    let r = conn.get("/after-304");
    assert_eq!(r.head.status, 200, "after 304: {r:?}");
    assert!(r.text().starts_with("ok "), "{r:?}");

    // A large body, every byte in place.
    let r = conn.get("/length?n=3000000");
    assert_eq!(r.head.status, 200);
    r.assert_kept_alive("3 MB");
    assert_eq!(r.body.len(), 3_000_000);
    let wrong = r
        .body
        .iter()
        .enumerate()
        .position(|(i, b)| *b != length_byte(i));
    assert_eq!(wrong, None, "first wrong byte of the 3 MB body");

    // Trailers: the body is whole; the trailer itself a proxy may drop (RFC 9110 §6.5.1; the
    // hyper path does, the client did not send `TE: trailers`), but if it passes it must be
    // the worker's.
    let r = conn.get("/trailers");
    assert_eq!(r.head.status, 200, "{r:?}");
    r.assert_kept_alive("trailers");
    let id = worker_of(&r.text(), &pids);
    assert_eq!(r.text(), format!("trailer body {id}"));
    eprintln!("trailers forwarded: {:?}", r.trailers);
    if let Some((_, sum)) = r.trailers.iter().find(|(n, _)| n == "x-checksum") {
        assert_eq!(*sum, sha256_hex(&r.body), "{r:?}");
    }

    // Early hints: any interim responses are 103s, then the final 200 with its body.
    let r = conn.get("/hints");
    assert_eq!(r.head.status, 200, "{r:?}");
    assert!(r.interim.iter().all(|s| *s == 103), "{r:?}");
    eprintln!("interim responses before /hints: {:?}", r.interim);
    r.assert_kept_alive("hints");
    let id = worker_of(&r.text(), &pids);
    assert_eq!(r.text(), format!("hinted {id}"));

    // Three requests in one write: three responses, in order, each whole.
    let mut pipelined = request("GET", "/length?n=10", "");
    pipelined.extend(request("GET", "/chunked", ""));
    pipelined.extend(request("GET", "/length?n=70000", ""));
    conn.write(&pipelined);
    let first = conn.response("GET", "pipelined 1");
    let second = conn.response("GET", "pipelined 2");
    let third = conn.response("GET", "pipelined 3");
    assert_eq!(first.body.len(), 10, "{first:?}");
    assert!(second.text().starts_with("first chunk from "), "{second:?}");
    assert!(second.text().contains("\nsecond chunk from "), "{second:?}");
    assert_eq!(third.body.len(), 70_000);
    assert!(
        third
            .body
            .iter()
            .enumerate()
            .all(|(i, b)| *b == length_byte(i))
    );
    for (n, r) in [&first, &second, &third].iter().enumerate() {
        assert_eq!(r.head.status, 200, "pipelined {n}: {r:?}");
        r.assert_kept_alive(&format!("pipelined {n}"));
    }

    // The worker closes its connection after each /close-after; the client's carries on, and
    // the requests after it (round robin: both workers) do not land on a closed connection.
    for round in 0..3 {
        let what = format!("close-after #{round}");
        let r = conn.get("/close-after");
        assert_eq!(r.head.status, 200, "{what}: {r:?}");
        r.assert_kept_alive(&what);
        let id = worker_of(&r.text(), &pids);
        assert_eq!(r.text(), format!("closed by {id}"), "{what}");
    }
    let mut seen = std::collections::HashSet::new();
    for round in 0..2 {
        let r = conn.get("/after-close");
        assert_eq!(r.head.status, 200, "after close-after #{round}: {r:?}");
        seen.insert(worker_of(&r.text(), &pids));
    }
    assert_eq!(
        seen.len(),
        2,
        "both workers answered after closing: {seen:?}"
    );
    assert_moved(io, metrics, 1);
}

/// Two requests, after which a keep-alive connection moves to a ring (with io_uring).
fn warm(conn: &mut Conn, pids: &[u32]) {
    for round in 0..2 {
        let r = conn.get("/warm");
        assert_eq!(r.head.status, 200, "warm-up #{round}: {r:?}");
        r.assert_kept_alive("warm-up");
        worker_of(&r.text(), pids);
    }
}

#[test]
fn request_bodies_reach_the_worker_intact() {
    on_both_paths(request_bodies_on);
}

fn request_bodies_on(io: &str) {
    let (port, metrics) = (free_port(), free_port());
    let b = Balancer::start(&with_io(io, metrics, &wire_app(port, 2)));
    let pids = b.wait_ready("wire", 2);
    let body: Vec<u8> = (0..100 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let mut conn = Conn::open(port);
    warm(&mut conn, &pids);

    // A short body, read whole before the request goes to a worker.
    let short = &body[..5000];
    conn.write(&request(
        "POST",
        "/echo",
        &format!("Content-Length: {}\r\n", short.len()),
    ));
    conn.write(short);
    let r = conn.response("POST", "POST /echo, a short body");
    assert_eq!(r.head.status, 200, "{r:?}");
    r.assert_kept_alive("POST with a short body");
    assert_eq!(r.text(), format!("{} {}", short.len(), sha256_hex(short)));

    // Content-Length: head and body in separate writes.
    conn.write(&request(
        "POST",
        "/echo",
        &format!("Content-Length: {}\r\n", body.len()),
    ));
    conn.write(&body);
    let r = conn.response("POST", "POST /echo, Content-Length");
    assert_eq!(r.head.status, 200, "{r:?}");
    r.assert_kept_alive("POST with a length");
    assert_eq!(r.text(), format!("{} {}", body.len(), sha256_hex(&body)));

    // Chunked, a chunk per write, one with an extension (RFC 9112 §7.1.1), a trailer at the end.
    conn.write(&request("POST", "/echo", "Transfer-Encoding: chunked\r\n"));
    let mut sent = 0;
    for (n, size) in [1, 4096, 30_000, 7, 65_536, 2_760].into_iter().enumerate() {
        let chunk = &body[sent..sent + size];
        let extension = if n == 2 { ";name=value" } else { "" };
        let mut bytes = format!("{size:x}{extension}\r\n").into_bytes();
        bytes.extend_from_slice(chunk);
        bytes.extend_from_slice(b"\r\n");
        conn.write(&bytes);
        sent += size;
        std::thread::sleep(Duration::from_millis(5));
    }
    conn.write(b"0\r\nX-Upload-Done: yes\r\n\r\n");
    let r = conn.response("POST", "POST /echo, chunked");
    assert_eq!(r.head.status, 200, "{r:?}");
    r.assert_kept_alive("chunked POST");
    assert_eq!(r.text(), format!("{sent} {}", sha256_hex(&body[..sent])));

    // Expect: 100-continue: the 100 comes before the body is sent, then the answer.
    conn.write(&request(
        "POST",
        "/echo",
        &format!("Content-Length: {}\r\nExpect: 100-continue\r\n", body.len()),
    ));
    let interim = conn.head("100-continue");
    assert!(
        interim.status_line.starts_with("HTTP/1.1 100"),
        "100 Continue first: {interim:?}"
    );
    conn.write(&body);
    let r = conn.response("POST", "POST /echo after 100 Continue");
    assert_eq!(r.head.status, 200, "{r:?}");
    r.assert_kept_alive("POST after 100 Continue");
    assert_eq!(r.text(), format!("{} {}", body.len(), sha256_hex(&body)));

    // The bodies ended where they should: the connection still frames requests right.
    let r = conn.get("/after-bodies");
    assert_eq!(r.head.status, 200, "{r:?}");
    assert!(r.text().starts_with("ok "), "{r:?}");
    worker_of(&r.text(), &pids);
    assert_moved(io, metrics, 1);
}

#[test]
fn connections_close_when_the_client_or_the_request_says_so() {
    on_both_paths(connections_close_on);
}

fn connections_close_on(io: &str) {
    let (port, raw_port, metrics) = (free_port(), free_port(), free_port());
    let toml = wire_app(port, 2)
        + &app_toml(
            "raw",
            "raw_close.py",
            &format!("http://127.0.0.1:{raw_port}"),
            1,
            "",
        );
    let b = Balancer::start(&with_io(io, metrics, &toml));
    let pids = b.wait_ready("wire", 2);
    b.wait_ready("raw", 1);

    // `Connection: close` from the client: one response, then EOF; on a fresh connection and
    // on one that has served (with io_uring, moved to a ring).
    let mut conn = Conn::open(port);
    conn.write(&request("GET", "/bye", "Connection: close\r\n"));
    let r = conn.response("GET", "Connection: close, first request");
    assert_eq!(r.head.status, 200, "{r:?}");
    conn.assert_eof("after Connection: close, first request");
    let mut conn = Conn::open(port);
    warm(&mut conn, &pids);
    conn.write(&request("GET", "/bye", "Connection: close\r\n"));
    let r = conn.response("GET", "Connection: close");
    assert_eq!(r.head.status, 200, "{r:?}");
    worker_of(&r.text(), &pids);
    conn.assert_eof("after Connection: close");

    // HTTP/1.0 without keep-alive: an HTTP/1.x response, never chunked (RFC 9112 §6.1), then
    // EOF; a chunked worker response is re-framed for it.
    for (path, served) in [("/old", false), ("/chunked", false), ("/chunked", true)] {
        let what = format!("HTTP/1.0 GET {path}, after HTTP/1.1 requests: {served}");
        let mut conn = Conn::open(port);
        if served {
            warm(&mut conn, &pids);
        }
        conn.write(format!("GET {path} HTTP/1.0\r\nHost: wire.test\r\n\r\n").as_bytes());
        let r = conn.response("GET", &what);
        assert_eq!(r.head.status, 200, "{what}: {r:?}");
        assert!(
            r.head.header("transfer-encoding").is_none(),
            "{what}: {r:?}"
        );
        let id = worker_of(&r.text(), &pids);
        let expected = match path {
            "/old" => format!("ok {id}"),
            _ => format!("first chunk from {id}\nsecond chunk from {id}\n"),
        };
        assert_eq!(r.text(), expected, "{what}");
        if r.framing != Framing::Close {
            conn.assert_eof(&what);
        }
    }

    // Not HTTP at all: 400, then the connection closes; at once, or after requests served.
    for served in [false, true] {
        let mut conn = Conn::open(port);
        if served {
            warm(&mut conn, &pids);
        }
        conn.write(b"GARBAGE\r\n\r\n");
        let r = conn.response("GET", "garbage");
        assert!(
            r.head.status_line.starts_with("HTTP/1.1 400"),
            "garbage after requests: {served}: {r:?}"
        );
        if r.framing != Framing::Close {
            conn.assert_eof("after the 400");
        }
    }

    // A close-delimited worker response: the body is whole however the proxy frames it, and
    // the next request (the worker closed that connection) is answered as well.
    let expected = raw_close_body();
    let mut conn = Conn::open(raw_port);
    for round in 0..2 {
        let what = format!("close-delimited #{round}");
        let r = conn.get("/raw");
        assert_eq!(r.head.status, 200, "{what}: {:?}", r.head);
        assert_eq!(r.body.len(), expected.len(), "{what}: {:?}", r.head);
        assert!(r.body == expected, "{what}: the body, byte for byte");
        eprintln!("{what}: framed as {:?}", r.framing);
        if r.framing == Framing::Close || r.head.says_close() {
            if r.framing != Framing::Close {
                conn.assert_eof(&what);
            }
            conn = Conn::open(raw_port);
        }
    }
    assert_moved(io, metrics, 3);
}
