//! The processes this master spawned (the workers' shims) and still means to wait for, so
//! that a master running as PID 1 can reap every *other* zombie re-parented to it without
//! stealing an exit status tokio's `Child::wait` is waiting for.
//!
//! Spawning and reaping take the same lock: a child that dies between `fork` and being
//! recorded cannot be reaped by mistake, because the reaper cannot look until it is recorded.

use std::collections::BTreeSet;
use std::io;
use std::sync::{Mutex, MutexGuard};

use tokio::process::{Child, Command};

static TRACKED: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

fn tracked() -> MutexGuard<'static, BTreeSet<u32>> {
    TRACKED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Spawns `cmd` and records its pid as one the master waits for itself.
pub(crate) fn spawn(cmd: &mut Command) -> io::Result<Child> {
    let mut tracked = tracked();
    let child = cmd.spawn()?;
    if let Some(pid) = child.id() {
        tracked.insert(pid);
    }
    Ok(child)
}

/// The master has waited for `pid` (or dropped it to tokio's own orphan reaping).
pub(crate) fn forget(pid: u32) {
    tracked().remove(&pid);
}

/// Runs `reap` with the set of pids the master waits for itself, holding the lock so that no
/// spawn can add one meanwhile.
pub fn with_tracked<R>(reap: impl FnOnce(&BTreeSet<u32>) -> R) -> R {
    reap(&tracked())
}
