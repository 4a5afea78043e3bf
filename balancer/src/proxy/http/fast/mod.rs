//! The HTTP/1.1 fast path: one task per client connection owns the client's socket and, for
//! the length of each request, the worker connection it picked, and moves the bytes between
//! them itself: the request head written anew (`head`), the response head written anew, and
//! every body byte passed through as the worker framed it (`framing` finds where it ends).
//!
//! The hyper path (`client`, `HttpProxy::handle`) costs two HTTP state machines and a
//! hand-off between the client's task and the worker connection's per request; this path
//! costs neither. It carries what most traffic is: HTTP/1.1 requests in origin form with no
//! body or a short one (buffered whole, up to [`head::MAX_BUFFERED_BODY`]). At the first request it
//! does not carry (HTTP/1.0, `Upgrade`, `Expect`, chunked or long bodies, a head it cannot
//! parse), the connection goes to hyper for the rest of its life with the bytes read so far
//! ([`Handoff`]), so every other behaviour stays the hyper path's.
//!
//! It keeps the hyper path's contract: round robin per request through [`pick_and_connect`],
//! a [`ConnGuard`](balancer_workers::ConnGuard) from the pick until the response's last byte
//! is written, retries (a refused connect or a failed write goes to the next worker; a worker
//! that failed before answering, for an idempotent request only, at most [`MAX_RESENDS`]
//! times), 502 and 503 answers, the header and idle timeouts, and graceful stop.

mod framing;
mod head;
mod window;

#[cfg(test)]
mod tests;

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};

use super::upstream::{Key, open};
use super::{HttpProxy, HttpProxyError, MAX_RESENDS, Origin, WorkerFailure};
use crate::proxy::copy::BUFFER_SIZE;
use crate::proxy::{Attempt, Pick, RouteSettings, pick_and_connect};
use framing::{BodyScan, Framing};
use head::{Parsed, RequestHead, ResponseHead, parse_request};
use window::Window;

pub use head::BadResponse;

/// A worker's response head may be this long (hyper's client allows about as much).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// What an HTTP/2 client sends first (RFC 9113 §3.4); no HTTP/1 method starts with it.
const H2_PREFACE_START: &[u8] = b"PRI";

/// A connection the fast path leaves to hyper: the socket, the bytes read and not served
/// (the start of the request it does not carry), when that request's head started, and
/// whether the client speaks HTTP/2 (with prior knowledge: "h2c").
pub(super) struct Handoff {
    pub(super) stream: TcpStream,
    pub(super) buffered: Vec<u8>,
    pub(super) head_started: Instant,
    pub(super) h2: bool,
}

/// Serves HTTP/1.1 requests on `stream` from `peer`, accepted at `accepted`, until the
/// connection closes, times out or stops (`None`), or until a request the fast path does not
/// carry (the [`Handoff`]). The caller ends it on `abort`.
pub(super) async fn serve(
    proxy: &HttpProxy,
    stream: TcpStream,
    peer: SocketAddr,
    accepted: Instant,
) -> Option<Handoff> {
    let mut conn = Conn {
        proxy,
        stream,
        peer,
        window: Window::new(),
        request: Vec::new(),
        response: Vec::new(),
    };
    // The first head is timed from the accept: a client that connects says something.
    let mut head_started = Some(accepted);
    let mut idle_since = accepted;
    let mut stopped = false;
    loop {
        let head = match conn
            .next_head(&mut head_started, idle_since, &mut stopped)
            .await
        {
            Next::Head(head) => head,
            Next::Close => return None,
            Next::Hyper(why) => {
                tracing::debug!(peer = %conn.peer, "to hyper: {why}");
                return Some(Handoff {
                    head_started: head_started.unwrap_or_else(Instant::now),
                    buffered: conn.window.into_vec(),
                    stream: conn.stream,
                    h2: why == H2,
                });
            }
        };
        if !conn.read_body(&head).await {
            return None;
        }
        if !conn.exchange(&head).await {
            return None;
        }
        conn.window.consume(head.len + head.body);
        head_started = None;
        idle_since = Instant::now();
    }
}

/// One client connection on the fast path.
struct Conn<'p> {
    proxy: &'p HttpProxy,
    stream: TcpStream,
    peer: SocketAddr,
    /// What the client sent and was not served yet.
    window: Window,
    /// The request as the worker gets it (head written anew, then the body).
    request: Vec<u8>,
    /// A response head as the client gets it.
    response: Vec<u8>,
}

