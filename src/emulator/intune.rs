//! Intune's per-device compliance evaluation and Conditional Access blocking, as the emulator
//! models them.
//!
//! The rules are Microsoft's (see docs/emulator.md and tenant-safety.md §3):
//! - a device is evaluated when it checks in, under the policy of its platform, if an include
//!   target of that policy covers it and no exclusion target does;
//! - the `block` action ("Mark device noncompliant") and every `notification` action run "N hours
//!   after the device is marked noncompliant", counted from **that device's first noncompliant
//!   evaluation**, with the delays as configured now
//!   (learn.microsoft.com/mem/intune/protect/actions-for-noncompliance);
//! - a device inside its grace counts as compliant for Conditional Access; past it, an enabled
//!   Conditional Access policy that requires a compliant device blocks it
//!   (learn.microsoft.com/entra/identity/conditional-access/policy-all-users-device-compliance).
//!
//! Devices and their traits come from the simulated [`Fleet`]. Evaluation is incremental: the
//! model keeps a state per device and, before every read and every configuration change, plays
//! each device's check-ins since it was last advanced under the configuration in force, which is
//! constant over that interval because configuration only changes at the tenant's present.

use std::collections::HashMap;

use crate::domain::plan::Platform;
use crate::domain::time::Timestamp;
use crate::provider::simulator::fleet::{CHECKIN_PERIOD, DeviceTraits, Fleet};

const HOUR_MS: i64 = 3_600_000;
/// "No time" in the compact per-device records.
const NEVER: i64 = i64::MIN;
const NO_BLOCK: u32 = u32::MAX;

/// `complianceStatus` values a device reports for a policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Status {
    /// Pending: assigned, not evaluated since.
    #[default]
    Unknown,
    Compliant,
    NonCompliant,
    Error,
    Conflict,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Unknown => "unknown",
            Status::Compliant => "compliant",
            Status::NonCompliant => "nonCompliant",
            Status::Error => "error",
            Status::Conflict => "conflict",
        }
    }
}

/// Who uses a device, beyond the fleet's owner.
///
/// Devices without a primary user exist: kiosks, shared devices, devices enrolled without user
/// affinity ("Find the primary user of an Intune device",
/// learn.microsoft.com/mem/intune/remote-actions/find-primary-user: "Shared devices and
/// userless devices have no primary user"). The emulator makes 1.5% of devices userless (their
/// policy still covers them through the groups they were enrolled into) and 3% shared: a second
/// user signs in to them, and the per-policy report lists such a device once per user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceUsers {
    pub primary: Option<usize>,
    pub second: Option<usize>,
}

pub fn device_users(seed: u64, owner: usize, users: usize, device: usize) -> DeviceUsers {
    let mut h = seed ^ (device as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5eed_u64;
    h ^= h >> 30;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 31;
    match h % 1000 {
        0..15 => DeviceUsers {
            primary: None,
            second: None,
        },
        15..45 if users > 1 => DeviceUsers {
            primary: Some(owner),
            second: Some((owner + 1 + (h >> 10) as usize % (users - 1)) % users),
        },
        _ => DeviceUsers {
            primary: Some(owner),
            second: None,
        },
    }
}

/// The emulator's one device group: a security group whose members are devices, not users
/// ("Add groups to organize users and devices", learn.microsoft.com/mem/intune/fundamentals/groups-add:
/// device groups for devices without a dedicated user, such as kiosks and shared devices). It
/// holds the fleet's shared and userless devices; an assignment to it covers them whoever their
/// users are. Its bit sits above the user groups' ([`crate::provider::simulator::fleet::GROUPS`]).
pub const DEVICE_GROUP: &str = "Shared Devices";
pub const DEVICE_GROUP_BIT: u16 = 1 << 15;

/// The device groups `device` is a member of, as group bits.
pub fn device_groups(seed: u64, fleet: &Fleet, device: usize) -> u16 {
    let (owner, _) = fleet.device_owner(device);
    let who = device_users(seed, owner, fleet.user_count(), device);
    if who.primary.is_none() || who.second.is_some() {
        DEVICE_GROUP_BIT
    } else {
        0
    }
}

/// The position of a platform in [`Platform::ALL`].
pub fn platform_index(platform: Platform) -> usize {
    Platform::ALL
        .iter()
        .position(|p| *p == platform)
        .expect("every platform is in ALL")
}

/// Whom a compliance policy's assignment covers, resolved to the fleet's group bits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    /// `allLicensedUsersAssignmentTarget`.
    pub all_users: bool,
    /// `allDevicesAssignmentTarget`.
    pub all_devices: bool,
    /// Groups of `groupAssignmentTarget`s.
    pub include: u16,
    /// Groups of `exclusionGroupAssignmentTarget`s: exclusion wins over inclusion.
    pub exclude: u16,
}

