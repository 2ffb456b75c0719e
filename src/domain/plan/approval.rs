//! Change approval in a plan: who may approve a phase's promotion, how many distinct people
//! must (the gate's `approvals`, the quorum), how long an approval lasts, and the change ticket
//! it must cite.
//!
//! People are named as the audit trail records them, and compared by [`identity_key`]: trimmed
//! and lowercased whole, so `Bob`, ` bob ` and `bob` are one person and `Alice@Contoso.com` is
//! `alice@contoso.com`. The plan's names are kept in that form, so the machine compares keys
//! with keys.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::time::Duration;

use regex::{Regex, RegexBuilder};
use toml::Spanned;

use super::raw::{RawApproverGroups, RawDirectoryApprovers, RawGate};
use super::{Checker, DurationRange, Phase, Ratio};

/// `[approvers]`: group name → its members, as identity keys.
pub type ApproverGroups = BTreeMap<String, Vec<String>>;

/// `[directory_approvers]`: approver group name → the directory group whose members it is.
pub type DirectoryApprovers = BTreeMap<String, String>;

/// The longest directory group name.
pub const MAX_DIRECTORY_NAME_LEN: usize = 256;

/// How long an approval may be set to last.
pub const APPROVAL_EXPIRY_RANGE: DurationRange = DurationRange {
    min: Duration::from_secs(60),
    max: Duration::from_secs(30 * 24 * 3600),
};
/// Groups in `[approvers]`, and people in one group or one gate's `approvers`.
pub const MAX_APPROVER_GROUPS: usize = 50;
pub const MAX_APPROVERS: usize = 100;
/// The longest name of a person (an e-mail address is at most 254 characters).
pub const MAX_IDENTITY_LEN: usize = 256;
/// The longest `ticket_pattern`, and the longest ticket an approval may cite.
pub const MAX_TICKET_PATTERN_LEN: usize = 200;
pub const MAX_TICKET_LEN: usize = 200;
/// What a compiled ticket pattern may take: enough for any ticket format, small enough that no
/// pattern makes checking a ticket slow.
const TICKET_REGEX_SIZE: usize = 1 << 18;

/// A person's name as approvals compare it: trimmed and lowercased whole (an e-mail address's
/// domain is case-insensitive, and directories treat the local part so too). Empty means nobody.
pub fn identity_key(name: &str) -> String {
    name.trim().to_lowercase()
}

/// Why a name cannot be a person's, if it cannot.
pub fn identity_problem(name: &str) -> Option<String> {
    let key = identity_key(name);
    if key.is_empty() {
        return Some("a person's name must not be empty".into());
    }
    if key.chars().count() > MAX_IDENTITY_LEN {
        return Some(format!(
            "a person's name has at most {MAX_IDENTITY_LEN} characters"
        ));
    }
    if key.chars().any(char::is_control) {
        return Some("a person's name must not contain control characters".into());
    }
    None
}

/// A pattern a change ticket must match, whole.
#[derive(Clone)]
pub struct TicketPattern {
    source: String,
    regex: Regex,
}

