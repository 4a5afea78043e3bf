//! A running worker process ([`Process`]): wait for it, signal its process group, stop it
//! gracefully; and how it ended ([`Exit`]).
//!
//! Building and starting one is [`crate::spawn`]'s job; this module only deals with a process
//! that exists.

use std::fmt;
use std::io;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use balancer_config::Signal;
use nix::sys::signal::killpg;
use nix::unistd::Pid;
use tokio::process::Child;

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
    /// Its status could not be read.
    Unknown,
}

impl From<io::Result<ExitStatus>> for Exit {
    fn from(status: io::Result<ExitStatus>) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match status {
            Ok(s) => match (s.code(), s.signal()) {
                (Some(code), _) => Exit::Code(code),
                (None, Some(sig)) => Exit::Signal(sig),
                _ => Exit::Unknown,
            },
            Err(_) => Exit::Unknown,
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => match Signal::try_from(*s) {
                Ok(sig) => write!(f, "signal {}", sig.as_str()),
                Err(_) => write!(f, "signal {s}"),
            },
            Exit::Unknown => f.write_str("unknown exit status"),
        }
    }
}

/// A running worker process: the shim the master spawned (or the program itself, without a
/// shim) and the program's pid.
#[derive(Debug)]
pub struct Process {
    child: Child,
    /// The spawned process: the shim, or the program when there is none. Its own group.
    spawned: u32,
    /// The program's pid; its own group too (the shim puts it in one).
    pid: u32,
    /// Whether a shim sits between the master and the program.
    shim: bool,
    started: Instant,
    exit: Option<Exit>,
    /// The bind capture's notification fd, until the slot takes it.
    capture: Option<std::os::fd::OwnedFd>,
}

impl Drop for Process {
    /// A process dropped unwaited is left to tokio's orphan reaping; the PID-1 reaper may
    /// reap it as well from now on (whichever comes first, the zombie is gone).
    fn drop(&mut self) {
        crate::children::forget(self.spawned);
    }
}

/// How long a shim has, after its program was SIGKILLed, to sweep and exit before it is
/// SIGKILLed too.
const SHIM_SWEEP_TIMEOUT: Duration = Duration::from_secs(3);

impl Process {
    /// Wraps a child just spawned in its own process group (its pid is its group id); the
    /// program's pid is set by [`set_program_pid`](Self::set_program_pid) when a shim runs it.
    pub(crate) fn new(child: Child, program: Option<u32>) -> Process {
        let spawned = child.id().unwrap_or_default();
        Process {
            child,
            spawned,
            pid: program.unwrap_or(spawned),
            shim: false,
            started: Instant::now(),
            exit: None,
            capture: None,
        }
    }

    /// Keeps the worker's bind capture fd for the slot ([`crate::capture`]).
    pub(crate) fn set_capture(&mut self, fd: Option<std::os::fd::OwnedFd>) {
        self.capture = fd;
    }

    /// The worker's bind capture fd, once.
    pub(crate) fn take_capture(&mut self) -> Option<std::os::fd::OwnedFd> {
        self.capture.take()
    }

    /// The child is a shim whose program has this pid.
    pub(crate) fn set_program_pid(&mut self, pid: u32) {
        self.pid = pid;
        self.shim = true;
    }

    /// The program's process id (also its process group id): what `ls` shows.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The worker's shim, when it runs under one.
    pub fn shim_pid(&self) -> Option<u32> {
        self.shim.then_some(self.spawned)
    }

    /// When it was spawned.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Waits for the process to exit (cancel-safe), then kills whatever it left in its group.
    /// With a shim, the exit is the program's (the shim exits like it), and the shim has
    /// already killed every descendant, in the group or not.
    pub async fn wait(&mut self) -> Exit {
        if let Some(exit) = self.exit {
            return exit;
        }
        let exit = Exit::from(self.child.wait().await);
        self.exit = Some(exit);
        crate::children::forget(self.spawned);
        // Children of the worker that outlive it would keep ports and memory: end them.
        kill_group(self.pid, Signal::SIGKILL);
        kill_group(self.spawned, Signal::SIGKILL);
        exit
    }

    /// Sends `signal` to the worker: through the shim, which passes it to the program's group
    /// (so it arrives once), or to the program's group directly.
    pub fn signal_group(&self, signal: Signal) {
        if self.shim && signal != Signal::SIGKILL {
            if self.spawned != 0 {
                let _ = nix::sys::signal::kill(Pid::from_raw(self.spawned as i32), signal);
            }
        } else {
            // SIGKILL cannot be passed on: it goes to the program's group, and the shim, seeing
            // its program die, sweeps the rest and exits.
            kill_group(self.pid, signal);
        }
    }

    /// Graceful stop: `signal` to the group, up to `timeout` for it to exit, then SIGKILL.
    pub async fn stop(&mut self, signal: Signal, timeout: Duration) -> Exit {
        if let Some(exit) = self.exit {
            return exit;
        }
        self.signal_group(signal);
        match tokio::time::timeout(timeout, self.wait()).await {
            Ok(exit) => exit,
            Err(_) => {
                tracing::warn!(
                    pid = self.pid,
                    ?timeout,
                    "worker ignored {}; sending SIGKILL",
                    signal.as_str()
                );
                self.signal_group(Signal::SIGKILL);
                if self.shim
                    && tokio::time::timeout(SHIM_SWEEP_TIMEOUT, self.wait())
                        .await
                        .is_err()
                {
                    tracing::warn!(pid = self.spawned, "worker shim did not exit; SIGKILL");
                    kill_group(self.spawned, Signal::SIGKILL);
                }
                self.wait().await
            }
        }
    }
}

/// `signal` to the process group `pgid`; ESRCH (the group is gone) is the normal end of a stop.
fn kill_group(pgid: u32, signal: Signal) {
    if pgid != 0 {
        let _ = killpg(Pid::from_raw(pgid as i32), signal);
    }
}
