//! The flow table: client address → flow, with least-recently-active order for eviction and
//! idle expiry. Generic over the flow so its bookkeeping is tested without sockets; the
//! dispatcher owns the only instance per listener, so it needs no lock.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use tokio::time::Instant;

/// The flows of one listener, by client address, in least-recently-active order.
///
/// Activity the table does not see (a relay's replies) is supplied by an `activity` function and
/// taken into account lazily: before a flow is evicted or expired, its key is moved forward to
/// its latest activity if that is newer. Every operation is O(log n).
#[derive(Debug)]
pub struct FlowTable<V> {
    flows: HashMap<SocketAddr, Slot<V>>,
    /// (last activity, tie-breaker) → client. The first entry is the least recently active.
    order: BTreeMap<(Instant, u64), SocketAddr>,
    seq: u64,
}

#[derive(Debug)]
struct Slot<V> {
    value: V,
    key: (Instant, u64),
}

impl<V> Default for FlowTable<V> {
    fn default() -> Self {
        FlowTable {
            flows: HashMap::new(),
            order: BTreeMap::new(),
            seq: 0,
        }
    }
}

impl<V> FlowTable<V> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of flows.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether the table holds no flow.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// The flow of `client`, without counting it as activity.
    pub fn get_mut(&mut self, client: &SocketAddr) -> Option<&mut V> {
        self.flows.get_mut(client).map(|s| &mut s.value)
    }

    /// The flow of `client`, recording activity at `now`.
    pub fn touch(&mut self, client: &SocketAddr, now: Instant) -> Option<&mut V> {
        let slot = self.flows.get_mut(client)?;
        self.order.remove(&slot.key);
        self.seq += 1;
        slot.key = (now, self.seq);
        self.order.insert(slot.key, *client);
        Some(&mut slot.value)
    }

    /// Adds (or replaces) the flow of `client`, active at `now`; returns the replaced one.
    /// Making room is the caller's business (see [`pop_lru`](Self::pop_lru)).
    pub fn insert(&mut self, client: SocketAddr, value: V, now: Instant) -> Option<V> {
        let old = self.remove(&client);
        self.seq += 1;
        let key = (now, self.seq);
        self.order.insert(key, client);
        self.flows.insert(client, Slot { value, key });
        old
    }

    /// Removes the flow of `client`.
    pub fn remove(&mut self, client: &SocketAddr) -> Option<V> {
        let slot = self.flows.remove(client)?;
        self.order.remove(&slot.key);
        Some(slot.value)
    }

    /// When the least recently active flow was last seen active (a lower bound: activity the
    /// table has not been told about may be newer).
    pub fn oldest(&self) -> Option<Instant> {
        self.order.first_key_value().map(|(key, _)| key.0)
    }

    /// Removes and returns the least recently active flow.
    pub fn pop_lru(&mut self, activity: impl Fn(&V) -> Option<Instant>) -> Option<(SocketAddr, V)> {
        self.pop_first_before(None, activity)
    }

    /// Removes and returns one flow with no activity after `cutoff`, if there is one.
    pub fn pop_idle(
        &mut self,
        cutoff: Instant,
        activity: impl Fn(&V) -> Option<Instant>,
    ) -> Option<(SocketAddr, V)> {
        self.pop_first_before(Some(cutoff), activity)
    }

    fn pop_first_before(
        &mut self,
        cutoff: Option<Instant>,
        activity: impl Fn(&V) -> Option<Instant>,
    ) -> Option<(SocketAddr, V)> {
        loop {
            let (&key, &client) = self.order.first_key_value()?;
            if cutoff.is_some_and(|cutoff| key.0 > cutoff) {
                return None;
            }
            let Some(slot) = self.flows.get_mut(&client) else {
                // Unreachable (both maps change together); heal rather than loop.
                self.order.remove(&key);
                continue;
            };
            match activity(&slot.value) {
                // Active since: move it to its place and look at the next oldest.
                Some(seen) if seen > key.0 => {
                    self.order.remove(&key);
                    self.seq += 1;
                    slot.key = (seen, self.seq);
                    self.order.insert(slot.key, client);
                }
                _ => {
                    self.order.remove(&key);
                    let slot = self.flows.remove(&client)?;
                    return Some((client, slot.value));
                }
            }
        }
    }

    /// Removes every flow `keep` rejects; returns how many.
    pub fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) -> usize {
        let before = self.flows.len();
        let order = &mut self.order;
        self.flows.retain(|_, slot| {
            let kept = keep(&slot.value);
            if !kept {
                order.remove(&slot.key);
            }
            kept
        });
        before - self.flows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::time::Duration;

    fn addr(port: u16) -> SocketAddr {
        ([127, 0, 0, 1], port).into()
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Keeps at most `max` entries the way the dispatcher does.
    fn insert_bounded(
        table: &mut FlowTable<u32>,
        client: u16,
        now: Instant,
        max: usize,
    ) -> Vec<SocketAddr> {
        let mut evicted = Vec::new();
        while table.len() >= max {
            evicted.push(table.pop_lru(|_| None).unwrap().0);
        }
        table.insert(addr(client), u32::from(client), now);
        evicted
    }

    #[test]
    fn the_table_never_exceeds_its_bound() {
        let t0 = Instant::now();
        let mut table = FlowTable::new();
        for port in 1..=1000u16 {
            insert_bounded(
                &mut table,
                port,
                t0 + Duration::from_millis(port.into()),
                100,
            );
            assert!(table.len() <= 100);
        }
        assert_eq!(table.len(), 100);
        assert_eq!(table.order.len(), 100, "the order index follows the map");
        // The 100 most recent survive.
        assert!(table.get_mut(&addr(901)).is_some());
        assert!(table.get_mut(&addr(900)).is_none());
    }

    #[test]
    fn the_least_recently_active_flow_is_evicted() {
        let t0 = Instant::now();
        let mut table = FlowTable::new();
        for (i, port) in [1, 2, 3].into_iter().enumerate() {
            table.insert(addr(port), u32::from(port), t0 + secs(i as u64));
        }
        // 1 is the oldest by insertion, but it just sent something.
        table.touch(&addr(1), t0 + secs(10));
        assert_eq!(insert_bounded(&mut table, 4, t0 + secs(11), 3), [addr(2)]);
        assert_eq!(insert_bounded(&mut table, 5, t0 + secs(12), 3), [addr(3)]);
        assert_eq!(insert_bounded(&mut table, 6, t0 + secs(13), 3), [addr(1)]);
    }

    #[test]
    fn replies_count_as_activity_for_eviction() {
        let t0 = Instant::now();
        let replies: Vec<Cell<Option<Instant>>> = (0..4).map(|_| Cell::new(None)).collect();
        let mut table = FlowTable::new();
        for i in 0..3u16 {
            table.insert(addr(i), usize::from(i), t0 + secs(u64::from(i)));
        }
        // Flow 0 sent nothing since t0, but its worker replied at t0+5.
        replies[0].set(Some(t0 + secs(5)));
        let activity = |v: &usize| replies[*v].get();
        assert_eq!(table.pop_lru(activity).map(|(a, _)| a), Some(addr(1)));
        assert_eq!(table.pop_lru(activity).map(|(a, _)| a), Some(addr(2)));
        assert_eq!(table.pop_lru(activity).map(|(a, _)| a), Some(addr(0)));
        assert!(table.pop_lru(activity).is_none());
    }

    #[test]
    fn idle_flows_expire_after_the_idle_timeout_and_activity_postpones_it() {
        let idle = secs(30);
        let t0 = Instant::now();
        let replies: Vec<Cell<Option<Instant>>> = (0..3).map(|_| Cell::new(None)).collect();
        let activity = |v: &usize| replies[*v].get();
        let mut table = FlowTable::new();
        table.insert(addr(0), 0, t0);
        table.insert(addr(1), 1, t0 + secs(5));
        table.insert(addr(2), 2, t0 + secs(6));
        // Flow 1 keeps getting replies; flow 2 keeps sending.
        replies[1].set(Some(t0 + secs(20)));
        table.touch(&addr(2), t0 + secs(25));

        let expire = |table: &mut FlowTable<usize>, now: Instant| {
            let mut gone = Vec::new();
            while let Some((a, _)) = table.pop_idle(now - idle, activity) {
                gone.push(a);
            }
            gone
        };
        assert_eq!(expire(&mut table, t0 + secs(29)), []);
        assert_eq!(expire(&mut table, t0 + secs(30)), [addr(0)]);
        assert_eq!(expire(&mut table, t0 + secs(49)), []);
        assert_eq!(expire(&mut table, t0 + secs(50)), [addr(1)]);
        assert_eq!(table.oldest(), Some(t0 + secs(25)));
        assert_eq!(expire(&mut table, t0 + secs(55)), [addr(2)]);
        assert!(table.is_empty() && table.order.is_empty());
    }

    #[test]
    fn retain_and_remove_keep_both_indexes_in_step() {
        let t0 = Instant::now();
        let mut table = FlowTable::new();
        for port in 0..10u16 {
            table.insert(addr(port), port, t0 + secs(port.into()));
        }
        assert_eq!(table.retain(|v| v % 2 == 0), 5);
        assert_eq!(table.remove(&addr(4)), Some(4));
        assert_eq!(table.remove(&addr(4)), None);
        assert_eq!(table.insert(addr(2), 22, t0), Some(2));
        assert_eq!(table.len(), 4);
        assert_eq!(table.order.len(), 4);
        assert_eq!(table.oldest(), Some(t0));
    }
}
