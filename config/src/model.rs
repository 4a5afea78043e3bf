//! The validated configuration: every default applied, every value checked.
//!
//! Nothing here can be wrong: `validate.rs` only builds these types from input it has checked,
//! so the supervisor and the listeners never re-validate.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use nix::sys::signal::Signal;

/// A whole `balancer.toml`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this was read from (absolute), for messages and for `reload <file>`.
    pub source: PathBuf,
    /// The `[balancer]` table.
    pub balancer: Global,
    /// The `[[app]]` tables, in file order.
    pub apps: Vec<App>,
}

/// The `[balancer]` table: settings of the master itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Global {
    /// `metrics = "127.0.0.1:9615"`: where the Prometheus endpoint listens, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// `sample_interval = "1s"`: how often every worker's CPU and memory are sampled.
    pub sample_interval: Duration,
    /// `io = "auto"`: how the master moves the bytes of its established `tcp://` connections
    /// and keep-alive `http://` ones.
    pub io: Io,
}

/// `[balancer] io`: the I/O path of established `tcp://` and keep-alive `http://` connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Io {
    /// io_uring where the kernel allows it (checked at start), epoll otherwise.
    #[default]
    Auto,
    /// Readiness (epoll) and read/write/splice syscalls on the async runtime's threads.
    Epoll,
    /// io_uring rings, one per core; the master refuses to start where the kernel refuses them.
    IoUring,
}

impl Io {
    /// The name used in `balancer.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            Io::Auto => "auto",
            Io::Epoll => "epoll",
            Io::IoUring => "io_uring",
        }
    }
}

impl Default for Global {
    fn default() -> Self {
        Global {
            metrics: None,
            sample_interval: crate::defaults::SAMPLE_INTERVAL,
            io: Io::default(),
        }
    }
}

/// One `[[app]]`: a program run as `instances` workers behind `listen`.
#[derive(Debug, Clone, PartialEq)]
pub struct App {
    /// Unique within the file; `[A-Za-z0-9_.-]+`.
    pub name: String,
    /// What to exec: `program` then `args` (interpreter and script already resolved).
    pub program: String,
    /// Arguments after the program (the script first when an interpreter runs one).
    pub args: Vec<String>,
    /// Working directory of the workers (absolute).
    pub cwd: PathBuf,
    /// How many workers, resolved against the CPU count. 0 is allowed (a parked app).
    pub instances: u32,
    /// What the user wrote for `instances`, so `scale max` and `show` can say it again.
    pub instances_spec: Instances,
    /// Public listeners owned by the master for this app.
    pub listen: Vec<Listener>,
    /// How connections reach the workers.
    pub policy: Policy,
    /// Which ready worker the master picks for each connection (rr policy only).
    pub balance: Balance,
    /// The most connections (requests in flight, on `http://`) one worker is given at a time;
    /// past it the worker is skipped, and when every worker is full the connection waits in
    /// the master's queue (up to `queue_timeout`). `None`: no limit.
    pub max_conns: Option<u32>,
    /// Environment given to every worker: `env`, then `env_<name>` selected by `--env name` on top.
    pub env: BTreeMap<String, String>,
    /// How readiness is decided.
    pub health: Health,
    /// `ready = "notify"`: a worker is ready only once it has sent `READY=1` to its own
    /// `$NOTIFY_SOCKET` (and then passes its health check, which decides from there on).
    pub ready: Ready,
    /// Signal asking a worker to stop gracefully.
    pub kill_signal: Signal,
    /// Time between `kill_signal` and SIGKILL.
    pub kill_timeout: Duration,
    /// How long a worker taken out of the pool may keep its live connections.
    pub drain_timeout: Duration,
    /// How long a new worker has to become ready.
    pub listen_timeout: Duration,
    /// How long a connection is held when no worker is ready, before it is closed.
    pub queue_timeout: Duration,
    /// How long the master waits for a worker to accept a proxied connection.
    pub connect_timeout: Duration,
    /// Restart a worker that exits on its own.
    pub autorestart: bool,
    /// Consecutive unstable exits (each under `min_uptime`) before the worker is `errored`.
    pub max_restarts: u32,
    /// A run shorter than this counts as unstable.
    pub min_uptime: Duration,
    /// Fixed delay before a restart.
    pub restart_delay: Duration,
    /// First delay of the exponential backoff (×1.5, capped at 15 s); `None` disables it.
    pub exp_backoff_restart_delay: Option<Duration>,
    /// How many workers a reload replaces at a time (at least 1).
    pub reload_batch: u32,
    /// Limits of `udp://` listeners.
    pub udp: UdpSettings,
    /// Limits of `http://` listeners.
    pub http: HttpSettings,
    /// Resident memory above which a worker is replaced gracefully (bytes).
    pub max_memory_restart: Option<u64>,
    /// The workers' stdout file (`out_file`, or `log_file`), absolute; `None`: the home's
    /// `logs/<app>-<instance>-out.log`. Instance N > 0 writes `<stem>-N.<ext>` next to it.
    pub out_file: Option<PathBuf>,
    /// The workers' stderr file (`error_file`, or `log_file`), absolute; like `out_file`.
    pub error_file: Option<PathBuf>,
    /// Timestamps, merging and rotation of the workers' output.
    pub logs: Logging,
    /// `capture`: trap the workers' own `bind()` of the app's public addresses and answer it
    /// with their private socket (seccomp user notification). `None`: on where the kernel
    /// allows it; `Some(true)`: required (the app is refused where it cannot be had);
    /// `Some(false)`: off.
    pub capture: Option<bool>,
    /// `watch`: reload when files change under these paths.
    pub watch: Option<Watch>,
    /// `cron_restart`: reload on this schedule.
    pub cron_restart: Option<CronRestart>,
}

