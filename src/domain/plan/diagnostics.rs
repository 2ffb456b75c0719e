//! Plan problems with their place in the file, rendered as `FILE:LINE:COL: message` followed by the
//! offending line with the span underlined, the format editors and CI logs already understand.
//! Warnings — a plan that is valid but dangerous — are rendered the same way, as
//! `FILE:LINE:COL: warning: message`, with the reason on a line of its own.
//!
//! What is shown stays small whatever the plan holds: the excerpt of a long line is cut around
//! the span, and a long quoted value in a message is shortened, so a 10 MB line does not print
//! 20 MB.

use std::fmt;
use std::ops::Range;

/// One problem in a plan, located by a byte span of the source text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub span: Range<usize>,
    pub message: String,
    /// Why it matters, when the message alone does not say (every warning has one).
    pub why: Option<String>,
}

/// The most characters of a source line an excerpt shows.
pub const EXCERPT_WIDTH: usize = 200;
/// The most characters of a quoted value (between backticks or double quotes) a message keeps.
const QUOTED_WIDTH: usize = 200;
/// The most characters a message keeps.
const MESSAGE_WIDTH: usize = 4000;

impl Diagnostic {
    pub fn new(span: Range<usize>, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            span,
            message: shorten(&message.into()),
            why: None,
        }
    }

    /// The same problem, with the reason it matters.
    pub fn because(mut self, why: impl Into<String>) -> Diagnostic {
        self.why = Some(shorten(&why.into()));
        self
    }
}

/// A message with every long quoted value cut to its start and end (`aaaa…zz`), and at most
/// [`MESSAGE_WIDTH`] characters: messages quote what the plan says, and a plan may say a lot.
pub fn shorten(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(MESSAGE_WIDTH * 4));
    let mut rest = message;
    while let Some(open) = rest.find(['`', '"']) {
        let quote = rest.as_bytes()[open] as char;
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        let Some(close) = rest.find(quote) else {
            break;
        };
        let quoted = &rest[..close];
        if quoted.chars().count() > QUOTED_WIDTH {
            let head: String = quoted.chars().take(QUOTED_WIDTH * 3 / 4).collect();
            let tail: Vec<char> = quoted.chars().rev().take(QUOTED_WIDTH / 5).collect();
            out.push_str(&head);
            out.push('…');
            out.extend(tail.into_iter().rev());
        } else {
            out.push_str(quoted);
        }
        out.push(quote);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    if out.chars().count() > MESSAGE_WIDTH {
        out = out.chars().take(MESSAGE_WIDTH).collect();
        out.push('…');
    }
    out
}

/// Every problem found in one plan file, with what is needed to show them.
#[derive(Clone, Debug)]
pub struct PlanErrors {
    pub file: String,
    pub source: String,
    pub diagnostics: Vec<Diagnostic>,
}

/// What is valid but dangerous in one plan file (empty when nothing is), shown like its errors.
#[derive(Clone, Debug, Default)]
pub struct PlanWarnings {
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

fn headline(file: &str, source: &str, d: &Diagnostic, label: &str) -> String {
    let at = position(source, d.span.start);
    format!("{file}:{}:{}: {label}{}", at.line, at.column, d.message)
}

/// The line of a problem, cut to at most [`EXCERPT_WIDTH`] characters around its span (`…`
/// marks what is left out), with the span underlined.
fn render_excerpt(source: &str, d: &Diagnostic, out: &mut String) {
    let at = position(source, d.span.start);
    let start = floor_char_boundary(source, d.span.start.min(source.len()));
    let line_start = source[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = source[line_start..]
        .find('\n')
        .map_or(source.len(), |i| line_start + i);
    let line_text = source[line_start..line_end].trim_end_matches('\r');
    let gutter = at.line.to_string().len();
    let line_len = line_text.chars().count();
    let end = position(source, d.span.end.max(d.span.start + 1));
    let underline_end = if end.line == at.line {
        end.column
    } else {
        line_len + 1
    };
    // Columns are 1-based; `first..last` is the window of characters shown, 0-based.
    let column = at.column - 1;
    let (first, last) = if line_len <= EXCERPT_WIDTH {
        (0, line_len)
    } else {
        let first = column.saturating_sub(EXCERPT_WIDTH / 4);
        let first = first.min(line_len - EXCERPT_WIDTH);
        (first, first + EXCERPT_WIDTH)
    };
    let mut shown = String::new();
    if first > 0 {
        shown.push('…');
    }
    shown.extend(line_text.chars().skip(first).take(last - first));
    if last < line_len {
        shown.push('…');
    }
    let lead = usize::from(first > 0);
    let from = column.clamp(first, last) - first + lead;
    let to = (underline_end - 1).clamp(first, last) - first + lead;
    let width = to.saturating_sub(from).max(1);
    out.push_str(&format!("{:gutter$} |\n", ""));
    out.push_str(&format!("{} | {}\n", at.line, shown));
    out.push_str(&format!(
        "{:gutter$} | {}{}\n",
        "",
        " ".repeat(from),
        "^".repeat(width)
    ));
    if let Some(why) = &d.why {
        out.push_str(&format!("{:gutter$} = why: {why}\n", ""));
    }
}

fn render(
    f: &mut fmt::Formatter<'_>,
    file: &str,
    source: &str,
    diagnostics: &[Diagnostic],
    label: &str,
) -> fmt::Result {
    for d in diagnostics {
        let mut excerpt = String::new();
        render_excerpt(source, d, &mut excerpt);
        writeln!(f, "{}", headline(file, source, d, label))?;
        write!(f, "{excerpt}")?;
    }
    Ok(())
}

impl PlanErrors {
    /// The `FILE:LINE:COL: message` line of each problem, without the source excerpt.
    pub fn headlines(&self) -> Vec<String> {
        self.diagnostics
            .iter()
            .map(|d| headline(&self.file, &self.source, d, ""))
            .collect()
    }
}

impl PlanWarnings {
    pub fn is_empty(&self) -> bool {
        self.diagnostics.is_empty()
    }

    /// The `FILE:LINE:COL: warning: message` line of each warning, without the source excerpt.
    pub fn headlines(&self) -> Vec<String> {
        self.diagnostics
            .iter()
            .map(|d| headline(&self.file, &self.source, d, "warning: "))
            .collect()
    }

    /// Each warning on one line, reason included, as `start` prints and records them:
    /// `FILE:LINE:COL: message; why`.
    pub fn lines(&self) -> Vec<String> {
        self.diagnostics
            .iter()
            .map(|d| {
                let line = headline(&self.file, &self.source, d, "");
                match &d.why {
                    Some(why) => format!("{line}; {why}"),
                    None => line,
                }
            })
            .collect()
    }
}

impl fmt::Display for PlanErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        render(f, &self.file, &self.source, &self.diagnostics, "")
    }
}

