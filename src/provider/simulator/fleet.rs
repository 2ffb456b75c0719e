//! The simulated fleet: a deterministic model of users, groups and devices, and of how devices
//! report against a compliance policy over time.
//!
//! Everything is derived from the seed by hashing, never by drawing from a stateful generator, so
//! device `i` has the same traits whatever else changes, and a device's report at time `t` is a
//! pure function of its traits and the policy's configuration history. That is what makes the
//! simulator deterministic, resumable after a crash, and fast enough for a million devices.
//!
//! The model, per device:
//! - it belongs to one user; users belong to "All Users", one department, and possibly a pilot
//!   group; two break-glass accounts each own one admin workstation;
//! - it checks in every 8 hours at its own offset; a share never reports, a share goes dormant;
//! - a platform-dependent share fails the policy; once its owner is notified (or blocked), it is
//!   fixed after an exponentially distributed delay with the configured half-life, except for a
//!   stubborn share that never is; a few devices report errors or conflicts.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::forecast::{DeviceFacts, Labels};
use crate::domain::gate::{DeviceReport, DeviceState};
use crate::domain::plan::{Mode, Platform};
use crate::domain::signins::{SignInCounter, SignInOutcome};
use crate::domain::time::Timestamp;

const HOUR_MS: i64 = 3_600_000;
const CHECKIN_PERIOD_MS: i64 = 8 * HOUR_MS;
/// How often a device's owner signs in from it.
pub const SIGNIN_PERIOD: Duration = Duration::from_secs(8 * 3600);
/// Sign-ins come an hour after the device's check-ins.
const SIGNIN_OFFSET_MS: i64 = HOUR_MS;
const DORMANCY_WINDOW_MS: i64 = 60 * 24 * HOUR_MS;
const BREAK_GLASS_ACCOUNTS: u32 = 2;
/// The share of users without a mailbox (no Exchange licence), in per-mille.
const NO_MAILBOX_PER_MILLE: u64 = 20;
/// The share of user accounts disabled in the directory (people who left), in per-mille.
const DISABLED_PER_MILLE: u64 = 10;
/// The mail domain of the simulated tenant's users (`user{n}@…`).
pub const MAIL_DOMAIN: &str = "contoso.com";

/// Groups of the simulated directory, in the order of their membership bits.
pub const GROUPS: [&str; 10] = [
    "All Users",
    "Break Glass",
    "Pilot IT",
    "Pilot Field",
    "IT",
    "Finance",
    "Sales",
    "Engineering",
    "Operations",
    "Human Resources",
];

const ALL_USERS: u16 = 1 << 0;
const BREAK_GLASS: u16 = 1 << 1;
const PILOT_IT: u16 = 1 << 2;
const PILOT_FIELD: u16 = 1 << 3;
const DEPARTMENT_BASE: u32 = 4;
/// Department shares of users, in per-mille, in `GROUPS` order from "IT".
const DEPARTMENT_SHARES: [u64; 6] = [60, 120, 250, 220, 250, 100];

const NONCOMPLIANT: u8 = 1 << 0;
const NEVER_REPORTS: u8 = 1 << 1;
const ERROR: u8 = 1 << 2;
const CONFLICT: u8 = 1 << 3;
const STUBBORN: u8 = 1 << 4;

/// The settings of the simulated baseline, as Intune's compliance policies name them; a failing
/// device fails one or two of its platform's.
pub const SETTINGS: [&str; 9] = [
    "Minimum OS version",
    "Require BitLocker",
    "Require Secure Boot",
    "Microsoft Defender Antimalware",
    "Require a password to unlock devices",
    "Require encryption of data storage on device",
    "Jailbroken or rooted devices",
    "Require FileVault",
    "Require System Integrity Protection",
];

/// Indexes into [`SETTINGS`] of the settings a platform's baseline checks.
fn platform_settings(platform: Platform) -> &'static [usize] {
    match platform {
        Platform::Windows => &[0, 1, 2, 3],
        Platform::Ios => &[0, 4, 6],
        Platform::Android => &[0, 4, 5, 6],
        Platform::Macos => &[0, 4, 7, 8],
    }
}

/// The names behind a simulated device's facts: the directory's groups and the baseline's
/// settings.
pub fn labels() -> Labels {
    Labels {
        groups: GROUPS.iter().map(|g| g.to_string()).collect(),
        settings: SETTINGS.iter().map(|s| s.to_string()).collect(),
    }
}

/// The per-mille of devices that fail a new baseline, by platform.
fn noncompliant_per_mille(platform: Platform) -> u64 {
    match platform {
        Platform::Windows => 100,
        Platform::Ios => 50,
        Platform::Android => 120,
        Platform::Macos => 80,
    }
}

