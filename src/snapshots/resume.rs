//! Resuming an interrupted snapshot. A run that is killed, loses its link or fails leaves
//! its snapshot under `.partial/<id>`, with a small record beside it (`.partial/<id>.resume`:
//! when it was first started, how many runs wrote to it, and a digest of what the profile
//! backs up). The next run of the profile continues into it ([`settle`] picks it): rsync
//! then compares the files already there with the source (size and time) and sends only
//! the rest, and `--delete` removes what has since left the source. A partial is discarded
//! only for a reason the log states: the sources, excludes or `one_file_system` changed,
//! it was started longer ago than `backup.resume_max_age`, its record is missing or
//! unreadable, or a newer one exists.
//!
//! The files an earlier run left were never hashed from what it sent (that run's hashes
//! died with it), and they sat on the server in between: read back now, they are whatever
//! the server returns. So before rsync runs, [`check_leftovers`] reads each of them back
//! and hashes it, hashes the source file it stands for, and keeps the file only when the
//! two are the same (its hash then goes into the manifest, as if rsync had just written
//! it); any other file is removed, so rsync sends it again. A resume therefore downloads
//! what the earlier runs sent once, and sends none of it again (docs/threat-model.md).

use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::manifest::{Fresh, Hashed};
use crate::profile::{Profile, Size};
use crate::snapid::SnapshotId;
use crate::{info, warn};

use super::layout::{remove_tree, PARTIAL};

/// The record of `.partial/<id>` is `.partial/<id>` followed by this.
pub const RECORD: &str = ".resume";

/// What `.partial/<id>.resume` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Record {
    /// When the first run that wrote to it started (seconds since the epoch).
    started: i64,
    /// How many runs wrote to it, this one included.
    attempts: u32,
    /// [`what_digest`] of the profile that started it.
    what: String,
}

/// An interrupted snapshot to continue.
#[derive(Debug, Clone)]
pub struct Resumable {
    /// `.partial/<id>`.
    pub dir: PathBuf,
    /// The id the first attempt gave it (the snapshot is committed under the id of the
    /// run that completes it).
    pub first_id: String,
    /// Runs that wrote to it before this one.
    pub attempts: u32,
    started: i64,
}

