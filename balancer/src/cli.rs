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
    Run {
        /// The balancer.toml to run.
        file: PathBuf,
        /// Merge `env_<NAME>` over `env` for every app.
        #[arg(long, value_name = "NAME")]
        env: Option<String>,
    },
    /// Validate a balancer.toml and exit, starting nothing (like `nginx -t`).
    Check {
        /// The balancer.toml to check.
        file: PathBuf,
        /// Validate as if `--env NAME` were given to `run`.
        #[arg(long, value_name = "NAME")]
        env: Option<String>,
    },
    /// Start the apps of a balancer.toml, a script, a command, or stopped apps again; starts
    /// the background master if none is running.
    Start(StartArgs),
    /// Drain and stop apps or workers (they stay listed, their listeners stay open).
    Stop {
        /// App name, worker id or `all`.
        target: String,
    },
    /// Stop, then start again (may drop connections; `reload` does not).
    Restart {
        /// App name, worker id or `all`.
        target: String,
    },
    /// Replace workers without downtime, or apply a changed balancer.toml.
    Reload {
        /// App name, worker id, `all`, or a balancer.toml whose changes to apply.
        target: String,
        /// With a balancer.toml: merge `env_<NAME>` over `env`.
        #[arg(long, value_name = "NAME")]
        env: Option<String>,
    },
    /// Stop apps or workers and forget them (their listeners close).
    #[command(visible_alias = "del")]
    Delete {
        /// App name, worker id or `all`.
        target: String,
    },
    /// Change an app's worker count: `N`, `+N`, `-N` or `max`.
    Scale {
        /// App name.
        app: String,
        /// The new count: `4`, `+2`, `-1` or `max`.
        #[arg(allow_hyphen_values = true, value_name = "N|+N|-N|max")]
        to: ScaleTo,
    },
    /// List every worker of every app.
    #[command(visible_aliases = ["list", "status"])]
    Ls,
    /// Print the workers as a JSON array (for scripts).
    Jlist,
    /// Show one app (or the app of a worker id) in detail: config, log files, workers.
    #[command(visible_alias = "describe")]
    Show {
        /// App name or worker id.
        target: String,
    },
    /// Print the last lines of the workers' logs, and with --follow new ones as they come.
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
    /// Empty the log files (of one app or worker id, or all).
    Flush {
        /// Only this app (or worker id).
        target: Option<String>,
    },
    /// Say whether a master is running, and its pid and version.
    Ping,
    /// Stop every app, then the master.
    Kill,
    /// The background master itself (what `start` launches).
    #[command(hide = true)]
    Daemon,
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
    /// A balancer.toml, a script, a command (program name), or a stopped app's name, worker id
    /// or `all`.
    #[arg(value_name = "FILE|SCRIPT|COMMAND|NAME")]
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
    }
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
                assert_eq!(file, PathBuf::from("b.toml"));
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
        for verb in ["ls", "list", "status"] {
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
    fn daemon_is_hidden() {
        assert!(matches!(parse(&["daemon"]), Command::Daemon));
        let help = Cli::command().render_help().to_string();
        assert!(!help.contains("daemon"), "{help}");
        assert!(help.contains("scale"), "{help}");
    }
}
