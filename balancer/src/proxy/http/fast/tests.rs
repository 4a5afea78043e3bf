//! The fast path against stand-in workers on loopback: raw sockets on both sides (no hyper), so
//! the tests see every byte the client gets and every request a worker gets, and each wait is
//! bounded by [`WAIT`], so a broken path fails instead of hanging.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use balancer_workers::{Pool, WorkerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Handoff, serve};
use crate::proxy::http::HttpProxy;
use crate::proxy::{Route, RouteSettings, ServeContext};

/// The bound on every wait: far past what loopback needs, short enough to fail a hang quickly.
const WAIT: Duration = Duration::from_secs(5);

/// The route's `queue_timeout`: the 503 test waits this long.
const QUEUE_TIMEOUT: Duration = Duration::from_millis(200);

/// The fast path's raw 502, byte for byte (`HttpProxyError::write_raw`).
const BAD_GATEWAY: &str = "HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain; charset=utf-8\r\n\
                           content-length: 45\r\n\r\n502 bad gateway: the worker failed to answer\n";
/// The same, for a connection that closes after it.
const BAD_GATEWAY_CLOSING: &str = "HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain; \
    charset=utf-8\r\ncontent-length: 45\r\nconnection: close\r\n\r\n\
    502 bad gateway: the worker failed to answer\n";

/// The chunked response of [`Mode::Chunked`], as the worker writes it and the client must get it.
const CHUNKED: &[&str] = &[
    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    "6\r\n world\r\n",
    "0\r\n\r\n",
];

