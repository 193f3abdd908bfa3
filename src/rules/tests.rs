use super::*;
use crate::txn::Transaction;

const HEADER: &str = r#"
[ruleset]
version = "t1"
hold_at = 50
reject_at = 100

[attrs]
merchant_age_days = "number"
phone_match = "bool"
channel = "string"
"#;

fn files(body: &str) -> Vec<SourceFile> {
    vec![SourceFile {
        name: "r/a.toml".into(),
        text: format!("{HEADER}{body}"),
    }]
}

fn no_lists(_: &str) -> std::io::Result<String> {
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        "no such file",
    ))
}

fn compile_ok(body: &str) -> RuleSet {
    match compile(files(body), &no_lists, &EngineConfig::default()) {
        Ok(rs) => rs,
        Err(e) => panic!("{}", e.render()),
    }
}

fn compile_err(body: &str) -> LoadError {
    match compile(files(body), &no_lists, &EngineConfig::default()) {
        Ok(_) => panic!("expected errors for {body}"),
        Err(e) => e,
    }
}

fn rule(when: &str) -> String {
    format!("[[rule]]\nid = \"r\"\ndescription = \"d\"\nwhen = \"{when}\"\naction = \"hold\"\n")
}

/// Evaluates the single rule's condition on a transaction with no window features.
fn eval(rs: &RuleSet, t: &Transaction) -> Tri {
    eval_at(rs, t, 0)
}

/// Evaluates the single rule's condition on `t` received at `at_ms` (its `ts` is 0).
fn eval_at(rs: &RuleSet, t: &Transaction, at_ms: i64) -> Tri {
    let key = crate::keyhash::HashKey::default();
    let attrs: Vec<Option<&AttrValue>> = rs.attrs.iter().map(|(n, _)| t.attr(n)).collect();
    let (ints, decs) = (vec![None; rs.int_features], vec![None; rs.dec_features]);
    let ctx = Ctx {
        txn: t,
        ts_ms: 0,
        received_ms: at_ms,
        currency: "EUR",
        attrs: &attrs,
        ints: &ints,
        decs: &decs,
        local_hour: 3,
        local_weekday: 4,
        key: &key,
        hashes: &Default::default(),
    };
    (rs.rules[0].when)(&ctx)
}

fn txn() -> Transaction {
    let mut t = Transaction::new("t", "4111111111111111", Decimal::new(150050, 2));
    t.merchant = Some("m1".into());
    t.mcc = Some(7995);
    t.attrs = vec![
        ("channel".into(), AttrValue::Str("ecom".into())),
        (
            "merchant_age_days".into(),
            AttrValue::Num(Decimal::new(12, 0)),
        ),
    ];
    t
}

#[test]
fn evaluates_expressions() {
    let t = txn();
    let cases = [
        ("amount > 1500", Tri::True),
        ("amount > 1500.50", Tri::False),
        ("amount >= 1500.5", Tri::True),
        ("1000 < amount", Tri::True),
        ("amount * 2 == 3001", Tri::True),
        ("amount / 3 > 500.16", Tri::True),
        ("7 / 2 == 3.5", Tri::True),
        ("7 % 2 == 1", Tri::True),
        ("-amount < 0", Tri::True),
        ("mcc in [7995, 6051]", Tri::True),
        ("mcc not in [7995, 6051]", Tri::False),
        ("merchant in ['m1', 'm2']", Tri::True),
        ("merchant == 'm2'", Tri::False),
        ("merchant != 'm2'", Tri::True),
        ("attrs.channel == 'ecom'", Tri::True),
        ("attrs.merchant_age_days < 30", Tri::True),
        ("local_hour < 6 and local_weekday == 4", Tri::True),
        ("currency == 'EUR'", Tri::True),
        // Missing values: unknown, and three-valued logic.
        ("device == 'd1'", Tri::Unknown),
        ("device != 'd1'", Tri::Unknown),
        ("region in ['DE']", Tri::Unknown),
        ("attrs.phone_match == false", Tri::Unknown),
        ("not attrs.phone_match", Tri::Unknown),
        ("attrs.phone_match or amount > 1", Tri::True),
        ("attrs.phone_match and amount > 1", Tri::Unknown),
        ("attrs.phone_match and amount < 1", Tri::False),
        ("present(attrs.phone_match)", Tri::False),
        ("not present(device)", Tri::True),
        ("present(amount)", Tri::True),
        // Division by zero and overflow are unknown, never a crash.
        ("amount / 0 > 1", Tri::Unknown),
        ("9223372036854775807 + 1 > 0", Tri::Unknown),
        ("true and not false", Tri::True),
        ("'a' == 'a'", Tri::True),
        ("'a' in ['b']", Tri::False),
        // `[]` is empty for either kind of value.
        ("mcc in []", Tri::False),
        ("merchant not in []", Tri::True),
        ("merchant in []", Tri::False),
        ("region not in []", Tri::Unknown),
    ];
    for (when, want) in cases {
        let rs = compile_ok(&rule(when));
        assert_eq!(eval(&rs, &t), want, "{when}");
    }
}

#[test]
fn attr_of_wrong_type_is_missing() {
    let rs = compile_ok(&rule("attrs.merchant_age_days < 30"));
    let mut t = txn();
    t.attrs = vec![("merchant_age_days".into(), AttrValue::Str("12".into()))];
    // eval() does not filter by type; the engine does (resolve_attrs). Check the
    // compiled closure itself treats a string as unknown.
    assert_eq!(eval(&rs, &t), Tri::Unknown);
}

