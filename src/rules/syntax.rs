//! Lexer and parser of the rule expression language.
//!
//! A hand-written Pratt parser: the grammar is a dozen productions, and owning it gives
//! exact spans and messages written for analysts ("use `and`, not `&&`").
//!
//! Precedence, loosest first: `or`; `and`; `not`; comparisons and `in` / `not in`
//! (non-associative); `+ -`; `* / %`; unary `-`.

use std::ops::Range;

use rust_decimal::Decimal;

pub type Span = Range<usize>;

#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExprKind {
    /// A number literal; `true` when written without a fraction (no exponents).
    Num(Decimal, bool),
    Str(String),
    Bool(bool),
    /// A name: a field, `attrs.x`, a window feature or a list.
    Ident(String),
    List(Vec<Expr>),
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    Call(String, Vec<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnOp {
    Not,
    Neg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Or,
    And,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
    NotIn,
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Or => "or",
            BinOp::And => "and",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::In => "in",
            BinOp::NotIn => "not in",
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
        }
    }
}

/// A syntax error at a span of the expression text.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub span: Span,
    pub message: String,
    pub label: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(Decimal, bool),
    Str(String),
    Ident(String),
    And,
    Or,
    Not,
    In,
    True,
    False,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Plus,
    Minus,
    Star,
    Slash,
    Percent,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Eof,
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Num(..) => "a number".into(),
        Tok::Str(_) => "a string".into(),
        Tok::Ident(n) => format!("`{n}`"),
        Tok::Eof => "the end of the expression".into(),
        Tok::And => "`and`".into(),
        Tok::Or => "`or`".into(),
        Tok::Not => "`not`".into(),
        Tok::In => "`in`".into(),
        Tok::True => "`true`".into(),
        Tok::False => "`false`".into(),
        Tok::Eq => "`==`".into(),
        Tok::Ne => "`!=`".into(),
        Tok::Lt => "`<`".into(),
        Tok::Le => "`<=`".into(),
        Tok::Gt => "`>`".into(),
        Tok::Ge => "`>=`".into(),
        Tok::Plus => "`+`".into(),
        Tok::Minus => "`-`".into(),
        Tok::Star => "`*`".into(),
        Tok::Slash => "`/`".into(),
        Tok::Percent => "`%`".into(),
        Tok::LParen => "`(`".into(),
        Tok::RParen => "`)`".into(),
        Tok::LBracket => "`[`".into(),
        Tok::RBracket => "`]`".into(),
        Tok::Comma => "`,`".into(),
    }
}

fn err(span: Span, message: impl Into<String>, label: impl Into<String>) -> SyntaxError {
    SyntaxError {
        span,
        message: message.into(),
        label: label.into(),
    }
}

