use super::*;
use proptest::prelude::*;

fn layout(max_window: i64, lateness: i64) -> Layout {
    Layout {
        counts: 2,
        sums: 1,
        distincts: 1,
        max_window,
        lateness,
        distinct_windows: vec![max_window],
    }
}

fn add(ks: &mut KeyState, l: &Layout, b: i64, amount: i64, small: bool, v: u64) -> Added {
    ks.add(
        l,
        b,
        &Contribution {
            counts: &[true, small],
            sums: &[Some(Decimal::new(amount, 2))],
            distincts: &[Some(v)],
        },
    )
}

#[test]
fn sparse_buckets_and_inclusive_window() {
    let l = layout(60, 0);
    let mut ks = KeyState::new(&l);
    add(&mut ks, &l, 1000, 150, false, 1);
    add(&mut ks, &l, 1030, 250, false, 2);
    add(&mut ks, &l, 1059, 100, true, 1);
    assert_eq!(ks.bucket_count(&l), 3);
    // (1059-60, 1059] includes 1000.
    assert_eq!(ks.count(&l, 0, 1059, 60), 3);
    assert_eq!(ks.sum(&l, 0, 1059, 60), Decimal::new(500, 2));
    assert_eq!(ks.count(&l, 1, 1059, 60), 1);
    assert_eq!(ks.distinct(0, 1059, 60), 2);
    // (1060-60, 1060] excludes 1000.
    add(&mut ks, &l, 1060, 1, false, 3);
    assert_eq!(ks.count(&l, 0, 1060, 60), 3);
    assert_eq!(ks.sum(&l, 0, 1060, 60), Decimal::new(351, 2));
    assert_eq!(ks.distinct(0, 1060, 60), 3);
}

#[test]
fn upper_matches_a_linear_scan() {
    // The galloping search against the definition, for every row count up to a few
    // doublings and every target before, between, on and after the rows' buckets.
    let l = layout(1_000_000, 0);
    let stride = l.stride();
    for n in 0..70usize {
        let mut ks = KeyState::new(&l);
        for i in 0..n {
            add(&mut ks, &l, 10 + 3 * i as i64, 1, false, 1);
        }
        assert_eq!(ks.bucket_count(&l), n);
        for b in 0..(20 + 3 * n as i64) {
            let naive = (0..n).take_while(|&i| ks.bucket_at(stride, i) <= b).count();
            assert_eq!(ks.upper(stride, b), naive, "n {n} b {b}");
        }
    }
}

#[test]
fn same_bucket_merges() {
    let l = layout(10, 0);
    let mut ks = KeyState::new(&l);
    for _ in 0..5 {
        add(&mut ks, &l, 7, 100, false, 9);
    }
    assert_eq!(ks.bucket_count(&l), 1);
    assert_eq!(ks.count(&l, 0, 7, 10), 5);
    assert_eq!(ks.distinct(0, 7, 10), 1);
}

#[test]
fn too_late_events_add_nothing() {
    let l = layout(60, 10);
    let mut ks = KeyState::new(&l);
    assert_eq!(add(&mut ks, &l, 1000, 100, false, 1), Added::Yes);
    // newest 1000 - window 60 - lateness 10 = 930.
    assert_eq!(add(&mut ks, &l, 930, 100, false, 2), Added::TooLate);
    assert_eq!(add(&mut ks, &l, 931, 100, false, 2), Added::Yes);
    // Late but within the lateness allowance: its own window is exact.
    assert_eq!(ks.count(&l, 0, 935, 60), 1);
    assert_eq!(ks.count(&l, 0, 990, 60), 1);
    assert_eq!(ks.count(&l, 0, 1000, 60), 1);
}

#[test]
fn nothing_to_add_creates_no_bucket() {
    let l = layout(60, 0);
    let mut ks = KeyState::new(&l);
    let r = ks.add(
        &l,
        5,
        &Contribution {
            counts: &[false, false],
            sums: &[None],
            distincts: &[None],
        },
    );
    assert_eq!(r, Added::Nothing);
    assert_eq!(ks.bucket_count(&l), 0);
    assert_eq!(ks.newest_bucket(&l), None);
}

