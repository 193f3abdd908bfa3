use super::*;
use crate::rules::{compile, SourceFile};
use std::time::Duration;

const RULES: &str = r#"
[ruleset]
version = "test"
hold_at = 50
reject_at = 100

[windows]
card_txn_1m = { agg = "count", by = "card", over = "1m" }
card_amount_1h = { agg = "sum", of = "amount", by = "card", over = "1h" }
card_merchants_1h = { agg = "distinct", of = "merchant", by = "card", over = "1h" }
device_cards_1h = { agg = "distinct", of = "card", by = "device", over = "1h" }
card_tiny_1h = { agg = "count", by = "card", over = "1h", where = "amount < 2" }

[[rule]]
id = "burst"
description = "3 or more in a minute"
when = "card_txn_1m >= 3"
action = "hold"

[[rule]]
id = "spend"
description = "over 1000 in an hour"
when = "card_amount_1h > 1000"
score = 60

[[rule]]
id = "shared_device"
description = "device with 3 cards"
when = "device_cards_1h >= 3"
action = "reject"
"#;

fn rules_from(text: &str, cfg: &EngineConfig) -> RuleSet {
    compile(
        vec![SourceFile {
            name: "t/r.toml".into(),
            text: text.into(),
        }],
        &|_| Err(std::io::Error::other("none")),
        cfg,
    )
    .unwrap_or_else(|e| panic!("{}", e.render()))
}

fn engine_with(cfg: EngineConfig) -> Engine {
    Engine::new(rules_from(RULES, &cfg), cfg)
}

fn engine() -> Engine {
    engine_with(EngineConfig::default())
}

const T0: i64 = 1_795_687_200_000;

fn tx(id: &str, card: &str, amount: i64, ts: i64) -> Transaction {
    let mut t = Transaction::new(id, card, Decimal::new(amount, 0));
    t.ts_ms = Some(ts);
    t.merchant = Some(format!("m-{id}"));
    t
}

fn feature(o: &Outcome, rule: &str, name: &str) -> Option<serde_json::Value> {
    o.decision
        .rules
        .iter()
        .find(|r| &*r.id == rule)
        .and_then(|r| r.values.get(name).cloned())
}

#[test]
fn windows_count_and_decide() {
    let e = engine();
    let a = e.decide(&tx("1", "c1", 400, T0), T0);
    assert_eq!(a.decision.action, crate::Action::Approve);
    e.decide(&tx("2", "c1", 400, T0 + 10_000), T0);
    let c = e.decide(&tx("3", "c1", 400, T0 + 20_000), T0);
    assert_eq!(c.decision.action, crate::Action::Hold);
    assert_eq!(feature(&c, "burst", "card_txn_1m"), Some(3.into()));
    assert_eq!(feature(&c, "spend", "card_amount_1h"), Some("1200".into()));
    assert_eq!(c.decision.score, 60);
    // Each fired rule carries its condition, so the thresholds are in the decision, and
    // the retry table's copy (parsed back for a retry) keeps it.
    let burst = c.decision.rules.iter().find(|r| &*r.id == "burst").unwrap();
    assert_eq!(&*burst.when, "card_txn_1m >= 3");
    let again = e.decide(&tx("3", "c1", 400, T0 + 20_000), T0);
    assert!(again.duplicate);
    assert_eq!(again.decision.rules, c.decision.rules);
    // 60 s after the first: (t-60s, t] excludes it.
    let d = e.decide(&tx("4", "c1", 1, T0 + 60_000), T0);
    assert_eq!(
        d.decision
            .rules
            .iter()
            .find(|r| &*r.id == "burst")
            .map(|r| r.values["card_txn_1m"].clone()),
        Some(3.into())
    );
}

#[test]
fn reserved_slots_are_allocated_up_front() {
    let e = engine_with(EngineConfig {
        reserve_keys: 10_000,
        reserve_ids: 50_000,
        ..Default::default()
    });
    assert!(e.dedupe.capacity() >= 50_000);
    let active = e.active.load();
    assert!(!active.stores.is_empty());
    for s in &active.stores {
        assert!(s.map.capacity() >= 10_000, "{}", s.signature);
    }
    // Without a reservation, tables start empty.
    let plain = engine();
    assert!(plain.dedupe.capacity() < 50_000);
    assert!(plain
        .active
        .load()
        .stores
        .iter()
        .all(|s| s.map.capacity() < 10_000));
}

#[test]
fn retries_return_the_original_and_count_once() {
    let e = engine();
    let first = e.decide(&tx("r1", "c2", 600, T0), T0);
    let again = e.decide(&tx("r1", "c2", 600, T0), T0 + 1_000);
    assert!(again.duplicate);
    assert_eq!(first.decision, again.decision);
    assert_eq!(first.json, again.json);
    // Only one 600 counted.
    let next = e.decide(&tx("r2", "c2", 500, T0 + 1), T0);
    assert_eq!(
        feature(&next, "spend", "card_amount_1h"),
        Some("1100".into())
    );
    // After the horizon the id is new again.
    let cfg = EngineConfig {
        dedupe_horizon: Duration::from_secs(60),
        ..Default::default()
    };
    let e = engine_with(cfg);
    e.decide(&tx("r1", "c3", 1, T0), T0);
    assert!(e.decide(&tx("r1", "c3", 1, T0), T0 + 60_000).duplicate);
    // The horizon runs from the last time the id was seen: a retry keeps it.
    assert!(e.decide(&tx("r1", "c3", 1, T0), T0 + 120_000).duplicate);
    assert!(!e.decide(&tx("r1", "c3", 1, T0), T0 + 180_001).duplicate);
}

