//! The `balancer` binary: parse the command line, build the runtime, run the command.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use balancer::cli::{self, Cli, Command, EXIT_FAILED, EXIT_USAGE};
use balancer::commands::{self, Outcome};
use std::sync::Arc;

use balancer::master::{self, MasterOptions, Phase, Source};
use balancer_config::{Config, LoadOptions};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::ExecShim { argv } = cli.command {
        return exec_shim(argv);
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
        Command::Daemon => run_daemon(),
        command => match commands::client(command) {
            Outcome::Exit(code) => code,
            Outcome::Foreground(config) => match run_foreground(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("balancer: {e:#}");
                    ExitCode::from(EXIT_FAILED)
                }
            },
        },
    }
}

/// `balancer exec-shim -- PROGRAM ARGS…`: become PROGRAM with `LISTEN_PID` set to our pid,
/// which exec keeps. Only the reuseport policy's spawner runs this.
fn exec_shim(argv: Vec<std::ffi::OsString>) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let Some((program, args)) = argv.split_first() else {
        eprintln!("balancer exec-shim: no program given");
        return ExitCode::from(EXIT_USAGE);
    };
    let err = std::process::Command::new(program)
        .args(args)
        .env("LISTEN_PID", std::process::id().to_string())
        .exec();
    eprintln!(
        "balancer exec-shim: cannot run {}: {err}",
        program.to_string_lossy()
    );
    ExitCode::from(127)
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

/// `balancer run FILE` (and `start --no-daemon`): the master in the foreground.
fn run_foreground(config: Config) -> anyhow::Result<()> {
    let source =
        Source::File(std::path::absolute(&config.source).unwrap_or_else(|_| config.source.clone()));
    run_master(config, source)
}

/// `balancer daemon`, spawned by `start` with its stdio on `balancer.log`: leave the
/// terminal's session before any thread exists, then run a master with no apps; `start`
/// sends them over the admin socket.
fn run_daemon() -> ExitCode {
    if let Err(e) = nix::unistd::setsid() {
        tracing::warn!("setsid: {e}");
    }
    // Hold no directory busy; every path the daemon gets is absolute.
    let _ = std::env::set_current_dir("/");
    let home = cli::home();
    let config = Config {
        source: home.join(balancer::home::PID_FILE),
        balancer: Default::default(),
        apps: Vec::new(),
    };
    match run_master(config, Source::CommandLine) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("balancer: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn run_master(config: Config, source: Source) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("balancer")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        spawn_signal_handler(shutdown.clone())?;
        let (phase, _) = tokio::sync::watch::channel(Phase::Starting);
        let reload_all = Arc::new(Notify::new());
        spawn_reload_on_sighup(Arc::clone(&reload_all))?;
        let opts = MasterOptions {
            home: cli::home(),
            shutdown,
            phase,
            load: LoadOptions::from_env(),
            reload_all: Some(reload_all),
        };
        master::run(config, source, opts).await?;
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

/// SIGHUP reloads every app, like HAProxy and nginx.
fn spawn_reload_on_sighup(reload_all: Arc<Notify>) -> anyhow::Result<()> {
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            reload_all.notify_one();
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
