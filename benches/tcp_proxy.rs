//! The TCP proxy path against a direct connection, in the same run.
//!
//! A tokio echo server stands in for a worker (a real socket, not a mock). Each benchmark is
//! measured three ways in the same run: `direct` (client → worker), `reuseport` (client →
//! the worker's own `SO_REUSEPORT` socket in a steered group, the reuseport policy's path) and
//! `balancer_rr` (client → the balancer's listener, round-robin policy and proxy → worker,
//! exactly as in the binary). The ratios to `direct` are each policy's overhead on this machine.
//! `balancer_rr_metrics` is `balancer_rr` with its route counting into the Prometheus recorder
//! the master installs (connections, active, bytes, queue); `balancer_rr` counts nothing, so
//! the two give the metrics' cost in one run.
//!
//! `cargo bench --bench tcp_proxy` prints each ratio to `direct` at the end.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

use balancer::proxy::Route;
use balancer_config::{Io, Proto};
use balancer_workers::WorkerHandle;
use balancer_workers::reuseport::Group;
use criterion::{BenchmarkId, Criterion, Throughput};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

mod support;

struct Setup {
    _runtime: tokio::runtime::Runtime,
    direct: SocketAddr,
    proxied: SocketAddr,
    metered: SocketAddr,
    reuseport: SocketAddr,
    stop: CancellationToken,
}

/// The stand-in worker: echoes every byte back.
async fn serve_echo(echo: tokio::net::TcpListener) {
    loop {
        let Ok((mut s, _)) = echo.accept().await else {
            continue;
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// A reuseport group of one worker socket, served by an echo worker: the reuseport policy's
/// data path (kernel → the worker's own socket, steered by the group's BPF program).
fn reuseport_worker() -> SocketAddr {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let listener = balancer_config::Listener::new(
        balancer_config::Proto::Tcp,
        SocketAddr::from(([127, 0, 0, 1], port)),
        "PORT",
    );
    let group = Group::new(listener.clone(), Arc::new(balancer::proxy::tcp::rescue));
    let (key, fd) = group.join().expect("a reuseport socket");
    group.set_ready(key, true);
    let std_listener = std::net::TcpListener::from(fd);
    std_listener.set_nonblocking(true).expect("nonblocking");
    let echo = tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
    tokio::spawn(async move {
        let _group = group;
        serve_echo(echo).await
    });
    listener.addr
}

fn setup() -> Setup {
    let runtime = support::runtime();
    let stop = CancellationToken::new();
    // The recorder the master installs; only the metered route counts into it.
    let prometheus = balancer::master::metrics::recorder();
    let (direct, proxied, metered, reuseport) = runtime.block_on(async {
        let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind echo");
        let direct = echo.local_addr().expect("addr");
        tokio::spawn(serve_echo(echo));
        let reuseport = reuseport_worker();
        let pool = support::pool_of(direct);
        let proxied = support::serve(
            Proto::Tcp,
            Route::new("bench", Arc::clone(&pool), support::settings()),
            &stop,
        );
        // Labelled with its listener, as the master labels each listener's metrics.
        let metered = support::serve_with(Proto::Tcp, &stop, |addr| {
            Route::new("bench", pool, support::settings()).for_listener(&format!("tcp://{addr}"))
        });
        (direct, proxied, metered, reuseport)
    });
    assert!(
        prometheus
            .render()
            .contains("balancer_tcp_connections_accepted_total")
    );
    Setup {
        _runtime: runtime,
        direct,
        proxied,
        metered,
        reuseport,
        stop,
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s
}

fn exchange(stream: &mut TcpStream, out: &[u8], back: &mut [u8]) {
    stream.write_all(out).expect("write");
    stream.read_exact(back).expect("read");
}

fn benches(c: &mut Criterion) {
    let s = setup();
    let targets = [
        ("direct", s.direct),
        ("reuseport", s.reuseport),
        ("balancer_rr", s.proxied),
        ("balancer_rr_metrics", s.metered),
    ];

    // A fresh connection per request: accept, pick, connect, one exchange, close.
    let mut group = c.benchmark_group("connection_per_request");
    for (name, addr) in targets {
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            let mut back = [0u8; 64];
            b.iter(|| {
                let mut stream = connect(addr);
                exchange(&mut stream, &[7u8; 64], &mut back);
            })
        });
    }
    group.finish();

    // Exactly what the metered route adds to one connection, alone: the listener's accepted
    // counter, the worker's handles (from its slot), the active gauge up and down, the
    // connection counter and both byte counters, all into the real Prometheus recorder.
    // Compared with `connection_per_request/balancer_rr`, it is the metrics' share of a
    // connection without the machine's noise around it.
    let mut group = c.benchmark_group("metrics_per_connection");
    let meters = balancer::proxy::metrics::ListenerMeters::new("bench", "tcp://bench");
    let worker = WorkerHandle::new(0, 0, 1, vec![s.direct]);
    group.bench_function("counters", |b| {
        b.iter(|| {
            meters.accepted.increment(1);
            let m = meters.worker(std::hint::black_box(&worker), 0);
            let active = m.map(balancer::proxy::metrics::Active::enter);
            if let Some(m) = m {
                m.bytes_to_worker.increment(64);
                m.bytes_to_client.increment(64);
            }
            drop(active);
        })
    });
    group.finish();

    // Round trips on one established connection: the copy loop's latency. With `io_uring`
    // the connection is handed to a ring after its first exchanges (`[balancer] io`); only
    // this group has such a row, since a connection per request and a bulk stream stay on
    // epoll.
    let mut group = c.benchmark_group("roundtrip_64B");
    let uring = balancer::proxy::uring::available().is_ok();
    let with_uring = targets
        .iter()
        .copied()
        .chain(uring.then_some(("balancer_rr_io_uring", s.proxied)));
    for (name, addr) in with_uring {
        let io = if name.ends_with("io_uring") {
            Io::IoUring
        } else {
            Io::Epoll
        };
        balancer::proxy::uring::set(io).expect("io_uring was available");
        let mut stream = connect(addr);
        let mut back = [0u8; 64];
        for _ in 0..balancer::proxy::copy::CARRY_AFTER_BURSTS + 1 {
            exchange(&mut stream, &[7u8; 64], &mut back);
        }
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| exchange(&mut stream, &[7u8; 64], &mut back))
        });
    }
    balancer::proxy::uring::set(Io::Epoll).expect("epoll");
    group.finish();

    // Bulk transfer on one connection: the copy loop's throughput.
    let size = 1 << 20;
    let mut group = c.benchmark_group("bulk_1MiB");
    group.throughput(Throughput::Bytes(size as u64));
    for (name, addr) in targets {
        let mut stream = connect(addr);
        let out = vec![42u8; size];
        let mut back = vec![0u8; size];
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                // Write and read concurrently so neither side's buffers fill up.
                let mut writer = stream.try_clone().expect("clone");
                std::thread::scope(|scope| {
                    scope.spawn(|| writer.write_all(&out).expect("write"));
                    stream.read_exact(&mut back).expect("read");
                });
            })
        });
    }
    group.finish();
    s.stop.cancel();
}

fn main() {
    let started = std::time::SystemTime::now();
    let mut c = support::criterion();
    benches(&mut c);
    c.final_summary();
    support::print_ratios(
        started,
        &["connection_per_request", "roundtrip_64B", "bulk_1MiB"],
        "direct",
        &[
            "reuseport",
            "balancer_rr",
            "balancer_rr_metrics",
            "balancer_rr_io_uring",
        ],
    );
}
