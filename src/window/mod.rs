//! Exact, sparse, event-time sliding windows.
//!
//! One [`KeyState`] holds every aggregate of one entity key (one card, one device, one
//! `(card, merchant, amount)` triple ...) for one *group* of windows that share the same
//! `by` key. Time is cut into buckets of the configured resolution; only buckets that saw an
//! event exist (a key with 3 events holds 3 buckets, whatever the window length).
//!
//! Each bucket row stores *prefix* totals (cumulative since the oldest retained bucket) for
//! every count and sum slot, so the aggregate over any bucket range `(lo, hi]` is two binary
//! searches and one subtraction, in order or not. Distinct counts keep `(value, bucket)`
//! pairs exactly up to [`DISTINCT_EXACT_BOUND`] values per key, then switch to a sliding
//! HyperLogLog (see [`distinct`]).
//!
//! This module is plain data: no rules, no clock, no IO. The engine evaluates filters and
//! extracts values, then calls [`KeyState::add`] and the query functions.

pub mod distinct;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use thin_vec::ThinVec;

pub use distinct::{Distinct, DISTINCT_EXACT_BOUND};

/// Shape of a group's rows: how many count, sum and distinct slots each key holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub counts: usize,
    pub sums: usize,
    pub distincts: usize,
    /// Longest window of the group, in buckets.
    pub max_window: i64,
    /// Per distinct slot, the longest window that reads it: its `(value, bucket)` pairs are
    /// kept only that long (plus lateness), not for the group's longest window.
    pub distinct_windows: Vec<i64>,
    /// Extra buckets kept behind `newest - max_window`: events up to this far behind the
    /// key's newest event are added and see exact values; older ones are too late.
    pub lateness: i64,
}

impl Layout {
    fn stride(&self) -> usize {
        1 + self.counts + 2 * self.sums
    }

    /// Longest window reading distinct slot `i`.
    fn distinct_window(&self, i: usize) -> i64 {
        self.distinct_windows
            .get(i)
            .copied()
            .unwrap_or(self.max_window)
    }
}

/// What one event contributes to a key.
#[derive(Debug, Default, Clone)]
pub struct Contribution<'a> {
    /// Per count slot: does the event count (its filter passed)?
    pub counts: &'a [bool],
    /// Per sum slot: the value to add, if any.
    pub sums: &'a [Option<Decimal>],
    /// Per distinct slot: the hashed value, if any.
    pub distincts: &'a [Option<u64>],
}

/// Outcome of [`KeyState::add`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    Yes,
    /// Older than the key's retention (`newest - longest window - lateness`): decided, but
    /// adds nothing.
    TooLate,
    /// Nothing to add (all filters failed, all values missing).
    Nothing,
}

/// All window aggregates of one entity key. Serializable for snapshots. The default is
/// empty and owns no heap block (what is left of a key whose state was taken away).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyState {
    /// Rows of `stride` u64: `[bucket, count prefixes.., sum prefixes as 2 x u64 ..]`,
    /// sorted by bucket.
    ///
    /// A `ThinVec` (one pointer; length and capacity live in the heap block) keeps the map
    /// entry small: most keys are sparse, and the table's empty slots cost the entry size.
    rows: ThinVec<u64>,
    /// One slot per distinct aggregate; inline for the common single slot.
    distinct: SmallVec<[Distinct; 1]>,
}

/// Heap bytes of a `ThinVec` (its header holds length and capacity).
pub(crate) fn thin_bytes<T>(v: &ThinVec<T>) -> usize {
    if v.capacity() == 0 {
        0
    } else {
        16 + v.capacity() * std::mem::size_of::<T>()
    }
}

/// Evict dead rows only in batches, so a key that slides forward by one bucket per event
/// does not shift its whole row array every time.
const EVICT_BATCH_MIN: usize = 8;

impl KeyState {
    pub fn new(layout: &Layout) -> Self {
        KeyState {
            rows: ThinVec::new(),
            distinct: (0..layout.distincts).map(|_| Distinct::default()).collect(),
        }
    }

