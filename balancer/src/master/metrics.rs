//! The observation endpoint (`[balancer] metrics = "127.0.0.1:9615"`): a small hyper server
//! and its router — `/metrics` (Prometheus text), `/status` (JSON), `/healthz`, `/readyz` and
//! `/`, a read-only page drawn from `/status`.
//!
//! Two kinds of figures meet in `/metrics`. What the data plane counts (connections, bytes,
//! queue waits, HTTP requests, UDP datagrams) goes through the `metrics` facade into the
//! Prometheus recorder installed once per process ([`recorder`]), on handles the proxies
//! resolved once per listener and worker. What is *state* — workers up and ready, restarts by
//! reason, tree memory and CPU, the master's own `process_*` — is read from the supervisors at
//! scrape time and written here, so a worker that left is not reported as if it still ran.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use balancer_workers::{RestartReason, UsageSnapshot, WorkerState, WorkerStatus};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Master;
use super::views::all_workers;

/// The page at `/`: one file, its script and style inline, so it works offline.
const PAGE: &str = include_str!("metrics_page.html");

/// Histogram buckets for every `_seconds` histogram: from a loopback round trip to a long
/// queue wait.
const SECONDS_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How often histograms are folded into their buckets when nobody scrapes, so samples never
/// pile up in memory.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The process's Prometheus recorder, installed on first use. One per process because the
/// `metrics` facade has one global recorder; a second master in the same process (unit
/// tests) shares it.
pub fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics will miss traffic");
        }
        crate::proxy::metrics::describe();
        started();
        handle
    })
}

/// When the master started (the first call), for `/status`'s uptime.
fn started() -> (Instant, SystemTime) {
    static STARTED: OnceLock<(Instant, SystemTime)> = OnceLock::new();
    *STARTED.get_or_init(|| (Instant::now(), SystemTime::now()))
}

/// Folds histogram samples into buckets every [`UPKEEP_EVERY`] until `stop`.
pub async fn upkeep(stop: CancellationToken) {
    let handle = recorder();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(UPKEEP_EVERY) => handle.run_upkeep(),
        }
    }
}

/// The endpoint serving at one address; dropping it does not stop it, [`stop`](Self::stop)
/// does.
#[derive(Debug)]
pub struct Endpoint {
    /// Where it listens (the real port when the config said 0).
    pub addr: SocketAddr,
    stop: CancellationToken,
    /// A duplicate of the listening socket, for `upgrade` to hand to the next master.
    socket: Option<std::os::fd::OwnedFd>,
}

impl Endpoint {
    /// Stops accepting; requests in flight finish.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// The listening socket (`upgrade` passes it on, so the endpoint never stops answering).
    pub fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.socket.as_ref().map(|s| s.as_fd())
    }
}

/// Binds `addr` and serves the endpoint for `master` on the runtime. A taken address fails
/// here, before anything else changes.
pub fn start(addr: SocketAddr, master: Arc<Master>) -> std::io::Result<Endpoint> {
    start_on(std::net::TcpListener::bind(addr)?, master)
}

/// Serves the endpoint on a socket already listening (bound here, or handed over by the
/// previous master).
pub fn start_on(std: std::net::TcpListener, master: Arc<Master>) -> std::io::Result<Endpoint> {
    use std::os::fd::AsFd;
    std.set_nonblocking(true)?;
    let socket = std.as_fd().try_clone_to_owned()?;
    let listener = TcpListener::from_std(std)?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    tokio::spawn(serve(listener, master, stop.clone()));
    tracing::info!(%addr, "metrics endpoint listening");
    Ok(Endpoint {
        addr,
        stop,
        socket: Some(socket),
    })
}

