//! Freeze windows (`[[freeze]]`): times in which no phase is promoted — a weekly window (Friday
//! 12:00 to Monday 06:00), one span of dates and times, or a list of whole days (holidays) — each
//! in an explicit IANA time zone. Rollback and abort are never frozen.
//!
//! Local times are turned into instants with the IANA time zone database compiled into the
//! program (`jiff`, bundled: nothing is read from the machine, so a plan means the same
//! everywhere). A window's start or end that falls into a daylight-saving gap or fold is taken the
//! way that makes the window longest: a start at its earlier reading, an end at its later one.

use std::collections::BTreeSet;
use std::fmt;

use jiff::civil::{Date, DateTime, Time, Weekday};
use jiff::tz::TimeZone;
use toml::Spanned;

use super::Checker;
use super::approval::ApproverGroups;
use super::raw::RawFreeze;
use crate::domain::time::Timestamp;

/// Freeze windows in one plan, and dates in one window.
pub const MAX_FREEZES: usize = 50;
pub const MAX_FREEZE_DATES: usize = 400;
/// Back-to-back windows followed to find when a freeze ends.
const MAX_CHAIN: usize = 64;

/// When a freeze recurs or lies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FreezeTimes {
    /// Every week from one weekday and time to another (possibly across the week's end).
    Weekly {
        from: (Weekday, Time),
        to: (Weekday, Time),
    },
    /// Once, from one local date and time to another.
    Span { from: DateTime, to: DateTime },
    /// Whole days, each from its midnight to the next.
    Dates(BTreeSet<Date>),
}

/// One `[[freeze]]` window.
#[derive(Clone, Debug, PartialEq)]
pub struct FreezeWindow {
    pub name: String,
    /// The IANA name, as written (`Europe/Berlin`).
    pub time_zone_name: String,
    pub time_zone: TimeZone,
    pub times: FreezeTimes,
    /// People who may let promotions through this window (`override_by`, and the members of
    /// `override_groups`), as identity keys; empty: nobody may.
    pub override_by: BTreeSet<String>,
    /// The people and groups as written, for display.
    pub override_who: Vec<String>,
}

/// A freeze in force at an instant: which window, and when promotions may go on again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frozen {
    pub window: String,
    /// The end of the window (and of any window that follows it without a gap).
    pub until: Timestamp,
}

fn weekday_name(day: Weekday) -> &'static str {
    match day {
        Weekday::Monday => "Mon",
        Weekday::Tuesday => "Tue",
        Weekday::Wednesday => "Wed",
        Weekday::Thursday => "Thu",
        Weekday::Friday => "Fri",
        Weekday::Saturday => "Sat",
        Weekday::Sunday => "Sun",
    }
}

impl fmt::Display for FreezeWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let day = weekday_name;
        let hm = |t: Time| format!("{:02}:{:02}", t.hour(), t.minute());
        match &self.times {
            FreezeTimes::Weekly { from, to } => write!(
                f,
                "{}: every {} {} to {} {} ({})",
                self.name,
                day(from.0),
                hm(from.1),
                day(to.0),
                hm(to.1),
                self.time_zone_name
            ),
            FreezeTimes::Span { from, to } => write!(
                f,
                "{}: {} {} to {} {} ({})",
                self.name,
                from.date(),
                hm(from.time()),
                to.date(),
                hm(to.time()),
                self.time_zone_name
            ),
            FreezeTimes::Dates(dates) => {
                let list: Vec<String> = dates.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "{}: {} ({})",
                    self.name,
                    list.join(", "),
                    self.time_zone_name
                )
            }
        }
    }
}

fn to_jiff(at: Timestamp) -> Option<jiff::Timestamp> {
    jiff::Timestamp::from_millisecond(at.as_millis()).ok()
}

fn from_jiff(at: jiff::Timestamp) -> Timestamp {
    Timestamp::from_millis(at.as_millisecond())
}

impl FreezeWindow {
    /// `at` on the window's own clock: `Mon 2026-01-12 06:00 Europe/Berlin`.
    pub fn local(&self, at: Timestamp) -> String {
        let Some(instant) = to_jiff(at) else {
            return String::new();
        };
        let local = self.time_zone.to_datetime(instant);
        format!(
            "{} {} {:02}:{:02} {}",
            weekday_name(local.weekday()),
            local.date(),
            local.hour(),
            local.minute(),
            self.time_zone_name
        )
    }

