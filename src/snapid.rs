//! Snapshot ids: UTC times in ISO 8601 basic form, `20261122T123005Z`.
//!
//! Design:
//! - An id *is* a time (UTC unix seconds), so ordering, `keep_within` arithmetic and "newer
//!   than" need no parsing, and the directory name is derived from it, never stored beside it.
//! - The text form is the ISO 8601 *basic* form (no `-` or `:`). Colons are out because rsync
//!   reads `host:path` as a remote path, scp does the same, and Windows file systems reject
//!   them; the trailing `Z` says UTC, so ids name the same instant on every client whatever its
//!   time zone. Fixed width with the most significant field first means the names sort as
//!   text exactly as they sort as times, so `ls` shows snapshots in order.
//! - Parsing is strict (exactly 16 ASCII characters, a real calendar date and time, upper-case
//!   `T` and `Z`): the snapshot directory may hold other entries (partial transfers, files a
//!   user dropped there), and anything that does not parse is simply not a snapshot. A lenient
//!   parser would turn a stray `2026-11-22` directory into a snapshot that retention prunes.
//! - Calendar arithmetic uses Howard Hinnant's `days_from_civil` / `civil_from_days`
//!   (<https://howardhinnant.github.io/date_algorithms.html>): exact for the proleptic
//!   Gregorian calendar over the whole `i64` range we can reach, branch-light, and about
//!   forty lines, which is all retention needs (hours, days, ISO weeks, months, years, UTC).
//!   A date crate would bring time zones and leap-second tables we deliberately do not want.
//!
//! Trade-offs:
//! - One-second resolution: two snapshots in the same second would collide; the snapshot
//!   taker bumps the newer one by a second instead, which is cheaper than wider names.
//! - Leap seconds (`...235960Z`) are rejected: unix time has no such second, and no clock we
//!   read produces one.
//! - The text form holds years 0000–9999. [`SnapshotId::from_unix`] accepts any `i64`, and
//!   `Display` then prints a wider or signed year that [`FromStr`] rejects; such a name can
//!   never be mistaken for a snapshot, which is the safe failure.

use std::fmt;
use std::str::FromStr;

/// A snapshot's identity: the UTC time it was taken, in whole seconds since the unix epoch.
///
/// Ordered by time (the derived order on the single field), which is also the order of the
/// text forms for years 0000–9999.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotId(i64);

/// A UTC calendar breakdown of a [`SnapshotId`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Civil {
    /// Proleptic Gregorian year (year 0 = 1 BC, as in ISO 8601).
    pub year: i64,
    /// 1..=12.
    pub month: u32,
    /// 1..=31.
    pub day: u32,
    /// 0..=23.
    pub hour: u32,
    /// 0..=59.
    pub minute: u32,
    /// 0..=59.
    pub second: u32,
    /// The ISO 8601 week-numbering year: differs from `year` for a few days around 1 January
    /// (2024-12-30 is in 2025-W01, 2021-01-03 in 2020-W53).
    pub iso_year: i64,
    /// 1..=53, ISO 8601 (weeks start on Monday; week 1 holds the year's first Thursday).
    pub iso_week: u32,
    /// 1 = Monday .. 7 = Sunday (ISO 8601).
    pub weekday: u32,
}

const SECS_PER_DAY: i64 = 86_400;

/// Days since 1970-01-01 of a proleptic Gregorian date (Hinnant's `days_from_civil`).
///
/// `month` must be 1..=12 and `day` 1..=31; the result for a day past the end of its month
/// (say 02-30) is the matching day of the next month, so validate first if that matters.
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    // Count years from 1 March so that the leap day is the last day of the "year".
    let y = if month <= 2 { year - 1 } else { year };
    // Floor division: eras are 400-year blocks (146097 days) and repeat exactly.
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400); // [0, 399]
    let m = i64::from(month);
    let mp = if m > 2 { m - 3 } else { m + 9 }; // March = 0 .. February = 11
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    era * 146_097 + doe - 719_468 // 719468 = days from 0000-03-01 to 1970-01-01
}

/// The proleptic Gregorian (year, month, day) of a day count since 1970-01-01 (Hinnant's
/// `civil_from_days`); the inverse of [`days_from_civil`].
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32; // [1, 12]
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Gregorian leap year.
pub fn is_leap_year(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

/// Days in a month; 0 for a month outside 1..=12 (so any day fails a range check).
fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap_year(year) => 29,
        2 => 28,
        _ => 0,
    }
}

impl SnapshotId {
    pub fn from_unix(secs: i64) -> SnapshotId {
        SnapshotId(secs)
    }

    pub fn unix(&self) -> i64 {
        self.0
    }

