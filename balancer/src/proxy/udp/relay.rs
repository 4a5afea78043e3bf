//! A flow's link to its worker ([`Upstream`]: the connected socket, the live count, the last
//! datagram kept for a replay) and the relay task that carries the worker's replies back to the
//! client from the public socket. The relay never touches the flow table: it shares two atomics
//! with its flow ([`FlowShared`]) and reports a failure over a channel ([`Broken`]).

use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use balancer_workers::{ConnGuard, WorkerHandle};
use socket2::{SockAddr, SockRef};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::{MAX_DATAGRAM, REPLAY_MAX};
use crate::proxy::Pick;
use crate::proxy::metrics::UdpMeters;

/// Failure reports in flight from relays to the dispatcher; past it a flow's failure is still
/// seen on its next datagram (through the shared flag), just not acted on early.
const EVENTS: usize = 1024;
/// Replies a relay moves per wake-up before it lets other tasks run.
const RELAY_BATCH: usize = 32;

thread_local! {
    /// One receive buffer per runtime thread, shared by the relays that run on it: a relay
    /// never awaits while it holds the buffer, so thousands of flows cost no buffer memory.
    static REPLY_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_DATAGRAM]);
}

/// A relay's report that its upstream socket failed (a bounce, or another error).
#[derive(Debug, Clone, Copy)]
pub struct Broken {
    pub(super) client: SocketAddr,
    pub(super) upstream: u64,
}

const UPSTREAM_OK: u8 = 0;
const UPSTREAM_REFUSED: u8 = 1;
const UPSTREAM_BROKEN: u8 = 2;

/// What a flow's relay shares with the dispatcher.
#[derive(Debug)]
struct FlowShared {
    /// Base of `last_reply`.
    epoch: Instant,
    /// When the worker last replied, in nanoseconds after `epoch` (0: never).
    last_reply: AtomicU64,
    /// `UPSTREAM_*`: whether the upstream socket failed, and how.
    state: AtomicU8,
}

impl FlowShared {
    fn new(epoch: Instant) -> Self {
        FlowShared {
            epoch,
            last_reply: AtomicU64::new(0),
            state: AtomicU8::new(UPSTREAM_OK),
        }
    }

    fn replied(&self) {
        let nanos = Instant::now()
            .saturating_duration_since(self.epoch)
            .as_nanos();
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX).max(1);
        self.last_reply.store(nanos, Ordering::Relaxed);
    }

    fn last_reply(&self) -> Option<Instant> {
        match self.last_reply.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(self.epoch + Duration::from_nanos(nanos)),
        }
    }

    fn fail(&self, error: &io::Error) {
        let state = if is_refused(error) {
            UPSTREAM_REFUSED
        } else {
            UPSTREAM_BROKEN
        };
        self.state.store(state, Ordering::SeqCst);
    }
}

fn is_refused(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::ConnectionRefused
}

/// A flow's link to its worker: the connected socket, the relay reading it, and the live count
/// the flow holds on the worker.
#[derive(Debug)]
pub(super) struct Upstream {
    /// Identifies this link (a relay's failure report names it).
    pub(super) id: u64,
    guard: ConnGuard,
    socket: Arc<UdpSocket>,
    shared: Arc<FlowShared>,
    relay: AbortHandle,
    /// The last datagram sent, kept for a replay should it bounce (empty when too large).
    pub(super) last: Vec<u8>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // The relay holds the other reference to the socket: ending it closes the descriptor.
        self.relay.abort();
    }
}

/// What happened to a datagram sent upstream.
pub(super) enum Sent {
    Ok,
    Dropped,
    /// The worker's port bounced an earlier datagram: this one was not sent.
    Refused,
}

/// Whether a flow's worker can still be used.
pub(super) enum Usable {
    Yes,
    /// Its port bounced a datagram: move, resending the last one.
    Refused,
    /// Its process exited or the socket failed otherwise: move.
    No,
}

