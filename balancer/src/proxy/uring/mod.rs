//! The io_uring path for established `tcp://` connections (`[balancer] io`); `driver` is the
//! same rings under async code, for keep-alive `http://` connections.
//!
//! A connection starts on the async runtime: accept, the PROXY header, the pick of a worker,
//! the connect and its retries, and the first exchanges are the epoll path's
//! ([`copy::bidirectional`](super::copy)). A connection that has gone back and forth (a
//! keep-alive client, a chat protocol) is then *carried* here: both sockets leave the runtime's
//! epoll and join one of a few rings (one per two cores), each driven by its own thread. A ring
//! serves every connection it carries with one `io_uring_enter` per loop: the receive, the
//! send and the next receive of many connections complete in one system call, where epoll
//! spends a wake-up and a syscall on each. Short connections finish on epoll without the
//! hand-over, and bulk streams stay there too, where splice(2) moves them.
//!
//! Each direction keeps one multishot `recv` armed, which completes with a provided buffer
//! each time bytes arrive (an idle connection holds no buffer), and sends what it got in
//! order, one `send` at a time. A direction holding [`MAX_QUEUED`] unsent buffers cancels its
//! receive until they are sent: a slow reader holds back its writer, as on epoll. When the
//! provided buffers run out, a direction that holds none receives into a buffer of its own,
//! so a pool run dry cannot deadlock echo-style peers.
//!
//! Half-close is exact: the EOF of one direction is a `shutdown(SHUT_WR)` of the other socket,
//! after that direction's last send completed. An error, or an abort (the task that owns the
//! connection's accounting is dropped), shuts both sockets down, which completes whatever is
//! pending; the sockets are closed only once nothing of theirs is in the ring, since a close
//! does not cancel the ring's operations.
//!
//! Unsafe code is allowed here, and only here in the proxy: a ring's submissions point into
//! memory the kernel writes later, which no safe wrapper can check. Every `unsafe` says what
//! keeps that memory alive.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

pub(crate) mod driver;
mod provided;

use provided::Provided;

/// The size of each provided buffer: the epoll path's first read.
const BUF_SIZE: u32 = super::copy::BUFFER_SIZE as u32;
/// Provided buffers per ring (a power of two). Buffers are touched only when used, so a ring
/// that carries little costs little memory.
const BUFFERS: u16 = if cfg!(test) { 16 } else { 256 };

/// Provided buffers holding bytes now, over all rings ([`tally`]).
static TAKEN: AtomicI64 = AtomicI64::new(0);
/// Receives that found no provided buffer and used the direction's own ([`tally`]).
static OWN: AtomicI64 = AtomicI64::new(0);
/// Connections the rings have taken ([`tally`]); the metric counts them in production.
static CARRIED: AtomicI64 = AtomicI64::new(0);

/// Adds `delta` to a counter the tests read. Outside tests nothing is counted: a shared atomic
/// per message would be a cache line bounced between rings on the hot path.
fn tally(counter: &AtomicI64, delta: i64) {
    if cfg!(test) {
        counter.fetch_add(delta, Ordering::Relaxed);
    }
}
/// The buffer group of the provided buffers.
const GROUP: u16 = 0;
/// Submission queue entries per ring; completions get twice as many by default.
const ENTRIES: u32 = 1024;

/// What one completion was for: the low byte of its `user_data`, above it the session's slot.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Recv = 0,
    Send = 1,
    /// The wake-up eventfd's read.
    Wake = 2,
    /// The cancel of a direction's multishot receive.
    Cancel = 3,
}

/// Received bytes a direction may hold unsent before its receive pauses: a slow reader
/// holds back its writer, and one connection cannot take the provided buffers of all.
const MAX_QUEUED: usize = 4;

fn user_data(slot: usize, dir: usize, op: Op) -> u64 {
    ((slot as u64) << 8) | ((dir as u64) << 4) | op as u64
}

fn decode(data: u64) -> (usize, usize, Option<Op>) {
    let op = match data & 0xf {
        0 => Some(Op::Recv),
        1 => Some(Op::Send),
        2 => Some(Op::Wake),
        3 => Some(Op::Cancel),
        _ => None,
    };
    ((data >> 8) as usize, ((data >> 4) & 0xf) as usize, op)
}

/// Whether the kernel gives this process working rings: `Err` says why not (seccomp,
/// `io_uring_disabled`, an old kernel). Checked once.
pub fn available() -> Result<(), &'static io::Error> {
    static CHECK: OnceLock<Result<(), io::Error>> = OnceLock::new();
    CHECK
        .get_or_init(|| Ring::new().map(drop))
        .as_ref()
        .map(|_| ())
}

