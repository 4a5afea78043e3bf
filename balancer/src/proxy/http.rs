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

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use balancer_workers::{Chain, ConnGuard, PoolSnapshot};
use http_body_util::{Either, Empty, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self as client_http1, SendRequest};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request;
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Attempt, Pick, PickError, Route, RouteSettings, pick_and_connect};

/// Kept worker connections idle for longer are not reused. Node closes idle keep-alive
/// connections after 5 s by default, and a request sent on a connection the worker is closing
/// fails after it was sent: only bodiless idempotent requests could be retried then.
const UPSTREAM_IDLE: Duration = Duration::from_secs(4);
/// Idle connections kept per worker.
const MAX_IDLE_PER_WORKER: usize = 64;
/// How many times a request a worker failed after receiving it is sent again (bodiless
/// idempotent requests only). Bounded, so a request that kills workers does not kill them all.
const MAX_RESENDS: u32 = 2;

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The body sent to a worker: the client's body, streamed as it arrives, or nothing.
pub type UpstreamBody = Either<Incoming, Empty<Bytes>>;

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
    /// The worker answered 101 to a request that asked for no upgrade.
    #[error("worker {0} switched protocols unasked")]
    UnexpectedUpgrade(u32),
}

impl HttpProxyError {
    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            HttpProxyError::NoWorker(_) | HttpProxyError::Shutdown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            HttpProxyError::Upstream { .. } | HttpProxyError::UnexpectedUpgrade(_) => {
                StatusCode::BAD_GATEWAY
            }
        }
    }

    /// The short plain-text response the client gets.
    pub fn response(&self) -> Response<ProxyBody> {
        let status = self.status();
        let text = match status {
            StatusCode::SERVICE_UNAVAILABLE => "503 service unavailable: no worker is ready\n",
            _ => "502 bad gateway: the worker failed to answer\n",
        };
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
}

