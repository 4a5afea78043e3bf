//! Async sockets on io_uring, for code that stays async: a few threads (one per two cores, as
//! [`rings`](super::rings)) each run a current-thread tokio runtime whose tasks do their socket
//! I/O through one ring of that thread. The `http://` fast path moves a keep-alive connection
//! to one of them, with the same code as on epoll (`proxy::http::fast::wire`).
//!
//! An operation is a future ([`Op`]) that pushes its entry and waits for its completion. The
//! entries of every task go to the kernel in one `io_uring_enter`, when the runtime has run
//! every task it could and is about to park (`on_thread_park`). The completions wake the
//! tasks through the ring's descriptor, which the runtime's epoll watches: per loop, one
//! enter and one `epoll_wait` however many operations completed, where the epoll path spends
//! a system call on each read and each write.
//!
//! Receives complete into the thread's provided buffers ([`Provided`]), so a connection
//! waiting for its client holds no buffer; the bytes are copied out at once and the buffer
//! offered again. A send owns a copy of its bytes.
//!
//! An operation whose future is dropped before it completed is *orphaned*: it is cancelled
//! (`AsyncCancel`), and what it points to (a send's bytes, a receive's own buffer) is kept
//! until the kernel says it is done. A [`Stream`] keeps its receive across dropped futures, so
//! a `select!` that gives up on a read does not lose the bytes it was about to get.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::provided::Provided;

/// Submission queue entries per thread's ring; a full queue is submitted at once.
const ENTRIES: u32 = 512;
const GROUP: u16 = 0;
/// Provided buffers per thread: a receive's bytes are copied out as soon as it completes, so a
/// buffer is held only between a completion and its task's next poll.
const BUFFERS: u16 = if cfg!(test) { 4 } else { 64 };
/// The size of each: the epoll path's read.
const BUF_SIZE: u32 = crate::proxy::copy::BUFFER_SIZE as u32;
/// `user_data` of entries nobody waits for (cancels).
const IGNORED: u64 = u64::MAX;

/// An operation's state in its thread's driver.
enum Slot {
    Free,
    /// In the ring; the task to wake.
    Waiting(Option<Waker>),
    /// Completed, not yet seen by its future.
    Done(i32, u32),
    /// Completed and returned by its future, which has not been dropped yet.
    Seen,
    /// Its future was dropped: the memory it points to stays until it completes.
    Orphan(#[allow(dead_code)] Option<Vec<u8>>),
}

struct Driver {
    ring: IoUring,
    /// Dropped after the ring, which maps them.
    provided: Provided,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Entries pushed and not submitted yet.
    unsubmitted: bool,
    /// The wakers of a reap, kept for the next one.
    woken: Vec<Waker>,
    /// Send buffers given back, for the next sends.
    spare: Vec<Vec<u8>>,
}

/// Send buffers a thread keeps for reuse, and the largest one it keeps.
const SPARE_MAX: usize = 64;
const SPARE_CAPACITY_MAX: usize = 64 * 1024;

thread_local! {
    static DRIVER: RefCell<Option<Driver>> = const { RefCell::new(None) };
}

fn with<R>(f: impl FnOnce(&mut Driver) -> R) -> R {
    DRIVER.with_borrow_mut(|d| f(d.as_mut().expect("io_uring I/O runs on a ring's thread")))
}

impl Driver {
    fn new() -> io::Result<Driver> {
        // One thread submits and reaps; completions are posted when it next enters the kernel
        // (its epoll_wait included) rather than by interrupting it.
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(ENTRIES)
            .or_else(|_| IoUring::builder().build(ENTRIES))?;
        let provided = Provided::new(&ring, GROUP, BUFFERS, BUF_SIZE)?;
        Ok(Driver {
            ring,
            provided,
            slots: Vec::new(),
            free: Vec::new(),
            unsubmitted: false,
            woken: Vec::new(),
            spare: Vec::new(),
        })
    }