/// Whether established `tcp://` connections are carried on rings ([`set`]).
static ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Applies `[balancer] io` (the file applied last sets it): whether interactive `tcp://`
/// connections are carried on rings from now on. `io_uring` where the kernel refuses rings is
/// an error and changes nothing; `auto` then says so once and stays on epoll.
pub fn set(io: balancer_config::Io) -> Result<(), &'static io::Error> {
    use balancer_config::Io;
    let on = match io {
        Io::Epoll => false,
        Io::IoUring => available().map(|()| true)?,
        Io::Auto => match available() {
            Ok(()) => true,
            Err(e) => {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    tracing::info!("io_uring is not available ({e}): tcp:// and http:// connections stay on epoll");
                });
                false
            }
        },
    };
    if ON.swap(on, Ordering::Relaxed) != on {
        tracing::info!(
            "tcp:// connections that go back and forth, and keep-alive http:// ones, are carried by {}",
            if on { "io_uring" } else { "epoll" }
        );
    }
    Ok(())
}

/// Whether [`set`] turned the rings on.
pub fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// The rings, started at the first connection carried.
fn lanes() -> &'static Lanes {
    static LANES: OnceLock<Lanes> = OnceLock::new();
    LANES.get_or_init(Lanes::start)
}

struct Lanes {
    lanes: Vec<Arc<Lane>>,
    next: AtomicUsize,
}

/// A ring's inbox: what the runtime asks of it, and the eventfd that wakes it.
struct Lane {
    /// `None` once the ring's thread has stopped.
    inbox: Mutex<Option<Vec<Msg>>>,
    wake: nix::sys::eventfd::EventFd,
}

enum Msg {
    Carry(Job),
    Abort(u64),
}

struct Job {
    id: u64,
    sockets: [std::net::TcpStream; 2],
    done: oneshot::Sender<io::Result<(u64, u64)>>,
}

/// Rings for `cores` cores: one per two. A ring's thread gains from every connection it
/// serves, since one enter completes many operations, and the other core of each pair is left
/// to the kernel's network work and the workers. On 2 cores, one ring took 14–16 µs of CPU per
/// keep-alive request where two took 17 (and epoll 19–24): two rings on two cores sleep and
/// wake three times as often.
fn rings(cores: usize) -> usize {
    (cores / 2).max(1)
}

impl Lanes {
    fn start() -> Lanes {
        Lanes {
            lanes: start_lanes("io_uring ring", Lane::start),
            next: AtomicUsize::new(0),
        }
    }
}

/// Starts `start(i)` for each ring this machine gets ([`rings`]), `what` naming them in the
/// log. `available()` said yes; a ring refused now (memlock, descriptors) leaves the ones that
/// started, and with none the epoll path carries everything.
fn start_lanes<L>(what: &str, start: impl Fn(usize) -> io::Result<L>) -> Vec<L> {
    let n = rings(std::thread::available_parallelism().map_or(1, usize::from));
    let mut lanes = Vec::with_capacity(n);
    for i in 0..n {
        match start(i) {
            Ok(lane) => lanes.push(lane),
            Err(e) => {
                tracing::warn!("{what} {i} not started: {e}");
                break;
            }
        }
    }
    lanes
}

impl Lane {
    /// Starts ring `i` on its own thread: a single-issuer ring must be set up by the thread
    /// that submits to it.
    fn start(i: usize) -> io::Result<Arc<Lane>> {
        use nix::sys::eventfd::{EfdFlags, EventFd};
        let wake =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        let lane = Arc::new(Lane {
            inbox: Mutex::new(Some(Vec::new())),
            wake,
        });
        let theirs = Arc::clone(&lane);
        let (ready, started) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("balancer-uring-{i}"))
            .spawn(move || match Ring::new() {
                Ok(ring) => {
                    let _ = ready.send(Ok(()));
                    // However the loop ends (an error, a panic), the lane takes no more
                    // connections, and those it had end: their owners see an error.
                    let _closed = Closed(&theirs);
                    ring.run(&theirs);
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
            })?;
        started
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the ring's thread ended")))?;
        Ok(lane)
    }

    fn inbox(&self) -> std::sync::MutexGuard<'_, Option<Vec<Msg>>> {
        self.inbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hands `msg` to the ring; `Err` gives it back when the ring's thread has stopped.
    fn post(&self, msg: Msg) -> Result<(), Msg> {
        match self.inbox().as_mut() {
            Some(inbox) => inbox.push(msg),
            None => return Err(msg),
        }
        // A full counter (EAGAIN) has a wake-up pending already.
        let _ = self.wake.write(1);
        Ok(())
    }
}

