//! Every default of `balancer.toml`, in one place, so `show` and the docs can quote them.
//!
//! Where PM2 has a default we keep its meaning but not always its value: PM2's 1.6 s
//! `kill_timeout` and 3 s `listen_timeout` are too short for servers that drain.

use std::time::Duration;

use crate::model::{Balance, Check, Health, Signal};

/// `instances`: one worker.
pub const INSTANCES: u32 = 1;
/// The most workers one app may have: far more than any machine has cores, and few enough that
/// a typo (`instances = 1000000`) cannot exhaust memory, pids and file descriptors.
pub const MAX_INSTANCES: u32 = 1024;
/// The longest app name: it becomes part of log file names, which must stay well under the
/// file system's 255-byte limit.
pub const MAX_NAME_LEN: usize = 64;
/// The longest single argument or environment value the kernel passes to a program
/// (`MAX_ARG_STRLEN`, 32 pages): a longer one fails at spawn with E2BIG.
pub const MAX_ARG_LEN: usize = 128 * 1024;
/// The most bytes of arguments plus environment an app may pass, well under the kernel's
/// `ARG_MAX` share of the stack, so a spawn never fails with E2BIG.
pub const MAX_ARGS_TOTAL: usize = 1024 * 1024;
/// Environment variables the worker contract or the loader sets, which a listener's
/// `port_env` must not take over.
pub const RESERVED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "SHELL",
    "PWD",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "BALANCER_APP",
    "BALANCER_INSTANCE",
    "BALANCER_HOME",
    "NODE_APP_INSTANCE",
];
/// `health.check`: a TCP connect to the worker's first private port.
pub const HEALTH_CHECK: Check = Check::Tcp;
/// `health.path` when `check = "http"`.
pub const HEALTH_PATH: &str = "/";
/// `health.interval`.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// `health.timeout`.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// `health.rise`: one success makes a worker ready.
pub const HEALTH_RISE: u32 = 1;
/// `health.fall`: two failures in a row take it out of the pool.
pub const HEALTH_FALL: u32 = 2;
/// `kill_signal`.
pub const KILL_SIGNAL: Signal = Signal::SIGTERM;
/// `kill_timeout`: from `kill_signal` to SIGKILL.
pub const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// `drain_timeout`.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// `listen_timeout`: how long a new worker has to become ready.
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(8);
/// `queue_timeout`: how long a connection waits for a ready worker.
pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(10);
/// `connect_timeout`: master to worker.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// `autorestart`.
pub const AUTORESTART: bool = true;
/// `max_flows`: UDP flows (client addresses) tracked per listener before the oldest idle one
/// is evicted.
pub const MAX_FLOWS: u32 = 4096;
/// `udp_idle_timeout`: a UDP flow with no datagram either way for this long is forgotten.
pub const UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// `http_header_timeout`: time a client has to send a request's headers (slowloris).
pub const HTTP_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// `http_max_header_size`: the largest request head accepted.
pub const HTTP_MAX_HEADER_SIZE: usize = 64 * 1024;
/// `http_idle_timeout`: an idle keep-alive client connection is closed after this long.
pub const HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// `balance`: round robin, the only algorithm that needs no per-connection scan.
pub const BALANCE: Balance = Balance::RoundRobin;
/// `max_conns`: no per-worker limit.
pub const MAX_CONNS: Option<u32> = None;
/// `reload_batch`: workers replaced at a time by a reload.
pub const RELOAD_BATCH: u32 = 1;
/// `max_restarts`: unstable exits in a row before `errored` (PM2's value).
pub const MAX_RESTARTS: u32 = 16;
/// `min_uptime`: shorter runs are unstable (PM2's value).
pub const MIN_UPTIME: Duration = Duration::from_secs(1);
/// `restart_delay`.
pub const RESTART_DELAY: Duration = Duration::ZERO;
/// `exp_backoff_restart_delay`: on by default, unlike PM2, so a crash loop never spins.
pub const EXP_BACKOFF_RESTART_DELAY: Option<Duration> = Some(Duration::from_millis(100));
/// `[balancer] sample_interval`: CPU and memory of every worker, once a second (PM2's `monit`
/// refreshes as often).
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// `max_memory_restart`: no limit.
pub const MAX_MEMORY_RESTART: Option<u64> = None;
/// `watch_delay`: a change reloads once nothing more has changed for a second. PM2's default
/// is 0, but a reload starts new workers: a `git pull` or an editor's save writes several
/// files, and reloading at the first one would start workers on half a deploy.
pub const WATCH_DELAY: Duration = Duration::from_secs(1);
/// What `watch` always ignores, on top of `ignore_watch` (PM2's default `/[\/\\]\.|node_modules/`):
/// dependency trees and dot-entries (`.git`, editors' swap files) change without the app's
/// code changing, and `node_modules` alone can hold more directories than inotify may watch.
pub const WATCH_IGNORE: &[&str] = &["node_modules", ".*"];

/// The env var of the first listener's private port; later ones get `PORT_1`, `PORT_2`, …
pub const PORT_ENV: &str = "PORT";

/// The env var of listener number `index` (0-based) when it does not name one.
pub fn port_env(index: usize) -> String {
    if index == 0 {
        PORT_ENV.to_owned()
    } else {
        format!("{PORT_ENV}_{index}")
    }
}

impl Default for Health {
    fn default() -> Self {
        Health {
            check: HEALTH_CHECK,
            interval: HEALTH_INTERVAL,
            timeout: HEALTH_TIMEOUT,
            rise: HEALTH_RISE,
            fall: HEALTH_FALL,
        }
    }
}

/// The interpreter PM2 would pick for a script by its extension; `None` runs the script itself.
pub const INTERPRETERS: &[(&str, &str)] = &[
    ("js", "node"),
    ("mjs", "node"),
    ("cjs", "node"),
    ("py", "python3"),
    ("sh", "bash"),
    ("rb", "ruby"),
];

/// The interpreter for `script`, inferred from its extension like PM2 does.
pub fn interpreter_for(script: &std::path::Path) -> Option<&'static str> {
    let ext = script.extension()?.to_str()?;
    INTERPRETERS
        .iter()
        .find(|(e, _)| *e == ext)
        .map(|(_, interpreter)| *interpreter)
}

/// `log_date_format` when `time = true` names none: RFC 3339 with milliseconds, local time.
pub const LOG_DATE_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.3f%:z";
/// `log_retain`: rotated files kept per log file (with `log_max_size`).
pub const LOG_RETAIN: u32 = 5;
/// The smallest `log_max_size`: below it the master would rotate (and compress) all the time.
pub const LOG_MIN_SIZE: u64 = 64 * 1024;