#[test]
fn reports_what_a_fired_rule_read() {
    let rs = compile_ok(&rule(
        "amount > 10 and card in ['x'] or attrs.channel == 'ecom'",
    ));
    let names: Vec<&str> = rs.rules[0].reads.iter().map(|(n, _)| &**n).collect();
    assert_eq!(names, ["amount", "card", "attrs.channel"]);
}

#[test]
fn windows_share_groups_and_slots() {
    let rs = compile_ok(
        r#"
[windows]
a = { agg = "count", by = "card", over = "1h" }
b = { agg = "count", by = "card", over = "24h" }
c = { agg = "sum", of = "amount", by = "card", over = "24h" }
d = { agg = "count", by = ["merchant", "card"], over = "2m" }
e = { agg = "count", by = ["card", "merchant"], over = "5m" }
f = { agg = "count", by = "card", over = "10m", where = "amount <  2" }
g = { agg = "count", by = "card", over = "1h", where = "amount < 2" }
[[rule]]
id = "r"
description = "d"
when = "a > 1 or b > 1 or c > 1 or d > 1 or e > 1 or f > 1 or g > 1"
score = 1
"#,
    );
    assert_eq!(rs.groups.len(), 2);
    let card = rs.groups.iter().find(|g| g.signature == "card").unwrap();
    // count, count where amount < 2 (whitespace-normalised), sum amount.
    assert_eq!(card.counts.len(), 2);
    assert_eq!(card.sums.len(), 1);
    assert_eq!(card.layout.max_window, 86_400);
    assert!(rs.groups.iter().any(|g| g.signature == "card,merchant"));
    assert_eq!(rs.int_features, 6);
    assert_eq!(rs.dec_features, 1);
}

/// A window filter holding a card number is signed by its keyed hash (slot signatures go
/// into every snapshot file), and two such filters still get slots of their own.
#[test]
fn a_filter_holding_a_card_number_is_not_in_its_signature() {
    let body = r#"
[windows]
a = { agg = "count", by = "merchant", over = "1h", where = "card != '4111111111111111'" }
b = { agg = "count", by = "merchant", over = "1h", where = "card != '4000000000000002'" }
c = { agg = "count", by = "merchant", over = "1h", where = "amount < 2" }
[[rule]]
id = "r"
description = "d"
when = "a > 1 or b > 1 or c > 1"
score = 1
"#;
    let rs = compile_ok(body);
    let g = rs
        .groups
        .iter()
        .find(|g| g.signature == "merchant")
        .unwrap();
    let sigs: Vec<&String> = g.counts.iter().map(|s| &s.0).collect();
    assert_eq!(sigs.len(), 3, "{sigs:?}");
    assert!(
        sigs.iter()
            .all(|s| !s.contains("4111") && !s.contains("4000")),
        "{sigs:?}"
    );
    assert!(
        sigs.iter().any(|s| s.contains("where amount < 2")),
        "{sigs:?}"
    );
}

#[test]
fn filters_that_differ_only_inside_a_string_or_by_a_comment_do_not_share_a_slot() {
    // Spaces inside a string are part of the value; a `#` comment ends the expression's
    // line. Collapsing whitespace in the raw text made both pairs one slot, so one
    // window counted with the other's filter.
    let body = r##"
[windows]
a = { agg = "count", by = "card", over = "1h", where = "merchant == 'ACME  STORE'" }
b = { agg = "count", by = "card", over = "1h", where = "merchant == 'ACME STORE'" }
c = { agg = "count", by = "card", over = "1h", where = """amount < 2 # small
or mcc == 1""" }
d = { agg = "count", by = "card", over = "1h", where = "amount < 2 # small or mcc == 1" }
e = { agg = "count", by = "card", over = "2h", where = "amount < 2 # a comment" }
f = { agg = "count", by = "card", over = "3h", where = "amount   <   2" }
[[rule]]
id = "r"
description = "d"
when = "a > 1 or b > 1 or c > 1 or d > 1 or e > 1 or f > 1"
score = 1
"##;
    let rs = compile_ok(body);
    let card = rs.groups.iter().find(|g| g.signature == "card").unwrap();
    // a, b, c apart; d, e and f are all `amount < 2`: one slot (spacing and comments
    // do not matter).
    assert_eq!(card.counts.len(), 4);
    let mut t = Transaction::new("x", "4111111111111111", Decimal::new(1, 0));
    t.merchant = Some("ACME STORE".into());
    t.mcc = Some(1);
    let values = window_values_after(rs, &t);
    let get = |n: &str| values.get(n).map(String::as_str);
    assert_eq!(get("a"), Some("0"), "{values:?}");
    assert_eq!(get("b"), Some("1"), "{values:?}");
    // An amount of 5 at mcc 1: c (`amount < 2 or mcc == 1`) counts it, d (`amount < 2`,
    // the rest is a comment) does not.
    let mut t = Transaction::new("y", "4111111111111111", Decimal::new(5, 0));
    t.mcc = Some(1);
    let values = window_values_after(compile_ok(body), &t);
    let get = |n: &str| values.get(n).map(String::as_str);
    assert_eq!(get("c"), Some("1"), "{values:?}");
    assert_eq!(get("d"), Some("0"), "{values:?}");
}

