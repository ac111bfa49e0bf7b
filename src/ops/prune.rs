//! `prune` and `accept-rollback`: the commands that change the history without taking a
//! snapshot. `prune` removes what the retention rules no longer keep (the same
//! [`crate::snapshots::prune`] that every `run` ends with); `accept-rollback` takes the
//! container's authenticated generation as this client's record after a deliberate restore
//! of the server from an older copy.

use anyhow::Context;
use serde::Serialize;

use crate::error::Exit;
use crate::ops::{fail, finish};
use crate::profile::Profile;
use crate::session::Session;
use crate::snapshots;
use crate::{info, retention};

#[derive(Debug, Serialize)]
struct PruneLine {
    id: String,
    keep: Vec<String>,
    remove: bool,
}

pub fn prune(p: &Profile, dry_run: bool, json: bool) -> Exit {
    let mut s = match Session::begin(p, "prune") {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let mut decisions = None;
    let r = s.open_all("prune", dry_run).and_then(|root| {
        if !dry_run {
            // An interrupted snapshot the next run can resume stays (snapshots::resume).
            snapshots::settle_partials(p, &root)?;
        }
        if p.retention.is_empty() {
            info!("the profile has no retention rules: every snapshot is kept");
        }
        let t0 = std::time::Instant::now();
        let committed = s.snapshots().to_vec();
        let ds = snapshots::prune(p, &root, &committed, dry_run)?;
        let removed: Vec<_> = ds.iter().filter(|d| d.removed()).map(|d| d.id).collect();
        decisions = Some(ds);
        if !dry_run {
            s.snapshots_removed(&removed);
            info!("prune took {:.1} s", t0.elapsed().as_secs_f64());
            s.commit_generation(&root)?;
        }
        Ok(Exit::Ok)
    });
    let code = finish(s, &r).0;
    if let Some(ds) = decisions {
        print_decisions(&ds, dry_run, json);
    }
    code
}

fn print_decisions(ds: &[retention::Decision], dry_run: bool, json: bool) {
    let lines: Vec<PruneLine> = ds
        .iter()
        .map(|d| PruneLine {
            id: d.id.to_string(),
            keep: d.keep.iter().map(|r| r.to_string()).collect(),
            remove: d.removed(),
        })
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&lines).unwrap_or_default()
        );
        return;
    }
    for l in lines {
        let what = if l.remove {
            if dry_run { "would remove" } else { "removed" }.to_string()
        } else {
            format!("keep ({})", l.keep.join(", "))
        };
        println!("{}  {what}", l.id);
    }
}

/// `accept-rollback` (`accept-loss`): after a deliberate restore of the server from an older
/// backup, or after the server lost snapshots, accept the container as it is: its
/// (authenticated) generation becomes this client's record, and the snapshots it lacks are
/// accepted as lost. First the filesystem is checked read-only (`e2fsck -fn`): a damaged
/// image, or one whose journal needs recovery (a copy taken mid-run), is refused (exit 6)
/// unless `force`, since the next `run` would write to it. It names what is lost: the
/// snapshots this client had committed that the container does not hold.
pub fn accept_rollback(p: &Profile, force: bool) -> Exit {
    let before = crate::generation::client_generation(p).ok().flatten();
    let record = crate::generation::read_client_record(p).ok().flatten();
    let mut s = match Session::begin(p, "accept-rollback") {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    // The generation check is what is being overridden; the MAC is still verified.
    s.accept_any_generation();
    let r = (|| -> anyhow::Result<Exit> {
        let mapper = s.unlock_container("accept-rollback", true)?;
        let damage = if crate::stack::ext4::needs_recovery(&mapper)? {
            Some(
                "its ext4 journal needs recovery (a copy taken while a run was writing): \
                 e2fsck cannot check it read-only"
                    .to_string(),
            )
        } else {
            info!("checking the filesystem read-only (e2fsck -fn) before accepting it");
            match crate::stack::ext4::check_readonly(&mapper)? {
                crate::stack::ext4::Fsck::Clean => None,
                crate::stack::ext4::Fsck::Errors => Some(
                    "e2fsck -fn found errors in its filesystem (run with -v for its output)"
                        .to_string(),
                ),
                crate::stack::ext4::Fsck::Aborted { code, output } => Some(format!(
                    "e2fsck -fn stopped at damage it cannot check past (exit {code}: {output})"
                )),
            }
        };
        match (&damage, force) {
            (Some(d), false) => {
                return Err(crate::error::Failure::Security(format!(
                    "not accepting the container of `{}`: {d}. The next run would write to it. \
                     Restore a sound copy, or accept it anyway with `e2ebackup accept-rollback {} --force`",
                    p.name, p.name
                ))
                .into())
            }
            (Some(d), true) => crate::warn!("accepting the container although {d} (--force)"),
            (None, _) => {}
        }
        s.mount_checked(true)?;
        let g = s.generation().context("the generation was not checked")?;
        let checked = s.checked().cloned().unwrap_or_default();
        let have: Vec<String> = s.snapshots().iter().map(|i| i.to_string()).collect();
        let missing: Vec<String> = checked.missing.iter().map(|i| i.to_string()).collect();
        let lost: Vec<String> = match &record {
            Some(r) => r
                .snapshots
                .iter()
                .filter(|i| !have.contains(i))
                .cloned()
                .collect(),
            None => missing.clone(),
        };
        if record.is_none() {
            crate::warn!(
                "this client kept no list of its snapshots (an older version committed last): \
                 only the snapshots missing from the container's own list are known lost"
            );
        }
        for l in &lost {
            crate::logging::emit(-2, "LOST: ", format_args!("snapshot {l}"));
        }
        if !missing.is_empty() {
            crate::warn!(
                "the container's authenticated list names {} that its snapshots/ directory lacks",
                missing.join(", ")
            );
        }
        crate::generation::set_client_record(p, g, &have)?;
        if !missing.is_empty() {
            // The container's STATE still names them until the next commit: accepted as gone.
            let missing_ids = checked.missing.clone();
            crate::generation::note_pending(p, None, &missing_ids)?;
        }
        info!(
            "accepted the container at generation {g} (this client had recorded {}); {} snapshot(s) \
             lost: {}; {} remain, latest {}",
            before
                .map(|b| b.to_string())
                .unwrap_or_else(|| "none".into()),
            lost.len(),
            if lost.is_empty() { "none".to_string() } else { lost.join(", ") },
            have.len(),
            have.last().map(String::as_str).unwrap_or("none")
        );
        Ok(Exit::Ok)
    })();
    finish(s, &r).0
}