/// What waiting for a request head came to.
enum Next {
    Head(RequestHead),
    /// The client closed or went quiet, or the listener stopped: close.
    Close,
    /// A request for hyper (the reason, for the log; [`H2`] for an HTTP/2 client).
    Hyper(&'static str),
}

/// Why a connection goes to hyper's HTTP/2 server.
const H2: &str = "HTTP/2 preface";

impl Conn<'_> {
    /// Reads until a whole request head is at the start of the window. `head_started` is when
    /// the head began (the header timeout runs from there; the first one from the accept);
    /// with none begun, the connection is idle since `idle_since` (the idle timeout). Before
    /// the first byte of a head it closes on `stop`, unless its master handed over to a
    /// successor: then it answers its next request and closes (`close_keep_alive_on_stop`).
    async fn next_head(
        &mut self,
        head_started: &mut Option<Instant>,
        idle_since: Instant,
        stopped: &mut bool,
    ) -> Next {
        let proxy = self.proxy;
        loop {
            if !self.window.is_empty() {
                head_started.get_or_insert_with(Instant::now);
                let bytes = self.window.bytes();
                if bytes.starts_with(H2_PREFACE_START) {
                    return Next::Hyper(H2);
                }
                match parse_request(bytes, self.peer.ip(), &mut self.request) {
                    Parsed::Fast(head) => return Next::Head(head),
                    Parsed::Hyper(why) => return Next::Hyper(why),
                    Parsed::Partial => {}
                }
            }
            let limits = proxy.route.settings().http;
            let (deadline, timed) = match *head_started {
                Some(at) => (at + limits.header_timeout, "http_header_timeout"),
                None => (idle_since + limits.idle_timeout, ""),
            };
            let quiet = self.window.is_empty();
            // Readiness first, a buffer after: a connection waiting for its client holds none.
            tokio::select! {
                ready = self.stream.readable() => if ready.is_err() {
                    return Next::Close;
                },
                _ = sleep_until(deadline) => {
                    if !timed.is_empty() {
                        tracing::debug!(peer = %self.peer, "request head not received within {timed}; closing");
                    }
                    return Next::Close;
                }
                _ = proxy.stop.cancelled(), if quiet && !*stopped => {
                    *stopped = true;
                    if !super::client::closing_on_next_response() {
                        return Next::Close;
                    }
                    continue;
                }
            }
            // A head longer than the pooled buffer is rare: hyper reads it (and answers 431
            // past `http_max_header_size`).
            let Some(room) = self.window.spare(BUFFER_SIZE) else {
                return Next::Hyper("long head");
            };
            // A short read clears the readiness it saw: no read that only says EAGAIN later.
            match crate::proxy::copy::read_some(&self.stream, room) {
                Ok((0, _)) => return Next::Close,
                Ok((n, _)) => self.window.filled(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.window.is_empty() {
                        self.window.clear();
                    }
                }
                Err(_) => return Next::Close,
            }
        }
    }

