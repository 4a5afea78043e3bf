//! HTTP proxying: each client request goes to the next ready worker (round robin per request,
//! not per connection), over keep-alive connections the proxy keeps for each worker.
//!
//! A request counts against its worker (a [`ConnGuard`]) from the moment the worker is picked
//! until the last byte of the response body has been handed to the client, or, for an
//! `Upgrade`, until the tunnel closes. The supervisor's drain waits for that count, so a reload
//! or a scale-down lets in-flight requests finish while the next ones go elsewhere.
//!
//! Failures the client must not see are retried on the next worker: a refused or timed-out
//! connect, a kept connection the worker closed before the request went out (hyper hands the
//! request back), and, for idempotent requests without a body (which can be sent again), a
//! worker that failed before answering. Any other failure before a response is a 502; no ready
//! worker within `queue_timeout` is a 503.
//!
//! This module owns the request's way through ([`HttpProxy`]: handle, forward over the shared
//! pick-and-connect loop, respond, tunnel). The client connection it arrived on is `client`'s,
//! the worker connections `upstream`'s, the response body `body`'s, header rewriting `headers`'.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use balancer_workers::{Chain, ConnGuard};
use http_body_util::{Either, Empty};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::http::request;
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Attempt, Pick, PickError, Route, RouteSettings, ServeContext, pick_and_connect};
use headers::{prepare_request, strip_hop_by_hop, wants_upgrade};
use upstream::{ConnectError, IdlePool, Key, Lease, connect};

mod body;
mod client;
mod fast;
mod headers;
mod upstream;

pub use body::ProxyBody;
pub use client::{close_keep_alive_on_stop, serve_connection};
pub use upstream::UpstreamBody;

/// How many times a request a worker failed after receiving it is sent again (bodiless
/// idempotent requests only). Bounded, so a request that kills workers does not kill them all.
const MAX_RESENDS: u32 = 2;

/// Why a request got no response from a worker.
#[derive(Debug, thiserror::Error)]
pub enum HttpProxyError {
    /// No worker took the request within `queue_timeout`.
    #[error("no ready worker took the request within queue_timeout {0:?}")]
    NoWorker(Duration),
    /// The listener is stopping and no worker had taken the request yet.
    #[error("shutting down")]
    Shutdown,
    /// The worker failed after the request was sent, before a response head arrived.
    #[error("worker {worker} failed before answering")]
    Upstream {
        /// The worker's id.
        worker: u32,
        /// What hyper saw.
        #[source]
        source: hyper::Error,
    },
    /// The worker failed after the request was sent, before a response head arrived (fast
    /// path), or sent a head that cannot be passed on.
    #[error("worker {worker} failed before answering")]
    Worker {
        /// The worker's id.
        worker: u32,
        /// What the fast path saw.
        #[source]
        source: WorkerFailure,
    },
    /// The worker answered 101 to a request that asked for no upgrade.
    #[error("worker {0} switched protocols unasked")]
    UnexpectedUpgrade(u32),
}

/// How a worker failed a request on the fast path.
#[derive(Debug, thiserror::Error)]
pub enum WorkerFailure {
    /// The connection failed.
    #[error("connection failed")]
    Io(#[source] std::io::Error),
    /// The worker closed the connection without a byte of response.
    #[error("the worker closed the connection without answering")]
    Closed,
    /// The worker closed the connection in the middle of its response head.
    #[error("the worker closed the connection in its response head")]
    Cut,
    /// The response head cannot be passed on.
    #[error(transparent)]
    Bad(fast::BadResponse),
}

/// How the pick-and-connect loop ended without a worker, as both paths answer it.
impl From<PickError<HttpProxyError>> for HttpProxyError {
    fn from(e: PickError<HttpProxyError>) -> Self {
        match e {
            PickError::NoWorker(waited) => HttpProxyError::NoWorker(waited),
            PickError::Stopped => HttpProxyError::Shutdown,
            PickError::GaveUp(e) => e,
        }
    }
}

impl HttpProxyError {
    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            HttpProxyError::NoWorker(_) | HttpProxyError::Shutdown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            HttpProxyError::Upstream { .. }
            | HttpProxyError::Worker { .. }
            | HttpProxyError::UnexpectedUpgrade(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The text of the response the client gets.
    fn text(&self) -> &'static str {
        match self.status() {
            StatusCode::SERVICE_UNAVAILABLE => "503 service unavailable: no worker is ready\n",
            _ => "502 bad gateway: the worker failed to answer\n",
        }
    }

