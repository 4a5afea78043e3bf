//! UDP flow proxying: the dispatcher ([`dispatch`], one task per listener, [`Flows`] its state)
//! that pins each client address to one worker, and the per-flow relays that carry the worker's
//! replies back to the client. The flow table is `table`'s, the relays and upstream sockets
//! `relay`'s, the datagrams waiting for a worker `hold`'s.
//!
//! **A flow** is a client address (ip, port). Its first datagram picks a ready worker round-robin
//! and opens an *upstream socket* for it: a UDP socket of its own, bound to an ephemeral loopback
//! port and `connect`ed to the worker's private address. Every later datagram from that client
//! goes out on the same socket, so the worker sees one stable peer per client (what a stateful UDP
//! server — QUIC, DTLS, a game — needs), and whatever arrives on the socket can only be that
//! worker's reply to that client: the kernel does the matching, no lookup is needed on the way
//! back. Each flow has a small relay task that waits on its socket and sends each reply to the
//! client *from the public socket*, so clients only ever see the address they talked to. The cost
//! is one file descriptor per flow, which is why the table is bounded.
//!
//! **Ownership.** The table lives in one task, the listener's dispatcher ([`Flows`] is its state),
//! which also owns the public socket's receive side, as a plain `HashMap`: no lock and no concurrent map on the hot path. A relay shares two atomics
//! with its flow (when the worker last replied, and whether the socket failed) and reports a
//! failure over a bounded channel; it never touches the table.
//!
//! **Bounds.** At most `max_flows` flows: a new client when the table is full evicts the *least
//! recently active* flow (a datagram either way counts as activity), so a flood of spoofed or
//! one-shot source addresses recycles the same slots instead of growing memory or descriptors, and
//! it pushes out flows that went quiet before ones in use. A flow with no datagram either way for
//! `udp_idle_timeout` is forgotten. Forgetting a flow drops its socket, ends its relay and releases
//! the worker's live count (a drain waits for it). Both limits are read from the route's settings
//! whenever they are used, so a reload that changes them applies to the next datagram.
//!
//! **Workers going away.** A draining worker keeps its flows (its process still runs) until they
//! go idle or the supervisor stops it at `drain_timeout`. A worker whose process exited
//! ([`WorkerHandle::is_gone`]) or whose port bounced a datagram (ICMP port unreachable, seen as
//! `ECONNREFUSED` on the connected socket) loses its flows: each moves to another ready worker,
//! on its next datagram or at once when there is something to resend. A bounce is exact
//! information — the datagram was *not* delivered — so the last datagram sent to the dead worker
//! (kept when it is at most [`REPLAY_MAX`] bytes) is resent to the new worker: a client whose
//! request hit a worker in the middle of its exit still gets an answer. Every datagram sent after
//! the worker's socket closed bounces and the error is raised only after one of them, so the one
//! kept, the latest, is always one that bounced and never a duplicate of a delivered one.
//! Datagrams already queued in the worker's socket when it died are lost; that is UDP.
//!
//! **No ready worker.** A datagram that finds no ready worker is *held*, like a TCP connection
//! waiting in the backlog: at most [`HOLD_PER_FLOW`] per flow and [`HOLD_MAX`] datagrams /
//! [`HOLD_BYTES`] bytes in all, for at most `queue_timeout`. They are sent in arrival order as soon
//! as a worker becomes ready; past the timeout or the limits they are dropped (counted, with a
//! warning at most every [`WARN_EVERY`]). Nothing is logged per datagram above `debug`.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use balancer_workers::WorkerHandle;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::task::TaskTracker;

use super::metrics::UdpMeters;
use super::{Route, ServeContext, Walk};
use hold::Held;
use relay::{Relays, Sent, Upstream, Usable};

mod hold;
mod relay;
mod table;

pub use hold::{HOLD_BYTES, HOLD_MAX, HOLD_PER_FLOW};
pub use relay::Broken;
pub use table::FlowTable;