#[derive(Clone, Copy, Debug)]
struct Device {
    user: u32,
    platform: Platform,
    flags: u8,
    checkin_offset_ms: i64,
    /// Relative to the fleet's epoch; `i64::MAX` if it never goes dormant.
    dormant_at_ms: i64,
    /// Time from notification to fix; `u64::MAX` for stubborn devices.
    remediation_ms: u64,
    /// Bit `i`: fails `SETTINGS[i]` (while it fails at all).
    settings: u16,
}

/// A scope resolved to membership bits: covered if in any `include` and in no `exclude`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Membership {
    pub include: u16,
    pub exclude: u16,
}

impl Membership {
    pub fn covers(self, bits: u16) -> bool {
        bits & self.include != 0 && bits & self.exclude == 0
    }
}

/// One assignment of the policy in the simulated tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimAssignment {
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub mode: Mode,
    pub grace_secs: Option<u64>,
}

impl From<&crate::domain::desired::DesiredAssignment> for SimAssignment {
    /// The assignment as the simulated tenant keeps it.
    fn from(a: &crate::domain::desired::DesiredAssignment) -> SimAssignment {
        SimAssignment {
            include: a.include.clone(),
            exclude: a.exclude.clone(),
            mode: a.mode,
            grace_secs: a.grace_secs,
        }
    }
}

/// The policy's assignments from `at` until the next entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigEntry {
    pub at: Timestamp,
    pub assignments: Vec<SimAssignment>,
    /// Users (by sign-in name) and groups that enforcement does not block.
    #[serde(default, skip_serializing_if = "SimExempt::is_empty")]
    pub exempt: SimExempt,
}

/// Who enforcement spares in the simulated tenant: users by sign-in name, groups by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimExempt {
    pub users: Vec<String>,
    pub groups: Vec<String>,
}

impl SimExempt {
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.groups.is_empty()
    }
}

/// The domain of the simulated directory's sign-in names.
const DOMAIN: &str = "fleet.example";

/// The sign-in name (UPN) of the simulated user `user`: `user000042@fleet.example`.
pub fn user_principal_name(user: usize) -> String {
    format!("user{user:06}@{DOMAIN}")
}

/// The user a simulated sign-in name names (case-insensitive), if it is one of the fleet's.
pub fn user_of(upn: &str, users: usize) -> Option<u32> {
    let lower = upn.trim().to_ascii_lowercase();
    let digits = lower
        .strip_prefix("user")?
        .strip_suffix(DOMAIN)?
        .strip_suffix('@')?;
    if digits.len() != 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let user: u32 = digits.parse().ok()?;
    ((user as usize) < users).then_some(user)
}

pub struct Fleet {
    seed: u64,
    epoch: Timestamp,
    users: Vec<u16>,
    devices: Vec<Device>,
}

