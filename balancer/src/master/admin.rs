//! The master's side of the admin socket: accept local clients of our own uid (or root), read
//! one JSON request per line, carry it out, answer one JSON reply per line.
//!
//! A client can never hurt the master: each connection has its own task, lines are capped at
//! [`MAX_REQUEST_BYTES`], anything unreadable gets an error reply, and a client that goes away
//! mid-operation only loses its answer. Log files are read off the runtime's threads.
//!
//! Two requests stream: `logs` with `follow`, and `subscribe` (a snapshot per interval for
//! `monit`). Both last until the client sends another line or hangs up, and neither counts as
//! idle. A subscriber that stops reading costs one frame in memory: frames are produced on
//! ticks that skip while a write waits, and a write that waits too long drops the subscriber.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use balancer_workers::Target;
use balancer_workers::logs::{self, Follower};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::{
    AnyDelimiterCodec, AnyDelimiterCodecError, FramedRead, FramedWrite, LinesCodec, LinesCodecError,
};
use tokio_util::sync::CancellationToken;

use super::dump::Origin;
use super::views::{all_workers, app_snapshots, show};
use super::{Apply, ControlError, Master, OpResult, Source};
use crate::protocol::{
    Load, LogLine, MAX_REQUEST_BYTES, Pong, Reload, Reply, Request, Snapshot, Start,
};

/// How often `logs --follow` looks for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// Admin connections served at once; more are told so and closed, so idle clients cannot
/// take the master's descriptors.
const MAX_CLIENTS: usize = 64;
/// A connection that sends no request for this long is closed (a `logs --follow` in
/// progress is not idle).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Past lines per log file in a subscription's first snapshot: the context a dashboard opens on.
const SUBSCRIBE_PAST_LINES: usize = 20;
/// The most log lines one snapshot carries (the newest); more are counted in `logs_dropped`, so
/// a chatty app cannot make frames grow without bound.
const SNAPSHOT_MAX_LINES: usize = 200;
/// A subscriber whose frame cannot be written for this long (or one interval, if longer) is
/// not reading: it is dropped rather than buffered for.
const SUBSCRIBER_STALL: Duration = Duration::from_secs(5);

/// Binds the admin socket, replacing a stale one, readable and writable by its owner only.
pub(super) fn bind(path: &Path) -> io::Result<UnixListener> {
    // The home lock is held, so a socket file left here is a dead master's.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves clients until `stop` is cancelled.
pub(super) async fn serve(listener: UnixListener, master: Arc<Master>, stop: CancellationToken) {
    let me = nix::unistd::getuid().as_raw();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Never fatal; out of descriptors pauses (the listeners' rule).
                crate::listener::accept_failed(e).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == me || cred.uid() == 0 => {}
            Ok(cred) => {
                tracing::warn!(
                    uid = cred.uid(),
                    "admin socket: refused a client of another user"
                );
                continue;
            }
            Err(e) => {
                tracing::warn!("admin socket: cannot read peer credentials: {e}");
                continue;
            }
        }
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!("admin socket: {MAX_CLIENTS} clients already connected; refusing one");
            tokio::spawn(refuse(stream));
            continue;
        };
        let master = Arc::clone(&master);
        let stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = client(stream, &master) => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

type Lines = FramedRead<tokio::net::unix::OwnedReadHalf, AnyDelimiterCodec>;
type Out = FramedWrite<tokio::net::unix::OwnedWriteHalf, LinesCodec>;

/// Tells a client over [`MAX_CLIENTS`] why it is not served.
async fn refuse(stream: UnixStream) {
    let (_, write) = stream.into_split();
    let mut out = FramedWrite::new(write, LinesCodec::new());
    let error = format!("the master already serves {MAX_CLIENTS} admin connections; try again");
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        send(&mut out, &Reply::Failed { error, code: 1 }),
    )
    .await;
}

