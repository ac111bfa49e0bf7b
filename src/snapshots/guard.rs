//! What a snapshot must pass before it is committed, so that a source that is missing its
//! data (an external disk or a network share not mounted: its mount point is an empty
//! directory) never becomes the newest snapshot and lets retention push out the real ones:
//! - before rsync, each `backup.require_mount` path must be a mount point, and a source
//!   that is empty now must have been empty in the previous snapshot too;
//! - after rsync, the number of entries it counted (`Number of files:` of `--stats`) must
//!   not have fallen by more than `backup.max_shrink` since the last committed snapshot.
//!
//! `run --allow-shrink` lets one run through the last two (not the mount points).

use std::path::Path;

use anyhow::{bail, Result};

use crate::profile::Profile;
use crate::stack::mount::MountEntry;

/// Below this many entries in the last snapshot, a shrink is not judged: a handful of
/// files is not a source whose loss the share could tell from a clean-up. (An emptied
/// source is caught by [`before`] at any size.)
pub const SHRINK_MIN_ENTRIES: u64 = 100;

/// What [`crate::snapshots::take_guarded`] checks against.
#[derive(Debug, Clone, Copy, Default)]
pub struct Guard {
    /// `run --allow-shrink`: an emptied or shrunk source is committed.
    pub allow_shrink: bool,
    /// The entries rsync counted for the last committed snapshot (the client's record).
    pub previous_entries: Option<u64>,
}

const OVERRIDE: &str = "if that is intended, run once with `e2ebackup run --allow-shrink`";

/// Each `backup.require_mount` path that is not a mount point in `mounts`.
pub fn not_mounted<'a>(profile: &'a Profile, mounts: &[MountEntry]) -> Vec<&'a Path> {
    profile
        .backup
        .require_mount
        .iter()
        .map(|m| m.0.as_path())
        .filter(|m| {
            let real = std::fs::canonicalize(m).unwrap_or_else(|_| m.to_path_buf());
            !mounts.iter().any(|e| e.target == real)
        })
        .collect()
}

/// First of all: each `backup.require_mount` path is a mount point.
pub fn mounted(profile: &Profile, mounts: &[MountEntry]) -> Result<()> {
    if let Some(m) = not_mounted(profile, mounts).first() {
        bail!(
            "{} must be a mount point (backup.require_mount) and nothing is mounted there: \
             is its disk or share attached? Nothing was copied, committed or pruned",
            m.display()
        );
    }
    Ok(())
}

/// Before rsync: no source that was not empty in `previous` (the previous snapshot's id
/// and directory) is empty now.
pub fn before(profile: &Profile, previous: Option<(&str, &Path)>, guard: &Guard) -> Result<()> {
    if guard.allow_shrink {
        return Ok(());
    }
    let Some((prev_id, prev)) = previous else {
        return Ok(());
    };
    // A directory that cannot be listed counts as holding entries here: rsync names it
    // as not read.
    let has_entries = |p: &Path, unlistable: bool| {
        std::fs::read_dir(p)
            .map(|mut d| d.next().is_some())
            .unwrap_or(unlistable)
    };
    for s in &profile.backup.sources {
        if !s.0.is_dir() || has_entries(&s.0, true) {
            continue;
        }
        let before = prev.join(s.0.strip_prefix("/").unwrap_or(&s.0));
        if has_entries(&before, false) {
            bail!(
                "backup source {} is empty, but the previous snapshot {prev_id} holds files \
                 there: is its disk or share mounted? Nothing was committed or pruned; {OVERRIDE}",
                s.0.display()
            );
        }
    }
    Ok(())
}