async fn serve(listener: TcpListener, master: Arc<Master>, stop: CancellationToken) {
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
        let master = Arc::clone(&master);
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let master = Arc::clone(&master);
                async move { Ok::<_, Infallible>(route(&master, &req)) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}

/// The router: every path is read-only, so only GET and HEAD are served.
fn route(master: &Master, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render(master),
        ),
        "/status" => reply(
            StatusCode::OK,
            "application/json",
            status(master).to_string(),
        ),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match unready(master) {
            None => reply(StatusCode::OK, "text/plain", "ready\n".into()),
            Some(why) => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", why),
        },
        "/" | "/index.html" => reply(StatusCode::OK, "text/html; charset=utf-8", PAGE.into()),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `None` when every app with `instances > 0` has a ready worker and the master is not
/// shutting down (so a load balancer in front stops sending here first); otherwise why not.
fn unready(master: &Master) -> Option<String> {
    if master.shutdown.is_cancelled() {
        return Some("shutting down\n".into());
    }
    let waiting: Vec<String> = master
        .apps()
        .iter()
        .filter(|(app, statuses)| {
            app.instances > 0 && !statuses.iter().any(|s| s.state == WorkerState::Ready)
        })
        .map(|(app, _)| app.name.clone())
        .collect();
    (!waiting.is_empty()).then(|| format!("no ready worker: {}\n", waiting.join(", ")))
}

/// `/status`: the master, every app with its workers (as `jlist` gives them) and listeners.
fn status(master: &Master) -> serde_json::Value {
    let workers = all_workers(master);
    let apps: Vec<_> = master
        .apps()
        .iter()
        .map(|(app, statuses)| {
            // As in `jlist`, plus each process's connection count so far (the page's rate).
            let workers: Vec<_> = workers
                .iter()
                .filter(|w| w.app == app.name)
                .map(|w| {
                    let mut row = serde_json::to_value(w).unwrap_or_default();
                    let total = statuses
                        .iter()
                        .find(|s| s.id == w.id)
                        .and_then(|s| s.handle.as_ref())
                        .map_or(0, |h| h.total());
                    if let Some(fields) = row.as_object_mut() {
                        fields.insert("connections_total".into(), total.into());
                    }
                    row
                })
                .collect();
            serde_json::json!({
                "name": app.name,
                "instances": app.instances,
                "policy": app.policy.as_str(),
                "listeners": app.listen.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "workers": workers,
            })
        })
        .collect();
    let (since, _) = started();
    serde_json::json!({
        "master": {
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_ms": u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
            "ready": unready(master).is_none(),
        },
        "apps": apps,
    })
}

/// The whole `/metrics` text: the recorder's families, then the state read now.
fn render(master: &Master) -> String {
    let mut out = recorder().render();
    workers_text(master, &mut out);
    process_text(&mut out);
    out
}

/// One family's HELP and TYPE lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value escaped as the text format asks (backslash, quote, newline).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Worker state as gauges and counters, labelled `app`, `worker`, `instance`.
fn workers_text(master: &Master, out: &mut String) {
    let apps = master.apps();
    let rows: Vec<Row<'_>> = apps
        .iter()
        .flat_map(|(_, statuses)| one_per_slot(statuses))
        .map(|s| {
            let labels = format!(
                "app=\"{}\",worker=\"{}\",instance=\"{}\"",
                escape(&s.app),
                s.id,
                s.instance
            );
            let usage = s
                .usage
                .as_ref()
                .filter(|_| s.pid.is_some())
                .and_then(|u| u.snapshot());
            (labels, s, usage)
        })
        .collect();
    series(
        out,
        &rows,
        "balancer_worker_up",
        "gauge",
        "1 while the worker's process runs",
        |s, _| Some(f64::from(u8::from(s.pid.is_some()))),
    );
    series(
        out,
        &rows,
        "balancer_worker_ready",
        "gauge",
        "1 while the worker is in the pool (ready)",
        |s, _| Some(f64::from(u8::from(s.state == WorkerState::Ready))),
    );
    series(
        out,
        &rows,
        "balancer_worker_memory_bytes",
        "gauge",
        "Resident memory of the worker's whole process tree",
        |_, u| u.map(|u| u.memory as f64),
    );
    series(
        out,
        &rows,
        "balancer_worker_cpu_seconds_total",
        "counter",
        "CPU time of the worker's whole process tree since its process started",
        |_, u| u.map(|u| u.cpu_seconds),
    );
    family(
        out,
        "balancer_worker_restarts_total",
        "counter",
        "Restarts of the worker slot, by reason",
    );
    for (labels, s, _) in &rows {
        for reason in RestartReason::ALL {
            let _ = writeln!(
                out,
                "balancer_worker_restarts_total{{{labels},reason=\"{}\"}} {}",
                reason.as_str(),
                s.restarts_by.get(reason)
            );
        }
    }
    out.push('\n');
}

/// One status per worker slot. During a reload a slot has two (the draining process and its
/// replacement), and two samples with the same labels would make the exposition invalid: the
/// slot is its replacement, the incarnation not on its way out (or the last listed).
fn one_per_slot(statuses: &[WorkerStatus]) -> Vec<&WorkerStatus> {
    let leaving = |s: &WorkerStatus| {
        matches!(
            s.state,
            WorkerState::Draining | WorkerState::Stopping | WorkerState::Stopped
        )
    };
    let mut slots: Vec<&WorkerStatus> = Vec::with_capacity(statuses.len());
    for s in statuses {
        match slots
            .iter_mut()
            .find(|kept| kept.app == s.app && kept.id == s.id)
        {
            Some(kept) if leaving(kept) || !leaving(s) => *kept = s,
            Some(_) => {}
            None => slots.push(s),
        }
    }
    slots
}

/// One worker row: its labels, status and last usage sample.
type Row<'a> = (String, &'a WorkerStatus, Option<UsageSnapshot>);