fn lex(src: &str) -> Result<Vec<(Tok, Span)>, SyntaxError> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => {
                i += 1;
                continue;
            }
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'0'..=b'9' => {
                while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'_') {
                    i += 1;
                }
                let mut int = true;
                if i + 1 < bytes.len() && bytes[i] == b'.' && bytes[i + 1].is_ascii_digit() {
                    int = false;
                    i += 1;
                    while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'_') {
                        i += 1;
                    }
                }
                if i < bytes.len() && (bytes[i].is_ascii_alphabetic() || bytes[i] == b'_') {
                    let mut j = i;
                    while j < bytes.len() && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_')
                    {
                        j += 1;
                    }
                    return Err(err(
                        start..j,
                        format!("invalid number `{}`", &src[start..j]),
                        "not a number (durations belong in window definitions, e.g. over = \"10m\")",
                    ));
                }
                let text: String = src[start..i].chars().filter(|&c| c != '_').collect();
                // Exactly as written or not at all: a number with more digits than a
                // decimal holds (28 after the point) would be rounded without a word, and
                // `amount > 0.00000000000000000000000000001` would mean `amount > 0`.
                let d = Decimal::from_str_exact(&text).map_err(|_| {
                    err(
                        start..i,
                        "number out of range",
                        "too large or too precise (at most 28 digits after the point)",
                    )
                })?;
                out.push((Tok::Num(d, int), start..i));
                continue;
            }
            b'"' | b'\'' => {
                let quote = c;
                i += 1;
                let mut s = String::new();
                loop {
                    match bytes.get(i) {
                        None => {
                            return Err(err(
                                start..src.len(),
                                "unterminated string",
                                "this string is never closed",
                            ))
                        }
                        Some(&b) if b == quote => {
                            i += 1;
                            break;
                        }
                        Some(b'\\') if i + 1 < bytes.len() => {
                            let e = bytes[i + 1];
                            s.push(match e {
                                b'n' => '\n',
                                b't' => '\t',
                                b'\\' => '\\',
                                b'"' => '"',
                                b'\'' => '\'',
                                _ => {
                                    return Err(err(
                                        i..i + 2,
                                        "unknown escape in string",
                                        "use \\\\, \\\", \\', \\n or \\t",
                                    ))
                                }
                            });
                            i += 2;
                        }
                        Some(_) => {
                            let ch = src[i..].chars().next().unwrap_or('\u{fffd}');
                            s.push(ch);
                            i += ch.len_utf8();
                        }
                    }
                }
                out.push((Tok::Str(s), start..i));
                continue;
            }
            b'a'..=b'z' | b'A'..=b'Z' | b'_' => {
                while i < bytes.len() {
                    let b = bytes[i];
                    // `attrs.x`: a dot continues the name when a letter follows it.
                    let dotted = b == b'.'
                        && i + 1 < bytes.len()
                        && (bytes[i + 1].is_ascii_alphabetic() || bytes[i + 1] == b'_');
                    if b.is_ascii_alphanumeric() || b == b'_' || dotted {
                        i += 1;
                    } else {
                        break;
                    }
                }
                let word = &src[start..i];
                let tok = match word {
                    "and" => Tok::And,
                    "or" => Tok::Or,
                    "not" => Tok::Not,
                    "in" => Tok::In,
                    "true" => Tok::True,
                    "false" => Tok::False,
                    _ => Tok::Ident(word.to_string()),
                };
                out.push((tok, start..i));
                continue;
            }
            _ => {}
        }
        // Bytes, not a `&str` slice: the next character may be multi-byte (`≥`).
        let two = bytes.get(i..i + 2).unwrap_or(b"");
        let (tok, len) = match two {
            b"==" => (Tok::Eq, 2),
            b"!=" => (Tok::Ne, 2),
            b"<=" => (Tok::Le, 2),
            b">=" => (Tok::Ge, 2),
            b"&&" => return Err(err(i..i + 2, "unknown operator `&&`", "use `and`")),
            b"||" => return Err(err(i..i + 2, "unknown operator `||`", "use `or`")),
            _ => match c {
                b'<' => (Tok::Lt, 1),
                b'>' => (Tok::Gt, 1),
                b'+' => (Tok::Plus, 1),
                b'-' => (Tok::Minus, 1),
                b'*' => (Tok::Star, 1),
                b'/' => (Tok::Slash, 1),
                b'%' => (Tok::Percent, 1),
                b'(' => (Tok::LParen, 1),
                b')' => (Tok::RParen, 1),
                b'[' => (Tok::LBracket, 1),
                b']' => (Tok::RBracket, 1),
                b',' => (Tok::Comma, 1),
                b'=' => return Err(err(i..i + 1, "unknown operator `=`", "use `==` to compare")),
                b'!' => return Err(err(i..i + 1, "unknown operator `!`", "use `not`")),
                _ => {
                    let ch = src[i..].chars().next().unwrap_or('?');
                    let hint = match ch {
                        '≥' => "use `>=`",
                        '≤' => "use `<=`",
                        '≠' => "use `!=`",
                        '“' | '”' | '‘' | '’' => "use straight quotes \" or '",
                        _ => "not part of the rule language",
                    };
                    return Err(err(
                        i..i + ch.len_utf8(),
                        format!("unexpected character `{ch}`"),
                        hint,
                    ));
                }
            },
        };
        out.push((tok, i..i + len));
        i += len;
    }
    out.push((Tok::Eof, src.len()..src.len()));
    Ok(out)
}

struct Parser {
    toks: Vec<(Tok, Span)>,
    pos: usize,
    depth: usize,
}

/// Nesting limit, so hostile input cannot overflow the stack.
const MAX_DEPTH: usize = 64;
/// Token limit: checking, compiling and evaluating walk the tree recursively, and a long
/// chain (`a and b and c ...`) nests as deeply as it is long.
const MAX_TOKENS: usize = 1_000;

