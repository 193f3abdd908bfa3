//! Outcomes reported after a decision: what became of a transaction the engine decided (a
//! chargeback, a refund, fraud confirmed, genuine confirmed). The switch, the back office
//! or a reviewer sends one per transaction on `fraud.outcome`, with the decision it got
//! from the engine; the service counts them by the decision's action and by each rule
//! that fired, so the dashboards show chargeback and refund rates and every rule's
//! precision on live traffic (shadow rules included) — what a backtest shows on history.
//!
//! Pure: decoding, and the table of outcomes already counted (the clock is passed in).
//! Nothing here changes a decision or the windows.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;

use serde::Deserialize;

use crate::decision::Action;
use crate::rules::Mode;
use crate::txn::{DecodeError, ErrorCode};

/// What became of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// The cardholder's bank disputed it.
    Chargeback,
    /// Confirmed fraud (an issuer's fraud report, a closed case, a reviewer's verdict).
    Fraud,
    /// The merchant gave the money back.
    Refund,
    /// Confirmed genuine (a held transaction a reviewer released, a customer's
    /// confirmation): a false positive when rules flagged it.
    Genuine,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Chargeback, Kind::Fraud, Kind::Refund, Kind::Genuine];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Chargeback => "chargeback",
            Kind::Fraud => "fraud",
            Kind::Refund => "refund",
            Kind::Genuine => "genuine",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A rule that fired in the reported decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FiredRule {
    pub id: String,
    pub mode: Mode,
}

/// One reported outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feedback {
    /// The transaction's id, as decided.
    pub id: String,
    pub kind: Kind,
    /// The decision's action, when the decision came with the outcome.
    pub action: Option<Action>,
    /// The rules that fired in that decision (active and shadow).
    pub rules: Vec<FiredRule>,
}

/// Most rules one decision may list (more than any rule set of people's making).
pub const MAX_RULES: usize = 256;

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    outcome: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    decision: Option<WireDecision<'a>>,
}

#[derive(Deserialize)]
struct WireDecision<'a> {
    #[serde(borrow, default)]
    id: Option<std::borrow::Cow<'a, str>>,
    action: Action,
    #[serde(borrow, default)]
    rules: Vec<WireRule<'a>>,
}

#[derive(Deserialize)]
struct WireRule<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    #[serde(default = "active")]
    mode: Mode,
}

fn active() -> Mode {
    Mode::Active
}

/// A rule id as rule files allow it: 1-64 letters, digits, `_`, `-` or `.`, and no card
/// number (it becomes a metric label).
fn rule_id_ok(id: &str) -> bool {
    crate::rules::valid_rule_id(id) && !crate::txn::holds_card_number(id)
}

impl Feedback {
    /// Decodes `{"id": ..., "outcome": "chargeback" | "fraud" | "refund" | "genuine",
    /// "decision": {...}}`, where `decision` (optional) is the decision as the engine sent
    /// it; of it only `id`, `action` and each rule's `id` and `mode` are read. Errors use
    /// the transactions' codes and never repeat an input value.
    pub fn from_json(bytes: &[u8]) -> Result<Feedback, DecodeError> {
        let w: Wire<'_> = serde_json::from_slice(bytes).map_err(DecodeError::from_serde)?;
        let id = w.id.into_owned();
        crate::txn::check_id(&id)?;
        let refuse = |code, message: &str| {
            Err(DecodeError {
                code,
                message: message.into(),
                id: Some(id.clone()),
            })
        };
        let Some(kind) = Kind::parse(&w.outcome) else {
            return refuse(
                ErrorCode::WrongType,
                "field `outcome` must be one of chargeback, fraud, refund, genuine",
            );
        };
        let (action, rules) = match w.decision {
            None => (None, Vec::new()),
            Some(d) => {
                if d.id.is_some_and(|d| *d != *id) {
                    return refuse(
                        ErrorCode::WrongType,
                        "field `decision` holds the decision of another transaction (its `id` differs)",
                    );
                }
                if d.rules.len() > MAX_RULES {
                    return refuse(
                        ErrorCode::WrongType,
                        "field `decision.rules` lists more than 256 rules",
                    );
                }
                if !d.rules.iter().all(|r| rule_id_ok(&r.id)) {
                    return refuse(
                        ErrorCode::WrongType,
                        "a rule id in `decision.rules` is not 1-64 letters, digits, _ - or ., or holds a card number",
                    );
                }
                // A rule listed twice is credited once.
                let mut rules: Vec<FiredRule> = Vec::with_capacity(d.rules.len());
                for r in d.rules {
                    if !rules.iter().any(|k| k.id == *r.id) {
                        rules.push(FiredRule {
                            id: r.id.into_owned(),
                            mode: r.mode,
                        });
                    }
                }
                (Some(d.action), rules)
            }
        };
        Ok(Feedback {
            id,
            kind,
            action,
            rules,
        })
    }
}

