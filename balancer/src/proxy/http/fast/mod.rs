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
mod wire;

#[cfg(test)]
mod tests;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};

use super::upstream::Key;
use super::{HttpProxy, HttpProxyError, MAX_RESENDS, Origin, WorkerFailure};
use crate::proxy::copy::BUFFER_SIZE;
use crate::proxy::{Attempt, Pick, RouteSettings, pick_and_connect};
use framing::{BodyScan, Framing};
use head::{Parsed, RequestHead, ResponseHead, parse_request};
use window::Window;
use wire::Wire;

pub use head::BadResponse;

/// Requests a connection serves on epoll before it moves to an io_uring ring (with
/// [`uring::on`](crate::proxy::uring::on)): a client that sends one request and closes (a new
/// connection per request) never moves, a keep-alive client after its second response, as
/// `tcp://` connections move after going back and forth twice.
const CARRY_AFTER_REQUESTS: u32 = 2;

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
/// carry (the [`Handoff`]). A keep-alive connection moves to an io_uring ring after
/// [`CARRY_AFTER_REQUESTS`] when the rings are on, and goes on there with the same code. The
/// caller ends it on `abort`, by dropping the future.
pub(super) async fn serve(
    proxy: &Arc<HttpProxy>,
    stream: TcpStream,
    peer: SocketAddr,
    accepted: Instant,
) -> Option<Handoff> {
    let mut conn = Conn::new(proxy, stream, peer);
    let mut progress = Progress::new(accepted);
    let carry = proxy.rings.unwrap_or_else(crate::proxy::uring::on)
        && crate::proxy::uring::driver::running();
    match conn
        .run(&mut progress, carry.then_some(CARRY_AFTER_REQUESTS))
        .await
    {
        Ended::Closed => None,
        Ended::Hyper(why) => Some(Handoff {
            head_started: progress.head_started.unwrap_or_else(Instant::now),
            buffered: conn.window.into_vec(),
            stream: conn.stream,
            h2: why == H2,
        }),
        Ended::Carry => {
            // Only the socket goes on: the buffers of the requests served here are freed
            // before the wait, which lasts the connection's life.
            let Conn { stream, .. } = conn;
            carry_to_ring(proxy, stream, peer, progress).await
        }
    }
}

/// Where a connection is between requests: when the head being read began (the header
/// timeout runs from there; the first one from the accept), else since when it is idle (the
/// idle timeout), whether it has seen the stop, and how many requests it has served.
#[derive(Debug, Clone, Copy)]
struct Progress {
    head_started: Option<Instant>,
    idle_since: Instant,
    stopped: bool,
    served: u32,
}

impl Progress {
    fn new(accepted: Instant) -> Self {
        // The first head is timed from the accept: a client that connects says something.
        Progress {
            head_started: Some(accepted),
            idle_since: accepted,
            stopped: false,
            served: 0,
        }
    }
}

/// How [`Conn::run`] ended.
enum Ended {
    /// The client closed or went quiet, or the listener stopped: close.
    Closed,
    /// A request for hyper (the reason, for the log; [`H2`] for an HTTP/2 client).
    Hyper(&'static str),
    /// The connection served its requests and waits for the next with nothing read: it can
    /// move to a ring.
    Carry,
}

/// What a ring's task gives back: a connection for hyper, as a socket off any epoll.
struct RingHandoff {
    socket: std::net::TcpStream,
    buffered: Vec<u8>,
    head_started: Instant,
    h2: bool,
}

/// Moves a keep-alive connection to a ring's thread and waits there for its end. Dropping the
/// future (the caller's `abort`) ends the ring's task, and the connection with it.
async fn carry_to_ring(
    proxy: &Arc<HttpProxy>,
    stream: TcpStream,
    peer: SocketAddr,
    progress: Progress,
) -> Option<Handoff> {
    use crate::proxy::uring::driver;
    // `into_std` deregisters from the runtime's epoll, which would otherwise wake for every
    // request the ring serves.
    let socket = match stream.into_std() {
        Ok(socket) => socket,
        Err(e) => {
            tracing::debug!(%peer, "connection not moved to io_uring: {e}");
            return None;
        }
    };
    let (done, answer) = tokio::sync::oneshot::channel();
    // Dropped with this future: the ring's task sees it and ends.
    let (_owner, gone) = tokio::sync::oneshot::channel::<std::convert::Infallible>();
    let theirs = Arc::clone(proxy);
    let job: driver::Job = Box::new(move || {
        tokio::spawn(async move {
            tokio::select! {
                ended = serve_on_ring(&theirs, socket, peer, progress) => {
                    let _ = done.send(ended);
                }
                _ = gone => {}
            }
        });
    });
    if driver::run(job).is_err() {
        tracing::warn!(%peer, "the io_uring threads stopped: connection closed");
        return None;
    }
    proxy.route.meters.carried.increment(1);
    proxy
        .moved
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let handoff = answer.await.ok()??;
    let stream = match handoff
        .socket
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(handoff.socket))
    {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(%peer, "connection not moved back from io_uring: {e}");
            return None;
        }
    };
    Some(Handoff {
        stream,
        buffered: handoff.buffered,
        head_started: handoff.head_started,
        h2: handoff.h2,
    })
}

