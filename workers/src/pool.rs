//! The pool: the set of ready workers an app's listeners may send connections to.
//!
//! One [`Pool`] per app. Listeners only read it (a wait-free `ArcSwap` load per connection); only
//! the app's supervisor writes it. The snapshot holds ready workers only, so a policy never has
//! to look at worker state — except for the `draining` flag, which closes the race between a
//! proxy picking a worker and the supervisor deciding to drain it (see [`WorkerHandle::acquire`]).

use std::any::Any;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};

/// A running worker as the data path sees it: where to connect, and its live-connection count.
#[derive(Debug)]
pub struct WorkerHandle {
    /// The worker's id (stable across crash restarts of the same slot).
    pub id: u32,
    /// The instance number the worker was given (`BALANCER_INSTANCE`).
    pub instance: u32,
    /// The process id of this incarnation.
    pub pid: u32,
    /// One private address per listener of the app, in `listen` order.
    pub addrs: Vec<SocketAddr>,
    live: AtomicUsize,
    total: AtomicU64,
    /// Bytes proxied both ways, added once per connection when it ends (what `monit` rates).
    bytes: AtomicU64,
    draining: AtomicBool,
    gone: AtomicBool,
    idle: Notify,
    /// The queue of the pool this worker joined: told when a connection ends, so a connection
    /// waiting for a worker under its `max_conns` tries again.
    queue: OnceLock<Arc<Queue>>,
    /// One slot per listener for what the proxy counts about this worker there (its metric
    /// handles): filled once, on the worker's first connection, so a connection never looks
    /// a label set up. Typed `Any` because the data path's types live above this crate.
    meters: Box<[OnceLock<Box<dyn Any + Send + Sync>>]>,
}