/// Why a connection to a worker could not be had.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed")]
    Connect(#[source] io::Error),
    #[error("HTTP/1 handshake failed")]
    Handshake(#[source] hyper::Error),
}

/// One HTTP listener's proxy: its route, and the idle connections it keeps to the workers.
#[derive(Debug)]
pub struct HttpProxy {
    route: Arc<Route>,
    idle: Arc<IdlePool>,
    stop: CancellationToken,
    abort: CancellationToken,
    tracker: TaskTracker,
}

impl HttpProxy {
    /// A proxy for `route`. `stop` ends waits for a worker; `abort` ends worker connections and
    /// tunnels; tunnels (which outlive their client connection's task) go on `tracker`.
    pub fn new(
        route: Arc<Route>,
        stop: CancellationToken,
        abort: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        HttpProxy {
            route,
            idle: Arc::default(),
            stop,
            abort,
            tracker,
        }
    }

    /// The route this proxy serves.
    pub fn route(&self) -> &Arc<Route> {
        &self.route
    }

    /// Closes the kept connections of workers that left the pool or are draining, so a
    /// stopping worker is not held open by connections nobody will use. Call on pool changes.
    pub fn forget_departed(&self) {
        self.idle.retain(&self.route.pool.load());
    }

    /// Proxies one request from `peer`; every outcome is a response (502 and 503 included).
    pub async fn handle(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
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
        let result = match self.forward(Request::from_parts(parts, body), replay).await {
            Ok((response, lease)) => self.respond(response, lease, client_upgrade),
            Err(e) => Err(e),
        };
        result.unwrap_or_else(|e| {
            tracing::warn!(app = %self.route.app, %peer, status = e.status().as_u16(), "{}", Chain(&e));
            e.response()
        })
    }

    /// Sends `req` to a worker through the one pick-and-connect loop
    /// ([`pick_and_connect`]), a worker per attempt; [`attempt`](Self::attempt) decides what
    /// each failure means.
    async fn forward(
        &self,
        req: Request<UpstreamBody>,
        replay: Option<Replay>,
    ) -> Result<(Response<Incoming>, Lease), HttpProxyError> {
        let settings = self.route.settings();
        let pending = Pending { req, resends: 0 };
        let replay = replay.as_ref();
        pick_and_connect(
            &self.route,
            &settings,
            &self.stop,
            pending,
            |pick, pending| self.attempt(pick, pending, replay, &settings),
        )
        .await
        .map_err(|e| match e {
            PickError::NoWorker(waited) => HttpProxyError::NoWorker(waited),
            PickError::Stopped => HttpProxyError::Shutdown,
            PickError::GaveUp(e) => e,
        })
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
    ) -> Attempt<(Response<Incoming>, Lease), Pending, HttpProxyError> {
        let Pick { guard, addr } = pick;
        let worker = guard.worker();
        let key = Key {
            addr,
            pid: worker.pid,
        };
        let mut sender = match self.sender(key, settings).await {
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
    ) -> Result<SendRequest<UpstreamBody>, ConnectError> {
        while let Some(mut sender) = self.idle.checkout(key) {
            if let Ok(Ok(())) = timeout(settings.connect_timeout, sender.ready()).await {
                return Ok(sender);
            }
        }
        connect(key.addr, settings.connect_timeout, &self.abort).await
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

/// Opens a new HTTP/1.1 connection to a worker; its driver task ends when the last sender is
/// dropped, on a connection error, or on `abort`.
async fn connect(
    addr: SocketAddr,
    connect_timeout: Duration,
    abort: &CancellationToken,
) -> Result<SendRequest<UpstreamBody>, ConnectError> {
    let stream = timeout(connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout(connect_timeout))?
        .map_err(ConnectError::Connect)?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = client_http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(ConnectError::Handshake)?;
    let abort = abort.clone();
    tokio::spawn(async move {
        tokio::select! {
            done = conn.with_upgrades() => {
                if let Err(e) = done {
                    tracing::debug!(%addr, "worker connection: {}", Chain(&e));
                }
            }
            _ = abort.cancelled() => {}
        }
    });
    Ok(sender)
}

/// Which worker process a kept connection belongs to (a private port may be reused by the
/// next worker, so the pid is part of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    addr: SocketAddr,
    pid: u32,
}

/// Idle keep-alive connections to workers, most recently used last.
#[derive(Debug, Default)]
struct IdlePool {
    conns: Mutex<HashMap<Key, Vec<Idle>>>,
}

#[derive(Debug)]
struct Idle {
    sender: SendRequest<UpstreamBody>,
    since: std::time::Instant,
}

impl IdlePool {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Vec<Idle>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used connection to `key` that is open and not too old.
    fn checkout(&self, key: Key) -> Option<SendRequest<UpstreamBody>> {
        let mut conns = self.lock();
        let list = conns.get_mut(&key)?;
        while let Some(idle) = list.pop() {
            if !idle.sender.is_closed() && idle.since.elapsed() < UPSTREAM_IDLE {
                return Some(idle.sender);
            }
        }
        None
    }

    fn checkin(&self, key: Key, sender: SendRequest<UpstreamBody>) {
        let mut conns = self.lock();
        let list = conns.entry(key).or_default();
        if list.len() >= MAX_IDLE_PER_WORKER {
            list.retain(|i| !i.sender.is_closed() && i.since.elapsed() < UPSTREAM_IDLE);
            if list.len() >= MAX_IDLE_PER_WORKER {
                list.remove(0);
            }
        }
        list.push(Idle {
            sender,
            since: std::time::Instant::now(),
        });
    }

    /// Keeps only the connections of workers that are in `snapshot` and not draining.
    fn retain(&self, snapshot: &PoolSnapshot) {
        self.lock().retain(|key, _| {
            snapshot
                .workers
                .iter()
                .any(|w| w.pid == key.pid && !w.is_draining() && w.addrs.contains(&key.addr))
        });
    }
}

/// A request's hold on its worker: the live-request count, and the connection it used, which
/// goes back to the idle pool once the response body has been read to its end.
#[derive(Debug)]
struct Lease {
    guard: ConnGuard,
    conn: Option<(Key, SendRequest<UpstreamBody>)>,
    idle: Arc<IdlePool>,
}

impl Lease {
    fn release(self, reusable: bool) {
        let worker = self.guard.worker();
        if reusable
            && !worker.is_draining()
            && !worker.is_gone()
            && let Some((key, sender)) = self.conn
        {
            self.idle.checkin(key, sender);
        }
        // `guard` drops here: the request no longer counts against the worker.
    }
}

/// The body of a proxied response: the worker's body streamed through, holding the worker's
/// lease until it ends, or a short body the proxy made.
#[derive(Debug)]
pub struct ProxyBody {
    kind: Kind,
    lease: Option<Lease>,
}

#[derive(Debug)]
enum Kind {
    Upstream(Incoming),
    Local(Full<Bytes>),
}

impl ProxyBody {
    fn upstream(body: Incoming, lease: Lease) -> Self {
        ProxyBody {
            kind: Kind::Upstream(body),
            lease: Some(lease),
        }
    }

    fn text(text: &'static str) -> Self {
        ProxyBody {
            kind: Kind::Local(Full::new(Bytes::from_static(text.as_bytes()))),
            lease: None,
        }
    }

    fn empty() -> Self {
        ProxyBody {
            kind: Kind::Local(Full::default()),
            lease: None,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        match &mut this.kind {
            Kind::Upstream(body) => {
                let polled = Pin::new(body).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => {
                        if let Some(lease) = this.lease.take() {
                            lease.release(true);
                        }
                    }
                    Poll::Ready(Some(Err(_))) => {
                        this.lease.take();
                    }
                    _ => {}
                }
                polled
            }
            Kind::Local(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream(body) => body.is_end_stream(),
            Kind::Local(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream(body) => body.size_hint(),
            Kind::Local(body) => body.size_hint(),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // Dropped before its end (the client went away): the worker connection is mid-response
        // and cannot be reused. Dropped at its end without a poll (an empty body): it can.
        if let Some(lease) = self.lease.take() {
            let done = match &self.kind {
                Kind::Upstream(body) => body.is_end_stream(),
                Kind::Local(_) => true,
            };
            lease.release(done);
        }
    }
}

/// The request on its way through the attempts: handed back by an attempt that did not send
/// it (or resent it), with how many resends it has had.
#[derive(Debug)]
struct Pending {
    req: Request<UpstreamBody>,
    resends: u32,
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

/// Whether an HTTP/1.1 request asks to switch protocols (WebSocket and friends).
fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Makes a client's request one a worker can take: origin-form URI over HTTP/1.1, the Host
/// the client meant, no hop-by-hop headers, and who it came from.
fn prepare_request(parts: &mut request::Parts, client: IpAddr, upgrade: bool) {
    if parts.method != Method::CONNECT && parts.uri.authority().is_some() {
        // Absolute-form (HTTP/1) or :authority (HTTP/2): it wins over any Host (RFC 9112 §3.2.2).
        if let Some(authority) = parts.uri.authority()
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, host);
        }
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = Uri::try_from(path).unwrap_or_else(|_| Uri::from_static("/"));
    }
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers, upgrade);
    add_forwarded(&mut parts.headers, client);
}

/// Removes the headers that concern one connection only: those `Connection` names, and the
/// usual ones. With `upgrade`, keeps `Upgrade` and `Connection: upgrade` for the tunnel.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let upgrade_to = if upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // The body was framed by chunked coding, which wins over any Content-Length (RFC 9112
        // §6.3); hyper frames it anew from the body, and a stale length would desync the worker.
        headers.remove(header::CONTENT_LENGTH);
    }
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = connection_tokens(headers)
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ] {
        headers.remove(name);
    }
    if let Some(upgrade_to) = upgrade_to {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade_to);
    }
}