impl Coverage {
    pub fn covers(&self, user_groups: u16) -> bool {
        (self.all_users || self.all_devices || user_groups & self.include != 0)
            && user_groups & self.exclude == 0
    }
}

/// A `notification` action: its template's e-mail goes out `delay_hours` after the device's
/// first noncompliant evaluation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub template_id: String,
    pub delay_hours: i64,
}

/// What one platform's compliance policy asks now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyRules {
    pub coverage: Coverage,
    /// The `block` action's `gracePeriodHours`.
    pub grace_hours: i64,
    pub notices: Vec<Notice>,
}

/// A Conditional Access policy that enforces compliance (enabled, `compliantDevice` mandatory),
/// resolved to the fleet's users and group bits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Enforcer {
    pub all_users: bool,
    pub include_users: Vec<usize>,
    pub include_groups: u16,
    pub exclude_users: Vec<usize>,
    pub exclude_groups: u16,
    /// Whether its platform condition covers each platform, in [`Platform::ALL`] order.
    pub platforms: [bool; 4],
}

impl Enforcer {
    /// Exclusions win over inclusions: a user excluded directly or through a group is not
    /// covered, whatever includes them ("Conditional Access: Users, groups, and workload
    /// identities", https://learn.microsoft.com/entra/identity/conditional-access/concept-conditional-access-users-groups).
    pub fn covers(&self, user: usize, user_groups: u16, platform: Platform) -> bool {
        self.platforms[platform_index(platform)]
            && (self.all_users
                || self.include_users.contains(&user)
                || user_groups & self.include_groups != 0)
            && !self.exclude_users.contains(&user)
            && user_groups & self.exclude_groups == 0
    }
}

/// The configuration in force: per platform, its policy (if there is one), and the enforcing
/// Conditional Access policies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    pub policies: [Option<PolicyRules>; 4],
    pub enforcers: Vec<Enforcer>,
    /// The tenant's seed, which device-group membership derives from ([`device_groups`]).
    pub seed: u64,
}

/// An e-mail a `notification` action sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    pub device: usize,
    pub template_id: String,
    pub at: Timestamp,
}

/// A span during which Conditional Access blocked a device; `until` is `None` while it lasts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub device: usize,
    pub from: Timestamp,
    pub until: Option<Timestamp>,
}

/// A device's row in its policy's `deviceStatuses`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    pub status: Status,
    pub last_reported: Option<Timestamp>,
    /// For a noncompliant device: its first noncompliant evaluation plus the grace configured now.
    pub grace_end: Option<Timestamp>,
}

/// One device's state, compact (a tenant may have millions).
#[derive(Clone, Copy, Debug)]
struct Record {
    /// Its platform's policy is assigned to it under the configuration in force.
    covered: bool,
    /// Covered, and not evaluated since it became covered.
    pending: bool,
    /// At its last evaluation: noncompliant with the grace over.
    past_grace: bool,
    /// The result of its last evaluation.
    status: Status,
    last_reported: i64,
    /// The start of the current noncompliance episode.
    first_nc: i64,
    /// When its owner learned of the problem (first e-mail or first block).
    learned: i64,
    /// The index of its open block in `Intune::blocks`.
    open_block: u32,
}

impl Default for Record {
    fn default() -> Record {
        Record {
            covered: false,
            pending: false,
            past_grace: false,
            status: Status::Unknown,
            last_reported: NEVER,
            first_nc: NEVER,
            learned: NEVER,
            open_block: NO_BLOCK,
        }
    }
}

impl Record {
    /// Further check-ins change nothing: not covered and nothing left to end.
    fn idle(&self) -> bool {
        !self.covered
            && self.status == Status::Unknown
            && self.first_nc == NEVER
            && self.open_block == NO_BLOCK
    }

    /// Further check-ins only move `last_reported`: its result cannot change any more (a device
    /// that passes keeps passing; error and conflict devices keep reporting so).
    fn settled(&self) -> bool {
        self.idle()
            || (self.covered
                && matches!(
                    self.status,
                    Status::Compliant | Status::Error | Status::Conflict
                ))
    }
}

