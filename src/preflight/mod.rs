//! The readiness preflight: is the MDM set-up right for this plan before anything is rolled out?
//!
//! Microsoft's set-up steps for MDM for Microsoft 365 must be right before device policies are
//! rolled out; a rollout started without them fails in confusing ways (devices cannot enrol, iOS
//! devices cannot be managed, users without MFA). `phasegate preflight PLAN` checks them, and
//! `start` runs it first.
//!
//! Functional core, imperative shell: [`checks`] holds the rules as pure functions from facts to
//! [`Finding`]s; [`gather`] collects the facts (DNS through [`dns`], a certificate file through
//! [`certificate`], the tenant through `provider::graph::readiness`) and hands them over.
//! [`settings`] is the plan's `[preflight]` table.

pub mod certificate;
pub mod checks;
pub mod dns;
mod gather;
pub mod settings;

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Serialize;

pub use checks::{Finding, Level};
pub use gather::run;

/// What the command line adds to the plan's settings.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// `--resolver`: overrides `[preflight] resolver`.
    pub resolver: Option<SocketAddr>,
    /// The plan file's directory: `apns_certificate` is relative to it.
    pub plan_dir: PathBuf,
}

/// Every finding of one preflight, in check order.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub plan: String,
    pub provider: String,
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn count(&self, level: Level) -> usize {
        self.findings.iter().filter(|f| f.level == level).count()
    }

    pub fn has_errors(&self) -> bool {
        self.count(Level::Error) > 0
    }

    /// One line per finding (`ok`, `warning`, `error`, `skipped`), each error and warning
    /// followed by how to fix it, then the totals.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for finding in &self.findings {
            out.push_str(&format!(
                "{:<8} {:<22} {}\n",
                finding.level.as_str(),
                finding.check,
                finding.message
            ));
            if let Some(fix) = &finding.fix {
                out.push_str(&format!("{:<31} fix: {fix}\n", ""));
            }
        }
        out.push_str(&format!(
            "preflight of {}: {} error{}, {} warning{}, {} ok, {} skipped\n",
            self.plan,
            self.count(Level::Error),
            if self.count(Level::Error) == 1 {
                ""
            } else {
                "s"
            },
            self.count(Level::Warning),
            if self.count(Level::Warning) == 1 {
                ""
            } else {
                "s"
            },
            self.count(Level::Ok),
            self.count(Level::Skipped),
        ));
        out
    }
}
