//! The log relay: one dedicated OS thread per master that reads every relayed worker's stdout
//! and stderr from pipes (epoll over all of them) and writes whole lines to the log files,
//! with a timestamp (`time`), an instance tag (`merge_logs`) and size rotation
//! (`log_max_size`).
//!
//! Why a thread of its own and not the runtime: the tokio runtime proxies connections, and a
//! log file on a slow disk must never stall it. Here a slow disk stalls only this thread: its
//! blocking `write` waits, the pipes fill (64 KiB or more each, the kernel's buffer), and the
//! workers block on their own `write`, exactly as they would writing to that disk directly.
//! Memory stays bounded: one read buffer, one output buffer, and per pipe at most
//! [`LINE_MAX`] bytes of a line still waiting for its newline.
//!
//! Lines are never torn: a read's last partial line is held until its newline arrives (or the
//! pipe closes, at the worker's exit: it is then written as a line); a line longer than
//! [`LINE_MAX`] is cut into pieces, and every piece after the first starts with [`SPLIT_MARK`].
//! Every write to a file is whole lines, and rotation happens only between writes, so no line
//! straddles two files. Each read gets one timestamp (the time the master read it): formatting
//! the clock once per read rather than per line keeps the cost per line a few copies.
//!
//! Each spawn gets fresh pipes ([`attach`]); the relay drops a pipe at its end of file, which
//! comes when the worker and everything that inherited its stdio have exited, so a restarted
//! instance never writes into its predecessor's pipe and no descriptor outlives its worker.
//! Files are shared: every pipe writing one path (the instances of a `merge_logs` app, or both
//! streams of a `log_file`) writes through one open file and one rotation state.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use balancer_config::{App, Rotation};
use chrono::format::Item;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::LogPaths;
use super::rotate;

/// The longest line written whole; a longer one is cut into pieces of this size.
pub const LINE_MAX: usize = 64 * 1024;
/// What each piece after the first of a cut line starts with (after timestamp and tag).
pub const SPLIT_MARK: &str = "[cont] ";
/// The most one read takes from one pipe: one pipe cannot starve the others.
const READ_MAX: usize = 64 * 1024;
/// The pipe size asked for (best effort): fewer wake-ups under a flood, still bounded.
const PIPE_SIZE: i32 = 256 * 1024;
/// The epoll token of the wake-up eventfd (pipes use their slot index).
const WAKE: u64 = u64::MAX;

/// The write ends a worker gets as its stdout and stderr.
#[derive(Debug)]
pub struct Pipes {
    /// The worker's stdout.
    pub out: OwnedFd,
    /// The worker's stderr (the same pipe's other twin for `log_file`: still a pipe of its
    /// own, so a stdout line and a stderr line never interleave mid-line).
    pub err: OwnedFd,
}

/// Starts relaying one worker's output to `paths` as `app` says: opens (or shares) the files,
/// makes two pipes, hands their read ends to the relay thread (started on first use) and
/// returns the write ends for the worker. A file that cannot be opened is an error here, at
/// spawn, like an unwritable log file without the relay.
pub fn attach(app: &App, instance: u32, paths: &LogPaths) -> io::Result<Pipes> {
    let relay = relay()?;
    let rotate = app.logs.rotate;
    let out_sink = sink(&paths.out, rotate)?;
    let err_sink = sink(&paths.err, rotate)?;
    let time = match &app.logs.time {
        Some(format) => Some(
            chrono::format::StrftimeItems::new(format)
                .parse_to_owned()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?,
        ),
        None => None,
    };
    let prefix = Arc::new(Prefix {
        time,
        tag: app
            .logs
            .merge
            .then(|| format!("[{}-{instance}] ", app.name)),
    });
    let (out_read, out_write) = pipe()?;
    let (err_read, err_write) = pipe()?;
    {
        let mut queue = relay.queue.lock().unwrap_or_else(|p| p.into_inner());
        for (fd, sink) in [(out_read, out_sink), (err_read, err_sink)] {
            queue.push(Source {
                fd,
                sink,
                prefix: Arc::clone(&prefix),
                carry: Vec::new(),
                continued: false,
            });
        }
    }
    ACTIVE.fetch_add(2, Ordering::SeqCst);
    relay.wake.write(1).map_err(io::Error::from)?;
    Ok(Pipes {
        out: out_write,
        err: err_write,
    })
}