    /// Reads the rest of a short body after `head`; false if the client closed first.
    async fn read_body(&mut self, head: &RequestHead) -> bool {
        let whole = head.len + head.body;
        while self.window.len() < whole {
            let Some(room) = self.window.spare(whole) else {
                return false;
            };
            match self.stream.read(room).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => self.window.filled(n),
            }
        }
        self.request
            .extend_from_slice(&self.window.bytes()[head.len..whole]);
        true
    }

    /// Sends the request in `self.request` to a worker and its response to the client.
    /// False when the client connection must close.
    async fn exchange(&mut self, head: &RequestHead) -> bool {
        let started = Instant::now();
        let proxy = self.proxy;
        let method = &head.method;
        let settings = proxy.route.settings();
        // Where the client connected to is asked of the socket only for a PROXY header.
        let header = settings.proxy_protocol.map(|version| {
            let local = self.stream.local_addr().unwrap_or(self.peer);
            crate::proxy::proxy_protocol::encode(version, self.peer, local)
        });
        let close = head.close || proxy.stop.is_cancelled();
        let outgoing = Outgoing {
            bytes: &self.request,
            idempotent: super::is_idempotent(method),
            head_only: *method == hyper::Method::HEAD,
            close,
            origin: Origin {
                client: header.as_ref().map(|_| self.peer),
                header: header.as_deref(),
            },
        };
        let picked = pick_and_connect(
            &proxy.route,
            &settings,
            &proxy.stop,
            self.peer.ip(),
            0u32,
            |pick, resends| proxy.attempt_raw(pick, resends, &outgoing, &settings),
        )
        .await
        .map_err(HttpProxyError::from);
        let (status, keep) = match picked {
            Ok(worker) => {
                proxy
                    .meters
                    .duration
                    .record(started.elapsed().as_secs_f64());
                self.respond(worker, close).await
            }
            Err(e) => {
                proxy.failed(&e, self.peer);
                proxy
                    .meters
                    .duration
                    .record(started.elapsed().as_secs_f64());
                e.write_raw(close, &mut self.response);
                let written = self.stream.write_all(&self.response).await.is_ok();
                (e.status().as_u16(), written && !close)
            }
        };
        proxy.meters.request(method.as_str(), status);
        if !keep {
            let _ = self.stream.shutdown().await;
        }
        keep
    }

    /// Passes the worker's response to the client: any 1xx heads, then the final head and its
    /// body. Gives the worker connection back to the pool if the response ended clean.
    /// Returns the status, and whether the client connection stays open.
    async fn respond(&mut self, mut worker: Upstream, close: bool) -> (u16, bool) {
        let proxy = self.proxy;
        while (100..200).contains(&worker.head.status) {
            if self.stream.write_all(&worker.out).await.is_err() {
                return (worker.head.status, false);
            }
            worker.buf.consume(worker.head.len);
            let id = worker.pick.worker().id;
            let e = match worker.read_head().await {
                Ok(next) if next.status != 101 => {
                    worker.head = next;
                    continue;
                }
                Ok(_) => HttpProxyError::UnexpectedUpgrade(id),
                Err(source) => HttpProxyError::Worker { worker: id, source },
            };
            // A final response may still follow the 1xx: the client gets its 502.
            proxy.failed(&e, self.peer);
            e.write_raw(true, &mut self.response);
            let _ = self.stream.write_all(&self.response).await;
            return (502, false);
        }
        let head = worker.head;
        match self.pass_body(&mut worker).await {
            Ok(clean) => {
                let reusable = clean && head.keep_alive;
                worker.release(&proxy.raw, reusable);
                (head.status, !close && head.framing != Framing::UntilClose)
            }
            Err(e) => {
                tracing::debug!(app = %proxy.route.app, peer = %self.peer, "response cut short: {e}");
                (head.status, false)
            }
        }
    }

    /// Writes the client's response head and the body after it. Ok(true) when the body ended
    /// exactly where the worker's bytes did (the connection can be kept).
    async fn pass_body(&mut self, worker: &mut Upstream) -> io::Result<bool> {
        let mut scan = BodyScan::new(worker.head.framing);
        worker.buf.consume(worker.head.len);
        let taken = scan.scan(worker.buf.bytes()).map_err(io::Error::other)?;
        let mut clean = taken == worker.buf.len();
        write_two(&mut self.stream, &worker.out, &worker.buf.bytes()[..taken]).await?;
        worker.buf.clear();
        while !scan.is_done() {
            let want = scan
                .remaining()
                .map_or(BUFFER_SIZE, |r| r.min(BUFFER_SIZE as u64) as usize);
            let Some(room) = worker.buf.spare(want) else {
                break;
            };
            let n = worker.stream.read(room).await?;
            if n == 0 {
                if scan.ends_at_close() {
                    return Ok(false);
                }
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            worker.buf.filled(n);
            let taken = scan.scan(worker.buf.bytes()).map_err(io::Error::other)?;
            clean = taken == worker.buf.len();
            self.stream.write_all(&worker.buf.bytes()[..taken]).await?;
            worker.buf.clear();
        }
        Ok(clean)
    }
}

/// Writes `a` then `b`, in one `writev` when the socket takes it.
async fn write_two(stream: &mut TcpStream, mut a: &[u8], b: &[u8]) -> io::Result<()> {
    let mut b = b;
    while !a.is_empty() {
        let n = if b.is_empty() {
            stream.write(a).await?
        } else {
            stream
                .write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)])
                .await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n >= a.len() {
            b = &b[n - a.len()..];
            a = &[];
        } else {
            a = &a[n..];
        }
    }
    stream.write_all(b).await
}

/// The request on its way to a worker: the bytes to send (any number of times), how its
/// response is read and framed for the client, and who it comes from.
struct Outgoing<'a> {
    bytes: &'a [u8],
    /// It may be sent again after a worker failed on it (RFC 9110 §9.2.2).
    idempotent: bool,
    /// A `HEAD`: the response has no body whatever it says.
    head_only: bool,
    /// The client connection closes after the response, which says so.
    close: bool,
    origin: Origin<'a>,
}

