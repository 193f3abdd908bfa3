//! Engine benchmarks. Run: `cargo bench --bench engine --features bench-zen`
//! (without the feature the zen-expression comparison is skipped).
//!
//! - `rules/15/fraudgate` vs `rules/15/zen`: the same 15 conditions on the same
//!   transaction and feature values, in one run.
//! - `decide/default_rules/{1,2}_threads`: full `decide()` with the shipped rules over a
//!   realistic key mix (100k cards, 50k devices, 5k merchants, 40 regions), per decision.
//! - `window/add_and_query`: one window update plus queries on a warm key.
//! - `wire/decode`, `wire/decision_json`: decoding a transaction payload of the load
//!   generator, and encoding the decision the shipped rules made on it.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rust_decimal::Decimal;

use fraudgate::keyhash::HashKey;
use fraudgate::loadgen::{GenConfig, Generator};
use fraudgate::rules::expr::FieldHashes;
use fraudgate::rules::{compile, Ctx, SourceFile, Tri};
use fraudgate::txn::{AttrValue, Transaction};
use fraudgate::window::{Contribution, KeyState, Layout};
use fraudgate::{Engine, EngineConfig};

/// The 15 conditions, in our language and in zen's.
const RULES: [(&str, &str); 15] = [
    ("amount > 10000", "amount > 10000"),
    ("card_amount_24h > 20000", "card_amount_24h > 20000"),
    (
        "mcc in high_risk_mcc and amount > 1000",
        "mcc in [7995, 6051, 6211, 4829, 5967] and amount > 1000",
    ),
    (
        "mcc in high_risk_mcc",
        "mcc in [7995, 6051, 6211, 4829, 5967]",
    ),
    (
        "mcc in medium_risk_mcc and amount > 2000",
        "mcc in [5732, 5944, 4722, 5816] and amount > 2000",
    ),
    (
        "attrs.merchant_age_days < 30 and amount > 2000",
        "merchant_age_days < 30 and amount > 2000",
    ),
    (
        "attrs.merchant_age_days < 90 and amount > 500",
        "merchant_age_days < 90 and amount > 500",
    ),
    (
        "region in high_risk_regions",
        "region in ['XA', 'XB', 'XC', 'XD']",
    ),
    ("attrs.ip_country != region", "ip_country != region"),
    ("card_merchants_10m >= 5", "card_merchants_10m >= 5"),
    (
        "card_merchant_amount_2m >= 2",
        "card_merchant_amount_2m >= 2",
    ),
    ("device_cards_24h >= 4", "device_cards_24h >= 4"),
    (
        "card_tiny_txn_10m >= 4 and amount < 2",
        "card_tiny_txn_10m >= 4 and amount < 2",
    ),
    (
        "merchant_txn_5m >= 30 and merchant_txn_5m * 12 > 3 * merchant_txn_1h",
        "merchant_txn_5m >= 30 and merchant_txn_5m * 12 > 3 * merchant_txn_1h",
    ),
    (
        "local_hour < 6 and amount > 1000",
        "local_hour < 6 and amount > 1000",
    ),
];

fn bench_rule_set() -> String {
    let mut s = String::from(
        r#"
[ruleset]
version = "bench"
hold_at = 50
reject_at = 100
[attrs]
merchant_age_days = "number"
ip_country = "string"
[lists]
high_risk_mcc = [7995, 6051, 6211, 4829, 5967]
medium_risk_mcc = [5732, 5944, 4722, 5816]
high_risk_regions = ["XA", "XB", "XC", "XD"]
[windows]
card_amount_24h = { agg = "sum", of = "amount", by = "card", over = "24h" }
card_merchants_10m = { agg = "distinct", of = "merchant", by = "card", over = "10m" }
card_merchant_amount_2m = { agg = "count", by = ["card", "merchant", "amount"], over = "2m" }
device_cards_24h = { agg = "distinct", of = "card", by = "device", over = "24h" }
card_tiny_txn_10m = { agg = "count", by = "card", over = "10m", where = "amount < 2" }
merchant_txn_5m = { agg = "count", by = "merchant", over = "5m" }
merchant_txn_1h = { agg = "count", by = "merchant", over = "1h" }
"#,
    );
    for (i, (ours, _)) in RULES.iter().enumerate() {
        s += &format!(
            "[[rule]]\nid = \"r{i}\"\ndescription = \"d\"\nwhen = \"{ours}\"\nscore = 10\n"
        );
    }
    s
}

/// Feature values used by both sides.
const FEATURES: [(&str, i64); 8] = [
    ("card_amount_24h", 3_000),
    ("card_merchants_10m", 2),
    ("card_merchant_amount_2m", 1),
    ("device_cards_24h", 1),
    ("card_tiny_txn_10m", 0),
    ("merchant_txn_5m", 12),
    ("merchant_txn_1h", 140),
    ("local_hour", 14),
];

