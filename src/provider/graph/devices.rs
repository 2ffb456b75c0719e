//! Pure: the rows of a per-policy device report, each device once, judged by Intune's rules and
//! attributed to phases.
//!
//! A report export (`export.rs`) lists a policy's devices with their device id and user id. A
//! shared device appears once per user who signs in to it; it is one device, kept once under its
//! id, with each of its users. A device without a primary user (a kiosk, a shared device in
//! shared mode) has no user id: no user group can place it in a phase, so it is counted apart as
//! `userless` instead of being dropped silently.
//!
//! Intune's rule applied here: a device that has not checked in within the tenant's compliance
//! status validity period (`deviceComplianceCheckinThresholdDays`) is noncompliant, not merely
//! stale ("Compliance policy settings", learn.microsoft.com/mem/intune/protect/
//! device-compliance-get-started#compliance-policy-settings). Intune's other rule, a setting in
//! error for seven days counts as noncompliant, is Intune's own evaluation: the report already
//! shows such a device as noncompliant, and a report row carries no "in error since" to apply
//! it again.
//!
//! The per-policy report says a device is in its grace period, not until when; the end of its
//! grace comes from a second report (`DeviceCompliance`'s `InGracePeriodUntil`), joined in by
//! device id with [`Devices::set_grace_end`]: only the devices in grace keep a date, in room
//! their record has anyway.

use std::collections::HashMap;
use std::time::Duration;

use crate::domain::gate::DeviceState;
use crate::domain::time::Timestamp;

/// The most devices one policy's report may hold (ten times a very large tenant).
pub const MAX_DEVICES: usize = 10_000_000;

/// A device or user id, as a number: a GUID's 128 bits, or a hash of any other text.
pub type Key = u128;

