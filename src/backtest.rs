//! Scoring a backtest (`fraudgate replay --fraud-ids`): a rule set's decisions on
//! recorded traffic against the transactions known to have been fraud (chargebacks with a
//! fraud reason, confirmed cases). Overall: how much fraud was held or rejected, how much
//! legitimate traffic was, and the precision of the two; per rule, shadow rules included:
//! how often it fired and how often on fraud. Pure: the caller reads the files.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use rust_decimal::Decimal;

use crate::decision::{Action, Decision};
use crate::rules::{Mode, RuleAction, RuleSet};

/// The ids of a fraud-ids file: one transaction id per line; `#` at the start of a line or
/// after a space starts a comment (an id may hold `#`), blank lines are skipped, a
/// byte-order mark is dropped. A line that starts with `{"` is an outcome message as sent
/// on `fraud.outcome` ([`crate::feedback`]; a recording of that subject can be read
/// as it is), without notes: a `chargeback` or `fraud` outcome gives its id, a `refund` or
/// `genuine` one none. (An id in braces, `{3F2504E0-...}`, is an id.) `Err` names the
/// first line that holds more than one id, or an outcome that does not read.
pub fn parse_fraud_ids(text: &str) -> Result<Vec<String>, String> {
    use crate::feedback::{Feedback, Kind};
    let mut ids = Vec::new();
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("{\"") {
            let f = Feedback::from_json(line.as_bytes())
                .map_err(|e| format!("line {}: not an outcome: {}", n + 1, e.message))?;
            if matches!(f.kind, Kind::Chargeback | Kind::Fraud) {
                ids.push(f.id);
            }
            continue;
        }
        let comment = (line.char_indices())
            .find(|&(i, c)| c == '#' && (i == 0 || line[..i].ends_with(char::is_whitespace)));
        let line = &line[..comment.map_or(line.len(), |(i, _)| i)];
        let mut words = line.split_whitespace();
        let Some(id) = words.next() else { continue };
        if words.next().is_some() {
            return Err(format!(
                "line {}: one transaction id per line (put notes after `#`)",
                n + 1
            ));
        }
        ids.push(id.to_string());
    }
    Ok(ids)
}

/// What one rule did in the backtest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleScore {
    pub on_fraud: u64,
    pub on_legit: u64,
}

/// Transactions of one class (fraud or legitimate) by the action they got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByAction {
    pub approved: u64,
    pub held: u64,
    pub rejected: u64,
}

impl ByAction {
    fn add(&mut self, a: Action) {
        match a {
            Action::Approve => self.approved += 1,
            Action::Hold => self.held += 1,
            Action::Reject => self.rejected += 1,
        }
    }
    pub fn all(&self) -> u64 {
        self.approved + self.held + self.rejected
    }
    /// Held or rejected.
    pub fn flagged(&self) -> u64 {
        self.held + self.rejected
    }
}

/// The running score of a backtest.
pub struct Backtest {
    /// Fraud ids, and whether the traffic held each yet.
    fraud_ids: HashMap<String, bool>,
    /// Hashes of every id scored (8 bytes each): a retry the retry table no longer
    /// answers is decided again, and must not be scored twice.
    scored: HashSet<u64>,
    ids_hasher: RandomState,
    /// Transactions decided again under an id scored before.
    pub rescored: u64,
    pub fraud: ByAction,
    pub legit: ByAction,
    /// Per currency: the fraud amount held or rejected, and all of it.
    pub fraud_amount: BTreeMap<String, (Decimal, Decimal)>,
    /// Every rule of the set, in its order, with its mode, action and score.
    pub rules: Vec<(Arc<str>, Mode, Option<RuleAction>, RuleScore)>,
    index: HashMap<Arc<str>, usize>,
}

impl Backtest {
    pub fn new(fraud_ids: Vec<String>, rules: &RuleSet) -> Backtest {
        let rules: Vec<_> = (rules.rules.iter())
            .map(|r| (r.id.clone(), r.mode, r.action, RuleScore::default()))
            .collect();
        let index = (rules.iter().enumerate())
            .map(|(i, r)| (r.0.clone(), i))
            .collect();
        Backtest {
            fraud_ids: fraud_ids.into_iter().map(|id| (id, false)).collect(),
            scored: HashSet::new(),
            ids_hasher: RandomState::new(),
            rescored: 0,
            fraud: ByAction::default(),
            legit: ByAction::default(),
            fraud_amount: BTreeMap::new(),
            rules,
            index,
        }
    }

