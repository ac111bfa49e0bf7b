//! `e2ebackup run PROFILE`: one snapshot, then retention, then teardown.

use anyhow::Result;

use crate::error::Exit;
use crate::ops::{finish, LastRun};
use crate::profile::Profile;
use crate::retention;
use crate::session::Session;
use crate::snapshots::{self, Taken};
use crate::{info, warn};

pub fn run(p: &Profile) -> Exit {
    let started = super::now();
    let mut s = match Session::begin(p, "run") {
        Ok(s) => s,
        Err(e) => {
            let code = super::fail(e);
            if code != Exit::Locked {
                record(p, &started, code, None, true, None);
            }
            return code;
        }
    };
    let mut taken = None;
    let result = work(p, &mut s, &mut taken);
    let (code, complete) = finish(s, &result);
    let err = result.as_ref().err().map(|e| format!("{e:#}"));
    record(p, &started, code, err, complete, taken.as_ref());
    match code {
        Exit::Ok => info!(
            "run finished: snapshot {} committed",
            taken.map(|t| t.id).unwrap_or_default()
        ),
        Exit::Warnings => warn!("run finished with warnings (exit 3)"),
        _ => {}
    }
    code
}

fn record(
    p: &Profile,
    started: &str,
    code: Exit,
    error: Option<String>,
    complete: bool,
    t: Option<&Taken>,
) {
    super::record_last_run(
        p,
        &LastRun {
            command: "run".into(),
            started: started.into(),
            finished: super::now(),
            exit_code: code as i32,
            result: super::result_word(code).into(),
            error,
            snapshot: t.map(|t| t.id.clone()),
            teardown_complete: complete,
            files_transferred: t.and_then(|t| t.files_transferred),
            bytes_transferred: t.and_then(|t| t.bytes_transferred),
        },
    );
}

fn work(p: &Profile, s: &mut Session<'_>, taken: &mut Option<Taken>) -> Result<Exit> {
    let root = s.open_all("run", false)?;
    snapshots::remove_partials(&root)?;
    let t = snapshots::take(p, &root)?;
    let warnings = t.vanished_files;
    *taken = Some(t);
    crate::signals::check()?;
    prune(p, &root, false)?;
    let g = s.commit_generation(&root)?;
    crate::debug!("container generation {g}");
    Ok(if warnings { Exit::Warnings } else { Exit::Ok })
}

/// Apply the retention policy to the snapshots in the mounted container at `root`.
/// Returns the decisions (newest first). With `dry_run` nothing is removed.
pub fn prune(
    p: &Profile,
    root: &std::path::Path,
    dry_run: bool,
) -> Result<Vec<retention::Decision>> {
    let ids = snapshots::list(root)?;
    let decisions = retention::select(&ids, &p.retention);
    if p.retention.is_empty() {
        return Ok(decisions);
    }
    for d in &decisions {
        if d.removed() && !dry_run {
            crate::signals::check()?;
            info!("pruning snapshot {}", d.id);
            // Move out of snapshots/ first (atomic), so an interrupted delete never leaves
            // a half-deleted tree that looks like a complete snapshot.
            let from = snapshots::path_of(root, d.id);
            let to = root
                .join(snapshots::PARTIAL)
                .join(format!("{}.pruning", d.id));
            std::fs::rename(&from, &to)?;
            snapshots::remove_tree(&to)?;
            let m = crate::manifest::path_of(root, &d.id.to_string());
            if m.exists() {
                std::fs::remove_file(&m)?;
            }
        }
    }
    crate::stack::mount::syncfs(root)?;
    Ok(decisions)
}