/// Another payment under an id the retry table holds is refused, not answered with the
/// original's decision: a switch that reuses ids (a wrapped counter) would otherwise have
/// its large transaction approved as the earlier small one was, unseen by the rules. Nothing is counted, the original stays the answer to its retries,
/// and its horizon is not extended.
#[test]
fn another_transaction_under_a_used_id_is_refused() {
    let cfg = EngineConfig {
        dedupe_horizon: Duration::from_secs(60),
        ..Default::default()
    };
    let e = engine_with(cfg);
    let mut first = tx("u1", "c5", 10, T0);
    first.device = Some("d1".into());
    first.mcc = Some(5411);
    first.attrs = vec![("channel".into(), AttrValue::Str("ecom".into()))];
    let original = e.decide(&first, T0);
    assert!(!original.duplicate && !original.id_reused);
    type Change = fn(&mut Transaction);
    let changes: [(&str, Change); 9] = [
        ("amount", |t| t.amount = Decimal::new(5_000, 0)),
        ("card", |t| t.card = "c6".into()),
        ("merchant", |t| t.merchant = Some("m-other".into())),
        ("no merchant", |t| t.merchant = None),
        ("device", |t| t.device = Some("d2".into())),
        ("region", |t| t.region = Some("DE".into())),
        ("mcc", |t| t.mcc = Some(7995)),
        ("currency", |t| t.currency = Some("USD".into())),
        ("no mcc", |t| t.mcc = None),
    ];
    for (what, change) in &changes {
        let mut other = first.clone();
        change(&mut other);
        let out = e.decide(&other, T0 + 1_000);
        assert!(out.id_reused && !out.duplicate, "{what}");
    }
    // Nothing of them was counted: one transaction of 10 on c5 (the card change's c6
    // none at all).
    let next = e.decide(&tx("u2", "c5", 995, T0 + 2_000), T0 + 2_000);
    assert_eq!(
        feature(&next, "spend", "card_amount_1h"),
        Some("1005".into())
    );
    let c6 = e.decide(&tx("u3", "c6", 1_001, T0 + 2_000), T0 + 2_000);
    assert_eq!(feature(&c6, "spend", "card_amount_1h"), Some("1001".into()));
    // The same payment sent again is a retry: the amount with other decimals, the default
    // currency spelt out, another `ts` (a switch may stamp its send time), other attrs (an
    // attempt counter).
    let mut same = first.clone();
    same.amount = Decimal::new(1_000, 2);
    same.currency = Some(e.config().default_currency.clone());
    same.ts_ms = Some(T0 + 30_000);
    same.attrs = vec![("attempt".into(), AttrValue::Num(Decimal::TWO))];
    let retry = e.decide(&same, T0 + 30_000);
    assert!(retry.duplicate && !retry.id_reused);
    assert_eq!(retry.json, original.json);
    same.ts_ms = None;
    assert!(e.decide(&same, T0 + 30_000).duplicate);
    // A refusal does not extend the horizon; the retry above did, to T0 + 90 s.
    let mut other = first.clone();
    other.amount = Decimal::new(11, 0);
    assert!(e.decide(&other, T0 + 80_000).id_reused);
    let after = e.decide(&other, T0 + 90_001);
    assert!(
        !after.duplicate && !after.id_reused,
        "a new id after the horizon"
    );
    // The fingerprint fills the padding of a table slot (a 16-byte aligned id hash).
    assert_eq!(std::mem::size_of::<(KeyHash, DedupeEntry)>(), 48);
}

/// A retried id stays in the retry table for a horizon from its last retry, also through
/// the sweep: a request replay after a restart (from the cut minus the horizon) finds it
/// and does not count the retry again, however old the original is.
#[test]
fn a_retry_keeps_its_id_for_another_horizon() {
    let cfg = EngineConfig {
        dedupe_horizon: Duration::from_secs(120),
        ..Default::default()
    };
    let e = engine_with(cfg);
    let first = e.decide(&tx("k1", "c4", 600, T0), T0);
    assert!(e.decide(&tx("k1", "c4", 600, T0), T0 + 50_000).duplicate);
    // 125 s after the original, 75 s after the retry: the original alone would be gone.
    e.evict_idle(T0 + 125_000);
    let replayed = e.decide(&tx("k1", "c4", 600, T0), T0 + 140_000);
    assert!(replayed.duplicate);
    assert_eq!(replayed.decision, first.decision);
    let next = e.decide(&tx("k2", "c4", 1, T0 + 1), T0 + 140_000);
    assert_eq!(
        feature(&next, "spend", "card_amount_1h"),
        None,
        "601 in the hour: the retries added nothing ({:?})",
        next.decision.rules
    );
    let next = e.decide(&tx("k3", "c4", 400, T0 + 2), T0 + 140_000);
    assert_eq!(
        feature(&next, "spend", "card_amount_1h"),
        Some("1001".into())
    );
}

#[test]
fn missing_key_field_leaves_window_unknown() {
    let e = engine();
    for (i, card) in ["a", "b", "c"].iter().enumerate() {
        let mut t = tx(&format!("d{i}"), card, 1, T0);
        t.device = Some("dev".into());
        let o = e.decide(&t, T0);
        if i == 2 {
            assert_eq!(o.decision.action, crate::Action::Reject);
            assert_eq!(
                feature(&o, "shared_device", "device_cards_1h"),
                Some(3.into())
            );
        }
    }
    // No device: the device window is unknown, the rule cannot fire.
    let o = e.decide(&tx("nodev", "d", 1, T0), T0);
    assert!(o.decision.rules.iter().all(|r| &*r.id != "shared_device"));
}

#[test]
fn no_ts_uses_receive_time() {
    let e = engine();
    let mut t = tx("now", "c9", 1, 0);
    t.ts_ms = None;
    let o = e.decide(&t, T0 + 5);
    assert_eq!(o.decision.ts, T0 + 5);
}

