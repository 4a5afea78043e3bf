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
use crate::stats::Usage;

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
    /// How many times the slot was restarted (every reason: the sum of `restarts_by`).
    pub restarts: u32,
    /// The same restarts, by reason.
    pub restarts_by: RestartCounts,
    /// The last restart's reason and what caused it (`memory: tree RSS 130 MiB over …`).
    pub last_restart: Option<String>,
    /// How the previous incarnation ended.
    pub last_exit: Option<Exit>,
    /// Why the worker is errored, unhealthy or was restarted, in words.
    pub reason: Option<String>,
    /// The data path's handle, for live-connection counts.
    pub handle: Option<Arc<WorkerHandle>>,
    /// CPU and memory of the running process's tree (see [`crate::stats`]).
    pub usage: Option<Arc<Usage>>,
}

impl WorkerStatus {
    /// The status of a slot whose first process is about to be spawned.
    pub(crate) fn new(
        id: u32,
        app: String,
        instance: u32,
        restarts_by: RestartCounts,
        last_restart: Option<String>,
    ) -> Self {
        WorkerStatus {
            id,
            app,
            instance,
            state: WorkerState::Starting,
            pid: None,
            addrs: Vec::new(),
            since: None,
            restarts: restarts_by.total(),
            restarts_by,
            last_restart,
            last_exit: None,
            reason: None,
            handle: None,
            usage: None,
        }
    }

    /// Counts one restart for `reason` (in the total too), and says why.
    pub(crate) fn count_restart(&mut self, reason: RestartReason, why: String) {
        self.restarts_by.count(reason);
        self.restarts = self.restarts_by.total();
        self.last_restart = Some(why);
    }

    /// Connections currently proxied to this worker.
    pub fn live_connections(&self) -> usize {
        self.handle.as_ref().map_or(0, |h| h.live())
    }
}

/// Why a worker was restarted (a reload's replacement counts as a restart of the slot, as in
/// PM2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartReason {
    /// It exited by itself, or never became ready within `listen_timeout`.
    Crash,
    /// Its tree stayed above `max_memory_restart` (replaced the way a reload replaces).
    Memory,
    /// A `reload` replaced it.
    Reload,
    /// A `restart` (stop, then start) asked for it.
    Restart,
    /// A file under `watch` changed (replaced the way a reload replaces).
    Watch,
    /// `cron_restart` came due (replaced the way a reload replaces).
    Cron,
}

impl RestartReason {
    /// Every reason, in the order metrics and `show` list them.
    pub const ALL: [RestartReason; 6] = [
        RestartReason::Crash,
        RestartReason::Memory,
        RestartReason::Reload,
        RestartReason::Restart,
        RestartReason::Watch,
        RestartReason::Cron,
    ];

    /// The name used in `jlist`, `show` and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartReason::Crash => "crash",
            RestartReason::Memory => "memory",
            RestartReason::Reload => "reload",
            RestartReason::Restart => "restart",
            RestartReason::Watch => "watch",
            RestartReason::Cron => "cron",
        }
    }
}

/// Restarts of one worker slot, by reason; kept across its restarts and reloads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestartCounts {
    /// Exits and never-ready starts that were restarted.
    pub crash: u32,
    /// `max_memory_restart` replacements.
    pub memory: u32,
    /// Reload replacements.
    pub reload: u32,
    /// `restart` commands.
    pub restart: u32,
    /// Reloads because a watched file changed.
    pub watch: u32,
    /// Reloads because `cron_restart` came due.
    pub cron: u32,
}

impl RestartCounts {
    /// All restarts.
    pub fn total(&self) -> u32 {
        self.crash + self.memory + self.reload + self.restart + self.watch + self.cron
    }

    /// The count for one reason.
    pub fn get(&self, reason: RestartReason) -> u32 {
        match reason {
            RestartReason::Crash => self.crash,
            RestartReason::Memory => self.memory,
            RestartReason::Reload => self.reload,
            RestartReason::Restart => self.restart,
            RestartReason::Watch => self.watch,
            RestartReason::Cron => self.cron,
        }
    }

    /// These counts with one more restart for `reason`.
    pub fn with(mut self, reason: RestartReason) -> Self {
        self.count(reason);
        self
    }

    fn count(&mut self, reason: RestartReason) {
        let n = match reason {
            RestartReason::Crash => &mut self.crash,
            RestartReason::Memory => &mut self.memory,
            RestartReason::Reload => &mut self.reload,
            RestartReason::Restart => &mut self.restart,
            RestartReason::Watch => &mut self.watch,
            RestartReason::Cron => &mut self.cron,
        };
        *n = n.saturating_add(1);
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
