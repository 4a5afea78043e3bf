//! The client side of an HTTP connection: serving HTTP/1.1 (and HTTP/2 with prior knowledge,
//! "h2c") on an accepted socket, handing every request to the [`HttpProxy`], and timing the
//! connection.
//!
//! The connection's timeouts are kept here rather than by hyper, because hyper's
//! `header_read_timeout` also runs while a keep-alive connection sits idle between requests,
//! which would make `http_idle_timeout` meaningless. Each connection tracks its own activity:
//! - the first request head, and any later head once its first byte arrives, must be complete
//!   within `http_header_timeout` (slowloris), or the connection is dropped;
//! - with no request in flight and no head started for `http_idle_timeout`, it is closed
//!   gracefully;
//! - a request in flight (until its response body is sent) is never timed out here.
//!
//! On `stop` each connection shuts down gracefully: requests in flight finish, then it closes.
//! On `abort` it is dropped. A master that handed its listeners to a successor (`upgrade`)
//! stops differently ([`close_keep_alive_on_stop`]): closing an idle HTTP/1 keep-alive
//! connection races with the request its client may be sending at that moment, so each one
//! is instead kept until its next request, whose response says `Connection: close`.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use balancer_config::HttpSettings;
use hyper::Request;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::{HttpProxy, ProxyBody};
use crate::proxy::Route;

/// Set once this process's master has handed over to a successor; see the module docs. One
/// master runs per process, so a process-wide flag is the master's own.
static CLOSE_ON_NEXT_RESPONSE: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// From now on, a stopped listener's HTTP/1 connections are not closed while idle: each
/// answers its next request with `Connection: close` and then closes (or closes after
/// `http_idle_timeout`, or on `abort`). For the old master of an `upgrade`, whose workers
/// still serve while its client connections finish.
pub fn close_keep_alive_on_stop() {
    CLOSE_ON_NEXT_RESPONSE.store(true, Ordering::SeqCst);
}

pub(super) fn closing_on_next_response() -> bool {
    CLOSE_ON_NEXT_RESPONSE.load(Ordering::SeqCst)
}

/// hyper refuses a smaller read buffer.
const MIN_BUF_SIZE: usize = 8192;

/// Serves one accepted client connection until it closes, times out, or is aborted: the
/// proxy's `stop` closes it gracefully (requests in flight finish), its `abort` drops it.
pub async fn serve_connection(stream: TcpStream, peer: SocketAddr, proxy: Arc<HttpProxy>) {
    let (stop, abort) = (proxy.stop.clone(), proxy.abort.clone());
    let accepted = Instant::now();
    // TCP_NODELAY comes with the accept, from the listener (`listener::tcp::bind`).
    let route = Arc::clone(proxy.route());
    // Every connection starts on the fast path, which serves HTTP/1.1 until a request it
    // does not carry, or an HTTP/2 preface; hyper serves the rest from the bytes it read,
    // timing that request's head from where it began.
    let served = tokio::select! {
        handoff = super::fast::serve(&proxy, stream, peer, accepted) => handoff,
        _ = abort.cancelled() => None,
    };
    let Some(handoff) = served else { return };
    let (stream, prefix, origin, h2) = (
        handoff.stream,
        handoff.buffered,
        handoff.head_started,
        handoff.h2,
    );
    let limits = route.settings().http;
    // Where the client connected to: the destination of a PROXY header to the worker.
    let local = stream.local_addr().unwrap_or(peer);
    // HTTP/2 clients send frames (pings, settings) between requests: only HTTP/1 heads are timed.
    let activity = Arc::new(Activity::new(origin, !h2));
    let io = TokioIo::new(Watched {
        stream,
        prefix,
        taken: 0,
        activity: Arc::clone(&activity),
    });
    let service = {
        let activity = Arc::clone(&activity);
        let stop = stop.clone();
        service_fn(move |req: Request<Incoming>| {
            let active = activity.begin();
            let proxy = Arc::clone(&proxy);
            let stop = stop.clone();
            async move {
                let mut response = proxy.handle(req, peer, local).await;
                if !h2
                    && stop.is_cancelled()
                    && closing_on_next_response()
                    && response.status() != hyper::StatusCode::SWITCHING_PROTOCOLS
                {
                    // hyper closes the connection after a response that says so.
                    response.headers_mut().insert(
                        hyper::header::CONNECTION,
                        hyper::header::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, Infallible>(response.map(|body| Tracked {
                    body,
                    _active: active,
                }))
            }
        })
    };
    let watch = Watch {
        route: &route,
        activity: &activity,
        peer,
        stop: &stop,
        abort: &abort,
        h1: !h2,
    };
    if h2 {
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_size).unwrap_or(u32::MAX))
            .serve_connection(io, service);
        watch.drive(pin!(conn), |c| c.graceful_shutdown()).await;
    } else {
        let conn = http1::Builder::new()
            // Timed by `Activity` instead (see the module docs).
            .header_read_timeout(None)
            .max_buf_size(limits.max_header_size.max(MIN_BUF_SIZE))
            .serve_connection(io, service)
            .with_upgrades();
        watch.drive(pin!(conn), |c| c.graceful_shutdown()).await;
    }
}

