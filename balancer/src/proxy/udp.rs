//! UDP flow proxying: the flow table that pins each client address to one worker, and the
//! per-flow relays that carry the worker's replies back to the client.
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
//! as a plain `HashMap`: no lock and no concurrent map on the hot path. A relay shares two atomics
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

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
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

use super::{Pick, Route, Walk};

/// Receive buffer size: the largest UDP payload (65,507 bytes over IPv4, 65,527 over IPv6) fits,
/// so no datagram is ever truncated.
pub const MAX_DATAGRAM: usize = 65_536;
/// The largest datagram kept per flow for a replay after a bounce (a full Ethernet frame's
/// payload): enough for DNS, QUIC and game traffic, and at most `max_flows` × this in memory.
pub const REPLAY_MAX: usize = 1472;
/// Datagrams held per flow while no worker is ready.
pub const HOLD_PER_FLOW: usize = 4;
/// Datagrams held in all while no worker is ready.
pub const HOLD_MAX: usize = 1024;
/// Bytes held in all while no worker is ready.
pub const HOLD_BYTES: usize = 1 << 20;
/// After `stop`, a flow lingers (relaying the replies to what it already forwarded) until it
/// has been quiet this long, or `udp_idle_timeout` if shorter.
pub const STOP_LINGER: Duration = Duration::from_secs(1);
/// Dropped-datagram warnings are rate limited to one per this period.
pub const WARN_EVERY: Duration = Duration::from_secs(10);
/// Replies a relay moves per wake-up before it lets other tasks run.
const RELAY_BATCH: usize = 32;
/// Failure reports in flight from relays to the dispatcher; past it a flow's failure is still
/// seen on its next datagram (through the shared flag), just not acted on early.
const EVENTS: usize = 1024;

thread_local! {
    /// One receive buffer per runtime thread, shared by the relays that run on it: a relay
    /// never awaits while it holds the buffer, so thousands of flows cost no buffer memory.
    static REPLY_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_DATAGRAM]);
}

/// A relay's report that its upstream socket failed (a bounce, or another error).
#[derive(Debug, Clone, Copy)]
pub struct Broken {
    client: SocketAddr,
    upstream: u64,
}

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

/// The flows of one listener, by client address, in least-recently-active order.
///
/// Activity the table does not see (a relay's replies) is supplied by an `activity` function and
/// taken into account lazily: before a flow is evicted or expired, its key is moved forward to
/// its latest activity if that is newer. Every operation is O(log n).
#[derive(Debug)]
pub struct FlowTable<V> {
    flows: HashMap<SocketAddr, Slot<V>>,
    /// (last activity, tie-breaker) → client. The first entry is the least recently active.
    order: BTreeMap<(Instant, u64), SocketAddr>,
    seq: u64,
}

#[derive(Debug)]
struct Slot<V> {
    value: V,
    key: (Instant, u64),
}

impl<V> Default for FlowTable<V> {
    fn default() -> Self {
        FlowTable {
            flows: HashMap::new(),
            order: BTreeMap::new(),
            seq: 0,
        }
    }
}

