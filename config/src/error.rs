//! Positioned configuration errors: every problem found in a file, each at `PATH:LINE:COL`.
//!
//! Validation never stops at the first problem: it pushes each one into a [`Sink`] with the byte
//! span TOML gave it, and the sink turns spans into 1-based lines and columns (in characters,
//! as editors count them) once, at the end, sorted in file order.
//!
//! [`ConfigErrors`] prints like rustc: each problem's first line stays greppable as
//! `PATH:LINE:COL: message`, and under it the source line with a caret under the span, drawn by
//! annotate-snippets (the renderer rustc's own is built on). A [`Diagnostic`] alone prints the
//! first line only, for one-line contexts.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in a configuration file, printed as `PATH:LINE:COL: message` (or `PATH: message`
/// when it concerns the file as a whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file, as the user named it.
    pub path: PathBuf,
    /// 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    /// 1-based column in characters, when the problem has a place in the file.
    pub col: Option<usize>,
    /// What is wrong, and what was expected.
    pub message: String,
    /// The source line the problem is on, and where in it, for the caret.
    pub excerpt: Option<Excerpt>,
}

/// One line of the file and the byte range in it that a diagnostic points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Excerpt {
    /// The line, without its newline.
    pub text: String,
    /// The bytes of `text` under the caret (at least one, so a caret always shows).
    pub span: Range<usize>,
}

impl Diagnostic {
    /// A problem with the file as a whole (unreadable, nothing to run): no line or column.
    pub fn whole_file(path: &Path, message: impl Into<String>) -> Self {
        Diagnostic {
            path: path.to_path_buf(),
            line: None,
            col: None,
            message: message.into(),
            excerpt: None,
        }
    }

    /// A problem at byte `offset` of `source`.
    pub fn at(path: &Path, source: &str, offset: usize, message: impl Into<String>) -> Self {
        Self::spanning(path, source, offset..offset, message)
    }

    /// A problem about bytes `span` of `source` (the caret covers the part on its first line).
    pub fn spanning(
        path: &Path,
        source: &str,
        span: Range<usize>,
        message: impl Into<String>,
    ) -> Self {
        let start = floor_char_boundary(source, span.start);
        let (line, col) = line_col(source, start);
        let line_start = source[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = source[start..]
            .find('\n')
            .map_or(source.len(), |i| start + i);
        let text = source[line_start..line_end].trim_end_matches('\r');
        let from = (start - line_start).min(text.len());
        let end = floor_char_boundary(source, span.end.min(line_end).max(start)) - line_start;
        let mut to = end.min(text.len());
        if to <= from {
            // An empty span still gets one caret: under the character there, or just past
            // the end of the line.
            to = text[from..]
                .chars()
                .next()
                .map_or(from + 1, |c| from + c.len_utf8());
        }
        Diagnostic {
            path: path.to_path_buf(),
            line: Some(line),
            col: Some(col),
            message: message.into(),
            excerpt: Some(Excerpt {
                text: text.to_owned(),
                span: from..to,
            }),
        }
    }

    /// The first line, then the source line with a caret under the span (rustc's layout).
    pub fn render(&self) -> String {
        use annotate_snippets::{AnnotationKind, Group, Level, Renderer, Snippet};
        let first = self.to_string();
        let (Some(excerpt), Some(line)) = (&self.excerpt, self.line) else {
            return first;
        };
        // One past the end of the line is where a missing value or quote would go: give the
        // renderer a space to point at.
        let text = if excerpt.span.end > excerpt.text.len() {
            format!("{} ", excerpt.text)
        } else {
            excerpt.text.clone()
        };
        let report = [Group::with_level(Level::ERROR).element(
            Snippet::source(text.as_str())
                .line_start(line)
                .annotation(AnnotationKind::Primary.span(excerpt.span.clone())),
        )];
        let drawn = Renderer::plain().render(&report);
        format!("{first}\n{}", drawn.trim_end())
    }
}

/// The largest char boundary of `s` at or before `i`.
fn floor_char_boundary(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match (self.line, self.col) {
            (Some(line), Some(col)) => write!(f, "{path}:{line}:{col}: {}", self.message),
            (Some(line), None) => write!(f, "{path}:{line}: {}", self.message),
            _ => write!(f, "{path}: {}", self.message),
        }
    }
}