/// After rsync: `entries` (rsync's count for this snapshot) against the last snapshot's.
pub fn shrink(profile: &Profile, entries: Option<u64>, guard: &Guard) -> Result<()> {
    let (Some(now), Some(before)) = (entries, guard.previous_entries) else {
        return Ok(());
    };
    if guard.allow_shrink || before < SHRINK_MIN_ENTRIES || now >= before {
        return Ok(());
    }
    let max = u64::from(profile.backup.max_shrink.0);
    let lost = (before - now) * 100;
    if max < 100 && lost > before * max {
        bail!(
            "the sources hold {now} entries, down from {before} in the last snapshot \
             ({}% fewer, more than backup.max_shrink {}): is a disk or share not mounted? \
             Nothing was committed or pruned; {OVERRIDE}",
            lost / before,
            profile.backup.max_shrink
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(extra: &str) -> Profile {
        Profile::parse(
            Path::new("t.yaml"),
            &format!(
                "server: {{host: h, user: u, identity_file: /k, known_hosts: /kh, path: /srv}}\n\
                 container: {{file: c.luks, size: 1G, keyfile: /key}}\n\
                 backup: {{sources: [/etc, /mnt/data/photos]{extra}}}\n"
            ),
        )
        .unwrap()
    }

    #[test]
    fn shrink_is_refused_beyond_the_share() {
        let p = profile("");
        let g = |prev| Guard {
            allow_shrink: false,
            previous_entries: Some(prev),
        };
        assert!(shrink(&p, Some(1000), &g(1000)).is_ok());
        assert!(shrink(&p, Some(500), &g(1000)).is_ok(), "50% is allowed");
        let e = shrink(&p, Some(499), &g(1000)).unwrap_err().to_string();
        assert!(e.contains("499 entries, down from 1000"), "{e}");
        assert!(e.contains("--allow-shrink"), "{e}");
        // Small sources, no record, or the override: not judged.
        assert!(shrink(&p, Some(1), &g(SHRINK_MIN_ENTRIES - 1)).is_ok());
        assert!(shrink(&p, Some(1), &Guard::default()).is_ok());
        let allow = Guard {
            allow_shrink: true,
            ..g(1000)
        };
        assert!(shrink(&p, Some(1), &allow).is_ok());
        let p = profile(", max_shrink: 10%");
        assert!(shrink(&p, Some(899), &g(1000)).is_err());
        let p = profile(", max_shrink: 100%");
        assert!(shrink(&p, Some(0), &g(1000)).is_ok());
    }

    #[test]
    fn mount_points_are_checked() {
        let p = profile(", require_mount: [/mnt/data]");
        let mi = |t: &str| {
            crate::stack::mount::parse_mountinfo(&format!(
                "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n45 22 8:3 / {t} rw - ext4 /dev/sdb1 rw\n"
            ))
        };
        assert!(mounted(&p, &mi("/mnt/data")).is_ok());
        let e = mounted(&p, &mi("/mnt/other")).unwrap_err();
        assert!(
            e.to_string().contains("/mnt/data must be a mount point"),
            "{e}"
        );
    }

    #[test]
    fn an_emptied_source_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let prev = d.path().join("snap");
        let copy = prev.join(src.strip_prefix("/").unwrap());
        std::fs::create_dir_all(&copy).unwrap();
        let p = Profile::parse(
            Path::new("t.yaml"),
            &format!(
                "server: {{host: h, user: u, identity_file: /k, known_hosts: /kh, path: /srv}}\n\
                 container: {{file: c.luks, size: 1G, keyfile: /key}}\n\
                 backup: {{sources: ['{}']}}\n",
                src.display()
            ),
        )
        .unwrap();
        let g = Guard::default();
        // Empty then, empty now: fine.
        assert!(before(&p, Some(("S", &prev)), &g).is_ok());
        std::fs::write(copy.join("f"), b"x").unwrap();
        let e = before(&p, Some(("S", &prev)), &g).unwrap_err();
        assert!(
            e.to_string()
                .contains("is empty, but the previous snapshot S"),
            "{e}"
        );
        let allow = Guard {
            allow_shrink: true,
            ..g
        };
        assert!(before(&p, Some(("S", &prev)), &allow).is_ok());
        std::fs::write(src.join("f"), b"x").unwrap();
        assert!(before(&p, Some(("S", &prev)), &g).is_ok());
    }
}
