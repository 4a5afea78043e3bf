//! The command line: what a user types, parsed by clap, and the exit codes it promises
//! (0 done, 1 the operation failed, 2 bad usage or config).
//!
//! `run` and `check` work on a file alone; the PM2 verbs (`start`, `stop`, `ls`, …) are
//! clients of a master's admin socket and live in [`crate::ctl`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::protocol::ScaleTo;

/// Exit code: the operation failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: bad usage or a bad config (clap uses it too).
pub const EXIT_USAGE: u8 = 2;

/// PM2's cluster mode for servers in any language: a process manager and layer-4 load balancer.
#[derive(Debug, Parser)]
#[command(name = "balancer", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the apps of a balancer.toml in the foreground until SIGTERM or Ctrl-C.
    #[command(
        after_help = "Examples:\n  balancer run balancer.toml\n  balancer run balancer.toml --env production"
    )]
    Run {
        /// The balancer.toml to run; none: start what `balancer save` wrote (`dump.json`).
        file: Option<PathBuf>,
        /// Merge `env_<NAME>` over `env` for every app.
        #[arg(long, value_name = "NAME")]
        env: Option<String>,
    },
    /// Validate a balancer.toml and exit, starting nothing (like `nginx -t`).
    #[command(
        after_help = "Example:\n  balancer check balancer.toml && balancer reload balancer.toml"
    )]
    Check {
        /// The balancer.toml to check.
        file: PathBuf,
        /// Validate as if `--env NAME` were given to `run`.
        #[arg(long, value_name = "NAME")]
        env: Option<String>,
    },
    /// Start the apps of a balancer.toml or PM2 ecosystem file, a script, a command, or stopped
    /// apps again; starts the background master if none is running.
    #[command(
        after_help = "Examples:\n  balancer start server.js -i max -l :8080\n  \
                            balancer start app.py -n api -i 4 -l http://0.0.0.0:8000\n  \
                            balancer start npm -n web -- run start\n  \
                            balancer start balancer.toml --env production\n  \
                            balancer start ecosystem.config.js\n  \
                            balancer start worker.py -x --restart-delay 2s -o out.log\n  \
                            balancer start web"
    )]
    Start(StartArgs),
    /// Drain and stop apps or workers (they stay listed, their listeners stay open).
    #[command(
        after_help = "Examples:\n  balancer stop web\n  balancer stop 3\n  balancer stop all"
    )]
    Stop {
        /// App name, worker id or `all`.
        target: String,
    },
    /// Stop, then start again (may drop connections; `reload` does not).
    #[command(after_help = "Examples:\n  balancer restart web\n  balancer restart 3")]
    Restart {
        /// App name, worker id or `all`.
        target: String,
    },
    /// Replace workers without downtime, or apply a changed balancer.toml.
    #[command(
        after_help = "Examples:\n  balancer reload web\n  balancer reload all\n  balancer reload balancer.toml --env production"
    )]
    Reload {
        /// App name, worker id, `all`, or a balancer.toml whose changes to apply.
        target: String,
        /// With a balancer.toml: merge `env_<NAME>` over `env`.
        #[arg(long, value_name = "NAME")]
        env: Option<String>,
    },
    /// Stop apps or workers and forget them (their listeners close).
    #[command(
        visible_alias = "del",
        after_help = "Examples:\n  balancer delete web\n  balancer delete 3   (one worker, like scale -1)"
    )]
    Delete {
        /// App name, worker id or `all`.
        target: String,
    },
    /// Change an app's worker count: `N`, `+N`, `-N` or `max`.
    #[command(
        after_help = "Examples:\n  balancer scale web 4\n  balancer scale web +2\n  balancer scale web max"
    )]
    Scale {
        /// App name.
        app: String,
        /// The new count: `4`, `+2`, `-1` or `max`.
        #[arg(allow_hyphen_values = true, value_name = "N|+N|-N|max")]
        to: ScaleTo,
    },
    /// List every worker of every app.
    #[command(visible_aliases = ["list", "status", "ps", "l"], after_help = "Example:\n  balancer ls")]
    Ls,
    /// Print the workers as a JSON array (for scripts).
    #[command(after_help = "Example:\n  balancer jlist | jq '.[] | select(.status != \"ready\")'")]
    Jlist,
    /// Show one app (or the app of a worker id) in detail: config, log files, workers.
    #[command(
        visible_aliases = ["describe", "desc", "info"],
        after_help = "Examples:\n  balancer show web\n  balancer describe 3"
    )]
    Show {
        /// App name or worker id.
        target: String,
    },
    /// Print the last lines of the workers' logs, and with --follow new ones as they come.
    #[command(
        after_help = "Examples:\n  balancer logs\n  balancer logs web --lines 100\n  balancer logs 3 -f --json"
    )]
    Logs {
        /// Only this app (or worker id).
        target: Option<String>,
        /// How many past lines of each file.
        #[arg(long, default_value_t = 15, value_name = "N")]
        lines: usize,
        /// Keep streaming new lines until interrupted.
        #[arg(short, long)]
        follow: bool,
        /// One JSON object per line: {"app","instance","stream","line"}.
        #[arg(long)]
        json: bool,
    },
    /// A live terminal dashboard: workers with cpu/mem, the selected app's logs, its metrics
    /// and a req/s chart; r reload, +/- scale, s stop/start (each confirmed with y), q quits.
    #[command(
        after_help = "Examples:\n  balancer monit\n  balancer monit --interval 500\n\nKeys: ↑/↓ select a worker, tab next pane (↑/↓ then scroll logs or info), \
                      r reload, + / - scale by one, s stop or start, y/n confirm, q, Esc or Ctrl-C quit."
    )]
    Monit {
        /// Milliseconds between two snapshots from the master (100 to 60000).
        #[arg(long, default_value_t = 1000, value_name = "MS",
              value_parser = clap::value_parser!(u64).range(100..=60_000))]
        interval: u64,
    },
    /// Empty the log files (of one app or worker id, or all).
    #[command(after_help = "Examples:\n  balancer flush\n  balancer flush web")]
    Flush {
        /// Only this app (or worker id).
        target: Option<String>,
    },
    /// Say whether a master is running, and its pid and version.
    #[command(after_help = "Example:\n  balancer ping || balancer start balancer.toml")]
    Ping,
    /// Stop every app, then the master.
    #[command(after_help = "Example:\n  balancer kill")]
    Kill,
    /// Write every app, its worker count and stopped state to `$BALANCER_HOME/dump.json`.
    #[command(after_help = "Example:\n  balancer save && balancer kill && balancer resurrect")]
    Save,
    /// Start again what `balancer save` wrote (launching the master if none runs).
    #[command(after_help = "Example:\n  balancer resurrect")]
    Resurrect,
    /// Print (or with --install write) a systemd unit that runs the master at boot.
    #[command(
        after_help = "Examples:\n  balancer startup\n  balancer startup systemd --install\n\nThe unit runs `balancer run` (no file), which starts what `balancer save` wrote."
    )]
    Startup {
        /// The init system; only systemd is supported.
        #[arg(default_value = "systemd")]
        init: String,
        /// Write the unit file instead of printing it.
        #[arg(long)]
        install: bool,
    },
    /// Remove the unit `balancer startup --install` wrote.
    #[command(after_help = "Example:\n  balancer unstartup")]
    Unstartup {
        /// The init system; only systemd is supported.
        #[arg(default_value = "systemd")]
        init: String,
    },
    /// Set restart counters (the ↺ column) back to zero.
    #[command(after_help = "Examples:\n  balancer reset web\n  balancer reset all")]
    Reset {
        /// App name, worker id or `all`.
        target: String,
    },
    /// Send a signal to workers' processes (e.g. SIGUSR2 for a worker that reopens its logs).
    #[command(
        visible_alias = "sendSignal",
        after_help = "Examples:\n  balancer send-signal SIGUSR2 web\n  balancer send-signal HUP 3"
    )]
    SendSignal {
        /// `SIGUSR2`, `USR2` or `usr2`.
        signal: String,
        /// App name, worker id or `all`.
        target: String,
    },
    /// Write a commented sample balancer.toml (PM2's `ecosystem`).
    #[command(
        visible_alias = "init",
        after_help = "Examples:\n  balancer ecosystem\n  balancer init deploy/balancer.toml"
    )]
    Ecosystem {
        /// Where to write it (an existing file is never overwritten).
        #[arg(default_value = "balancer.toml")]
        file: PathBuf,
    },
    /// Print PM2's ecosystem file (ecosystem.config.js, process.json, *.yaml) as balancer.toml.
    #[command(
        after_help = "Examples:\n  balancer import ecosystem.config.js > balancer.toml\n  \
                            balancer import process.json > balancer.toml && balancer check balancer.toml"
    )]
    Import {
        /// The PM2 file (JavaScript is evaluated with `node`, as PM2 does).
        file: PathBuf,
    },
    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  balancer completions bash > /etc/bash_completion.d/balancer\n  \
                            balancer completions zsh > \"${fpath[1]}/_balancer\"\n  \
                            balancer completions fish > ~/.config/fish/completions/balancer.fish"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Replace the master's binary without dropping a connection: a new master takes the
    /// listeners and the apps over, and the old one drains and exits.
    #[command(
        after_help = "Examples:\n  cargo install --path . && balancer upgrade\n  \
                            balancer upgrade --binary /opt/balancer-0.2/bin/balancer --timeout 2m\n\n\
                      The old master carries on if the new one fails before taking over \
                      (exit 1 with the reason). `kill -USR2 <master pid>` does the same."
    )]
    Upgrade {
        /// The new binary; default: the path the running master was started from, re-read.
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// How long the new master has to take over (its workers ready) before it is killed
        /// and the upgrade fails; `500ms`, `30s`, `2m`. Default 60s.
        #[arg(long, value_name = "DURATION", value_parser = balancer_config::parse_duration)]
        timeout: Option<std::time::Duration>,
    },
    /// The background master itself (what `start` launches).
    #[command(hide = true)]
    Daemon,
    /// A new master taking over from the one that started it (`upgrade`), handed the state on
    /// descriptor FD and the sockets after it (see `balancer/UPGRADE.md`).
    #[command(hide = true, name = "take-over")]
    TakeOver {
        /// The hand-over socket.
        fd: i32,
    },
    /// Every worker runs under this: it keeps the worker's whole process tree from outliving
    /// the worker or the master, and sets `LISTEN_PID` (see `workers/src/shim.rs`).
    #[command(hide = true, name = "shim")]
    Shim {
        /// The program and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        argv: Vec<std::ffi::OsString>,
    },
}

