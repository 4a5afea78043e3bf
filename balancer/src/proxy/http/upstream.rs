//! Connections to workers: opening them (connect + HTTP/1.1 handshake, with timeouts), the idle
//! keep-alive pool that reuses them per worker process, and the [`Lease`] a request holds on its
//! worker and connection until its response body ends.
//!
//! Only HTTP/1.1 goes to workers: it is what every worker runtime speaks without setup, and a
//! connection per in-flight request keeps one slow response from holding up others.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use balancer_workers::{Chain, ConnGuard, PoolSnapshot};
use http_body_util::{Either, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::{self as client_http1, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// Kept worker connections idle for longer are not reused. Node closes idle keep-alive
/// connections after 5 s by default, and a request sent on a connection the worker is closing
/// fails after it was sent: only bodiless idempotent requests could be retried then.
const UPSTREAM_IDLE: Duration = Duration::from_secs(4);
/// Idle connections kept per worker.
const MAX_IDLE_PER_WORKER: usize = 64;

/// The body sent to a worker: the client's body, streamed as it arrives, or nothing.
pub type UpstreamBody = Either<Incoming, Empty<Bytes>>;

/// Why a connection to a worker could not be had.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed")]
    Connect(#[source] io::Error),
    #[error("HTTP/1 handshake failed")]
    Handshake(#[source] hyper::Error),
}

/// Opens a connection to a worker within `connect_timeout`, with TCP_NODELAY, and writes the
/// PROXY `header` first if there is one (before any HTTP byte, as the protocol requires).
pub(super) async fn open(
    addr: SocketAddr,
    connect_timeout: Duration,
    header: Option<&[u8]>,
) -> Result<TcpStream, ConnectError> {
    let mut stream = timeout(connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout(connect_timeout))?
        .map_err(ConnectError::Connect)?;
    let _ = stream.set_nodelay(true);
    if let Some(header) = header {
        tokio::io::AsyncWriteExt::write_all(&mut stream, header)
            .await
            .map_err(ConnectError::Connect)?;
    }
    Ok(stream)
}

/// Opens a new HTTP/1.1 connection to a worker; its driver task ends when the last sender is
/// dropped, on a connection error, or on `abort`.
pub(super) async fn connect(
    addr: SocketAddr,
    connect_timeout: Duration,
    abort: &CancellationToken,
    header: Option<&[u8]>,
) -> Result<SendRequest<UpstreamBody>, ConnectError> {
    let stream = open(addr, connect_timeout, header).await?;
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
pub(super) struct Key {
    pub(super) addr: SocketAddr,
    pub(super) pid: u32,
    /// With `proxy_protocol`: the client the connection's header names (it serves no other).
    pub(super) client: Option<SocketAddr>,
}

/// A kept connection to a worker: whether it can still carry a request.
pub(super) trait Kept {
    /// False once the worker closed it (or sent something unasked).
    fn usable(&mut self) -> bool;
}

impl Kept for SendRequest<UpstreamBody> {
    fn usable(&mut self) -> bool {
        !self.is_closed()
    }
}

/// A raw connection (the fast path's) is usable while the worker has sent nothing: neither
/// bytes nor its FIN. The reactor's readiness tells without a syscall in the common case; a
/// readiness left over from the last response is checked with a peek, which clears it.
impl Kept for TcpStream {
    fn usable(&mut self) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if self.poll_read_ready(&mut cx).is_pending() {
            return true;
        }
        let stream = &*self;
        matches!(
            self.try_io(tokio::io::Interest::READABLE, || peek(stream)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        )
    }
}

/// A raw connection kept for the io_uring threads: out of any epoll, so each check is a peek.
impl Kept for std::net::TcpStream {
    fn usable(&mut self) -> bool {
        matches!(peek(&*self), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// Peeks at one byte without waiting: `WouldBlock` while the worker has sent nothing.
fn peek(socket: &impl std::os::fd::AsRawFd) -> io::Result<usize> {
    let mut byte = [0u8; 1];
    nix::sys::socket::recv(
        socket.as_raw_fd(),
        &mut byte,
        nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)
}

/// Idle keep-alive connections to workers, most recently used last: hyper's senders for the
/// hyper path, raw sockets for the fast path.
#[derive(Debug)]
pub(super) struct IdlePool<C> {
    conns: Mutex<HashMap<Key, Vec<Idle<C>>>>,
}

impl<C> Default for IdlePool<C> {
    fn default() -> Self {
        IdlePool {
            conns: Mutex::default(),
        }
    }
}

#[derive(Debug)]
struct Idle<C> {
    conn: C,
    since: std::time::Instant,
}

impl<C: Kept> IdlePool<C> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Vec<Idle<C>>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used connection to `key` that is open and not too old.
    pub(super) fn checkout(&self, key: Key) -> Option<C> {
        let mut conns = self.lock();
        let list = conns.get_mut(&key)?;
        while let Some(mut idle) = list.pop() {
            if idle.since.elapsed() < UPSTREAM_IDLE && idle.conn.usable() {
                return Some(idle.conn);
            }
        }
        None
    }

    pub(super) fn checkin(&self, key: Key, conn: C) {
        let mut conns = self.lock();
        let list = conns.entry(key).or_default();
        if list.len() >= MAX_IDLE_PER_WORKER {
            list.retain_mut(|i| i.since.elapsed() < UPSTREAM_IDLE && i.conn.usable());
            if list.len() >= MAX_IDLE_PER_WORKER {
                list.remove(0);
            }
        }
        list.push(Idle {
            conn,
            since: std::time::Instant::now(),
        });
    }

    /// Keeps only the connections of workers that are in `snapshot` and not draining.
    pub(super) fn retain(&self, snapshot: &PoolSnapshot) {
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
pub(super) struct Lease {
    pub(super) guard: ConnGuard,
    /// `None` when the connection must not be reused (a refused upgrade).
    pub(super) conn: Option<(Key, SendRequest<UpstreamBody>)>,
    pub(super) idle: Arc<IdlePool<SendRequest<UpstreamBody>>>,
}

impl Lease {
    /// Ends the request's hold: the connection goes back to the idle pool if `reusable`
    /// (its response was read to the end) and its worker still takes requests.
    pub(super) fn release(self, reusable: bool) {
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
