//! The impact forecast: what promoting a phase would do to people, from the devices as they
//! report now.
//!
//! Before a phase is promoted, the phases it starts are forecast on the latest reports of their
//! own scopes: which devices (and how many of their users) would newly be told they fail the
//! policy, and which would newly be blocked — at once, or when their grace period ends unless
//! they are fixed first — by platform, by failing setting where the provider knows the settings,
//! and the largest affected groups. [`impact`] counts the same things as they stand, so that
//! once the started phase has soaked, [`check`] compares the forecast with what happened.
//!
//! The rules follow the gate's: only devices with a fresh report count (a silent device's impact
//! is unknown and counted as such); the devices a policy's noncompliance actions apply to are the
//! noncompliant ones and those in grace (errors and conflicts are neither told nor blocked).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::gate::{DeviceReport, DeviceState};
use super::plan::{Mode, Phase, Platform, format_percent};
use super::time::Timestamp;

/// At most this many groups and settings are listed per forecast.
pub const MAX_LISTED: usize = 5;

/// At most this many groups and settings a provider may name in one observation (the bits of
/// [`DeviceFacts`]).
pub const MAX_LABELS: usize = 64;

/// What a provider knows about one device beyond its compliance state, in provider-neutral
/// terms: indexes into the observation's [`Labels`] and its own numbering of people.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceFacts {
    /// The device's primary user, numbered by the provider within one observation; `None`
    /// when it does not know.
    pub owner: Option<u32>,
    /// Bit `i`: the owner is a member of `Labels::groups[i]`.
    pub groups: u64,
    /// Bit `i`: the device fails `Labels::settings[i]`.
    pub failing: u64,
    /// The backend has told the owner that the device fails the policy (its noncompliance
    /// actions started for it).
    pub notified: bool,
}

/// The names behind the bits of every [`DeviceFacts`] of one observation. Each list holds at
/// most [`MAX_LABELS`] names; a provider that knows no settings leaves `settings` empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Labels {
    pub groups: Vec<String>,
    pub settings: Vec<String>,
}

/// A set of affected devices, counted every way a person asks about.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Affected {
    pub devices: u64,
    /// Distinct primary users of those devices, as far as the provider knows them.
    pub users: u64,
    /// Devices per platform, in platform order, platforms without any left out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub by_platform: Vec<(Platform, u64)>,
    /// Devices per failing setting, most first (at most [`MAX_LISTED`]); empty when the
    /// provider does not say which settings fail.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub by_setting: Vec<(String, u64)>,
    /// The largest groups among the devices' users, by devices, most first (at most
    /// [`MAX_LISTED`]); a phase's only scope group is left out, as it holds every device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<(String, u64)>,
}

/// How many devices and users of a scope are told and blocked, as they report now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Impact {
    pub notified_devices: u64,
    pub notified_users: u64,
    pub blocked_devices: u64,
    pub blocked_users: u64,
    /// Devices with a fresh report, the denominator of errors.
    pub reporting: u64,
}

/// What starting `phase` (by promoting `after`) would do, from the reports at `at`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forecast {
    pub phase: String,
    /// The phase whose promotion starts it.
    pub after: String,
    pub mode: Mode,
    pub at: Timestamp,
    /// Devices the phase targets.
    pub devices: u64,
    /// Of those, devices without a fresh report: what happens to them is not known.
    pub unknown: u64,
    /// Told and blocked in the phase's scope already, before it starts.
    pub before: Impact,
    /// Devices whose owners would newly be told.
    pub notified: Affected,
    /// Devices that would newly be blocked, at once or when their grace ends.
    pub blocked: Affected,
    /// Of `blocked`, the devices blocked at once (their grace is over, or they get none).
    pub blocked_at_once: u64,
    /// When the first of the others is blocked, unless it is fixed first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_block: Option<Timestamp>,
}