/// `balancer start`'s arguments.
#[derive(Debug, Clone, Default, Args)]
pub struct StartArgs {
    /// A balancer.toml, PM2's ecosystem file (`*.config.js`, `*.json`, `*.yaml`), a script, a
    /// command (program name), or a stopped app's name, worker id or `all`.
    /// With none, start what `balancer save` wrote, as `resurrect` does.
    #[arg(
        value_name = "FILE|SCRIPT|COMMAND|NAME",
        default_value = "",
        hide_default_value = true
    )]
    pub target: String,
    /// The app's name (default: the script's or program's file name, without extension).
    #[arg(short, long)]
    pub name: Option<String>,
    /// How many workers: a count, `max` (one per CPU), or negative (CPUs minus that many).
    #[arg(short, long, value_name = "N|max", allow_negative_numbers = true, value_parser = instances)]
    pub instances: Option<InstancesArg>,
    /// A public listener: `tcp://0.0.0.0:8080`, `:8080` or `8080` (repeatable).
    #[arg(short, long = "listen", value_name = "URL")]
    pub listen: Vec<String>,
    /// How connections reach the workers.
    #[arg(long, value_parser = ["rr", "reuseport"])]
    pub policy: Option<String>,
    /// Merge `env_<NAME>` over `env` (with a balancer.toml).
    #[arg(long, value_name = "NAME")]
    pub env: Option<String>,
    /// Run in the foreground, as `run` does, instead of handing the apps to a master.
    #[arg(long)]
    pub no_daemon: bool,
    /// Replace a running app of the same name (without it, the name is refused, as in PM2).
    #[arg(short, long)]
    pub force: bool,
    /// PM2's options, each the balancer.toml key of the same name.
    #[command(flatten)]
    pub pm2: Box<Pm2Args>,
    /// Arguments for the script or command.
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<String>,
}

