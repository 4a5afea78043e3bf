//! `balancer upgrade`: replacing the master's own binary without dropping a connection. Both
//! sides of the hand-over live here: the old master ([`Master::upgrade`]) starts the new
//! binary as `balancer take-over 3` with its public sockets and its home lock inherited, and
//! the new master ([`take_over`]) starts its own workers, waits until they are ready, and only
//! then takes the admin socket and starts accepting. `balancer/UPGRADE.md` gives the sequence
//! and what happens if either side dies at each step.
//!
//! The handshake is JSON lines over a socketpair (fd 3 in the new master). Every socket
//! crosses as an inherited descriptor, so the kernel objects never change: a client
//! connecting at any moment lands in one accept queue, which the old master serves until the
//! new one has taken over, and both serve for the moment in between (each connection is
//! accepted once, by one of them, and served whole by it). Reuseport groups cross too: the old
//! master freezes their steering and passes their member sockets, which the new one adopts and
//! steers away from once it has taken over.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use balancer_config::{Listener, Policy, Proto};
use balancer_workers::reuseport::Group;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::dump::Dump;
use super::{ControlError, Master, OpResult};
use crate::home::{self, HomeLock};
use crate::listener::Bound;

mod take_over;
pub use take_over::{Inheritance, inherit, take_over};

/// The handshake socket's descriptor in the new master.
pub const HANDSHAKE_FD: RawFd = 3;
/// The home lock's descriptor in the new master.
const LOCK_FD: RawFd = 4;
/// The first public socket's descriptor in the new master; the others follow in order.
const FIRST_SOCKET_FD: RawFd = 5;
/// Descriptors are staged above this before the fork, so that no `dup2` to 3, 4, 5, … can
/// overwrite a descriptor still to be moved.
const STAGING_FD: RawFd = 1000;
/// How long the new master waits for the old one's first message.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// After `go`, how long the old master waits for `took_over` (a rename and a write).
const TAKE_OVER_TIMEOUT: Duration = Duration::from_secs(10);
/// A failed new master gets this long to exit by itself before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// What the master keeps for `upgrade`, set at boot.
#[derive(Debug, Default)]
pub(super) struct Handles {
    /// The path this binary was started from (what `upgrade` runs by default: re-read from
    /// disk, so `cargo install` then `balancer upgrade` is the whole upgrade).
    exe: std::sync::OnceLock<PathBuf>,
    /// A duplicate of the home lock's descriptor (the same open file description).
    lock: std::sync::OnceLock<OwnedFd>,
    /// Set once a successor took over: the shutdown that follows drains differently, and the
    /// home's files are the successor's.
    handed_over: AtomicBool,
    /// In a new master, the sockets the old one passed, until its apps claim them.
    inherited: Mutex<Vec<(Passed, Bound)>>,
    /// In a new master, the metrics endpoint's socket, until the config names its address.
    metrics: Mutex<Option<std::net::TcpListener>>,
    /// In an old master that handed over: the handshake, kept open until this process exits,
    /// which is how the new master learns that every old descriptor is closed.
    successor: Mutex<Option<Handshake>>,
}

/// Both halves of the handshake socket (dropping the write half alone would shut it down).
type Handshake = (
    tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>,
    tokio::net::unix::OwnedWriteHalf,
);

impl Handles {
    /// Whether a successor took over.
    pub(super) fn handed_over(&self) -> bool {
        self.handed_over.load(Ordering::SeqCst)
    }

    /// The inherited socket for `listener`, if the old master passed one for its address.
    pub(super) fn inherited(&self, listener: &Listener) -> Option<Bound> {
        let datagram = listener.proto == Proto::Udp;
        let mut all = self.inherited.lock().unwrap_or_else(|e| e.into_inner());
        let pos = all
            .iter()
            .position(|(p, _)| p.addr == listener.addr && p.datagram == datagram)?;
        tracing::info!(listener = %listener, "listening on the socket the old master passed");
        Some(all.remove(pos).1)
    }

