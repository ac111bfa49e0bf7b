//! Which snapshots to keep: the `retention:` rules of a profile, with restic's semantics.
//!
//! - `keep_last N`: the N newest snapshots.
//! - `keep_hourly/daily/weekly/monthly/yearly N`: walking from newest to oldest, the newest
//!   snapshot of each of the N most recent hours (days, ISO weeks, months, years) that have
//!   snapshots at all. Buckets are in UTC, like the snapshot ids. A value of 0 turns a rule off.
//! - `keep_within D`: every snapshot younger than D, measured from the NEWEST snapshot, not from
//!   now: a client that was switched off for a month must not prune everything at its first run.
//! - The newest snapshot is always kept, whatever the policy says.
//! - No rule at all keeps everything (retention is opt-in).
//!
//! Selection is a pure function, so it is tested exhaustively here; deleting is elsewhere.

use std::collections::BTreeSet;
use std::fmt;

use crate::snapid::SnapshotId;

/// The profile's `retention:` section (unknown keys are errors, like everywhere in a profile).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    /// Seconds; written in the profile as a duration like `7d` (see [`parse_duration`]).
    #[serde(default, deserialize_with = "within")]
    pub keep_within: Option<u64>,
}

impl Policy {
    /// No rule set (or all set to 0): keep everything.
    pub fn is_empty(&self) -> bool {
        let on = |v: Option<u32>| v.is_some_and(|n| n > 0);
        !(on(self.keep_last)
            || on(self.keep_hourly)
            || on(self.keep_daily)
            || on(self.keep_weekly)
            || on(self.keep_monthly)
            || on(self.keep_yearly)
            || self.keep_within.is_some_and(|s| s > 0))
    }
}

fn within<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let s = <String as serde::Deserialize>::deserialize(d)?;
    parse_duration(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// Parse `36h`, `7d`, `2w`, `6m`, `1y`, or combinations like `1y6m`.
/// Units: h = hour, d = day, w = 7 days, m = 30 days, y = 365 days (restic's convention).
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let bad =
        |why: &str| format!("`{s}` is not a duration ({why}; examples: 36h, 7d, 2w, 6m, 1y6m)");
    let t = s.trim();
    if t.is_empty() {
        return Err(bad("empty"));
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit: u64 = match c {
            'h' => 3600,
            'd' => 86400,
            'w' => 7 * 86400,
            'm' => 30 * 86400,
            'y' => 365 * 86400,
            _ => return Err(bad(&format!("unknown unit `{c}`"))),
        };
        if num.is_empty() {
            return Err(bad("a unit without a number"));
        }
        let n: u64 = num.parse().map_err(|_| bad("number too large"))?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| bad("too large"))?;
        num.clear();
    }
    if !num.is_empty() {
        return Err(bad("a number without a unit"));
    }
    Ok(total)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    Newest,
    Last,
    Within,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
    NoPolicy,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::Newest => "newest",
            Reason::Last => "keep_last",
            Reason::Within => "keep_within",
            Reason::Hourly => "keep_hourly",
            Reason::Daily => "keep_daily",
            Reason::Weekly => "keep_weekly",
            Reason::Monthly => "keep_monthly",
            Reason::Yearly => "keep_yearly",
            Reason::NoPolicy => "no retention policy",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub id: SnapshotId,
    /// Why it is kept; empty = remove.
    pub keep: Vec<Reason>,
}

impl Decision {
    pub fn removed(&self) -> bool {
        self.keep.is_empty()
    }
}

