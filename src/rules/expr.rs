//! Type checking and compilation of expressions into closure trees.
//!
//! Every expression is checked once at load time and compiled into nested boxed closures
//! specialised by type (`Tri`, `i64`, `Decimal`, `&str`); evaluation never looks at a
//! string of the source, never resolves a name and never allocates. Common shapes such as
//! `amount > 1000` or `card_txn_1h >= 5` compile to a single closure.
//!
//! Missing values: a transaction field or attribute that is absent (or an attribute of the
//! wrong type) is *unknown*. Arithmetic with unknown is unknown; a comparison with unknown
//! is unknown; `and` / `or` / `not` follow three-valued logic (`false and unknown` is
//! `false`, `true or unknown` is `true`, `not unknown` is unknown); a rule fires only when
//! its condition is `true`. `present(x)` is `true` or `false`, never unknown.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use rust_decimal::Decimal;

use super::diag::Diagnostic;
use super::syntax::{BinOp, Expr, ExprKind, Span, UnOp};
use crate::keyhash::{HashKey, KeyHash, PreHashed};
use crate::txn::{AttrValue, Transaction};

/// Three-valued truth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tri {
    False,
    True,
    Unknown,
}

impl Tri {
    #[inline]
    fn from(b: bool) -> Tri {
        if b {
            Tri::True
        } else {
            Tri::False
        }
    }
    #[inline]
    fn opt(b: Option<bool>) -> Tri {
        match b {
            Some(true) => Tri::True,
            Some(false) => Tri::False,
            None => Tri::Unknown,
        }
    }
}

/// Everything an expression can read while a transaction is decided.
pub struct Ctx<'a> {
    pub txn: &'a Transaction,
    /// Event time used for the decision (the transaction's `ts` or the receive time).
    pub ts_ms: i64,
    /// When the engine received the transaction (the stream's store time with JetStream;
    /// in `replay`, the transaction's own time). List entries end by it, never by `ts`,
    /// which the sender sets: a backdated `ts` must not revive an ended allow entry.
    pub received_ms: i64,
    /// The transaction's currency, or the configured default.
    pub currency: &'a str,
    /// Declared attributes, by declaration index; `None` when absent or of another type.
    pub attrs: &'a [Option<&'a AttrValue>],
    /// Window features of type count / distinct, by feature index.
    pub ints: &'a [Option<i64>],
    /// Window features of type sum, by feature index.
    pub decs: &'a [Option<Decimal>],
    /// Local hour 0-23 and weekday 1 (Monday) - 7 (Sunday) of `ts_ms`.
    pub local_hour: i64,
    pub local_weekday: i64,
    pub key: &'a HashKey,
    /// Keyed hashes of single fields, computed at most once per decision and shared by
    /// window keys and list lookups.
    pub hashes: &'a FieldHashes,
}

/// Per-decision cache of keyed field hashes.
#[derive(Default)]
pub struct FieldHashes {
    /// Per `Field`: `None` not computed yet, `Some(None)` field missing.
    slots: [std::cell::Cell<Option<Option<KeyHash>>>; 10],
}

impl FieldHashes {
    /// The keyed hash of `f` (as `HashKey::hash_str` of its text), or `None` if missing.
    #[inline]
    pub fn get(&self, f: Field, c: &Ctx<'_>) -> Option<KeyHash> {
        let slot = &self.slots[f as usize];
        if let Some(v) = slot.get() {
            return v;
        }
        let v = field_str(f, c).map(|s| c.key.hash_str(s));
        slot.set(Some(v));
        v
    }
}

/// The text of a string field.
fn field_str<'a>(f: Field, c: &'a Ctx<'a>) -> Option<&'a str> {
    match f {
        Field::Id => Some(&c.txn.id),
        Field::Card => Some(&c.txn.card),
        Field::Currency => Some(c.currency),
        Field::Device => c.txn.device.as_deref(),
        Field::Merchant => c.txn.merchant.as_deref(),
        Field::Region => c.txn.region.as_deref(),
        _ => None,
    }
}

pub type BoolFn = Box<dyn Fn(&Ctx<'_>) -> Tri + Send + Sync>;
pub type IntFn = Box<dyn Fn(&Ctx<'_>) -> Option<i64> + Send + Sync>;
pub type DecFn = Box<dyn Fn(&Ctx<'_>) -> Option<Decimal> + Send + Sync>;
pub type StrFn = Box<dyn for<'a> Fn(&'a Ctx<'a>) -> Option<&'a str> + Send + Sync>;

/// Declared attribute types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttrType {
    Str,
    Num,
    Bool,
}

impl AttrType {
    pub fn parse(s: &str) -> Option<AttrType> {
        match s {
            "string" => Some(AttrType::Str),
            "number" => Some(AttrType::Num),
            "bool" => Some(AttrType::Bool),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            AttrType::Str => "string",
            AttrType::Num => "number",
            AttrType::Bool => "bool",
        }
    }
}

/// Transaction fields the language knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Id,
    Card,
    Amount,
    Currency,
    Device,
    Merchant,
    Region,
    Mcc,
    LocalHour,
    LocalWeekday,
}

pub const FIELDS: [(&str, Field); 10] = [
    ("id", Field::Id),
    ("card", Field::Card),
    ("amount", Field::Amount),
    ("currency", Field::Currency),
    ("device", Field::Device),
    ("merchant", Field::Merchant),
    ("region", Field::Region),
    ("mcc", Field::Mcc),
    ("local_hour", Field::LocalHour),
    ("local_weekday", Field::LocalWeekday),
];

/// Static types of the language.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    Bool,
    Int,
    Dec,
    Str,
    StrList,
    NumList,
}

impl Ty {
    pub fn name(self) -> &'static str {
        match self {
            Ty::Bool => "bool",
            Ty::Int => "integer",
            Ty::Dec => "decimal",
            Ty::Str => "string",
            Ty::StrList => "list of strings",
            Ty::NumList => "list of numbers",
        }
    }
    /// The name with its article, for messages ("an integer", "a string").
    pub fn a(self) -> String {
        match self {
            Ty::Int => "an integer".into(),
            other => format!("a {}", other.name()),
        }
    }
}

