//! The master's side of the admin socket: accept local clients of our own uid (or root), read
//! one JSON request per line, carry it out, answer one JSON reply per line.
//!
//! A client can never hurt the master: each connection has its own task, lines are capped at
//! [`MAX_REQUEST_BYTES`], anything unreadable gets an error reply, and a client that goes away
//! mid-operation only loses its answer.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use balancer_config::{App, Check};
use balancer_workers::WorkerStatus;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncSeekExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::{FramedRead, FramedWrite, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;

use super::protocol::{AppInfo, LogLine, MAX_REQUEST_BYTES, Reply, Request, WorkerInfo};
use crate::master::{Apply, Master, Source};

/// How often `logs --follow` looks for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// Binds the admin socket, replacing a stale one, readable and writable by its owner only.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
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
pub async fn serve(listener: UnixListener, master: Arc<Master>, stop: CancellationToken) {
    let me = nix::unistd::getuid().as_raw();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("admin accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
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
        let master = Arc::clone(&master);
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = client(stream, &master) => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

async fn client(stream: UnixStream, master: &Master) {
    let (read, write) = stream.into_split();
    let mut requests = FramedRead::new(read, LinesCodec::new_with_max_length(MAX_REQUEST_BYTES));
    let mut out = FramedWrite::new(write, LinesCodec::new());
    while let Some(line) = requests.next().await {
        let line = match line {
            Ok(line) => line,
            Err(LinesCodecError::MaxLineLengthExceeded) => {
                let reply = Reply::bad_request(format!(
                    "request longer than {MAX_REQUEST_BYTES} bytes; closing"
                ));
                let _ = send(&mut out, &reply).await;
                return;
            }
            Err(LinesCodecError::Io(_)) => return,
        };
        if line.trim().is_empty() {
            continue;
        }
        let request = match serde_json::from_str::<Request>(&line) {
            Ok(request) => request,
            Err(e) => {
                if send(&mut out, &Reply::bad_request(format!("bad request: {e}")))
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
                    result = logs(master, target.as_deref(), lines, follow, &mut out) => result,
                    _ = lines_next(&mut requests), if follow => Ok(()),
                }
            }
            Request::Kill {} => {
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

async fn lines_next(lines: &mut FramedRead<tokio::net::unix::OwnedReadHalf, LinesCodec>) {
    let _ = lines.next().await;
}

type Out = FramedWrite<tokio::net::unix::OwnedWriteHalf, LinesCodec>;

async fn send(out: &mut Out, reply: &Reply) -> Result<(), LinesCodecError> {
    let json = serde_json::to_string(reply).unwrap_or_else(|e| {
        format!(r#"{{"ok":false,"error":"cannot encode the reply: {e}","code":1}}"#)
    });
    out.send(json).await
}

fn outcome(result: Result<String, String>) -> Reply {
    match result {
        Ok(message) => Reply::done(message),
        Err(error) => Reply::failed(error),
    }
}

/// Carries out one request that has a single reply.
async fn handle(master: &Master, request: Request) -> Reply {
    match request {
        Request::Ping {} => Reply {
            ok: true,
            pid: Some(std::process::id()),
            version: Some(env!("CARGO_PKG_VERSION").to_string()),
            ..Reply::default()
        },
        Request::List {} => Reply {
            ok: true,
            workers: Some(all_workers(master)),
            ..Reply::default()
        },
        Request::Show { target } => show(master, &target),
        Request::Start {
            file,
            env,
            toml,
            cwd,
            target,
        } => match (file, toml, target) {
            (Some(file), None, None) => match master.load(&file, env.clone()) {
                Ok(config) => outcome(master.apply(config, Source::File(file), Apply::Start).await),
                Err(e) => Reply::bad_request(e),
            },
            (None, Some(toml), None) => {
                let cwd = cwd.unwrap_or_else(|| master.home().to_path_buf());
                match master.parse(&toml, &cwd, env) {
                    Ok(config) => outcome(
                        master
                            .apply(config, Source::CommandLine, Apply::Start)
                            .await,
                    ),
                    Err(e) => Reply::bad_request(e),
                }
            }
            (None, None, Some(target)) => outcome(master.start_stopped(&target).await),
            _ => Reply::bad_request("start takes exactly one of `file`, `toml` or `target`"),
        },
        Request::Stop { target } => outcome(master.stop(&target).await),
        Request::Restart { target } => outcome(master.restart(&target).await),
        Request::Reload { target, file, env } => match (target, file) {
            (Some(target), None) => outcome(master.reload(&target).await),
            (None, Some(file)) => match master.load(&file, env.clone()) {
                Ok(config) => outcome(
                    master
                        .apply(config, Source::File(file), Apply::Reload)
                        .await,
                ),
                Err(e) => Reply::bad_request(e),
            },
            _ => Reply::bad_request("reload takes exactly one of `target` or `file`"),
        },
        Request::Delete { target } => outcome(master.delete(&target).await),
        Request::Scale { app, to } => outcome(master.scale(&app, &to).await),
        Request::Flush { target } => outcome(flush(master, target.as_deref()).await),
        Request::Logs { .. } | Request::Kill {} => Reply::bad_request("not a single-reply request"),
    }
}

/// `ls`/`jlist` rows.
fn all_workers(master: &Master) -> Vec<WorkerInfo> {
    master
        .apps()
        .iter()
        .flat_map(|(app, statuses)| statuses.iter().map(move |s| worker_info(app, s)))
        .collect()
}

fn worker_info(app: &App, s: &WorkerStatus) -> WorkerInfo {
    let running = s.pid.is_some();
    WorkerInfo {
        id: s.id,
        app: s.app.clone(),
        instance: s.instance,
        pid: s.pid,
        policy: app.policy.as_str().to_string(),
        status: s.state.as_str().to_string(),
        restarts: s.restarts,
        uptime_ms: s
            .since
            .filter(|_| running)
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        connections: s.live_connections(),
        listeners: app.listen.iter().map(|l| l.to_string()).collect(),
        private: s.addrs.iter().map(|a| a.to_string()).collect(),
        last_exit: s.last_exit.map(|e| e.to_string()),
        reason: s.reason.clone(),
    }
}

fn show(master: &Master, target: &str) -> Reply {
    let sup = match master.supervisor(target) {
        Some(sup) => sup,
        None => match target
            .parse::<u32>()
            .ok()
            .and_then(|id| master.supervisor_of_worker(id))
        {
            Some(sup) => sup,
            None => return Reply::failed(format!("no app or worker id named {target:?}")),
        },
    };
    let app = sup.app();
    let mut workers: Vec<WorkerInfo> = sup
        .statuses()
        .iter()
        .map(|s| worker_info(&app, s))
        .collect();
    if let Ok(id) = target.parse::<u32>()
        && app.name != target
    {
        workers.retain(|w| w.id == id);
    }
    Reply {
        ok: true,
        app: Some(AppInfo {
            name: app.name.clone(),
            config: app_json(&app),
            logs: sup
                .log_paths()
                .into_iter()
                .map(|(i, p)| (i, p.out, p.err))
                .collect(),
            workers,
        }),
        ..Reply::default()
    }
}

/// The resolved configuration of an app, every default applied, as `show` prints it.
pub fn app_json(app: &App) -> serde_json::Value {
    let secs = |d: Duration| humantime::format_duration(d).to_string();
    let check = match &app.health.check {
        Check::Tcp => serde_json::json!({ "check": "tcp" }),
        Check::Http { path } => serde_json::json!({ "check": "http", "path": path }),
        Check::None => serde_json::json!({ "check": "none" }),
    };
    let mut health = check;
    health["interval"] = secs(app.health.interval).into();
    health["timeout"] = secs(app.health.timeout).into();
    health["rise"] = app.health.rise.into();
    health["fall"] = app.health.fall.into();
    serde_json::json!({
        "name": app.name,
        "program": app.program,
        "args": app.args,
        "cwd": app.cwd,
        "instances": app.instances,
        "listen": app.listen.iter().map(|l| serde_json::json!({
            "url": l.to_string(), "port_env": l.port_env,
        })).collect::<Vec<_>>(),
        "policy": app.policy.as_str(),
        "env": app.env,
        "health": health,
        "kill_signal": app.kill_signal.as_str(),
        "kill_timeout": secs(app.kill_timeout),
        "drain_timeout": secs(app.drain_timeout),
        "listen_timeout": secs(app.listen_timeout),
        "queue_timeout": secs(app.queue_timeout),
        "connect_timeout": secs(app.connect_timeout),
        "autorestart": app.autorestart,
        "max_restarts": app.max_restarts,
        "min_uptime": secs(app.min_uptime),
        "restart_delay": secs(app.restart_delay),
        "exp_backoff_restart_delay": app.exp_backoff_restart_delay.map(secs),
        "max_memory_restart": app.max_memory_restart,
        "reload_batch": app.reload_batch,
    })
}

/// The log files `target` names: (app, instance, stream, path).
fn log_files(
    master: &Master,
    target: Option<&str>,
) -> Result<Vec<(String, u32, &'static str, std::path::PathBuf)>, String> {
    let sups = match target {
        None => master.resolve("all")?,
        Some(t) => master.resolve(t)?,
    };
    let mut files = Vec::new();
    for (sup, t) in sups {
        let name = sup.app().name.clone();
        let wanted: Option<u32> = match t {
            balancer_workers::Target::Worker(id) => sup
                .statuses()
                .iter()
                .find(|s| s.id == id)
                .map(|s| s.instance),
            balancer_workers::Target::All => None,
        };
        for (instance, paths) in sup.log_paths() {
            if wanted.is_some_and(|w| w != instance) {
                continue;
            }
            files.push((name.clone(), instance, "out", paths.out));
            files.push((name.clone(), instance, "err", paths.err));
        }
    }
    Ok(files)
}

async fn flush(master: &Master, target: Option<&str>) -> Result<String, String> {
    let files = log_files(master, target)?;
    for (_, _, _, path) in &files {
        // Workers append (O_APPEND), so after truncation they simply write from the start.
        match std::fs::OpenOptions::new().write(true).open(path) {
            Ok(f) => f
                .set_len(0)
                .map_err(|e| format!("{}: {e}", path.display()))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    Ok(format!("flushed {} log files", files.len()))
}

/// Streams the last `lines` of each log file, then (with `follow`) new lines as they come.
async fn logs(
    master: &Master,
    target: Option<&str>,
    lines: usize,
    follow: bool,
    out: &mut Out,
) -> Result<(), LinesCodecError> {
    let files = match log_files(master, target) {
        Ok(files) => files,
        Err(e) => return send(out, &Reply::failed(e)).await,
    };
    let mut offsets = Vec::new();
    for (app, instance, stream, path) in &files {
        let text = tokio::fs::read_to_string(path).await.unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        for line in &all[all.len().saturating_sub(lines)..] {
            send(out, &log_reply(app, *instance, stream, line)).await?;
        }
        offsets.push(text.len() as u64);
    }
    if !follow {
        return send(
            out,
            &Reply {
                ok: true,
                done: Some(true),
                ..Reply::default()
            },
        )
        .await;
    }
    loop {
        tokio::time::sleep(FOLLOW_POLL).await;
        for ((app, instance, stream, path), offset) in files.iter().zip(offsets.iter_mut()) {
            let Ok(meta) = tokio::fs::metadata(path).await else {
                continue;
            };
            if meta.len() < *offset {
                *offset = 0; // flushed
            }
            if meta.len() == *offset {
                continue;
            }
            let Ok(mut file) = tokio::fs::File::open(path).await else {
                continue;
            };
            if file.seek(io::SeekFrom::Start(*offset)).await.is_err() {
                continue;
            }
            let mut reader = BufReader::new(file);
            let mut line = String::new();
            // Only whole lines: a partial last line waits for its newline.
            while let Ok(n) = reader.read_line(&mut line).await {
                if n == 0 || !line.ends_with('\n') {
                    break;
                }
                *offset += n as u64;
                send(
                    out,
                    &log_reply(app, *instance, stream, line.trim_end_matches('\n')),
                )
                .await?;
                line.clear();
            }
        }
    }
}

fn log_reply(app: &str, instance: u32, stream: &str, line: &str) -> Reply {
    Reply {
        ok: true,
        log: Some(LogLine {
            app: app.to_string(),
            instance,
            stream: stream.to_string(),
            line: line.to_string(),
        }),
        ..Reply::default()
    }
}
