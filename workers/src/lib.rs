//! The control plane: spawning workers, supervising them, deciding readiness, and publishing the
//! ready ones in a [`Pool`] that the data path reads.
//!
//! Dependencies point one way: the `balancer` crate reads pools and calls supervisors; nothing
//! here knows about listeners or proxies. The worker state machine is in `LIFECYCLE.md`.

pub mod health;
pub mod logs;
pub mod pool;
pub mod process;
pub mod reuseport;
pub mod supervisor;

pub use pool::{ConnGuard, Pool, PoolSnapshot, WorkerHandle};
pub use process::Exit;
pub use supervisor::{AppSupervisor, Environment, OpError, Target, WorkerState, WorkerStatus};