    fn push(&mut self, entry: &squeue::Entry) {
        // SAFETY: what an entry points to outlives its completion: the bytes are owned by its
        // `Op` and, once that is dropped, by its orphaned slot; the provided buffers are the
        // driver's.
        while unsafe { self.ring.submission().push(entry) }.is_err() {
            if let Err(e) = self.ring.submit() {
                tracing::warn!("io_uring submit: {e}");
            }
        }
        self.unsubmitted = true;
    }

    fn start(&mut self, entry: squeue::Entry) -> usize {
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Slot::Waiting(None);
                slot
            }
            None => {
                self.slots.push(Slot::Waiting(None));
                self.slots.len() - 1
            }
        };
        self.push(&entry.user_data(slot as u64));
        slot
    }

    fn submit(&mut self) {
        if std::mem::take(&mut self.unsubmitted)
            && let Err(e) = self.ring.submit()
        {
            tracing::warn!("io_uring submit: {e}");
            self.unsubmitted = true;
        }
    }

    /// Takes every completion: wakes the waiting futures, frees the orphans.
    fn reap(&mut self) {
        let mut wake = std::mem::take(&mut self.woken);
        for c in self.ring.completion() {
            let slot = c.user_data();
            if slot == IGNORED {
                continue;
            }
            let slot = slot as usize;
            match std::mem::replace(&mut self.slots[slot], Slot::Done(c.result(), c.flags())) {
                Slot::Waiting(waker) => wake.extend(waker),
                Slot::Orphan(_) => {
                    if let Some(bid) = cqueue::buffer_select(c.flags()) {
                        self.provided.offer(bid);
                    }
                    self.slots[slot] = Slot::Free;
                    self.free.push(slot);
                }
                Slot::Done(..) | Slot::Seen | Slot::Free => {
                    unreachable!("one completion per operation")
                }
            }
        }
        // Woken after the loop: a woken task runs later, on this thread, not inside it.
        wake.drain(..).for_each(Waker::wake);
        self.woken = wake;
    }

    /// A send buffer, empty: one given back if there is one.
    fn buffer(&mut self) -> Vec<u8> {
        self.spare.pop().unwrap_or_default()
    }

    fn give_back(&mut self, mut bytes: Vec<u8>) {
        if self.spare.len() < SPARE_MAX && bytes.capacity() <= SPARE_CAPACITY_MAX {
            bytes.clear();
            self.spare.push(bytes);
        }
    }
}

/// Submits what the tasks pushed (the runtime's `on_thread_park`).
fn submit() {
    DRIVER.with_borrow_mut(|d| {
        if let Some(d) = d.as_mut() {
            d.submit();
        }
    });
}

/// The ring's descriptor, which epoll reports readable when completions are there.
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Wakes the tasks whose operations completed, for as long as the thread runs.
async fn reaper() {
    let fd = with(|d| d.ring.as_raw_fd());
    // SAFETY: the ring's descriptor stays open while this task runs: the driver is dropped
    // only after the thread's tasks.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(RingFd(fd), tokio::io::Interest::READABLE)
    };
    let watched = match registered {
        Ok(watched) => watched,
        Err(e) => {
            tracing::error!("io_uring: the ring's descriptor cannot be watched: {e}");
            return;
        }
    };
    loop {
        let Ok(mut ready) = watched.readable().await else {
            return;
        };
        with(Driver::reap);
        ready.clear_ready();
    }
}

/// One operation in the ring: resolves to its completion's result and flags. It is `Send`,
/// so that the tasks holding one run on their thread's runtime without a `LocalSet` (whose
/// wake-ups write to the runtime's eventfd), but it belongs to the ring it was pushed to:
/// polling or dropping it on another thread is a bug, and panics.
pub(crate) struct Op {
    slot: usize,
    /// The ring's descriptor: which thread's driver has the operation.
    ring: RawFd,
    /// The bytes the entry points to, for a send or an own-buffer receive.
    keep: Option<Vec<u8>>,
}

impl Op {
    fn start(entry: squeue::Entry, keep: Option<Vec<u8>>) -> Op {
        let (slot, ring) = with(|d| (d.start(entry), d.ring.as_raw_fd()));
        Op { slot, ring, keep }
    }
}

