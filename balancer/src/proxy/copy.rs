//! Copying a proxied TCP connection both ways, with buffers taken only while bytes move.
//!
//! `tokio::io::copy_bidirectional` gives every connection two buffers for its whole life: an
//! idle connection (a keep-alive client between requests, a WebSocket, a stuck worker) costs
//! 32 KiB, and freeing and reallocating them per connection fragments the heap, so RSS does not
//! come back after a burst. Here a direction waits for readiness holding nothing, borrows a
//! buffer from a small per-thread pool for one burst of reads and their writes, and gives it
//! back: idle connections cost only their sockets and task, and the same few buffers serve
//! every connection of a thread. A burst starts with a 16 KiB buffer; when a read fills it (a
//! bulk transfer), the rest of the burst goes socket → pipe → socket with splice(2), through a
//! pipe lent the same way, as HAProxy's `splice-auto` switches only flowing streams to its
//! faster path (or with a 64 KiB buffer, when no pipe is to be had).
//!
//! Half-close is exact: EOF on one side shuts down the write side of the other, and the other
//! direction goes on until its own EOF.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;

use socket2::SockRef;
use tokio::net::TcpStream;

use super::splice::{self, Burst, Pipe};

/// A burst's first read: HAProxy's default `tune.bufsize`. Requests and replies of most
/// protocols fit; a read that fills it means a stream is flowing.
pub const BUFFER_SIZE: usize = 16 * 1024;
/// What the rest of a burst reads with once a read filled [`BUFFER_SIZE`]: a quarter of the
/// syscalls for bulk transfers. Idle connections still hold nothing.
pub const BULK_BUFFER_SIZE: usize = 64 * 1024;
/// Buffers of each size kept per thread for reuse; more in use at once are allocated and
/// dropped.
const POOL_MAX: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    static BULK_POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer on loan from this thread's pool of its size; it goes back (on whichever thread
/// drops it).
pub(crate) struct Loan(Option<Box<[u8]>>);

impl Loan {
    pub(crate) fn take() -> Loan {
        Loan::from(&POOL, BUFFER_SIZE)
    }

    fn take_bulk() -> Loan {
        Loan::from(&BULK_POOL, BULK_BUFFER_SIZE)
    }

    fn from(pool: &'static std::thread::LocalKey<RefCell<Vec<Box<[u8]>>>>, size: usize) -> Loan {
        let buf = pool
            .with_borrow_mut(Vec::pop)
            .unwrap_or_else(|| vec![0u8; size].into_boxed_slice());
        Loan(Some(buf))
    }

    pub(crate) fn buf(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or_default()
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        self.0.as_deref().unwrap_or_default()
    }

    fn is_bulk(&self) -> bool {
        self.0.as_ref().is_some_and(|b| b.len() == BULK_BUFFER_SIZE)
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        if let Some(buf) = self.0.take() {
            let pool = if buf.len() == BULK_BUFFER_SIZE {
                &BULK_POOL
            } else {
                &POOL
            };
            pool.with_borrow_mut(|pool| {
                if pool.len() < POOL_MAX {
                    pool.push(buf);
                }
            });
        }
    }
}

/// Copies `a` → `b` and `b` → `a` until both directions have seen EOF; returns the bytes
/// moved each way (`a` to `b`, `b` to `a`).
///
/// A side that closes before a single byte has moved either way asked for nothing: the whole
/// connection ends at once (an [`io::ErrorKind::ConnectionAborted`] error), rather than
/// waiting on the other side (a worker that accepts and never answers would otherwise hold
/// both descriptors until it closes).
///
/// The caller closes both sockets as soon as it returns: that close is what sends the FIN of
/// the direction that ended last.
pub async fn bidirectional(a: &TcpStream, b: &TcpStream) -> io::Result<(u64, u64)> {
    match until(a, b, Carry::Never).await? {
        Copied::Done(a_to_b, b_to_a) | Copied::Carry(a_to_b, b_to_a) => Ok((a_to_b, b_to_a)),
    }
}