/// What drives a connection: its activity, and the tokens that end it.
struct Watch<'a> {
    route: &'a Route,
    activity: &'a Activity,
    peer: SocketAddr,
    stop: &'a CancellationToken,
    abort: &'a CancellationToken,
    /// HTTP/1 (which can say `Connection: close` on its next response).
    h1: bool,
}

impl Watch<'_> {
    /// Runs `conn` to its end, shutting it down gracefully (`graceful`) on `stop` or when idle
    /// too long, and dropping it on `abort` or when a request head takes too long.
    async fn drive<C>(&self, mut conn: Pin<&mut C>, graceful: impl Fn(Pin<&mut C>))
    where
        C: Future<Output = hyper::Result<()>>,
    {
        let mut closing = false;
        // Stopped, but left to close itself after its next response (see the module docs).
        let mut closes_itself = false;
        loop {
            // Read at each check: a reload may change the limits.
            let limits = self.route.settings().http;
            let (at, due) = self.activity.next_check(&limits, !closing);
            if at <= Instant::now() {
                match due {
                    Due::Head => {
                        tracing::debug!(peer = %self.peer, "request head not received within http_header_timeout; closing");
                        return;
                    }
                    Due::Idle => {
                        closing = true;
                        graceful(conn.as_mut());
                        continue;
                    }
                    Due::Recheck => {}
                }
            }
            tokio::select! {
                done = conn.as_mut() => {
                    if let Err(e) = done {
                        tracing::debug!(peer = %self.peer, "client connection: {e}");
                    }
                    return;
                }
                _ = self.stop.cancelled(), if !closing && !closes_itself => {
                    if self.h1 && closing_on_next_response() {
                        closes_itself = true;
                    } else {
                        closing = true;
                        graceful(conn.as_mut());
                    }
                }
                _ = self.abort.cancelled() => return,
                _ = sleep_until(at) => {}
            }
        }
    }
}

/// What a connection's timer must check next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    /// A request head started and must be complete by then.
    Head,
    /// Nothing happening: the connection is idle by then.
    Idle,
    /// Requests in flight: look again later.
    Recheck,
}

/// One client connection's activity, shared by its I/O (bytes read), its service (requests
/// begun) and its response bodies (requests done). Times are milliseconds since `origin`.
struct Activity {
    origin: Instant,
    /// Requests whose response body has not been sent yet.
    in_flight: AtomicUsize,
    /// When the last request finished (or the connection opened).
    idle_since: AtomicU64,
    /// 1 + when the first byte of a pending request head arrived; 0 if none is pending.
    head_since: AtomicU64,
    /// Whether bytes read while idle start a head (HTTP/1).
    time_heads: bool,
}

impl Activity {
    fn new(origin: Instant, time_heads: bool) -> Self {
        Activity {
            origin,
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            // The first head is timed from the accept: a client that connects says something.
            head_since: AtomicU64::new(u64::from(time_heads)),
            time_heads,
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn at(&self, ms: u64) -> Instant {
        self.origin + Duration::from_millis(ms)
    }

    /// Bytes arrived from the client.
    fn on_read(&self) {
        if self.time_heads
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == 0
        {
            self.head_since.store(self.now() + 1, Ordering::Relaxed);
        }
    }

    /// A request head was parsed; the request counts until the returned guard drops.
    fn begin(self: &Arc<Self>) -> Active {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(0, Ordering::Relaxed);
        Active(Arc::clone(self))
    }

    /// When to look next, and what for.
    fn next_check(&self, limits: &HttpSettings, idle_closes: bool) -> (Instant, Due) {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return (Instant::now() + limits.idle_timeout, Due::Recheck);
        }
        match self.head_since.load(Ordering::Relaxed) {
            0 if idle_closes => (
                self.at(self.idle_since.load(Ordering::Relaxed)) + limits.idle_timeout,
                Due::Idle,
            ),
            0 => (Instant::now() + limits.idle_timeout, Due::Recheck),
            started => (self.at(started - 1) + limits.header_timeout, Due::Head),
        }
    }
}

/// A request in flight on a connection.
struct Active(Arc<Activity>);

impl Drop for Active {
    fn drop(&mut self) {
        let activity = &self.0;
        if activity.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            activity.idle_since.store(activity.now(), Ordering::Relaxed);
        }
    }
}

/// A response body that keeps its request counted as in flight until it is sent (or dropped).
struct Tracked {
    body: ProxyBody,
    _active: Active,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The client's socket, telling its connection's [`Activity`] when bytes arrive, and reading
/// first what the fast path read and left (`prefix`, of which `taken` bytes are read).
struct Watched {
    stream: TcpStream,
    prefix: Vec<u8>,
    taken: usize,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.taken < this.prefix.len() {
            let left = &this.prefix[this.taken..];
            let n = left.len().min(buf.remaining());
            buf.put_slice(&left[..n]);
            this.taken += n;
            if this.taken == this.prefix.len() {
                this.prefix = Vec::new();
                this.taken = 0;
            }
            this.activity.on_read();
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.on_read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
