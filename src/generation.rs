//! Rollback and replay detection, above the block layer.
//!
//! LUKS2 with XTS hides data but cannot tell an old sector from a new one: a server can
//! hand back yesterday's container (or last month's) and it decrypts fine. So the container
//! holds a `STATE` file with a generation counter and the list of snapshots, authenticated
//! with HMAC-SHA256 under a key derived from the keyfile (the server cannot forge it), and
//! the client remembers the last generation it committed in
//! `/var/lib/e2ebackup/<profile>/generation`. Every open compares the two: a container older
//! than the client's record is refused (exit 6) before anything is written.
//!
//! Commit order: the container's STATE first (synced), the client's record second. A crash
//! in between leaves the container one generation ahead, which is accepted; the opposite
//! order would raise a false alarm. The `syncfs` also matters for a crash image read with
//! `ro,noload` (no journal replay): it writes the journaled metadata home after the journal
//! commit, where the file and directory fsyncs alone leave it in the journal, so such an
//! image shows the committed generation, not the one before (tests/host_crash_noload.rs).
//! After a deliberate restore of the server from an older
//! backup, `e2ebackup accept-rollback PROFILE` lowers the client's record to the container's.
//!
//! The snapshot list (issue 27 item 2, issue 29 items 2 and 7):
//! - STATE lists the snapshots in the order they were committed (oldest first). "Latest",
//!   `keep_last` and `keep_within`'s reference follow that order, not the clock's id. A STATE
//!   written before this order was kept lists them by id, which was the commit order as long
//!   as the clock never jumped back.
//! - Every open ([`check`]) requires each listed snapshot to be in `snapshots/`; a missing one
//!   is refused (exit 6) and named: a server that replays an older block of the `snapshots/`
//!   directory hides the newer snapshots without breaking any ext4 checksum. Entries of
//!   `snapshots/` that STATE does not name are reported and never used.
//! - [`commit`] writes the list the command computed (the authenticated list, plus the
//!   snapshot it took, minus what its retention removed), never the directory's listing.
//! - The client keeps the same list ([`ClientRecord`], `snapshots.json` beside `generation`),
//!   and notes before a rename or a removal what it is about to add or remove (`adding`,
//!   `gone`): a crash between those and the commit is then recognised as this client's own
//!   unfinished work, not as tampering. `accept-rollback` uses the list to say what was lost.

use std::path::Path;

use anyhow::{Context, Result};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::Failure;
use crate::profile::Profile;
use crate::snapid::SnapshotId;
use crate::stack::luks::Key;
use crate::warn;

pub const STATE_FILE: &str = "STATE";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub generation: u64,
    pub snapshots: Vec<String>,
    /// When this generation was committed (snapshot id form).
    pub written: String,
    /// Hex HMAC-SHA256 of the fields above.
    pub mac: String,
}

/// A key for this purpose only, so the MAC reveals nothing about the LUKS keyslot key.
/// Zeroed when dropped (`Zeroizing`), like the key it is derived from.
fn mac_key(key: &Key) -> zeroize::Zeroizing<[u8; 32]> {
    let mut h = Sha256::new();
    h.update(b"e2ebackup generation MAC v1\0");
    h.update(key.bytes());
    zeroize::Zeroizing::new(h.finalize().into())
}

fn compute_mac(key: &Key, generation: u64, snapshots: &[String], written: &str) -> String {
    let mk = mac_key(key);
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&mk[..]).expect("any key length");
    m.update(format!("generation {generation}\nwritten {written}\n").as_bytes());
    for s in snapshots {
        m.update(format!("snapshot {s}\n").as_bytes());
    }
    crate::manifest::hex(&m.finalize().into_bytes())
}

