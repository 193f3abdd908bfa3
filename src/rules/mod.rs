//! Rule files: loading, checking and compiling a rule directory into a [`RuleSet`].
//!
//! [`load_dir`] is the one load path: `fraudgate check`, startup and hot reload all call it.
//! It reads every `*.toml` file of the directory (and the list files they name), then
//! [`compile`] checks everything and either returns a complete rule set or every error
//! found, each with file, line, column and a caret excerpt. Nothing is half-loaded.

pub mod diag;
pub mod expr;
pub mod file;
pub mod syntax;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rust_decimal::Decimal;
use siphasher::sip128::{Hasher128, SipHasher13};
use toml::Spanned;

pub use diag::{Diagnostic, SourceFile};
pub use expr::{AttrType, BoolFn, Ctx, Field, Reader, Tri};

use crate::config::{parse_duration, EngineConfig};
use crate::keyhash::{HashKey, KeyHasher};
use crate::txn::AttrValue;
use crate::window::Layout;
use expr::{CompiledList, ExprCompiler, NumSet, Scope, StrSet};

/// What a rule does when it fires (besides adding its score).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    /// Reject, overriding everything (block lists, emergency freezes).
    Block,
    /// Reject: a hard limit. An allow rule does not override it.
    Reject,
    /// Hold for manual review.
    Hold,
    /// Approve, overriding holds and score-based outcomes (not blocks or rejects).
    Allow,
}

impl RuleAction {
    fn parse(s: &str) -> Option<RuleAction> {
        Some(match s {
            "block" => RuleAction::Block,
            "reject" => RuleAction::Reject,
            "hold" => RuleAction::Hold,
            "allow" => RuleAction::Allow,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Active,
    /// Evaluated and reported, never changes the action or the score.
    Shadow,
}

/// A compiled rule.
pub struct Rule {
    pub id: Arc<str>,
    pub description: String,
    /// Shared with every decision the rule fires in (no copy per decision).
    pub reason: Arc<str>,
    pub action: Option<RuleAction>,
    pub score: i64,
    pub mode: Mode,
    pub when: BoolFn,
    /// The condition as written (`condition_text`: comments dropped, whitespace outside
    /// literals collapsed, card numbers masked): with `reads`, a fired rule shows the
    /// values it read and what it compared them with.
    pub condition: Arc<str>,
    /// Names the condition reads, reported with their values when the rule fires.
    pub reads: Vec<(Arc<str>, Reader)>,
    /// File the rule came from.
    pub file: String,
}

/// A field used as (part of) an entity key or as the value of a distinct count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyField {
    Field(Field),
    Attr(usize),
}

impl KeyField {
    /// Feeds this field of the transaction into `h`; `false` when the field is missing.
    #[inline]
    pub fn hash_into(&self, c: &Ctx<'_>, h: &mut KeyHasher) -> bool {
        match *self {
            KeyField::Field(f) => match f {
                Field::Id => h.part(c.txn.id.as_bytes()),
                Field::Card => h.part(c.txn.card.as_bytes()),
                Field::Currency => h.part(c.currency.as_bytes()),
                Field::Device => match &c.txn.device {
                    Some(v) => h.part(v.as_bytes()),
                    None => return false,
                },
                Field::Merchant => match &c.txn.merchant {
                    Some(v) => h.part(v.as_bytes()),
                    None => return false,
                },
                Field::Region => match &c.txn.region {
                    Some(v) => h.part(v.as_bytes()),
                    None => return false,
                },
                Field::Amount => h.part(&c.txn.amount.normalize().serialize()),
                Field::Mcc => match c.txn.mcc {
                    Some(v) => h.part(&v.to_le_bytes()),
                    None => return false,
                },
                Field::LocalHour | Field::LocalWeekday => return false,
            },
            KeyField::Attr(i) => match c.attrs[i] {
                Some(AttrValue::Str(s)) => h.part(s.as_bytes()),
                Some(AttrValue::Num(d)) => h.part(&d.normalize().serialize()),
                Some(AttrValue::Bool(b)) => h.part(&[u8::from(*b)]),
                None => return false,
            },
        }
        true
    }
}

/// The value summed by a sum window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SumOf {
    Amount,
    Attr(usize),
}

impl SumOf {
    #[inline]
    pub fn value(&self, c: &Ctx<'_>) -> Option<Decimal> {
        match *self {
            SumOf::Amount => Some(c.txn.amount),
            // Attribute values get the same bounds as amounts before they are summed, so a
            // window sum can never overflow (an out-of-range value adds nothing). Trailing
            // zeros are no precision, as in an amount: `12.500000000` adds 12.5.
            SumOf::Attr(i) => match c.attrs[i] {
                Some(AttrValue::Num(d)) => crate::txn::within_amount_scale(*d)
                    .filter(|d| d.abs() < Decimal::from(crate::txn::MAX_AMOUNT)),
                _ => None,
            },
        }
    }
}

/// Which aggregate of a group a window reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowRead {
    Count(usize),
    Sum(usize),
    Distinct(usize),
}

/// A declared window: a named feature.
#[derive(Debug, Clone)]
pub struct WindowDef {
    pub name: String,
    pub group: usize,
    pub read: WindowRead,
    /// Length in buckets.
    pub buckets: i64,
    /// Index into the int (count, distinct) or decimal (sum) features.
    pub feature: usize,
    pub signature: String,
}

/// Windows that share an entity key (`by`): one map of key states in the engine.
pub struct Group {
    /// Canonical key description, e.g. `card` or `amount,card,merchant`.
    pub signature: String,
    pub by: Vec<KeyField>,
    pub layout: Layout,
    /// Count slots: optional filter.
    pub counts: Vec<(String, Option<BoolFn>)>,
    /// Sum slots: value and optional filter.
    pub sums: Vec<(String, SumOf, Option<BoolFn>)>,
    /// Distinct slots: value and optional filter.
    pub distincts: Vec<(String, KeyField, Option<BoolFn>)>,
}

/// A fully compiled, immutable rule set.
pub struct RuleSet {
    /// `label+hash`: the analysts' label and a content hash of every file.
    pub version: String,
    pub label: String,
    pub content_hash: String,
    pub hold_at: i64,
    pub reject_at: i64,
    pub rules: Vec<Rule>,
    /// Declared attributes, sorted by name, with their types.
    pub attrs: Vec<(String, AttrType)>,
    pub groups: Vec<Group>,
    pub windows: Vec<WindowDef>,
    pub int_features: usize,
    pub dec_features: usize,
    /// Lists by name with their entry counts.
    pub lists: BTreeMap<String, usize>,
    /// Lists with entries that end (`until`): the ends (ms since the epoch), sorted.
    pub list_ends: BTreeMap<String, Vec<i64>>,
    /// The compiled lists, to tell what a reload changed ([`RuleSet::list_changes`]).
    pub list_sets: BTreeMap<String, CompiledList>,
    pub needs_local_time: bool,
    pub files: Vec<String>,
    /// Lists and windows nothing reads, one line each (`file:line:col`, never the
    /// source text: an inline list may hold card numbers). The set loads anyway.
    pub warnings: Vec<String>,
}