    /// The current time, truncated to the second.
    pub fn now() -> SnapshotId {
        let now = std::time::SystemTime::now();
        // A clock before 1970 is broken, but an honest (negative) id is still better than
        // clamping to the epoch: the caller's "never older than the last snapshot" check then
        // sees the real problem. Saturate rather than wrap for absurd clocks.
        let secs = match now.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => {
                let back = e.duration();
                // Truncate toward the past, so 0.5 s before the epoch is second -1.
                let whole = i64::try_from(back.as_secs()).unwrap_or(i64::MAX);
                -whole - i64::from(back.subsec_nanos() > 0)
            }
        };
        SnapshotId(secs)
    }

    /// The UTC calendar breakdown, ISO week included.
    pub fn civil(&self) -> Civil {
        // Floor division so that times before 1970 land in the right day and second.
        let days = self.0.div_euclid(SECS_PER_DAY);
        let secs = self.0.rem_euclid(SECS_PER_DAY) as u32;
        let (year, month, day) = civil_from_days(days);
        // 1970-01-01 (day 0) was a Thursday, ISO weekday 4.
        let weekday = ((days + 3).rem_euclid(7) + 1) as u32;
        // ISO 8601: a Monday-to-Sunday week belongs to the year holding its Thursday, and is
        // numbered by how many Thursdays of that year precede or are that one.
        let thursday = days - i64::from(weekday) + 4;
        let (iso_year, _, _) = civil_from_days(thursday);
        let iso_week = ((thursday - days_from_civil(iso_year, 1, 1)) / 7 + 1) as u32;
        Civil {
            year,
            month,
            day,
            hour: secs / 3600,
            minute: secs / 60 % 60,
            second: secs % 60,
            iso_year,
            iso_week,
            weekday,
        }
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.civil();
        write!(
            f,
            "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
            c.year, c.month, c.day, c.hour, c.minute, c.second
        )
    }
}

/// Debug shows the text form: test failures and logs then read as times, not as nine-digit
/// numbers.
impl fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SnapshotId({self})")
    }
}

impl FromStr for SnapshotId {
    /// A message naming the rejected string (it is shown to users as is).
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: String| {
            format!("`{s}` is not a snapshot id ({why}; expected a UTC time like 20261122T123005Z)")
        };
        // Check the shape on bytes first: slicing a &str at fixed offsets would panic inside
        // a multi-byte character, and directory names are arbitrary.
        let b = s.as_bytes();
        if b.len() != 16 {
            return Err(bad(format!("{} bytes instead of 16", b.len())));
        }
        let shape_ok = b.iter().enumerate().all(|(i, &c)| match i {
            8 => c == b'T',
            15 => c == b'Z',
            _ => c.is_ascii_digit(),
        });
        if !shape_ok {
            return Err(bad("not of the form YYYYMMDDThhmmssZ".to_string()));
        }
        let num = |from: usize, to: usize| {
            b[from..to]
                .iter()
                .fold(0u32, |acc, &c| acc * 10 + u32::from(c - b'0'))
        };
        let year = i64::from(num(0, 4));
        let (month, day) = (num(4, 6), num(6, 8));
        let (hour, minute, second) = (num(9, 11), num(11, 13), num(13, 15));
        if !(1..=12).contains(&month) {
            return Err(bad(format!("month {month:02} does not exist")));
        }
        if day == 0 || day > days_in_month(year, month) {
            return Err(bad(format!(
                "day {day:02} does not exist in {year:04}-{month:02}"
            )));
        }
        if hour > 23 || minute > 59 || second > 59 {
            return Err(bad(format!(
                "time {hour:02}:{minute:02}:{second:02} does not exist"
            )));
        }
        let secs = i64::from(hour * 3600 + minute * 60 + second);
        Ok(SnapshotId(
            days_from_civil(year, month, day) * SECS_PER_DAY + secs,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SnapshotId {
        s.parse().unwrap()
    }

    /// A tiny deterministic generator (Knuth's MMIX LCG), so tests need no `rand`.
    struct Lcg(u64);
    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }
    }

    #[test]
    fn round_trips_text() {
        for s in [
            "19700101T000000Z",
            "20261122T123005Z",
            "20000229T235959Z",
            "21000301T000000Z",
            "19691231T235959Z",
            "00000101T000000Z",
            "99991231T235959Z",
            "16000229T120000Z",
        ] {
            assert_eq!(id(s).to_string(), s);
        }
    }

