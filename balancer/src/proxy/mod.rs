//! Proxies: moving a client's bytes to the worker the policy picked. This module owns what the
//! three protocols share: the [`Route`] a listener sends to, and the one pick-and-connect loop
//! ([`pick_and_connect`] over a [`Walk`]) that turns the policy's candidate order into a worker
//! that took the connection — or a wait in the queue, or a give-up.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use balancer_config::{Balance, HttpSettings, ProxyVersion, UdpSettings};
use balancer_workers::{ConnGuard, Pool, Queue, WorkerHandle};
use tokio::sync::futures::Notified;
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::policy::{self, Candidates};

pub mod copy;
pub mod http;
pub mod metrics;
pub mod proxy_protocol;
mod splice;
pub mod tcp;
pub mod udp;
pub mod uring;

/// After every ready worker refused, wait this long (or for a pool change) before trying again.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Why waiting in the queue for a worker ended without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueEnd {
    /// `queue_timeout` passed.
    TimedOut,
    /// The listener is stopping.
    Stopped,
}

/// Waits after a pass over the pool found no worker to take a connection: for the pool to
/// change, for a connection to end (`freed`: a worker at its `max_conns` has a place again),
/// or — when some worker was tried and failed (it is probably dying and about to leave the
/// pool) — a short pause, so the caller neither spins nor gives up early.
pub async fn wait_in_queue(
    changes: &mut watch::Receiver<u64>,
    freed: Pin<&mut Notified<'_>>,
    tried_some: bool,
    deadline: Instant,
    stop: &CancellationToken,
) -> Result<(), QueueEnd> {
    let pause = async {
        if tried_some {
            sleep(RETRY_PAUSE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = changes.changed() => Ok(()),
        _ = freed => Ok(()),
        _ = pause => Ok(()),
        _ = sleep_until(deadline) => Err(QueueEnd::TimedOut),
        _ = stop.cancelled() => Err(QueueEnd::Stopped),
    }
}

/// A worker that took a connection: it is counted against the worker (`guard`) from here on,
/// and `addr` is its private address for this listener.
#[derive(Debug)]
pub struct Pick {
    /// The live count held on the worker; dropping it lets a drain finish.
    pub guard: ConnGuard,
    /// Where to connect.
    pub addr: SocketAddr,
}

impl Pick {
    /// The picked worker.
    pub fn worker(&self) -> &Arc<WorkerHandle> {
        self.guard.worker()
    }
}

/// One pass over the pool for one connection: the policy's candidates in order, each counted
/// against (`acquire`, which refuses a draining worker) only when it is about to be tried, so
/// a pass that stops early leaves the rest untouched.
///
/// Two refinements serve UDP flows, which pin a client to a worker for a long time:
/// [`skip_gone`](Self::skip_gone) passes over workers whose process already exited (the pool
/// may still list them for a moment), and [`avoiding`](Self::avoiding) tries the worker a
/// flow just left only after every other one, so a flow that moves does not land back on it.
#[derive(Debug)]
pub struct Walk<'a> {
    candidates: Candidates,
    listener_index: usize,
    max_conns: Option<usize>,
    skip_gone: bool,
    avoid: Option<&'a Arc<WorkerHandle>>,
    fallback: Option<(Arc<WorkerHandle>, SocketAddr)>,
}

impl<'a> Walk<'a> {
    /// A pass over `pool` in the order of the route's `balance` (the algorithm's choice first,
    /// then the rest of the snapshot), for the listener `settings` describe and a connection
    /// from `client`. Workers at the route's `max_conns` are passed over.
    pub fn new(pool: &Pool, settings: &RouteSettings, client: IpAddr) -> Self {
        Walk {
            candidates: policy::candidates(pool, settings.balance, client),
            listener_index: settings.listener_index,
            max_conns: settings.max_conns,
            skip_gone: false,
            avoid: None,
            fallback: None,
        }
    }

    /// Also passes over workers whose process has exited.
    pub fn skip_gone(mut self) -> Self {
        self.skip_gone = true;
        self
    }

    /// Tries `avoid` last, after every other candidate.
    pub fn avoiding(mut self, avoid: Option<&'a Arc<WorkerHandle>>) -> Self {
        self.avoid = avoid;
        self
    }
}

impl Iterator for Walk<'_> {
    type Item = Pick;

    fn next(&mut self) -> Option<Pick> {
        for worker in self.candidates.by_ref() {
            if self.skip_gone && worker.is_gone() {
                continue;
            }
            let Some(&addr) = worker.addrs.get(self.listener_index) else {
                continue;
            };
            if self.avoid.is_some_and(|a| Arc::ptr_eq(a, &worker)) {
                self.fallback = Some((worker, addr));
                continue;
            }
            if let Some(guard) = worker.acquire_within(self.max_conns) {
                return Some(Pick { guard, addr });
            }
        }
        let (worker, addr) = self.fallback.take()?;
        worker
            .acquire_within(self.max_conns)
            .map(|guard| Pick { guard, addr })
    }
}