impl StartArgs {
    /// Whether options that describe a new app (rather than name an existing one) were given.
    pub fn describes_an_app(&self) -> bool {
        self.name.is_some()
            || self.instances.is_some()
            || !self.listen.is_empty()
            || self.policy.is_some()
            || !self.args.is_empty()
            || *self.pm2 != Pm2Args::default()
    }
}

/// PM2's `start` options. Each one is the `balancer.toml` key named in its help (PM2's own key
/// names), written into the one-app config `start` builds, so a flag and a key can never mean
/// two things. The flags whose behaviour is not built yet parse, so that the refusal can name
/// the key instead of clap suggesting to pass them to the script.
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
#[command(next_help_heading = "PM2 options (each sets the balancer.toml key of its name)")]
pub struct Pm2Args {
    /// `interpreter`: the program that runs the script (`node`, `python3`, `none`, …).
    #[arg(long, value_name = "PROG")]
    pub interpreter: Option<String>,
    /// `interpreter_args`: options for the interpreter, before the script (split like a shell).
    #[arg(
        long,
        visible_alias = "node-args",
        value_name = "ARGS",
        allow_hyphen_values = true
    )]
    pub interpreter_args: Option<String>,
    /// PM2's fork mode: one worker, no balancing, no listener; the app binds its own ports.
    #[arg(short = 'x', long, conflicts_with_all = ["instances", "listen"])]
    pub fork: bool,
    /// `restart_delay`: wait this long before restarting a crashed worker (`500ms`, `2s`; a
    /// bare number is milliseconds, as in PM2).
    #[arg(long, value_name = "DURATION")]
    pub restart_delay: Option<String>,
    /// `autorestart = false`: leave a worker that exits down.
    #[arg(long)]
    pub no_autorestart: bool,
    /// `max_restarts`: unstable exits in a row before the worker is `errored`.
    #[arg(long, value_name = "N")]
    pub max_restarts: Option<u32>,
    /// `min_uptime`: a run shorter than this is unstable (a bare number is milliseconds).
    #[arg(long, value_name = "DURATION")]
    pub min_uptime: Option<String>,
    /// `kill_timeout`: from the stop signal to SIGKILL (a bare number is milliseconds).
    #[arg(long, value_name = "DURATION")]
    pub kill_timeout: Option<String>,
    /// `max_memory_restart`: replace a worker whose memory passes this (`300M`, `1G`; a bare
    /// number is bytes, as in PM2).
    #[arg(long, value_name = "SIZE")]
    pub max_memory_restart: Option<String>,
    /// `cwd`: the workers' working directory (default: the current directory).
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// `error_file`: the workers' stderr file.
    #[arg(short = 'e', long = "error", value_name = "FILE")]
    pub error_file: Option<String>,
    /// `out_file`: the workers' stdout file.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub out_file: Option<String>,
    /// `log_file`: one file for both stdout and stderr (PM2's `-l`; here `-l` is --listen).
    #[arg(long = "log", value_name = "FILE")]
    pub log_file: Option<String>,
    /// `merge_logs`: every instance writes one file, each line tagged `[<app>-<instance>]`.
    #[arg(long, visible_alias = "combine-logs")]
    pub merge_logs: bool,
    /// `time`: each log line starts with a timestamp.
    #[arg(long)]
    pub time: bool,
    /// `log_date_format`: the timestamps' strftime format (implies --time; PM2's moment.js
    /// formats, `YYYY-MM-DD HH:mm:ss`, are translated).
    #[arg(long, value_name = "FORMAT")]
    pub log_date_format: Option<String>,
    /// `watch`: reload when files change under these paths (none given: the app's cwd).
    #[arg(long, value_name = "PATHS", num_args = 0.., value_delimiter = ',')]
    pub watch: Option<Vec<String>>,
    /// `ignore_watch`: globs that changes do not count under (with `--watch`).
    #[arg(long, value_name = "PATTERNS", num_args = 1.., value_delimiter = ',')]
    pub ignore_watch: Option<Vec<String>>,
    /// `watch_delay`: how long changes must stop before the reload (a bare number is seconds,
    /// as in PM2's flag).
    #[arg(long, value_name = "DURATION")]
    pub watch_delay: Option<String>,
    /// `cron_restart`: reload on this schedule ("0 3 * * *"; six fields: seconds first).
    #[arg(long, visible_alias = "cron", value_name = "CRON")]
    pub cron_restart: Option<String>,
}

