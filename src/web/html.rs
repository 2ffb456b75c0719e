//! The few helpers every page uses: escaping, URLs, times, the page shell.

use std::fmt::{self, Write};

use super::Viewer;

/// Escapes text for HTML element content and quoted attribute values alike.
pub fn esc(text: &str) -> String {
    Esc(text).to_string()
}

/// [`esc`] as a `Display`, to escape straight into a `write!`.
pub(crate) struct Esc<'a>(pub &'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..at])?;
            f.write_str(match rest.as_bytes()[at] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[at + 1..];
        }
        f.write_str(rest)
    }
}

/// Percent-encodes one URL path segment: only unreserved characters stay as they are, so the
/// result is safe in a path and in an attribute.
pub(crate) fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// `/ui/rollouts/{id}` and what hangs below it.
pub(crate) fn rollout_url(id: &str, action: &str) -> String {
    if action.is_empty() {
        format!("/ui/rollouts/{}", segment(id))
    } else {
        format!("/ui/rollouts/{}/{action}", segment(id))
    }
}

/// `2026-01-05T08:00:00Z` → `2026-01-05 08:00 UTC`; anything else as it is.
pub(crate) fn readable_time(rfc3339: &str) -> String {
    let b = rfc3339.as_bytes();
    if rfc3339.is_ascii() && b.len() == 20 && b[10] == b'T' && b[19] == b'Z' {
        let seconds = if &rfc3339[16..19] == ":00" {
            ""
        } else {
            &rfc3339[16..19]
        };
        format!("{} {}{seconds} UTC", &rfc3339[..10], &rfc3339[11..16])
    } else {
        rfc3339.to_string()
    }
}

/// A `<time>` element for an RFC 3339 instant.
pub(crate) fn time(rfc3339: &str) -> String {
    format!(
        "<time datetime=\"{}\">{}</time>",
        Esc(rfc3339),
        Esc(&readable_time(rfc3339))
    )
}

/// People's words for a rollout status.
pub(crate) fn status_label(status: &str) -> &str {
    match status {
        "pending" => "Pending",
        "running" => "Running",
        "waiting_approval" => "Waiting for approval",
        "held" => "Held by a gate",
        "paused" => "Paused",
        "rolling_back" => "Rolling back",
        "rolled_back" => "Rolled back",
        "rejected" => "Rejected",
        "aborting" => "Aborting",
        "aborted" => "Aborted",
        "completed" => "Completed",
        "failed" => "Failed",
        "drifted" => "Drifted",
        "waiting_tenant_approval" => "Waiting for the tenant's approval",
        other => other,
    }
}

/// A status badge: the words, and the status code as a class for colour (never colour alone).
pub(crate) fn status_badge(status: &str) -> String {
    format!(
        "<span class=\"badge status-{}\">{}</span>",
        segment(status),
        Esc(status_label(status))
    )
}

/// A phase-state badge.
pub(crate) fn state_badge(state: &str) -> String {
    format!(
        "<span class=\"badge state-{}\">{}</span>",
        segment(state),
        Esc(&state.replace('_', " "))
    )
}

/// A hidden CSRF field, for every form.
pub(crate) fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        Esc(csrf)
    )
}

/// The document around a page's `<main>`: language, assets, landmarks, who is signed in.
pub(crate) fn page(title: &str, viewer: Option<&Viewer>, main: &str) -> String {
    let mut out = String::with_capacity(main.len() + 1024);
    out.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    out.push_str("<meta name=\"referrer\" content=\"same-origin\">\n");
    let _ = writeln!(out, "<title>{} · phasegate</title>", Esc(title));
    out.push_str("<link rel=\"stylesheet\" href=\"/ui/assets/dashboard.css\">\n");
    if viewer.is_some() {
        out.push_str("<script src=\"/ui/assets/dashboard.js\" defer></script>\n");
    }
    out.push_str("</head>\n<body>\n<a class=\"skip\" href=\"#main\">Skip to content</a>\n");
    out.push_str("<header class=\"site\">\n<nav aria-label=\"Main\">");
    out.push_str("<a class=\"brand\" href=\"/ui/\">phasegate</a>");
    if viewer.is_some() {
        out.push_str(" <a href=\"/ui/\">Rollouts</a>");
    }
    out.push_str("</nav>\n");
    if let Some(viewer) = viewer {
        let _ = writeln!(
            out,
            "<p class=\"who\">Signed in as <strong>{}</strong> ({})</p>",
            Esc(&viewer.name),
            viewer.role
        );
    }
    out.push_str("</header>\n<main id=\"main\" tabindex=\"-1\">\n");
    out.push_str(main);
    out.push_str("</main>\n<footer class=\"site\"><p>Times are UTC. phasegate ");
    out.push_str(env!("CARGO_PKG_VERSION"));
    out.push_str("</p></footer>\n</body>\n</html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_quotes_and_ampersands() {
        assert_eq!(
            esc(r#"<a href="x">Tom & 'Jerry'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;Tom &amp; &#39;Jerry&#39;&lt;/a&gt;"
        );
        assert_eq!(esc("plain text, é ✓"), "plain text, é ✓");
    }

    #[test]
    fn segments_keep_only_unreserved_characters() {
        assert_eq!(segment("windows-baseline-1"), "windows-baseline-1");
        assert_eq!(segment("a b/c\"<é"), "a%20b%2Fc%22%3C%C3%A9");
        assert_eq!(rollout_url("x y", "approve"), "/ui/rollouts/x%20y/approve");
    }

    #[test]
    fn times_read_as_utc() {
        assert_eq!(
            readable_time("2026-01-05T08:00:00Z"),
            "2026-01-05 08:00 UTC"
        );
        assert_eq!(
            readable_time("2026-01-05T08:00:07Z"),
            "2026-01-05 08:00:07 UTC"
        );
        assert_eq!(readable_time("soon"), "soon");
    }
}
