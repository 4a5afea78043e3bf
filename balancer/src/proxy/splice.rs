//! Splicing a flowing TCP stream through a pipe: socket → pipe → socket with splice(2), so the
//! bytes move as page references and never through a buffer of ours.
//!
//! [`super::copy`] switches a direction here when a read fills its first buffer, for the rest
//! of that burst. Pipes are lent from a small per-thread pool the way copy's buffers are, so an
//! idle connection holds none, and their number is capped for the whole process, since each
//! costs two descriptors.

use std::cell::RefCell;
use std::io;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tokio::net::TcpStream;

/// How a burst of splices ended.
pub enum Burst {
    /// `from` has nothing more to read for now.
    Drained,
    /// `from` reached its EOF; everything before it was written to `to`.
    Eof,
    /// This system refuses splice(2) on these sockets (a sandbox's seccomp policy, an
    /// emulated kernel): nothing moved, and no burst on this thread splices again.
    Unsupported,
}

/// Errors that say splice(2) cannot work here at all, rather than that this connection failed.
fn is_unsupported(e: &io::Error) -> bool {
    use nix::errno::Errno;
    [
        Errno::EINVAL,
        Errno::ENOSYS,
        Errno::EPERM,
        Errno::EOPNOTSUPP,
    ]
    .iter()
    .any(|errno| e.raw_os_error() == Some(*errno as i32))
}

/// Moves a flowing stream `from` → `to` through `pipe` with splice(2), until `from` has
/// nothing more to read or reaches its EOF: the bytes go socket → pipe → socket as page
/// references, never through a buffer of ours.
///
/// The pipe is empty at each read, so a `WouldBlock` from the read is the socket's (the known
/// trap is clearing a socket's readiness for a full pipe's `EAGAIN`), and `try_io` clears the
/// readiness it saw; a write's `WouldBlock` is `to`'s full send buffer, since the pipe holds
/// bytes then. A pipe still holding bytes when this fails is closed, never reused.
pub async fn burst(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &mut PipeLoan,
    total: &mut u64,
) -> io::Result<Burst> {
    use nix::fcntl::{SpliceFFlags, splice};
    use tokio::io::Interest;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        let read = from.try_io(Interest::READABLE, || {
            Ok(splice(from, None, &pipe.write, None, pipe.size, flags)?)
        });
        let n = match read {
            Ok(0) => return Ok(Burst::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
            Err(e) if is_unsupported(&e) => {
                tracing::info!("splice(2) refused ({e}): bulk transfers use buffers");
                UNSUPPORTED.set(true);
                // No burst on this thread takes a pipe again: close the pooled ones, and this
                // burst's own when its loan drops.
                PIPES.with_borrow_mut(Vec::clear);
                return Ok(Burst::Unsupported);
            }
            Err(e) => return Err(e),
        };
        pipe.held = n;
        while pipe.held > 0 {
            let write = to.try_io(Interest::WRITABLE, || {
                Ok(splice(&pipe.read, None, to, None, pipe.held, flags)?)
            });
            match write {
                Ok(k) => pipe.held -= k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
                Err(e) => return Err(e),
            }
        }
        *total += n as u64;
    }
}

/// What a pipe is asked to hold: four of copy's bulk buffers, so one splice moves what four
/// big reads would.
const PIPE_SIZE: usize = 4 * super::copy::BULK_BUFFER_SIZE;
/// Pipes open at once in this process, in use or pooled (two descriptors each, out of the
/// reserve kept beside the connection budget); past it, bulk bursts use buffers.
const PIPES_MAX: usize = 32;
/// Empty pipes kept per thread for reuse.
const PIPE_POOL_MAX: usize = 4;
/// Pipes open now, against [`PIPES_MAX`].
static PIPES_OPEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    /// Set once splice(2) was refused as unsupported on this thread; its bursts then use
    /// buffers. Per thread, as a seccomp filter may be (a policy for the whole process costs
    /// one refused call per runtime thread).
    static UNSUPPORTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A pipe for splicing bursts through. Its descriptors close when it drops.
pub struct Pipe {
    read: std::os::fd::OwnedFd,
    write: std::os::fd::OwnedFd,
    /// Its capacity in bytes.
    size: usize,
    /// Bytes in it that are not yet written out.
    held: usize,
}

impl Pipe {
    /// A pooled pipe, or a new one; `None` past [`PIPES_MAX`], when the system has none to
    /// give (out of descriptors or of pipe memory), or where splice(2) is refused.
    pub fn take() -> Option<PipeLoan> {
        use std::sync::atomic::Ordering;
        if UNSUPPORTED.get() {
            return None;
        }
        if let Some(pipe) = PIPES.with_borrow_mut(Vec::pop) {
            return Some(PipeLoan(Some(pipe)));
        }
        if PIPES_OPEN.fetch_add(1, Ordering::Relaxed) >= PIPES_MAX {
            PIPES_OPEN.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        // From here the pipe's own drop gives the count back.
        let (read, write) = match nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) {
            Ok(fds) => fds,
            Err(_) => {
                PIPES_OPEN.fetch_sub(1, Ordering::Relaxed);
                return None;
            }
        };
        let mut pipe = Pipe {
            read,
            write,
            size: 0,
            held: 0,
        };
        // A smaller pipe (an unprivileged user over its pipe memory limit) still works.
        let size = fcntl(&pipe.write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32))
            .or_else(|_| fcntl(&pipe.write, FcntlArg::F_GETPIPE_SZ))
            .ok()?;
        pipe.size = usize::try_from(size).ok()?;
        Some(PipeLoan(Some(pipe)))
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        PIPES_OPEN.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A pipe on loan for one burst: back to the pool of the thread that drops it if it is
/// empty, closed if bytes were left in it (a failed write) or the pool is full.
pub struct PipeLoan(Option<Pipe>);

impl std::ops::Deref for PipeLoan {
    type Target = Pipe;
    fn deref(&self) -> &Pipe {
        self.0
            .as_ref()
            .expect("a loan holds its pipe until dropped")
    }
}

impl std::ops::DerefMut for PipeLoan {
    fn deref_mut(&mut self) -> &mut Pipe {
        self.0
            .as_mut()
            .expect("a loan holds its pipe until dropped")
    }
}

impl Drop for PipeLoan {
    fn drop(&mut self) {
        if UNSUPPORTED.get() {
            return;
        }
        if let Some(pipe) = self.0.take().filter(|pipe| pipe.held == 0) {
            PIPES.with_borrow_mut(|pool| {
                if pool.len() < PIPE_POOL_MAX {
                    pool.push(pipe);
                }
            });
        }
    }
}

/// Empties this thread's pool (tests).
#[cfg(test)]
pub fn clear_pool() {
    PIPES.with_borrow_mut(Vec::clear);
}

/// Pipes in this thread's pool (tests).
#[cfg(test)]
pub fn pooled() -> usize {
    PIPES.with_borrow(Vec::len)
}

/// Whether splice(2) was refused on this thread (tests).
#[cfg(test)]
pub fn refused_here() -> bool {
    UNSUPPORTED.get()
}
