//! Transactions: the wire JSON, its exact decoding, and card masking.
//!
//! Amounts and numeric attributes are parsed from their JSON text straight into
//! [`Decimal`]; they never pass through `f64`.

use std::borrow::Cow;
use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::value::RawValue;

/// One attribute value from `attrs`.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Str(String),
    Num(Decimal),
    Bool(bool),
}

/// A decoded card transaction. Built by [`Transaction::from_json`] or directly in tests.
/// Its `Debug` output masks the card.
#[derive(Clone, PartialEq)]
pub struct Transaction {
    /// Idempotency key.
    pub id: String,
    /// Event time in epoch milliseconds; `None` means "use the receive time".
    pub ts_ms: Option<i64>,
    /// PAN or token; a PAN sent in digit groups is held as its digits. Never logged or
    /// echoed in full: see [`mask_card`].
    pub card: String,
    pub amount: Decimal,
    pub currency: Option<String>,
    pub device: Option<String>,
    pub merchant: Option<String>,
    pub region: Option<String>,
    pub mcc: Option<i64>,
    /// Extra attributes, sorted by name.
    pub attrs: Vec<(String, AttrValue)>,
}

/// Card masked, and card numbers in the other values the switch sent masked too (a
/// card number in the wrong field): safe for a log line.
impl std::fmt::Debug for Transaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let masked = |v: &dyn std::fmt::Debug| Redacted(redact_pans(&format!("{v:?}")));
        f.debug_struct("Transaction")
            .field("id", &masked(&self.id))
            .field("ts_ms", &self.ts_ms)
            .field("card", &self.masked_card())
            .field("amount", &self.amount)
            .field("currency", &masked(&self.currency))
            .field("device", &masked(&self.device))
            .field("merchant", &masked(&self.merchant))
            .field("region", &masked(&self.region))
            .field("mcc", &self.mcc)
            .field("attrs", &masked(&self.attrs))
            .finish()
    }
}

/// Text already formatted (and masked), shown as it is.
struct Redacted(String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Transaction {
    /// A transaction with only the required fields set.
    pub fn new(id: impl Into<String>, card: impl Into<String>, amount: Decimal) -> Self {
        Transaction {
            id: id.into(),
            ts_ms: None,
            card: card.into(),
            amount,
            currency: None,
            device: None,
            merchant: None,
            region: None,
            mcc: None,
            attrs: Vec::new(),
        }
    }

    /// Looks up an attribute by name.
    pub fn attr(&self, name: &str) -> Option<&AttrValue> {
        self.attrs
            .binary_search_by(|(k, _)| k.as_str().cmp(name))
            .ok()
            .map(|i| &self.attrs[i].1)
    }

    /// The card masked as first 6 + last 4 digits (`411111******1111`).
    pub fn masked_card(&self) -> String {
        mask_card(&self.card)
    }

    /// Encodes the transaction as wire JSON (amount and numeric attrs as exact decimal
    /// strings, `ts` as epoch milliseconds). The inverse of [`Transaction::from_json`].
    pub fn to_json(&self) -> String {
        use std::fmt::Write;
        let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
        let mut o = String::with_capacity(256);
        let _ = write!(o, "{{\"id\":{}", q(&self.id));
        if let Some(ts) = self.ts_ms {
            let _ = write!(o, ",\"ts\":{ts}");
        }
        let _ = write!(
            o,
            ",\"card\":{},\"amount\":\"{}\"",
            q(&self.card),
            self.amount
        );
        for (k, v) in [
            ("currency", &self.currency),
            ("device", &self.device),
            ("merchant", &self.merchant),
            ("region", &self.region),
        ] {
            if let Some(v) = v {
                let _ = write!(o, ",\"{k}\":{}", q(v));
            }
        }
        if let Some(mcc) = self.mcc {
            let _ = write!(o, ",\"mcc\":{mcc}");
        }
        if !self.attrs.is_empty() {
            o.push_str(",\"attrs\":{");
            for (i, (k, v)) in self.attrs.iter().enumerate() {
                if i > 0 {
                    o.push(',');
                }
                let _ = match v {
                    AttrValue::Str(s) => write!(o, "{}:{}", q(k), q(s)),
                    // Decimal's Display is a valid JSON number (no exponent).
                    AttrValue::Num(d) => write!(o, "{}:{d}", q(k)),
                    AttrValue::Bool(b) => write!(o, "{}:{b}", q(k)),
                };
            }
            o.push('}');
        }
        o.push('}');
        o
    }

    /// Sets an attribute, keeping `attrs` sorted by name (as [`Transaction::attr`] needs).
    pub fn set_attr(&mut self, name: &str, value: AttrValue) {
        match self.attrs.binary_search_by(|(k, _)| k.as_str().cmp(name)) {
            Ok(i) => self.attrs[i].1 = value,
            Err(i) => self.attrs.insert(i, (name.to_string(), value)),
        }
    }

    /// Decodes one transaction from its JSON bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Transaction, DecodeError> {
        let wire: Wire<'_> = serde_json::from_slice(bytes).map_err(DecodeError::from_serde)?;
        wire.into_txn()
    }
}

/// Stable error codes for rejected input; the NATS contract exposes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidJson,
    MissingField,
    WrongType,
    InvalidAmount,
    NegativeAmount,
    InvalidTimestamp,
    Oversized,
    /// The id was used within the dedupe horizon for another payment (found by the
    /// engine, not by decoding).
    IdReused,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::WrongType => "wrong_type",
            ErrorCode::InvalidAmount => "invalid_amount",
            ErrorCode::NegativeAmount => "negative_amount",
            ErrorCode::InvalidTimestamp => "invalid_timestamp",
            ErrorCode::Oversized => "oversized",
            ErrorCode::IdReused => "id_reused",
        }
    }

    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::InvalidJson,
        ErrorCode::MissingField,
        ErrorCode::WrongType,
        ErrorCode::InvalidAmount,
        ErrorCode::NegativeAmount,
        ErrorCode::InvalidTimestamp,
        ErrorCode::Oversized,
        ErrorCode::IdReused,
    ];
}

