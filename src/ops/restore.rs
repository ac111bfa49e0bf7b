//! The read side: `snapshots`, `mount`/`umount` and `restore`.
//!
//! Reading opens the whole stack read-only (loop device, LUKS mapping and ext4 all
//! read-only), so browsing or restoring can never change a snapshot. `mount` leaves the
//! stack up after it exits: its undo journal is marked persistent, which makes every other
//! command of the profile exit 4 until `umount` (or `cleanup`) tears it down.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::error::{usage, Exit};
use crate::info;
use crate::ops::{fail, finish};
use crate::profile::{Profile, Size};
use crate::session::{self, Session};
use crate::snapid::SnapshotId;
use crate::snapshots;

#[derive(Debug, Serialize)]
pub struct SnapshotInfo {
    pub id: String,
    /// Unix time of the snapshot.
    pub time: i64,
    pub files: u64,
    /// Bytes of all files (what a restore copies).
    pub total_bytes: u64,
    /// Bytes allocated only by this snapshot: freed if it alone is pruned (hard-link aware).
    pub unique_bytes: u64,
    /// The last committed snapshot: what `restore latest` restores.
    #[serde(default)]
    pub latest: bool,
    /// Dated after this client's clock (taken while a clock was ahead, or this clock is behind).
    #[serde(default)]
    pub future: bool,
}

/// Walk one snapshot: per inode, how many of its links are inside this snapshot.
fn measure(dir: &Path) -> Result<SnapshotInfo> {
    let mut seen: HashMap<(u64, u64), (u64, u64, u64)> = HashMap::new(); // -> (links here, nlink, blocks)
    let mut files = 0;
    let mut total = 0;
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            let m = e.metadata()?;
            if m.is_dir() {
                dirs.push(e.path());
            } else if m.is_file() {
                files += 1;
                total += m.len();
                let ent =
                    seen.entry((m.dev(), m.ino()))
                        .or_insert((0, m.nlink(), m.blocks() * 512));
                ent.0 += 1;
            }
        }
    }
    let unique = seen
        .values()
        .filter(|(here, nlink, _)| here >= nlink)
        .map(|v| v.2)
        .sum();
    let id: SnapshotId = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .parse()
        .map_err(anyhow::Error::msg)?;
    Ok(SnapshotInfo {
        id: id.to_string(),
        time: id.unix(),
        files,
        total_bytes: total,
        unique_bytes: unique,
        latest: false,
        future: false,
    })
}

/// Open read-only, run `f` on the session and the mounted root, tear down.
pub(crate) fn with_readonly<T>(
    p: &Profile,
    command: &str,
    f: impl FnOnce(&Session, &Path) -> Result<T>,
) -> (Exit, Option<T>) {
    let mut s = match Session::begin(p, command) {
        Ok(s) => s,
        Err(e) => return (fail(e), None),
    };
    let mut out = None;
    let r = s.open_all(command, true).and_then(|root| {
        out = Some(f(&s, &root)?);
        Ok(Exit::Ok)
    });
    (finish(s, &r).0, out)
}

pub fn list(p: &Profile, json: bool) -> Exit {
    let now = crate::generation::trusted_now(p);
    // In commit order (oldest first), from the authenticated list.
    let (code, infos) = with_readonly(p, "snapshots", |s, root| {
        let committed = s.snapshots();
        let future = crate::retention::dated_in_future(committed, now);
        committed
            .iter()
            .map(|id| {
                let mut i = measure(&snapshots::path_of(root, *id))?;
                i.latest = Some(id) == committed.last();
                i.future = future.contains(id);
                Ok(i)
            })
            .collect::<Result<Vec<_>>>()
    });
    if let Some(infos) = infos {
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&infos).unwrap_or_default()
            );
        } else {
            println!(
                "{:<18} {:>9} {:>10} {:>10}  NOTE (oldest committed first)",
                "SNAPSHOT", "FILES", "SIZE", "UNIQUE"
            );
            for i in &infos {
                let mut note = Vec::new();
                if i.latest {
                    note.push("latest".to_string());
                }
                if i.future {
                    note.push(format!(
                        "DATED IN THE FUTURE (this clock reads {})",
                        SnapshotId::from_unix(now)
                    ));
                }
                println!(
                    "{:<18} {:>9} {:>10} {:>10}  {}",
                    i.id,
                    i.files,
                    Size(i.total_bytes).to_string(),
                    Size(i.unique_bytes).to_string(),
                    note.join(", ")
                );
            }
            let future: Vec<&str> = infos
                .iter()
                .filter(|i| i.future)
                .map(|i| i.id.as_str())
                .collect();
            if !future.is_empty() {
                crate::warn!(
                    "snapshot(s) {} are dated in the future: a clock was ahead when they were taken, \
                     or this one is behind; `latest` is the last committed snapshot, and retention \
                     is suspended until the clock passes them (docs/operations.md, clock jumps)",
                    future.join(", ")
                );
            }
        }
    }
    code
}

