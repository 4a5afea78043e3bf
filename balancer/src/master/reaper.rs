//! Zombie reaping for a master that runs as PID 1 (in a container, as `tini` or
//! `pm2-runtime` would): every process re-parented to it — a worker whose shim was killed,
//! anything a shim's sweep left behind, or a process that reached PID 1 some other way — is
//! reaped, except the shims the master spawned itself, whose exit statuses tokio's
//! `Child::wait` is waiting for (they are listed in `balancer_workers::children`).
//!
//! `waitpid(-1)` cannot be told to skip some children, so the reaper lists the zombies whose
//! parent is this process from `/proc` and reaps each untracked one by pid, on every SIGCHLD
//! and every few seconds (a SIGCHLD that tokio consumed first is not lost: signals coalesce,
//! and the tick catches whatever slipped through).

use std::time::Duration;

use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;

/// The tick that catches zombies whose SIGCHLD was coalesced with one tokio handled.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// Starts the reaper when this process is PID 1 (of its PID namespace); `None` otherwise,
/// where orphans go to the real init and the master has nothing to reap.
pub(super) fn spawn_if_init() -> Option<JoinHandle<()>> {
    if std::process::id() != 1 {
        return None;
    }
    let mut chld = match signal(SignalKind::child()) {
        Ok(chld) => chld,
        Err(e) => {
            tracing::warn!("running as PID 1 but cannot watch SIGCHLD: {e}; zombies may pile up");
            return None;
        }
    };
    tracing::info!("running as PID 1: reaping orphaned processes");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                _ = chld.recv() => {}
                _ = tick.tick() => {}
            }
            let reaped = tokio::task::spawn_blocking(reap_untracked)
                .await
                .unwrap_or(0);
            if reaped > 0 {
                tracing::debug!(reaped, "reaped orphaned processes");
            }
        }
    }))
}

/// Reaps every zombie child of this process that the master does not wait for itself;
/// returns how many.
fn reap_untracked() -> usize {
    let me = std::process::id();
    let zombies = zombie_children(me);
    balancer_workers::children::with_tracked(|tracked| {
        zombies
            .into_iter()
            .filter(|pid| !tracked.contains(pid))
            .filter(|&pid| {
                // WNOHANG: a pid that is not (or no longer) our zombie is simply skipped.
                waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG))
                    .is_ok_and(|s| s.pid().is_some())
            })
            .count()
    })
}

/// The pids of `/proc` entries in state `Z` whose parent is `parent`.
fn zombie_children(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| parse_state_ppid(&stat))
                .is_some_and(|(state, ppid)| state == 'Z' && ppid == parent)
        })
        .collect()
}

/// `(state, ppid)` from a `/proc/PID/stat` line; the command name in parentheses may hold
/// spaces and parentheses itself, so the fields are read after its last `)`.
fn parse_state_ppid(stat: &str) -> Option<(char, u32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_follow_the_last_parenthesis() {
        assert_eq!(
            parse_state_ppid("42 (a) b (c)) Z 1 42 42 0 -1"),
            Some(('Z', 1))
        );
        assert_eq!(parse_state_ppid("7 (sleep) S 3 7 7"), Some(('S', 3)));
        assert_eq!(parse_state_ppid("garbage"), None);
    }
}