/// Why a payload is not a valid transaction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DecodeError {
    pub code: ErrorCode,
    pub message: String,
    /// The transaction id, when it could be read.
    pub id: Option<String>,
}

impl DecodeError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        DecodeError {
            code,
            message: message.into(),
            id: None,
        }
    }

    pub(crate) fn from_serde(e: serde_json::Error) -> Self {
        use serde_json::error::Category;
        // serde quotes offending values: numbers between backticks ("invalid type: integer
        // `4111111111111111`"), strings between double quotes, escaped ("invalid type:
        // string \"4111111111111111\"": a card number in a field that wants a number, or
        // a whole transaction encoded twice, as one JSON string). A card number sent with
        // the wrong type must not come back in the error, so every quoted value is
        // blanked. Field names are quoted with backticks in "missing field `card`", which
        // is kept.
        let msg = e.to_string();
        let code = match e.classify() {
            Category::Data if msg.starts_with("missing field") => ErrorCode::MissingField,
            Category::Data => ErrorCode::WrongType,
            _ => ErrorCode::InvalidJson,
        };
        let msg = if code == ErrorCode::MissingField {
            msg
        } else {
            blank_quoted(&msg)
        };
        DecodeError::new(code, msg)
    }
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow, default)]
    ts: Option<&'a RawValue>,
    #[serde(borrow)]
    card: Cow<'a, str>,
    #[serde(borrow)]
    amount: &'a RawValue,
    #[serde(borrow, default)]
    currency: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    device: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    merchant: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    region: Option<Cow<'a, str>>,
    #[serde(default)]
    mcc: Option<i64>,
    #[serde(borrow, default)]
    attrs: Option<BTreeMap<Cow<'a, str>, &'a RawValue>>,
}

/// A transaction id as the contract allows it (also the id of an outcome).
pub(crate) fn check_id(id: &str) -> Result<(), DecodeError> {
    if id.is_empty() {
        return Err(DecodeError::new(
            ErrorCode::MissingField,
            "field `id` must not be empty",
        ));
    }
    // The id travels in NATS headers (Nats-Msg-Id), which cannot hold control characters
    // and whose values the server trims of leading spaces (` t1` would reach a downstream
    // stream as `t1`, and be dropped there as a duplicate), and in logs.
    if id.len() > 256 || id.chars().any(char::is_control) || id.trim() != id {
        return Err(DecodeError::new(
            ErrorCode::WrongType,
            "field `id` must be at most 256 bytes, without control characters or leading or trailing spaces",
        ));
    }
    Ok(())
}

impl Wire<'_> {
    fn into_txn(self) -> Result<Transaction, DecodeError> {
        let id = self.id.into_owned();
        let with_id = |mut e: DecodeError| {
            e.id = Some(id.clone());
            e
        };
        check_id(&id)?;
        let card = normalize_card(self.card);
        if card.is_empty() {
            return Err(with_id(DecodeError::new(
                ErrorCode::MissingField,
                "field `card` must not be empty",
            )));
        }
        // An id holding the transaction's own card number would carry it in clear into
        // every decision, header and log line (the id is echoed everywhere, by design):
        // refused, without echoing the id.
        // Only a card number (all digits once grouped ones are read): a token's digits,
        // picked out from between its letters, are no card number. No allocation unless
        // the id has as many digits as the card (this runs for every transaction).
        let is_digit = |b: &u8| b.is_ascii_digit();
        if card.len() >= 13
            && card.bytes().all(|b| b.is_ascii_digit())
            && id.bytes().filter(is_digit).count() >= card.len()
            && id
                .chars()
                .filter(char::is_ascii_digit)
                .collect::<String>()
                .contains(&*card)
        {
            return Err(DecodeError::new(
                ErrorCode::WrongType,
                "field `id` must not hold the card number",
            ));
        }
        let amount = parse_amount(self.amount.get()).map_err(with_id)?;
        let ts_ms = match self.ts {
            None => None,
            Some(raw) if raw.get() == "null" => None,
            Some(raw) => Some(parse_ts(raw.get()).map_err(with_id)?),
        };
        let mut attrs = Vec::new();
        if let Some(map) = self.attrs {
            attrs.reserve(map.len());
            for (k, raw) in map {
                // Values that are not a string, a number rust_decimal can hold exactly, or
                // a boolean (objects, arrays, null, 1e-30) are dropped: an attribute that
                // no rule may read must not get the transaction refused, and a declared
                // one that is absent or malformed is "missing" to the rules.
                if let Some(v) = parse_attr(raw.get()) {
                    attrs.push((k.into_owned(), v));
                }
            }
        }
        Ok(Transaction {
            ts_ms,
            card: card.into_owned(),
            amount,
            currency: self.currency.map(Cow::into_owned),
            device: self.device.map(Cow::into_owned),
            merchant: self.merchant.map(Cow::into_owned),
            region: self.region.map(Cow::into_owned),
            mcc: self.mcc,
            attrs,
            id,
        })
    }
}

/// Parses a JSON number text or JSON string holding a decimal.
fn parse_decimal_text(raw: &str) -> Option<Decimal> {
    let text = if let Some(inner) = raw.strip_prefix('"') {
        inner.strip_suffix('"')?.trim()
    } else {
        raw
    };
    if text.is_empty() || text.contains(['\\', '_']) {
        return None;
    }
    if text.contains(['e', 'E']) {
        exact_scientific(text)
    } else {
        Decimal::from_str_exact(text).ok()
    }
}

