//! Decision latency while the state grows from empty: N transactions with new ids over 1M
//! cards, 50k devices and 5k merchants under the shipped rules, each decide() timed.
//! Growth is where stalls come from (table resizes under a shard lock, page faults on
//! fresh memory); docs/PERFORMANCE.md has the figures.
//!
//! Then it times one sweep past the retry horizon (every id and idle key evicted at once).
//!
//! `cargo run --release --example growth` (N=3000000 by default); `RESERVE=1` sets
//! `reserve_keys` and `reserve_ids` to N. mimalloc is built with `no_thp`, so huge pages
//! are off; to see them on, build without that feature in Cargo.toml.

use std::time::{Duration, Instant};

use fraudgate::config::EngineConfig;
use fraudgate::{Engine, Transaction};
use rust_decimal::Decimal;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let n: usize = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000_000);
    let reserve = std::env::var("RESERVE").is_ok();
    let cfg = EngineConfig {
        // Every id stays in the retry table for the whole run.
        dedupe_horizon: Duration::from_secs(3600),
        reserve_ids: if reserve { n } else { 0 },
        reserve_keys: if reserve { n } else { 0 },
        ..Default::default()
    };
    let rules = fraudgate::load_dir(std::path::Path::new("rules"), &cfg).expect("rules/");
    let engine = Engine::new(rules, cfg);
    let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let t0 = 1_764_000_000_000i64;
    let start = Instant::now();
    for i in 0..n {
        let mut t = Transaction::new(
            format!("id-{i}"),
            format!("5{:015}", i % 1_000_000),
            Decimal::new(1000 + (i % 500) as i64, 2),
        );
        t.ts_ms = Some(t0 + i as i64);
        t.merchant = Some(format!("m-{}", i % 5000));
        t.device = Some(format!("d-{}", i % 50_000));
        let s = Instant::now();
        std::hint::black_box(engine.decide(&t, t0 + i as i64));
        h.record(s.elapsed().as_nanos() as u64).unwrap();
    }
    println!(
        "reserve={reserve} n={n}: {:.1} s; decide p50 {} ns, p99 {} ns, p99.99 {} us, max {:.2} ms; {} over 1 ms",
        start.elapsed().as_secs_f64(),
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.9999) / 1000,
        h.max() as f64 / 1e6,
        h.count_between(1_000_000, u64::MAX)
    );
    // Then the sweep that finds every id past the retry horizon (and the per-transaction
    // duplicate-detection keys idle): what a sweep costs when a burst of traffic ages out.
    let s = Instant::now();
    let (ev, _) = engine.sweep(t0 + n as i64 + 3_601_000);
    println!(
        "sweep past the retry horizon: {:.1} ms; {} ids and {} keys evicted",
        s.elapsed().as_secs_f64() * 1e3,
        ev.dedupe,
        ev.keys
    );
}
