//! The admin protocol: newline-delimited JSON over `$BALANCER_HOME/admin.sock`, shared by the
//! master's server and the CLI's client.
//!
//! One request object per line, `{"cmd":"scale","app":"web","to":"+2"}`; one reply object per
//! line, `{"ok":true,…}` or `{"ok":false,"error":"…"}`. `logs` with `follow` streams replies
//! (one per log line) and `subscribe` one [`Snapshot`] per interval (`monit`), each until the
//! client sends another line or hangs up. The CLI is only a client of this; any language
//! can script it with a unix socket and a JSON library. The README documents every command.
//!
//! [`Request`] and [`Reply`] are typed: one variant per mode, so a request that says two things
//! at once (a `start` with both a `file` and a `target`) cannot be built, only refused while
//! decoding. The wire shape is the flat objects of [`wire`], converted on both sides
//! (`serde(try_from, into)`), so the JSON stays what the README documents.

use std::path::PathBuf;

use balancer_config::{LoadOptions, Policy};
use serde::{Deserialize, Serialize};

/// The longest request line the master reads; longer ones get an error and the connection is
/// closed.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// How many past lines per log file `logs` sends when the request does not say.
pub const DEFAULT_LOG_LINES: usize = 15;

/// A subscription's `interval_ms` when the request does not say.
pub const DEFAULT_SUBSCRIBE_INTERVAL_MS: u64 = 1000;

/// The `interval_ms` a subscription may ask for: faster than 100 ms would cost the master
/// more than a dashboard is worth; slower than a minute is not live.
pub const SUBSCRIBE_INTERVAL_MS: std::ops::RangeInclusive<u64> = 100..=60_000;

/// One request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "wire::Request", into = "wire::Request")]
pub enum Request {
    /// Is a master there? Replies with its pid, version and load options.
    Ping,
    /// Every worker of every app (`ls`, `jlist`).
    List,
    /// One app (by name) or worker (by id) in detail.
    Show {
        /// App name or worker id.
        target: String,
    },
    /// Start apps.
    Start(Start),
    /// Drain and stop (the app stays listed; its listeners keep holding connections).
    Stop {
        /// App name, worker id or `all`.
        target: String,
    },
    /// Stop, then start (may drop connections, as in PM2).
    Restart {
        /// App name, worker id or `all`.
        target: String,
    },
    /// Zero-downtime replacement of workers, or a changed balancer.toml applied.
    Reload(Reload),
    /// Stop and forget (its listeners close).
    Delete {
        /// App name, worker id or `all`.
        target: String,
    },
    /// Change an app's worker count.
    Scale {
        /// App name.
        app: String,
        /// The new count.
        to: ScaleTo,
    },
    /// Log lines: the last `lines` of each file, then (with `follow`) new ones as they come.
    Logs {
        /// Only this app (or worker id).
        target: Option<String>,
        /// How many past lines per file.
        lines: usize,
        /// Keep streaming.
        follow: bool,
    },
    /// Empty the log files (of one app or worker id, or all).
    Flush {
        /// Only this app (or worker id).
        target: Option<String>,
    },
    /// Stop every app, then the master itself.
    Kill,
    /// Write every app, its worker count and whether it is stopped to
    /// `$BALANCER_HOME/dump.json` (`save`), for `resurrect`.
    Save,
    /// Start again what `dump.json` holds (`resurrect`): its apps not running yet, each at
    /// its saved worker count, stopped if it was.
    Resurrect,
    /// Set the restart counters back to zero (`reset`).
    Reset {
        /// App name, worker id or `all`.
        target: String,
    },
    /// Send a signal to workers' processes (`send-signal`), e.g. `SIGUSR2` to reopen logs.
    Signal {
        /// App name, worker id or `all`.
        target: String,
        /// `SIGUSR2`, `USR2` or `usr2`.
        signal: String,
    },
    /// Stream a [`Reply::Snapshot`] every `interval_ms` (`monit`) until the client sends
    /// another line or hangs up: a dashboard's one connection, instead of `list` in a loop.
    Subscribe {
        /// Milliseconds between snapshots, within [`SUBSCRIBE_INTERVAL_MS`].
        interval_ms: u64,
        /// Also carry the new log lines of this app (or worker id) in each snapshot.
        logs: Option<String>,
    },
    /// Replace the master's binary without dropping a connection (`upgrade`): a new master
    /// takes the listeners and the apps over. Progress replies stream before the final one.
    Upgrade {
        /// The new binary (absolute); default: the path the master was started from.
        binary: Option<PathBuf>,
        /// How long the new master has to take over before it is killed and the upgrade fails
        /// (milliseconds); default [`UPGRADE_TIMEOUT_MS`].
        timeout_ms: Option<u64>,
    },
}

/// How long `upgrade` waits for the new master to take over when the request does not say.
pub const UPGRADE_TIMEOUT_MS: u64 = 60_000;

