//! Snapshot ids: UTC times in ISO 8601 basic form, `20261122T123005Z`.
//!
//! Basic form (no colons) because rsync reads `host:path` as a remote path and colons
//! trouble scp and other tools; the `Z` says UTC so ids sort and compare the same on every
//! client whatever its time zone. Calendar arithmetic uses Howard Hinnant's days-from-civil
//! algorithms, so no date crate is needed for what retention needs: hours, days, ISO weeks,
//! months and years, all in UTC.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotId(i64);

/// A UTC calendar breakdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub iso_year: i64,
    pub iso_week: u32,
    /// 1 = Monday .. 7 = Sunday (ISO 8601).
    pub weekday: u32,
}

/// Days since 1970-01-01 for a proleptic Gregorian date.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// (year, month, day) for days since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = if z >= 0 { z } else { z - 146096 } / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(y) => 29,
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

    pub fn now() -> SnapshotId {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        SnapshotId(secs)
    }

    pub fn civil(&self) -> Civil {
        let days = self.0.div_euclid(86400);
        let secs = self.0.rem_euclid(86400) as u32;
        let (year, month, day) = civil_from_days(days);
        // 1970-01-01 was a Thursday (ISO weekday 4).
        let weekday = ((days + 3).rem_euclid(7) + 1) as u32;
        // ISO week: the week containing this week's Thursday belongs to Thursday's year.
        let thursday = days - weekday as i64 + 4;
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

impl FromStr for SnapshotId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("`{s}` is not a snapshot id (expected UTC time like 20261122T123005Z)");
        let b = s.as_bytes();
        if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
            return Err(bad());
        }
        let digits = |r: std::ops::Range<usize>| -> Result<u32, String> {
            let part = &s[r];
            if !part.bytes().all(|c| c.is_ascii_digit()) {
                return Err(bad());
            }
            part.parse().map_err(|_| bad())
        };
        let (y, mo, d) = (digits(0..4)? as i64, digits(4..6)?, digits(6..8)?);
        let (h, mi, se) = (digits(9..11)?, digits(11..13)?, digits(13..15)?);
        if !(1..=12).contains(&mo)
            || d == 0
            || d > days_in_month(y, mo)
            || h > 23
            || mi > 59
            || se > 59
        {
            return Err(bad());
        }
        Ok(SnapshotId(
            days_from_civil(y, mo, d) * 86400 + (h * 3600 + mi * 60 + se) as i64,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SnapshotId {
        s.parse().unwrap()
    }

    #[test]
    fn round_trips() {
        for s in [
            "19700101T000000Z",
            "20261122T123005Z",
            "20000229T235959Z",
            "21000301T000000Z",
        ] {
            assert_eq!(id(s).to_string(), s);
        }
        assert_eq!(id("19700101T000001Z").unix(), 1);
        assert_eq!(id("20261122T123005Z").unix(), 1_795_350_605);
        for t in [0i64, 951_782_399, 1_795_350_605, 4_102_444_800, -86_401] {
            let s = SnapshotId::from_unix(t).to_string();
            assert_eq!(id(&s).unix(), t, "{s}");
        }
    }

    #[test]
    fn leap_years() {
        assert!("20000229T000000Z".parse::<SnapshotId>().is_ok());
        assert!("21000229T000000Z".parse::<SnapshotId>().is_err());
        assert!("20240229T000000Z".parse::<SnapshotId>().is_ok());
        assert!("20230229T000000Z".parse::<SnapshotId>().is_err());
    }

    #[test]
    fn iso_weeks_at_year_boundaries() {
        let w = |s: &str| {
            let c = id(s).civil();
            (c.iso_year, c.iso_week)
        };
        assert_eq!(w("20201231T120000Z"), (2020, 53));
        assert_eq!(w("20210103T120000Z"), (2020, 53));
        assert_eq!(w("20210104T000000Z"), (2021, 1));
        assert_eq!(w("20241230T000000Z"), (2025, 1));
        assert_eq!(w("20261122T123005Z"), (2026, 47));
        assert_eq!(id("20261122T123005Z").civil().weekday, 7);
    }

    #[test]
    fn rejects_invalid() {
        for s in [
            "20261322T000000Z",
            "20260230T000000Z",
            "20261122T123005",
            "20261122T123005z",
            "2026-11-22T12:30:05Z",
            "20261122T246000Z",
            "2026112 T123005Z",
            "",
        ] {
            let e = s.parse::<SnapshotId>().unwrap_err();
            assert!(e.contains("not a snapshot id"), "{s}: {e}");
        }
    }
}