/// Waits (at most `within`) until every pipe handed to the relay has reached its end and been
/// written out: at shutdown, once the workers have exited, what they wrote last is still in
/// the pipes, and the master must not exit before it is in the files. Blocking.
pub fn drain(within: std::time::Duration) {
    let deadline = std::time::Instant::now() + within;
    while ACTIVE.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Pipes attached and not yet finished.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// A pipe: (read end, non-blocking, for the relay; write end, blocking, for the worker), both
/// close-on-exec in the master (the spawn hands the write end over as stdio, which clears it).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    // O_NONBLOCK belongs to the open file description: the read end's, not the worker's.
    fcntl(&read, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
    Ok((read, write))
}

/// What each line of one worker's stream starts with.
struct Prefix {
    /// The timestamp format, parsed once.
    time: Option<Vec<Item<'static>>>,
    /// `[<app>-<instance>] ` with `merge_logs`.
    tag: Option<String>,
}

/// One open log file and its rotation state, shared by every pipe writing it.
struct Sink {
    path: PathBuf,
    /// Only the relay thread writes, so this lock is never contended but by [`sink`]'s
    /// first open.
    state: Mutex<SinkState>,
    /// Apart from `state`, so a spawn updating it never waits for a write to a slow disk.
    rotate: Mutex<Option<Rotation>>,
}

struct SinkState {
    file: File,
    /// Bytes in the file (as far as this writer knows: a `flush` truncates behind it).
    size: u64,
    /// Failed writes (disk full, …), for a warning that does not flood the master's log.
    errors: u64,
}

/// The sink of `path`: the open one if another pipe writes it, else newly opened. The latest
/// spawn's rotation settings win (a reload with a new `log_max_size` applies it).
fn sink(path: &Path, rotate: Option<Rotation>) -> io::Result<Arc<Sink>> {
    static SINKS: OnceLock<Mutex<HashMap<PathBuf, Weak<Sink>>>> = OnceLock::new();
    let mut sinks = SINKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(sink) = sinks.get(path).and_then(Weak::upgrade) {
        *sink.rotate.lock().unwrap_or_else(|p| p.into_inner()) = rotate;
        return Ok(sink);
    }
    sinks.retain(|_, weak| weak.strong_count() > 0);
    let file = super::open_append(path)?;
    let size = file.metadata()?.len();
    let sink = Arc::new(Sink {
        path: path.to_path_buf(),
        state: Mutex::new(SinkState {
            file,
            size,
            errors: 0,
        }),
        rotate: Mutex::new(rotate),
    });
    sinks.insert(path.to_path_buf(), Arc::downgrade(&sink));
    Ok(sink)
}

impl Sink {
    /// Writes whole lines, then rotates if the file has reached its size.
    fn write(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match state.file.write_all(bytes) {
            Ok(()) => state.size += bytes.len() as u64,
            Err(e) => {
                state.errors += 1;
                if state.errors % 1000 == 1 {
                    tracing::warn!(
                        "cannot write {} ({} failed writes): {e}",
                        self.path.display(),
                        state.errors
                    );
                }
                return;
            }
        }
        let rotation = *self.rotate.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rotation) = rotation
            && state.size >= rotation.max_size
        {
            self.rotate(&mut state, rotation);
        }
    }

    /// Renames the full file to its rotated name and opens a new one in its place; the
    /// housekeeping thread compresses and prunes.
    fn rotate(&self, state: &mut SinkState, rotation: Rotation) {
        // `flush` may have emptied the file behind our count.
        let real = state.file.metadata().map_or(state.size, |m| m.len());
        if real < rotation.max_size {
            state.size = real;
            return;
        }
        let rotated = rotate::rotated_name(&self.path);
        let reopened =
            std::fs::rename(&self.path, &rotated).and_then(|()| super::open_append(&self.path));
        match reopened {
            Ok(file) => {
                state.file = file;
                state.size = 0;
                rotate::submit(rotate::Job {
                    rotated,
                    base: self.path.clone(),
                    retain: rotation.retain,
                    compress: rotation.compress,
                });
            }
            Err(e) => {
                // Keep writing the file we have; the next write tries again.
                tracing::warn!("cannot rotate {}: {e}", self.path.display());
            }
        }
    }
}

/// One pipe being read: a worker's stdout or stderr.
struct Source {
    fd: OwnedFd,
    sink: Arc<Sink>,
    prefix: Arc<Prefix>,
    /// The start of a line whose newline has not come yet (at most [`LINE_MAX`] bytes).
    carry: Vec<u8>,
    /// The last line written was cut: the next piece is its continuation.
    continued: bool,
}

/// Reused buffers of the relay thread.
struct Scratch {
    out: Vec<u8>,
    stamp: String,
}