/// What a declared name is, for the unused-name warnings.
#[derive(Clone, Copy)]
enum Declared {
    List,
    Window,
}

impl std::fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleSet")
            .field("version", &self.version)
            .field("rules", &self.rules.len())
            .field("windows", &self.windows.len())
            .finish()
    }
}

impl RuleSet {
    /// One-paragraph summary for `fraudgate check` and reload logs.
    pub fn summary(&self) -> String {
        let shadow = self.rules.iter().filter(|r| r.mode == Mode::Shadow).count();
        let rule_files = self.files.iter().filter(|f| f.ends_with(".toml")).count();
        format!(
            "{} rule files + {} list files, {} rules ({} shadow), {} windows in {} key groups, {} lists, {} attrs; hold_at {}, reject_at {}; version {}",
            rule_files,
            self.files.len() - rule_files,
            self.rules.len(),
            shadow,
            self.windows.len(),
            self.groups.len(),
            self.lists.len(),
            self.attrs.len(),
            self.hold_at,
            self.reject_at,
            self.version
        )
    }
}

/// How one list differs between two rule sets: entries (keyed hashes for string lists,
/// so no entry is ever shown) added, removed, and kept with another end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListChange {
    pub name: String,
    pub added: usize,
    pub removed: usize,
    pub ends_changed: usize,
    /// Entries now.
    pub entries: usize,
}

impl std::fmt::Display for ListChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} +{} -{}", self.name, self.added, self.removed)?;
        if self.ends_changed > 0 {
            write!(f, " ~{} end(s)", self.ends_changed)?;
        }
        write!(f, " ({} entries)", self.entries)
    }
}

impl RuleSet {
    /// The lists whose entries differ from `old`'s (a list new or gone counts all its
    /// entries), for the reload log: an audit line per change, without entries in clear.
    pub fn list_changes(&self, old: &RuleSet) -> Vec<ListChange> {
        use std::collections::BTreeSet;
        // An entry's end in `s`: `Some(None)` listed without one, `None` not listed.
        fn end(s: &StrSet, h: &crate::keyhash::KeyHash) -> Option<Option<i64>> {
            if s.hashes.contains(h) {
                Some(None)
            } else {
                s.until.get(h).map(|&u| Some(u))
            }
        }
        let len = |l: &CompiledList| match l {
            CompiledList::Str(s) => s.len(),
            CompiledList::Num(n) => n.values.len(),
        };
        // Looked up in place: a reload of a million-entry list copies nothing.
        let names: BTreeSet<&String> = self.list_sets.keys().chain(old.list_sets.keys()).collect();
        names
            .into_iter()
            .filter_map(|name| {
                let (added, removed, ends_changed, entries) =
                    match (self.list_sets.get(name), old.list_sets.get(name)) {
                        (Some(CompiledList::Str(n)), Some(CompiledList::Str(o))) => {
                            let (mut added, mut ends) = (0, 0);
                            let now = n.hashes.iter().map(|h| (h, None));
                            for (h, e) in now.chain(n.until.iter().map(|(h, &u)| (h, Some(u)))) {
                                match end(o, h) {
                                    None => added += 1,
                                    Some(before) if before != e => ends += 1,
                                    Some(_) => {}
                                }
                            }
                            let removed = o
                                .hashes
                                .iter()
                                .chain(o.until.keys())
                                .filter(|h| end(n, h).is_none())
                                .count();
                            (added, removed, ends, n.len())
                        }
                        (Some(CompiledList::Num(n)), Some(CompiledList::Num(o))) => {
                            let missing = |a: &NumSet, b: &NumSet| {
                                a.values
                                    .iter()
                                    .filter(|v| b.values.binary_search(v).is_err())
                                    .count()
                            };
                            (missing(n, o), missing(o, n), 0, n.values.len())
                        }
                        (Some(l), None) => (len(l), 0, 0, len(l)),
                        (None, Some(o)) => (0, len(o), 0, 0),
                        // The type changed: every entry is new.
                        (Some(l), Some(o)) => (len(l), len(o), 0, len(l)),
                        (None, None) => return None,
                    };
                (added + removed + ends_changed > 0).then(|| ListChange {
                    name: name.clone(),
                    added,
                    removed,
                    ends_changed,
                    entries,
                })
            })
            .collect()
    }
}

/// Rules failed to load: every diagnostic, with the files needed to render them.
#[derive(Debug, Clone)]
pub struct LoadError {
    pub files: Vec<SourceFile>,
    pub diagnostics: Vec<Diagnostic>,
}

impl LoadError {
    pub fn render(&self) -> String {
        diag::render(&self.files, &self.diagnostics)
    }
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.render())?;
        write!(f, "{} error(s); no rules loaded", self.diagnostics.len())
    }
}

impl std::error::Error for LoadError {}

/// Reads a rule directory (every `*.toml` but hidden ones, sorted by name, not recursive)
/// and compiles it. Hidden files (`.draft.toml`, macOS's `._limits.toml`) are not rules,
/// as a shell's `*.toml` would not match them.
pub fn load_dir(dir: &Path, cfg: &EngineConfig) -> Result<RuleSet, LoadError> {
    let fail = |msg: String| LoadError {
        files: Vec::new(),
        diagnostics: vec![Diagnostic::global("io", msg)],
    };
    let entries = std::fs::read_dir(dir)
        .map_err(|e| fail(format!("cannot read rule directory {}: {e}", dir.display())))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "toml")
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                && p.is_file()
        })
        .collect();
    paths.sort();
    let mut files = Vec::new();
    for p in &paths {
        let text = std::fs::read_to_string(p)
            .map_err(|e| fail(format!("cannot read {}: {e}", p.display())))?;
        files.push(SourceFile {
            name: p.display().to_string(),
            text,
        });
    }
    compile(files, &|name: &str| std::fs::read_to_string(name), cfg)
}

/// Reads a list file by the path shown to analysts.
pub type ReadFile<'a> = dyn Fn(&str) -> std::io::Result<String> + 'a;

