//! Source hashing: a consistent hash of the client's IP address, so a client keeps its worker
//! (for apps with in-process sessions), and a scale from N to N+1 workers moves only about
//! 1/(N+1) of the clients. HAProxy's `balance source` with `hash-type consistent`.
//!
//! The hash is Lamping and Veach's jump consistent hash over the app's *instance numbers*
//! (`BALANCER_INSTANCE`), not over positions in the pool: a worker that leaves the pool for a
//! moment (a crash, a reload's swap) moves only its own clients, who come back when an
//! instance with its number is ready again. Jump hash needs no table (Maglev's would have to be
//! rebuilt on every pool change) and is a handful of multiplications per pick.

use std::net::IpAddr;
use std::sync::Arc;

use balancer_workers::WorkerHandle;

/// The worker of `client`'s bucket; when no ready worker has that instance number, the one at
/// the hash's position in the pool, so the client still lands somewhere stable.
pub fn first(workers: &[Arc<WorkerHandle>], client: IpAddr) -> usize {
    let key = hash_ip(client);
    let buckets = workers.iter().map(|w| w.instance).max().unwrap_or(0) + 1;
    let bucket = jump(key, buckets);
    // The snapshot is ordered by id, which follows the instance number until workers are
    // replaced: look where the bucket's worker usually is before searching.
    if workers
        .get(bucket as usize)
        .is_some_and(|w| w.instance == bucket)
    {
        return bucket as usize;
    }
    workers
        .iter()
        .position(|w| w.instance == bucket)
        .unwrap_or_else(|| (key % workers.len() as u64) as usize)
}

/// A 64-bit hash of an address, the same in every run and on every machine (so a fleet of
/// masters behind one front load balancer agrees): FNV-1a over the address bytes, then a
/// splitmix64 finaliser, since jump hash wants well-mixed high bits.
pub fn hash_ip(ip: IpAddr) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    match ip {
        IpAddr::V4(v4) => eat(&v4.octets()),
        // A v4-mapped v6 address is the same client as its v4 form.
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => eat(&v4.octets()),
            None => eat(&v6.octets()),
        },
    }
    let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Jump consistent hash: the bucket in `0..buckets` of `key`. Going from `n` to `n + 1`
/// buckets moves exactly the keys that land in the new bucket, about `1/(n + 1)` of them.
pub fn jump(mut key: u64, buckets: u32) -> u32 {
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b.max(0) as u32
}

#[cfg(test)]
mod tests {
    use super::super::{candidates, tests::pool_of};
    use super::*;
    use balancer_config::Balance;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn key(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
    }

    #[test]
    fn scaling_4_to_5_moves_at_most_35_percent_of_1000_clients() {
        let moved = (0..1000)
            .filter(|&i| jump(hash_ip(key(i)), 4) != jump(hash_ip(key(i)), 5))
            .count();
        // Jump hash moves exactly the keys of the new bucket: about 1/5 of them.
        assert!(moved <= 350, "{moved} of 1000 moved");
        assert!(
            moved >= 100,
            "{moved} of 1000 moved: the new worker got too few"
        );
        // And only to the new bucket.
        assert!((0..1000).all(|i| {
            let (before, after) = (jump(hash_ip(key(i)), 4), jump(hash_ip(key(i)), 5));
            before == after || after == 4
        }));
    }

    #[test]
    fn the_same_client_always_gets_the_same_worker_and_clients_spread() {
        let (pool, _workers) = pool_of(4);
        let mut seen = [0u32; 4];
        for i in 0..400 {
            let first = candidates(&pool, Balance::Source, key(i))
                .next()
                .unwrap()
                .id;
            for _ in 0..3 {
                assert_eq!(
                    candidates(&pool, Balance::Source, key(i))
                        .next()
                        .unwrap()
                        .id,
                    first
                );
            }
            seen[first as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n >= 50), "{seen:?}");
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 7).to_ipv6_mapped());
        assert_eq!(hash_ip(mapped), hash_ip(key(7)));
        assert_ne!(hash_ip(IpAddr::V6(Ipv6Addr::LOCALHOST)), hash_ip(key(1)));
    }

    #[test]
    fn a_missing_instance_moves_only_its_own_clients() {
        let (pool, workers) = pool_of(4);
        let before: Vec<u32> = (0..200)
            .map(|i| {
                candidates(&pool, Balance::Source, key(i))
                    .next()
                    .unwrap()
                    .id
            })
            .collect();
        pool.remove(&workers[2]);
        for (i, &was) in before.iter().enumerate() {
            let now = candidates(&pool, Balance::Source, key(i as u32))
                .next()
                .unwrap()
                .id;
            if was != 2 {
                assert_eq!(now, was, "client {i} moved although its worker stayed");
            }
        }
    }
}
