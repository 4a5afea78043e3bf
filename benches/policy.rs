//! The cost of one pick under each balancing algorithm, at 2, 16 and 128 ready workers.
//!
//! A pick is what the proxies do per connection (per request on `http://`) before connecting:
//! load the pool's snapshot, let the algorithm name the first worker, and take it from the
//! candidate walk. Workers carry uneven live counts (1 to 8 connections, none idle), so
//! `least_conn` scans the whole pool (its worst case: an idle worker ends the scan early) and
//! `p2c` compares real loads. `source` hashes a different client address each iteration.
//!
//! `cargo bench --bench policy`

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use balancer::policy;
use balancer_config::Balance;
use balancer_workers::{ConnGuard, Pool, WorkerHandle};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

/// A pool of `n` ready workers with uneven loads; the guards keep the loads.
fn pool_of(n: u32) -> (Pool, Vec<ConnGuard>) {
    let pool = Pool::new();
    let mut guards = Vec::new();
    for id in 0..n {
        let addr = SocketAddr::from(([127, 0, 0, 1], 10_000 + id as u16));
        let worker = Arc::new(WorkerHandle::new(id, id, 1000 + id, vec![addr]));
        for _ in 0..1 + (id * 7 + 3) % 8 {
            guards.extend(worker.acquire());
        }
        pool.insert(worker);
    }
    (pool, guards)
}

fn picks(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for n in [2u32, 16, 128] {
        let (pool, _guards) = pool_of(n);
        for balance in [
            Balance::RoundRobin,
            Balance::LeastConn,
            Balance::P2c,
            Balance::Source,
        ] {
            let mut client = 0u32;
            group.bench_with_input(BenchmarkId::new(balance.as_str(), n), &n, |b, _| {
                b.iter(|| {
                    client = client.wrapping_add(1);
                    let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (client & 0xffff)));
                    black_box(policy::candidates(&pool, balance, ip).next())
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, picks);
criterion_main!(benches);
