//! The verbs other than `start`: `reload`, `ls`, `jlist`, `show`, `logs`, `ping`, `kill`,
//! `monit` (the admin socket handed to [`crate::monit`]), and the two that need no master,
//! `ecosystem` and `completions`. The one-line ones (`stop`,
//! `delete`, `scale`, `reset`, `send-signal`, …) are dispatched straight from `mod.rs`.

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use balancer_workers::Chain;

use super::client::{self, Client};
use super::reply::{
    Outcome, PING_TIMEOUT, act, config_errors, failed, is_toml, ok, print, report, running_master,
    send, unexpected, write_line,
};
use crate::cli::{EXIT_FAILED, EXIT_USAGE};
use crate::protocol::{Load, Reload, Reply, Request};
use crate::ui::{self, Output};

/// How long `kill` waits for the master to be gone after it said yes.
const KILL_WAIT: Duration = Duration::from_secs(120);

/// `reload NAME|ID|all`, or `reload balancer.toml [--env NAME]` (checked here first, as the
/// running master will read it).
pub(super) fn reload(home: &Path, target: String, env: Option<String>, output: Output) -> Outcome {
    let path = Path::new(&target);
    let request = if path.is_file() {
        let master = match running_master(home) {
            Ok(master) => master,
            Err(outcome) => return outcome,
        };
        let (opts, load) = Load::options(env, master.as_ref());
        if let Err(errors) = balancer_config::load(path, &opts) {
            return config_errors(&errors);
        }
        match std::path::absolute(path) {
            Ok(file) => Request::Reload(Reload::File { file, load }),
            Err(e) => return failed(EXIT_FAILED, format!("{target}: {e}")),
        }
    } else if is_toml(path) {
        return failed(EXIT_USAGE, format!("{target}: no such file"));
    } else if env.is_some() {
        return failed(
            EXIT_USAGE,
            "--env goes with a balancer.toml: balancer reload FILE --env NAME",
        );
    } else {
        let request = Request::Reload(Reload::Target {
            target,
            progress: true,
        });
        return reload_showing_progress(home, &request, output);
    };
    act(home, &request, output)
}

/// A reload of workers, printing each progress line as the master sends it (a drain can take
/// `drain_timeout`: the user sees what it waits for), then the outcome.
fn reload_showing_progress(home: &Path, request: &Request, output: Output) -> Outcome {
    let mut client = match Client::connect(home) {
        Ok(client) => client,
        Err(e) => return failed(EXIT_FAILED, Chain(&e)),
    };
    let mut outcome = None;
    let streamed = client.stream(request, |reply| match reply {
        Reply::Progress(line) => {
            print(line);
            ControlFlow::Continue(())
        }
        Reply::Failed { error, code } => {
            outcome = Some(failed(code, error));
            ControlFlow::Break(())
        }
        done => {
            report(&done, output);
            outcome = Some(ok());
            ControlFlow::Break(())
        }
    });
    match (outcome, streamed) {
        (Some(outcome), _) => outcome,
        (None, Err(e)) => failed(EXIT_FAILED, Chain(&e)),
        (None, Ok(())) => failed(EXIT_FAILED, "the master hung up before the reload ended"),
    }
}

/// The workers of a `list` reply.
fn workers(home: &Path) -> Result<Vec<crate::protocol::WorkerInfo>, Outcome> {
    match send(home, &Request::List)? {
        Reply::Workers(workers) => Ok(workers),
        other => Err(unexpected(&other)),
    }
}

/// `ls`: the workers table. No master is no workers, as in PM2: an empty table, a hint on
/// stderr, exit 0 (scripts that want to know whether one runs have `ping`).
pub(super) fn ls(home: &Path, output: Output) -> Outcome {
    match client::request(home, &Request::List) {
        Err(e) if e.is_no_master() => {
            print(ui::table::workers(&[], output));
            eprintln!("balancer: no master is running; `balancer start APP` starts one");
            ok()
        }
        Ok(Reply::Workers(workers)) => {
            print(ui::table::workers(&workers, output));
            // Which master answered: after `upgrade`, the new pid and version show here.
            if let Ok(Reply::Pong(pong)) =
                client::request_within(home, &Request::Ping, PING_TIMEOUT)
            {
                print(format!(
                    "master pid {}, version {}",
                    pong.pid,
                    pong.version.as_deref().unwrap_or("?")
                ));
            }
            ok()
        }
        Ok(Reply::Failed { error, code }) => failed(code, error),
        Ok(other) => unexpected(&other),
        Err(e) => failed(EXIT_FAILED, Chain(&e)),
    }
}