#[test]
fn eviction_keeps_values_and_bounds_memory() {
    let l = layout(100, 0);
    let mut ks = KeyState::new(&l);
    for b in 0..10_000 {
        add(&mut ks, &l, b, 1, false, (b % 7) as u64);
        assert_eq!(ks.count(&l, 0, b, 100), (b + 1).min(100) as u64);
        assert_eq!(ks.sum(&l, 0, b, 100), Decimal::new((b + 1).min(100), 2));
    }
    assert!(ks.bucket_count(&l) <= 100 + 100 / 4 + 8 + 1);
    // 10k events over 7 values: the distinct set stays compact (memory independent of
    // how often a value repeats).
    assert!(ks.heap_bytes() < 16 * 1024, "{}", ks.heap_bytes());
    assert_eq!(ks.distinct(0, 9_999, 100), 7);
    ks.evict(&l, true);
    assert_eq!(ks.bucket_count(&l), 100);
}

#[test]
fn distinct_switches_to_hll_within_error() {
    let l = Layout {
        counts: 0,
        sums: 0,
        distincts: 1,
        max_window: 1_000_000,
        lateness: 0,
        distinct_windows: vec![1_000_000],
    };
    let mut ks = KeyState::new(&l);
    let n = 20_000u64;
    for i in 0..n {
        let v = crate::keyhash::HashKey::default().hash_str(&i.to_string()) as u64;
        ks.add(
            &l,
            i as i64,
            &Contribution {
                counts: &[],
                sums: &[],
                distincts: &[Some(v)],
            },
        );
        if i as usize == DISTINCT_EXACT_BOUND - 1 {
            assert!(ks.distinct_is_exact(0));
            assert_eq!(ks.distinct(0, i as i64, 1_000_000), i + 1);
        }
    }
    assert!(!ks.distinct_is_exact(0));
    for (window, truth) in [(1_000_000i64, n), (5_000, 5_000), (500, 500)] {
        let est = ks.distinct(0, n as i64 - 1, window) as f64;
        let err = (est - truth as f64).abs() / truth as f64;
        // 3 standard errors of 6.5 %.
        assert!(err < 0.195, "window {window}: est {est} truth {truth}");
    }
    // The sliding lists stay short: memory independent of the 20k events.
    assert!(ks.heap_bytes() < 64 * 1024, "{}", ks.heap_bytes());
}

#[test]
fn state_round_trips_through_bincode() {
    let l = layout(60, 5);
    let mut ks = KeyState::new(&l);
    for b in 0..50 {
        add(&mut ks, &l, b * 3, b, b % 2 == 0, b as u64 % 5);
    }
    let cfg = bincode::config::standard();
    let bytes = bincode::serde::encode_to_vec(&ks, cfg).unwrap();
    let (back, _): (KeyState, usize) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
    assert_eq!(back, ks);
}

/// One generated event: key, bucket lag behind the running clock, amount (cents), flag,
/// distinct value.
#[derive(Debug, Clone)]
struct Ev {
    key: u8,
    step: i64,
    lag: i64,
    cents: i64,
    flag: bool,
    value: u64,
}