/// How a balancer.toml is read: the `--env` selection, and the default policy the client
/// checked it with (so client and master read one file the same way).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Load {
    /// `--env NAME`: which `env_<NAME>` table goes over `env`.
    pub env: Option<String>,
    /// The policy of apps that name none; `None`: the master's own default.
    pub policy: Option<Policy>,
}

impl Load {
    /// The one place the binary builds [`LoadOptions`]: this process's (CPUs, and the default
    /// policy from `BALANCER_SCHED_POLICY`) under `--env`, overridden by the running master's
    /// policy and CPU count when there is one (from its [`Pong`]), so that the CLI checks a file
    /// exactly as the master will read it. Also returns the `Load` to send along, which makes
    /// the master read it that way.
    pub fn options(env: Option<String>, master: Option<&Pong>) -> (LoadOptions, Load) {
        let mut opts = LoadOptions {
            env,
            ..LoadOptions::from_env()
        };
        if let Some(pong) = master {
            opts.default_policy = pong.policy.unwrap_or(opts.default_policy);
            opts.cpus = pong.cpus.unwrap_or(opts.cpus);
        }
        let load = Load {
            env: opts.env.clone(),
            policy: Some(opts.default_policy),
        };
        (opts, load)
    }

    /// How the master reads a file sent with this `Load`: its own options (`base`) under this
    /// `--env` and, when given, this default policy.
    pub fn apply_to(&self, base: &LoadOptions) -> LoadOptions {
        LoadOptions {
            env: self.env.clone(),
            default_policy: self.policy.unwrap_or(base.default_policy),
            cpus: base.cpus,
        }
    }
}

/// What `start` starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// The apps of a balancer.toml (absolute path).
    File {
        /// The file.
        file: PathBuf,
        /// How to read it.
        load: Load,
    },
    /// The app of an inline balancer.toml built by the CLI for `balancer start server.js …`.
    Toml {
        /// balancer.toml text.
        toml: String,
        /// The directory its relative paths are relative to (default: the master's home).
        cwd: Option<PathBuf>,
        /// How to read it.
        load: Load,
        /// `-f`: replace a running app of the same name (PM2's "add -f to force
        /// re-execution"); without it, a name already in use is refused.
        force: bool,
    },
    /// Stopped apps or workers, again: an app name, a worker id or `all`.
    Stopped {
        /// What to start.
        target: String,
    },
}

/// What `reload` reloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// Workers: an app name, a worker id or `all`.
    Target {
        /// What to reload.
        target: String,
        /// Stream a [`Reply::Progress`] line after each batch before the final reply.
        progress: bool,
    },
    /// The changes of a balancer.toml (absolute path).
    File {
        /// The file.
        file: PathBuf,
        /// How to read it.
        load: Load,
    },
}

/// `scale`'s count: `N`, `+N`, `-N` or `max` (one per CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleTo {
    /// Exactly this many.
    Exactly(u32),
    /// This many more.
    Up(u32),
    /// This many fewer.
    Down(u32),
    /// One per CPU.
    Max,
}

impl ScaleTo {
    /// The new count from the current one and the CPU count; an error when it would go below
    /// zero or past `u32`.
    pub fn resolve(self, current: u32, cpus: u32) -> Result<u32, String> {
        match self {
            ScaleTo::Exactly(n) => Ok(n),
            ScaleTo::Max => Ok(cpus),
            ScaleTo::Up(n) => current
                .checked_add(n)
                .ok_or_else(|| format!("cannot scale to {current} + {n} workers")),
            ScaleTo::Down(n) => current.checked_sub(n).ok_or_else(|| {
                format!(
                    "cannot scale to {} workers",
                    i64::from(current) - i64::from(n)
                )
            }),
        }
    }
}

impl std::str::FromStr for ScaleTo {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("bad worker count {s:?}: expected N, +N, -N or max");
        let number = |digits: &str| {
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            digits.parse::<u32>().map_err(|_| bad())
        };
        if s == "max" {
            Ok(ScaleTo::Max)
        } else if let Some(n) = s.strip_prefix('+') {
            number(n).map(ScaleTo::Up)
        } else if let Some(n) = s.strip_prefix('-') {
            number(n).map(ScaleTo::Down)
        } else {
            number(s).map(ScaleTo::Exactly)
        }
    }
}

impl std::fmt::Display for ScaleTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScaleTo::Exactly(n) => write!(f, "{n}"),
            ScaleTo::Up(n) => write!(f, "+{n}"),
            ScaleTo::Down(n) => write!(f, "-{n}"),
            ScaleTo::Max => f.write_str("max"),
        }
    }
}

/// One reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "wire::Reply", into = "wire::Reply")]
pub enum Reply {
    /// `ping`: who the master is.
    Pong(Pong),
    /// `list`: every worker.
    Workers(Vec<WorkerInfo>),
    /// `show`: one app.
    App(Box<AppInfo>),
    /// An operation was carried out.
    Done {
        /// What was done, in words.
        message: String,
        /// The workers it touched, when it says.
        workers: Vec<WorkerInfo>,
    },
    /// `logs`: one line.
    Log(LogLine),
    /// `logs` without `follow`: the last reply.
    End,
    /// `reload` with `progress`: how far it is, before the final reply.
    Progress(String),
    /// `subscribe`: one frame of the stream.
    Snapshot(Box<Snapshot>),
    /// The request failed.
    Failed {
        /// Why, in words.
        error: String,
        /// The exit code the CLI uses (1 failed, 2 bad request or config).
        code: u8,
    },
}

