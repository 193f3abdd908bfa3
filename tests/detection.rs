//! The shipped rules against the load generator's traffic, decided in process (no NATS):
//! the detection quality an analyst sees in `fraudgate demo` and `fraudgate loadgen`.
//!
//! Normal traffic at a real density must mostly pass, and every injected pattern the rules
//! target must be caught in part. The bounds are loose on purpose (they hold for any
//! seed); what they catch is traffic or rules drifting apart, like velocity rules firing
//! on ordinary cards or a pattern no rule can see.

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
    // About six hours of traffic of 100k cards, ending at 10:00 UTC.
    let times = timeline(&gen, 1_795_687_200_000, 250_000);
    let (mut normal, mut normal_flagged) = (0u64, 0u64);
    let mut patterns: HashMap<Pattern, (u64, u64)> = HashMap::new();
    let mut fired: HashMap<String, u64> = HashMap::new();
    for (i, ts) in times.into_iter().enumerate() {
        let l = g.next_at(ts);
        let out = engine.decide(&l.txn, ts + 20);
        let flagged = out.decision.action != Action::Approve;
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
    let spike_fired = rules
        .iter()
        .find(|r| r.0 == "merchant_spike")
        .map_or(0, |r| r.1);
    let (spiked, _) = patterns
        .get(&Pattern::MerchantSpike)
        .copied()
        .unwrap_or_default();
    assert!(spike_fired as f64 >= 0.3 * spiked as f64, "{report}");
    assert!(
        spike_fired <= 2 * spiked,
        "the spike rule fires on normal merchants\n{report}"
    );
}