/// A set of strings. Lists from list files (which may hold card numbers) are held only as
/// keyed hashes; small inline lists written in the rule files themselves are compared as
/// plain strings, which is faster than hashing the probe.
#[derive(Debug, Default)]
pub struct StrSet {
    pub hashes: HashSet<KeyHash, PreHashed>,
    /// List-file entries with an end (`until`): the receive time (ms) from which each no
    /// longer applies. An entry also in `hashes` has no end.
    pub until: HashMap<KeyHash, i64, PreHashed>,
    /// Inline lists of at most [`INLINE_PLAIN_MAX`] entries: the entries in clear.
    pub plain: Option<Vec<Box<str>>>,
    /// Card numbers written in groups, as their digits (the form the engine reads a card
    /// in), with their entry's end: matched like their entry, counted nowhere (an entry
    /// is one entry in sizes and change reports).
    pub aliases: HashMap<KeyHash, Option<i64>, PreHashed>,
}

/// Inline string lists up to this size are compared directly.
pub const INLINE_PLAIN_MAX: usize = 16;

impl StrSet {
    /// An inline list from a rule file.
    pub fn inline(key: &HashKey, items: &[String]) -> StrSet {
        let mut s = StrSet {
            hashes: items.iter().map(|x| key.hash_str(x)).collect(),
            until: HashMap::default(),
            plain: None,
            aliases: HashMap::default(),
        };
        // A card number written in groups also matches as its digits.
        let digits: Vec<String> = (items.iter())
            .filter_map(|x| crate::txn::grouped_card_digits(x))
            .collect();
        for d in &digits {
            s.alias(key.hash_str(d), None);
        }
        if items.len() <= INLINE_PLAIN_MAX {
            let all = items.iter().chain(&digits);
            s.plain = Some(all.map(|x| x.as_str().into()).collect());
        }
        s
    }

    pub fn len(&self) -> usize {
        self.hashes.len() + self.until.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a list-file entry; `until`: the receive time from which it no longer applies.
    /// The same entry twice keeps the longer reach (no end beats any end).
    pub fn insert(&mut self, h: KeyHash, until: Option<i64>) {
        match until {
            None => {
                self.until.remove(&h);
                self.hashes.insert(h);
            }
            Some(_) if self.hashes.contains(&h) => {}
            Some(u) => {
                let e = self.until.entry(h).or_insert(u);
                *e = (*e).max(u);
            }
        }
    }

    /// Adds the digits form of an entry written in groups ([`StrSet::aliases`]);
    /// twice, the longer reach wins, as in [`StrSet::insert`].
    pub fn alias(&mut self, h: KeyHash, until: Option<i64>) {
        let e = self.aliases.entry(h).or_insert(until);
        *e = match (*e, until) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    }

    /// Whether the entry with hash `h` applies to a transaction received at `at_ms`.
    #[inline]
    pub fn has(&self, h: &KeyHash, at_ms: i64) -> bool {
        self.hashes.contains(h)
            || (!self.until.is_empty() && self.until.get(h).is_some_and(|&u| at_ms < u))
            || (!self.aliases.is_empty()
                && (self.aliases.get(h)).is_some_and(|u| u.is_none_or(|u| at_ms < u)))
    }

    #[inline]
    pub fn contains(&self, key: &HashKey, s: &str, at_ms: i64) -> bool {
        match &self.plain {
            Some(p) => p.iter().any(|x| &**x == s),
            None => self.has(&key.hash_str(s), at_ms),
        }
    }
}

/// A set of numbers, sorted; integer members are also kept as `i64` for integer probes.
#[derive(Debug, Default)]
pub struct NumSet {
    pub values: Vec<Decimal>,
    pub ints: Vec<i64>,
}

impl NumSet {
    pub fn new(mut values: Vec<Decimal>) -> NumSet {
        values.iter_mut().for_each(|d| *d = d.normalize());
        values.sort();
        values.dedup();
        let ints = values
            .iter()
            .filter(|d| d.fract().is_zero())
            .filter_map(|d| i64::try_from(*d).ok())
            .collect();
        NumSet { values, ints }
    }

    #[inline]
    pub fn contains(&self, d: Decimal) -> bool {
        self.values.binary_search(&d.normalize()).is_ok()
    }

    #[inline]
    pub fn contains_int(&self, i: i64) -> bool {
        if self.ints.len() <= 8 {
            self.ints.contains(&i)
        } else {
            self.ints.binary_search(&i).is_ok()
        }
    }
}

/// What a fired rule reports: the value of something it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    Field(Field),
    Attr(usize),
    IntFeature(usize),
    DecFeature(usize),
}

impl Reader {
    /// The value as a decision shows it. Values sent by the switch (fields and attributes)
    /// go through the card-number masker: a card number sent in the wrong field (a device,
    /// a recipient card attribute) must not come back in the decision, nor the
    /// transaction's own card anywhere (padded to 20 digits, say). The card is always
    /// masked; the id is shown as it is, as in the decision's own `id` (one holding its
    /// transaction's card is refused at decode).
    pub fn read(&self, c: &Ctx<'_>) -> serde_json::Value {
        use serde_json::Value;
        let card = c.txn.card.as_str();
        let own = card.len() >= 13 && card.bytes().all(|b| b.is_ascii_digit());
        let shown = |text: &str| -> String {
            let t = crate::txn::mask_card_numbers(text);
            // The own card in any form: grouped by dots, padded, with the expiry after it.
            match own.then(|| crate::txn::mask_own_card(&t, card)).flatten() {
                Some(masked) => masked,
                None => t.into_owned(),
            }
        };
        let dec = |d: Option<Decimal>| d.map_or(Value::Null, |d| Value::String(d.to_string()));
        let s = |s: Option<&str>| s.map_or(Value::Null, |s| Value::String(shown(s)));
        match *self {
            Reader::Field(f) => match f {
                Field::Id => Value::String(c.txn.id.clone()),
                Field::Card => Value::String(c.txn.masked_card()),
                Field::Amount => dec(Some(c.txn.amount)),
                Field::Currency => Value::String(shown(c.currency)),
                Field::Device => s(c.txn.device.as_deref()),
                Field::Merchant => s(c.txn.merchant.as_deref()),
                Field::Region => s(c.txn.region.as_deref()),
                // A merchant category of fewer than 13 digits is no card number; one that
                // is, is shown masked (a string).
                Field::Mcc => c.txn.mcc.map_or(Value::Null, |m| {
                    if m.unsigned_abs() < 1_000_000_000_000 {
                        return Value::from(m);
                    }
                    let text = m.to_string();
                    match shown(&text) {
                        masked if masked != text => Value::String(masked),
                        _ => Value::from(m),
                    }
                }),
                Field::LocalHour => Value::from(c.local_hour),
                Field::LocalWeekday => Value::from(c.local_weekday),
            },
            Reader::Attr(i) => match c.attrs[i] {
                None => Value::Null,
                Some(AttrValue::Str(v)) => Value::String(shown(v)),
                Some(AttrValue::Num(d)) => Value::String(shown(&d.to_string())),
                Some(AttrValue::Bool(b)) => Value::Bool(*b),
            },
            Reader::IntFeature(i) => c.ints[i].map_or(Value::Null, Value::from),
            Reader::DecFeature(i) => dec(c.decs[i]),
        }
    }
}