    /// A local time as the earliest instant it can mean (a window's start).
    fn earliest(&self, local: DateTime) -> Option<Timestamp> {
        let ambiguous = self.time_zone.to_ambiguous_timestamp(local);
        let (a, b) = (ambiguous.earlier().ok()?, ambiguous.later().ok()?);
        Some(from_jiff(a.min(b)))
    }

    /// A local time as the latest instant it can mean (a window's end).
    fn latest(&self, local: DateTime) -> Option<Timestamp> {
        let ambiguous = self.time_zone.to_ambiguous_timestamp(local);
        let (a, b) = (ambiguous.earlier().ok()?, ambiguous.later().ok()?);
        Some(from_jiff(a.max(b)))
    }

    /// The occurrence of the window that contains `at`, as `[start, end)`.
    pub fn occurrence(&self, at: Timestamp) -> Option<(Timestamp, Timestamp)> {
        let local = self.time_zone.to_datetime(to_jiff(at)?);
        let within = |start: Option<Timestamp>, end: Option<Timestamp>| match (start, end) {
            (Some(start), Some(end)) if start <= at && at < end => Some((start, end)),
            _ => None,
        };
        match &self.times {
            FreezeTimes::Span { from, to } => within(self.earliest(*from), self.latest(*to)),
            FreezeTimes::Dates(dates) => {
                // A day's window may begin before its local midnight reads so (a fold), so the
                // day before is looked at too.
                let today = local.date();
                [today.yesterday().ok(), Some(today)]
                    .into_iter()
                    .flatten()
                    .filter(|day| dates.contains(day))
                    .find_map(|day| {
                        let next = day.tomorrow().ok()?;
                        within(
                            self.earliest(day.to_datetime(Time::midnight())),
                            self.latest(next.to_datetime(Time::midnight())),
                        )
                    })
            }
            FreezeTimes::Weekly { from, to } => {
                let mut day = local.date().tomorrow().ok()?;
                let offset =
                    (to.0.to_monday_zero_offset() - from.0.to_monday_zero_offset()).rem_euclid(7);
                let days = if offset == 0 && to.1 <= from.1 {
                    7
                } else {
                    offset
                };
                // The starts from tomorrow back to a week ago: the latest one not after `at`
                // is the only one whose window can hold it (a window is shorter than a week).
                for _ in 0..=8 {
                    if day.weekday() == from.0 {
                        let start = self.earliest(day.to_datetime(from.1));
                        if start.is_some_and(|s| s <= at) {
                            let mut end_day = day;
                            for _ in 0..days {
                                end_day = end_day.tomorrow().ok()?;
                            }
                            return within(start, self.latest(end_day.to_datetime(to.1)));
                        }
                    }
                    day = day.yesterday().ok()?;
                }
                None
            }
        }
    }
}

/// The freeze in force at `at`, if any: the first window (in plan order) that holds it, and the
/// end of the freeze — the window's end, or later when another window holds that instant too.
pub fn frozen_at(windows: &[FreezeWindow], at: Timestamp) -> Option<Frozen> {
    let (first, mut until) = windows
        .iter()
        .find_map(|w| w.occurrence(at).map(|(_, end)| (w, end)))?;
    for _ in 0..MAX_CHAIN {
        match windows.iter().find_map(|w| w.occurrence(until)) {
            Some((_, end)) if end > until => until = end,
            _ => break,
        }
    }
    Some(Frozen {
        window: first.name.clone(),
        until,
    })
}

/// `mon`/`monday` (any case) as a weekday.
fn weekday(text: &str) -> Option<Weekday> {
    let text = text.to_ascii_lowercase();
    let day = match text.get(..3)? {
        "mon" => Weekday::Monday,
        "tue" => Weekday::Tuesday,
        "wed" => Weekday::Wednesday,
        "thu" => Weekday::Thursday,
        "fri" => Weekday::Friday,
        "sat" => Weekday::Saturday,
        "sun" => Weekday::Sunday,
        _ => return None,
    };
    let full = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    (text.len() == 3 || full.contains(&text.as_str())).then_some(day)
}