/// A digest of what a profile backs up: sources, excludes and `one_file_system`, in order.
fn what_digest(p: &Profile) -> String {
    let mut h = Sha256::new();
    for s in &p.backup.sources {
        h.update(s.0.as_os_str().as_bytes());
        h.update([0]);
    }
    h.update([1]);
    for e in &p.backup.excludes {
        h.update(e.as_bytes());
        h.update([0]);
    }
    h.update([u8::from(p.backup.one_file_system)]);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn record_path(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(RECORD);
    dir.with_file_name(name)
}

fn read_record(dir: &Path) -> Option<Record> {
    let f = std::fs::File::open(record_path(dir)).ok()?;
    let mut b = Vec::new();
    // A record is a few dozen bytes; never read more than a page of what the server gives.
    f.take(4096).read_to_end(&mut b).ok()?;
    serde_json::from_slice(&b).ok()
}

/// Say that `dir` is being written by a run of `p` (a new one, or `resumed`). Not synced
/// here: the snapshot's data syncs carry it.
pub fn mark(p: &Profile, dir: &Path, resumed: Option<&Resumable>) -> Result<()> {
    let rec = Record {
        started: resumed.map_or_else(|| SnapshotId::now().unix(), |r| r.started),
        attempts: resumed.map_or(1, |r| r.attempts + 1),
        what: what_digest(p),
    };
    let path = record_path(dir);
    std::fs::write(&path, serde_json::to_vec(&rec)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// After the commit: the record of the directory that became the snapshot goes.
pub fn unmark(dir: &Path) {
    let _ = std::fs::remove_file(record_path(dir));
}

/// Before a run (and a prune): the interrupted snapshot of this profile to continue, if
/// any; everything else under `.partial/` (other partials, prune leftovers, temporary
/// manifests) is removed, each with the reason in the log.
pub fn settle(p: &Profile, root: &Path) -> Result<Option<Resumable>> {
    crate::manifest::remove_temporaries(root)?;
    let dir = root.join(PARTIAL);
    let now = SnapshotId::now().unix();
    let what = what_digest(p);
    let max_age = p.backup.resume_max_age;
    let mut dirs = Vec::new();
    let mut others = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        let name = e.file_name();
        let is_dir = e.file_type()?.is_dir();
        match name.to_str().and_then(|n| n.parse::<SnapshotId>().ok()) {
            Some(id) if is_dir => dirs.push((id, e.path())),
            _ => others.push((e.path(), is_dir)),
        }
    }
    // Newest first: the one most recently started is the one kept.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.0));
    let mut kept: Option<Resumable> = None;
    for (id, d) in dirs {
        let why = match read_record(&d) {
            _ if kept.is_some() => Some("a newer interrupted snapshot is resumed instead".into()),
            None => Some("it has no readable resume record".to_string()),
            Some(r) if r.what != what => Some(
                "the profile's sources, excludes or one_file_system changed since it was started"
                    .into(),
            ),
            Some(r) if now.saturating_sub(r.started) > max_age.0 as i64 => Some(format!(
                "it was started {} ago, longer than backup.resume_max_age ({}s)",
                age(now - r.started),
                max_age.0
            )),
            Some(r) => {
                kept = Some(Resumable {
                    dir: d.clone(),
                    first_id: id.to_string(),
                    attempts: r.attempts,
                    started: r.started,
                });
                None
            }
        };
        if let Some(why) = why {
            info!(
                "discarding the interrupted snapshot {} left by an earlier run: {why}",
                d.display()
            );
            remove_tree(&d)?;
            let _ = std::fs::remove_file(record_path(&d));
        }
    }
    for (o, is_dir) in others {
        let rec_of = o
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(RECORD))
            .map(|n| dir.join(n));
        match rec_of {
            // The record of the kept partial stays; that of a removed one goes quietly.
            Some(d) if kept.as_ref().is_some_and(|k| k.dir == d) => continue,
            Some(_) if !is_dir => {}
            _ => info!("removing {} left by an earlier run", o.display()),
        }
        if is_dir {
            remove_tree(&o)?;
        } else {
            match std::fs::remove_file(&o) {
                // The record of a partial removed above went with it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                r => r.with_context(|| format!("removing {}", o.display()))?,
            }
        }
    }
    Ok(kept)
}

fn age(secs: i64) -> String {
    match secs {
        s if s >= 86400 => format!("{}d", s / 86400),
        s if s >= 3600 => format!("{}h", s / 3600),
        s => format!("{s}s"),
    }
}

/// What [`check_leftovers`] found.
#[derive(Debug, Default)]
pub struct Leftovers {
    /// Hashes of the files kept (each the same as its source file).
    pub fresh: Fresh,
    /// Regular files already there (kept), and their bytes; those linked to the previous
    /// snapshot by the earlier attempt included (the manifest takes their hashes from it).
    pub files: u64,
    pub bytes: u64,
    /// Files removed to be sent again: different from the source, changed, or not checkable.
    pub removed: u64,
}

/// Check every regular file the earlier attempts left in `partial` against its source
/// (module doc): keep it, with its hash, when the file read back equals the source file
/// (same size, time, mode, owner and SHA-256); remove it otherwise. A file that shares its
/// inode with the same path in `link` (the previous snapshot) is kept unread: its hash is
/// the previous manifest's, and rsync compares it with the source as it does for a new run.
pub fn check_leftovers(partial: &Path, link: Option<&Path>) -> Result<Leftovers> {
    let mut out = Leftovers::default();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        let abs = partial.join(&rel);
        let entries = match std::fs::read_dir(&abs) {
            Ok(es) => es,
            Err(e) => {
                warn!("cannot list {}: {e}; rsync checks it", abs.display());
                continue;
            }
        };
        for e in entries {
            crate::signals::check()?;
            let e = e?;
            let r = rel.join(e.file_name());
            let ft = e.file_type()?;
            if ft.is_dir() {
                dirs.push(r);
                continue;
            }
            if !ft.is_file() {
                continue;
            }
            let dest = partial.join(&r);
            let dm = std::fs::symlink_metadata(&dest)?;
            let linked = link
                .and_then(|l| std::fs::symlink_metadata(l.join(&r)).ok())
                .is_some_and(|lm| lm.dev() == dm.dev() && lm.ino() == dm.ino());
            let kept =
                linked || same_as_source(&mut out.fresh, &dest, &dm, &Path::new("/").join(&r));
            if kept {
                out.files += 1;
                out.bytes += dm.len();
            } else {
                std::fs::remove_file(&dest)
                    .with_context(|| format!("removing {}", dest.display()))?;
                out.removed += 1;
            }
        }
    }
    Ok(out)
}

