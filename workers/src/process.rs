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

/// A running worker process.
#[derive(Debug)]
pub struct Process {
    child: Child,
    pid: u32,
    started: Instant,
    exit: Option<Exit>,
}

impl Process {
    /// Wraps a child just spawned in its own process group (its pid is its group id).
    pub(crate) fn new(child: Child) -> Process {
        let pid = child.id().unwrap_or_default();
        Process {
            child,
            pid,
            started: Instant::now(),
            exit: None,
        }
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// When it was spawned.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Waits for the process to exit (cancel-safe), then kills whatever it left in its group.
    pub async fn wait(&mut self) -> Exit {
        if let Some(exit) = self.exit {
            return exit;
        }
        let exit = Exit::from(self.child.wait().await);
        self.exit = Some(exit);
        // Children of the worker that outlive it would keep ports and memory: end them.
        self.signal_group(Signal::SIGKILL);
        exit
    }

    /// Sends `signal` to the worker's whole process group.
    pub fn signal_group(&self, signal: Signal) {
        if self.pid != 0 {
            // ESRCH (the group is already gone) is the normal end of a stop.
            let _ = killpg(Pid::from_raw(self.pid as i32), signal);
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
                self.wait().await
            }
        }
    }
}
