//! The new master's side of `balancer upgrade`: taking the descriptors and the state the old
//! master passed (`balancer take-over 3`), starting every app on them without accepting, and
//! taking over (admin socket, pid file, accepts, the reuseport groups) on `go`.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::PathBuf;
use std::sync::Arc;

use balancer_workers::WorkerState;
use balancer_workers::reuseport::Group;
use tokio::io::AsyncBufReadExt;
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

use super::super::dump::Dump;
use super::super::{Master, MasterError};
use super::{HELLO_TIMEOUT, LOCK_FD, Message, Passed, bind_admin_over, next, send};
use crate::home::{self, HomeLock};
use crate::listener::Bound;

/// What the new master was handed before its runtime started.
pub struct Inheritance {
    stream: StdUnixStream,
    lock: File,
    old_pid: u32,
    home: PathBuf,
    state: Dump,
    sockets: Vec<(Passed, StdSocket)>,
    metrics: Option<std::net::TcpListener>,
    /// Reuseport groups' member sockets, by public address, in the kernel's order.
    adopted: Vec<(SocketAddr, Vec<OwnedFd>)>,
}

/// An inherited public socket, before the runtime that will serve it exists.
enum StdSocket {
    Stream(std::net::TcpListener),
    Datagram(std::net::UdpSocket),
}

impl StdSocket {
    /// On the runtime.
    fn into_bound(self) -> io::Result<Bound> {
        Ok(match self {
            StdSocket::Stream(l) => {
                let l = tokio::net::TcpListener::from_std(l)?;
                crate::listener::tcp::nodelay(&l)?;
                Bound::Stream(l)
            }
            StdSocket::Datagram(s) => Bound::Datagram(tokio::net::UdpSocket::from_std(s)?),
        })
    }
}

/// `balancer take-over FD` before its runtime exists: takes the descriptors the old master
/// passed (close-on-exec from now on, so no worker inherits them) and reads its hello.
pub fn inherit(fd: RawFd) -> Result<Inheritance, MasterError> {
    let bad = |what: &str, e: io::Error| MasterError::Setup {
        what: leak(format!("hand-over ({what})")),
        source: e,
    };
    // SAFETY: the old master passed these descriptors to this process alone, at fixed numbers
    // (see `spawn`); nothing else in this process owns them.
    #[allow(unsafe_code)]
    let stream = unsafe { StdUnixStream::from_raw_fd(fd) };
    // SAFETY: as above.
    #[allow(unsafe_code)]
    let lock = unsafe { File::from_raw_fd(LOCK_FD) };
    for f in [stream.as_raw_fd(), lock.as_raw_fd()] {
        cloexec(f).map_err(|e| bad("descriptors", e))?;
    }
    stream
        .set_read_timeout(Some(HELLO_TIMEOUT))
        .map_err(|e| bad("socket", e))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|e| bad("reading the state", e))?;
    stream
        .set_read_timeout(None)
        .map_err(|e| bad("socket", e))?;
    let Ok(Message::Hello {
        pid,
        home,
        state,
        sockets,
        metrics,
    }) = serde_json::from_str(&line)
    else {
        return Err(bad(
            "reading the state",
            io::Error::other(format!("not a hello: {line:?}")),
        ));
    };
    let mut bound = Vec::new();
    let mut adopted: Vec<(SocketAddr, Vec<OwnedFd>)> = Vec::new();
    for p in sockets {
        cloexec(p.fd).map_err(|e| bad("descriptors", e))?;
        // SAFETY: as above; each passed fd number is given once.
        #[allow(unsafe_code)]
        let owned = unsafe { OwnedFd::from_raw_fd(p.fd) };
        if p.reuseport {
            match adopted.iter_mut().find(|(addr, _)| *addr == p.addr) {
                Some((_, members)) => members.push(owned),
                None => adopted.push((p.addr, vec![owned])),
            }
            continue;
        }
        let socket = if p.datagram {
            let std = std::net::UdpSocket::from(owned);
            std.set_nonblocking(true)
                .map_err(|e| bad("descriptors", e))?;
            StdSocket::Datagram(std)
        } else {
            let std = std::net::TcpListener::from(owned);
            std.set_nonblocking(true)
                .map_err(|e| bad("descriptors", e))?;
            StdSocket::Stream(std)
        };
        bound.push((p, socket));
    }
    let metrics = match metrics {
        Some(fd) => {
            cloexec(fd).map_err(|e| bad("descriptors", e))?;
            // SAFETY: as above.
            #[allow(unsafe_code)]
            Some(unsafe { std::net::TcpListener::from_raw_fd(fd) })
        }
        None => None,
    };
    Ok(Inheritance {
        stream,
        lock,
        old_pid: pid,
        home,
        state,
        sockets: bound,
        metrics,
        adopted,
    })
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fd is open for the duration of this call (the caller owns it).
    #[allow(unsafe_code)]
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map(|_| ())
    .map_err(io::Error::from)
}

/// `balancer take-over FD`: the new master's life. It starts every app of the state handed
/// over on the inherited sockets, without accepting; once every worker is ready it says so,
/// and on `go` it renames its admin socket over the old one, takes the pid file and starts
/// accepting. Before `go`, any failure is reported and this process exits 1, having accepted
/// nothing.
pub fn take_over(inheritance: Inheritance) -> Result<(), MasterError> {
    super::super::run::with_runtime(None, false, |mut opts| async move {
        opts.home = inheritance.home.clone();
        take_over_on_runtime(inheritance, opts).await
    })
}

