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

/// What `save` writes and `resurrect` reads (mode 0600: env values may be secrets).
pub const DUMP_FILE: &str = "dump.json";

/// The dump of the master whose home is `home`.
pub fn dump_file(home: &Path) -> PathBuf {
    home.join(DUMP_FILE)
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
    /// The home (or its `logs/`) could be changed by someone else: refused, like ssh's
    /// StrictModes, since the master writes there (as root, maybe) and trusts what it finds.
    #[error("{} is unsafe: {why}; {fix}", path.display())]
    Unsafe {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
        /// What to do.
        fix: String,
    },
}

/// The home's `logs/` directory.
pub const LOGS_DIR: &str = "logs";

/// Checks that `dir` is a real directory (not a symlink), owned by us, that nobody else may
/// write to.
pub fn check_private(dir: &Path) -> Result<(), LockError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir).map_err(|e| LockError::Io(dir.to_path_buf(), e))?;
    let unsafe_because = |why: String, fix: String| LockError::Unsafe {
        path: dir.to_path_buf(),
        why,
        fix,
    };
    if meta.file_type().is_symlink() {
        return Err(unsafe_because(
            "it is a symbolic link".into(),
            "remove the link and let balancer create a real directory".into(),
        ));
    }
    if !meta.is_dir() {
        return Err(unsafe_because(
            "it is not a directory".into(),
            "remove it or set BALANCER_HOME elsewhere".into(),
        ));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(unsafe_because(
            format!(
                "it is owned by uid {}, not by this user (uid {me})",
                meta.uid()
            ),
            format!(
                "`chown {me} {}`, or set BALANCER_HOME elsewhere",
                dir.display()
            ),
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(unsafe_because(
            format!("others may write to it (mode {:o})", meta.mode() & 0o7777),
            format!("`chmod go-w {}` (0700 is best)", dir.display()),
        ));
    }
    Ok(())
}

/// The home, held: while this lives, no other master can run on it.
#[derive(Debug)]
pub struct HomeLock {
    home: PathBuf,
    /// Always `Some` until dropped.
    lock: Option<Flock<File>>,
    /// Handed to a successor (`balancer upgrade`): the files are its now, not ours to remove.
    handed_over: bool,
}

impl HomeLock {
    /// Creates the home and its `logs/` (mode 0700) if needed, refuses them if someone else
    /// could change them ([`check_private`]), and takes the lock, writing our pid. No path in
    /// the home is followed if it is a symlink.
    pub fn acquire(home: &Path) -> Result<HomeLock, LockError> {
        for dir in [home.to_path_buf(), home.join(LOGS_DIR)] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| LockError::Io(dir.clone(), e))?;
            check_private(&dir)?;
        }
        let path = home.join(PID_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
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
            lock: Some(lock),
            handed_over: false,
        })
    }

    /// The lock a predecessor handed over (`balancer upgrade`): `file` is a duplicate of its
    /// locked pid file's descriptor. An `flock` belongs to the open file description, not to a
    /// process, so holding the duplicate *is* holding the lock: it passes from one master to
    /// the next without a moment where it is free. Fails if `file` does not hold the lock.
    pub fn inherit(home: &Path, file: File) -> Result<HomeLock, LockError> {
        let path = home.join(PID_FILE);
        // Taking a lock this description already holds succeeds; any other holder makes it
        // fail, so a stray descriptor cannot pass for the home's lock.
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| LockError::Io(path, errno.into()))?;
        Ok(HomeLock {
            home: home.to_path_buf(),
            lock: Some(lock),
            handed_over: false,
        })
    }

    /// The locked pid file, to hand to a successor.
    pub fn file(&self) -> Option<&File> {
        self.lock.as_deref()
    }

    /// Writes our pid into the pid file (a successor, once it has taken over).
    pub fn write_pid(&mut self) -> Result<(), LockError> {
        let path = self.home.join(PID_FILE);
        let Some(f) = self.lock.as_deref_mut() else {
            return Ok(());
        };
        let written = (|| -> io::Result<()> {
            f.set_len(0)?;
            f.rewind()?;
            writeln!(f, "{}", std::process::id())?;
            f.sync_all()
        })();
        written.map_err(|e| LockError::Io(path, e))
    }

    /// A successor holds the lock and owns the admin socket and the pid file now: dropping
    /// this leaves them alone.
    pub fn hand_over(&mut self) {
        self.handed_over = true;
    }

    /// Where the admin socket goes.
    pub fn admin_socket(&self) -> PathBuf {
        admin_socket(&self.home)
    }
}

impl Drop for HomeLock {
    fn drop(&mut self) {
        if self.handed_over {
            // Unlocking would unlock the successor too (one open file description): the
            // descriptor is left to close at exit, which releases nothing while it holds it.
            if let Some(lock) = self.lock.take() {
                std::mem::forget(lock);
            }
            return;
        }
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

    #[test]
    fn a_duplicate_of_the_lock_holds_it_across_a_hand_over() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let mut old = HomeLock::acquire(&home).unwrap();
        let dup = old.file().unwrap().try_clone().unwrap();
        let mut new = HomeLock::inherit(&home, dup).expect("the same description holds it");
        // A fresh open of the pid file is another description: it is not the lock.
        let stranger = File::open(home.join(PID_FILE)).unwrap();
        assert!(HomeLock::inherit(&home, stranger).is_err());
        old.hand_over();
        drop(old);
        assert!(home.join(PID_FILE).exists(), "the successor's files stay");
        assert!(
            matches!(HomeLock::acquire(&home), Err(LockError::Taken { .. })),
            "still held, by the successor"
        );
        new.write_pid().unwrap();
        drop(new);
        HomeLock::acquire(&home).expect("free once the successor is gone");
    }
}

#[cfg(test)]
mod safety_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_home_others_can_write_or_a_planted_link_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = HomeLock::acquire(&home).unwrap_err().to_string();
        assert!(err.contains("others may write to it (mode 777)"), "{err}");
        assert!(err.contains("chmod go-w"), "{err}");
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();

        // logs/ pointing elsewhere, and the pid file planted as a link to a victim file.
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, home.join(LOGS_DIR)).unwrap();
        let err = HomeLock::acquire(&home).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        std::fs::remove_file(home.join(LOGS_DIR)).unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, home.join(PID_FILE)).unwrap();
        assert!(HomeLock::acquire(&home).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        std::fs::remove_file(home.join(PID_FILE)).unwrap();
        HomeLock::acquire(&home).expect("a clean home is fine");
    }
}