struct Loader<'a> {
    /// Some expression (rule or window filter) reads local_hour / local_weekday.
    needs_local_time: bool,
    cfg: &'a EngineConfig,
    key: HashKey,
    /// Every file as read. Diagnostics quote them: a `LoadError` masks card numbers in
    /// its copy (see `compile`).
    files: Vec<SourceFile>,
    diags: Vec<Diagnostic>,
    /// Lists and windows some expression reads (for the unused-name warnings).
    read_names: std::collections::BTreeSet<String>,
    /// Comparisons known before any transaction: file, span in it, the warning.
    lints: Vec<(usize, std::ops::Range<usize>, &'static str, String)>,
}

/// File offset of every byte position `0..=value.len()` of a TOML string value, so that
/// spans inside an expression map exactly onto the file, escapes included. `None` when the
/// mapping cannot be worked out (the caller then points at the whole string).
fn value_offsets(text: &str, span: &std::ops::Range<usize>, value: &str) -> Option<Vec<usize>> {
    let raw = text.get(span.clone())?;
    if let Some(i) = raw.find(value) {
        // Verbatim (literal strings, or basic strings without escapes).
        return Some((0..=value.len()).map(|k| span.start + i + k).collect());
    }
    // A single-line basic string with escapes: walk it.
    let body = raw.strip_prefix('"')?;
    if body.starts_with("\"\"") {
        return None;
    }
    let bytes = body.as_bytes();
    let mut table = Vec::with_capacity(value.len() + 1);
    let mut i = 0;
    while table.len() < value.len() {
        let at = span.start + 1 + i;
        let (raw_len, val_len) = if bytes.get(i) == Some(&b'\\') {
            match bytes.get(i + 1)? {
                b'u' => (
                    6,
                    char::from_u32(u32::from_str_radix(body.get(i + 2..i + 6)?, 16).ok()?)?
                        .len_utf8(),
                ),
                b'U' => (
                    10,
                    char::from_u32(u32::from_str_radix(body.get(i + 2..i + 10)?, 16).ok()?)?
                        .len_utf8(),
                ),
                // TOML 1.1 `\xHH`.
                b'x' => (
                    4,
                    char::from_u32(u32::from_str_radix(body.get(i + 2..i + 4)?, 16).ok()?)?
                        .len_utf8(),
                ),
                // `\e` (TOML 1.1) and the one-letter escapes of TOML 1.0.
                b'b' | b't' | b'n' | b'f' | b'r' | b'e' | b'"' | b'\\' => (2, 1),
                // Anything else (a line-ending backslash cannot occur in a single-line
                // string): no mapping, the caller points at the whole string.
                _ => return None,
            }
        } else {
            let ch = body.get(i..)?.chars().next()?;
            (ch.len_utf8(), ch.len_utf8())
        };
        for _ in 0..val_len {
            table.push(at);
        }
        i += raw_len;
    }
    table.truncate(value.len());
    table.push(span.start + 1 + i);
    Some(table)
}

/// Compiles rule files. `read` loads list files named in them (relative to the rule file).
pub fn compile(
    files: Vec<SourceFile>,
    read: &ReadFile<'_>,
    cfg: &EngineConfig,
) -> Result<RuleSet, LoadError> {
    let mut l = Loader {
        needs_local_time: false,
        cfg,
        key: cfg.hash_key,
        files,
        diags: Vec::new(),
        read_names: Default::default(),
        lints: Vec::new(),
    };
    if l.files.is_empty() {
        l.diags.push(Diagnostic::global(
            "no-files",
            "no *.toml rule files found in the rule directory",
        ));
        return Err(LoadError {
            files: l.files,
            diagnostics: l.diags,
        });
    }
    // 1. Parse every file.
    let mut parsed: Vec<(usize, file::RuleFile)> = Vec::new();
    for i in 0..l.files.len() {
        match toml::from_str::<file::RuleFile>(&l.files[i].text) {
            Ok(f) => parsed.push((i, f)),
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                let msg = e.message().trim().to_string();
                l.diags.push(Diagnostic::new(
                    "toml",
                    i,
                    span,
                    format!("invalid rule file: {msg}"),
                    "here",
                ));
            }
        }
    }
    let broken = parsed.len() < l.files.len();
    let rs = l.build(&mut parsed, read);
    if broken {
        // A file that failed to parse declared nothing, so names it declares look unknown
        // elsewhere: those errors would mislead. Say how many were held back.
        let before = l.diags.len();
        l.diags
            .retain(|d| !matches!(d.code, "unknown-identifier" | "unknown-attribute"));
        let held = before - l.diags.len();
        if held > 0 {
            l.diags.push(Diagnostic::global(
                "held-back",
                format!(
                    "{held} unknown-name error(s) not shown: a file above failed to parse, so the names it declares are unknown; fix it and check again"
                ),
            ));
        }
    }
    match rs {
        Some(rs) if l.diags.is_empty() => Ok(rs),
        // What the errors quote goes to `check`'s output and the engine's log: rule files
        // may hold card numbers too (an inline list, a literal in a condition), and so
        // may a message quoting a value. Masking keeps lengths, so spans still fit.
        _ => Err(LoadError {
            files: (l.files.into_iter())
                .map(|f| SourceFile {
                    text: crate::txn::redact_pans(&f.text),
                    name: f.name,
                })
                .collect(),
            diagnostics: (l.diags.into_iter())
                .map(|mut d| {
                    d.message = crate::txn::redact_pans(&d.message);
                    d.label = crate::txn::redact_pans(&d.label);
                    for n in &mut d.notes {
                        *n = crate::txn::redact_pans(n);
                    }
                    d
                })
                .collect(),
        }),
    }
}