    /// The inherited metrics socket, if it listens on `addr`.
    pub(super) fn inherited_metrics(&self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let mut slot = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref()?.local_addr().ok()? == addr {
            return slot.take();
        }
        None
    }
}

/// One public socket in the handshake: where it listens and which descriptor it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Passed {
    /// The app that listens on it, for the logs.
    app: String,
    /// The listener as configured (`http://127.0.0.1:8080`).
    listener: String,
    /// Its address: with `datagram`, what the new master's config is matched by.
    addr: SocketAddr,
    /// UDP.
    datagram: bool,
    /// A member of a reuseport group (its worker's socket, in the group's kernel order)
    /// rather than a master's own listener.
    #[serde(default)]
    reuseport: bool,
    /// Its descriptor in the new master.
    fd: RawFd,
}

/// One handshake message (a JSON line).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
enum Message {
    /// Old → new, first: the state and the descriptors.
    Hello {
        /// The old master's pid (to tell, if the handshake breaks, whether it died).
        pid: u32,
        /// `$BALANCER_HOME`.
        home: PathBuf,
        /// Every app: its origin, worker count, stopped or not (what `save` writes).
        state: Dump,
        /// The public sockets.
        sockets: Vec<Passed>,
        /// The metrics endpoint's socket, if it serves one.
        metrics: Option<RawFd>,
    },
    /// New → old: a line for the `upgrade` command's output.
    Progress { line: String },
    /// New → old: every worker is ready; the new master waits for `go`.
    Ready { pid: u32, version: String },
    /// New → old: the new master cannot take over and exits.
    Failed { error: String },
    /// Old → new: take the admin socket and start accepting.
    Go,
    /// New → old: the admin socket and the pid file are the new master's, and it accepts.
    TookOver { pid: u32 },
}

/// Why an upgrade did not happen; the old master carries on either way.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// Something the upgrade needs is not there, or not built yet; nothing was started.
    #[error("cannot upgrade: {0}")]
    Refused(String),
    /// The new binary could not be started.
    #[error("cannot start {}", binary.display())]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The handshake socket failed.
    #[error("the hand-over to the new master failed")]
    Handshake(#[source] io::Error),
    /// The new master said why it cannot take over.
    #[error("the new master (pid {pid}) failed: {error}")]
    Failed {
        /// Its pid.
        pid: u32,
        /// What it said.
        error: String,
    },
    /// The new master exited before taking over.
    #[error("the new master (pid {pid}) {status} before taking over")]
    Exited {
        /// Its pid.
        pid: u32,
        /// How it ended.
        status: String,
    },
    /// No hand-over within the timeout: the new master was killed.
    #[error("the new master (pid {pid}) did not take over within {timeout:?}; killed it")]
    Timeout {
        /// Its pid.
        pid: u32,
        /// The timeout.
        timeout: Duration,
    },
}

impl Master {
    /// Remembers, at boot, what an upgrade needs: the binary's path and the home lock.
    pub(super) fn keep_for_upgrade(&self, exe: Option<PathBuf>, lock: &HomeLock) {
        if let Some(exe) = exe {
            let _ = self.upgrade.exe.set(exe);
        }
        match lock.file().map(File::try_clone) {
            Some(Ok(file)) => {
                let _ = self.upgrade.lock.set(OwnedFd::from(file));
            }
            Some(Err(e)) => tracing::warn!("cannot keep the home lock for an upgrade: {e}"),
            None => {}
        }
    }

