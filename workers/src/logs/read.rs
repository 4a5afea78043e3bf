//! Reading logs back for `balancer logs` and `flush`: the last lines of a file (reaching into
//! its newest rotated file when the current one is short), the lines added since (across a
//! rotation), emptying a file, and putting the lines of several files in time order.
//!
//! All of it is blocking file I/O: the master calls it off its runtime threads
//! (`spawn_blocking`), so a slow disk never stalls proxying. It reads a bounded amount whatever
//! the file's size, and a line that is not UTF-8 is shown with replacement characters rather
//! than hiding the rest.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use chrono::format::{Parsed, StrftimeItems};

use super::rotate;

/// How much of a file's end [`tail`] reads at a time while looking for enough lines.
const TAIL_BLOCK: u64 = 64 * 1024;
/// The most [`tail`] reads from one file, however few newlines it finds.
const TAIL_MAX: u64 = 4 * 1024 * 1024;
/// The most [`Follower::read_new`] reads in one call; the rest comes at the next one.
const FOLLOW_MAX: u64 = 1024 * 1024;

/// The last `n` whole lines of `path` and the length the file had, read backwards from its end
/// (at most [`TAIL_MAX`] bytes). When the file has fewer than `n` lines and was rotated, the
/// rest come from the end of its newest rotated file (gunzipped if need be). A missing file
/// has no lines.
pub fn tail(path: &Path, n: usize) -> io::Result<(Vec<String>, u64)> {
    let (mut lines, len) = tail_one(path, n)?;
    if lines.len() < n
        && let Some(newest) = rotate::rotated_files(path)?.pop()
    {
        // A rotated file is at most `log_max_size` plus one read; the cap bounds a file
        // someone else put there.
        let limit = usize::try_from(TAIL_MAX).unwrap_or(usize::MAX);
        if let Ok(bytes) = rotate::read_rotated(&newest, limit) {
            let text = String::from_utf8_lossy(&bytes);
            let older: Vec<&str> = text.lines().collect();
            let skip = older.len().saturating_sub(n - lines.len());
            let mut joined: Vec<String> = older[skip..].iter().map(|l| (*l).to_owned()).collect();
            joined.append(&mut lines);
            lines = joined;
        }
    }
    Ok((lines, len))
}