/// Names an expression may refer to.
pub struct Scope<'s> {
    /// Declared attributes: name -> (index, type).
    pub attrs: &'s BTreeMap<String, (usize, AttrType)>,
    /// Window features: name -> reader (`IntFeature` / `DecFeature`). Empty in window filters.
    pub windows: &'s BTreeMap<String, Reader>,
    pub lists: &'s BTreeMap<String, CompiledList>,
    /// True while compiling a window's `where` filter.
    pub in_filter: bool,
}

#[derive(Clone)]
pub enum CompiledList {
    Str(Arc<StrSet>),
    Num(Arc<NumSet>),
}

/// The compiler for one expression: collects diagnostics and the names it read.
pub struct ExprCompiler<'s> {
    pub scope: &'s Scope<'s>,
    pub file: usize,
    /// Offset of the expression text within the file.
    pub base: usize,
    pub diags: Vec<Diagnostic>,
    pub reads: Vec<(String, Reader)>,
    /// Lists the expression reads (their contents never appear in `reads`).
    pub lists_read: Vec<String>,
    pub key: HashKey,
    /// Comparisons whose answer is known before any transaction (`local_hour >= 24`):
    /// where, the warning code, and what to say. Warnings, not errors.
    pub lints: Vec<(Span, &'static str, String)>,
}

/// Bounds the compiler knows for a number (for the never-true / always-true warnings), and
/// how to say them (empty for a constant).
fn bounds(v: &V) -> Option<(Decimal, Decimal, &'static str)> {
    Some(match v {
        V::Int(I::Const(k)) => (Decimal::from(*k), Decimal::from(*k), ""),
        V::Int(I::Hour) => (Decimal::ZERO, Decimal::from(23), "local_hour is 0 to 23"),
        V::Int(I::Weekday) => (Decimal::ONE, Decimal::from(7), "local_weekday is 1 to 7"),
        // Int features are counts and distinct counts.
        V::Int(I::Feature(_)) => (
            Decimal::ZERO,
            Decimal::MAX,
            "a count or distinct count is never negative",
        ),
        V::Dec(D::Const(k)) => (*k, *k, ""),
        V::Dec(D::Amount) => (Decimal::ZERO, Decimal::MAX, "amount is never negative"),
        _ => return None,
    })
}

/// Whether `x cmp y` holds for every pair (`Some(true)`), for none (`Some(false)`), or
/// depends on the values, with `x` in `a` and `y` in `b` (inclusive bounds).
fn known(cmp: Cmp, a: (Decimal, Decimal), b: (Decimal, Decimal)) -> Option<bool> {
    let ((a1, a2), (b1, b2)) = (a, b);
    let disjoint = a2 < b1 || b2 < a1;
    let single = a1 == a2 && b1 == b2 && a1 == b1;
    let (always, never) = match cmp {
        Cmp::Lt => (a2 < b1, a1 >= b2),
        Cmp::Le => (a2 <= b1, a1 > b2),
        Cmp::Gt => (a1 > b2, a2 <= b1),
        Cmp::Ge => (a1 >= b2, a2 < b1),
        Cmp::Eq => (single, disjoint),
        Cmp::Ne => (disjoint, single),
    };
    if always {
        Some(true)
    } else if never {
        Some(false)
    } else {
        None
    }
}

/// The parts of an `and` chain (`a and b and c`: all three).
fn conjuncts<'e>(e: &'e Expr, out: &mut Vec<&'e Expr>) {
    match &e.kind {
        ExprKind::Binary(BinOp::And, a, b) => {
            conjuncts(a, out);
            conjuncts(b, out);
        }
        _ => out.push(e),
    }
}

/// A comparison of a name with a number (`amount > 100`, `5 <= c`, `x == -1`): the name,
/// the comparison with the name on the left, and the number.
fn name_vs_number(e: &Expr) -> Option<(&str, Cmp, Decimal)> {
    fn number(e: &Expr) -> Option<Decimal> {
        match &e.kind {
            ExprKind::Num(k, _) => Some(*k),
            ExprKind::Unary(UnOp::Neg, x) => number(x).map(|k| -k),
            _ => None,
        }
    }
    let ExprKind::Binary(op, a, b) = &e.kind else {
        return None;
    };
    let cmp = Cmp::of(*op)?;
    match (&a.kind, &b.kind) {
        (ExprKind::Ident(n), _) => Some((n.as_str(), cmp, number(b)?)),
        (_, ExprKind::Ident(n)) => Some((n.as_str(), cmp.flip(), number(a)?)),
        _ => None,
    }
}

