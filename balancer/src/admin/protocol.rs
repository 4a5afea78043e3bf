//! The admin protocol: newline-delimited JSON over `$BALANCER_HOME/admin.sock`.
//!
//! One request object per line, `{"cmd":"scale","app":"web","to":"+2"}`; one reply object per
//! line, `{"ok":true,…}` or `{"ok":false,"error":"…"}`. `logs` with `follow` streams replies
//! (one per log line) until the client hangs up. The CLI is only a client of this; any language
//! can script it with a unix socket and a JSON library. The README documents every command.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The longest request line the master reads; longer ones get an error and the connection is
/// closed.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// One request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Is a master there? Replies with its pid and version.
    // Empty struct variants rather than unit ones: serde ignores `deny_unknown_fields` on unit
    // variants of an internally tagged enum, and `{"cmd":"ping","x":1}` must be an error.
    Ping {},
    /// Every worker of every app (`ls`, `jlist`).
    List {},
    /// One app (by name) or worker (by id) in detail.
    Show {
        /// App name or worker id.
        target: String,
    },
    /// Start apps: from a file (`file`, `env`), from an inline balancer.toml built by the CLI for
    /// `balancer start server.js …` (`toml`, with relative paths resolved against `cwd`), or
    /// stopped apps/workers again (`target`: name, id or `all`). Exactly one of the three.
    Start {
        /// Absolute path of a balancer.toml.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file: Option<PathBuf>,
        /// `--env NAME` for `file` or `toml`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        env: Option<String>,
        /// balancer.toml text.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        toml: Option<String>,
        /// The directory `toml`'s relative paths are relative to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cwd: Option<PathBuf>,
        /// A stopped app or worker to start again.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<String>,
    },
    /// Drain and stop (the app stays listed; its listeners keep holding connections).
    Stop {
        /// App name, worker id or `all`.
        target: String,
    },
    /// Stop, then start (may drop connections, as in PM2).
    Restart {
        /// App name, worker id or `all`.
        target: String,
    },
    /// Zero-downtime replacement of workers, or apply a changed balancer.toml (`file`).
    Reload {
        /// App name, worker id or `all`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<String>,
        /// A balancer.toml whose changes to apply.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file: Option<PathBuf>,
        /// `--env NAME` for `file`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        env: Option<String>,
    },
    /// Stop and forget (its listeners close).
    Delete {
        /// App name, worker id or `all`.
        target: String,
    },
    /// Change an app's worker count: `"3"`, `"+2"`, `"-1"` or `"max"`.
    Scale {
        /// App name.
        app: String,
        /// The new count.
        to: String,
    },
    /// Log lines: the last `lines` of each file, then (with `follow`) new ones as they come.
    Logs {
        /// Only this app (or worker id).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<String>,
        /// How many past lines per file.
        #[serde(default = "default_lines")]
        lines: usize,
        /// Keep streaming.
        #[serde(default)]
        follow: bool,
    },
    /// Empty the log files (of one app or worker id, or all).
    Flush {
        /// Only this app (or worker id).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<String>,
    },
    /// Stop every app, then the master itself.
    Kill {},
}

fn default_lines() -> usize {
    15
}

/// One reply. `ok` is always there; the rest depends on the request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The exit code the CLI should use for this failure (1 failed, 2 bad usage or config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u8>,
    /// What was done, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `ping`: the master's pid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// `ping`: the master's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `list`, and the workers an operation touched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<Vec<WorkerInfo>>,
    /// `show` of an app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<AppInfo>,
    /// `logs`: one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogLine>,
    /// `logs`: the last reply of a non-following stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<bool>,
}

impl Reply {
    /// A success with a message.
    pub fn done(message: impl Into<String>) -> Self {
        Reply {
            ok: true,
            message: Some(message.into()),
            ..Reply::default()
        }
    }

    /// A failure (exit code 1).
    pub fn failed(error: impl Into<String>) -> Self {
        Reply {
            ok: false,
            error: Some(error.into()),
            code: Some(1),
            ..Reply::default()
        }
    }

    /// A bad request or config (exit code 2).
    pub fn bad_request(error: impl Into<String>) -> Self {
        Reply {
            code: Some(2),
            ..Reply::failed(error)
        }
    }
}

/// One worker, as `ls` and `jlist` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Worker id (stable across restarts and reloads of the same slot).
    pub id: u32,
    /// App name.
    pub app: String,
    /// `BALANCER_INSTANCE`.
    pub instance: u32,
    /// Process id, when running.
    pub pid: Option<u32>,
    /// `rr` or `reuseport`.
    pub policy: String,
    /// starting, ready, unhealthy, draining, stopping, stopped, errored, waiting-restart.
    pub status: String,
    /// Restarts (crash restarts and reloads).
    pub restarts: u32,
    /// Milliseconds since the current process started.
    pub uptime_ms: Option<u64>,
    /// Connections proxied to it right now.
    pub connections: usize,
    /// The app's public listeners.
    pub listeners: Vec<String>,
    /// The worker's private addresses.
    pub private: Vec<String>,
    /// How the previous process ended.
    pub last_exit: Option<String>,
    /// Why it is errored/unhealthy/restarting.
    pub reason: Option<String>,
}

/// One app in detail (`show`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppInfo {
    /// App name.
    pub name: String,
    /// The whole resolved configuration, every default applied.
    pub config: serde_json::Value,
    /// Log files, per instance: `[instance, out, err]`.
    pub logs: Vec<(u32, PathBuf, PathBuf)>,
    /// Its workers.
    pub workers: Vec<WorkerInfo>,
}

/// One line of a worker's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// App name.
    pub app: String,
    /// Instance number.
    pub instance: u32,
    /// `out` or `err`.
    pub stream: String,
    /// The line, without its newline.
    pub line: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_documented() {
        let r: Request = serde_json::from_str(r#"{"cmd":"scale","app":"web","to":"+2"}"#).unwrap();
        assert_eq!(
            r,
            Request::Scale {
                app: "web".into(),
                to: "+2".into()
            }
        );
        let r: Request = serde_json::from_str(r#"{"cmd":"logs","follow":true}"#).unwrap();
        assert_eq!(
            r,
            Request::Logs {
                target: None,
                lines: 15,
                follow: true
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"ping","x":1}"#).is_err());
    }

    #[test]
    fn replies_omit_what_they_do_not_carry() {
        let json = serde_json::to_string(&Reply::failed("no such app: x")).unwrap();
        assert_eq!(json, r#"{"ok":false,"error":"no such app: x","code":1}"#);
    }
}