impl Reply {
    /// A success that says what it did.
    pub fn done(message: impl Into<String>) -> Self {
        Reply::Done {
            message: message.into(),
            workers: Vec::new(),
        }
    }
}

/// What `ping` tells about the master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pong {
    /// Its pid.
    pub pid: u32,
    /// Its version.
    pub version: Option<String>,
    /// The policy it gives apps that name none (`BALANCER_SCHED_POLICY` in its environment).
    pub policy: Option<Policy>,
    /// The CPUs it counts (`instances = "max"`).
    pub cpus: Option<u32>,
}

/// One worker, as `ls` and `jlist` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Worker id (stable across restarts and reloads of the same slot).
    pub id: u32,
    /// App name.
    pub app: String,
    /// `BALANCER_INSTANCE`.
    pub instance: u32,
    /// Process id, when running.
    pub pid: Option<u32>,
    /// `rr` or `reuseport`.
    pub policy: String,
    /// starting, ready, unhealthy, draining, stopping, stopped, errored, waiting-restart.
    pub status: String,
    /// Restarts (crash restarts and reloads).
    pub restarts: u32,
    /// Milliseconds since the current process started.
    pub uptime_ms: Option<u64>,
    /// Connections proxied to it right now.
    pub connections: usize,
    /// The app's public listeners.
    pub listeners: Vec<String>,
    /// The worker's private addresses.
    pub private: Vec<String>,
    /// How the previous process ended.
    pub last_exit: Option<String>,
    /// Why it is errored/unhealthy/restarting.
    pub reason: Option<String>,
    /// CPU of its whole process tree over the last `sample_interval`, in percent of one core
    /// (null when not running or not sampled yet).
    #[serde(default)]
    pub cpu: Option<f64>,
    /// Resident memory of its whole process tree, in bytes (null likewise).
    #[serde(default)]
    pub memory: Option<u64>,
    /// CPU seconds its tree has used since the process started (a counter).
    #[serde(default)]
    pub cpu_seconds: Option<f64>,
    /// Processes in its tree, itself included.
    #[serde(default)]
    pub processes: Option<u32>,
    /// Lowest, mean and highest CPU and memory since the process started.
    #[serde(default)]
    pub history: Option<UsageHistory>,
    /// `restarts`, by reason.
    #[serde(default)]
    pub restarts_by: RestartsBy,
    /// The last restart's reason and cause (`memory: tree RSS … over max_memory_restart …`).
    #[serde(default)]
    pub last_restart: Option<String>,
}

/// A worker's CPU and memory since its process started (`show`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct UsageHistory {
    /// Samples taken.
    pub samples: u64,
    /// Lowest CPU % over one `sample_interval`.
    pub cpu_min: f64,
    /// CPU % over the whole life (CPU seconds / uptime).
    pub cpu_avg: f64,
    /// Highest CPU % over one `sample_interval`.
    pub cpu_max: f64,
    /// Lowest sampled tree memory, bytes.
    pub memory_min: u64,
    /// Mean sampled tree memory, bytes.
    pub memory_avg: u64,
    /// Highest sampled tree memory, bytes.
    pub memory_max: u64,
}

/// Restarts of one worker by reason; they add up to `restarts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RestartsBy {
    /// It exited by itself, or never became ready, and was restarted.
    pub crash: u32,
    /// Its tree stayed over `max_memory_restart`: replaced as a reload replaces.
    pub memory: u32,
    /// `reload` replaced it.
    pub reload: u32,
    /// `restart` restarted it.
    pub restart: u32,
    /// A watched file changed: replaced as a reload replaces.
    #[serde(default)]
    pub watch: u32,
    /// `cron_restart` came due: replaced as a reload replaces.
    #[serde(default)]
    pub cron: u32,
}

/// One app in detail (`show`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppInfo {
    /// App name.
    pub name: String,
    /// The whole resolved configuration, every default applied.
    pub config: serde_json::Value,
    /// Log files, per instance: `[instance, out, err]`.
    pub logs: Vec<(u32, PathBuf, PathBuf)>,
    /// Its workers.
    pub workers: Vec<WorkerInfo>,
    /// Its queue of connections waiting for a worker (none ready, or all at `max_conns`).
    #[serde(default)]
    pub queue: QueueInfo,
    /// `watch`, when the app has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<WatchInfo>,
    /// `cron_restart`, when the app has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<CronInfo>,
}