#[test]
fn too_late_events_are_decided_but_add_nothing() {
    let e = engine();
    e.decide(&tx("n", "c4", 700, T0 + 7_200_000), T0 + 7_200_000);
    let late = e.decide(&tx("old", "c4", 700, T0), T0 + 7_200_000);
    assert!(late.too_late);
    let next = e.decide(&tx("n2", "c4", 400, T0 + 7_200_001), T0 + 7_200_001);
    assert_eq!(
        feature(&next, "spend", "card_amount_1h"),
        Some("1100".into())
    );
}

#[test]
fn entity_keys_are_not_stored_in_clear() {
    let e = engine();
    e.decide(&tx("k", "4111111111111111", 1, T0), T0);
    let key = e
        .with_group("card", |g| *g.map.iter().next().unwrap().key())
        .unwrap();
    assert_eq!(key, e.config().hash_key.hash_str("4111111111111111").into());
    assert_ne!(
        key,
        crate::keyhash::HashKey::from_secret("other")
            .hash_str("4111111111111111")
            .into()
    );
    let json = e
        .decide(&tx("k", "4111111111111111", 1, T0), T0)
        .decision
        .to_json();
    assert!(!json.contains("4111111111111111"), "{json}");
    assert!(json.contains("411111******1111"));
}

#[test]
fn idle_keys_and_old_ids_are_evicted() {
    let e = engine();
    for i in 0..100 {
        e.decide(&tx(&format!("e{i}"), &format!("card{i}"), 1, T0), T0);
    }
    let keys = |e: &Engine| e.stats().groups.iter().map(|g| g.1).sum::<usize>();
    assert_eq!(keys(&e), 100);
    // Within the longest window (1h) plus the lateness allowance (5m) nothing goes.
    assert_eq!(e.evict_idle(T0 + 120_000), Evicted { keys: 0, dedupe: 0 });
    // Past the dedupe horizon (2m) the ids go.
    assert_eq!(
        e.evict_idle(T0 + 3_600_000),
        Evicted {
            keys: 0,
            dedupe: 100
        }
    );
    let ev = e.evict_idle(T0 + 3_900_001);
    assert_eq!(ev.keys, 100);
    assert_eq!(keys(&e), 0);
}

#[test]
fn a_sweep_reports_the_stats_of_what_it_kept() {
    let e = engine();
    for i in 0..200 {
        e.decide(
            &tx(&format!("s{i}"), &format!("card{}", i % 50), 1, T0 + i),
            T0 + i,
        );
    }
    for i in 0..30 {
        let late = T0 + 3_850_000 + i;
        e.decide(&tx(&format!("t{i}"), &format!("late{i}"), 1, late), late);
    }
    // The first 50 cards are idle by then; the 30 later ones and their ids stay.
    let (ev, swept) = e.sweep(T0 + 3_900_001);
    assert!(ev.keys >= 50, "{ev:?}");
    assert_eq!(ev.dedupe, 200);
    let again = e.stats();
    assert_eq!(swept.groups, again.groups);
    assert_eq!(swept.dedupe_entries, 30);
    assert!(
        swept.groups.iter().any(|g| g.1 == 30 && g.2 > 0),
        "{:?}",
        swept.groups
    );
}

#[test]
fn a_sweep_in_steps_visits_each_shard_once() {
    let e = engine();
    for i in 0..300 {
        e.decide(&tx(&format!("p{i}"), &format!("card{i}"), 1, T0), T0);
    }
    let keys = |e: &Engine| e.stats().groups.iter().map(|g| g.1).sum::<usize>();
    let idle = T0 + 3_900_001;
    let mut total = Evicted::default();
    let steps = e.sweep_steps();
    assert_eq!(steps, (e.rules().groups.len() + 1) * 64 * SWEEP_PARTS);
    for step in 0..steps {
        let before = keys(&e);
        let st = e.sweep_step(idle, step);
        // A step evicts from its own shard only: what it reports is what went.
        assert_eq!(before - keys(&e), st.evicted.keys);
        assert!(st.evicted.keys < 300, "step {step} swept everything");
        total.keys += st.evicted.keys;
        total.dedupe += st.evicted.dedupe;
        if step == 64 * SWEEP_PARTS / 2 {
            // Half of the first table's steps leave part of its keys.
            assert!(keys(&e) > 0 && keys(&e) < 300);
        }
    }
    assert_eq!(
        total,
        Evicted {
            keys: 300,
            dedupe: 300
        }
    );
    assert_eq!(keys(&e), 0);
    // Steps past the tables (as after a swap to fewer groups) do nothing.
    let past = e.sweep_step(idle, steps + 3);
    assert_eq!(past.evicted, Evicted::default());
    // A pass again finds nothing.
    assert_eq!(e.sweep(idle).0, Evicted::default());
}

#[test]
fn a_sweep_step_on_the_runtime_never_waits_for_a_snapshot() {
    let e = engine();
    e.decide(&tx("a", "card1", 1, T0), T0);
    let idle = T0 + 3_900_001;
    let held = e.snapshotting.lock().unwrap();
    // A snapshot's copy (or a swap, a restore, a cap eviction) is running: no step.
    assert!((0..e.sweep_steps()).all(|s| e.try_sweep_step(idle, s).is_none()));
    drop(held);
    let pass = (0..e.sweep_steps())
        .map(|s| e.try_sweep_step(idle, s).expect("not busy"))
        .fold(SweepStep::default(), |mut p, s| {
            p.absorb(s);
            p
        });
    assert_eq!(pass.evicted.dedupe, 1);
    assert!(pass.evicted.keys >= 1);
}

