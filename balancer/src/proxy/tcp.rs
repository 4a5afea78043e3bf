//! TCP proxying: connect to a ready worker (retrying the next one on refusal or timeout, waiting
//! up to `queue_timeout` when none is ready), then copy both ways with half-close preserved.

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use balancer_workers::ConnGuard;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::metrics::Active;
use super::proxy_protocol::{self, HeaderError};
use super::{Attempt, PickError, Route, RouteSettings, pick_and_connect};

/// Time allowed to connect a rescued connection to the public address (the kernel answers a
/// loopback connect at once unless the accept queue is full).
const RESCUE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a TCP connection could not be proxied (distinct from the HTTP proxy's per-request
/// [`HttpProxyError`](super::http::HttpProxyError)).
#[derive(Debug, thiserror::Error)]
pub enum TcpProxyError {
    /// No worker accepted within `queue_timeout`.
    #[error("no ready worker accepted the connection within queue_timeout {0:?}")]
    NoWorker(Duration),
    /// The master is shutting down.
    #[error("shutting down")]
    Shutdown,
    /// The client hung up while waiting for a worker.
    #[error("the client closed the connection while it waited for a worker")]
    ClientGone,
    /// Copying failed after the connection was established.
    #[error("copy between client and worker failed")]
    Copy(#[source] io::Error),
    /// The client's PROXY header (`accept_proxy`) was refused; no worker saw the connection.
    #[error("refused the client's PROXY header")]
    Header(#[source] HeaderError),
}

/// Bytes moved by one proxied connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Client to worker.
    pub to_worker: u64,
    /// Worker to client.
    pub to_client: u64,
}

/// Connects to a ready worker for a client at `client`: every ready worker is tried once per
/// pass, the app's `balance` choosing the first; a refused or timed-out connect steps to the
/// next worker, and a pass that found none waits in the queue ([`pick_and_connect`]), until
/// `queue_timeout`. `header` (a PROXY header) is written before anything else; a worker that
/// fails to take it is stepped past like one that refused.
pub async fn connect(
    route: &Route,
    settings: &RouteSettings,
    shutdown: &CancellationToken,
    client: IpAddr,
    header: Option<&[u8]>,
) -> Result<(TcpStream, ConnGuard), TcpProxyError> {
    pick_and_connect(route, settings, shutdown, client, (), |pick, ()| async move {
        let addr = pick.addr;
        match timeout(settings.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(mut stream)) => match header {
                Some(header) => match stream.write_all(header).await {
                    Ok(()) => Attempt::Connected((stream, pick.guard)),
                    Err(e) => {
                        tracing::debug!(app = %route.app, id = pick.worker().id, %addr, "PROXY header not sent: {e}; trying the next worker");
                        Attempt::Next(())
                    }
                },
                None => Attempt::Connected((stream, pick.guard)),
            },
            Ok(Err(e)) => {
                connect_failed(route, &pick, settings.listener_index);
                tracing::debug!(app = %route.app, id = pick.worker().id, %addr, "connect failed: {e}; trying the next worker");
                Attempt::<_, _, Infallible>::Next(())
            }
            Err(_) => {
                connect_failed(route, &pick, settings.listener_index);
                tracing::debug!(app = %route.app, id = pick.worker().id, %addr, "connect timed out; trying the next worker");
                Attempt::Next(())
            }
        }
    })
    .await
    .map_err(|e| match e {
        PickError::NoWorker(waited) => TcpProxyError::NoWorker(waited),
        PickError::Stopped => TcpProxyError::Shutdown,
        PickError::GaveUp(never) => match never {},
    })
}

/// Proxies one client connection (from `peer`) to a worker until both directions are closed.
///
/// With `accept_proxy` the client's PROXY header is read first (within `connect_timeout`,
/// before any worker is picked) and names the client; with `proxy_protocol` the worker is told
/// who the client is, the original one when a header was accepted.
pub async fn proxy(
    mut client: TcpStream,
    peer: SocketAddr,
    route: &Route,
    shutdown: &CancellationToken,
) -> Result<Transferred, TcpProxyError> {
    // One settings load per connection; the connect loop and the meters use the same copy.
    let settings = route.settings();
    // The local address is a syscall: only the PROXY protocol needs it.
    let local = |client: &TcpStream| client.local_addr().unwrap_or(peer);
    let (source, destination) = if settings.accept_proxy {
        match proxy_protocol::read_header(&mut client, settings.connect_timeout).await {
            Ok(Some(addrs)) => (addrs.source, addrs.destination),
            Ok(None) => (peer, local(&client)),
            Err(e) => return Err(TcpProxyError::Header(e)),
        }
    } else if settings.proxy_protocol.is_some() {
        (peer, local(&client))
    } else {
        (peer, peer)
    };
    let header = settings
        .proxy_protocol
        .map(|version| proxy_protocol::encode(version, source, destination));
    route.meters.accepted.increment(1);
    // A client that hangs up while its connection waits for a worker (queue_timeout can be
    // long) must not keep two descriptors, or later get a worker connection nobody reads.
    let (upstream, guard) = tokio::select! {
        connected = connect(route, &settings, shutdown, source.ip(), header.as_deref()) => connected?,
        () = hung_up(&client) => return Err(TcpProxyError::ClientGone),
    };
    // The client has TCP_NODELAY from the listener (`listener::tcp::bind`).
    let _ = upstream.set_nodelay(true);
    // Each EOF shuts down the other side's write half and the other direction goes on:
    // half-close passes through in both directions. Buffers are borrowed only while bytes move.
    let meters = route.meters.worker(guard.worker(), settings.listener_index);
    let _active = meters.map(Active::enter);
    let (to_worker, to_client) = match carry(client, upstream, route).await {
        Ok(moved) => moved,
        // One side left having sent nothing either way: nothing to carry.
        Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => (0, 0),
        Err(e) => return Err(TcpProxyError::Copy(e)),
    };
    guard
        .worker()
        .add_bytes(to_worker.saturating_add(to_client));
    if let Some(m) = meters {
        m.bytes_to_worker.increment(to_worker);
        m.bytes_to_client.increment(to_client);
    }
    Ok(Transferred {
        to_worker,
        to_client,
    })
}

/// Copies an established connection both ways to its end: on the runtime's epoll, and, with
/// [`uring::on`](super::uring::on), on an io_uring ring once it has gone back and forth.
async fn carry(client: TcpStream, upstream: TcpStream, route: &Route) -> io::Result<(u64, u64)> {
    use super::copy::{self, Carry, Copied};
    use super::uring::{self, NotCarried};
    if !uring::on() {
        return copy::bidirectional(&client, &upstream).await;
    }
    let (early_in, early_out) = match copy::until(&client, &upstream, Carry::Interactive).await? {
        Copied::Done(to_worker, to_client) => return Ok((to_worker, to_client)),
        Copied::Carry(to_worker, to_client) => (to_worker, to_client),
    };
    let (to_worker, to_client) = match uring::carry(client, upstream, || {
        route.meters.carried.increment(1);
    })
    .await
    {
        Ok(moved) => moved?,
        Err(NotCarried::NoRing(client, upstream)) => {
            copy::bidirectional(&client, &upstream).await?
        }
        Err(NotCarried::Lost(e)) => return Err(e),
    };
    Ok((early_in + to_worker, early_out + to_client))
}

/// Counts a failed connect against the worker and as a retry of the listener.
fn connect_failed(route: &Route, pick: &super::Pick, listener_index: usize) {
    route.meters.retries.increment(1);
    if let Some(m) = route.meters.worker(pick.worker(), listener_index) {
        m.connect_errors.increment(1);
    }
}

/// A connect normally takes well under this: only a connection still waiting for a worker
/// after it watches its client (so the common path costs a timer, not a syscall).
const HANG_UP_WATCH_AFTER: Duration = Duration::from_millis(50);

/// Resolves when the client closed (or reset) its connection before sending anything. A
/// client that sent data, even followed by its FIN, is served: that is a half-closed request.
async fn hung_up(client: &TcpStream) {
    tokio::time::sleep(HANG_UP_WATCH_AFTER).await;
    let mut byte = [0u8; 1];
    match client.peek(&mut byte).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending::<()>().await,
    }
}

/// Carries a connection rescued from a leaving reuseport socket to `target`, the public
/// address, where the group's steering program hands it to a live worker (the reuseport
/// policy's [`Rescue`](balancer_workers::reuseport::Rescue) hook).
pub fn rescue(client: TcpStream, target: std::net::SocketAddr) {
    tokio::spawn(async move {
        match timeout(RESCUE_CONNECT_TIMEOUT, TcpStream::connect(target)).await {
            Ok(Ok(upstream)) => {
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let _ = super::copy::bidirectional(&client, &upstream).await;
            }
            Ok(Err(e)) => tracing::debug!(%target, "rescued connection: connect failed: {e}"),
            Err(_) => tracing::debug!(%target, "rescued connection: connect timed out"),
        }
    });
}