/// Read and authenticate the container's STATE (None for a container without one yet).
pub fn read_verified(root: &Path, key: &Key) -> Result<Option<State>> {
    let p = root.join(STATE_FILE);
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
    };
    let st: State = serde_json::from_slice(&bytes).map_err(|e| {
        Failure::Security(format!(
            "the container's STATE record is unreadable ({e}): damaged or tampered with"
        ))
    })?;
    let want = compute_mac(key, st.generation, &st.snapshots, &st.written);
    // Compare in constant time: the MAC is secret-dependent.
    let ok = want.len() == st.mac.len()
        && want
            .bytes()
            .zip(st.mac.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !ok {
        return Err(Failure::Security(
            "the container's STATE record does not authenticate with this keyfile: it was altered"
                .into(),
        )
        .into());
    }
    Ok(Some(st))
}

/// The last generation this client committed, if any.
pub fn client_generation(p: &Profile) -> Result<Option<u64>> {
    match std::fs::read_to_string(p.generation_record()) {
        Ok(s) => Ok(Some(s.trim().parse().with_context(|| {
            format!("{} is not a number", p.generation_record().display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub fn set_client_generation(p: &Profile, generation: u64) -> Result<()> {
    crate::fsutil::private_dir(&p.state_dir())?;
    crate::fsutil::write_atomic(&p.generation_record(), format!("{generation}\n").as_bytes())
}

/// The decision, separated from I/O so it is tested on its own.
pub fn judge(container: Option<u64>, client: Option<u64>) -> Result<u64, String> {
    match (container, client) {
        (Some(c), Some(k)) if c < k => Err(format!(
            "the container is at generation {c} but this client already committed generation {k}: \
             the server handed back an OLDER copy of the container (rollback or replay). Refusing \
             to use it. If you restored the server from an older backup on purpose, run \
             `e2ebackup accept-rollback PROFILE`"
        )),
        (None, Some(k)) if k > 0 => Err(format!(
            "the container has no STATE record but this client already committed generation {k}: \
             it was replaced by an older or foreign container. If that was deliberate, run \
             `e2ebackup accept-rollback PROFILE`"
        )),
        (c, _) => Ok(c.unwrap_or(0)),
    }
}

/// What the client keeps about the container besides the generation number:
/// `/var/lib/e2ebackup/NAME/snapshots.json`. Trusted (the client's own disk); missing for a
/// client that never committed with a version that writes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRecord {
    /// The generation this list was committed with.
    pub generation: u64,
    /// The snapshots of that generation, in commit order (oldest first).
    pub snapshots: Vec<String>,
    /// A snapshot this client put into `snapshots/` and has not committed yet (a crash or
    /// a failure between the rename and the commit).
    #[serde(default)]
    pub adding: Vec<String>,
    /// Snapshots this client removed (retention), or accepted as lost (`accept-rollback`),
    /// that the container's STATE may still list.
    #[serde(default)]
    pub gone: Vec<String>,
    /// The clocks at that commit, to notice a wall clock that jumped since ([`trusted_now`]).
    #[serde(default)]
    pub clock: Option<ClockMark>,
}

/// The wall clock (as corrected by [`corrected_now`]) and the boot clock at a commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockMark {
    /// `/proc/sys/kernel/random/boot_id`: the boot clock only compares within one boot.
    pub boot_id: String,
    /// CLOCK_BOOTTIME, seconds (counts suspend, never jumps).
    pub boottime: i64,
    /// The corrected wall clock then (unix seconds).
    pub wall: i64,
}

/// How far the wall clock may run ahead of the boot clock between two commits of one boot
/// before [`corrected_now`] corrects it: far more than NTP ever steps a synced clock.
pub const CLOCK_JUMP: i64 = 86_400;

/// The boot id and CLOCK_BOOTTIME now (None where they cannot be read).
fn boot_clock() -> Option<(String, i64)> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
    Some((id.trim().to_string(), t.tv_sec()))
}

/// The time retention and the future-date checks use: the wall clock `wall`, unless the
/// last commit (`mark`) was in this boot and the wall clock has since run ahead of the boot
/// clock by more than [`CLOCK_JUMP`] (someone set it ahead, or it jumped): then the time
/// that the boot clock says has passed since that commit. A clock set back is taken as it is
/// (a lower time only keeps more). Pure, for tests.
pub fn corrected_now(mark: Option<&ClockMark>, boot: Option<(&str, i64)>, wall: i64) -> i64 {
    match (mark, boot) {
        (Some(m), Some((id, bt))) if m.boot_id == id && bt >= m.boottime => {
            let expected = m.wall.saturating_add(bt - m.boottime);
            if wall > expected.saturating_add(CLOCK_JUMP) {
                expected
            } else {
                wall
            }
        }
        _ => wall,
    }
}

/// [`corrected_now`] from this client's record and clocks; says so when they disagree.
pub fn trusted_now(p: &Profile) -> i64 {
    let wall = SnapshotId::now().unix();
    let rec = read_client_record(p).ok().flatten();
    let boot = boot_clock();
    let t = corrected_now(
        rec.as_ref().and_then(|r| r.clock.as_ref()),
        boot.as_ref().map(|(i, b)| (i.as_str(), *b)),
        wall,
    );
    if t != wall {
        warn!(
            "the clock reads {} but only {} s passed since this client's last commit (boot clock): \
             it jumped ahead by about {} days; retention counts from {} instead (docs/operations.md, clock jumps)",
            SnapshotId::from_unix(wall),
            t - rec.and_then(|r| r.clock).map_or(t, |m| m.wall),
            (wall - t) / 86_400,
            SnapshotId::from_unix(t)
        );
    }
    t
}

pub fn read_client_record(p: &Profile) -> Result<Option<ClientRecord>> {
    let path = p.snapshot_record();
    match std::fs::read(&path) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
            format!("{} is not a snapshot record", path.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_client_record(p: &Profile, rec: &ClientRecord) -> Result<()> {
    crate::fsutil::private_dir(&p.state_dir())?;
    crate::fsutil::write_atomic(&p.snapshot_record(), &serde_json::to_vec_pretty(rec)?)
}

/// Note, durably and before the container changes, that this client is about to put `add`
/// into `snapshots/` or remove `remove` from it (see the module doc).
pub fn note_pending(p: &Profile, add: Option<SnapshotId>, remove: &[SnapshotId]) -> Result<()> {
    let mut rec = read_client_record(p)?.unwrap_or_default();
    rec.adding.extend(add.map(|a| a.to_string()));
    rec.gone.extend(remove.iter().map(|r| r.to_string()));
    write_client_record(p, &rec)
}

/// What an open found ([`check`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checked {
    pub generation: u64,
    /// The authenticated snapshots, in commit order, as they are now.
    pub snapshots: Vec<SnapshotId>,
    /// Listed but missing (only with `accept_any`; otherwise they are refused).
    pub missing: Vec<SnapshotId>,
    /// In `snapshots/` but not in the authenticated list: never used.
    pub unlisted: Vec<SnapshotId>,
}

/// The comparison of the authenticated list with the directory, separated from I/O.
/// `listed`: STATE's list (commit order); `present`: the ids in `snapshots/`; `rec`: the
/// client's record. Err names the missing snapshots.
pub fn reconcile(
    listed: &[SnapshotId],
    present: &[SnapshotId],
    rec: Option<&ClientRecord>,
    accept_any: bool,
) -> Result<Checked, Vec<SnapshotId>> {
    let has = |v: &[String], id: &SnapshotId| v.iter().any(|s| *s == id.to_string());
    let (adding, gone) = rec.map_or((&[][..], &[][..]), |r| (&r.adding[..], &r.gone[..]));
    let mut out = Checked::default();
    for id in listed {
        if present.contains(id) {
            out.snapshots.push(*id);
        } else if !has(gone, id) {
            out.missing.push(*id);
        }
    }
    if !out.missing.is_empty() && !accept_any {
        return Err(out.missing);
    }
    for id in present.iter().filter(|id| !listed.contains(id)) {
        if has(adding, id) {
            // This client's own snapshot, put in place by a run that did not commit.
            out.snapshots.push(*id);
        } else {
            out.unlisted.push(*id);
        }
    }
    Ok(out)
}

fn ids(list: &[String]) -> Result<Vec<SnapshotId>> {
    list.iter()
        .map(|s| {
            s.parse::<SnapshotId>()
                .map_err(|e| Failure::Security(format!("the container's STATE lists {e}")).into())
        })
        .collect()
}

fn joined(v: &[SnapshotId]) -> String {
    v.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Check the mounted container against the client's record: the generation (see [`judge`])
/// and the snapshot list (see [`reconcile`]). With `accept_any`, only the MAC is checked and
/// missing snapshots are returned instead of refused (`accept-rollback`).
pub fn check(p: &Profile, root: &Path, key: &Key, accept_any: bool) -> Result<Checked> {
    let st = match read_verified(root, key) {
        Ok(st) => st,
        Err(e) => match read_with_replaced_key(p, root) {
            Some(st) => Some(st),
            None => return Err(e),
        },
    };
    let client = if accept_any {
        None
    } else {
        client_generation(p)?
    };
    let generation = judge(st.as_ref().map(|s| s.generation), client).map_err(Failure::Security)?;
    let listed = ids(st.as_ref().map_or(&[][..], |s| &s.snapshots[..]))?;
    let present = crate::snapshots::list(root)?;
    let rec = read_client_record(p)?;
    let mut c = reconcile(&listed, &present, rec.as_ref(), accept_any).map_err(|missing| {
        Failure::Security(format!(
            "snapshot(s) {} are in the container's authenticated list (generation {generation}) but \
             missing from its snapshots/ directory: the server removed them, or handed back an older \
             copy of that directory (a replayed block). Refusing to use the container. If you accept \
             the loss, run `e2ebackup accept-rollback {}`",
            joined(&missing),
            p.name
        ))
    })?;
    c.generation = generation;
    if !c.unlisted.is_empty() {
        warn!(
            "snapshots/ holds {} that the container's authenticated list does not name \
             (left by a run interrupted before its commit by another client or version, or put \
             there by the server): not used, not restored as `latest`, not pruned",
            joined(&c.unlisted)
        );
    }
    Ok(c)
}

/// A STATE signed with the keyfile that an interrupted `keys rotate` replaced (the keyfile
/// was swapped, the STATE not yet re-signed): the old keyfile is this client's own secret,
/// kept as `<keyfile>.old` until the rotation is done, so the record is still authentic. The
/// next commit signs it with the new keyfile.
fn read_with_replaced_key(p: &Profile, root: &Path) -> Option<State> {
    let old = p.keyfile_old();
    let key = crate::stack::luks::read_keyfile(&old).ok()?;
    let st = read_verified(root, &key).ok()??;
    warn!(
        "the container's STATE is signed with the replaced keyfile {} (an interrupted `keys rotate`): \
         accepted; the next commit signs it with the new keyfile",
        old.display()
    );
    Some(st)
}

/// Write generation `generation` with `snapshots` (commit order), then the client's records.
pub fn commit(
    p: &Profile,
    root: &Path,
    key: &Key,
    generation: u64,
    snapshots: &[SnapshotId],
) -> Result<()> {
    let snapshots: Vec<String> = snapshots.iter().map(|s| s.to_string()).collect();
    let written = SnapshotId::now().to_string();
    let mac = compute_mac(key, generation, &snapshots, &written);
    let st = State {
        generation,
        snapshots,
        written,
        mac,
    };
    store(root, &serde_json::to_vec_pretty(&st)?)?;
    set_client_record(p, generation, &st.snapshots)
}

/// The client's side of a commit (and of `accept-rollback`): the list, then the number.
pub fn set_client_record(p: &Profile, generation: u64, snapshots: &[String]) -> Result<()> {
    let wall = SnapshotId::now().unix();
    let old = read_client_record(p).ok().flatten().and_then(|r| r.clock);
    let boot = boot_clock();
    let clock = boot.as_ref().map(|(id, bt)| ClockMark {
        boot_id: id.clone(),
        boottime: *bt,
        wall: corrected_now(old.as_ref(), Some((id.as_str(), *bt)), wall),
    });
    write_client_record(
        p,
        &ClientRecord {
            generation,
            snapshots: snapshots.to_vec(),
            clock,
            ..Default::default()
        },
    )?;
    set_client_generation(p, generation)
}

/// Put `data` in place as the container's STATE, durably: a temporary file, synced,
/// renamed over STATE, then one `syncfs` of the container. The syncfs commits the rename
/// (so no directory fsync, which would be one more journal commit: each commit is a few
/// serial round trips to the server and the server's fsync) and writes the journaled
/// metadata home, which a `ro,noload` mount of a crash image depends on
/// (tests/host_crash_noload.rs).
pub fn store(root: &Path, data: &[u8]) -> Result<()> {
    crate::fsutil::replace_with(&root.join(STATE_FILE), |w| {
        std::io::Write::write_all(w, data).map_err(Into::into)
    })?;
    crate::stack::mount::syncfs(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judge_refuses_only_older_containers() {
        assert_eq!(judge(Some(5), Some(5)), Ok(5));
        assert_eq!(
            judge(Some(6), Some(5)),
            Ok(6),
            "one ahead after a crash between the two writes"
        );
        assert_eq!(
            judge(Some(0), None),
            Ok(0),
            "a client without a record accepts"
        );
        assert_eq!(judge(None, None), Ok(0));
        assert_eq!(judge(None, Some(0)), Ok(0));
        assert!(judge(Some(4), Some(5)).unwrap_err().contains("OLDER"));
        assert!(judge(None, Some(3)).unwrap_err().contains("no STATE"));
    }

    fn key(b: u8) -> Key {
        crate::stack::luks::tests_key(vec![b; 64])
    }

    #[test]
    fn state_authenticates_and_detects_edits() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        crate::snapshots::create_layout(root).unwrap();
        std::fs::create_dir(root.join("snapshots/20260101T000000Z")).unwrap();
        let k = key(1);
        let snaps = vec!["20260101T000000Z".to_string()];
        let w = "20260101T000001Z";
        let st = State {
            generation: 3,
            snapshots: snaps.clone(),
            written: w.into(),
            mac: compute_mac(&k, 3, &snaps, w),
        };
        std::fs::write(root.join(STATE_FILE), serde_json::to_vec(&st).unwrap()).unwrap();
        assert_eq!(read_verified(root, &k).unwrap().unwrap().generation, 3);
        // Another keyfile cannot verify (nor forge) it.
        let e = read_verified(root, &key(2)).unwrap_err();
        assert_eq!(crate::error::exit_for(&e), crate::error::Exit::Security);
        // A server that bumps the counter without the key is caught.
        let mut forged = st.clone();
        forged.generation = 9;
        std::fs::write(root.join(STATE_FILE), serde_json::to_vec(&forged).unwrap()).unwrap();
        assert!(read_verified(root, &k).is_err());
        std::fs::write(root.join(STATE_FILE), b"{not json").unwrap();
        assert!(read_verified(root, &k).is_err());
    }

    fn id(s: &str) -> SnapshotId {
        s.parse().unwrap()
    }

    #[test]
    fn reconcile_refuses_listed_snapshots_that_are_missing() {
        let (a, b, c) = (
            id("20260101T000000Z"),
            id("20260102T000000Z"),
            id("20260103T000000Z"),
        );
        // All there: the list as it is, in commit order (not the directory's order).
        let ok = reconcile(&[b, a], &[a, b], None, false).unwrap();
        assert_eq!(ok.snapshots, [b, a]);
        // A replayed directory block hides c: refused, c named.
        assert_eq!(reconcile(&[a, b, c], &[a, b], None, false), Err(vec![c]));
        // accept-rollback: reported instead.
        let acc = reconcile(&[a, b, c], &[a, b], None, true).unwrap();
        assert_eq!((acc.snapshots, acc.missing), (vec![a, b], vec![c]));
        // An entry STATE does not name is reported, never used (not "latest").
        let r = reconcile(&[a, b], &[a, b, c], None, false).unwrap();
        assert_eq!((r.snapshots, r.unlisted), (vec![a, b], vec![c]));
    }

    #[test]
    fn reconcile_knows_this_clients_unfinished_work() {
        let (a, b, c) = (
            id("20260101T000000Z"),
            id("20260102T000000Z"),
            id("20260103T000000Z"),
        );
        // A run put c in place and removed a, then crashed before its commit.
        let rec = ClientRecord {
            generation: 4,
            snapshots: vec![a.to_string(), b.to_string()],
            adding: vec![c.to_string()],
            gone: vec![a.to_string()],
            clock: None,
        };
        let r = reconcile(&[a, b], &[b, c], Some(&rec), false).unwrap();
        assert_eq!(r.snapshots, [b, c], "c adopted last, a accepted as removed");
        assert!(r.missing.is_empty() && r.unlisted.is_empty());
        // Removal noted but not done yet: a is still listed and used.
        let r = reconcile(&[a, b], &[a, b], Some(&rec), false).unwrap();
        assert_eq!(r.snapshots, [a, b]);
        // What the client did not note is still refused.
        assert_eq!(reconcile(&[a, b], &[a], Some(&rec), false), Err(vec![b]));
    }

    #[test]
    fn corrected_now_follows_the_boot_clock_after_a_jump_ahead() {
        let m = ClockMark {
            boot_id: "boot-1".into(),
            boottime: 1000,
            wall: 1_800_000_000,
        };
        let year = 365 * 86_400;
        // Same boot, a minute later by both clocks: the wall clock.
        assert_eq!(
            corrected_now(Some(&m), Some(("boot-1", 1060)), 1_800_000_060),
            1_800_000_060
        );
        // Same boot, the wall clock a year ahead: what the boot clock says.
        assert_eq!(
            corrected_now(Some(&m), Some(("boot-1", 1060)), 1_800_000_060 + year),
            1_800_000_060
        );
        // An NTP step of an hour is not a jump.
        assert_eq!(
            corrected_now(Some(&m), Some(("boot-1", 1060)), 1_800_003_660),
            1_800_003_660
        );
        // Set back: taken as it is. Another boot, or no mark: the wall clock.
        assert_eq!(
            corrected_now(Some(&m), Some(("boot-1", 1060)), 1_700_000_000),
            1_700_000_000
        );
        assert_eq!(
            corrected_now(Some(&m), Some(("boot-2", 5)), 1_800_000_000 + year),
            1_800_000_000 + year
        );
        assert_eq!(corrected_now(None, None, 7), 7);
    }

    /// Issue 29 item 2's story, with the decisions of retention and the time a run uses:
    /// keep_last 1, keep_within 2d; two real runs, two with the clock a year ahead (same
    /// boot), the clock put back, one more run. No real snapshot is lost, and the last
    /// committed one is "latest".
    #[test]
    fn clock_a_year_ahead_for_two_runs_loses_no_real_snapshot() {
        use crate::retention::{select, Policy};
        let p = Policy {
            keep_last: Some(1),
            keep_within: Some(2 * 86_400),
            ..Default::default()
        };
        let year = 365 * 86_400;
        let t0 = 1_800_000_000;
        let mut committed: Vec<SnapshotId> = Vec::new();
        let mut mark: Option<ClockMark> = None;
        // (wall clock, boot clock) of each run, a minute apart by the boot clock.
        let runs = [
            (t0, 100),
            (t0 + 60, 160),
            (t0 + 120 + year, 220),
            (t0 + 180 + year, 280),
            (t0 + 240, 340),
        ];
        for (wall, bt) in runs {
            committed.push(SnapshotId::from_unix(wall));
            let now = corrected_now(mark.as_ref(), Some(("b", bt)), wall);
            let ds = select(&committed, &p, now);
            committed.retain(|c| ds.iter().any(|d| d.id == *c && !d.removed()));
            mark = Some(ClockMark {
                boot_id: "b".into(),
                boottime: bt,
                wall: now,
            });
        }
        assert!(
            committed.contains(&SnapshotId::from_unix(t0))
                && committed.contains(&SnapshotId::from_unix(t0 + 60)),
            "{committed:?}"
        );
        assert_eq!(committed.last(), Some(&SnapshotId::from_unix(t0 + 240)));
    }
}