#[test]
fn concurrent_decisions_count_exactly() {
    let e = Arc::new(engine());
    let threads = 4;
    let per = 500;
    std::thread::scope(|s| {
        for th in 0..threads {
            let e = e.clone();
            s.spawn(move || {
                for i in 0..per {
                    // All threads hit the same card and some shared ids (retries).
                    let id = if i % 10 == 0 {
                        format!("shared{i}")
                    } else {
                        format!("t{th}-{i}")
                    };
                    e.decide(&tx(&id, "hot", 1, T0 + i as i64), T0);
                }
            });
        }
    });
    let unique = threads * per - (threads - 1) * (per / 10);
    let o = e.decide(&tx("final", "hot", 2000, T0 + per as i64), T0);
    let want = Decimal::from(unique as i64 + 2000).to_string();
    assert_eq!(feature(&o, "spend", "card_amount_1h"), Some(want.into()));
}

#[test]
fn local_time_helpers_use_the_zone() {
    let text = r#"
[ruleset]
version = "tz"
hold_at = 50
reject_at = 100
[[rule]]
id = "night"
description = "night"
when = "local_hour < 6 and local_weekday == 5"
action = "hold"
"#;
    let cfg = EngineConfig {
        timezone: chrono_tz::Europe::Berlin,
        ..Default::default()
    };
    let rs = compile(
        vec![SourceFile {
            name: "t/r.toml".into(),
            text: text.into(),
        }],
        &|_| Err(std::io::Error::other("none")),
        &cfg,
    )
    .unwrap();
    let e = Engine::new(rs, cfg);
    // 2026-11-26 (Thursday) 23:30 UTC is Friday 00:30 in Berlin.
    let ts = chrono::DateTime::parse_from_rfc3339("2026-11-26T23:30:00Z")
        .unwrap()
        .timestamp_millis();
    let o = e.decide(&tx("tz", "c", 1, ts), ts);
    assert_eq!(o.decision.action, crate::Action::Hold);
    assert_eq!(o.decision.rules[0].values["local_hour"], 0);
}

#[test]
fn swap_keeps_state_adds_and_drops_windows() {
    let e = engine();
    for i in 0..3 {
        let mut t = tx(&format!("s{i}"), "c-swap", 300, T0 + i * 1000);
        t.device = Some("dev-swap".into());
        e.decide(&t, T0);
    }
    let v1 = e.rules().version.clone();
    // New set: the card count and sum stay; the card distinct and the device window go;
    // a filtered card sum and a merchant window are new.
    let v2_text = r#"
[ruleset]
version = "test-2"
hold_at = 50
reject_at = 100
[windows]
card_txn_1m = { agg = "count", by = "card", over = "1m" }
card_amount_1h = { agg = "sum", of = "amount", by = "card", over = "1h" }
card_big_1h = { agg = "sum", of = "amount", by = "card", over = "1h", where = "amount > 100" }
merchant_txn_1h = { agg = "count", by = "merchant", over = "1h" }
[[rule]]
id = "show"
description = "report the windows"
when = "card_txn_1m >= 0 and card_amount_1h >= 0 and card_big_1h >= 0 and merchant_txn_1h >= 0"
score = 1
"#;
    let report = e.swap_rules(rules_from(v2_text, e.config()));
    assert_eq!(
        (report.kept, report.migrated, report.added, report.dropped),
        (0, 1, 1, 1),
        "{report:?}"
    );
    assert_eq!(report.migrated_keys, 1);
    assert!(report.version.starts_with("test-2+"));
    assert_ne!(e.rules().version, v1);
    let o = e.decide(&tx("s3", "c-swap", 200, T0 + 3000), T0);
    assert!(o.decision.rules_version.starts_with("test-2+"));
    let v = &o.decision.rules[0].values;
    // Kept slots carry their history; the new slot starts empty.
    assert_eq!(v["card_txn_1m"], 4);
    assert_eq!(v["card_amount_1h"], "1100");
    assert_eq!(v["card_big_1h"], "200");
    assert_eq!(v["merchant_txn_1h"], 1);
    // Swapping to identical slots keeps the maps without rewriting.
    let report = e.swap_rules(rules_from(v2_text, e.config()));
    assert_eq!(
        (report.kept, report.migrated, report.migrated_keys),
        (2, 0, 0)
    );
    let o = e.decide(&tx("s4", "c-swap", 1, T0 + 4000), T0);
    assert_eq!(o.decision.rules[0].values["card_txn_1m"], 5);
}

/// A reload that drops a key group for a moment (here the device group: a rule file that
/// was caught half copied) and the next one that brings it back: the group's history is
/// back too, instead of starting empty (for up to its window, 24 h with the shipped rules).
/// A group dropped for two reloads in a row is gone.
#[test]
fn a_group_dropped_for_one_reload_comes_back_with_its_history() {
    let e = engine();
    for i in 0..3 {
        let mut t = tx(&format!("r{i}"), &format!("c-back-{i}"), 10, T0 + i * 1000);
        t.device = Some("dev-back".into());
        e.decide(&t, T0);
    }
    let without_device = RULES.replace(
        "device_cards_1h = { agg = \"distinct\", of = \"card\", by = \"device\", over = \"1h\" }\n",
        "",
    );
    let without_device = without_device.replace("device_cards_1h >= 3", "card_txn_1m >= 99");
    assert_ne!(without_device, RULES);
    let report = e.swap_rules(rules_from(&without_device, e.config()));
    assert_eq!((report.dropped, report.revived), (1, 0), "{report:?}");
    let report = e.swap_rules(rules_from(RULES, e.config()));
    assert_eq!(
        (report.added, report.revived, report.kept),
        (0, 1, 2),
        "{report:?}"
    );
    // The device has seen three cards: a fourth makes the rule fire.
    let mut t = tx("r3", "c-back-3", 10, T0 + 3000);
    t.device = Some("dev-back".into());
    let o = e.decide(&t, T0);
    assert_eq!(o.decision.action, crate::Action::Reject, "{:?}", o.decision);
    // Dropped, then freed by the service before any reload brings it back: empty.
    e.swap_rules(rules_from(&without_device, e.config()));
    assert_eq!(e.free_retired(), 1);
    assert_eq!(e.free_retired(), 0);
    let report = e.swap_rules(rules_from(RULES, e.config()));
    assert_eq!((report.added, report.revived), (1, 0), "{report:?}");
    // Dropped for two reloads in a row: freed, and it starts empty when it returns.
    e.swap_rules(rules_from(&without_device, e.config()));
    e.swap_rules(rules_from(&without_device.replace("99", "98"), e.config()));
    let report = e.swap_rules(rules_from(RULES, e.config()));
    assert_eq!((report.added, report.revived), (1, 0), "{report:?}");
    let mut t = tx("r4", "c-back-4", 10, T0 + 4000);
    t.device = Some("dev-back".into());
    assert_ne!(e.decide(&t, T0).decision.action, crate::Action::Reject);
}

