//! TCP proxying: connect to a ready worker (retrying the next one on refusal or timeout, waiting
//! up to `queue_timeout` when none is ready), then copy both ways with half-close preserved.

use std::convert::Infallible;
use std::io;
use std::time::Duration;

use balancer_workers::ConnGuard;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::metrics::Active;
use super::{Attempt, PickError, Route, pick_and_connect};

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
}

/// Bytes moved by one proxied connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Client to worker.
    pub to_worker: u64,
    /// Worker to client.
    pub to_client: u64,
}

/// Connects to a ready worker: every ready worker is tried once per pass, starting at the
/// round-robin cursor; a refused or timed-out connect steps to the next worker, and a pass that
/// found none waits in the queue ([`pick_and_connect`]), until `queue_timeout`.
pub async fn connect(
    route: &Route,
    shutdown: &CancellationToken,
) -> Result<(TcpStream, ConnGuard), TcpProxyError> {
    let settings = route.settings();
    pick_and_connect(route, &settings, shutdown, (), |pick, ()| async move {
        let addr = pick.addr;
        match timeout(settings.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => Attempt::Connected((stream, pick.guard)),
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

/// Proxies one client connection to a worker until both directions are closed.
pub async fn proxy(
    client: TcpStream,
    route: &Route,
    shutdown: &CancellationToken,
) -> Result<Transferred, TcpProxyError> {
    route.meters.accepted.increment(1);
    // A client that hangs up while its connection waits for a worker (queue_timeout can be
    // long) must not keep two descriptors, or later get a worker connection nobody reads.
    let (upstream, guard) = tokio::select! {
        connected = connect(route, shutdown) => connected?,
        () = hung_up(&client) => return Err(TcpProxyError::ClientGone),
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    // Each EOF shuts down the other side's write half and the other direction goes on:
    // half-close passes through in both directions. Buffers are borrowed only while bytes move.
    let meters = route
        .meters
        .worker(guard.worker(), route.settings().listener_index);
    let _active = meters.map(Active::enter);
    let (to_worker, to_client) = super::copy::bidirectional(&client, &upstream)
        .await
        .map_err(TcpProxyError::Copy)?;
    if let Some(m) = meters {
        m.bytes_to_worker.increment(to_worker);
        m.bytes_to_client.increment(to_client);
    }
    Ok(Transferred {
        to_worker,
        to_client,
    })
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