    /// The short plain-text response the client gets.
    pub fn response(&self) -> Response<ProxyBody> {
        let status = self.status();
        let text = self.text();
        let mut response = Response::new(ProxyBody::text(text));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }

    /// The same response as HTTP/1.1 bytes, into `out` (cleared first), saying
    /// `Connection: close` if `close`.
    fn write_raw(&self, close: bool, out: &mut Vec<u8>) {
        use std::io::Write;
        let status = self.status();
        let text = self.text();
        out.clear();
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            text.len()
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            out.extend_from_slice(b"retry-after: 1\r\n");
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(text.as_bytes());
    }
}

/// One HTTP listener's proxy: its route, and the idle connections it keeps to the workers.
#[derive(Debug)]
pub struct HttpProxy {
    route: Arc<Route>,
    meters: super::metrics::HttpMeters,
    idle: Arc<IdlePool<SendRequest<UpstreamBody>>>,
    /// The fast path's kept worker connections.
    raw: IdlePool<tokio::net::TcpStream>,
    /// The same on the io_uring threads: blocking sockets, off any epoll.
    raw_ring: IdlePool<std::net::TcpStream>,
    /// Whether keep-alive connections move to io_uring rings: `None` follows `[balancer] io`
    /// ([`uring::on`](crate::proxy::uring::on)); tests pin it.
    rings: Option<bool>,
    /// Client connections moved to a ring so far.
    moved: std::sync::atomic::AtomicU64,
    stop: CancellationToken,
    abort: CancellationToken,
    tracker: TaskTracker,
}

impl HttpProxy {
    /// A proxy for `ctx.route`. `stop` ends waits for a worker (and closes client connections
    /// gracefully); `abort` ends worker connections and tunnels; tunnels (which outlive their
    /// client connection's task) go on `tracker`.
    pub fn new(ctx: &ServeContext) -> Self {
        HttpProxy {
            route: Arc::clone(&ctx.route),
            meters: super::metrics::HttpMeters::new(&ctx.route.meters),
            idle: Arc::default(),
            raw: IdlePool::default(),
            raw_ring: IdlePool::default(),
            rings: None,
            moved: std::sync::atomic::AtomicU64::new(0),
            stop: ctx.stop.clone(),
            abort: ctx.abort.clone(),
            tracker: ctx.tracker.clone(),
        }
    }

    /// Pins whether keep-alive connections move to io_uring rings, whatever `[balancer] io`
    /// says (where the kernel has them).
    #[cfg(test)]
    pub(crate) fn pin_rings(mut self, on: bool) -> Self {
        self.rings = Some(on);
        self
    }