/// A card number sent in another field (a device, a recipient card attribute, an mcc, the
/// id) is masked in the values a fired rule reports, grouped or not; a description holding
/// one is masked in the decision.
#[test]
fn card_numbers_in_other_fields_are_masked_in_rule_values() {
    let text = r#"
[ruleset]
version = "test"
hold_at = 50
reject_at = 100
[attrs]
recipient = "string"
ref = "number"
[[rule]]
id = "show"
description = "shows them; card 4000 0000 0000 0002"
when = "present(device) and present(attrs.recipient) and present(attrs.ref) and present(mcc) and id != 'x' and merchant != 'x'"
score = 1
"#;
    let cfg = EngineConfig::default();
    let e = Engine::new(rules_from(text, &cfg), cfg);
    let json =
        br#"{"id":"t-1","card":"4111111111111111","amount":"1","device":"4111 1111 1111 1111",
        "merchant":"m 5500-0000-0000-0004","mcc":4000000000000002,
        "attrs":{"recipient":"4000000000000002","ref":5500000000000004}}"#;
    let t = Transaction::from_json(json).unwrap();
    let o = e.decide(&t, T0);
    let out = String::from_utf8(o.json.to_vec()).unwrap();
    for clear in [
        "4111 1111 1111 1111",
        "5500-0000-0000-0004",
        "4000000000000002",
        "5500000000000004",
        "4000 0000 0000 0002",
    ] {
        assert!(!out.contains(clear), "{clear} in {out}");
    }
    let v = &o.decision.rules[0].values;
    assert_eq!(v["device"], "4111 11** **** 1111");
    assert_eq!(v["merchant"], "m 5500-00**-****-0004");
    assert_eq!(v["attrs.recipient"], "400000******0002");
    assert_eq!(v["attrs.ref"], "550000******0004");
    assert_eq!(v["mcc"], "400000******0002");
    assert_eq!(v["id"], "t-1");
    // The transaction's own card padded to 20 digits (no card number by shape) is masked
    // too; other long numbers that are no card numbers stay readable.
    let json =
        br#"{"id":"t-2","card":"4111111111111111","amount":"1","device":"00004111111111111111",
        "merchant":"000000123456789","mcc":5411,
        "attrs":{"recipient":"4111.1111.1111.1111","ref":0.8734567890123456}}"#;
    let o = e.decide(&Transaction::from_json(json).unwrap(), T0);
    let v = &o.decision.rules[0].values;
    assert_eq!(v["device"], "000041**********1111");
    // Grouped by dots (no separator the text masker joins groups by).
    assert_eq!(v["attrs.recipient"], "4111.11**.****.1111");
    assert_eq!(v["merchant"], "000000123456789");
    assert_eq!(v["attrs.ref"], "0.8734567890123456");
    assert_eq!(v["mcc"], 5411);
}