/// Evaluates every rule of `rs` on `t`; bit i set when rule i fired.
fn fired_mask(
    rs: &fraudgate::RuleSet,
    t: &Transaction,
    ints: &[Option<i64>],
    decs: &[Option<Decimal>],
    key: &HashKey,
) -> u32 {
    let attrs: [Option<&AttrValue>; 2] = [t.attr("ip_country"), t.attr("merchant_age_days")];
    let ctx = Ctx {
        txn: t,
        ts_ms: 0,
        received_ms: 0,
        currency: "EUR",
        attrs: &attrs,
        ints,
        decs,
        local_hour: 14,
        local_weekday: 4,
        key,
        hashes: &FieldHashes::default(),
    };
    let mut mask = 0u32;
    for (i, r) in rs.rules.iter().enumerate() {
        if (r.when)(&ctx) == Tri::True {
            mask |= 1 << i;
        }
    }
    mask
}

fn rules_bench(c: &mut Criterion) {
    let cfg = EngineConfig::default();
    let rs = compile(
        vec![SourceFile {
            name: "bench/r.toml".into(),
            text: bench_rule_set(),
        }],
        &|_| Err(std::io::Error::other("no list files")),
        &cfg,
    )
    .unwrap_or_else(|e| panic!("{}", e.render()));
    let mut t = Transaction::new("t1", "4111111111111111", Decimal::new(150_050, 2));
    t.mcc = Some(7995);
    t.region = Some("XB".into());
    t.attrs = vec![
        ("ip_country".into(), AttrValue::Str("DE".into())),
        (
            "merchant_age_days".into(),
            AttrValue::Num(Decimal::from(120)),
        ),
    ];
    let mut ints = vec![None; rs.int_features];
    let mut decs = vec![None; rs.dec_features];
    for w in &rs.windows {
        let v = FEATURES.iter().find(|f| f.0 == w.name).unwrap().1;
        if matches!(w.read, fraudgate::rules::WindowRead::Sum(_)) {
            decs[w.feature] = Some(Decimal::from(v));
        } else {
            ints[w.feature] = Some(v);
        }
    }
    let key = HashKey::default();
    let mut g = c.benchmark_group("rules/15");
    g.throughput(Throughput::Elements(1));
    g.bench_function("fraudgate", |b| {
        b.iter(|| fired_mask(&rs, black_box(&t), &ints, &decs, &key))
    });
    #[cfg(feature = "bench-zen")]
    {
        use zen_expression::{Isolate, Scope, Variable};
        let mut ctx = serde_json::json!({
            "amount": 1500.5, "mcc": 7995, "region": "XB",
            "ip_country": "DE", "merchant_age_days": 120,
        });
        for (k, v) in FEATURES {
            ctx[k] = v.into();
        }
        let var: Variable = ctx.into();
        let mut iso = Isolate::new();
        let compiled: Vec<_> = RULES
            .iter()
            .map(|(_, z)| iso.compile_standard(z).expect(z))
            .collect();
        let mut vm = zen_expression::vm::VM::new();
        let zen_mask = |vm: &mut zen_expression::vm::VM, var: &Variable| {
            let scope = Scope::new(var.clone());
            let mut mask = 0u32;
            for (i, e) in compiled.iter().enumerate() {
                if e.evaluate_with_scope(&scope, vm).unwrap() == Variable::Bool(true) {
                    mask |= 1 << i;
                }
            }
            mask
        };
        // Same answers on both sides before timing anything.
        let ours = fired_mask(&rs, &t, &ints, &decs, &key);
        assert_eq!(
            ours,
            zen_mask(&mut vm, &var),
            "both engines must agree before timing"
        );
        assert!(ours.count_ones() >= 4, "{ours:b}");
        g.bench_function("zen", |b| b.iter(|| zen_mask(&mut vm, black_box(&var))));
    }
    g.finish();
}

const T0: i64 = 1_795_687_200_000;

// The same allocator as the `fraudgate` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn card_shard(card: &str, threads: usize) -> usize {
    card.bytes()
        .fold(0usize, |a, b| a.wrapping_mul(31).wrapping_add(b as usize))
        % threads
}

/// Event time between transactions: 86 ms gives each of the 100k cards about 10
/// transactions per 24 hours, and each merchant about 200 (skewed).
const STEP_MS: i64 = 86;

/// The realistic mix of [`fraudgate::loadgen`] (100k cards, 50k devices, 5k merchants,
/// 40 regions; no injected fraud), one transaction every [`STEP_MS`] of event time.
pub fn transactions(n: usize, seed: u64, start_ms: i64) -> Vec<Transaction> {
    let mut g = Generator::new(GenConfig {
        seed,
        fraud_rate: 0.0,
        ..GenConfig::default()
    });
    (0..n as i64)
        .map(|i| g.next_at(start_ms + i * STEP_MS).txn)
        .collect()
}