/// A worker that answered: its connection, the bytes read from it, the head at their start
/// and that head as the client gets it.
struct Upstream {
    pick: Pick,
    key: Key,
    stream: TcpStream,
    buf: Window,
    head: ResponseHead,
    out: Vec<u8>,
    head_only: bool,
    close: bool,
}

impl Upstream {
    /// Reads the next response head (after a 1xx).
    async fn read_head(&mut self) -> Result<ResponseHead, WorkerFailure> {
        read_response_head(
            &mut self.stream,
            &mut self.buf,
            self.head_only,
            self.close,
            &mut self.out,
        )
        .await
    }

    /// Ends the request's hold on its worker: the connection goes back to the pool if
    /// `reusable` and the worker still takes requests.
    fn release(self, pool: &super::upstream::IdlePool<TcpStream>, reusable: bool) {
        let worker = self.pick.worker();
        if reusable && !worker.is_draining() && !worker.is_gone() {
            pool.checkin(self.key, self.stream);
        }
        // `pick.guard` drops here: the request no longer counts against the worker.
    }
}

/// Reads from `stream` into `buf` until a whole response head is at its start, and writes it
/// for the client into `out` (see [`head::parse_response`]).
async fn read_response_head(
    stream: &mut TcpStream,
    buf: &mut Window,
    head_only: bool,
    close: bool,
    out: &mut Vec<u8>,
) -> Result<ResponseHead, WorkerFailure> {
    loop {
        if !buf.is_empty()
            && let Some(head) = head::parse_response(buf.bytes(), head_only, close, out)
                .map_err(WorkerFailure::Bad)?
        {
            return Ok(head);
        }
        let Some(room) = buf.spare(MAX_RESPONSE_HEAD) else {
            return Err(WorkerFailure::Bad(head::BadResponse::TooLarge(
                MAX_RESPONSE_HEAD,
            )));
        };
        match stream.read(room).await {
            Ok(0) if buf.is_empty() => return Err(WorkerFailure::Closed),
            Ok(0) => return Err(WorkerFailure::Cut),
            Ok(n) => buf.filled(n),
            Err(e) => return Err(WorkerFailure::Io(e)),
        }
    }
}

impl HttpProxy {
    /// One try at a picked worker on the fast path: a kept connection or a new one, the
    /// request written, the response head read. A failed connect or write goes to the next
    /// worker (no worker got a whole request); a worker that failed before its head goes to
    /// the next one only for an idempotent request, at most [`MAX_RESENDS`] times; anything
    /// else is a 502. So is a 101 nobody asked for.
    async fn attempt_raw(
        &self,
        pick: Pick,
        resends: u32,
        req: &Outgoing<'_>,
        settings: &RouteSettings,
    ) -> Attempt<Upstream, u32, HttpProxyError> {
        let worker = pick.worker();
        let (id, addr) = (worker.id, pick.addr);
        let key = Key {
            addr,
            pid: worker.pid,
            client: req.origin.client,
        };
        let mut stream = match self.raw.checkout(key) {
            Some(stream) => stream,
            None => match open(addr, settings.connect_timeout, req.origin.header).await {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::debug!(app = %self.route.app, id, %addr, "{}; trying the next worker", balancer_workers::Chain(&e));
                    return Attempt::Next(resends);
                }
            },
        };
        if let Err(e) = stream.write_all(req.bytes).await {
            tracing::debug!(app = %self.route.app, id, %addr, "request not sent: {e}; trying the next worker");
            return Attempt::Next(resends);
        }
        let mut buf = Window::new();
        let mut out = Vec::with_capacity(512);
        let read = read_response_head(&mut stream, &mut buf, req.head_only, req.close, &mut out);
        let failure = match read.await {
            Ok(head) if head.status == 101 => {
                return Attempt::GiveUp(HttpProxyError::UnexpectedUpgrade(id));
            }
            Ok(head) => {
                return Attempt::Connected(Upstream {
                    pick,
                    key,
                    stream,
                    buf,
                    head,
                    out,
                    head_only: req.head_only,
                    close: req.close,
                });
            }
            Err(e) => e,
        };
        let unanswered = matches!(failure, WorkerFailure::Closed | WorkerFailure::Io(_));
        if unanswered && req.idempotent && resends < MAX_RESENDS {
            tracing::debug!(app = %self.route.app, id, %addr, "worker failed: {failure}; sending again to the next worker");
            return Attempt::Next(resends + 1);
        }
        Attempt::GiveUp(HttpProxyError::Worker {
            worker: id,
            source: failure,
        })
    }
}