/// [`tail`] of one file, without its rotated ones.
fn tail_one(path: &Path, n: usize) -> io::Result<(Vec<String>, u64)> {
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

/// Empties `path` (a missing file is already empty) and deletes its rotated files, as
/// `pm2 flush` forgets a log's past. Workers (and the relay) append (`O_APPEND`), so after the
/// truncation they simply write from the start.
pub fn flush(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let opened = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path);
    match opened {
        Ok(file) => file.set_len(0)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    for rotated in rotate::rotated_files(path)? {
        match std::fs::remove_file(&rotated) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Reads the whole lines appended to one file since an offset (`logs --follow`), across
/// rotations: it keeps the file open, so when the name is given to a new file it first reads
/// the rest of the old one (a rotated file, even one compressed and removed since), then the
/// new one from its start.
#[derive(Debug)]
pub struct Follower {
    path: PathBuf,
    offset: u64,
    file: Option<File>,
}

impl Follower {
    /// Follows `path` from byte `offset` (the length [`tail`] returned).
    pub fn new(path: PathBuf, offset: u64) -> Self {
        let file = File::open(&path).ok();
        Follower { path, offset, file }
    }

    /// The whole lines written since the last call; a partial last line waits for its newline.
    /// A file that shrank was flushed: it is read again from its start.
    pub fn read_new(&mut self) -> io::Result<Vec<String>> {
        let current = match std::fs::metadata(&self.path) {
            Ok(meta) => Some(meta.ino()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let held = match &self.file {
            Some(file) => Some(file.metadata()?.ino()),
            None => None,
        };
        let mut lines = Vec::new();
        if held.is_some() && held != current {
            // Rotated: what the old file got after our last read, then the new file.
            if let Some(file) = self.file.as_mut() {
                lines = read_from(file, &mut self.offset, true)?;
            }
            self.file = None;
            self.offset = 0;
        }
        if self.file.is_none() {
            self.file = match File::open(&self.path) {
                Ok(file) => Some(file),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(lines),
                Err(e) => return Err(e),
            };
        }
        if let Some(file) = self.file.as_mut() {
            lines.extend(read_from(file, &mut self.offset, false)?);
        }
        Ok(lines)
    }
}

/// The whole lines of `file` from `offset` on (at most [`FOLLOW_MAX`] bytes); with `last`
/// (nothing more will be written), a partial last line too.
fn read_from(file: &mut File, offset: &mut u64, last: bool) -> io::Result<Vec<String>> {
    let len = file.metadata()?.len();
    if len < *offset {
        *offset = 0;
    }
    if len == *offset {
        return Ok(Vec::new());
    }
    file.seek(SeekFrom::Start(*offset))?;
    let mut bytes = Vec::new();
    file.take(FOLLOW_MAX).read_to_end(&mut bytes)?;
    let end = match bytes.iter().rposition(|&b| b == b'\n') {
        _ if last => bytes.len(),
        Some(end) => end + 1,
        // One line longer than a whole read: pass it on in pieces.
        None if bytes.len() as u64 >= FOLLOW_MAX => bytes.len(),
        None => return Ok(Vec::new()),
    };
    *offset += end as u64;
    Ok(String::from_utf8_lossy(&bytes[..end])
        .lines()
        .map(str::to_owned)
        .collect())
}

/// The time a relayed line starts with, in `format` (the app's `log_date_format`), as a number
/// that sorts like the time: nanoseconds since the epoch when the format has a date (UTC when
/// it has no offset), since midnight when it has only a time. `None` when the line does not
/// start with one (a line written before `time` was turned on, or by someone else).
pub fn stamp_of(line: &str, format: &str) -> Option<i64> {
    let mut parsed = Parsed::new();
    let rest =
        chrono::format::parse_and_remainder(&mut parsed, line, StrftimeItems::new(format)).ok()?;
    if !rest.starts_with(": ") {
        return None;
    }
    if let Ok(at) = parsed.to_datetime() {
        return at.timestamp_nanos_opt();
    }
    if let Ok(at) = parsed.to_naive_datetime_with_offset(0) {
        return at.and_utc().timestamp_nanos_opt();
    }
    let time = parsed.to_naive_time().ok()?;
    let since_midnight = time - chrono::NaiveTime::MIN;
    since_midnight.num_nanoseconds()
}

/// Puts the lines of several files in time order: `files[i]` is one file's lines (in file
/// order) with the time of each, or `None`. A merge, not a sort: each file's own order is kept
/// whatever its times say, a line without a time goes with the line before it, and equal
/// times keep the files' order. Returns `(file index, line)` pairs.
pub fn interleave(files: Vec<Vec<(Option<i64>, String)>>) -> Vec<(usize, String)> {
    let total = files.iter().map(Vec::len).sum();
    let mut heads: Vec<std::iter::Peekable<std::vec::IntoIter<(i64, String)>>> = files
        .into_iter()
        .map(|lines| {
            let mut last = i64::MIN;
            lines
                .into_iter()
                .map(|(stamp, line)| {
                    last = stamp.unwrap_or(last);
                    (last, line)
                })
                .collect::<Vec<_>>()
                .into_iter()
                .peekable()
        })
        .collect();
    let mut merged = Vec::with_capacity(total);
    loop {
        let next = heads
            .iter_mut()
            .enumerate()
            .filter_map(|(i, h)| h.peek().map(|(stamp, _)| (*stamp, i)))
            .min();
        let Some((_, i)) = next else {
            return merged;
        };
        if let Some((_, line)) = heads[i].next() {
            merged.push((i, line));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

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

    #[test]
    fn a_follower_and_tail_cross_a_rotation_and_flush_removes_rotated_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.log");
        std::fs::write(&path, "a\n").unwrap();
        let mut follow = Follower::new(path.clone(), 0);
        assert_eq!(follow.read_new().unwrap(), ["a"]);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"b\n").unwrap();
        let rotated = rotate::rotated_name(&path);
        std::fs::rename(&path, &rotated).unwrap();
        std::fs::write(&path, "c\n").unwrap();
        assert_eq!(follow.read_new().unwrap(), ["b", "c"]);
        assert_eq!(tail(&path, 3).unwrap().0, ["a", "b", "c"]);
        flush(&path).unwrap();
        assert!(!rotated.exists());
        assert_eq!(tail(&path, 3).unwrap().0, Vec::<String>::new());
    }

    #[test]
    fn stamps_parse_in_the_apps_format_and_files_interleave_by_them() {
        let f = balancer_config::defaults::LOG_DATE_FORMAT;
        let a = stamp_of("2026-12-01T10:00:00.001+01:00: x", f).unwrap();
        let b = stamp_of("2026-12-01T09:00:00.002+00:00: y", f).unwrap();
        assert_eq!(b - a, 1_000_000, "offsets are applied");
        assert!(stamp_of("no stamp", f).is_none());
        let t = stamp_of("10:00:01: z", "%H:%M:%S").unwrap();
        assert_eq!(t, 36_001 * 1_000_000_000);
        let merged = interleave(vec![
            vec![
                (Some(1), "a1".into()),
                (None, "a1 cont".into()),
                (Some(5), "a5".into()),
            ],
            vec![(Some(2), "b2".into()), (Some(5), "b5".into())],
        ]);
        let lines: Vec<&str> = merged.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(lines, ["a1", "a1 cont", "b2", "a5", "b5"]);
    }
}
