//! The shipped rules against the load generator's traffic, decided in process (no NATS):
//! the detection quality an analyst sees in `fraudgate demo` and `fraudgate loadgen`.
//!
//! Normal traffic at a real density must mostly pass, and every injected pattern the rules
//! target must be caught in part. The bounds are loose on purpose (not fitted to this
//! seed's exact figures); what they catch is traffic or rules drifting apart, like
//! velocity rules firing on ordinary cards or a pattern no rule can see.

use std::collections::HashMap;
use std::path::Path;

use fraudgate::loadgen::{timeline, GenConfig, Generator, Pattern};
use fraudgate::{Action, Engine};

#[test]
fn the_shipped_rules_catch_the_injected_patterns_and_pass_normal_traffic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg = fraudgate::EngineConfig::default();
    let engine = Engine::new(fraudgate::load_dir(&root.join("rules"), &cfg).unwrap(), cfg);
    let gen = GenConfig {
        seed: 5,
        fraud_rate: 0.005,
        ..GenConfig::default()
    };
    let mut g = Generator::new(gen.clone());
    // 250k transactions of 100k cards: the hours before 10:00 UTC, through the night.
    let times = timeline(&gen, 1_795_687_200_000, 250_000);
    let (mut normal, mut normal_flagged) = (0u64, 0u64);
    let mut patterns: HashMap<Pattern, (u64, u64)> = HashMap::new();
    let mut fired: HashMap<String, u64> = HashMap::new();
    // Merchants a spike was injected at, and spike-rule hits anywhere else: in the first
    // hour (the merchants' 55 minutes of history still filling after a cold start) and
    // after it.
    let mut spiked_merchants = std::collections::HashSet::new();
    let (mut spike_elsewhere_cold, mut spike_elsewhere) = (0u64, 0u64);
    let mut spike_on_spiked = 0u64;
    let first_ts = times[0];
    for (i, ts) in times.into_iter().enumerate() {
        let l = g.next_at(ts);
        let out = engine.decide(&l.txn, ts + 20);
        let flagged = out.decision.action != Action::Approve;
        let merchant = l.txn.merchant.clone().unwrap_or_default();
        if l.pattern == Some(Pattern::MerchantSpike) {
            spiked_merchants.insert(merchant.clone());
        }
        let spike_rule = out
            .decision
            .rules
            .iter()
            .any(|r| &*r.id == "merchant_spike");
        if spike_rule && l.pattern == Some(Pattern::MerchantSpike) {
            spike_on_spiked += 1;
        }
        if spike_rule && !spiked_merchants.contains(&merchant) {
            if ts - first_ts < 3_600_000 {
                spike_elsewhere_cold += 1;
            } else {
                spike_elsewhere += 1;
            }
        }
        for r in &out.decision.rules {
            *fired.entry(r.id.to_string()).or_default() += 1;
        }
        match l.pattern {
            Some(p) => {
                let e = patterns.entry(p).or_default();
                e.0 += 1;
                e.1 += u64::from(flagged);
            }
            None => {
                normal += 1;
                normal_flagged += u64::from(flagged);
            }
        }
        if i % 50_000 == 0 {
            engine.sweep(ts);
        }
    }
    let mut report = format!(
        "normal: {normal_flagged} of {normal} held or rejected ({:.2} %)\n",
        100.0 * normal_flagged as f64 / normal as f64
    );
    for p in Pattern::ALL {
        let (n, c) = patterns.get(&p).copied().unwrap_or_default();
        report += &format!("{:<18} {c:>5} of {n:>5} caught\n", p.name());
    }
    let mut rules: Vec<_> = fired.into_iter().collect();
    rules.sort();
    report += &format!("rules fired: {rules:?}\n");
    report += &format!(
        "merchant_spike on spiked transactions: {spike_on_spiked}; at merchants without a spike: {spike_elsewhere_cold} in the first hour, {spike_elsewhere} after\n"
    );
    println!("{report}");

    // Ordinary cards mostly pass: the address/phone check alone holds ~2 %.
    assert!((normal_flagged as f64) < 0.04 * normal as f64, "{report}");
    // Each pattern is caught in part: velocity patterns once they show (the 4th tiny
    // amount, the 5th merchant, the second submission), the others by their signals.
    let recall = |p: Pattern| {
        let (n, c) = patterns.get(&p).copied().unwrap_or_default();
        assert!(n > 0, "{p:?} never injected\n{report}");
        c as f64 / n as f64
    };
    for (p, at_least) in [
        (Pattern::CardTesting, 0.3),
        (Pattern::AccountTakeover, 0.5),
        (Pattern::ManyMerchants, 0.2),
        (Pattern::Duplicate, 0.4),
        (Pattern::HighRiskNight, 0.9),
    ] {
        assert!(recall(p) >= at_least, "{p:?}: {}\n{report}", recall(p));
    }
    // A spike only scores (40 of the 50 a hold needs): it is held with another signal.
    assert!(recall(Pattern::MerchantSpike) > 0.0, "{report}");
    // The rule sees a spike once 30 of its 45 transactions are in the 5 minutes: about a
    // third of them (33 % with this seed; none in the engine's first hour, see below).
    let (spiked, _) = patterns
        .get(&Pattern::MerchantSpike)
        .copied()
        .unwrap_or_default();
    assert!(spike_on_spiked as f64 >= 0.25 * spiked as f64, "{report}");
    // Ordinary merchants, with their own daily rhythm, hardly ever look like a spike (none
    // with this seed; 8 when a merchant's category and age were drawn per transaction). In the first hour after a cold start the rule does not fire at
    // all: it needs the engine to have seen the merchant more than an hour ago. Without
    // that condition busy merchants looked like spikes for ~20 minutes (1,837 hits).
    assert_eq!(
        spike_elsewhere_cold, 0,
        "the spike rule fired before the engine had an hour of history\n{report}"
    );
    assert!(
        spike_elsewhere * 10_000 <= normal,
        "the spike rule fired at merchants without a spike\n{report}"
    );
}

/// The load report's "by its rule" column names shipped rules: a rule renamed in `rules/`
/// must be renamed there too, or the column silently reads 0.
#[test]
fn every_patterns_target_rules_are_shipped() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg = fraudgate::EngineConfig::default();
    let rs = fraudgate::load_dir(&root.join("rules"), &cfg).unwrap();
    for p in Pattern::ALL {
        for id in p.target_rules() {
            assert!(
                rs.rules.iter().any(|r| &*r.id == *id),
                "{p:?}: no shipped rule {id}"
            );
        }
    }
}
