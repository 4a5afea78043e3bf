//! The public UDP listener: bind it, and run the dispatcher that reads every client datagram
//! and hands it to the flow table ([`crate::proxy::udp`], which explains the design).
//!
//! One task per listener owns the public socket's receive side and the flow table, so the table
//! needs no lock; the per-flow relays only *send* on the public socket (replies leave from the
//! public address). The loop also watches the relays' failure reports, the pool (to release
//! datagrams held while no worker was ready) and a timer for idle flows.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::time::{Instant, sleep, sleep_until};

use crate::proxy::udp::{Flows, MAX_DATAGRAM};

/// Kernel buffers asked for the public socket (the kernel caps them at `net.core.rmem_max` /
/// `wmem_max`): bursts from many clients wait there while the dispatcher is busy.
const SOCKET_BUFFER: usize = 2 << 20;
/// Datagrams read per wake-up before the loop looks at its other inputs again.
const RECV_BATCH: usize = 32;
/// Pause after an unexpected receive error, so a persistent one cannot spin the loop.
const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// The timer's deadline when nothing is due.
const FAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// Binds a public UDP socket with large kernel buffers; IPv6 wildcards are v6-only so `[::]` and
/// `0.0.0.0` can be bound side by side. No SO_REUSEADDR: for UDP it would let a second process
/// bind the same port and silently take its datagrams.
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Best effort: a smaller buffer only means more drops under bursts.
    if let Err(e) = socket.set_recv_buffer_size(SOCKET_BUFFER) {
        tracing::debug!(%addr, "SO_RCVBUF: {e}");
    }
    if let Err(e) = socket.set_send_buffer_size(SOCKET_BUFFER) {
        tracing::debug!(%addr, "SO_SNDBUF: {e}");
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Serves UDP flows: reads client datagrams until `stop`, then lets established flows relay
/// the replies still coming (until quiet) and returns; `abort` ends everything at once. Relays
/// run on `tracker`.
pub async fn serve(socket: UdpSocket, ctx: super::ServeContext) {
    let super::ServeContext {
        route,
        stop,
        abort,
        tracker,
    } = ctx;
    let public = Arc::new(socket);
    let (mut flows, mut reports) = Flows::new(Arc::clone(&route), Arc::clone(&public), tracker);
    let mut pool_changes = route.pool.subscribe();
    let mut pool_alive = true;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let timer = sleep_until(Instant::now() + FAR);
    tokio::pin!(timer);
    let mut stopping = false;
    loop {
        // Only move the timer earlier: one that fires early finds nothing to do and is re-armed,
        // which is cheaper than re-arming it on every datagram.
        let due = flows
            .next_deadline()
            .unwrap_or_else(|| Instant::now() + FAR);
        if due < timer.deadline() {
            timer.as_mut().reset(due);
        }
        tokio::select! {
            biased;
            _ = abort.cancelled() => break,
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                flows.stop();
            }
            Some(report) = reports.recv() => flows.broken(report),
            changed = pool_changes.changed(), if pool_alive && flows.has_held() => match changed {
                Ok(()) => flows.pool_changed(),
                Err(_) => pool_alive = false,
            },
            _ = &mut timer => {
                flows.expire();
                timer.as_mut().reset(Instant::now() + FAR);
            }
            received = public.recv_from(&mut buf), if !stopping => match received {
                Ok((n, client)) => {
                    flows.datagram(client, &buf[..n]);
                    for _ in 1..RECV_BATCH {
                        if flows.closing() > 0 {
                            break;
                        }
                        match public.try_recv_from(&mut buf) {
                            Ok((n, client)) => flows.datagram(client, &buf[..n]),
                            Err(_) => break,
                        }
                    }
                    if flows.closing() > 0 {
                        // Let the evicted flows' relays be dropped (closing their sockets)
                        // before taking more new clients.
                        tokio::task::yield_now().await;
                    }
                }
                Err(e) => receive_error(&e).await,
            },
        }
        if stopping && flows.is_empty() {
            break;
        }
    }
    tracing::debug!(app = %route.app, stats = ?flows.stats(), "udp listener stopped");
}

async fn receive_error(e: &io::Error) {
    match e.kind() {
        // Leftovers of ICMP errors about earlier replies, or a signal: nothing to do.
        io::ErrorKind::ConnectionRefused
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::Interrupted
        | io::ErrorKind::WouldBlock => {}
        _ => {
            tracing::debug!("udp receive: {e}");
            sleep(ERROR_PAUSE).await;
        }
    }
}