/// An app's `watch` in `show`: what is watched and whether all of it could be.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WatchInfo {
    /// Watching now (false while every worker is stopped).
    pub active: bool,
    /// The watched paths.
    pub paths: Vec<PathBuf>,
    /// Every ignore pattern in force, the defaults first.
    pub ignore: Vec<String>,
    /// `watch_delay`, in milliseconds.
    pub delay_ms: u64,
    /// Directories with an inotify watch (null while the tree is being walked).
    pub directories: Option<usize>,
    /// How long walking the tree and adding the watches took, in milliseconds.
    pub setup_ms: Option<u64>,
    /// Directories left unwatched by the inotify limit (the first few).
    #[serde(default)]
    pub unwatched: Vec<PathBuf>,
    /// How many are unwatched in all.
    #[serde(default)]
    pub unwatched_count: usize,
    /// What went wrong and what to do about it.
    pub warning: Option<String>,
}

/// An app's `cron_restart` in `show`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CronInfo {
    /// As written.
    pub pattern: String,
    /// Following its schedule now (false while every worker is stopped).
    pub active: bool,
    /// The next reload, RFC 3339 in the machine's local time.
    pub next: Option<String>,
}

/// An app's queue in `show`: HAProxy's `qcur`/`qtime`, as counts and milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueInfo {
    /// Connections (requests, on `http://`) waiting now.
    pub waiting: usize,
    /// Connections that ever had to wait.
    pub queued: u64,
    /// Their mean wait, in milliseconds.
    pub wait_mean_ms: u64,
    /// The longest wait, in milliseconds.
    pub wait_max_ms: u64,
}

/// One frame of a subscription: every app with its workers, and the followed app's new log
/// lines. Counters are totals, so a client that misses a frame loses no traffic: it divides
/// the next delta by the `elapsed_ms` between the two.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// Milliseconds since the subscription began (monotonic): the clock of the rates.
    pub elapsed_ms: u64,
    /// Every app, in start order.
    pub apps: Vec<AppSnapshot>,
    /// New lines of the `logs` app since the previous frame (the first frame: its last few).
    #[serde(default)]
    pub logs: Vec<LogLine>,
    /// Lines left out of `logs` since the previous frame, over the per-frame cap.
    #[serde(default)]
    pub logs_dropped: u64,
}

/// One app in a [`Snapshot`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppSnapshot {
    /// App name.
    pub name: String,
    /// The worker count it is scaled to.
    pub instances: u32,
    /// `rr` or `reuseport`.
    pub policy: String,
    /// `round_robin`, `least_conn`, `p2c` or `source`.
    pub balance: String,
    /// Its public listeners.
    pub listeners: Vec<String>,
    /// The whole resolved configuration, as `show` gives it.
    pub config: serde_json::Value,
    /// Its workers.
    pub workers: Vec<WorkerSnapshot>,
}

/// One worker in a [`Snapshot`]: its `list` row and the data plane's counters of its current
/// process (they start from 0 when the process is replaced).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerSnapshot {
    /// What `list` gives.
    #[serde(flatten)]
    pub info: WorkerInfo,
    /// Connections (requests, on `http://`) given to this process so far.
    pub connections_total: u64,
    /// Bytes proxied to and from this process over TCP, counted when each connection ends.
    pub bytes_total: u64,
}

/// One line of a worker's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// App name.
    pub app: String,
    /// Instance number.
    pub instance: u32,
    /// `out` or `err`.
    pub stream: String,
    /// The line, without its newline.
    pub line: String,
}

/// The flat JSON objects on the socket, as the README documents them. Only this module and
/// serde see them: both ends speak [`Request`] and [`Reply`].
pub mod wire {
    use std::path::PathBuf;

    use balancer_config::Policy;
    use serde::{Deserialize, Serialize};

    use super::{
        AppInfo, DEFAULT_LOG_LINES, DEFAULT_SUBSCRIBE_INTERVAL_MS, Load, LogLine, Pong,
        SUBSCRIBE_INTERVAL_MS, Snapshot, WorkerInfo,
    };

    /// A request as sent.
    // Empty struct variants rather than unit ones: serde ignores `deny_unknown_fields` on unit
    // variants of an internally tagged enum, and `{"cmd":"ping","x":1}` must be an error.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
    #[allow(missing_docs)]
    pub enum Request {
        Ping {},
        List {},
        Show {
            target: String,
        },
        Start {
            #[serde(default, skip_serializing_if = "Option::is_none")]
            file: Option<PathBuf>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            env: Option<String>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            policy: Option<String>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            toml: Option<String>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            cwd: Option<PathBuf>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            target: Option<String>,
            #[serde(default, skip_serializing_if = "std::ops::Not::not")]
            force: bool,
        },
        Stop {
            target: String,
        },
        Restart {
            target: String,
        },
        Reload {
            #[serde(default, skip_serializing_if = "Option::is_none")]
            target: Option<String>,
            #[serde(default, skip_serializing_if = "std::ops::Not::not")]
            progress: bool,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            file: Option<PathBuf>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            env: Option<String>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            policy: Option<String>,
        },
        Delete {
            target: String,
        },
        Scale {
            app: String,
            to: String,
        },
        Logs {
            #[serde(default, skip_serializing_if = "Option::is_none")]
            target: Option<String>,
            #[serde(default = "default_lines")]
            lines: usize,
            #[serde(default)]
            follow: bool,
        },
        Flush {
            #[serde(default, skip_serializing_if = "Option::is_none")]
            target: Option<String>,
        },
        Kill {},
        Save {},
        Resurrect {},
        Reset {
            target: String,
        },
        SendSignal {
            target: String,
            signal: String,
        },
        Subscribe {
            #[serde(default = "default_interval")]
            interval_ms: u64,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            logs: Option<String>,
        },
        Upgrade {
            #[serde(default, skip_serializing_if = "Option::is_none")]
            binary: Option<PathBuf>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            timeout_ms: Option<u64>,
        },
    }