    /// How many client connections moved to an io_uring ring.
    pub fn moved_to_rings(&self) -> u64 {
        self.moved.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The route this proxy serves.
    pub fn route(&self) -> &Arc<Route> {
        &self.route
    }

    /// Closes the kept connections of workers that left the pool or are draining, so a
    /// stopping worker is not held open by connections nobody will use. Call on pool changes.
    pub fn forget_departed(&self) {
        let snapshot = self.route.pool.load();
        self.idle.retain(&snapshot);
        self.raw.retain(&snapshot);
        self.raw_ring.retain(&snapshot);
    }

    /// Proxies one request from `peer`; every outcome is a response (502 and 503 included).
    pub async fn handle(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Response<ProxyBody> {
        let started = tokio::time::Instant::now();
        let method = req.method().clone();
        let upgrade = wants_upgrade(&req);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        prepare_request(&mut parts, peer.ip(), upgrade);
        let bodiless = body.is_end_stream();
        let replay = (bodiless && is_idempotent(&parts.method)).then(|| Replay::of(&parts));
        let body = if bodiless {
            Either::Right(Empty::new())
        } else {
            Either::Left(body)
        };
        let result = match self
            .forward(Request::from_parts(parts, body), replay, peer, local)
            .await
        {
            Ok((response, lease)) => self.respond(response, lease, client_upgrade),
            Err(e) => Err(e),
        };
        let response = result.unwrap_or_else(|e| {
            self.failed(&e, peer);
            e.response()
        });
        self.meters
            .request(method.as_str(), response.status().as_u16());
        self.meters.duration.record(started.elapsed().as_secs_f64());
        response
    }

    /// Logs and counts a request that got no response from a worker (both paths).
    fn failed(&self, e: &HttpProxyError, peer: SocketAddr) {
        tracing::warn!(app = %self.route.app, %peer, status = e.status().as_u16(), "{}", Chain(e));
        match e.status() {
            StatusCode::BAD_GATEWAY => self.meters.upstream_errors.increment(1),
            StatusCode::SERVICE_UNAVAILABLE => self.meters.no_worker.increment(1),
            _ => {}
        }
    }

    /// Sends `req` to a worker through the one pick-and-connect loop
    /// ([`pick_and_connect`]), a worker per attempt; [`attempt`](Self::attempt) decides what
    /// each failure means.
    async fn forward(
        &self,
        req: Request<UpstreamBody>,
        replay: Option<Replay>,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Result<(Response<Incoming>, Lease), HttpProxyError> {
        let settings = self.route.settings();
        let pending = Pending { req, resends: 0 };
        let replay = replay.as_ref();
        // With `proxy_protocol`, a worker connection starts with a header naming one client, so
        // it is kept for that client's requests only.
        let header = settings
            .proxy_protocol
            .map(|version| super::proxy_protocol::encode(version, client, local));
        let origin = Origin {
            client: header.as_ref().map(|_| client),
            header: header.as_deref(),
        };
        pick_and_connect(
            &self.route,
            &settings,
            &self.stop,
            client.ip(),
            pending,
            |pick, pending| self.attempt(pick, pending, replay, &settings, origin),
        )
        .await
        .map_err(HttpProxyError::from)
    }

    /// One try at a picked worker. A connect failure, or a kept connection the worker closed
    /// before the request went out (hyper hands it back), goes to the next worker. A failure
    /// after sending goes to the next worker only as a resend of a bodiless idempotent
    /// request (`replay`), at most [`MAX_RESENDS`] times; anything else is a 502.
    async fn attempt(
        &self,
        pick: Pick,
        mut pending: Pending,
        replay: Option<&Replay>,
        settings: &RouteSettings,
        origin: Origin<'_>,
    ) -> Attempt<(Response<Incoming>, Lease), Pending, HttpProxyError> {
        let Pick { guard, addr } = pick;
        let worker = guard.worker();
        let key = Key {
            addr,
            pid: worker.pid,
            client: origin.client,
        };
        let mut sender = match self.sender(key, settings, origin.header).await {
            Ok(sender) => sender,
            Err(e) => {
                tracing::debug!(app = %self.route.app, id = worker.id, %addr, "{}; trying the next worker", Chain(&e));
                return Attempt::Next(pending);
            }
        };
        match sender.try_send_request(pending.req).await {
            Ok(response) => {
                let lease = Lease {
                    guard,
                    conn: Some((key, sender)),
                    idle: Arc::clone(&self.idle),
                };
                Attempt::Connected((response, lease))
            }
            Err(mut e) => {
                if let Some(unsent) = e.take_message() {
                    tracing::debug!(app = %self.route.app, id = worker.id, %addr, "request not sent: {}; trying the next worker", Chain(e.error()));
                    pending.req = unsent;
                    return Attempt::Next(pending);
                }
                let source = e.into_error();
                match replay {
                    Some(replay) if pending.resends < MAX_RESENDS => {
                        tracing::debug!(app = %self.route.app, id = worker.id, %addr, "worker failed: {}; sending again to the next worker", Chain(&source));
                        pending.resends += 1;
                        pending.req = replay.request();
                        Attempt::Next(pending)
                    }
                    _ => Attempt::GiveUp(HttpProxyError::Upstream {
                        worker: worker.id,
                        source,
                    }),
                }
            }
        }
    }

    /// A ready connection to the worker at `key`: a kept one if any is still usable, else a new one.
    async fn sender(
        &self,
        key: Key,
        settings: &RouteSettings,
        header: Option<&[u8]>,
    ) -> Result<SendRequest<UpstreamBody>, ConnectError> {
        while let Some(mut sender) = self.idle.checkout(key) {
            if let Ok(Ok(())) = timeout(settings.connect_timeout, sender.ready()).await {
                return Ok(sender);
            }
        }
        connect(key.addr, settings.connect_timeout, &self.abort, header).await
    }

    /// Turns the worker's response into the client's, or starts the tunnel after a 101.
    fn respond(
        &self,
        mut response: Response<Incoming>,
        mut lease: Lease,
        client_upgrade: Option<OnUpgrade>,
    ) -> Result<Response<ProxyBody>, HttpProxyError> {
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client) = client_upgrade else {
                return Err(HttpProxyError::UnexpectedUpgrade(lease.guard.worker().id));
            };
            let worker = hyper::upgrade::on(&mut response);
            strip_hop_by_hop(response.headers_mut(), true);
            self.tunnel(client, worker, lease.guard);
            return Ok(response.map(|_| ProxyBody::empty()));
        }
        if client_upgrade.is_some() {
            // A refused upgrade: the connection was set up for one; do not reuse it.
            lease.conn = None;
        }
        strip_hop_by_hop(response.headers_mut(), false);
        Ok(response.map(|body| ProxyBody::upstream(body, lease)))
    }

    /// Copies both ways between the upgraded client and worker connections, counted against
    /// the worker (`guard`) until both sides are closed or the master aborts connections.
    fn tunnel(&self, client: OnUpgrade, worker: OnUpgrade, guard: ConnGuard) {
        let abort = self.abort.clone();
        let app = self.route.app.clone();
        self.tracker.spawn(async move {
            let _guard = guard;
            let (client, worker) = match tokio::try_join!(client, worker) {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!(%app, "upgrade failed: {}", Chain(&e));
                    return;
                }
            };
            let (mut client, mut worker) = (TokioIo::new(client), TokioIo::new(worker));
            tokio::select! {
                copied = tokio::io::copy_bidirectional(&mut client, &mut worker) => {
                    if let Err(e) = copied {
                        tracing::debug!(%app, "tunnel: {e}");
                    }
                }
                _ = abort.cancelled() => {}
            }
        });
    }
}

/// The request on its way through the attempts: handed back by an attempt that did not send
/// it (or resent it), with how many resends it has had.
#[derive(Debug)]
struct Pending {
    req: Request<UpstreamBody>,
    resends: u32,
}

/// Who a request comes from, as far as worker connections care: with `proxy_protocol`, the
/// client (connections are kept per client) and the header to open a connection with.
#[derive(Debug, Clone, Copy)]
struct Origin<'a> {
    client: Option<SocketAddr>,
    header: Option<&'a [u8]>,
}