impl Source {
    /// Takes one read's bytes: writes every line it completes, keeps the partial end.
    fn take(&mut self, chunk: &[u8], scratch: &mut Scratch) {
        scratch.out.clear();
        self.stamp(&mut scratch.stamp);
        let mut rest = chunk;
        while let Some(pos) = memchr::memchr(b'\n', rest) {
            if self.carry.is_empty() {
                self.emit(&rest[..pos], &scratch.stamp, &mut scratch.out);
            } else {
                let mut line = std::mem::take(&mut self.carry);
                line.extend_from_slice(&rest[..pos]);
                self.emit(&line, &scratch.stamp, &mut scratch.out);
                line.clear();
                self.carry = line;
            }
            rest = &rest[pos + 1..];
        }
        self.carry.extend_from_slice(rest);
        while self.carry.len() > LINE_MAX {
            let piece: Vec<u8> = self.carry.drain(..LINE_MAX).collect();
            self.piece(&piece, true, &scratch.stamp, &mut scratch.out);
        }
        self.sink.write(&scratch.out);
    }

    /// At the end of the pipe: the partial last line is written as a line.
    fn finish(&mut self, scratch: &mut Scratch) {
        if self.carry.is_empty() {
            return;
        }
        scratch.out.clear();
        self.stamp(&mut scratch.stamp);
        let line = std::mem::take(&mut self.carry);
        self.emit(&line, &scratch.stamp, &mut scratch.out);
        self.sink.write(&scratch.out);
    }

    /// The timestamp of this read (empty without `time`).
    fn stamp(&self, stamp: &mut String) {
        stamp.clear();
        if let Some(items) = &self.prefix.time {
            let now = chrono::Local::now();
            let _ = write!(stamp, "{}: ", now.format_with_items(items.iter()));
        }
    }

    /// One whole line, cut into [`LINE_MAX`] pieces if it is longer.
    fn emit(&mut self, line: &[u8], stamp: &str, out: &mut Vec<u8>) {
        if line.len() <= LINE_MAX {
            self.piece(line, false, stamp, out);
            return;
        }
        let mut pieces = line.chunks(LINE_MAX).peekable();
        while let Some(piece) = pieces.next() {
            self.piece(piece, pieces.peek().is_some(), stamp, out);
        }
    }

    /// Appends one output line: timestamp, tag, split mark if it continues a cut line.
    fn piece(&mut self, bytes: &[u8], cut: bool, stamp: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(stamp.as_bytes());
        if let Some(tag) = &self.prefix.tag {
            out.extend_from_slice(tag.as_bytes());
        }
        if self.continued {
            out.extend_from_slice(SPLIT_MARK.as_bytes());
        }
        out.extend_from_slice(bytes);
        out.push(b'\n');
        self.continued = cut;
    }
}

/// The relay thread's mailbox: pipes to add, and the eventfd that wakes it.
struct Relay {
    queue: Mutex<Vec<Source>>,
    wake: EventFd,
}

/// The relay, started on first use.
fn relay() -> io::Result<&'static Relay> {
    static RELAY: OnceLock<Result<&'static Relay, Errno>> = OnceLock::new();
    let started = RELAY.get_or_init(|| {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        epoll.add(wake.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE))?;
        let relay: &'static Relay = Box::leak(Box::new(Relay {
            queue: Mutex::new(Vec::new()),
            wake,
        }));
        std::thread::Builder::new()
            .name("balancer-logs".into())
            .spawn(move || run(relay, epoll))
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(nix::libc::EAGAIN)))?;
        Ok(relay)
    });
    started.map_err(io::Error::from)
}