/// `HH:MM` as a time of day.
fn time_of_day(text: &str) -> Option<Time> {
    let (h, m) = text.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (i8, i8) = (h.parse().ok()?, m.parse().ok()?);
    Time::new(h, m, 0, 0).ok()
}

/// `fri 12:00` as a weekday and time.
fn weekly_point(text: &str) -> Option<(Weekday, Time)> {
    let mut words = text.split_whitespace();
    let (day, time) = (words.next()?, words.next()?);
    if words.next().is_some() {
        return None;
    }
    Some((weekday(day)?, time_of_day(time)?))
}

/// `2026-12-24 18:00` (or with `T`) as a local date and time.
fn local_date_time(text: &str) -> Option<DateTime> {
    let (date, time) = text.trim().split_once([' ', 'T'])?;
    Some(local_date(date)?.to_datetime(time_of_day(time.trim())?))
}

fn local_date(text: &str) -> Option<Date> {
    let text = text.trim();
    if text.len() != 10 {
        return None;
    }
    text.parse::<Date>().ok()
}

impl Checker<'_> {
    /// `[[freeze]]`: every window, or `None` after reporting what is wrong.
    pub(super) fn freezes(
        &mut self,
        raw: &[Spanned<RawFreeze>],
        groups: &ApproverGroups,
    ) -> Option<Vec<FreezeWindow>> {
        if raw.len() > MAX_FREEZES {
            self.error(
                raw[MAX_FREEZES].span(),
                format!("a plan has at most {MAX_FREEZES} `[[freeze]]` windows"),
            );
            return None;
        }
        let mut names = BTreeSet::new();
        let mut windows = Some(Vec::new());
        for table in raw {
            let window = self.freeze(table, groups);
            if let Some(w) = &window
                && !names.insert(w.name.clone())
            {
                self.error(
                    table.get_ref().name.span(),
                    format!("two freeze windows are named `{}`", w.name),
                );
                windows = None;
            }
            match (window, windows.as_mut()) {
                (Some(w), Some(all)) => all.push(w),
                _ => windows = None,
            }
        }
        windows
    }

    fn freeze(
        &mut self,
        table: &Spanned<RawFreeze>,
        groups: &ApproverGroups,
    ) -> Option<FreezeWindow> {
        let raw = table.get_ref();
        let name = raw.name.get_ref().trim().to_string();
        let mut ok = true;
        if !super::valid_phase_id(&name) || name.len() > 64 {
            self.error(
                raw.name.span(),
                format!(
                    "invalid freeze name `{name}`: expected 1 to 64 letters, digits, `-` or `_`"
                ),
            );
            ok = false;
        }
        let time_zone = match &raw.time_zone {
            None => {
                self.error(
                    table.span(),
                    format!(
                        "freeze `{name}` needs an explicit `time_zone`, an IANA name such as \"Europe/Berlin\""
                    ),
                );
                None
            }
            Some(tz) => match TimeZone::get(tz.get_ref().trim()) {
                Ok(zone) => Some((tz.get_ref().trim().to_string(), zone)),
                Err(_) => {
                    self.error(
                        tz.span(),
                        format!(
                            "unknown time zone `{}`: expected an IANA name such as \"Europe/Berlin\" or \"America/New_York\"",
                            tz.get_ref()
                        ),
                    );
                    None
                }
            },
        };
        let kinds = [
            raw.weekly.is_some(),
            raw.from.is_some() || raw.to.is_some(),
            raw.dates.is_some(),
        ];
        let times = match kinds.iter().filter(|k| **k).count() {
            1 => self.freeze_times(raw, &name),
            _ => {
                self.error(
                    table.span(),
                    format!(
                        "freeze `{name}` needs exactly one of `weekly = {{ from = \"fri 12:00\", to = \"mon 06:00\" }}`, `from` and `to` (\"2026-12-24 00:00\"), or `dates = [\"2026-12-25\"]`"
                    ),
                );
                None
            }
        };
        let mut override_by = BTreeSet::new();
        let mut override_who = Vec::new();
        if let Some(people) = &raw.override_by {
            match self.people(people, "`override_by`") {
                Some(people) => {
                    override_who.extend(people.iter().cloned());
                    override_by.extend(people);
                }
                None => ok = false,
            }
        }
        for group in raw.override_groups.iter().flat_map(|g| g.get_ref()) {
            match groups.get(group.get_ref()) {
                Some(members) => {
                    override_who.push(format!("group {}", group.get_ref()));
                    override_by.extend(members.iter().cloned());
                }
                None => {
                    self.error(
                        group.span(),
                        format!(
                            "unknown approver group `{}`: define it in `[approvers]`",
                            group.get_ref()
                        ),
                    );
                    ok = false;
                }
            }
        }
        let (time_zone_name, time_zone) = time_zone?;
        let times = times?;
        ok.then_some(FreezeWindow {
            name,
            time_zone_name,
            time_zone,
            times,
            override_by,
            override_who,
        })
    }

    fn freeze_times(&mut self, raw: &RawFreeze, name: &str) -> Option<FreezeTimes> {
        if let Some(weekly) = &raw.weekly {
            let weekly = weekly.get_ref();
            let mut point = |value: &Spanned<String>| {
                let parsed = weekly_point(value.get_ref());
                if parsed.is_none() {
                    self.error(
                        value.span(),
                        format!(
                            "invalid weekly time `{}`: expected a weekday and a 24-hour time such as \"fri 12:00\"",
                            value.get_ref()
                        ),
                    );
                }
                parsed
            };
            let (from, to) = (point(&weekly.from), point(&weekly.to));
            let (from, to) = (from?, to?);
            if from == to {
                self.error(
                    weekly.to.span(),
                    format!("freeze `{name}` would last the whole week: `from` and `to` are equal"),
                );
                return None;
            }
            return Some(FreezeTimes::Weekly { from, to });
        }
        if let Some(dates) = &raw.dates {
            if dates.get_ref().is_empty() || dates.get_ref().len() > MAX_FREEZE_DATES {
                self.error(
                    dates.span(),
                    format!("`dates` lists 1 to {MAX_FREEZE_DATES} days"),
                );
                return None;
            }
            let mut all = BTreeSet::new();
            let mut ok = true;
            for date in dates.get_ref() {
                match local_date(date.get_ref()) {
                    Some(d) => {
                        all.insert(d);
                    }
                    None => {
                        self.error(
                            date.span(),
                            format!(
                                "invalid date `{}`: expected YYYY-MM-DD, such as \"2026-12-25\"",
                                date.get_ref()
                            ),
                        );
                        ok = false;
                    }
                }
            }
            return ok.then_some(FreezeTimes::Dates(all));
        }
        let (Some(from), Some(to)) = (&raw.from, &raw.to) else {
            let span = raw.from.as_ref().or(raw.to.as_ref()).map(Spanned::span);
            self.error(
                span.unwrap_or(raw.name.span()),
                format!("freeze `{name}` needs both `from` and `to`"),
            );
            return None;
        };
        let mut moment = |value: &Spanned<String>| {
            let parsed = local_date_time(value.get_ref());
            if parsed.is_none() {
                self.error(
                    value.span(),
                    format!(
                        "invalid date and time `{}`: expected \"YYYY-MM-DD HH:MM\", such as \"2026-12-24 18:00\"",
                        value.get_ref()
                    ),
                );
            }
            parsed
        };
        let (from_at, to_at) = (moment(from), moment(to));
        let (from_at, to_at) = (from_at?, to_at?);
        if to_at <= from_at {
            self.error(to.span(), format!("freeze `{name}` ends before it starts"));
            return None;
        }
        Some(FreezeTimes::Span {
            from: from_at,
            to: to_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        Timestamp::parse_rfc3339(text).unwrap()
    }

    fn window(times: FreezeTimes, zone: &str) -> FreezeWindow {
        FreezeWindow {
            name: "w".into(),
            time_zone_name: zone.into(),
            time_zone: TimeZone::get(zone).unwrap(),
            times,
            override_by: BTreeSet::new(),
            override_who: Vec::new(),
        }
    }

    fn weekend() -> FreezeWindow {
        window(
            FreezeTimes::Weekly {
                from: weekly_point("fri 12:00").unwrap(),
                to: weekly_point("mon 06:00").unwrap(),
            },
            "Europe/Berlin",
        )
    }

    fn until(w: &FreezeWindow, t: &str) -> Option<String> {
        frozen_at(std::slice::from_ref(w), at(t)).map(|f| f.until.rfc3339())
    }

    #[test]
    fn a_weekend_window_holds_from_friday_noon_to_monday_morning_local_time() {
        let w = weekend();
        // January: Berlin is UTC+1.
        assert_eq!(until(&w, "2026-01-09T10:59:59Z"), None);
        assert_eq!(
            until(&w, "2026-01-09T11:00:00Z").as_deref(),
            Some("2026-01-12T05:00:00Z")
        );
        assert_eq!(
            until(&w, "2026-01-10T08:00:00Z").as_deref(),
            Some("2026-01-12T05:00:00Z")
        );
        assert_eq!(
            until(&w, "2026-01-12T04:59:59Z").as_deref(),
            Some("2026-01-12T05:00:00Z")
        );
        assert_eq!(until(&w, "2026-01-12T05:00:00Z"), None);
        assert_eq!(until(&w, "2026-01-14T12:00:00Z"), None);
        // July: UTC+2.
        assert_eq!(
            until(&w, "2026-07-11T12:00:00Z").as_deref(),
            Some("2026-07-13T04:00:00Z")
        );
        assert_eq!(until(&w, "2026-07-10T09:59:00Z"), None);
    }

    #[test]
    fn a_weekly_window_across_the_spring_forward_weekend_is_an_hour_shorter_in_utc() {
        // 2026-03-29 02:00 CET → 03:00 CEST: Friday noon is UTC+1, Monday morning UTC+2.
        let w = weekend();
        assert_eq!(
            until(&w, "2026-03-27T11:00:00Z").as_deref(),
            Some("2026-03-30T04:00:00Z")
        );
        assert_eq!(until(&w, "2026-03-27T10:59:00Z"), None);
    }

    #[test]
    fn a_weekly_window_across_the_fall_back_weekend() {
        // 2026-10-25 03:00 CEST → 02:00 CET: Friday noon is UTC+2, Monday morning UTC+1.
        let w = weekend();
        assert_eq!(
            until(&w, "2026-10-23T10:00:00Z").as_deref(),
            Some("2026-10-26T05:00:00Z")
        );
        assert_eq!(until(&w, "2026-10-23T09:59:00Z"), None);
    }

    #[test]
    fn an_end_in_a_fold_is_its_later_reading_and_a_start_in_a_gap_its_earlier() {
        // Sunday 02:30 happens twice on 2026-10-25 in Berlin (00:30Z and 01:30Z): the window
        // lasts to the later one.
        let fold = window(
            FreezeTimes::Weekly {
                from: weekly_point("sat 20:00").unwrap(),
                to: weekly_point("sun 02:30").unwrap(),
            },
            "Europe/Berlin",
        );
        assert_eq!(
            until(&fold, "2026-10-25T00:45:00Z").as_deref(),
            Some("2026-10-25T01:30:00Z")
        );
        assert_eq!(until(&fold, "2026-10-25T01:30:00Z"), None);
        // Sunday 02:30 does not exist on 2026-03-29: a window starting then starts at the
        // earlier reading (00:30Z, as if the clocks had not moved yet).
        let gap = window(
            FreezeTimes::Weekly {
                from: weekly_point("sun 02:30").unwrap(),
                to: weekly_point("sun 05:00").unwrap(),
            },
            "Europe/Berlin",
        );
        assert_eq!(until(&gap, "2026-03-29T00:29:00Z"), None);
        assert_eq!(
            until(&gap, "2026-03-29T00:30:00Z").as_deref(),
            Some("2026-03-29T03:00:00Z")
        );
    }

    #[test]
    fn a_window_within_one_day_and_one_ending_the_same_weekday_next_week() {
        let lunch = window(
            FreezeTimes::Weekly {
                from: weekly_point("wed 12:00").unwrap(),
                to: weekly_point("wed 13:00").unwrap(),
            },
            "UTC",
        );
        assert_eq!(
            until(&lunch, "2026-01-07T12:30:00Z").as_deref(),
            Some("2026-01-07T13:00:00Z")
        );
        assert_eq!(until(&lunch, "2026-01-07T13:00:00Z"), None);
        assert_eq!(until(&lunch, "2026-01-08T12:30:00Z"), None);
        let long = window(
            FreezeTimes::Weekly {
                from: weekly_point("wed 12:00").unwrap(),
                to: weekly_point("wed 11:00").unwrap(),
            },
            "UTC",
        );
        assert_eq!(
            until(&long, "2026-01-13T09:00:00Z").as_deref(),
            Some("2026-01-14T11:00:00Z")
        );
        assert_eq!(until(&long, "2026-01-14T11:30:00Z"), None);
    }

    #[test]
    fn holidays_are_whole_local_days_and_back_to_back_days_chain() {
        let days: BTreeSet<Date> = ["2026-12-24", "2026-12-25", "2026-12-26"]
            .iter()
            .map(|d| local_date(d).unwrap())
            .collect();
        let w = window(FreezeTimes::Dates(days), "America/New_York");
        // New York is UTC-5 in December.
        assert_eq!(until(&w, "2026-12-24T04:59:00Z"), None);
        assert_eq!(
            until(&w, "2026-12-24T05:00:00Z").as_deref(),
            Some("2026-12-27T05:00:00Z")
        );
        assert_eq!(until(&w, "2026-12-27T05:00:00Z"), None);
    }

    #[test]
    fn a_holiday_on_the_day_clocks_change_is_23_or_25_hours_long() {
        let w = window(
            FreezeTimes::Dates([local_date("2026-03-29").unwrap()].into()),
            "Europe/Berlin",
        );
        assert_eq!(
            until(&w, "2026-03-28T23:00:00Z").as_deref(),
            Some("2026-03-29T22:00:00Z")
        );
        let w = window(
            FreezeTimes::Dates([local_date("2026-10-25").unwrap()].into()),
            "Europe/Berlin",
        );
        assert_eq!(
            until(&w, "2026-10-24T22:00:00Z").as_deref(),
            Some("2026-10-25T23:00:00Z")
        );
        assert_eq!(until(&w, "2026-10-24T21:59:00Z"), None);
    }

    #[test]
    fn a_span_and_overlapping_windows_end_at_the_last_end() {
        let span = FreezeWindow {
            name: "year-end".into(),
            ..window(
                FreezeTimes::Span {
                    from: local_date_time("2026-12-23 18:00").unwrap(),
                    to: local_date_time("2027-01-04 06:00").unwrap(),
                },
                "Europe/Berlin",
            )
        };
        assert_eq!(until(&span, "2026-12-23T16:59:00Z"), None);
        assert_eq!(
            until(&span, "2026-12-23T17:00:00Z").as_deref(),
            Some("2027-01-04T05:00:00Z")
        );
        // Before the span a weekend ends on its own; inside the span a weekend's end is the
        // span's too, so the freeze ends once, on Monday 06:00.
        let both = [weekend(), span];
        let frozen = frozen_at(&both, at("2026-12-18T12:00:00Z")).unwrap();
        assert_eq!(frozen.until.rfc3339(), "2026-12-21T05:00:00Z");
        let frozen = frozen_at(&both, at("2027-01-02T12:00:00Z")).unwrap();
        assert_eq!(frozen.window, "w");
        assert_eq!(frozen.until.rfc3339(), "2027-01-04T05:00:00Z");
    }

    #[test]
    fn instants_beyond_the_calendar_are_never_frozen_and_never_panic() {
        let w = weekend();
        for t in [i64::MIN, i64::MAX, -1, 0] {
            let _ = frozen_at(std::slice::from_ref(&w), Timestamp::from_millis(t));
        }
        assert!(frozen_at(std::slice::from_ref(&w), Timestamp::from_millis(i64::MAX)).is_none());
    }

    #[test]
    fn weekly_points_and_dates_are_read_strictly() {
        assert_eq!(
            weekly_point("Friday 12:00"),
            Some((Weekday::Friday, Time::new(12, 0, 0, 0).unwrap()))
        );
        assert_eq!(
            weekly_point("MON 06:30"),
            Some((Weekday::Monday, Time::new(6, 30, 0, 0).unwrap()))
        );
        for bad in [
            "fri",
            "fri 12",
            "fri 24:00",
            "fri 12:60",
            "frid 12:00",
            "fri 1:00",
            "fri 12:00 x",
            "",
        ] {
            assert_eq!(weekly_point(bad), None, "{bad}");
        }
        assert!(local_date("2026-02-29").is_none());
        assert!(local_date("2028-02-29").is_some());
        assert!(local_date_time("2026-12-24T18:00").is_some());
        assert!(local_date_time("2026-12-24 18").is_none());
    }
}