impl TicketPattern {
    pub fn new(source: &str) -> Result<TicketPattern, String> {
        if source.chars().count() > MAX_TICKET_PATTERN_LEN {
            return Err(format!(
                "a `ticket_pattern` has at most {MAX_TICKET_PATTERN_LEN} characters"
            ));
        }
        let regex = RegexBuilder::new(&format!("^(?:{source})$"))
            .size_limit(TICKET_REGEX_SIZE)
            .dfa_size_limit(TICKET_REGEX_SIZE)
            .build()
            .map_err(|e| match e {
                regex::Error::CompiledTooBig(_) => {
                    "the `ticket_pattern` is too complex; simplify it".to_string()
                }
                other => {
                    let text = other.to_string();
                    let last = text.lines().last().unwrap_or_default();
                    format!(
                        "invalid `ticket_pattern`: {}",
                        last.trim_start_matches("error: ")
                    )
                }
            })?;
        Ok(TicketPattern {
            source: source.to_string(),
            regex,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn matches(&self, ticket: &str) -> bool {
        self.regex.is_match(ticket)
    }
}

impl PartialEq for TicketPattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl fmt::Debug for TicketPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TicketPattern({:?})", self.source)
    }
}

/// Who may approve a phase, for how long, and with which ticket. The quorum is the gate's
/// `approvals`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ApprovalPolicy {
    /// People named in the gate's `approvers`, as [`identity_key`]s.
    pub approvers: Vec<String>,
    /// Groups named in the gate's `approver_groups`.
    pub groups: Vec<String>,
    /// Those of them whose members the directory has (`[directory_approvers]`): judged against
    /// the rollout's latest snapshot of the directory, not the plan.
    pub directory_groups: Vec<String>,
    /// Everyone who may approve (the people named and the groups' members), as keys; empty:
    /// anyone allowed to approve at all.
    pub eligible: BTreeSet<String>,
    /// An approval lapses this long after it was given.
    pub expires_after: Option<Duration>,
    pub require_ticket: bool,
    pub ticket_pattern: Option<TicketPattern>,
    /// Approvals are bound to the gate's evidence they were given on: one whose evidence moved
    /// by more than this (share of devices failing, blocked, in error, or reporting) by the
    /// time the promotion is decided is void.
    pub evidence_tolerance: Option<Ratio>,
}

impl ApprovalPolicy {
    /// Whether the policy names who may approve (otherwise anyone may).
    pub fn names_approvers(&self) -> bool {
        !self.eligible.is_empty() || !self.directory_groups.is_empty()
    }

    /// Whether the plan itself lets this person approve (a directory group's members are the
    /// machine's to judge, from the rollout's snapshot).
    pub fn allows(&self, key: &str) -> bool {
        !self.names_approvers() || self.eligible.contains(key)
    }

    /// A ticket required or given must be well-formed and match the pattern; the ticket to
    /// record (trimmed), or why not.
    pub fn ticket(&self, ticket: Option<&str>) -> Result<Option<String>, String> {
        let ticket = ticket.map(str::trim).filter(|t| !t.is_empty());
        let Some(ticket) = ticket else {
            if self.require_ticket || self.ticket_pattern.is_some() {
                return Err(match &self.ticket_pattern {
                    Some(pattern) => format!(
                        "this approval needs a change ticket (--ticket) matching `{}`",
                        pattern.as_str()
                    ),
                    None => "this approval needs a change ticket (--ticket)".to_string(),
                });
            }
            return Ok(None);
        };
        if ticket.chars().count() > MAX_TICKET_LEN || ticket.chars().any(char::is_control) {
            return Err(format!(
                "a ticket has at most {MAX_TICKET_LEN} characters and no control characters"
            ));
        }
        if let Some(pattern) = &self.ticket_pattern
            && !pattern.matches(ticket)
        {
            return Err(format!(
                "ticket `{ticket}` does not match the plan's ticket_pattern `{}`",
                pattern.as_str()
            ));
        }
        Ok(Some(ticket.to_string()))
    }

    /// Who may approve, in words (`status`, refusals).
    pub fn who(&self) -> String {
        if !self.names_approvers() {
            return "anyone with the approver role".to_string();
        }
        let mut parts: Vec<String> = self.approvers.clone();
        parts.extend(self.groups.iter().map(|g| format!("group {g}")));
        parts.join(", ")
    }
}