impl Loader<'_> {
    fn err(
        &mut self,
        code: &'static str,
        file: usize,
        span: std::ops::Range<usize>,
        msg: impl Into<String>,
        label: impl Into<String>,
    ) {
        self.diags
            .push(Diagnostic::new(code, file, span, msg, label));
    }

    fn build(
        &mut self,
        parsed: &mut [(usize, file::RuleFile)],
        read: &ReadFile<'_>,
    ) -> Option<RuleSet> {
        // 2. The [ruleset] table: exactly one.
        let mut ruleset: Option<(usize, &Spanned<file::RulesetSection>)> = None;
        for (fi, f) in parsed.iter() {
            if let Some(r) = &f.ruleset {
                if let Some((first, _)) = ruleset {
                    let first_name = self.files[first].name.clone();
                    self.err(
                        "duplicate-ruleset",
                        *fi,
                        r.span(),
                        "a second [ruleset] table",
                        format!("[ruleset] is already declared in {first_name}"),
                    );
                } else {
                    ruleset = Some((*fi, r));
                }
            }
        }
        let (label, hold_at, reject_at) = match ruleset {
            None => {
                if self.diags.is_empty() {
                    self.diags.push(
                        Diagnostic::global("missing-ruleset", "no file declares the [ruleset] table")
                            .note("add to one file:\n[ruleset]\nversion = \"2026-11-26.1\"\nhold_at = 50\nreject_at = 100"),
                    );
                }
                (String::new(), 0, 0)
            }
            Some((fi, r)) => {
                let r = r.get_ref();
                if *r.hold_at.get_ref() >= *r.reject_at.get_ref() {
                    self.err(
                        "bad-threshold",
                        fi,
                        r.hold_at.span(),
                        "hold_at must be below reject_at",
                        format!(
                            "{} >= reject_at {}",
                            r.hold_at.get_ref(),
                            r.reject_at.get_ref()
                        ),
                    );
                }
                if *r.hold_at.get_ref() <= 0 {
                    self.err(
                        "bad-threshold",
                        fi,
                        r.hold_at.span(),
                        "hold_at must be positive",
                        "a score of 0 would hold every transaction",
                    );
                }
                if r.version.get_ref().trim().is_empty() {
                    self.err(
                        "bad-version",
                        fi,
                        r.version.span(),
                        "the ruleset version label is empty",
                        "write a label such as \"2026-11-26.1\"",
                    );
                } else if looks_like_card(r.version.get_ref()) {
                    self.err(
                        "bad-version",
                        fi,
                        r.version.span(),
                        "the ruleset version label must not hold a card number",
                        "it goes into every decision, header and log line",
                    );
                }
                (
                    r.version.get_ref().clone(),
                    *r.hold_at.get_ref(),
                    *r.reject_at.get_ref(),
                )
            }
        };

        // 3. Attributes (merged over files; a conflicting type is an error).
        let mut attr_decl: BTreeMap<String, (usize, AttrType, usize)> = BTreeMap::new();
        for (fi, f) in parsed.iter() {
            for (key, ty) in &f.attrs {
                let name = key.get_ref();
                let Some(t) = AttrType::parse(ty.get_ref()) else {
                    self.err(
                        "bad-attr-type",
                        *fi,
                        ty.span(),
                        format!("unknown type `{}` for attribute `{name}`", ty.get_ref()),
                        "use \"string\", \"number\" or \"bool\"",
                    );
                    continue;
                };
                if !valid_name(name) {
                    self.err(
                        "bad-name",
                        *fi,
                        key.span(),
                        format!("attribute name `{name}` is not an identifier"),
                        NOT_AN_IDENTIFIER,
                    );
                    continue;
                }
                match attr_decl.get(name) {
                    Some(&(_, prev, pf)) if prev != t => {
                        let pname = self.files[pf].name.clone();
                        self.err(
                            "attr-conflict",
                            *fi,
                            ty.span(),
                            format!("attribute `{name}` declared with two types"),
                            format!("{} here, {} in {pname}", t.name(), prev.name()),
                        );
                    }
                    Some(_) => {}
                    None => {
                        attr_decl.insert(name.to_string(), (0, t, *fi));
                    }
                }
            }
        }
        let mut attrs_scope: BTreeMap<String, (usize, AttrType)> = BTreeMap::new();
        let mut attrs = Vec::new();
        for (i, (name, (_, t, _))) in attr_decl.iter().enumerate() {
            attrs_scope.insert(name.clone(), (i, *t));
            attrs.push((name.clone(), *t));
        }

        // Lists and windows as declared, for the unused-name warnings.
        let mut declared: Vec<(Declared, String, usize, std::ops::Range<usize>)> = Vec::new();

        // 4. Lists.
        let mut lists: BTreeMap<String, CompiledList> = BTreeMap::new();
        let mut list_sizes = BTreeMap::new();
        let mut list_ends = BTreeMap::new();
        let mut list_origin: BTreeMap<String, usize> = BTreeMap::new();
        for (fi, f) in parsed.iter() {
            for (key, def) in &f.lists {
                let name = key.get_ref();
                if let Some(&prev) = list_origin.get(name) {
                    let pname = self.files[prev].name.clone();
                    self.err(
                        "duplicate-list",
                        *fi,
                        key.span(),
                        format!("list `{name}` is declared twice"),
                        format!("also declared in {pname}"),
                    );
                    continue;
                }
                list_origin.insert(name.clone(), *fi);
                if let Some((problem, help)) = name_problem(name, &BTreeMap::new()) {
                    self.err(
                        "bad-name",
                        *fi,
                        key.span(),
                        format!("list name `{name}` {problem}"),
                        help,
                    );
                    continue;
                }
                declared.push((Declared::List, name.clone(), *fi, key.span()));
                if let Some(l) = self.list(*fi, def, read) {
                    let n = match &l {
                        CompiledList::Str(s) => {
                            if !s.until.is_empty() {
                                let mut ends: Vec<i64> = s.until.values().copied().collect();
                                ends.sort_unstable();
                                list_ends.insert(name.clone(), ends);
                            }
                            s.len()
                        }
                        CompiledList::Num(n) => n.values.len(),
                    };
                    list_sizes.insert(name.clone(), n);
                    lists.insert(name.clone(), l);
                }
            }
        }

        // 5. Windows, grouped by entity key.
        let mut groups: Vec<Group> = Vec::new();
        let mut windows: Vec<WindowDef> = Vec::new();
        let mut window_scope: BTreeMap<String, Reader> = BTreeMap::new();
        let (mut n_int, mut n_dec) = (0usize, 0usize);
        let res_ms = self.cfg.resolution.as_millis().max(1) as i64;
        let lateness = (self.cfg.max_lateness.as_millis() as i64 + res_ms - 1) / res_ms;
        let empty_windows = BTreeMap::new();
        let filter_scope = Scope {
            attrs: &attrs_scope,
            windows: &empty_windows,
            lists: &lists,
            in_filter: true,
        };
        for (fi, f) in parsed.iter() {
            for (key, def) in &f.windows {
                let name = key.get_ref();
                if window_scope.contains_key(name) || windows.iter().any(|w| &w.name == name) {
                    self.err(
                        "duplicate-window",
                        *fi,
                        key.span(),
                        format!("window `{name}` is declared twice"),
                        "window names are global across files",
                    );
                    continue;
                }
                if let Some((problem, help)) = name_problem(name, &lists) {
                    self.err(
                        "bad-name",
                        *fi,
                        key.span(),
                        format!("window name `{name}` {problem}"),
                        help,
                    );
                    continue;
                }
                declared.push((Declared::Window, name.clone(), *fi, key.span()));
                let Some((gkey, by, read_kind, slot_sig, filter, buckets)) =
                    self.window(*fi, def, &attrs_scope, &filter_scope, res_ms)
                else {
                    continue;
                };
                let gi = match groups.iter().position(|g| g.signature == gkey) {
                    Some(gi) => gi,
                    None => {
                        groups.push(Group {
                            signature: gkey.clone(),
                            by,
                            layout: Layout {
                                counts: 0,
                                sums: 0,
                                distincts: 0,
                                max_window: 0,
                                lateness,
                                distinct_windows: Vec::new(),
                            },
                            counts: Vec::new(),
                            sums: Vec::new(),
                            distincts: Vec::new(),
                        });
                        groups.len() - 1
                    }
                };
                let g = &mut groups[gi];
                g.layout.max_window = g.layout.max_window.max(buckets);
                // Windows with the same aggregate, value and filter share one slot.
                let (read, reader) = match read_kind {
                    SlotKind::Count => {
                        let slot = slot_for(&mut g.counts, &slot_sig, |sig| (sig, filter));
                        n_int += 1;
                        (WindowRead::Count(slot), Reader::IntFeature(n_int - 1))
                    }
                    SlotKind::Sum(of) => {
                        let slot = slot_for(&mut g.sums, &slot_sig, |sig| (sig, of, filter));
                        n_dec += 1;
                        (WindowRead::Sum(slot), Reader::DecFeature(n_dec - 1))
                    }
                    SlotKind::Distinct(of) => {
                        let slot = slot_for(&mut g.distincts, &slot_sig, |sig| (sig, of, filter));
                        n_int += 1;
                        (WindowRead::Distinct(slot), Reader::IntFeature(n_int - 1))
                    }
                };
                g.layout.counts = g.counts.len();
                g.layout.sums = g.sums.len();
                g.layout.distincts = g.distincts.len();
                if let WindowRead::Distinct(slot) = read {
                    g.layout.distinct_windows.resize(g.distincts.len(), 0);
                    let w = &mut g.layout.distinct_windows[slot];
                    *w = (*w).max(buckets);
                }
                let feature = match reader {
                    Reader::IntFeature(i) | Reader::DecFeature(i) => i,
                    _ => 0,
                };
                windows.push(WindowDef {
                    name: name.clone(),
                    group: gi,
                    read,
                    buckets,
                    feature,
                    signature: format!("{gkey}|{slot_sig}|{buckets}"),
                });
                window_scope.insert(name.clone(), reader);
            }
        }

        // 6. Rules.
        let scope = Scope {
            attrs: &attrs_scope,
            windows: &window_scope,
            lists: &lists,
            in_filter: false,
        };
        let mut rules: Vec<Rule> = Vec::new();
        let mut rule_origin: BTreeMap<String, (usize, std::ops::Range<usize>)> = BTreeMap::new();
        for (fi, f) in parsed.iter() {
            for r in &f.rules {
                let rd = r.get_ref();
                let id = rd.id.get_ref().clone();
                if let Some((pf, _)) = rule_origin.get(&id) {
                    let pname = self.files[*pf].name.clone();
                    self.err(
                        "duplicate-rule",
                        *fi,
                        rd.id.span(),
                        format!("rule id `{id}` is used twice"),
                        format!("also used in {pname}"),
                    );
                    continue;
                }
                rule_origin.insert(id.clone(), (*fi, rd.id.span()));
                if !valid_rule_id(&id) {
                    self.err(
                        "bad-name",
                        *fi,
                        rd.id.span(),
                        format!("rule id `{id}` must be 1-64 characters of letters, digits, _ - ."),
                        "rule ids become metric labels",
                    );
                } else if looks_like_card(&id) {
                    self.err(
                        "bad-name",
                        *fi,
                        rd.id.span(),
                        "a rule id must not hold a card number",
                        "rule ids go into every decision and metric label: name the rule, keep the card in a list file",
                    );
                }
                let action = match &rd.action {
                    None => None,
                    Some(a) => match RuleAction::parse(a.get_ref()) {
                        Some(a) => Some(a),
                        None => {
                            let hint = expr::did_you_mean(
                                a.get_ref(),
                                ["block", "reject", "hold", "allow"].into_iter(),
                            );
                            self.err(
                                "bad-action",
                                *fi,
                                a.span(),
                                format!("unknown action `{}`", a.get_ref()),
                                hint.map_or("use block, reject, hold or allow".into(), |h| {
                                    format!("did you mean `{h}`?")
                                }),
                            );
                            continue;
                        }
                    },
                };
                let score = rd.score.as_ref().map_or(0, |s| *s.get_ref());
                if action.is_none() && rd.score.is_none() {
                    self.err(
                        "no-effect",
                        *fi,
                        rd.id.span(),
                        format!("rule `{id}` has neither an action nor a score"),
                        "add `action = ...` and/or `score = ...`",
                    );
                }
                if let Some(s) = &rd.score {
                    if !(-1_000_000..=1_000_000).contains(s.get_ref()) {
                        self.err(
                            "bad-score",
                            *fi,
                            s.span(),
                            "score out of range",
                            "use -1000000..=1000000",
                        );
                    }
                }
                let mode = match rd.mode.as_ref().map(|m| m.get_ref().as_str()) {
                    None | Some("active") => Mode::Active,
                    Some("shadow") => Mode::Shadow,
                    Some(other) => {
                        let span = rd.mode.as_ref().map(|m| m.span()).unwrap_or(0..0);
                        self.err(
                            "bad-mode",
                            *fi,
                            span,
                            format!("unknown mode `{other}`"),
                            "use \"active\" or \"shadow\"",
                        );
                        continue;
                    }
                };
                let Some((when, reads)) = self.expr(*fi, &rd.when, &scope) else {
                    continue;
                };
                rules.push(Rule {
                    id: id.into(),
                    // Both go into decisions: a card number an analyst wrote in them is
                    // shown masked.
                    description: crate::txn::mask_card_numbers(&rd.description).into_owned(),
                    reason: crate::txn::mask_card_numbers(
                        rd.reason.as_deref().unwrap_or(&rd.description),
                    )
                    .into(),
                    action,
                    score,
                    mode,
                    when,
                    condition: condition_text(rd.when.get_ref()).into(),
                    reads: reads.into_iter().map(|(n, r)| (n.into(), r)).collect(),
                    file: self.files[*fi].name.clone(),
                });
            }
        }
        if rules.is_empty() && self.diags.is_empty() {
            self.diags.push(Diagnostic::global(
                "no-rules",
                "the rule files declare no [[rule]]",
            ));
        }
        if !self.diags.is_empty() {
            return None;
        }
        let lints = self.lints.iter().map(|(fi, span, code, msg)| {
            let f = &self.files[*fi];
            let (line, col) = diag::line_col(&f.text, span.start);
            format!("warning[{code}]: {}:{line}:{col}: {msg}", f.name)
        });
        let mut warnings: Vec<String> = declared
            .iter()
            .filter(|(_, name, _, _)| !self.read_names.contains(name))
            .map(|(kind, name, fi, span)| {
                let f = &self.files[*fi];
                let (line, col) = diag::line_col(&f.text, span.start);
                let at = format!("{}:{line}:{col}", f.name);
                match kind {
                    Declared::Window => {
                        let by = windows
                            .iter()
                            .find(|w| &w.name == name)
                            .map_or("", |w| groups[w.group].signature.as_str());
                        format!(
                            "warning[unused-window]: {at}: window `{name}` is not read by any rule; it still keeps state for every `{by}` key and costs time on every transaction: read it in a rule (a shadow rule shows its values) or remove it"
                        )
                    }
                    Declared::List => format!(
                        "warning[unused-list]: {at}: list `{name}` is not read by any rule or window filter"
                    ),
                }
            })
            .collect();
        warnings.extend(lints);
        let content_hash = content_hash(&self.files);
        Some(RuleSet {
            version: format!("{label}+{}", &content_hash[..12]),
            label,
            content_hash,
            hold_at,
            reject_at,
            rules,
            attrs,
            groups,
            windows,
            int_features: n_int,
            dec_features: n_dec,
            lists: list_sizes,
            list_ends,
            list_sets: lists.clone(),
            needs_local_time: self.needs_local_time,
            files: self.files.iter().map(|f| f.name.clone()).collect(),
            warnings,
        })
    }

    /// Compiles one expression held in a TOML string.
    fn expr(
        &mut self,
        fi: usize,
        src: &Spanned<String>,
        scope: &Scope<'_>,
    ) -> Option<(BoolFn, Vec<(String, Reader)>)> {
        let text = src.get_ref();
        let offsets = value_offsets(&self.files[fi].text, &src.span(), text);
        let whole = src.span();
        let map = |s: std::ops::Range<usize>| match &offsets {
            Some(t) if s.end < t.len() => t[s.start]..t[s.end],
            _ => whole.clone(),
        };
        let ast = match syntax::parse(text) {
            Ok(a) => a,
            Err(e) => {
                let span = map(e.span.clone());
                self.err("syntax", fi, span, e.message, e.label);
                return None;
            }
        };
        let mut c = ExprCompiler {
            scope,
            file: fi,
            base: 0,
            diags: Vec::new(),
            reads: Vec::new(),
            lists_read: Vec::new(),
            key: self.key,
            lints: Vec::new(),
        };
        let f = c.condition(&ast);
        for (span, code, msg) in std::mem::take(&mut c.lints) {
            self.lints.push((fi, map(span), code, msg));
        }
        self.read_names.extend(c.lists_read);
        self.read_names
            .extend(c.reads.iter().map(|(name, _)| name.clone()));
        for mut d in c.diags {
            d.span = map(d.span.clone());
            self.diags.push(d);
        }
        if c.reads
            .iter()
            .any(|(_, r)| matches!(r, Reader::Field(Field::LocalHour | Field::LocalWeekday)))
        {
            self.needs_local_time = true;
        }
        f.map(|f| (f, c.reads))
    }

    fn list(
        &mut self,
        fi: usize,
        def: &Spanned<file::ListDef>,
        read: &ReadFile<'_>,
    ) -> Option<CompiledList> {
        match def.get_ref() {
            file::ListDef::Strings(v) => {
                Some(CompiledList::Str(Arc::new(StrSet::inline(&self.key, v))))
            }
            file::ListDef::Ints(v) => Some(CompiledList::Num(Arc::new(NumSet::new(
                v.iter().map(|&i| Decimal::from(i)).collect(),
            )))),
            file::ListDef::File(lf) => {
                let int = match lf.kind.as_deref() {
                    None | Some("string") => false,
                    Some("int") => true,
                    Some(other) => {
                        let span = def.span();
                        self.err(
                            "bad-list",
                            fi,
                            span,
                            format!("unknown list type `{other}`"),
                            "use \"string\" or \"int\"",
                        );
                        return None;
                    }
                };
                let rel = &lf.file;
                let dir = Path::new(&self.files[fi].name)
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                let path = dir.join(rel).display().to_string();
                let text = match read(&path) {
                    // A byte-order mark (editors write one as "UTF-8 with BOM") is not part
                    // of the first entry: kept, that entry never matched, silently.
                    Ok(t) => match t.strip_prefix('\u{feff}') {
                        Some(rest) => rest.to_string(),
                        None => t,
                    },
                    Err(e) => {
                        self.err(
                            "list-file",
                            fi,
                            def.span(),
                            format!("cannot read list file {path}: {e}"),
                            "path is relative to this rule file",
                        );
                        return None;
                    }
                };
                let li = self.files.len();
                self.files.push(SourceFile {
                    name: path,
                    text: text.clone(),
                });
                let mut strs = StrSet::default();
                let mut nums = Vec::new();
                let mut offset = 0;
                for line in text.split_inclusive('\n') {
                    let start = offset;
                    offset += line.len();
                    let entry = line.split('#').next().unwrap_or("").trim();
                    if entry.is_empty() {
                        continue;
                    }
                    let col_of = |part: &str| {
                        let col = start + (part.as_ptr() as usize - line.as_ptr() as usize);
                        col..col + part.len()
                    };
                    let (entry, until) = match split_until(entry) {
                        None => (entry, None),
                        Some((_, date)) if int => {
                            self.err(
                                "bad-list",
                                li,
                                col_of(date),
                                "entries of an int list cannot end".to_string(),
                                "`until` is for string lists (cards, devices, merchants ...)",
                            );
                            continue;
                        }
                        Some((value, date)) => match parse_until(date) {
                            Some(ms) if !value.is_empty() => (value, Some(ms)),
                            _ => {
                                let msg = if date.is_empty() || value.is_empty() {
                                    "`until` needs an entry before it and a date after it"
                                        .to_string()
                                } else {
                                    format!("`{date}` is not a date or time")
                                };
                                self.err(
                                    "bad-list",
                                    li,
                                    col_of(date),
                                    msg,
                                    "write `<entry> until YYYY-MM-DD` (to the end of that day, UTC) or an RFC 3339 time such as 2026-12-31T18:00:00Z",
                                );
                                continue;
                            }
                        },
                    };
                    if int {
                        match entry.parse::<i64>() {
                            Ok(v) => nums.push(Decimal::from(v)),
                            Err(_) => {
                                let col = line.find(entry).unwrap_or(0);
                                self.err(
                                    "bad-list",
                                    li,
                                    start + col..start + col + entry.len(),
                                    format!("`{entry}` is not an integer"),
                                    "this list is declared type = \"int\"",
                                );
                            }
                        }
                    } else {
                        strs.insert(self.key.hash_str(entry), until);
                        // A card number written in groups also matches as its digits, the
                        // form the engine reads a card in.
                        if let Some(digits) = crate::txn::grouped_card_digits(entry) {
                            strs.alias(self.key.hash_str(&digits), until);
                        }
                    }
                }
                if int {
                    Some(CompiledList::Num(Arc::new(NumSet::new(nums))))
                } else {
                    Some(CompiledList::Str(Arc::new(strs)))
                }
            }
        }
    }

    /// Checks one window definition. Returns (group key, by fields, slot kind, slot
    /// signature, filter, length in buckets).
    #[allow(clippy::type_complexity)]
    fn window(
        &mut self,
        fi: usize,
        def: &Spanned<file::WindowDef>,
        attrs: &BTreeMap<String, (usize, AttrType)>,
        filter_scope: &Scope<'_>,
        res_ms: i64,
    ) -> Option<(String, Vec<KeyField>, SlotKind, String, Option<BoolFn>, i64)> {
        let w = def.get_ref();
        let before = self.diags.len();
        // Length.
        let buckets = match parse_duration(w.over.get_ref()) {
            Err(e) => {
                self.err(
                    "bad-duration",
                    fi,
                    w.over.span(),
                    e,
                    "e.g. \"10m\", \"24h\", \"7d\"",
                );
                None
            }
            Ok(d) => {
                // Saturating: a length past i64 milliseconds must not wrap to a negative one
                // and slip past the checks below.
                let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
                if ms == 0 {
                    self.err(
                        "bad-duration",
                        fi,
                        w.over.span(),
                        "a window must be longer than 0",
                        "zero",
                    );
                    None
                } else if ms > 400 * 86_400_000 {
                    self.err(
                        "bad-duration",
                        fi,
                        w.over.span(),
                        "windows longer than 400d are not supported",
                        "too long",
                    );
                    None
                } else if ms % res_ms != 0 {
                    self.err(
                        "bad-duration",
                        fi,
                        w.over.span(),
                        format!("window length is not a multiple of the resolution ({res_ms} ms)"),
                        "round it to the resolution",
                    );
                    None
                } else {
                    Some(ms / res_ms)
                }
            }
        };
        // Entity key.
        let mut by_names = w.by.get_ref().fields();
        by_names.sort();
        by_names.dedup();
        let mut by = Vec::new();
        if by_names.is_empty() {
            self.err(
                "bad-window",
                fi,
                w.by.span(),
                "`by` names no field",
                "e.g. by = \"card\"",
            );
        }
        for n in &by_names {
            match self.key_field(n, attrs) {
                Ok(k) => by.push(k),
                Err(label) => self.err(
                    "unknown-identifier",
                    fi,
                    w.by.span(),
                    format!("cannot key a window by `{n}`"),
                    label,
                ),
            }
        }
        // Aggregate.
        let kind = match (w.agg.get_ref().as_str(), &w.of) {
            ("count", None) => Some((SlotKind::Count, "count".to_string())),
            ("count", Some(o)) => {
                self.err(
                    "bad-window",
                    fi,
                    o.span(),
                    "`count` takes no `of`",
                    "remove `of`, or use agg = \"distinct\"",
                );
                None
            }
            ("sum", Some(o)) => {
                let of = if o.get_ref() == "amount" {
                    Some(SumOf::Amount)
                } else if let Some(&(i, t)) = o
                    .get_ref()
                    .strip_prefix("attrs.")
                    .and_then(|a| attrs.get(a))
                {
                    if t == AttrType::Num {
                        Some(SumOf::Attr(i))
                    } else {
                        self.err(
                            "type-mismatch",
                            fi,
                            o.span(),
                            format!("cannot sum `{}`, a {} attribute", o.get_ref(), t.name()),
                            "sum needs a number",
                        );
                        None
                    }
                } else {
                    self.err(
                        "unknown-identifier",
                        fi,
                        o.span(),
                        format!("cannot sum `{}`", o.get_ref()),
                        "use amount or a number attribute (attrs.x)",
                    );
                    None
                };
                of.map(|of| (SlotKind::Sum(of), format!("sum {}", o.get_ref())))
            }
            ("distinct", Some(o)) => match self.key_field(o.get_ref(), attrs) {
                Ok(k) => Some((SlotKind::Distinct(k), format!("distinct {}", o.get_ref()))),
                Err(label) => {
                    self.err(
                        "unknown-identifier",
                        fi,
                        o.span(),
                        format!("cannot count distinct `{}`", o.get_ref()),
                        label,
                    );
                    None
                }
            },
            ("sum" | "distinct", None) => {
                self.err(
                    "bad-window",
                    fi,
                    w.agg.span(),
                    format!("`{}` needs `of`", w.agg.get_ref()),
                    "e.g. of = \"amount\" / of = \"merchant\"",
                );
                None
            }
            (other, _) => {
                let hint = expr::did_you_mean(other, ["count", "sum", "distinct"].into_iter());
                self.err(
                    "bad-window",
                    fi,
                    w.agg.span(),
                    format!("unknown aggregate `{other}`"),
                    hint.map_or("use count, sum or distinct".into(), |h| {
                        format!("did you mean `{h}`?")
                    }),
                );
                None
            }
        };
        // Filter.
        let mut filter = None;
        let mut filter_sig = String::new();
        if let Some(src) = &w.filter {
            // (A filter that does not lex gets a diagnostic below and no slot.)
            let canonical = syntax::canonical(src.get_ref()).unwrap_or_default();
            // Slot signatures are written into every snapshot file: a filter holding a
            // card number (`card != "4111..."`) is signed by its keyed hash instead, so
            // the number is not on disk in clear.
            filter_sig = match crate::txn::mask_card_numbers(&canonical) == canonical {
                true => format!(" where {canonical}"),
                false => format!(" where #{:032x}", self.key.hash_str(&canonical)),
            };
            if let Some((f, _)) = self.expr(fi, src, filter_scope) {
                filter = Some(f);
            }
        }
        if self.diags.len() != before {
            return None;
        }
        let (kind, sig) = kind?;
        Some((
            by_names.join(","),
            by,
            kind,
            sig + &filter_sig,
            filter,
            buckets?,
        ))
    }

    fn key_field(
        &self,
        name: &str,
        attrs: &BTreeMap<String, (usize, AttrType)>,
    ) -> Result<KeyField, String> {
        if let Some(a) = name.strip_prefix("attrs.") {
            return attrs
                .get(a)
                .map(|&(i, _)| KeyField::Attr(i))
                .ok_or_else(
                    || match expr::did_you_mean(a, attrs.keys().map(String::as_str)) {
                        Some(h) => format!("unknown attribute; did you mean `attrs.{h}`?"),
                        None => "unknown attribute (declare it in [attrs])".into(),
                    },
                );
        }
        match expr::FIELDS.iter().find(|(n, _)| *n == name) {
            Some((_, f)) if !matches!(f, Field::LocalHour | Field::LocalWeekday) => {
                Ok(KeyField::Field(*f))
            }
            _ => Err(
                match expr::did_you_mean(
                    name,
                    [
                        "card", "device", "merchant", "region", "currency", "mcc", "amount", "id",
                    ]
                    .into_iter(),
                ) {
                    Some(h) => format!("did you mean `{h}`?"),
                    None => "use card, device, merchant, region, currency, mcc, amount or attrs.x"
                        .into(),
                },
            ),
        }
    }
}

