//! Power of two choices: draw two workers at random and take the less loaded. Nearly as good
//! as least connections at spreading load, at a constant cost whatever the worker count (no
//! scan), and without least_conn's herd onto one idle worker when counts are stale. HAProxy's
//! `random(2)`.

use std::sync::Arc;

use balancer_workers::WorkerHandle;

/// The less loaded of two distinct random workers (the only one, with one). `fastrand`'s
/// thread-local generator: no lock and no shared state between the proxies' threads.
pub fn first(workers: &[Arc<WorkerHandle>]) -> usize {
    let n = workers.len();
    if n == 1 {
        return 0;
    }
    let a = fastrand::usize(..n);
    let b = (a + 1 + fastrand::usize(..n - 1)) % n;
    if workers[b].live() < workers[a].live() {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use super::super::{candidates, tests::pool_of};
    use balancer_config::Balance;
    use std::net::{IpAddr, Ipv4Addr};

    #[test]
    fn never_picks_the_busiest_of_two_and_spreads_over_equals() {
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let (pool, workers) = pool_of(2);
        let _busy = workers[0].acquire().unwrap();
        for _ in 0..50 {
            assert_eq!(candidates(&pool, Balance::P2c, ip).next().unwrap().id, 1);
        }
        let (pool, _workers) = pool_of(4);
        let mut seen = [0u32; 4];
        for _ in 0..400 {
            seen[candidates(&pool, Balance::P2c, ip).next().unwrap().id as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 0), "{seen:?}");
    }
}
