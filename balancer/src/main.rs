//! The `balancer` binary: parse the command line and run the command. `run`, `check` and the
//! daemon are here; every verb that talks to a master is in `ctl`.

use std::path::Path;
use std::process::ExitCode;

use balancer::cli::{Cli, Command, EXIT_FAILED, EXIT_USAGE};
use balancer::ctl::{self, Outcome};
use balancer::master::{self, run as master_run};
use balancer::protocol::Load;
use balancer_config::Config;
use balancer_workers::Chain;
use clap::Parser;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    if let Command::Shim { argv } = cli.command {
        // Before anything else: the shim must fork with one thread and no runtime.
        balancer_workers::shim::run(&argv);
    }
    init_tracing();
    warn_about_bad_policy_env();
    match cli.command {
        Command::Check { file, env } => match load(&file, env) {
            Ok(config) => {
                let workers: u32 = config.apps.iter().map(|a| a.instances).sum();
                println!(
                    "{}: ok ({} apps, {} workers)",
                    file.display(),
                    config.apps.len(),
                    workers
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run { file: None, .. } => exit(master_run::foreground_resurrect()),
        Command::Run {
            file: Some(file),
            env,
        } => match load(&file, env.clone()) {
            Ok(config) => exit(master_run::foreground_file(config, env)),
            Err(code) => code,
        },
        Command::Daemon => exit(master_run::run_daemon()),
        Command::TakeOver { fd } => {
            exit(master::upgrade::inherit(fd).and_then(master::upgrade::take_over))
        }
        command => match ctl::client(command) {
            Outcome::Exit(code) => code,
            Outcome::Foreground(config) => exit(master_run::foreground(config)),
        },
    }
}

/// clap's own message, except for an unknown flag: clap's tip would pass it to the script,
/// which is never what a PM2 user typing `--no-vizion` meant. Ours names what to do instead.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() == ErrorKind::UnknownArgument
        && let Some(ContextValue::String(flag)) = e.get(ContextKind::InvalidArg)
        && flag.starts_with('-')
    {
        eprintln!("balancer: {}", balancer::cli::unknown_flag_hint(flag));
        return ExitCode::from(EXIT_USAGE);
    }
    let _ = e.print();
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
        _ => ExitCode::from(EXIT_USAGE),
    }
}

/// How a master's run ends: 0, or 1 with the reason.
fn exit(result: Result<(), master::MasterError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("balancer: {}", Chain(&e));
            // An app that cannot have the capture it needs is a configuration to change.
            match e {
                master::MasterError::Capture(_) => ExitCode::from(EXIT_USAGE),
                _ => ExitCode::from(EXIT_FAILED),
            }
        }
    }
}

/// `BALANCER_SCHED_POLICY` with a value we do not know is ignored (rr applies); say so.
fn warn_about_bad_policy_env() {
    if let Ok(value) = std::env::var(balancer_config::SCHED_POLICY_ENV)
        && value.parse::<balancer_config::Policy>().is_err()
    {
        tracing::warn!(
            "{}={value:?} is not a policy (rr or reuseport); using rr",
            balancer_config::SCHED_POLICY_ENV
        );
    }
}

/// Loads and validates a config as this process's master would; on failure prints every
/// diagnostic and gives exit code 2.
fn load(file: &Path, env: Option<String>) -> Result<Config, ExitCode> {
    let (opts, _) = Load::options(env, None);
    balancer_config::load(file, &opts).map_err(|errors| {
        eprintln!("{errors}");
        ExitCode::from(EXIT_USAGE)
    })
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BALANCER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}
