//! Where a worker's stdout and stderr go: `$BALANCER_HOME/logs/<app>-<instance>-{out,err}.log`.
//!
//! Workers write straight into the files (their fds are the files), so logging never passes
//! through the master and costs the proxy nothing.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

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

    /// Opens both files for appending, creating the directory and the files as needed.
    pub fn open(&self) -> io::Result<(File, File)> {
        Ok((open_append(&self.out)?, open_append(&self.err)?))
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_pm2_layout_and_open_appends() {
        let home = tempfile::tempdir().unwrap();
        let logs = LogPaths::new(home.path(), "web", 2);
        assert!(logs.out.ends_with("logs/web-2-out.log"));
        assert!(logs.err.ends_with("logs/web-2-err.log"));
        use std::io::Write;
        logs.open().unwrap().0.write_all(b"one\n").unwrap();
        logs.open().unwrap().0.write_all(b"two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&logs.out).unwrap(), "one\ntwo\n");
    }
}