/// A number attribute summed by a window takes the bounds of an amount, and trailing
/// zeros past the eighth decimal are no precision (as in `amount`); a ninth significant
/// decimal, or a value past the amount limit, adds nothing.
#[test]
fn attribute_sums_take_padded_decimals_as_amounts_do() {
    // Right after the header's `[attrs]` table: one more attribute of it.
    let body = r##"
fee = "number"
[windows]
fees = { agg = "sum", of = "attrs.fee", by = "card", over = "1h" }
[[rule]]
id = "r"
description = "d"
when = "fees > 1"
score = 1
"##;
    for (fee, sum) in [
        ("12.500000000", "12.5"),
        ("12.50000000", "12.50000000"),
        ("0.000000001", "0"),
        ("1000000000000000", "0"),
    ] {
        let mut t = Transaction::new("x", "4111111111111111", Decimal::new(1, 0));
        let fee: Decimal = fee.parse().unwrap();
        t.attrs = vec![("fee".into(), AttrValue::Num(fee))];
        let values = window_values_after(compile_ok(body), &t);
        assert_eq!(values.get("fees").map(String::as_str), Some(sum), "{fee}");
    }
}

/// Every window's value (by window name) in a fresh engine on `rs` after deciding `t`.
fn window_values_after(rs: RuleSet, t: &Transaction) -> BTreeMap<String, String> {
    let e = crate::engine::Engine::new(rs, crate::config::EngineConfig::default());
    let now = 1_800_000_000_000;
    e.decide(t, now);
    e.window_values(now)
        .into_iter()
        .map(|(w, _, v)| (w, v))
        .collect()
}

#[test]
fn version_is_label_plus_content_hash() {
    let a = compile_ok(&rule("amount > 1"));
    let b = compile_ok(&rule("amount > 2"));
    assert!(a.version.starts_with("t1+"));
    assert_ne!(a.version, b.version);
    assert_eq!(a.version, compile_ok(&rule("amount > 1")).version);
}

#[test]
fn list_files_are_read_relative_and_hashed() {
    let body = r#"
[lists]
bad = { file = "lists/bad.txt" }
codes = { file = "codes.txt", type = "int" }
[[rule]]
id = "r"
description = "d"
when = "card in bad and mcc in codes"
action = "block"
"#;
    let read = |p: &str| -> std::io::Result<String> {
        match p {
            "r/lists/bad.txt" => Ok("# comment\n4111111111111111  # trailing\n\n".into()),
            "r/codes.txt" => Ok("7995\n6051\n".into()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                p.to_string(),
            )),
        }
    };
    let rs = compile(files(body), &read, &EngineConfig::default()).unwrap();
    assert_eq!(rs.lists["bad"], 1);
    assert_eq!(rs.lists["codes"], 2);
    assert_eq!(eval(&rs, &txn()), Tri::True);
    // The version covers list files too.
    let read2 = |p: &str| -> std::io::Result<String> {
        match p {
            "r/lists/bad.txt" => Ok("4111111111111112\n".into()),
            other => read(other),
        }
    };
    let rs2 = compile(files(body), &read2, &EngineConfig::default()).unwrap();
    assert_ne!(rs.version, rs2.version);
    assert_eq!(eval(&rs2, &txn()), Tri::False);
    // A byte-order mark (a file saved as "UTF-8 with BOM") is not part of the first entry.
    let with_bom = |p: &str| -> std::io::Result<String> {
        match p {
            "r/lists/bad.txt" => Ok("\u{feff}4111111111111111\n".into()),
            "r/codes.txt" => Ok("\u{feff}7995\n".into()),
            other => read(other),
        }
    };
    let rs3 = compile(files(body), &with_bom, &EngineConfig::default()).unwrap();
    assert_eq!(eval(&rs3, &txn()), Tri::True);
}

/// Comparisons whose answer is known before any transaction are warned about (a rule that
/// can never fire, or a condition part that is always true), with the position and without
/// the source text; comparisons that depend on the transaction are not.
#[test]
fn comparisons_known_before_any_transaction_are_warned() {
    let warned = |body: &str| -> Vec<String> {
        compile_ok(body)
            .warnings
            .into_iter()
            .filter(|w| w.contains("never-true") || w.contains("always-true"))
            .collect()
    };
    let windows = "[windows]\nc = { agg = \"count\", by = \"card\", over = \"1h\" }\n";
    for (when, code) in [
        ("local_hour >= 24", "never-true"),
        ("local_hour > 23.5", "never-true"),
        ("24 <= local_hour", "never-true"),
        ("local_weekday == 0", "never-true"),
        ("amount < 0", "never-true"),
        ("1 > 2", "never-true"),
        ("c < 0", "never-true"),
        ("local_hour >= 0", "always-true"),
        ("amount >= 0", "always-true"),
        ("local_weekday != 9", "always-true"),
        ("c > -1", "always-true"),
        ("1 == 1", "always-true"),
    ] {
        let w = warned(&format!("{windows}{}", rule(&format!("{when} and c >= 1"))));
        assert_eq!(w.len(), 1, "{when}: {w:?}");
        assert!(
            w[0].starts_with(&format!("warning[{code}]: r/a.toml:")),
            "{when}: {}",
            w[0]
        );
        assert!(!w[0].contains(when), "the source text is quoted: {}", w[0]);
    }
    for when in [
        "local_hour >= 6",
        "local_hour < 24 and local_hour > 22",
        "amount > 100",
        "mcc == 5411",
        "c >= 0.5",
        "local_weekday >= 7",
    ] {
        let w = warned(&format!("{windows}{}", rule(&format!("{when} and c >= 1"))));
        // `local_hour < 24` is always true; nothing else here is known.
        let want = usize::from(when.contains("< 24"));
        assert_eq!(w.len(), want, "{when}: {w:?}");
    }
}

