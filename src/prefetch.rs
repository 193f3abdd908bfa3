//! Software prefetches: start loading memory a decision is about to need, without waiting
//! for it.
//!
//! A decision reads one entry in each of several large hash tables (the retry table and
//! one table per key group), each a few dependent cache misses deep. Taken one after the
//! other, the misses add up; a shard lock's atomic read-modify-write also waits for every
//! load before it, so misses in different tables cannot overlap on their own. Prefetch
//! instructions are not ordered with locked operations: issued for every table first,
//! the misses are in flight together, and the real lookups that follow find the lines in
//! cache (or on their way).
//!
//! A prefetch is only a hint: it never faults and changes no value, so a stale or wrong
//! address costs at most a wasted memory read.

use std::hash::Hash;

use dashmap::DashMap;

use crate::keyhash::PreHashed;

/// Starts loading the cache line holding `p` into all cache levels.
#[inline(always)]
pub fn line<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing the program sees and cannot fault, whatever the
    // address (SSE is part of the x86_64 baseline).
    #[allow(unused_unsafe)]
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Starts loading the lines where `key` is looked up in `map`: its control bytes and the
/// slot it hashes to (plus the next one; an entry sits in its home slot or just after it
/// at the tables' load factors). Takes the shard's read lock only to read where the
/// table is; nothing of the table is dereferenced.
#[inline]
pub fn map_slot<K: Hash + Eq, V>(map: &DashMap<K, V, PreHashed>, key: &K) {
    let hash = map.hash_usize(key);
    let shard = map.shards()[map.determine_shard(hash)].read();
    // hashbrown's layout: control bytes start at `data_end`, slot `i` ends `i` slots
    // before it; a lookup starts at control byte `hash & mask` and reads 16 of them.
    let mask = shard.buckets() - 1;
    let pos = hash & mask;
    let end = shard.data_end();
    let size = size_of_pointee(end);
    let ctrl = end.as_ptr().cast::<u8>().cast_const();
    line(ctrl.wrapping_add(pos));
    line(ctrl.wrapping_add(pos + 15));
    let slot = ctrl.wrapping_sub((pos + 1) * size);
    line(slot);
    line(slot.wrapping_add(size - 1));
    line(slot.wrapping_sub(size));
}

/// `DashMap::retain` that prefetches ahead: before it visits an entry, it calls `touch`
/// (which should prefetch what `keep` will read behind the entry, see `KeyState::touch`)
/// on the entry [`AHEAD`] places further on in the same shard. A sweep over a big table
/// otherwise waits for one cache miss after another, with the shard's write lock held.
pub fn retain_ahead<K: Hash + Eq, V>(
    map: &DashMap<K, V, PreHashed>,
    touch: impl Fn(&V),
    mut keep: impl FnMut(&mut V) -> bool,
) {
    for k in 0..map.shards().len() {
        retain_shard_ahead(map, k, &touch, &mut keep);
    }
}

/// [`retain_ahead`] over shard `k` only (none if there is no such shard); returns how
/// many entries it removed.
pub fn retain_shard_ahead<K: Hash + Eq, V>(
    map: &DashMap<K, V, PreHashed>,
    k: usize,
    touch: impl Fn(&V),
    keep: impl FnMut(&mut V) -> bool,
) -> usize {
    retain_part_ahead(map, k, (0, 1), touch, keep)
}

/// [`retain_shard_ahead`] over part `part.0` of `part.1` equal parts of shard `k`'s slots:
/// a big shard in several short visits, each holding its write lock for a fraction of
/// the time. The parts of a shard together visit each entry once, unless the table grows
/// between two of them (then an entry may be visited twice or missed until next time).
pub fn retain_part_ahead<K: Hash + Eq, V>(
    map: &DashMap<K, V, PreHashed>,
    k: usize,
    (part, parts): (usize, usize),
    touch: impl Fn(&V),
    mut keep: impl FnMut(&mut V) -> bool,
) -> usize {
    let Some(s) = map.shards().get(k) else {
        return 0;
    };
    if part >= parts {
        return 0;
    }
    let mut shard = s.write();
    let n = shard.buckets();
    let (from, to) = (n * part / parts, n * (part + 1) / parts);
    let mut removed = 0;
    // SAFETY: as in dashmap's own `retain`: the table is read and changed only while this
    // shard's write lock is held. Every index is below `buckets()`, a bucket is read only
    // when its control byte says it is full, and erasing one moves no other entry (no
    // rehash on erase), so the look-ahead never reads an erased or moved entry.
    unsafe {
        for j in from..(from + AHEAD).min(to) {
            if shard.is_bucket_full(j) {
                touch(shard.bucket(j).as_ref().1.get());
            }
        }
        for i in from..to {
            let j = i + AHEAD;
            if j < to && shard.is_bucket_full(j) {
                touch(shard.bucket(j).as_ref().1.get());
            }
            if shard.is_bucket_full(i) {
                let bucket = shard.bucket(i);
                if !keep(bucket.as_mut().1.get_mut()) {
                    shard.erase(bucket);
                    removed += 1;
                }
            }
        }
    }
    removed
}