impl fmt::Display for PlanWarnings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        render(f, &self.file, &self.source, &self.diagnostics, "warning: ")
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

    #[test]
    fn warnings_render_like_errors_with_their_reason() {
        let source = "[[phase]]\nmode = \"enforce\"\n".to_string();
        let start = source.find("\"enforce\"").unwrap();
        let warnings = PlanWarnings {
            file: "p.toml".into(),
            source,
            diagnostics: vec![
                Diagnostic::new(start..start + 9, "enforces at once").because("nobody looked"),
            ],
        };
        let shown = warnings.to_string();
        assert!(
            shown.starts_with("p.toml:2:8: warning: enforces at once\n"),
            "{shown}"
        );
        assert!(shown.contains("  |        ^^^^^^^^^\n"), "{shown}");
        assert!(shown.ends_with("  = why: nobody looked\n"), "{shown}");
        assert_eq!(
            warnings.lines(),
            vec!["p.toml:2:8: enforces at once; nobody looked"]
        );
    }

    /// A 10 MB line prints a few hundred characters, its span still underlined.
    #[test]
    fn the_excerpt_of_a_long_line_is_cut_around_the_span() {
        let long = "x".repeat(10 * 1024 * 1024);
        let source = format!("[rollout]\nname = \"{long}\" # 42 is here {long}\n");
        let at = source.find("42").unwrap();
        let errors = PlanErrors {
            file: "p.toml".into(),
            source: source.clone(),
            diagnostics: vec![Diagnostic::new(at..at + 2, format!("bad name `{long}`"))],
        };
        let shown = errors.to_string();
        assert!(shown.len() < 1000, "{} bytes", shown.len());
        let lines: Vec<&str> = shown.lines().collect();
        assert!(lines[0].starts_with("p.toml:2:"), "{}", lines[0]);
        assert!(lines[0].contains("bad name `xxx") && lines[0].contains('…'));
        let excerpt = lines[2].strip_prefix("2 | ").unwrap();
        assert!(
            excerpt.starts_with('…') && excerpt.ends_with('…'),
            "{excerpt}"
        );
        assert_eq!(excerpt.chars().count(), EXCERPT_WIDTH + 2);
        let caret = lines[3].find('^').unwrap() - "  | ".len();
        let marked: String = excerpt.chars().skip(caret).take(2).collect();
        assert_eq!(marked, "42", "{shown}");
        assert_eq!(lines[3].matches('^').count(), 2);
        // A span that runs past the window is underlined to its edge.
        let errors = PlanErrors {
            diagnostics: vec![Diagnostic::new(10..source.len() - 1, "too long")],
            ..errors
        };
        let shown = errors.to_string();
        assert!(shown.len() < 1000, "{} bytes", shown.len());
        assert!(shown.contains("2 | name = \"xxx"), "{shown}");
    }

    #[test]
    fn long_quoted_values_are_shortened_in_messages() {
        let value = format!("{}END", "a".repeat(500));
        let message = shorten(&format!("invalid rollout name `{value}`: expected \"x\""));
        assert!(message.len() < 250, "{message}");
        assert!(
            message.starts_with("invalid rollout name `aaa"),
            "{message}"
        );
        assert!(
            message.contains("aaa…aaa") && message.contains("aaaEND`"),
            "{message}"
        );
        assert!(message.ends_with(": expected \"x\""), "{message}");
        assert_eq!(shorten("`short` and \"quoted\""), "`short` and \"quoted\"");
        assert_eq!(shorten("an `unclosed quote"), "an `unclosed quote");
        assert!(shorten(&"y".repeat(10_000)).chars().count() <= MESSAGE_WIDTH + 1);
    }
}