/// What is needed to send a bodiless request again after the first copy was consumed.
#[derive(Debug)]
struct Replay {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Replay {
    fn of(parts: &request::Parts) -> Self {
        Replay {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
        }
    }

    fn request(&self) -> Request<UpstreamBody> {
        let mut req = Request::new(Either::Right(Empty::new()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// Methods a client may expect to be repeated safely (RFC 9110 §9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_idempotent_methods_are_replayed() {
        for m in [
            Method::GET,
            Method::HEAD,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ] {
            assert!(is_idempotent(&m), "{m}");
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!is_idempotent(&m), "{m}");
        }
    }

    // The retry rules against stand-in workers on loopback (raw sockets, no hyper server).

    use crate::proxy::RouteSettings;
    use balancer_workers::{Pool, WorkerHandle};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A worker that reads each request head and then either answers `200 <id>` or closes.
    async fn worker(id: u32, answers: bool) -> Arc<WorkerHandle> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    if answers {
                        let body = id.to_string();
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = s.write_all(reply.as_bytes()).await;
                    }
                });
            }
        });
        Arc::new(WorkerHandle::new(id, id, 1000 + id, vec![addr]))
    }

    async fn proxy_over(workers: &[(u32, bool)]) -> HttpProxy {
        let pool = Arc::new(Pool::new());
        for &(id, answers) in workers {
            pool.insert(worker(id, answers).await);
        }
        let settings = RouteSettings {
            connect_timeout: Duration::from_secs(2),
            queue_timeout: Duration::from_millis(200),
            ..RouteSettings::default()
        };
        HttpProxy::new(&ServeContext {
            budget: crate::proxy::unlimited_budget(),
            route: Arc::new(Route::new("http-test", pool, settings)),
            stop: CancellationToken::new(),
            abort: CancellationToken::new(),
            tracker: TaskTracker::new(),
        })
    }

    /// Forwards a bodiless request the way `handle` does; the id of the worker that answered.
    async fn send(proxy: &HttpProxy, method: Method) -> Result<u32, HttpProxyError> {
        let (parts, ()) = Request::builder()
            .method(method)
            .uri("/")
            .header("host", "t")
            .body(())
            .unwrap()
            .into_parts();
        let replay = is_idempotent(&parts.method).then(|| Replay::of(&parts));
        let req = Request::from_parts(parts, Either::Right(Empty::new()));
        let (response, _lease) = proxy
            .forward(
                req,
                replay,
                (std::net::Ipv4Addr::LOCALHOST, 40000).into(),
                (std::net::Ipv4Addr::LOCALHOST, 8080).into(),
            )
            .await?;
        assert_eq!(response.status(), StatusCode::OK);
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        Ok(String::from_utf8_lossy(&body).parse().unwrap())
    }

    #[tokio::test]
    async fn a_bodiless_get_is_resent_at_most_max_resends_times() {
        // Two workers fail after reading the request: the GET is resent twice and answered.
        let proxy = proxy_over(&[(0, false), (1, false), (2, true)]).await;
        assert_eq!(send(&proxy, Method::GET).await.unwrap(), 2);
        // Three failing workers use up the resends: a 502 naming the third.
        let proxy = proxy_over(&[(0, false), (1, false), (2, false), (3, true)]).await;
        let e = send(&proxy, Method::GET).await.unwrap_err();
        assert!(
            matches!(e, HttpProxyError::Upstream { worker: 2, .. }),
            "{e}"
        );
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
    }

    #[tokio::test]
    async fn a_post_that_failed_after_sending_is_a_502_and_no_worker_is_a_503() {
        let proxy = proxy_over(&[(0, false), (1, true)]).await;
        let e = send(&proxy, Method::POST).await.unwrap_err();
        assert!(
            matches!(e, HttpProxyError::Upstream { worker: 0, .. }),
            "{e}"
        );
        let proxy = proxy_over(&[]).await;
        let e = send(&proxy, Method::GET).await.unwrap_err();
        assert!(matches!(e, HttpProxyError::NoWorker(_)), "{e}");
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn a_refused_connect_goes_to_the_next_worker_even_for_a_post() {
        let proxy = proxy_over(&[(0, true), (1, true)]).await;
        // Worker 0's port closes: the connect is refused, worker 1 answers the POST.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let pool = &proxy.route.pool;
        let w0 = Arc::clone(&pool.load().workers[0]);
        pool.remove(&w0);
        pool.insert(Arc::new(WorkerHandle::new(0, 0, 999, vec![closed])));
        assert_eq!(send(&proxy, Method::POST).await.unwrap(), 1);
    }
}
