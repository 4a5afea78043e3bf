//! The master's side of the admin socket: accept local clients of our own uid (or root), read
//! one JSON request per line, carry it out, answer one JSON reply per line.
//!
//! A client can never hurt the master: each connection has its own task, lines are capped at
//! [`MAX_REQUEST_BYTES`], anything unreadable gets an error reply, and a client that goes away
//! mid-operation only loses its answer. Log files are read off the runtime's threads.

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
use super::views::{all_workers, show};
use super::{Apply, ControlError, Master, OpResult, Source};
use crate::protocol::{Load, LogLine, MAX_REQUEST_BYTES, Pong, Reload, Reply, Request, Start};

/// How often `logs --follow` looks for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// Admin connections served at once; more are told so and closed, so idle clients cannot
/// take the master's descriptors.
const MAX_CLIENTS: usize = 64;
/// A connection that sends no request for this long is closed (a `logs --follow` in
/// progress is not idle).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

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
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let report = move |line: String| {
        let _ = tx.send(line);
    };
    let work = master.reload_reporting(target, &report);
    tokio::pin!(work);
    let mut listening = true;
    let result = loop {
        tokio::select! {
            result = &mut work => break result,
            Some(line) = rx.recv() => {
                if listening && send(out, &Reply::Progress(line)).await.is_err() {
                    listening = false;
                }
            }
        }
    };
    while let Ok(line) = rx.try_recv() {
        if listening && send(out, &Reply::Progress(line)).await.is_err() {
            listening = false;
        }
    }
    if !listening {
        return Err(LinesCodecError::Io(io::ErrorKind::BrokenPipe.into()));
    }
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
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let report = move |line: String| {
        let _ = tx.send(line);
    };
    let timeout = Duration::from_millis(timeout_ms.unwrap_or(crate::protocol::UPGRADE_TIMEOUT_MS));
    let work = master.upgrade(binary, timeout, &report);
    tokio::pin!(work);
    let mut listening = true;
    let result = loop {
        tokio::select! {
            result = &mut work => break result,
            Some(line) = rx.recv() => {
                if listening && send(out, &Reply::Progress(line)).await.is_err() {
                    listening = false;
                }
            }
        }
    };
    while let Ok(line) = rx.try_recv() {
        if listening && send(out, &Reply::Progress(line)).await.is_err() {
            listening = false;
        }
    }
    if !listening {
        return Err(LinesCodecError::Io(io::ErrorKind::BrokenPipe.into()));
    }
    send(out, &outcome(result)).await
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
        Request::Logs { .. } | Request::Kill => bad_request("not a single-reply request".into()),
    }
}

/// One log file a request names.
struct LogFile {
    app: String,
    instance: u32,
    stream: &'static str,
    path: PathBuf,
}

/// The log files `target` names (every app's when `None`).
fn log_files(master: &Master, target: Option<&str>) -> Result<Vec<LogFile>, ControlError> {
    let mut files = Vec::new();
    for (sup, t) in master.resolve(target.unwrap_or("all"))? {
        let name = sup.app().name.clone();
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
                files.push(LogFile {
                    app: name.clone(),
                    instance,
                    stream,
                    path,
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
    for file in &files {
        let path = file.path.clone();
        // An unreadable file shows nothing, like an empty one; the others still show.
        let (past, end) = blocking(move || logs::tail(&path, lines))
            .await
            .unwrap_or_default();
        for line in past {
            send(out, &log_reply(file, line)).await?;
        }
        followers.push(Follower::new(file.path.clone(), end));
    }
    if !follow {
        return send(out, &Reply::End).await;
    }
    loop {
        tokio::time::sleep(FOLLOW_POLL).await;
        for (file, follower) in files.iter().zip(followers.iter_mut()) {
            let mut moved = follower.clone();
            let (new, state) = blocking(move || (moved.read_new(), moved)).await;
            *follower = state;
            for line in new.unwrap_or_default() {
                send(out, &log_reply(file, line)).await?;
            }
        }
    }
}

fn log_reply(file: &LogFile, line: String) -> Reply {
    Reply::Log(LogLine {
        app: file.app.clone(),
        instance: file.instance,
        stream: file.stream.to_string(),
        line,
    })
}