/// Closes a lane's inbox when its ring's thread ends.
struct Closed<'a>(&'a Lane);

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        // The jobs not started end here: their owners' answers are dropped with them.
        let left = self.0.inbox().take();
        drop(left);
    }
}

/// Tells the ring to drop a connection whose owner went away before it finished.
struct AbortOnDrop {
    lane: Arc<Lane>,
    id: u64,
    armed: bool,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.lane.post(Msg::Abort(self.id));
        }
    }
}

/// Why a connection could not be carried; the epoll path goes on with it.
pub(crate) enum NotCarried {
    /// No ring is running.
    NoRing(TcpStream, TcpStream),
    /// Leaving the runtime's epoll failed: the sockets are gone.
    Lost(io::Error),
}

/// Moves `a` ↔ `b` on a ring until both directions have seen EOF (half-close passed on), and
/// returns the bytes moved each way, as [`copy::bidirectional`](super::copy::bidirectional)
/// does. Dropping the future ends the connection: both sockets are shut down and closed.
/// `taken` runs when a ring takes the connection.
pub(crate) async fn carry(
    a: TcpStream,
    b: TcpStream,
    taken: impl FnOnce(),
) -> Result<io::Result<(u64, u64)>, NotCarried> {
    static IDS: AtomicU64 = AtomicU64::new(1);
    let lanes = lanes();
    if lanes.lanes.is_empty() {
        return Err(NotCarried::NoRing(a, b));
    }
    let lane = &lanes.lanes[lanes.next.fetch_add(1, Ordering::Relaxed) % lanes.lanes.len()];
    // `into_std` deregisters from the runtime's epoll, which would otherwise wake for every
    // byte the ring moves. The sockets become blocking: an operation on an `O_NONBLOCK`
    // socket may complete with `EAGAIN` instead of waiting in the ring.
    let blocking = |s: std::net::TcpStream| s.set_nonblocking(false).map(|()| s);
    let sockets = match (
        a.into_std().and_then(blocking),
        b.into_std().and_then(blocking),
    ) {
        (Ok(a), Ok(b)) => [a, b],
        (Err(e), _) | (_, Err(e)) => return Err(NotCarried::Lost(e)),
    };
    let id = IDS.fetch_add(1, Ordering::Relaxed);
    let (done, finished) = oneshot::channel();
    let mut abort = AbortOnDrop {
        lane: Arc::clone(lane),
        id,
        armed: true,
    };
    if let Err(Msg::Carry(job)) = lane.post(Msg::Carry(Job { id, sockets, done })) {
        abort.armed = false;
        let [a, b] = job.sockets;
        let back = |s: std::net::TcpStream| {
            s.set_nonblocking(true)?;
            TcpStream::from_std(s)
        };
        return match (back(a), back(b)) {
            (Ok(a), Ok(b)) => Err(NotCarried::NoRing(a, b)),
            (Err(e), _) | (_, Err(e)) => Err(NotCarried::Lost(e)),
        };
    }
    taken();
    let result = finished
        .await
        .unwrap_or_else(|_| Err(io::Error::other("the io_uring thread stopped")));
    abort.armed = false;
    Ok(result)
}

/// One direction of a carried connection: from socket `dir` to socket `1 - dir`.
#[derive(Default)]
struct Dir {
    total: u64,
    /// What was received and is not sent yet, in order; the front is being sent.
    queue: std::collections::VecDeque<Held>,
    /// A send of the front is in the ring.
    sending: bool,
    recv: Receiving,
    /// The next receive goes into a buffer of the direction's own (the provided ones ran out
    /// while this direction held none).
    own: bool,
    /// The source's EOF came; it is passed on once the queue is sent.
    eof: bool,
    /// The EOF was passed on (`shutdown(SHUT_WR)` of the destination).
    passed: bool,
}

/// The receive side of a direction.
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum Receiving {
    /// Nothing in the ring: paused, or ended.
    #[default]
    Idle,
    /// A multishot receive is armed: every arrival completes with a provided buffer.
    Multi,
    /// A multishot receive is being cancelled: the queue is full.
    Cancelling,
    /// One receive into a buffer of the direction's own.
    Own,
}

struct Held {
    buf: Buf,
    len: u32,
    sent: u32,
}

enum Buf {
    /// A provided buffer, by id.
    Ring(u16),
    /// The direction's own, when the provided ones ran out.
    Own(Box<[u8]>),
}

