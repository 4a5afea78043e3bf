//! Daemon mode. The client side, here: `start` launching the background master when none is
//! running, and waiting until it answers on the admin socket.
//!
//! `start` runs this binary again as `balancer daemon` rather than forking itself: a fork is
//! fragile in a process that may have threads, and a fresh exec starts the master clean.
//! The daemon detaches itself (`setsid`) and writes `balancer.pid`; its stdout and stderr are
//! appended to `balancer.log`, so a daemon that dies at start-up leaves its reason there, and
//! [`spawn`] quotes it.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::client;
use crate::home;
use crate::protocol::{Reply, Request};

/// How long a new daemon has to answer `ping`.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How often it is asked.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long one `ping` may take while waiting.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);
/// How much of `balancer.log` an error quotes.
const QUOTED_LINES: usize = 20;

/// Launches `balancer daemon` with `home` as its `BALANCER_HOME`, detached from this process's
/// stdio, and waits (up to 10 s) until it answers `ping` on `home/admin.sock`. Returns the
/// master's pid. On failure the error quotes what the daemon wrote to `home/balancer.log`.
pub fn spawn(home: &Path) -> anyhow::Result<u32> {
    let home = std::path::absolute(home)
        .with_context(|| format!("cannot resolve the home directory {}", home.display()))?;
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&home)
        .with_context(|| format!("cannot create the home directory {}", home.display()))?;
    let log_path = home::master_log(&home);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    // Only what this daemon writes is quoted on failure, not an older one's last words.
    let log_start = log.metadata().map_or(0, |m| m.len());
    let stderr = log
        .try_clone()
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let exe = std::env::current_exe().context("cannot find the balancer binary to re-run")?;
    let mut child = Command::new(&exe)
        .arg("daemon")
        .env("BALANCER_HOME", &home)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("cannot run {} daemon", exe.display()))?;

    let socket = home::admin_socket(&home);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let last = match client::request_within(&home, &Request::Ping, ANSWER_TIMEOUT) {
            Ok(Reply::Pong(pong)) => return Ok(pong.pid),
            Ok(Reply::Failed { error, .. }) => error,
            Ok(other) => format!("unexpected reply {other:?}"),
            Err(e) => e.to_string(),
        };
        // A daemon that exits non-zero has failed; one that exits 0 may have forked again, so
        // the socket still decides.
        if let Ok(Some(status)) = child.try_wait()
            && !status.success()
        {
            bail!(
                "the master exited ({status}) before answering on {}{}",
                socket.display(),
                quote_log(&log_path, log_start)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "the master did not answer on {} within {} (last: {last}){}",
                socket.display(),
                humantime::format_duration(START_TIMEOUT),
                quote_log(&log_path, log_start)
            );
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// The last lines written to the log since `start`, indented under a heading, or a note that
/// there are none.
fn quote_log(path: &Path, start: u64) -> String {
    let lines = tail(path, start, QUOTED_LINES).unwrap_or_default();
    if lines.is_empty() {
        return format!("; {} says nothing", path.display());
    }
    let mut quoted = format!("; the end of {}:", path.display());
    for line in lines {
        quoted.push_str("\n    ");
        quoted.push_str(&line);
    }
    quoted
}

/// The last `n` lines of `path` from byte `start` on (at most the last 64 KiB of them).
fn tail(path: &Path, start: u64, n: usize) -> std::io::Result<Vec<String>> {
    const MAX_BYTES: u64 = 64 * 1024;
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let from = start.max(len.saturating_sub(MAX_BYTES));
    file.seek(SeekFrom::Start(from))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let skip = lines.len().saturating_sub(n);
    Ok(lines[skip..].iter().map(|l| (*l).to_owned()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_quoted_log_is_the_new_part_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = home::master_log(dir.path());
        let mut file = File::create(&path).unwrap();
        writeln!(file, "an old daemon's line").unwrap();
        let start = file.metadata().unwrap().len();
        for i in 0..30 {
            writeln!(file, "line {i}").unwrap();
        }
        let lines = tail(&path, start, QUOTED_LINES).unwrap();
        assert_eq!(lines.len(), QUOTED_LINES);
        assert_eq!(lines[0], "line 10");
        assert_eq!(lines[19], "line 29");

        let quoted = quote_log(&path, start);
        assert!(quoted.contains("\n    line 29"), "{quoted}");
        assert!(!quoted.contains("old daemon"), "{quoted}");
        let end = file.metadata().unwrap().len();
        assert!(quote_log(&path, end).ends_with("says nothing"));
    }
}