/// Whether `dest` (with metadata `dm`) is a copy of the source file `src` that rsync would
/// keep (size, mtime to the nanosecond, mode, owner), and its content read back is the
/// source's; its hash is then in `fresh`.
fn same_as_source(fresh: &mut Fresh, dest: &Path, dm: &std::fs::Metadata, src: &Path) -> bool {
    let Ok(sm) = std::fs::symlink_metadata(src) else {
        return false;
    };
    let same_meta = sm.file_type().is_file()
        && sm.len() == dm.len()
        && sm.mtime() == dm.mtime()
        && sm.mtime_nsec() == dm.mtime_nsec()
        && sm.mode() == dm.mode()
        && sm.uid() == dm.uid()
        && sm.gid() == dm.gid();
    if !same_meta {
        return false;
    }
    match source_hash(src, &sm) {
        Some(h) => fresh.hash_expecting(dest, &h) == Hashed::Now,
        None => false,
    }
}

/// The hash (hex, the manifest's algorithm) of the regular source file `src` that `sm` describes: opened without
/// following a link at its end and without blocking (a local user may swap it).
fn source_hash(src: &Path, sm: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(src)
        .ok()?;
    let m = f.metadata().ok()?;
    if !m.file_type().is_file() || m.ino() != sm.ino() || m.dev() != sm.dev() {
        return None;
    }
    crate::manifest::hash_reader(f).ok()
}

impl Leftovers {
    pub fn describe(&self) -> String {
        format!(
            "{} files ({}) already there and the same as the source; {} sent again",
            self.files,
            Size(self.bytes),
            self.removed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(src: &Path, excludes: &str) -> Profile {
        Profile::parse(
            Path::new("t.yaml"),
            &format!(
                "server: {{host: h, user: u, identity_file: /k, known_hosts: /kh, path: /srv}}\n\
                 container: {{file: c.luks, size: 1G, keyfile: /key}}\n\
                 backup: {{sources: ['{}'], excludes: [{excludes}], resume_max_age: 1d}}\n",
                src.display()
            ),
        )
        .unwrap()
    }

    #[test]
    fn settle_keeps_the_newest_matching_partial_and_says_why_others_go() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        super::super::layout::create_layout(root).unwrap();
        let p = profile(Path::new("/src"), "");
        let part = |id: &str| root.join(PARTIAL).join(id);
        // An old one (no record), a matching one, a newer one for other sources, a prune leftover.
        for id in ["20260101T000000Z", "20260102T000000Z", "20260103T000000Z"] {
            std::fs::create_dir_all(part(id).join("src")).unwrap();
        }
        std::fs::create_dir_all(root.join(PARTIAL).join("20251201T000000Z.pruning/x")).unwrap();
        mark(&p, &part("20260102T000000Z"), None).unwrap();
        mark(
            &profile(Path::new("/other"), ""),
            &part("20260103T000000Z"),
            None,
        )
        .unwrap();
        let r = settle(&p, root).unwrap().expect("one to resume");
        assert_eq!(r.first_id, "20260102T000000Z");
        assert_eq!(r.attempts, 1);
        let mut left: Vec<_> = std::fs::read_dir(root.join(PARTIAL))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["20260102T000000Z", "20260102T000000Z.resume"]);
        // A second attempt counts up; then other excludes discard it.
        mark(&p, &r.dir, Some(&r)).unwrap();
        assert_eq!(settle(&p, root).unwrap().unwrap().attempts, 2);
        assert!(settle(&profile(Path::new("/src"), "'*.tmp'"), root)
            .unwrap()
            .is_none());
        assert_eq!(std::fs::read_dir(root.join(PARTIAL)).unwrap().count(), 0);
        // Too old: started two days ago with a limit of one.
        std::fs::create_dir_all(part("20260104T000000Z")).unwrap();
        let old = Record {
            started: SnapshotId::now().unix() - 2 * 86400,
            attempts: 1,
            what: what_digest(&p),
        };
        std::fs::write(
            record_path(&part("20260104T000000Z")),
            serde_json::to_vec(&old).unwrap(),
        )
        .unwrap();
        assert!(settle(&p, root).unwrap().is_none());
        assert_eq!(std::fs::read_dir(root.join(PARTIAL)).unwrap().count(), 0);
    }