/// How long an outcome is remembered, so that the same outcome sent again (a retry, a
/// report file read twice) is not counted twice.
pub const REMEMBERED_FOR_MS: i64 = 24 * 3600 * 1000;

/// Most outcomes remembered; past it the oldest is forgotten first (~50 MB at the cap:
/// the map's slots and the order queue).
pub const MAX_REMEMBERED: usize = 1 << 20;

/// Outcomes counted in the last [`REMEMBERED_FOR_MS`], by a keyed hash of id and kind (a
/// chargeback and a refund of one transaction are both counted).
pub struct Seen {
    hasher: std::collections::hash_map::RandomState,
    at: HashMap<u64, i64>,
    order: VecDeque<(i64, u64)>,
    horizon_ms: i64,
    cap: usize,
}

impl Default for Seen {
    fn default() -> Self {
        Seen::new(REMEMBERED_FOR_MS, MAX_REMEMBERED)
    }
}

impl Seen {
    pub fn new(horizon_ms: i64, cap: usize) -> Seen {
        Seen {
            hasher: Default::default(),
            at: HashMap::new(),
            order: VecDeque::new(),
            horizon_ms,
            cap: cap.max(1),
        }
    }

    /// Whether this is the first report of `kind` for `id` within the horizon (then it is
    /// remembered from `now_ms`). A repeat does not extend the horizon.
    pub fn first(&mut self, id: &str, kind: Kind, now_ms: i64) -> bool {
        while let Some(&(t, h)) = self.order.front() {
            if now_ms - t < self.horizon_ms && self.order.len() < self.cap {
                break;
            }
            self.order.pop_front();
            if self.at.get(&h) == Some(&t) {
                self.at.remove(&h);
            }
        }
        let h = self.hasher.hash_one((id, kind));
        if self.at.contains_key(&h) {
            return false;
        }
        self.at.insert(h, now_ms);
        self.order.push_back((now_ms, h));
        true
    }

    pub fn len(&self) -> usize {
        self.at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> DecodeError {
        Feedback::from_json(s.as_bytes()).unwrap_err()
    }

    #[test]
    fn an_outcome_is_read_with_the_decision_it_came_with() {
        let f = Feedback::from_json(
            br#"{"id":"t-1","outcome":"chargeback","decision":{"id":"t-1","action":"approve",
                "score":20,"card":"411111******1111","rules":[
                  {"id":"young_merchant","score":20,"mode":"active","values":{}},
                  {"id":"new_rule","mode":"shadow","action":"hold"}],
                "rules_version":"v1","engine_us":3},"reason":"10.4"}"#,
        )
        .unwrap();
        assert_eq!(f.id, "t-1");
        assert_eq!(f.kind, Kind::Chargeback);
        assert_eq!(f.action, Some(Action::Approve));
        assert_eq!(
            f.rules,
            vec![
                FiredRule {
                    id: "young_merchant".into(),
                    mode: Mode::Active
                },
                FiredRule {
                    id: "new_rule".into(),
                    mode: Mode::Shadow
                }
            ]
        );
        let bare = Feedback::from_json(br#"{"id":"t-2","outcome":"genuine"}"#).unwrap();
        assert_eq!((bare.kind, bare.action), (Kind::Genuine, None));
        assert!(bare.rules.is_empty());
        // A rule without a mode is an active one (decisions kept before modes existed).
        let f = Feedback::from_json(
            br#"{"id":"t-3","outcome":"fraud","decision":{"action":"hold","rules":[{"id":"r"}]}}"#,
        )
        .unwrap();
        assert_eq!(f.rules[0].mode, Mode::Active);
        // A rule listed twice is credited once.
        let f = Feedback::from_json(
            br#"{"id":"t-4","outcome":"fraud","decision":{"action":"hold","rules":[{"id":"r"},{"id":"q"},{"id":"r"}]}}"#,
        )
        .unwrap();
        let ids: Vec<&str> = f.rules.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["r", "q"]);
        for k in Kind::ALL {
            let s = format!(r#"{{"id":"x","outcome":"{}"}}"#, k.as_str());
            assert_eq!(Feedback::from_json(s.as_bytes()).unwrap().kind, k);
        }
    }