impl WorkerHandle {
    /// A handle for a freshly spawned worker.
    pub fn new(id: u32, instance: u32, pid: u32, addrs: Vec<SocketAddr>) -> Self {
        let addrs_len = addrs.len();
        WorkerHandle {
            id,
            instance,
            pid,
            addrs,
            live: AtomicUsize::new(0),
            total: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            idle: Notify::new(),
            queue: OnceLock::new(),
            meters: (0..addrs_len).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The value in this worker's slot for listener `index`, made by `init` the first time.
    /// `None` for an index the worker has no address for, or a slot holding another type.
    pub fn meters<T: Any + Send + Sync>(
        &self,
        index: usize,
        init: impl FnOnce() -> T,
    ) -> Option<&T> {
        self.meters
            .get(index)?
            .get_or_init(|| Box::new(init()))
            .downcast_ref()
    }

    /// Counts a new connection against this worker, unless it is draining.
    ///
    /// The count is raised *before* the `draining` flag is read, and the supervisor sets the flag
    /// *before* it reads the count (both `SeqCst`), so at least one side sees the other: either
    /// this returns `None`, or the supervisor's drain waits for the connection.
    pub fn acquire(self: &Arc<Self>) -> Option<ConnGuard> {
        self.acquire_within(None)
    }

    /// [`acquire`](Self::acquire), also refusing when the worker already carries `limit`
    /// connections (`max_conns`). The count is raised first and the limit checked against the
    /// value it had, so two proxies racing for the last place never both get it; the loser's
    /// undo wakes the queue, so it is not left waiting for a place that is free.
    pub fn acquire_within(self: &Arc<Self>, limit: Option<usize>) -> Option<ConnGuard> {
        let before = self.live.fetch_add(1, Ordering::SeqCst);
        if self.draining.load(Ordering::SeqCst) || limit.is_some_and(|l| before >= l) {
            self.release();
            return None;
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(ConnGuard(Arc::clone(self)))
    }

    fn release(&self) {
        if self.live.fetch_sub(1, Ordering::SeqCst) == 1 && self.draining.load(Ordering::SeqCst) {
            self.idle.notify_one();
        }
    }

    /// Connections currently counted against this worker.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Connections ever counted against this worker.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Counts the bytes a finished connection moved (both directions).
    pub fn add_bytes(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes proxied to and from this worker by connections that have ended.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether [`start_draining`](Self::start_draining) was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Records that the process has exited: sessions pinned to it (UDP flows) must move.
    pub fn mark_gone(&self) {
        self.gone.store(true, Ordering::SeqCst);
    }

    /// Whether the process has exited. Unlike draining, whatever it still carries is lost.
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::SeqCst)
    }

    /// Refuses new connections from now on and returns how many are still live.
    pub fn start_draining(&self) -> usize {
        self.draining.store(true, Ordering::SeqCst);
        self.live.load(Ordering::SeqCst)
    }

    /// Resolves once a draining worker has no live connection left.
    pub async fn idle(&self) {
        loop {
            if self.live.load(Ordering::SeqCst) == 0 {
                return;
            }
            // `notify_one` stores a permit when nobody waits yet, so a release between the load
            // above and this await is not lost.
            self.idle.notified().await;
        }
    }
}

/// A live connection counted against a worker; dropping it uncounts it.
#[derive(Debug)]
pub struct ConnGuard(Arc<WorkerHandle>);

impl ConnGuard {
    /// The worker this connection is counted against.
    pub fn worker(&self) -> &Arc<WorkerHandle> {
        &self.0
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.release();
        // Only a connection that really ends frees a place. A refused `acquire` undoes its
        // count without waking the queue: the waiter that was refused would wake itself and
        // spin. (A place is never lost that way: of walkers racing for it, the first to raise
        // the count sees it free.)
        if let Some(queue) = self.0.queue.get() {
            queue.place_freed();
        }
    }
}

/// The connections of one app waiting for a worker (none ready, or all at `max_conns`):
/// HAProxy's per-backend queue. The proxies wait here; the pool's workers wake them when a
/// connection ends; `show` reads the figures.
#[derive(Debug, Default)]
pub struct Queue {
    waiting: AtomicUsize,
    freed: Notify,
    queued: AtomicU64,
    wait_us_total: AtomicU64,
    wait_us_max: AtomicU64,
}

/// What [`Queue::stats`] reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Connections waiting now.
    pub waiting: usize,
    /// Connections that ever had to wait.
    pub queued: u64,
    /// Their total wait.
    pub wait_total: Duration,
    /// The longest wait so far.
    pub wait_max: Duration,
}

impl Queue {
    /// Enters the queue: from now on every connection that ends wakes [`freed`](Self::freed)
    /// waiters. Call [`leave`](Self::leave) with the time waited when done.
    pub fn enter(&self) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        self.queued.fetch_add(1, Ordering::Relaxed);
    }

    /// Leaves the queue after waiting `waited`.
    pub fn leave(&self, waited: Duration) {
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        let us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        self.wait_us_total.fetch_add(us, Ordering::Relaxed);
        self.wait_us_max.fetch_max(us, Ordering::Relaxed);
    }

    /// The notification a queued connection waits on. Create (and `enable`) it *before* the
    /// walk that may find every worker full: a connection ending after that wakes it.
    pub fn freed(&self) -> &Notify {
        &self.freed
    }

    /// A connection ended. Only a queue with waiters pays for the wake-up, so the hot path of
    /// an app without a queue is one atomic load.
    fn place_freed(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.freed.notify_waiters();
        }
    }

    /// The queue's figures.
    pub fn stats(&self) -> QueueStats {
        QueueStats {
            waiting: self.waiting.load(Ordering::SeqCst),
            queued: self.queued.load(Ordering::Relaxed),
            wait_total: Duration::from_micros(self.wait_us_total.load(Ordering::Relaxed)),
            wait_max: Duration::from_micros(self.wait_us_max.load(Ordering::Relaxed)),
        }
    }
}

/// An immutable view of the ready workers, replaced whole on every change.
#[derive(Debug, Default)]
pub struct PoolSnapshot {
    /// Ready workers, ordered by id.
    pub workers: Vec<Arc<WorkerHandle>>,
}