/// Adds `X-Forwarded-For` (appended), `-Proto`, `-Host` and an RFC 7239 `Forwarded` element.
fn add_forwarded(headers: &mut HeaderMap, client: IpAddr) {
    let client = client.to_canonical();
    let host = headers.get(header::HOST).cloned();

    let xff = match joined(headers, &X_FORWARDED_FOR) {
        Some(earlier) => format!("{earlier}, {client}"),
        None => client.to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&xff) {
        headers.insert(&X_FORWARDED_FOR, value);
    }
    headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    match &host {
        Some(host) => headers.insert(&X_FORWARDED_HOST, host.clone()),
        None => headers.remove(&X_FORWARDED_HOST),
    };

    let mut element = format!("for={};proto=http", forwarded_node(client));
    if let Some(host) = host.as_ref().and_then(|h| h.to_str().ok()) {
        element.push_str(";host=");
        push_token_or_quoted(&mut element, host);
    }
    let forwarded = match joined(headers, &header::FORWARDED) {
        Some(earlier) => format!("{earlier}, {element}"),
        None => element,
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded) {
        headers.insert(header::FORWARDED, value);
    }
}

/// Every value of `name`, comma-joined, if there is any (values that are not text are skipped).
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let first = values.next()?;
    Some(values.fold(first.to_owned(), |mut all, v| {
        all.push_str(", ");
        all.push_str(v);
        all
    }))
}