/// splitmix64: a well-mixed 64-bit hash of the seed and a salt.
fn mix(seed: u64, salt: u64) -> u64 {
    let mut z = seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform number in [0, 1) from a hash.
fn unit(hash: u64) -> f64 {
    (hash >> 11) as f64 / (1u64 << 53) as f64
}

fn per_mille(hash: u64) -> u64 {
    hash % 1000
}

pub fn group_bit(name: &str) -> Option<u16> {
    GROUPS.iter().position(|g| *g == name).map(|i| 1 << i)
}

impl Fleet {
    pub fn new(seed: u64, n_devices: u32, half_life: Duration, epoch: Timestamp) -> Fleet {
        let n_people = (u64::from(n_devices) * 10 / 14).max(1) as u32;
        let mut users: Vec<u16> = (0..n_people).map(|u| person_groups(seed, u)).collect();
        users.extend(
            (0..BREAK_GLASS_ACCOUNTS).map(|_| ALL_USERS | BREAK_GLASS | 1 << DEPARTMENT_BASE),
        );
        let people_devices = n_devices.saturating_sub(BREAK_GLASS_ACCOUNTS).max(1);
        let devices = (0..n_devices)
            .map(|i| {
                if i >= people_devices {
                    let account = n_people + (i - people_devices);
                    return device(seed, i, account, Some(Platform::Windows), half_life);
                }
                let owner = (u64::from(i) * u64::from(n_people) / u64::from(people_devices)) as u32;
                device(seed, i, owner, None, half_life)
            })
            .collect();
        Fleet {
            seed,
            epoch,
            users,
            devices,
        }
    }

    pub fn epoch(&self) -> Timestamp {
        self.epoch
    }

    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// Devices per platform, for display.
    pub fn platform_counts(&self) -> [(Platform, usize); 4] {
        Platform::ALL.map(|p| (p, self.devices.iter().filter(|d| d.platform == p).count()))
    }

    /// The latest report of every device of `platform` in `scope`, given the policy's history.
    pub fn observe(
        &self,
        platform: Platform,
        history: &[ResolvedEntry],
        scope: Membership,
        now: Timestamp,
    ) -> Vec<DeviceReport> {
        let history: Vec<&ResolvedEntry> = history.iter().filter(|e| e.at <= now).collect();
        self.devices
            .iter()
            .filter(|d| d.platform == platform && scope.covers(self.users[d.user as usize]))
            .map(|d| self.report(d, &history, now).report)
            .collect()
    }

    /// Every device of `platform` the policy is assigned to now, with its detailed report (the
    /// emulator's `deviceStatuses`), in device order.
    pub fn statuses(
        &self,
        platform: Platform,
        history: &[ResolvedEntry],
        now: Timestamp,
    ) -> Vec<(usize, DetailedReport)> {
        let history: Vec<&ResolvedEntry> = history.iter().filter(|e| e.at <= now).collect();
        let Some(current) = history.last() else {
            return Vec::new();
        };
        self.devices
            .iter()
            .enumerate()
            .filter(|(_, d)| {
                d.platform == platform && current.mode_for(self.users[d.user as usize]).0.is_some()
            })
            .map(|(i, d)| (i, self.report(d, &history, now)))
            .collect()
    }

    /// The sign-ins of `scope`'s users from their `platform` devices in `[since, until]`, as the
    /// rollout's Conditional Access policy judges them, into `counter`. Each device's owner signs
    /// in from it every [`SIGNIN_PERIOD`] (at a per-device offset), until the device goes dormant;
    /// a device that never reports is not used. A sign-in is judged on the device's report at
    /// that moment under the mode then in force: blocked if the report is blocked (enforced),
    /// would be blocked if the device is noncompliant under a report or notify mode
    /// (report-only), passed otherwise; a user the policy does not cover is not evaluated.
    pub fn signins(
        &self,
        platform: Platform,
        history: &[ResolvedEntry],
        scope: Membership,
        since: Timestamp,
        until: Timestamp,
        counter: &mut SignInCounter,
    ) {
        let period = SIGNIN_PERIOD.as_millis() as i64;
        for d in &self.devices {
            let bits = self.users[d.user as usize];
            if d.platform != platform || !scope.covers(bits) || d.flags & NEVER_REPORTS != 0 {
                continue;
            }
            let dormant_at = self.epoch.as_millis().saturating_add(d.dormant_at_ms);
            let last = until.as_millis().min(dormant_at);
            let offset = d.checkin_offset_ms + SIGNIN_OFFSET_MS;
            let mut at = last - (last - offset).rem_euclid(period);
            let user = format!("user{}", d.user);
            while at >= since.as_millis() {
                let t = Timestamp::from_millis(at);
                let applied: Vec<&ResolvedEntry> = history.iter().filter(|e| e.at <= t).collect();
                let mode = applied.last().and_then(|e| e.mode_for(bits).0);
                if let Some(mode) = mode {
                    let report = self.report(d, &applied, t).report;
                    let outcome = if report.blocked {
                        SignInOutcome::Blocked
                    } else if report.state == DeviceState::Noncompliant && mode < Mode::Enforce {
                        SignInOutcome::WouldBlock
                    } else {
                        SignInOutcome::Passed
                    };
                    counter.add(&user, t, outcome);
                }
                at -= period;
            }
        }
    }

    /// Whether a user has a mailbox: the break-glass accounts and a share of unlicensed users
    /// have none (their `mail` is empty in the directory).
    pub fn has_mailbox(&self, user: usize) -> bool {
        let unlicensed =
            per_mille(mix(self.seed, 0x4D41_494C_0000_0000 | user as u64)) < NO_MAILBOX_PER_MILLE;
        self.users[user] & BREAK_GLASS == 0 && !unlicensed
    }

    /// Whether a user's account is enabled: a share is disabled (people who left, their group
    /// memberships not yet cleaned up); the break-glass accounts never are.
    pub fn account_enabled(&self, user: usize) -> bool {
        let left =
            per_mille(mix(self.seed, 0x4F46_4646_0000_0000 | user as u64)) < DISABLED_PER_MILLE;
        self.users[user] & BREAK_GLASS != 0 || !left
    }

    /// The directory's users of the group with these membership bits, in order.
    pub fn members_of(&self, bit: u16) -> impl Iterator<Item = usize> + '_ {
        (0..self.users.len()).filter(move |&u| self.users[u] & bit != 0)
    }

    /// The membership bits of a user (bit `i` for `GROUPS[i]`).
    pub fn user_groups(&self, user: usize) -> u16 {
        self.users[user]
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// The owner and platform of a device.
    pub fn device_owner(&self, device: usize) -> (usize, Platform) {
        let d = &self.devices[device];
        (d.user as usize, d.platform)
    }

    /// The traits of one device, for models that evaluate devices themselves (the emulator's
    /// Intune model); the same device as [`Fleet::observe`] reports on.
    pub fn device_traits(&self, device: usize) -> DeviceTraits {
        let d = &self.devices[device];
        DeviceTraits {
            user: d.user as usize,
            platform: d.platform,
            fails: d.flags & NONCOMPLIANT != 0,
            never_reports: d.flags & NEVER_REPORTS != 0,
            error: d.flags & ERROR != 0,
            conflict: d.flags & CONFLICT != 0 && d.flags & ERROR == 0,
            stubborn: d.remediation_ms == u64::MAX,
            checkin_offset_ms: d.checkin_offset_ms,
            dormant_at: (d.dormant_at_ms != i64::MAX).then(|| {
                Timestamp::from_millis(self.epoch.as_millis().saturating_add(d.dormant_at_ms))
            }),
            remediation: (d.remediation_ms != u64::MAX)
                .then(|| Duration::from_millis(d.remediation_ms)),
        }
    }

    fn report(
        &self,
        device: &Device,
        history: &[&ResolvedEntry],
        now: Timestamp,
    ) -> DetailedReport {
        let unknown = DetailedReport {
            report: DeviceReport {
                state: DeviceState::Unknown,
                last_reported: None,
                blocked: false,
                grace_until: None,
                facts: DeviceFacts::default(),
            },
            grace_until: None,
        };
        let bits = self.users[device.user as usize];
        let facts = DeviceFacts {
            owner: Some(device.user),
            groups: u64::from(bits),
            failing: 0,
            notified: false,
        };
        let unknown = DetailedReport {
            report: DeviceReport {
                facts,
                ..unknown.report
            },
            ..unknown
        };
        let Some(checked_in) = self.last_checkin(device, now) else {
            return unknown;
        };
        let mut covered_since = None;
        let mut notified: Option<(Timestamp, u64)> = None;
        let mut mode_at_checkin = None;
        let mut mode_now = None;
        for entry in history {
            let (mode, grace_ms) = entry.mode_for(bits);
            mode_now = mode;
            match mode {
                Some(mode) => {
                    covered_since.get_or_insert(entry.at);
                    if mode >= Mode::Notify && notified.is_none() {
                        notified = Some((entry.at, grace_ms));
                    }
                }
                None => covered_since = None,
            }
            if entry.at <= checked_in {
                mode_at_checkin = mode;
            }
        }
        let (Some(since), Some(_)) = (covered_since, mode_at_checkin) else {
            return unknown;
        };
        if checked_in < since {
            return unknown;
        }
        let grace_end =
            notified.map(|(at, grace_ms)| Timestamp::from_millis(at.as_millis() + grace_ms as i64));
        let failing = device.flags & NONCOMPLIANT != 0 && !fixed_by(device, notified, checked_in);
        let state = if device.flags & ERROR != 0 {
            DeviceState::Error
        } else if device.flags & CONFLICT != 0 {
            DeviceState::Conflict
        } else if failing && grace_end.is_some_and(|end| checked_in < end) {
            DeviceState::InGrace
        } else if failing {
            DeviceState::Noncompliant
        } else {
            DeviceState::Compliant
        };
        let grace_until = grace_end.filter(|_| state == DeviceState::InGrace);
        let actionable = matches!(state, DeviceState::InGrace | DeviceState::Noncompliant);
        // The owner learns of it when the device is evaluated under a notifying assignment; a
        // device fixed since was told all the same.
        let told = device.flags & (NONCOMPLIANT | ERROR | CONFLICT) == NONCOMPLIANT
            && notified.is_some_and(|(at, _)| checked_in >= at);
        let facts = DeviceFacts {
            failing: if actionable {
                u64::from(device.settings)
            } else {
                0
            },
            notified: told,
            ..facts
        };
        DetailedReport {
            report: DeviceReport {
                state,
                last_reported: Some(checked_in),
                // Conditional Access blocks on the device's last known state under today's mode,
                // unless its owner is exempt.
                blocked: state == DeviceState::Noncompliant
                    && mode_now == Some(Mode::Enforce)
                    && !history.last().is_some_and(|e| e.exempts(device.user, bits)),
                grace_until,
                facts,
            },
            grace_until,
        }
    }

    /// The device's most recent check-in at or before `now`, if it ever reports.
    fn last_checkin(&self, device: &Device, now: Timestamp) -> Option<Timestamp> {
        if device.flags & NEVER_REPORTS != 0 {
            return None;
        }
        let dormant_at = self.epoch.as_millis().saturating_add(device.dormant_at_ms);
        let until = now.as_millis().min(dormant_at);
        let since_offset = until - device.checkin_offset_ms;
        Some(Timestamp::from_millis(
            until - since_offset.rem_euclid(CHECKIN_PERIOD_MS),
        ))
    }
}

fn fixed_by(device: &Device, notified: Option<(Timestamp, u64)>, at: Timestamp) -> bool {
    match notified {
        Some((notified_at, _)) if device.remediation_ms != u64::MAX => {
            notified_at.as_millis() + device.remediation_ms as i64 <= at.as_millis()
        }
        _ => false,
    }
}

fn person_groups(seed: u64, user: u32) -> u16 {
    let hash = mix(seed, 0x5553_4552_0000_0000 | u64::from(user));
    let mut roll = per_mille(hash);
    let mut department = DEPARTMENT_SHARES.len() - 1;
    for (i, share) in DEPARTMENT_SHARES.iter().enumerate() {
        if roll < *share {
            department = i;
            break;
        }
        roll -= share;
    }
    let mut bits = ALL_USERS | 1 << (DEPARTMENT_BASE + department as u32);
    let pilot_roll = (hash >> 32) % 1000;
    match department {
        0 if pilot_roll < 500 => bits |= PILOT_IT,
        2 | 4 if pilot_roll < 50 => bits |= PILOT_FIELD,
        _ => {}
    }
    bits
}

fn device(seed: u64, i: u32, user: u32, platform: Option<Platform>, half_life: Duration) -> Device {
    let h = |salt: u64| mix(seed, (salt << 40) | u64::from(i));
    let platform = platform.unwrap_or_else(|| match per_mille(h(1)) {
        0..500 => Platform::Windows,
        500..720 => Platform::Ios,
        720..880 => Platform::Android,
        _ => Platform::Macos,
    });
    let mut flags = 0;
    if per_mille(h(2)) < noncompliant_per_mille(platform) {
        flags |= NONCOMPLIANT;
    }
    if per_mille(h(3)) < 12 {
        flags |= NEVER_REPORTS;
    }
    let trouble = h(4) % 10_000;
    if trouble < 40 {
        flags |= ERROR;
    } else if trouble < 60 {
        flags |= CONFLICT;
    }
    if per_mille(h(5)) < 120 {
        flags |= STUBBORN;
    }
    let dormant_at_ms = if per_mille(h(6)) < 25 {
        (unit(h(7)) * DORMANCY_WINDOW_MS as f64) as i64 - DORMANCY_WINDOW_MS / 2
    } else {
        i64::MAX
    };
    let remediation_ms = if flags & STUBBORN != 0 {
        u64::MAX
    } else {
        // Exponential with the given half-life: P(fixed by t) = 1 - 2^(-t / half_life).
        let u = unit(h(8)).max(f64::MIN_POSITIVE);
        (-u.log2() * half_life.as_millis() as f64) as u64
    };
    let checks = platform_settings(platform);
    let first = checks[(h(10) % checks.len() as u64) as usize];
    let second = checks[((h(10) >> 32) % checks.len() as u64) as usize];
    let settings = if flags & NONCOMPLIANT == 0 {
        0
    } else if per_mille(h(11)) < 300 {
        1 << first | 1 << second
    } else {
        1 << first
    };
    Device {
        user,
        platform,
        flags,
        settings,
        checkin_offset_ms: (unit(h(9)) * CHECKIN_PERIOD_MS as f64) as i64,
        dormant_at_ms,
        remediation_ms,
    }
}

/// How often every device checks in.
pub const CHECKIN_PERIOD: Duration = Duration::from_millis(CHECKIN_PERIOD_MS as u64);

/// What a device is, independent of any policy's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceTraits {
    /// Its owner (an index into the fleet's users).
    pub user: usize,
    pub platform: Platform,
    /// Fails the policy's settings until its owner fixes it.
    pub fails: bool,
    /// Enrolled but never checks in.
    pub never_reports: bool,
    /// Reports an error for the policy.
    pub error: bool,
    /// Reports a conflict for the policy.
    pub conflict: bool,
    /// Its owner never fixes it.
    pub stubborn: bool,
    /// It checks in at every instant `t` (milliseconds since the Unix epoch) with
    /// `t ≡ checkin_offset_ms (mod CHECKIN_PERIOD)`.
    pub checkin_offset_ms: i64,
    /// It checks in for the last time at or before this instant, if it ever goes dormant.
    pub dormant_at: Option<Timestamp>,
    /// How long after its owner learns of the problem it is fixed; `None` if stubborn.
    pub remediation: Option<Duration>,
}