async fn client(stream: UnixStream, master: &Master) {
    let (read, write) = stream.into_split();
    // Lines as bytes: a request that is not UTF-8 gets an error reply, not a dropped connection.
    let codec =
        AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), b"\n".to_vec(), MAX_REQUEST_BYTES);
    let mut requests = FramedRead::new(read, codec);
    let mut out = FramedWrite::new(write, LinesCodec::new());
    loop {
        let line = match tokio::time::timeout(IDLE_TIMEOUT, requests.next()).await {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(_) => {
                let error = format!("no request within {IDLE_TIMEOUT:?}; closing");
                let _ = send(&mut out, &bad_request(error)).await;
                return;
            }
        };
        let line = match line {
            Ok(line) => line,
            Err(AnyDelimiterCodecError::MaxChunkLengthExceeded) => {
                let error = format!("request longer than {MAX_REQUEST_BYTES} bytes; closing");
                let _ = send(&mut out, &bad_request(error)).await;
                return;
            }
            Err(AnyDelimiterCodecError::Io(_)) => return,
        };
        let Ok(line) = std::str::from_utf8(&line) else {
            if send(&mut out, &bad_request("bad request: not UTF-8".into()))
                .await
                .is_err()
            {
                return;
            }
            continue;
        };
        if line.trim().is_empty() {
            continue;
        }
        let request = match serde_json::from_str::<Request>(line) {
            Ok(request) => request,
            Err(e) => {
                if send(&mut out, &bad_request(format!("bad request: {e}")))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
        };
        tracing::debug!(?request, "admin request");
        let result = match request {
            Request::Logs {
                target,
                lines,
                follow,
            } => {
                // Following ends when the client sends anything more or hangs up.
                tokio::select! {
                    result = stream_logs(master, target.as_deref(), lines, follow, &mut out) => result,
                    _ = next_line(&mut requests), if follow => Ok(()),
                }
            }
            Request::Subscribe { interval_ms, logs } => {
                let interval = Duration::from_millis(interval_ms);
                tokio::select! {
                    result = subscribe(master, interval, logs.as_deref(), &mut out) => result,
                    _ = next_line(&mut requests) => Ok(()),
                }
            }
            Request::Reload(Reload::Target {
                target,
                progress: true,
            }) => reload_with_progress(master, &target, &mut out).await,
            Request::Upgrade { binary, timeout_ms } => {
                upgrade_with_progress(master, binary, timeout_ms, &mut out).await
            }
            Request::Kill => {
                let _ = send(&mut out, &Reply::done("stopping every app and the master")).await;
                master.request_shutdown();
                return;
            }
            other => send(&mut out, &handle(master, other).await).await,
        };
        if result.is_err() {
            return;
        }
    }
}

/// `reload` with `progress`: a progress reply after each batch, then the outcome. A client
/// that hangs up meanwhile stops getting lines; the reload carries on to its end.
async fn reload_with_progress(
    master: &Master,
    target: &str,
    out: &mut Out,
) -> Result<(), LinesCodecError> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let report = move |line: String| {
        let _ = tx.send(line);
    };
    let result = with_progress(out, rx, master.reload_reporting(target, &report)).await?;
    send(out, &outcome(result)).await
}

/// `upgrade`: a progress reply at each step of the hand-over, then the outcome. The reply
/// comes from the old master, which only then begins to drain.
async fn upgrade_with_progress(
    master: &Master,
    binary: Option<PathBuf>,
    timeout_ms: Option<u64>,
    out: &mut Out,
) -> Result<(), LinesCodecError> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let report = move |line: String| {
        let _ = tx.send(line);
    };
    let timeout = Duration::from_millis(timeout_ms.unwrap_or(crate::protocol::UPGRADE_TIMEOUT_MS));
    let result = with_progress(out, rx, master.upgrade(binary, timeout, &report)).await?;
    send(out, &outcome(result)).await
}

/// Runs `work` to its end, sending each line it reports on `lines` as a progress reply as it
/// comes. A client that hangs up stops getting lines, but `work` is never cut short: the
/// error comes back only once it is done.
async fn with_progress<T>(
    out: &mut Out,
    mut lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    work: impl std::future::Future<Output = T>,
) -> Result<T, LinesCodecError> {
    tokio::pin!(work);
    let mut listening = true;
    let result = loop {
        tokio::select! {
            result = &mut work => break result,
            Some(line) = lines.recv() => {
                if listening && send(out, &Reply::Progress(line)).await.is_err() {
                    listening = false;
                }
            }
        }
    };
    while let Ok(line) = lines.try_recv() {
        if listening && send(out, &Reply::Progress(line)).await.is_err() {
            listening = false;
        }
    }
    if !listening {
        return Err(LinesCodecError::Io(io::ErrorKind::BrokenPipe.into()));
    }
    Ok(result)
}