    /// Starts loading the start of each heap block this key uses, without waiting for it,
    /// so that it is in cache (or on its way) for the real update (see `Engine::decide`).
    #[inline]
    pub fn touch(&self) {
        // `as_ptr` does not read the block. This loads the first row's line and the next;
        // the header (length, capacity) is the 16 bytes before the first row, on the same
        // line unless the first row starts a line.
        let p = self.rows.as_ptr();
        crate::prefetch::line(p);
        crate::prefetch::line(p.wrapping_add(8));
        for d in &self.distinct {
            d.touch();
        }
    }

    /// Newest bucket ever added (every added event has a row, and rows are sorted, so it
    /// is the last row's bucket; no separate field keeps the map entry small).
    pub fn newest_bucket(&self, layout: &Layout) -> Option<i64> {
        let stride = layout.stride();
        let n = self.rows.len() / stride;
        (n > 0).then(|| self.bucket_at(stride, n - 1))
    }

    pub fn bucket_count(&self, layout: &Layout) -> usize {
        self.rows.len() / layout.stride()
    }

    /// Approximate heap bytes held by this key (excluding the map entry itself).
    pub fn heap_bytes(&self) -> usize {
        let rows = thin_bytes(&self.rows);
        let distinct = if self.distinct.spilled() {
            self.distinct.capacity() * std::mem::size_of::<Distinct>()
        } else {
            0
        };
        rows + distinct
            + self
                .distinct
                .iter()
                .map(Distinct::heap_bytes)
                .sum::<usize>()
    }

    fn bucket_at(&self, stride: usize, i: usize) -> i64 {
        self.rows[i * stride] as i64
    }