/// Receive buffer size: the largest UDP payload (65,507 bytes over IPv4, 65,527 over IPv6) fits,
/// so no datagram is ever truncated.
pub const MAX_DATAGRAM: usize = 65_536;
/// The largest datagram kept per flow for a replay after a bounce (a full Ethernet frame's
/// payload): enough for DNS, QUIC and game traffic, and at most `max_flows` × this in memory.
pub const REPLAY_MAX: usize = 1472;
/// After `stop`, a flow lingers (relaying the replies to what it already forwarded) until it
/// has been quiet this long, or `udp_idle_timeout` if shorter.
pub const STOP_LINGER: Duration = Duration::from_secs(1);
/// Dropped-datagram warnings are rate limited to one per this period.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// Counters of one UDP listener (for logs and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlowStats {
    /// Flows created for a new client address.
    pub opened: u64,
    /// Flows forgotten after `udp_idle_timeout` of silence.
    pub expired: u64,
    /// Flows evicted to make room for a new client (the table was full).
    pub evicted: u64,
    /// Flows moved to another worker because theirs went away.
    pub moved: u64,
    /// Datagrams resent to a new worker after they bounced off the old one.
    pub replayed: u64,
    /// Datagrams sent to workers.
    pub forwarded: u64,
    /// Datagrams held while no worker was ready.
    pub held: u64,
    /// Datagrams dropped: no ready worker within `queue_timeout`, hold limits, full buffers.
    pub dropped: u64,
}

/// One flow: a client address and, when it has one, its worker.
#[derive(Debug)]
struct Flow {
    /// Identifies this table entry (held datagrams name it).
    id: u64,
    /// `None` while the flow waits for a ready worker.
    upstream: Option<Upstream>,
    /// Datagrams of this flow in the hold queue.
    held: usize,
}

impl Flow {
    fn last_reply(&self) -> Option<Instant> {
        self.upstream.as_ref()?.last_reply()
    }
}

/// The state of one UDP listener's dispatcher: its flow table, held datagrams and counters.
/// The listener feeds it client datagrams, relay failure reports, pool changes and timer ticks.
#[derive(Debug)]
pub struct Flows {
    route: Arc<Route>,
    meters: Arc<UdpMeters>,
    relays: Relays,
    table: FlowTable<Flow>,
    held: VecDeque<Held>,
    held_bytes: usize,
    next_id: u64,
    stopping: bool,
    stats: FlowStats,
    warned_at: Option<Instant>,
    dropped_since_warning: u64,
    socket_warned_at: Option<Instant>,
}

impl Flows {
    /// A dispatcher for `route` answering clients from `public`, spawning relays on `tracker`;
    /// also returns the receiver of relay failure reports, for [`broken`](Self::broken).
    pub fn new(
        route: Arc<Route>,
        public: Arc<UdpSocket>,
        tracker: TaskTracker,
    ) -> (Self, mpsc::Receiver<Broken>) {
        let meters = Arc::new(UdpMeters::new(&route.meters));
        let (relays, reports) = Relays::new(public, tracker, Arc::clone(&meters));
        let flows = Flows {
            route,
            meters,
            relays,
            table: FlowTable::new(),
            held: VecDeque::new(),
            held_bytes: 0,
            next_id: 0,
            stopping: false,
            stats: FlowStats::default(),
            warned_at: None,
            dropped_since_warning: 0,
            socket_warned_at: None,
        };
        (flows, reports)
    }

    /// Counters so far.
    pub fn stats(&self) -> FlowStats {
        self.stats
    }

    /// Number of flows in the table.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether the table is empty (after [`stop`](Self::stop): the listener may end).
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Upstream sockets of forgotten flows that are not closed yet. A forgotten flow's socket
    /// closes when its aborted relay task is dropped, which takes a turn of the runtime: the
    /// listener yields while this is non-zero, so a flood of new clients cannot open sockets
    /// faster than evictions close them (descriptors stay within `max_flows` + a few).
    pub fn closing(&self) -> usize {
        self.relays.alive().saturating_sub(self.table.len())
    }

