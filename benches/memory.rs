//! Memory per tracked card key. Run: `cargo bench --bench memory`
//! (`MEM_CARDS`, default 1,000,000; `EVENTS_PER_CARD`, default 2).
//!
//! Method: resident set size (from /proc/self/statm) before and after deciding
//! `MEM_CARDS x EVENTS_PER_CARD` transactions of distinct cards, generated on the fly (so
//! no input is held in memory). The dedupe horizon is set to 1 s and swept every 100k
//! decisions (as the service's sweeper does), so retained decisions do not count: this
//! measures window state only. Two rule sets:
//! 1. `card windows`: only the default rules' card-keyed windows (24h sum, 10m distinct
//!    merchants, 10m tiny-amount count, 1h count): bytes per card key in the card group;
//! 2. `default rules`: all shipped rules, so every card also creates keys in the
//!    card+merchant+amount (duplicate) group, and the shared device/merchant/region groups.
//!
//! RSS includes allocator and hash-table slack, which the engine's own estimate
//! (`Engine::stats`) does not; both are printed.
//!
//! With the default rules it then writes a state snapshot of that state (size, time) while
//! another thread keeps deciding, and compares that thread's decision times during the
//! snapshot with the same thread's times just before it (same run, same process): how
//! much a snapshot of a large state holds decisions up.

use std::path::Path;

use rust_decimal::Decimal;

use fraudgate::rules::{compile, SourceFile};
use fraudgate::txn::AttrValue;
use fraudgate::{Engine, EngineConfig, Transaction};

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

const CARD_WINDOWS: &str = r#"
[ruleset]
version = "mem"
hold_at = 50
reject_at = 100
[windows]
card_amount_24h = { agg = "sum", of = "amount", by = "card", over = "24h" }
card_merchants_10m = { agg = "distinct", of = "merchant", by = "card", over = "10m" }
card_tiny_txn_10m = { agg = "count", by = "card", over = "10m", where = "amount < 2" }
card_txn_1h = { agg = "count", by = "card", over = "1h" }
[[rule]]
id = "r"
description = "reads every window"
when = "card_amount_24h > 20000 or card_merchants_10m >= 5 or card_tiny_txn_10m >= 4 or card_txn_1h >= 10"
action = "hold"
"#;

const T0: i64 = 1_795_687_200_000;

// The same allocator as the `fraudgate` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Decision times (ns) of one thread deciding transactions of known cards until `stop`.
fn decide_while(
    engine: &Engine,
    cards: u64,
    ts: i64,
    stop: &std::sync::atomic::AtomicBool,
    tag: &str,
) -> Vec<u64> {
    let mut times = Vec::new();
    let mut i = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let c = (i * 7919) % cards;
        let mut t = Transaction::new(
            format!("{tag}-{i}"),
            format!("5{:015}", c),
            Decimal::new(1234 + (i % 100) as i64, 2),
        );
        t.ts_ms = Some(ts);
        t.merchant = Some(format!("mer-{}", i % 5_000));
        let started = std::time::Instant::now();
        engine.decide(&t, ts);
        times.push(started.elapsed().as_nanos() as u64);
        i += 1;
    }
    times.sort_unstable();
    times
}

fn describe(tag: &str, t: &[u64]) {
    let q = |p: f64| t[((t.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    println!(
        "  {tag:<26} {:>8} decisions  p50 {:>7.1} µs  p99 {:>7.1} µs  p99.9 {:>7.1} µs  max {:>8.1} µs",
        t.len(),
        q(0.5),
        q(0.99),
        q(0.999),
        q(1.0)
    );
}

/// Snapshot of the loaded state while a second thread decides.
/// Runs `work` while a second thread decides; returns that thread's decision times,
/// `work`'s result and how long `work` took.
fn while_deciding<T>(
    engine: &Engine,
    cards: u64,
    ts: i64,
    tag: &str,
    work: impl FnOnce() -> T,
) -> (Vec<u64>, T, std::time::Duration) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let h = s.spawn(|| decide_while(engine, cards, ts, &stop, tag));
        let started = std::time::Instant::now();
        let out = work();
        let took = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        (h.join().unwrap(), out, took)
    })
}