/// Panics unless this thread's driver is the ring's, `ring`.
fn own(d: &Driver, ring: RawFd) {
    assert_eq!(
        d.ring.as_raw_fd(),
        ring,
        "an io_uring operation used off its ring's thread"
    );
}

impl Future for Op {
    type Output = (i32, u32);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<(i32, u32)> {
        let (slot, ring) = (self.slot, self.ring);
        with(|d| {
            own(d, ring);
            poll_slot(d, slot, cx)
        })
    }
}

fn poll_slot(d: &mut Driver, slot: usize, cx: &mut Context<'_>) -> Poll<(i32, u32)> {
    match &mut d.slots[slot] {
        Slot::Done(result, flags) => {
            let out = (*result, *flags);
            // The flags' buffer, if any, is the caller's now.
            d.slots[slot] = Slot::Seen;
            Poll::Ready(out)
        }
        Slot::Waiting(waker) => {
            match waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        }
        Slot::Seen | Slot::Free | Slot::Orphan(_) => {
            unreachable!("an operation polled after it completed")
        }
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        let keep = self.keep.take();
        let (slot, ring) = (self.slot, self.ring);
        DRIVER.with_borrow_mut(|d| {
            let Some(d) = d.as_mut() else { return };
            own(d, ring);
            match std::mem::replace(&mut d.slots[slot], Slot::Free) {
                // Completed and never seen: a buffer it took goes back.
                Slot::Done(_, flags) => {
                    if let Some(bid) = cqueue::buffer_select(flags) {
                        d.provided.offer(bid);
                    }
                    d.free.push(slot);
                }
                Slot::Waiting(_) => {
                    d.slots[slot] = Slot::Orphan(keep);
                    let cancel = opcode::AsyncCancel::new(slot as u64)
                        .build()
                        .user_data(IGNORED);
                    d.push(&cancel);
                }
                Slot::Seen | Slot::Free | Slot::Orphan(_) => d.free.push(slot),
            }
        });
    }
}

/// A receive's bytes: in a provided buffer (offered again when dropped) or the receive's own.
pub(crate) enum Received {
    Eof,
    Provided { bid: u16, len: usize, at: usize },
    Own { buf: Vec<u8>, len: usize, at: usize },
}

impl Received {
    /// Passes the next bytes, `max` at most, to `f`, and counts them used.
    fn take(&mut self, max: usize, f: impl FnOnce(&[u8])) -> usize {
        let (len, at) = match self {
            Received::Eof => return 0,
            Received::Provided { bid, len, at } => {
                with(|d| f(rest(d.provided.bytes(*bid, *len), *at, max)));
                (*len, at)
            }
            Received::Own { buf, len, at } => {
                f(rest(&buf[..*len], *at, max));
                (*len, at)
            }
        };
        let n = (len - *at).min(max);
        *at += n;
        n
    }

    /// Copies what is left into `to` and returns how much; the rest stays for the next call.
    pub(crate) fn copy_to(&mut self, to: &mut [u8]) -> usize {
        self.take(to.len(), |bytes| to[..bytes.len()].copy_from_slice(bytes))
    }

    /// Appends all that is left to `to`.
    fn append_to(&mut self, to: &mut Vec<u8>) {
        self.take(usize::MAX, |bytes| to.extend_from_slice(bytes));
    }

    /// Nothing is left to copy (an EOF is never empty: it stays one).
    pub(crate) fn is_used(&self) -> bool {
        match self {
            Received::Eof => false,
            Received::Provided { len, at, .. } | Received::Own { len, at, .. } => at >= len,
        }
    }
}

/// `bytes[at..]`, `max` of them at most.
fn rest(bytes: &[u8], at: usize, max: usize) -> &[u8] {
    let rest = &bytes[at.min(bytes.len())..];
    &rest[..rest.len().min(max)]
}

impl Drop for Received {
    fn drop(&mut self) {
        if let Received::Provided { bid, .. } = *self {
            DRIVER.with_borrow_mut(|d| {
                if let Some(d) = d.as_mut() {
                    d.provided.offer(bid);
                }
            });
        }
    }
}