/// What one try at a picked worker came to.
#[derive(Debug)]
pub enum Attempt<T, S, E> {
    /// The worker took it.
    Connected(T),
    /// This worker failed in a way the client must not see: try the next one, with the
    /// attempt's state handed back (an HTTP request that was not sent, say).
    Next(S),
    /// A failure another worker cannot mend: stop here.
    GiveUp(E),
}

/// Why [`pick_and_connect`] ended without a worker.
#[derive(Debug)]
pub enum PickError<E> {
    /// No worker took it within `queue_timeout` (the duration).
    NoWorker(Duration),
    /// `stop` was cancelled while waiting for a worker.
    Stopped,
    /// An attempt gave up.
    GaveUp(E),
}

/// THE pick-and-connect loop of the TCP and HTTP proxies: walks the pool once in the order of
/// the app's `balance` for `client`, handing each worker that takes the connection to
/// `attempt` (with the state the previous attempt handed back); when a pass ends with no
/// worker (none ready, or all at `max_conns`), waits in the app's queue (a pool change, a
/// connection ending, or a short pause if some worker failed) and walks again, until
/// `settings.queue_timeout` or `stop`.
///
/// The state is threaded through by value rather than borrowed by the closure, so an attempt
/// can consume it (hyper takes the request) and give it back on failure, and the loop stays
/// free of allocation: the closure and its future are concrete types.
pub async fn pick_and_connect<S, T, E, F, Fut>(
    route: &Route,
    settings: &RouteSettings,
    stop: &CancellationToken,
    client: IpAddr,
    mut state: S,
    mut attempt: F,
) -> Result<T, PickError<E>>
where
    F: FnMut(Pick, S) -> Fut,
    Fut: Future<Output = Attempt<T, S, E>>,
{
    let deadline = Instant::now() + settings.queue_timeout;
    let mut changes = route.pool.subscribe();
    let queue = route.pool.queue();
    let mut queued: Option<Queued<'_>> = None;
    // Counted in metrics as queued from the first wait until a worker is found or it ends.
    let mut _metered = None;
    loop {
        changes.borrow_and_update();
        // Armed before the walk: a connection that ends after a full worker refused us wakes
        // this wait (see `Queue::freed`).
        let mut freed = pin!(queue.freed().notified());
        freed.as_mut().enable();
        let mut tried = 0;
        for pick in Walk::new(&route.pool, settings, client) {
            tried += 1;
            match attempt(pick, state).await {
                Attempt::Connected(done) => return Ok(done),
                Attempt::Next(back) => state = back,
                Attempt::GiveUp(e) => return Err(PickError::GaveUp(e)),
            }
        }
        _metered.get_or_insert_with(|| metrics::Queued::enter(&route.meters));
        if queued.is_none() {
            queued = Some(Queued::enter(queue));
            if tried == 0 {
                // Only now do ending connections wake waiters: walk once more, so a place
                // freed between the walk and `enter` is not missed.
                continue;
            }
        }
        wait_in_queue(&mut changes, freed, tried > 0, deadline, stop)
            .await
            .map_err(|end| match end {
                QueueEnd::TimedOut => {
                    route.meters.queue_timeouts.increment(1);
                    PickError::NoWorker(settings.queue_timeout)
                }
                QueueEnd::Stopped => PickError::Stopped,
            })?;
    }
}