/// Index of the slot with signature `sig`, adding one made by `make` when there is none.
fn slot_for<T: SlotSig>(slots: &mut Vec<T>, sig: &str, make: impl FnOnce(String) -> T) -> usize {
    match slots.iter().position(|s| s.sig() == sig) {
        Some(i) => i,
        None => {
            slots.push(make(sig.to_string()));
            slots.len() - 1
        }
    }
}

trait SlotSig {
    fn sig(&self) -> &str;
}
impl SlotSig for (String, Option<BoolFn>) {
    fn sig(&self) -> &str {
        &self.0
    }
}
impl<V> SlotSig for (String, V, Option<BoolFn>) {
    fn sig(&self) -> &str {
        &self.0
    }
}

enum SlotKind {
    Count,
    Sum(SumOf),
    Distinct(KeyField),
}

/// A condition as decisions show it: comments dropped, whitespace outside string
/// literals collapsed to one space (literals kept as written), card numbers masked.
fn condition_text(src: &str) -> String {
    fn put(out: &mut String, gap: &mut bool, c: char) {
        if *gap && !out.is_empty() {
            out.push(' ');
        }
        *gap = false;
        out.push(c);
    }
    let mut out = String::with_capacity(src.len());
    let mut chars = src.chars();
    let mut gap = false;
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                put(&mut out, &mut gap, c);
                while let Some(d) = chars.next() {
                    out.push(d);
                    if d == '\\' {
                        out.extend(chars.next());
                    } else if d == c {
                        break;
                    }
                }
            }
            '#' => {
                let _ = chars.by_ref().find(|&d| d == '\n');
                gap = true;
            }
            c if c.is_whitespace() => gap = true,
            c => put(&mut out, &mut gap, c),
        }
    }
    crate::txn::mask_card_numbers(&out).into_owned()
}