/// Whether a connection may leave this copy for another I/O path ([`Copied::Carry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carry {
    /// Copy to the end.
    Never,
    /// Stop once the connection has gone back and forth: each direction has moved
    /// [`CARRY_AFTER_BURSTS`] bursts, none of them filling a read (bulk stays here, for
    /// splice), no EOF has been seen, and both directions wait for bytes holding none.
    Interactive,
}

/// Bursts each way before a connection counts as interactive: a client that sends one request
/// and closes (a new connection per request) never qualifies, a keep-alive client after its
/// second exchange.
pub const CARRY_AFTER_BURSTS: u32 = 2;

/// How [`until`] ended, with the bytes moved each way (`a` to `b`, `b` to `a`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    /// Both directions saw their EOF.
    Done(u64, u64),
    /// [`Carry::Interactive`] was met: nothing is buffered or half-sent either way, and the
    /// sockets are ready for another copier.
    Carry(u64, u64),
}

/// [`bidirectional`], which may stop early for another copier as `carry` says.
pub async fn until(a: &TcpStream, b: &TcpStream, carry: Carry) -> io::Result<Copied> {
    let state = Shared {
        carry: carry == Carry::Interactive,
        ..Shared::default()
    };
    let mut forth = std::pin::pin!(one_way(a, b, &state, 0));
    let mut back = std::pin::pin!(one_way(b, a, &state, 1));
    let (mut forth_done, mut back_done) = (None, None);
    loop {
        tokio::select! {
            r = &mut forth, if forth_done.is_none() => match r? {
                Way::Eof(n) => forth_done = Some(n),
                Way::Carry => break,
            },
            r = &mut back, if back_done.is_none() => match r? {
                Way::Eof(n) => back_done = Some(n),
                Way::Carry => break,
            },
        }
        if let (Some(a_to_b), Some(b_to_a)) = (forth_done, back_done) {
            return Ok(Copied::Done(a_to_b, b_to_a));
        }
    }
    // The direction that asked found the other waiting for bytes, holding nothing.
    use std::sync::atomic::Ordering;
    Ok(Copied::Carry(
        state.totals[0].load(Ordering::Relaxed),
        state.totals[1].load(Ordering::Relaxed),
    ))
}

/// How one direction ended.
enum Way {
    Eof(u64),
    Carry,
}

/// What the two directions of one connection know of each other.
#[derive(Default)]
struct Shared {
    /// A byte has moved, either way.
    moved: std::sync::atomic::AtomicBool,
    /// One direction has seen its EOF (and passed it on).
    one_done: std::sync::atomic::AtomicBool,
    /// [`Carry::Interactive`] applies.
    carry: bool,
    /// A read filled its buffer: a stream flowed, and the connection stays.
    flowed: std::sync::atomic::AtomicBool,
    /// Bursts completed, per direction (counted only while `carry`).
    bursts: [std::sync::atomic::AtomicU32; 2],
    /// The direction waits for readiness holding no bytes.
    waiting: [std::sync::atomic::AtomicBool; 2],
    /// Bytes moved so far, per direction (kept only while `carry`).
    totals: [std::sync::atomic::AtomicU64; 2],
}

impl Shared {
    /// Direction `dir` finished a burst, having moved `total` so far: whether the connection
    /// should now leave for another copier.
    fn burst_done(&self, dir: usize, total: u64) -> bool {
        use std::sync::atomic::Ordering;
        if !self.carry {
            return false;
        }
        self.totals[dir].store(total, Ordering::Relaxed);
        let bursts = self.bursts[dir].fetch_add(1, Ordering::Relaxed) + 1;
        bursts >= CARRY_AFTER_BURSTS
            && self.bursts[1 - dir].load(Ordering::Relaxed) >= CARRY_AFTER_BURSTS
            && self.waiting[1 - dir].load(Ordering::Relaxed)
            && !self.flowed.load(Ordering::Relaxed)
            && !self.one_done.load(Ordering::Relaxed)
    }
}

