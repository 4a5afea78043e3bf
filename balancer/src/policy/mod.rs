//! Balancing algorithms: which ready worker gets the next connection (`balance`).
//!
//! Every algorithm has the same shape: it reads the pool's snapshot (one wait-free `ArcSwap`
//! load, no lock), names the worker to try *first*, and the proxies then walk the rest of the
//! snapshot in order from there ([`Candidates`]). That walk is what keeps the connect retry the
//! same for all of them: a worker that refuses is stepped past, the client never sees it.
//! Each algorithm is one file here; [`candidates`] is the one dispatch on [`Balance`].

use std::net::IpAddr;
use std::sync::Arc;

use balancer_config::Balance;
use balancer_workers::{Pool, PoolSnapshot, WorkerHandle};

pub mod least_conn;
pub mod p2c;
pub mod round_robin;
pub mod source;

/// The workers to try for one new connection under `balance`: every ready worker once, the
/// algorithm's choice first. `client` is the address `source` hashes (a UDP flow's IP, the
/// PROXY header's source when one was accepted).
pub fn candidates(pool: &Pool, balance: Balance, client: IpAddr) -> Candidates {
    let snapshot = pool.load_full();
    let workers = &snapshot.workers;
    let start = if workers.is_empty() {
        0
    } else {
        match balance {
            Balance::RoundRobin => round_robin::first(pool, workers),
            Balance::LeastConn => least_conn::first(pool, workers),
            Balance::P2c => p2c::first(workers),
            Balance::Source => source::first(workers, client),
        }
    };
    Candidates {
        snapshot,
        start,
        step: 0,
    }
}

/// The iterator [`candidates`] returns. It owns its snapshot, so a walk may await between
/// candidates while the supervisor publishes new ones.
#[derive(Debug)]
pub struct Candidates {
    snapshot: Arc<PoolSnapshot>,
    start: usize,
    step: usize,
}

impl Iterator for Candidates {
    type Item = Arc<WorkerHandle>;

    fn next(&mut self) -> Option<Arc<WorkerHandle>> {
        let workers = &self.snapshot.workers;
        if self.step >= workers.len() {
            return None;
        }
        let worker = &workers[(self.start.wrapping_add(self.step)) % workers.len()];
        self.step += 1;
        Some(Arc::clone(worker))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.snapshot.workers.len().saturating_sub(self.step);
        (left, Some(left))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// A pool of `n` workers with ids and instances `0..n`.
    pub(crate) fn pool_of(n: u32) -> (Pool, Vec<Arc<WorkerHandle>>) {
        let pool = Pool::new();
        let workers: Vec<_> = (0..n)
            .map(|id| Arc::new(WorkerHandle::new(id, id, 100 + id, vec![])))
            .collect();
        for w in &workers {
            pool.insert(Arc::clone(w));
        }
        (pool, workers)
    }

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    #[test]
    fn every_algorithm_visits_every_worker_once() {
        let (pool, _workers) = pool_of(5);
        for balance in [
            Balance::RoundRobin,
            Balance::LeastConn,
            Balance::P2c,
            Balance::Source,
        ] {
            let mut ids: Vec<u32> = candidates(&pool, balance, LOCAL).map(|w| w.id).collect();
            ids.sort_unstable();
            assert_eq!(ids, [0, 1, 2, 3, 4], "{balance:?}");
            assert_eq!(candidates(&Pool::new(), balance, LOCAL).count(), 0);
        }
    }
}