fn snapshot_under_load(engine: &Engine, cards: u64, ts: i64) {
    let dir = std::env::temp_dir().join(format!("fraudgate-bench-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state.snap");
    // Baseline: the same decisions with nothing else running, for as long as the
    // snapshot will take (measured once first, not timed for the comparison).
    let probe = std::time::Instant::now();
    fraudgate::snapshot::save(engine, &path, ts, Default::default).unwrap();
    let window = probe.elapsed();
    let (before, (), _) = while_deciding(engine, cards, ts, "base", || std::thread::sleep(window));
    // The baseline's decisions are remembered for retries; forget them (horizon 1 s) so the
    // snapshot holds the window state.
    engine.evict_idle(ts + 2_000);
    let (copying, snap, copy_took) = while_deciding(engine, cards, ts, "copy", || {
        engine.snapshot(ts, Default::default)
    });
    let (writing, bytes, write_took) = while_deciding(engine, cards, ts, "write", || {
        fraudgate::snapshot::write(&path, &snap).unwrap()
    });
    // What a start pays to read it back (checksum, then decode), decisions idle.
    let reading = std::time::Instant::now();
    let back = fraudgate::snapshot::read(&path).unwrap();
    let read_took = reading.elapsed();
    drop(back);
    println!(
        "  snapshot: {:.1} MiB ({:.1} B per card): copy + encode {:.2} s, write + fsync {:.2} s, read {:.2} s",
        bytes as f64 / 1048576.0,
        bytes as f64 / cards as f64,
        copy_took.as_secs_f64(),
        write_took.as_secs_f64(),
        read_took.as_secs_f64()
    );
    describe("decide, no snapshot", &before);
    describe("decide, while copying", &copying);
    describe("decide, while writing", &writing);
    let _ = std::fs::remove_dir_all(&dir);
}

fn run(name: &str, engine: Engine, cards: u64, per_card: u64) {
    let before = rss_bytes();
    let mut last_ts = T0;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..per_card {
        for c in 0..cards {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut t = Transaction::new(
                format!("m{round}-{c}"),
                format!("5{:015}", c),
                Decimal::new((x % 20_000) as i64 + 100, 2),
            );
            last_ts = T0 + (round * cards + c) as i64 / 4; // 4 transactions per ms
            t.ts_ms = Some(last_ts);
            t.device = Some(format!("dev-{}", c % 50_000));
            t.merchant = Some(format!("mer-{}", x % 5_000));
            t.region = Some(format!("R{}", x % 40));
            t.mcc = Some(5411);
            t.attrs = vec![("phone_match".into(), AttrValue::Bool(true))];
            engine.decide(&t, last_ts);
            if (round * cards + c).is_multiple_of(100_000) {
                engine.evict_idle(last_ts);
            }
        }
    }
    engine.evict_idle(last_ts);
    let after = rss_bytes();
    let stats = engine.stats();
    let card = stats.groups.iter().find(|g| g.0 == "card").unwrap();
    assert_eq!(card.1 as u64, cards, "every card is tracked");
    let est_total: usize = stats.groups.iter().map(|g| g.2).sum();
    println!("{name}: {cards} cards x {per_card} events");
    for (sig, keys, bytes) in &stats.groups {
        println!(
            "  group {sig:<24} {keys:>9} keys  ~{:>6.1} B/key (engine estimate)",
            *bytes as f64 / (*keys).max(1) as f64
        );
    }
    println!(
        "  card group estimate: {:.1} B per card key",
        card.2 as f64 / card.1 as f64
    );
    println!(
        "  RSS delta: {:.1} MiB = {:.1} B per tracked card (all groups; estimate {:.1})",
        (after.saturating_sub(before)) as f64 / 1048576.0,
        after.saturating_sub(before) as f64 / cards as f64,
        est_total as f64 / cards as f64
    );
    if name == "default rules" {
        snapshot_under_load(&engine, cards, last_ts);
    }
    drop(engine);
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let cards: u64 = std::env::var("MEM_CARDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let per_card: u64 = std::env::var("EVENTS_PER_CARD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    // Each measurement runs in its own process, so memory freed by one run cannot hide
    // growth in the next.
    let Ok(only) = std::env::var("MEM_ONLY") else {
        for which in ["card", "default"] {
            let status = std::process::Command::new(std::env::current_exe().unwrap())
                .env("MEM_ONLY", which)
                .status()
                .unwrap();
            assert!(status.success());
        }
        return;
    };
    let cfg = EngineConfig {
        dedupe_horizon: std::time::Duration::from_secs(1),
        ..EngineConfig::default()
    };
    if only == "default" {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let rs = fraudgate::load_dir(&root.join("rules"), &cfg).unwrap();
        run("default rules", Engine::new(rs, cfg), cards, per_card);
        return;
    }
    let rs = compile(
        vec![SourceFile {
            name: "mem/r.toml".into(),
            text: CARD_WINDOWS.into(),
        }],
        &|_| Err(std::io::Error::other("none")),
        &cfg,
    )
    .unwrap();
    run("card windows", Engine::new(rs, cfg), cards, per_card);
}