fn at(ms: i64) -> Option<Timestamp> {
    (ms != NEVER).then(|| Timestamp::from_millis(ms))
}

/// The model of every device's compliance and blocking.
pub struct Intune {
    records: Vec<Record>,
    rules: Rules,
    evaluated_to: Timestamp,
    /// Per device in a noncompliance episode, the notifications already sent in it.
    episode_sent: HashMap<usize, Vec<Notice>>,
    sent: Vec<Sent>,
    blocks: Vec<Block>,
    /// Per platform, the devices its policy covers, in device order.
    listed: [Vec<u32>; 4],
    /// Check-ins evaluated, for the tests of incrementality.
    evaluations: u64,
}

impl Intune {
    /// Every device unassigned and unevaluated at `start`, under no configuration.
    pub fn new(fleet: &Fleet, start: Timestamp) -> Intune {
        Intune {
            records: vec![Record::default(); fleet.device_count()],
            rules: Rules::default(),
            evaluated_to: start,
            episode_sent: HashMap::new(),
            sent: Vec::new(),
            blocks: Vec::new(),
            listed: Default::default(),
            evaluations: 0,
        }
    }

    /// Plays every device's check-ins in (last advanced, `now`] under the configuration in force.
    pub fn advance(&mut self, fleet: &Fleet, now: Timestamp) {
        if now <= self.evaluated_to {
            return;
        }
        let from = self.evaluated_to.as_millis();
        let to = now.as_millis();
        let period = CHECKIN_PERIOD.as_millis() as i64;
        for device in 0..self.records.len() {
            if self.records[device].idle() {
                continue;
            }
            let traits = fleet.device_traits(device);
            if traits.never_reports {
                continue;
            }
            let until = traits.dormant_at.map_or(to, |d| d.as_millis().min(to));
            let offset = traits.checkin_offset_ms;
            // The first check-in strictly after `from`, and the last one up to `until`.
            let mut checkin = from - (from - offset).rem_euclid(period) + period;
            let last = until - (until - offset).rem_euclid(period);
            if self.records[device].settled() {
                // Every check-in would give the same result: only the last one shows.
                checkin = checkin.max(last);
            }
            while checkin <= until {
                self.evaluate(fleet, device, &traits, checkin);
                if self.records[device].idle() {
                    break;
                }
                if self.records[device].settled() {
                    if last > checkin {
                        self.evaluate(fleet, device, &traits, last);
                    }
                    break;
                }
                checkin += period;
            }
        }
        self.evaluated_to = now;
    }

    /// Advances to `now`, then puts `rules` in force from `now` on: devices newly covered are
    /// pending until their next check-in, and blocks follow the Conditional Access policies now.
    pub fn reconfigure(&mut self, fleet: &Fleet, rules: Rules, now: Timestamp) {
        self.advance(fleet, now);
        self.rules = rules;
        for list in &mut self.listed {
            list.clear();
        }
        for device in 0..self.records.len() {
            let (user, platform) = fleet.device_owner(device);
            let p = platform_index(platform);
            let covered = self.rules.policies[p].as_ref().is_some_and(|r| {
                // Users' groups and, for an assignment to a device group, the device's.
                let groups =
                    fleet.user_groups(user) | device_groups(self.rules.seed, fleet, device);
                r.coverage.covers(groups)
            });
            let record = &mut self.records[device];
            if covered && !record.covered {
                record.pending = true;
            }
            record.covered = covered;
            if covered {
                self.listed[p].push(device as u32);
            }
            if record.status == Status::NonCompliant || record.open_block != NO_BLOCK {
                self.update_block(fleet, device, now.as_millis());
            }
        }
    }