/// A connection's place in its app's [`Queue`], from its first fruitless walk until it gets
/// a worker or gives up (dropping it leaves, and records the wait).
struct Queued<'q> {
    queue: &'q Queue,
    since: Instant,
}

impl<'q> Queued<'q> {
    fn enter(queue: &'q Queue) -> Self {
        queue.enter();
        Queued {
            queue,
            since: Instant::now(),
        }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.queue.leave(self.since.elapsed());
    }
}

/// What serving one public socket needs besides the socket: where connections go, and how
/// they end. The listener's accept loop hands it to the protocol's proxy.
#[derive(Debug, Clone)]
pub struct ServeContext {
    /// The app's pool and the listener's settings.
    pub route: Arc<Route>,
    /// Cancelled to stop accepting (connections in flight go on).
    pub stop: CancellationToken,
    /// Cancelled to end every connection at once (the end of a shutdown).
    pub abort: CancellationToken,
    /// Connection tasks are spawned here, so a shutdown can wait for them.
    pub tracker: TaskTracker,
    /// The master's file descriptors for connections, shared by every listener: a proxied
    /// TCP connection holds two permits (client and worker sides) from before its accept to
    /// its end, so past the budget connections wait in the kernel's backlog instead of
    /// failing accept with EMFILE.
    pub budget: FdBudget,
}

/// Descriptors the master may spend on connections ([`ServeContext::budget`]).
pub type FdBudget = Arc<tokio::sync::Semaphore>;

/// Descriptors a proxied TCP (or HTTP) connection takes: the client's and the worker's.
pub const FDS_PER_CONNECTION: u32 = 2;

/// A budget that never runs out (tests, benches).
pub fn unlimited_budget() -> FdBudget {
    Arc::new(tokio::sync::Semaphore::new(
        tokio::sync::Semaphore::MAX_PERMITS,
    ))
}

/// Where one public listener (TCP, UDP or HTTP) sends its traffic: an app's pool, and the
/// settings a reload may change.
#[derive(Debug)]
pub struct Route {
    /// The app's name, for logs.
    pub app: String,
    /// The app's ready workers.
    pub pool: Arc<Pool>,
    /// This listener's metric handles (see [`metrics`]).
    pub meters: metrics::ListenerMeters,
    settings: ArcSwap<RouteSettings>,
    headers_refused: AtomicU64,
}

/// The parts of a route a reload may change; read wait-free once per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteSettings {
    /// Which of the worker's private addresses belongs to this listener.
    pub listener_index: usize,
    /// Time allowed for one connect to a worker.
    pub connect_timeout: Duration,
    /// Time a connection may wait for a ready worker.
    pub queue_timeout: Duration,
    /// Flow-table limits (UDP listeners).
    pub udp: UdpSettings,
    /// Front-end limits (HTTP listeners).
    pub http: HttpSettings,
    /// How a worker is picked.
    pub balance: Balance,
    /// Connections (requests, on HTTP) one worker is given at a time; `None`: no limit.
    pub max_conns: Option<usize>,
    /// The PROXY header sent to workers before any client byte (TCP listeners).
    pub proxy_protocol: Option<ProxyVersion>,
    /// Whether clients (a load balancer in front) start with a PROXY header.
    pub accept_proxy: bool,
}

/// The settings of a listener whose app sets nothing: every `balancer.toml` default (what
/// tests and benches start from).
impl Default for RouteSettings {
    fn default() -> Self {
        use balancer_config::defaults;
        RouteSettings {
            listener_index: 0,
            connect_timeout: defaults::CONNECT_TIMEOUT,
            queue_timeout: defaults::QUEUE_TIMEOUT,
            udp: UdpSettings {
                max_flows: defaults::MAX_FLOWS,
                idle_timeout: defaults::UDP_IDLE_TIMEOUT,
            },
            http: HttpSettings {
                header_timeout: defaults::HTTP_HEADER_TIMEOUT,
                max_header_size: defaults::HTTP_MAX_HEADER_SIZE,
                idle_timeout: defaults::HTTP_IDLE_TIMEOUT,
            },
            balance: Balance::RoundRobin,
            max_conns: None,
            proxy_protocol: None,
            accept_proxy: false,
        }
    }
}

