//! Decisions and the precedence that combines fired rules.
//!
//! Precedence, first match wins (only `active` rules count; shadow rules are reported but
//! never change the action or the score):
//! 1. a `block` rule fired          -> reject  (block lists, emergency freezes)
//! 2. a `reject` rule fired         -> reject  (hard limits; an allow rule cannot override)
//! 3. an `allow` rule fired         -> approve (overrides holds and score outcomes)
//! 4. the most severe of: a `hold` rule fired (hold), and the total score against the
//!    thresholds (`>= reject_at` reject, `>= hold_at` hold)
//! 5. otherwise                     -> approve

use std::sync::Arc;

use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::rules::{Mode, RuleAction};

/// What the switch should do with the transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Approve,
    Hold,
    Reject,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Approve => "approve",
            Action::Hold => "hold",
            Action::Reject => "reject",
        }
    }
    pub const ALL: [Action; 3] = [Action::Approve, Action::Hold, Action::Reject];
}

/// A rule that fired, with the values it read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FiredRule {
    pub id: Arc<str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<RuleAction>,
    pub score: i64,
    pub mode: Mode,
    pub reason: Arc<str>,
    /// Values of the fields, attributes and windows the condition read. Card numbers are
    /// masked; decimals are strings, so they stay exact.
    pub values: Values,
    /// The rule's condition as written (so the thresholds the values met are in the
    /// decision). Empty, and left out, in decisions kept before it existed.
    #[serde(default, skip_serializing_if = "str::is_empty")]
    pub when: Arc<str>,
}

/// Named values, in the order the condition reads them; serialised as a JSON object.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Values(pub Vec<(Arc<str>, serde_json::Value)>);

impl Values {
    pub fn get(&self, name: &str) -> Option<&serde_json::Value> {
        self.0.iter().find(|(n, _)| &**n == name).map(|(_, v)| v)
    }
}

impl std::ops::Index<&str> for Values {
    type Output = serde_json::Value;
    fn index(&self, name: &str) -> &serde_json::Value {
        self.get(name).unwrap_or(&serde_json::Value::Null)
    }
}

impl<'de> Deserialize<'de> for Values {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Values, D::Error> {
        let m = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        Ok(Values(m.into_iter().map(|(k, v)| (k.into(), v)).collect()))
    }
}

impl Serialize for Values {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(&**k, v)?;
        }
        m.end()
    }
}

/// The engine's answer for one transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub id: String,
    pub action: Action,
    /// Sum of the scores of active rules that fired.
    pub score: i64,
    /// Which step of the precedence decided: `block:<rule>`, `reject:<rule>`,
    /// `allow:<rule>`, `hold:<rule>`, `score` or `default`.
    pub decided_by: String,
    /// The card, masked (first 6 + last 4).
    pub card: String,
    /// Event time used for windows and local-time helpers (epoch ms).
    pub ts: i64,
    pub rules: Vec<FiredRule>,
    pub rules_version: Arc<str>,
    /// Engine time spent on this decision, in microseconds.
    pub engine_us: u64,
}

impl Decision {
    pub fn to_json(&self) -> String {
        // Only ever valid UTF-8: serde_json writes strings escaped.
        String::from_utf8(self.to_json_vec()).unwrap_or_default()
    }

    /// The JSON as bytes, written into one buffer sized for it up front (growing a
    /// buffer step by step costs reallocations and copies on every decision).
    pub fn to_json_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(192 + 256 * self.rules.len());
        match serde_json::to_writer(&mut v, self) {
            Ok(()) => v,
            Err(e) => format!(r#"{{"id":null,"error":{{"code":"internal","message":"{e}"}}}}"#)
                .into_bytes(),
        }
    }
}

