//! Worker logs: where a worker's stdout and stderr go
//! (`$BALANCER_HOME/logs/<app>-<instance>-{out,err}.log`, or one file per app with
//! `merge_logs`), how they get there, and reading them back.
//!
//! Two ways in. By default workers write straight into their files (their fds are the files),
//! so logging never passes through the master and costs the proxy nothing. With `time`,
//! `merge_logs` or `log_max_size` the master must see every line, so the worker's stdout and
//! stderr are pipes read by one dedicated OS thread ([`relay`]), which prefixes, tags, writes
//! and rotates ([`rotate`]); the tokio runtime that proxies never touches them. Reading back
//! (tail, follow, flush, interleaving by time) is [`read`]: blocking file I/O the master calls
//! off its runtime threads.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

pub mod read;
pub mod relay;
pub mod rotate;

pub use read::{Follower, flush, interleave, stamp_of, tail};

/// The two log files of one worker instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPaths {
    /// The worker's stdout.
    pub out: PathBuf,
    /// The worker's stderr.
    pub err: PathBuf,
}

impl LogPaths {
    /// The log files of `app`'s instance `instance` under `home`.
    pub fn new(home: &Path, app: &str, instance: u32) -> Self {
        let dir = home.join("logs");
        LogPaths {
            out: dir.join(format!("{app}-{instance}-out.log")),
            err: dir.join(format!("{app}-{instance}-err.log")),
        }
    }

    /// The log files of `app`'s instance `instance`: its `out_file`/`error_file` when set
    /// (instance N > 0 writes `<stem>-N.<ext>` beside it, so the first instance, and an app of
    /// one worker, writes exactly the file named), else the home's [`new`](Self::new) files.
    /// With `merge_logs` every instance has the same files: the ones named, or the home's
    /// `<app>-out.log` and `<app>-err.log`.
    pub fn for_app(home: &Path, app: &balancer_config::App, instance: u32) -> Self {
        let merged = app.logs.merge;
        let default = if merged {
            let dir = home.join("logs");
            LogPaths {
                out: dir.join(format!("{}-out.log", app.name)),
                err: dir.join(format!("{}-err.log", app.name)),
            }
        } else {
            Self::new(home, &app.name, instance)
        };
        let pick = |given: &Option<PathBuf>, default: PathBuf| match given {
            Some(path) if merged => path.clone(),
            Some(path) => numbered(path, instance),
            None => default,
        };
        LogPaths {
            out: pick(&app.out_file, default.out),
            err: pick(&app.error_file, default.err),
        }
    }

    /// Whether stdout and stderr go to one file (`log_file`).
    pub fn combined(&self) -> bool {
        self.out == self.err
    }

    /// Opens both files for appending, creating the directory and the files as needed.
    pub fn open(&self) -> io::Result<(File, File)> {
        Ok((open_append(&self.out)?, open_append(&self.err)?))
    }
}

/// `path` for instance `instance`: itself for 0, else `<stem>-N<.ext>` in the same directory.
fn numbered(path: &Path, instance: u32) -> PathBuf {
    if instance == 0 {
        return path.to_path_buf();
    }
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
    let name = match (stem, path.extension()) {
        (Some(stem), Some(ext)) => format!("{stem}-{instance}.{}", ext.to_string_lossy()),
        (Some(stem), None) => format!("{stem}-{instance}"),
        (None, _) => format!("{instance}.log"),
    };
    path.with_file_name(name)
}

/// Every `*.log` file in the home's log directory (the default files of every app, current or
/// deleted), for `flush` of everything. Rotated files are not listed: flushing a file removes
/// its rotated ones ([`flush`]).
pub fn home_files(home: &Path) -> io::Result<Vec<PathBuf>> {
    let dir = home.join("logs");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "log") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Opens a log for appending: created 0640 (logs may hold secrets), never through a symlink
/// (a planted link would make the master write into another file).
pub(crate) fn open_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
}

/// Nice this thread (Linux gives each thread its own nice value): when the CPU is short, the
/// scheduler serves the runtime that proxies first, and a flood of logs slows the flooding
/// worker (its pipe fills while the relay waits for the CPU) rather than the proxy.
pub(crate) fn lower_priority() {
    let tid = nix::unistd::gettid().as_raw();
    // SAFETY: setpriority(2) takes plain integers and touches no memory of ours.
    #[allow(unsafe_code)]
    let done = unsafe {
        nix::libc::setpriority(nix::libc::PRIO_PROCESS, tid as nix::libc::id_t, RELAY_NICE)
    };
    if done != 0 {
        tracing::debug!(
            "log thread: cannot lower its priority: {}",
            io::Error::last_os_error()
        );
    }
}

/// The nice value of the log threads (the proxy's runtime keeps the master's, usually 0).
const RELAY_NICE: i32 = 10;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn paths_follow_pm2_layout_and_open_appends() {
        let home = tempfile::tempdir().unwrap();
        let logs = LogPaths::new(home.path(), "web", 2);
        assert!(logs.out.ends_with("logs/web-2-out.log"));
        assert!(logs.err.ends_with("logs/web-2-err.log"));
        logs.open().unwrap().0.write_all(b"one\n").unwrap();
        logs.open().unwrap().0.write_all(b"two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&logs.out).unwrap(), "one\ntwo\n");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&logs.out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640, "logs may hold secrets");
        // A link planted where a log goes is not followed, for appending or for flushing.
        let victim = home.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let planted = LogPaths::new(home.path(), "evil", 0);
        std::os::unix::fs::symlink(&victim, &planted.out).unwrap();
        assert!(planted.open().is_err());
        assert!(flush(&planted.out).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    }
}