/// A forecast against what happened once its phase had soaked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ForecastCheck {
    pub phase: String,
    pub forecast_at: Timestamp,
    pub at: Timestamp,
    /// The phase's devices with a fresh report at `at`, the denominator of every error.
    pub reporting: u64,
    pub notified: Comparison,
    pub blocked: Comparison,
}

/// Forecast and actual count of one kind of impact.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub forecast_devices: u64,
    pub actual_devices: u64,
    pub forecast_users: u64,
    pub actual_users: u64,
    /// `|forecast - actual|` devices as a share of the phase's reporting devices.
    pub error: f64,
}

/// An impact forecast or its check, as an event records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ImpactRecord {
    /// The forecast a promotion was decided on, for the phase it starts.
    Forecast(Forecast),
    /// A forecast against the outcome once its phase had soaked.
    Check(ForecastCheck),
}

impl ForecastCheck {
    /// The larger of the two errors.
    pub fn error(&self) -> f64 {
        self.notified.error.max(self.blocked.error)
    }
}

/// Whether a report counts: the device reported within `stale_after` of `now`.
fn fresh(report: &DeviceReport, horizon: Timestamp) -> bool {
    report.last_reported.is_some_and(|at| at >= horizon) && report.state != DeviceState::Unknown
}

/// The devices a policy's noncompliance actions apply to.
fn actionable(report: &DeviceReport) -> bool {
    matches!(
        report.state,
        DeviceState::Noncompliant | DeviceState::InGrace
    )
}

/// Counts a set of devices as it is being collected.
struct Counter {
    devices: u64,
    owners: Vec<u32>,
    platforms: Vec<(Platform, u64)>,
    settings: [u64; MAX_LABELS],
    groups: [u64; MAX_LABELS],
}

impl Default for Counter {
    fn default() -> Counter {
        Counter {
            devices: 0,
            owners: Vec::new(),
            platforms: Vec::new(),
            settings: [0; MAX_LABELS],
            groups: [0; MAX_LABELS],
        }
    }
}

impl Counter {
    fn add(&mut self, platform: Platform, facts: &DeviceFacts) {
        self.devices += 1;
        if let Some(owner) = facts.owner {
            self.owners.push(owner);
        }
        match self.platforms.iter_mut().find(|(p, _)| *p == platform) {
            Some((_, n)) => *n += 1,
            None => self.platforms.push((platform, 1)),
        }
        for bit in bits(facts.failing) {
            self.settings[bit] += 1;
        }
        for bit in bits(facts.groups) {
            self.groups[bit] += 1;
        }
    }

    fn users(&self) -> u64 {
        let mut owners = self.owners.clone();
        owners.sort_unstable();
        owners.dedup();
        owners.len() as u64
    }

    fn finish(self, labels: &Labels, scope: &[String]) -> Affected {
        let mut by_platform = self.platforms.clone();
        by_platform.sort_by_key(|(p, _)| Platform::ALL.iter().position(|q| q == p));
        let whole = match scope {
            [only] => Some(only.as_str()),
            _ => None,
        };
        Affected {
            devices: self.devices,
            users: self.users(),
            by_platform,
            by_setting: largest(&self.settings, &labels.settings, None),
            groups: largest(&self.groups, &labels.groups, whole),
        }
    }
}

fn bits(mut set: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (set != 0).then(|| {
            let bit = set.trailing_zeros() as usize;
            set &= set - 1;
            bit
        })
    })
}

/// The named counts above zero, most first (then by name), at most [`MAX_LISTED`].
fn largest(
    counts: &[u64; MAX_LABELS],
    names: &[String],
    leave_out: Option<&str>,
) -> Vec<(String, u64)> {
    let mut listed: Vec<(String, u64)> = names
        .iter()
        .take(MAX_LABELS)
        .zip(counts)
        .filter(|(name, n)| **n > 0 && Some(name.as_str()) != leave_out)
        .map(|(name, n)| (name.clone(), *n))
        .collect();
    listed.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    listed.truncate(MAX_LISTED);
    listed
}