/// `jlist`: the workers as one line of JSON, exactly as the master sent them.
pub(super) fn jlist(home: &Path) -> Outcome {
    match workers(home) {
        Ok(workers) => match serde_json::to_string(&workers) {
            Ok(json) => {
                print(json);
                ok()
            }
            Err(e) => failed(
                EXIT_FAILED,
                format!("cannot print the workers as JSON: {e}"),
            ),
        },
        Err(outcome) => outcome,
    }
}

/// `show NAME|ID`: the app page.
pub(super) fn show(home: &Path, target: String, output: Output) -> Outcome {
    match send(home, &Request::Show { target }) {
        Ok(Reply::App(app)) => {
            print(ui::table::app(&app, output).trim_end());
            ok()
        }
        Ok(other) => unexpected(&other),
        Err(outcome) => outcome,
    }
}

/// `logs`: past lines, then (with `follow`) new ones until interrupted or stdout closes.
pub(super) fn logs(home: &Path, request: Request, json: bool, output: Output) -> Outcome {
    let mut client = match Client::connect(home) {
        Ok(client) => client,
        Err(e) => return failed(EXIT_FAILED, Chain(&e)),
    };
    let mut refused = None;
    let streamed = client.stream(&request, |reply| match reply {
        Reply::Log(log) => {
            let line = if json {
                serde_json::to_string(&log).unwrap_or_default()
            } else {
                ui::log_line(&log, output)
            };
            if write_line(&line).is_err() {
                // Whoever read our stdout is gone (`| head`): so is the point of going on.
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }
        Reply::End => ControlFlow::Break(()),
        Reply::Failed { error, code } => {
            refused = Some(failed(code, error));
            ControlFlow::Break(())
        }
        _ => ControlFlow::Continue(()),
    });
    if let Some(outcome) = refused {
        return outcome;
    }
    match streamed {
        Ok(()) => ok(),
        Err(e) => failed(EXIT_FAILED, Chain(&e)),
    }
}

/// `monit`: the dashboard on a terminal. No master: the usual error and exit 1, before the
/// terminal is touched; not a terminal: exit 2.
pub(super) fn monit(home: &Path, interval_ms: u64) -> Outcome {
    let socket = Socket(home.to_path_buf());
    let first = match socket.open(&Request::Subscribe {
        interval_ms,
        logs: None,
    }) {
        Ok(first) => first,
        Err(e) => return failed(EXIT_FAILED, Chain(&e)),
    };
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return failed(
            EXIT_USAGE,
            "monit needs a terminal; for scripts use `balancer jlist` or the `subscribe` request",
        );
    }
    match crate::monit::run(Arc::new(socket), Box::new(first), interval_ms) {
        Ok(()) => ok(),
        Err(e) => failed(EXIT_FAILED, Chain(&e)),
    }
}

/// The admin socket of a home, as `monit` reaches the master.
struct Socket(PathBuf);

/// A subscription on its own connection.
struct Stream(Client);

impl Socket {
    fn open(&self, request: &Request) -> Result<Stream, client::ClientError> {
        let mut client = Client::connect(&self.0)?;
        client.open_stream(request)?;
        Ok(Stream(client))
    }
}

impl crate::monit::Admin for Socket {
    fn subscribe(&self, request: &Request) -> Result<Box<dyn crate::monit::Subscription>, String> {
        match self.open(request) {
            Ok(stream) => Ok(Box::new(stream)),
            Err(e) => Err(Chain(&e).to_string()),
        }
    }

    fn call(&self, request: &Request) -> Result<Reply, String> {
        client::request(&self.0, request).map_err(|e| Chain(&e).to_string())
    }
}

impl crate::monit::Subscription for Stream {
    fn next(&mut self) -> Result<Option<Reply>, String> {
        self.0.next_reply().map_err(|e| Chain(&e).to_string())
    }