/// How workers' output is written (`time`, `log_date_format`, `merge_logs`, `log_max_size`,
/// `log_retain`, `log_compress`). The default (all off) lets workers write straight into their
/// files; anything else needs the master to read their output through pipes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Logging {
    /// The strftime format of the timestamp each line starts with; `None`: no timestamp.
    pub time: Option<String>,
    /// `merge_logs`: every instance writes the same file, each line tagged `[<app>-<instance>]`.
    pub merge: bool,
    /// Size rotation, when `log_max_size` is set.
    pub rotate: Option<Rotation>,
}

impl Logging {
    /// Whether the master must relay the output (anything but plain files).
    pub fn relayed(&self) -> bool {
        self.time.is_some() || self.merge || self.rotate.is_some()
    }
}

/// Size-based rotation of a log file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// The file is rotated once it reaches this many bytes (at a line boundary).
    pub max_size: u64,
    /// Rotated files kept; older ones are deleted.
    pub retain: u32,
    /// Rotated files are gzipped (off the relay's thread).
    pub compress: bool,
}

/// `watch`, `ignore_watch` and `watch_delay`: a change under `paths` (and not ignored) reloads
/// the app once nothing more has changed for `delay`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    /// What is watched, recursively: absolute files or directories (`true`: the app's cwd).
    pub paths: Vec<PathBuf>,
    /// `ignore_watch`: shell globs. One without a `/` matches a file or directory name at any
    /// depth (`node_modules`, `*.log`); one with a `/` matches the path relative to the app's
    /// cwd (`src/generated/**`), or the absolute path if it starts with `/`. Always added:
    /// [`crate::defaults::WATCH_IGNORE`].
    pub ignore: Vec<String>,
    /// `watch_delay`: how long changes must stop before the reload (debounce).
    pub delay: Duration,
}

/// `cron_restart`: a schedule of reloads, in the machine's local time (as PM2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronRestart {
    /// The pattern as written (5 fields, or 6 with seconds first); it parses with
    /// [`crate::parse_cron`].
    pub pattern: String,
}

/// Limits of the UDP flow table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpSettings {
    /// Flows tracked per listener; past it the least recently active flow is evicted.
    pub max_flows: u32,
    /// A flow silent for this long is forgotten.
    pub idle_timeout: Duration,
}

/// Limits of the HTTP front end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpSettings {
    /// Time a client has to send a request's headers.
    pub header_timeout: Duration,
    /// The largest request head accepted, in bytes.
    pub max_header_size: usize,
    /// An idle keep-alive client connection is closed after this long.
    pub idle_timeout: Duration,
}

/// What `instances` said, before it was resolved against the CPU count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instances {
    /// A fixed count.
    Count(u32),
    /// `"max"`: one per CPU.
    Max,
    /// A negative integer: CPUs minus this many (at least 1).
    CpusMinus(u32),
}