/// A form of `src` that is the same for two expressions only if they are written with the
/// same tokens: what window slots are shared and matched across reloads by. Each token as
/// written; one space where the source had spacing or a `#` comment between two tokens,
/// none where it had nothing. So the amount of spacing and comments do not matter, the
/// inside of a string literal does, and an expression without comments or repeated
/// spaces inside a string keeps the form slot signatures had before (its text with each
/// run of whitespace as one space), which snapshots taken then hold. `None` when `src`
/// does not lex.
pub fn canonical(src: &str) -> Option<String> {
    let toks = lex(src).ok()?;
    let mut out = String::with_capacity(src.len());
    let mut end = None;
    for (t, span) in &toks {
        if *t == Tok::Eof {
            break;
        }
        if end.is_some_and(|e| e < span.start) {
            out.push(' ');
        }
        out.push_str(&src[span.clone()]);
        end = Some(span.end);
    }
    Some(out)
}

/// Parses one expression.
pub fn parse(src: &str) -> Result<Expr, SyntaxError> {
    let toks = lex(src)?;
    // The lexer's end-of-input token is not one the analyst wrote.
    let written = toks.len().saturating_sub(1);
    if written > MAX_TOKENS {
        return Err(err(
            0..src.len(),
            format!("expression too long ({written} tokens, at most {MAX_TOKENS})"),
            "split it into several rules or windows",
        ));
    }
    let mut p = Parser {
        toks,
        pos: 0,
        depth: 0,
    };
    if matches!(p.peek(), Tok::Eof) {
        return Err(err(
            0..src.len(),
            "empty expression",
            "write a condition here",
        ));
    }
    let e = p.expr(0)?;
    match p.peek() {
        Tok::Eof => Ok(e),
        t => {
            let hint = match t {
                Tok::Ident(_) | Tok::Num(..) | Tok::Str(_) | Tok::LParen => {
                    "expected an operator such as `and`, `or`, `==` before this"
                }
                Tok::RParen => "this `)` has no matching `(`",
                _ => "unexpected here",
            };
            Err(err(
                p.span(),
                format!("unexpected {}", describe(t)),
                hint.to_string(),
            ))
        }
    }
}

impl Parser {
    fn peek(&self) -> &Tok {
        &self.toks[self.pos].0
    }
    fn span(&self) -> Span {
        self.toks[self.pos].1.clone()
    }
    fn bump(&mut self) -> (Tok, Span) {
        let t = self.toks[self.pos].clone();
        if self.pos + 1 < self.toks.len() {
            self.pos += 1;
        }
        t
    }
    fn expect(&mut self, want: Tok, what: &str) -> Result<Span, SyntaxError> {
        if *self.peek() == want {
            Ok(self.bump().1)
        } else {
            Err(err(
                self.span(),
                format!("expected {what}, found {}", describe(self.peek())),
                format!("expected {what}"),
            ))
        }
    }

    /// Binding power of an infix operator at the cursor: (left, right, op).
    fn infix(&self) -> Option<(u8, u8, BinOp)> {
        Some(match self.peek() {
            Tok::Or => (1, 2, BinOp::Or),
            Tok::And => (3, 4, BinOp::And),
            Tok::Eq => (7, 8, BinOp::Eq),
            Tok::Ne => (7, 8, BinOp::Ne),
            Tok::Lt => (7, 8, BinOp::Lt),
            Tok::Le => (7, 8, BinOp::Le),
            Tok::Gt => (7, 8, BinOp::Gt),
            Tok::Ge => (7, 8, BinOp::Ge),
            Tok::In => (7, 8, BinOp::In),
            Tok::Not if matches!(self.toks.get(self.pos + 1), Some((Tok::In, _))) => {
                (7, 8, BinOp::NotIn)
            }
            Tok::Plus => (9, 10, BinOp::Add),
            Tok::Minus => (9, 10, BinOp::Sub),
            Tok::Star => (11, 12, BinOp::Mul),
            Tok::Slash => (11, 12, BinOp::Div),
            Tok::Percent => (11, 12, BinOp::Rem),
            _ => return None,
        })
    }

