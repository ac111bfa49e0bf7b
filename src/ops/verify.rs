//! `e2ebackup verify PROFILE [--read-data PERCENT]`: is what the server holds still what
//! was written? A read-only `e2fsck -fn` of the unmounted filesystem, then every snapshot's
//! files against the manifest written at backup time, each with the algorithm its manifest
//! names (all of them, or a rolling PERCENT: each partial verify reads the next PERCENT of
//! the files, from a cursor kept in the client's state directory, so that 100/PERCENT
//! verifies read everything whatever the time between them). Every file
//! that differs is named. Any problem exits 6: on an untrusted server, a changed byte is
//! tamper evidence until shown otherwise.

use anyhow::Result;

use crate::error::{Exit, Failure};
use crate::ops::{fail_ref, finish, CheckReport};
use crate::profile::Profile;
use crate::session::Session;
use crate::stack::ext4;
use crate::{info, manifest, snapshots, warn};

pub fn verify(p: &Profile, percent: u32, json: bool) -> Exit {
    let mut rep = CheckReport::new(p, "verify");
    if !(1..=100).contains(&percent) {
        let e = crate::error::usage("--read-data must be between 1 and 100");
        return rep.conclude(fail_ref(&e), Some(&e), json);
    }
    let mut s = match Session::begin(p, "verify") {
        Ok(s) => s,
        Err(e) => return rep.conclude(fail_ref(&e), Some(&e), json),
    };
    let r = work(p, &mut s, percent, &mut rep);
    let code = finish(s, &r).0;
    rep.conclude(code, r.as_ref().err(), json)
}

fn work(p: &Profile, s: &mut Session<'_>, percent: u32, rep: &mut CheckReport) -> Result<Exit> {
    let mapper = s.unlock_container("verify", true)?;
    let crash_image = ext4::needs_recovery(&mapper)?;
    rep.detail("journal_needs_recovery", crash_image);
    let problems = &mut rep.problems;
    if crash_image {
        // Without the journal the on-disk metadata is knowingly mid-transaction, so e2fsck -n
        // would report its counts as errors; the manifests below are the check that matters.
        warn!(
            "the filesystem's journal needs recovery (an interrupted run): e2fsck -fn skipped, \
             since it cannot replay the journal read-only; the snapshots are checked against their manifests"
        );
    } else {
        info!("checking the filesystem read-only (e2fsck -fn)");
        match ext4::check_readonly(&mapper)? {
            ext4::Fsck::Clean => {}
            ext4::Fsck::Errors => problems.push(
                "e2fsck found errors in the filesystem (run with -v for its output)".to_string(),
            ),
            ext4::Fsck::Aborted { code, output } => {
                // It stops at metadata it cannot trust: damage, not a failure of the tool.
                let e = crate::error::damaged(
                    format!("e2fsck -fn stopped (exit {code}: {output})"),
                    "",
                );
                problems.push(format!("{e}"));
            }
        }
    }
    let root = match s.mount_checked(true) {
        Ok(r) => r,
        Err(e) if !rep.problems.is_empty() => {
            for pr in &rep.problems {
                crate::logging::emit(-2, "DIFFERS: ", format_args!("{pr}"));
            }
            return Err(e.context(Failure::Security(format!(
                "verify found {} problem(s) and could not mount the container's filesystem",
                rep.problems.len()
            ))));
        }
        Err(e) => return Err(e),
    };
    // The rolling subset goes on from where the last partial verify stopped.
    let cursor_path = p.verify_cursor_path();
    let cursor = if percent < 100 {
        manifest::read_cursor(&cursor_path)
    } else {
        0
    };
    let (mut files, mut unhashed) = (0, 0);
    // The authenticated list (the open refused a listed snapshot that is missing); an entry
    // of snapshots/ that it does not name was reported by the open and is not verified.
    for id in s.snapshots().to_vec() {
        let name = id.to_string();
        let Some(entries) = manifest::open(&root, &name)? else {
            warn!("snapshot {name} has no manifest (taken by an older version): not verified");
            continue;
        };
        let (n, no_hash, bad) =
            manifest::verify(&snapshots::path_of(&root, id), entries, percent, cursor)?;
        files += n;
        unhashed += no_hash;
        for b in bad {
            problems.push(format!("snapshot {name}: {b}"));
        }
    }
    if percent < 100 {
        // Every file of this window was read (a difference found is reported, not re-read):
        // the next partial verify reads the next window.
        let next = manifest::next_cursor(cursor, percent);
        crate::fsutil::private_dir(&p.state_dir())
            .and_then(|_| crate::fsutil::write_atomic(&cursor_path, format!("{next}\n").as_bytes()))
            .map_err(|e| {
                warn!(
                    "could not keep the verify cursor in {}: {e:#}",
                    cursor_path.display()
                )
            })
            .ok();
        info!(
            "verified {files} file(s) ({percent}% rolling subset from bucket {cursor} of 100; next time from {next}) in the snapshots of `{}`",
            p.name
        );
        rep.detail("read_data_cursor", cursor);
    } else {
        info!("verified {files} file(s) in the snapshots of `{}`", p.name);
    }
    if unhashed > 0 {
        warn!(
            "{unhashed} file(s) have no hash in their manifest (they changed in the source while it was copied): not verified"
        );
    }
    rep.detail("files_verified", files);
    rep.detail("files_without_hash", unhashed);
    rep.detail("read_data_percent", percent);
    let problems = &rep.problems;
    if problems.is_empty() {
        info!("verify: no problem found");
        return Ok(Exit::Ok);
    }
    for pr in problems {
        crate::logging::emit(-2, "DIFFERS: ", format_args!("{pr}"));
    }
    Err(Failure::Security(format!(
        "verify found {} problem(s): the data on the server changed after it was written",
        problems.len()
    ))
    .into())
}