/// The first name whose comparisons with numbers among `parts` no value satisfies.
fn contradicted<'e>(parts: &[&'e Expr]) -> Option<&'e str> {
    // Per name: the greatest lower and the least upper bound (value, inclusive), and the
    // values it must not be.
    type Bound = Option<(Decimal, bool)>;
    let mut seen: Vec<(&str, Bound, Bound, Vec<Decimal>)> = Vec::new();
    for (name, cmp, k) in parts.iter().filter_map(|e| name_vs_number(e)) {
        let i = match seen.iter().position(|s| s.0 == name) {
            Some(i) => i,
            None => {
                seen.push((name, None, None, Vec::new()));
                seen.len() - 1
            }
        };
        let (_, lo, hi, not) = &mut seen[i];
        let raise = |lo: &mut Bound, b: (Decimal, bool)| {
            if lo.is_none_or(|l| b.0 > l.0 || (b.0 == l.0 && !b.1)) {
                *lo = Some(b);
            }
        };
        let lower = |hi: &mut Bound, b: (Decimal, bool)| {
            if hi.is_none_or(|h| b.0 < h.0 || (b.0 == h.0 && !b.1)) {
                *hi = Some(b);
            }
        };
        match cmp {
            Cmp::Gt => raise(lo, (k, false)),
            Cmp::Ge => raise(lo, (k, true)),
            Cmp::Lt => lower(hi, (k, false)),
            Cmp::Le => lower(hi, (k, true)),
            Cmp::Eq => {
                raise(lo, (k, true));
                lower(hi, (k, true));
            }
            Cmp::Ne => not.push(k),
        }
    }
    seen.into_iter().find_map(|(name, lo, hi, not)| {
        let empty = match (lo, hi) {
            (Some((l, li)), Some((h, hi))) => {
                l > h || (l == h && !(li && hi)) || (l == h && not.contains(&l))
            }
            _ => false,
        };
        empty.then_some(name)
    })
}

/// Intermediate typed value.
enum V {
    Bool(BoolFn),
    Int(I),
    Dec(D),
    Str(S),
    StrList(Arc<StrSet>),
    NumList(Arc<NumSet>),
    /// Already reported.
    Err,
}

/// Integer sources, kept apart so comparisons with constants can be specialised.
enum I {
    Const(i64),
    Mcc,
    Feature(usize),
    Hour,
    Weekday,
    F(IntFn),
}

enum D {
    Const(Decimal),
    Amount,
    Feature(usize),
    Attr(usize),
    F(DecFn),
}

enum S {
    Const(String),
    F(StrFn),
    /// A string field of the transaction (its hash can come from the per-decision cache).
    Field(Field, StrFn),
}

/// Whether a literal is a card number as the card field would read it (13-19 digits,
/// grouped or not, passing the checks every card number passes).
fn is_card_number(k: &str) -> bool {
    let digits = crate::txn::normalize_card(k.into());
    digits.bytes().all(|b| b.is_ascii_digit()) && crate::txn::card_like(&digits)
}

/// Added to a never-true or always-true warning about a part of a `not`'s operand.
const UNDER_NOT: &str = " (under a `not`, which turns it over)";

impl S {
    fn is_card(&self) -> bool {
        matches!(self, S::Field(Field::Card, _))
    }

    /// A literal compared with the card field, read as that field reads its value; anything
    /// else as it is.
    fn read_as_card(self, with_card: bool) -> S {
        match self {
            S::Const(k) if with_card => S::Const(crate::txn::normalize_card(k.into()).into_owned()),
            s => s,
        }
    }

    fn func(self) -> Result<StrFn, String> {
        match self {
            S::F(f) | S::Field(_, f) => Ok(f),
            S::Const(k) => Err(k),
        }
    }
}

impl I {
    fn into_fn(self) -> IntFn {
        match self {
            I::Const(v) => Box::new(move |_| Some(v)),
            I::Mcc => Box::new(|c| c.txn.mcc),
            I::Feature(i) => Box::new(move |c| c.ints[i]),
            I::Hour => Box::new(|c| Some(c.local_hour)),
            I::Weekday => Box::new(|c| Some(c.local_weekday)),
            I::F(f) => f,
        }
    }
    fn into_dec(self) -> D {
        match self {
            I::Const(v) => D::Const(Decimal::from(v)),
            other => {
                let f = other.into_fn();
                D::F(Box::new(move |c| f(c).map(Decimal::from)))
            }
        }
    }
}

impl D {
    fn into_fn(self) -> DecFn {
        match self {
            D::Const(v) => Box::new(move |_| Some(v)),
            D::Amount => Box::new(|c| Some(c.txn.amount)),
            D::Feature(i) => Box::new(move |c| c.decs[i]),
            D::Attr(i) => Box::new(move |c| match c.attrs[i] {
                Some(AttrValue::Num(d)) => Some(*d),
                _ => None,
            }),
            D::F(f) => f,
        }
    }
}

#[derive(Clone, Copy)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Cmp {
    /// The comparison an operator writes, if it is one.
    fn of(op: BinOp) -> Option<Cmp> {
        Some(match op {
            BinOp::Eq => Cmp::Eq,
            BinOp::Ne => Cmp::Ne,
            BinOp::Lt => Cmp::Lt,
            BinOp::Le => Cmp::Le,
            BinOp::Gt => Cmp::Gt,
            BinOp::Ge => Cmp::Ge,
            _ => return None,
        })
    }

    #[inline]
    fn test<T: PartialOrd>(self, a: T, b: T) -> bool {
        match self {
            Cmp::Eq => a == b,
            Cmp::Ne => a != b,
            Cmp::Lt => a < b,
            Cmp::Le => a <= b,
            Cmp::Gt => a > b,
            Cmp::Ge => a >= b,
        }
    }
    fn flip(self) -> Cmp {
        match self {
            Cmp::Lt => Cmp::Gt,
            Cmp::Le => Cmp::Ge,
            Cmp::Gt => Cmp::Lt,
            Cmp::Ge => Cmp::Le,
            other => other,
        }
    }
}

/// Levenshtein distance, for did-you-mean hints.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest candidate within a distance proportional to the name's length.
pub fn did_you_mean<'c>(name: &str, candidates: impl Iterator<Item = &'c str>) -> Option<String> {
    let max = (name.chars().count() / 3).max(1);
    candidates
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, _)| *d <= max)
        .min()
        .map(|(_, c)| c.to_string())
}

impl<'s> ExprCompiler<'s> {
    fn span(&self, s: &Span) -> Span {
        self.base + s.start..self.base + s.end
    }

    fn error(&mut self, code: &'static str, span: &Span, msg: String, label: String) {
        let sp = self.span(span);
        self.diags
            .push(Diagnostic::new(code, self.file, sp, msg, label));
    }

    fn type_error(&mut self, span: &Span, msg: String, label: String) -> V {
        self.error("type-mismatch", span, msg, label);
        V::Err
    }