/// A card number written in a rule file and compared with the card (`==`, `!=`, an inline
/// list) is warned about (`card-in-rule`), without the number: it is held in clear, where a
/// list file's entries are hashed. Tokens and other fields are not.
#[test]
fn a_card_number_written_in_a_rule_is_warned() {
    let warned = |body: &str| -> Vec<String> {
        compile_ok(body)
            .warnings
            .into_iter()
            .filter(|w| w.contains("card-in-rule"))
            .collect()
    };
    for body in [
        rule("card == '4111 1111 1111 1111'"),
        rule("'4111111111111111' != card"),
        rule("card in ['tok_1', '4000-0000-0000-0002']"),
        format!(
            "[lists]\nvip = [\"4000 0000 0000 0002\"]\n{}",
            rule("card not in vip")
        ),
    ] {
        let w = warned(&body);
        assert_eq!(w.len(), 1, "{body}: {w:?}");
        assert!(
            w[0].starts_with("warning[card-in-rule]: r/a.toml:"),
            "{}",
            w[0]
        );
        for clear in ["4111", "4000"] {
            assert!(!w[0].contains(clear), "{}", w[0]);
        }
    }
    for body in [
        rule("card == 'tok_4111111111111111x'"),
        rule("device == '4111111111111111'"),
        rule("card == '4111111111111112'"),
        rule("card in ['tok_1', 'tok_2']"),
    ] {
        assert_eq!(warned(&body), Vec::<String>::new(), "{body}");
    }
}

/// An `and` whose comparisons of one name with constants leave it no value is warned about
/// once, at the `and` that brings them together; satisfiable ranges are not, nor an `and`
/// with a part that is never true alone (that part is warned about).
#[test]
fn contradictory_ranges_in_an_and_are_warned() {
    let warned = |when: &str| -> Vec<String> {
        let windows = "[windows]\nc = { agg = \"count\", by = \"card\", over = \"1h\" }\n";
        compile_ok(&format!("{windows}{}", rule(when)))
            .warnings
            .into_iter()
            .filter(|w| w.contains("never-true") || w.contains("always-true"))
            .collect()
    };
    for when in [
        "amount > 100 and amount < 50",
        "amount >= 100 and amount < 100",
        "amount > 100 and amount <= 100",
        "amount == 5 and amount != 5",
        "amount == 5 and amount == 6",
        "c >= 3 and mcc == 5411 and 2 > c",
        "amount > 10 and (mcc == 5411 and amount < 5)",
        "local_hour > 3 and local_hour < 2 and c >= 1",
    ] {
        let w = warned(when);
        assert_eq!(w.len(), 1, "{when}: {w:?}");
        assert!(
            w[0].starts_with("warning[never-true]: r/a.toml:"),
            "{when}: {}",
            w[0]
        );
        assert!(
            w[0].contains("this `and` is never true"),
            "{when}: {}",
            w[0]
        );
    }
    for when in [
        "amount > 50 and amount < 100",
        "amount >= 100 and amount <= 100",
        "amount == 5 and amount != 6",
        "amount > 100 or amount < 50",
        "amount > 100 and c < 50",
        "local_hour >= 22 and local_hour <= 22",
        "not (amount > 100) and amount > 200",
    ] {
        assert_eq!(warned(when), Vec::<String>::new(), "{when}");
    }
    for when in ["amount < 0 and amount > 5", "amount > 5 and amount < 0"] {
        let w = warned(when);
        assert_eq!(w.len(), 1, "{when}: {w:?}");
        assert!(
            w[0].contains("amount is never negative"),
            "{when}: {}",
            w[0]
        );
    }
    for when in [
        "(amount > 100 and amount < 50) and c >= 1",
        "c >= 1 and (amount > 100 and amount < 50)",
    ] {
        let w = warned(when);
        assert_eq!(w.len(), 1, "{when}: {w:?}");
        assert!(
            w[0].contains("this `and` is never true"),
            "{when}: {}",
            w[0]
        );
    }
    // Under a `not` the part is still pointed at, and the warning says the `not` turns
    // it over (the rule would otherwise read as one that never fires).
    for (when, code) in [
        ("not (amount > 100 and amount < 50)", "never-true"),
        ("c >= 1 and not (mcc == 5411 and amount < 0)", "never-true"),
        ("not (local_hour >= 0) or c > 3", "always-true"),
    ] {
        let w = warned(when);
        assert_eq!(w.len(), 1, "{when}: {w:?}");
        assert!(w[0].contains(code), "{when}: {}", w[0]);
        assert!(
            w[0].contains("(under a `not`, which turns it over)"),
            "{when}: {}",
            w[0]
        );
    }
    for when in [
        "amount > 100 and amount < 50",
        "not not (amount > 100 and amount < 50)",
    ] {
        let w = warned(when);
        assert_eq!(w.len(), 1, "{when}: {w:?}");
        assert!(!w[0].contains("under a `not`"), "{when}: {}", w[0]);
    }
    // A part under a `not` that is never true does not hide a contradiction around it.
    let w = warned("(amount > 100 and not (mcc == 1 and mcc == 2)) and amount < 50");
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w.iter().any(|w| w.contains("its comparisons of `amount`")),
        "{w:?}"
    );
}

