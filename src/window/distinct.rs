//! Distinct counts over sliding windows.
//!
//! Exact mode keeps every `(value hash, bucket)` pair in the retention horizon, sorted, and
//! answers "how many values occur in buckets `(lo, hi]`" by one pass. A key whose retained
//! values exceed [`DISTINCT_EXACT_BOUND`] switches, once, to a *sliding HyperLogLog*
//! (Chabchoub & Hébrail, 2010): each of the 2^[`HLL_P`] registers keeps its list of possible
//! future maxima `(bucket, rho)`, so any window up to the retention can be estimated at any
//! time. Standard error `1.04 / sqrt(2^HLL_P)` = 6.5 % for windows that end at the key's
//! newest event.

use serde::{Deserialize, Serialize};
use thin_vec::ThinVec;

/// Values per key (within the retention horizon) counted exactly.
pub const DISTINCT_EXACT_BOUND: usize = 128;
/// HyperLogLog precision: 2^8 = 256 registers.
pub const HLL_P: u32 = 8;
const HLL_M: usize = 1 << HLL_P;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Distinct {
    Exact {
        /// Sorted by `(value, bucket)`, no duplicates.
        pairs: ThinVec<(u64, i64)>,
        /// Number of different values in `pairs` (at most the bound + 1).
        values: u16,
        /// Compact again when `pairs` reaches this length. With `values` as a u16 the
        /// whole enum stays at 16 bytes, inline in the map entry. (It was a u16, which
        /// saturated at 65,535 pairs: a key of up to 128 values seen in most buckets of a
        /// long `max_lateness` then compacted on every event. bincode encodes both as the
        /// same varint, so snapshots read either way.)
        next_compact: u32,
    },
    Approx(Box<SlidingHll>),
}

impl Default for Distinct {
    fn default() -> Self {
        Distinct::Exact {
            pairs: ThinVec::new(),
            values: 0,
            next_compact: COMPACT_MIN,
        }
    }
}

impl Distinct {
    /// Starts loading the pairs' block (see `KeyState::touch`).
    #[inline]
    pub fn touch(&self) {
        if let Distinct::Exact { pairs, .. } = self {
            let p = pairs.as_ptr();
            crate::prefetch::line(p);
            crate::prefetch::line(p.wrapping_add(4));
        }
    }

    pub fn heap_bytes(&self) -> usize {
        match self {
            Distinct::Exact { pairs, .. } => super::thin_bytes(pairs),
            Distinct::Approx(h) => h.heap_bytes(),
        }
    }

    /// Adds an occurrence of `value` at `bucket`. `cutoff` and `edge` are the slot's
    /// retention cut-off and exactness edge (see [`Distinct::maintain`]).
    pub fn add(&mut self, value: u64, bucket: i64, cutoff: i64, edge: i64) {
        let over_bound = match self {
            Distinct::Exact { pairs, values, .. } => {
                let pos = pairs.partition_point(|p| *p < (value, bucket));
                if pairs.get(pos) == Some(&(value, bucket)) {
                    return;
                }
                let new_value = !(pos > 0 && pairs[pos - 1].0 == value
                    || pairs.get(pos).is_some_and(|p| p.0 == value));
                if pairs.len() < 4 {
                    // Most keys hold one or two values: grow one by one at first (a
                    // ThinVec would otherwise start at four).
                    pairs.reserve_exact(1);
                }
                pairs.insert(pos, (value, bucket));
                if new_value {
                    *values += 1;
                }
                new_value && *values as usize > DISTINCT_EXACT_BOUND
            }
            Distinct::Approx(h) => {
                h.add(value, bucket, edge);
                false
            }
        };
        if over_bound {
            // Expired values must not push a key into approximate mode: drop them first.
            self.maintain(cutoff, edge, true);
            if let Distinct::Exact { pairs, values, .. } = self {
                if *values as usize > DISTINCT_EXACT_BOUND {
                    let mut h = SlidingHll::new();
                    for &(v, b) in pairs.iter() {
                        h.add(v, b, edge);
                    }
                    *self = Distinct::Approx(Box::new(h));
                }
            }
        }
    }

    /// Oldest bucket held (exact mode), or `None` (empty, or approximate mode where the
    /// registers are swept on their own schedule).
    pub fn oldest(&self) -> Option<i64> {
        match self {
            Distinct::Exact { pairs, .. } => pairs.iter().map(|p| p.1).min(),
            Distinct::Approx(_) => None,
        }
    }

    /// Number of distinct values with an occurrence in buckets `(lo, hi]`.
    /// O(values x log occurrences): one binary search per value group.
    pub fn count(&self, lo: i64, hi: i64) -> u64 {
        match self {
            Distinct::Exact { pairs, .. } => {
                let mut n = 0;
                let mut start = 0;
                while start < pairs.len() {
                    let v = pairs[start].0;
                    let end = start + pairs[start..].partition_point(|p| p.0 == v);
                    let group = &pairs[start..end];
                    let first_after_lo = group.partition_point(|p| p.1 <= lo);
                    if group.get(first_after_lo).is_some_and(|p| p.1 <= hi) {
                        n += 1;
                    }
                    start = end;
                }
                n
            }
            Distinct::Approx(h) => h.estimate(lo, hi),
        }
    }