/// `<entry> until <date>` on a list-file line: (entry, date), at the last word `until`
/// (any case) after the first word. Everything after it is the date, so trailing words
/// (a reason without `#`) make it invalid instead of silently part of the entry. `until`
/// with nothing after it gives an empty date (refused by the caller).
fn split_until(entry: &str) -> Option<(&str, &str)> {
    let mut at = None;
    let mut pos = 0;
    for (i, word) in entry.split_whitespace().enumerate() {
        let start = pos + entry[pos..].find(word).unwrap_or(0);
        pos = start + word.len();
        if i > 0 && word.eq_ignore_ascii_case("until") {
            at = Some(start);
        } else if i == 0 && word.eq_ignore_ascii_case("until") {
            at = at.or(Some(start));
        }
    }
    let at = at?;
    let date = entry[at + "until".len()..].trim();
    let date = if date.is_empty() {
        &entry[entry.len()..]
    } else {
        date
    };
    Some((entry[..at].trim_end(), date))
}

/// The end of a list entry, in ms since the epoch: a date is to the end of that day, UTC;
/// an RFC 3339 time is that instant.
fn parse_until(date: &str) -> Option<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(date) {
        return Some(t.timestamp_millis());
    }
    let d = chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()?;
    let next = d.succ_opt()?.and_hms_opt(0, 0, 0)?;
    Some(next.and_utc().timestamp_millis())
}

