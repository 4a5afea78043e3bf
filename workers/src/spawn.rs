//! Building and starting one incarnation of a worker: the worker contract's environment
//! (`PORT`…, `BALANCER_INSTANCE`, `LISTEN_FDS`…), stdio to its log files (or the log relay's
//! pipes), its own process group,
//! the socket handover of the reuseport policy (fds 3, 4, …), and the `pre_exec` that ties its
//! life to the master's (`PR_SET_PDEATHSIG`). The program runs under the worker shim
//! ([`crate::shim`]), which keeps its whole process tree from outliving it or the master.
//! Also where private ports come from.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};

use balancer_config::{App, Proto, Signal};
use tokio::process::Command;

use crate::logs::LogPaths;
use crate::process::Process;

/// Why a worker could not be spawned.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The log files could not be opened.
    #[error("cannot open log file {path}")]
    Logs {
        /// The file that failed.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// No private port could be had.
    #[error("cannot reserve a private port")]
    Port(#[source] io::Error),
    /// The shim did not say which pid its program has.
    #[error("the worker shim did not report its program's pid")]
    Report(#[source] io::Error),
    /// Sockets were to be handed over but there is no shim to set `LISTEN_PID`.
    #[error("the reuseport policy needs the worker shim")]
    NoShim,
    /// exec failed (program not found, not executable, …).
    #[error("cannot start `{program}`")]
    Exec {
        /// The program that was run.
        program: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Private ports are taken from here up to the start of the kernel's ephemeral range.
const PRIVATE_PORT_FLOOR: u16 = 20000;
/// Candidates tried before falling back to an ephemeral port.
const PRIVATE_PORT_TRIES: u16 = 512;
/// Rotates through the private range so a port is not handed out again soon after.
static PRIVATE_PORT_CURSOR: AtomicU32 = AtomicU32::new(0);

/// Reserves a free loopback port for a worker's private listener of `proto` (UDP ports for
/// `udp://` listeners, TCP ports otherwise).
///
/// The port is free when this returns; the worker binds it moments later. It comes from below
/// the kernel's ephemeral range (`ip_local_port_range`), so no outgoing connection or unbound
/// socket — the master's own among them — can be given it in between. Only when that range is
/// exhausted does it fall back to an ephemeral port; should someone take it anyway, the worker
/// fails to listen, never becomes ready, and is restarted on another port.
pub fn private_port(proto: Proto) -> io::Result<u16> {
    let ephemeral_low = ephemeral_range_start().unwrap_or(32768);
    if ephemeral_low > PRIVATE_PORT_FLOOR + PRIVATE_PORT_TRIES {
        let span = u32::from(ephemeral_low - PRIVATE_PORT_FLOOR);
        let seed = PRIVATE_PORT_CURSOR.load(Ordering::Relaxed);
        if seed == 0 {
            // Different masters start at different places.
            let _ = PRIVATE_PORT_CURSOR.compare_exchange(
                0,
                std::process::id().wrapping_mul(2654435761) | 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        for _ in 0..PRIVATE_PORT_TRIES {
            let step = PRIVATE_PORT_CURSOR.fetch_add(1, Ordering::Relaxed);
            let port = PRIVATE_PORT_FLOOR + (step % span) as u16;
            if bind_test(proto, port).is_ok() {
                return Ok(port);
            }
        }
    }
    bind_test(proto, 0)
}

/// Binds `port` on loopback for `proto` and lets it go; returns the port bound.
fn bind_test(proto: Proto, port: u16) -> io::Result<u16> {
    match proto {
        Proto::Udp => Ok(UdpSocket::bind((Ipv4Addr::LOCALHOST, port))?
            .local_addr()?
            .port()),
        Proto::Tcp | Proto::Http => Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, port))?
            .local_addr()?
            .port()),
    }
}

/// The first port of the kernel's ephemeral range.
fn ephemeral_range_start() -> Option<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// What makes one incarnation of a worker.
#[derive(Debug)]
pub struct SpawnSpec<'a> {
    /// The app it belongs to.
    pub app: &'a App,
    /// Its instance number.
    pub instance: u32,
    /// Its private addresses, one per listener.
    pub addrs: &'a [SocketAddr],
    /// Where its output goes.
    pub logs: &'a LogPaths,
    /// Reuseport policy: the listening sockets to hand over as fds 3, 4, … (empty under rr).
    pub sockets: &'a [OwnedFd],
    /// This binary, run as `shim` around the program (see [`crate::shim`]). `None` spawns the
    /// program directly, without the whole-tree guarantee (unit tests of this crate, which have
    /// no `balancer` binary); the reuseport policy needs the shim.
    pub shim: Option<&'a Path>,
    /// `ready = "notify"`: the worker's own `$NOTIFY_SOCKET`.
    pub notify_socket: Option<&'a Path>,
    /// Trap the program's `bind()` calls ([`crate::capture`]; needs the shim): the
    /// notification fd is then in [`Process::take_capture`].
    pub capture: bool,
}

/// How long a shim has to report its program's pid.
const REPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The shim's pid report pipe is moved at or above this fd in the master.
const REPORT_FD_FLOOR: i32 = 100;

/// Handed-over sockets start at this fd, as systemd's socket activation says.
pub const LISTEN_FDS_START: i32 = 3;
/// Sockets are first duplicated at or above this fd, so moving them to 3, 4, … in the child
/// never overwrites one not yet moved.
const HANDOVER_STAGING_FD: i32 = 64;

/// Starts the worker: its own process group, stdio to its log files, the worker contract's
/// environment, under the shim (which reports the program's pid), tied to the master's life.
pub async fn spawn(spec: &SpawnSpec<'_>) -> Result<Process, SpawnError> {
    let app = spec.app;
    let (out, err) = log_stdio(spec)?;
    let handover = !spec.sockets.is_empty();
    if handover && spec.shim.is_none() {
        return Err(SpawnError::NoShim);
    }
    let exec_error = |source| SpawnError::Exec {
        program: app.program.clone(),
        source,
    };
    let mut cmd = match spec.shim {
        Some(shim) => {
            let mut cmd = Command::new(shim);
            cmd.arg(crate::shim::SUBCOMMAND).arg("--").arg(&app.program);
            cmd
        }
        None => Command::new(&app.program),
    };
    cmd.args(&app.args)
        .current_dir(&app.cwd)
        .envs(&app.env)
        .env("BALANCER_APP", &app.name)
        .env("BALANCER_INSTANCE", spec.instance.to_string())
        .env("NODE_APP_INSTANCE", spec.instance.to_string())
        .env_remove("LISTEN_PID")
        // The master's own service-manager channel is not the worker's (`ready = "notify"`
        // gives a worker one of its own).
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(true);
    for (listener, addr) in app.listen.iter().zip(spec.addrs) {
        cmd.env(&listener.port_env, addr.port().to_string());
    }
    if let Some(path) = spec.notify_socket {
        cmd.env("NOTIFY_SOCKET", path);
    }
    let staged = spec
        .sockets
        .iter()
        .map(|fd| {
            nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(HANDOVER_STAGING_FD),
            )
            .map_err(io::Error::from)
        })
        .collect::<io::Result<Vec<i32>>>()
        .map_err(exec_error)?;
    // SAFETY: each fd was just returned by F_DUPFD_CLOEXEC and is owned by nobody else.
    #[allow(unsafe_code)]
    let staged_owned: Vec<OwnedFd> = staged
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if handover {
        let names: Vec<&str> = app.listen.iter().map(|l| l.port_env.as_str()).collect();
        cmd.env("LISTEN_FDS", staged.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
    }
    let master = nix::unistd::getpid();
    // The pid report: close-on-exec in the master (no other spawn may inherit it), cleared in
    // this child only.
    let report = match spec.shim {
        Some(_) => Some(report_pipe().map_err(exec_error)?),
        None => None,
    };
    let report_fd = report.as_ref().map(|(_, write)| write.as_raw_fd());
    if let Some(fd) = report_fd {
        cmd.env(crate::shim::REPORT_ENV, fd.to_string())
            .env(crate::shim::MASTER_ENV, master.as_raw().to_string());
    }
    // The capture channel, like the report pipe: inherited by this child only.
    let capture = match (spec.capture, spec.shim) {
        (true, Some(_)) => Some(capture_channel().map_err(exec_error)?),
        _ => None,
    };
    let capture_fd = capture.as_ref().map(|(_, theirs)| theirs.as_raw_fd());
    if let Some(fd) = capture_fd {
        cmd.env(crate::capture::CHANNEL_ENV, fd.to_string());
    }
    let death_signal = match spec.shim {
        Some(_) => crate::shim::master_gone_signal(),
        None => nix::libc::SIGKILL,
    };
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: prctl(2), getppid(2), dup2(2), fcntl(2) and
    // _exit(2) are. It allocates nothing and touches no lock (everything it uses was built
    // before the fork).
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, death_signal, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The master may have died before prctl took effect: then nobody would kill us.
            if nix::unistd::getppid() != master {
                nix::libc::_exit(1);
            }
            for (i, &fd) in staged.iter().enumerate() {
                // dup2 clears close-on-exec on the new fd: the program inherits it.
                if nix::libc::dup2(fd, LISTEN_FDS_START + i as i32) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            for fd in [report_fd, capture_fd].into_iter().flatten() {
                if nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = crate::children::spawn(&mut cmd).map_err(exec_error);
    drop(staged_owned);
    let child = child?;
    let Some((read, write)) = report else {
        return Ok(Process::new(child, None));
    };
    drop(write);
    let mut process = Process::new(child, None);
    let capture = capture.map(|(ours, theirs)| {
        drop(theirs);
        ours
    });
    let (report, capture) = tokio::join!(read_report(read), async move {
        match capture {
            Some(ours) => tokio::time::timeout(REPORT_TIMEOUT, crate::capture::receive(ours))
                .await
                .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "no fd in time")))
                .map_err(|e| tracing::warn!("no bind capture for this worker: {e}"))
                .ok()
                .flatten(),
            None => None,
        }
    });
    match report {
        Ok(pid) => {
            process.set_program_pid(pid);
            process.set_capture(capture);
            Ok(process)
        }
        Err(e) => {
            // A shim that cannot say who its program is cannot be supervised.
            process
                .stop(Signal::SIGKILL, std::time::Duration::from_secs(1))
                .await;
            Err(SpawnError::Report(e))
        }
    }
}

/// The worker's stdout and stderr: its log files themselves (the fast default: the master never
/// sees a byte), or, with `time`, `merge_logs` or `log_max_size`, pipes to the log relay
/// ([`crate::logs::relay`]).
fn log_stdio(spec: &SpawnSpec<'_>) -> Result<(Stdio, Stdio), SpawnError> {
    let failed = |source| SpawnError::Logs {
        path: spec.logs.out.display().to_string(),
        source,
    };
    if spec.app.logs.relayed() {
        let pipes =
            crate::logs::relay::attach(spec.app, spec.instance, spec.logs).map_err(failed)?;
        return Ok((pipes.out.into(), pipes.err.into()));
    }
    let (out, err) = spec.logs.open().map_err(failed)?;
    Ok((out.into(), err.into()))
}

/// A pipe for the pid report: (read end, write end at or above [`REPORT_FD_FLOOR`]), both
/// close-on-exec.
fn report_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let high = nix::fcntl::fcntl(
        &write,
        nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(REPORT_FD_FLOOR),
    )?;
    drop(write);
    // SAFETY: `high` was just returned by F_DUPFD_CLOEXEC and is owned by nobody else.
    #[allow(unsafe_code)]
    let high = unsafe { OwnedFd::from_raw_fd(high) };
    Ok((read, high))
}