    /// `upgrade`: starts `binary` (default: the path this master was started from) as the
    /// new master, hands it the listeners, the lock and the apps, and once it has taken over,
    /// starts this master's shutdown (drain, then stop the workers). Any failure before the
    /// take-over leaves this master as it was. `progress` gets a line at each step.
    pub async fn upgrade(
        &self,
        binary: Option<PathBuf>,
        timeout: Duration,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> OpResult {
        // No configuration change while the state is in flight to the new master.
        let _change = self.changes.lock().await;
        if self.upgrade.handed_over() {
            return Err(refused("this master has already handed over to a new one"));
        }
        if std::process::id() == 1 {
            // Its exit would end the container (or the PID namespace) and the new master too.
            return Err(refused(
                "this master is PID 1 (a container's entry point): its exit would end the \
                 container; roll out a new image instead",
            ));
        }
        let binary = match binary.or_else(|| self.upgrade.exe.get().cloned()) {
            Some(binary) => binary,
            None => {
                return Err(refused(
                    "this master does not know its binary; pass --binary",
                ));
            }
        };
        let lock = self
            .upgrade
            .lock
            .get()
            .ok_or_else(|| refused("this master does not hold the home lock"))?;
        let state = self.dump();
        let (sockets, fds, groups) = self.sockets_to_pass(&state)?;
        let metrics = self
            .endpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|e| e.socket().map(|s| s.try_clone_to_owned()))
            .transpose()
            .map_err(|e| refused(&format!("cannot pass the metrics endpoint: {e}")))?;

        let (ours, theirs) = StdUnixStream::pair().map_err(handshake)?;
        let mut passed: Vec<BorrowedFd<'_>> = vec![theirs.as_fd(), lock.as_fd()];
        passed.extend(fds.iter().map(|f| f.as_fd()));
        if let Some(m) = &metrics {
            passed.push(m.as_fd());
        }
        let metrics_fd = metrics
            .as_ref()
            .map(|_| FIRST_SOCKET_FD + sockets.len() as RawFd);
        ours.set_nonblocking(true).map_err(handshake)?;
        let ours = UnixStream::from_std(ours).map_err(handshake)?;
        // The new master steers the reuseport groups from its first worker on (see
        // UPGRADE.md): two masters writing one group's program would undo each other.
        for g in &groups {
            g.freeze();
        }
        let mut child = match spawn(&binary, &passed) {
            Ok(child) => child,
            Err(e) => {
                groups.iter().for_each(|g| g.thaw());
                return Err(e);
            }
        };
        drop(passed);
        drop(theirs);
        let pid = child.id().unwrap_or_default();
        progress(format!(
            "started the new master: {} (pid {pid})",
            binary.display()
        ));
        tracing::info!(pid, binary = %binary.display(), "upgrade: new master started");

        let (read, mut write) = ours.into_split();
        let mut lines = tokio::io::BufReader::new(read).lines();
        let hello = Message::Hello {
            pid: std::process::id(),
            home: self.home.clone(),
            state,
            sockets,
            metrics: metrics_fd,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let outcome = async {
            send(&mut write, &hello).await?;
            // Until ready: progress, or why not.
            let version = loop {
                match next(&mut lines).await? {
                    Some(Message::Progress { line }) => progress(format!("new master: {line}")),
                    Some(Message::Ready { version, .. }) => break version,
                    Some(Message::Failed { error }) => {
                        return Err(UpgradeError::Failed { pid, error });
                    }
                    Some(other) => {
                        return Err(handshake(io::Error::other(format!("unexpected {other:?}"))));
                    }
                    None => {
                        return Err(UpgradeError::Exited {
                            pid,
                            status: "closed the hand-over".into(),
                        });
                    }
                }
            };
            progress(format!(
                "new master (pid {pid}, version {version}): every worker ready; handing over the admin socket"
            ));
            send(&mut write, &Message::Go).await?;
            match tokio::time::timeout(TAKE_OVER_TIMEOUT, next(&mut lines)).await {
                Ok(Ok(Some(Message::TookOver { .. }))) => Ok(version),
                Ok(Ok(Some(Message::Failed { error }))) => Err(UpgradeError::Failed { pid, error }),
                Ok(Err(e)) => Err(e),
                _ => Err(UpgradeError::Exited {
                    pid,
                    status: "gave no answer to go".into(),
                }),
            }
        };
        let result = tokio::select! {
            result = tokio::time::timeout_at(deadline, outcome) => match result {
                Ok(result) => result,
                Err(_) => Err(UpgradeError::Timeout { pid, timeout }),
            },
            status = child.wait() => Err(UpgradeError::Exited {
                pid,
                status: status.map_or_else(|e| format!("could not be waited for ({e})"), describe),
            }),
        };
        match result {
            Ok(version) => {
                self.upgrade.handed_over.store(true, Ordering::SeqCst);
                *self
                    .upgrade
                    .successor
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some((lines, write));
                if let Some(systemd) = super::notify::Notifier::from_env() {
                    // systemd follows the new master (the unit has NotifyAccess=all).
                    systemd.send(&format!("MAINPID={pid}"));
                }
                tracing::info!(
                    pid,
                    "upgrade: the new master took over; draining and exiting"
                );
                progress(format!(
                    "new master (pid {pid}) took over; this master (pid {}) drains its connections and exits",
                    std::process::id()
                ));
                self.request_shutdown();
                Ok(format!(
                    "upgraded: master pid {pid} (version {version}) took over from pid {}",
                    std::process::id()
                ))
            }
            Err(error) => {
                // A new master that failed, or broke the handshake, is likely exiting: let it,
                // and say how it ended. One that timed out is killed at once.
                let dying = !matches!(error, UpgradeError::Timeout { .. });
                let status = end(&mut child, dying).await;
                // Its sockets are closed with it: this master steers its groups again.
                groups.iter().for_each(|g| g.thaw());
                let error = match error {
                    UpgradeError::Handshake(_) | UpgradeError::Exited { .. } => {
                        UpgradeError::Exited {
                            pid,
                            status: status.clone(),
                        }
                    }
                    other => other,
                };
                let how = match &error {
                    UpgradeError::Exited { .. } => String::new(),
                    _ => format!("; the new master {status}"),
                };
                tracing::warn!(
                    pid,
                    "upgrade failed: {}{how}; this master serves on",
                    balancer_workers::Chain(&error)
                );
                // A new master that died between `go` and `took_over` may have renamed its
                // admin socket over ours: make sure the path answers here again.
                if let Err(e) = self.rebind_admin() {
                    tracing::error!("cannot bind the admin socket again: {e}");
                }
                Err(ControlError::Upgrade(error))
            }
        }
    }

    /// The public sockets (and the reuseport groups' member sockets), in the order they are
    /// passed, with their descriptors here, and the reuseport groups.
    #[allow(clippy::type_complexity)]
    fn sockets_to_pass(
        &self,
        state: &Dump,
    ) -> Result<(Vec<Passed>, Vec<OwnedFd>, Vec<Arc<Group>>), ControlError> {
        let entries = self.entries();
        let mut passed = Vec::new();
        let mut fds = Vec::new();
        let mut groups = Vec::new();
        for e in entries.iter() {
            let app = e.sup.app();
            if app.policy == Policy::ReusePort {
                for group in e.sup.groups() {
                    let members = group
                        .sockets()
                        .map_err(|e| refused(&format!("cannot pass {}: {e}", group.listener())))?;
                    for fd in members {
                        passed.push(Passed {
                            app: app.name.clone(),
                            listener: group.listener().to_string(),
                            addr: group.listener().addr,
                            datagram: false,
                            reuseport: true,
                            fd: FIRST_SOCKET_FD + fds.len() as RawFd,
                        });
                        fds.push(fd);
                    }
                    groups.push(group);
                }
            }
            if !state.apps.iter().any(|a| a.name == app.name) {
                return Err(refused(&format!(
                    "app {:?} has no origin to start it again from (a `--no-daemon` start); \
                     start it with `balancer start FILE` or `balancer run FILE`",
                    app.name
                )));
            }
            for l in &e.listeners {
                let Some(socket) = &l.socket else {
                    return Err(refused(&format!("the socket of {} was not kept", l.config)));
                };
                let fd = socket
                    .try_clone()
                    .map_err(|e| refused(&format!("cannot pass {}: {e}", l.config)))?;
                passed.push(Passed {
                    app: app.name.clone(),
                    listener: l.config.to_string(),
                    addr: l.config.addr,
                    datagram: l.config.proto == Proto::Udp,
                    reuseport: false,
                    fd: FIRST_SOCKET_FD + fds.len() as RawFd,
                });
                fds.push(fd);
            }
        }
        Ok((passed, fds, groups))
    }

    /// Binds the admin socket at its path again (after a failed take-over), serving it until
    /// shutdown. The first listener keeps serving its own (maybe unlinked) socket.
    fn rebind_admin(&self) -> io::Result<()> {
        let path = home::admin_socket(&self.home);
        let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) else {
            return Ok(());
        };
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            // Someone answers there; the only other candidate is us.
            return Ok(());
        }
        let listener = bind_admin_over(&path)?;
        tokio::spawn(super::admin::serve(listener, me, self.shutdown.clone()));
        Ok(())
    }
}

