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
        decisions = Some(snapshots::prune(p, &root, dry_run)?);
        if !dry_run {
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

/// `accept-rollback`: after a deliberate restore of the server from an older backup, accept
/// the container's (authenticated) generation as this client's record.
pub fn accept_rollback(p: &Profile) -> Exit {
    let before = crate::generation::client_generation(p).ok().flatten();
    let mut s = match Session::begin(p, "accept-rollback") {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    // The generation check is what is being overridden; the MAC is still verified.
    s.accept_any_generation();
    let r = s.open_all("accept-rollback", true).and_then(|_| {
        let g = s.generation().context("the generation was not checked")?;
        crate::generation::set_client_generation(p, g)?;
        info!(
            "accepted the container at generation {g} (this client had recorded {})",
            before
                .map(|b| b.to_string())
                .unwrap_or_else(|| "none".into())
        );
        Ok(Exit::Ok)
    });
    finish(s, &r).0
}