/// A connected socket whose I/O goes through the thread's ring. It is blocking: an operation
/// on an `O_NONBLOCK` socket may complete with `EAGAIN` instead of waiting in the ring.
pub(crate) struct Stream {
    socket: std::net::TcpStream,
    /// The receive in the ring, kept when the future that waited on it was dropped.
    reading: Option<Op>,
    /// Received bytes not copied out yet.
    left: Option<Received>,
}

impl Stream {
    /// Takes `socket` (from the epoll path: deregistered, any mode).
    pub(crate) fn new(socket: std::net::TcpStream) -> io::Result<Stream> {
        socket.set_nonblocking(false)?;
        Ok(Stream {
            socket,
            reading: None,
            left: None,
        })
    }

    /// Takes a socket that is blocking already (one this module gave out as idle).
    pub(crate) fn kept(socket: std::net::TcpStream) -> Stream {
        Stream {
            socket,
            reading: None,
            left: None,
        }
    }

    /// The socket, to keep idle: none when a receive is in the ring or bytes are left (a
    /// worker that sent what nobody asked for).
    pub(crate) fn into_idle(self) -> Option<std::net::TcpStream> {
        (self.reading.is_none() && self.left.is_none()).then_some(self.socket)
    }

    pub(crate) fn socket(&self) -> &std::net::TcpStream {
        &self.socket
    }

    /// Waits for bytes (holding no buffer) and copies up to `to.len()` of them into the
    /// buffer `room` gives once they are there; 0 is the EOF. `room` is called only when bytes
    /// came, so a connection waiting for its peer borrows nothing. The room must not be empty.
    pub(crate) async fn recv<'b>(
        &mut self,
        room: impl FnOnce() -> &'b mut [u8],
    ) -> io::Result<usize> {
        if self.left.is_none() {
            self.left = Some(self.receive().await?);
        }
        let left = self.left.as_mut().expect("just set");
        let room = room();
        debug_assert!(!room.is_empty(), "a receive into no room");
        let n = left.copy_to(room);
        if left.is_used() {
            self.left = None;
        }
        Ok(n)
    }

    /// One receive, into a provided buffer, or into one of its own when they ran out. The
    /// receive in the ring (either kind) is resumed if a dropped future left one.
    async fn receive(&mut self) -> io::Result<Received> {
        let fd = types::Fd(self.socket.as_raw_fd());
        loop {
            let op = self.reading.get_or_insert_with(|| {
                Op::start(
                    opcode::Recv::new(fd, std::ptr::null_mut(), BUF_SIZE)
                        .buf_group(GROUP)
                        .build()
                        .flags(squeue::Flags::BUFFER_SELECT),
                    None,
                )
            });
            let (result, flags) = Pin::new(&mut *op).await;
            let own = op.keep.take();
            self.reading = None;
            if let Some(buf) = own {
                return received(result, |len| Received::Own { buf, len, at: 0 });
            }
            if let Some(bid) = cqueue::buffer_select(flags) {
                // Made first, so that dropping it (an EOF, an error) offers the buffer again.
                let got = Received::Provided {
                    bid,
                    len: result.max(0) as usize,
                    at: 0,
                };
                return if result > 0 {
                    Ok(got)
                } else {
                    received(result, |_| Received::Eof)
                };
            }
            if result != -libc::ENOBUFS {
                return received(result, |_| Received::Eof);
            }
            let mut buf = vec![0u8; BUF_SIZE as usize];
            let entry = opcode::Recv::new(fd, buf.as_mut_ptr(), BUF_SIZE).build();
            self.reading = Some(Op::start(entry, Some(buf)));
        }
    }

    /// Sends `parts` whole, in order (one copy of them, owned by the send, in a buffer the
    /// thread reuses).
    pub(crate) async fn send(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        let mut bytes = with(Driver::buffer);
        for part in parts {
            bytes.extend_from_slice(part);
        }
        let fd = types::Fd(self.socket.as_raw_fd());
        let mut sent = 0;
        let mut outcome = Ok(());
        while sent < bytes.len() {
            // The pointer stays valid: `bytes` moves into the op, which keeps it until done.
            let ptr = bytes[sent..].as_ptr();
            let len = (bytes.len() - sent) as u32;
            let entry = opcode::Send::new(fd, ptr, len)
                .flags(libc::MSG_NOSIGNAL)
                .build();
            let mut op = Op::start(entry, Some(bytes));
            let (result, _) = Pin::new(&mut op).await;
            bytes = op.keep.take().expect("the send's bytes");
            match result {
                n if n > 0 => sent += n as usize,
                0 => outcome = Err(io::ErrorKind::WriteZero.into()),
                e => outcome = Err(io::Error::from_raw_os_error(-e)),
            }
            if outcome.is_err() {
                break;
            }
        }
        with(|d| d.give_back(bytes));
        outcome
    }

    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.socket.shutdown(how)
    }

    /// Gives the socket back, non-blocking, for the epoll path, with the bytes received and
    /// not copied out. A receive in the ring is cancelled first, and what it got kept.
    pub(crate) async fn into_std(self) -> io::Result<(std::net::TcpStream, Vec<u8>)> {
        let Stream {
            socket,
            reading,
            left,
        } = self;
        let mut bytes = Vec::new();
        if let Some(mut op) = reading {
            with(|d| {
                let cancel = opcode::AsyncCancel::new(op.slot as u64)
                    .build()
                    .user_data(IGNORED);
                d.push(&cancel);
            });
            let (result, flags) = Pin::new(&mut op).await;
            if let Some(bid) = cqueue::buffer_select(flags) {
                Received::Provided {
                    bid,
                    len: result.max(0) as usize,
                    at: 0,
                }
                .append_to(&mut bytes);
            }
        }
        if let Some(mut left) = left {
            left.append_to(&mut bytes);
        }
        socket.set_nonblocking(true)?;
        Ok((socket, bytes))
    }
}