/// The rest of a connection's life on a ring's thread: the same loop, over the ring.
async fn serve_on_ring(
    proxy: &HttpProxy,
    socket: std::net::TcpStream,
    peer: SocketAddr,
    mut progress: Progress,
) -> Option<RingHandoff> {
    use crate::proxy::uring::driver;
    let stream = match driver::Stream::new(socket) {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(%peer, "connection not moved to io_uring: {e}");
            return None;
        }
    };
    let mut conn = Conn::new(proxy, stream, peer);
    match conn.run(&mut progress, None).await {
        Ended::Closed | Ended::Carry => None,
        Ended::Hyper(why) => {
            let mut buffered = conn.window.into_vec();
            let (socket, rest) = match conn.stream.into_std().await {
                Ok(back) => back,
                Err(e) => {
                    tracing::debug!(%peer, "connection not moved back from io_uring: {e}");
                    return None;
                }
            };
            buffered.extend_from_slice(&rest);
            Some(RingHandoff {
                socket,
                buffered,
                head_started: progress.head_started.unwrap_or_else(Instant::now),
                h2: why == H2,
            })
        }
    }
}

/// One client connection on the fast path, on epoll or on a ring (`S`).
struct Conn<'p, S> {
    proxy: &'p HttpProxy,
    stream: S,
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

impl<'p, S: Wire> Conn<'p, S> {
    fn new(proxy: &'p HttpProxy, stream: S, peer: SocketAddr) -> Self {
        Conn {
            proxy,
            stream,
            peer,
            window: Window::new(),
            request: Vec::new(),
            response: Vec::new(),
        }
    }

    /// Serves requests until the connection ends, or a request goes to hyper, or, with
    /// `carry_after`, once it has served that many and waits for the next with nothing read.
    async fn run(&mut self, progress: &mut Progress, carry_after: Option<u32>) -> Ended {
        loop {
            if carry_after.is_some_and(|n| progress.served >= n)
                && self.window.is_empty()
                && !progress.stopped
            {
                return Ended::Carry;
            }
            let head = match self.next_head(progress).await {
                Next::Head(head) => head,
                Next::Close => return Ended::Closed,
                Next::Hyper(why) => {
                    tracing::debug!(peer = %self.peer, "to hyper: {why}");
                    return Ended::Hyper(why);
                }
            };
            if !self.read_body(&head).await {
                return Ended::Closed;
            }
            if !self.exchange(&head).await {
                return Ended::Closed;
            }
            self.window.consume(head.len + head.body);
            progress.head_started = None;
            progress.idle_since = Instant::now();
            progress.served = progress.served.saturating_add(1);
        }
    }