/// The value of each hex digit, 0xFF for any other byte.
const HEX: [u8; 256] = {
    let mut table = [0xFF; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        table[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

/// The 128 bits of a GUID in its canonical form (`8-4-4-4-12` hex digits, any case), by table:
/// a report has two per row, a million rows, and a digit-by-digit branch mispredicts on every
/// other one.
pub(crate) fn canonical_guid(b: &[u8]) -> Option<Key> {
    if b.len() != 36 || b[8] != b'-' || b[13] != b'-' || b[18] != b'-' || b[23] != b'-' {
        return None;
    }
    let half = |ranges: [(usize, usize); 3]| {
        let (mut value, mut bad) = (0u64, 0u8);
        for (from, to) in ranges {
            for &c in &b[from..to] {
                let n = HEX[c as usize];
                bad |= n;
                value = (value << 4) | u64::from(n & 0x0F);
            }
        }
        (bad & 0xF0 == 0).then_some(value)
    };
    let high = half([(0, 8), (9, 13), (14, 18)])?;
    let low = half([(19, 23), (24, 36), (36, 36)])?;
    Some((u128::from(high) << 64) | u128::from(low))
}

/// The id's key; `None` for an empty id.
pub fn key(id: &str) -> Option<Key> {
    if let Some(key) = canonical_guid(id.as_bytes()) {
        return Some(key);
    }
    let id = id.trim();
    if id.is_empty() {
        return None;
    }
    let mut value: u128 = 0;
    let mut digits = 0;
    for b in id.bytes() {
        let nibble = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            b'-' => continue,
            _ => return Some(fallback(id)),
        };
        value = (value << 4) | u128::from(nibble);
        digits += 1;
        if digits > 32 {
            return Some(fallback(id));
        }
    }
    Some(if digits == 32 { value } else { fallback(id) })
}

/// The key of any text, exactly as given (a user principal name, lowercased, in
/// `statuses.rs`): FNV-1a over 128 bits, as [`key`] reads an id that is no GUID.
pub fn text_key(text: &str) -> Key {
    fallback(text)
}

/// FNV-1a over 128 bits, with the top bit set so it never equals a GUID's key by construction
/// of the same text.
fn fallback(id: &str) -> Key {
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for b in id.bytes() {
        h ^= u128::from(b);
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    h | 1 << 127
}

/// A device's status for the policy, as the report numbers it (`PolicyStatus`: 1 unknown,
/// 2 compliant, 3 in grace period, 4 noncompliant, 5 error, 6 conflict, 7 not applicable), or as
/// its names are spelt when values are localized or enumerated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReportStatus {
    NotApplicable,
    Unknown,
    Compliant,
    InGrace,
    Error,
    Conflict,
    Noncompliant,
}

impl ReportStatus {
    pub fn parse(text: &str) -> ReportStatus {
        match text.trim() {
            "2" => ReportStatus::Compliant,
            "3" => ReportStatus::InGrace,
            "4" => ReportStatus::Noncompliant,
            "5" => ReportStatus::Error,
            "6" => ReportStatus::Conflict,
            "7" => ReportStatus::NotApplicable,
            other => match other.to_ascii_lowercase().replace(' ', "").as_str() {
                "compliant" | "remediated" => ReportStatus::Compliant,
                "ingraceperiod" => ReportStatus::InGrace,
                "noncompliant" | "notcompliant" => ReportStatus::Noncompliant,
                "error" => ReportStatus::Error,
                "conflict" => ReportStatus::Conflict,
                "notapplicable" | "notassigned" => ReportStatus::NotApplicable,
                _ => ReportStatus::Unknown,
            },
        }
    }
}

/// One row of the report, borrowed from the reader.
#[derive(Clone, Copy, Debug)]
pub struct ReportRow<'a> {
    pub device_id: &'a str,
    /// Its Entra device id (`AadDeviceId`), the `deviceId` device groups list their members by;
    /// empty when not read or not registered.
    pub aad_device_id: &'a str,
    /// Empty for a device without a primary user.
    pub user_id: &'a str,
    pub status: ReportStatus,
    pub last_contact: Option<Timestamp>,
}

/// A device as its report rows describe it, compact (a million per report): keys as two
/// 64-bit halves (8-byte aligned, not 16), "none" as a sentinel rather than an `Option`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Device {
    id: [u64; 2],
    /// The user of its first row; zeros: no primary user (the nil GUID is nobody's).
    user: [u64; 2],
    /// In milliseconds; `i64::MIN`: never.
    last_contact: i64,
    /// The end of its grace in milliseconds, for a device in grace whose end is known
    /// (`i64::MIN`: not known).
    grace_end: i64,
    /// Its first row's number, which keeps that row first when the rows are sorted.
    seq: u32,
    pub status: ReportStatus,
    /// It has users beyond its first row's (in [`Devices`]' `more_users`): only such a device
    /// is looked up there, not each of a million.
    shared: bool,
}

// 56 bytes a device: the rows of a million-device report in 56 MiB.
const _: () = assert!(std::mem::size_of::<Device>() <= 56);

fn halves(key: Key) -> [u64; 2] {
    [(key >> 64) as u64, key as u64]
}

fn joined(halves: [u64; 2]) -> Key {
    (u128::from(halves[0]) << 64) | u128::from(halves[1])
}

impl Device {
    pub fn id(&self) -> Key {
        joined(self.id)
    }

    /// Its primary user (its first row's); `None`: no primary user.
    pub fn user(&self) -> Option<Key> {
        Some(joined(self.user)).filter(|u| *u != 0)
    }

    pub fn last_contact(&self) -> Option<Timestamp> {
        (self.last_contact != i64::MIN).then(|| Timestamp::from_millis(self.last_contact))
    }

    /// When its grace ends, for a device in grace whose end the grace report gave.
    pub fn grace_until(&self) -> Option<Timestamp> {
        (self.status == ReportStatus::InGrace && self.grace_end != i64::MIN)
            .then(|| Timestamp::from_millis(self.grace_end))
    }
}

/// Hashes a [`Key`] by folding its halves: GUIDs are random already, so SipHash's work over
/// a million devices buys nothing (the keys come from the tenant, but a collision only costs
/// time, bounded by [`MAX_DEVICES`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u128(&mut self, n: u128) {
        let folded = (n as u64) ^ ((n >> 64) as u64);
        self.0 = (folded ^ self.0)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
}

