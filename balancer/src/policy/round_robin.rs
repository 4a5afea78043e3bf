//! Round robin over the pool snapshot: one `fetch_add` per connection, no lock.

use std::sync::Arc;

use balancer_workers::{Pool, WorkerHandle};

/// The workers to try for one new connection, in order: every ready worker once, starting at the
/// round-robin cursor. Trying the rest after the first is what lets the proxy step past a worker
/// that just died without the client noticing.
pub fn candidates(pool: &Pool) -> impl Iterator<Item = Arc<WorkerHandle>> {
    let snapshot = pool.load_full();
    let n = snapshot.workers.len();
    let start = if n == 0 { 0 } else { pool.next_index() };
    (0..n).map(move |i| Arc::clone(&snapshot.workers[(start + i) % n]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_connection_starts_one_further_and_visits_all() {
        let pool = Pool::new();
        for id in 0..3 {
            pool.insert(Arc::new(WorkerHandle::new(id, id, 100 + id, vec![])));
        }
        let first: Vec<u32> = candidates(&pool).map(|w| w.id).collect();
        let second: Vec<u32> = candidates(&pool).map(|w| w.id).collect();
        assert_eq!(first, [0, 1, 2]);
        assert_eq!(second, [1, 2, 0]);
        assert_eq!(candidates(&Pool::new()).count(), 0);
    }
}