/// Only the literal `[]` is empty for strings too: a number list file that happens to be
/// empty stays a number list, so a string looked up in it is refused now, not at the
/// reload that gives the file its first entry.
#[test]
fn an_empty_number_list_file_is_still_a_number_list() {
    let body = format!(
        "[lists]\ncodes = {{ file = \"codes.txt\", type = \"int\" }}\n{}",
        rule("merchant in codes")
    );
    let read = |_: &str| -> std::io::Result<String> { Ok("# none yet\n".into()) };
    let e = match compile(files(&body), &read, &EngineConfig::default()) {
        Ok(_) => panic!("a string looked up in a number list compiled"),
        Err(e) => e,
    };
    assert!(e.render().contains("list of numbers"), "{}", e.render());
}

/// Hidden `.toml` files are not read: a draft beside the rules (here repeating a rule id,
/// which would fail the whole load) or macOS's `._limits.toml` (not UTF-8).
#[test]
fn hidden_toml_files_are_not_rules() {
    let dir = std::env::temp_dir().join(format!("fraudgate-hidden-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("a.toml"),
        format!("{HEADER}{}", rule("amount > 1")),
    )
    .unwrap();
    std::fs::write(dir.join(".draft.toml"), rule("amount > 2")).unwrap();
    std::fs::write(dir.join("._a.toml"), [0u8, 5, 22, 7, 0xff, 0xfe]).unwrap();
    let loaded = load_dir(&dir, &EngineConfig::default());
    let _ = std::fs::remove_dir_all(&dir);
    let rs = loaded.unwrap_or_else(|e| panic!("{}", e.render()));
    assert_eq!(rs.rules.len(), 1);
}

#[test]
fn list_entries_can_end() {
    let body = r#"
[lists]
blocked = { file = "blocked.txt" }
[[rule]]
id = "r"
description = "d"
when = "card in blocked or 'm9' in blocked"
action = "block"
"#;
    let list = "\
4111111111111111  until 2026-12-31   # chargeback case 1234: to the end of that day, UTC
m9 until 2026-12-01T18:00:00+01:00
4222222222222222 until 2026-01-01
4222222222222222
merchant with spaces until 2026-01-01
4444444444444444
4444444444444444 until 2020-01-01
4555555555555555 until 2026-12-10
4555555555555555 UNTIL 2026-12-20 18:00:00Z
";
    let read = |p: &str| -> std::io::Result<String> {
        match p {
            "r/blocked.txt" => Ok(list.into()),
            _ => Err(std::io::Error::new(std::io::ErrorKind::NotFound, "x")),
        }
    };
    let rs = compile(files(body), &read, &EngineConfig::default()).unwrap();
    assert_eq!(rs.lists["blocked"], 6);
    let end_of_2026_12_31 = 1_798_761_600_000; // 2027-01-01T00:00:00Z
    let m9_end = 1_796_144_400_000; // 2026-12-01T17:00:00Z
    let spaces_end = 1_767_312_000_000; // 2026-01-02T00:00:00Z
    let later_end = 1_797_789_600_000; // 2026-12-20T18:00:00Z (any case, a space for T)
    assert_eq!(
        rs.list_ends["blocked"],
        vec![spaces_end, m9_end, later_end, end_of_2026_12_31]
    );
    let mut t = txn();
    t.card = "4111111111111111".into();
    assert_eq!(eval_at(&rs, &t, end_of_2026_12_31 - 1), Tri::True);
    // From the end on, the card is not on the list; neither is m9 (a constant looked up
    // at each decision's time).
    assert_eq!(eval_at(&rs, &t, end_of_2026_12_31), Tri::False);
    t.card = "4333333333333333".into();
    assert_eq!(eval_at(&rs, &t, m9_end - 1), Tri::True);
    assert_eq!(eval_at(&rs, &t, m9_end), Tri::False);
    // Listed without an end as well, before or after: no end.
    t.card = "4222222222222222".into();
    assert_eq!(eval_at(&rs, &t, i64::MAX), Tri::True);
    t.card = "4444444444444444".into();
    assert_eq!(eval_at(&rs, &t, i64::MAX), Tri::True);
    // Two ends: the later one.
    t.card = "4555555555555555".into();
    assert_eq!(eval_at(&rs, &t, later_end - 1), Tri::True);
    assert_eq!(eval_at(&rs, &t, later_end), Tri::False);

    for (bad, msg) in [
        (
            "4111 until 2026-02-30\n",
            "`2026-02-30` is not a date or time",
        ),
        ("4111 until tomorrow\n", "`tomorrow` is not a date or time"),
        (
            "4111 until\n",
            "`until` needs an entry before it and a date after it",
        ),
        (
            "until 2026-12-31\n",
            "`until` needs an entry before it and a date after it",
        ),
        // A reason without `#` is not silently part of the entry.
        (
            "4111111111111111 until 2026-12-31 chargeback 1234\n",
            "`2026-12-31 chargeback 1234` is not a date or time",
        ),
    ] {
        let read = |p: &str| -> std::io::Result<String> {
            match p {
                "r/blocked.txt" => Ok(bad.into()),
                _ => Err(std::io::Error::new(std::io::ErrorKind::NotFound, "x")),
            }
        };
        let e = compile(files(body), &read, &EngineConfig::default()).unwrap_err();
        assert_eq!(codes(&e), ["bad-list"], "{bad}");
        let text = e.render();
        assert!(text.contains(msg), "{bad}: {text}");
        assert!(text.contains("r/blocked.txt:1:"), "{text}");
        // The quoted line has its card number masked.
        assert!(!text.contains("4111111111111111"), "{text}");
    }
    let ints = body.replace(
        r#"file = "blocked.txt" }"#,
        r#"file = "blocked.txt", type = "int" }"#,
    );
    let read = |p: &str| -> std::io::Result<String> {
        match p {
            "r/blocked.txt" => Ok("7995 until 2026-12-31\n".into()),
            _ => Err(std::io::Error::new(std::io::ErrorKind::NotFound, "x")),
        }
    };
    let e = compile(files(&ints), &read, &EngineConfig::default()).unwrap_err();
    assert!(
        e.render().contains("entries of an int list cannot end"),
        "{}",
        e.render()
    );
}

fn codes(e: &LoadError) -> Vec<&'static str> {
    e.diagnostics.iter().map(|d| d.code).collect()
}