    /// Reads until a whole request head is at the start of the window (`progress` times it).
    /// Before the first byte of a head it closes on `stop`, unless its master handed over to
    /// a successor: then it answers its next request and closes (`close_keep_alive_on_stop`).
    async fn next_head(&mut self, progress: &mut Progress) -> Next {
        let proxy = self.proxy;
        loop {
            if !self.window.is_empty() {
                progress.head_started.get_or_insert_with(Instant::now);
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
            // A head longer than the pooled buffer is rare: hyper reads it (and answers 431
            // past `http_max_header_size`).
            if self.window.len() >= BUFFER_SIZE {
                return Next::Hyper("long head");
            }
            let limits = proxy.route.settings().http;
            let (deadline, timed) = match progress.head_started {
                Some(at) => (at + limits.header_timeout, "http_header_timeout"),
                None => (progress.idle_since + limits.idle_timeout, ""),
            };
            let quiet = self.window.is_empty();
            // The wait holds no buffer: a connection waiting for its client borrows none.
            tokio::select! {
                read = self.stream.fill(&mut self.window, BUFFER_SIZE) => match read {
                    Ok(0) => return Next::Close,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Next::Close,
                },
                _ = sleep_until(deadline) => {
                    if !timed.is_empty() {
                        tracing::debug!(peer = %self.peer, "request head not received within {timed}; closing");
                    }
                    return Next::Close;
                }
                _ = proxy.stop.cancelled(), if quiet && !progress.stopped => {
                    progress.stopped = true;
                    if !super::client::closing_on_next_response() {
                        return Next::Close;
                    }
                }
            }
        }
    }

    /// Reads the rest of a short body after `head`; false if the client closed first.
    async fn read_body(&mut self, head: &RequestHead) -> bool {
        let whole = head.len + head.body;
        while self.window.len() < whole {
            match self.stream.fill(&mut self.window, whole).await {
                Ok(0) => return false,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return false,
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
            |pick, resends| proxy.attempt_raw::<S>(pick, resends, &outgoing, &settings),
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
                let written = self.stream.send(&[&self.response]).await.is_ok();
                (e.status().as_u16(), written && !close)
            }
        };
        proxy.meters.request(method.as_str(), status);
        if !keep {
            self.stream.finish().await;
        }
        keep
    }

    /// Passes the worker's response to the client: any 1xx heads, then the final head and its
    /// body. Gives the worker connection back to the pool if the response ended clean.
    /// Returns the status, and whether the client connection stays open.
    async fn respond(&mut self, mut worker: Upstream<S>, close: bool) -> (u16, bool) {
        let proxy = self.proxy;
        while (100..200).contains(&worker.head.status) {
            if self.stream.send(&[&worker.out]).await.is_err() {
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
            let _ = self.stream.send(&[&self.response]).await;
            return (502, false);
        }
        let head = worker.head;
        match self.pass_body(&mut worker).await {
            Ok(clean) => {
                let reusable = clean && head.keep_alive;
                worker.release(proxy, reusable);
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
    async fn pass_body(&mut self, worker: &mut Upstream<S>) -> io::Result<bool> {
        let mut scan = BodyScan::new(worker.head.framing);
        worker.buf.consume(worker.head.len);
        let taken = scan.scan(worker.buf.bytes()).map_err(io::Error::other)?;
        let mut clean = taken == worker.buf.len();
        self.stream
            .send(&[&worker.out, &worker.buf.bytes()[..taken]])
            .await?;
        worker.buf.clear();
        while !scan.is_done() {
            let want = scan
                .remaining()
                .map_or(BUFFER_SIZE, |r| r.min(BUFFER_SIZE as u64) as usize);
            if want == 0 {
                break;
            }
            let n = match worker.stream.fill(&mut worker.buf, want).await {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                read => read?,
            };
            if n == 0 {
                if scan.ends_at_close() {
                    return Ok(false);
                }
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let taken = scan.scan(worker.buf.bytes()).map_err(io::Error::other)?;
            clean = taken == worker.buf.len();
            self.stream.send(&[&worker.buf.bytes()[..taken]]).await?;
            worker.buf.clear();
        }
        Ok(clean)
    }
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
struct Upstream<W> {
    pick: Pick,
    key: Key,
    stream: W,
    buf: Window,
    head: ResponseHead,
    out: Vec<u8>,
    head_only: bool,
    close: bool,
}

impl<W: Wire> Upstream<W> {
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
    fn release(self, proxy: &HttpProxy, reusable: bool) {
        let worker = self.pick.worker();
        if reusable
            && !worker.is_draining()
            && !worker.is_gone()
            && let Some(idle) = self.stream.into_idle()
        {
            W::pool(proxy).checkin(self.key, idle);
        }
        // `pick.guard` drops here: the request no longer counts against the worker.
    }
}

/// Reads from `stream` into `buf` until a whole response head is at its start, and writes it
/// for the client into `out` (see [`head::parse_response`]).
async fn read_response_head<W: Wire>(
    stream: &mut W,
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
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err(WorkerFailure::Bad(head::BadResponse::TooLarge(
                MAX_RESPONSE_HEAD,
            )));
        }
        match stream.fill(buf, MAX_RESPONSE_HEAD).await {
            Ok(0) if buf.is_empty() => return Err(WorkerFailure::Closed),
            Ok(0) => return Err(WorkerFailure::Cut),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
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
    async fn attempt_raw<W: Wire>(
        &self,
        pick: Pick,
        resends: u32,
        req: &Outgoing<'_>,
        settings: &RouteSettings,
    ) -> Attempt<Upstream<W>, u32, HttpProxyError> {
        let worker = pick.worker();
        let (id, addr) = (worker.id, pick.addr);
        let key = Key {
            addr,
            pid: worker.pid,
            client: req.origin.client,
        };
        let kept = W::pool(self)
            .checkout(key)
            .and_then(|idle| W::from_idle(idle).ok());
        let mut stream = match kept {
            Some(stream) => stream,
            None => match W::open(addr, settings.connect_timeout, req.origin.header).await {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::debug!(app = %self.route.app, id, %addr, "{}; trying the next worker", balancer_workers::Chain(&e));
                    return Attempt::Next(resends);
                }
            },
        };
        if let Err(e) = stream.send(&[req.bytes]).await {
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