/// Resolve `latest` (the last committed snapshot, whatever its date) or an id to a snapshot
/// of `committed` (the authenticated list, in commit order).
pub(crate) fn resolve(committed: &[SnapshotId], which: &str) -> Result<SnapshotId> {
    if which == "latest" {
        return committed
            .last()
            .copied()
            .ok_or_else(|| usage("the container holds no snapshot yet"));
    }
    let id: SnapshotId = which.parse().map_err(usage)?;
    if !committed.contains(&id) {
        return Err(usage(format!(
            "no snapshot {id} in the container's authenticated list (see `e2ebackup snapshots`)"
        )));
    }
    Ok(id)
}

/// How `restore` goes about it (its flags).
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreOptions {
    /// Restore into a non-empty target.
    pub force: bool,
    /// Accept a target another user could change.
    pub allow_untrusted: bool,
    /// Hash every restored file and compare it with the snapshot's manifest
    /// ([`crate::manifest::check_restore`]); a difference is exit 6.
    pub check: bool,
    /// Delete what the target holds and the snapshot does not, within `paths` only.
    pub delete: bool,
}

pub fn restore(
    p: &Profile,
    which: &str,
    target: &Path,
    paths: &[PathBuf],
    opts: RestoreOptions,
) -> Exit {
    let RestoreOptions {
        force,
        allow_untrusted,
        check,
        delete,
    } = opts;
    if delete && paths.is_empty() {
        return fail(usage(
            "restore --delete needs --path: it deletes only within the restored paths".to_string(),
        ));
    }
    if !target.is_absolute() {
        return fail(usage(format!(
            "TARGET {} must be an absolute path",
            target.display()
        )));
    }
    for q in paths {
        if !q.is_absolute()
            || q.components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return fail(usage(format!(
                "--path {} must be an absolute path as backed up",
                q.display()
            )));
        }
    }
    // Opened once, before the connection, and used only through its descriptor from here
    // on: a user who swaps TARGET (or a directory above it) for a link during the connect
    // changes nothing (fsutil::HeldDir).
    let held = match open_target(target, allow_untrusted) {
        Ok(h) => h,
        Err(e) => return fail(e),
    };
    if !force && !held.is_empty().unwrap_or(false) {
        return fail(usage(format!(
            "TARGET {} is not empty; restore into an empty directory, or pass --force to merge into it",
            target.display()
        )));
    }
    let (code, _) = with_readonly(p, "restore", |s, root| {
        let id = resolve(s.snapshots(), which)?;
        let snap = snapshots::path_of(root, id);
        for q in paths {
            let inside = snap.join(q.strip_prefix("/").unwrap_or(q));
            if std::fs::symlink_metadata(&inside).is_err() {
                bail!("{} is not in snapshot {id}", q.display());
            }
        }
        info!("restoring snapshot {id} into {}", target.display());
        // The bulk read-ahead is an optimisation: without it the restore is slower, not wrong.
        let warm = s.warm_view(id.unix().max(0) as u64).unwrap_or_else(|e| {
            crate::debug!("bulk read-ahead not available: {e:#}");
            None
        });
        snapshots::copy_out(&snap, paths, &held.proc_path(), warm.as_ref(), delete)?;
        if check {
            crate::manifest::check_restore(
                root,
                &id.to_string(),
                &held.proc_path(),
                target,
                paths,
            )?;
        } else {
            crate::warn!("--no-check: the restored files are not checked against the manifest");
        }
        info!("restore of {id} complete");
        Ok(())
    });
    code
}

/// The restore TARGET, created if missing, held open (see [`crate::fsutil::HeldDir`]).
fn open_target(target: &Path, allow_untrusted: bool) -> Result<crate::fsutil::HeldDir> {
    crate::fsutil::HeldDir::open(target, true, allow_untrusted)
        .with_context(|| format!("TARGET {}", target.display()))
}

pub fn mount_cmd(p: &Profile, dir: &Path, allow_untrusted: bool) -> Exit {
    if !dir.is_absolute() {
        return fail(usage(format!(
            "DIR {} must be an existing absolute directory",
            dir.display()
        )));
    }
    // Held before the connection; the snapshots are attached to this very directory
    // (move_mount on its descriptor), whatever its path leads to by then.
    let held = match crate::fsutil::HeldDir::open(dir, false, allow_untrusted) {
        Ok(h) => h,
        Err(e) => return fail(e.context(format!("DIR {}", dir.display()))),
    };
    let mut s = match Session::begin(p, "mount") {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let r = (|| -> Result<()> {
        s.open_all("mount", true)?;
        // A read-only bind of snapshots/ at DIR: the user browses snapshot ids directly.
        s.bind_snapshots(&held)
    })();
    match r {
        Ok(()) => {
            if let Err(e) = s.keep_open() {
                return finish(s, &Err(e)).0;
            }
            info!(
                "snapshots of `{}` mounted read-only at {}; `e2ebackup umount {}` when done (runs wait until then: exit 4)",
                p.name,
                dir.display(),
                p.name
            );
            Exit::Ok
        }
        Err(e) => finish(s, &Err(e)).0,
    }
}

pub fn umount_cmd(p: &Profile) -> Exit {
    match session::recover_all(p) {
        Ok(None) => {
            info!("profile `{}` is not mounted", p.name);
            Exit::Ok
        }
        Ok(Some(r)) if r.complete() => {
            info!("unmounted and closed");
            Exit::Ok
        }
        Ok(Some(_)) => Exit::TeardownIncomplete,
        Err(e) => fail(e),
    }
}