#[test]
fn errors_are_all_reported_with_positions() {
    let e = compile_err(
        r#"
[windows]
w1 = { agg = "count", by = "card", over = "10x" }
w2 = { agg = "sum", of = "merchant", by = "card", over = "1h" }
[[rule]]
id = "a"
description = "d"
when = "amout > 5"
action = "reject"
[[rule]]
id = "b"
description = "d"
when = "amount > \"abc\""
action = "hold"
[[rule]]
id = "a"
description = "d"
when = "amount > 1"
action = "hold"
[[rule]]
id = "c"
description = "d"
when = "region in risky"
action = "hold"
[[rule]]
id = "d"
description = "d"
when = "amount >"
action = "rejct"
"#,
    );
    let c = codes(&e);
    for want in [
        "bad-duration",
        "type-mismatch",
        "unknown-identifier",
        "duplicate-rule",
        "bad-action",
    ] {
        assert!(c.contains(&want), "missing {want} in {c:?}\n{}", e.render());
    }
    let text = e.render();
    assert!(text.contains("did you mean `amount`?"), "{text}");
    assert!(text.contains("r/a.toml:"), "{text}");
    assert!(text.contains("^"), "{text}");
    // The caret is under `amout` exactly.
    let d = e
        .diagnostics
        .iter()
        .find(|d| d.message.contains("amout"))
        .unwrap();
    let src = &e.files[0].text;
    assert_eq!(&src[d.span.clone()], "amout");
}

#[test]
fn type_errors() {
    for (when, needle) in [
        ("amount > 'abc'", "cannot compare a decimal with a string"),
        ("merchant > 'a'", "cannot order string values"),
        ("amount", "must be true or false"),
        ("amount and true", "needs true or false"),
        ("merchant + 1 > 2", "needs numbers"),
        (
            "mcc in ['a']",
            "cannot look up an integer in a list of strings",
        ),
        ("mcc in 5", "must be a list"),
        ("present()", "takes 1 argument"),
        ("hour() > 1", "unknown function"),
        ("attrs.chanel == 'x'", "unknown attribute"),
        ("[1, 'a'] == 1", "mixes strings and numbers"),
        ("not amount", "`not` needs true or false"),
    ] {
        let e = compile_err(&rule(when));
        let text = e.render();
        assert!(text.contains(needle), "{when}: {text}");
    }
}

#[test]
fn structural_errors() {
    let cases = [
        ("[[rule]]\nid = \"x\"\ndescription = \"d\"\nwhen = \"amount > 1\"\n", "no-effect"),
        ("[[rule]]\nid = \"x y\"\ndescription = \"d\"\nwhen = \"amount > 1\"\nscore = 1\n", "bad-name"),
        ("[[rule]]\nid = \"x\"\ndescription = \"d\"\nwhen = \"amount > 1\"\nscore = 1\nmode = \"dry\"\n", "bad-mode"),
        ("[windows]\nw = { agg = \"avg\", by = \"card\", over = \"1h\" }\n", "bad-window"),
        ("[windows]\nw = { agg = \"count\", by = \"crad\", over = \"1h\" }\n", "unknown-identifier"),
        ("[windows]\nw = { agg = \"count\", by = \"card\", over = \"1500ms\" }\n", "bad-duration"),
        // Past i64 milliseconds: refused, not wrapped to a negative length.
        ("[windows]\nw = { agg = \"count\", by = \"card\", over = \"18446744073709550616ms\" }\n", "bad-duration"),
        ("[windows]\nw = { agg = \"count\", by = \"card\", over = \"1h\", where = \"w > 1\" }\n", "unknown-identifier"),
        ("[windows]\namount = { agg = \"count\", by = \"card\", over = \"1h\" }\n", "bad-name"),
        ("x = \"float\"\n", "bad-attr-type"),
        ("[ruleset]\nversion = \"x\"\nhold_at = 1\nreject_at = 2\n", "toml"),
        ("[[rule]]\nid = \"x\"\ndescription = \"d\"\nwhen = \"amount > 1\"\nacton = \"hold\"\n", "toml"),
        ("[lists]\nl = { file = \"missing.txt\" }\n", "list-file"),
    ];
    for (body, code) in cases {
        let e = compile_err(body);
        assert!(
            codes(&e).contains(&code),
            "{body}: {:?}\n{}",
            codes(&e),
            e.render()
        );
    }
}

