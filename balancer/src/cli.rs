//! The command line: what a user types, parsed by clap, and the exit codes it promises
//! (0 done, 1 the operation failed, 2 bad usage or config).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

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
}

/// `$BALANCER_HOME`, or `~/.balancer`.
pub fn home() -> PathBuf {
    if let Some(home) = std::env::var_os("BALANCER_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    let base = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    base.join(".balancer")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

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
}