/// Decide for every snapshot (deduplicated), newest first.
pub fn select(snapshots: &[SnapshotId], policy: &Policy) -> Vec<Decision> {
    let ids: Vec<SnapshotId> = snapshots
        .iter()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .rev()
        .collect();
    let mut out: Vec<Decision> = ids
        .iter()
        .map(|&id| Decision {
            id,
            keep: Vec::new(),
        })
        .collect();
    if out.is_empty() {
        return out;
    }
    if policy.is_empty() {
        for d in &mut out {
            d.keep.push(Reason::NoPolicy);
        }
        return out;
    }
    if let Some(n) = policy.keep_last {
        for d in out.iter_mut().take(n as usize) {
            d.keep.push(Reason::Last);
        }
    }
    if let Some(w) = policy.keep_within.filter(|w| *w > 0) {
        let newest = ids[0].unix();
        for d in &mut out {
            if newest - d.id.unix() <= w as i64 {
                d.keep.push(Reason::Within);
            }
        }
    }
    type Bucket = fn(&SnapshotId) -> (i64, i64);
    let rules: [(Option<u32>, Reason, Bucket); 5] = [
        (policy.keep_hourly, Reason::Hourly, |id| {
            (id.unix().div_euclid(3600), 0)
        }),
        (policy.keep_daily, Reason::Daily, |id| {
            (id.unix().div_euclid(86400), 0)
        }),
        (policy.keep_weekly, Reason::Weekly, |id| {
            let c = id.civil();
            (c.iso_year, c.iso_week as i64)
        }),
        (policy.keep_monthly, Reason::Monthly, |id| {
            let c = id.civil();
            (c.year, c.month as i64)
        }),
        (policy.keep_yearly, Reason::Yearly, |id| {
            (id.civil().year, 0)
        }),
    ];
    for (n, reason, bucket) in rules {
        let Some(n) = n.filter(|n| *n > 0) else {
            continue;
        };
        let mut last: Option<(i64, i64)> = None;
        let mut used = 0;
        for d in &mut out {
            if used >= n {
                break;
            }
            let b = bucket(&d.id);
            if last != Some(b) {
                // Newest first: the first snapshot seen in a bucket is its newest.
                d.keep.push(reason);
                last = Some(b);
                used += 1;
            }
        }
    }
    if out[0].keep.is_empty() {
        out[0].keep.push(Reason::Newest);
    }
    for d in &mut out {
        d.keep.sort();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> SnapshotId {
        s.parse().unwrap()
    }

    fn kept(ds: &[Decision]) -> Vec<String> {
        ds.iter()
            .filter(|d| !d.removed())
            .map(|d| d.id.to_string())
            .collect()
    }

    fn hours(start: &str, count: i64, step_secs: i64) -> Vec<SnapshotId> {
        let s = at(start).unix();
        (0..count)
            .map(|i| SnapshotId::from_unix(s + i * step_secs))
            .collect()
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("36h").unwrap(), 36 * 3600);
        assert_eq!(parse_duration("7d").unwrap(), 7 * 86400);
        assert_eq!(parse_duration("2w").unwrap(), 14 * 86400);
        assert_eq!(parse_duration("1y6m").unwrap(), (365 + 180) * 86400);
        for b in ["", "d", "7", "7x", "-1d", "99999999999999999999y"] {
            let e = parse_duration(b).unwrap_err();
            assert!(e.contains("not a duration"), "{b}: {e}");
        }
    }

    #[test]
    fn empty_policy_keeps_all_and_empty_input() {
        let s = hours("20260101T000000Z", 5, 3600);
        let d = select(&s, &Policy::default());
        assert_eq!(d.len(), 5);
        assert!(d.iter().all(|d| d.keep == vec![Reason::NoPolicy]));
        assert!(select(
            &[],
            &Policy {
                keep_last: Some(3),
                ..Default::default()
            }
        )
        .is_empty());
        let zero = Policy {
            keep_daily: Some(0),
            ..Default::default()
        };
        assert!(zero.is_empty());
    }

    #[test]
    fn keep_last() {
        let s = hours("20260101T000000Z", 10, 3600);
        let d = select(
            &s,
            &Policy {
                keep_last: Some(3),
                ..Default::default()
            },
        );
        assert_eq!(
            kept(&d),
            ["20260101T090000Z", "20260101T080000Z", "20260101T070000Z"]
        );
        let d = select(
            &s,
            &Policy {
                keep_last: Some(30),
                ..Default::default()
            },
        );
        assert_eq!(kept(&d).len(), 10);
    }

    #[test]
    fn keep_daily_takes_newest_of_each_day() {
        // Every 6 hours over 4 days.
        let s = hours("20260101T030000Z", 16, 6 * 3600);
        let d = select(
            &s,
            &Policy {
                keep_daily: Some(3),
                ..Default::default()
            },
        );
        assert_eq!(
            kept(&d),
            ["20260104T210000Z", "20260103T210000Z", "20260102T210000Z"]
        );
    }

    #[test]
    fn keep_hourly_skips_empty_hours() {
        let s = vec![
            at("20260101T010000Z"),
            at("20260101T011500Z"),
            at("20260101T050000Z"),
            at("20260101T090000Z"),
        ];
        let d = select(
            &s,
            &Policy {
                keep_hourly: Some(3),
                ..Default::default()
            },
        );
        assert_eq!(
            kept(&d),
            ["20260101T090000Z", "20260101T050000Z", "20260101T011500Z"]
        );
    }

    #[test]
    fn keep_weekly_uses_iso_weeks_across_years() {
        let s = vec![
            at("20201230T000000Z"), // 2020-W53
            at("20210103T000000Z"), // 2020-W53 (newest of that week)
            at("20210104T000000Z"), // 2021-W01
            at("20210110T000000Z"), // 2021-W01 (newest)
        ];
        let d = select(
            &s,
            &Policy {
                keep_weekly: Some(5),
                ..Default::default()
            },
        );
        assert_eq!(kept(&d), ["20210110T000000Z", "20210103T000000Z"]);
    }

    #[test]
    fn keep_monthly_and_yearly() {
        let s = vec![
            at("20241215T000000Z"),
            at("20241231T235959Z"),
            at("20250101T000000Z"),
            at("20250115T000000Z"),
            at("20250201T000000Z"),
        ];
        let d = select(
            &s,
            &Policy {
                keep_monthly: Some(2),
                ..Default::default()
            },
        );
        assert_eq!(kept(&d), ["20250201T000000Z", "20250115T000000Z"]);
        let d = select(
            &s,
            &Policy {
                keep_yearly: Some(5),
                ..Default::default()
            },
        );
        assert_eq!(kept(&d), ["20250201T000000Z", "20241231T235959Z"]);
    }

    #[test]
    fn keep_within_is_relative_to_newest_and_inclusive() {
        let s = hours("20260101T000000Z", 5, 86400); // five daily snapshots
        let d = select(
            &s,
            &Policy {
                keep_within: Some(2 * 86400),
                ..Default::default()
            },
        );
        assert_eq!(
            kept(&d),
            ["20260105T000000Z", "20260104T000000Z", "20260103T000000Z"]
        );
    }

    #[test]
    fn combined_rules_list_every_reason() {
        let s = hours("20260101T000000Z", 48, 3600);
        let p = Policy {
            keep_last: Some(2),
            keep_daily: Some(2),
            ..Default::default()
        };
        let d = select(&s, &p);
        assert_eq!(d[0].keep, vec![Reason::Last, Reason::Daily]);
        assert_eq!(d[1].keep, vec![Reason::Last]);
        assert_eq!(
            kept(&d),
            ["20260102T230000Z", "20260102T220000Z", "20260101T230000Z"]
        );
    }

    #[test]
    fn newest_always_kept_unsorted_and_duplicates() {
        let s = vec![
            at("20260101T000000Z"),
            at("20260301T000000Z"),
            at("20260101T000000Z"),
            at("20260201T000000Z"),
        ];
        let p = Policy {
            keep_within: Some(1),
            ..Default::default()
        };
        let d = select(&s, &p);
        assert_eq!(d.len(), 3, "deduplicated");
        assert_eq!(d[0].id, at("20260301T000000Z"));
        assert_eq!(d[0].keep, vec![Reason::Within]);
        let p = Policy {
            keep_yearly: Some(1),
            ..Default::default()
        };
        let d = select(&[at("20250101T000000Z"), at("20240101T000000Z")], &p);
        assert_eq!(kept(&d), ["20250101T000000Z"]);
    }

    #[test]
    fn randomized_invariants() {
        let mut seed: u64 = 0x5eed;
        let mut rnd = |m: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % m
        };
        for _ in 0..500 {
            let n = rnd(40) as usize;
            let base = at("20240101T000000Z").unix();
            let snaps: Vec<SnapshotId> = (0..n)
                .map(|_| SnapshotId::from_unix(base + rnd(3 * 365 * 86400) as i64))
                .collect();
            let opt = |r: &mut dyn FnMut(u64) -> u64| match r(3) {
                0 => None,
                _ => Some(r(8) as u32),
            };
            let p = Policy {
                keep_last: opt(&mut rnd),
                keep_hourly: opt(&mut rnd),
                keep_daily: opt(&mut rnd),
                keep_weekly: opt(&mut rnd),
                keep_monthly: opt(&mut rnd),
                keep_yearly: opt(&mut rnd),
                keep_within: if rnd(3) == 0 {
                    Some(rnd(90 * 86400))
                } else {
                    None
                },
            };
            let d = select(&snaps, &p);
            let unique: BTreeSet<_> = snaps.iter().collect();
            assert_eq!(d.len(), unique.len());
            if let Some(first) = d.first() {
                assert!(!first.removed(), "newest kept");
                assert_eq!(Some(&first.id), unique.iter().next_back().copied());
            }
            assert!(
                d.windows(2).all(|w| w[0].id > w[1].id),
                "newest first, no duplicates"
            );
            let by_last = d.iter().filter(|x| x.keep.contains(&Reason::Last)).count();
            assert_eq!(
                by_last,
                p.keep_last.map(|k| (k as usize).min(d.len())).unwrap_or(0)
            );
            for (reason, lim) in [
                (Reason::Daily, p.keep_daily),
                (Reason::Monthly, p.keep_monthly),
            ] {
                let c = d.iter().filter(|x| x.keep.contains(&reason)).count();
                assert!(c <= lim.unwrap_or(0) as usize);
            }
        }
    }
}