/// The capture channel: (the master's end, the child's end at or above
/// [`REPORT_FD_FLOOR`]), both close-on-exec.
fn capture_channel() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    let high = nix::fcntl::fcntl(
        &theirs,
        nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(REPORT_FD_FLOOR),
    )?;
    drop(theirs);
    // SAFETY: `high` was just returned by F_DUPFD_CLOEXEC and is owned by nobody else.
    #[allow(unsafe_code)]
    let high = unsafe { OwnedFd::from_raw_fd(high) };
    Ok((ours, high))
}

/// Reads the program pid the shim writes (one decimal line), within [`REPORT_TIMEOUT`].
async fn read_report(read: OwnedFd) -> io::Result<u32> {
    use tokio::io::AsyncReadExt;
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(read)?;
    let mut text = String::new();
    tokio::time::timeout(REPORT_TIMEOUT, pipe.read_to_string(&mut text))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no report in time"))??;
    text.trim()
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("report {text:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_ports_come_from_below_the_ephemeral_range_and_are_free() {
        let low = ephemeral_range_start().unwrap_or(32768);
        let mut seen = std::collections::HashSet::new();
        for proto in [Proto::Tcp, Proto::Udp, Proto::Http] {
            for _ in 0..20 {
                let port = private_port(proto).unwrap();
                assert!((PRIVATE_PORT_FLOOR..low).contains(&port), "{port}");
                assert!(bind_test(proto, port).is_ok(), "still free");
                seen.insert(port);
            }
        }
        assert!(
            seen.len() > 50,
            "ports rotate instead of repeating: {}",
            seen.len()
        );
    }
}
