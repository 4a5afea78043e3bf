//! The `balancer` binary: parse the command line, build the runtime, run the command.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use balancer::cli::{self, Cli, Command, EXIT_FAILED, EXIT_USAGE};
use balancer::master::{self, MasterOptions, Phase};
use balancer_config::{Config, LoadOptions};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
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
        Command::Run { file, env } => {
            let config = match load(&file, env) {
                Ok(config) => config,
                Err(code) => return code,
            };
            match run_foreground(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("balancer: {e:#}");
                    ExitCode::from(EXIT_FAILED)
                }
            }
        }
    }
}

/// Loads and validates a config; on failure prints every diagnostic and gives exit code 2.
fn load(file: &Path, env: Option<String>) -> Result<Config, ExitCode> {
    let opts = LoadOptions {
        env,
        ..LoadOptions::from_env()
    };
    balancer_config::load(file, &opts).map_err(|errors| {
        eprintln!("{errors}");
        ExitCode::from(EXIT_USAGE)
    })
}

fn run_foreground(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("balancer")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        spawn_signal_handler(shutdown.clone())?;
        let (phase, _) = tokio::sync::watch::channel(Phase::Starting);
        let opts = MasterOptions {
            home: cli::home(),
            shutdown,
            phase,
        };
        master::run(config, opts).await?;
        Ok(())
    })
}

/// First SIGTERM/SIGINT: graceful shutdown. A second one: leave at once (workers die with us,
/// through PR_SET_PDEATHSIG).
fn spawn_signal_handler(shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    tokio::spawn(async move {
        let mut received = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            received += 1;
            if received == 1 {
                tracing::info!("signal received: graceful shutdown (send it again to force)");
                shutdown.cancel();
            } else {
                tracing::warn!("second signal: exiting now");
                std::process::exit(130);
            }
        }
    });
    Ok(())
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
