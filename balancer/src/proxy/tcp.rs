//! TCP proxying: connect to a ready worker (retrying the next one on refusal or timeout, waiting
//! up to `queue_timeout` when none is ready), then copy both ways with half-close preserved.

use std::io;
use std::time::Duration;

use balancer_workers::ConnGuard;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use super::{QueueEnd, Route, wait_in_queue};
use crate::policy::round_robin;

/// Per-direction copy buffer: HAProxy's default `tune.bufsize`; twice tokio's default, which
/// measurably helps bulk transfers while keeping a connection's memory small.
const COPY_BUFFER: usize = 16 * 1024;

/// Time allowed to connect a rescued connection to the public address (the kernel answers a
/// loopback connect at once unless the accept queue is full).
const RESCUE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a connection could not be proxied.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No worker accepted within `queue_timeout`.
    #[error("no ready worker accepted the connection within queue_timeout {0:?}")]
    NoWorker(Duration),
    /// The master is shutting down.
    #[error("shutting down")]
    Shutdown,
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
/// round-robin cursor; when a pass fails or the pool is empty, waits for the pool to change (or a
/// short pause) and tries again, until `queue_timeout`.
pub async fn connect(
    route: &Route,
    shutdown: &CancellationToken,
) -> Result<(TcpStream, ConnGuard), ProxyError> {
    let settings = route.settings();
    let deadline = Instant::now() + settings.queue_timeout;
    let mut changes = route.pool.subscribe();
    loop {
        changes.borrow_and_update();
        let mut tried = 0;
        for worker in round_robin::candidates(&route.pool) {
            let Some(guard) = worker.acquire() else {
                continue;
            };
            let Some(&addr) = worker.addrs.get(settings.listener_index) else {
                continue;
            };
            tried += 1;
            match timeout(settings.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => return Ok((stream, guard)),
                Ok(Err(e)) => {
                    tracing::debug!(app = %route.app, id = worker.id, %addr, "connect failed: {e}; trying the next worker");
                }
                Err(_) => {
                    tracing::debug!(app = %route.app, id = worker.id, %addr, "connect timed out; trying the next worker");
                }
            }
        }
        wait_in_queue(&mut changes, tried > 0, deadline, shutdown)
            .await
            .map_err(|end| match end {
                QueueEnd::TimedOut => ProxyError::NoWorker(settings.queue_timeout),
                QueueEnd::Stopped => ProxyError::Shutdown,
            })?;
    }
}

/// Proxies one client connection to a worker until both directions are closed.
pub async fn proxy(
    mut client: TcpStream,
    route: &Route,
    shutdown: &CancellationToken,
) -> Result<Transferred, ProxyError> {
    let (mut upstream, _guard) = connect(route, shutdown).await?;
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    // copy_bidirectional shuts down each write side when its read side hits EOF and keeps the
    // other direction going: half-close passes through in both directions.
    let (to_worker, to_client) = tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut upstream,
        COPY_BUFFER,
        COPY_BUFFER,
    )
    .await
    .map_err(ProxyError::Copy)?;
    Ok(Transferred {
        to_worker,
        to_client,
    })
}

/// Carries a connection rescued from a leaving reuseport socket to `target`, the public
/// address, where the group's steering program hands it to a live worker (the reuseport
/// policy's [`Rescue`](balancer_workers::reuseport::Rescue) hook).
pub fn rescue(mut client: TcpStream, target: std::net::SocketAddr) {
    tokio::spawn(async move {
        match timeout(RESCUE_CONNECT_TIMEOUT, TcpStream::connect(target)).await {
            Ok(Ok(mut upstream)) => {
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional_with_sizes(
                    &mut client,
                    &mut upstream,
                    COPY_BUFFER,
                    COPY_BUFFER,
                )
                .await;
            }
            Ok(Err(e)) => tracing::debug!(%target, "rescued connection: connect failed: {e}"),
            Err(_) => tracing::debug!(%target, "rescued connection: connect timed out"),
        }
    });
}