async fn next_line(lines: &mut Lines) {
    let _ = lines.next().await;
}

/// How `save` will start a file's apps again.
fn file_origin(file: &Path, load: &Load) -> Origin {
    Origin::File {
        file: file.to_path_buf(),
        env: load.env.clone(),
        policy: load.policy.map(|p| p.as_str().to_owned()),
    }
}

fn app_names(config: &balancer_config::Config) -> Vec<String> {
    config.apps.iter().map(|a| a.name.clone()).collect()
}

/// Records `origin` for `names` once the operation that started them succeeded (for some of
/// them, at least: `save` only writes apps that are running).
fn remember_if(master: &Master, done: OpResult, names: Vec<String>, origin: &Origin) -> OpResult {
    if matches!(done, Ok(_) | Err(ControlError::Partial { .. })) {
        master.remember(names, origin);
    }
    done
}

fn bad_request(error: String) -> Reply {
    Reply::Failed { error, code: 2 }
}

async fn send(out: &mut Out, reply: &Reply) -> Result<(), LinesCodecError> {
    let json = serde_json::to_string(reply).unwrap_or_else(|e| {
        format!(r#"{{"ok":false,"error":"cannot encode the reply: {e}","code":1}}"#)
    });
    out.send(json).await
}

fn outcome(result: OpResult) -> Reply {
    match result {
        Ok(message) => Reply::done(message),
        Err(error) => error.into(),
    }
}

/// Carries out one request that has a single reply.
async fn handle(master: &Master, request: Request) -> Reply {
    match request {
        Request::Ping => Reply::Pong(Pong {
            pid: std::process::id(),
            version: Some(env!("CARGO_PKG_VERSION").to_string()),
            policy: Some(master.load_options().default_policy),
            cpus: Some(master.load_options().cpus),
        }),
        Request::List => Reply::Workers(all_workers(master)),
        Request::Show { target } => match show(master, &target) {
            Ok(app) => Reply::App(Box::new(app)),
            Err(e) => e.into(),
        },
        Request::Start(Start::File { file, load }) => {
            outcome(match master.load(&file, &load).await {
                Ok(config) => {
                    let origin = file_origin(&file, &load);
                    let names = app_names(&config);
                    let done = master.apply(config, Source::File(file), Apply::Start).await;
                    remember_if(master, done, names, &origin)
                }
                Err(e) => Err(e),
            })
        }
        Request::Start(Start::Toml {
            toml,
            cwd,
            load,
            force,
        }) => {
            let cwd = cwd.unwrap_or_else(|| master.home().to_path_buf());
            outcome(match master.parse(&toml, &cwd, &load) {
                Ok(config) => {
                    let names = app_names(&config);
                    let origin = Origin::Toml {
                        toml,
                        cwd: Some(cwd),
                        env: load.env.clone(),
                        policy: load.policy.map(|p| p.as_str().to_owned()),
                    };
                    let done = master.start_from_command_line(config, force).await;
                    remember_if(master, done, names, &origin)
                }
                Err(e) => Err(e),
            })
        }
        Request::Start(Start::Stopped { target }) => outcome(master.start_stopped(&target).await),
        Request::Stop { target } => outcome(master.stop(&target).await),
        Request::Restart { target } => outcome(master.restart(&target).await),
        Request::Reload(Reload::Target { target, .. }) => outcome(master.reload(&target).await),
        Request::Reload(Reload::File { file, load }) => {
            outcome(match master.load(&file, &load).await {
                Ok(config) => {
                    let origin = file_origin(&file, &load);
                    let names = app_names(&config);
                    let done = master
                        .apply(config, Source::File(file), Apply::Reload)
                        .await;
                    remember_if(master, done, names, &origin)
                }
                Err(e) => Err(e),
            })
        }
        Request::Save => outcome(master.save().await),
        Request::Resurrect => outcome(master.resurrect().await),
        Request::Delete { target } => outcome(master.delete(&target).await),
        Request::Scale { app, to } => outcome(master.scale(&app, to).await),
        Request::Flush { target } => outcome(flush(master, target.as_deref()).await),
        Request::Reset { target } => outcome(master.reset(&target)),
        Request::Signal { target, signal } => outcome(master.signal(&target, &signal)),
        Request::Upgrade { binary, timeout_ms } => {
            let timeout =
                Duration::from_millis(timeout_ms.unwrap_or(crate::protocol::UPGRADE_TIMEOUT_MS));
            outcome(master.upgrade(binary, timeout, &|_| {}).await)
        }
        Request::Logs { .. } | Request::Kill | Request::Subscribe { .. } => {
            bad_request("not a single-reply request".into())
        }
    }
}

/// One log file a request names.
struct LogFile {
    app: String,
    instance: u32,
    stream: &'static str,
    path: PathBuf,
    /// The app's `log_date_format` when its lines carry timestamps (`time`).
    format: Option<String>,
    /// `merge_logs`: the file holds every instance, each line tagged `[<app>-<instance>]`.
    merged: bool,
}

impl LogFile {
    /// The time a line of this file starts with, if it has one.
    fn stamp(&self, line: &str) -> Option<i64> {
        logs::stamp_of(line, self.format.as_deref()?)
    }

    /// The instance a line is from: the file's, or in a merged file the line's tag.
    fn instance_of(&self, line: &str) -> u32 {
        if !self.merged {
            return self.instance;
        }
        let tag = format!("[{}-", self.app);
        line.find(&tag)
            .and_then(|at| {
                let rest = &line[at + tag.len()..];
                rest[..rest.find(']')?].parse().ok()
            })
            .unwrap_or(self.instance)
    }
}

/// The log files `target` names (every app's when `None`).
fn log_files(master: &Master, target: Option<&str>) -> Result<Vec<LogFile>, ControlError> {
    let mut files: Vec<LogFile> = Vec::new();
    for (sup, t) in master.resolve(target.unwrap_or("all"))? {
        let app = sup.app();
        let name = app.name.clone();
        let wanted: Option<u32> = match t {
            Target::Worker(id) => sup
                .statuses()
                .iter()
                .find(|s| s.id == id)
                .map(|s| s.instance),
            Target::All => None,
        };
        for (instance, paths) in sup.log_paths() {
            if wanted.is_some_and(|w| w != instance) {
                continue;
            }
            // One file for both streams (`log_file`) is read once.
            let streams = if paths.combined() {
                vec![("out", paths.out)]
            } else {
                vec![("out", paths.out), ("err", paths.err)]
            };
            for (stream, path) in streams {
                // The instances of a `merge_logs` app share their files: read each once.
                if files.iter().any(|f| f.path == path) {
                    continue;
                }
                files.push(LogFile {
                    app: name.clone(),
                    instance,
                    stream,
                    path,
                    format: app.logs.time.clone(),
                    merged: app.logs.merge,
                });
            }
        }
    }
    Ok(files)
}

/// Runs blocking file I/O off the runtime's threads.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

async fn flush(master: &Master, target: Option<&str>) -> OpResult {
    let files = log_files(master, target)?;
    let mut paths: Vec<PathBuf> = files.into_iter().map(|f| f.path).collect();
    if target.is_none() {
        // Everything: the default files of apps deleted since are in the home's logs too.
        let home = master.home().to_path_buf();
        let left = blocking(move || logs::home_files(&home))
            .await
            .map_err(|source| ControlError::Flush {
                path: master.home().join("logs"),
                source,
            })?;
        paths.extend(left);
        paths.sort();
        paths.dedup();
    }
    let count = paths.len();
    blocking(move || {
        paths.into_iter().try_for_each(|path| {
            logs::flush(&path).map_err(|source| ControlError::Flush { path, source })
        })
    })
    .await?;
    Ok(format!("flushed {count} log files"))
}

/// Streams the last `lines` of each log file, then (with `follow`) new lines as they come.
/// When lines carry timestamps (`time`), the files' lines are interleaved by time, every
/// instance and both streams together; otherwise they come file by file.
async fn stream_logs(
    master: &Master,
    target: Option<&str>,
    lines: usize,
    follow: bool,
    out: &mut Out,
) -> Result<(), LinesCodecError> {
    let files = match log_files(master, target) {
        Ok(files) => files,
        Err(e) => return send(out, &e.into()).await,
    };
    let mut followers = Vec::new();
    let mut past = Vec::new();
    for file in &files {
        let path = file.path.clone();
        // An unreadable file shows nothing, like an empty one; the others still show.
        let (lines, end) = blocking(move || logs::tail(&path, lines))
            .await
            .unwrap_or_default();
        past.push(lines);
        followers.push(Some(Follower::new(file.path.clone(), end)));
    }
    for (i, line) in in_time_order(&files, past) {
        send(out, &log_reply(&files[i], line)).await?;
    }
    if !follow {
        return send(out, &Reply::End).await;
    }
    loop {
        tokio::time::sleep(FOLLOW_POLL).await;
        let mut new = Vec::new();
        for slot in followers.iter_mut() {
            let Some(mut moved) = slot.take() else {
                new.push(Vec::new());
                continue;
            };
            let (lines, state) = blocking(move || (moved.read_new(), moved)).await;
            *slot = Some(state);
            new.push(lines.unwrap_or_default());
        }
        for (i, line) in in_time_order(&files, new) {
            send(out, &log_reply(&files[i], line)).await?;
        }
    }
}

/// The lines of `files` (`lines[i]` read from `files[i]`) as `(file index, line)`: merged by
/// their timestamps when any file has them, else file by file.
fn in_time_order(files: &[LogFile], lines: Vec<Vec<String>>) -> Vec<(usize, String)> {
    if files.iter().all(|f| f.format.is_none()) {
        return lines
            .into_iter()
            .enumerate()
            .flat_map(|(i, lines)| lines.into_iter().map(move |l| (i, l)))
            .collect();
    }
    let stamped = lines
        .into_iter()
        .zip(files)
        .map(|(lines, file)| {
            lines
                .into_iter()
                .map(|line| (file.stamp(&line), line))
                .collect()
        })
        .collect();
    logs::interleave(stamped)
}

fn log_reply(file: &LogFile, line: String) -> Reply {
    Reply::Log(log_line(file, line))
}

/// The files of a subscription's `logs` app being followed, each with where it was read to.
type Followed = Vec<(LogFile, Follower)>;

/// `subscribe`: a [`Snapshot`] every `interval` until the client hangs up (the caller also ends
/// it when the client sends another line). An unknown `logs` app is refused at once, before any
/// frame; one deleted later just stops adding lines.
async fn subscribe(
    master: &Master,
    interval: Duration,
    logs: Option<&str>,
    out: &mut Out,
) -> Result<(), LinesCodecError> {
    let mut followed: Followed = Vec::new();
    let mut first = Vec::new();
    if let Some(target) = logs {
        let files = match log_files(master, Some(target)) {
            Ok(files) => files,
            Err(e) => return send(out, &e.into()).await,
        };
        (followed, first) = blocking(move || open_followers(files, SUBSCRIBE_PAST_LINES)).await;
    }
    let started = tokio::time::Instant::now();
    let stall = interval.max(SUBSCRIBER_STALL);
    let mut ticks = tokio::time::interval(interval);
    // A tick missed while a write waited is skipped, not caught up: frames never queue.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut pending = first;
    loop {
        ticks.tick().await;
        if let Some(target) = logs {
            // Scaling adds log files: each new one is followed too.
            let files = log_files(master, Some(target)).unwrap_or_default();
            let (state, new) = blocking(move || read_followed(followed, files)).await;
            followed = state;
            pending.extend(new);
        }
        let dropped = pending.len().saturating_sub(SNAPSHOT_MAX_LINES);
        pending.drain(..dropped);
        let frame = Reply::Snapshot(Box::new(Snapshot {
            elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            apps: app_snapshots(master),
            logs: std::mem::take(&mut pending),
            logs_dropped: dropped as u64,
        }));
        match tokio::time::timeout(stall, send(out, &frame)).await {
            Ok(sent) => sent?,
            Err(_) => {
                tracing::info!(
                    "admin socket: dropped a subscriber that read nothing for {stall:?}"
                );
                return Err(LinesCodecError::Io(io::ErrorKind::TimedOut.into()));
            }
        }
    }
}

/// Followers for `files`, each at its end, and the last `past` lines of each.
fn open_followers(files: Vec<LogFile>, past: usize) -> (Followed, Vec<LogLine>) {
    let mut lines = Vec::new();
    let followed = files
        .into_iter()
        .map(|file| {
            // An unreadable file shows nothing, like an empty one; the others still show.
            let (tail, end) = logs::tail(&file.path, past).unwrap_or_default();
            lines.extend(tail.into_iter().map(|line| log_line(&file, line)));
            let follower = Follower::new(file.path.clone(), end);
            (file, follower)
        })
        .collect();
    (followed, lines)
}

/// New lines of every followed file, after adding followers for files not followed yet.
fn read_followed(mut followed: Followed, files: Vec<LogFile>) -> (Followed, Vec<LogLine>) {
    let fresh: Vec<LogFile> = files
        .into_iter()
        .filter(|f| !followed.iter().any(|(known, _)| known.path == f.path))
        .collect();
    // A file found later (a worker scaled up) starts with its last lines, like the first
    // frame: its worker may have written before this tick saw the file.
    let (new, mut lines) = open_followers(fresh, SUBSCRIBE_PAST_LINES);
    followed.extend(new);
    for (file, follower) in &mut followed {
        for line in follower.read_new().unwrap_or_default() {
            lines.push(log_line(file, line));
        }
    }
    (followed, lines)
}

fn log_line(file: &LogFile, line: String) -> LogLine {
    LogLine {
        app: file.app.clone(),
        instance: file.instance_of(&line),
        stream: file.stream.to_string(),
        line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use balancer_config::{LoadOptions, Policy};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

    fn master(dir: &Path) -> Master {
        let load = LoadOptions {
            env: None,
            default_policy: Policy::RoundRobin,
            cpus: 2,
        };
        Master::new(dir.join("home"), load, CancellationToken::new(), None)
    }

    /// Paused time: the runtime jumps to the next timer whenever it would wait, so a minute of
    /// frames takes milliseconds.
    #[tokio::test(start_paused = true)]
    async fn a_subscription_is_never_idle() {
        let dir = tempfile::tempdir().unwrap();
        let master = master(dir.path());
        let (server, mut peer) = UnixStream::pair().unwrap();
        peer.write_all(b"{\"cmd\":\"subscribe\",\"interval_ms\":1000}\n")
            .await
            .unwrap();
        let reader = async {
            let mut lines = BufReader::new(&mut peer).lines();
            loop {
                let line = lines.next_line().await.unwrap().expect("a frame");
                let Ok(Reply::Snapshot(frame)) = serde_json::from_str::<Reply>(&line) else {
                    panic!("not a frame: {line}");
                };
                if frame.elapsed_ms > IDLE_TIMEOUT.as_millis() as u64 + 5_000 {
                    return;
                }
            }
        };
        tokio::select! {
            () = reader => {}
            () = client(server, &master) => panic!("the subscription ended"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_subscriber_that_stops_reading_is_dropped_not_buffered_for() {
        let dir = tempfile::tempdir().unwrap();
        let master = master(dir.path());
        let (server, mut peer) = UnixStream::pair().unwrap();
        peer.write_all(b"{\"cmd\":\"subscribe\",\"interval_ms\":100}\n")
            .await
            .unwrap();
        // Nothing is read: frames fill the socket, the next write waits SUBSCRIBER_STALL, and
        // the master hangs up.
        tokio::time::timeout(Duration::from_secs(600), client(server, &master))
            .await
            .expect("the stalled subscriber is dropped");
        let mut sent = Vec::new();
        peer.read_to_end(&mut sent).await.unwrap();
        let frames = sent
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count();
        assert!(frames > 100, "the socket filled first ({frames} frames)");
        assert!(
            sent.len() < 8 << 20,
            "what waited is the socket's buffer, not a queue: {} bytes",
            sent.len()
        );
    }
}
