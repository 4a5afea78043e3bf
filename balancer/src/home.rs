//! `$BALANCER_HOME`: where it is, the names of the files in it (the one place they are built),
//! and one master per home, enforced by a lock on `balancer.pid`, which also tells other
//! processes the master's pid.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// The pid file, locked for as long as the master runs.
pub const PID_FILE: &str = "balancer.pid";
/// The admin socket.
pub const ADMIN_SOCKET: &str = "admin.sock";
/// The daemon's own log.
pub const MASTER_LOG: &str = "balancer.log";

/// `$BALANCER_HOME`, or `~/.balancer`.
pub fn from_env() -> PathBuf {
    if let Some(home) = std::env::var_os("BALANCER_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    let base = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    base.join(".balancer")
}

/// The admin socket of the master whose home is `home`.
pub fn admin_socket(home: &Path) -> PathBuf {
    home.join(ADMIN_SOCKET)
}

/// The daemon's own log (its stdout and stderr).
pub fn master_log(home: &Path) -> PathBuf {
    home.join(MASTER_LOG)
}

/// Why the home could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another master holds the lock.
    #[error("a master is already running on {home} (pid {pid})")]
    Taken {
        /// The home.
        home: String,
        /// The other master's pid, as its pid file says.
        pid: String,
    },
    /// The home or the pid file could not be created.
    #[error("cannot prepare {0}")]
    Io(PathBuf, #[source] io::Error),
}

/// The home, held: while this lives, no other master can run on it.
#[derive(Debug)]
pub struct HomeLock {
    home: PathBuf,
    _lock: Flock<File>,
}

impl HomeLock {
    /// Creates the home (mode 0700) if needed and takes its lock, writing our pid.
    pub fn acquire(home: &Path) -> Result<HomeLock, LockError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(home)
            .map_err(|e| LockError::Io(home.to_path_buf(), e))?;
        let path = home.join(PID_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| LockError::Io(path.clone(), e))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                return Err(LockError::Taken {
                    home: home.display().to_string(),
                    pid: pid.trim().to_string(),
                });
            }
            Err((_, errno)) => return Err(LockError::Io(path, errno.into())),
        };
        let write = |f: &mut File| -> io::Result<()> {
            f.set_len(0)?;
            f.rewind()?;
            writeln!(f, "{}", std::process::id())?;
            f.sync_all()
        };
        write(&mut lock).map_err(|e| LockError::Io(path, e))?;
        Ok(HomeLock {
            home: home.to_path_buf(),
            _lock: lock,
        })
    }

    /// Where the admin socket goes.
    pub fn admin_socket(&self) -> PathBuf {
        admin_socket(&self.home)
    }
}

impl Drop for HomeLock {
    fn drop(&mut self) {
        // Remove while still holding the lock, so a new master never loses its fresh files.
        let _ = std::fs::remove_file(admin_socket(&self.home));
        let _ = std::fs::remove_file(self.home.join(PID_FILE));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_master_per_home() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let first = HomeLock::acquire(&home).unwrap();
        let pid = std::fs::read_to_string(home.join(PID_FILE)).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
        match HomeLock::acquire(&home) {
            Err(LockError::Taken { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("second lock: {other:?}"),
        }
        drop(first);
        assert!(!home.join(PID_FILE).exists());
        HomeLock::acquire(&home).expect("free again");
    }
}
