//! The TOML shape of a rule file, as analysts write it.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    pub ruleset: Option<Spanned<RulesetSection>>,
    // Names keep their spans, so that an error about a name points at the name.
    #[serde(default)]
    pub attrs: BTreeMap<Spanned<String>, Spanned<String>>,
    #[serde(default)]
    pub lists: BTreeMap<Spanned<String>, Spanned<ListDef>>,
    #[serde(default)]
    pub windows: BTreeMap<Spanned<String>, Spanned<WindowDef>>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<Spanned<RuleDef>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesetSection {
    /// The analysts' label for this version of the rules.
    pub version: Spanned<String>,
    /// Total score at which a transaction is held for review.
    pub hold_at: Spanned<i64>,
    /// Total score at which a transaction is rejected.
    pub reject_at: Spanned<i64>,
}

/// A list: inline values, or a text file next to the rule file.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ListDef {
    Strings(Vec<String>),
    Ints(Vec<i64>),
    File(ListFile),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListFile {
    /// Path relative to the rule file's directory.
    pub file: String,
    /// `"string"` (default) or `"int"`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowDef {
    /// `count`, `sum` or `distinct`.
    pub agg: Spanned<String>,
    /// The field summed or counted distinct.
    pub of: Option<Spanned<String>>,
    /// The entity key: one field or a list of fields.
    pub by: Spanned<By>,
    /// Window length, e.g. `10m`, `24h`, `7d`.
    pub over: Spanned<String>,
    /// Only events matching this expression are aggregated.
    #[serde(rename = "where")]
    pub filter: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum By {
    One(String),
    Many(Vec<String>),
}

impl By {
    pub fn fields(&self) -> Vec<String> {
        match self {
            By::One(s) => vec![s.clone()],
            By::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleDef {
    pub id: Spanned<String>,
    pub description: String,
    pub when: Spanned<String>,
    /// `block`, `reject`, `hold` or `allow`.
    pub action: Option<Spanned<String>>,
    pub score: Option<Spanned<i64>>,
    /// `active` (default) or `shadow`.
    pub mode: Option<Spanned<String>>,
    /// Short text put in the decision; defaults to the description.
    pub reason: Option<String>,
}