    /// Whether datagrams wait for a ready worker (the listener then watches the pool).
    pub fn has_held(&self) -> bool {
        !self.held.is_empty()
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Handles one datagram from `client`.
    pub fn datagram(&mut self, client: SocketAddr, data: &[u8]) {
        if self.stopping {
            return;
        }
        let now = Instant::now();
        let Some(flow) = self.table.touch(&client, now) else {
            return self.open(client, data, now);
        };
        let replay = match &mut flow.upstream {
            Some(upstream) => match upstream.usable() {
                Usable::Yes => match upstream.send(data) {
                    Sent::Ok => {
                        self.stats.forwarded += 1;
                        self.meters.to_worker(data.len());
                        return;
                    }
                    Sent::Dropped => {
                        self.stats.dropped += 1;
                        return;
                    }
                    Sent::Refused => true,
                },
                Usable::Refused => true,
                Usable::No => false,
            },
            None => false,
        };
        self.reroute(client, replay, Some(data), now);
    }

    /// A new client: make room, then route it.
    fn open(&mut self, client: SocketAddr, data: &[u8], now: Instant) {
        let max_flows = usize::try_from(self.route.settings().udp.max_flows)
            .unwrap_or(usize::MAX)
            .max(1);
        while self.table.len() >= max_flows {
            let Some((evicted, _flow)) = self.table.pop_lru(Flow::last_reply) else {
                break;
            };
            self.stats.evicted += 1;
            self.meters.evictions.increment(1);
            tracing::debug!(app = %self.route.app, client = %evicted, "udp flow evicted (max_flows {max_flows})");
        }
        let id = self.id();
        let flow = Flow {
            id,
            upstream: None,
            held: 0,
        };
        self.table.insert(client, flow, now);
        self.meters.flows.set(self.table.len() as f64);
        self.stats.opened += 1;
        self.reroute(client, false, Some(data), now);
    }

    /// Gives `client`'s flow a worker — another one than its current one, which is let go — and
    /// sends it, in order, the datagram that bounced off the old worker (when `replay`) and
    /// `data`. With no worker ready, both are held instead.
    fn reroute(&mut self, client: SocketAddr, replay: bool, data: Option<&[u8]>, now: Instant) {
        let Some(flow) = self.table.get_mut(&client) else {
            return;
        };
        let mut replayed = None;
        let mut previous = None;
        if let Some(mut old) = flow.upstream.take() {
            if replay && !old.last.is_empty() {
                replayed = Some(std::mem::take(&mut old.last));
            }
            previous = Some(Arc::clone(old.worker()));
            self.stats.moved += 1;
            tracing::debug!(app = %self.route.app, %client, worker = old.worker().id,
                gone = old.worker().is_gone(), replay = replayed.is_some(), "udp flow leaves its worker");
            // Dropping it releases the worker's live count and closes the socket.
        }
        // Held datagrams go first: if a worker is ready now, send them before this one.
        if flow.held > 0 {
            self.flush(now);
        }
        let bound = self.bind(client, previous.as_ref());
        if let Some(replayed) = replayed {
            if !bound {
                self.hold(client, &replayed, now);
            } else if self.send(client, &replayed) {
                self.stats.replayed += 1;
            }
        }
        if let Some(data) = data {
            if bound {
                self.send(client, data);
            } else {
                self.hold(client, data, now);
            }
        }
    }

    /// Sends to a bound flow; whether it went out.
    fn send(&mut self, client: SocketAddr, data: &[u8]) -> bool {
        let Some(upstream) = self
            .table
            .get_mut(&client)
            .and_then(|f| f.upstream.as_mut())
        else {
            return false;
        };
        match upstream.send(data) {
            Sent::Ok => {
                self.stats.forwarded += 1;
                self.meters.to_worker(data.len());
                true
            }
            // A worker that refuses its very first datagram: give up on this one; the flow
            // moves on its next datagram.
            Sent::Dropped | Sent::Refused => {
                self.stats.dropped += 1;
                false
            }
        }
    }

    /// Binds an unbound flow to the next ready worker other than `avoid` (the one it just left,
    /// unless it is the only one). Whether the flow is bound afterwards.
    fn bind(&mut self, client: SocketAddr, avoid: Option<&Arc<WorkerHandle>>) -> bool {
        match self.table.get_mut(&client) {
            Some(flow) if flow.upstream.is_some() => return true,
            Some(_) => {}
            None => return false,
        }
        let settings = self.route.settings();
        let Some(pick) = Walk::new(&self.route.pool, &settings, client.ip())
            .skip_gone()
            .avoiding(avoid)
            .next()
        else {
            return false;
        };
        let id = self.id();
        let upstream = match self.relays.start(client, id, pick) {
            Ok(upstream) => upstream,
            Err(e) => {
                // Out of descriptors, most likely: not the worker's fault, and nothing to retry
                // (the datagram is held as if no worker were ready).
                let now = Instant::now();
                if self
                    .socket_warned_at
                    .is_none_or(|at| now >= at + WARN_EVERY)
                {
                    tracing::warn!(app = %self.route.app, "cannot open a udp socket to a worker: {e}");
                    self.socket_warned_at = Some(now);
                }
                return false;
            }
        };
        tracing::debug!(app = %self.route.app, %client, worker = upstream.worker().id, "udp flow bound");
        match self.table.get_mut(&client) {
            Some(flow) => {
                flow.upstream = Some(upstream);
                true
            }
            None => false,
        }
    }

    /// A relay reported its socket failed: let the worker go; if the failure was a bounce and
    /// the datagram that bounced was kept, resend it to another worker now.
    pub fn broken(&mut self, report: Broken) {
        let Some(flow) = self.table.get_mut(&report.client) else {
            return;
        };
        let Some(upstream) = &flow.upstream else {
            return;
        };
        if upstream.id != report.upstream {
            return;
        }
        if self.stopping {
            self.table.remove(&report.client);
            self.meters.flows.set(self.table.len() as f64);
            return;
        }
        let refused = matches!(upstream.usable(), Usable::Refused);
        if refused && !upstream.last.is_empty() {
            self.reroute(report.client, true, None, Instant::now());
        } else {
            flow.upstream = None;
            self.stats.moved += 1;
        }
    }

    /// When [`expire`](Self::expire) next has something to do (it may find nothing: activity
    /// it was not told about moves flows forward).
    pub fn next_deadline(&self) -> Option<Instant> {
        let settings = self.route.settings();
        let flows = self.table.oldest().map(|t| t + self.idle_timeout());
        let held = self.held.front().map(|h| h.at + settings.queue_timeout);
        match (flows, held) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn idle_timeout(&self) -> Duration {
        let idle = self.route.settings().udp.idle_timeout;
        if self.stopping {
            idle.min(STOP_LINGER)
        } else {
            idle
        }
    }

    /// Forgets idle flows and drops held datagrams past `queue_timeout`.
    pub fn expire(&mut self) {
        let now = Instant::now();
        if let Some(cutoff) = now.checked_sub(self.idle_timeout()) {
            while let Some((client, _flow)) = self.table.pop_idle(cutoff, Flow::last_reply) {
                self.stats.expired += 1;
                tracing::debug!(app = %self.route.app, %client, "udp flow idle: forgotten");
            }
        }
        self.meters.flows.set(self.table.len() as f64);
        self.expire_held(now);
    }

    /// Stops taking datagrams: held ones and flows without a worker are dropped; the others
    /// linger to relay replies until quiet for [`STOP_LINGER`].
    pub fn stop(&mut self) {
        self.stopping = true;
        self.held.clear();
        self.held_bytes = 0;
        self.table.retain(|flow| flow.upstream.is_some());
        self.meters.flows.set(self.table.len() as f64);
    }
}

/// Datagrams read per wake-up before the loop looks at its other inputs again.
const RECV_BATCH: usize = 32;
/// Pause after an unexpected receive error, so a persistent one cannot spin the loop.
const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// The timer's deadline when nothing is due.
const FAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// The listener's dispatcher, one task per UDP listener: reads client datagrams until
/// `ctx.stop`, then lets established flows relay the replies still coming (until quiet) and
/// returns; `ctx.abort` ends everything at once. Relays run on `ctx.tracker`.
pub async fn dispatch(socket: UdpSocket, ctx: ServeContext) {
    let ServeContext {
        route,
        stop,
        abort,
        tracker,
        ..
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::RouteSettings;
    use balancer_config::UdpSettings;
    use balancer_workers::Pool;

    fn addr(port: u16) -> SocketAddr {
        ([127, 0, 0, 1], port).into()
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    // Flows against real loopback sockets standing in for workers.

    fn route(pool: Arc<Pool>, max_flows: u32, idle: Duration, queue: Duration) -> Arc<Route> {
        Arc::new(Route::new(
            "udp-test",
            pool,
            RouteSettings {
                connect_timeout: secs(1),
                queue_timeout: queue,
                udp: UdpSettings {
                    max_flows,
                    idle_timeout: idle,
                },
                ..RouteSettings::default()
            },
        ))
    }

    /// An echo "worker" answering `<tag> <payload>`; returns its handle and the task.
    /// A pool of two ready echo workers tagged `a` and `b`.
    async fn two_echo_workers() -> (
        Arc<Pool>,
        (Arc<WorkerHandle>, tokio::task::JoinHandle<()>),
        (Arc<WorkerHandle>, tokio::task::JoinHandle<()>),
    ) {
        let pool = Arc::new(Pool::new());
        let a = echo_worker(1, "a").await;
        let b = echo_worker(2, "b").await;
        pool.insert(Arc::clone(&a.0));
        pool.insert(Arc::clone(&b.0));
        (pool, a, b)
    }

    async fn echo_worker(
        id: u32,
        tag: &'static str,
    ) -> (Arc<WorkerHandle>, tokio::task::JoinHandle<()>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = vec![0; MAX_DATAGRAM];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let mut reply = format!("{tag} ").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&reply, peer).await;
            }
        });
        (
            Arc::new(WorkerHandle::new(id, id, 1000 + id, vec![addr])),
            task,
        )
    }

