//! Round robin over the pool snapshot: one `fetch_add` per connection, no lock. The only round
//! robin in the data plane; the proxies walk its order through [`crate::proxy::Walk`].

use std::sync::Arc;

use balancer_workers::{Pool, PoolSnapshot, WorkerHandle};

/// The workers to try for one new connection, in order: every ready worker once, starting at the
/// round-robin cursor. Trying the rest after the first is what lets the proxy step past a worker
/// that just died without the client noticing.
pub fn candidates(pool: &Pool) -> Candidates {
    let snapshot = pool.load_full();
    let n = snapshot.workers.len();
    let start = if n == 0 { 0 } else { pool.next_index() };
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
