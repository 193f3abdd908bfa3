//! Load-time diagnostics: every error names its file, line and column and shows the line
//! with a caret under the problem.

use std::ops::Range;

use codespan_reporting::diagnostic::{Diagnostic as CsDiagnostic, Label};
use codespan_reporting::files::SimpleFiles;
use codespan_reporting::term;

/// One source file of a rule set (a `.toml` rule file or a list file). `Debug` omits the
/// text: list files may hold card numbers.
#[derive(Clone)]
pub struct SourceFile {
    /// Path as shown to the analyst (relative to where they ran the command).
    pub name: String,
    pub text: String,
}

impl std::fmt::Debug for SourceFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceFile")
            .field("name", &self.name)
            .field("bytes", &self.text.len())
            .finish()
    }
}

/// One problem found while loading rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    /// Stable short code, e.g. `unknown-identifier`.
    pub code: &'static str,
    /// Index into the loaded files; `None` for problems of the set as a whole.
    pub file: Option<usize>,
    pub span: Range<usize>,
    pub message: String,
    /// Text under the caret.
    pub label: String,
    pub notes: Vec<String>,
}

impl Diagnostic {
    pub fn new(
        code: &'static str,
        file: usize,
        span: Range<usize>,
        message: impl Into<String>,
        label: impl Into<String>,
    ) -> Self {
        Diagnostic {
            code,
            file: Some(file),
            span,
            message: message.into(),
            label: label.into(),
            notes: Vec::new(),
        }
    }

    pub fn global(code: &'static str, message: impl Into<String>) -> Self {
        Diagnostic {
            code,
            file: None,
            span: 0..0,
            message: message.into(),
            label: String::new(),
            notes: Vec::new(),
        }
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }
}

/// `line:col` (1-based, columns in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Renders diagnostics as plain text (no colour), in the order given.
pub fn render(files: &[SourceFile], diags: &[Diagnostic]) -> String {
    let mut db = SimpleFiles::new();
    for f in files {
        db.add(f.name.clone(), f.text.clone());
    }
    let config = term::Config::default();
    let mut out = String::new();
    for d in diags {
        let mut cs = CsDiagnostic::error()
            .with_code(d.code)
            .with_message(&d.message)
            .with_notes(d.notes.clone());
        if let Some(file) = d.file {
            let len = files[file].text.len();
            let span = d.span.start.min(len)..d.span.end.min(len).max(d.span.start.min(len));
            cs = cs.with_labels(vec![Label::primary(file, span).with_message(&d.label)]);
        }
        match term::emit_into_string(&config, &db, &cs) {
            Ok(s) => out.push_str(&s),
            Err(e) => out.push_str(&format!("error[{}]: {} ({e})\n", d.code, d.message)),
        }
        out.push('\n');
    }
    out
}