    /// Runs the dispatcher loop of the real listener on an ephemeral port.
    fn serve(route: Arc<Route>) -> (SocketAddr, tokio_util::sync::CancellationToken) {
        let socket = crate::listener::udp::bind(addr(0)).unwrap();
        let public = socket.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(dispatch(
            socket,
            ServeContext {
                budget: crate::proxy::unlimited_budget(),
                route,
                stop: stop.clone(),
                abort: tokio_util::sync::CancellationToken::new(),
                tracker: TaskTracker::new(),
            },
        ));
        (public, stop)
    }

    async fn client(public: SocketAddr) -> UdpSocket {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.connect(public).await.unwrap();
        socket
    }

    async fn ask(socket: &UdpSocket, payload: &str) -> String {
        socket.send(payload.as_bytes()).await.unwrap();
        let mut buf = vec![0; MAX_DATAGRAM];
        let n = tokio::time::timeout(secs(5), socket.recv(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test]
    async fn flows_stick_to_their_worker_and_alternate_between_workers() {
        let (pool, (a, _ta), (b, _tb)) = two_echo_workers().await;
        let (public, _stop) = serve(route(Arc::clone(&pool), 100, secs(30), secs(1)));
        let mut tags = Vec::new();
        for _ in 0..4 {
            let c = client(public).await;
            let first = ask(&c, "x").await;
            for i in 0..5 {
                let again = ask(&c, &i.to_string()).await;
                assert_eq!(again[..1], first[..1], "a flow stays on its worker");
            }
            tags.push(first[..1].to_string());
        }
        assert_eq!(tags, ["a", "b", "a", "b"]);
        assert_eq!((a.live(), b.live()), (2, 2), "each flow holds its worker");
    }

    #[tokio::test]
    async fn a_bounced_datagram_is_replayed_to_another_worker() {
        let (pool, (a, ta), (b, _tb)) = two_echo_workers().await;
        let (public, _stop) = serve(route(Arc::clone(&pool), 100, secs(30), secs(1)));
        let c = client(public).await;
        assert!(ask(&c, "hello").await.starts_with("a "));
        // Worker a's socket closes (its process died) before anyone noticed.
        ta.abort();
        let _ = ta.await;
        // The request bounces off a's closed port; it is resent to b, the client notices nothing.
        assert_eq!(ask(&c, "again").await, "b again");
        assert_eq!(ask(&c, "still").await, "b still");
        assert_eq!(a.live(), 0, "the dead worker's live count is released");
        assert_eq!(b.live(), 1);
    }

    #[tokio::test]
    async fn a_flow_of_a_gone_worker_moves_on_its_next_datagram() {
        let (pool, (a, _ta), (_b, _tb)) = two_echo_workers().await;
        let (public, _stop) = serve(route(Arc::clone(&pool), 100, secs(30), secs(1)));
        let c = client(public).await;
        assert!(ask(&c, "1").await.starts_with("a "));
        // A draining worker keeps its flows...
        pool.remove(&a);
        a.start_draining();
        assert!(ask(&c, "2").await.starts_with("a "));
        // ...until its process is gone.
        a.mark_gone();
        assert_eq!(ask(&c, "3").await, "b 3");
        assert_eq!(a.live(), 0);
    }

    #[tokio::test]
    async fn datagrams_wait_for_a_worker_within_queue_timeout() {
        let pool = Arc::new(Pool::new());
        let (public, _stop) = serve(route(Arc::clone(&pool), 100, secs(30), secs(5)));
        let c = client(public).await;
        c.send(b"early").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (a, _ta) = echo_worker(1, "a").await;
        pool.insert(Arc::clone(&a));
        let mut buf = vec![0; 100];
        let n = tokio::time::timeout(secs(5), c.recv(&mut buf))
            .await
            .expect("the held datagram is delivered once a worker is ready")
            .unwrap();
        assert_eq!(&buf[..n], b"a early");
    }

    #[tokio::test]
    async fn idle_flows_release_their_worker_and_stop_ends_the_listener() {
        let pool = Arc::new(Pool::new());
        let (a, _ta) = echo_worker(1, "a").await;
        pool.insert(Arc::clone(&a));
        let (public, stop) = serve(route(
            Arc::clone(&pool),
            100,
            Duration::from_millis(200),
            secs(1),
        ));
        let c = client(public).await;
        ask(&c, "x").await;
        assert_eq!(a.live(), 1);
        eventually("the idle flow is forgotten", || a.live() == 0).await;
        ask(&c, "y").await;
        assert_eq!(a.live(), 1);
        stop.cancel();
        eventually("after stop, flows end once quiet", || a.live() == 0).await;
        // The listener no longer reads: the public port gets no answer.
        c.send(b"z").await.unwrap();
        let mut buf = [0; 16];
        let answer = tokio::time::timeout(Duration::from_millis(300), c.recv(&mut buf)).await;
        assert!(
            !matches!(answer, Ok(Ok(_))),
            "answered after stop: {answer:?}"
        );
    }

    async fn eventually(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_flood_of_clients_keeps_max_flows() {
        let pool = Arc::new(Pool::new());
        let (a, _ta) = echo_worker(1, "a").await;
        pool.insert(Arc::clone(&a));
        let route = route(Arc::clone(&pool), 10, secs(30), secs(1));
        let public = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let (mut flows, _reports) = Flows::new(route, public, TaskTracker::new());
        for port in 0..500u16 {
            flows.datagram(addr(20_000 + port), b"x");
            assert!(flows.len() <= 10);
            assert!(a.live() <= 10);
        }
        let stats = flows.stats();
        assert_eq!((stats.opened, stats.evicted), (500, 490));
        assert_eq!(stats.forwarded, 500);
    }
}