/// A map by [`Key`]s hashed with [`KeyHasher`].
pub type KeyMap<V> = HashMap<Key, V, std::hash::BuildHasherDefault<KeyHasher>>;
/// A set of [`Key`]s hashed with [`KeyHasher`].
pub type KeySet = std::collections::HashSet<Key, std::hash::BuildHasherDefault<KeyHasher>>;

/// A policy's devices, each once: the rows appended as compact records while the report is
/// read (no table probe per row: the ids are random, a hash table's inserts are cache misses),
/// then sorted by device id and merged ([`Devices::finish`]).
#[derive(Debug, Default)]
pub struct Devices {
    /// Before `finish`, one per row in report order; after, one per device, by id.
    devices: Vec<Device>,
    /// The further users of shared devices (rare: kept apart to keep `Device` small), by device.
    more_users: KeyMap<Vec<Key>>,
    /// The devices' Entra device ids, when read (only for device groups: kept apart), by device.
    aads: Vec<(Key, Key)>,
    rows: u64,
}

impl Devices {
    /// Adds a row: a new device, or another user of a device already seen (merged by
    /// [`Devices::finish`]: the worse status and the later contact are kept, its rows describe
    /// one device).
    pub fn add(&mut self, row: &ReportRow) -> Result<(), String> {
        let Some(device) = key(row.device_id) else {
            return Err(format!("row {} has no device id", self.rows + 1));
        };
        if self.devices.len() >= 2 * MAX_DEVICES {
            return Err(format!("more than {} rows in one report", 2 * MAX_DEVICES));
        }
        if let Some(aad) = key(row.aad_device_id) {
            self.aads.push((device, aad));
        }
        self.devices.push(Device {
            id: halves(device),
            user: halves(key(row.user_id).unwrap_or(0)),
            last_contact: row.last_contact.map_or(i64::MIN, Timestamp::as_millis),
            grace_end: i64::MIN,
            // At most 2 × MAX_DEVICES rows: within u32.
            seq: self.rows as u32,
            status: row.status,
            shared: false,
        });
        self.rows += 1;
        Ok(())
    }

    /// Sorts the rows by device (a device's first row first) and merges each device's rows
    /// into one.
    pub fn finish(&mut self) -> Result<(), String> {
        // Unstable, with the row number in the key: as a stable sort orders, without its
        // buffer of half the rows.
        self.devices.sort_unstable_by_key(|d| (d.id, d.seq));
        let more_users = &mut self.more_users;
        // In place: `seen` is the device's first row, `row` a later one, merged into it.
        self.devices.dedup_by(|row, seen| {
            if row.id != seen.id {
                return false;
            }
            seen.status = seen.status.max(row.status);
            seen.last_contact = seen.last_contact.max(row.last_contact);
            if let Some(user) = row.user() {
                match seen.user() {
                    None => seen.user = row.user,
                    Some(known) if known == user => {}
                    Some(_) => {
                        seen.shared = true;
                        let more = more_users.entry(seen.id()).or_default();
                        if !more.contains(&user) && more.len() < 64 {
                            more.push(user);
                        }
                    }
                }
            }
            true
        });
        self.aads.sort_unstable();
        self.aads.dedup_by_key(|(device, _)| *device);
        if self.devices.len() > MAX_DEVICES {
            return Err(format!("more than {MAX_DEVICES} devices in one report"));
        }
        Ok(())
    }