/// PM2 `start` flags balancer has no flag for, with the balancer.toml key that does the same
/// (or `None`: nothing does), so `balancer start app.js --no-vizion` says what to do instead
/// of clap's tip to pass the flag to the script.
pub const PM2_ONLY_FLAGS: &[(&str, Option<&str>, &str)] = &[
    (
        "--namespace",
        None,
        "balancer has no namespaces; name apps apart with -n",
    ),
    (
        "--wait-ready",
        Some("health"),
        "a worker is ready when its `health` check passes",
    ),
    (
        "--listen-timeout",
        Some("listen_timeout"),
        "set `listen_timeout` in balancer.toml",
    ),
    (
        "--shutdown-with-message",
        None,
        "workers are stopped with `kill_signal`",
    ),
    (
        "--kill-signal",
        Some("kill_signal"),
        "set `kill_signal` in balancer.toml",
    ),
    (
        "--exp-backoff-restart-delay",
        Some("exp_backoff_restart_delay"),
        "set `exp_backoff_restart_delay` in balancer.toml",
    ),
    (
        "--instance-var",
        None,
        "the instance is always in BALANCER_INSTANCE and NODE_APP_INSTANCE",
    ),
    (
        "--no-vizion",
        None,
        "balancer reads no version control metadata; drop the flag",
    ),
    (
        "--no-pmx",
        None,
        "balancer injects nothing into workers; drop the flag",
    ),
    (
        "--no-automation",
        None,
        "balancer injects nothing into workers; drop the flag",
    ),
    (
        "--disable-trace",
        None,
        "balancer injects nothing into workers; drop the flag",
    ),
    ("--trace", None, "balancer injects nothing into workers"),
    (
        "--deep-monitoring",
        None,
        "balancer injects nothing into workers",
    ),
    (
        "--source-map-support",
        None,
        "pass `--enable-source-maps` with --node-args",
    ),
    (
        "--log-type",
        None,
        "logs are plain lines (`balancer logs --json` prints JSON)",
    ),
    ("--attach", None, "follow the logs with `balancer logs -f`"),
    (
        "--env-file",
        None,
        "put the variables in `env` in balancer.toml",
    ),
    (
        "--max-memory",
        Some("max_memory_restart"),
        "use --max-memory-restart",
    ),
    ("--user", None, "run balancer as that user instead"),
    ("--uid", None, "run balancer as that user instead"),
    ("--gid", None, "run balancer as that group instead"),
];