    fn default_lines() -> usize {
        DEFAULT_LOG_LINES
    }

    fn default_interval() -> u64 {
        DEFAULT_SUBSCRIBE_INTERVAL_MS
    }

    /// A path the master resolves must not depend on its own working directory.
    fn absolute(field: &str, path: Option<&std::path::Path>) -> Result<(), String> {
        match path {
            Some(path) if !path.is_absolute() => Err(format!(
                "`{field}` must be an absolute path, not {}",
                path.display()
            )),
            _ => Ok(()),
        }
    }

    fn parse_policy(text: &str) -> Result<Policy, String> {
        text.parse()
            .map_err(|_| format!("unknown policy {text:?}: expected rr or reuseport"))
    }

    impl TryFrom<Request> for super::Request {
        type Error = String;

        fn try_from(wire: Request) -> Result<Self, String> {
            use super::{Reload, Start};
            Ok(match wire {
                Request::Ping {} => Self::Ping,
                Request::List {} => Self::List,
                Request::Show { target } => Self::Show { target },
                Request::Start {
                    file,
                    env,
                    policy,
                    toml,
                    cwd,
                    target,
                    force,
                } => {
                    if force && toml.is_none() {
                        return Err("`force` goes with `toml`".into());
                    }
                    let load = Load {
                        env,
                        policy: policy.as_deref().map(parse_policy).transpose()?,
                    };
                    absolute("file", file.as_deref())?;
                    absolute("cwd", cwd.as_deref())?;
                    Self::Start(match (file, toml, target) {
                        (Some(file), None, None) if cwd.is_none() => Start::File { file, load },
                        (None, Some(toml), None) => Start::Toml {
                            toml,
                            cwd,
                            load,
                            force,
                        },
                        (None, None, Some(target)) if load == Load::default() && cwd.is_none() => {
                            Start::Stopped { target }
                        }
                        (None, None, Some(_)) => {
                            return Err(
                                "start of a `target` takes no `env`, `policy` or `cwd`".into()
                            );
                        }
                        (Some(_), None, None) => {
                            return Err("`cwd` goes with `toml`, not `file`".into());
                        }
                        _ => {
                            return Err(
                                "start takes exactly one of `file`, `toml` or `target`".into()
                            );
                        }
                    })
                }
                Request::Stop { target } => Self::Stop { target },
                Request::Restart { target } => Self::Restart { target },
                Request::Reload {
                    target,
                    progress,
                    file,
                    env,
                    policy,
                } => Self::Reload(match (target, file) {
                    (Some(target), None) if env.is_none() && policy.is_none() => {
                        Reload::Target { target, progress }
                    }
                    (None, Some(_)) if progress => {
                        return Err("`progress` goes with `target`".into());
                    }
                    (Some(_), None) => {
                        return Err("`env` and `policy` go with `file`, not `target`".into());
                    }
                    (None, Some(file)) if !file.is_absolute() => {
                        return Err(format!(
                            "`file` must be an absolute path, not {}",
                            file.display()
                        ));
                    }
                    (None, Some(file)) => Reload::File {
                        file,
                        load: Load {
                            env,
                            policy: policy.as_deref().map(parse_policy).transpose()?,
                        },
                    },
                    _ => return Err("reload takes exactly one of `target` or `file`".into()),
                }),
                Request::Delete { target } => Self::Delete { target },
                Request::Scale { app, to } => Self::Scale {
                    app,
                    to: to.parse()?,
                },
                Request::Logs {
                    target,
                    lines,
                    follow,
                } => Self::Logs {
                    target,
                    lines,
                    follow,
                },
                Request::Flush { target } => Self::Flush { target },
                Request::Kill {} => Self::Kill,
                Request::Save {} => Self::Save,
                Request::Resurrect {} => Self::Resurrect,
                Request::Reset { target } => Self::Reset { target },
                Request::SendSignal { target, signal } => Self::Signal { target, signal },
                Request::Subscribe { interval_ms, logs } => {
                    if !SUBSCRIBE_INTERVAL_MS.contains(&interval_ms) {
                        return Err(format!(
                            "`interval_ms` must be between {} and {}, not {interval_ms}",
                            SUBSCRIBE_INTERVAL_MS.start(),
                            SUBSCRIBE_INTERVAL_MS.end()
                        ));
                    }
                    Self::Subscribe { interval_ms, logs }
                }
                Request::Upgrade { binary, timeout_ms } => {
                    absolute("binary", binary.as_deref())?;
                    Self::Upgrade { binary, timeout_ms }
                }
            })
        }
    }

