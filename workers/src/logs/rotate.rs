//! Size rotation of relayed log files: the rotated files' names, and the housekeeping thread
//! that gzips them (`log_compress`) and deletes the oldest past `log_retain`.
//!
//! A file `web-0-out.log` that reaches `log_max_size` is renamed to
//! `web-0-out.log.20261201-224000.123` (the UTC time of the rotation, to the millisecond, as
//! pm2-logrotate names them by date; `-1`, `-2`, … when two rotations share a millisecond) and
//! a new one is opened in its place. Names are never reused or shifted (unlike logrotate's
//! `.1`, `.2`, …), so the relay thread renaming the current file and this thread compressing
//! and pruning the rotated ones never act on the same name: no lock between them. UTC keeps
//! the names in time order across daylight-saving changes, so sorting the names sorts the
//! files.
//!
//! Compressing a few megabytes takes tens of milliseconds; it runs here, never on the relay
//! thread, so a rotation costs the relay one `rename` and one `open`.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

/// The suffix of a compressed rotated file.
const GZ: &str = ".gz";
/// The suffix of a compression in progress (never counted as a rotated file).
const TMP: &str = ".tmp";
/// Jobs waiting for the housekeeping thread; past this the relay thread waits (and with it
/// the workers' pipes fill): rotations faster than compression get backpressure, not memory.
const QUEUE: usize = 256;

/// What to do after one rotation.
#[derive(Debug)]
pub(crate) struct Job {
    /// The file that was just rotated (its new name).
    pub(crate) rotated: PathBuf,
    /// The live file it came from.
    pub(crate) base: PathBuf,
    /// Rotated files to keep.
    pub(crate) retain: u32,
    /// Gzip the rotated file.
    pub(crate) compress: bool,
}

/// Hands `job` to the housekeeping thread (started on first use), waiting while its queue is
/// full.
pub(crate) fn submit(job: Job) {
    static QUEUE_TX: OnceLock<Option<SyncSender<Job>>> = OnceLock::new();
    let tx = QUEUE_TX.get_or_init(|| {
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("balancer-logrotate".into())
            .spawn(move || housekeep(rx))
            .map_err(|e| tracing::error!("cannot start the log rotation thread: {e}"))
            .ok()
            .map(|_| tx)
    });
    match tx {
        Some(tx) => {
            let _ = tx.send(job);
        }
        // No thread: do it here rather than never.
        None => run(&job),
    }
}

fn housekeep(rx: Receiver<Job>) {
    super::lower_priority();
    for job in rx {
        run(&job);
    }
}

fn run(job: &Job) {
    if job.compress
        && let Err(e) = compress(&job.rotated)
    {
        tracing::warn!("cannot compress {}: {e}", job.rotated.display());
    }
    if let Err(e) = prune(&job.base, job.retain) {
        tracing::warn!("cannot prune rotated logs of {}: {e}", job.base.display());
    }
}

/// The name `base` takes when it is rotated now: a time stamp no rotated file of it has yet.
pub(crate) fn rotated_name(base: &Path) -> PathBuf {
    let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S%.3f").to_string();
    let name = base
        .file_name()
        .map_or_else(|| "log".to_owned(), |n| n.to_string_lossy().into_owned());
    let mut candidate = base.with_file_name(format!("{name}.{stamp}"));
    let mut n = 0;
    while candidate.exists() || with_suffix(&candidate, GZ).exists() {
        n += 1;
        candidate = base.with_file_name(format!("{name}.{stamp}-{n}"));
    }
    candidate
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The rotated files of `base` (compressed or not), oldest first.
pub fn rotated_files(base: &Path) -> io::Result<Vec<PathBuf>> {
    let (Some(dir), Some(name)) = (base.parent(), base.file_name()) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{}.", name.to_string_lossy());
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    for entry in entries {
        let entry = entry?;
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&prefix) else {
            continue;
        };
        let stamp = rest.strip_suffix(GZ).unwrap_or(rest);
        // `YYYYmmdd-HHMMSS.mmm[-n]`: anything else beside the file is not ours.
        let ours = stamp.len() >= 19
            && !rest.ends_with(TMP)
            && stamp
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b'-' || b == b'.');
        if ours {
            found.push((stamp.to_owned(), entry.path()));
        }
    }
    // By stamp, not by name: `.gz` must not sort a file after a later uncompressed one.
    found.sort();
    Ok(found.into_iter().map(|(_, path)| path).collect())
}

/// Deletes the oldest rotated files of `base` beyond the newest `retain`.
pub(crate) fn prune(base: &Path, retain: u32) -> io::Result<()> {
    let files = rotated_files(base)?;
    let excess = files.len().saturating_sub(retain as usize);
    for path in &files[..excess] {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Gzips `path` into `path.gz` (through `path.gz.tmp`, renamed when complete, so a reader
/// never sees half a file) and removes `path`.
fn compress(path: &Path) -> io::Result<()> {
    let mut input = match File::open(path) {
        Ok(file) => file,
        // Flushed (removed) before its turn came.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let gz = with_suffix(path, GZ);
    let tmp = with_suffix(&gz, TMP);
    let output = super::open_append(&tmp)?;
    output.set_len(0)?;
    // `fast`: a rotated log is read rarely, and compression must keep up with rotations.
    let mut encoder = flate2::write::GzEncoder::new(output, flate2::Compression::fast());
    io::copy(&mut input, &mut encoder)?;
    encoder.finish()?.sync_all()?;
    std::fs::rename(&tmp, &gz)?;
    std::fs::remove_file(path)
}

/// The whole text of a rotated file, gunzipped if it ends in `.gz`; at most `limit` bytes (the
/// end of the file is kept).
pub fn read_rotated(path: &Path, limit: usize) -> io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let mut bytes = Vec::new();
    if path.as_os_str().to_string_lossy().ends_with(GZ) {
        flate2::read::GzDecoder::new(file).read_to_end(&mut bytes)?;
    } else {
        let mut file = file;
        file.read_to_end(&mut bytes)?;
    }
    if bytes.len() > limit {
        bytes.drain(..bytes.len() - limit);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_names_sort_in_time_order_compress_and_prune() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("web-0-out.log");
        let mut names = Vec::new();
        for i in 0..4 {
            let name = rotated_name(&base);
            std::fs::write(&name, format!("rotation {i}\n")).unwrap();
            names.push(name);
        }
        // A file of someone else's beside it is left alone.
        std::fs::write(dir.path().join("web-0-out.log.bak"), "x").unwrap();
        compress(&names[1]).unwrap();
        assert!(!names[1].exists());
        assert_eq!(rotated_files(&base).unwrap().len(), 4);
        let text = read_rotated(&with_suffix(&names[1], GZ), 1 << 20).unwrap();
        assert_eq!(text, b"rotation 1\n");
        prune(&base, 2).unwrap();
        let left = rotated_files(&base).unwrap();
        assert_eq!(left, vec![names[2].clone(), names[3].clone()]);
        assert!(dir.path().join("web-0-out.log.bak").exists());
    }
}