    #[test]
    fn known_unix_values() {
        assert_eq!(id("19700101T000000Z").unix(), 0);
        assert_eq!(id("19700101T000001Z").unix(), 1);
        assert_eq!(id("19691231T235959Z").unix(), -1);
        assert_eq!(id("20000301T000000Z").unix(), 951_868_800);
        assert_eq!(id("20261122T123005Z").unix(), 1_795_350_605);
        assert_eq!(id("20380119T031408Z").unix(), 1 << 31); // past the 32-bit rollover
        assert_eq!(SnapshotId::from_unix(1_795_350_605).unix(), 1_795_350_605);
    }

    #[test]
    fn round_trips_unix() {
        let lo = id("00000101T000000Z").unix();
        let hi = id("99991231T235959Z").unix();
        let mut fixed = vec![lo, hi, -86_401, -1, 0, 1, 951_782_399, 4_102_444_800];
        let mut r = Lcg(7);
        fixed.extend((0..5000).map(|_| lo + r.below((hi - lo) as u64 + 1) as i64));
        for t in fixed {
            let s = SnapshotId::from_unix(t).to_string();
            assert_eq!(id(&s).unix(), t, "{s}");
        }
    }

    #[test]
    fn text_order_is_time_order() {
        let mut r = Lcg(11);
        let lo = id("00000101T000000Z").unix();
        let hi = id("99991231T235959Z").unix();
        for _ in 0..2000 {
            let a = SnapshotId::from_unix(lo + r.below((hi - lo) as u64) as i64);
            let b = SnapshotId::from_unix(lo + r.below((hi - lo) as u64) as i64);
            assert_eq!(a.cmp(&b), a.to_string().cmp(&b.to_string()), "{a} {b}");
        }
    }

    /// Every day over four 400-year cycles, both sides of the epoch: the two algorithms are
    /// inverse, dates advance one day at a time, and the weekday cycles.
    #[test]
    fn civil_algorithms_agree_day_by_day() {
        let start = days_from_civil(1200, 1, 1);
        let end = days_from_civil(2800, 1, 1);
        let (mut py, mut pm, mut pd) = civil_from_days(start - 1);
        for z in start..end {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
            assert!((1..=12).contains(&m) && d >= 1 && d <= days_in_month(y, m));
            if d == 1 {
                assert_eq!(pd, days_in_month(py, pm), "{y}-{m}-{d}");
                assert_eq!((py, pm % 12 + 1), (y - i64::from(m == 1), m));
            } else {
                assert_eq!((py, pm, pd + 1), (y, m, d));
            }
            (py, pm, pd) = (y, m, d);
        }
    }

    #[test]
    fn leap_years() {
        assert!(is_leap_year(2000) && is_leap_year(2024) && is_leap_year(1600));
        assert!(!is_leap_year(2100) && !is_leap_year(1900) && !is_leap_year(2023));
        assert!("20000229T000000Z".parse::<SnapshotId>().is_ok());
        assert!("20240229T000000Z".parse::<SnapshotId>().is_ok());
        assert!("21000229T000000Z".parse::<SnapshotId>().is_err());
        assert!("19000229T000000Z".parse::<SnapshotId>().is_err());
        assert!("20230229T000000Z".parse::<SnapshotId>().is_err());
        assert_eq!(
            days_from_civil(2001, 1, 1) - days_from_civil(2000, 1, 1),
            366
        );
        assert_eq!(
            days_from_civil(2101, 1, 1) - days_from_civil(2100, 1, 1),
            365
        );
        // The day after 2000-02-29 is 03-01; after 2100-02-28 it is 03-01 too.
        assert_eq!(
            id("20000229T235959Z").unix() + 1,
            id("20000301T000000Z").unix()
        );
        assert_eq!(
            id("21000228T235959Z").unix() + 1,
            id("21000301T000000Z").unix()
        );
    }

    #[test]
    fn breakdown_fields() {
        let c = id("20261122T123005Z").civil();
        assert_eq!(
            c,
            Civil {
                year: 2026,
                month: 11,
                day: 22,
                hour: 12,
                minute: 30,
                second: 5,
                iso_year: 2026,
                iso_week: 47,
                weekday: 7,
            }
        );
        assert_eq!(id("19700101T000000Z").civil().weekday, 4); // Thursday
        let c = id("19691231T235959Z").civil();
        assert_eq!(
            (c.year, c.month, c.day, c.hour, c.second),
            (1969, 12, 31, 23, 59)
        );
        assert_eq!(c.weekday, 3);
    }