/// Combines fired rules (in rule order) into an action, a total score and the reason.
pub fn combine(fired: &[FiredRule], hold_at: i64, reject_at: i64) -> (Action, i64, String) {
    let active = || fired.iter().filter(|r| r.mode == Mode::Active);
    let score = active().fold(0i64, |s, r| s.saturating_add(r.score));
    let first = |a: RuleAction| active().find(|r| r.action == Some(a)).map(|r| &*r.id);
    if let Some(id) = first(RuleAction::Block) {
        return (Action::Reject, score, format!("block:{id}"));
    }
    if let Some(id) = first(RuleAction::Reject) {
        return (Action::Reject, score, format!("reject:{id}"));
    }
    if let Some(id) = first(RuleAction::Allow) {
        return (Action::Approve, score, format!("allow:{id}"));
    }
    if score >= reject_at {
        return (Action::Reject, score, "score".into());
    }
    if let Some(id) = first(RuleAction::Hold) {
        return (Action::Hold, score, format!("hold:{id}"));
    }
    if score >= hold_at {
        return (Action::Hold, score, "score".into());
    }
    (Action::Approve, score, "default".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(id: &str, action: Option<RuleAction>, score: i64, mode: Mode) -> FiredRule {
        FiredRule {
            id: id.into(),
            action,
            score,
            mode,
            reason: "".into(),
            values: Default::default(),
            when: "".into(),
        }
    }

    #[test]
    fn a_rule_condition_is_shown_and_optional_when_read_back() {
        let mut fired = r("x", Some(RuleAction::Hold), 0, Mode::Active);
        fired.when = "amount > 1000".into();
        let json = serde_json::to_string(&fired).unwrap();
        assert!(json.ends_with(r#","when":"amount > 1000"}"#), "{json}");
        // Kept before the field existed (retry table, snapshot): read back without it.
        let old = r#"{"id":"x","action":"hold","score":0,"mode":"active","reason":"","values":{}}"#;
        let back: FiredRule = serde_json::from_str(old).unwrap();
        assert!(back.when.is_empty());
        assert!(!serde_json::to_string(&back).unwrap().contains("when"));
    }

    #[test]
    fn precedence() {
        use Mode::*;
        use RuleAction::*;
        let c = |v: &[FiredRule]| {
            let (a, s, by) = combine(v, 50, 100);
            (a, s, by)
        };
        assert_eq!(c(&[]), (Action::Approve, 0, "default".into()));
        // Block beats allow.
        let v = [
            r("allow", Some(Allow), 0, Active),
            r("bl", Some(Block), 0, Active),
        ];
        assert_eq!(c(&v).0, Action::Reject);
        assert_eq!(c(&v).2, "block:bl");
        // A hard limit beats allow.
        let v = [
            r("allow", Some(Allow), 0, Active),
            r("lim", Some(Reject), 0, Active),
        ];
        assert_eq!(c(&v).2, "reject:lim");
        // Allow beats hold and score.
        let v = [
            r("h", Some(Hold), 0, Active),
            r("s", None, 200, Active),
            r("allow", Some(Allow), 0, Active),
        ];
        assert_eq!(c(&v), (Action::Approve, 200, "allow:allow".into()));
        // Score reject beats a hold rule (most severe wins).
        let v = [r("h", Some(Hold), 0, Active), r("s", None, 120, Active)];
        assert_eq!(c(&v), (Action::Reject, 120, "score".into()));
        // Hold rule with a small score.
        let v = [r("h", Some(Hold), 10, Active)];
        assert_eq!(c(&v), (Action::Hold, 10, "hold:h".into()));
        // Scores add up to the hold threshold.
        let v = [r("a", None, 30, Active), r("b", None, 20, Active)];
        assert_eq!(c(&v), (Action::Hold, 50, "score".into()));
        // Shadow rules change nothing.
        let v = [r("x", Some(Block), 500, Shadow)];
        assert_eq!(c(&v), (Action::Approve, 0, "default".into()));
        // Negative scores offset.
        let v = [r("a", None, 60, Active), r("trusted", None, -20, Active)];
        assert_eq!(c(&v).0, Action::Approve);
    }
}