    /// One check-in of `device` at `checkin` (ms).
    fn evaluate(&mut self, fleet: &Fleet, device: usize, traits: &DeviceTraits, checkin: i64) {
        self.evaluations += 1;
        let rules = self.rules.policies[platform_index(traits.platform)].as_ref();
        let record = &mut self.records[device];
        let mut episode_over = true;
        match rules.filter(|_| record.covered) {
            None => {
                // Not assigned: not evaluated, and any episode ends.
                record.status = Status::Unknown;
                record.past_grace = false;
            }
            Some(rules) => {
                record.pending = false;
                record.last_reported = checkin;
                record.past_grace = false;
                let fixed = record.learned != NEVER
                    && traits
                        .remediation
                        .is_some_and(|r| record.learned + r.as_millis() as i64 <= checkin);
                if traits.error {
                    record.status = Status::Error;
                } else if traits.conflict {
                    record.status = Status::Conflict;
                } else if traits.fails && !fixed {
                    episode_over = false;
                    record.status = Status::NonCompliant;
                    if record.first_nc == NEVER {
                        record.first_nc = checkin;
                    }
                    let first = record.first_nc;
                    record.past_grace = checkin >= first + rules.grace_hours * HOUR_MS;
                    let already = self.episode_sent.entry(device).or_default();
                    for notice in &rules.notices {
                        if checkin >= first + notice.delay_hours * HOUR_MS
                            && !already.contains(notice)
                        {
                            already.push(notice.clone());
                            self.sent.push(Sent {
                                device,
                                template_id: notice.template_id.clone(),
                                at: Timestamp::from_millis(checkin),
                            });
                            if record.learned == NEVER {
                                record.learned = checkin;
                            }
                        }
                    }
                } else {
                    record.status = Status::Compliant;
                }
            }
        }
        if episode_over {
            record.first_nc = NEVER;
            self.episode_sent.remove(&device);
        }
        self.update_block(fleet, device, checkin);
    }

    /// Opens or closes the device's block at `at` (ms) according to its last evaluation and the
    /// enforcing Conditional Access policies in force.
    fn update_block(&mut self, fleet: &Fleet, device: usize, at: i64) {
        let record = &mut self.records[device];
        let blocked = record.status == Status::NonCompliant && record.past_grace && {
            let (user, platform) = fleet.device_owner(device);
            let groups = fleet.user_groups(user);
            self.rules
                .enforcers
                .iter()
                .any(|e| e.covers(user, groups, platform))
        };
        match (blocked, record.open_block) {
            (true, NO_BLOCK) => {
                record.open_block = self.blocks.len() as u32;
                if record.learned == NEVER {
                    record.learned = at;
                }
                self.blocks.push(Block {
                    device,
                    from: Timestamp::from_millis(at),
                    until: None,
                });
            }
            (false, open) if open != NO_BLOCK => {
                self.blocks[open as usize].until = Some(Timestamp::from_millis(at));
                record.open_block = NO_BLOCK;
            }
            _ => {}
        }
    }

    /// The devices `platform`'s policy covers now, in device order.
    pub fn listed(&self, platform: Platform) -> &[u32] {
        &self.listed[platform_index(platform)]
    }

    /// A covered device's `deviceStatuses` row.
    pub fn row(&self, platform: Platform, device: usize) -> Row {
        let record = &self.records[device];
        if record.pending {
            return Row {
                status: Status::Unknown,
                last_reported: None,
                grace_end: None,
            };
        }
        let grace_hours = self.rules.policies[platform_index(platform)]
            .as_ref()
            .map_or(0, |r| r.grace_hours);
        Row {
            status: record.status,
            last_reported: at(record.last_reported),
            grace_end: at(record.first_nc)
                .filter(|_| record.status == Status::NonCompliant)
                .map(|first| Timestamp::from_millis(first.as_millis() + grace_hours * HOUR_MS)),
        }
    }

    /// At its last evaluation the device was noncompliant with its grace over: Intune no longer
    /// marks it compliant, whether or not a policy enforces that.
    pub fn noncompliant_past_grace(&self, device: usize) -> bool {
        let record = &self.records[device];
        record.status == Status::NonCompliant && record.past_grace
    }

    pub fn blocked(&self, device: usize) -> bool {
        self.records[device].open_block != NO_BLOCK
    }

    /// Every e-mail sent, in the order they went out.
    pub fn notifications(&self) -> Vec<Sent> {
        let mut sent = self.sent.clone();
        sent.sort_by_key(|s| (s.at, s.device));
        sent
    }

    pub fn notification_count(&self) -> usize {
        self.sent.len()
    }

    /// Every block, in the order they started.
    pub fn blocks(&self) -> Vec<Block> {
        let mut blocks = self.blocks.clone();
        blocks.sort_by_key(|b| (b.from, b.device));
        blocks
    }