/// The relay thread: waits on every pipe, reads what is ready (one read per pipe per round,
/// so a flooding worker does not starve a quiet one), writes it out.
fn run(relay: &'static Relay, epoll: Epoll) {
    super::lower_priority();
    let mut sources: Vec<Option<Source>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut events = vec![EpollEvent::empty(); 256];
    let mut buf = vec![0u8; READ_MAX];
    let mut scratch = Scratch {
        out: Vec::with_capacity(READ_MAX * 2),
        stamp: String::new(),
    };
    loop {
        let ready = match epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!("log relay: epoll_wait: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        for event in &events[..ready] {
            let token = event.data();
            if token == WAKE {
                let _ = relay.wake.read();
                let added =
                    std::mem::take(&mut *relay.queue.lock().unwrap_or_else(|p| p.into_inner()));
                for source in added {
                    let index = free.pop().unwrap_or_else(|| {
                        sources.push(None);
                        sources.len() - 1
                    });
                    let event = EpollEvent::new(EpollFlags::EPOLLIN, index as u64);
                    if let Err(e) = epoll.add(source.fd.as_fd(), event) {
                        tracing::error!("log relay: cannot watch a worker's pipe: {e}");
                        free.push(index);
                        ACTIVE.fetch_sub(1, Ordering::SeqCst);
                        continue;
                    }
                    sources[index] = Some(source);
                }
                continue;
            }
            let index = token as usize;
            let Some(source) = sources.get_mut(index).and_then(Option::as_mut) else {
                continue;
            };
            let done = match nix::unistd::read(source.fd.as_fd(), &mut buf) {
                Ok(0) => true,
                Ok(n) => {
                    source.take(&buf[..n], &mut scratch);
                    false
                }
                Err(Errno::EAGAIN | Errno::EINTR) => false,
                Err(e) => {
                    tracing::warn!("log relay: reading a worker's output: {e}");
                    true
                }
            };
            if done {
                source.finish(&mut scratch);
                let _ = epoll.delete(source.fd.as_fd());
                sources[index] = None;
                free.push(index);
                ACTIVE.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(path: &Path, time: Option<&str>, tag: Option<&str>) -> (Source, OwnedFd) {
        let (read, write) = pipe().unwrap();
        let source = Source {
            fd: read,
            sink: sink(path, None).unwrap(),
            prefix: Arc::new(Prefix {
                time: time.map(|f| {
                    chrono::format::StrftimeItems::new(f)
                        .parse_to_owned()
                        .unwrap()
                }),
                tag: tag.map(str::to_owned),
            }),
            carry: Vec::new(),
            continued: false,
        };
        (source, write)
    }

    fn scratch() -> Scratch {
        Scratch {
            out: Vec::new(),
            stamp: String::new(),
        }
    }

    #[test]
    fn partial_lines_wait_for_their_newline_and_long_ones_are_cut_and_marked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let (mut src, _w) = source(&path, None, Some("[web-1] "));
        let mut s = scratch();
        src.take(b"one\ntw", &mut s);
        src.take(b"o\n", &mut s);
        let long = vec![b'x'; LINE_MAX * 2 + 10];
        src.take(&long, &mut s);
        src.take(b"\nlast", &mut s);
        src.finish(&mut s);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "[web-1] one");
        assert_eq!(lines[1], "[web-1] two");
        assert_eq!(lines[2].len(), "[web-1] ".len() + LINE_MAX);
        assert!(
            lines[3].starts_with("[web-1] [cont] x"),
            "{}",
            &lines[3][..20]
        );
        assert_eq!(lines[4], format!("[web-1] [cont] {}", "x".repeat(10)));
        assert_eq!(lines[5], "[web-1] last");
        assert_eq!(lines.len(), 6);
    }

    #[test]
    fn timestamps_use_the_format_and_rotation_keeps_lines_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.log");
        let (mut src, _w) = source(&path, Some("%Y-%m-%d %H:%M:%S%.3f"), None);
        *src.sink.rotate.lock().unwrap() = Some(Rotation {
            max_size: 1000,
            retain: 100,
            compress: false,
        });
        let mut s = scratch();
        for i in 0..300 {
            src.take(format!("line {i}\n").as_bytes(), &mut s);
        }
        let mut all = Vec::new();
        // The housekeeping thread only prunes here (retain 100): wait until no job is pending
        // by reading what exists, which is complete whatever it is doing.
        for file in rotate::rotated_files(&path).unwrap() {
            all.push(std::fs::read_to_string(file).unwrap());
        }
        all.push(std::fs::read_to_string(&path).unwrap());
        let lines: Vec<String> = all.concat().lines().map(str::to_owned).collect();
        assert_eq!(lines.len(), 300);
        for (i, line) in lines.iter().enumerate() {
            let (stamp, rest) = line.split_once(": ").unwrap();
            chrono::NaiveDateTime::parse_from_str(stamp, "%Y-%m-%d %H:%M:%S%.3f").unwrap();
            assert_eq!(rest, format!("line {i}"));
        }
        assert!(all.len() > 5, "rotated {} times", all.len() - 1);
    }

    #[test]
    fn a_worker_writing_to_its_pipe_reaches_the_file_through_the_thread() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("balancer.toml");
        let text = "[[app]]\nname = \"w\"\ncommand = [\"true\"]\ntime = true\nmerge_logs = true\n";
        let app = balancer_config::parse(text, &config, &balancer_config::LoadOptions::from_env())
            .unwrap()
            .apps
            .remove(0);
        let paths = LogPaths::for_app(dir.path(), &app, 3);
        let pipes = attach(&app, 3, &paths).unwrap();
        let mut out = File::from(pipes.out);
        out.write_all(b"hello\npartial").unwrap();
        drop(out);
        drop(pipes.err);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&paths.out).unwrap_or_default();
            if text.lines().count() == 2 {
                assert!(text.lines().all(|l| l.contains(": [w-3] ")), "{text}");
                assert!(text.ends_with("partial\n"), "{text}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{text:?}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