impl Checker<'_> {
    /// `[directory_approvers]`: each approver group's directory group name, and whether all
    /// are valid (a gate naming an invalid one is not told it is unknown).
    pub(super) fn directory_approvers(
        &mut self,
        raw: Option<&Spanned<RawDirectoryApprovers>>,
        groups: &ApproverGroups,
    ) -> (DirectoryApprovers, bool) {
        let mut found = BTreeMap::new();
        let Some(raw) = raw else {
            return (found, true);
        };
        let mut ok = true;
        if raw.get_ref().len() > MAX_APPROVER_GROUPS {
            self.error(
                raw.span(),
                format!("`[directory_approvers]` has at most {MAX_APPROVER_GROUPS} groups"),
            );
            ok = false;
        }
        for (name, directory) in raw.get_ref() {
            let valid = super::valid_phase_id(name.get_ref()) && name.get_ref().len() <= 64;
            if !valid {
                self.error(
                    name.span(),
                    format!(
                        "invalid approver group name `{}`: expected 1 to 64 letters, digits, `-` or `_`",
                        name.get_ref()
                    ),
                );
                ok = false;
            } else if groups.contains_key(name.get_ref()) {
                self.error(
                    name.span(),
                    format!(
                        "approver group `{}` is defined in `[approvers]` too; a group is either the plan's list or the directory's",
                        name.get_ref()
                    ),
                );
                ok = false;
            }
            let text = directory.get_ref().trim();
            if text.is_empty()
                || text.chars().count() > MAX_DIRECTORY_NAME_LEN
                || text.chars().any(char::is_control)
            {
                self.error(
                    directory.span(),
                    format!(
                        "a directory group's name has 1 to {MAX_DIRECTORY_NAME_LEN} characters and no control characters"
                    ),
                );
                ok = false;
            }
            found.insert(name.get_ref().clone(), text.to_string());
        }
        (found, ok)
    }

    /// `[approvers]`: each group's members, as keys — the groups that are valid, and whether
    /// all are (a gate naming an invalid group is not told it is unknown).
    pub(super) fn approver_groups(
        &mut self,
        raw: Option<&Spanned<RawApproverGroups>>,
    ) -> (ApproverGroups, bool) {
        let mut groups = BTreeMap::new();
        let Some(raw) = raw else {
            return (groups, true);
        };
        if raw.get_ref().len() > MAX_APPROVER_GROUPS {
            self.error(
                raw.span(),
                format!(
                    "`[approvers]` has at most {MAX_APPROVER_GROUPS} groups; this one has {}",
                    raw.get_ref().len()
                ),
            );
            return (groups, false);
        }
        let mut ok = true;
        for (name, members) in raw.get_ref() {
            let valid = super::valid_phase_id(name.get_ref()) && name.get_ref().len() <= 64;
            if !valid {
                self.error(
                    name.span(),
                    format!(
                        "invalid approver group name `{}`: expected 1 to 64 letters, digits, `-` or `_`",
                        name.get_ref()
                    ),
                );
                ok = false;
            }
            if members.get_ref().is_empty() {
                self.error(
                    members.span(),
                    format!("approver group `{}` has nobody in it", name.get_ref()),
                );
                ok = false;
                continue;
            }
            match self.people(members, "an approver group") {
                Some(people) => {
                    groups.insert(name.get_ref().clone(), people);
                }
                None => ok = false,
            }
        }
        if !ok {
            // Named, if not valid: a gate naming one is not told it is unknown.
            for name in raw.get_ref().keys() {
                groups.entry(name.get_ref().clone()).or_default();
            }
        }
        (groups, ok)
    }

    /// A list of people, as keys: each a valid name, none twice, at most [`MAX_APPROVERS`].
    pub(super) fn people(
        &mut self,
        list: &Spanned<Vec<Spanned<String>>>,
        what: &str,
    ) -> Option<Vec<String>> {
        if list.get_ref().len() > MAX_APPROVERS {
            self.error(
                list.span(),
                format!(
                    "{what} lists at most {MAX_APPROVERS} people; this one lists {}",
                    list.get_ref().len()
                ),
            );
            return None;
        }
        let mut keys = Vec::new();
        let mut ok = true;
        for person in list.get_ref() {
            if let Some(problem) = identity_problem(person.get_ref()) {
                self.error(person.span(), problem);
                ok = false;
                continue;
            }
            let key = identity_key(person.get_ref());
            if keys.contains(&key) {
                self.error(
                    person.span(),
                    format!(
                        "`{}` is listed twice (names are compared ignoring case)",
                        person.get_ref()
                    ),
                );
                ok = false;
                continue;
            }
            keys.push(key);
        }
        ok.then_some(keys)
    }

    /// Each phase's approval policy, from its gate, against the plan's groups; `None` after
    /// reporting every problem.
    pub(super) fn approval_policies(
        &mut self,
        gates: &[Option<&Spanned<RawGate>>],
        phases: &mut [Phase],
        groups: (&ApproverGroups, &DirectoryApprovers),
        groups_ok: bool,
        separation: Option<&str>,
    ) -> Option<()> {
        let mut ok = true;
        for (phase, gate) in phases.iter_mut().zip(gates) {
            let Some(gate) = gate else { continue };
            match self.approval_policy(gate, phase, groups, groups_ok, separation) {
                Some(policy) => phase.approval = policy,
                None => ok = false,
            }
        }
        ok.then_some(())
    }

    /// `separation`: the author's key, when separation of duties keeps them from approving.
    fn approval_policy(
        &mut self,
        gate: &Spanned<RawGate>,
        phase: &Phase,
        (groups, directory): (&ApproverGroups, &DirectoryApprovers),
        groups_ok: bool,
        separation: Option<&str>,
    ) -> Option<ApprovalPolicy> {
        let raw = gate.get_ref();
        let mut ok = true;
        let mut policy = ApprovalPolicy::default();
        if let Some(list) = &raw.approvers {
            match self.people(list, "`approvers`") {
                Some(people) => policy.approvers = people,
                None => ok = false,
            }
        }
        if let Some(list) = &raw.approver_groups {
            for name in list.get_ref() {
                match groups.get(name.get_ref()) {
                    Some(_) if policy.groups.contains(name.get_ref()) => {
                        self.error(name.span(), format!("group `{name}` is listed twice"));
                        ok = false;
                    }
                    Some(_) => policy.groups.push(name.get_ref().clone()),
                    None if directory.contains_key(name.get_ref()) => {
                        if policy.groups.contains(name.get_ref()) {
                            self.error(name.span(), format!("group `{name}` is listed twice"));
                            ok = false;
                        } else {
                            policy.groups.push(name.get_ref().clone());
                            policy.directory_groups.push(name.get_ref().clone());
                        }
                    }
                    None => {
                        let known: Vec<&str> = groups
                            .keys()
                            .chain(directory.keys())
                            .map(String::as_str)
                            .collect();
                        self.error(
                            name.span(),
                            format!(
                                "unknown approver group `{name}`; `[approvers]` and `[directory_approvers]` define: {}",
                                if known.is_empty() {
                                    "none".to_string()
                                } else {
                                    known.join(", ")
                                }
                            ),
                        );
                        ok = false;
                    }
                }
            }
        }
        policy.eligible = policy.approvers.iter().cloned().collect();
        for group in policy.groups.iter().filter(|g| groups.contains_key(*g)) {
            policy.eligible.extend(groups[group].iter().cloned());
        }
        if let Some(value) = &raw.approval_expires_after {
            match super::duration_within(value, "approval_expires_after", APPROVAL_EXPIRY_RANGE) {
                Ok(duration) => policy.expires_after = Some(duration),
                Err(diagnostic) => {
                    self.diagnostics.push(diagnostic);
                    ok = false;
                }
            }
        }
        policy.require_ticket = raw.require_ticket.as_ref().is_some_and(|r| *r.get_ref());
        if let Some(pattern) = &raw.ticket_pattern {
            match TicketPattern::new(pattern.get_ref()) {
                Ok(compiled) => policy.ticket_pattern = Some(compiled),
                Err(message) => {
                    self.error(pattern.span(), message);
                    ok = false;
                }
            }
        }
        match self.ratio(raw.approval_tolerance.as_ref()) {
            Ok(tolerance) => policy.evidence_tolerance = tolerance,
            Err(()) => ok = false,
        }
        let quorum = phase.gate.approvals as usize;
        if quorum == 0 {
            if let Some(span) = approval_setting_span(raw) {
                self.error(
                    span,
                    format!(
                        "phase `{}` needs no approval (`approvals` is 0), so this setting has no effect: set `approvals`",
                        phase.id
                    ),
                );
                ok = false;
            }
        } else if policy.names_approvers() && policy.directory_groups.is_empty() && groups_ok && ok
        {
            let excluded = separation.filter(|author| policy.eligible.contains(*author));
            let available = policy.eligible.len() - usize::from(excluded.is_some());
            if available < quorum {
                let span = raw
                    .approvals
                    .as_ref()
                    .map(Spanned::span)
                    .unwrap_or_else(|| gate.span());
                let author = match excluded {
                    Some(author) => format!(" besides the plan's author {author}"),
                    None => String::new(),
                };
                let people = if available == 1 { "person" } else { "people" };
                self.error(
                    span,
                    format!(
                        "phase `{}` needs {quorum} distinct approvers but only {available} {people}{author} may approve it ({})",
                        phase.id,
                        policy.who()
                    ),
                );
                ok = false;
            }
        }
        ok.then_some(policy)
    }
}