struct Session {
    id: u64,
    sockets: [std::net::TcpStream; 2],
    dirs: [Dir; 2],
    /// Operations of this session in the ring.
    inflight: u32,
    /// Shutting down: nothing new is submitted, and the session ends when `inflight` is 0.
    ending: bool,
    error: Option<io::Error>,
    /// The buffer of a direction's [`Receiving::Own`] receive.
    own: [Option<Box<[u8]>>; 2],
    done: Option<oneshot::Sender<io::Result<(u64, u64)>>>,
}

struct Ring {
    ring: IoUring,
    /// Dropped after the ring, which maps them.
    provided: Provided,
    sessions: Vec<Option<Session>>,
    free: Vec<usize>,
    by_id: HashMap<u64, usize>,
    wake_buf: Box<[u8; 8]>,
}

// SAFETY: the provided buffers' raw pointer is the ring's own allocation, used only by the
// thread that runs it.
unsafe impl Send for Ring {}

impl Ring {
    fn new() -> io::Result<Ring> {
        // A ring driven by one thread that waits for completions: the kernel runs the
        // deferred work at our enter instead of interrupting the thread for it (6.1+), where
        // the kernel has it.
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_submit_all()
            .build(ENTRIES)
            .or_else(|_| IoUring::builder().build(ENTRIES))?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::Recv::CODE, "recv"),
            (opcode::Send::CODE, "send"),
            (opcode::Read::CODE, "read"),
            (opcode::AsyncCancel::CODE, "async cancel"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("the kernel's io_uring has no {name}"),
                ));
            }
        }
        let provided = Provided::new(&ring, GROUP, BUFFERS, BUF_SIZE)?;
        let mut this = Ring {
            ring,
            provided,
            sessions: Vec::new(),
            free: Vec::new(),
            by_id: HashMap::new(),
            wake_buf: Box::new([0; 8]),
        };
        this.self_test()?;
        Ok(this)
    }

    /// A multishot receive into a provided buffer (6.0+), tried on a socket pair: what the
    /// probe cannot tell.
    fn self_test(&mut self) -> io::Result<()> {
        use std::io::Write;
        let unsupported = |what: &str| io::Error::new(io::ErrorKind::Unsupported, what.to_owned());
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let entry = opcode::RecvMulti::new(types::Fd(theirs.as_raw_fd()), GROUP)
            .build()
            .user_data(u64::MAX);
        self.push(entry);
        ours.write_all(b"x")?;
        self.ring.submit_and_wait(1)?;
        let first = self
            .ring
            .completion()
            .next()
            .map(|c| (c.result(), c.flags()));
        let (result, flags) = first.ok_or_else(|| unsupported("no completion"))?;
        if let Some(bid) = cqueue::buffer_select(flags) {
            self.offer(bid);
        }
        if result != 1 || cqueue::buffer_select(flags).is_none() {
            return Err(if result < 0 {
                io::Error::from_raw_os_error(-result)
            } else {
                unsupported("a multishot receive into provided buffers gave no bytes")
            });
        }
        // Ended by a shutdown, as a session's receives are; then nothing of it is left.
        theirs.shutdown(Shutdown::Both)?;
        if cqueue::more(flags) {
            self.ring.submit_and_wait(1)?;
            let _ = self.ring.completion().count();
        }
        Ok(())
    }

    /// Puts provided buffer `bid`, taken by a receive, back in the kernel's reach.
    fn give_back(&mut self, bid: u16) {
        tally(&TAKEN, -1);
        self.offer(bid);
    }

    fn offer(&mut self, bid: u16) {
        self.provided.offer(bid);
    }

    fn push(&mut self, entry: squeue::Entry) {
        // SAFETY: every buffer an entry points to outlives its completion: provided buffers
        // and the eventfd's are the ring's own, a direction's own buffer and the sockets are
        // held by the session until its `inflight` is 0.
        while unsafe { self.ring.submission().push(&entry) }.is_err() {
            if let Err(e) = self.ring.submit() {
                tracing::warn!("io_uring submit: {e}");
            }
        }
    }

    fn run(mut self, lane: &Lane) {
        self.arm_wake(lane);
        let mut completions: Vec<(u64, i32, u32)> = Vec::new();
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    tracing::error!("io_uring thread stopped: {e}");
                    return;
                }
            }
            completions.clear();
            completions.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for &(data, result, flags) in &completions {
                let (slot, dir, op) = decode(data);
                match op {
                    Some(Op::Wake) => self.take_inbox(lane),
                    Some(Op::Recv) => self.received(slot, dir, result, flags),
                    Some(Op::Send) => self.sent(slot, dir, result),
                    Some(Op::Cancel) => self.cancelled(slot),
                    None => {}
                }
            }
        }
    }

    /// Starts and aborts what the runtime posted, then waits for the next wake-up.
    fn take_inbox(&mut self, lane: &Lane) {
        let msgs = lane
            .inbox()
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        for msg in msgs {
            match msg {
                Msg::Carry(job) => self.start(job),
                Msg::Abort(id) => {
                    if let Some(&slot) = self.by_id.get(&id) {
                        self.end(slot, None);
                    }
                }
            }
        }
        self.arm_wake(lane);
    }

    fn arm_wake(&mut self, lane: &Lane) {
        let entry = opcode::Read::new(
            types::Fd(lane.wake.as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(user_data(0, 0, Op::Wake));
        self.push(entry);
    }

    fn start(&mut self, job: Job) {
        let session = Session {
            id: job.id,
            sockets: job.sockets,
            dirs: [Dir::default(), Dir::default()],
            inflight: 0,
            ending: false,
            error: None,
            own: [None, None],
            done: Some(job.done),
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.sessions[slot] = Some(session);
                slot
            }
            None => {
                self.sessions.push(Some(session));
                self.sessions.len() - 1
            }
        };
        self.by_id.insert(job.id, slot);
        tally(&CARRIED, 1);
        self.arm(slot, 0);
        self.arm(slot, 1);
    }

    fn session(&mut self, slot: usize) -> &mut Session {
        self.sessions[slot]
            .as_mut()
            .expect("a completion names a live session")
    }

    fn fd(&mut self, slot: usize, i: usize) -> RawFd {
        self.session(slot).sockets[i].as_raw_fd()
    }

    /// Arms the receive of direction `dir`, unless it is armed, ended or paused.
    fn arm(&mut self, slot: usize, dir: usize) {
        let fd = types::Fd(self.fd(slot, dir));
        let s = self.session(slot);
        let d = &mut s.dirs[dir];
        if s.ending || d.eof || d.recv != Receiving::Idle || d.queue.len() >= MAX_QUEUED {
            return;
        }
        let entry = if d.own {
            d.own = false;
            d.recv = Receiving::Own;
            let buf = s.own[dir].insert(vec![0u8; BUF_SIZE as usize].into_boxed_slice());
            opcode::Recv::new(fd, buf.as_mut_ptr(), BUF_SIZE).build()
        } else {
            d.recv = Receiving::Multi;
            opcode::RecvMulti::new(fd, GROUP).build()
        };
        s.inflight += 1;
        self.push(entry.user_data(user_data(slot, dir, Op::Recv)));
    }

    /// Sends the front of direction `dir`'s queue, unless a send is in the ring.
    fn send(&mut self, slot: usize, dir: usize) {
        let fd = types::Fd(self.fd(slot, 1 - dir));
        let provided = &self.provided;
        let s = self.sessions[slot]
            .as_mut()
            .expect("a completion names a live session");
        let d = &mut s.dirs[dir];
        let Some(held) = d.queue.front() else { return };
        if d.sending || s.ending {
            return;
        }
        let start = match &held.buf {
            Buf::Ring(bid) => provided.start(*bid),
            Buf::Own(own) => own.as_ptr(),
        };
        // SAFETY: `sent` < `len` ≤ the buffer's size.
        let from = unsafe { start.add(held.sent as usize) };
        let len = held.len - held.sent;
        d.sending = true;
        s.inflight += 1;
        let entry = opcode::Send::new(fd, from, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data(slot, dir, Op::Send));
        self.push(entry);
    }

    fn received(&mut self, slot: usize, dir: usize, result: i32, flags: u32) {
        let more = cqueue::more(flags);
        let s = self.session(slot);
        let buf = match cqueue::buffer_select(flags) {
            Some(bid) => {
                tally(&TAKEN, 1);
                Some(Buf::Ring(bid))
            }
            None if result > 0 && s.dirs[dir].recv == Receiving::Own => {
                s.own[dir].take().map(Buf::Own)
            }
            None => None,
        };
        if !more {
            s.inflight -= 1;
            s.dirs[dir].recv = Receiving::Idle;
        }
        if s.ending {
            if let Some(Buf::Ring(bid)) = buf {
                self.give_back(bid);
            }
            self.finish_if_idle(slot);
            return;
        }
        match result {
            n if n > 0 => {
                let buf = buf.expect("bytes arrived in a buffer");
                let d = &mut s.dirs[dir];
                d.queue.push_back(Held {
                    buf,
                    len: n as u32,
                    sent: 0,
                });
                if d.queue.len() >= MAX_QUEUED && d.recv == Receiving::Multi {
                    // The destination is slow: stop receiving until the queue is sent.
                    d.recv = Receiving::Cancelling;
                    s.inflight += 1;
                    let cancel = opcode::AsyncCancel::new(user_data(slot, dir, Op::Recv))
                        .build()
                        .user_data(user_data(slot, dir, Op::Cancel));
                    self.push(cancel);
                }
                self.send(slot, dir);
                // A multishot receive the kernel ended (it may, at any time) is armed again.
                self.arm(slot, dir);
            }
            0 => {
                s.dirs[dir].eof = true;
                self.pass_eof_if_sent(slot, dir);
            }
            e if -e == libc::ENOBUFS => {
                // Every provided buffer is taken. Those this direction holds come back as its
                // sends complete, and the receive is armed again then; holding none, it
                // waits in a buffer of its own, so no peer waits on another forever.
                let d = &mut s.dirs[dir];
                if d.queue.is_empty() {
                    d.own = true;
                    tally(&OWN, 1);
                    self.arm(slot, dir);
                }
            }
            e if -e == libc::ECANCELED || -e == libc::EINTR || -e == libc::EAGAIN => {
                self.arm(slot, dir);
            }
            e => self.end(slot, Some(io::Error::from_raw_os_error(-e))),
        }
    }

    fn sent(&mut self, slot: usize, dir: usize, result: i32) {
        let s = self.session(slot);
        s.inflight -= 1;
        s.dirs[dir].sending = false;
        if s.ending {
            self.finish_if_idle(slot);
            return;
        }
        match result {
            n if n >= 0 => {
                let d = &mut s.dirs[dir];
                let held = d.queue.front_mut().expect("a send has bytes");
                held.sent += n as u32;
                if held.sent == held.len {
                    d.total += u64::from(held.len);
                    if let Some(Held {
                        buf: Buf::Ring(bid),
                        ..
                    }) = d.queue.pop_front()
                    {
                        self.give_back(bid);
                    }
                }
                self.send(slot, dir);
                self.arm(slot, dir);
                self.pass_eof_if_sent(slot, dir);
            }
            e if -e == libc::EINTR || -e == libc::EAGAIN => self.send(slot, dir),
            e => self.end(slot, Some(io::Error::from_raw_os_error(-e))),
        }
    }

    fn cancelled(&mut self, slot: usize) {
        self.session(slot).inflight -= 1;
        if self.session(slot).ending {
            self.finish_if_idle(slot);
        }
    }

    /// Passes direction `dir`'s EOF on once everything before it is sent; the second one
    /// ends the session.
    fn pass_eof_if_sent(&mut self, slot: usize, dir: usize) {
        let s = self.session(slot);
        let d = &mut s.dirs[dir];
        if !d.eof || d.passed || !d.queue.is_empty() {
            return;
        }
        d.passed = true;
        let _ = s.sockets[1 - dir].shutdown(Shutdown::Write);
        if s.dirs[1 - dir].passed {
            self.end(slot, None);
        }
    }

    /// Ends a session: both sockets are shut down, which completes what is pending; it is
    /// closed and answered once nothing of it is in the ring.
    fn end(&mut self, slot: usize, error: Option<io::Error>) {
        let s = self.session(slot);
        if !s.ending {
            s.ending = true;
            if s.error.is_none() {
                s.error = error;
            }
            for socket in &s.sockets {
                let _ = socket.shutdown(Shutdown::Both);
            }
        }
        self.finish_if_idle(slot);
    }

    fn finish_if_idle(&mut self, slot: usize) {
        if self.session(slot).inflight > 0 {
            return;
        }
        let mut s = self.sessions[slot].take().expect("live session");
        for dir in &mut s.dirs {
            for held in dir.queue.drain(..) {
                if let Buf::Ring(bid) = held.buf {
                    self.give_back(bid);
                }
            }
        }
        self.by_id.remove(&s.id);
        self.free.push(slot);
        let result = match s.error.take() {
            Some(e) => Err(e),
            None => Ok((s.dirs[0].total, s.dirs[1].total)),
        };
        if let Some(done) = s.done.take() {
            let _ = done.send(result);
        }
        // The sockets close here, after the answer: the FIN of the direction that ended last.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::copy::{self, Carry, Copied};
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client ↔ proxy ↔ server chain over loopback: the proxy side copies on epoll until
    /// the connection has gone back and forth, then carries it on a ring. `None` where the
    /// kernel refuses rings (the epoll path's own tests cover that machine).
    async fn chain() -> Option<(
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<io::Result<(u64, u64)>>,
    )> {
        if let Err(e) = available() {
            eprintln!("io_uring not available here ({e}): not testing the ring path");
            return None;
        }
        let [client, accepted, upstream, server] = copy::tests::loopback_chain().await;
        let proxy = tokio::spawn(async move {
            let early = match copy::until(&accepted, &upstream, Carry::Interactive).await? {
                Copied::Carry(a, b) => (a, b),
                Copied::Done(..) => panic!("an interactive connection was not handed over"),
            };
            let moved = match carry(accepted, upstream, || ()).await {
                Ok(moved) => moved?,
                Err(_) => panic!("no ring carried the connection"),
            };
            Ok((early.0 + moved.0, early.1 + moved.1))
        });
        Some((client, server, proxy))
    }

    /// Request–reply exchanges of `size` bytes, checked byte for byte.
    async fn exchange(client: &mut TcpStream, server: &mut TcpStream, rounds: usize, size: usize) {
        for round in 0..rounds {
            let ask: Vec<u8> = (0..size).map(|i| (i + round) as u8).collect();
            client.write_all(&ask).await.unwrap();
            let mut got = vec![0u8; size];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, ask, "round {round}, client to server");
            let reply: Vec<u8> = got.iter().map(|b| b.wrapping_add(1)).collect();
            server.write_all(&reply).await.unwrap();
            let mut back = vec![0u8; size];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(back, reply, "round {round}, server to client");
        }
    }

    #[tokio::test]
    async fn a_carried_connection_moves_bytes_exactly_and_passes_each_half_close() {
        let Some((mut client, mut server, proxy)) = chain().await else {
            return;
        };
        let carried = || CARRIED.load(Ordering::Relaxed);
        let before = carried();
        exchange(&mut client, &mut server, 200, 100).await;
        assert!(carried() > before, "the ring carried the connection");
        // The client's FIN reaches the server; the other way goes on, with more than a
        // provided buffer's worth.
        client.write_all(b"last words").await.unwrap();
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"last words");
        let big: Vec<u8> = (0..(3 * BUF_SIZE as usize + 77))
            .map(|i| (i % 251) as u8)
            .collect();
        server.write_all(&big).await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, big);
        let (up, down) = proxy.await.unwrap().unwrap();
        assert_eq!(up, 200 * 100 + 10);
        assert_eq!(down, 200 * 100 + big.len() as u64);
    }

    #[tokio::test]
    async fn a_carried_stream_both_ways_at_once_meets_full_sockets_and_arrives_whole() {
        let Some((mut client, mut server, proxy)) = chain().await else {
            return;
        };
        exchange(&mut client, &mut server, 3, 10).await;
        let up: Vec<u8> = (0..5_000_000u32).map(|i| (i % 253) as u8).collect();
        let down: Vec<u8> = (0..4_000_000u32).map(|i| (i % 241) as u8).collect();
        let (client_r, mut client_w) = client.into_split();
        let (server_r, mut server_w) = server.into_split();
        let (up2, down2) = (up.clone(), down.clone());
        let send_up = tokio::spawn(async move {
            client_w.write_all(&up2).await.unwrap();
            client_w.shutdown().await.unwrap();
        });
        let send_down = tokio::spawn(async move {
            server_w.write_all(&down2).await.unwrap();
            server_w.shutdown().await.unwrap();
        });
        // Slow readers, so the ring's sends meet full socket buffers.
        let slow = |mut r: tokio::net::tcp::OwnedReadHalf| async move {
            let mut got = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                let n = r.read(&mut chunk).await.unwrap();
                if n == 0 {
                    return got;
                }
                got.extend_from_slice(&chunk[..n]);
                if got.len() < 1_000_000 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        };
        let (at_server, at_client) = tokio::join!(slow(server_r), slow(client_r));
        send_up.await.unwrap();
        send_down.await.unwrap();
        assert!(at_server == up, "client to server arrived whole");
        assert!(at_client == down, "server to client arrived whole");
        let moved = proxy.await.unwrap().unwrap();
        assert_eq!(moved, (up.len() as u64 + 30, down.len() as u64 + 30));
    }

    #[tokio::test]
    async fn a_reset_ends_the_carried_connection_with_an_error_and_the_client_sees_it() {
        let Some((mut client, mut server, proxy)) = chain().await else {
            return;
        };
        exchange(&mut client, &mut server, 3, 10).await;
        socket2::SockRef::from(&server)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(server);
        let result = tokio::time::timeout(Duration::from_secs(10), proxy)
            .await
            .expect("the ring ended the connection")
            .unwrap();
        assert!(result.is_err(), "a reset is an error: {result:?}");
        sees_the_end(&mut client).await;
    }

    /// `side` reads EOF or an error, within 10 s.
    async fn sees_the_end(side: &mut TcpStream) {
        let mut byte = [0u8; 1];
        let end = tokio::time::timeout(Duration::from_secs(10), side.read(&mut byte))
            .await
            .expect("the end reached this side");
        assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    }

    #[tokio::test]
    async fn dropping_the_owner_shuts_the_carried_connection_down() {
        let Some((mut client, mut server, proxy)) = chain().await else {
            return;
        };
        exchange(&mut client, &mut server, 3, 10).await;
        // Carried and idle: the owner goes away, as at the end of a shutdown's abort.
        proxy.abort();
        let _ = proxy.await;
        sees_the_end(&mut client).await;
        sees_the_end(&mut server).await;
    }

    #[tokio::test]
    async fn a_connection_whose_reply_fills_a_read_stays_on_epoll() {
        if available().is_err() {
            return;
        }
        // A request whose reply fills reads, then small exchanges: it stays on epoll, for splice.
        let [mut client, accepted, upstream, mut server] = copy::tests::loopback_chain().await;
        let proxy =
            tokio::spawn(
                async move { copy::until(&accepted, &upstream, Carry::Interactive).await },
            );
        client.write_all(b"GET /").await.unwrap();
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.unwrap();
        // A reply that fills reads: a stream flows, and stays on epoll for splice.
        let big = vec![1u8; 200_000];
        server.write_all(&big).await.unwrap();
        let mut back_bytes = vec![0u8; big.len()];
        client.read_exact(&mut back_bytes).await.unwrap();
        for _ in 0..3 {
            client.write_all(b"more").await.unwrap();
            let mut more = [0u8; 4];
            server.read_exact(&mut more).await.unwrap();
            server.write_all(b"ok").await.unwrap();
            let mut ok = [0u8; 2];
            client.read_exact(&mut ok).await.unwrap();
        }
        client.shutdown().await.unwrap();
        server.shutdown().await.unwrap();
        let copied = proxy.await.unwrap().unwrap();
        assert_eq!(copied, Copied::Done(5 + 12, 200_000 + 6));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn when_slow_readers_hold_every_provided_buffer_others_still_move() {
        let Some((mut c0, mut s0, p0)) = chain().await else {
            return;
        };
        exchange(&mut c0, &mut s0, 3, 10).await;
        // Connections whose servers do not read: each direction holds up to MAX_QUEUED
        // buffers, and enough of them take every buffer of every ring.
        let rings = lanes().lanes.len();
        const FLOOD: usize = 8 << 20;
        let bytes: Arc<Vec<u8>> = Arc::new((0..FLOOD).map(|i| (i % 249) as u8).collect());
        let mut stalled = Vec::new();
        for _ in 0..(rings * usize::from(BUFFERS) / MAX_QUEUED + 2) {
            let (mut client, mut server, proxy) = chain().await.unwrap();
            exchange(&mut client, &mut server, 3, 10).await;
            let bytes = Arc::clone(&bytes);
            let flood = tokio::spawn(async move {
                client.write_all(&bytes).await.unwrap();
                client.shutdown().await.unwrap();
                client
            });
            stalled.push((flood, server, proxy));
        }
        let full = rings as i64 * i64::from(BUFFERS);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TAKEN.load(Ordering::Relaxed) < full {
            assert!(
                Instant::now() < deadline,
                "the stalled connections took {} of {full} buffers",
                TAKEN.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Every buffer is taken: a carried connection still moves its bytes, in its own.
        let own = OWN.load(Ordering::Relaxed);
        exchange(&mut c0, &mut s0, 5, 100).await;
        assert!(
            OWN.load(Ordering::Relaxed) > own,
            "the exchange used buffers of its own"
        );
        // The slow readers read at last, and get every byte in order.
        for (flood, mut server, proxy) in stalled {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert!(got == *bytes, "{} of {FLOOD} bytes, in order", got.len());
            drop(server);
            drop(flood.await.unwrap());
            let (up, _) = proxy.await.unwrap().unwrap();
            assert_eq!(up, FLOOD as u64 + 30);
        }
        drop(c0);
        drop(s0);
        let _ = p0.await;
    }
}