#[test]
fn name_errors_point_at_the_name_and_say_what_is_wrong() {
    let lists = "[lists]\nseen = [\"a\"]\n";
    let cases = [
        (
            format!("[windows]\namount = {W}\n"),
            "amount",
            "is the name of a transaction field",
        ),
        (
            format!("[windows]\n\"card txn\" = {W}\n"),
            "\"card txn\"",
            "is not an identifier",
        ),
        (
            format!("[windows]\nand = {W}\n"),
            "and",
            "is a word of the rule language",
        ),
        (
            format!("{lists}[windows]\nseen = {W}\n"),
            "seen",
            "is already the name of a list",
        ),
        (
            "[lists]\n\"1st\" = [\"a\"]\n".to_string(),
            "\"1st\"",
            "is not an identifier",
        ),
        (
            "[lists]\nmcc = [\"a\"]\n".to_string(),
            "mcc",
            "is the name of a transaction field",
        ),
        // Right after the header's [attrs] table.
        (
            "\"a-b\" = \"string\"\n".to_string(),
            "\"a-b\"",
            "is not an identifier",
        ),
    ];
    for (body, name, problem) in cases {
        let e = compile_err(&body);
        let d = e
            .diagnostics
            .iter()
            .find(|d| d.code == "bad-name")
            .unwrap_or_else(|| panic!("{body}: {}", e.render()));
        assert_eq!(&format!("{HEADER}{body}")[d.span.clone()], name, "{body}");
        assert!(d.message.ends_with(problem), "{body}: {}", d.message);
    }
    // A second declaration is shown at its name, in the file that repeats it.
    let two = vec![
        SourceFile {
            name: "r/a.toml".into(),
            text: format!("{HEADER}[windows]\nw = {W}\n{}", rule("w > 1")),
        },
        SourceFile {
            name: "r/b.toml".into(),
            text: format!("[windows]\nw = {W}\n"),
        },
    ];
    let e = compile(two, &no_lists, &EngineConfig::default()).unwrap_err();
    let d = &e.diagnostics[0];
    assert_eq!(
        (d.code, d.file, d.span.clone()),
        ("duplicate-window", Some(1), 10..11)
    );
}

/// Lists and windows nothing reads load, with one warning each (file:line:col, no source
/// text); a list read only by a window filter is read.
#[test]
fn unused_lists_and_windows_are_warned_about() {
    let body = format!(
        "[lists]\nspare = [\"a\"]\nsmall_mcc = [5411]\n[windows]\nw = {W}\nidle = {W}\n\
         f = {{ agg = \"count\", by = \"card\", over = \"1h\", where = \"mcc in small_mcc\" }}\n{}{}",
        rule("w > 1"),
        rule("f > 1").replace("id = \"r\"", "id = \"r2\"")
    );
    let rs = compile(files(&body), &no_lists, &EngineConfig::default()).unwrap();
    let text = format!("{HEADER}{body}");
    let line_of = |needle: &str| text[..text.find(needle).unwrap()].matches('\n').count() + 1;
    assert_eq!(
        rs.warnings,
        [
            format!(
                "warning[unused-list]: r/a.toml:{}:1: list `spare` is not read by any rule or window filter",
                line_of("spare =")
            ),
            format!(
                "warning[unused-window]: r/a.toml:{}:1: window `idle` is not read by any rule; it still keeps state for every `card` key and costs time on every transaction: read it in a rule (a shadow rule shows its values) or remove it",
                line_of("idle =")
            ),
        ]
    );
}

/// Rule ids and version labels go into every decision, header and metric label: one
/// holding a card number is refused. Error output masks card numbers in the lines and
/// values it quotes.
#[test]
fn card_numbers_stay_out_of_ids_labels_and_errors() {
    let e = compile_err(&rule("amount > 1").replace("id = \"r\"", "id = \"vip_4111111111111111\""));
    assert!(codes(&e).contains(&"bad-name"), "{}", e.render());
    let bad_version = vec![SourceFile {
        name: "r/a.toml".into(),
        text: format!(
            "{}{}",
            HEADER.replace("version = \"t1\"", "version = \"4111-1111-1111-1111\""),
            rule("amount > 1")
        ),
    }];
    let e = compile(bad_version, &no_lists, &EngineConfig::default()).unwrap_err();
    assert!(codes(&e).contains(&"bad-version"), "{}", e.render());
    // A timestamp is no card number (issuer prefix, check digit): accepted.
    let stamped = vec![SourceFile {
        name: "r/a.toml".into(),
        text: format!(
            "{}{}",
            HEADER.replace("version = \"t1\"", "version = \"20261126-143000\""),
            rule("amount > 1").replace("id = \"r\"", "id = \"ato-20261126-143000\"")
        ),
    }];
    compile(stamped, &no_lists, &EngineConfig::default())
        .unwrap_or_else(|e| panic!("{}", e.render()));
    // A typo next to a card literal, an inline list of cards in a TOML error, a bad int
    // list line: nothing of the numbers in clear.
    for body in [
        rule("card == '4111 1111 1111 1111' and amuont > 5"),
        "[lists]\nstolen = [\"4111111111111111\", 5500000000000004]\n".to_string(),
    ] {
        let text = compile_err(&body).render();
        for clear in [
            "4111 1111 1111 1111",
            "4111111111111111",
            "5500000000000004",
        ] {
            assert!(!text.contains(clear), "{clear} in:\n{text}");
        }
    }
    let int_list = |_: &str| Ok("4111111111111111x\n".to_string());
    let body = "[lists]\nl = { file = \"l.txt\", type = \"int\" }\n";
    let e = compile(files(body), &int_list, &EngineConfig::default()).unwrap_err();
    let text = e.render();
    assert!(codes(&e).contains(&"bad-list"), "{text}");
    assert!(!text.contains("4111111111111111"), "{text}");
}

