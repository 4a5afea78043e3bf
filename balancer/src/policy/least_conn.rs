//! Least connections: the worker with the fewest live connections (on `http://`, requests in
//! flight: the HTTP proxy holds a worker's count for exactly one request). HAProxy's
//! `leastconn`, recommended where sessions are long or uneven.

use std::sync::Arc;

use balancer_workers::{Pool, WorkerHandle};

/// The least loaded worker. Ties go round-robin: the scan starts at the pool's rotating cursor
/// and keeps the first minimum it meets, so equally idle workers take turns instead of the
/// lowest id taking every burst. One pass over the snapshot; the counts are read without a
/// lock, so two picks racing may both choose the same worker, which `max_conns` bounds.
pub fn first(pool: &Pool, workers: &[Arc<WorkerHandle>]) -> usize {
    let n = workers.len();
    let start = pool.next_index() % n;
    let mut best = start;
    let mut best_live = workers[start].live();
    for step in 1..n {
        if best_live == 0 {
            break;
        }
        let i = (start + step) % n;
        let live = workers[i].live();
        if live < best_live {
            best = i;
            best_live = live;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::super::{candidates, tests::pool_of};
    use balancer_config::Balance;
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr};

    proptest! {
        /// Whatever the loads, the first candidate carries the fewest connections.
        #[test]
        fn picks_a_least_loaded_worker(loads in proptest::collection::vec(0usize..5, 1..10)) {
            let (pool, workers) = pool_of(loads.len() as u32);
            let mut guards = Vec::new();
            for (w, &load) in workers.iter().zip(&loads) {
                for _ in 0..load {
                    guards.push(w.acquire().unwrap());
                }
            }
            let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
            let first = candidates(&pool, Balance::LeastConn, ip).next().unwrap();
            prop_assert_eq!(first.live(), *loads.iter().min().unwrap());
        }
    }

    #[test]
    fn ties_take_turns() {
        let (pool, workers) = pool_of(3);
        let _busy = workers[1].acquire().unwrap();
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let picks: Vec<u32> = (0..4)
            .map(|_| candidates(&pool, Balance::LeastConn, ip).next().unwrap().id)
            .collect();
        assert_eq!(picks, [0, 2, 2, 0]);
    }
}