    fn ty(v: &V) -> Option<Ty> {
        Some(match v {
            V::Bool(_) => Ty::Bool,
            V::Int(_) => Ty::Int,
            V::Dec(_) => Ty::Dec,
            V::Str(_) => Ty::Str,
            V::StrList(_) => Ty::StrList,
            V::NumList(_) => Ty::NumList,
            V::Err => return None,
        })
    }

    /// Compiles a condition: the expression must be a bool.
    pub fn condition(&mut self, e: &Expr) -> Option<BoolFn> {
        let v = self.compile(e);
        match v {
            V::Bool(f) => (self.diags.is_empty()).then_some(f),
            V::Err => None,
            other => {
                let ty = Self::ty(&other).map_or("?".to_string(), Ty::a);
                self.error(
                    "type-mismatch",
                    &e.span,
                    format!("a condition must be true or false, but this is {ty}"),
                    format!("this is {ty}; compare it, e.g. `... > 0`"),
                );
                None
            }
        }
    }

    fn note_read(&mut self, name: &str, r: Reader) {
        if !self.reads.iter().any(|(n, _)| n == name) {
            self.reads.push((name.to_string(), r));
        }
    }

    fn ident(&mut self, name: &str, span: &Span) -> V {
        if let Some((_, f)) = FIELDS.iter().find(|(n, _)| *n == name) {
            self.note_read(name, Reader::Field(*f));
            return match f {
                Field::Id
                | Field::Card
                | Field::Currency
                | Field::Device
                | Field::Merchant
                | Field::Region => {
                    let f = *f;
                    V::Str(S::Field(f, Box::new(move |c| field_str(f, c))))
                }
                Field::Amount => V::Dec(D::Amount),
                Field::Mcc => V::Int(I::Mcc),
                Field::LocalHour => V::Int(I::Hour),
                Field::LocalWeekday => V::Int(I::Weekday),
            };
        }
        if let Some(attr) = name.strip_prefix("attrs.") {
            if let Some(&(idx, ty)) = self.scope.attrs.get(attr) {
                self.note_read(name, Reader::Attr(idx));
                return match ty {
                    AttrType::Num => V::Dec(D::Attr(idx)),
                    AttrType::Str => V::Str(S::F(Box::new(move |c| match c.attrs[idx] {
                        Some(AttrValue::Str(s)) => Some(s.as_str()),
                        _ => None,
                    }))),
                    AttrType::Bool => V::Bool(Box::new(move |c| match c.attrs[idx] {
                        Some(AttrValue::Bool(b)) => Tri::from(*b),
                        _ => Tri::Unknown,
                    })),
                };
            }
            let hint = did_you_mean(attr, self.scope.attrs.keys().map(String::as_str));
            let mut label = match &hint {
                Some(h) => format!("did you mean `attrs.{h}`?"),
                None => "not declared".to_string(),
            };
            if self.scope.attrs.is_empty() {
                label = "no attributes are declared".into();
            }
            let sp = self.span(span);
            // A likely typo gets the name it probably meant in the label; declaring it is
            // then the other way out, not the first advice.
            let note = match &hint {
                Some(_) => format!(
                    "or, if `{attr}` is a new attribute, declare it in an [attrs] table with its type (string, number or bool)"
                ),
                None => format!(
                    "declare it in an [attrs] table with its type, e.g. `{attr} = \"string\"` (types: string, number, bool)"
                ),
            };
            self.diags.push(
                Diagnostic::new(
                    "unknown-attribute",
                    self.file,
                    sp,
                    format!("unknown attribute `{name}`"),
                    label,
                )
                .note(note),
            );
            return V::Err;
        }
        if let Some(r) = self.scope.windows.get(name) {
            self.note_read(name, *r);
            return match *r {
                Reader::IntFeature(i) => V::Int(I::Feature(i)),
                Reader::DecFeature(i) => V::Dec(D::Feature(i)),
                _ => V::Err,
            };
        }
        if let Some(l) = self.scope.lists.get(name) {
            self.lists_read.push(name.to_string());
            return match l {
                CompiledList::Str(s) => V::StrList(s.clone()),
                CompiledList::Num(n) => V::NumList(n.clone()),
            };
        }
        let candidates = FIELDS
            .iter()
            .map(|(n, _)| n.to_string())
            .chain(self.scope.attrs.keys().map(|a| format!("attrs.{a}")))
            .chain(self.scope.windows.keys().cloned())
            .chain(self.scope.lists.keys().cloned())
            .collect::<Vec<_>>();
        let hint = did_you_mean(name, candidates.iter().map(String::as_str));
        let label = match hint {
            Some(h) => format!("did you mean `{h}`?"),
            None => "not a field, attribute, window or list".into(),
        };
        let mut d = Diagnostic::new(
            "unknown-identifier",
            self.file,
            self.span(span),
            format!("unknown identifier `{name}`"),
            label,
        );
        if self.scope.in_filter {
            d = d.note("a window's `where` filter may read transaction fields and attrs, not other windows");
        }
        self.diags.push(d);
        V::Err
    }

    fn compile(&mut self, e: &Expr) -> V {
        match &e.kind {
            ExprKind::Num(d, true) => match i64::try_from(*d) {
                Ok(i) => V::Int(I::Const(i)),
                Err(_) => V::Dec(D::Const(*d)),
            },
            ExprKind::Num(d, false) => V::Dec(D::Const(*d)),
            ExprKind::Str(s) => V::Str(S::Const(s.clone())),
            ExprKind::Bool(b) => {
                let t = Tri::from(*b);
                V::Bool(Box::new(move |_| t))
            }
            ExprKind::Ident(name) => self.ident(name, &e.span),
            ExprKind::List(items) => self.list_literal(items, &e.span),
            ExprKind::Call(name, args) => self.call(name, args, &e.span),
            ExprKind::Unary(UnOp::Not, inner) => match self.compile_under_not(inner) {
                V::Bool(f) => V::Bool(Box::new(move |c| match f(c) {
                    Tri::True => Tri::False,
                    Tri::False => Tri::True,
                    Tri::Unknown => Tri::Unknown,
                })),
                V::Err => V::Err,
                other => {
                    let ty = Self::ty(&other).map_or("?".to_string(), Ty::a);
                    self.type_error(
                        &inner.span,
                        format!("`not` needs true or false, found {ty}"),
                        format!("this is {ty}"),
                    )
                }
            },
            ExprKind::Unary(UnOp::Neg, inner) => match self.compile(inner) {
                V::Int(i) => {
                    let f = i.into_fn();
                    V::Int(I::F(Box::new(move |c| f(c).and_then(i64::checked_neg))))
                }
                V::Dec(d) => {
                    let f = d.into_fn();
                    V::Dec(D::F(Box::new(move |c| f(c).map(|v| -v))))
                }
                V::Err => V::Err,
                other => {
                    let ty = Self::ty(&other).map_or("?".to_string(), Ty::a);
                    self.type_error(
                        &inner.span,
                        format!("cannot negate {ty}"),
                        "expected a number".into(),
                    )
                }
            },
            ExprKind::Binary(op, a, b) => self.binary(*op, a, b, &e.span),
        }
    }