const W: &str = "{ agg = \"count\", by = \"card\", over = \"1h\" }";

#[test]
fn ruleset_table_rules() {
    let two = vec![
        SourceFile {
            name: "r/a.toml".into(),
            text: format!("{HEADER}{}", rule("amount > 1")),
        },
        SourceFile {
            name: "r/b.toml".into(),
            text: "[ruleset]\nversion = \"x\"\nhold_at = 1\nreject_at = 2\n".into(),
        },
    ];
    let e = compile(two, &no_lists, &EngineConfig::default()).unwrap_err();
    assert_eq!(codes(&e), ["duplicate-ruleset"]);
    let none = vec![SourceFile {
        name: "r/a.toml".into(),
        text: rule("amount > 1"),
    }];
    let e = compile(none, &no_lists, &EngineConfig::default()).unwrap_err();
    assert_eq!(codes(&e), ["missing-ruleset"]);
    let bad = vec![SourceFile {
        name: "r/a.toml".into(),
        text: format!(
            "[ruleset]\nversion = \"x\"\nhold_at = 100\nreject_at = 50\n{}",
            rule("amount > 1")
        ),
    }];
    let e = compile(bad, &no_lists, &EngineConfig::default()).unwrap_err();
    assert_eq!(codes(&e), ["bad-threshold"]);
}

#[test]
fn spans_map_through_escapes() {
    let e = compile_err("[[rule]]\nid = \"x\"\ndescription = \"d\"\nwhen = \"merchant == \\\"\\u00e9\\\" and amout > 1\"\naction = \"hold\"\n");
    let d = &e.diagnostics[0];
    let src = &e.files[0].text;
    assert_eq!(&src[d.span.clone()], "amout", "{}", e.render());
    // TOML 1.1's `\xHH` is four bytes in the file, one character in the value.
    let e = compile_err("[[rule]]\nid = \"x\"\ndescription = \"d\"\nwhen = \"merchant == \\\"\\x41\\x42\\\" and amout > 1\"\naction = \"hold\"\n");
    let d = &e.diagnostics[0];
    let src = &e.files[0].text;
    assert_eq!(&src[d.span.clone()], "amout", "{}", e.render());
    // Multi-line literal strings are verbatim.
    let e = compile_err("[[rule]]\nid = \"x\"\ndescription = \"d\"\nwhen = \'\'\'\namount > 1\nand amout > 1\'\'\'\naction = \"hold\"\n");
    let d = &e.diagnostics[0];
    assert_eq!(&e.files[0].text[d.span.clone()], "amout", "{}", e.render());
}

#[test]
fn list_changes_count_entries_without_showing_them() {
    let body = |extra: &str| {
        format!(
            "[lists]\nblocked = {{ file = \"blocked.txt\" }}\n{extra}\n{}",
            rule("card in blocked and mcc in codes")
        )
    };
    let with = |list: &'static str, extra: &str| {
        let read = move |p: &str| -> std::io::Result<String> {
            match p {
                "r/blocked.txt" => Ok(list.into()),
                _ => Err(std::io::Error::new(std::io::ErrorKind::NotFound, "x")),
            }
        };
        compile(files(&body(extra)), &read, &EngineConfig::default()).unwrap()
    };
    let old = with(
        "4111111111111111\n4222222222222222 until 2026-12-31\nm1\n",
        "codes = [7995, 6051]",
    );
    let new = with(
        "4111111111111111\n4222222222222222 until 2027-01-31\n4333333333333333\n",
        "codes = [7995, 5816]\nvip = [\"m-1\"]",
    );
    let changes: Vec<String> = new
        .list_changes(&old)
        .iter()
        .map(|c| c.to_string())
        .collect();
    assert_eq!(
        changes,
        [
            "blocked +1 -1 ~1 end(s) (3 entries)",
            "codes +1 -1 (2 entries)",
            "vip +1 -0 (1 entries)"
        ]
    );
    assert!(old.list_changes(&old).is_empty());
}

#[test]
fn a_rules_condition_is_kept_as_written_with_card_numbers_masked() {
    let rs = compile_ok(&rule(
        "card == 'x  y' or card == '4111111111111111'   or\t amount > 1000 # the limit",
    ));
    // Comments dropped, whitespace collapsed outside literals, card numbers masked.
    assert_eq!(
        &*rs.rules[0].condition,
        "card == 'x  y' or card == '411111******1111' or amount > 1000"
    );
}