    /// Drops occurrences in buckets `<= cutoff` and compacts: per value, occurrences at or
    /// before `edge` (the oldest bucket a query still needs exactly, `newest - lateness`)
    /// collapse into the latest of them. Any query whose range ends at or after `edge` gets
    /// the same answer: a value occurs in `(lo, hi]` iff its latest occurrence `<= hi` is
    /// `> lo`, and compaction keeps that occurrence. Amortised: runs when the pairs have
    /// doubled since the last time, or when `force`.
    pub fn maintain(&mut self, cutoff: i64, edge: i64, force: bool) {
        match self {
            Distinct::Exact {
                pairs,
                values,
                next_compact,
            } => {
                if !force && pairs.len() < *next_compact as usize {
                    return;
                }
                let mut out: ThinVec<(u64, i64)> = ThinVec::with_capacity(pairs.len());
                let mut n = 0u16;
                let mut i = 0;
                while i < pairs.len() {
                    let v = pairs[i].0;
                    let end = i + pairs[i..].partition_point(|p| p.0 == v);
                    let group = &pairs[i..end];
                    let old = group.partition_point(|p| p.1 <= edge);
                    let keep_from = if old > 0 { old - 1 } else { 0 };
                    let before = out.len();
                    out.extend(group[keep_from..].iter().copied().filter(|p| p.1 > cutoff));
                    if out.len() > before {
                        n += 1;
                    }
                    i = end;
                }
                *pairs = out;
                *values = n;
                *next_compact = u32::try_from(2 * pairs.len())
                    .unwrap_or(u32::MAX)
                    .max(COMPACT_MIN);
            }
            Distinct::Approx(h) => h.maintain(cutoff, edge, force),
        }
    }
}

/// Smallest pair count at which an exact distinct set compacts.
const COMPACT_MIN: u32 = 16;

/// Sliding HyperLogLog: per register, the list of possible future maxima.
///
/// An entry `(t', r')` is needed by a query `(lo, hi]` only if no other entry `(t, r)` with
/// `r >= r'` falls in the range whenever `t'` does. That is certain when `t' <= t <= edge`
/// (queries end at or after `edge`, the exactness edge `newest - lateness`), so such
/// entries are dropped; entries in the lateness span are all kept, which keeps late
/// queries as accurate as in-order ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlidingHll {
    /// Per register: `(bucket, rho)` sorted by bucket.
    regs: Vec<Vec<(i64, u8)>>,
    /// Adds since the last eviction pass (evicting walks every register).
    adds: u32,
}

impl SlidingHll {
    fn new() -> Self {
        SlidingHll {
            regs: vec![Vec::new(); HLL_M],
            adds: 0,
        }
    }

    fn heap_bytes(&self) -> usize {
        self.regs.capacity() * std::mem::size_of::<Vec<(i64, u8)>>()
            + self.regs.iter().map(|r| r.capacity() * 16).sum::<usize>()
    }

    fn add(&mut self, value: u64, bucket: i64, edge: i64) {
        self.adds = self.adds.saturating_add(1);
        // The value is already a keyed 64-bit hash; mix once more so that register and
        // rank bits are independent of how the caller folded it.
        let h = mix64(value);
        let reg = (h >> (64 - HLL_P)) as usize;
        let rest = h << HLL_P;
        let rho = (rest.leading_zeros().min(64 - HLL_P) + 1) as u8;
        let list = &mut self.regs[reg];
        // Redundant: another entry at the same bucket, or later but not past the edge,
        // with rank >= rho. Only entries from this bucket on can cover it, and this entry
        // can only cover ones at or before its bucket: an event in order (past the edge)
        // only the one at its own bucket. So neither check walks the lateness span,
        // which holds an entry per bucket (thousands with a long `max_lateness`).
        let covers =
            |(t, r): (i64, u8), (t2, r2): (i64, u8)| r >= r2 && t >= t2 && (t == t2 || t <= edge);
        let pos = list.partition_point(|&(b, _)| b < bucket);
        let tail = &list[pos..];
        let tail = if bucket > edge {
            &tail[..tail.partition_point(|&(b, _)| b == bucket)]
        } else {
            tail
        };
        if tail.iter().any(|&e| covers(e, (bucket, rho))) {
            return;
        }
        let end = pos + list[pos..].partition_point(|&(b, _)| b == bucket);
        let from = if bucket > edge { pos } else { 0 };
        let mut kept = from;
        for i in from..end {
            if !covers((bucket, rho), list[i]) {
                list[kept] = list[i];
                kept += 1;
            }
        }
        list.drain(kept..end);
        list.insert(kept, (bucket, rho));
    }