    fn list_literal(&mut self, items: &[Expr], span: &Span) -> V {
        let mut strs = Vec::new();
        let mut nums = Vec::new();
        for it in items {
            match &it.kind {
                ExprKind::Str(s) => strs.push(s.clone()),
                ExprKind::Num(d, _) => nums.push(*d),
                _ => {
                    self.error(
                        "bad-list",
                        &it.span,
                        "list literals hold only string or number literals".into(),
                        "not a literal".into(),
                    );
                    return V::Err;
                }
            }
        }
        if !strs.is_empty() && !nums.is_empty() {
            return self.type_error(
                span,
                "a list mixes strings and numbers".into(),
                "use one kind of value".into(),
            );
        }
        if !strs.is_empty() {
            V::StrList(Arc::new(StrSet::inline(&self.key, &strs)))
        } else {
            V::NumList(Arc::new(NumSet::new(nums)))
        }
    }

    fn call(&mut self, name: &str, args: &[Expr], span: &Span) -> V {
        match name {
            "present" => {
                if args.len() != 1 {
                    return self.type_error(
                        span,
                        format!("present() takes 1 argument, got {}", args.len()),
                        "e.g. present(attrs.ip_country)".into(),
                    );
                }
                match self.compile(&args[0]) {
                    V::Int(i) => {
                        let f = i.into_fn();
                        V::Bool(Box::new(move |c| Tri::from(f(c).is_some())))
                    }
                    V::Dec(d) => {
                        let f = d.into_fn();
                        V::Bool(Box::new(move |c| Tri::from(f(c).is_some())))
                    }
                    V::Str(s) => match s.func() {
                        Ok(f) => V::Bool(Box::new(move |c| Tri::from(f(c).is_some()))),
                        Err(_) => V::Bool(Box::new(|_| Tri::True)),
                    },
                    V::Bool(f) => V::Bool(Box::new(move |c| Tri::from(f(c) != Tri::Unknown))),
                    V::Err => V::Err,
                    _ => self.type_error(
                        &args[0].span,
                        "present() takes a field, attribute or window".into(),
                        "a list is always present".into(),
                    ),
                }
            }
            _ => {
                let hint = did_you_mean(name, ["present"].into_iter());
                self.error(
                    "unknown-function",
                    span,
                    format!("unknown function `{name}`"),
                    hint.map_or("the only function is present(x)".into(), |h| {
                        format!("did you mean `{h}`?")
                    }),
                );
                V::Err
            }
        }
    }

    /// Compiles the operand of a `not`. A part found never (or always) true in it is still
    /// warned about, but the warning says that a `not` turns it over:
    /// `not (amount > 100 and amount < 50)` is always true, which "this `and` is never
    /// true" alone would hide.
    fn compile_under_not(&mut self, inner: &Expr) -> V {
        let before = self.lints.len();
        let v = self.compile(inner);
        for lint in &mut self.lints[before..] {
            if matches!(lint.1, "never-true" | "always-true") {
                // Under two `not`s the part reads as written again.
                match lint.2.strip_suffix(UNDER_NOT) {
                    Some(plain) => lint.2.truncate(plain.len()),
                    None => lint.2.push_str(UNDER_NOT),
                }
            }
        }
        v
    }