fn ev() -> impl Strategy<Value = Ev> {
    (
        0u8..3,
        0i64..4,
        prop_oneof![6 => 0i64..5, 3 => 0i64..40, 1 => 0i64..200],
        0i64..100_000,
        any::<bool>(),
        0u64..12,
    )
        .prop_map(|(key, step, lag, cents, flag, value)| Ev {
            key,
            step,
            lag,
            cents,
            flag,
            value,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Every aggregate equals a naive recount over the events the model says were added,
    /// for random out-of-order streams over several keys.
    #[test]
    fn matches_naive_recount(events in proptest::collection::vec(ev(), 1..300)) {
        let windows = [1i64, 7, 30, 60];
        // The distinct slot is read by windows up to 30 buckets: it keeps only that long.
        let l = Layout { distinct_windows: vec![30], ..layout(60, 40) };
        let mut states: Vec<KeyState> = (0..3).map(|_| KeyState::new(&l)).collect();
        // Naive model: all added events per key, and each key's newest bucket.
        let mut added: Vec<Vec<(i64, i64, bool, u64)>> = vec![Vec::new(); 3];
        let mut newest = [i64::MIN; 3];
        let mut clock = 1_000i64;
        for e in &events {
            clock += e.step;
            let b = clock - e.lag;
            let k = e.key as usize;
            let too_late =
                newest[k] != i64::MIN && b <= newest[k] - l.max_window - l.lateness;
            let lag_behind_newest = if newest[k] == i64::MIN { 0 } else { newest[k] - b };
            let r = add(&mut states[k], &l, b, e.cents, e.flag, e.value);
            if too_late {
                prop_assert_eq!(r, Added::TooLate);
                continue;
            }
            prop_assert_eq!(r, Added::Yes);
            added[k].push((b, e.cents, e.flag, e.value));
            newest[k] = newest[k].max(b);
            if lag_behind_newest > l.lateness {
                // Later than the lateness allowance: counted, but its own view may miss
                // evicted buckets. Later queries are checked.
                continue;
            }
            for &w in &windows {
                let inr: Vec<_> = added[k].iter().filter(|x| x.0 > b - w && x.0 <= b).collect();
                let count = inr.len() as u64;
                let small = inr.iter().filter(|x| x.2).count() as u64;
                let sum: i64 = inr.iter().map(|x| x.1).sum();
                let mut vals: Vec<u64> = inr.iter().map(|x| x.3).collect();
                vals.sort_unstable();
                vals.dedup();
                prop_assert_eq!(states[k].count(&l, 0, b, w), count, "count w={}", w);
                prop_assert_eq!(states[k].count(&l, 1, b, w), small, "filtered w={}", w);
                prop_assert_eq!(states[k].sum(&l, 0, b, w), Decimal::new(sum, 2), "sum w={}", w);
                if w <= 30 {
                    prop_assert_eq!(states[k].distinct(0, b, w), vals.len() as u64, "distinct w={}", w);
                }
            }
        }
    }
}

#[test]
fn hll_is_as_accurate_for_late_events_as_for_in_order_ones() {
    // 400 different values on one key, one per bucket, then queries ending 100, 250 and
    // 299 buckets back (inside the lateness allowance of 300).
    let l = Layout {
        counts: 0,
        sums: 0,
        distincts: 1,
        max_window: 86_400,
        lateness: 300,
        distinct_windows: vec![86_400],
    };
    let mut ks = KeyState::new(&l);
    let key = crate::keyhash::HashKey::default();
    for i in 0..400i64 {
        let v = key.hash_str(&format!("card-{i}")) as u64;
        ks.add(
            &l,
            1_000 + i,
            &Contribution {
                counts: &[],
                sums: &[],
                distincts: &[Some(v)],
            },
        );
    }
    assert!(!ks.distinct_is_exact(0));
    for (end, truth) in [
        (1_399i64, 400f64),
        (1_299, 300.0),
        (1_149, 150.0),
        (1_100, 101.0),
    ] {
        let est = ks.distinct(0, end, 86_400) as f64;
        assert!(
            (est - truth).abs() / truth < 0.2,
            "end {end}: est {est}, truth {truth}"
        );
    }
}

#[test]
fn expired_values_do_not_force_approximation() {
    // 100 values long ago, then 100 new ones: never more than 128 live at once.
    let l = Layout {
        counts: 0,
        sums: 0,
        distincts: 1,
        max_window: 60,
        lateness: 0,
        distinct_windows: vec![60],
    };
    let mut ks = KeyState::new(&l);
    for i in 0..200u64 {
        let b = if i < 100 { 0 } else { 1_000 };
        ks.add(
            &l,
            b,
            &Contribution {
                counts: &[],
                sums: &[],
                distincts: &[Some(i)],
            },
        );
    }
    assert!(ks.distinct_is_exact(0));
    assert_eq!(ks.distinct(0, 1_000, 60), 100);
}

#[test]
fn map_entries_stay_small() {
    // Distinct slot inline (16 bytes), no padding: a card key costs 48 bytes per table
    // slot with its 16-byte keyed hash.
    assert_eq!(std::mem::size_of::<Distinct>(), 16);
    assert_eq!(
        std::mem::size_of::<(crate::keyhash::StateKey, KeyState)>(),
        48
    );
}

/// `Distinct::Exact::next_compact` was a u16 in the snapshots written before it became a
/// u32: bincode's varint reads the old encoding as the new type, at every size.
#[test]
fn a_u16_compaction_threshold_reads_back_as_u32() {
    let cfg = bincode::config::standard();
    for v in [16u16, 250, 251, 300, 65_535] {
        let old = bincode::encode_to_vec(v, cfg).unwrap();
        let (back, used): (u32, usize) = bincode::decode_from_slice(&old, cfg).unwrap();
        assert_eq!((back, used), (u32::from(v), old.len()));
    }
}