    /// Scores one decision: not a retry the engine answered from its retry table (that
    /// is the original's decision, scored with it).
    pub fn add(&mut self, d: &Decision, amount: Decimal, currency: &str) {
        if !self.scored.insert(self.ids_hasher.hash_one(&d.id)) {
            self.rescored += 1;
            return;
        }
        let fraud = match self.fraud_ids.get_mut(&d.id) {
            Some(seen) => {
                *seen = true;
                true
            }
            None => false,
        };
        if fraud {
            self.fraud.add(d.action);
            // What the switch sent as the currency, shown: never a card number in clear.
            let currency = crate::txn::redact_pans(currency);
            let (caught, all) = self.fraud_amount.entry(currency).or_default();
            *all += amount;
            if d.action != Action::Approve {
                *caught += amount;
            }
        } else {
            self.legit.add(d.action);
        }
        for r in &d.rules {
            if let Some(&i) = self.index.get(&r.id) {
                let s = &mut self.rules[i].3;
                match fraud {
                    true => s.on_fraud += 1,
                    false => s.on_legit += 1,
                }
            }
        }
    }

    /// Fraud ids not scored: absent from the traffic (a mismatch between the two files,
    /// or fraud outside the recorded period), or on a line that was invalid or refused.
    pub fn fraud_ids_not_seen(&self) -> usize {
        self.fraud_ids.values().filter(|seen| !**seen).count()
    }

    /// The report, for people: one line per figure, then a table of the rules.
    pub fn report(&self) -> String {
        let (f, l) = (&self.fraud, &self.legit);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "backtest: {} transactions scored, {} of them fraud ({} fraud ids, {} not scored: not in the traffic, or on an invalid line)",
            f.all() + l.all(),
            f.all(),
            self.fraud_ids.len(),
            self.fraud_ids_not_seen()
        );
        if self.rescored > 0 {
            let _ = writeln!(
                s,
                "  {} retries decided again past the retry horizon, scored once",
                self.rescored
            );
        }
        let _ = writeln!(
            s,
            "  fraud caught:    {} of {} ({}): {} rejected, {} held; {} approved",
            f.flagged(),
            f.all(),
            pct(f.flagged(), f.all()),
            f.rejected,
            f.held,
            f.approved
        );
        for (cur, (caught, all)) in &self.fraud_amount {
            let share = match all.is_zero() {
                true => "-".to_string(),
                false => format!("{:.1} %", (caught * Decimal::ONE_HUNDRED / all).round_dp(1)),
            };
            let _ = writeln!(
                s,
                "  fraud amount caught: {cur} {caught} of {all} ({share})"
            );
        }
        let _ = writeln!(
            s,
            "  legit flagged:   {} of {} ({}): {} rejected, {} held",
            l.flagged(),
            l.all(),
            pct(l.flagged(), l.all()),
            l.rejected,
            l.held
        );
        let flagged = f.flagged() + l.flagged();
        let _ = writeln!(
            s,
            "  precision:       {} of the {} held or rejected were fraud",
            pct(f.flagged(), flagged),
            flagged
        );
        let width = (self.rules.iter().map(|r| r.0.len()))
            .max()
            .unwrap_or(4)
            .max(4);
        // Per rule: where it fired, whatever the decision was; `of all fraud` is the
        // share of the fraud it fired on. For an allow rule both are fraud it let pass.
        let _ = writeln!(
            s,
            "  {:width$}  {:6}  {:6}  {:>8}  {:>8}  {:>9}  {:>12}",
            "rule", "mode", "action", "fired", "on fraud", "precision", "of all fraud"
        );
        for (id, mode, action, r) in &self.rules {
            let mode = match mode {
                Mode::Active => "active",
                Mode::Shadow => "shadow",
            };
            let action = match action {
                Some(RuleAction::Block) => "block",
                Some(RuleAction::Reject) => "reject",
                Some(RuleAction::Hold) => "hold",
                Some(RuleAction::Allow) => "allow",
                None => "score",
            };
            let fired = r.on_fraud + r.on_legit;
            let _ = writeln!(
                s,
                "  {id:width$}  {mode:6}  {action:6}  {fired:>8}  {:>8}  {:>9}  {:>12}",
                r.on_fraud,
                pct(r.on_fraud, fired),
                pct(r.on_fraud, f.all())
            );
        }
        if (self.rules.iter()).any(|r| r.2 == Some(RuleAction::Allow)) {
            let _ = writeln!(
                s,
                "  (an allow rule's `on fraud` is fraud it let pass, unless a block or reject won)"
            );
        }
        s
    }
}