    /// Devices of `platform` blocked now.
    pub fn blocked_now(&self, fleet: &Fleet, platform: Platform) -> usize {
        self.blocks
            .iter()
            .filter(|b| b.until.is_none() && fleet.device_owner(b.device).1 == platform)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const DAY: Duration = Duration::from_secs(86_400);
    const EPOCH: Timestamp = Timestamp::from_millis(1_767_600_000_000);

    fn windows_to_everyone(grace_hours: i64, notices: Vec<Notice>) -> Rules {
        let mut rules = Rules::default();
        rules.policies[0] = Some(PolicyRules {
            coverage: Coverage {
                all_users: true,
                ..Coverage::default()
            },
            grace_hours,
            notices,
        });
        rules
    }

    fn everyone_enforced() -> Enforcer {
        Enforcer {
            all_users: true,
            platforms: [true; 4],
            ..Enforcer::default()
        }
    }

    /// The same answers whether the clock moves in one step or in many.
    #[test]
    fn advancing_in_steps_or_at_once_agrees() {
        let fleet = Fleet::new(7, 3_000, DAY * 2, EPOCH);
        let mut rules = windows_to_everyone(
            48,
            vec![Notice {
                template_id: "t".into(),
                delay_hours: 24,
            }],
        );
        rules.enforcers.push(everyone_enforced());
        let mut once = Intune::new(&fleet, EPOCH);
        let mut steps = Intune::new(&fleet, EPOCH);
        once.reconfigure(&fleet, rules.clone(), EPOCH);
        steps.reconfigure(&fleet, rules, EPOCH);
        let end = EPOCH.plus(DAY * 10);
        once.advance(&fleet, end);
        for hour in 1..=240 {
            steps.advance(&fleet, EPOCH.plus(Duration::from_secs(3_600 * hour)));
        }
        assert_eq!(once.notifications(), steps.notifications());
        assert_eq!(once.blocks(), steps.blocks());
        let rows = |m: &Intune| -> Vec<Row> {
            m.listed(Platform::Windows)
                .iter()
                .map(|&d| m.row(Platform::Windows, d as usize))
                .collect()
        };
        assert_eq!(rows(&once), rows(&steps));
        assert!(!once.blocks().is_empty() && !once.notifications().is_empty());
    }

    /// A month of 100,000 devices costs about one evaluation per device and advance, plus one
    /// per check-in of the devices that keep failing — not one per check-in of every device.
    #[test]
    fn a_month_of_a_hundred_thousand_devices_is_evaluated_incrementally() {
        let fleet = Fleet::new(7, 100_000, DAY * 2, EPOCH);
        let mut model = Intune::new(&fleet, EPOCH);
        let mut rules = windows_to_everyone(72, Vec::new());
        let everyone = rules.policies[0].clone();
        rules.policies = [
            everyone.clone(),
            everyone.clone(),
            everyone.clone(),
            everyone,
        ];
        rules.enforcers.push(everyone_enforced());
        model.reconfigure(&fleet, rules, EPOCH);
        for day in 1..=30 {
            model.advance(&fleet, EPOCH.plus(DAY * day));
        }
        let failing = (0..fleet.device_count())
            .filter(|&d| fleet.device_traits(d).fails)
            .count() as u64;
        let bound = 31 * fleet.device_count() as u64 + failing * 30 * 3;
        let every_checkin = fleet.device_count() as u64 * 30 * 3;
        assert!(
            model.evaluations <= bound,
            "{} > {bound}",
            model.evaluations
        );
        assert!(
            model.evaluations < every_checkin / 2,
            "{} of {every_checkin}",
            model.evaluations
        );
        assert!(model.blocked_now(&fleet, Platform::Windows) > 0);
    }

    #[test]
    fn owners_fix_their_devices_after_they_learn_except_the_stubborn() {
        let fleet = Fleet::new(7, 5_000, DAY, EPOCH);
        let mut model = Intune::new(&fleet, EPOCH);
        let notice = Notice {
            template_id: "t".into(),
            delay_hours: 0,
        };
        model.reconfigure(&fleet, windows_to_everyone(0, vec![notice]), EPOCH);
        model.advance(&fleet, EPOCH.plus(DAY * 30));
        for &d in model.listed(Platform::Windows) {
            let traits = fleet.device_traits(d as usize);
            let row = model.row(Platform::Windows, d as usize);
            if traits.fails && !traits.error && !traits.conflict && row.last_reported.is_some() {
                let expected = if traits.stubborn || traits.dormant_at.is_some() {
                    row.status
                } else {
                    Status::Compliant
                };
                assert_eq!(row.status, expected, "device {d}: {traits:?}");
                if traits.stubborn {
                    assert_eq!(row.status, Status::NonCompliant);
                }
            }
        }
    }
}