/// `<decimal>e<exponent>`, exactly: the mantissa read with `from_str_exact` and the
/// exponent applied by moving the scale (`Decimal::from_scientific` read the mantissa
/// with rounding, so `0.999…9e0` with 30 nines was 1). `None` when the value does not fit
/// 28 decimal places or 96 bits.
fn exact_scientific(text: &str) -> Option<Decimal> {
    let (mantissa, exp) = text.split_once(['e', 'E'])?;
    let mut d = Decimal::from_str_exact(mantissa).ok()?;
    let exp: i64 = exp.parse().ok()?;
    let scale = i64::from(d.scale()).checked_sub(exp)?;
    if scale >= 0 {
        d.set_scale(u32::try_from(scale).ok()?).ok()?;
        return Some(d);
    }
    let up = u32::try_from(-scale).ok().filter(|&k| k <= 28)?;
    d.set_scale(0).ok()?;
    d.checked_mul(Decimal::from_i128_with_scale(10i128.pow(up), 0))
}

/// Largest number of decimal places accepted in an amount.
pub const MAX_AMOUNT_SCALE: u32 = 8;
/// Amounts must be below this (10^15 currency units). With both bounds, window sums stay
/// exact: rust_decimal's 96-bit mantissa holds ~790k maximal amounts at full scale.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000_000;

fn parse_amount(raw: &str) -> Result<Decimal, DecodeError> {
    let d = parse_decimal_text(raw).ok_or_else(|| {
        DecodeError::new(
            ErrorCode::InvalidAmount,
            // Input values are never echoed: a card number sent in the wrong field would
            // come back in the error.
            "`amount` must be a decimal number or a string holding one",
        )
    })?;
    if d.is_sign_negative() && !d.is_zero() {
        return Err(DecodeError::new(
            ErrorCode::NegativeAmount,
            "`amount` must be >= 0",
        ));
    }
    let d = within_amount_scale(d).ok_or_else(|| {
        DecodeError::new(
            ErrorCode::InvalidAmount,
            format!("`amount` has more than {MAX_AMOUNT_SCALE} decimal places"),
        )
    })?;
    if d >= Decimal::from(MAX_AMOUNT) {
        return Err(DecodeError::new(
            ErrorCode::InvalidAmount,
            format!("`amount` must be below {MAX_AMOUNT}"),
        ));
    }
    Ok(d.normalize_keep_scale())
}

/// `d` with at most [`MAX_AMOUNT_SCALE`] decimals: trailing zeros past them are dropped
/// (no precision: `12.500000000` is 12.5); `None` when a significant digit is past them.
pub(crate) fn within_amount_scale(d: Decimal) -> Option<Decimal> {
    let d = if d.scale() > MAX_AMOUNT_SCALE {
        d.normalize()
    } else {
        d
    };
    (d.scale() <= MAX_AMOUNT_SCALE).then_some(d)
}

trait KeepScale {
    fn normalize_keep_scale(self) -> Self;
}
impl KeepScale for Decimal {
    /// `-0` becomes `0`; the scale the sender used is kept ("10.50" stays "10.50").
    fn normalize_keep_scale(self) -> Self {
        if self.is_zero() {
            Decimal::new(0, self.scale())
        } else {
            self
        }
    }
}

