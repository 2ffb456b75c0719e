//! Plan problems with their place in the file, rendered as `FILE:LINE:COL: message` followed by the
//! offending line with the span underlined, the format editors and CI logs already understand.

use std::fmt;
use std::ops::Range;

/// One problem in a plan, located by a byte span of the source text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub span: Range<usize>,
    pub message: String,
}

impl Diagnostic {
    pub fn new(span: Range<usize>, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            span,
            message: message.into(),
        }
    }
}

/// Every problem found in one plan file, with what is needed to show them.
#[derive(Clone, Debug)]
pub struct PlanErrors {
    pub file: String,
    pub source: String,
    pub diagnostics: Vec<Diagnostic>,
}

/// A 1-based line and column (columns count characters, not bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

pub fn position(source: &str, offset: usize) -> Position {
    let offset = floor_char_boundary(source, offset.min(source.len()));
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = source[line_start..offset].chars().count() + 1;
    Position { line, column }
}

fn floor_char_boundary(text: &str, mut index: usize) -> usize {
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

impl PlanErrors {
    /// The `FILE:LINE:COL: message` line of each problem, without the source excerpt.
    pub fn headlines(&self) -> Vec<String> {
        self.diagnostics
            .iter()
            .map(|d| {
                let at = position(&self.source, d.span.start);
                format!("{}:{}:{}: {}", self.file, at.line, at.column, d.message)
            })
            .collect()
    }

    fn render_excerpt(&self, d: &Diagnostic, out: &mut String) {
        let at = position(&self.source, d.span.start);
        let line_text = self.source.lines().nth(at.line - 1).unwrap_or("");
        let gutter = at.line.to_string().len();
        let line_len = line_text.chars().count();
        let end = position(&self.source, d.span.end.max(d.span.start + 1));
        let underline_end = if end.line == at.line {
            end.column
        } else {
            line_len + 1
        };
        let width = underline_end.saturating_sub(at.column).max(1);
        out.push_str(&format!("{:gutter$} |\n", ""));
        out.push_str(&format!("{} | {}\n", at.line, line_text));
        out.push_str(&format!(
            "{:gutter$} | {}{}\n",
            "",
            " ".repeat(at.column - 1),
            "^".repeat(width)
        ));
    }
}

impl fmt::Display for PlanErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headlines = self.headlines();
        for (headline, d) in headlines.iter().zip(&self.diagnostics) {
            let mut excerpt = String::new();
            self.render_excerpt(d, &mut excerpt);
            writeln!(f, "{headline}")?;
            write!(f, "{excerpt}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_count_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(position(text, 0), Position { line: 1, column: 1 });
        let x = text.find('"').unwrap();
        assert_eq!(position(text, x), Position { line: 2, column: 6 });
    }

    #[test]
    fn renders_headline_and_underlined_span() {
        let source = "[rollout]\nname = 42\n".to_string();
        let start = source.find("42").unwrap();
        let errors = PlanErrors {
            file: "p.toml".into(),
            source,
            diagnostics: vec![Diagnostic::new(start..start + 2, "expected a string")],
        };
        let shown = errors.to_string();
        assert!(
            shown.starts_with("p.toml:2:8: expected a string\n"),
            "{shown}"
        );
        assert!(shown.contains("2 | name = 42\n"), "{shown}");
        assert!(shown.contains("  |        ^^\n"), "{shown}");
    }
}