/// One family with a sample per worker that has a value.
fn series(
    out: &mut String,
    rows: &[Row<'_>],
    name: &str,
    kind: &str,
    help: &str,
    value: impl Fn(&WorkerStatus, Option<UsageSnapshot>) -> Option<f64>,
) {
    family(out, name, kind, help);
    for (labels, s, usage) in rows {
        if let Some(v) = value(s, *usage) {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    }
    out.push('\n');
}

/// The standard `process_*` families of the master itself, from `/proc/self`.
fn process_text(out: &mut String) {
    let Some(p) = SelfProcess::read() else {
        return;
    };
    family(
        out,
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
    );
    let _ = writeln!(out, "process_cpu_seconds_total {}", p.cpu_seconds);
    family(
        out,
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
    );
    let _ = writeln!(out, "process_resident_memory_bytes {}", p.rss);
    family(
        out,
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
    );
    let _ = writeln!(out, "process_virtual_memory_bytes {}", p.vsize);
    family(
        out,
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
    );
    let _ = writeln!(out, "process_open_fds {}", p.open_fds);
    if let Some(max) = p.max_fds {
        family(
            out,
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
        );
        let _ = writeln!(out, "process_max_fds {max}");
    }
    let (_, since) = started();
    if let Ok(t) = since.duration_since(SystemTime::UNIX_EPOCH) {
        family(
            out,
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
        );
        let _ = writeln!(out, "process_start_time_seconds {}", t.as_secs());
    }
}

/// The master's own figures, as Prometheus' client libraries report them.
struct SelfProcess {
    cpu_seconds: f64,
    rss: u64,
    vsize: u64,
    open_fds: usize,
    max_fds: Option<u64>,
}

impl SelfProcess {
    /// Reads `/proc/self/stat` (fields after the parenthesised name, which may hold spaces)
    /// and counts `/proc/self/fd`.
    fn read() -> Option<Self> {
        use nix::unistd::{SysconfVar, sysconf};
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
        // After the name, field 3 (state) is index 0: utime is field 14, rss field 24.
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        let ticks = sysconf(SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
        let page = sysconf(SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096) as u64;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count();
        let max_fds = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .ok()
            .map(|(soft, _)| soft);
        Some(SelfProcess {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
            vsize: field(23)?,
            rss: field(24)? * page,
            open_fds,
            max_fds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_master_reads_its_own_process_figures() {
        let p = SelfProcess::read().expect("/proc/self");
        assert!(p.rss > 0 && p.vsize >= p.rss);
        assert!(p.open_fds >= 3, "stdin, stdout, stderr at least");
        let mut out = String::new();
        process_text(&mut out);
        assert!(out.contains("# TYPE process_cpu_seconds_total counter\n"));
    }

    #[test]
    fn a_slot_mid_reload_is_one_series_its_replacement() {
        let status = |id: u32, state: WorkerState, pid: u32| WorkerStatus {
            id,
            app: "a".into(),
            instance: id,
            state,
            pid: Some(pid),
            addrs: Vec::new(),
            since: None,
            restarts: 0,
            restarts_by: Default::default(),
            last_restart: None,
            last_exit: None,
            reason: None,
            handle: None,
            usage: None,
        };
        let statuses = [
            status(0, WorkerState::Ready, 10),
            status(1, WorkerState::Draining, 11),
            status(1, WorkerState::Starting, 12),
            status(2, WorkerState::Starting, 13),
            status(2, WorkerState::Stopping, 14),
        ];
        let pids: Vec<Option<u32>> = one_per_slot(&statuses).iter().map(|s| s.pid).collect();
        assert_eq!(pids, [Some(10), Some(12), Some(13)]);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
