//! Which snapshots to keep: the `retention:` rules of a profile, with restic's `forget`
//! semantics.
//!
//! Order: [`select`] takes the snapshots in commit order (the container's authenticated
//! `STATE` list, see [`crate::generation`]); "newest" below means the last committed, and
//! the caller passes as `now` the clock corrected for a jump since the last commit
//! ([`crate::generation::trusted_now`]). With a clock that only moves forward, commit order
//! is date order and everything below reads as restic's.
//!
//! Rules (each one independent; a snapshot is kept if any rule keeps it, and its
//! [`Decision`] lists every rule that did):
//! - `keep_last N`: the N last committed snapshots.
//! - `keep_hourly/daily/weekly/monthly/yearly N`: walking from newest to oldest, the newest
//!   snapshot of each of the N most recent hours (days, ISO weeks, months, years) that have
//!   snapshots at all. Empty periods do not count: a laptop backed up on three days last month
//!   still keeps three dailies with `keep_daily: 3`.
//! - `keep_within D`: every snapshot at most D older than the reference time (inclusive):
//!   the current time (`now`, an argument, so the function stays pure), but never later
//!   than the second-newest snapshot. Not from the newest snapshot: snapshot ids come from
//!   the clock, and one run with a clock years ahead would make every older snapshot "older
//!   than D" and delete the whole history. Not from now alone either: in that very run (the
//!   clock ahead, nothing yet "in the future") now is years ahead too, and a client switched
//!   off for a month would lose everything at its first run. The second-newest snapshot is
//!   the newest one that existed before the run that just took the newest, so one run,
//!   whatever its clock said, never makes older snapshots expire; a prune without a new
//!   snapshot lags by one snapshot, erring towards keeping.
//! - Clock jumps: while the newest snapshot is dated more than [`CLOCK_SLACK`] after now,
//!   [`select`] keeps everything ([`Reason::Future`]) and the caller warns: a clock that is
//!   wrong now, or was wrong when that snapshot was taken, must not drive any deletion.
//! - The newest snapshot is always kept ([`Reason::Newest`] if no rule did). With the rules
//!   above and 0 meaning "off" this cannot trigger, but deleting the only up-to-date copy must
//!   not hinge on that reasoning staying true as rules are added.
//! - No rule at all keeps everything ([`Reason::NoPolicy`]): retention is opt-in.
//!
//! Decisions and trade-offs:
//! - A value of 0 turns a rule off, and a policy whose rules are all off is no policy. So
//!   `keep_daily: 0` alone keeps every snapshot. The alternative reading ("keep no dailies",
//!   hence delete all but the newest) is the destructive one, and restic likewise removes
//!   nothing when every count is zero. There is no "unlimited"; use a large N.
//! - Periods are UTC, like the ids: every client computes the same buckets whatever its time
//!   zone, at the price of a "day" that ends at 00:00 UTC rather than local midnight. restic
//!   buckets in the snapshot's local time.
//! - Durations use fixed lengths (m = 30 days, y = 365 days: restic's units, plus `w`)
//!   rather than calendar arithmetic, so a duration is a plain number of seconds that can be
//!   compared and printed. `keep_within` is inclusive where restic's is strict: a snapshot
//!   exactly D older than the newest is kept; at the boundary we err towards keeping.
//! - Input is in commit order (not sorted here: the order is the information); a duplicate
//!   id gets one decision, where it was committed last.
//!
//! [`select`] is a pure function, so it is tested exhaustively here (including against an
//! independent brute-force model on random inputs); deleting is elsewhere.

use std::fmt;

use crate::snapid::{Civil, SnapshotId};

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
    /// No rule set, or all set to 0: keep everything.
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

/// `keep_within` in a profile: a duration string, or null for "not set". A bare number is
/// rejected with [`parse_duration`]'s own message (which quotes the value, so the profile
/// loader can point at its line) instead of a generic "invalid type".
fn within<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration like 36h, 7d, 2w, 6mo or 1y6mo")
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(V)
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
            parse_duration(s).map(Some).map_err(E::custom)
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Self::Value, E> {
            self.visit_str(&n.to_string())
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Self::Value, E> {
            self.visit_str(&n.to_string())
        }
    }
    d.deserialize_option(V)
}

/// Parse a duration such as `36h`, `7d`, `2w`, `6mo`, `1y`, or a combination like `1y6mo`.
///
/// Units: `h` = hour, `d` = 24 h, `w` = 7 d, `mo` = 30 d, `y` = 365 d. A bare `m` is refused:
/// restic reads it as months, while `hooks.timeout: 10m` in the same profile means 10
/// minutes, so `keep_within: 10m` silently meaning 300 days is a trap; the message says to
/// write `mo` (months) or `min` (minutes; `min` is accepted too). Lower case only. Units may
/// come in any order but each at most once (`1d2d` is more likely a typo than a wish for
/// `3d`). Surrounding whitespace is ignored, whitespace inside is not. Returns seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let bad =
        |why: &str| format!("`{s}` is not a duration ({why}; examples: 36h, 7d, 2w, 6mo, 1y6mo)");
    let t = s.trim();
    if t.is_empty() {
        return Err(bad("empty"));
    }
    let mut total: u64 = 0;
    let mut seen: Vec<&str> = Vec::new();
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let (num, tail) = rest.split_at(digits);
        let letters = tail.len()
            - tail
                .trim_start_matches(|c: char| c.is_ascii_lowercase())
                .len();
        let (unit, after) = tail.split_at(letters);
        if unit.is_empty() {
            return Err(match tail.chars().next() {
                None => bad("a number without a unit"),
                Some(c) => bad(&format!("unknown unit `{c}`, units are h d w mo y")),
            });
        }
        let secs: u64 = match unit {
            "min" => 60,
            "h" => 3600,
            "d" => 86_400,
            "w" => 7 * 86_400,
            "mo" => 30 * 86_400,
            "y" => 365 * 86_400,
            "m" => {
                return Err(format!(
                    "`{s}`: the unit `m` is ambiguous (months for restic, minutes in \
                     hooks.timeout): write {num}mo for months or {num}min for minutes"
                ))
            }
            u => return Err(bad(&format!("unknown unit `{u}`, units are h d w mo y"))),
        };
        if num.is_empty() {
            return Err(bad(&format!("unit `{unit}` without a number")));
        }
        if seen.contains(&unit) {
            return Err(bad(&format!("unit `{unit}` given twice")));
        }
        seen.push(unit);
        let n: u64 = num.parse().map_err(|_| bad("number too large"))?;
        total = n
            .checked_mul(secs)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| bad("too large"))?;
        rest = after;
    }
    Ok(total)
}