impl<V> FlowTable<V> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of flows.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether the table holds no flow.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// The flow of `client`, without counting it as activity.
    pub fn get_mut(&mut self, client: &SocketAddr) -> Option<&mut V> {
        self.flows.get_mut(client).map(|s| &mut s.value)
    }

    /// The flow of `client`, recording activity at `now`.
    pub fn touch(&mut self, client: &SocketAddr, now: Instant) -> Option<&mut V> {
        let slot = self.flows.get_mut(client)?;
        self.order.remove(&slot.key);
        self.seq += 1;
        slot.key = (now, self.seq);
        self.order.insert(slot.key, *client);
        Some(&mut slot.value)
    }

    /// Adds (or replaces) the flow of `client`, active at `now`; returns the replaced one.
    /// Making room is the caller's business (see [`pop_lru`](Self::pop_lru)).
    pub fn insert(&mut self, client: SocketAddr, value: V, now: Instant) -> Option<V> {
        let old = self.remove(&client);
        self.seq += 1;
        let key = (now, self.seq);
        self.order.insert(key, client);
        self.flows.insert(client, Slot { value, key });
        old
    }

    /// Removes the flow of `client`.
    pub fn remove(&mut self, client: &SocketAddr) -> Option<V> {
        let slot = self.flows.remove(client)?;
        self.order.remove(&slot.key);
        Some(slot.value)
    }

    /// When the least recently active flow was last seen active (a lower bound: activity the
    /// table has not been told about may be newer).
    pub fn oldest(&self) -> Option<Instant> {
        self.order.first_key_value().map(|(key, _)| key.0)
    }

    /// Removes and returns the least recently active flow.
    pub fn pop_lru(&mut self, activity: impl Fn(&V) -> Option<Instant>) -> Option<(SocketAddr, V)> {
        self.pop_first_before(None, activity)
    }

    /// Removes and returns one flow with no activity after `cutoff`, if there is one.
    pub fn pop_idle(
        &mut self,
        cutoff: Instant,
        activity: impl Fn(&V) -> Option<Instant>,
    ) -> Option<(SocketAddr, V)> {
        self.pop_first_before(Some(cutoff), activity)
    }

    fn pop_first_before(
        &mut self,
        cutoff: Option<Instant>,
        activity: impl Fn(&V) -> Option<Instant>,
    ) -> Option<(SocketAddr, V)> {
        loop {
            let (&key, &client) = self.order.first_key_value()?;
            if cutoff.is_some_and(|cutoff| key.0 > cutoff) {
                return None;
            }
            let Some(slot) = self.flows.get_mut(&client) else {
                // Unreachable (both maps change together); heal rather than loop.
                self.order.remove(&key);
                continue;
            };
            match activity(&slot.value) {
                // Active since: move it to its place and look at the next oldest.
                Some(seen) if seen > key.0 => {
                    self.order.remove(&key);
                    self.seq += 1;
                    slot.key = (seen, self.seq);
                    self.order.insert(slot.key, client);
                }
                _ => {
                    self.order.remove(&key);
                    let slot = self.flows.remove(&client)?;
                    return Some((client, slot.value));
                }
            }
        }
    }

    /// Removes every flow `keep` rejects; returns how many.
    pub fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) -> usize {
        let before = self.flows.len();
        let order = &mut self.order;
        self.flows.retain(|_, slot| {
            let kept = keep(&slot.value);
            if !kept {
                order.remove(&slot.key);
            }
            kept
        });
        before - self.flows.len()
    }
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
        self.upstream.as_ref()?.shared.last_reply()
    }
}

/// A flow's link to its worker: the connected socket, the relay reading it, and the live count
/// the flow holds on the worker.
#[derive(Debug)]
struct Upstream {
    /// Identifies this link (a relay's failure report names it).
    id: u64,
    guard: ConnGuard,
    socket: Arc<UdpSocket>,
    shared: Arc<FlowShared>,
    relay: AbortHandle,
    /// The last datagram sent, kept for a replay should it bounce (empty when too large).
    last: Vec<u8>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // The relay holds the other reference to the socket: ending it closes the descriptor.
        self.relay.abort();
    }
}

/// What happened to a datagram sent upstream.
enum Sent {
    Ok,
    Dropped,
    /// The worker's port bounced an earlier datagram: this one was not sent.
    Refused,
}

/// Whether a flow's worker can still be used.
enum Usable {
    Yes,
    /// Its port bounced a datagram: move, resending the last one.
    Refused,
    /// Its process exited or the socket failed otherwise: move.
    No,
}

impl Upstream {
    fn worker(&self) -> &Arc<WorkerHandle> {
        self.guard.worker()
    }