/// Copies `from` → `to` until EOF on `from`, then shuts down `to`'s write side.
async fn one_way(from: &TcpStream, to: &TcpStream, state: &Shared, dir: usize) -> io::Result<Way> {
    use std::sync::atomic::Ordering;
    let mut total = 0u64;
    loop {
        if state.carry {
            state.waiting[dir].store(true, Ordering::Relaxed);
            from.readable().await?;
            state.waiting[dir].store(false, Ordering::Relaxed);
        } else {
            from.readable().await?;
        }
        // One burst: read while bytes are there, with one borrowed buffer, then give it back
        // and wait holding nothing. Syscalls are tried first; readiness is awaited only after
        // a WouldBlock.
        let mut loan = Loan::take();
        loop {
            let (n, drained) = match read_some(from, loan.buf()) {
                Ok((0, _)) if !state.moved.load(Ordering::Relaxed) => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "closed before anything was sent either way",
                    ));
                }
                Ok((0, _)) => return pass_eof(to, state).map(|()| Way::Eof(total)),
                Ok(read) => read,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            if total == 0 {
                state.moved.store(true, Ordering::Relaxed);
            }
            let mut written = 0;
            while written < n {
                match to.try_write(&loan.buf()[written..n]) {
                    Ok(k) => written += k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
                    Err(e) => return Err(e),
                }
            }
            total += n as u64;
            if drained {
                break;
            }
            if state.carry {
                state.flowed.store(true, Ordering::Relaxed);
            }
            // The read filled the buffer: a stream is flowing. The rest of the burst goes
            // through a pipe, or with a big buffer when no pipe is to be had.
            if !loan.is_bulk() {
                if let Some(mut pipe) = Pipe::take() {
                    drop(loan);
                    match splice::burst(from, to, &mut pipe, &mut total).await? {
                        Burst::Drained => break,
                        Burst::Eof => return pass_eof(to, state).map(|()| Way::Eof(total)),
                        Burst::Unsupported => {}
                    }
                }
                loan = Loan::take_bulk();
            }
        }
        if state.burst_done(dir, total) {
            return Ok(Way::Carry);
        }
    }
}

/// Passes on an EOF read from one direction's source to its destination `to`.
fn pass_eof(to: &TcpStream, state: &Shared) -> io::Result<()> {
    use std::sync::atomic::Ordering;
    // The second EOF: both directions are over and the caller closes both sockets now, and
    // the close sends `to` its FIN (everything `to` sent was read, to its EOF). A shutdown
    // first would be one more syscall for the same FIN.
    if state.one_done.swap(true, Ordering::Relaxed) {
        return Ok(());
    }
    // Not connected any more (the other side reset) is a normal end here.
    match SockRef::from(to).shutdown(Shutdown::Write) {
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
        _ => Ok(()),
    }
}

