//! The container's layout (module doc of [`crate::snapshots`]): creating and checking it,
//! listing snapshots, the id of a new one, and removing them (partials, retention).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::profile::Profile;
use crate::snapid::SnapshotId;
use crate::stack::mount;
use crate::{info, warn};

pub const FORMAT_LINE: &str = "e2ebackup container format 1";
pub const SNAPSHOTS: &str = "snapshots";
pub const PARTIAL: &str = ".partial";

/// Create the layout in a freshly made filesystem.
pub fn create_layout(root: &Path) -> Result<()> {
    std::fs::create_dir(root.join(SNAPSHOTS))?;
    std::fs::create_dir(root.join(crate::manifest::MANIFESTS))?;
    std::fs::create_dir(root.join(PARTIAL))?;
    std::fs::write(root.join("FORMAT"), format!("{FORMAT_LINE}\n"))?;
    // lost+found stays: e2fsck wants it.
    mount::syncfs(root)
}

/// Refuse a filesystem that is not ours (wrong container), or a damaged one: a read that
/// the kernel's ext4 refuses for a checksum ([`crate::error::fs_damage`]) is exit 6, called
/// damage, naming the snapshots that still read.
pub fn check_layout(root: &Path) -> Result<()> {
    let damage = |what: &str, e: std::io::Error| -> anyhow::Error {
        let e = anyhow::Error::from(e);
        match crate::error::fs_damage(&e) {
            Some(why) => {
                crate::error::damaged(format!("{what}: {why}: {e}"), &readable_snapshots(root))
            }
            None => e.context(what.to_string()),
        }
    };
    let f = match std::fs::read_to_string(root.join("FORMAT")) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(damage("reading FORMAT", e)),
    };
    let snapshots_dir = match std::fs::metadata(root.join(SNAPSHOTS)) {
        Ok(m) => m.is_dir(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(damage("looking up snapshots/", e)),
    };
    if f.trim() != FORMAT_LINE || !snapshots_dir {
        bail!(
            "the container's filesystem does not hold an e2ebackup layout (FORMAT file missing or unknown: {:?})",
            f.trim()
        );
    }
    Ok(())
}

/// Which snapshots still read in a damaged container (a sentence for the damage message):
/// each one's top directory listed, nothing more.
pub fn readable_snapshots(root: &Path) -> String {
    let dir = root.join(SNAPSHOTS);
    let names = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect::<Vec<_>>(),
        Err(e) => return format!("The list of snapshots does not read either ({e}). "),
    };
    let (mut ok, mut bad) = (Vec::new(), Vec::new());
    for n in names {
        match std::fs::read_dir(dir.join(&n)).map(|rd| rd.count()) {
            Ok(_) => ok.push(n),
            Err(_) => bad.push(n),
        }
    }
    ok.sort();
    bad.sort();
    format!(
        "Snapshots whose top directory still reads: {}; that do not: {}. ",
        if ok.is_empty() {
            "none".into()
        } else {
            ok.join(", ")
        },
        if bad.is_empty() {
            "none".into()
        } else {
            bad.join(", ")
        }
    )
}

/// The directory `snapshots/` as it is, sorted by id: NOT the authenticated list (that is
/// [`crate::session::Session::snapshots`], in commit order); used to check against it and to
/// pick an id no entry has. Entries that are not snapshot ids are reported, not used.
pub fn list(root: &Path) -> Result<Vec<SnapshotId>> {
    let dir = root.join(SNAPSHOTS);
    let mut v = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        let name = e.file_name();
        match name.to_str().and_then(|n| n.parse::<SnapshotId>().ok()) {
            Some(id) if e.file_type()?.is_dir() => v.push(id),
            _ => warn!(
                "ignoring {} in snapshots/: not a snapshot",
                name.to_string_lossy()
            ),
        }
    }
    v.sort();
    Ok(v)
}

pub fn path_of(root: &Path, id: SnapshotId) -> PathBuf {
    root.join(SNAPSHOTS).join(id.to_string())
}

/// Remove what killed or failed runs left under `.partial/`, and their manifests not yet
/// put in place.
pub fn remove_partials(root: &Path) -> Result<usize> {
    crate::manifest::remove_temporaries(root)?;
    let dir = root.join(PARTIAL);
    let mut n = 0;
    for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        info!(
            "removing incomplete snapshot {} left by an earlier run",
            p.display()
        );
        remove_tree(&p)?;
        n += 1;
    }
    Ok(n)
}

/// Delete a directory tree (a snapshot is a hard-link farm: unlinks only, no data copying).
pub fn remove_tree(p: &Path) -> Result<()> {
    std::fs::remove_dir_all(p).with_context(|| format!("removing {}", p.display()))
}