/// The ready workers of one app.
#[derive(Debug)]
pub struct Pool {
    snapshot: ArcSwap<PoolSnapshot>,
    next: AtomicUsize,
    version: watch::Sender<u64>,
    writer: Mutex<()>,
    queue: Arc<Queue>,
}

impl Default for Pool {
    fn default() -> Self {
        Pool::new()
    }
}

impl Pool {
    /// An empty pool.
    pub fn new() -> Self {
        Pool {
            snapshot: ArcSwap::from_pointee(PoolSnapshot::default()),
            next: AtomicUsize::new(0),
            version: watch::Sender::new(0),
            writer: Mutex::new(()),
            queue: Arc::new(Queue::default()),
        }
    }

    /// The current snapshot (wait-free).
    pub fn load(&self) -> arc_swap::Guard<Arc<PoolSnapshot>> {
        self.snapshot.load()
    }

    /// The current snapshot as an owned `Arc`, for iterating across awaits.
    pub fn load_full(&self) -> Arc<PoolSnapshot> {
        self.snapshot.load_full()
    }

    /// The round-robin cursor: one `fetch_add` per pick. The policy that reads it lives in the
    /// balancer crate (`policy/round_robin.rs`); the pool only keeps the counter, so every
    /// listener of the app shares one rotation.
    pub fn next_index(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// The app's queue of connections waiting for a worker.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// A receiver that sees a new value whenever the membership changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Waits until the pool holds at least one worker. Cancel it with a timeout.
    pub async fn wait_nonempty(&self) {
        let mut rx = self.subscribe();
        loop {
            if !self.load().workers.is_empty() {
                return;
            }
            if rx.changed().await.is_err() {
                // The sender lives in `self`; it cannot be dropped while we borrow it.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Adds a ready worker (the supervisor's call). Adding one twice is a no-op.
    pub fn insert(&self, worker: Arc<WorkerHandle>) {
        // A handle belongs to one app's pool for its whole life.
        let _ = worker.queue.set(Arc::clone(&self.queue));
        self.update(|workers| {
            if !workers.iter().any(|w| Arc::ptr_eq(w, &worker)) {
                workers.push(worker);
                workers.sort_by_key(|w| (w.id, w.pid));
            }
        });
    }

    /// Removes a worker (the supervisor's call). Removing an absent one is a no-op.
    pub fn remove(&self, worker: &Arc<WorkerHandle>) {
        self.update(|workers| workers.retain(|w| !Arc::ptr_eq(w, worker)));
    }

    /// Number of ready workers.
    pub fn len(&self) -> usize {
        self.load().workers.len()
    }

    /// Whether no worker is ready.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn update(&self, change: impl FnOnce(&mut Vec<Arc<WorkerHandle>>)) {
        // Writers are rare (supervisor events); the mutex only orders them against each other.
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut workers = self.snapshot.load().workers.clone();
        change(&mut workers);
        self.snapshot.store(Arc::new(PoolSnapshot { workers }));
        self.version.send_modify(|v| *v += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_meter_slot_is_made_once_per_listener() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 1));
        let w = WorkerHandle::new(0, 0, 1, vec![addr, addr]);
        let mut made = 0;
        assert_eq!(
            w.meters(0, || {
                made += 1;
                7u32
            }),
            Some(&7)
        );
        assert_eq!(
            w.meters(0, || {
                made += 1;
                8u32
            }),
            Some(&7),
            "kept"
        );
        assert_eq!(made, 1);
        assert_eq!(w.meters(1, || 9u32), Some(&9), "one slot per listener");
        assert_eq!(w.meters::<u64>(0, || 1), None, "another type is not it");
        assert_eq!(w.meters(2, || 1u32), None, "no such listener");
    }

    fn worker(id: u32) -> Arc<WorkerHandle> {
        Arc::new(WorkerHandle::new(id, id, 1000 + id, vec![]))
    }

    #[test]
    fn guard_counts_live_connections() {
        let w = worker(1);
        let a = w.acquire().unwrap();
        let b = w.acquire().unwrap();
        assert!(Arc::ptr_eq(a.worker(), &w));
        assert_eq!(w.live(), 2);
        drop(a);
        assert_eq!(w.live(), 1);
        drop(b);
        assert_eq!(w.live(), 0);
        assert_eq!(w.total(), 2);
    }

    #[tokio::test]
    async fn max_conns_refuses_a_full_worker_and_only_an_ending_connection_wakes_the_queue() {
        let pool = Pool::new();
        let w = worker(1);
        pool.insert(Arc::clone(&w));
        let held = w.acquire_within(Some(1)).unwrap();
        pool.queue().enter();
        let mut woken = std::pin::pin!(pool.queue().freed().notified());
        woken.as_mut().enable();
        assert!(w.acquire_within(Some(1)).is_none(), "full");
        assert_eq!(w.live(), 1);
        assert!(
            futures_poll(woken.as_mut()).is_pending(),
            "a refusal must not wake the queue (the refused waiter would spin)"
        );
        drop(held);
        assert!(futures_poll(woken.as_mut()).is_ready());
        pool.queue().leave(std::time::Duration::from_millis(3));
        let stats = pool.queue().stats();
        assert_eq!((stats.waiting, stats.queued), (0, 1));
        assert!(w.acquire_within(Some(1)).is_some());
    }

    fn futures_poll<F: std::future::Future>(
        f: std::pin::Pin<&mut F>,
    ) -> std::task::Poll<F::Output> {
        let waker = std::task::Waker::noop();
        f.poll(&mut std::task::Context::from_waker(waker))
    }

    #[tokio::test]
    async fn draining_worker_waits_for_its_connections() {
        let w = worker(1);
        let g = w.acquire().unwrap();
        assert_eq!(w.start_draining(), 1);
        assert!(
            w.acquire().is_none(),
            "a draining worker takes no new connection"
        );
        let idle = tokio::spawn({
            let w = Arc::clone(&w);
            async move { w.idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!idle.is_finished());
        drop(g);
        tokio::time::timeout(std::time::Duration::from_secs(5), idle)
            .await
            .expect("idle resolves once the last connection ends")
            .unwrap();
    }

    /// The drain race: proxies acquiring while the supervisor drains. Whatever the interleaving,
    /// every connection the proxy got is seen by the drain (live > 0 until it is released), and
    /// no connection is granted after `start_draining` returned zero.
    #[test]
    fn drain_race_never_loses_a_connection() {
        for _ in 0..200 {
            let w = worker(7);
            let stop = Arc::new(AtomicBool::new(false));
            let granted_after_idle = Arc::new(AtomicBool::new(false));
            let drained_idle = Arc::new(AtomicBool::new(false));
            let proxy = {
                let (w, stop, granted_after_idle, drained_idle) = (
                    Arc::clone(&w),
                    Arc::clone(&stop),
                    Arc::clone(&granted_after_idle),
                    Arc::clone(&drained_idle),
                );
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        if let Some(g) = w.acquire()
                            && drained_idle.load(Ordering::SeqCst)
                        {
                            granted_after_idle.store(true, Ordering::SeqCst);
                            drop(g);
                        }
                    }
                })
            };
            std::thread::yield_now();
            // The supervisor's side: flag, then read the count; if zero, the worker is idle for good.
            if w.start_draining() == 0 {
                drained_idle.store(true, Ordering::SeqCst);
            } else {
                while w.live() != 0 {
                    std::hint::spin_loop();
                }
                drained_idle.store(true, Ordering::SeqCst);
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
            stop.store(true, Ordering::SeqCst);
            proxy.join().unwrap();
            assert!(!granted_after_idle.load(Ordering::SeqCst));
            assert_eq!(w.live(), 0);
        }
    }
}
