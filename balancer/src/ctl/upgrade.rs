//! `balancer upgrade [--binary PATH] [--timeout DURATION]`: asks the running master to hand
//! itself over to a new binary (`master/upgrade.rs` does it; `balancer/UPGRADE.md` says how),
//! printing each step as the master reports it, then which master answers now.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use balancer_workers::Chain;

use super::client::{self, Client};
use super::reply::{Outcome, failed, ok, print};
use crate::cli::{EXIT_FAILED, EXIT_USAGE};
use crate::protocol::{Reply, Request};

/// `upgrade`: progress lines, then the outcome; on success, the new master's pid and version
/// as it answers `ping` on the admin socket.
pub(super) fn upgrade(home: &Path, binary: Option<PathBuf>, timeout: Option<Duration>) -> Outcome {
    let binary = match binary.map(std::path::absolute).transpose() {
        Ok(binary) => binary,
        Err(e) => return failed(EXIT_USAGE, format!("--binary: {e}")),
    };
    if let Some(binary) = &binary
        && !binary.is_file()
    {
        return failed(
            EXIT_USAGE,
            format!("--binary {}: no such file", binary.display()),
        );
    }
    let request = Request::Upgrade {
        binary,
        timeout_ms: timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
    };
    let mut client = match Client::connect(home) {
        Ok(client) => client,
        Err(e) => return failed(EXIT_FAILED, Chain(&e)),
    };
    let mut outcome = None;
    let streamed = client.stream(&request, |reply| match reply {
        Reply::Progress(line) => {
            print(line);
            ControlFlow::Continue(())
        }
        Reply::Failed { error, code } => {
            outcome = Some((failed(code, format!("upgrade failed: {error}")), false));
            ControlFlow::Break(())
        }
        Reply::Done { message, .. } => {
            print(message);
            outcome = Some((ok(), true));
            ControlFlow::Break(())
        }
        other => {
            outcome = Some((
                failed(EXIT_FAILED, format!("unexpected reply {other:?}")),
                false,
            ));
            ControlFlow::Break(())
        }
    });
    let (outcome, upgraded) = match (outcome, streamed) {
        (Some(outcome), _) => outcome,
        (None, Err(e)) => return failed(EXIT_FAILED, Chain(&e)),
        (None, Ok(())) => {
            return failed(EXIT_FAILED, "the master hung up before the upgrade ended");
        }
    };
    if upgraded {
        match client::request(home, &Request::Ping) {
            Ok(Reply::Pong(pong)) => print(format!(
                "master pid {}, version {} answers on {}",
                pong.pid,
                pong.version.as_deref().unwrap_or("?"),
                crate::home::admin_socket(home).display()
            )),
            Ok(other) => return failed(EXIT_FAILED, format!("ping after the upgrade: {other:?}")),
            Err(e) => {
                return failed(
                    EXIT_FAILED,
                    format!("ping after the upgrade: {}", Chain(&e)),
                );
            }
        }
    }
    outcome
}