/// Apply the retention policy to `committed` (the authenticated snapshots, in commit order)
/// in the mounted container at `root`. Returns the decisions (last committed first). With
/// `dry_run` nothing is removed. Before removing, the client notes what it removes
/// ([`crate::generation::note_pending`]), so that a crash before the commit is not taken for
/// tampering. The removals are not synced: the caller commits the generation next, which
/// makes them durable.
pub fn prune(
    p: &Profile,
    root: &Path,
    committed: &[SnapshotId],
    dry_run: bool,
) -> Result<Vec<crate::retention::Decision>> {
    use crate::retention;
    // The clock, unless it jumped ahead since the last commit of this boot.
    let now = crate::generation::trusted_now(p);
    let mut decisions = retention::select(committed, &p.retention, now);
    keep_last_data(p, root, &mut decisions);
    if p.retention.is_empty() {
        return Ok(decisions);
    }
    if let Some(f) = retention::future(committed, now) {
        warn!(
            "snapshot(s) {} dated in the future (this clock reads {}; was it set ahead when they were taken?): \
             retention is suspended and nothing is pruned until the clock passes {f}; `latest` is the last \
             committed snapshot, whatever its date; if those dates are wrong, see docs/operations.md (clock jumps)",
            retention::dated_in_future(committed, now)
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            crate::snapid::SnapshotId::from_unix(now)
        );
        return Ok(decisions);
    }
    let removed: Vec<SnapshotId> = decisions
        .iter()
        .filter(|d| d.removed())
        .map(|d| d.id)
        .collect();
    if dry_run || removed.is_empty() {
        return Ok(decisions);
    }
    crate::generation::note_pending(p, None, &removed)?;
    for id in removed {
        crate::signals::check()?;
        info!("pruning snapshot {id}");
        // Move out of snapshots/ first (atomic), so an interrupted delete never leaves
        // a half-deleted tree that looks like a complete snapshot.
        let from = path_of(root, id);
        let to = root.join(PARTIAL).join(format!("{id}.pruning"));
        std::fs::rename(&from, &to)?;
        remove_tree(&to)?;
        let m = crate::manifest::path_of(root, &id.to_string());
        if m.exists() {
            std::fs::remove_file(&m)?;
        }
    }
    // Not synced here: the generation commit that follows makes the removals durable
    // (its fsync commits their journal transactions), one journal commit less.
    Ok(decisions)
}

/// The newest snapshot in which a source had entries is never removed only because newer
/// snapshots exist in which it is empty (a disk or share that was not mounted, committed with
/// `run --allow-shrink` or before `backup.max_shrink` existed): for each source, if the
/// newest snapshots have it empty and the newest one that holds its data is to be removed,
/// that one is kept ([`crate::retention::Reason::LastData`]). A source that is
/// empty in the newest snapshot costs a directory read per snapshot back to its data.
/// `decisions` are last committed first.
pub fn keep_last_data(p: &Profile, root: &Path, decisions: &mut [crate::retention::Decision]) {
    let has_entries = |id: SnapshotId, src: &Path| {
        let d = path_of(root, id).join(src.strip_prefix("/").unwrap_or(src));
        std::fs::read_dir(d)
            .map(|mut e| e.next().is_some())
            .unwrap_or(false)
    };
    for s in &p.backup.sources {
        let Some(i) = decisions.iter().position(|d| has_entries(d.id, &s.0)) else {
            continue;
        };
        let d = &mut decisions[i];
        if i > 0 && d.removed() {
            warn!(
                "keeping snapshot {}: the newer snapshots have {} empty, and it is the last that \
                 holds its data",
                d.id,
                s.0.display()
            );
            d.keep.push(crate::retention::Reason::LastData);
        }
    }
}