/// A `for=` node (RFC 7239 §6): IPv6 addresses are bracketed and so must be quoted.
fn forwarded_node(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    }
}

/// Appends `value` as a token if it is one, else as a quoted-string (RFC 7230 §3.2.6).
fn push_token_or_quoted(out: &mut String, value: &str) {
    let is_tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if !value.is_empty() && value.chars().all(is_tchar) {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(build: hyper::http::request::Builder) -> request::Parts {
        build.body(()).unwrap().into_parts().0
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_stripped() {
        let mut p = parts(
            Request::get("/x")
                .header("connection", "keep-alive, X-Secret")
                .header("x-secret", "1")
                .header("keep-alive", "timeout=5")
                .header("te", "trailers")
                .header("transfer-encoding", "chunked")
                .header("content-length", "5")
                .header("upgrade", "websocket")
                .header("proxy-connection", "keep-alive")
                .header("x-kept", "yes"),
        );
        strip_hop_by_hop(&mut p.headers, false);
        let names: Vec<&str> = p.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn an_upgrade_keeps_upgrade_and_connection_upgrade() {
        let req = Request::get("/ws")
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .header("keep-alive", "timeout=5")
            .body(())
            .unwrap();
        assert!(wants_upgrade(&req));
        let mut p = req.into_parts().0;
        strip_hop_by_hop(&mut p.headers, true);
        assert_eq!(p.headers["connection"], "upgrade");
        assert_eq!(p.headers["upgrade"], "websocket");
        assert!(!p.headers.contains_key("keep-alive"));
        let plain = Request::get("/").header("upgrade", "h2c").body(()).unwrap();
        assert!(
            !wants_upgrade(&plain),
            "Upgrade without Connection: upgrade"
        );
    }

    #[test]
    fn forwarded_headers_append_and_quote() {
        let mut p = parts(
            Request::get("/")
                .header("host", "example.com:8080")
                .header("x-forwarded-for", "10.0.0.1")
                .header("x-forwarded-for", "10.0.0.2")
                .header("forwarded", "for=10.0.0.1"),
        );
        prepare_request(&mut p, "127.0.0.1".parse().unwrap(), false);
        assert_eq!(
            p.headers["x-forwarded-for"],
            "10.0.0.1, 10.0.0.2, 127.0.0.1"
        );
        assert_eq!(p.headers["x-forwarded-proto"], "http");
        assert_eq!(p.headers["x-forwarded-host"], "example.com:8080");
        assert_eq!(
            p.headers["forwarded"],
            "for=10.0.0.1, for=127.0.0.1;proto=http;host=\"example.com:8080\""
        );

        let mut p = parts(Request::get("/").header("host", "example.com"));
        prepare_request(&mut p, "::1".parse().unwrap(), false);
        assert_eq!(p.headers["x-forwarded-for"], "::1");
        assert_eq!(
            p.headers["forwarded"],
            "for=\"[::1]\";proto=http;host=example.com"
        );

        // An IPv4 client seen through an IPv6 socket is reported as IPv4.
        let mut p = parts(Request::get("/").header("x-forwarded-host", "spoofed"));
        prepare_request(&mut p, "::ffff:192.0.2.7".parse().unwrap(), false);
        assert_eq!(p.headers["x-forwarded-for"], "192.0.2.7");
        assert_eq!(p.headers["forwarded"], "for=192.0.2.7;proto=http");
        assert!(!p.headers.contains_key("x-forwarded-host"));
    }

    #[test]
    fn absolute_form_becomes_origin_form_with_its_host() {
        let mut p = parts(
            Request::get("http://example.org:81/a/b?c=d")
                .version(Version::HTTP_2)
                .header("host", "other"),
        );
        prepare_request(&mut p, "127.0.0.1".parse().unwrap(), false);
        assert_eq!(p.uri, "/a/b?c=d");
        assert_eq!(p.version, Version::HTTP_11);
        assert_eq!(p.headers["host"], "example.org:81");
    }

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
}