    /// Empty, with room for `rows` (at most twice [`MAX_DEVICES`]).
    pub fn with_capacity(rows: usize) -> Devices {
        Devices {
            devices: Vec::with_capacity(rows.min(2 * MAX_DEVICES)),
            ..Devices::default()
        }
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// How many of its devices are in their grace period.
    pub fn in_grace(&self) -> usize {
        self.devices
            .iter()
            .filter(|d| d.status == ReportStatus::InGrace)
            .count()
    }

    /// Records when `device`'s grace ends, if it is one of these devices and in grace; whether
    /// it was (after [`Devices::finish`]).
    pub fn set_grace_end(&mut self, device: Key, end: Timestamp) -> bool {
        let id = halves(device);
        match self.devices.binary_search_by_key(&id, |d| d.id) {
            Ok(i) if self.devices[i].status == ReportStatus::InGrace => {
                self.devices[i].grace_end = end.as_millis();
                true
            }
            _ => false,
        }
    }

    /// The Entra device id of `device`, when the report gave it (after [`Devices::finish`]).
    pub fn aad(&self, device: &Device) -> Option<Key> {
        if self.aads.is_empty() {
            return None;
        }
        let id = device.id();
        self.aads
            .binary_search_by_key(&id, |(d, _)| *d)
            .ok()
            .map(|i| self.aads[i].1)
    }

    /// Each device with its users (none for a userless device), after [`Devices::finish`].
    pub fn iter(&self) -> impl Iterator<Item = (&Device, impl Iterator<Item = Key> + '_)> {
        self.devices.iter().map(|d| {
            let more = if d.shared {
                self.more_users.get(&d.id()).map_or(&[][..], Vec::as_slice)
            } else {
                &[][..]
            };
            (d, d.user().into_iter().chain(more.iter().copied()))
        })
    }
}

/// What a device's report means now, under Intune's rules: its state and the time that state
/// holds from (`None`: targeted, never reported), or `None` when the policy does not apply.
pub fn judge(
    device: &Device,
    now: Timestamp,
    validity: Option<Duration>,
) -> Option<(DeviceState, Option<Timestamp>)> {
    let state = match device.status {
        ReportStatus::NotApplicable => return None,
        ReportStatus::Unknown => return Some((DeviceState::Unknown, None)),
        ReportStatus::Compliant => DeviceState::Compliant,
        ReportStatus::InGrace => DeviceState::InGrace,
        ReportStatus::Noncompliant => DeviceState::Noncompliant,
        ReportStatus::Error => DeviceState::Error,
        ReportStatus::Conflict => DeviceState::Conflict,
    };
    let Some(last) = device.last_contact() else {
        return Some((DeviceState::Unknown, None));
    };
    if let Some(validity) = validity
        && last < now.minus(validity)
    {
        // Not checked in within the validity period: Intune marks it noncompliant, a verdict
        // that holds as of now.
        return Some((DeviceState::Noncompliant, Some(now)));
    }
    Some((state, Some(last)))
}

/// The devices of one phase: each device once, in the phase when one of its users is
/// (`in_scope`) or a device group of the phase holds it; userless devices that no device group
/// places counted apart.
pub struct Attributed<T> {
    pub reports: Vec<T>,
    pub userless: u64,
}

/// What the phase's device groups say of a device: a device group it includes holds it
/// (`Some(true)`), one it excludes does (`Some(false)`, whatever its users), or none of them
/// (`None`: its users decide).
pub type DevicePlacement = Option<bool>;

/// How a device was placed in a phase: the user in scope it was placed by (`None` when a
/// device group placed it and none of its users is in scope), and its Entra device id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placed {
    pub user: Option<Key>,
    pub aad: Option<Key>,
}