    fn closer(&self) -> Box<dyn FnOnce() + Send> {
        let handle = self.0.handle();
        Box::new(move || {
            if let Ok(stream) = handle {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        })
    }
}

/// `ping`: the master's pid and version, or that there is none (exit 1).
pub(super) fn ping(home: &Path) -> Outcome {
    let pong = match client::request_within(home, &Request::Ping, PING_TIMEOUT) {
        Ok(Reply::Pong(pong)) => pong,
        Ok(Reply::Failed { error, code }) => return failed(code, error),
        Ok(other) => return unexpected(&other),
        Err(e) => return failed(EXIT_FAILED, Chain(&e)),
    };
    let version = pong.version.as_deref().unwrap_or("?");
    print(format!(
        "master running: pid {}, version {version}",
        pong.pid
    ));
    let ours = env!("CARGO_PKG_VERSION");
    if pong.version.as_deref().is_some_and(|v| v != ours) {
        eprintln!(
            "balancer: the master runs version {version} and this CLI is {ours}; \
             `balancer upgrade` replaces it without dropping a connection"
        );
    }
    ok()
}

/// `kill`: stop everything and the master, and wait until it is gone. No master is fine.
pub(super) fn kill(home: &Path, output: Output) -> Outcome {
    let reply = match client::request(home, &Request::Kill) {
        Ok(Reply::Failed { error, code }) => return failed(code, error),
        Ok(reply) => reply,
        Err(e) if e.is_no_master() => {
            eprintln!("balancer: {e}");
            return ok();
        }
        Err(e) => return failed(EXIT_FAILED, Chain(&e)),
    };
    report(&reply, output);
    // The reply can come before the master has exited; a `start` right after `kill` must not
    // find the old one still answering.
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        match client::request_within(home, &Request::Ping, Duration::from_secs(1)) {
            Err(e) if e.is_no_master() => return ok(),
            _ if Instant::now() >= deadline => {
                return failed(
                    EXIT_FAILED,
                    format!(
                        "the master is still running {} after `kill`",
                        humantime::format_duration(KILL_WAIT)
                    ),
                );
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The commented sample `ecosystem` writes.
pub(super) const SAMPLE_TOML: &str = include_str!("sample.toml");

/// `ecosystem [FILE]` (alias `init`): writes the sample balancer.toml, never over a file.
pub(super) fn ecosystem(file: &Path) -> Outcome {
    use std::io::Write as _;
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(file)
        .and_then(|mut f| f.write_all(SAMPLE_TOML.as_bytes()));
    match created {
        Ok(()) => {
            print(format!(
                "wrote {}; edit it, then `balancer check {}` and `balancer start {}`",
                file.display(),
                file.display(),
                file.display()
            ));
            ok()
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => failed(
            EXIT_USAGE,
            format!("{} exists; not overwriting it", file.display()),
        ),
        Err(e) => failed(EXIT_FAILED, format!("cannot write {}: {e}", file.display())),
    }
}

/// `completions SHELL`: clap_complete's script for the whole command line.
pub(super) fn completions(shell: clap_complete::Shell) -> Outcome {
    use clap::CommandFactory;
    let mut command = crate::cli::Cli::command();
    clap_complete::generate(shell, &mut command, "balancer", &mut std::io::stdout());
    ok()
}

/// `import FILE`: PM2's ecosystem file as balancer.toml on stdout, a comment in it and a
/// warning on stderr for every key it could not carry.
pub(super) fn import(file: &Path) -> Outcome {
    // Evaluating any other JavaScript file would run it: an app, not a config.
    if !super::import::is_ecosystem(file) {
        return failed(
            EXIT_USAGE,
            format!(
                "{}: not a PM2 ecosystem file; expected *.config.js (.cjs, .mjs), *.json, *.yaml \
                 or *.yml",
                file.display()
            ),
        );
    }
    let imported = match super::import::import(file) {
        Ok(imported) => imported,
        Err(e) => return failed(EXIT_USAGE, e),
    };
    for warning in &imported.warnings {
        eprintln!("balancer: {}: warning: {warning}", file.display());
    }
    print(format!(
        "# balancer.toml imported from {} by `balancer import`.\n\
         # Relative paths are relative to this file's directory: keep it next to the original.\n\n{}",
        file.display(),
        imported.toml.trim_end()
    ));
    ok()
}