    impl From<super::Request> for Request {
        fn from(request: super::Request) -> Self {
            use super::{Reload, Start};
            match request {
                super::Request::Ping => Request::Ping {},
                super::Request::List => Request::List {},
                super::Request::Show { target } => Request::Show { target },
                super::Request::Start(start) => {
                    let (file, toml, cwd, target, load, force) = match start {
                        Start::File { file, load } => (Some(file), None, None, None, load, false),
                        Start::Toml {
                            toml,
                            cwd,
                            load,
                            force,
                        } => (None, Some(toml), cwd, None, load, force),
                        Start::Stopped { target } => {
                            (None, None, None, Some(target), Load::default(), false)
                        }
                    };
                    Request::Start {
                        file,
                        env: load.env,
                        policy: load.policy.map(|p| p.as_str().to_owned()),
                        toml,
                        cwd,
                        target,
                        force,
                    }
                }
                super::Request::Stop { target } => Request::Stop { target },
                super::Request::Restart { target } => Request::Restart { target },
                super::Request::Reload(Reload::Target { target, progress }) => Request::Reload {
                    target: Some(target),
                    progress,
                    file: None,
                    env: None,
                    policy: None,
                },
                super::Request::Reload(Reload::File { file, load }) => Request::Reload {
                    target: None,
                    progress: false,
                    file: Some(file),
                    env: load.env,
                    policy: load.policy.map(|p| p.as_str().to_owned()),
                },
                super::Request::Delete { target } => Request::Delete { target },
                super::Request::Scale { app, to } => Request::Scale {
                    app,
                    to: to.to_string(),
                },
                super::Request::Logs {
                    target,
                    lines,
                    follow,
                } => Request::Logs {
                    target,
                    lines,
                    follow,
                },
                super::Request::Flush { target } => Request::Flush { target },
                super::Request::Kill => Request::Kill {},
                super::Request::Save => Request::Save {},
                super::Request::Resurrect => Request::Resurrect {},
                super::Request::Reset { target } => Request::Reset { target },
                super::Request::Signal { target, signal } => Request::SendSignal { target, signal },
                super::Request::Subscribe { interval_ms, logs } => {
                    Request::Subscribe { interval_ms, logs }
                }
                super::Request::Upgrade { binary, timeout_ms } => {
                    Request::Upgrade { binary, timeout_ms }
                }
            }
        }
    }

    /// A reply as sent: `ok` always, the rest when it has something to say.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[allow(missing_docs)]
    pub struct Reply {
        pub ok: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub error: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub code: Option<u8>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub message: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub pid: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub version: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub policy: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub cpus: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub workers: Option<Vec<WorkerInfo>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub app: Option<Box<AppInfo>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub log: Option<LogLine>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub done: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub progress: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub snapshot: Option<Box<Snapshot>>,
    }

    impl From<super::Reply> for Reply {
        fn from(reply: super::Reply) -> Self {
            let ok = Reply {
                ok: true,
                ..Reply::default()
            };
            match reply {
                super::Reply::Pong(p) => Reply {
                    pid: Some(p.pid),
                    version: p.version,
                    policy: p.policy.map(|p| p.as_str().to_owned()),
                    cpus: p.cpus,
                    ..ok
                },
                super::Reply::Workers(workers) => Reply {
                    workers: Some(workers),
                    ..ok
                },
                super::Reply::App(app) => Reply {
                    app: Some(app),
                    ..ok
                },
                super::Reply::Done { message, workers } => Reply {
                    message: Some(message),
                    workers: Some(workers).filter(|w| !w.is_empty()),
                    ..ok
                },
                super::Reply::Log(line) => Reply {
                    log: Some(line),
                    ..ok
                },
                super::Reply::End => Reply {
                    done: Some(true),
                    ..ok
                },
                super::Reply::Progress(line) => Reply {
                    progress: Some(line),
                    ..ok
                },
                super::Reply::Snapshot(snapshot) => Reply {
                    snapshot: Some(snapshot),
                    ..ok
                },
                super::Reply::Failed { error, code } => Reply {
                    ok: false,
                    error: Some(error),
                    code: Some(code),
                    ..Reply::default()
                },
            }
        }
    }

    impl TryFrom<Reply> for super::Reply {
        type Error = String;