    #[test]
    fn bad_outcomes_are_refused_with_a_code_and_no_input_value() {
        assert_eq!(err("{").code, ErrorCode::InvalidJson);
        assert_eq!(err(r#"{"outcome":"fraud"}"#).code, ErrorCode::MissingField);
        assert_eq!(err(r#"{"id":"t","outcome":""}"#).id.as_deref(), Some("t"));
        let e = err(r#"{"id":"t","outcome":"4111111111111111"}"#);
        assert_eq!(e.code, ErrorCode::WrongType);
        assert!(e.message.contains("chargeback, fraud"), "{}", e.message);
        assert!(!e.message.contains("4111"), "{}", e.message);
        let e = err(r#"{"id":4111111111111111,"outcome":"fraud"}"#);
        assert_eq!(e.code, ErrorCode::WrongType);
        assert!(!e.message.contains("4111"), "{}", e.message);
        assert_eq!(
            err(r#"{"id":"","outcome":"fraud"}"#).code,
            ErrorCode::MissingField
        );
        assert_eq!(
            err(r#"{"id":" t","outcome":"fraud"}"#).code,
            ErrorCode::WrongType
        );
        let e = err(r#"{"id":"t-1","outcome":"fraud","decision":{"id":"t-2","action":"hold"}}"#);
        assert!(e.message.contains("another transaction"), "{}", e.message);
        let e = err(r#"{"id":"t","outcome":"fraud","decision":{"action":"maybe"}}"#);
        assert_eq!(e.code, ErrorCode::WrongType);
        assert_eq!(
            err(r#"{"id":"t","outcome":"fraud","decision":{"rules":[]}}"#).code,
            ErrorCode::MissingField
        );
        let e = err(
            r#"{"id":"t","outcome":"fraud","decision":{"action":"hold","rules":[{"id":"a b"}]}}"#,
        );
        assert!(e.message.contains("rule id"), "{}", e.message);
        // A card number as a rule id would become a metric label.
        for id in ["4111111111111111", "r-4111-1111-1111-1111"] {
            let s = format!(
                r#"{{"id":"t","outcome":"fraud","decision":{{"action":"hold","rules":[{{"id":"{id}"}}]}}}}"#
            );
            let e = err(&s);
            assert_eq!(e.code, ErrorCode::WrongType, "{id}");
            assert!(!e.message.contains("4111"), "{}", e.message);
        }
        let many: Vec<String> = (0..=MAX_RULES)
            .map(|i| format!(r#"{{"id":"r{i}"}}"#))
            .collect();
        let s = format!(
            r#"{{"id":"t","outcome":"fraud","decision":{{"action":"hold","rules":[{}]}}}}"#,
            many.join(",")
        );
        assert!(err(&s).message.contains("more than 256"));
    }

    #[test]
    fn an_outcome_is_counted_once_within_the_horizon() {
        let mut s = Seen::new(1000, 100);
        assert!(s.first("t-1", Kind::Chargeback, 0));
        assert!(!s.first("t-1", Kind::Chargeback, 500), "a retry");
        assert!(
            s.first("t-1", Kind::Refund, 500),
            "another kind of the same id"
        );
        assert!(s.first("t-2", Kind::Chargeback, 600));
        // A repeat does not extend the horizon: forgotten 1000 ms after the first.
        assert!(!s.first("t-1", Kind::Chargeback, 999));
        assert!(s.first("t-1", Kind::Chargeback, 1000));
        assert_eq!(s.len(), 3);
        // At the cap the oldest is forgotten first.
        let mut s = Seen::new(1000, 2);
        assert!(s.first("a", Kind::Fraud, 0));
        assert!(s.first("b", Kind::Fraud, 1));
        assert!(s.first("c", Kind::Fraud, 2));
        assert_eq!(s.len(), 2);
        assert!(!s.first("c", Kind::Fraud, 3));
        assert!(s.first("a", Kind::Fraud, 4), "forgotten at the cap");
    }
}
