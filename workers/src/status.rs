//! What the master knows about each worker: its [`WorkerState`] and [`WorkerStatus`] (what `ls`
//! and `show` print), and which workers an operation is aimed at ([`Target`]).
//!
//! A status is written only by its slot's task (through a `watch` channel) and read by anyone;
//! the supervisor never edits a status itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use crate::pool::WorkerHandle;
use crate::process::Exit;

/// Where a worker is in its life. See `workers/LIFECYCLE.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Spawned, not yet ready: not in the pool.
    Starting,
    /// Passed its health check: in the pool.
    Ready,
    /// Was ready, then failed `fall` probes: out of the pool, still running, still probed.
    Unhealthy,
    /// Out of the pool, finishing what it has: waiting for its live connections (rr), or told
    /// to stop and finishing what it accepted (reuseport).
    Draining,
    /// On its way out: sent `kill_signal` (rr), or exited while the master empties its socket
    /// (reuseport).
    Stopping,
    /// Exited on its own; restarts after a delay.
    WaitingRestart,
    /// Stopped on purpose (or exited with `autorestart = false`).
    Stopped,
    /// Crash loop: left down until someone starts it again.
    Errored,
}

impl WorkerState {
    /// The name shown by `ls` and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Unhealthy => "unhealthy",
            WorkerState::Draining => "draining",
            WorkerState::Stopping => "stopping",
            WorkerState::WaitingRestart => "waiting-restart",
            WorkerState::Stopped => "stopped",
            WorkerState::Errored => "errored",
        }
    }

    /// Whether the slot's task has given up on this worker for good (until someone starts it).
    pub fn is_down(self) -> bool {
        matches!(self, WorkerState::Stopped | WorkerState::Errored)
    }
}

/// What `ls`/`show` know about a worker.
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    /// Stable id of the slot.
    pub id: u32,
    /// The app's name.
    pub app: String,
    /// `BALANCER_INSTANCE`.
    pub instance: u32,
    /// Current state.
    pub state: WorkerState,
    /// The running process, if any.
    pub pid: Option<u32>,
    /// Private addresses of the current incarnation.
    pub addrs: Vec<SocketAddr>,
    /// When the current incarnation was spawned.
    pub since: Option<SystemTime>,
    /// How many times the slot was restarted after an exit.
    pub restarts: u32,
    /// How the previous incarnation ended.
    pub last_exit: Option<Exit>,
    /// Why the worker is errored, unhealthy or was restarted, in words.
    pub reason: Option<String>,
    /// The data path's handle, for live-connection counts.
    pub handle: Option<Arc<WorkerHandle>>,
}

impl WorkerStatus {
    /// The status of a slot whose first process is about to be spawned.
    pub(crate) fn new(id: u32, app: String, instance: u32, restarts: u32) -> Self {
        WorkerStatus {
            id,
            app,
            instance,
            state: WorkerState::Starting,
            pid: None,
            addrs: Vec::new(),
            since: None,
            restarts,
            last_exit: None,
            reason: None,
            handle: None,
        }
    }

    /// Connections currently proxied to this worker.
    pub fn live_connections(&self) -> usize {
        self.handle.as_ref().map_or(0, |h| h.live())
    }
}

/// Which workers of an app an operation touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Every worker.
    All,
    /// The worker with this id.
    Worker(u32),
}

impl Target {
    /// Whether the worker with this id is aimed at.
    pub fn matches(self, id: u32) -> bool {
        match self {
            Target::All => true,
            Target::Worker(wanted) => wanted == id,
        }
    }
}
