//! What every verb does with the master: find it, send one request, and turn the reply (or
//! the lack of one) into printed text and an exit code.

use std::fmt::Display;
use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use balancer_config::{Config, ConfigErrors};
use balancer_workers::Chain;

use super::client;
use crate::cli::{EXIT_FAILED, EXIT_USAGE};
use crate::protocol::{Pong, Reply, Request};
use crate::ui::{self, Output};

/// How long `ping` (and the look for a running master) waits for the master.
pub(super) const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// What `main` should do once a client verb is done.
#[derive(Debug)]
pub enum Outcome {
    /// Exit with this code; everything has been printed.
    Exit(ExitCode),
    /// `start --no-daemon`: run this config in the foreground, as `run` does.
    Foreground(Config),
}

/// The running master's `ping` reply, or `None` when no master is running.
pub(super) fn running_master(home: &Path) -> Result<Option<Pong>, Outcome> {
    match client::request_within(home, &Request::Ping, PING_TIMEOUT) {
        Ok(Reply::Pong(pong)) => Ok(Some(pong)),
        Ok(Reply::Failed { error, code }) => Err(failed(code, error)),
        Ok(other) => Err(unexpected(&other)),
        Err(e) if e.is_no_master() => Ok(None),
        Err(e) => Err(failed(EXIT_FAILED, Chain(&e))),
    }
}

/// Sends `request` and prints what was done: the message, then the workers touched.
pub(super) fn act(home: &Path, request: &Request, output: Output) -> Outcome {
    match send(home, request) {
        Ok(reply) => {
            report(&reply, output);
            ok()
        }
        Err(outcome) => outcome,
    }
}

/// One request, one successful reply; a refusal or no reply is printed and becomes the exit
/// code.
pub(super) fn send(home: &Path, request: &Request) -> Result<Reply, Outcome> {
    match client::request(home, request) {
        Ok(Reply::Failed { error, code }) => Err(failed(code, error)),
        Ok(reply) => Ok(reply),
        Err(e) => Err(failed(EXIT_FAILED, Chain(&e))),
    }
}

pub(super) fn report(reply: &Reply, output: Output) {
    if let Reply::Done { message, workers } = reply {
        print(message);
        if !workers.is_empty() {
            print(ui::table::workers(workers, output));
        }
    }
}

/// A reply of the wrong kind for the request (a master of another version?).
pub(super) fn unexpected(reply: &Reply) -> Outcome {
    failed(
        EXIT_FAILED,
        format!("the master's reply does not answer the request: {reply:?}"),
    )
}

pub(super) fn config_errors(errors: &ConfigErrors) -> Outcome {
    eprintln!("{errors}");
    Outcome::Exit(ExitCode::from(EXIT_USAGE))
}

pub(super) fn is_toml(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "toml")
}

pub(super) fn failed(code: u8, message: impl Display) -> Outcome {
    eprintln!("balancer: {message}");
    Outcome::Exit(ExitCode::from(code))
}

pub(super) fn ok() -> Outcome {
    Outcome::Exit(ExitCode::SUCCESS)
}

/// Prints to stdout; a closed stdout is not worth a panic.
pub(super) fn print(text: impl Display) {
    let _ = write_line(&text.to_string());
}

pub(super) fn write_line(line: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}