/// How many entries [`retain_ahead`] prefetches ahead of the one it visits.
pub const AHEAD: usize = 8;

fn size_of_pointee<T>(_: std::ptr::NonNull<T>) -> usize {
    std::mem::size_of::<T>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyhash::StateKey;

    #[test]
    fn any_key_any_table_size() {
        // Empty tables (a static singleton), tiny and grown ones: a prefetch never faults
        // and the map is unchanged.
        let map: DashMap<StateKey, u64, PreHashed> =
            DashMap::with_capacity_and_hasher_and_shard_amount(0, PreHashed, 4);
        for i in 0..5000u64 {
            let k = StateKey([i.wrapping_mul(0x9e37_79b9_7f4a_7c15), i]);
            map_slot(&map, &k);
            map.insert(k, i);
            map_slot(&map, &k);
        }
        assert_eq!(map.len(), 5000);
        line(std::ptr::null::<u8>());
    }

    #[test]
    fn the_parts_of_a_shard_visit_each_entry_once() {
        let map: DashMap<StateKey, u64, PreHashed> =
            DashMap::with_capacity_and_hasher_and_shard_amount(0, PreHashed, 4);
        for i in 0..10_000u64 {
            map.insert(StateKey([i.wrapping_mul(0x9e37_79b9_7f4a_7c15), i]), i);
        }
        let mut visits = vec![0u8; 10_000];
        let mut removed = 0;
        for k in 0..5 {
            for part in 0..7 {
                removed += retain_part_ahead(
                    &map,
                    k,
                    (part, 7),
                    |_| {},
                    |v| {
                        visits[*v as usize] += 1;
                        *v % 3 != 0
                    },
                );
            }
            // A part past the last does nothing.
            assert_eq!(retain_part_ahead(&map, k, (7, 7), |_| {}, |_| false), 0);
        }
        assert!(visits.iter().all(|&v| v == 1));
        assert_eq!(removed, 3334);
        assert_eq!(map.len(), 10_000 - 3334);
        assert!(map.iter().all(|e| *e.value() % 3 != 0));
    }

    #[test]
    fn retain_ahead_is_retain() {
        // Against DashMap's own retain: every shape of keep / erase pattern, including
        // shards smaller than the look-ahead and erasing everything.
        for (n, shards) in [(0u64, 4usize), (3, 4), (50, 4), (5000, 8), (20_000, 64)] {
            for modulo in [1u64, 2, 3, 7, 1000] {
                let ours: DashMap<StateKey, u64, PreHashed> =
                    DashMap::with_capacity_and_hasher_and_shard_amount(0, PreHashed, shards);
                let theirs = ours.clone();
                for i in 0..n {
                    let k = StateKey([i.wrapping_mul(0x9e37_79b9_7f4a_7c15), i]);
                    ours.insert(k, i);
                    theirs.insert(k, i);
                }
                let touched = std::cell::Cell::new(0usize);
                let mut visited = 0usize;
                retain_ahead(
                    &ours,
                    |_| touched.set(touched.get() + 1),
                    |v| {
                        visited += 1;
                        *v += 1;
                        (*v - 1) % modulo != 0
                    },
                );
                theirs.retain(|_, v| {
                    *v += 1;
                    (*v - 1) % modulo != 0
                });
                assert_eq!(visited as u64, n);
                assert_eq!(touched.get() as u64, n, "each entry prefetched once");
                let mut a: Vec<_> = ours.iter().map(|e| (*e.key(), *e.value())).collect();
                let mut b: Vec<_> = theirs.iter().map(|e| (*e.key(), *e.value())).collect();
                a.sort_unstable();
                b.sort_unstable();
                assert_eq!(a, b, "n {n} modulo {modulo}");
            }
        }
    }
}