/// `a / b` as a percentage with one decimal, or `-` when `b` is 0. (A ratio of counts
/// for people to read, not money.)
fn pct(a: u64, b: u64) -> String {
    match b {
        0 => "-".to_string(),
        _ => format!("{:.1} %", a as f64 * 100.0 / b as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{compile, SourceFile};
    use crate::{Engine, EngineConfig, Transaction};

    const RULES: &str = r#"
[ruleset]
version = "bt"
hold_at = 50
reject_at = 100
[[rule]]
id = "big"
description = "big"
when = "amount > 1000"
action = "reject"
[[rule]]
id = "mid"
description = "mid"
when = "amount > 100"
action = "hold"
[[rule]]
id = "tiny"
description = "tiny, in shadow"
when = "amount < 2"
action = "hold"
mode = "shadow"
"#;

    fn engine() -> Engine {
        let cfg = EngineConfig::default();
        let rs = compile(
            vec![SourceFile {
                name: "t/r.toml".into(),
                text: RULES.into(),
            }],
            &|_| Ok(String::new()),
            &cfg,
        )
        .unwrap_or_else(|e| panic!("{}", e.render()));
        Engine::new(rs, cfg)
    }

    #[test]
    fn fraud_ids_are_one_per_line_with_comments() {
        let text = "\u{feff}# chargebacks, November\r\nt-1\r\n  t-2   # reason 10.4\n\nt#3\n";
        assert_eq!(parse_fraud_ids(text).unwrap(), ["t-1", "t-2", "t#3"]);
        let e = parse_fraud_ids("t-1\nt-2 fraud\n").unwrap_err();
        assert!(e.starts_with("line 2:"), "{e}");
    }

    /// A recording of fraud.outcome reads as it is: chargebacks and confirmed fraud are
    /// fraud ids, refunds and genuine verdicts are not; a `#` inside one is no comment.
    #[test]
    fn outcome_messages_are_read_as_fraud_ids() {
        let text = concat!(
            "t-1\n",
            r#"{"id":"t-2","outcome":"chargeback","decision":{"id":"t-2","action":"approve","rules":[]},"note":"case #7"}"#,
            "\n",
            r#"  {"id":"t-3","outcome":"genuine"}"#,
            "\n",
            r#"{"id":"t-4","outcome":"refund"}"#,
            "\n",
            r#"{"id":"t-5","outcome":"fraud"}"#,
            "\n",
        );
        assert_eq!(parse_fraud_ids(text).unwrap(), ["t-1", "t-2", "t-5"]);
        let guid = "{3F2504E0-4F89-11D3-9A0C-0305E82C3301}\n";
        assert_eq!(parse_fraud_ids(guid).unwrap(), [guid.trim()]);
        let e = parse_fraud_ids("t-1\n{\"id\":\"t-2\",\"outcome\":\"4111111111111111\"}\n")
            .unwrap_err();
        assert!(e.starts_with("line 2: not an outcome:"), "{e}");
        assert!(!e.contains("4111"), "{e}");
    }

    /// Caught and missed fraud, flagged legitimate traffic, per-rule precision (a shadow
    /// rule too), amounts per currency, a retry scored once, fraud ids not in the traffic.
    #[test]
    fn a_backtest_scores_each_transaction_once_overall_and_per_rule() {
        let e = engine();
        let ids = ["f-big", "f-mid", "f-small", "f-tiny", "f-absent"];
        let mut bt = Backtest::new(ids.map(String::from).to_vec(), &e.rules());
        let txns = [
            ("f-big", "5000", "EUR"),
            ("f-mid", "500", "EUR"),
            ("f-small", "50", "EUR"),
            ("f-tiny", "1", "USD"),
            ("l-1", "20", "EUR"),
            ("l-2", "300", "EUR"),
            ("l-3", "1", "EUR"),
            ("l-4", "2000", "EUR"),
        ];
        let t0 = 1_764_000_000_000;
        for (i, (id, amount, cur)) in txns.iter().enumerate() {
            let json = format!(r#"{{"id":"{id}","card":"c-{i}","amount":"{amount}"}}"#);
            let o = e.decide(&Transaction::from_json(json.as_bytes()).unwrap(), t0);
            bt.add(&o.decision, amount.parse().unwrap(), cur);
        }
        // Retries decided again (past the retry horizon): not scored twice.
        for (i, id, amount) in [(0, "f-big", 5000), (5, "l-2", 300)] {
            let json = format!(r#"{{"id":"{id}","card":"c-{i}","amount":"{amount}"}}"#);
            let o = e.decide(
                &Transaction::from_json(json.as_bytes()).unwrap(),
                t0 + 600_000,
            );
            assert!(!o.duplicate && !o.id_reused);
            bt.add(&o.decision, Decimal::from(amount), "EUR");
        }
        assert_eq!(bt.rescored, 2);

        assert_eq!(
            bt.fraud,
            ByAction {
                approved: 2,
                held: 1,
                rejected: 1
            }
        );
        assert_eq!(
            bt.legit,
            ByAction {
                approved: 2,
                held: 1,
                rejected: 1
            }
        );
        assert_eq!(bt.fraud_ids_not_seen(), 1);
        assert_eq!(
            bt.fraud_amount["EUR"],
            (Decimal::from(5500), Decimal::from(5550))
        );
        assert_eq!(bt.fraud_amount["USD"], (Decimal::ZERO, Decimal::ONE));
        let rule = |id: &str| bt.rules.iter().find(|r| &*r.0 == id).unwrap().3;
        // `mid` fires on everything above 100, `big` too above 1000.
        assert_eq!(
            rule("big"),
            RuleScore {
                on_fraud: 1,
                on_legit: 1
            }
        );
        assert_eq!(
            rule("mid"),
            RuleScore {
                on_fraud: 2,
                on_legit: 2
            }
        );
        assert_eq!(
            rule("tiny"),
            RuleScore {
                on_fraud: 1,
                on_legit: 1
            }
        );
        let report = bt.report();
        for line in [
            "backtest: 8 transactions scored, 4 of them fraud (5 fraud ids, 1 not scored: not in the traffic, or on an invalid line)",
            "  2 retries decided again past the retry horizon, scored once",
            "  fraud caught:    2 of 4 (50.0 %): 1 rejected, 1 held; 2 approved",
            "  fraud amount caught: EUR 5500 of 5550 (99.1 %)",
            "  fraud amount caught: USD 0 of 1 (0.0 %)",
            "  legit flagged:   2 of 4 (50.0 %): 1 rejected, 1 held",
            "  precision:       50.0 % of the 4 held or rejected were fraud",
        ] {
            assert!(
                report.lines().any(|l| l == line),
                "{line:?} not in\n{report}"
            );
        }
        let tiny = report.lines().find(|l| l.contains("tiny")).unwrap();
        let cols: Vec<&str> = tiny.split_whitespace().collect();
        assert_eq!(
            cols,
            ["tiny", "shadow", "hold", "2", "1", "50.0", "%", "25.0", "%"]
        );
    }

    /// A currency field holding a card number is not printed in clear.
    #[test]
    fn the_report_masks_a_card_number_sent_as_the_currency() {
        let e = engine();
        let mut bt = Backtest::new(vec!["f-1".into()], &e.rules());
        let json = r#"{"id":"f-1","card":"c-1","amount":"10.5"}"#;
        let o = e.decide(&Transaction::from_json(json.as_bytes()).unwrap(), 1);
        bt.add(&o.decision, Decimal::new(105, 1), "4000000000000002");
        let report = bt.report();
        assert!(!report.contains("4000000000000002"), "{report}");
        assert!(report.contains("fraud amount caught: "), "{report}");
    }
}