const NOT_AN_IDENTIFIER: &str = "use letters, digits and _, not starting with a digit";

/// Why `name` cannot name a list or window, and what to do instead; `None` when it can.
/// Conditions read fields, keywords, lists and windows by bare name, so a name may be
/// none of the others.
fn name_problem(
    name: &str,
    lists: &BTreeMap<String, CompiledList>,
) -> Option<(String, &'static str)> {
    if !valid_name(name) {
        Some(("is not an identifier".into(), NOT_AN_IDENTIFIER))
    } else if expr::FIELDS.iter().any(|(n, _)| *n == name) {
        Some((
            "is the name of a transaction field".into(),
            "choose another name",
        ))
    } else if matches!(
        name,
        "and" | "or" | "not" | "in" | "true" | "false" | "attrs"
    ) {
        Some((
            "is a word of the rule language".into(),
            "choose another name",
        ))
    } else if lists.contains_key(name) {
        Some((
            "is already the name of a list".into(),
            "lists and windows share one set of names; choose another",
        ))
    } else {
        None
    }
}

fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Whether `s` holds a major network's card number (a card's length, issuer prefix and
/// check digit, so that a timestamp in a label is not one).
fn looks_like_card(s: &str) -> bool {
    crate::txn::holds_card_number(s)
}

pub(crate) fn valid_rule_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Hex SipHash-128 over every file's content and its path relative to the rule directory,
/// so the same rules give the same version wherever the directory lives.
fn content_hash(files: &[SourceFile]) -> String {
    let root = Path::new(&files[0].name)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut sorted: Vec<(String, &str)> = files
        .iter()
        .map(|f| {
            let p = Path::new(&f.name);
            let rel = p.strip_prefix(&root).unwrap_or(p);
            (rel.to_string_lossy().replace('\\', "/"), f.text.as_str())
        })
        .collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = SipHasher13::new_with_keys(0, 0);
    use std::hash::Hasher;
    for (rel, text) in sorted {
        h.write(rel.as_bytes());
        h.write_u8(0);
        h.write(text.as_bytes());
        h.write_u8(0);
    }
    format!("{:032x}", h.finish128().as_u128())
}

#[cfg(test)]
mod tests;