/// The id of a new snapshot taken at `now`, given the ids in `snapshots/` (`existing`, sorted)
/// and the authenticated snapshots in commit order (`committed`); and the snapshot to
/// hard-link unchanged files to: the last one committed.
///
/// The id is the clock's time, bumped only past an id that exists (two runs within one
/// second). It is not bumped past the newest snapshot: after one run with a clock years
/// ahead, every later id would otherwise be "newest + 1", dated in that future for good
/// (retention stops while a snapshot is in the future, see retention::future). So after a
/// clock jump back, ids are no longer in the order the runs happened; the order that counts
/// ("latest", the link target, retention) is the commit order that STATE records.
pub fn new_id(
    existing: &[SnapshotId],
    committed: &[SnapshotId],
    now: SnapshotId,
) -> (SnapshotId, Option<SnapshotId>) {
    let mut id = now;
    while existing.binary_search(&id).is_ok() || committed.contains(&id) {
        id = SnapshotId::from_unix(id.unix() + 1);
    }
    (id, committed.last().copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_follow_the_clock_and_link_to_the_last_committed() {
        let i = |s: &str| s.parse::<SnapshotId>().unwrap();
        let none: [SnapshotId; 0] = [];
        assert_eq!(
            new_id(&none, &none, i("20260101T000000Z")),
            (i("20260101T000000Z"), None)
        );
        let ex = [i("20260101T000000Z"), i("20260102T000000Z")];
        assert_eq!(
            new_id(&ex, &ex, i("20260103T000000Z")),
            (i("20260103T000000Z"), Some(i("20260102T000000Z")))
        );
        // Same second as an existing one: bumped.
        assert_eq!(
            new_id(&ex, &ex, i("20260102T000000Z")),
            (i("20260102T000001Z"), Some(i("20260102T000000Z")))
        );
        // A snapshot ten years ahead, clock back: the id is the clock's, not 2036 + 1 s,
        // and unchanged files link to the last committed one, whatever its date.
        let ex = [
            i("20260101T000000Z"),
            i("20260102T000000Z"),
            i("20360102T000000Z"),
        ];
        assert_eq!(
            new_id(&ex, &ex, i("20260103T000000Z")),
            (i("20260103T000000Z"), Some(i("20360102T000000Z")))
        );
        // After the clock went back, commit order and id order differ: the link target is
        // the last committed one, not the highest id.
        let committed = [ex[0], ex[2], ex[1]];
        assert_eq!(
            new_id(&ex, &committed, i("20260103T000000Z")).1,
            Some(i("20260102T000000Z"))
        );
        // An entry of snapshots/ that is not committed (unlisted) still takes its id.
        let dir = [i("20260101T000000Z"), i("20260101T000001Z")];
        assert_eq!(
            new_id(&dir, &dir[..1], i("20260101T000000Z")),
            (i("20260101T000002Z"), Some(i("20260101T000000Z")))
        );
    }

    /// keep_last 1: the two newer snapshots have /data empty; the one before them, the last
    /// with its data, stays, the oldest goes.
    #[test]
    fn the_last_snapshot_with_a_sources_data_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        create_layout(r).unwrap();
        let ids = [
            "20260101T000000Z",
            "20260102T000000Z",
            "20260103T000000Z",
            "20260104T000000Z",
        ];
        for (i, id) in ids.iter().enumerate() {
            let data = r.join(SNAPSHOTS).join(id).join("data");
            std::fs::create_dir_all(&data).unwrap();
            std::fs::create_dir_all(r.join(SNAPSHOTS).join(id).join("etc/x")).unwrap();
            if i < 2 {
                std::fs::write(data.join("f"), b"x").unwrap();
            }
        }
        let p = Profile::parse(
            Path::new("t.yaml"),
            "server: {host: h, user: u, identity_file: /k, known_hosts: /kh, path: /srv}\n\
             container: {file: c.luks, size: 1G, keyfile: /key}\n\
             backup: {sources: [/data, /etc]}\nretention: {keep_last: 1}\n",
        )
        .unwrap();
        // A dry run: a real one notes its removals in the client's state directory
        // (/var/lib/e2ebackup), which a unit test leaves alone.
        let decisions = prune(&p, r, &list(r).unwrap(), true).unwrap();
        let kept: Vec<String> = decisions
            .iter()
            .filter(|d| !d.removed())
            .map(|d| format!("{} {:?}", d.id, d.keep))
            .collect();
        assert_eq!(
            kept,
            ["20260104T000000Z [Last]", "20260102T000000Z [LastData]"]
        );
        assert_eq!(list(r).unwrap().len(), 4, "a dry run removes nothing");
    }

    #[test]
    fn layout_listing_and_partials() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        create_layout(r).unwrap();
        check_layout(r).unwrap();
        for id in ["20260101T000000Z", "20251231T235959Z"] {
            std::fs::create_dir(r.join(SNAPSHOTS).join(id)).unwrap();
        }
        std::fs::create_dir(r.join(SNAPSHOTS).join("junk")).unwrap();
        let l = list(r).unwrap();
        assert_eq!(
            l.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
            ["20251231T235959Z", "20260101T000000Z"]
        );
        std::fs::create_dir_all(r.join(PARTIAL).join("20260102T000000Z/etc")).unwrap();
        // The manifest that run wrote but never put in place goes with it; the others stay.
        let manifests = r.join(crate::manifest::MANIFESTS);
        std::fs::write(manifests.join(".20260102T000000Z.tmp-4242"), b"x").unwrap();
        std::fs::write(manifests.join("20260101T000000Z"), b"kept").unwrap();
        assert_eq!(remove_partials(r).unwrap(), 1);
        assert_eq!(std::fs::read_dir(r.join(PARTIAL)).unwrap().count(), 0);
        let left: Vec<_> = std::fs::read_dir(&manifests)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["20260101T000000Z"]);
        std::fs::remove_file(r.join("FORMAT")).unwrap();
        assert!(check_layout(r).is_err());
    }
}