impl Route {
    /// A route to `pool`'s workers.
    pub fn new(app: impl Into<String>, pool: Arc<Pool>, settings: RouteSettings) -> Self {
        let app = app.into();
        Route {
            meters: metrics::ListenerMeters::noop(&app),
            app,
            pool,
            settings: ArcSwap::from_pointee(settings),
            headers_refused: AtomicU64::new(0),
        }
    }

    /// Counts a client whose PROXY header was refused (`accept_proxy`), returning the count so
    /// far: the master's debug log carries it.
    pub fn header_refused(&self) -> u64 {
        self.headers_refused.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The same route, counting into metrics labelled with `listener` (as written in the
    /// config); a route made with [`new`](Self::new) alone counts nothing.
    pub fn for_listener(mut self, listener: &str) -> Self {
        self.meters = metrics::ListenerMeters::new(&self.app, listener);
        self
    }

    /// The current settings.
    pub fn settings(&self) -> RouteSettings {
        **self.settings.load()
    }

    /// Replaces the settings (after a reload changed the app).
    pub fn update(&self, settings: RouteSettings) {
        self.settings.store(Arc::new(settings));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pool_of(n: usize) -> (Pool, Vec<Arc<WorkerHandle>>) {
        let pool = Pool::new();
        let workers: Vec<_> = (0..n as u32)
            .map(|id| {
                let addr = SocketAddr::from(([127, 0, 0, 1], 10_000 + id as u16));
                Arc::new(WorkerHandle::new(id, id, 1000 + id, vec![addr]))
            })
            .collect();
        for w in &workers {
            pool.insert(Arc::clone(w));
        }
        (pool, workers)
    }

    fn settings(queue_timeout: Duration) -> RouteSettings {
        RouteSettings {
            connect_timeout: Duration::from_secs(1),
            queue_timeout,
            ..RouteSettings::default()
        }
    }

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    proptest! {
        /// The policy production runs — round-robin candidates, then `acquire` — through the
        /// proxies' own walk. Over `turns` full turns (one walk per connection, as the proxies
        /// do) a draining worker is never picked, and each other worker is picked `turns`
        /// times plus one more per turn for each draining worker just before it (a skipped
        /// worker's turn goes to the next one): never starved, never more than that.
        #[test]
        fn the_walk_is_fair_and_never_picks_a_draining_worker(
            draining in proptest::collection::vec(any::<bool>(), 1..8),
            turns in 1usize..5,
        ) {
            let n = draining.len();
            let (pool, workers) = pool_of(n);
            for (w, d) in workers.iter().zip(&draining) {
                if *d {
                    w.start_draining();
                }
            }
            let mut picked = vec![0usize; n];
            for _ in 0..n * turns {
                match Walk::new(&pool, &settings(Duration::from_secs(1)), CLIENT).next() {
                    Some(pick) => {
                        prop_assert!(!pick.worker().is_draining());
                        picked[pick.worker().id as usize] += 1;
                    }
                    None => prop_assert!(draining.iter().all(|d| *d)),
                }
            }
            if draining.iter().all(|d| *d) {
                return Ok(());
            }
            for i in (0..n).filter(|&i| !draining[i]) {
                let skipped_before = (1..n).take_while(|b| draining[(i + n - b) % n]).count();
                prop_assert_eq!(picked[i], turns * (1 + skipped_before), "worker {}", i);
            }
            prop_assert_eq!(picked.iter().sum::<usize>(), n * turns);
        }

        /// Under every algorithm, a walk never picks a draining worker nor one at `max_conns`,
        /// and finds a worker whenever one is neither.
        #[test]
        fn no_algorithm_picks_a_draining_or_full_worker(
            workers in proptest::collection::vec((any::<bool>(), 0usize..4), 1..10),
            limit in 1usize..4,
            balance in proptest::sample::select(vec![
                Balance::RoundRobin, Balance::LeastConn, Balance::P2c, Balance::Source,
            ]),
            client in any::<[u8; 4]>(),
        ) {
            let (pool, handles) = pool_of(workers.len());
            let mut guards = Vec::new();
            for (w, &(draining, load)) in handles.iter().zip(&workers) {
                for _ in 0..load {
                    guards.push(w.acquire().unwrap());
                }
                if draining {
                    w.start_draining();
                }
            }
            let mut settings = settings(Duration::from_secs(1));
            settings.balance = balance;
            settings.max_conns = Some(limit);
            let open = |i: usize| !workers[i].0 && workers[i].1 < limit;
            match Walk::new(&pool, &settings, IpAddr::from(client)).next() {
                Some(pick) => {
                    let i = pick.worker().id as usize;
                    prop_assert!(open(i), "picked worker {} {:?}", i, workers[i]);
                    prop_assert_eq!(pick.worker().live(), workers[i].1 + 1);
                }
                None => prop_assert!((0..workers.len()).all(|i| !open(i))),
            }
            for (w, &(_, load)) in handles.iter().zip(&workers) {
                prop_assert!(w.live() <= load + 1);
            }
        }

        /// UDP's walk: never a draining or gone worker, and the worker a flow just left only
        /// when no other one takes the flow.
        #[test]
        fn the_flow_walk_avoids_the_worker_left_unless_it_is_the_only_one(
            states in proptest::collection::vec(0u8..3, 1..8),
            left in 0usize..8,
        ) {
            let (pool, workers) = pool_of(states.len());
            for (w, s) in workers.iter().zip(&states) {
                match s {
                    1 => { w.start_draining(); }
                    2 => w.mark_gone(),
                    _ => {}
                }
            }
            let left = &workers[left % workers.len()];
            let takes = |w: &WorkerHandle| !w.is_draining() && !w.is_gone();
            let others = workers.iter().any(|w| !Arc::ptr_eq(w, left) && takes(w));
            let pick = Walk::new(&pool, &settings(Duration::from_secs(1)), CLIENT).skip_gone().avoiding(Some(left)).next();
            match pick {
                Some(pick) => {
                    prop_assert!(takes(pick.worker()));
                    prop_assert_eq!(Arc::ptr_eq(pick.worker(), left), !others);
                }
                None => prop_assert!(!others && !takes(left)),
            }
        }
    }

    #[tokio::test]
    async fn a_failed_attempt_hands_its_state_to_the_next_worker() {
        let (pool, _workers) = pool_of(3);
        let route = Route::new("t", Arc::new(pool), settings(Duration::from_secs(1)));
        let stop = CancellationToken::new();
        let mut tried = Vec::new();
        let got: Result<u32, PickError<()>> = pick_and_connect(
            &route,
            &route.settings(),
            &stop,
            CLIENT,
            0u32,
            |pick, failures| {
                tried.push(pick.worker().id);
                async move {
                    if failures < 2 {
                        Attempt::Next(failures + 1)
                    } else {
                        Attempt::Connected(pick.worker().id)
                    }
                }
            },
        )
        .await;
        assert_eq!(got.ok(), Some(2));
        assert_eq!(tried, [0, 1, 2]);
    }

    #[tokio::test]
    async fn giving_up_stops_and_an_empty_pool_times_out_or_stops() {
        let (pool, workers) = pool_of(2);
        let route = Route::new("t", Arc::new(pool), settings(Duration::from_millis(50)));
        let stop = CancellationToken::new();
        let got = pick_and_connect(
            &route,
            &route.settings(),
            &stop,
            CLIENT,
            (),
            |_, ()| async { Attempt::<(), (), _>::GiveUp("no") },
        )
        .await;
        assert!(matches!(got, Err(PickError::GaveUp("no"))));

        for w in &workers {
            route.pool.remove(w);
        }
        let started = Instant::now();
        let got = pick_and_connect(
            &route,
            &route.settings(),
            &stop,
            CLIENT,
            (),
            |_, ()| async { Attempt::<(), (), ()>::Connected(()) },
        )
        .await;
        assert!(matches!(got, Err(PickError::NoWorker(d)) if d == Duration::from_millis(50)));
        assert!(started.elapsed() >= Duration::from_millis(50));

        stop.cancel();
        let got = pick_and_connect(
            &route,
            &settings(Duration::from_secs(30)),
            &stop,
            CLIENT,
            (),
            |_, ()| async { Attempt::<(), (), ()>::Connected(()) },
        )
        .await;
        assert!(matches!(got, Err(PickError::Stopped)));
    }
}