/// The first approval setting a gate sets, which means nothing without `approvals`.
fn approval_setting_span(raw: &RawGate) -> Option<Range<usize>> {
    let spans = [
        raw.approvers.as_ref().map(Spanned::span),
        raw.approver_groups.as_ref().map(Spanned::span),
        raw.approval_expires_after.as_ref().map(Spanned::span),
        raw.require_ticket
            .as_ref()
            .filter(|r| *r.get_ref())
            .map(Spanned::span),
        raw.ticket_pattern.as_ref().map(Spanned::span),
        raw.approval_tolerance.as_ref().map(Spanned::span),
    ];
    spans.into_iter().flatten().min_by_key(|s| s.start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_compare_trimmed_and_ignoring_case() {
        assert_eq!(identity_key("  ALICE "), "alice");
        assert_eq!(identity_key("Alice@Contoso.COM"), "alice@contoso.com");
        assert_eq!(identity_key(" \t"), "");
        assert!(identity_problem("   ").is_some());
        assert!(identity_problem("bob\u{7}").is_some());
        assert!(identity_problem(&"x".repeat(MAX_IDENTITY_LEN + 1)).is_some());
        assert!(identity_problem("Bob Smith").is_none());
    }

    #[test]
    fn a_ticket_pattern_matches_the_whole_ticket() {
        let pattern = TicketPattern::new("CHG[0-9]{7}").unwrap();
        assert!(pattern.matches("CHG0012345"));
        assert!(!pattern.matches("xCHG0012345"));
        assert!(!pattern.matches("CHG0012345 and more"));
        assert!(
            TicketPattern::new("(")
                .unwrap_err()
                .contains("invalid `ticket_pattern`")
        );
        assert!(TicketPattern::new(&"a".repeat(201)).is_err());
        let huge = TicketPattern::new("\\w{1000}\\w{1000}").unwrap_err();
        assert!(huge.contains("too complex"), "{huge}");
    }

    #[test]
    fn a_policy_checks_its_ticket() {
        let policy = ApprovalPolicy {
            ticket_pattern: Some(TicketPattern::new("CHG-[0-9]+").unwrap()),
            ..ApprovalPolicy::default()
        };
        assert_eq!(policy.ticket(Some(" CHG-7 ")), Ok(Some("CHG-7".into())));
        assert!(
            policy
                .ticket(None)
                .unwrap_err()
                .contains("needs a change ticket")
        );
        assert!(
            policy
                .ticket(Some("7"))
                .unwrap_err()
                .contains("does not match")
        );
        let open = ApprovalPolicy::default();
        assert_eq!(open.ticket(Some("  ")), Ok(None));
        assert_eq!(open.ticket(Some("any")), Ok(Some("any".into())));
        assert!(open.allows("whoever") && !open.names_approvers());
    }
}