/// A device's report with the end of its grace period, when it is in one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DetailedReport {
    pub report: DeviceReport,
    pub grace_until: Option<Timestamp>,
}

/// A configuration entry with its groups resolved to membership bits.
#[derive(Clone, Debug)]
pub struct ResolvedEntry {
    pub at: Timestamp,
    pub assignments: Vec<(Membership, Mode, u64)>,
    /// When set, only users in it are covered at all (the policy's assignment, when modes come
    /// from elsewhere, such as a Conditional Access policy in the emulator).
    pub assigned: Option<Membership>,
    /// Users (sorted indexes) and groups (membership bits) enforcement does not block.
    pub exempt_users: Vec<u32>,
    pub exempt_groups: u16,
}

impl ResolvedEntry {
    /// Whether enforcement spares this user (by index, with their membership bits).
    fn exempts(&self, user: u32, bits: u16) -> bool {
        bits & self.exempt_groups != 0 || self.exempt_users.binary_search(&user).is_ok()
    }

    /// The strongest mode covering a user with these bits, and the notify grace (ms) that goes
    /// with it.
    fn mode_for(&self, bits: u16) -> (Option<Mode>, u64) {
        if self.assigned.is_some_and(|m| !m.covers(bits)) {
            return (None, 0);
        }
        let mut mode = None;
        let mut grace_ms = 0;
        for (membership, assigned, grace) in &self.assignments {
            if membership.covers(bits) {
                mode = mode.max(Some(*assigned));
                if *assigned == Mode::Notify {
                    grace_ms = grace_ms.max(*grace);
                }
            }
        }
        (mode, grace_ms)
    }
}