/// Told and blocked devices of one scope as they report at `now`.
pub fn impact(
    reports: &[(Platform, Vec<DeviceReport>)],
    stale_after: Duration,
    now: Timestamp,
) -> Impact {
    let horizon = now.minus(stale_after);
    let (mut notified, mut blocked) = (Counter::default(), Counter::default());
    let mut reporting = 0;
    for (platform, reports) in reports {
        for report in reports.iter().filter(|r| fresh(r, horizon)) {
            reporting += 1;
            if report.facts.notified {
                notified.add(*platform, &report.facts);
            }
            if report.blocked {
                blocked.add(*platform, &report.facts);
            }
        }
    }
    Impact {
        notified_devices: notified.devices,
        notified_users: notified.users(),
        blocked_devices: blocked.devices,
        blocked_users: blocked.users(),
        reporting,
    }
}

/// What starting `next` by promoting `after` would do, from the reports of `next`'s scope at
/// `now`.
pub fn forecast(
    after: &str,
    next: &Phase,
    reports: &[(Platform, Vec<DeviceReport>)],
    labels: &Labels,
    now: Timestamp,
) -> Forecast {
    let horizon = now.minus(next.gate.stale_after);
    let (mut notified, mut blocked) = (Counter::default(), Counter::default());
    let mut devices = 0;
    let mut unknown = 0;
    let mut blocked_at_once = 0;
    let mut first_block: Option<Timestamp> = None;
    for (platform, reports) in reports {
        for report in reports {
            devices += 1;
            if !fresh(report, horizon) {
                unknown += 1;
                continue;
            }
            if !actionable(report) {
                continue;
            }
            if next.mode >= Mode::Notify && !report.facts.notified {
                notified.add(*platform, &report.facts);
            }
            if next.mode == Mode::Enforce && !report.blocked {
                blocked.add(*platform, &report.facts);
                match report
                    .grace_until
                    .filter(|_| report.state == DeviceState::InGrace)
                {
                    Some(until) if until > now => {
                        first_block = Some(first_block.map_or(until, |f| f.min(until)));
                    }
                    _ => blocked_at_once += 1,
                }
            }
        }
    }
    Forecast {
        phase: next.id.clone(),
        after: after.to_string(),
        mode: next.mode,
        at: now,
        devices,
        unknown,
        before: impact(reports, next.gate.stale_after, now),
        notified: notified.finish(labels, &next.include),
        blocked: blocked.finish(labels, &next.include),
        blocked_at_once,
        first_block,
    }
}

/// The forecast against the phase's impact `now`, once it has soaked: what was newly told and
/// blocked is what is told and blocked now beyond what already was when it was forecast.
pub fn check(forecast: &Forecast, now: &Impact, at: Timestamp) -> ForecastCheck {
    let error = |f: u64, a: u64| {
        if now.reporting == 0 {
            0.0
        } else {
            f.abs_diff(a) as f64 / now.reporting as f64
        }
    };
    let compare =
        |affected: &Affected, devices_now: u64, before: u64, users_now: u64, users_before: u64| {
            let actual_devices = devices_now.saturating_sub(before);
            Comparison {
                forecast_devices: affected.devices,
                actual_devices,
                forecast_users: affected.users,
                actual_users: users_now.saturating_sub(users_before),
                error: error(affected.devices, actual_devices),
            }
        };
    ForecastCheck {
        phase: forecast.phase.clone(),
        forecast_at: forecast.at,
        at,
        reporting: now.reporting,
        notified: compare(
            &forecast.notified,
            now.notified_devices,
            forecast.before.notified_devices,
            now.notified_users,
            forecast.before.notified_users,
        ),
        blocked: compare(
            &forecast.blocked,
            now.blocked_devices,
            forecast.before.blocked_devices,
            now.blocked_users,
            forecast.before.blocked_users,
        ),
    }
}