/// What to say about `flag`, an argument clap did not know: PM2's flag and what balancer has
/// for it, or that balancer has no such flag (and where arguments for the script go).
pub fn unknown_flag_hint(flag: &str) -> String {
    let name = flag.split('=').next().unwrap_or(flag);
    if let Some((_, key, advice)) = PM2_ONLY_FLAGS.iter().find(|(f, _, _)| *f == name) {
        return match key {
            Some(key) => format!(
                "`{name}` is a PM2 flag balancer does not take; its balancer.toml key is \
                 `{key}`: {advice}"
            ),
            None => format!(
                "`{name}` is a PM2 flag with no balancer equivalent (no balancer.toml key): \
                 {advice}"
            ),
        };
    }
    format!(
        "balancer has no flag `{name}` (see `balancer start --help`); arguments meant for the \
         script go after `--`, as in `balancer start app.js -- {name}`"
    )
}

/// `-i`: a count (negative: CPUs minus that many) or `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstancesArg {
    /// `max`: one worker per CPU.
    Max,
    /// A count as written.
    Count(i64),
}

fn instances(s: &str) -> Result<InstancesArg, String> {
    if s == "max" {
        return Ok(InstancesArg::Max);
    }
    s.parse()
        .map(InstancesArg::Count)
        .map_err(|_| format!("expected a number or \"max\", found {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Command {
        let mut argv = vec!["balancer"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv) {
            Ok(cli) => cli.command,
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    fn refused(args: &[&str]) -> clap::error::ErrorKind {
        let mut argv = vec!["balancer"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
            .expect_err("should be refused")
            .kind()
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_a_file_and_an_env() {
        let cli =
            Cli::try_parse_from(["balancer", "run", "b.toml", "--env", "production"]).unwrap();
        match cli.command {
            Command::Run { file, env } => {
                assert_eq!(file, Some(PathBuf::from("b.toml")));
                assert_eq!(env.as_deref(), Some("production"));
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn start_reads_like_pm2() {
        let cmd = parse(&[
            "start",
            "server.js",
            "-i",
            "max",
            "-l",
            "tcp://0.0.0.0:8080",
            "-l",
            ":9000",
            "-n",
            "web",
            "--policy",
            "rr",
            "--",
            "--port",
            "x",
        ]);
        let Command::Start(args) = cmd else {
            panic!("parsed as {cmd:?}");
        };
        assert_eq!(args.target, "server.js");
        assert_eq!(args.name.as_deref(), Some("web"));
        assert_eq!(args.instances, Some(InstancesArg::Max));
        assert_eq!(args.listen, ["tcp://0.0.0.0:8080", ":9000"]);
        assert_eq!(args.policy.as_deref(), Some("rr"));
        assert_eq!(args.args, ["--port", "x"]);
        assert!(!args.no_daemon);
        assert!(args.describes_an_app());
    }

    #[test]
    fn start_takes_negative_instances_and_no_daemon() {
        let Command::Start(args) = parse(&["start", "app.py", "-i", "-1", "--no-daemon"]) else {
            panic!("not start");
        };
        assert_eq!(args.instances, Some(InstancesArg::Count(-1)));
        assert!(args.no_daemon);
        let Command::Start(args) = parse(&["start", "web"]) else {
            panic!("not start");
        };
        assert!(!args.describes_an_app());
        assert_eq!(
            refused(&["start", "x", "-i", "many"]),
            clap::error::ErrorKind::ValueValidation
        );
        assert_eq!(
            refused(&["start", "x", "--policy", "random"]),
            clap::error::ErrorKind::InvalidValue
        );
    }

    #[test]
    fn scale_accepts_signed_counts_and_max() {
        for to in ["3", "+2", "-1", "max"] {
            match parse(&["scale", "web", to]) {
                Command::Scale { app, to: got } => {
                    assert_eq!(app, "web");
                    assert_eq!(got.to_string(), to);
                }
                other => panic!("parsed as {other:?}"),
            }
        }
        for bad in ["x", "+", "-", "2.5", "+-1"] {
            assert_eq!(
                refused(&["scale", "web", bad]),
                clap::error::ErrorKind::ValueValidation,
                "{bad}"
            );
        }
    }

    #[test]
    fn ls_has_pm2_aliases_and_logs_has_options() {
        for verb in ["ls", "list", "status", "ps", "l"] {
            assert!(matches!(parse(&[verb]), Command::Ls), "{verb}");
        }
        match parse(&["logs", "web", "--lines", "50", "-f"]) {
            Command::Logs {
                target,
                lines,
                follow,
                json,
            } => {
                assert_eq!(target.as_deref(), Some("web"));
                assert_eq!(lines, 50);
                assert!(follow);
                assert!(!json);
            }
            other => panic!("parsed as {other:?}"),
        }
        match parse(&["logs"]) {
            Command::Logs { target, lines, .. } => {
                assert_eq!(target, None);
                assert_eq!(lines, 15);
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn every_visible_verb_has_an_example() {
        for sub in Cli::command()
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
        {
            let help = sub
                .get_after_help()
                .map(ToString::to_string)
                .unwrap_or_default();
            assert!(
                help.contains(&format!("balancer {}", sub.get_name())),
                "`{}` has no example: {help:?}",
                sub.get_name()
            );
        }
    }

    #[test]
    fn pm2_verbs_and_aliases_parse() {
        assert!(matches!(
            parse(&["sendSignal", "SIGUSR2", "web"]),
            Command::SendSignal { .. }
        ));
        assert!(matches!(parse(&["init"]), Command::Ecosystem { .. }));
        assert!(matches!(
            parse(&["completions", "zsh"]),
            Command::Completions { .. }
        ));
        let Command::Start(args) =
            parse(&["start", "a.js", "--node-args", "--inspect", "-x", "-f"])
        else {
            panic!("not start");
        };
        assert_eq!(args.pm2.interpreter_args.as_deref(), Some("--inspect"));
        assert!(args.pm2.fork && args.force);
        let Command::Start(args) = parse(&["start", "a.js", "--watch", "--log", "all.log"]) else {
            panic!("not start");
        };
        assert_eq!(args.pm2.watch, Some(vec![]));
        assert_eq!(args.pm2.log_file.as_deref(), Some("all.log"));
        let Command::Start(args) = parse(&["start", "a.js", "--watch", "src,lib", "--time"]) else {
            panic!("not start");
        };
        assert_eq!(args.pm2.watch, Some(vec!["src".into(), "lib".into()]));
        assert!(args.pm2.time);
    }

    #[test]
    fn daemon_is_hidden() {
        assert!(matches!(parse(&["daemon"]), Command::Daemon));
        let help = Cli::command().render_help().to_string();
        assert!(!help.contains("daemon"), "{help}");
        assert!(help.contains("scale"), "{help}");
    }
}