        /// Reads a reply by what it carries; a master of another version may add fields, which
        /// are ignored, but a success must carry something this client knows.
        fn try_from(wire: Reply) -> Result<Self, String> {
            if !wire.ok {
                return Ok(Self::Failed {
                    error: wire
                        .error
                        .unwrap_or_else(|| "the master refused (no reason given)".into()),
                    // 0 would read as success: a refusal without a usable code is a failure.
                    code: wire.code.filter(|c| *c != 0).unwrap_or(1),
                });
            }
            Ok(if let Some(snapshot) = wire.snapshot {
                Self::Snapshot(snapshot)
            } else if let Some(line) = wire.log {
                Self::Log(line)
            } else if let Some(line) = wire.progress {
                Self::Progress(line)
            } else if wire.done == Some(true) {
                Self::End
            } else if let Some(app) = wire.app {
                Self::App(app)
            } else if let Some(pid) = wire.pid {
                Self::Pong(Pong {
                    pid,
                    version: wire.version,
                    // A policy this client does not know is one it cannot check with.
                    policy: wire.policy.as_deref().and_then(|p| p.parse().ok()),
                    cpus: wire.cpus,
                })
            } else if let Some(message) = wire.message {
                Self::Done {
                    message,
                    workers: wire.workers.unwrap_or_default(),
                }
            } else {
                // `list`, possibly with no worker at all (`{"ok":true}`).
                Self::Workers(wire.workers.unwrap_or_default())
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: &str) -> Result<Request, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn requests_read_as_documented() {
        assert_eq!(
            request(r#"{"cmd":"scale","app":"web","to":"+2"}"#),
            Ok(Request::Scale {
                app: "web".into(),
                to: ScaleTo::Up(2)
            })
        );
        assert_eq!(
            request(r#"{"cmd":"logs","follow":true}"#),
            Ok(Request::Logs {
                target: None,
                lines: 15,
                follow: true
            })
        );
        assert_eq!(
            request(r#"{"cmd":"start","file":"/srv/b.toml","env":"production"}"#),
            Ok(Request::Start(Start::File {
                file: "/srv/b.toml".into(),
                load: Load {
                    env: Some("production".into()),
                    policy: None
                }
            }))
        );
        assert_eq!(
            request(r#"{"cmd":"reload","target":"web"}"#),
            Ok(Request::Reload(Reload::Target {
                target: "web".into(),
                progress: false,
            }))
        );
        assert_eq!(
            request(r#"{"cmd":"reload","target":"all","progress":true}"#),
            Ok(Request::Reload(Reload::Target {
                target: "all".into(),
                progress: true,
            }))
        );
        assert!(request(r#"{"cmd":"reload","file":"/a.toml","progress":true}"#).is_err());
        assert_eq!(
            request(r#"{"cmd":"upgrade"}"#),
            Ok(Request::Upgrade {
                binary: None,
                timeout_ms: None
            })
        );
        assert_eq!(
            request(r#"{"cmd":"upgrade","binary":"/opt/b","timeout_ms":5000}"#),
            Ok(Request::Upgrade {
                binary: Some("/opt/b".into()),
                timeout_ms: Some(5000)
            })
        );
        let relative = request(r#"{"cmd":"upgrade","binary":"b"}"#).unwrap_err();
        assert!(relative.contains("absolute"), "{relative}");
        assert!(request(r#"{"cmd":"upgrade","bin":"/b"}"#).is_err());
        assert_eq!(
            serde_json::from_str::<Reply>(r#"{"ok":true,"progress":"web: 1/2 ready"}"#).unwrap(),
            Reply::Progress("web: 1/2 ready".into())
        );
        assert!(
            request(r#"{"cmd":"explode"}"#)
                .unwrap_err()
                .contains("explode")
        );
        assert!(request(r#"{"cmd":"ping","x":1}"#).is_err());
        assert_eq!(
            request(r#"{"cmd":"subscribe"}"#),
            Ok(Request::Subscribe {
                interval_ms: 1000,
                logs: None
            })
        );
        let err = request(r#"{"cmd":"subscribe","interval_ms":5}"#).unwrap_err();
        assert!(err.contains("between 100 and 60000"), "{err}");
        assert!(request(r#"{"cmd":"subscribe","interval_ms":-1}"#).is_err());
        assert!(request(r#"{"cmd":"subscribe","logs":3}"#).is_err());
    }

    #[test]
    fn a_snapshot_reads_back_with_its_workers_flat() {
        let json = r#"{"ok":true,"snapshot":{"elapsed_ms":1000,"apps":[{"name":"web",
            "instances":1,"policy":"rr","balance":"round_robin","listeners":[],"config":{},
            "workers":[{"id":0,"app":"web","instance":0,"pid":7,"policy":"rr","status":"ready",
            "restarts":0,"uptime_ms":5,"connections":2,"listeners":[],"private":[],
            "last_exit":null,"reason":null,"connections_total":9,"bytes_total":64}]}]}}"#;
        let Reply::Snapshot(snapshot) = serde_json::from_str::<Reply>(json).unwrap() else {
            panic!("not a snapshot");
        };
        let worker = &snapshot.apps[0].workers[0];
        assert_eq!((worker.info.connections, worker.connections_total), (2, 9));
        let again = serde_json::to_string(&Reply::Snapshot(snapshot.clone())).unwrap();
        assert_eq!(
            serde_json::from_str::<Reply>(&again).unwrap(),
            Reply::Snapshot(snapshot)
        );
    }

    #[test]
    fn a_request_that_says_two_things_is_refused() {
        let err = request(r#"{"cmd":"start","file":"/a.toml","target":"web"}"#).unwrap_err();
        assert!(err.contains("exactly one of"), "{err}");
        let err = request(r#"{"cmd":"start"}"#).unwrap_err();
        assert!(err.contains("exactly one of"), "{err}");
        let err = request(r#"{"cmd":"reload","target":"web","file":"/a.toml"}"#).unwrap_err();
        assert!(err.contains("exactly one of"), "{err}");
        let err = request(r#"{"cmd":"reload","target":"web","env":"prod"}"#).unwrap_err();
        assert!(err.contains("go with `file`"), "{err}");
        let err = request(r#"{"cmd":"start","target":"web","env":"prod"}"#).unwrap_err();
        assert!(err.contains("takes no"), "{err}");
        let err = request(r#"{"cmd":"start","toml":"[[app]]","cwd":"rel/dir"}"#).unwrap_err();
        assert!(err.contains("`cwd` must be an absolute path"), "{err}");
        let err = request(r#"{"cmd":"reload","file":"b.toml"}"#).unwrap_err();
        assert!(err.contains("`file` must be an absolute path"), "{err}");
    }

    #[test]
    fn scale_counts_are_checked_when_read() {
        for (text, to) in [
            ("3", ScaleTo::Exactly(3)),
            ("+2", ScaleTo::Up(2)),
            ("-1", ScaleTo::Down(1)),
            ("max", ScaleTo::Max),
        ] {
            assert_eq!(text.parse(), Ok(to));
            assert_eq!(to.to_string(), text);
        }
        for bad in [
            "x",
            "+",
            "-",
            "2.5",
            "+-1",
            "-+1",
            "+9223372036854775807",
            " 1",
        ] {
            assert!(bad.parse::<ScaleTo>().is_err(), "{bad}");
        }
        assert_eq!(ScaleTo::Up(2).resolve(1, 8), Ok(3));
        assert_eq!(ScaleTo::Down(1).resolve(3, 8), Ok(2));
        assert_eq!(ScaleTo::Max.resolve(1, 8), Ok(8));
        assert_eq!(
            ScaleTo::Down(4).resolve(3, 8),
            Err("cannot scale to -1 workers".into())
        );
        assert!(ScaleTo::Up(u32::MAX).resolve(1, 8).is_err());
    }

    #[test]
    fn every_request_survives_the_wire() {
        let all = [
            Request::Ping,
            Request::List,
            Request::Kill,
            Request::Save,
            Request::Resurrect,
            Request::Start(Start::Toml {
                toml: "[[app]]".into(),
                cwd: Some("/srv".into()),
                load: Load {
                    env: None,
                    policy: Some(Policy::ReusePort),
                },
                force: true,
            }),
            Request::Start(Start::Stopped { target: "3".into() }),
            Request::Reload(Reload::File {
                file: "/a.toml".into(),
                load: Load::default(),
            }),
            Request::Scale {
                app: "web".into(),
                to: ScaleTo::Down(2),
            },
            Request::Reset {
                target: "all".into(),
            },
            Request::Signal {
                target: "3".into(),
                signal: "SIGUSR2".into(),
            },
            Request::Subscribe {
                interval_ms: 250,
                logs: Some("web".into()),
            },
        ];
        for r in all {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), r, "{json}");
        }
        assert_eq!(
            serde_json::to_string(&Request::Ping).unwrap(),
            r#"{"cmd":"ping"}"#
        );
    }

    #[test]
    fn replies_omit_what_they_do_not_carry() {
        let failed = Reply::Failed {
            error: "no such app: x".into(),
            code: 1,
        };
        let json = serde_json::to_string(&failed).unwrap();
        assert_eq!(json, r#"{"ok":false,"error":"no such app: x","code":1}"#);
        assert_eq!(
            serde_json::to_string(&Reply::done("scaled")).unwrap(),
            r#"{"ok":true,"message":"scaled"}"#
        );
        assert_eq!(
            serde_json::to_string(&Reply::End).unwrap(),
            r#"{"ok":true,"done":true}"#
        );
    }

    #[test]
    fn replies_are_read_by_what_they_carry() {
        let read = |json: &str| serde_json::from_str::<Reply>(json).unwrap();
        assert_eq!(read(r#"{"ok":true}"#), Reply::Workers(vec![]));
        assert!(matches!(
            read(r#"{"ok":true,"pid":42,"version":"0.1.0","future_field":1}"#),
            Reply::Pong(Pong { pid: 42, .. })
        ));
        assert_eq!(
            read(r#"{"ok":false,"error":"boom"}"#),
            Reply::Failed {
                error: "boom".into(),
                code: 1
            }
        );
        assert_eq!(
            read(r#"{"ok":false,"error":"bad","code":0}"#),
            Reply::Failed {
                error: "bad".into(),
                code: 1
            },
            "a refusal never exits 0"
        );
        assert_eq!(read(r#"{"ok":true,"done":true}"#), Reply::End);
    }
}