    /// Index of the first row whose bucket is `> b` (rows `..idx` have bucket `<= b`).
    ///
    /// Almost every search is for the newest bucket (an event in order, the end of a
    /// window) or for the start of a window that is short next to the key's retention:
    /// both lie at or near the end of the rows, which the current event has just brought
    /// into cache. So the search gallops back from the newest row (1, 2, 4 ... rows) and
    /// binary-searches only within the last of those steps, instead of starting in the
    /// middle of the rows, in lines nothing else of this decision reads.
    fn upper(&self, stride: usize, b: i64) -> usize {
        let n = self.rows.len() / stride;
        if n == 0 || self.bucket_at(stride, n - 1) <= b {
            return n;
        }
        // bucket_at(hi) > b; rows before `lo` are <= b.
        let mut hi = n - 1;
        let mut step = 1;
        let mut lo = 0;
        while step <= hi {
            let probe = hi - step;
            if self.bucket_at(stride, probe) <= b {
                lo = probe + 1;
                break;
            }
            hi = probe;
            step *= 2;
        }
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.bucket_at(stride, mid) <= b {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Adds one event at bucket `b`.
    pub fn add(&mut self, layout: &Layout, b: i64, c: &Contribution<'_>) -> Added {
        if self
            .newest_bucket(layout)
            .is_some_and(|n| b <= retention_cutoff(n, layout))
        {
            return Added::TooLate;
        }
        let any_row = c.counts.iter().any(|&x| x) || c.sums.iter().any(Option::is_some);
        let any_distinct = c.distincts.iter().any(Option::is_some);
        if !any_row && !any_distinct {
            return Added::Nothing;
        }
        let stride = layout.stride();
        if self.rows.capacity() == 0 {
            // A key's first row: exactly one row's room (a ThinVec would start at four
            // words; most keys of small-stride groups never hold a second row).
            self.rows.reserve_exact(stride);
        }
        if stride == 1 {
            // No count or sum slot: the only row needed is the newest bucket.
            match self.rows.first_mut() {
                Some(n) => *n = (*n as i64).max(b) as u64,
                None => self.rows.push(b as u64),
            }
        } else {
            let idx = self.upper(stride, b);
            let exists = idx > 0 && self.bucket_at(stride, idx - 1) == b;
            let start = if exists {
                idx - 1
            } else {
                // New row, initialised with the prefix of the row before it (no
                // temporary allocation: grow in place, then fill).
                let at = idx * stride;
                let len = self.rows.len();
                self.rows.resize(len + stride, 0);
                if at < len {
                    // An older bucket than some rows (a late event): one move of the rows
                    // after it, not one per slot.
                    self.rows.copy_within(at..len, at + stride);
                    self.rows[at..at + stride].fill(0);
                }
                self.rows[at] = b as u64;
                if idx > 0 {
                    self.rows.copy_within(at - stride + 1..at, at + 1);
                }
                idx
            };
            let n = self.rows.len() / stride;
            for r in start..n {
                let base = r * stride;
                for (s, &inc) in c.counts.iter().enumerate() {
                    if inc {
                        self.rows[base + 1 + s] += 1;
                    }
                }
                for (s, v) in c.sums.iter().enumerate() {
                    if let Some(v) = v {
                        let at = base + 1 + layout.counts + 2 * s;
                        let cur = read_dec(&self.rows[at..at + 2]);
                        write_dec(&mut self.rows[at..at + 2], sat_add(cur, *v));
                    }
                }
            }
        }
        let newest = self.newest_bucket(layout).unwrap_or(b);
        let edge = newest.saturating_sub(layout.lateness);
        for (i, (d, v)) in self.distinct.iter_mut().zip(c.distincts).enumerate() {
            if let Some(v) = v {
                d.add(*v, b, edge.saturating_sub(layout.distinct_window(i)), edge);
            }
        }
        self.evict(layout, false);
        Added::Yes
    }

    /// Rewrites this key for a new layout of its group (after a rule reload). `mapping`
    /// gives, per new count / sum / distinct slot, the old slot it continues, or `None` for
    /// a new slot, which starts empty. Old slots nobody maps to are dropped.
    pub fn migrate(
        mut self,
        old: &Layout,
        new: &Layout,
        mapping: &[Vec<Option<usize>>; 3],
    ) -> KeyState {
        let (os, ns) = (old.stride(), new.stride());
        let n = self.rows.len() / os;
        let mut rows = ThinVec::with_capacity(n * ns);
        if ns == 1 {
            // No count or sum slot any more: keep the newest bucket only.
            if n > 0 {
                rows.push(self.rows[(n - 1) * os]);
            }
        } else {
            for r in 0..n {
                let row = &self.rows[r * os..(r + 1) * os];
                rows.push(row[0]);
                for m in &mapping[0] {
                    rows.push(m.map_or(0, |o| row[1 + o]));
                }
                for m in &mapping[1] {
                    match m {
                        Some(o) => {
                            let at = 1 + old.counts + 2 * o;
                            rows.push(row[at]);
                            rows.push(row[at + 1]);
                        }
                        None => {
                            let mut z = [0u64; 2];
                            write_dec(&mut z, Decimal::ZERO);
                            rows.extend(z);
                        }
                    }
                }
            }
        }
        let mut old_distinct: Vec<Option<Distinct>> = std::mem::take(&mut self.distinct)
            .into_iter()
            .map(Some)
            .collect();
        let distinct = mapping[2]
            .iter()
            .map(|m| {
                m.and_then(|o| old_distinct.get_mut(o).and_then(Option::take))
                    .unwrap_or_default()
            })
            .collect();
        KeyState { rows, distinct }
    }

    /// Whether anything is older than the retention horizon (cheap: no eviction).
    pub fn has_expired(&self, layout: &Layout) -> bool {
        let Some(newest) = self.newest_bucket(layout) else {
            return false;
        };
        let cutoff = retention_cutoff(newest, layout);
        let edge = newest.saturating_sub(layout.lateness);
        (!self.rows.is_empty() && self.bucket_at(layout.stride(), 0) <= cutoff)
            || self.distinct.iter().enumerate().any(|(i, d)| {
                d.oldest()
                    .is_some_and(|o| o <= edge.saturating_sub(layout.distinct_window(i)))
            })
    }

    /// Drops rows and distinct entries older than the retention horizon
    /// (`newest - max_window - lateness`). Batched unless `force`.
    pub fn evict(&mut self, layout: &Layout, force: bool) {
        let Some(newest) = self.newest_bucket(layout) else {
            return;
        };
        let cutoff = retention_cutoff(newest, layout);
        let stride = layout.stride();
        let n = self.rows.len() / stride;
        // Rows go in batches of at least `need`: whether there are that many dead ones
        // is one read of row `need - 1` (the rows are sorted), not a search through
        // the oldest rows, which nothing else of this event reads.
        let need = if force { 1 } else { EVICT_BATCH_MIN.max(n / 4) };
        let dead = if n >= need && self.bucket_at(stride, need - 1) <= cutoff {
            self.upper(stride, cutoff)
        } else {
            0
        };
        if dead >= need {
            // Rebase the surviving prefixes on the last dead row, then drop the dead rows.
            let last_dead = (dead - 1) * stride;
            let base: Vec<u64> = self.rows[last_dead + 1..last_dead + stride].to_vec();
            for r in dead..n {
                let at = r * stride;
                for (cell, b) in self.rows[at + 1..at + 1 + layout.counts]
                    .iter_mut()
                    .zip(&base)
                {
                    *cell -= b;
                }
                for s in 0..layout.sums {
                    let o = 1 + layout.counts + 2 * s;
                    let cur = read_dec(&self.rows[at + o..at + o + 2]);
                    let b = read_dec(&base[o - 1..o + 1]);
                    write_dec(&mut self.rows[at + o..at + o + 2], sat_add(cur, -b));
                }
            }
            self.rows.drain(..dead * stride);
            if self.rows.capacity() > 2 * self.rows.len() + 4 * stride {
                self.rows.shrink_to_fit();
            }
        }
        let edge = newest.saturating_sub(layout.lateness);
        for (i, d) in self.distinct.iter_mut().enumerate() {
            d.maintain(edge.saturating_sub(layout.distinct_window(i)), edge, force);
        }
    }

    /// Row-index range of buckets in `(b - window, b]`.
    fn range(&self, stride: usize, b: i64, window: i64) -> (usize, usize) {
        (
            self.upper(stride, b.saturating_sub(window)),
            self.upper(stride, b),
        )
    }

    /// Count over buckets `(b - window, b]`.
    pub fn count(&self, layout: &Layout, slot: usize, b: i64, window: i64) -> u64 {
        let stride = layout.stride();
        let (lo, hi) = self.range(stride, b, window);
        let at = |i: usize| {
            if i == 0 {
                0
            } else {
                self.rows[(i - 1) * stride + 1 + slot]
            }
        };
        at(hi) - at(lo)
    }

    /// Sum over buckets `(b - window, b]`.
    pub fn sum(&self, layout: &Layout, slot: usize, b: i64, window: i64) -> Decimal {
        let stride = layout.stride();
        let (lo, hi) = self.range(stride, b, window);
        let at = |i: usize| {
            if i == 0 {
                Decimal::ZERO
            } else {
                let o = (i - 1) * stride + 1 + layout.counts + 2 * slot;
                read_dec(&self.rows[o..o + 2])
            }
        };
        if lo == hi {
            Decimal::ZERO
        } else {
            sat_add(at(hi), -at(lo))
        }
    }

    /// Distinct count over buckets `(b - window, b]`.
    pub fn distinct(&self, slot: usize, b: i64, window: i64) -> u64 {
        self.distinct[slot].count(b.saturating_sub(window), b)
    }

    /// Whether distinct slot `slot` is still exact.
    pub fn distinct_is_exact(&self, slot: usize) -> bool {
        matches!(self.distinct[slot], Distinct::Exact { .. })
    }
}

/// Newest bucket that is no longer retained: `newest - max_window - lateness`. An event at
/// or before it is too late to add (its own window would read evicted buckets).
fn retention_cutoff(newest: i64, layout: &Layout) -> i64 {
    newest
        .saturating_sub(layout.max_window)
        .saturating_sub(layout.lateness)
}

/// Decimal addition that saturates instead of panicking. Decoded amounts are bounded
/// (see `txn`), so real sums never get near the limit; this only keeps hostile input from
/// reaching a panic. (Before the limit, a sum whose mantissa no longer fits 96 bits at its
/// scale is rounded to fewer decimals by rust_decimal: ~790,000 maximal amounts with 8
/// decimals in one key's retention.)
fn sat_add(a: Decimal, b: Decimal) -> Decimal {
    a.checked_add(b).unwrap_or(if b.is_sign_negative() {
        Decimal::MIN
    } else {
        Decimal::MAX
    })
}

fn read_dec(w: &[u64]) -> Decimal {
    let lo = w[0].to_le_bytes();
    let hi = w[1].to_le_bytes();
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&lo);
    b[8..].copy_from_slice(&hi);
    Decimal::deserialize(b)
}

fn write_dec(w: &mut [u64], d: Decimal) {
    let b = d.serialize();
    w[0] = u64::from_le_bytes(b[..8].try_into().unwrap());
    w[1] = u64::from_le_bytes(b[8..].try_into().unwrap());
}

#[cfg(test)]
mod tests;