impl Upstream {
    /// When the worker last replied on this link (activity the flow table is not told about).
    pub(super) fn last_reply(&self) -> Option<Instant> {
        self.shared.last_reply()
    }

    pub(super) fn worker(&self) -> &Arc<WorkerHandle> {
        self.guard.worker()
    }

    pub(super) fn usable(&self) -> Usable {
        match self.shared.state.load(Ordering::SeqCst) {
            UPSTREAM_REFUSED => return Usable::Refused,
            UPSTREAM_BROKEN => return Usable::No,
            _ => {}
        }
        if !self.worker().is_gone() {
            return Usable::Yes;
        }
        // The process exited: a datagram may have bounced off its closed port before the relay
        // had a chance to report it. Look, so that it is replayed rather than lost.
        match self.socket.take_error() {
            Ok(Some(e)) if is_refused(&e) => Usable::Refused,
            _ => Usable::No,
        }
    }

    pub(super) fn send(&mut self, data: &[u8]) -> Sent {
        // Straight to the kernel: tokio's `try_send` would refuse a fresh socket whose first
        // writable event the reactor has not seen yet.
        match SockRef::from(&*self.socket).send(data) {
            Ok(_) => {
                self.last.clear();
                if data.len() <= REPLAY_MAX {
                    self.last.extend_from_slice(data);
                }
                Sent::Ok
            }
            Err(e) if is_refused(&e) => {
                self.shared.fail(&e);
                Sent::Refused
            }
            Err(e) => {
                tracing::debug!(worker = self.worker().id, "udp send to worker failed: {e}");
                Sent::Dropped
            }
        }
    }
}

/// What the relays of one listener share: the public socket replies leave from, the channel
/// their failure reports go to, the tracker they run on, and how many are still alive.
#[derive(Debug)]
pub(super) struct Relays {
    public: Arc<UdpSocket>,
    meters: Arc<UdpMeters>,
    tracker: TaskTracker,
    events: mpsc::Sender<Broken>,
    /// Base of every flow's reply clock ([`FlowShared`]).
    epoch: Instant,
    /// Relay tasks not yet dropped: each holds its flow's socket open.
    alive: Arc<AtomicUsize>,
}

impl Relays {
    /// Relays answering from `public`, run on `tracker`; also returns the receiver of their
    /// failure reports.
    pub(super) fn new(
        public: Arc<UdpSocket>,
        tracker: TaskTracker,
        meters: Arc<UdpMeters>,
    ) -> (Self, mpsc::Receiver<Broken>) {
        let (events, reports) = mpsc::channel(EVENTS);
        let relays = Relays {
            public,
            meters,
            tracker,
            events,
            epoch: Instant::now(),
            alive: Arc::new(AtomicUsize::new(0)),
        };
        (relays, reports)
    }

    /// Relay tasks not dropped yet. An aborted relay is dropped (closing its socket) on a later
    /// turn of the runtime, so this runs ahead of the flow count for a moment after evictions.
    pub(super) fn alive(&self) -> usize {
        self.alive.load(Ordering::SeqCst)
    }

    /// Links `client`'s flow to the picked worker: opens the upstream socket and starts its
    /// relay. `id` names the link in the relay's failure report. Fails only when the socket
    /// cannot be opened (out of descriptors, most likely).
    pub(super) fn start(&self, client: SocketAddr, id: u64, pick: Pick) -> io::Result<Upstream> {
        let socket = Arc::new(connect(pick.addr)?);
        let shared = Arc::new(FlowShared::new(self.epoch));
        self.alive.fetch_add(1, Ordering::SeqCst);
        let relay = Relay {
            _alive: RelayAlive(Arc::clone(&self.alive)),
            client,
            upstream: id,
            socket: Arc::clone(&socket),
            public: Arc::clone(&self.public),
            meters: Arc::clone(&self.meters),
            shared: Arc::clone(&shared),
            events: self.events.clone(),
        };
        let relay = self.tracker.spawn(relay.run()).abort_handle();
        Ok(Upstream {
            id,
            guard: pick.guard,
            socket,
            shared,
            relay,
            last: Vec::new(),
        })
    }
}