impl Instances {
    /// The worker count on a machine with `cpus` CPUs.
    pub fn resolve(self, cpus: u32) -> u32 {
        match self {
            Instances::Count(n) => n,
            Instances::Max => cpus.max(1),
            Instances::CpusMinus(n) => cpus.saturating_sub(n).max(1),
        }
    }
}

/// One public listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// The protocol the master speaks on the public side.
    pub proto: Proto,
    /// The public address the master binds.
    pub addr: SocketAddr,
    /// The env var carrying this listener's private port to workers (`PORT`, `PORT_1`, … unless set).
    pub port_env: String,
    /// Send a PROXY protocol header to the worker before any client byte (`tcp://` only).
    pub proxy_protocol: Option<ProxyVersion>,
    /// Expect a PROXY protocol header (v1 or v2) from the client, as sent by a load balancer in
    /// front, and take the client's address from it.
    pub accept_proxy: bool,
    /// Not written in `listen`: learned from a worker's own `bind()` (capture), so `ls` and
    /// `show` can say so.
    pub captured: bool,
}

impl Listener {
    /// A listener on `proto://addr` with no per-listener options.
    pub fn new(proto: Proto, addr: SocketAddr, port_env: impl Into<String>) -> Self {
        Listener {
            proto,
            addr,
            port_env: port_env.into(),
            proxy_protocol: None,
            accept_proxy: false,
            captured: false,
        }
    }
}

/// The PROXY protocol version sent to workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyVersion {
    /// The text header (`PROXY TCP4 … \r\n`), what most servers parse.
    V1,
    /// The binary header.
    V2,
}

impl ProxyVersion {
    /// The name used in `balancer.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyVersion::V1 => "v1",
            ProxyVersion::V2 => "v2",
        }
    }
}

/// The protocol of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    /// `tcp://`: layer-4 proxying of byte streams.
    Tcp,
    /// `udp://`: datagram flows.
    Udp,
    /// `http://`: per-request proxying.
    Http,
}

impl Proto {
    /// The URL scheme, as written in `listen`.
    pub fn scheme(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Http => "http",
        }
    }
}

impl std::fmt::Display for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", self.proto.scheme(), self.addr)
    }
}

/// Scheduling policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// The master accepts and round-robins each connection to a ready worker.
    #[default]
    RoundRobin,
    /// Each worker accepts on its own `SO_REUSEPORT` socket.
    ReusePort,
}

impl Policy {
    /// The name used in `balancer.toml` and `ls`.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::RoundRobin => "rr",
            Policy::ReusePort => "reuseport",
        }
    }
}

/// The balancing algorithm of an rr app: how the master picks among the ready workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Balance {
    /// Each connection to the next ready worker in turn.
    #[default]
    RoundRobin,
    /// The worker with the fewest live connections (requests in flight on `http://`), ties
    /// broken round-robin.
    LeastConn,
    /// The less loaded of two workers drawn at random ("power of two choices").
    P2c,
    /// A consistent hash of the client's IP address: a client keeps its worker.
    Source,
}

impl Balance {
    /// The name used in `balancer.toml` and `show`.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastConn => "least_conn",
            Balance::P2c => "p2c",
            Balance::Source => "source",
        }
    }
}

/// Readiness checking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// What is probed.
    pub check: Check,
    /// Time between probes.
    pub interval: Duration,
    /// Time one probe may take.
    pub timeout: Duration,
    /// Consecutive successes that make a worker ready.
    pub rise: u32,
    /// Consecutive failures that take a ready worker out of the pool.
    pub fall: u32,
}

/// What makes a new worker ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ready {
    /// Its health check passing (`ready = "health"`, the default).
    #[default]
    Health,
    /// `READY=1` on its own `$NOTIFY_SOCKET` (sd_notify), then its health check: for servers
    /// whose port opens before they can serve.
    Notify,
}

impl Ready {
    /// The name used in `balancer.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            Ready::Health => "health",
            Ready::Notify => "notify",
        }
    }
}

/// The kind of health probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// A TCP connect to the worker's first private port.
    Tcp,
    /// `GET path` on the worker's first private port, expecting a 2xx status.
    Http {
        /// The request path, starting with `/`.
        path: String,
    },
    /// No probe: ready as soon as the process is spawned.
    None,
}