/// Why a snapshot is kept. Declared (and listed in a [`Decision`]) in rule order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
    Within,
    /// The newest snapshot, kept although no rule kept it (a safety net).
    Newest,
    /// The newest snapshot is dated in the future: nothing is pruned (see [`future`]).
    Future,
    /// The policy has no rule: everything is kept.
    NoPolicy,
    /// The newest snapshot in which a source has entries, while every newer one has that
    /// source empty: kept although no rule kept it (`snapshots::layout::keep_last_data`).
    LastData,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The profile keys, so that a user can tell which line of the profile kept what.
        f.write_str(match self {
            Reason::Last => "keep_last",
            Reason::Hourly => "keep_hourly",
            Reason::Daily => "keep_daily",
            Reason::Weekly => "keep_weekly",
            Reason::Monthly => "keep_monthly",
            Reason::Yearly => "keep_yearly",
            Reason::Within => "keep_within",
            Reason::Newest => "newest",
            Reason::Future => "a snapshot is dated in the future",
            Reason::NoPolicy => "no retention policy",
            Reason::LastData => "the last snapshot with a source's data",
        })
    }
}

/// The verdict on one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub id: SnapshotId,
    /// Why it is kept, in [`Reason`] order; empty = remove.
    pub keep: Vec<Reason>,
}

impl Decision {
    pub fn removed(&self) -> bool {
        self.keep.is_empty()
    }
}

/// The period a snapshot falls in, for one period rule.
///
/// Keys are single integers that grow with time (so consecutive snapshots, newest first,
/// share a key exactly when they share a period); hour and day come straight from the unix
/// time, the calendar ones from the UTC breakdown.
type PeriodKey = fn(SnapshotId, &Civil) -> i64;

const PERIODS: [(Reason, PeriodKey); 5] = [
    (Reason::Hourly, |id, _| id.unix().div_euclid(3600)),
    (Reason::Daily, |id, _| id.unix().div_euclid(86_400)),
    // iso_week <= 53 < 100, so the key is monotonic across ISO years.
    (Reason::Weekly, |_, c| {
        c.iso_year * 100 + i64::from(c.iso_week)
    }),
    (Reason::Monthly, |_, c| c.year * 12 + i64::from(c.month)),
    (Reason::Yearly, |_, c| c.year),
];

fn period_count(policy: &Policy, reason: Reason) -> Option<u32> {
    match reason {
        Reason::Hourly => policy.keep_hourly,
        Reason::Daily => policy.keep_daily,
        Reason::Weekly => policy.keep_weekly,
        Reason::Monthly => policy.keep_monthly,
        Reason::Yearly => policy.keep_yearly,
        _ => None,
    }
}

/// How far ahead of now a snapshot may be dated before retention stops: one id can be a
/// second or so ahead ([`crate::snapshots::take`] never reuses an id), and clocks synced by
/// NTP differ by far less than this.
pub const CLOCK_SLACK: i64 = 300;

/// The newest snapshot if it is dated more than [`CLOCK_SLACK`] after `now` (unix seconds).
pub fn future(snapshots: &[SnapshotId], now: i64) -> Option<SnapshotId> {
    snapshots
        .iter()
        .copied()
        .max()
        .filter(|n| n.unix() > now.saturating_add(CLOCK_SLACK))
}

/// Every snapshot dated more than [`CLOCK_SLACK`] after `now`, in the order given: what
/// `snapshots`, `status` and a suspended prune name.
pub fn dated_in_future(snapshots: &[SnapshotId], now: i64) -> Vec<SnapshotId> {
    snapshots
        .iter()
        .copied()
        .filter(|n| n.unix() > now.saturating_add(CLOCK_SLACK))
        .collect()
}

/// Decide for every distinct snapshot of `committed` (in commit order, oldest first, as the
/// container's STATE lists them), last committed first, at the time `now` (unix seconds).
/// A duplicate id counts where it was committed last.
pub fn select(committed: &[SnapshotId], policy: &Policy, now: i64) -> Vec<Decision> {
    let mut out: Vec<Decision> = Vec::with_capacity(committed.len());
    for id in committed.iter().rev() {
        if !out.iter().any(|d| d.id == *id) {
            out.push(Decision {
                id: *id,
                keep: Vec::new(),
            });
        }
    }
    if policy.is_empty() {
        for d in &mut out {
            d.keep.push(Reason::NoPolicy);
        }
        return out;
    }
    if future(committed, now).is_some() {
        for d in &mut out {
            d.keep.push(Reason::Future);
        }
        return out;
    }
    apply_rules(&mut out, policy, now);
    ensure_newest(&mut out);
    out
}

/// Apply every rule to `out` (distinct ids, last committed first). Rules run in [`Reason`]
/// order, so each decision's reasons come out in that order without sorting.
fn apply_rules(out: &mut [Decision], policy: &Policy, now: i64) {
    if let Some(n) = policy.keep_last {
        for d in out.iter_mut().take(n as usize) {
            d.keep.push(Reason::Last);
        }
    }
    let civil: Vec<Civil> = out.iter().map(|d| d.id.civil()).collect();
    for (reason, key) in PERIODS {
        let Some(n) = period_count(policy, reason).filter(|n| *n > 0) else {
            continue;
        };
        let mut seen = std::collections::HashSet::new();
        for (d, c) in out.iter_mut().zip(&civil) {
            if seen.len() == n as usize {
                break;
            }
            // Last committed first: the first snapshot met in a period is the one kept for it
            // (with dates in commit order, that period's newest).
            if seen.insert(key(d.id, c)) {
                d.keep.push(reason);
            }
        }
    }
    if let Some(w) = policy.keep_within.filter(|w| *w > 0) {
        // The reference: the second-last committed snapshot (the last one that existed
        // before the run that committed the newest), never later than now.
        let now = out
            .get(1)
            .or(out.first())
            .map_or(now, |d| d.id.unix().min(now));
        for d in out.iter_mut() {
            // abs_diff: no overflow for any pair of i64 times or any u64 duration. A snapshot
            // dated after the reference (committed after it, or up to CLOCK_SLACK ahead of
            // now) counts as within (select stops on anything later than that).
            if d.id.unix() >= now || now.abs_diff(d.id.unix()) <= w {
                d.keep.push(Reason::Within);
            }
        }
    }
}