/// Opens the upstream socket of a flow: an ephemeral port, connected to the worker so that only
/// its datagrams are received, and bounces are reported. Ephemeral ports never collide with a
/// worker's private port: those come from below the ephemeral range (`process::private_port`).
fn connect(worker: SocketAddr) -> io::Result<UdpSocket> {
    let local = match worker.ip() {
        ip if ip.is_loopback() => SocketAddr::new(ip, 0),
        IpAddr::V4(_) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
        IpAddr::V6(_) => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0),
    };
    let socket = std::net::UdpSocket::bind(local)?;
    socket.connect(worker)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// Counts a relay task as alive until it is dropped (see [`Relays::alive`]).
struct RelayAlive(Arc<AtomicUsize>);

impl Drop for RelayAlive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Carries one flow's replies from its worker to its client.
struct Relay {
    /// Held for its `Drop`.
    _alive: RelayAlive,
    client: SocketAddr,
    upstream: u64,
    socket: Arc<UdpSocket>,
    public: Arc<UdpSocket>,
    meters: Arc<UdpMeters>,
    shared: Arc<FlowShared>,
    events: mpsc::Sender<Broken>,
}

impl Relay {
    /// Relays until the socket fails (or the flow is dropped, which aborts this task).
    async fn run(self) {
        let error = loop {
            // ERROR too: a bounce raises only EPOLLERR, which `readable()` would not see.
            let ready = match self
                .socket
                .ready(Interest::READABLE | Interest::ERROR)
                .await
            {
                Ok(ready) => ready,
                Err(e) => break e,
            };
            if ready.is_error() {
                // The dispatcher may have taken the error already (its send saw it); then this
                // clears the readiness instead of spinning.
                let taken =
                    self.socket
                        .try_io(Interest::ERROR, || match self.socket.take_error() {
                            Ok(Some(e)) => Ok(e),
                            Ok(None) => Err(io::ErrorKind::WouldBlock.into()),
                            Err(e) => Ok(e),
                        });
                if let Ok(e) = taken {
                    break e;
                }
            }
            if ready.is_readable()
                && let Err(e) = self.relay_ready().await
            {
                break e;
            }
        };
        self.shared.fail(&error);
        tracing::debug!(client = %self.client, "udp flow's worker socket failed: {error}");
        let _ = self.events.try_send(Broken {
            client: self.client,
            upstream: self.upstream,
        });
    }

    /// Moves the replies waiting on the socket (up to [`RELAY_BATCH`]).
    async fn relay_ready(&self) -> io::Result<()> {
        let public = SockRef::from(&*self.public);
        let client = SockAddr::from(self.client);
        for _ in 0..RELAY_BATCH {
            // Receive and send without awaiting, so the thread's buffer is free again at once.
            let step: io::Result<Option<Vec<u8>>> = REPLY_BUF.with_borrow_mut(|buf| {
                let n = self.socket.try_recv(buf)?;
                self.shared.replied();
                Ok(match public.send_to(&buf[..n], &client) {
                    Ok(_) => {
                        self.meters.to_client(n);
                        None
                    }
                    // The public socket's send buffer is full: wait for room with a copy.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(buf[..n].to_vec()),
                    Err(e) => {
                        tracing::debug!(client = %self.client, "udp reply to client failed: {e}");
                        None
                    }
                })
            });
            match step {
                Ok(None) => {}
                Ok(Some(reply)) => match self.public.send_to(&reply, self.client).await {
                    Ok(_) => self.meters.to_client(reply.len()),
                    Err(e) => {
                        tracing::debug!(client = %self.client, "udp reply to client failed: {e}");
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