impl Forecast {
    /// The forecast in one line, for notes and text output.
    pub fn summary(&self) -> String {
        let mut parts = vec![format!(
            "{} devices ({} users) newly notified",
            self.notified.devices, self.notified.users
        )];
        if self.mode == Mode::Enforce {
            parts.push(format!(
                "{} devices ({} users) newly blocked, {} at once",
                self.blocked.devices, self.blocked.users, self.blocked_at_once
            ));
        } else {
            parts.push("none blocked".to_string());
        }
        if self.unknown > 0 {
            parts.push(format!(
                "{} of {} devices without a fresh report",
                self.unknown, self.devices
            ));
        }
        format!(
            "forecast for `{}` ({}): {}",
            self.phase,
            self.mode,
            parts.join(", ")
        )
    }
}

impl ForecastCheck {
    /// The comparison in one line, for the audit trail.
    pub fn summary(&self) -> String {
        let one = |what: &str, c: &Comparison| {
            format!(
                "{what} {} forecast, {} actual ({} / {} users), error {}",
                c.forecast_devices,
                c.actual_devices,
                c.forecast_users,
                c.actual_users,
                format_percent(c.error)
            )
        };
        format!(
            "forecast for `{}` against the outcome after its soak ({} reporting devices): {}; {}",
            self.phase,
            self.reporting,
            one("notified", &self.notified),
            one("blocked", &self.blocked)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::plan::{DEFAULT_MAX_HOLD, Gate, RollbackWhen, approval::ApprovalPolicy};

    const HOUR: Duration = Duration::from_secs(3600);
    const NOW: Timestamp = Timestamp::from_millis(1_800_000_000_000);

    fn phase(mode: Mode, include: &[&str]) -> Phase {
        Phase {
            id: "next".into(),
            description: String::new(),
            mode,
            include: include.iter().map(|s| s.to_string()).collect(),
            exclude: Vec::new(),
            after: Vec::new(),
            min_soak: HOUR,
            grace: None,
            gate: Gate {
                max_noncompliant: None,
                max_noncompliant_ratio: None,
                min_reporting: None,
                stale_after: HOUR * 72,
                max_errors: None,
                max_error_ratio: None,
                approvals: 0,
                max_hold: DEFAULT_MAX_HOLD,
                max_blocked_signins: None,
                max_blocked_signin_ratio: None,
                signin_window: crate::domain::plan::DEFAULT_SIGNIN_WINDOW,
                signin_data: Default::default(),
            },
            rollback_when: RollbackWhen::default(),
            approval: ApprovalPolicy::default(),
        }
    }

    fn device(state: DeviceState, owner: u32) -> DeviceReport {
        DeviceReport {
            state,
            last_reported: Some(NOW.minus(HOUR)),
            blocked: false,
            grace_until: None,
            facts: DeviceFacts {
                owner: Some(owner),
                ..DeviceFacts::default()
            },
        }
    }

    fn labels() -> Labels {
        Labels {
            groups: vec!["All Users".into(), "Finance".into(), "Sales".into()],
            settings: vec!["BitLocker".into(), "Secure Boot".into()],
        }
    }

    #[test]
    fn report_mode_tells_and_blocks_nobody() {
        let reports = vec![(
            Platform::Windows,
            vec![device(DeviceState::Noncompliant, 1)],
        )];
        let f = forecast(
            "pilot",
            &phase(Mode::Report, &["All Users"]),
            &reports,
            &labels(),
            NOW,
        );
        assert_eq!((f.notified.devices, f.blocked.devices), (0, 0));
        assert_eq!((f.devices, f.unknown), (1, 0));
        assert!(f.summary().contains("none blocked"), "{}", f.summary());
    }

    #[test]
    fn notify_tells_the_failing_devices_not_told_yet_and_counts_their_users_once() {
        let told = DeviceReport {
            facts: DeviceFacts {
                notified: true,
                owner: Some(9),
                ..DeviceFacts::default()
            },
            ..device(DeviceState::InGrace, 9)
        };
        let reports = vec![
            (
                Platform::Windows,
                vec![
                    device(DeviceState::Noncompliant, 1),
                    device(DeviceState::Noncompliant, 1),
                    device(DeviceState::Compliant, 2),
                    device(DeviceState::Error, 3),
                    device(DeviceState::Conflict, 4),
                    told,
                ],
            ),
            (Platform::Ios, vec![device(DeviceState::Noncompliant, 5)]),
        ];
        let f = forecast(
            "report",
            &phase(Mode::Notify, &["All Users"]),
            &reports,
            &labels(),
            NOW,
        );
        assert_eq!(f.notified.devices, 3);
        assert_eq!(f.notified.users, 2, "two devices of user 1 are one person");
        assert_eq!(
            f.notified.by_platform,
            vec![(Platform::Windows, 2), (Platform::Ios, 1)]
        );
        assert_eq!(f.blocked, Affected::default());
        assert_eq!(f.before.notified_devices, 1);
        assert_eq!(f.before.reporting, 7);
    }

    #[test]
    fn enforce_blocks_at_once_after_grace_and_later_while_in_grace() {
        let in_grace = |hours: u32, owner| DeviceReport {
            grace_until: Some(NOW.plus(HOUR * hours)),
            facts: DeviceFacts {
                notified: true,
                owner: Some(owner),
                ..DeviceFacts::default()
            },
            ..device(DeviceState::InGrace, owner)
        };
        let already = DeviceReport {
            blocked: true,
            facts: DeviceFacts {
                notified: true,
                owner: Some(7),
                ..DeviceFacts::default()
            },
            ..device(DeviceState::Noncompliant, 7)
        };
        let reports = vec![(
            Platform::Android,
            vec![
                device(DeviceState::Noncompliant, 1),
                in_grace(30, 2),
                in_grace(10, 3),
                already,
            ],
        )];
        let f = forecast(
            "notify",
            &phase(Mode::Enforce, &["All Users"]),
            &reports,
            &labels(),
            NOW,
        );
        assert_eq!(f.blocked.devices, 3, "the blocked one is not new");
        assert_eq!(f.blocked_at_once, 1);
        assert_eq!(f.first_block, Some(NOW.plus(HOUR * 10)));
        assert_eq!(f.notified.devices, 1, "only the one never told");
        assert_eq!(f.before.blocked_devices, 1);
        assert!(
            f.summary()
                .contains("3 devices (3 users) newly blocked, 1 at once")
        );
    }

    #[test]
    fn silent_and_stale_devices_are_unknown_never_counted() {
        let stale = DeviceReport {
            last_reported: Some(NOW.minus(HOUR * 100)),
            ..device(DeviceState::Noncompliant, 1)
        };
        let never = DeviceReport {
            last_reported: None,
            ..device(DeviceState::Noncompliant, 2)
        };
        let unknown = device(DeviceState::Unknown, 3);
        let reports = vec![(Platform::Macos, vec![stale, never, unknown])];
        let f = forecast(
            "a",
            &phase(Mode::Enforce, &["All Users"]),
            &reports,
            &labels(),
            NOW,
        );
        assert_eq!((f.devices, f.unknown), (3, 3));
        assert_eq!((f.notified.devices, f.blocked.devices), (0, 0));
        assert!(
            f.summary()
                .contains("3 of 3 devices without a fresh report")
        );
    }

    #[test]
    fn settings_and_groups_are_listed_largest_first_without_the_whole_scope() {
        let with = |failing: u64, groups: u64, owner| DeviceReport {
            facts: DeviceFacts {
                owner: Some(owner),
                failing,
                groups,
                notified: false,
            },
            ..device(DeviceState::Noncompliant, owner)
        };
        let reports = vec![(
            Platform::Windows,
            vec![
                with(0b01, 0b011, 1),
                with(0b11, 0b101, 2),
                with(0b10, 0b101, 3),
            ],
        )];
        let f = forecast(
            "a",
            &phase(Mode::Notify, &["All Users"]),
            &reports,
            &labels(),
            NOW,
        );
        assert_eq!(
            f.notified.by_setting,
            vec![("BitLocker".to_string(), 2), ("Secure Boot".to_string(), 2)]
        );
        assert_eq!(
            f.notified.groups,
            vec![("Sales".to_string(), 2), ("Finance".to_string(), 1)]
        );
        // With two scope groups, each is worth listing.
        let f = forecast(
            "a",
            &phase(Mode::Notify, &["Finance", "Sales"]),
            &reports,
            &labels(),
            NOW,
        );
        assert_eq!(f.notified.groups[0], ("All Users".to_string(), 3));
    }

    #[test]
    fn no_more_than_the_listed_maximum_and_no_unnamed_bits() {
        let labels = Labels {
            groups: (0..8).map(|i| format!("g{i}")).collect(),
            settings: Vec::new(),
        };
        let reports = vec![(
            Platform::Windows,
            (0..20)
                .map(|i| DeviceReport {
                    facts: DeviceFacts {
                        owner: None,
                        failing: 1 << 63,
                        groups: u64::MAX,
                        notified: false,
                    },
                    ..device(DeviceState::Noncompliant, i)
                })
                .collect(),
        )];
        let f = forecast(
            "a",
            &phase(Mode::Notify, &["x", "y"]),
            &reports,
            &labels,
            NOW,
        );
        assert_eq!(f.notified.groups.len(), MAX_LISTED);
        assert!(f.notified.by_setting.is_empty(), "setting 63 has no name");
        assert_eq!(f.notified.users, 0, "owners unknown");
    }

    #[test]
    fn impact_counts_fresh_told_and_blocked_devices() {
        let told = |owner, blocked| DeviceReport {
            blocked,
            facts: DeviceFacts {
                notified: true,
                owner: Some(owner),
                ..DeviceFacts::default()
            },
            ..device(DeviceState::Noncompliant, owner)
        };
        let stale = DeviceReport {
            last_reported: Some(NOW.minus(HOUR * 100)),
            ..told(5, true)
        };
        let reports = vec![(
            Platform::Windows,
            vec![
                told(1, true),
                told(1, false),
                told(2, false),
                stale,
                device(DeviceState::Compliant, 3),
            ],
        )];
        let i = impact(&reports, HOUR * 72, NOW);
        assert_eq!(
            i,
            Impact {
                notified_devices: 3,
                notified_users: 2,
                blocked_devices: 1,
                blocked_users: 1,
                reporting: 4,
            }
        );
    }

    #[test]
    fn the_check_compares_what_is_new_since_the_forecast() {
        let reports = vec![(
            Platform::Windows,
            (0..10)
                .map(|i| device(DeviceState::Noncompliant, i))
                .collect::<Vec<_>>(),
        )];
        let f = forecast(
            "a",
            &phase(Mode::Notify, &["All Users"]),
            &reports,
            &labels(),
            NOW,
        );
        assert_eq!(f.notified.devices, 10);
        let later = Impact {
            notified_devices: 9,
            notified_users: 9,
            blocked_devices: 0,
            blocked_users: 0,
            reporting: 100,
        };
        let c = check(&f, &later, NOW.plus(HOUR));
        assert_eq!(
            (c.notified.forecast_devices, c.notified.actual_devices),
            (10, 9)
        );
        assert!((c.notified.error - 0.01).abs() < 1e-12, "{c:?}");
        assert_eq!(c.blocked.error, 0.0);
        assert_eq!(c.error(), c.notified.error);
        assert!(
            c.summary().contains("notified 10 forecast, 9 actual"),
            "{}",
            c.summary()
        );
        // Nothing reporting: no error can be measured, and none is claimed.
        let silent = check(&f, &Impact::default(), NOW);
        assert_eq!(silent.error(), 0.0);
        // Fewer told than before (devices left the scope) is no negative outcome.
        let fewer = Impact {
            notified_devices: 0,
            ..later
        };
        assert_eq!(check(&f, &fewer, NOW).notified.actual_devices, 0);
    }
}
