//! The dashboard's pages for `phasegate serve`: server-rendered HTML with inline SVG.
//!
//! Everything here is a pure function from views (`cli::view`), the plan and the audit trail to a
//! `String` of HTML; the serve side puts the strings behind its routes, checks the session, the
//! CSRF token and the role again on every POST, and serves [`CSS`] and [`JS`] at
//! `/ui/assets/dashboard.css` and `/ui/assets/dashboard.js`.
//!
//! **Why server-rendered.** The people who open this page decide whether a policy blocks the
//! devices of a whole company. What they see must be exactly what the store holds, readable
//! without JavaScript, printable for a change record, and reviewable in one place (this module),
//! with no second build (no npm, no bundler, no generated assets checked in) and nothing fetched
//! from a CDN or any other origin: the pages link only to the two assets above, use the system's
//! fonts, and draw their graph and chart as inline SVG on the server. Every form is a plain HTML
//! form that works without a script; the small script only adds liveness (it re-fetches the page
//! when the server announces a transition). Neither inline scripts nor `style` attributes are used,
//! so the serve side can send `Content-Security-Policy: default-src 'self'`.
//!
//! **Why `format!` and not a template crate.** The pages are a few hundred lines of markup built
//! from a handful of types; a template engine (askama, maud) would add a proc-macro dependency and
//! its compile time to every build on small machines, for little gain. Instead, every value that
//! comes from a plan, a rollout or an event goes through one of two helpers in `html`: [`esc`]
//! (text and attribute values: `&`, `<`, `>`, `"` and `'` are replaced) or a path-segment encoder
//! for URLs. Markup literals are the only unescaped text. The tests render hostile reasons,
//! comments and names (`<script>`, quotes, ampersands, newlines) and check that they come out
//! inert.
//!
//! Times are shown in UTC, as the store records them.

mod change;
mod chart;
mod graph;
mod html;
mod index;
mod login;
mod rollout;

pub use chart::{Point, chart_points, chart_svg};
pub use html::esc;
pub use index::index_page;
pub use login::login_page;
pub use rollout::{RolloutPage, rollout_page};

/// The stylesheet, served at `/ui/assets/dashboard.css`.
pub const CSS: &str = include_str!("assets/dashboard.css");

/// The live-update script, served at `/ui/assets/dashboard.js`.
pub const JS: &str = include_str!("assets/dashboard.js");

/// Who is looking at a page; the serve side converts its session's identity into this.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Viewer {
    pub name: String,
    pub role: Role,
}

/// What a signed-in person may do from the dashboard (everyone may read): the API's roles.
pub use crate::identity::Role;

#[cfg(test)]
mod tests;