fn refused(why: &str) -> ControlError {
    ControlError::Upgrade(UpgradeError::Refused(why.to_owned()))
}

fn handshake(e: io::Error) -> UpgradeError {
    UpgradeError::Handshake(e)
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with exit code {code}"),
        (_, Some(signal)) => format!("was killed by signal {signal}"),
        _ => format!("ended ({status})"),
    }
}

/// Ends a new master that will not take over: it gets [`EXIT_GRACE`] to exit by itself when
/// it said it failed, and is killed otherwise (or after that). Its workers die with it (their
/// shims watch their master).
async fn end(child: &mut tokio::process::Child, said_so: bool) -> String {
    if said_so && let Ok(Ok(status)) = tokio::time::timeout(EXIT_GRACE, child.wait()).await {
        return describe(status);
    }
    let _ = child.start_kill();
    match child.wait().await {
        Ok(status) => describe(status),
        Err(e) => format!("could not be waited for ({e})"),
    }
}

/// Starts `binary take-over 3` with `fds` as its descriptors 3, 4, 5, …, everything else
/// close-on-exec as usual. Its stdio is ours: a daemon's goes on to `balancer.log`.
fn spawn(binary: &Path, fds: &[BorrowedFd<'_>]) -> Result<tokio::process::Child, ControlError> {
    let fail = |source| {
        ControlError::Upgrade(UpgradeError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })
    };
    let staged = fds
        .iter()
        .map(|fd| {
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(STAGING_FD))
                .map_err(io::Error::from)
        })
        .collect::<io::Result<Vec<RawFd>>>()
        .map_err(fail)?;
    // SAFETY: each fd was just returned by F_DUPFD_CLOEXEC and is owned by nobody else.
    #[allow(unsafe_code)]
    let _staged_owned: Vec<OwnedFd> = staged
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    let mut cmd = tokio::process::Command::new(binary);
    cmd.arg("take-over")
        .arg(HANDSHAKE_FD.to_string())
        // systemd's watchdog names the old master; absent, the new one pings as the main pid.
        .env_remove("WATCHDOG_PID")
        .stdin(std::process::Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: dup2(2) is. It allocates nothing (the staged list
    // was built before the fork) and touches no lock.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            for (i, &fd) in staged.iter().enumerate() {
                // dup2 clears close-on-exec on the new fd: the new master inherits it.
                if nix::libc::dup2(fd, HANDSHAKE_FD + i as RawFd) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(fail)
}

async fn send(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    message: &Message,
) -> Result<(), UpgradeError> {
    let mut line = serde_json::to_vec(message).map_err(|e| handshake(io::Error::other(e)))?;
    line.push(b'\n');
    write.write_all(&line).await.map_err(handshake)
}

async fn next(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>,
) -> Result<Option<Message>, UpgradeError> {
    match lines.next_line().await.map_err(handshake)? {
        None => Ok(None),
        Some(line) => serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| handshake(io::Error::other(format!("bad message {line:?}: {e}")))),
    }
}

/// Binds a unix socket at a temporary name next to `path` and renames it over `path`, so
/// the path always names a socket someone answers on: the old one until the rename, this one
/// after.
pub(super) fn bind_admin_over(path: &Path) -> io::Result<tokio::net::UnixListener> {
    let tmp = path.with_extension(format!("sock.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = tokio::net::UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}