/// Resolves group names to bits; `Err` names the first unknown group.
pub fn membership(include: &[String], exclude: &[String]) -> Result<Membership, String> {
    let bits = |names: &[String]| -> Result<u16, String> {
        names.iter().try_fold(0u16, |acc, name| {
            group_bit(name)
                .map(|bit| acc | bit)
                .ok_or_else(|| name.clone())
        })
    };
    Ok(Membership {
        include: bits(include)?,
        exclude: bits(exclude)?,
    })
}

pub fn resolve(entry: &ConfigEntry, users: usize) -> Result<ResolvedEntry, String> {
    let assignments = entry
        .assignments
        .iter()
        .map(|a| {
            let scope = membership(&a.include, &a.exclude)?;
            Ok((scope, a.mode, a.grace_secs.unwrap_or(0) * 1000))
        })
        .collect::<Result<_, String>>()?;
    let (exempt_users, exempt_groups) = resolve_exempt(&entry.exempt, users)?;
    Ok(ResolvedEntry {
        at: entry.at,
        assignments,
        assigned: None,
        exempt_users,
        exempt_groups,
    })
}

/// The exempt users as sorted indexes and the exempt groups as bits; `Err` names the first
/// user or group the simulated directory does not have.
pub fn resolve_exempt(exempt: &SimExempt, users: usize) -> Result<(Vec<u32>, u16), String> {
    let mut indexes = exempt
        .users
        .iter()
        .map(|upn| user_of(upn, users).ok_or_else(|| format!("user {upn}")))
        .collect::<Result<Vec<u32>, String>>()?;
    indexes.sort_unstable();
    indexes.dedup();
    let groups = exempt.groups.iter().try_fold(0u16, |acc, name| {
        group_bit(name)
            .map(|bit| acc | bit)
            .ok_or_else(|| format!("group {name}"))
    })?;
    Ok((indexes, groups))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::gate::tally;
    use crate::domain::signins::SignInCounter;

    const DAY: Duration = Duration::from_secs(86_400);
    const EPOCH: Timestamp = Timestamp::from_millis(1_767_600_000_000);

    fn everyone(mode: Mode, at: Timestamp) -> ResolvedEntry {
        let scope = membership(&["All Users".into()], &["Break Glass".into()]).unwrap();
        ResolvedEntry {
            at,
            assignments: vec![(scope, mode, 7 * DAY.as_millis() as u64)],
            assigned: None,
            exempt_users: Vec::new(),
            exempt_groups: 0,
        }
    }

    fn all() -> Membership {
        membership(&["All Users".into()], &[]).unwrap()
    }

    #[test]
    fn sign_ins_follow_the_devices_and_the_mode_in_force() {
        let fleet = Fleet::new(7, 5_000, DAY, EPOCH);
        let since = EPOCH.plus(DAY * 3);
        let until = since.plus(DAY);
        let count = |history: &[ResolvedEntry]| {
            let mut counter = SignInCounter::new(since, until);
            for platform in Platform::ALL {
                fleet.signins(platform, history, all(), since, until, &mut counter);
            }
            counter.finish(false)
        };
        // Report-only: noncompliant devices' sign-ins would fail; nobody is blocked.
        let report = count(&[everyone(Mode::Report, EPOCH)]);
        assert!(report.signins > 0 && report.users > 0, "{report:?}");
        assert!(report.would_block > 0, "{report:?}");
        assert_eq!(report.blocked, 0);
        // Each reporting device signs in three times a day.
        let reports = tally(
            &fleet.observe(
                Platform::Windows,
                &[everyone(Mode::Report, EPOCH)],
                all(),
                until,
            ),
            DAY * 3,
            until,
        );
        assert!(
            report.signins >= 3 * reports.reported() / 2,
            "{report:?} {reports:?}"
        );
        // Enforced from the start: the noncompliant devices past their grace are blocked.
        let enforced = count(&[everyone(Mode::Enforce, EPOCH)]);
        assert!(enforced.blocked > 0, "{enforced:?}");
        assert_eq!(enforced.would_block, 0, "{enforced:?}");
        assert_eq!(enforced.signins, report.signins);
        // Not assigned: no sign-in is evaluated.
        let none = count(&[]);
        assert_eq!(none.signins, 0);
    }

    #[test]
    fn an_exempt_users_devices_and_an_exempt_groups_are_not_blocked() {
        let fleet = Fleet::new(7, 5_000, DAY, EPOCH);
        let now = EPOCH.plus(DAY * 3);
        let blocked_owners = |entry: &ResolvedEntry| -> Vec<(u32, bool)> {
            fleet
                .observe(Platform::Windows, std::slice::from_ref(entry), all(), now)
                .iter()
                .map(|r| (r.facts.owner.unwrap(), r.blocked))
                .collect()
        };
        let enforced = everyone(Mode::Enforce, EPOCH);
        let before = blocked_owners(&enforced);
        let (carol, _) = *before.iter().find(|(_, blocked)| *blocked).unwrap();
        let upn = user_principal_name(carol as usize).to_uppercase();
        let exempt = SimExempt {
            users: vec![upn],
            groups: Vec::new(),
        };
        let (users, groups) = resolve_exempt(&exempt, fleet.user_count()).unwrap();
        let spared = ResolvedEntry {
            exempt_users: users,
            exempt_groups: groups,
            ..enforced.clone()
        };
        let after = blocked_owners(&spared);
        assert_eq!(before.len(), after.len());
        for (was, is) in before.iter().zip(&after) {
            let expected = was.1 && was.0 != carol;
            assert_eq!(is.1, expected, "device of user {}", was.0);
        }
        // A group: none of its members' devices is blocked, everyone else's still are.
        let finance = group_bit("Finance").unwrap();
        let spared = ResolvedEntry {
            exempt_groups: finance,
            ..enforced.clone()
        };
        let reports = fleet.observe(Platform::Windows, &[spared], all(), now);
        let (members, others): (Vec<&DeviceReport>, Vec<&DeviceReport>) = reports
            .iter()
            .partition(|r| fleet.user_groups(r.facts.owner.unwrap() as usize) & finance != 0);
        assert!(!members.is_empty() && members.iter().all(|r| !r.blocked));
        assert!(others.iter().any(|r| r.blocked));
        // Names the directory does not have are refused, naming them.
        let unknown = SimExempt {
            users: vec!["user999999@fleet.example".into()],
            groups: Vec::new(),
        };
        assert_eq!(
            resolve_exempt(&unknown, fleet.user_count()).unwrap_err(),
            "user user999999@fleet.example"
        );
        assert_eq!(user_of("user000001@other.example", 10), None);
        assert_eq!(user_of(" User000001@Fleet.Example ", 10), Some(1));
    }

    #[test]
    fn the_same_seed_gives_the_same_fleet() {
        let a = Fleet::new(7, 5_000, DAY, EPOCH);
        let b = Fleet::new(7, 5_000, DAY, EPOCH);
        let c = Fleet::new(8, 5_000, DAY, EPOCH);
        let history = [everyone(Mode::Report, EPOCH)];
        let now = EPOCH.plus(DAY * 3);
        let observe = |f: &Fleet| f.observe(Platform::Windows, &history, all(), now);
        assert_eq!(observe(&a), observe(&b));
        assert_ne!(observe(&a), observe(&c));
    }

    #[test]
    fn a_few_accounts_are_disabled_and_never_a_break_glass_one() {
        let fleet = Fleet::new(7, 100_000, DAY, EPOCH);
        let people = fleet.users.len();
        let disabled = (0..people).filter(|&u| !fleet.account_enabled(u)).count();
        let share = disabled as f64 / people as f64;
        assert!((0.005..0.015).contains(&share), "{share}");
        assert!(
            fleet
                .members_of(BREAK_GLASS)
                .all(|u| fleet.account_enabled(u))
        );
    }

    #[test]
    fn groups_have_plausible_sizes() {
        let fleet = Fleet::new(7, 100_000, DAY, EPOCH);
        let count = |bit: u16| fleet.users.iter().filter(|u| *u & bit != 0).count();
        let people = fleet.users.len();
        assert_eq!(count(ALL_USERS), people);
        assert_eq!(count(BREAK_GLASS), 2);
        let pilot_it = count(PILOT_IT) as f64 / people as f64;
        assert!((0.02..0.04).contains(&pilot_it), "{pilot_it}");
        let windows = fleet.platform_counts()[0].1 as f64 / fleet.device_count() as f64;
        assert!((0.47..0.53).contains(&windows), "{windows}");
    }

    #[test]
    fn unassigned_devices_have_not_reported() {
        let fleet = Fleet::new(7, 2_000, DAY, EPOCH);
        let reports = fleet.observe(Platform::Windows, &[], all(), EPOCH.plus(DAY));
        assert!(reports.iter().all(|r| r.last_reported.is_none()));
    }

    #[test]
    fn devices_report_within_a_checkin_period_of_assignment() {
        let fleet = Fleet::new(7, 10_000, DAY, EPOCH);
        let history = [everyone(Mode::Report, EPOCH)];
        let soon = tally(
            &fleet.observe(Platform::Windows, &history, all(), EPOCH.plus(DAY / 24)),
            DAY * 3,
            EPOCH.plus(DAY / 24),
        );
        let later_at = EPOCH.plus(DAY);
        let later = tally(
            &fleet.observe(Platform::Windows, &history, all(), later_at),
            DAY * 3,
            later_at,
        );
        assert!(soon.reported() < later.reported() / 4, "{soon:?} {later:?}");
        let coverage = later.coverage().unwrap();
        assert!((0.95..0.995).contains(&coverage), "{coverage}");
        let ratio = later.noncompliant_ratio().unwrap();
        assert!((0.08..0.13).contains(&ratio), "{ratio}");
    }

    #[test]
    fn notified_owners_remediate_over_time() {
        let fleet = Fleet::new(7, 20_000, DAY * 2, EPOCH);
        let history = [
            everyone(Mode::Report, EPOCH),
            everyone(Mode::Notify, EPOCH.plus(DAY * 3)),
        ];
        let ratio_at = |days: u32| {
            let now = EPOCH.plus(DAY * days);
            let t = tally(
                &fleet.observe(Platform::Windows, &history, all(), now),
                DAY * 3,
                now,
            );
            (t.noncompliant_ratio().unwrap(), t)
        };
        let (before, _) = ratio_at(3);
        let (soon, soon_tally) = ratio_at(5);
        let (late, _) = ratio_at(14);
        assert!(soon_tally.in_grace > 0, "notified devices are in grace");
        assert!(before > soon && soon > late, "{before} {soon} {late}");
        assert!(late < 0.02, "the stubborn share stays: {late}");
        assert!(late > 0.005, "{late}");
    }

    #[test]
    fn enforced_noncompliant_devices_are_blocked_after_grace() {
        let fleet = Fleet::new(7, 20_000, DAY * 2, EPOCH);
        let history = [
            everyone(Mode::Notify, EPOCH),
            everyone(Mode::Enforce, EPOCH.plus(DAY * 8)),
        ];
        let now = EPOCH.plus(DAY * 9);
        let t = tally(
            &fleet.observe(Platform::Windows, &history, all(), now),
            DAY * 3,
            now,
        );
        assert!(t.blocked > 0);
        assert_eq!(t.blocked, t.noncompliant);
        assert_eq!(t.in_grace, 0);
    }

    #[test]
    fn excluded_break_glass_devices_are_not_targeted() {
        let fleet = Fleet::new(7, 1_000, DAY, EPOCH);
        let with = fleet.observe(Platform::Windows, &[], all(), EPOCH).len();
        let scope = membership(&["All Users".into()], &["Break Glass".into()]).unwrap();
        let without = fleet.observe(Platform::Windows, &[], scope, EPOCH).len();
        assert_eq!(with - without, 2);
    }

    #[test]
    fn unknown_groups_are_named() {
        assert_eq!(membership(&["Nope".into()], &[]), Err("Nope".to_string()));
    }
}