    fn usable(&self) -> Usable {
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

    fn send(&mut self, data: &[u8]) -> Sent {
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

/// A datagram held for a flow that waits for a ready worker.
#[derive(Debug)]
struct Held {
    at: Instant,
    client: SocketAddr,
    flow: u64,
    data: Box<[u8]>,
}

/// The state of one UDP listener's dispatcher: its flow table, held datagrams and counters.
/// The listener feeds it client datagrams, relay failure reports, pool changes and timer ticks.
#[derive(Debug)]
pub struct Flows {
    route: Arc<Route>,
    public: Arc<UdpSocket>,
    tracker: TaskTracker,
    table: FlowTable<Flow>,
    held: VecDeque<Held>,
    held_bytes: usize,
    epoch: Instant,
    next_id: u64,
    events: mpsc::Sender<Broken>,
    stopping: bool,
    stats: FlowStats,
    warned_at: Option<Instant>,
    dropped_since_warning: u64,
    socket_warned_at: Option<Instant>,
    /// Relay tasks not yet dropped: each holds its flow's socket open.
    relays: Arc<AtomicUsize>,
}

impl Flows {
    /// A dispatcher for `route` answering clients from `public`, spawning relays on `tracker`;
    /// also returns the receiver of relay failure reports, for [`broken`](Self::broken).
    pub fn new(
        route: Arc<Route>,
        public: Arc<UdpSocket>,
        tracker: TaskTracker,
    ) -> (Self, mpsc::Receiver<Broken>) {
        let (events, reports) = mpsc::channel(EVENTS);
        let flows = Flows {
            route,
            public,
            tracker,
            table: FlowTable::new(),
            held: VecDeque::new(),
            held_bytes: 0,
            epoch: Instant::now(),
            next_id: 0,
            events,
            stopping: false,
            stats: FlowStats::default(),
            warned_at: None,
            dropped_since_warning: 0,
            socket_warned_at: None,
            relays: Arc::new(AtomicUsize::new(0)),
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
        self.relays
            .load(Ordering::SeqCst)
            .saturating_sub(self.table.len())
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
            tracing::debug!(app = %self.route.app, client = %evicted, "udp flow evicted (max_flows {max_flows})");
        }
        let id = self.id();
        let flow = Flow {
            id,
            upstream: None,
            held: 0,
        };
        self.table.insert(client, flow, now);
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
        let listener_index = self.route.settings().listener_index;
        let Some(Pick { guard, addr }) = Walk::new(&self.route.pool, listener_index)
            .skip_gone()
            .avoiding(avoid)
            .next()
        else {
            return false;
        };
        let socket = match connect(addr) {
            Ok(socket) => Arc::new(socket),
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
        let id = self.id();
        let shared = Arc::new(FlowShared::new(self.epoch));
        self.relays.fetch_add(1, Ordering::SeqCst);
        let relay = Relay {
            _alive: RelayAlive(Arc::clone(&self.relays)),
            client,
            upstream: id,
            socket: Arc::clone(&socket),
            public: Arc::clone(&self.public),
            shared: Arc::clone(&shared),
            events: self.events.clone(),
        };
        let relay = self.tracker.spawn(relay.run()).abort_handle();
        tracing::debug!(app = %self.route.app, %client, worker = guard.worker().id, "udp flow bound");
        let upstream = Upstream {
            id,
            guard,
            socket,
            shared,
            relay,
            last: Vec::new(),
        };
        match self.table.get_mut(&client) {
            Some(flow) => {
                flow.upstream = Some(upstream);
                true
            }
            None => false,
        }
    }

    /// Holds a datagram for a flow waiting for a worker, within the limits.
    fn hold(&mut self, client: SocketAddr, data: &[u8], now: Instant) {
        let timeout = self.route.settings().queue_timeout;
        let fits = !timeout.is_zero()
            && self.held.len() < HOLD_MAX
            && self.held_bytes + data.len() <= HOLD_BYTES;
        match self.table.get_mut(&client) {
            Some(flow) if fits && flow.held < HOLD_PER_FLOW => {
                flow.held += 1;
                self.held_bytes += data.len();
                self.held.push_back(Held {
                    at: now,
                    client,
                    flow: flow.id,
                    data: data.into(),
                });
                self.stats.held += 1;
            }
            _ => self.drop_unroutable(now, 1),
        }
    }

    /// Counts datagrams dropped for want of a worker; warns at most every [`WARN_EVERY`].
    fn drop_unroutable(&mut self, now: Instant, count: u64) {
        self.stats.dropped += count;
        self.dropped_since_warning += count;
        if self.warned_at.is_none_or(|at| now >= at + WARN_EVERY) {
            tracing::warn!(
                app = %self.route.app,
                dropped = self.dropped_since_warning,
                "udp datagrams dropped for want of a ready worker (held up to queue_timeout {:?})",
                self.route.settings().queue_timeout
            );
            self.warned_at = Some(now);
            self.dropped_since_warning = 0;
        }
    }

    /// Sends held datagrams, in arrival order, to the workers now ready; keeps the rest.
    fn flush(&mut self, now: Instant) {
        let timeout = self.route.settings().queue_timeout;
        let mut keep = VecDeque::new();
        let mut expired = 0;
        let mut no_worker = false;
        for held in std::mem::take(&mut self.held) {
            let flow = match self.table.get_mut(&held.client) {
                Some(flow) if flow.id == held.flow => flow,
                // Its flow was evicted or expired meanwhile.
                _ => {
                    self.held_bytes -= held.data.len();
                    expired += 1;
                    continue;
                }
            };
            if held.at + timeout <= now {
                flow.held -= 1;
                self.held_bytes -= held.data.len();
                expired += 1;
                continue;
            }
            let bound = flow.upstream.is_some() || (!no_worker && self.bind(held.client, None));
            if !bound {
                no_worker = true;
                keep.push_back(held);
                continue;
            }
            if let Some(flow) = self.table.get_mut(&held.client) {
                flow.held -= 1;
            }
            self.held_bytes -= held.data.len();
            self.send(held.client, &held.data);
        }
        self.held = keep;
        if expired > 0 {
            self.drop_unroutable(now, expired);
        }
    }

    /// The pool changed: a worker may be ready for the held datagrams.
    pub fn pool_changed(&mut self) {
        if !self.held.is_empty() && !self.stopping {
            self.flush(Instant::now());
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
        let timeout = self.route.settings().queue_timeout;
        let mut expired = 0;
        while self.held.front().is_some_and(|h| h.at + timeout <= now) {
            let Some(held) = self.held.pop_front() else {
                break;
            };
            self.held_bytes -= held.data.len();
            if let Some(flow) = self.table.get_mut(&held.client)
                && flow.id == held.flow
            {
                flow.held -= 1;
            }
            expired += 1;
        }
        if expired > 0 {
            self.drop_unroutable(now, expired);
        }
    }

    /// Stops taking datagrams: held ones and flows without a worker are dropped; the others
    /// linger to relay replies until quiet for [`STOP_LINGER`].
    pub fn stop(&mut self) {
        self.stopping = true;
        self.held.clear();
        self.held_bytes = 0;
        self.table.retain(|flow| flow.upstream.is_some());
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

/// Counts a relay task as alive until it is dropped (see [`Flows::closing`]).
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
                    Ok(_) => None,
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
                Ok(Some(reply)) => {
                    if let Err(e) = self.public.send_to(&reply, self.client).await {
                        tracing::debug!(client = %self.client, "udp reply to client failed: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::RouteSettings;
    use balancer_config::{HttpSettings, UdpSettings};
    use balancer_workers::Pool;
    use std::cell::Cell;

    fn addr(port: u16) -> SocketAddr {
        ([127, 0, 0, 1], port).into()
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Keeps at most `max` entries the way the dispatcher does.
    fn insert_bounded(
        table: &mut FlowTable<u32>,
        client: u16,
        now: Instant,
        max: usize,
    ) -> Vec<SocketAddr> {
        let mut evicted = Vec::new();
        while table.len() >= max {
            evicted.push(table.pop_lru(|_| None).unwrap().0);
        }
        table.insert(addr(client), u32::from(client), now);
        evicted
    }

    #[test]
    fn the_table_never_exceeds_its_bound() {
        let t0 = Instant::now();
        let mut table = FlowTable::new();
        for port in 1..=1000u16 {
            insert_bounded(
                &mut table,
                port,
                t0 + Duration::from_millis(port.into()),
                100,
            );
            assert!(table.len() <= 100);
        }
        assert_eq!(table.len(), 100);
        assert_eq!(table.order.len(), 100, "the order index follows the map");
        // The 100 most recent survive.
        assert!(table.get_mut(&addr(901)).is_some());
        assert!(table.get_mut(&addr(900)).is_none());
    }

    #[test]
    fn the_least_recently_active_flow_is_evicted() {
        let t0 = Instant::now();
        let mut table = FlowTable::new();
        for (i, port) in [1, 2, 3].into_iter().enumerate() {
            table.insert(addr(port), u32::from(port), t0 + secs(i as u64));
        }
        // 1 is the oldest by insertion, but it just sent something.
        table.touch(&addr(1), t0 + secs(10));
        assert_eq!(insert_bounded(&mut table, 4, t0 + secs(11), 3), [addr(2)]);
        assert_eq!(insert_bounded(&mut table, 5, t0 + secs(12), 3), [addr(3)]);
        assert_eq!(insert_bounded(&mut table, 6, t0 + secs(13), 3), [addr(1)]);
    }

    #[test]
    fn replies_count_as_activity_for_eviction() {
        let t0 = Instant::now();
        let replies: Vec<Cell<Option<Instant>>> = (0..4).map(|_| Cell::new(None)).collect();
        let mut table = FlowTable::new();
        for i in 0..3u16 {
            table.insert(addr(i), usize::from(i), t0 + secs(u64::from(i)));
        }
        // Flow 0 sent nothing since t0, but its worker replied at t0+5.
        replies[0].set(Some(t0 + secs(5)));
        let activity = |v: &usize| replies[*v].get();
        assert_eq!(table.pop_lru(activity).map(|(a, _)| a), Some(addr(1)));
        assert_eq!(table.pop_lru(activity).map(|(a, _)| a), Some(addr(2)));
        assert_eq!(table.pop_lru(activity).map(|(a, _)| a), Some(addr(0)));
        assert!(table.pop_lru(activity).is_none());
    }

    #[test]
    fn idle_flows_expire_after_the_idle_timeout_and_activity_postpones_it() {
        let idle = secs(30);
        let t0 = Instant::now();
        let replies: Vec<Cell<Option<Instant>>> = (0..3).map(|_| Cell::new(None)).collect();
        let activity = |v: &usize| replies[*v].get();
        let mut table = FlowTable::new();
        table.insert(addr(0), 0, t0);
        table.insert(addr(1), 1, t0 + secs(5));
        table.insert(addr(2), 2, t0 + secs(6));
        // Flow 1 keeps getting replies; flow 2 keeps sending.
        replies[1].set(Some(t0 + secs(20)));
        table.touch(&addr(2), t0 + secs(25));

        let expire = |table: &mut FlowTable<usize>, now: Instant| {
            let mut gone = Vec::new();
            while let Some((a, _)) = table.pop_idle(now - idle, activity) {
                gone.push(a);
            }
            gone
        };
        assert_eq!(expire(&mut table, t0 + secs(29)), []);
        assert_eq!(expire(&mut table, t0 + secs(30)), [addr(0)]);
        assert_eq!(expire(&mut table, t0 + secs(49)), []);
        assert_eq!(expire(&mut table, t0 + secs(50)), [addr(1)]);
        assert_eq!(table.oldest(), Some(t0 + secs(25)));
        assert_eq!(expire(&mut table, t0 + secs(55)), [addr(2)]);
        assert!(table.is_empty() && table.order.is_empty());
    }

    #[test]
    fn retain_and_remove_keep_both_indexes_in_step() {
        let t0 = Instant::now();
        let mut table = FlowTable::new();
        for port in 0..10u16 {
            table.insert(addr(port), port, t0 + secs(port.into()));
        }
        assert_eq!(table.retain(|v| v % 2 == 0), 5);
        assert_eq!(table.remove(&addr(4)), Some(4));
        assert_eq!(table.remove(&addr(4)), None);
        assert_eq!(table.insert(addr(2), 22, t0), Some(2));
        assert_eq!(table.len(), 4);
        assert_eq!(table.order.len(), 4);
        assert_eq!(table.oldest(), Some(t0));
    }

    // Flows against real loopback sockets standing in for workers.

    fn route(pool: Arc<Pool>, max_flows: u32, idle: Duration, queue: Duration) -> Arc<Route> {
        Arc::new(Route::new(
            "udp-test",
            pool,
            RouteSettings {
                listener_index: 0,
                connect_timeout: secs(1),
                queue_timeout: queue,
                udp: UdpSettings {
                    max_flows,
                    idle_timeout: idle,
                },
                http: HttpSettings {
                    header_timeout: secs(1),
                    max_header_size: 1024,
                    idle_timeout: secs(1),
                },
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
        tokio::spawn(crate::listener::udp::serve(
            socket,
            crate::listener::ServeContext {
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