    fn binary(&mut self, op: BinOp, a: &Expr, b: &Expr, span: &Span) -> V {
        let lints_before = self.lints.len();
        let va = self.compile(a);
        let vb = self.compile(b);
        if matches!(va, V::Err) || matches!(vb, V::Err) {
            return V::Err;
        }
        let (ta, tb) = (Self::ty(&va).unwrap(), Self::ty(&vb).unwrap());
        // A part already never true says it for the whole `and` (and an inner `and`'s
        // contradiction was reported where that `and` was compiled); one under a `not`
        // makes that `not` always true, which says nothing of the `and`.
        let inner_never = self.lints[lints_before..]
            .iter()
            .any(|l| l.1 == "never-true" && !l.2.ends_with(UNDER_NOT));
        if op == BinOp::And && !inner_never {
            self.lint_contradiction(a, b, span);
        }
        match op {
            BinOp::And | BinOp::Or => match (va, vb) {
                (V::Bool(f), V::Bool(g)) => V::Bool(if op == BinOp::And {
                    Box::new(move |c| match f(c) {
                        Tri::False => Tri::False,
                        Tri::True => g(c),
                        Tri::Unknown => match g(c) {
                            Tri::False => Tri::False,
                            _ => Tri::Unknown,
                        },
                    })
                } else {
                    Box::new(move |c| match f(c) {
                        Tri::True => Tri::True,
                        Tri::False => g(c),
                        Tri::Unknown => match g(c) {
                            Tri::True => Tri::True,
                            _ => Tri::Unknown,
                        },
                    })
                }),
                _ => {
                    let (bad, t) = if ta != Ty::Bool { (a, ta) } else { (b, tb) };
                    self.type_error(
                        &bad.span,
                        format!(
                            "`{}` needs true or false on both sides, found {}",
                            op.symbol(),
                            t.a()
                        ),
                        format!("this is {}", t.a()),
                    )
                }
            },
            BinOp::In | BinOp::NotIn => self.membership(op == BinOp::NotIn, va, vb, a, b),
            BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
                let cmp = Cmp::of(op).expect("a comparison operator");
                self.comparison(cmp, op, va, vb, ta, tb, span)
            }
            BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Rem => {
                self.arith(op, va, vb, ta, tb, a, b)
            }
        }
    }

    /// Warns (`card-in-rule`) of a card number written in a rule file and compared with
    /// the card: held in memory in clear, where a list file's entries are keyed hashes.
    fn lint_card_in_rule(&mut self, span: &Span) {
        let sp = self.span(span);
        self.lints.push((
            sp,
            "card-in-rule",
            "a card number written in a rule file is held in memory in clear: put it in a list file, whose entries are held only as keyed hashes".to_string(),
        ));
    }

    /// Warns (`never-true`) when the comparisons of one name with constants in an `and`
    /// chain leave it no value (`amount > 100 and amount < 50`). Each part may be true
    /// alone, so the comparison warnings say nothing.
    fn lint_contradiction(&mut self, a: &Expr, b: &Expr, span: &Span) {
        let mut parts = Vec::new();
        conjuncts(a, &mut parts);
        conjuncts(b, &mut parts);
        let Some(name) = contradicted(&parts) else {
            return;
        };
        let sp = self.span(span);
        self.lints.push((
            sp,
            "never-true",
            format!(
                "this `and` is never true: its comparisons of `{name}` with constants leave it no value"
            ),
        ));
    }

    #[allow(clippy::too_many_arguments)]
    fn comparison(&mut self, cmp: Cmp, op: BinOp, va: V, vb: V, ta: Ty, tb: Ty, span: &Span) -> V {
        let ordering = !matches!(cmp, Cmp::Eq | Cmp::Ne);
        if let (Some((a1, a2, wa)), Some((b1, b2, wb))) = (bounds(&va), bounds(&vb)) {
            if let Some(answer) = known(cmp, (a1, a2), (b1, b2)) {
                let why = [wa, wb]
                    .into_iter()
                    .filter(|w| !w.is_empty())
                    .collect::<Vec<_>>()
                    .join(", ");
                let (code, said) = match answer {
                    // A value that is missing makes a comparison unknown, not true.
                    true => ("always-true", "is true whenever its value is known"),
                    false => ("never-true", "is never true"),
                };
                let why = if why.is_empty() {
                    "it compares constants".to_string()
                } else {
                    why
                };
                let sp = self.span(span);
                self.lints.push((
                    sp,
                    code,
                    format!("this `{}` comparison {said}: {why}", op.symbol()),
                ));
            }
        }
        match (va, vb) {
            (V::Int(x), V::Int(y)) => V::Bool(cmp_int(cmp, x, y)),
            (V::Int(x), V::Dec(y)) => V::Bool(cmp_dec(cmp, x.into_dec(), y)),
            (V::Dec(x), V::Int(y)) => V::Bool(cmp_dec(cmp, x, y.into_dec())),
            (V::Dec(x), V::Dec(y)) => V::Bool(cmp_dec(cmp, x, y)),
            (V::Str(x), V::Str(y)) if !ordering => {
                let eq = matches!(cmp, Cmp::Eq);
                // The card is held as the engine reads it (a grouped number as its
                // digits, no spaces around it), so a literal compared with it is read
                // the same way: `card == '4111 1111 1111 1111'` never matched before.
                let (x_card, y_card) = (x.is_card(), y.is_card());
                let (x, y) = (x.read_as_card(y_card), y.read_as_card(x_card));
                let card_literal = |s: &S| matches!(s, S::Const(k) if is_card_number(k));
                if (x_card && card_literal(&y)) || (y_card && card_literal(&x)) {
                    self.lint_card_in_rule(span);
                }
                V::Bool(match (x.func(), y.func()) {
                    (Ok(f), Err(k)) | (Err(k), Ok(f)) => {
                        Box::new(move |c| Tri::opt(f(c).map(|v| (v == k) == eq)))
                    }
                    (Ok(f), Ok(g)) => Box::new(move |c| match (f(c), g(c)) {
                        (Some(p), Some(q)) => Tri::from((p == q) == eq),
                        _ => Tri::Unknown,
                    }),
                    (Err(p), Err(q)) => {
                        let t = Tri::from((p == q) == eq);
                        Box::new(move |_| t)
                    }
                })
            }
            (V::Bool(f), V::Bool(g)) if !ordering => {
                let eq = matches!(cmp, Cmp::Eq);
                V::Bool(Box::new(move |c| match (f(c), g(c)) {
                    (Tri::Unknown, _) | (_, Tri::Unknown) => Tri::Unknown,
                    (p, q) => Tri::from((p == q) == eq),
                }))
            }
            _ => {
                let msg = if ta == tb {
                    format!("`{}` cannot order {} values", op.symbol(), ta.name())
                } else {
                    format!(
                        "cannot compare {} with {} using `{}`",
                        ta.a(),
                        tb.a(),
                        op.symbol()
                    )
                };
                let label = if (ta == Ty::Str) != (tb == Ty::Str)
                    && matches!(ta, Ty::Int | Ty::Dec | Ty::Str)
                    && matches!(tb, Ty::Int | Ty::Dec | Ty::Str)
                {
                    "a number and a string: remove the quotes from the number?".to_string()
                } else if matches!(ta, Ty::StrList | Ty::NumList)
                    || matches!(tb, Ty::StrList | Ty::NumList)
                {
                    "use `in` to test membership in a list".to_string()
                } else {
                    format!("{} vs {}", ta.name(), tb.name())
                };
                self.type_error(span, msg, label)
            }
        }
    }

    fn membership(&mut self, negate: bool, va: V, vb: V, a: &Expr, b: &Expr) -> V {
        let wrap = move |t: Tri| match (t, negate) {
            (Tri::True, true) => Tri::False,
            (Tri::False, true) => Tri::True,
            (t, _) => t,
        };
        if let (V::Str(s), V::StrList(set)) = (&va, &vb) {
            let plain = set.plain.as_deref().unwrap_or_default();
            if s.is_card() && plain.iter().any(|k| is_card_number(k)) {
                self.lint_card_in_rule(&b.span);
            }
        }
        match (va, vb) {
            (V::Str(S::Field(fld, _)), V::StrList(set)) if set.plain.is_none() => {
                // Hashed list: reuse the field's hash from the per-decision cache.
                V::Bool(Box::new(move |c| {
                    wrap(Tri::opt(
                        c.hashes.get(fld, c).map(|h| set.has(&h, c.received_ms)),
                    ))
                }))
            }
            (V::Str(s), V::StrList(set)) => match s.func() {
                Ok(f) => V::Bool(Box::new(move |c| {
                    wrap(Tri::opt(
                        f(c).map(|v| set.contains(c.key, v, c.received_ms)),
                    ))
                })),
                Err(k) if set.until.is_empty() => {
                    let t = wrap(Tri::from(set.contains(&self.key, &k, 0)));
                    V::Bool(Box::new(move |_| t))
                }
                // A constant looked up in a list with ends: the answer depends on the time.
                Err(k) => V::Bool(Box::new(move |c| {
                    wrap(Tri::from(set.contains(c.key, &k, c.received_ms)))
                })),
            },
            (V::Int(i), V::NumList(set)) => {
                let f = i.into_fn();
                V::Bool(Box::new(move |c| {
                    wrap(Tri::opt(f(c).map(|v| set.contains_int(v))))
                }))
            }
            (V::Dec(d), V::NumList(set)) => {
                let f = d.into_fn();
                V::Bool(Box::new(move |c| {
                    wrap(Tri::opt(f(c).map(|v| set.contains(v))))
                }))
            }
            // `[]` holds no value of either kind, and is compiled as a number list: with a
            // string on the left it is the empty string list (`region not in []` is as
            // valid as `mcc not in []`).
            (V::Str(s), V::NumList(set))
                if set.values.is_empty()
                    && matches!(&b.kind, ExprKind::List(items) if items.is_empty()) =>
            {
                self.membership(
                    negate,
                    V::Str(s),
                    V::StrList(Arc::new(StrSet::inline(&self.key, &[]))),
                    a,
                    b,
                )
            }
            (va, vb) => {
                let (ta, tb) = (Self::ty(&va).unwrap(), Self::ty(&vb).unwrap());
                if !matches!(tb, Ty::StrList | Ty::NumList) {
                    self.type_error(
                        &b.span,
                        format!("the right side of `in` must be a list, found {}", tb.a()),
                        "expected a list name or [..]".into(),
                    )
                } else {
                    self.type_error(
                        &a.span,
                        format!("cannot look up {} in {}", ta.a(), tb.a()),
                        format!("this is {}", ta.a()),
                    )
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn arith(&mut self, op: BinOp, va: V, vb: V, ta: Ty, tb: Ty, a: &Expr, b: &Expr) -> V {
        let numeric = |t: Ty| matches!(t, Ty::Int | Ty::Dec);
        if !numeric(ta) || !numeric(tb) {
            let (bad, t) = if !numeric(ta) { (a, ta) } else { (b, tb) };
            return self.type_error(
                &bad.span,
                format!("`{}` needs numbers, found {}", op.symbol(), t.a()),
                format!("this is {}", t.a()),
            );
        }
        match (op, va, vb) {
            (BinOp::Div, x, y)
            | (BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Rem, x @ V::Dec(_), y)
            | (BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Rem, x, y @ V::Dec(_)) => {
                let to_dec = |v: V| match v {
                    V::Int(i) => i.into_dec(),
                    V::Dec(d) => d,
                    _ => D::Const(Decimal::ZERO),
                };
                let (f, g) = (to_dec(x).into_fn(), to_dec(y).into_fn());
                let opf: fn(Decimal, Decimal) -> Option<Decimal> = match op {
                    BinOp::Add => |p, q| p.checked_add(q),
                    BinOp::Sub => |p, q| p.checked_sub(q),
                    BinOp::Mul => |p, q| p.checked_mul(q),
                    BinOp::Div => |p, q| p.checked_div(q),
                    _ => |p, q| p.checked_rem(q),
                };
                V::Dec(D::F(Box::new(move |c| opf(f(c)?, g(c)?))))
            }
            (_, V::Int(x), V::Int(y)) => {
                let (f, g) = (x.into_fn(), y.into_fn());
                let opf: fn(i64, i64) -> Option<i64> = match op {
                    BinOp::Add => i64::checked_add,
                    BinOp::Sub => i64::checked_sub,
                    BinOp::Mul => i64::checked_mul,
                    _ => i64::checked_rem,
                };
                V::Int(I::F(Box::new(move |c| opf(f(c)?, g(c)?))))
            }
            _ => V::Err,
        }
    }
}

fn cmp_int(cmp: Cmp, x: I, y: I) -> BoolFn {
    match (x, y) {
        (I::Feature(i), I::Const(k)) => {
            Box::new(move |c| Tri::opt(c.ints[i].map(|v| cmp.test(v, k))))
        }
        (I::Const(k), I::Feature(i)) => {
            let cmp = cmp.flip();
            Box::new(move |c| Tri::opt(c.ints[i].map(|v| cmp.test(v, k))))
        }
        (I::Mcc, I::Const(k)) => Box::new(move |c| Tri::opt(c.txn.mcc.map(|v| cmp.test(v, k)))),
        (I::Hour, I::Const(k)) => Box::new(move |c| Tri::from(cmp.test(c.local_hour, k))),
        (x, y) => {
            let (f, g) = (x.into_fn(), y.into_fn());
            Box::new(move |c| match (f(c), g(c)) {
                (Some(p), Some(q)) => Tri::from(cmp.test(p, q)),
                _ => Tri::Unknown,
            })
        }
    }
}

fn cmp_dec(cmp: Cmp, x: D, y: D) -> BoolFn {
    match (x, y) {
        (D::Amount, D::Const(k)) => Box::new(move |c| Tri::from(cmp.test(c.txn.amount, k))),
        (D::Const(k), D::Amount) => {
            let cmp = cmp.flip();
            Box::new(move |c| Tri::from(cmp.test(c.txn.amount, k)))
        }
        (D::Feature(i), D::Const(k)) => {
            Box::new(move |c| Tri::opt(c.decs[i].map(|v| cmp.test(v, k))))
        }
        (D::Attr(i), D::Const(k)) => Box::new(move |c| match c.attrs[i] {
            Some(AttrValue::Num(v)) => Tri::from(cmp.test(*v, k)),
            _ => Tri::Unknown,
        }),
        (x, y) => {
            let (f, g) = (x.into_fn(), y.into_fn());
            Box::new(move |c| match (f(c), g(c)) {
                (Some(p), Some(q)) => Tri::from(cmp.test(p, q)),
                _ => Tri::Unknown,
            })
        }
    }
}