impl std::error::Error for Diagnostic {}

/// Every problem found in one file, in file order. Displayed as rustc would: each diagnostic's
/// `PATH:LINE:COL: message` line, its source line and a caret, a blank line between two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<Diagnostic>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, diagnostic) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
                if diagnostic.excerpt.is_some() || self.0[i - 1].excerpt.is_some() {
                    f.write_str("\n")?;
                }
            }
            f.write_str(&diagnostic.render())?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<Diagnostic> for ConfigErrors {
    fn from(diagnostic: Diagnostic) -> Self {
        ConfigErrors(vec![diagnostic])
    }
}

/// 1-based (line, column) of byte `offset` in `source`; the column counts characters.
fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(source.len());
    while !source.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    // A byte-order mark is not a column anyone can see.
    let text = before[line_start..].trim_start_matches('\u{feff}');
    (line, text.chars().count() + 1)
}

/// Collects the problems of one file while validation carries on.
pub(crate) struct Sink<'s> {
    path: &'s Path,
    source: &'s str,
    /// (byte span, message); `None` sorts after every position.
    found: Vec<(Option<Range<usize>>, String)>,
}

impl<'s> Sink<'s> {
    /// An empty sink for `source`, read from `path`.
    pub(crate) fn new(path: &'s Path, source: &'s str) -> Self {
        Sink {
            path,
            source,
            found: Vec::new(),
        }
    }

    /// Records a problem at the start of `span`.
    pub(crate) fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.found.push((Some(span), message.into()));
    }

    /// Records a problem with the file as a whole.
    pub(crate) fn whole_file(&mut self, message: impl Into<String>) {
        self.found.push((None, message.into()));
    }

    /// The 1-based line where `span` starts, to refer to an earlier definition in a message.
    pub(crate) fn line_of(&self, span: &Range<usize>) -> usize {
        line_col(self.source, span.start).0
    }

    /// Whether nothing was recorded.
    pub(crate) fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    /// `Ok` when nothing was recorded, else every problem in file order.
    pub(crate) fn finish(self) -> Result<(), ConfigErrors> {
        if self.found.is_empty() {
            return Ok(());
        }
        let mut found = self.found;
        found.sort_by_key(|(span, _)| span.as_ref().map_or(usize::MAX, |s| s.start));
        Err(ConfigErrors(
            found
                .into_iter()
                .map(|(span, message)| match span {
                    Some(span) => Diagnostic::spanning(self.path, self.source, span, message),
                    None => Diagnostic::whole_file(self.path, message),
                })
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based_and_count_characters() {
        let source = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_col(source, 0), (1, 1));
        assert_eq!(line_col(source, 6), (2, 1));
        // After "bé = " (6 bytes, 5 characters).
        assert_eq!(line_col(source, 12), (2, 6));
        assert_eq!(line_col(source, 999), (3, 1));
    }

    #[test]
    fn display_with_and_without_position() {
        let path = Path::new("balancer.toml");
        let at = Diagnostic::at(path, "x\ny", 2, "bad");
        assert_eq!(at.to_string(), "balancer.toml:2:1: bad");
        let whole = Diagnostic::whole_file(path, "cannot read");
        assert_eq!(whole.to_string(), "balancer.toml: cannot read");
        assert_eq!(
            ConfigErrors(vec![at, whole]).to_string(),
            "balancer.toml:2:1: bad\n  |\n2 | y\n  | ^\n\nbalancer.toml: cannot read"
        );
    }

    #[test]
    fn sink_sorts_in_file_order() {
        let path = Path::new("f.toml");
        let mut sink = Sink::new(path, "a\nb\nc");
        sink.whole_file("whole");
        sink.error(4..5, "third line");
        sink.error(0..1, "first line");
        let errors = sink.finish().unwrap_err();
        let lines: Vec<_> = errors
            .0
            .iter()
            .map(|d| (d.line, d.message.as_str()))
            .collect();
        assert_eq!(
            lines,
            [
                (Some(1), "first line"),
                (Some(3), "third line"),
                (None, "whole")
            ]
        );
    }
}