    fn expr(&mut self, min_bp: u8) -> Result<Expr, SyntaxError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(err(
                self.span(),
                "expression nested too deeply",
                format!("more than {MAX_DEPTH} levels"),
            ));
        }
        let mut lhs = self.prefix(min_bp)?;
        let mut last_cmp = false;
        while let Some((lbp, rbp, op)) = self.infix() {
            if lbp < min_bp {
                break;
            }
            let op_span = self.span();
            let is_cmp = lbp == 7;
            if is_cmp && last_cmp {
                return Err(err(
                    op_span,
                    "comparisons cannot be chained",
                    "combine them with `and`, e.g. `a < b and b < c`",
                ));
            }
            self.bump();
            if op == BinOp::NotIn {
                self.bump();
            }
            let rhs = self.expr(rbp)?;
            let span = lhs.span.start..rhs.span.end;
            lhs = Expr {
                kind: ExprKind::Binary(op, Box::new(lhs), Box::new(rhs)),
                span,
            };
            last_cmp = is_cmp;
        }
        self.depth -= 1;
        Ok(lhs)
    }

    /// A value, or a prefix operator and its operand; `min_bp` is the binding power the
    /// caller parses at (an operand of a comparison or of arithmetic: above `not`'s).
    fn prefix(&mut self, min_bp: u8) -> Result<Expr, SyntaxError> {
        let (tok, span) = self.bump();
        let kind = match tok {
            Tok::Num(d, int) => ExprKind::Num(d, int),
            Tok::Str(s) => ExprKind::Str(s),
            Tok::True => ExprKind::Bool(true),
            Tok::False => ExprKind::Bool(false),
            Tok::Ident(name) => {
                if *self.peek() == Tok::LParen {
                    self.bump();
                    let mut args = Vec::new();
                    if *self.peek() != Tok::RParen {
                        loop {
                            args.push(self.expr(0)?);
                            if *self.peek() == Tok::Comma {
                                self.bump();
                            } else {
                                break;
                            }
                        }
                    }
                    let end = self.expect(Tok::RParen, "`)` to close the call")?;
                    return Ok(Expr {
                        kind: ExprKind::Call(name, args),
                        span: span.start..end.end,
                    });
                }
                ExprKind::Ident(name)
            }
            Tok::Not => {
                // `not` binds looser than comparisons: `not a == b` is `not (a == b)`. So
                // it cannot start an operand of a comparison or of arithmetic: `a == not
                // b == c` would read as `a == (not (b == c))`, slipping past the rule
                // that comparisons do not chain.
                if min_bp > 5 {
                    return Err(err(
                        span,
                        "`not` cannot stand here",
                        "it binds looser than comparisons and arithmetic: put it in parentheses, e.g. `a == (not b)`",
                    ));
                }
                let e = self.expr(5)?;
                let s = span.start..e.span.end;
                return Ok(Expr {
                    kind: ExprKind::Unary(UnOp::Not, Box::new(e)),
                    span: s,
                });
            }
            Tok::Minus => {
                let e = self.expr(13)?;
                let s = span.start..e.span.end;
                if let ExprKind::Num(d, int) = e.kind {
                    return Ok(Expr {
                        kind: ExprKind::Num(-d, int),
                        span: s,
                    });
                }
                return Ok(Expr {
                    kind: ExprKind::Unary(UnOp::Neg, Box::new(e)),
                    span: s,
                });
            }
            Tok::LParen => {
                let mut e = self.expr(0)?;
                let end = self.expect(Tok::RParen, "`)`")?;
                e.span = span.start..end.end;
                return Ok(e);
            }
            Tok::LBracket => {
                let mut items = Vec::new();
                if *self.peek() != Tok::RBracket {
                    loop {
                        items.push(self.expr(0)?);
                        if *self.peek() == Tok::Comma {
                            self.bump();
                            if *self.peek() == Tok::RBracket {
                                break;
                            }
                        } else {
                            break;
                        }
                    }
                }
                let end = self.expect(Tok::RBracket, "`,` or `]` in the list")?;
                return Ok(Expr {
                    kind: ExprKind::List(items),
                    span: span.start..end.end,
                });
            }
            other => {
                return Err(err(
                    span,
                    format!("expected a value, found {}", describe(&other)),
                    "expected a field, number, string, list or `(` here",
                ))
            }
        };
        Ok(Expr { kind, span })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn show(e: &Expr) -> String {
        match &e.kind {
            ExprKind::Num(d, _) => d.to_string(),
            ExprKind::Str(s) => format!("{s:?}"),
            ExprKind::Bool(b) => b.to_string(),
            ExprKind::Ident(n) => n.clone(),
            ExprKind::List(items) => {
                format!("[{}]", items.iter().map(show).collect::<Vec<_>>().join(","))
            }
            ExprKind::Unary(UnOp::Not, e) => format!("(not {})", show(e)),
            ExprKind::Unary(UnOp::Neg, e) => format!("(- {})", show(e)),
            ExprKind::Binary(op, a, b) => format!("({} {} {})", show(a), op.symbol(), show(b)),
            ExprKind::Call(f, args) => {
                format!(
                    "{f}({})",
                    args.iter().map(show).collect::<Vec<_>>().join(",")
                )
            }
        }
    }

    #[test]
    fn the_canonical_form_keeps_the_old_signatures_and_parts_what_differs() {
        // Without comments or repeated spaces inside strings: the text with each run of
        // whitespace as one space, as signatures were before (snapshots hold those).
        for src in [
            "amount < 2",
            "  mcc in [5992, 5947]  ",
            "present(attrs.x) and (a or b)",
            "amount<2",
            "merchant == 'ACME STORE'",
            "local_hour < 6\n  and amount > 1000",
        ] {
            let old = src.split_whitespace().collect::<Vec<_>>().join(" ");
            assert_eq!(canonical(src).as_deref(), Some(old.as_str()), "{src:?}");
        }
        // Spacing inside a string is part of the value; a comment is not.
        assert_ne!(
            canonical("merchant == 'ACME  STORE'"),
            canonical("merchant == 'ACME STORE'")
        );
        assert_eq!(canonical("amount < 2 # small"), canonical("amount   <   2"));
        assert_eq!(canonical("amount < 'x"), None, "does not lex");
    }

    #[test]
    fn precedence() {
        let cases = [
            ("a or b and c", "(a or (b and c))"),
            ("not a == 1 and b", "((not (a == 1)) and b)"),
            ("1 + 2 * 3 > x - -4", "((1 + (2 * 3)) > (x - -4))"),
            ("region not in hr", "(region not in hr)"),
            ("mcc in [7995, 6051,]", "(mcc in [7995,6051])"),
            ("attrs.phone_match == false", "(attrs.phone_match == false)"),
            (
                "present(attrs.x) and (a or b)",
                "(present(attrs.x) and (a or b))",
            ),
            ("-(a)", "(- a)"),
            ("'single' == \"dq\\\"\"", "(\"single\" == \"dq\\\"\")"),
        ];
        for (src, want) in cases {
            assert_eq!(show(&parse(src).unwrap()), want, "{src}");
        }
    }

    #[test]
    fn spans_point_into_source() {
        let e = parse("amount > 10").unwrap();
        let ExprKind::Binary(_, a, b) = e.kind else {
            panic!()
        };
        assert_eq!(a.span, 0..6);
        assert_eq!(b.span, 9..11);
    }

    #[test]
    fn syntax_errors() {
        let cases = [
            ("amount > ", 9..9, "expected a value"),
            ("a && b", 2..4, "`&&`"),
            ("a = 1", 2..3, "`=`"),
            ("1 < a < 2", 6..7, "chained"),
            ("a == not b == c", 5..8, "`not` cannot stand here"),
            ("a + not b", 4..7, "`not` cannot stand here"),
            ("(a > 1", 6..6, "expected `)`"),
            ("a > 1)", 5..6, "unexpected `)`"),
            ("\"abc", 0..4, "unterminated"),
            ("a b", 2..3, "unexpected `b`"),
            ("10m > 1", 0..3, "invalid number"),
            ("", 0..0, "empty"),
            ("a $ b", 2..3, "unexpected character"),
        ];
        for (src, span, msg) in cases {
            let e = parse(src).unwrap_err();
            assert_eq!(e.span, span, "{src}: {e:?}");
            assert!(e.message.contains(msg), "{src}: {}", e.message);
        }
        let deep = "(".repeat(200) + "a" + &")".repeat(200);
        assert!(parse(&deep).unwrap_err().message.contains("deeply"));
        let long = vec!["amount > 0"; 400].join(" and ");
        assert!(parse(&long).unwrap_err().message.contains("too long"));
        // The limits are as documented (docs/rules.md section 7): 1,000 tokens written.
        let at_limit = "not a".to_string() + &" or a".repeat(499);
        assert!(parse(&at_limit).is_ok());
        let e = parse(&(at_limit + " or a")).unwrap_err();
        assert!(
            e.message.contains("(1002 tokens, at most 1000)"),
            "{}",
            e.message
        );
        // 64 deep: the documented example is 6 deep.
        let nested = |k: usize| "a and (".repeat(k) + "a" + &")".repeat(k);
        assert!(parse(&nested(31)).is_ok());
        assert!(parse(&nested(32)).unwrap_err().message.contains("deeply"));
        // A number is exactly as written or refused, never rounded.
        let e = parse("amount > 0.00000000000000000000000000001").unwrap_err();
        assert!(e.label.contains("28 digits after the point"), "{e:?}");
        assert!(parse("amount > 0.0000000000000000000000000001").is_ok());
        let e = parse("amount ≥ 1000").unwrap_err();
        assert_eq!(e.span, 7..10);
        assert_eq!(e.label, "use `>=`");
        assert!(parse("amount >€ 1").is_err());
    }
}