fn received(result: i32, got: impl FnOnce(usize) -> Received) -> io::Result<Received> {
    if result < 0 {
        Err(io::Error::from_raw_os_error(-result))
    } else if result == 0 {
        Ok(Received::Eof)
    } else {
        Ok(got(result as usize))
    }
}

/// Work for a ring's thread: runs there, and spawns its tasks (`tokio::spawn`, on that
/// thread's runtime).
pub(crate) type Job = Box<dyn FnOnce() + Send>;

struct Lane {
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
}

struct Lanes {
    lanes: Vec<Lane>,
}

fn lanes() -> &'static Lanes {
    static LANES: OnceLock<Lanes> = OnceLock::new();
    LANES.get_or_init(|| Lanes {
        lanes: super::start_lanes("io_uring runtime", Lane::start),
    })
}

/// Whether a ring's thread runs (started at the first call): [`run`] has somewhere to go.
pub(crate) fn running() -> bool {
    !lanes().lanes.is_empty()
}

/// Runs `job` on one of the ring threads (round robin); gives it back when none runs.
pub(crate) fn run(job: Job) -> Result<(), Job> {
    let lanes = &lanes().lanes;
    if lanes.is_empty() {
        return Err(job);
    }
    let i = LANES_NEXT.fetch_add(1, Ordering::Relaxed) % lanes.len();
    lanes[i].jobs.send(job).map_err(|e| e.0)
}

/// The lane the next job goes to (round robin).
static LANES_NEXT: AtomicUsize = AtomicUsize::new(0);

impl Lane {
    fn start(i: usize) -> io::Result<Lane> {
        let (jobs, mut inbox) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let (ready, started) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("balancer-uring-rt-{i}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .on_thread_park(submit)
                    .build();
                let runtime = match runtime {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                match Driver::new() {
                    Ok(driver) => DRIVER.set(Some(driver)),
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                }
                let _ = ready.send(Ok(()));
                runtime.block_on(async move {
                    tokio::spawn(reaper());
                    while let Some(job) = inbox.recv().await {
                        job();
                    }
                });
                // The tasks drop with the runtime, their operations with them; then the ring.
                drop(runtime);
                DRIVER.take();
            })?;
        started
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the ring's thread ended")))?;
        Ok(Lane { jobs })
    }
}