/// What a stand-in worker does with each request it has read whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `200` with `w<id>` as its body, keeping the connection.
    Answer,
    /// Closes without a byte of response: a worker that died on the request.
    Close,
    /// Answers as `Answer` (keep-alive), then closes: a worker's idle close of a kept connection.
    AnswerThenClose,
    /// Says so on `arrived`, waits for `release`, then answers as `Answer`.
    Hold,
    /// Answers with [`CHUNKED`], one write per piece, apart in time so the proxy reads them apart.
    Chunked,
    /// Writes these bytes in one write, keeping the connection.
    Reply(&'static str),
    /// Writes these bytes in one write, then closes.
    ReplyThenClose(&'static str),
}

/// A worker on loopback that counts what it sees.
struct Stand {
    id: u32,
    addr: SocketAddr,
    /// Read per request, so a test can change it between requests.
    mode: Mutex<Mode>,
    /// Connections accepted.
    accepts: AtomicUsize,
    /// Connections this side closed.
    closed: AtomicUsize,
    /// Every request read, head and body, as the proxy sent it.
    requests: Mutex<Vec<Vec<u8>>>,
    arrived: Notify,
    release: Notify,
}

impl Stand {
    /// Starts a stand-in worker; it serves until the test's runtime ends.
    async fn start(id: u32, mode: Mode) -> Arc<Stand> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stand = Arc::new(Stand {
            id,
            addr: listener.local_addr().unwrap(),
            mode: Mutex::new(mode),
            accepts: AtomicUsize::new(0),
            closed: AtomicUsize::new(0),
            requests: Mutex::default(),
            arrived: Notify::new(),
            release: Notify::new(),
        });
        let serving = Arc::clone(&stand);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                serving.accepts.fetch_add(1, Ordering::SeqCst);
                let serving = Arc::clone(&serving);
                tokio::spawn(async move {
                    Arc::clone(&serving).connection(stream).await;
                    serving.closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        stand
    }

    /// The pool's view of this worker.
    fn handle(&self) -> Arc<WorkerHandle> {
        Arc::new(WorkerHandle::new(
            self.id,
            self.id,
            1000 + self.id,
            vec![self.addr],
        ))
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    /// Waits until this side has closed `n` connections: their FINs are then on the proxy's
    /// sockets (loopback delivers at the close), and one more park lets the reactor see them.
    async fn closed(&self, n: usize) {
        timeout(WAIT, async {
            while self.closed.load(Ordering::SeqCst) < n {
                sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the stand-in closed its connection");
        sleep(Duration::from_millis(1)).await;
    }

    fn requests(&self) -> Vec<Vec<u8>> {
        self.requests.lock().unwrap().clone()
    }

    async fn connection(self: Arc<Self>, mut stream: TcpStream) {
        let mut buf = Vec::new();
        while let Some(request) = read_message(&mut stream, &mut buf).await {
            self.requests.lock().unwrap().push(request);
            let mode = *self.mode.lock().unwrap();
            let body = format!("w{}", self.id);
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            match mode {
                Mode::Answer => {}
                Mode::Close => return,
                Mode::AnswerThenClose => {
                    let _ = stream.write_all(answer.as_bytes()).await;
                    return;
                }
                Mode::Hold => {
                    self.arrived.notify_one();
                    self.release.notified().await;
                }
                Mode::Chunked => {
                    for piece in CHUNKED {
                        if stream.write_all(piece.as_bytes()).await.is_err() {
                            return;
                        }
                        sleep(Duration::from_millis(10)).await;
                    }
                    continue;
                }
                Mode::ReplyThenClose(bytes) => {
                    let _ = stream.write_all(bytes.as_bytes()).await;
                    return;
                }
                Mode::Reply(bytes) => {
                    if stream.write_all(bytes.as_bytes()).await.is_err() {
                        return;
                    }
                    continue;
                }
            }
            if stream.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}

/// Where `needle` first starts in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The `Content-Length` of a head (0 without one).
fn content_length(head: &[u8]) -> usize {
    String::from_utf8_lossy(head)
        .split("\r\n")
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, value)| value.trim().parse().unwrap())
}

/// Reads one message framed by `Content-Length` (or bodiless) from `stream`, with `buf` holding
/// what was read before and keeping what comes after; `None` at EOF or an error.
async fn read_message(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let whole = end + 4 + content_length(&buf[..end + 4]);
            if buf.len() >= whole {
                return Some(buf.drain(..whole).collect());
            }
        }
        let mut chunk = [0; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A response as the client read it.
struct Response {
    raw: String,
}

impl Response {
    fn status(&self) -> u16 {
        self.raw
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status line: {:?}", self.raw))
    }

    /// The value of the field `name` (any case), if the head has it.
    fn field(&self, name: &str) -> Option<&str> {
        let head = &self.raw[..self.raw.find("\r\n\r\n").unwrap()];
        head.split("\r\n")
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    }

    fn body(&self) -> &str {
        &self.raw[self.raw.find("\r\n\r\n").unwrap() + 4..]
    }
}

/// The client end of a connection the fast path serves.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn send(&mut self, bytes: &[u8]) {
        timeout(WAIT, self.stream.write_all(bytes))
            .await
            .expect("write timed out")
            .unwrap();
    }

    /// The next response (framed by `Content-Length`).
    async fn response(&mut self) -> Response {
        let raw = timeout(WAIT, read_message(&mut self.stream, &mut self.buf))
            .await
            .expect("no response in time")
            .expect("the connection closed before a response");
        Response {
            raw: String::from_utf8(raw).unwrap(),
        }
    }

    /// Sends a request and reads its response.
    async fn ask(&mut self, request: &str) -> Response {
        self.send(request.as_bytes()).await;
        self.response().await
    }

    /// Exactly the next `n` bytes.
    async fn exact(&mut self, n: usize) -> Vec<u8> {
        let mut chunk = [0; 4096];
        while self.buf.len() < n {
            let read = timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .expect("no bytes in time")
                .unwrap();
            assert_ne!(
                read,
                0,
                "EOF after {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..read]);
        }
        self.buf.drain(..n).collect()
    }

    /// Asserts that the proxy closes the connection with nothing more to say.
    async fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        let read = timeout(WAIT, self.stream.read_to_end(&mut rest))
            .await
            .expect("the proxy kept the connection open");
        assert!(read.is_ok(), "{read:?}");
        assert!(
            self.buf.is_empty() && rest.is_empty(),
            "bytes after the response: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
}

/// A proxy over `workers`, as an HTTP listener builds it.
/// Stand-in workers 0, 1, … in `modes`, their pool handles, and a proxy over them.
async fn stands_in(modes: &[Mode]) -> (Vec<Arc<Stand>>, Vec<Arc<WorkerHandle>>, Arc<HttpProxy>) {
    let mut stands = Vec::new();
    for (id, mode) in (0..).zip(modes) {
        stands.push(Stand::start(id, *mode).await);
    }
    let workers: Vec<_> = stands.iter().map(|s| s.handle()).collect();
    let proxy = proxy_over(&workers);
    (stands, workers, proxy)
}

/// Keep-alive connections stay on epoll (see [`ring_proxy_over`]).
fn proxy_over(workers: &[Arc<WorkerHandle>]) -> Arc<HttpProxy> {
    Arc::new(proxy_with(workers).pin_rings(false))
}

/// A proxy whose keep-alive connections move to an io_uring ring after two requests; `None`
/// (and says so) where the kernel refuses rings.
fn ring_proxy_over(workers: &[Arc<WorkerHandle>]) -> Option<Arc<HttpProxy>> {
    if let Err(e) = crate::proxy::uring::available() {
        eprintln!("io_uring is refused here ({e}): skipped");
        return None;
    }
    Some(Arc::new(proxy_with(workers).pin_rings(true)))
}

fn proxy_with(workers: &[Arc<WorkerHandle>]) -> HttpProxy {
    let pool = Arc::new(Pool::new());
    for worker in workers {
        pool.insert(Arc::clone(worker));
    }
    let settings = RouteSettings {
        connect_timeout: Duration::from_secs(2),
        queue_timeout: QUEUE_TIMEOUT,
        ..RouteSettings::default()
    };
    HttpProxy::new(&ServeContext {
        budget: crate::proxy::unlimited_budget(),
        route: Arc::new(Route::new("fast-test", pool, settings)),
        stop: CancellationToken::new(),
        abort: CancellationToken::new(),
        tracker: TaskTracker::new(),
    })
}

/// A client connected to the proxy, and the task running [`serve`] on the accepted end.
async fn connect(proxy: &Arc<HttpProxy>) -> (Client, JoinHandle<Option<Handoff>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stream = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, peer) = timeout(WAIT, listener.accept()).await.unwrap().unwrap();
    let proxy = Arc::clone(proxy);
    let served = tokio::spawn(async move { serve(&proxy, accepted, peer, Instant::now()).await });
    let client = Client {
        stream,
        buf: Vec::new(),
    };
    (client, served)
}

/// What `serve` returned.
async fn served(task: JoinHandle<Option<Handoff>>) -> Option<Handoff> {
    timeout(WAIT, task)
        .await
        .expect("serve did not return")
        .unwrap()
}

/// Waits, bounded, until `done` holds.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + WAIT;
    while !done() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        sleep(Duration::from_millis(2)).await;
    }
}

const GET: &str = "GET / HTTP/1.1\r\nHost: t\r\n\r\n";
const POST: &str = "POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello";

#[tokio::test]
async fn a_get_two_workers_dropped_unanswered_is_sent_again_and_answered_by_the_third() {
    let (stands, _workers, proxy) = stands_in(&[Mode::Close, Mode::Close, Mode::Answer]).await;
    let (mut client, _served) = connect(&proxy).await;

    let response = client.ask(GET).await;
    assert_eq!((response.status(), response.body()), (200, "w2"));
    // Each worker got the request once: two resends, no more.
    for stand in &stands {
        assert_eq!(stand.requests().len(), 1, "worker {}", stand.id);
    }
}

#[tokio::test]
async fn a_get_three_workers_dropped_is_a_raw_502_and_the_connection_serves_on() {
    let (stands, workers, proxy) =
        stands_in(&[Mode::Close, Mode::Close, Mode::Close, Mode::Answer]).await;
    let (mut client, _served) = connect(&proxy).await;

    // Round robin starts at worker 0: 0, 1 and 2 fail it, and MAX_RESENDS is spent before 3.
    let response = client.ask(GET).await;
    assert_eq!(response.raw, BAD_GATEWAY);
    let seen: Vec<_> = stands.iter().map(|s| s.requests().len()).collect();
    assert_eq!(seen, [1, 1, 1, 0]);
    // A failed request holds no worker.
    assert!(workers.iter().all(|w| w.live() == 0));

    // The 502 did not close the connection; the next request starts at worker 1 and, after
    // two resends, gets to worker 3.
    let response = client.ask(GET).await;
    assert_eq!((response.status(), response.body()), (200, "w3"));
    let seen: Vec<_> = stands.iter().map(|s| s.requests().len()).collect();
    assert_eq!(seen, [1, 2, 2, 1]);
}

#[tokio::test]
async fn a_post_a_worker_dropped_unanswered_is_a_502_and_never_sent_again() {
    let (stands, workers, proxy) = stands_in(&[Mode::Close, Mode::Answer]).await;
    let (mut client, _served) = connect(&proxy).await;

    let response = client.ask(POST).await;
    assert_eq!(response.raw, BAD_GATEWAY);
    // Worker 0 got the whole POST; worker 1, which would have answered, never saw it.
    let got = stands[0].requests();
    assert_eq!(got.len(), 1);
    assert!(got[0].starts_with(b"POST /p HTTP/1.1\r\n") && got[0].ends_with(b"\r\n\r\nhello"));
    assert!(stands[1].requests().is_empty());
    assert!(workers.iter().all(|w| w.live() == 0));

    // The connection goes on: the next request is worker 1's turn.
    let response = client.ask(GET).await;
    assert_eq!((response.status(), response.body()), (200, "w1"));
    let got = stands[1].requests();
    assert_eq!(got.len(), 1);
    assert!(got[0].starts_with(b"GET / HTTP/1.1\r\n"));
}

#[tokio::test]
async fn a_refused_connect_goes_to_the_next_worker_even_for_a_post() {
    // Nothing listens where worker 0 is said to be.
    let refused = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let stand = Stand::start(1, Mode::Answer).await;
    let workers = [
        Arc::new(WorkerHandle::new(0, 0, 999, vec![refused])),
        stand.handle(),
    ];
    let proxy = proxy_over(&workers);
    let (mut client, _served) = connect(&proxy).await;

    let response = client.ask(POST).await;
    assert_eq!((response.status(), response.body()), (200, "w1"));
    // The POST went out once, whole, with its head written anew for the worker.
    let got = stand.requests();
    assert_eq!(got.len(), 1);
    let got = String::from_utf8(got[0].clone()).unwrap();
    assert!(got.starts_with("POST /p HTTP/1.1\r\nHost: t\r\n"), "{got}");
    assert!(got.contains("\r\nx-forwarded-for: 127.0.0.1\r\n"), "{got}");
    assert!(got.ends_with("\r\n\r\nhello"), "{got}");
}

#[tokio::test]
async fn an_empty_pool_is_a_503_after_queue_timeout_and_the_connection_serves_on() {
    let proxy = proxy_over(&[]);
    let (mut client, _served) = connect(&proxy).await;

    let asked = std::time::Instant::now();
    let response = client.ask(GET).await;
    let waited = asked.elapsed();
    assert_eq!(response.status(), 503);
    assert!(
        response
            .raw
            .starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{}",
        response.raw
    );
    assert_eq!(response.field("retry-after"), Some("1"));
    assert_eq!(response.field("connection"), None);
    assert_eq!(
        response.body(),
        "503 service unavailable: no worker is ready\n"
    );
    assert!(waited >= QUEUE_TIMEOUT, "answered after {waited:?}");

    // The client may ask again on the same connection, and a worker that joined answers.
    let stand = Stand::start(0, Mode::Answer).await;
    proxy.route.pool.insert(stand.handle());
    let response = client.ask(GET).await;
    assert_eq!((response.status(), response.body()), (200, "w0"));
}

#[tokio::test]
async fn a_worker_connection_is_reused_and_one_the_worker_closed_is_not() {
    let stand = Stand::start(0, Mode::Answer).await;
    let proxy = proxy_over(&[stand.handle()]);
    kept_connections_are_reused(&proxy, &stand, 2, 1).await;
}

/// `gets` GETs on one client connection are served by `conns` worker connections (one per
/// pool: a connection moved to a ring uses the rings' own), then a kept connection the worker
/// closed is never handed out.
async fn kept_connections_are_reused(
    proxy: &Arc<HttpProxy>,
    stand: &Stand,
    gets: usize,
    conns: usize,
) {
    let (mut client, _served) = connect(proxy).await;

    for _ in 0..gets {
        let response = client.ask(GET).await;
        assert_eq!((response.status(), response.body()), (200, "w0"));
    }
    assert_eq!(stand.requests().len(), gets);
    assert_eq!(stand.accepts(), conns, "the kept connection was not reused");

    // The worker answers on the kept connection (keep-alive) and then closes it.
    stand.set(Mode::AnswerThenClose);
    let response = client.ask(GET).await;
    assert_eq!((response.status(), response.body()), (200, "w0"));
    stand.set(Mode::Answer);
    stand.closed(1).await;

    // A POST is not sent again after a failure, so it shows whether the pool handed out the
    // closed connection: a 502 if it did.
    let response = client.ask(POST).await;
    assert_eq!((response.status(), response.body()), (200, "w0"));
    assert_eq!(stand.accepts(), conns + 1);
    let got = stand.requests();
    assert_eq!(got.len(), gets + 2);
    assert!(got[gets + 1].starts_with(b"POST /p HTTP/1.1\r\n"));
}

#[tokio::test]
async fn a_request_counts_against_its_worker_until_its_response_is_written() {
    let stand = Stand::start(0, Mode::Hold).await;
    let worker = stand.handle();
    let proxy = proxy_over(&[Arc::clone(&worker)]);
    let (mut client, _served) = connect(&proxy).await;
    assert_eq!(worker.live(), 0);

    client.send(GET.as_bytes()).await;
    timeout(WAIT, stand.arrived.notified())
        .await
        .expect("the request never reached the worker");
    assert_eq!(worker.live(), 1);

    stand.release.notify_one();
    let response = client.response().await;
    assert_eq!((response.status(), response.body()), (200, "w0"));
    // The guard drops just after the last byte is written: soon after the client has it.
    eventually("the worker's live count back at 0", || worker.live() == 0).await;
    // The kept connection does not count.
    assert_eq!(stand.accepts(), 1);
}

#[tokio::test]
async fn a_chunked_response_passes_through_byte_for_byte_and_keeps_the_connection() {
    let stand = Stand::start(0, Mode::Chunked).await;
    let proxy = proxy_over(&[stand.handle()]);
    let (mut client, _served) = connect(&proxy).await;

    client.send(GET.as_bytes()).await;
    let want = CHUNKED.concat();
    let got = client.exact(want.len()).await;
    assert_eq!(String::from_utf8_lossy(&got), want);

    // The body's end was found exactly: the next response starts right after it (anything
    // left over would garble it), over the same worker connection.
    stand.set(Mode::Answer);
    let response = client.ask(GET).await;
    assert_eq!((response.status(), response.body()), (200, "w0"));
    assert_eq!(stand.requests().len(), 2);
    assert_eq!(stand.accepts(), 1);
}

#[tokio::test]
async fn long_bodies_go_through_whole_however_they_arrive() {
    // The longest body the fast path buffers, its head and body in writes apart in time.
    let sent: String = (0..super::head::MAX_BUFFERED_BODY)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    // A response many buffers long, so it is passed on read by read.
    let long: String = (0..1 << 20)
        .map(|i| char::from(b'A' + (i % 26) as u8))
        .collect();
    let reply = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{long}",
        long.len()
    );
    let stand = Stand::start(0, Mode::Reply(reply.leak())).await;
    let proxy = proxy_over(&[stand.handle()]);
    let (mut client, _served) = connect(&proxy).await;

    let head = format!(
        "PUT /big HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        sent.len()
    );
    client.send(head.as_bytes()).await;
    sleep(Duration::from_millis(10)).await;
    client.send(&sent.as_bytes()[..100]).await;
    sleep(Duration::from_millis(10)).await;
    client.send(&sent.as_bytes()[100..]).await;
    let response = client.response().await;
    assert_eq!(response.status(), 200);
    assert!(
        response.body() == long,
        "the long response came through changed"
    );
    let got = stand.requests();
    assert_eq!(got.len(), 1);
    assert!(got[0].ends_with(format!("\r\n\r\n{sent}").as_bytes()));

    // Both ends of both bodies were found: the connections go on.
    stand.set(Mode::Answer);
    let response = client.ask(GET).await;
    assert_eq!((response.status(), response.body()), (200, "w0"));
    assert_eq!(stand.accepts(), 1);
}

#[tokio::test]
async fn a_worker_connection_with_bytes_past_its_response_is_not_reused() {
    // An unasked second response right behind the first, in the same write.
    let stand = Stand::start(
        0,
        Mode::Reply(
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nw0\
             HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstale",
        ),
    )
    .await;
    let proxy = proxy_over(&[stand.handle()]);
    let (mut client, _served) = connect(&proxy).await;

    let response = client.ask(GET).await;
    assert_eq!((response.status(), response.body()), (200, "w0"));
    // The stray bytes went neither to the client nor, with their connection, to the next request.
    stand.set(Mode::Answer);
    let response = client.ask(GET).await;
    assert_eq!((response.status(), response.body()), (200, "w0"));
    assert_eq!(stand.accepts(), 2);
}

#[tokio::test]
async fn an_interim_response_goes_before_the_final_one_and_an_unasked_101_is_a_502() {
    let early = "HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n";
    let reply = format!("{early}HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nw0");
    let stand = Stand::start(0, Mode::Reply(reply.leak())).await;
    let worker = stand.handle();
    let proxy = proxy_over(&[Arc::clone(&worker)]);
    let (mut client, _served) = connect(&proxy).await;

    client.send(GET.as_bytes()).await;
    assert_eq!(
        String::from_utf8(client.exact(early.len()).await).unwrap(),
        early
    );
    let response = client.response().await;
    assert_eq!((response.status(), response.body()), (200, "w0"));

    // A 101 to a request that asked for no upgrade cannot be passed on, nor sent elsewhere.
    stand.set(Mode::Reply(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
    ));
    let response = client.ask(GET).await;
    assert_eq!(response.raw, BAD_GATEWAY);
    assert_eq!(stand.requests().len(), 2);
    eventually("the worker's live count back at 0", || worker.live() == 0).await;
}

#[tokio::test]
async fn a_body_that_ends_at_the_workers_close_ends_the_client_connection_too() {
    let stand = Stand::start(
        0,
        Mode::ReplyThenClose("HTTP/1.1 200 OK\r\nx-a: 1\r\n\r\nbody until close"),
    )
    .await;
    let proxy = proxy_over(&[stand.handle()]);
    let (mut client, served_task) = connect(&proxy).await;

    client.send(GET.as_bytes()).await;
    // The client cannot tell where such a body ends but by the close, so it is told so.
    let want = "HTTP/1.1 200 OK\r\nx-a: 1\r\nconnection: close\r\n\r\nbody until close";
    assert_eq!(
        String::from_utf8(client.exact(want.len()).await).unwrap(),
        want
    );
    client.expect_eof().await;
    assert!(served(served_task).await.is_none());
}

/// A worker that sends an interim head and then dies: the client still gets a final 502, and
/// the connection closes (the worker's state after a 1xx is unknown).
#[tokio::test]
async fn a_worker_that_fails_after_an_interim_response_is_still_a_502() {
    let early = "HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n";
    let stand = Stand::start(0, Mode::ReplyThenClose(early)).await;
    let proxy = proxy_over(&[stand.handle()]);
    let (mut client, _served) = connect(&proxy).await;

    client.send(GET.as_bytes()).await;
    assert_eq!(
        String::from_utf8(client.exact(early.len()).await).unwrap(),
        early
    );
    let response = client.response().await;
    assert_eq!(response.raw, BAD_GATEWAY_CLOSING);
    client.expect_eof().await;
}

/// A 101 nobody asked for is a 502 after a 1xx too, not passed on as one more interim head.
#[tokio::test]
async fn an_unasked_101_after_an_interim_response_is_a_502() {
    let stand = Stand::start(
        0,
        Mode::Reply(
            "HTTP/1.1 100 Continue\r\n\r\n\
             HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        ),
    )
    .await;
    let proxy = proxy_over(&[stand.handle()]);
    let (mut client, _served) = connect(&proxy).await;

    client.send(GET.as_bytes()).await;
    let interim = "HTTP/1.1 100 Continue\r\n\r\n";
    assert_eq!(
        String::from_utf8(client.exact(interim.len()).await).unwrap(),
        interim
    );
    let response = client.response().await;
    assert_eq!(response.raw, BAD_GATEWAY_CLOSING);
    client.expect_eof().await;
}

#[tokio::test]
async fn requests_the_fast_path_does_not_carry_go_to_hyper_with_their_bytes() {
    let chunked_post =
        "POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    for request in ["GET / HTTP/1.0\r\n\r\n", chunked_post] {
        let stand = Stand::start(0, Mode::Answer).await;
        let proxy = proxy_over(&[stand.handle()]);
        let (mut client, served_task) = connect(&proxy).await;
        client.send(request.as_bytes()).await;
        let handoff = served(served_task)
            .await
            .unwrap_or_else(|| panic!("no handoff for {request:?}"));
        assert!(
            handoff.buffered.starts_with(request.as_bytes()),
            "{request:?}: {:?}",
            String::from_utf8_lossy(&handoff.buffered)
        );
        assert!(!handoff.h2);
        // The socket handed over is the client's.
        assert_eq!(
            handoff.stream.peer_addr().unwrap(),
            client.stream.local_addr().unwrap()
        );
        assert!(stand.requests().is_empty(), "{request:?} reached a worker");
    }
}

#[tokio::test]
async fn a_request_after_served_ones_goes_to_hyper_without_the_served_bytes() {
    let stand = Stand::start(0, Mode::Answer).await;
    let proxy = proxy_over(&[stand.handle()]);
    let (mut client, served_task) = connect(&proxy).await;
    // Pipelined: the fast path serves the GET, then meets the HTTP/1.0 request.
    let old = "GET /old HTTP/1.0\r\n\r\n";
    client.send(format!("{GET}{old}").as_bytes()).await;
    let response = client.response().await;
    assert_eq!((response.status(), response.body()), (200, "w0"));
    let handoff = served(served_task).await.expect("no handoff");
    assert_eq!(String::from_utf8_lossy(&handoff.buffered), old);
    assert!(!handoff.h2);
    assert_eq!(stand.requests().len(), 1);
}

#[tokio::test]
async fn an_http2_preface_goes_to_hyper_as_h2() {
    let proxy = proxy_over(&[]);
    let (mut client, served_task) = connect(&proxy).await;
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    client.send(preface).await;
    let handoff = served(served_task).await.expect("no handoff");
    assert!(handoff.h2);
    assert!(handoff.buffered.starts_with(preface));
}

#[tokio::test]
async fn connection_close_is_answered_with_it_and_the_connection_closed() {
    let stand = Stand::start(0, Mode::Answer).await;
    let proxy = proxy_over(&[stand.handle()]);
    let (mut client, served_task) = connect(&proxy).await;

    let response = client
        .ask("GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!((response.status(), response.body()), (200, "w0"));
    assert_eq!(response.field("connection"), Some("close"));
    assert!(served(served_task).await.is_none());
    client.expect_eof().await;
    // The worker saw no `Connection` field: it is hop-by-hop.
    let got = String::from_utf8(stand.requests()[0].clone()).unwrap();
    assert!(
        !got.to_ascii_lowercase().contains("\r\nconnection:"),
        "{got}"
    );
}

// On an io_uring ring: a keep-alive connection moves there after its second response, and
// the same contract holds.

/// Two GETs answered, after which the connection is on a ring.
async fn warm(client: &mut Client, bodies: &[&str]) {
    for body in bodies {
        let response = client.ask(GET).await;
        assert_eq!((response.status(), response.body()), (200, *body));
    }
}

#[tokio::test]
async fn on_a_ring_worker_connections_are_reused_and_one_the_worker_closed_is_not() {
    let stand = Stand::start(0, Mode::Answer).await;
    let Some(proxy) = ring_proxy_over(&[stand.handle()]) else {
        return;
    };
    // Two requests on epoll's pool, five on the ring's.
    kept_connections_are_reused(&proxy, &stand, 7, 2).await;
    assert_eq!(proxy.moved_to_rings(), 1);
}

#[tokio::test]
async fn on_a_ring_a_dropped_get_is_sent_again_and_a_dropped_post_is_a_raw_502() {
    let stands = [
        Stand::start(0, Mode::Answer).await,
        Stand::start(1, Mode::Answer).await,
        Stand::start(2, Mode::Answer).await,
    ];
    let workers: Vec<_> = stands.iter().map(|s| s.handle()).collect();
    let Some(proxy) = ring_proxy_over(&workers) else {
        return;
    };
    let (mut client, _served) = connect(&proxy).await;
    warm(&mut client, &["w0", "w1"]).await;
    // Round robin goes on with worker 2: it and worker 0 drop the GET, worker 1 answers.
    stands[2].set(Mode::Close);
    stands[0].set(Mode::Close);
    let response = client.ask(GET).await;
    assert_eq!((response.status(), response.body()), (200, "w1"));
    let counts: Vec<usize> = stands.iter().map(|s| s.requests().len()).collect();
    assert_eq!(counts, [2, 2, 1], "one resend to each of two workers");

    // Every worker drops a POST: one try, a 502, and the connection serves on.
    for stand in &stands {
        stand.set(Mode::Close);
    }
    let response = client.ask(POST).await;
    assert_eq!(response.raw, BAD_GATEWAY);
    let posts: usize = stands
        .iter()
        .flat_map(|s| s.requests())
        .filter(|r| r.starts_with(b"POST"))
        .count();
    assert_eq!(posts, 1, "a POST is never sent again");
    stands[1].set(Mode::Answer);
    stands[2].set(Mode::Answer);
    stands[0].set(Mode::Answer);
    let response = client.ask(GET).await;
    assert_eq!(response.status(), 200, "{:?}", response.raw);
}

#[tokio::test]
async fn on_a_ring_chunked_and_long_bodies_pass_byte_for_byte() {
    let stand = Stand::start(0, Mode::Answer).await;
    let Some(proxy) = ring_proxy_over(&[stand.handle()]) else {
        return;
    };
    let (mut client, _served) = connect(&proxy).await;
    warm(&mut client, &["w0", "w0"]).await;
    stand.set(Mode::Chunked);
    client.send(GET.as_bytes()).await;
    let whole: String = CHUNKED.concat();
    let got = client.exact(whole.len()).await;
    assert_eq!(String::from_utf8_lossy(&got), whole);

    // A body past a provided buffer's 16 KiB, and a request body read whole.
    let long = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n{}",
            "x".repeat(100_000)
        )
        .into_boxed_str(),
    );
    stand.set(Mode::Reply(long));
    let response = client.ask(POST).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.body().len(), 100_000);
    stand.set(Mode::Answer);
    let response = client.ask(GET).await;
    assert_eq!((response.status(), response.body()), (200, "w0"));
    assert!(stand.requests()[3].ends_with(b"\r\n\r\nhello"));
}

#[tokio::test]
async fn on_a_ring_a_request_for_hyper_comes_back_with_its_bytes_and_the_socket() {
    let stand = Stand::start(0, Mode::Answer).await;
    let Some(proxy) = ring_proxy_over(&[stand.handle()]) else {
        return;
    };
    let (mut client, served_task) = connect(&proxy).await;
    warm(&mut client, &["w0", "w0"]).await;
    let old = "GET /old HTTP/1.0\r\n\r\n";
    // Pipelined after a GET, as the ring reads them: the GET served there, the rest for hyper.
    client.send(format!("{GET}{old}").as_bytes()).await;
    let response = client.response().await;
    assert_eq!((response.status(), response.body()), (200, "w0"));
    let handoff = served(served_task).await.expect("no handoff");
    assert_eq!(String::from_utf8_lossy(&handoff.buffered), old);
    assert_eq!(
        handoff.stream.peer_addr().unwrap(),
        client.stream.local_addr().unwrap()
    );
    // The socket is the runtime's again: it reads what the client sends next.
    let mut stream = handoff.stream;
    client.send(b"more").await;
    let mut more = [0u8; 4];
    timeout(WAIT, stream.read_exact(&mut more))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&more, b"more");
    assert_eq!(stand.requests().len(), 3);
}

#[tokio::test]
async fn on_a_ring_an_idle_connection_closes_on_stop_and_ends_when_its_owner_is_dropped() {
    let stand = Stand::start(0, Mode::Answer).await;
    let Some(proxy) = ring_proxy_over(&[stand.handle()]) else {
        return;
    };
    let (mut stopped, stopped_task) = connect(&proxy).await;
    warm(&mut stopped, &["w0", "w0"]).await;
    let (mut dropped, dropped_task) = connect(&proxy).await;
    warm(&mut dropped, &["w0", "w0"]).await;
    eventually("both moved to the ring", || proxy.moved_to_rings() == 2).await;
    // The owner's task dropped (the listener's abort): the ring's task ends, the socket closes.
    dropped_task.abort();
    dropped.expect_eof().await;
    // The listener stops: an idle keep-alive connection closes.
    proxy.stop.cancel();
    assert!(served(stopped_task).await.is_none());
    stopped.expect_eof().await;
}
