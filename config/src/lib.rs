//! `balancer.toml`: parsing, validation, defaults, env selection, and errors that point at
//! `file:line:col`.
//!
//! The pipeline is `raw` (toml's spanned document, read by hand) → `validate` (one function per
//! table, every problem collected) → [`model`] (plain data, every default applied). Nothing
//! downstream re-validates.
//!
//! # Precedence
//!
//! - **Values:** the defaults in [`defaults`] < what the file says.
//! - **Worker environment:** the app's `env` < its `env_<name>` table, where `<name>` is the one
//!   chosen with `--env <name>` ([`LoadOptions::env`]); other `env_<name>` tables are checked
//!   but not used. (Like PM2, minus PM2's habit of also passing the CLI user's whole
//!   environment; that is the supervisor's business, not the file's.)
//! - **Policy:** the app's `policy` key > [`LoadOptions::default_policy`] (which the binary takes
//!   from `BALANCER_SCHED_POLICY`, as Node takes `NODE_CLUSTER_SCHED_POLICY`) > `rr`.
//! - **Paths:** `cwd` defaults to the file's directory and is relative to it; `script` and any
//!   program given as a path are relative to `cwd`.
//!
//! # Errors
//!
//! [`parse`] reports every problem it finds, not just the first, as [`Diagnostic`]s in file
//! order: syntax errors, unknown keys (with a "did you mean"), wrong types, bad values, duplicate
//! app names, two listeners on one address, missing files. If the TOML itself is broken, only the
//! syntax errors are reported.

pub mod defaults;
mod error;
pub mod logging;
pub mod model;
mod raw;
mod triggers;
mod validate;
mod values;

#[cfg(test)]
mod tests;

use std::path::Path;

pub use error::{ConfigErrors, Diagnostic};
pub use model::*;
pub use triggers::parse_cron;
pub use validate::in_path;
pub use values::{parse_duration, parse_listen_url, parse_signal, parse_size};

/// The env var that sets the policy of apps that do not choose one.
pub const SCHED_POLICY_ENV: &str = "BALANCER_SCHED_POLICY";

/// What the file alone cannot say: the selected environment, the default policy, the CPU count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// `--env <name>`: which `env_<name>` table goes on top of `env`.
    pub env: Option<String>,
    /// The policy of apps without a `policy` key.
    pub default_policy: Policy,
    /// CPUs available, for `instances = "max"` and negative counts.
    pub cpus: u32,
}

impl LoadOptions {
    /// The options of this process: CPUs from `available_parallelism`, the default policy from
    /// `BALANCER_SCHED_POLICY` (`rr` or `reuseport`; anything else is ignored here, the binary
    /// may warn about it), and no `--env`.
    pub fn from_env() -> Self {
        let cpus = std::thread::available_parallelism()
            .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
        let default_policy = std::env::var(SCHED_POLICY_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_default();
        LoadOptions {
            env: None,
            default_policy,
            cpus,
        }
    }
}

/// The largest balancer.toml [`load`] reads: a real one is a few KiB, and a bound keeps a
/// mistaken path (`/dev/zero`, a log file) from eating the master's memory.
pub const MAX_FILE_SIZE: u64 = 1024 * 1024;

/// Reads and validates the file at `path`. An unreadable file is one [`Diagnostic`] without a
/// line or column.
///
/// Only a regular file of at most [`MAX_FILE_SIZE`] bytes is read. It is opened non-blocking
/// and checked before any read, so a FIFO, a device or a socket is refused at once instead of
/// blocking the reader until someone writes to it.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Config, ConfigErrors> {
    let source = read_bounded(path).map_err(|e| Diagnostic::whole_file(path, e))?;
    parse(&source, path, opts)
}

fn read_bounded(path: &Path) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot read the file: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read the file: {e}"))?;
    if !meta.file_type().is_file() {
        return Err("not a regular file; give the path of a balancer.toml".to_owned());
    }
    if meta.len() > MAX_FILE_SIZE {
        return Err(format!(
            "{} bytes is too large for a balancer.toml (at most {MAX_FILE_SIZE})",
            meta.len()
        ));
    }
    let mut text = String::new();
    // The size was checked, but a file can grow while it is read: the read is bounded too.
    file.take(MAX_FILE_SIZE + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the file: {e}"))?;
    if text.len() as u64 > MAX_FILE_SIZE {
        return Err(format!(
            "too large for a balancer.toml (at most {MAX_FILE_SIZE} bytes)"
        ));
    }
    Ok(text)
}

/// Validates `source` as if read from `path`: `path` names the file in messages and its
/// directory anchors relative paths. Files named in the config (`cwd`, `script`) are checked.
pub fn parse(source: &str, path: &Path, opts: &LoadOptions) -> Result<Config, ConfigErrors> {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut sink = error::Sink::new(path, source);
    let config = raw::document(source, &mut sink).map(|doc| {
        let ctx = validate::Context {
            source: absolute,
            opts,
        };
        validate::config(&doc, &ctx, &mut sink)
    });
    sink.finish()?;
    config.ok_or_else(|| Diagnostic::whole_file(path, "invalid TOML").into())
}