/// Replaces every text between backticks, and every double-quoted string (with its
/// backslash escapes, as Rust's `{:?}` writes it), with `…`.
fn blank_quoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut chars = msg.chars();
    while let Some(ch) = chars.next() {
        match ch {
            '`' => {
                out.push_str("`…`");
                for c in chars.by_ref() {
                    if c == '`' {
                        break;
                    }
                }
            }
            '"' => {
                out.push_str("\"…\"");
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// Latest accepted event time: the end of year 9999.
const MAX_TS_MS: i64 = 253_402_300_799_999;

fn parse_ts(raw: &str) -> Result<i64, DecodeError> {
    if let Some(inner) = raw.strip_prefix('"') {
        let s = inner.strip_suffix('"').unwrap_or(inner);
        return chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| t.timestamp_millis())
            .ok()
            .filter(|ms| (0..=MAX_TS_MS).contains(ms))
            .ok_or_else(|| {
                DecodeError::new(
                    ErrorCode::InvalidTimestamp,
                    "`ts` must be an RFC 3339 time from 1970 on (e.g. \"2026-11-26T10:00:00Z\") or integer epoch milliseconds",
                )
            });
    }
    raw.parse::<i64>()
        .ok()
        .filter(|ms| (0..=MAX_TS_MS).contains(ms))
        .ok_or_else(|| {
            DecodeError::new(
                ErrorCode::InvalidTimestamp,
                "`ts` must be RFC 3339 or integer epoch milliseconds (0..=year 9999)",
            )
        })
}

fn parse_attr(raw: &str) -> Option<AttrValue> {
    match raw.as_bytes().first()? {
        b'"' => serde_json::from_str::<String>(raw).ok().map(AttrValue::Str),
        b't' if raw == "true" => Some(AttrValue::Bool(true)),
        b'f' if raw == "false" => Some(AttrValue::Bool(false)),
        b'-' | b'0'..=b'9' => parse_decimal_text(raw).map(AttrValue::Num),
        _ => None,
    }
}

/// A card number written in groups (`4111 1111 1111 1111`, `4111-1111-1111-1111`) as its
/// digits, so that it is the same card for the windows and lists as when sent without
/// separators. Anything else (a token, digits only) is kept as sent.
/// Spaces around the value are dropped first: ` 4111111111111111` is that card too (kept
/// as sent, it hashed differently, so a blocked card sent with a stray space passed the
/// block list, and the check of the id against the card was skipped).
pub(crate) fn normalize_card(card: Cow<'_, str>) -> Cow<'_, str> {
    let trimmed = card.trim_matches(|c: char| c.is_ascii_whitespace());
    if let Some(digits) = grouped_card_digits(trimmed) {
        return Cow::Owned(digits);
    }
    if trimmed.len() == card.len() {
        return card;
    }
    Cow::Owned(trimmed.to_string())
}

/// The digits of `s` when it is a card number written in groups joined by single spaces
/// or dashes (13 to 19 digits once joined: the card field holds card numbers and tokens,
/// so no more is asked); `None` for anything else, digits only included. List entries
/// written so match the card as the engine reads it (see `normalize_card`).
pub fn grouped_card_digits(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let grouped = b.first().is_some_and(u8::is_ascii_digit)
        && b.last().is_some_and(u8::is_ascii_digit)
        && b.iter().any(|c| !c.is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_digit() || *c == b' ' || *c == b'-')
        && !b
            .windows(2)
            .any(|w| !w[0].is_ascii_digit() && !w[1].is_ascii_digit());
    if !grouped {
        // Every card sent as digits (or a token) leaves here, without an allocation.
        return None;
    }
    let digits: String = s.chars().filter(char::is_ascii_digit).collect();
    (13..=19).contains(&digits.len()).then_some(digits)
}

/// Appends `run` (ASCII digits and separators, `n` digits in all) with every digit but the
/// first 6 and the last 4 as `*`, separators kept.
fn push_masked(out: &mut String, run: &[u8], n: usize) {
    let mut seen = 0;
    for &c in run {
        if c.is_ascii_digit() {
            seen += 1;
            out.push(if seen <= 6 || seen > n - 4 {
                c as char
            } else {
                '*'
            });
        } else {
            out.push(c as char);
        }
    }
}

/// Whether `digits` (ASCII digits only) passes the Luhn check every card number passes.
pub fn luhn_valid(digits: &str) -> bool {
    let mut sum = 0;
    for (i, b) in digits.bytes().rev().enumerate() {
        let mut d = u32::from(b - b'0');
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    sum % 10 == 0
}

/// Whether `digits` (ASCII digits only) may be a card number: 13 to 19 digits, not
/// starting with 0 (zero-padded merchant and terminal numbers), and the Luhn check every
/// card number passes, whatever its network. What [`mask_card_numbers`] masks.
pub fn card_like(digits: &str) -> bool {
    (13..=19).contains(&digits.len()) && !digits.starts_with('0') && luhn_valid(digits)
}

/// Whether `digits` is [`card_like`] with the issuer prefix of a major network: Visa (4),
/// Mastercard (51-55, 2221-2720), Mir (2200-2204), American Express and Diners (34, 36-38,
/// 30), JCB (35), Discover and UnionPay (6). Strict enough to refuse names with it (rule ids, version
/// labels) without refusing a timestamp such as 20261126-143000.
pub fn card_shaped(digits: &str) -> bool {
    let n = digits.len();
    let prefix = |k: usize| {
        digits
            .get(..k)
            .and_then(|p| p.parse::<u32>().ok())
            .unwrap_or(0)
    };
    let issuer = match digits.as_bytes().first() {
        Some(b'4') | Some(b'6') => true,
        Some(b'5') => (51..=55).contains(&prefix(2)),
        Some(b'3') => matches!(prefix(2), 30 | 34..=38),
        // Mastercard 2221-2720; Mir 2200-2204. (Not Maestro 50/56-58 or UnionPay 81-82:
        // with a build number before a timestamp, `82-20261126143200` is one of them by
        // Luhn, and a label that loaded before would be refused at a reload.)
        Some(b'2') => (2221..=2720).contains(&prefix(4)) || (2200..=2204).contains(&prefix(4)),
        _ => false,
    };
    (13..=19).contains(&n) && issuer && card_like(digits)
}

/// `text` with every card number masked: a run of digits, unbroken or in groups joined by
/// single spaces, dashes or underscores, of which a span of whole groups is [`card_like`]
/// (a card number with a digit group before or after it, two in a row) is masked whole,
/// first 6 and last 4 digits kept, separators kept. Precise where [`redact_pans`] is
/// thorough: for text shown in decisions (values the switch sent, analysts' descriptions
/// and conditions), where merchant numbers and most timestamps, fractions and thresholds
/// must stay readable.
pub fn mask_card_numbers(text: &str) -> Cow<'_, str> {
    // Most values (`m-42`, a region, a device name) cannot hold a card number: no scan, no
    // allocation.
    if text.bytes().filter(u8::is_ascii_digit).count() < 13 {
        return Cow::Borrowed(text);
    }
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for groups in digit_runs(b) {
        if holds_card(text, &groups, card_like) {
            let (start, end) = (groups[0].0, groups[groups.len() - 1].1);
            let n = groups.iter().map(|(s0, e0)| e0 - s0).sum();
            out.push_str(&text[copied..start]);
            push_masked(&mut out, &b[start..end], n);
            copied = end;
        }
    }
    out.push_str(&text[copied..]);
    Cow::Owned(out)
}

/// Whether a span of whole groups of one digit run of `text` is a card number by `test`.
fn holds_card(text: &str, groups: &[(usize, usize)], test: fn(&str) -> bool) -> bool {
    (0..groups.len()).any(|g| {
        let mut digits = String::new();
        groups[g..].iter().any(|&(s0, e0)| {
            digits.push_str(&text[s0..e0]);
            digits.len() <= 19 && test(&digits)
        })
    })
}

/// Whether `text` holds a major network's card number ([`card_shaped`]), unbroken or in
/// groups: for refusing names (rule ids, version labels) that go into every decision,
/// without refusing a timestamp that happens to pass the Luhn check.
pub fn holds_card_number(text: &str) -> bool {
    digit_runs(text.as_bytes())
        .iter()
        .any(|groups| holds_card(text, groups, card_shaped))
}

/// `text` with every card number in it masked: a run of 13 to 19 digits, or digit groups
/// joined by single spaces, dashes or underscores (`4111 1111 1111 1111`) with 13 digits or
/// more in all (two such numbers in a row make one run, masked as one). The first 6 and
/// last 4 digits stay, as [`mask_card`] keeps them, and so do the separators. Thorough, for
/// text only people read that may hold input values: a panic's message, a load error's
/// lines and messages. An unbroken run of 20 digits or more is not a card number and stays.
pub fn redact_pans(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for groups in digit_runs(b) {
        let digits: usize = groups.iter().map(|(s0, e0)| e0 - s0).sum();
        let card = if groups.len() > 1 {
            digits >= 13
        } else {
            (13..=19).contains(&digits)
        };
        if card {
            let (start, end) = (groups[0].0, groups[groups.len() - 1].1);
            out.push_str(&text[copied..start]);
            push_masked(&mut out, &b[start..end], digits);
            copied = end;
        }
    }
    out.push_str(&text[copied..]);
    out
}

/// The runs of digits in `b`, each as its groups (byte ranges of digits) joined by single
/// spaces, dashes or underscores, in order.
fn digit_runs(b: &[u8]) -> Vec<Vec<(usize, usize)>> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let mut groups = Vec::new();
        loop {
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            groups.push((start, i));
            // One separator with a digit after it continues the number.
            if i + 1 < b.len() && matches!(b[i], b' ' | b'-' | b'_') && b[i + 1].is_ascii_digit() {
                i += 1;
                continue;
            }
            break;
        }
        runs.push(groups);
    }
    runs
}

/// `text` with its digits masked but the first 6 and the last 4, when its digits, read
/// without what is between them, hold `card` (ASCII digits): the transaction's own card
/// number in any form (`4111.1111.1111.1111`, padded with zeros, followed by the expiry
/// date). `None` when they do not.
pub fn mask_own_card(text: &str, card: &str) -> Option<String> {
    let digits: String = text.chars().filter(char::is_ascii_digit).collect();
    if card.len() < 13 || !digits.contains(card) {
        return None;
    }
    let n = digits.len();
    let mut seen = 0;
    Some(
        text.chars()
            .map(|c| {
                if !c.is_ascii_digit() {
                    return c;
                }
                seen += 1;
                if seen <= 6 || seen > n - 4 {
                    c
                } else {
                    '*'
                }
            })
            .collect(),
    )
}

/// Masks a card number as first 6 + last 4 (`411111******1111`). Short values (tokens of
/// fewer than 13 characters) show at most their last 4 characters, and never more than
/// half of them.
pub fn mask_card(card: &str) -> String {
    let n = card.len();
    if card.is_ascii() && n >= 13 {
        let mut s = String::with_capacity(n);
        s.push_str(&card[..6]);
        s.extend(std::iter::repeat_n('*', n - 10));
        s.push_str(&card[n - 4..]);
        return s;
    }
    let chars: Vec<char> = card.chars().collect();
    let n = chars.len();
    if n >= 13 {
        let mut s: String = chars[..6].iter().collect();
        s.extend(std::iter::repeat_n('*', n - 10));
        s.extend(&chars[n - 4..]);
        s
    } else {
        let keep = n - (n / 2).min(4);
        let mut s: String = std::iter::repeat_n('*', keep).collect();
        s.extend(&chars[keep..]);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    /// A card sent in groups is the same card as its digits; a token is kept as sent.
    #[test]
    fn a_grouped_card_number_is_read_as_its_digits() {
        for (sent, read) in [
            ("4111 1111 1111 1111", "4111111111111111"),
            ("4111-1111-1111-1111", "4111111111111111"),
            ("4111111111111111", "4111111111111111"),
            ("tok-ab12-3456", "tok-ab12-3456"),
            ("1234 5678", "1234 5678"),
            (" 4111 1111 1111 1111", "4111111111111111"),
            (" 4111111111111111  ", "4111111111111111"),
            (" tok-ab12 ", "tok-ab12"),
        ] {
            let json = format!(r#"{{"id":"t1","card":"{sent}","amount":"1"}}"#);
            let t = Transaction::from_json(json.as_bytes()).unwrap();
            assert_eq!(t.card, read, "{sent}");
        }
    }

    /// The precise masker leaves what is not a card number readable: merchant numbers,
    /// IMEI-like device numbers without a card prefix, timestamps, fractions, MCC lists.
    #[test]
    fn card_numbers_are_told_from_other_long_numbers() {
        assert!(luhn_valid("4111111111111111") && !luhn_valid("4111111111111112"));
        for (text, masked) in [
            ("4111 1111 1111 1111", "4111 11** **** 1111"),
            ("ref 5500-0000-0000-0004.", "ref 5500-00**-****-0004."),
            ("378282246310005", "378282*****0005"),
            // Two in a row, grouped: the run masked whole.
            (
                "4111 1111 1111 1111 4000 0000 0000 0002",
                "4111 11** **** **** **** **** **** 0002",
            ),
            // A digit group before the card, or a 19-digit card in 4-4-4-4-3: masked whole.
            ("6 4111 1111 1111 1111", "6 4111 1*** **** 1111"),
            ("4000 0000 0000 0002 002", "4000 00** **** ***2 002"),
            // Networks without a major prefix: Mir, Maestro, RuPay.
            ("2200000000000004", "220000******0004"),
            ("5018000000000009", "501800******0009"),
            ("8171999927660000", "817199******0000"),
        ] {
            assert_eq!(mask_card_numbers(text), masked, "{text}");
        }
        // ... and a name holding a Mir number is refused like those of the major networks.
        assert!(holds_card_number("blk_2200000000000004"));
        // A build number before a timestamp is no card number of a major network.
        for label in ["82-20261126143200", "50-20261126143000"] {
            assert!(!holds_card_number(label), "{label}");
        }
        for keep in [
            "000000123456789",
            "1732615200001",
            "52.520006599999995",
            "4111111111111112",
            "00004111111111111111",
        ] {
            assert_eq!(mask_card_numbers(keep), keep);
        }
        // Names: only a major network's card number by prefix is one, not a timestamp that
        // passes the Luhn check.
        assert!(card_like("20261126143001") && !holds_card_number("20261126-143001"));
        assert!(holds_card_number("vip 4111 1111 1111 1111"));
    }

    /// A token's digits are no card number: an id built from the token is accepted.
    #[test]
    fn an_id_built_from_a_token_is_accepted() {
        let json = br#"{"id":"tok_3f2b9c1e-4a5d-4e6f-8a7b-9c0d1e2f3a4b:000123","card":"tok_3f2b9c1e-4a5d-4e6f-8a7b-9c0d1e2f3a4b","amount":"1"}"#;
        assert!(Transaction::from_json(json).is_ok());
    }

    /// An id holding the transaction's own card number is refused, and the error does not
    /// echo it.
    #[test]
    fn an_id_holding_the_card_number_is_refused() {
        for id in [
            "4111111111111111",
            "t-4111111111111111",
            "20261126-4111 1111 1111 1111",
        ] {
            let json = format!(r#"{{"id":"{id}","card":"4111 1111 1111 1111","amount":"1"}}"#);
            let e = Transaction::from_json(json.as_bytes()).unwrap_err();
            assert_eq!(e.code, ErrorCode::WrongType, "{id}");
            assert!(e.id.is_none(), "{id}");
            assert!(!e.message.contains("4111"), "{id}: {}", e.message);
        }
        // A stray space around the card does not get the id past the check.
        let json = r#"{"id":"4111111111111111","card":" 4111111111111111","amount":"1"}"#;
        let e = Transaction::from_json(json.as_bytes()).unwrap_err();
        assert_eq!(e.code, ErrorCode::WrongType);
        let ok = r#"{"id":"t-4000000000000002","card":"4111111111111111","amount":"1"}"#;
        assert!(Transaction::from_json(ok.as_bytes()).is_ok());
    }

    #[test]
    fn decodes_full_transaction() {
        let t = Transaction::from_json(
            br#"{"id":"t1","ts":"2026-11-26T10:00:00Z","card":"4111111111111111","amount":"1234.56",
                "currency":"EUR","device":"d1","merchant":"m1","region":"DE","mcc":5411,
                "attrs":{"merchant_age_days":12,"phone_match":false,"channel":"ecom","x":null},
                "unknown":[1,2]}"#,
        )
        .unwrap();
        assert_eq!(t.id, "t1");
        assert_eq!(t.ts_ms, Some(1_795_687_200_000));
        assert_eq!(t.amount, dec("1234.56"));
        assert_eq!(t.mcc, Some(5411));
        assert_eq!(
            t.attr("merchant_age_days"),
            Some(&AttrValue::Num(Decimal::from(12)))
        );
        assert_eq!(t.attr("phone_match"), Some(&AttrValue::Bool(false)));
        assert_eq!(t.attr("channel"), Some(&AttrValue::Str("ecom".into())));
        assert_eq!(t.attr("x"), None);
    }

    #[test]
    fn amounts_are_exact() {
        // A value an f64 would round: taken exactly or refused, never rounded.
        let t =
            Transaction::from_json(br#"{"id":"a","card":"c","amount":90071992547409.93}"#).unwrap();
        assert_eq!(t.amount.to_string(), "90071992547409.93");
        let t =
            Transaction::from_json(br#"{"id":"a","card":"c","amount":"0.10000000000"}"#).unwrap();
        assert_eq!(t.amount, dec("0.1"));
        let t = Transaction::from_json(br#"{"id":"a","card":"c","amount":"10.50"}"#).unwrap();
        assert_eq!(t.amount.to_string(), "10.50");
        // An exponent is applied exactly, never rounding the mantissa.
        for (text, want) in [("15e-1", "1.5"), ("1.5E+2", "150"), ("0.25e1", "2.5")] {
            assert_eq!(
                exact_scientific(text),
                Some(want.parse().unwrap()),
                "{text}"
            );
        }
        assert_eq!(exact_scientific("0.999999999999999999999999999999e0"), None);
        assert_eq!(exact_scientific("1e-29"), None);
        assert!(Transaction::from_json(
            br#"{"id":"a","card":"c","amount":"0.999999999999999999999999999999e0"}"#
        )
        .is_err());
        let t = Transaction::from_json(br#"{"id":"a","card":"c","amount":1.5e2}"#).unwrap();
        assert_eq!(t.amount, dec("150"));
        let t = Transaction::from_json(br#"{"id":"a","card":"c","amount":"-0"}"#).unwrap();
        assert!(t.amount.is_zero());
    }

    #[test]
    fn epoch_millis_timestamp() {
        let t = Transaction::from_json(br#"{"id":"a","card":"c","amount":1,"ts":1700000000123}"#)
            .unwrap();
        assert_eq!(t.ts_ms, Some(1_700_000_000_123));
    }

    #[test]
    fn bad_input_has_stable_codes() {
        let cases: &[(&[u8], ErrorCode)] = &[
            (b"{not json", ErrorCode::InvalidJson),
            (b"", ErrorCode::InvalidJson),
            (br#"{"card":"c","amount":1}"#, ErrorCode::MissingField),
            (br#"{"id":"a","amount":1}"#, ErrorCode::MissingField),
            (br#"{"id":"a","card":"c"}"#, ErrorCode::MissingField),
            (
                br#"{"id":"","card":"c","amount":1}"#,
                ErrorCode::MissingField,
            ),
            (
                br#"{"id":"a","card":"   ","amount":1}"#,
                ErrorCode::MissingField,
            ),
            (
                br#"{"id":"a","card":"c","amount":-5}"#,
                ErrorCode::NegativeAmount,
            ),
            (
                br#"{"id":"a","card":"c","amount":"-0.01"}"#,
                ErrorCode::NegativeAmount,
            ),
            (
                br#"{"id":"a","card":"c","amount":"abc"}"#,
                ErrorCode::InvalidAmount,
            ),
            (
                br#"{"id":"a","card":"c","amount":true}"#,
                ErrorCode::InvalidAmount,
            ),
            (
                br#"{"id":"a","card":"c","amount":0.1000000000000000055}"#,
                ErrorCode::InvalidAmount,
            ),
            (
                br#"{"id":"a","card":"c","amount":"1e15"}"#,
                ErrorCode::InvalidAmount,
            ),
            (
                br#"{"id":"a","card":"c","amount":"NaN"}"#,
                ErrorCode::InvalidAmount,
            ),
            (
                br#"{"id":"a","card":"c","amount":1,"ts":"yesterday"}"#,
                ErrorCode::InvalidTimestamp,
            ),
            (
                br#"{"id":"a","card":"c","amount":1,"ts":-5}"#,
                ErrorCode::InvalidTimestamp,
            ),
            (
                br#"{"id":"a","card":"c","amount":1,"ts":1.5}"#,
                ErrorCode::InvalidTimestamp,
            ),
            (br#"{"id":7,"card":"c","amount":1}"#, ErrorCode::WrongType),
            (
                br#"{"id":"a","card":"c","amount":1,"mcc":"x"}"#,
                ErrorCode::WrongType,
            ),
            (br#"[1,2]"#, ErrorCode::WrongType),
            (
                br#"{"id":"evil\nX","card":"c","amount":1}"#,
                ErrorCode::WrongType,
            ),
            // NATS trims a header value's leading spaces: ` t1` would reach a downstream
            // stream's dedupe as `t1`.
            (
                br#"{"id":" t1","card":"c","amount":1}"#,
                ErrorCode::WrongType,
            ),
            (
                br#"{"id":"t1 ","card":"c","amount":1}"#,
                ErrorCode::WrongType,
            ),
            (
                br#"{"id":"   ","card":"c","amount":1}"#,
                ErrorCode::WrongType,
            ),
        ];
        for (input, code) in cases {
            let err = Transaction::from_json(input).unwrap_err();
            assert_eq!(
                err.code,
                *code,
                "{}: {}",
                String::from_utf8_lossy(input),
                err
            );
        }
        let err = Transaction::from_json(br#"{"id":"x9","card":"c","amount":"abc"}"#).unwrap_err();
        assert_eq!(err.id.as_deref(), Some("x9"));
    }

    #[test]
    fn json_round_trip() {
        let mut t = Transaction::new("rt-1", "4111111111111111", dec("10.50"));
        t.ts_ms = Some(1_700_000_000_000);
        t.merchant = Some("m\"1".into());
        t.mcc = Some(5411);
        t.set_attr("phone_match", AttrValue::Bool(true));
        t.set_attr("age", AttrValue::Num(dec("12.5")));
        t.set_attr("channel", AttrValue::Str("ecom".into()));
        assert_eq!(t.attrs[0].0, "age");
        let back = Transaction::from_json(t.to_json().as_bytes()).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn errors_and_debug_never_show_a_card() {
        let e = Transaction::from_json(br#"{"id":"a","card":4111111111111111,"amount":1}"#)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::WrongType);
        assert!(!e.message.contains("4111111111111111"), "{}", e.message);
        assert!(e.message.contains("invalid type"), "{}", e.message);
        let e = Transaction::from_json(br#"{"id":"a","amount":1}"#).unwrap_err();
        assert!(e.message.contains("`card`"), "{}", e.message);
        for bad in [
            &br#"{"id":"a","card":"c","amount":"4111111111111111"}"#[..],
            br#"{"id":"a","card":"c","amount":"4111-1111-1111-1111"}"#,
            br#"{"id":"a","card":"c","amount":"-4111111111111111"}"#,
            br#"{"id":"a","card":"c","amount":1,"ts":"4111111111111111"}"#,
            br#"{"id":"a","card":"c","amount":1,"ts":-4111111111111111}"#,
            // A string where a number or an object belongs: serde quotes strings with
            // double quotes, not backticks.
            br#"{"id":"a","card":"c","amount":1,"mcc":"4111111111111111"}"#,
            br#"{"id":"a","card":"c","amount":1,"attrs":"x 4111111111111111"}"#,
            br#"{"id":"a","card":"c","amount":1,"mcc":"\"4111111111111111\" \\"}"#,
            // A whole transaction encoded twice: one JSON string.
            br#""{\"id\":\"a\",\"card\":\"4111111111111111\",\"amount\":1}""#,
        ] {
            let e = Transaction::from_json(bad).unwrap_err();
            assert!(!e.message.contains("4111"), "{}", e.message);
        }
        let e =
            Transaction::from_json(br#"{"id":"a","card":"c","amount":1,"mcc":"4111111111111111"}"#)
                .unwrap_err();
        assert_eq!(e.code, ErrorCode::WrongType);
        assert!(
            e.message
                .starts_with("invalid type: string \"…\", expected"),
            "{}",
            e.message
        );
        let t = Transaction::new("d", "4111111111111111", Decimal::ONE);
        let dbg = format!("{t:?}");
        assert!(!dbg.contains("4111111111111111") && dbg.contains("411111******1111"));
    }

    #[test]
    fn odd_attrs_are_dropped_not_refused() {
        let t = Transaction::from_json(
            br#"{"id":"a","card":"c","amount":1,"attrs":{"blob":{"a":1},"list":[1],"tiny":1e-30,"n":null,"ok":true}}"#,
        )
        .unwrap();
        assert_eq!(t.attrs, vec![("ok".to_string(), AttrValue::Bool(true))]);
    }

    #[test]
    fn attrs_are_sorted_and_a_repeated_name_keeps_its_last_value() {
        let t = Transaction::from_json(
            br#"{"id":"a","card":"c","amount":1,"attrs":{"z":"last","b":1,"a_name_longer_than_24_bytes":"x","b":"two","c":true,"b":false}}"#,
        )
        .unwrap();
        assert_eq!(
            t.attrs,
            vec![
                (
                    "a_name_longer_than_24_bytes".into(),
                    AttrValue::Str("x".into())
                ),
                ("b".into(), AttrValue::Bool(false)),
                ("c".into(), AttrValue::Bool(true)),
                ("z".into(), AttrValue::Str("last".into())),
            ]
        );
        assert_eq!(t.attr("b"), Some(&AttrValue::Bool(false)));
        // A value the engine drops still counts as the name's last value.
        let t = Transaction::from_json(
            br#"{"id":"a","card":"c","amount":1,"attrs":{"k":true,"k":null}}"#,
        )
        .unwrap();
        assert!(t.attrs.is_empty());
        for bad in [
            &br#"{"id":"a","card":"c","amount":1,"attrs":"x"}"#[..],
            br#"{"id":"a","card":"c","amount":1,"attrs":[1]}"#,
        ] {
            assert_eq!(
                Transaction::from_json(bad).unwrap_err().code,
                ErrorCode::WrongType
            );
        }
        let t = Transaction::from_json(br#"{"id":"a","card":"c","amount":1,"attrs":null}"#);
        assert!(t.unwrap().attrs.is_empty());
    }

    #[test]
    fn timestamps_before_1970_are_refused() {
        let e = Transaction::from_json(
            br#"{"id":"a","card":"c","amount":1,"ts":"1969-01-01T00:00:00Z"}"#,
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidTimestamp);
    }

    #[test]
    fn masks_cards() {
        assert_eq!(mask_card("4111111111111111"), "411111******1111");
        assert_eq!(mask_card("4111111111111"), "411111***1111");
        assert_eq!(mask_card("tok_ab12"), "****ab12");
        assert_eq!(mask_card("abc"), "**c");
        assert_eq!(mask_card("a"), "*");
        assert_eq!(mask_card(""), "");
    }

    /// The transaction's own card in a value, in any form, is masked.
    #[test]
    fn the_own_card_is_masked_in_any_form() {
        let card = "4111111111111111";
        for (text, masked) in [
            ("4111.1111.1111.1111", "4111.11**.****.1111"),
            ("00004111111111111111", "000041**********1111"),
            ("41111111111111111228", "411111**********1228"),
            (
                "card 4111/1111/1111/1111 exp 12/28",
                "card 4111/11**/****/**** exp 12/28",
            ),
        ] {
            assert_eq!(mask_own_card(text, card).as_deref(), Some(masked), "{text}");
        }
        assert_eq!(mask_own_card("4111 1111 1111 1112", card), None);
        assert_eq!(mask_own_card("m-42", card), None);
        assert_eq!(
            mask_own_card("123", "1"),
            None,
            "no card number: nothing masked"
        );
    }

    /// A debug print of a transaction (what a log line would show) holds no card number.
    #[test]
    fn a_transaction_debug_print_holds_no_card_number() {
        let t = Transaction::from_json(
            br#"{"id":"t1","card":"4111111111111111","amount":"1","device":"4000000000000002",
                "attrs":{"recipient":"5500 0000 0000 0004"}}"#,
        )
        .unwrap();
        let d = format!("{t:?}");
        for full in [
            "4111111111111111",
            "4000000000000002",
            "5500 0000 0000 0004",
        ] {
            assert!(!d.contains(full), "{d}");
        }
        assert!(d.contains("411111******1111"), "{d}");
    }

    #[test]
    fn redacts_card_numbers_in_text() {
        assert_eq!(
            redact_pans("called `unwrap` on card 4111111111111111, id 123456789012, €5"),
            "called `unwrap` on card 411111******1111, id 123456789012, €5"
        );
        assert_eq!(redact_pans("4000000000000002"), "400000******0002");
        assert_eq!(
            redact_pans("x12345678901234567890y"),
            "x12345678901234567890y",
            "20 digits: not a card number"
        );
        assert_eq!(redact_pans("none"), "none");
        // Written with separators: masked, separators kept.
        assert_eq!(
            redact_pans("card 4111 1111 1111 1111 or 4111-1111-1111-1112."),
            "card 4111 11** **** 1111 or 4111-11**-****-1112."
        );
        assert_eq!(redact_pans("4111_1111_1111_1113"), "4111_11**_****_1113");
        // Two in a row are one run: nothing of the middle stays.
        assert_eq!(
            redact_pans("4111 1111 1111 1111 4000 0000 0000 0002"),
            "4111 11** **** **** **** **** **** 0002"
        );
        // Dates, times, amounts, phone numbers and thresholds stay.
        for keep in [
            "2026-11-26 10:00:00",
            "amount > 10000.50 and mcc == 5411",
            "+49 170 1234 567",
            "1 2 3",
            "- 5",
        ] {
            assert_eq!(redact_pans(keep), keep);
        }
    }
}