/// One read, and whether it drained the socket.
///
/// A read that returns fewer bytes than it asked for has emptied the socket's receive queue,
/// so the direction can wait for readiness again at once, without the read that would only
/// say `EAGAIN` (a third of the syscalls of a request–response exchange). nginx and HAProxy
/// skip it the same way. The readiness is cleared in the same step as the read, against the
/// readiness seen *before* it (tokio's `try_io` clears only if no newer event arrived), so
/// bytes that arrive after the read still wake the task; a FIN stays visible too (tokio keeps
/// the closed state through a clear).
pub(crate) fn read_some(from: &TcpStream, buf: &mut [u8]) -> io::Result<(usize, bool)> {
    use std::io::Read;
    let mut short = 0;
    let read = from.try_io(tokio::io::Interest::READABLE, || {
        let n = (&*SockRef::from(from)).read(buf)?;
        if n > 0 && n < buf.len() {
            short = n;
            // Reported as WouldBlock so try_io clears the readiness; the bytes are in `short`.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match read {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && short > 0 => Ok((short, true)),
        other => other.map(|n| (n, false)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// The four sockets of a client ↔ proxy ↔ server chain over loopback: the client, the
    /// proxy's accepted and upstream sockets, and the server's, all with `TCP_NODELAY`, as the
    /// proxy sets them (small writes go out at once).
    pub(crate) async fn loopback_chain() -> [TcpStream; 4] {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(front.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = front.accept().await.unwrap();
        let upstream = TcpStream::connect(back.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = back.accept().await.unwrap();
        for s in [&client, &accepted, &upstream, &server] {
            s.set_nodelay(true).unwrap();
        }
        [client, accepted, upstream, server]
    }

    /// A client ↔ proxy ↔ server chain over loopback, copied by [`bidirectional`].
    async fn chain() -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<io::Result<(u64, u64)>>,
    ) {
        let [client, accepted, upstream, server] = loopback_chain().await;
        let copy = tokio::spawn(async move { bidirectional(&accepted, &upstream).await });
        (client, server, copy)
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_and_half_close_passes_through() {
        let (mut client, mut server, copy) = chain().await;
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request", "the client's FIN reached the server");
        // The other direction still works after the half-close.
        let big = vec![7u8; 3 * BULK_BUFFER_SIZE + BUFFER_SIZE + 5];
        server.write_all(&big).await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, big);
        assert_eq!(copy.await.unwrap().unwrap(), (7, big.len() as u64));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_arriving_just_after_a_short_read_still_wake_the_copy() {
        let (mut client, mut server, copy) = chain().await;
        let exchange = async {
            for round in 0..300u32 {
                // Two pieces, the second a moment after the first: the copy reads the first
                // short, clears its readiness, and must still be woken by the second.
                let message = round.to_be_bytes();
                client.write_all(&message[..1]).await.unwrap();
                if round % 3 == 0 {
                    tokio::task::yield_now().await;
                } else if round % 3 == 1 {
                    tokio::time::sleep(std::time::Duration::from_micros(50)).await;
                }
                client.write_all(&message[1..]).await.unwrap();
                let mut got = [0u8; 4];
                server.read_exact(&mut got).await.unwrap();
                assert_eq!(got, message);
                server.write_all(&got).await.unwrap();
                let mut back = [0u8; 4];
                client.read_exact(&mut back).await.unwrap();
                assert_eq!(back, message);
            }
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty(), "the FIN after the last short read arrives");
        };
        tokio::time::timeout(std::time::Duration::from_secs(20), exchange)
            .await
            .expect("no wake-up is lost");
        drop(server);
        copy.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_side_that_closes_having_sent_nothing_ends_the_connection() {
        let (client, mut server, copy) = chain().await;
        drop(client);
        let err = copy.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        let mut rest = Vec::new();
        assert_eq!(
            server.read_to_end(&mut rest).await.unwrap(),
            0,
            "closed at once"
        );
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_buffer() {
        let (_client, _server, copy) = chain().await;
        POOL.with_borrow_mut(Vec::clear);
        tokio::task::yield_now().await;
        // Both directions are waiting; whatever they borrowed is back in the pool.
        let pooled = POOL.with_borrow(Vec::len);
        assert!(pooled <= 2, "{pooled}");
        copy.abort();
    }

    /// `len` bytes of a pattern that a shifted or repeated piece would break.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
            .collect()
    }

    /// Reads to EOF in small pieces with pauses, so the writer meets a full socket.
    async fn read_slowly(stream: &mut (impl AsyncReadExt + Unpin)) -> Vec<u8> {
        let mut got = Vec::new();
        let mut piece = vec![0u8; 48 * 1024];
        loop {
            let n = stream.read(&mut piece).await.unwrap();
            if n == 0 {
                return got;
            }
            got.extend_from_slice(&piece[..n]);
            if got.len() % 7 == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
    }

    // One thread, so the pipes come back to the pool this test looks at.
    #[tokio::test(flavor = "current_thread")]
    async fn a_bulk_stream_goes_through_a_pipe_byte_exact_both_ways_at_once() {
        splice::clear_pool();
        let (client, server, copy) = chain().await;
        let (up, down) = (pattern(6 << 20, 1), pattern(5 << 20, 2));
        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = server.into_split();
        let send_up = async {
            client_write.write_all(&up).await.unwrap();
            client_write.shutdown().await.unwrap();
        };
        let send_down = async {
            server_write.write_all(&down).await.unwrap();
            server_write.shutdown().await.unwrap();
        };
        let (_, _, got_up, got_down) = tokio::join!(
            send_up,
            send_down,
            read_slowly(&mut server_read),
            read_slowly(&mut client_read)
        );
        assert!(got_up == up, "client → server: {} bytes", got_up.len());
        assert!(
            got_down == down,
            "server → client: {} bytes",
            got_down.len()
        );
        assert_eq!(
            copy.await.unwrap().unwrap(),
            (up.len() as u64, down.len() as u64)
        );
        let pooled = splice::pooled();
        assert!((1..=2).contains(&pooled), "spliced, pipes back: {pooled}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_reset_mid_splice_leaves_no_stale_bytes_for_the_next_connection() {
        use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
        splice::clear_pool();
        let (mut client, server, copy) = chain().await;
        // The server reads nothing, so the copy's writes block with bytes in its pipe; then it
        // resets the connection.
        let sent = Arc::new(AtomicUsize::new(0));
        let flood = tokio::spawn({
            let sent = Arc::clone(&sent);
            async move {
                let chunk = pattern(64 * 1024, 3);
                while client.write_all(&chunk).await.is_ok() {
                    sent.fetch_add(chunk.len(), Relaxed);
                }
            }
        });
        // Blocked all the way back to the client (nothing sent for 100 ms) means the copy is
        // waiting to write with bytes in its pipe: the server's queue is full, then the pipe.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut still = 0;
        while still < 10 {
            let before = sent.load(Relaxed);
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            still = if sent.load(Relaxed) == before {
                still + 1
            } else {
                0
            };
            assert!(
                std::time::Instant::now() < deadline,
                "the flood never stalled"
            );
        }
        // Past the copy's first 16 KiB read: the stream went on through the pipe.
        assert!(sent.load(Relaxed) > 1 << 20, "{} bytes", sent.load(Relaxed));
        socket2::SockRef::from(&server)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(server);
        assert!(copy.await.unwrap().is_err(), "the reset ends the copy");
        flood.await.unwrap();
        // The next bulk stream on this thread gets a clean pipe.
        one_stream_arrives_whole(3 << 20).await;
    }

    /// Sends `len` patterned bytes client → server through a new chain, then EOF, and checks
    /// that they arrive unchanged and the copy ends cleanly.
    async fn one_stream_arrives_whole(len: usize) {
        let (mut client, mut server, copy) = chain().await;
        let data = pattern(len, 4);
        let send = async {
            client.write_all(&data).await.unwrap();
            client.shutdown().await.unwrap();
        };
        let (_, got) = tokio::join!(send, read_slowly(&mut server));
        assert!(got == data, "{} bytes, {} sent", got.len(), data.len());
        drop((client, server));
        copy.await.unwrap().unwrap();
    }

    /// Makes splice(2) fail with ENOSYS on this thread only, as a sandbox's seccomp policy
    /// would (a filter without TSYNC binds only the thread that installs it).
    fn refuse_splice_on_this_thread() {
        use nix::libc;
        // seccomp_data: the syscall number at offset 0.
        let filter = [
            libc::sock_filter {
                code: 0x20,
                jt: 0,
                jf: 0,
                k: 0,
            }, // ld [0]
            libc::sock_filter {
                code: 0x15,
                jt: 0,
                jf: 1,
                k: libc::SYS_splice as u32,
            }, // jeq
            libc::sock_filter {
                code: 0x06,
                jt: 0,
                jf: 0,
                k: libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
            },
            libc::sock_filter {
                code: 0x06,
                jt: 0,
                jf: 0,
                k: libc::SECCOMP_RET_ALLOW,
            },
        ];
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr().cast_mut(),
        };
        // SAFETY: prctl takes integers and, for PR_SET_SECCOMP, a pointer to `prog`, which
        // points into `filter`; both outlive the call (the kernel copies the program).
        #[allow(unsafe_code)]
        unsafe {
            assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
            assert_eq!(
                libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog),
                0,
                "{}",
                io::Error::last_os_error()
            );
        }
    }

    // One thread, which the filter binds: the copy task runs on it too.
    #[tokio::test(flavor = "current_thread")]
    async fn where_splice_is_refused_bulk_streams_use_buffers() {
        refuse_splice_on_this_thread();
        one_stream_arrives_whole(4 << 20).await;
        assert!(splice::refused_here(), "the splice was tried, and refused");
        assert_eq!(
            splice::pooled(),
            0,
            "no pipe is kept where none will be used"
        );
    }
}