/// Attributes every judged device to a phase by its device groups (`by_device`, from its Entra
/// device id) and its users (`in_scope`), mapping each one in scope through `report` (its device,
/// its state and time, how it was placed).
pub fn attribute<T>(
    devices: &Devices,
    now: Timestamp,
    validity: Option<Duration>,
    in_scope: impl Fn(Key) -> bool,
    by_device: impl Fn(Key) -> DevicePlacement,
    mut report: impl FnMut(&Device, DeviceState, Option<Timestamp>, Placed) -> T,
) -> Attributed<T> {
    // Room for every device up front: most are in a phase as large as the report.
    let mut reports = Vec::with_capacity(devices.len());
    let mut userless = 0;
    for (device, mut users) in devices.iter() {
        let Some((state, at)) = judge(device, now, validity) else {
            continue;
        };
        let aad = devices.aad(device);
        let placed = aad.and_then(&by_device);
        if placed == Some(false) {
            continue;
        }
        let user = users.find(|u| in_scope(*u));
        if placed == Some(true) || user.is_some() {
            reports.push(report(device, state, at, Placed { user, aad }));
        } else if device.user().is_none() {
            userless += 1;
        }
    }
    reports.shrink_to_fit();
    Attributed { reports, userless }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn row<'a>(device: &'a str, user: &'a str, status: &str, days_ago: u64) -> ReportRow<'a> {
        ReportRow {
            device_id: device,
            aad_device_id: "",
            user_id: user,
            status: ReportStatus::parse(status),
            last_contact: Some(now().minus(DAY * days_ago as u32)),
        }
    }

    fn now() -> Timestamp {
        Timestamp::from_millis(1_800_000_000_000)
    }

    const D1: &str = "00000000-0000-4000-a000-000000000001";
    const D2: &str = "00000000-0000-4000-a000-000000000002";
    const D3: &str = "00000000-0000-4000-a000-000000000003";
    const ALICE: &str = "10000000-0000-4000-a000-000000000001";
    const BOB: &str = "10000000-0000-4000-a000-000000000002";

    #[test]
    fn a_shared_device_counts_once_and_a_userless_one_apart() {
        let mut devices = Devices::default();
        for r in [
            row(D1, ALICE, "2", 0),
            row(D1, BOB, "4", 0),
            row(D2, "", "4", 1),
            row(D3, BOB, "2", 1),
        ] {
            devices.add(&r).unwrap();
        }
        devices.finish().unwrap();
        assert_eq!((devices.len(), devices.rows()), (3, 4));
        let bob = key(BOB).unwrap();
        // Each device with all its users, the shared one with both.
        let users: Vec<(Key, Vec<Key>)> = devices
            .iter()
            .map(|(d, users)| (d.id(), users.collect()))
            .collect();
        let (d1, d2, d3) = (key(D1).unwrap(), key(D2).unwrap(), key(D3).unwrap());
        assert!(users.contains(&(d1, vec![key(ALICE).unwrap(), bob])));
        assert!(users.contains(&(d2, vec![])) && users.contains(&(d3, vec![bob])));
        let phase = attribute(
            &devices,
            now(),
            Some(30 * DAY),
            |u| u == bob,
            |_| None,
            |_, s, _, _| s,
        );
        // D1 once (through Bob, its second user), with the worse of its rows; D3; D2 apart.
        let mut states = phase.reports.clone();
        states.sort_by_key(|s| *s as u8);
        assert_eq!(
            states,
            vec![DeviceState::Compliant, DeviceState::Noncompliant]
        );
        assert_eq!(phase.userless, 1);
        let nobody = attribute(&devices, now(), None, |_| false, |_| None, |_, s, _, _| s);
        assert!(nobody.reports.is_empty());
        assert_eq!(nobody.userless, 1);
    }

    #[test]
    fn device_groups_place_devices_whatever_their_users() {
        const AAD1: &str = "20000000-0000-4000-a000-000000000001";
        const AAD2: &str = "20000000-0000-4000-a000-000000000002";
        const AAD3: &str = "20000000-0000-4000-a000-000000000003";
        let mut devices = Devices::default();
        for (device, aad, user) in [(D1, AAD1, ALICE), (D2, AAD2, ""), (D3, AAD3, BOB)] {
            devices
                .add(&ReportRow {
                    aad_device_id: aad,
                    ..row(device, user, "4", 0)
                })
                .unwrap();
        }
        // A device's second row without its Entra id keeps the first's.
        devices.add(&row(D2, "", "2", 0)).unwrap();
        devices.finish().unwrap();
        let (alice, bob) = (key(ALICE).unwrap(), key(BOB).unwrap());
        let (aad1, aad2, aad3) = (key(AAD1).unwrap(), key(AAD2).unwrap(), key(AAD3).unwrap());
        // The group holds D2 (userless) and D3 (Bob's) and excludes D1 (Alice's).
        let group = |aad: Key| match aad {
            a if a == aad2 || a == aad3 => Some(true),
            a if a == aad1 => Some(false),
            _ => None,
        };
        let phase = attribute(
            &devices,
            now(),
            None,
            |u| u == alice,
            group,
            |_, _, _, p| p.user,
        );
        assert_eq!(phase.reports, vec![None, None]);
        assert_eq!(phase.userless, 0);
        let bobs = attribute(
            &devices,
            now(),
            None,
            |u| u == bob,
            group,
            |_, _, _, p| p.user,
        );
        assert!(bobs.reports.contains(&Some(bob)));
        assert_eq!(bobs.reports.len(), 2);
        // Without device groups the userless device is counted apart.
        let users_only = attribute(
            &devices,
            now(),
            None,
            |_| true,
            |_| None,
            |_, _, _, p| p.user,
        );
        assert_eq!((users_only.reports.len(), users_only.userless), (2, 1));
    }

    #[test]
    fn a_device_silent_past_the_validity_period_is_noncompliant_as_of_now() {
        let device = |status: &str, days_ago| {
            let mut devices = Devices::default();
            devices.add(&row(D1, ALICE, status, days_ago)).unwrap();
            devices.finish().unwrap();
            *devices.iter().next().unwrap().0
        };
        let validity = Some(30 * DAY);
        assert_eq!(
            judge(&device("2", 31), now(), validity),
            Some((DeviceState::Noncompliant, Some(now())))
        );
        let recent = device("2", 29);
        assert_eq!(
            judge(&recent, now(), validity),
            Some((DeviceState::Compliant, recent.last_contact()))
        );
        assert_eq!(judge(&device("7", 0), now(), validity), None);
        assert_eq!(
            judge(&device("1", 0), now(), validity),
            Some((DeviceState::Unknown, None))
        );
        // Without a known validity period, only the report's status counts.
        assert_eq!(
            judge(&device("2", 31), now(), None).unwrap().0,
            DeviceState::Compliant
        );
    }

    #[test]
    fn statuses_read_as_numbers_names_or_localized_words() {
        for (text, status) in [
            ("4", ReportStatus::Noncompliant),
            ("Not compliant", ReportStatus::Noncompliant),
            ("nonCompliant", ReportStatus::Noncompliant),
            ("In grace period", ReportStatus::InGrace),
            ("7", ReportStatus::NotApplicable),
            ("something new", ReportStatus::Unknown),
        ] {
            assert_eq!(ReportStatus::parse(text), status, "{text}");
        }
    }

    #[test]
    fn only_a_device_in_grace_keeps_the_end_of_its_grace() {
        let mut devices = Devices::default();
        for r in [row(D1, ALICE, "3", 0), row(D2, BOB, "4", 0)] {
            devices.add(&r).unwrap();
        }
        devices.finish().unwrap();
        assert_eq!(devices.in_grace(), 1);
        let end = now().plus(DAY * 2);
        assert!(devices.set_grace_end(key(D1).unwrap(), end));
        assert!(!devices.set_grace_end(key(D2).unwrap(), end));
        assert!(!devices.set_grace_end(key(D3).unwrap(), end));
        let mut ends: Vec<_> = devices.iter().map(|(d, _)| d.grace_until()).collect();
        ends.sort();
        assert_eq!(ends, vec![None, Some(end)]);
    }

    #[test]
    fn ids_are_keys_whatever_their_form() {
        assert_eq!(key(""), None);
        assert_eq!(key(D1), key(&D1.to_uppercase()));
        assert_ne!(key(D1), key(D2));
        assert_ne!(key("kiosk-1"), key("kiosk-2"));
        assert!(key("ffffffffffffffffffffffffffffffffff").is_some());
        // The table read of a canonical GUID and the digit-by-digit read (here of the same id
        // with spaces around it) agree; a canonical shape with a non-hex digit is hashed.
        for id in [D1, D2, ALICE, "0B697222-e002-46c0-9b5c-830e08ef2164"] {
            assert_eq!(key(id), key(&format!(" {id} ")), "{id}");
            assert!(key(id).unwrap() >> 127 == 0 || id.starts_with(['8', '9', 'a', 'b']));
        }
        assert_eq!(
            key("0g000000-0000-4000-a000-000000000001").map(|k| k >> 127),
            Some(1)
        );
    }
}