    fn maintain(&mut self, cutoff: i64, edge: i64, force: bool) {
        if !force && self.adds < HLL_M as u32 {
            return;
        }
        self.adds = 0;
        for list in &mut self.regs {
            let dead = list.partition_point(|&(b, _)| b <= cutoff);
            if dead > 0 {
                list.drain(..dead);
            }
            // The edge moved: an entry at or before it goes when a later one at or before
            // it has a rank as high (entries past the edge cover nothing: a late query may
            // end before them). One pass back from the edge with the highest rank seen,
            // not a scan of the list per entry (quadratic in the lateness span).
            let split = list.partition_point(|&(b, _)| b <= edge);
            let mut best = 0u8; // ranks start at 1
            let mut w = split;
            for i in (0..split).rev() {
                let e = list[i];
                if e.1 > best {
                    best = e.1;
                    w -= 1;
                    list[w] = e;
                }
            }
            list.drain(..w);
        }
    }

    fn estimate(&self, lo: i64, hi: i64) -> u64 {
        let m = HLL_M as f64;
        let mut sum = 0.0;
        let mut zeros = 0usize;
        for list in &self.regs {
            let max = list
                .iter()
                .filter(|&&(b, _)| b > lo && b <= hi)
                .map(|&(_, r)| r)
                .max()
                .unwrap_or(0);
            if max == 0 {
                zeros += 1;
            }
            sum += 2f64.powi(-(max as i32));
        }
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let raw = alpha * m * m / sum;
        let est = if raw <= 2.5 * m && zeros > 0 {
            m * (m / zeros as f64).ln()
        } else {
            raw
        };
        est.round() as u64
    }
}

fn mix64(mut x: u64) -> u64 {
    // splitmix64 finaliser
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The first version's entry maintenance, a scan of the register per entry: the
    /// reference the linear versions must agree with.
    fn add_naive(regs: &mut [Vec<(i64, u8)>], value: u64, bucket: i64, edge: i64) {
        let h = mix64(value);
        let reg = (h >> (64 - HLL_P)) as usize;
        let rho = ((h << HLL_P).leading_zeros().min(64 - HLL_P) + 1) as u8;
        let list = &mut regs[reg];
        let covers =
            |(t, r): (i64, u8), (t2, r2): (i64, u8)| r >= r2 && t >= t2 && (t == t2 || t <= edge);
        if list.iter().any(|&e| covers(e, (bucket, rho))) {
            return;
        }
        list.retain(|&e| !covers((bucket, rho), e));
        let pos = list.partition_point(|&(b, _)| b < bucket);
        list.insert(pos, (bucket, rho));
    }

    fn maintain_naive(regs: &mut [Vec<(i64, u8)>], cutoff: i64, edge: i64) {
        for list in regs {
            list.retain(|&(b, _)| b > cutoff);
            let snapshot = list.clone();
            list.retain(|&(t, r)| {
                !snapshot
                    .iter()
                    .any(|&(t2, r2)| (t2, r2) != (t, r) && r2 >= r && t2 >= t && t2 <= edge)
            });
        }
    }

    /// A key of 100 values seen in each of 700 buckets of a long lateness span keeps
    /// 70,000 pairs: the next compaction is due at twice that, not at every event (the
    /// u16 threshold saturated at 65,535).
    #[test]
    fn compaction_stays_amortised_past_65535_pairs() {
        let mut d = Distinct::default();
        let (cutoff, edge) = (-10_000, -5_000); // every pair is in the lateness span
        for b in 0..700 {
            for v in 0..100u64 {
                d.add(v, b, cutoff, edge);
                d.maintain(cutoff, edge, false);
            }
        }
        let Distinct::Exact {
            pairs,
            values,
            next_compact,
        } = &d
        else {
            panic!("exact mode expected");
        };
        assert_eq!((pairs.len(), *values), (70_000, 100));
        assert!(*next_compact as usize > pairs.len(), "{next_compact}");
        assert_eq!(d.count(-1, 699), 100);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// Events mostly in order, some late (up to the lateness and beyond), with
        /// maintenance now and then: the sliding HyperLogLog keeps exactly the entries
        /// the quadratic reference keeps.
        #[test]
        fn hll_entries_match_the_quadratic_reference(
            events in proptest::collection::vec((0u64..2_000, 0i64..60, 0u8..10), 1..400),
            lateness in 0i64..40,
            window in 1i64..50,
        ) {
            let mut h = SlidingHll::new();
            let mut reference = vec![Vec::new(); HLL_M];
            let mut newest = 0i64;
            for (i, (v, back, m)) in events.into_iter().enumerate() {
                let step = i as i64 / 3;
                newest = newest.max(step);
                let bucket = step - back;
                let edge = newest - lateness;
                let cutoff = newest - window - lateness;
                if bucket <= cutoff {
                    continue; // too late: the caller adds nothing
                }
                h.add(mix64(v), bucket, edge);
                add_naive(&mut reference, mix64(v), bucket, edge);
                prop_assert_eq!(&h.regs, &reference);
                if m == 0 {
                    h.maintain(cutoff, edge, true);
                    maintain_naive(&mut reference, cutoff, edge);
                    prop_assert_eq!(&h.regs, &reference);
                }
            }
        }
    }
}
