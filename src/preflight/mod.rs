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

/// How a refused start's message begins, from the CLI and from the API alike (the CLI knows a
/// daemon's refusal by it, to exit 5 as it would itself).
pub const REFUSED: &str = "the preflight found ";

/// What a start makes of the preflight, whichever front end asks (the CLI, the API).
#[derive(Debug)]
pub enum StartGate {
    /// Start, recording `reason` with the start event; `shown` are the warnings and errors worth
    /// telling the person who starts.
    Start { reason: String, shown: Vec<Finding> },
    /// Nothing starts: the preflight found errors start does not check itself.
    Refused { errors: Vec<Finding> },
}

/// The preflight before a start: run it, or skip it for a `reason` the trail records. What
/// `start` checks itself (a name the tenant lacks, a refused sign-in) is left to it, so that it
/// keeps its own exit code and message.
pub async fn before_start(
    plan: &crate::domain::plan::Plan,
    options: &Options,
    skip: Option<&str>,
) -> Result<StartGate, String> {
    if let Some(reason) = skip {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err("skipping the preflight needs a reason for the audit trail".into());
        }
        return Ok(StartGate::Start {
            reason: format!("rollout started; preflight skipped: {reason}"),
            shown: Vec::new(),
        });
    }
    let report = run(plan, options).await?;
    let errors: Vec<Finding> = report
        .findings
        .iter()
        .filter(|f| f.level == Level::Error && !f.start_checks_it)
        .cloned()
        .collect();
    if !errors.is_empty() {
        return Ok(StartGate::Refused { errors });
    }
    Ok(StartGate::Start {
        reason: "rollout started".into(),
        shown: report
            .findings
            .into_iter()
            .filter(|f| f.level >= Level::Warning)
            .collect(),
    })
}