async fn take_over_on_runtime(
    inheritance: Inheritance,
    opts: super::super::run::MasterOptions,
) -> Result<(), MasterError> {
    let Inheritance {
        stream,
        lock,
        old_pid,
        home,
        state,
        sockets,
        metrics,
        adopted,
    } = inheritance;
    let _ = opts.phase.send(super::super::Phase::Starting);
    let setup = |what: &'static str| move |source| MasterError::Setup { what, source };
    stream
        .set_nonblocking(true)
        .map_err(setup("hand-over socket"))?;
    let stream = UnixStream::from_std(stream).map_err(setup("hand-over socket"))?;
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    let reaper = super::super::reaper::spawn_if_init();
    super::super::run::raise_fd_limit();
    let master = super::super::run::new_master(&opts, true);
    {
        let mut inherited = master
            .upgrade
            .inherited
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (passed, socket) in sockets {
            inherited.push((
                passed,
                socket.into_bound().map_err(setup("inherited socket"))?,
            ));
        }
    }
    *master
        .upgrade
        .metrics
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = metrics;
    *master
        .spawn
        .adopted
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = adopted;
    let upkeep_stop = CancellationToken::new();
    tokio::spawn(super::super::metrics::upkeep(upkeep_stop.clone()));

    let apps = state.apps.len();
    let _ = send(
        &mut write,
        &Message::Progress {
            line: format!(
                "pid {}, version {}: starting {apps} apps",
                std::process::id(),
                env!("CARGO_PKG_VERSION")
            ),
        },
    )
    .await;
    let started = master.resurrect_from(state).await;
    let unclaimed = std::mem::take(
        &mut *master
            .upgrade
            .inherited
            .lock()
            .unwrap_or_else(|e| e.into_inner()),
    );
    for (passed, _) in unclaimed {
        tracing::warn!(
            app = %passed.app, listener = %passed.listener,
            "the configuration no longer has this listener; this master does not serve it"
        );
    }
    let ready = match started {
        Ok(done) => not_ready(&master).map_or(Ok(done), Err),
        Err(e) => Err(balancer_workers::Chain(&e).to_string()),
    };
    let done = match ready {
        Ok(done) => done,
        Err(error) => {
            tracing::error!("cannot take over: {error}");
            return Err(give_up(&master, &mut write, error).await);
        }
    };
    let _ = send(&mut write, &Message::Progress { line: done }).await;
    let _ = send(
        &mut write,
        &Message::Ready {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        },
    )
    .await;
    match next(&mut lines).await {
        Ok(Some(Message::Go)) => {}
        other => {
            if old_master_alive(old_pid) {
                // The old master went on without us (a timeout, or the upgrade was dropped).
                tracing::warn!("the old master called the upgrade off ({other:?}); exiting");
                master.shutdown().await;
                return Err(MasterError::TakeOver("called off by the old master".into()));
            }
            // It died mid-hand-over: this master has everything, so it serves.
            tracing::warn!("the old master (pid {old_pid}) died during the hand-over; taking over");
        }
    }
    let path = home::admin_socket(&home);
    let admin = match bind_admin_over(&path) {
        Ok(admin) => admin,
        Err(e) => {
            let error = format!("cannot bind the admin socket {}: {e}", path.display());
            return Err(give_up(&master, &mut write, error).await);
        }
    };
    let mut lock = HomeLock::inherit(&home, lock)?;
    lock.write_pid()?;
    master.keep_for_upgrade(std::env::current_exe().ok(), &lock);
    let groups: Vec<Arc<Group>> = master
        .entries()
        .iter()
        .flat_map(|e| e.sup.groups())
        .collect();
    for g in &groups {
        g.release();
    }
    // Sockets of groups no app claimed (the configuration dropped them) close here.
    master
        .spawn
        .adopted
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    master.accept_gate.cancel();
    let _ = send(
        &mut write,
        &Message::TookOver {
            pid: std::process::id(),
        },
    )
    .await;
    tracing::info!(old = old_pid, "took over from the old master");
    // The handshake closes when the old master exits, and with it every descriptor of its
    // reuseport sockets but ours: then they can leave their groups.
    tokio::spawn(async move {
        let mut lines = lines;
        while let Ok(Some(_)) = lines.next_line().await {}
        drop(write);
        for g in &groups {
            g.drop_adopted().await;
        }
        if !groups.is_empty() {
            tracing::info!("the old master is gone; its reuseport sockets have left their groups");
        }
    });
    super::super::run::live(
        master,
        lock,
        admin,
        opts,
        super::super::run::Running {
            reaper,
            upkeep_stop,
        },
    )
    .await
}

/// Why the new master's apps are not all serving: a worker that should run and is not ready.
fn not_ready(master: &Master) -> Option<String> {
    let bad: Vec<String> = master
        .apps()
        .iter()
        .flat_map(|(_, workers)| workers)
        .filter(|w| !matches!(w.state, WorkerState::Ready | WorkerState::Stopped))
        .map(|w| {
            format!(
                "{} worker {} is {:?}{}",
                w.app,
                w.id,
                w.state,
                w.reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            )
        })
        .collect();
    (!bad.is_empty()).then(|| format!("workers not ready: {}", bad.join("; ")))
}

fn old_master_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// Tells the old master this one cannot take over (it carries on), stops what this master
/// started, and gives the error its exit reports.
async fn give_up(
    master: &Master,
    write: &mut tokio::net::unix::OwnedWriteHalf,
    error: String,
) -> MasterError {
    let _ = send(
        write,
        &Message::Failed {
            error: error.clone(),
        },
    )
    .await;
    master.shutdown().await;
    MasterError::TakeOver(error)
}