/// A card number written in groups in a list file or an inline list matches the card as
/// the engine reads it (its digits), and a card sent in groups is the same card.
#[test]
fn grouped_card_numbers_in_lists_match() {
    let text = r#"
[ruleset]
version = "test"
hold_at = 50
reject_at = 100
[lists]
blocked = { file = "blocked.txt" }
vip = ["4000 0000 0000 0002"]
[[rule]]
id = "blocked"
description = "blocked"
when = "card in blocked"
action = "block"
[[rule]]
id = "vip"
description = "vip"
when = "card in vip"
action = "allow"
[[rule]]
id = "named"
description = "one card named in the rule"
when = "card == '5500 0000 0000 0004' or ' 5105-1051-0510-5100 ' == card"
action = "reject"
[[rule]]
id = "not_named"
description = "every card but one named in the rule"
when = "card != '5500-0000-0000-0004' and amount == 7"
action = "hold"
"#;
    let cfg = EngineConfig::default();
    let rs = compile(
        vec![SourceFile {
            name: "t/r.toml".into(),
            text: text.into(),
        }],
        &|_| Ok("4111-1111-1111-1111\n".to_string()),
        &cfg,
    )
    .unwrap_or_else(|e| panic!("{}", e.render()));
    // One entry each, however it matches.
    assert_eq!((rs.lists["blocked"], rs.lists["vip"]), (1, 1));
    let e = Engine::new(rs, cfg);
    for (i, (card, by)) in [
        ("4111111111111111", "block:blocked"),
        ("4111 1111 1111 1111", "block:blocked"),
        ("4000000000000002", "allow:vip"),
        ("4000-0000-0000-0002", "allow:vip"),
        ("5500000000000004", "reject:named"),
        ("5500 0000 0000 0004", "reject:named"),
        ("5105105105105100", "reject:named"),
    ]
    .into_iter()
    .enumerate()
    {
        let json = format!(r#"{{"id":"g-{i}","card":"{card}","amount":"5"}}"#);
        let o = e.decide(&Transaction::from_json(json.as_bytes()).unwrap(), T0);
        assert_eq!(o.decision.decided_by, by, "{card}");
    }
    // `!=` reads the literal the same way: the card it names does not fire `not_named`.
    for (i, (card, fires)) in [
        ("5500 0000 0000 0004", false),
        ("5500000000000004", false),
        ("4000000000000077", true),
    ]
    .into_iter()
    .enumerate()
    {
        let json = format!(r#"{{"id":"n-{i}","card":"{card}","amount":"7"}}"#);
        let o = e.decide(&Transaction::from_json(json.as_bytes()).unwrap(), T0);
        let fired = o.decision.rules.iter().any(|r| &*r.id == "not_named");
        assert_eq!(fired, fires, "{card}");
    }
}

#[test]
fn swap_during_concurrent_decisions_loses_nothing() {
    let e = Arc::new(engine());
    let cfg = e.config().clone();
    let alt = RULES
        .replace("version = \"test\"", "version = \"alt\"")
        .replace(
        "card_tiny_1h = { agg = \"count\", by = \"card\", over = \"1h\", where = \"amount < 2\" }",
        "card_tiny_1h = { agg = \"count\", by = \"card\", over = \"1h\", where = \"amount < 3\" }",
    );
    assert_ne!(alt, RULES);
    std::thread::scope(|s| {
        for th in 0..2 {
            let e = e.clone();
            s.spawn(move || {
                for i in 0..2_000i64 {
                    e.decide(&tx(&format!("c{th}-{i}"), "shared", 1, T0 + i), T0);
                }
            });
        }
        let e2 = e.clone();
        s.spawn(move || {
            for k in 0..20 {
                let text = if k % 2 == 0 { &alt } else { RULES };
                e2.swap_rules(rules_from(text, &cfg));
            }
        });
    });
    let o = e.decide(&tx("last", "shared", 1, T0 + 2_000), T0);
    let sum = o.decision.rules.iter().find(|r| &*r.id == "spend");
    // 4,001 transactions of 1 each: the 1h sum never lost or doubled one.
    assert!(sum.is_some() && sum.unwrap().values["card_amount_1h"] == "4001");
}

#[test]
fn event_times_far_in_the_future_are_clamped() {
    let e = engine();
    // A transaction claiming 2099 must not push the card's windows into the future.
    let o = e.decide(&tx("f0", "c-fut", 900, 4_070_908_800_000), T0);
    assert!(o.ts_clamped);
    assert_eq!(o.decision.ts, T0);
    let o = e.decide(&tx("f1", "c-fut", 200, T0 + 1_000), T0 + 1_000);
    assert!(!o.ts_clamped && !o.too_late);
    assert_eq!(feature(&o, "spend", "card_amount_1h"), Some("1100".into()));
    // Within the allowed skew the event time is kept.
    let o = e.decide(&tx("f2", "c-fut2", 1, T0 + 30_000), T0);
    assert!(!o.ts_clamped);
    assert_eq!(o.decision.ts, T0 + 30_000);
}

#[test]
fn snapshot_restores_windows_and_retries() {
    let dir = std::env::temp_dir().join(format!("fg-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state.snap");
    // A control engine sees everything; the other restarts from a snapshot half way.
    let control = engine();
    let first = engine();
    let mk = |i: i64| {
        let mut t = tx(
            &format!("sn{i}"),
            &format!("card{}", i % 7),
            100 + i,
            T0 + i * 1_000,
        );
        t.device = Some(format!("dev{}", i % 3));
        t
    };
    for i in 0..40 {
        control.decide(&mk(i), T0 + i * 1_000);
        first.decide(&mk(i), T0 + i * 1_000);
    }
    let cursor = Cursor {
        txn_next_seq: Some(40),
        check_from_ms: Some(T0),
        txn_stream_created_ns: Some(1_795_000_000_000_000_000),
    };
    let snap = first.snapshot(T0 + 40_000, || cursor);
    // The pieces encoded under the locks make exactly the encoding of the whole snapshot.
    let mut body = Vec::new();
    snap.encode_body(&mut body).unwrap();
    let whole = snap.decode().unwrap();
    assert_eq!(whole.groups.iter().map(|g| g.keys.len()).sum::<usize>(), 10);
    assert_eq!(
        bincode::serde::encode_to_vec(&whole, bincode::config::standard()).unwrap(),
        body
    );
    crate::snapshot::write(&path, &snap).unwrap();
    drop(first);
    let restarted = engine();
    let back = crate::snapshot::read(&path).unwrap();
    assert_eq!(back.cursor, cursor);
    let r = restarted.restore(back).unwrap();
    assert_eq!(r.ids, 40);
    assert!(r.keys >= 10, "{r:?}");
    // A retry of an id seen before the restart is still answered from the table.
    assert!(restarted.decide(&mk(39), T0 + 40_000).duplicate);
    for i in 40..60 {
        let a = control.decide(&mk(i), T0 + i * 1_000);
        let b = restarted.decide(&mk(i), T0 + i * 1_000);
        assert_eq!(a.decision.rules, b.decision.rules, "transaction {i}");
        assert_eq!(a.decision.action, b.decision.action);
    }
    // Another hash key cannot use it; garbage is not a snapshot.
    let other = engine_with(EngineConfig {
        hash_key: crate::keyhash::HashKey::from_secret("other"),
        ..Default::default()
    });
    let snap = crate::snapshot::read(&path).unwrap();
    assert_eq!(
        other.restore(snap).unwrap_err(),
        crate::engine::SnapshotError::Key
    );
    std::fs::write(&path, b"not a snapshot").unwrap();
    assert!(matches!(
        crate::snapshot::read(&path),
        Err(crate::snapshot::SnapshotFileError::NotASnapshot { .. })
    ));
    let mut truncated = Vec::from(&b"FGSNAP\0\0"[..]);
    truncated.extend(crate::snapshot::FILE_FORMAT.to_le_bytes());
    truncated.extend([1, 2, 3]);
    std::fs::write(&path, truncated).unwrap();
    assert!(matches!(
        crate::snapshot::read(&path),
        Err(crate::snapshot::SnapshotFileError::Corrupt { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn key_cap_evicts_least_recently_used_and_counts() {
    let cap = 640;
    let e = engine_with(EngineConfig {
        max_keys: Some(cap),
        ..Default::default()
    });
    let n = 5_000;
    for i in 0..n {
        let ts = T0 + i * 1_000;
        e.decide(&tx(&format!("c{i}"), &format!("card{i}"), 1, ts), ts);
        // Card 7 is used all along: it must never be the one evicted.
        e.decide(&tx(&format!("h{i}"), "card7", 1, ts), ts);
    }
    let stats = e.stats();
    let (_, keys, _) = stats.groups.iter().find(|g| g.0 == "card").unwrap();
    let every = (cap / 64).clamp(1, 256);
    assert!(
        *keys <= cap + every,
        "{keys} keys tracked with a cap of {cap}"
    );
    assert!(*keys >= cap - cap / 16 - 1, "evicted too much: {keys}");
    let capped = stats.capped.iter().find(|g| g.0 == "card").unwrap().1;
    // Every card key ever made (n + card7 itself counted once) is tracked or evicted.
    assert_eq!(capped as usize + keys, n as usize, "{stats:?}");
    let has = |card: &str| {
        let k = StateKey::from(e.config().hash_key.hash_str(card));
        e.with_group("card", |g| g.map.contains_key(&k)).unwrap()
    };
    assert!(has("card7"), "the hot card was evicted");
    assert!(
        has(&format!("card{}", n - 1)),
        "the newest card was evicted"
    );
    assert!(!has("card0") && !has("card100"), "old cards kept");
    // The hot card kept its history: its 1h window holds buckets 1401..=5000.
    let ts = T0 + n * 1_000;
    let o = e.decide(&tx("last", "card7", 2_000, ts), ts);
    assert_eq!(
        feature(&o, "spend", "card_amount_1h"),
        Some(Decimal::from(3_599 + 2_000).to_string().into())
    );
}

#[test]
fn cap_eviction_after_a_migrating_swap_reads_the_new_layout() {
    // A decision that found its group over the cap evicts after it has let go of the
    // barrier: a swap that changed the group's row layout may come in between. The
    // eviction must read the keys with the layout they have now (with the old one, a
    // key's newest bucket is read from the wrong word, and the wrong keys go).
    let cap = 64 * 256; // the cap is checked every 256 inserts
    let cfg = EngineConfig {
        max_keys: Some(cap),
        ..Default::default()
    };
    let e = engine_with(cfg.clone());
    // Not a multiple of 256 past the cap: no check has evicted anything yet.
    let n = cap as i64 + 200;
    for i in 0..n {
        // Two events in different buckets: keys with more than one row.
        let ts = T0 + i * 1_000;
        e.decide(&tx(&format!("a{i}"), &format!("card{i}"), 1, ts), ts);
        let later = ts + 1_000;
        e.decide(&tx(&format!("b{i}"), &format!("card{i}"), 1, later), later);
    }
    let card_keys = || e.with_group("card", |g| g.map.len()).unwrap();
    assert_eq!(card_keys(), n as usize);
    let before = e.active.load_full();
    let stale = before
        .stores
        .iter()
        .find(|s| s.signature == "card")
        .unwrap();
    // One more count slot on the card group (a filter of its own): its rows get wider.
    let wider = format!(
        "{RULES}\n[windows.card_txn_2h]\nagg = \"count\"\nby = \"card\"\nover = \"2h\"\nwhere = \"amount > 5\"\n\n\
         [[rule]]\nid = \"busy\"\ndescription = \"busy\"\nwhen = \"card_txn_2h >= 50\"\nscore = 1\n"
    );
    let report = e.swap_rules(rules_from(&wider, &cfg));
    assert_eq!(report.migrated, 1, "{report:?}");
    e.enforce_cap(stale);
    let target = cap - cap / 16;
    assert_eq!(card_keys(), target);
    let has = |card: &str| {
        let k = StateKey::from(e.config().hash_key.hash_str(card));
        e.with_group("card", |g| g.map.contains_key(&k)).unwrap()
    };
    let evicted = n as usize - target;
    assert!(
        (0..evicted).all(|i| !has(&format!("card{i}"))),
        "a recent key was kept over an old one"
    );
    assert!((evicted..n as usize).all(|i| has(&format!("card{i}"))));
}

#[test]
fn a_snapshot_that_panics_leaves_no_capture_behind() {
    let e = engine();
    e.decide(&tx("s1", "card1", 5, T0), T0);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        e.snapshot(T0, || panic!("the cursor could not be read"))
    }));
    assert!(r.is_err());
    assert!(
        e.capture.load().is_none(),
        "decisions would copy into it forever"
    );
    // Decisions and the next snapshot go on.
    e.decide(&tx("s2", "card1", 5, T0 + 1), T0 + 1);
    e.snapshot(T0 + 2, Cursor::default);
    assert!(e.capture.load().is_none());
}

#[test]
fn snapshot_is_a_point_in_time_cut_under_concurrent_decisions() {
    // Two threads decide 4,000 transactions over a few cards and devices while snapshots
    // are taken. Restoring any one of them and re-deciding every transaction from the
    // cursor on (ids already in its retry table are skipped as retries) must give exactly
    // the windows of an engine that decided everything once.
    let txns: Vec<Transaction> = (0..4_000)
        .map(|i| {
            let mut t = tx(
                &format!("p{i}"),
                &format!("card{}", i % 7),
                1 + i % 5,
                T0 + i,
            );
            t.device = Some(format!("dev{}", i % 3));
            t
        })
        .collect();
    let control = engine();
    for t in &txns {
        control.decide(t, t.ts_ms.unwrap());
    }
    let want = control.window_values(T0 + 5_000);
    let live = Arc::new(engine());
    // Transactions below `done` have all been decided: the cursor taken at the cut.
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut snaps = Vec::new();
    std::thread::scope(|s| {
        for _ in 0..2 {
            let (live, done, next, txns) = (live.clone(), done.clone(), next.clone(), &txns);
            let taken = taken.clone();
            s.spawn(move || loop {
                // Like JetStream intake: a shared sequence, decided in parallel; `done`
                // is the low watermark (all below it decided).
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(t) = txns.get(i as usize) else { break };
                // However the threads are scheduled, some cuts fall mid-run.
                while i >= 3_000 && taken.load(Ordering::SeqCst) < 3 {
                    std::thread::yield_now();
                }
                live.decide(t, t.ts_ms.unwrap());
                while done
                    .compare_exchange(i, i + 1, Ordering::SeqCst, Ordering::SeqCst)
                    .is_err()
                {
                    std::hint::spin_loop();
                }
            });
        }
        while done.load(Ordering::SeqCst) < 500 {
            std::thread::yield_now();
        }
        while snaps.len() < 20 && done.load(Ordering::SeqCst) < 4_000 {
            let d = done.clone();
            snaps.push(live.snapshot(T0, || Cursor {
                txn_next_seq: Some(d.load(Ordering::SeqCst)),
                check_from_ms: None,
                txn_stream_created_ns: None,
            }));
            taken.fetch_add(1, Ordering::SeqCst);
        }
    });
    assert_eq!(live.window_values(T0 + 5_000), want);
    assert!(snaps.len() >= 2, "too few snapshots taken during the run");
    let mut inside = 0;
    for snap in snaps {
        let from = snap.header.cursor.txn_next_seq.unwrap() as usize;
        inside += usize::from(from > 0 && from < txns.len());
        let rebuilt = engine();
        rebuilt.restore(snap.decode().unwrap()).unwrap();
        for t in &txns[from..] {
            rebuilt.decide(t, t.ts_ms.unwrap());
        }
        assert_eq!(rebuilt.window_values(T0 + 5_000), want, "cut at {from}");
    }
    assert!(inside > 0, "no snapshot was cut in the middle of the run");
}

#[test]
fn spread_visits_every_item_once() {
    for n in [0usize, 1, 2, 63, 64, 65, 1000, 4096, 10_007] {
        let v: Vec<usize> = (0..n).collect();
        let mut seen: Vec<usize> = super::spread(&v).collect();
        assert_eq!(seen.len(), n);
        seen.sort_unstable();
        assert_eq!(seen, v, "n = {n}");
    }
}

#[test]
fn attributes_resolve_by_name_and_type() {
    let cfg = EngineConfig::default();
    let rs = rules_from(
        r#"
[ruleset]
version = "attrs"
hold_at = 50
reject_at = 100
[attrs]
b_num = "number"
d_flag = "bool"
f_text = "string"
h_text = "string"
[[rule]]
id = "uses_all"
description = "reads every attribute"
when = "attrs.b_num > 1 or attrs.d_flag or attrs.f_text == 'x' or attrs.h_text == 'y'"
action = "hold"
"#,
        &cfg,
    );
    let mut t = tx("a1", "4111111111111111", 10, T0);
    // Sorted, with undeclared names before, between and after the declared ones, and
    // one declared name sent with the wrong type.
    t.attrs = vec![
        ("a_extra".into(), AttrValue::Bool(true)),
        ("b_num".into(), AttrValue::Num(Decimal::new(7, 0))),
        ("c_extra".into(), AttrValue::Str("c".into())),
        ("d_flag".into(), AttrValue::Str("true".into())),
        ("f_text".into(), AttrValue::Str("x".into())),
        ("z_extra".into(), AttrValue::Num(Decimal::ONE)),
    ];
    assert_eq!(
        resolve_attrs(&rs, &t).as_slice(),
        &[
            Some(&AttrValue::Num(Decimal::new(7, 0))),
            None,
            Some(&AttrValue::Str("x".into())),
            None,
        ]
    );
    t.attrs.clear();
    assert_eq!(resolve_attrs(&rs, &t).as_slice(), &[None, None, None, None]);
}

/// A list entry's end is compared with the time the engine received the transaction, not
/// with its `ts`, which the sender sets: a backdated `ts` must not revive an ended allow
/// entry (or keep a block), and a replay passing each transaction's own time as its
/// receive time decides as the engine did then.
#[test]
fn list_entries_end_by_the_receive_time_not_the_senders_ts() {
    let text = r#"
[ruleset]
version = "test"
hold_at = 50
reject_at = 100

[lists]
allowed = { file = "allowed.txt" }

[[rule]]
id = "allowed_card"
description = "trusted"
when = "card in allowed"
action = "allow"
"#;
    let cfg = EngineConfig::default();
    let end = T0 + 60_000;
    let list = format!("4111111111111111 until {}\n", {
        chrono::DateTime::from_timestamp_millis(end)
            .unwrap()
            .to_rfc3339()
    });
    let rs = compile(
        vec![SourceFile {
            name: "t/r.toml".into(),
            text: text.into(),
        }],
        &|p| match p {
            "t/allowed.txt" => Ok(list.clone()),
            _ => Err(std::io::Error::other("none")),
        },
        &cfg,
    )
    .unwrap_or_else(|e| panic!("{}", e.render()));
    let e = Engine::new(rs, cfg);
    let allowed = |o: &Outcome| {
        o.decision
            .rules
            .iter()
            .any(|r| r.id.as_ref() == "allowed_card")
    };
    // Before the end: allowed.
    let o = e.decide(&tx("a1", "4111111111111111", 10, T0), end - 1);
    assert!(allowed(&o), "{:?}", o.decision);
    // After it, with a `ts` from before the end: not allowed.
    let o = e.decide(&tx("a2", "4111111111111111", 10, T0), end);
    assert!(!allowed(&o), "{:?}", o.decision);
}
