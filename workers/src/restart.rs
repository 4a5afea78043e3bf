//! The restart policy: PM2's rules (autorestart, `max_restarts`, `min_uptime`, `restart_delay`,
//! exponential backoff), made stricter, and the wait between an exit and the next start.
//!
//! The timing lives here, apart from the slot task, so it can be tested on tokio's paused clock:
//! real processes and auto-advancing time do not mix.

use std::future::Future;
use std::time::Duration;

use balancer_config::App;

/// Backoff grows by this factor after each restart…
pub const BACKOFF_FACTOR: f64 = 1.5;
/// …up to this delay…
pub const BACKOFF_CAP: Duration = Duration::from_secs(15);
/// …and starts over once a worker has stayed up this long.
pub const BACKOFF_RESET: Duration = Duration::from_secs(30);

/// PM2's restart rules, made stricter: every run shorter than `min_uptime` counts, wherever it
/// happens (PM2 only counts those inside a 16 s window), and `max_restarts` of them in a row end
/// in `errored`.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    autorestart: bool,
    max_restarts: u32,
    min_uptime: Duration,
    restart_delay: Duration,
    backoff_base: Option<Duration>,
    /// Consecutive unstable exits.
    unstable: u32,
    /// The previous backoff delay (zero when none is running).
    backoff: Duration,
}

impl RestartPolicy {
    /// The policy of `app`, with no exit recorded yet.
    pub fn new(app: &App) -> Self {
        RestartPolicy {
            autorestart: app.autorestart,
            max_restarts: app.max_restarts,
            min_uptime: app.min_uptime,
            restart_delay: app.restart_delay,
            backoff_base: app.exp_backoff_restart_delay,
            unstable: 0,
            backoff: Duration::ZERO,
        }
    }

    /// Consecutive unstable exits so far, for the `errored` reason.
    pub fn unstable(&self) -> u32 {
        self.unstable
    }

    /// Records an exit after `uptime`; returns the delay before the next start, or `None` when
    /// the worker must stay down.
    pub fn after_exit(&mut self, uptime: Duration) -> Option<Duration> {
        if uptime < self.min_uptime {
            self.unstable += 1;
        } else {
            self.unstable = 0;
        }
        if uptime >= BACKOFF_RESET {
            self.backoff = Duration::ZERO;
        }
        if !self.autorestart || (self.unstable > 0 && self.unstable >= self.max_restarts) {
            return None;
        }
        let backoff = match self.backoff_base {
            None => Duration::ZERO,
            Some(base) if self.backoff.is_zero() => base,
            Some(_) => self.backoff.mul_f64(BACKOFF_FACTOR).min(BACKOFF_CAP),
        };
        self.backoff = backoff;
        Some(self.restart_delay.max(backoff))
    }
}

/// Waits out a restart delay unless `stop` resolves first; returns whether the delay ran out
/// (so the worker should start again).
pub async fn wait_restart(delay: Duration, stop: impl Future<Output = ()>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = stop => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    fn policy(max_restarts: u32, base: Option<u64>) -> RestartPolicy {
        RestartPolicy {
            autorestart: true,
            max_restarts,
            min_uptime: Duration::from_secs(1),
            restart_delay: Duration::ZERO,
            backoff_base: base.map(Duration::from_millis),
            unstable: 0,
            backoff: Duration::ZERO,
        }
    }

    #[test]
    fn unstable_exits_in_a_row_end_in_errored() {
        let mut p = policy(3, None);
        let quick = Duration::from_millis(10);
        assert!(p.after_exit(quick).is_some());
        assert!(p.after_exit(quick).is_some());
        assert!(
            p.after_exit(quick).is_none(),
            "third unstable exit: errored"
        );
    }

    #[test]
    fn a_stable_run_resets_the_streak_at_any_time() {
        let mut p = policy(2, None);
        assert!(p.after_exit(Duration::from_millis(10)).is_some());
        assert!(p.after_exit(Duration::from_secs(5)).is_some(), "stable run");
        assert!(p.after_exit(Duration::from_millis(10)).is_some());
        assert!(p.after_exit(Duration::from_millis(10)).is_none());
    }

    #[test]
    fn backoff_grows_by_half_caps_and_resets_after_30s_up() {
        let mut p = policy(1000, Some(100));
        let quick = Duration::from_millis(10);
        let delays: Vec<_> = (0..4)
            .map(|_| p.after_exit(quick).unwrap().as_millis())
            .collect();
        assert_eq!(delays, [100, 150, 225, 337]);
        for _ in 0..20 {
            p.after_exit(quick);
        }
        assert_eq!(p.after_exit(quick), Some(BACKOFF_CAP));
        assert_eq!(
            p.after_exit(Duration::from_secs(31)),
            Some(Duration::from_millis(100)),
            "30 s up resets the backoff"
        );
    }

    #[test]
    fn autorestart_off_never_restarts() {
        let mut p = policy(16, None);
        p.autorestart = false;
        assert!(p.after_exit(Duration::from_secs(100)).is_none());
    }

    /// A crash loop on the virtual clock: each worker "runs" 10 ms, then the slot waits. The
    /// waits grow ×1.5 from 100 ms and stop at 15 s; a 30 s run starts them over.
    #[tokio::test(start_paused = true)]
    async fn restart_waits_follow_the_backoff_on_the_clock() {
        let mut p = policy(1000, Some(100));
        let mut delays = Vec::new();
        for _ in 0..15 {
            let started = Instant::now();
            tokio::time::sleep(Duration::from_millis(10)).await;
            let delay = p.after_exit(started.elapsed()).expect("restarts");
            let exited = Instant::now();
            assert!(wait_restart(delay, std::future::pending()).await);
            // The timer wheel counts whole milliseconds: 337.5 ms is waited as 338.
            let waited = exited.elapsed();
            assert!(
                waited >= delay && waited <= delay + Duration::from_millis(1),
                "waited {waited:?} for {delay:?}"
            );
            delays.push(delay);
        }
        let ms = |d: &Duration| d.as_millis();
        assert_eq!(
            delays[..4].iter().map(ms).collect::<Vec<_>>(),
            [100, 150, 225, 337]
        );
        for pair in delays.windows(2) {
            assert!(
                pair[1] >= pair[0],
                "never shrinks in a crash loop: {delays:?}"
            );
        }
        assert_eq!(*delays.last().unwrap(), BACKOFF_CAP, "capped: {delays:?}");

        // A run of 30 s (on the same clock) resets it.
        let started = Instant::now();
        tokio::time::sleep(BACKOFF_RESET).await;
        let delay = p.after_exit(started.elapsed()).expect("restarts");
        let exited = Instant::now();
        assert!(wait_restart(delay, std::future::pending()).await);
        assert_eq!(exited.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_cuts_the_restart_wait_short() {
        let start = Instant::now();
        let stop = tokio::time::sleep(Duration::from_secs(2));
        assert!(
            !wait_restart(BACKOFF_CAP, stop).await,
            "stopped, not restarted"
        );
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }
}
