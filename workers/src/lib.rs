//! The control plane: spawning workers, supervising them, deciding readiness, and publishing the
//! ready ones in a [`Pool`] that the data path reads.
//!
//! Dependencies point one way: the `balancer` crate reads pools and calls supervisors; nothing
//! here knows about listeners or proxies. The worker state machine is in `LIFECYCLE.md`, with a
//! map of which module owns which part of it.

pub mod capture;
mod cbpf;
pub mod children;
pub mod error;
pub mod health;
pub mod logs;
mod notify;
pub mod pool;
pub mod process;
pub mod restart;
pub mod reuseport;
pub mod shim;
mod slot;
pub mod sockdiag;
pub mod spawn;
pub mod stats;
pub mod status;
pub mod supervisor;
pub mod triggers;
pub mod watch;

pub use error::Chain;
pub use pool::{ConnGuard, Pool, PoolSnapshot, Queue, QueueStats, WorkerHandle};
pub use process::Exit;
pub use stats::{Sampler, Usage, UsageSnapshot};
pub use status::{RestartCounts, RestartReason, Target, WorkerState, WorkerStatus};
pub use supervisor::{AppSupervisor, NotReady, OpError, SpawnContext};

/// Backlog of every listening socket the master creates (public listeners and reuseport
/// members): large, because connections wait there while workers restart.
pub const LISTEN_BACKLOG: i32 = 1024;