/// The safety net: never remove the last committed snapshot (`out` is last committed first).
fn ensure_newest(out: &mut [Decision]) {
    if let Some(first) = out.first_mut() {
        if first.keep.is_empty() {
            first.keep.push(Reason::Newest);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    const H: i64 = 3600;
    const D: i64 = 86_400;

    /// `select` at the time of the newest snapshot (what the rules' own tests need: keep_within
    /// then measures from the newest, and nothing is in the future).
    /// Committed in date order (a clock that only moves forward): most rules' tests.
    fn sel(s: &[SnapshotId], p: &Policy) -> Vec<Decision> {
        let now = s.iter().map(|i| i.unix()).max().unwrap_or(0);
        select(&in_date_order(s), p, now)
    }

    fn in_date_order(s: &[SnapshotId]) -> Vec<SnapshotId> {
        let mut v = s.to_vec();
        v.sort();
        v.dedup();
        v
    }

    fn at(s: &str) -> SnapshotId {
        s.parse().unwrap()
    }

    fn ids(list: &[&str]) -> Vec<SnapshotId> {
        list.iter().map(|s| at(s)).collect()
    }

    /// `count` snapshots from `start`, `step` seconds apart.
    fn series(start: &str, count: i64, step: i64) -> Vec<SnapshotId> {
        let s = at(start).unix();
        (0..count)
            .map(|i| SnapshotId::from_unix(s + i * step))
            .collect()
    }

    fn kept(ds: &[Decision]) -> Vec<String> {
        ds.iter()
            .filter(|d| !d.removed())
            .map(|d| d.id.to_string())
            .collect()
    }

    fn reasons(ds: &[Decision], id: &str) -> Vec<Reason> {
        ds.iter().find(|d| d.id == at(id)).unwrap().keep.clone()
    }

    fn last(n: u32) -> Policy {
        Policy {
            keep_last: Some(n),
            ..Default::default()
        }
    }
    fn hourly(n: u32) -> Policy {
        Policy {
            keep_hourly: Some(n),
            ..Default::default()
        }
    }
    fn daily(n: u32) -> Policy {
        Policy {
            keep_daily: Some(n),
            ..Default::default()
        }
    }
    fn weekly(n: u32) -> Policy {
        Policy {
            keep_weekly: Some(n),
            ..Default::default()
        }
    }
    fn monthly(n: u32) -> Policy {
        Policy {
            keep_monthly: Some(n),
            ..Default::default()
        }
    }
    fn yearly(n: u32) -> Policy {
        Policy {
            keep_yearly: Some(n),
            ..Default::default()
        }
    }
    fn within(secs: u64) -> Policy {
        Policy {
            keep_within: Some(secs),
            ..Default::default()
        }
    }

    // ---- parse_duration ----

    #[test]
    fn durations() {
        let d = |s: &str| parse_duration(s).unwrap();
        assert_eq!(d("36h"), 36 * 3600);
        assert_eq!(d("7d"), 7 * 86_400);
        assert_eq!(d("2w"), 14 * 86_400);
        assert_eq!(d("6mo"), 180 * 86_400);
        assert_eq!(d("90min"), 90 * 60);
        assert_eq!(d("1y"), 365 * 86_400);
        assert_eq!(d("1y6mo"), (365 + 180) * 86_400);
        assert_eq!(d("6mo1y"), d("1y6mo"));
        assert_eq!(d("1w2d3h"), (9 * 24 + 3) * 3600);
        assert_eq!(d("0d"), 0);
        assert_eq!(d("007d"), 7 * 86_400);
        assert_eq!(d(" 7d\n"), 7 * 86_400);
    }

    #[test]
    fn bad_durations_name_the_input() {
        for (s, why) in [
            ("", "empty"),
            ("  ", "empty"),
            ("d", "unit `d` without a number"),
            ("7", "a number without a unit"),
            ("1d7", "a number without a unit"),
            ("7x", "unknown unit `x`"),
            ("7D", "unknown unit `D`"),
            ("6M", "unknown unit `M`"),
            ("-1d", "unknown unit `-`"),
            ("1.5d", "unknown unit `.`"),
            ("7 d", "unknown unit ` `"),
            ("1y 6m", "unknown unit ` `"),
            ("7dé", "unknown unit `é`"),
            ("1d2d", "unit `d` given twice"),
            ("99999999999999999999y", "number too large"),
            ("600000000000y", "too large"),
            ("584942417355y1mo", "too large"),
        ] {
            let e = parse_duration(s).unwrap_err();
            assert!(e.starts_with(&format!("`{s}` is not a duration")), "{e}");
            assert!(e.contains(why), "{s}: {e}");
        }
    }

    // ---- Policy, Reason, Decision ----

    #[test]
    fn policy_emptiness() {
        assert!(Policy::default().is_empty());
        let zeros = Policy {
            keep_last: Some(0),
            keep_hourly: Some(0),
            keep_daily: Some(0),
            keep_weekly: Some(0),
            keep_monthly: Some(0),
            keep_yearly: Some(0),
            keep_within: Some(0),
        };
        assert!(zeros.is_empty());
        for p in [
            last(1),
            hourly(1),
            daily(1),
            weekly(1),
            monthly(1),
            yearly(1),
            within(1),
        ] {
            assert!(!p.is_empty(), "{p:?}");
        }
    }

    #[test]
    fn reason_names() {
        let all = [
            (Reason::Last, "keep_last"),
            (Reason::Hourly, "keep_hourly"),
            (Reason::Daily, "keep_daily"),
            (Reason::Weekly, "keep_weekly"),
            (Reason::Monthly, "keep_monthly"),
            (Reason::Yearly, "keep_yearly"),
            (Reason::Within, "keep_within"),
            (Reason::Newest, "newest"),
            (Reason::Future, "a snapshot is dated in the future"),
            (Reason::NoPolicy, "no retention policy"),
        ];
        for (r, s) in all {
            assert_eq!(r.to_string(), s);
        }
        assert!(
            all.windows(2).all(|w| w[0].0 < w[1].0),
            "declared in rule order"
        );
    }

    #[test]
    fn decision_removed() {
        let id = at("20260101T000000Z");
        assert!(Decision { id, keep: vec![] }.removed());
        assert!(!Decision {
            id,
            keep: vec![Reason::Daily]
        }
        .removed());
    }

    #[test]
    fn policy_from_yaml() {
        let p: Policy = serde_yaml::from_str("keep_daily: 7\nkeep_within: 1y6mo\n").unwrap();
        assert_eq!(
            p,
            Policy {
                keep_daily: Some(7),
                keep_within: Some((365 + 180) * 86_400),
                ..Default::default()
            }
        );
        let p: Policy = serde_yaml::from_str("keep_last: 3\nkeep_within: ~\n").unwrap();
        assert_eq!(p, last(3));
        let p: Policy = serde_yaml::from_str("keep_last: 3\n").unwrap();
        assert_eq!(p.keep_within, None);
        let err = |y: &str| serde_yaml::from_str::<Policy>(y).unwrap_err().to_string();
        assert!(err("keep_within: 7\n").contains("`7` is not a duration"));
        assert!(err("keep_within: 7x\n").contains("`7x` is not a duration"));
        // Issue 28, trap 6: `m` meant 30 days here and minutes in hooks.timeout.
        let e = err("keep_within: 10m\n");
        assert!(
            e.contains("ambiguous") && e.contains("10mo") && e.contains("10min"),
            "{e}"
        );
        let p: Policy = serde_yaml::from_str("keep_within: 90min\n").unwrap();
        assert_eq!(p.keep_within, Some(90 * 60));
        assert!(err("keep_dayly: 7\n").contains("keep_dayly"));
        assert!(err("keep_daily: -1\n").contains("keep_daily"));
    }

    // ---- select: degenerate inputs ----

    #[test]
    fn empty_input() {
        assert!(sel(&[], &Policy::default()).is_empty());
        assert!(sel(&[], &last(3)).is_empty());
        assert!(sel(&[], &within(86_400)).is_empty());
    }

    #[test]
    fn empty_policy_keeps_all() {
        let s = series("20260101T000000Z", 5, H);
        let d = sel(&s, &Policy::default());
        assert_eq!(d.len(), 5);
        assert!(d.iter().all(|d| d.keep == [Reason::NoPolicy]));
    }

    /// Decision: 0 turns a rule off, so a policy of zeros is no policy and keeps all.
    #[test]
    fn zero_means_rule_off() {
        let s = series("20260101T000000Z", 72, H);
        let d = sel(&s, &daily(0));
        assert!(d.iter().all(|d| d.keep == [Reason::NoPolicy]));
        let p = Policy {
            keep_last: Some(1),
            keep_daily: Some(0),
            keep_within: Some(0),
            ..Default::default()
        };
        let d = sel(&s, &p);
        assert_eq!(kept(&d), ["20260103T230000Z"]);
        assert_eq!(d[0].keep, [Reason::Last]);
        let p = Policy {
            keep_last: Some(0),
            keep_hourly: Some(2),
            ..Default::default()
        };
        assert_eq!(kept(&sel(&s, &p)).len(), 2);
    }

    #[test]
    fn single_snapshot_is_kept_by_every_rule() {
        let s = ids(&["20260101T000000Z"]);
        for (p, r) in [
            (last(1), Reason::Last),
            (hourly(1), Reason::Hourly),
            (daily(5), Reason::Daily),
            (weekly(1), Reason::Weekly),
            (monthly(1), Reason::Monthly),
            (yearly(1), Reason::Yearly),
            (within(1), Reason::Within),
        ] {
            assert_eq!(sel(&s, &p)[0].keep, [r]);
        }
    }

    /// The rules follow the commit order, not the dates: after a clock went back, the last
    /// committed snapshot is the newest for keep_last and the safety net, whatever its date.
    #[test]
    fn commit_order_not_date_order() {
        let c = ids(&[
            "20260101T000000Z",
            "20260102T000000Z",
            "20260103T000000Z",
            // the clock went back a day: committed last, dated before the one above
            "20260102T120000Z",
        ]);
        let d = select(&c, &last(1), at("20260103T000000Z").unix());
        assert_eq!(kept(&d), ["20260102T120000Z"]);
        assert_eq!(d[0].keep, [Reason::Last]);
        let d = select(&c, &last(2), at("20260103T000000Z").unix());
        assert_eq!(kept(&d), ["20260102T120000Z", "20260103T000000Z"]);
        // A daily period holds two snapshots out of order: the one committed last is kept.
        let d = select(&c, &daily(2), at("20260103T000000Z").unix());
        assert_eq!(kept(&d), ["20260102T120000Z", "20260103T000000Z"]);
        // keep_within counts from the second-last committed (01-03), not the highest id.
        let d = select(&c, &within(86_400), at("20260103T000000Z").unix());
        assert_eq!(
            kept(&d),
            ["20260102T120000Z", "20260103T000000Z", "20260102T000000Z"]
        );
        // A duplicate counts where it was committed last; one decision per id.
        let dup = [c[0], c[1], c[0]];
        let d = select(&dup, &last(1), at("20260103T000000Z").unix());
        assert_eq!(d.len(), 2);
        assert_eq!(kept(&d), ["20260101T000000Z"]);
        assert_eq!(select(&c, &Policy::default(), 0).len(), 4);
    }

    #[test]
    fn newest_safety_net() {
        let mut ds: Vec<Decision> = series("20260101T000000Z", 3, H)
            .into_iter()
            .rev()
            .map(|id| Decision { id, keep: vec![] })
            .collect();
        ensure_newest(&mut ds);
        assert_eq!(ds[0].keep, [Reason::Newest]);
        assert!(ds[1].removed() && ds[2].removed());
        ds[0].keep = vec![Reason::Daily];
        ensure_newest(&mut ds);
        assert_eq!(
            ds[0].keep,
            [Reason::Daily],
            "only added when nothing kept it"
        );
        ensure_newest(&mut []);
    }

    // ---- keep_last ----

    #[test]
    fn keep_last() {
        let s = series("20260101T000000Z", 10, H);
        assert_eq!(
            kept(&sel(&s, &last(3))),
            ["20260101T090000Z", "20260101T080000Z", "20260101T070000Z"]
        );
        assert_eq!(kept(&sel(&s, &last(10))).len(), 10);
        let d = sel(&s, &last(30));
        assert_eq!(kept(&d).len(), 10, "fewer snapshots than N");
        assert!(d.iter().all(|d| d.keep == [Reason::Last]));
        // Same-second neighbours are distinct snapshots; keep_last does not look at periods.
        let s = series("20260101T000000Z", 5, 1);
        assert_eq!(kept(&sel(&s, &last(4))).len(), 4);
    }

    // ---- keep_hourly ----

    #[test]
    fn keep_hourly_skips_empty_hours_and_takes_the_newest() {
        let s = ids(&[
            "20260101T010000Z",
            "20260101T011500Z",
            "20260101T015959Z", // newest of 01h
            "20260101T050000Z",
            "20260101T090000Z",
            "20260101T090001Z", // newest of 09h
        ]);
        let d = sel(&s, &hourly(3));
        assert_eq!(
            kept(&d),
            ["20260101T090001Z", "20260101T050000Z", "20260101T015959Z"]
        );
        assert_eq!(kept(&sel(&s, &hourly(2))).len(), 2);
        assert_eq!(
            kept(&sel(&s, &hourly(99))).len(),
            3,
            "only 3 hours have any"
        );
    }

    #[test]
    fn keep_hourly_across_midnight() {
        let s = ids(&["20251231T225900Z", "20251231T235959Z", "20260101T000000Z"]);
        assert_eq!(
            kept(&sel(&s, &hourly(2))),
            ["20260101T000000Z", "20251231T235959Z"]
        );
    }

    // ---- keep_daily ----

    #[test]
    fn keep_daily_takes_the_newest_of_each_day() {
        let s = series("20260101T030000Z", 16, 6 * H); // 4 days, 4 a day
        assert_eq!(
            kept(&sel(&s, &daily(3))),
            ["20260104T210000Z", "20260103T210000Z", "20260102T210000Z"]
        );
        assert_eq!(kept(&sel(&s, &daily(10))).len(), 4, "fewer days than N");
    }

    #[test]
    fn keep_daily_day_boundary_is_utc_midnight() {
        let s = ids(&[
            "20260101T235959Z",
            "20260102T000000Z",
            "20260102T000001Z",
            "20260105T120000Z",
        ]);
        assert_eq!(
            kept(&sel(&s, &daily(3))),
            ["20260105T120000Z", "20260102T000001Z", "20260101T235959Z"]
        );
    }

    #[test]
    fn keep_daily_before_1970() {
        // Floor division: 1969-12-31 23:00 is the day before 1970-01-01 00:30.
        let s = ids(&["19691231T010000Z", "19691231T230000Z", "19700101T003000Z"]);
        assert_eq!(
            kept(&sel(&s, &daily(2))),
            ["19700101T003000Z", "19691231T230000Z"]
        );
    }

    // ---- keep_weekly ----

    #[test]
    fn keep_weekly_uses_iso_weeks_across_years() {
        let s = ids(&[
            "20201230T000000Z", // 2020-W53 Wed
            "20210103T235959Z", // 2020-W53 Sun, newest of that week
            "20210104T000000Z", // 2021-W01 Mon
            "20210110T000000Z", // 2021-W01 Sun, newest
            "20201227T120000Z", // 2020-W52 Sun
        ]);
        assert_eq!(
            kept(&sel(&s, &weekly(5))),
            ["20210110T000000Z", "20210103T235959Z", "20201227T120000Z"]
        );
        assert_eq!(
            kept(&sel(&s, &weekly(2))),
            ["20210110T000000Z", "20210103T235959Z"]
        );
    }

    #[test]
    fn keep_weekly_week_53_of_the_old_year_and_week_1_of_the_next() {
        // 2024-12-30 (Mon) is 2025-W01: it shares a week with 2025-01-05, not 2024-12-29.
        let s = ids(&["20241229T120000Z", "20241230T000000Z", "20250105T000000Z"]);
        assert_eq!(
            kept(&sel(&s, &weekly(2))),
            ["20250105T000000Z", "20241229T120000Z"]
        );
        // Sunday to Monday is a new week even within a month.
        let s = ids(&["20260315T235959Z", "20260316T000000Z"]);
        assert_eq!(kept(&sel(&s, &weekly(2))).len(), 2);
    }

    // ---- keep_monthly ----

    #[test]
    fn keep_monthly_across_year_and_leap_day() {
        let s = ids(&[
            "20231215T000000Z",
            "20231231T235959Z",
            "20240101T000000Z",
            "20240115T000000Z",
            "20240229T235959Z",
            "20240301T000000Z",
        ]);
        assert_eq!(
            kept(&sel(&s, &monthly(3))),
            ["20240301T000000Z", "20240229T235959Z", "20240115T000000Z"]
        );
        assert_eq!(
            kept(&sel(&s, &monthly(12))),
            [
                "20240301T000000Z",
                "20240229T235959Z",
                "20240115T000000Z",
                "20231231T235959Z"
            ],
            "fewer months than N"
        );
    }

    #[test]
    fn keep_monthly_same_month_different_years() {
        // January 2025 and January 2026 are different months (the key includes the year).
        let s = ids(&["20250110T000000Z", "20260110T000000Z"]);
        assert_eq!(kept(&sel(&s, &monthly(2))).len(), 2);
    }

    // ---- keep_yearly ----

    #[test]
    fn keep_yearly() {
        let s = ids(&[
            "20221231T235959Z",
            "20230101T000000Z",
            "20230601T000000Z",
            "20241231T235959Z",
            "20250101T000000Z",
        ]);
        assert_eq!(
            kept(&sel(&s, &yearly(3))),
            ["20250101T000000Z", "20241231T235959Z", "20230601T000000Z"]
        );
        assert_eq!(kept(&sel(&s, &yearly(10))).len(), 4);
        // Gaps of years do not count as years.
        let s = ids(&["20000101T000000Z", "20100101T000000Z", "20200101T000000Z"]);
        assert_eq!(kept(&sel(&s, &yearly(3))).len(), 3);
    }

    // ---- keep_within ----

    #[test]
    fn keep_within_is_inclusive() {
        let s = series("20260101T000000Z", 5, D);
        // Counted from the second-newest (01-04).
        assert_eq!(
            kept(&sel(&s, &within(2 * 86_400))),
            [
                "20260105T000000Z",
                "20260104T000000Z",
                "20260103T000000Z",
                "20260102T000000Z"
            ],
            "exactly 2 days apart is kept"
        );
        assert_eq!(
            kept(&sel(&s, &within(2 * 86_400 - 1))),
            ["20260105T000000Z", "20260104T000000Z", "20260103T000000Z"],
            "one second less and it is not"
        );
    }

    #[test]
    fn keep_within_counts_from_now_but_never_past_the_second_newest() {
        let mut s = series("20000101T000000Z", 10, D);
        let now = at("20000110T000000Z").unix();
        // From the second-newest (01-09): 01-06..01-09, and the newest.
        let d = select(&s, &within(3 * 86_400), now);
        assert_eq!(kept(&d).len(), 5);
        assert!(d
            .iter()
            .filter(|d| !d.removed())
            .all(|d| d.keep == [Reason::Within]));
        // Years later, with no new snapshot: the same (no run, no expiry).
        assert_eq!(select(&s, &within(3 * 86_400), now + 3650 * D), d);
        // A new snapshot ten days later: counted from 01-10 now.
        s.push(at("20000120T000000Z"));
        let d = select(&s, &within(3 * 86_400), at("20000120T000000Z").unix());
        assert_eq!(
            kept(&d),
            [
                "20000120T000000Z",
                "20000110T000000Z",
                "20000109T000000Z",
                "20000108T000000Z",
                "20000107T000000Z"
            ]
        );
        // A clock that went back (within the slack) counts from itself.
        let s = ids(&["20000101T000000Z", "20000105T000000Z", "20000105T000100Z"]);
        let d = select(&s, &within(3 * 86_400), at("20000104T235900Z").unix());
        // Both 01-05 snapshots are minutes ahead (within the slack): the reference is now
        // (01-04 23:59), and 01-01 is more than 3 days before it.
        assert_eq!(kept(&d), ["20000105T000100Z", "20000105T000000Z"]);
    }

    /// The clock-jump story of issue 14: daily snapshots for a year, then one run with the
    /// clock ten years ahead, then the clock back. Counted from the newest snapshot, a
    /// `keep_within: 30d` prune would delete every real snapshot. Counted from now, with
    /// the future snapshot refusing retention, nothing is deleted.
    #[test]
    fn a_snapshot_from_a_clock_ten_years_ahead_deletes_nothing() {
        let mut s = series("20250101T120000Z", 365, D);
        let real_now = s.last().unwrap().unix() + H;
        let ahead = real_now + 3652 * D;
        s.push(SnapshotId::from_unix(ahead));
        let p = Policy {
            keep_within: Some(30 * 86_400),
            keep_last: Some(3),
            ..Default::default()
        };
        // In the run with the clock ahead nothing is in the future, and keep_within counts
        // from the snapshot before it (not from that clock): the 31 real snapshots within 30
        // days of the last real one stay, with the new one.
        assert_eq!(future(&s, ahead), None);
        assert_eq!(kept(&select(&s, &p, ahead)).len(), 32);
        // Clock back: refused, everything kept, with the reason.
        assert_eq!(future(&s, real_now), Some(SnapshotId::from_unix(ahead)));
        let d = select(&s, &p, real_now);
        assert_eq!(d.len(), 366);
        assert!(d.iter().all(|d| d.keep == [Reason::Future]), "{:?}", d[0]);
        // Counted from the newest (the old semantics) or from the clock of that run, only
        // the new snapshot is within 30 days: with keep_last 3, 363 of 366 would go.
        let newest_based = s.iter().filter(|i| ahead - i.unix() <= 30 * 86_400).count();
        assert_eq!(newest_based, 1);
        // Once the future snapshot is removed, retention works again: 30 days back from
        // the second-newest (31 snapshots), and the newest.
        s.pop();
        let d = select(&s, &p, real_now);
        assert_eq!(kept(&d).len(), 32);
    }

    #[test]
    fn future_has_a_slack_for_ids_a_second_ahead() {
        let s = ids(&["20260101T000000Z", "20260101T000100Z"]);
        let t = at("20260101T000100Z").unix();
        assert_eq!(future(&s, t), None);
        assert_eq!(future(&s, t - CLOCK_SLACK), None);
        assert_eq!(future(&s, t - CLOCK_SLACK - 1), Some(s[1]));
        assert_eq!(future(&[], t), None);
        // Within the slack, the slightly-ahead snapshot counts as within, not as removed.
        let d = select(&s, &within(1), t - 30);
        assert_eq!(kept(&d), ["20260101T000100Z", "20260101T000000Z"]);
        assert_eq!(d[0].keep, [Reason::Within]);
        // No policy stays no policy even with a future snapshot.
        let d = select(&s, &Policy::default(), 0);
        assert!(d.iter().all(|d| d.keep == [Reason::NoPolicy]));
    }

    #[test]
    fn keep_within_huge_durations_do_not_overflow() {
        let s = ids(&["00000101T000000Z", "99991231T235959Z"]);
        assert_eq!(kept(&sel(&s, &within(u64::MAX))).len(), 2);
        assert_eq!(kept(&sel(&s, &within(i64::MAX as u64 + 1))).len(), 2);
        let s = [
            SnapshotId::from_unix(i64::MIN),
            SnapshotId::from_unix(i64::MAX),
        ];
        assert_eq!(sel(&s, &within(u64::MAX))[1].keep, [Reason::Within]);
        let s = [
            SnapshotId::from_unix(i64::MIN),
            SnapshotId::from_unix(i64::MAX - 1),
            SnapshotId::from_unix(i64::MAX),
        ];
        assert_eq!(sel(&s, &within(u64::MAX - 1))[2].keep, [Reason::Within]);
        assert!(sel(&s, &within(u64::MAX - 2))[2].removed());
    }

    // ---- combinations ----

    #[test]
    fn combined_rules_list_every_reason_in_order() {
        let s = series("20260101T000000Z", 48, H);
        let p = Policy {
            keep_last: Some(2),
            keep_daily: Some(2),
            ..Default::default()
        };
        let d = sel(&s, &p);
        assert_eq!(d[0].keep, [Reason::Last, Reason::Daily]);
        assert_eq!(d[1].keep, [Reason::Last]);
        assert_eq!(
            kept(&d),
            ["20260102T230000Z", "20260102T220000Z", "20260101T230000Z"]
        );
        let all = Policy {
            keep_last: Some(1),
            keep_hourly: Some(1),
            keep_daily: Some(1),
            keep_weekly: Some(1),
            keep_monthly: Some(1),
            keep_yearly: Some(1),
            keep_within: Some(1),
        };
        let d = sel(&s, &all);
        assert_eq!(
            d[1].keep,
            [Reason::Within],
            "within 1 s of the second-newest"
        );
        assert_eq!(
            d[0].keep,
            [
                Reason::Last,
                Reason::Hourly,
                Reason::Daily,
                Reason::Weekly,
                Reason::Monthly,
                Reason::Yearly,
                Reason::Within
            ]
        );
        assert_eq!(kept(&d).len(), 2);
    }

    /// A typical schedule: hourly backups for 400 days under a restic-style policy.
    #[test]
    fn realistic_policy() {
        let s = series("20250101T003000Z", 401 * 24, H);
        let p = Policy {
            keep_hourly: Some(24),
            keep_daily: Some(7),
            keep_weekly: Some(4),
            keep_monthly: Some(12),
            keep_yearly: Some(3),
            ..Default::default()
        };
        let d = sel(&s, &p);
        let newest = s.last().unwrap().to_string();
        assert_eq!(newest, "20260205T233000Z");
        assert_eq!(
            reasons(&d, &newest),
            [
                Reason::Hourly,
                Reason::Daily,
                Reason::Weekly,
                Reason::Monthly,
                Reason::Yearly
            ]
        );
        // Hourly: the 24 of 2026-02-05. Daily: 02-05 back to 01-30. Weekly (ISO weeks end on
        // Sunday; 02-05 is the Thursday of W06): 02-05, 02-01, 01-25, 01-18. Monthly: the last
        // snapshot of each month from 2026-02 back to 2025-03. Yearly: 2026 and 2025 only.
        assert_eq!(
            reasons(&d, "20260201T233000Z"),
            [Reason::Daily, Reason::Weekly]
        );
        assert_eq!(reasons(&d, "20260125T233000Z"), [Reason::Weekly]);
        assert_eq!(reasons(&d, "20260118T233000Z"), [Reason::Weekly]);
        assert!(d
            .iter()
            .find(|x| x.id == at("20260111T233000Z"))
            .unwrap()
            .removed());
        assert_eq!(
            reasons(&d, "20260131T233000Z"),
            [Reason::Daily, Reason::Monthly]
        );
        assert_eq!(
            reasons(&d, "20251231T233000Z"),
            [Reason::Monthly, Reason::Yearly]
        );
        assert_eq!(reasons(&d, "20250331T233000Z"), [Reason::Monthly]);
        assert!(d
            .iter()
            .find(|x| x.id == at("20250228T233000Z"))
            .unwrap()
            .removed());
        let by = |r: Reason| d.iter().filter(|x| x.keep.contains(&r)).count();
        assert_eq!(
            (
                by(Reason::Hourly),
                by(Reason::Daily),
                by(Reason::Weekly),
                by(Reason::Monthly),
                by(Reason::Yearly)
            ),
            (24, 7, 4, 12, 2)
        );
        // 24 hourly + 6 more days + 2 more weeks (02-01 is already a daily) + 10 more months
        // (01-31 is a daily too) + no more years (2025-12-31 is a monthly).
        assert_eq!(kept(&d).len(), 24 + 6 + 2 + 10);
    }

    // ---- randomized, against an independent model ----

    /// Knuth's MMIX LCG: deterministic, no `rand` crate.
    struct Lcg(u64);
    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n.max(1)
        }
        fn rule(&mut self) -> Option<u32> {
            match self.below(6) {
                0 | 1 => None,
                2 => Some(0),
                _ => Some(1 + self.below(10) as u32),
            }
        }
    }

    /// The rules restated the slow, obvious way: group by calendar fields, rank the groups,
    /// keep each chosen group's maximum. Shares nothing with `select` but `civil()`.
    fn model(input: &[SnapshotId], p: &Policy, now: i64) -> BTreeMap<SnapshotId, Vec<Reason>> {
        let set: BTreeSet<SnapshotId> = input.iter().copied().collect();
        let mut out: BTreeMap<SnapshotId, Vec<Reason>> =
            set.iter().map(|&id| (id, Vec::new())).collect();
        let any = [
            p.keep_last,
            p.keep_hourly,
            p.keep_daily,
            p.keep_weekly,
            p.keep_monthly,
            p.keep_yearly,
        ]
        .iter()
        .any(|v| v.unwrap_or(0) > 0)
            || p.keep_within.unwrap_or(0) > 0;
        if !any {
            out.values_mut().for_each(|v| v.push(Reason::NoPolicy));
            return out;
        }
        if set
            .iter()
            .any(|id| i128::from(id.unix()) > i128::from(now) + 300)
        {
            out.values_mut().for_each(|v| v.push(Reason::Future));
            return out;
        }
        for &id in set.iter().rev().take(p.keep_last.unwrap_or(0) as usize) {
            out.get_mut(&id).unwrap().push(Reason::Last);
        }
        type Fields = fn(&Civil) -> (i64, i64, i64, i64);
        let periods: [(Option<u32>, Reason, Fields); 5] = [
            (p.keep_hourly, Reason::Hourly, |c| {
                (c.year, c.month.into(), c.day.into(), c.hour.into())
            }),
            (p.keep_daily, Reason::Daily, |c| {
                (c.year, c.month.into(), c.day.into(), 0)
            }),
            (p.keep_weekly, Reason::Weekly, |c| {
                (c.iso_year, c.iso_week.into(), 0, 0)
            }),
            (p.keep_monthly, Reason::Monthly, |c| {
                (c.year, c.month.into(), 0, 0)
            }),
            (p.keep_yearly, Reason::Yearly, |c| (c.year, 0, 0, 0)),
        ];
        for (n, reason, fields) in periods {
            let mut groups: BTreeMap<(i64, i64, i64, i64), SnapshotId> = BTreeMap::new();
            for &id in &set {
                let g = groups.entry(fields(&id.civil())).or_insert(id);
                *g = (*g).max(id);
            }
            for (_, id) in groups.iter().rev().take(n.unwrap_or(0) as usize) {
                out.get_mut(id).unwrap().push(reason);
            }
        }
        if let Some(w) = p.keep_within.filter(|w| *w > 0) {
            let second = set.iter().rev().nth(1).or(set.iter().next_back());
            let reference = second.map_or(now, |s| s.unix().min(now));
            for (id, v) in out.iter_mut() {
                if i128::from(reference) - i128::from(id.unix()) <= i128::from(w) {
                    v.push(Reason::Within);
                }
            }
        }
        if let Some(v) = out.values_mut().next_back() {
            if v.is_empty() {
                v.push(Reason::Newest);
            }
        }
        out
    }

    #[test]
    fn randomized_against_model_and_invariants() {
        let mut r = Lcg(0x5eed);
        let bases = [at("19690601T000000Z"), at("20201225T000000Z")];
        // Spreads from hours to decades, so that every rule sees both crowded and sparse
        // periods.
        let spreads = [2 * H, 3 * D, 60 * D, 3 * 365 * D, 40 * 365 * D];
        for round in 0..3000 {
            let base = bases[r.below(2) as usize].unix();
            let spread = spreads[r.below(spreads.len() as u64) as usize];
            let n = r.below(60) as usize;
            let mut snaps: Vec<SnapshotId> = (0..n)
                .map(|_| SnapshotId::from_unix(base + r.below(spread as u64) as i64))
                .collect();
            // Some duplicates.
            for _ in 0..r.below(4) {
                if let Some(&x) = snaps.get(r.below(n as u64) as usize) {
                    snaps.push(x);
                }
            }
            let p = Policy {
                keep_last: r.rule(),
                keep_hourly: r.rule(),
                keep_daily: r.rule(),
                keep_weekly: r.rule(),
                keep_monthly: r.rule(),
                keep_yearly: r.rule(),
                keep_within: match r.below(4) {
                    0 | 1 => None,
                    2 => Some(0),
                    _ => Some(r.below(spread as u64 / 2)),
                },
            };
            // Now: mostly at or after the newest snapshot, sometimes (a clock set back)
            // before it.
            let newest = snaps.iter().map(|i| i.unix()).max().unwrap_or(base);
            let now = match r.below(5) {
                0 => newest,
                1 => newest - r.below(2 * CLOCK_SLACK as u64) as i64,
                2 => newest - r.below(spread as u64) as i64,
                _ => newest + r.below(spread as u64) as i64,
            };
            // Committed in date order (the model ranks by date).
            let d = select(&in_date_order(&snaps), &p, now);
            let ctx = format!("round {round}: now {now} {p:?}");

            // Same answer as the model, reason lists included.
            let want = model(&snaps, &p, now);
            let got: BTreeMap<SnapshotId, Vec<Reason>> =
                d.iter().map(|x| (x.id, x.keep.clone())).collect();
            assert_eq!(got, want, "{ctx}");

            // removed ∪ kept = input (as a set), one decision each, newest first.
            let input: BTreeSet<SnapshotId> = snaps.iter().copied().collect();
            let output: BTreeSet<SnapshotId> = d.iter().map(|x| x.id).collect();
            assert_eq!(output, input, "{ctx}");
            assert_eq!(d.len(), input.len(), "{ctx}");
            assert!(d.windows(2).all(|w| w[0].id > w[1].id), "{ctx}");

            // The newest is kept.
            if let Some(first) = d.first() {
                assert_eq!(Some(&first.id), input.last(), "{ctx}");
                assert!(!first.removed(), "{ctx}");
            }
            // Every kept snapshot has a reason, reasons are distinct and in order.
            for x in &d {
                assert!(x.keep.windows(2).all(|w| w[0] < w[1]), "{ctx}");
            }
            // Rule counts never exceed N.
            let by = |reason: Reason| d.iter().filter(|x| x.keep.contains(&reason)).count();
            for (reason, lim) in [
                (Reason::Last, p.keep_last),
                (Reason::Hourly, p.keep_hourly),
                (Reason::Daily, p.keep_daily),
                (Reason::Weekly, p.keep_weekly),
                (Reason::Monthly, p.keep_monthly),
                (Reason::Yearly, p.keep_yearly),
            ] {
                assert!(by(reason) <= lim.unwrap_or(0) as usize, "{ctx}");
            }
            // keep_last alone keeps exactly min(N, count).
            let k = r.below(12) as u32;
            let only_last = sel(&snaps, &last(k));
            let n_kept = only_last.iter().filter(|x| !x.removed()).count();
            if k == 0 {
                assert_eq!(n_kept, input.len(), "0 = no policy = keep all");
            } else {
                assert_eq!(n_kept, (k as usize).min(input.len()), "{ctx}");
            }
        }
    }
}