    #[test]
    fn leftovers_are_kept_only_when_they_read_back_as_the_source() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let partial = d.path().join("partial");
        std::fs::create_dir_all(&src).unwrap();
        for (n, c) in [
            ("same", "a"),
            ("garbled", "b"),
            ("newer", "c"),
            ("gone", "d"),
        ] {
            std::fs::write(src.join(n), c.repeat(5000)).unwrap();
        }
        // The earlier attempt's copy, times and modes included (as rsync -a leaves them).
        let copy = partial.join(src.strip_prefix("/").unwrap());
        std::fs::create_dir_all(&copy).unwrap();
        for n in ["same", "garbled", "newer", "gone"] {
            let (s, t) = (src.join(n), copy.join(n));
            std::fs::copy(&s, &t).unwrap();
            let m = std::fs::metadata(&s).unwrap();
            std::fs::set_permissions(&t, std::fs::Permissions::from_mode(m.mode())).unwrap();
            set_mtime(&t, m.modified().unwrap());
        }
        // What the server changed (same size, same time), a source file rewritten since,
        // one removed from the source, and an rsync temporary file.
        let g = copy.join("garbled");
        let mt = std::fs::metadata(&g).unwrap().modified().unwrap();
        std::fs::write(&g, "B".repeat(5000)).unwrap();
        set_mtime(&g, mt);
        std::fs::write(src.join("newer"), "C".repeat(6000)).unwrap();
        std::fs::remove_file(src.join("gone")).unwrap();
        std::fs::write(copy.join(".same.Xy12ab"), "partial").unwrap();
        let l = check_leftovers(&partial, None).unwrap();
        assert_eq!(
            (l.files, l.bytes, l.removed),
            (1, 5000, 4),
            "{}",
            l.describe()
        );
        let mut left: Vec<_> = std::fs::read_dir(&copy)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["same"]);
        // The kept file's hash is the one the manifest would read.
        let fresh = l.fresh.seal();
        let mut with = Vec::new();
        let b = crate::manifest::build::<&[u8]>(&copy, None, None, &fresh, &mut with).unwrap();
        assert_eq!(b.unhashed, 0, "the kept file's hash is the source's");
        let mut without = Vec::new();
        crate::manifest::build::<&[u8]>(&copy, Some(&src), None, &Default::default(), &mut without)
            .unwrap();
        assert_eq!(with, without);
        assert_eq!(fresh.len(), 1);
    }

    fn set_mtime(p: &Path, t: std::time::SystemTime) {
        let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        f.set_modified(t).unwrap();
    }
}
