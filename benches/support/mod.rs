//! What the proxy benches share: the runtime the proxy runs on, a public listener served by the
//! real accept loop and route (exactly as in the binary), and the ratio report `cargo bench`
//! prints at the end, each path against a direct connection measured in the same run.
//!
//! The ratios are read back from criterion's own estimates (`<target>/criterion/<group>/<id>/
//! new/estimates.json`) so they are the same figures criterion printed; a benchmark filtered out
//! of this run (its file older than the run) is left out rather than reported stale.

#![allow(dead_code)] // each bench uses the part it needs

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use balancer::listener;
use balancer::proxy::{Route, RouteSettings};
use balancer_config::{Listener, Proto};
use balancer_workers::{Pool, WorkerHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The proxy's runtime, as the master builds it on a small machine: one worker thread, so the
/// benchmark client (the bench's main thread) and the proxy share the machine like a real load.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A pool of one ready worker at `addr` (this process stands in for its pid).
pub fn pool_of(addr: SocketAddr) -> Arc<Pool> {
    let pool = Arc::new(Pool::new());
    pool.insert(Arc::new(WorkerHandle::new(
        0,
        0,
        std::process::id(),
        vec![addr],
    )));
    pool
}

/// Settings with short timeouts, so a broken setup fails fast instead of hanging the bench.
pub fn settings() -> RouteSettings {
    RouteSettings {
        connect_timeout: Duration::from_secs(3),
        queue_timeout: Duration::from_secs(3),
        ..RouteSettings::default()
    }
}

/// Binds a public `proto` listener on a free loopback port and serves `route` on it with the
/// real accept loop, on the current runtime; returns its address. Serves until `stop`.
pub fn serve(proto: Proto, route: Route, stop: &CancellationToken) -> SocketAddr {
    serve_with(proto, stop, |_| route)
}

/// [`serve`], with the route made once the listener's address is known (a route labelled with
/// its listener, as the master labels the metrics of each).
pub fn serve_with(
    proto: Proto,
    stop: &CancellationToken,
    route: impl FnOnce(SocketAddr) -> Route,
) -> SocketAddr {
    let wanted = Listener::new(proto, SocketAddr::from(([127, 0, 0, 1], 0)), "PORT");
    let bound = listener::bind(&wanted).expect("bind a public listener");
    let addr = match &bound {
        listener::Bound::Stream(l) => l.local_addr(),
        listener::Bound::Datagram(s) => s.local_addr(),
    }
    .expect("its address");
    tokio::spawn(listener::serve(
        proto,
        bound,
        listener::ServeContext {
            budget: balancer::proxy::unlimited_budget(),
            route: Arc::new(route(addr)),
            stop: stop.clone(),
            abort: CancellationToken::new(),
            tracker: TaskTracker::new(),
        },
    ));
    addr
}

/// A direct worker and the same worker behind one listener of `proto`: sets both up on a new
/// runtime, runs `benches` over `[("direct", …), (proxied_name, …)]` with the benches'
/// criterion settings, and prints each group's ratio to `direct`.
pub fn direct_and_proxied<W: std::future::Future<Output = SocketAddr>>(
    proto: Proto,
    proxied_name: &'static str,
    groups: &[&str],
    worker: impl FnOnce() -> W,
    benches: impl FnOnce(&mut criterion::Criterion, &[(&'static str, SocketAddr)]),
) {
    let started = SystemTime::now();
    let runtime = runtime();
    let stop = CancellationToken::new();
    let (direct, proxied) = runtime.block_on(async {
        let direct = worker().await;
        let route = Route::new("bench", pool_of(direct), settings());
        (direct, serve(proto, route, &stop))
    });
    let mut c = criterion();
    benches(&mut c, &[("direct", direct), (proxied_name, proxied)]);
    c.final_summary();
    stop.cancel();
    print_ratios(started, groups, "direct", &[proxied_name]);
}

/// The criterion settings every proxy bench uses (command-line arguments applied).
pub fn criterion() -> criterion::Criterion {
    criterion::Criterion::default()
        .sample_size(30)
        .measurement_time(Duration::from_secs(3))
        .configure_from_args()
}

/// Prints, for each group, every path's mean time as a ratio to `baseline`'s in the same run
/// (`1.30×` = 30 % slower than a direct connection). Call after `Criterion::final_summary`.
pub fn print_ratios(started: SystemTime, groups: &[&str], baseline: &str, paths: &[&str]) {
    let Some(root) = criterion_dir() else {
        eprintln!("ratios: criterion's output directory not found");
        return;
    };
    println!("\nratios to `{baseline}` in this run (time per iteration; > 1 is slower):");
    for group in groups {
        let Some(base) = mean_ns(&root, group, baseline, started) else {
            continue;
        };
        for path in paths.iter().filter(|p| **p != baseline) {
            if let Some(t) = mean_ns(&root, group, path, started) {
                println!(
                    "  {group}/{path}: {:.2}× ({:.1} µs vs {:.1} µs)",
                    t / base,
                    t / 1e3,
                    base / 1e3
                );
            }
        }
    }
}

/// Criterion's output directory: `$CRITERION_HOME`, else `<target>/criterion`, the target
/// directory being where this bench executable lives (`<target>/release/deps/<bench>-<hash>`).
fn criterion_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return Some(PathBuf::from(home));
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return Some(PathBuf::from(target).join("criterion"));
    }
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.parent()?.join("criterion"))
}

/// The time per iteration of `group/id` from its estimates, if they were written during this run.
fn mean_ns(root: &std::path::Path, group: &str, id: &str, started: SystemTime) -> Option<f64> {
    let file = root.join(group).join(id).join("new").join("estimates.json");
    let fresh = std::fs::metadata(&file).ok()?.modified().ok()? >= started;
    if !fresh {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).ok()?).ok()?;
    // Criterion prints the slope when it has one (linear sampling), the mean otherwise.
    ["slope", "mean"]
        .iter()
        .find_map(|k| json.get(k)?.get("point_estimate")?.as_f64())
}