    #[test]
    fn iso_weeks_at_year_boundaries() {
        let w = |s: &str| {
            let c = id(s).civil();
            (c.iso_year, c.iso_week, c.weekday)
        };
        assert_eq!(w("20201231T120000Z"), (2020, 53, 4));
        assert_eq!(w("20210101T000000Z"), (2020, 53, 5));
        assert_eq!(w("20210103T235959Z"), (2020, 53, 7));
        assert_eq!(w("20210104T000000Z"), (2021, 1, 1));
        assert_eq!(w("20241229T235959Z"), (2024, 52, 7));
        assert_eq!(w("20241230T000000Z"), (2025, 1, 1));
        assert_eq!(w("20250101T000000Z"), (2025, 1, 3));
        assert_eq!(w("20151231T000000Z"), (2015, 53, 4));
        assert_eq!(w("20160103T000000Z"), (2015, 53, 7));
        assert_eq!(w("20080101T000000Z"), (2008, 1, 2));
        assert_eq!(w("20071231T000000Z"), (2008, 1, 1));
        assert_eq!(w("20101231T000000Z"), (2010, 52, 5));
    }

    /// ISO week rules checked on every day of 1800..2200: week 1 holds 4 January, weeks
    /// change exactly on Mondays, and numbers run 1, 2, ... up to 52 or 53.
    #[test]
    fn iso_week_invariants() {
        let start = days_from_civil(1800, 1, 1);
        let end = days_from_civil(2200, 1, 1);
        let at = |z: i64| SnapshotId::from_unix(z * SECS_PER_DAY).civil();
        let mut prev = at(start - 1);
        for z in start..end {
            let c = at(z);
            assert!((1..=53).contains(&c.iso_week));
            assert!((c.iso_year - c.year).abs() <= 1);
            if c.month == 1 && c.day == 4 {
                assert_eq!((c.iso_year, c.iso_week), (c.year, 1));
            }
            if c.weekday == 1 {
                let next = if prev.iso_week >= 52 && c.iso_week == 1 {
                    (prev.iso_year + 1, 1)
                } else {
                    (prev.iso_year, prev.iso_week + 1)
                };
                assert_eq!((c.iso_year, c.iso_week), next, "{z}");
            } else {
                assert_eq!((c.iso_year, c.iso_week), (prev.iso_year, prev.iso_week));
                assert_eq!(c.weekday, prev.weekday + 1);
            }
            prev = c;
        }
    }

    #[test]
    fn rejects_invalid() {
        for s in [
            "20261322T000000Z", // month 13
            "20260022T000000Z", // month 0
            "20260230T000000Z", // 30 February
            "21000229T000000Z", // 2100 is not a leap year
            "20260431T000000Z", // 31 April
            "20261100T000000Z", // day 0
            "20261122T240000Z", // hour 24
            "20261122T126000Z", // minute 60
            "20261122T123060Z", // leap second
            "20261122T123005",  // too short
            "20261122T1230055Z",
            "020261122T12300Z",
            "20261122T123005z", // lower-case z
            "20261122t123005Z",
            "2026-11-22T12:30:05Z",
            "20261122T12:30:Z",
            "+2026112T123005Z",
            "2026112 T123005Z",
            " 0261122T123005Z",
            "20261122T123005Z\n",
            "20261122 123005Z",
            "",
        ] {
            let e = s.parse::<SnapshotId>().unwrap_err();
            assert!(e.contains("not a snapshot id"), "{s}: {e}");
            assert!(e.contains(&format!("`{s}`")), "names the input: {e}");
        }
    }

    #[test]
    fn errors_say_why() {
        let e = |s: &str| s.parse::<SnapshotId>().unwrap_err();
        assert!(e("20261322T000000Z").contains("month 13"));
        assert!(e("20260230T000000Z").contains("day 30 does not exist in 2026-02"));
        assert!(e("20261122T240000Z").contains("24:00:00"));
        assert!(e("2026").contains("4 bytes instead of 16"));
    }

    #[test]
    fn non_ascii_is_rejected_without_panicking() {
        // 16 bytes with `T` at 8 and `Z` at 15, but a two-byte character inside the month:
        // naive &s[4..6] slicing would panic here.
        let s = "20261é2T123005Z";
        assert_eq!(s.len(), 16);
        assert!(s.parse::<SnapshotId>().is_err());
        assert!("２０２６1122T123005Z".parse::<SnapshotId>().is_err());
    }

    #[test]
    fn now_is_plausible_and_debug_is_readable() {
        let n = SnapshotId::now();
        assert!(n > id("20200101T000000Z"), "{n}");
        assert_eq!(n.to_string().parse::<SnapshotId>().unwrap(), n);
        assert_eq!(
            format!("{:?}", id("20261122T123005Z")),
            "SnapshotId(20261122T123005Z)"
        );
        let set: std::collections::HashSet<SnapshotId> =
            [id("20261122T123005Z"), SnapshotId::from_unix(1_795_350_605)].into();
        assert_eq!(set.len(), 1);
    }
}