fn decide_bench(c: &mut Criterion) {
    let cfg = EngineConfig::default();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rs = fraudgate::load_dir(&root.join("rules"), &cfg).unwrap();
    let engine = Arc::new(Engine::new(rs, cfg));
    // Warm up to a steady state: 26 hours of event time (1.1M transactions), so every
    // window (the longest is 24h) is full and old state is being evicted as new arrives.
    let mut next_ts = T0;
    for chunk in 0..11 {
        let warm = transactions(100_000, 100 + chunk, next_ts);
        for t in &warm {
            engine.decide(t, t.ts_ms.unwrap());
        }
        next_ts += warm.len() as i64 * STEP_MS;
        engine.evict_idle(next_ts);
    }
    let mut seed = 2;
    let mut g = c.benchmark_group("decide/default_rules");
    g.throughput(Throughput::Elements(1));
    for threads in [1usize, 2] {
        g.bench_function(format!("{threads}_threads"), |b| {
            b.iter_custom(|iters| {
                // Each thread makes its transactions in chunks of 256 just before deciding
                // them, so the input is hot in cache as it is in the service (decoded right
                // before the decision); only the decide() calls are timed. Threads own
                // disjoint cards, as the service shards work by card.
                seed += 1;
                let per = (iters as usize).div_ceil(threads);
                let start_ts = next_ts;
                next_ts += (per * threads + 256 * threads) as i64 * STEP_MS;
                // (busiest thread's busy time, decisions made in all threads)
                let totals = std::sync::Mutex::new((Duration::ZERO, 0usize));
                std::thread::scope(|s| {
                    for th in 0..threads {
                        let (e, totals) = (&engine, &totals);
                        s.spawn(move || {
                            let mut busy = Duration::ZERO;
                            let mut decided = 0;
                            let mut made = 0;
                            let mut chunk_no = 0u64;
                            while made < per * threads {
                                let n = 256 * threads;
                                let ts = start_ts + made as i64 * STEP_MS;
                                let chunk: Vec<Transaction> =
                                    transactions(n, seed * 1_000_003 + chunk_no, ts)
                                        .into_iter()
                                        .filter(|t| card_shard(&t.card, threads) == th)
                                        .collect();
                                chunk_no += 1;
                                made += n;
                                let t0 = Instant::now();
                                for t in &chunk {
                                    black_box(e.decide(t, t.ts_ms.unwrap()));
                                }
                                busy += t0.elapsed();
                                decided += chunk.len();
                            }
                            let mut tot = totals.lock().unwrap();
                            tot.0 = tot.0.max(busy);
                            tot.1 += decided;
                        });
                    }
                });
                // The service sweeps idle keys and old ids in the background; here it runs
                // between samples, untimed.
                engine.evict_idle(next_ts);
                // Wall time per decision: the busiest thread's time over all decisions.
                let (busy, decided) = *totals.lock().unwrap();
                busy.mul_f64(iters as f64 / decided.max(1) as f64)
            })
        });
    }
    g.finish();
}

fn window_bench(c: &mut Criterion) {
    let layout = Layout {
        counts: 2,
        sums: 1,
        distincts: 1,
        max_window: 86_400,
        lateness: 300,
        distinct_windows: vec![600],
    };
    let mut ks = KeyState::new(&layout);
    // A warm key: 40 events over the last day.
    for i in 0..40i64 {
        ks.add(
            &layout,
            i * 2_000,
            &Contribution {
                counts: &[true, i % 5 == 0],
                sums: &[Some(Decimal::new(1234 + i, 2))],
                distincts: &[Some((i % 7) as u64)],
            },
        );
    }
    let mut b_now = 80_000i64;
    c.bench_function("window/add_and_query", |b| {
        b.iter(|| {
            b_now += 1;
            let k = &mut ks;
            k.add(
                &layout,
                b_now,
                &Contribution {
                    counts: &[true, false],
                    sums: &[Some(Decimal::new(999, 2))],
                    distincts: &[Some(3)],
                },
            );
            (
                k.count(&layout, 0, b_now, 3_600),
                k.sum(&layout, 0, b_now, 86_400),
                k.distinct(0, b_now, 600),
            )
        })
    });
}

fn wire_bench(c: &mut Criterion) {
    let txns = transactions(1024, 5, T0);
    let payloads: Vec<Vec<u8>> = txns.iter().map(|t| t.to_json().into_bytes()).collect();
    let mut g = c.benchmark_group("wire");
    g.throughput(Throughput::Elements(1));
    let mut i = 0;
    g.bench_function("decode", |b| {
        b.iter(|| {
            i = (i + 1) % payloads.len();
            Transaction::from_json(black_box(&payloads[i])).unwrap()
        })
    });
    let cfg = EngineConfig::default();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let engine = Engine::new(fraudgate::load_dir(&root.join("rules"), &cfg).unwrap(), cfg);
    let decisions: Vec<_> = txns
        .iter()
        .map(|t| engine.decide(t, t.ts_ms.unwrap()).decision)
        .collect();
    g.bench_function("decision_json", |b| {
        b.iter(|| {
            i = (i + 1) % decisions.len();
            black_box(&decisions[i]).to_json()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = rules_bench, decide_bench, window_bench, wire_bench
}
criterion_main!(benches);
