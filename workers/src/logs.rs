//! Worker logs: where a worker's stdout and stderr go
//! (`$BALANCER_HOME/logs/<app>-<instance>-{out,err}.log`), and reading them back: the last
//! lines of a file, the lines added since, and emptying it.
//!
//! Workers write straight into the files (their fds are the files), so logging never passes
//! through the master and costs the proxy nothing. The readers here are blocking file I/O:
//! the master calls them off its runtime threads (`spawn_blocking`), so a slow disk never stalls
//! proxying. They read a bounded amount whatever the file's size, and a line that is not UTF-8
//! is shown with replacement characters rather than hiding the rest.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// How much of a file's end [`tail`] reads at a time while looking for enough lines.
const TAIL_BLOCK: u64 = 64 * 1024;
/// The most [`tail`] reads from one file, however few newlines it finds.
const TAIL_MAX: u64 = 4 * 1024 * 1024;
/// The most [`Follower::read_new`] reads in one call; the rest comes at the next one.
const FOLLOW_MAX: u64 = 1024 * 1024;

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
    pub fn for_app(home: &Path, app: &balancer_config::App, instance: u32) -> Self {
        let default = Self::new(home, &app.name, instance);
        let pick = |given: &Option<PathBuf>, default: PathBuf| match given {
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
/// deleted), for `flush` of everything.
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
fn open_append(path: &Path) -> io::Result<File> {
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

/// The last `n` whole lines of `path` and the length the file had, read backwards from its end
/// (at most [`TAIL_MAX`] bytes). A missing file has no lines.
pub fn tail(path: &Path, n: usize) -> io::Result<(Vec<String>, u64)> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if n == 0 {
        return Ok((Vec::new(), len));
    }
    let mut start = len;
    let mut bytes: Vec<u8> = Vec::new();
    // `n` lines start after the (n+1)-th newline from the end when the file ends with one, and
    // after the n-th when its last line has none yet.
    loop {
        let wanted = n + usize::from(bytes.ends_with(b"\n"));
        let newlines = bytes.iter().filter(|&&b| b == b'\n').count();
        if start == 0 || newlines >= wanted || len - start >= TAIL_MAX {
            break;
        }
        let from = start
            .saturating_sub(TAIL_BLOCK)
            .max(len.saturating_sub(TAIL_MAX));
        let mut block = vec![0; usize::try_from(start - from).unwrap_or(0)];
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut block)?;
        block.extend_from_slice(&bytes);
        bytes = block;
        start = from;
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > 0 && !lines.is_empty() {
        // The first line was cut by the read window.
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(n);
    Ok((lines[skip..].iter().map(|l| (*l).to_owned()).collect(), len))
}

/// Empties `path` (a missing file is already empty). Workers append (`O_APPEND`), so after
/// the truncation they simply write from the start.
pub fn flush(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let opened = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path);
    match opened {
        Ok(file) => file.set_len(0),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Reads the whole lines appended to one file since an offset (`logs --follow`).
#[derive(Debug, Clone)]
pub struct Follower {
    path: PathBuf,
    offset: u64,
}

impl Follower {
    /// Follows `path` from byte `offset` (the length [`tail`] returned).
    pub fn new(path: PathBuf, offset: u64) -> Self {
        Follower { path, offset }
    }

    /// The whole lines written since the last call; a partial last line waits for its newline.
    /// A file that shrank was flushed: it is read again from its start.
    pub fn read_new(&mut self) -> io::Result<Vec<String>> {
        let mut file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        if len < self.offset {
            self.offset = 0;
        }
        if len == self.offset {
            return Ok(Vec::new());
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::new();
        file.take(FOLLOW_MAX).read_to_end(&mut bytes)?;
        let Some(end) = bytes.iter().rposition(|&b| b == b'\n') else {
            if bytes.len() as u64 >= FOLLOW_MAX {
                // One line longer than a whole read: pass it on in pieces.
                self.offset += bytes.len() as u64;
                return Ok(vec![String::from_utf8_lossy(&bytes).into_owned()]);
            }
            return Ok(Vec::new());
        };
        let whole = &bytes[..=end];
        self.offset += whole.len() as u64;
        Ok(String::from_utf8_lossy(whole)
            .lines()
            .map(str::to_owned)
            .collect())
    }
}

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

    #[test]
    fn tail_reads_the_end_only_and_keeps_bad_utf8_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let mut file = File::create(&path).unwrap();
        for i in 0..20_000 {
            writeln!(file, "line {i} {}", "x".repeat(40)).unwrap();
        }
        file.write_all(b"bad \xff byte\nlast, no newline").unwrap();
        let (lines, len) = tail(&path, 3).unwrap();
        assert_eq!(len, file.metadata().unwrap().len());
        assert!(lines[0].starts_with("line 19999 "), "{lines:?}");
        assert_eq!(lines[1], "bad \u{fffd} byte");
        assert_eq!(lines[2], "last, no newline");
        let (many, _) = tail(&path, 5000).unwrap();
        assert_eq!(many.len(), 5000);
        assert!(many[0].starts_with("line 15002 "), "{}", many[0]);
        assert_eq!(tail(&dir.path().join("none.log"), 5).unwrap(), (vec![], 0));
    }

    #[test]
    fn a_follower_sees_whole_new_lines_and_starts_over_after_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        std::fs::write(&path, "old\n").unwrap();
        let (_, end) = tail(&path, 10).unwrap();
        let mut follow = Follower::new(path.clone(), end);
        assert!(follow.read_new().unwrap().is_empty());
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"new 1\nnew 2\npart").unwrap();
        assert_eq!(follow.read_new().unwrap(), ["new 1", "new 2"]);
        file.write_all(b"ial\n").unwrap();
        assert_eq!(follow.read_new().unwrap(), ["partial"]);
        flush(&path).unwrap();
        file.write_all(b"after flush\n").unwrap();
        assert_eq!(follow.read_new().unwrap(), ["after flush"]);
        flush(&dir.path().join("none.log")).unwrap();
    }
}
