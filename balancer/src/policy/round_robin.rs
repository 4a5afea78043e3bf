//! Round robin over the pool snapshot: one `fetch_add` per connection, no lock (pingora's way).

use std::sync::Arc;

use balancer_workers::{Pool, WorkerHandle};

/// The next worker in turn. The cursor lives in the pool, so every listener of an app shares
/// one rotation.
pub fn first(pool: &Pool, workers: &[Arc<WorkerHandle>]) -> usize {
    pool.next_index() % workers.len()
}

#[cfg(test)]
mod tests {
    use super::super::{candidates, tests::pool_of};
    use balancer_config::Balance;
    use std::net::{IpAddr, Ipv4Addr};

    #[test]
    fn each_connection_starts_one_further_and_visits_all() {
        let (pool, _workers) = pool_of(3);
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let first: Vec<u32> = candidates(&pool, Balance::RoundRobin, ip)
            .map(|w| w.id)
            .collect();
        let second: Vec<u32> = candidates(&pool, Balance::RoundRobin, ip)
            .map(|w| w.id)
            .collect();
        assert_eq!(first, [0, 1, 2]);
        assert_eq!(second, [1, 2, 0]);
    }
}
