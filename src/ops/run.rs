//! `e2ebackup run PROFILE`: one snapshot, then retention, then teardown.

use anyhow::Result;

use crate::error::{exit_for, Exit};
use crate::ops::finish;
use crate::profile::Profile;
use crate::session::Session;
use crate::snapshots::{self, Taken};
use crate::state::{self, LastRun};
use crate::{hooks, info, monitor, warn};

pub mod dry_run;
mod no_space;

/// `allow_shrink`: `run --allow-shrink`, commit a source that emptied or shrank
/// (snapshots::guard).
pub fn run(p: &Profile, allow_shrink: bool) -> Exit {
    let started = super::now();
    let clock = std::time::Instant::now();
    let pinger = monitor::Pinger::new(p);
    let mut s = match Session::begin(p, "run") {
        Ok(s) => s,
        // Another run holds the lock: it is the one that reports; this one only says so.
        Err(e) if exit_for(&e) == Exit::Locked => return super::fail(e),
        Err(e) => {
            let err = Some(format!("{e:#}"));
            let code = super::fail(e);
            let o = Outcome::new(code, err, true);
            return conclude(p, &started, clock, o, pinger.as_ref());
        }
    };
    // The `before` hook runs with the local lock held, before anything else is touched.
    match hooks::before(p) {
        Ok(hooks::Before::Proceed) => {}
        Ok(hooks::Before::Skip { command }) => {
            info!(
                "before hook `{command}` exited {}: target unavailable, run skipped",
                hooks::SKIP
            );
            let complete = s.close().complete();
            let mut o = Outcome::new(Exit::Ok, None, complete);
            o.skipped = true;
            return conclude(p, &started, clock, o, pinger.as_ref());
        }
        Err(e) => {
            let e = e.context("the before hook failed; nothing was touched");
            let err = Some(format!("{e:#}"));
            let code = super::fail(e);
            let complete = s.close().complete();
            let o = Outcome::new(code, err, complete);
            return conclude(p, &started, clock, o, pinger.as_ref());
        }
    }
    if let Some(pg) = &pinger {
        pg.start();
    }
    let mut figures = Figures::default();
    let result = work(p, &mut s, &mut figures, allow_shrink).map_err(|e| no_space::explain(p, e));
    let (code, complete) = finish(s, &result);
    let err = result.as_ref().err().map(|e| format!("{e:#}"));
    if let Err(e) = &result {
        figures.container_full = e
            .downcast_ref::<snapshots::ContainerFull>()
            .map(|c| c.still_needed.unwrap_or(0));
    } else {
        figures.partial_left = false;
    }
    let mut o = Outcome::new(code, err, complete);
    o.figures = figures;
    conclude(p, &started, clock, o, pinger.as_ref())
}

/// What a run came to, for the hooks, the record and the monitoring.
struct Outcome {
    code: Exit,
    error: Option<String>,
    teardown_complete: bool,
    skipped: bool,
    figures: Figures,
}

impl Outcome {
    fn new(code: Exit, error: Option<String>, teardown_complete: bool) -> Outcome {
        Outcome {
            code,
            error,
            teardown_complete,
            skipped: false,
            figures: Figures::default(),
        }
    }
}

/// Figures gathered while the container was open.
#[derive(Default)]
struct Figures {
    taken: Option<Taken>,
    container_size: Option<u64>,
    snapshot_count: Option<u64>,
    /// The run failed with the container's filesystem full: what it still needed (0: unknown).
    container_full: Option<u64>,
    /// A snapshot was being written under `.partial/` (kept for the next run if this fails).
    partial_left: bool,
}

/// After the teardown: `after`/`failed` and `finally` hooks, the record, the textfile, the
/// ping, the closing line.
fn conclude(
    p: &Profile,
    started: &str,
    clock: std::time::Instant,
    o: Outcome,
    pinger: Option<&monitor::Pinger>,
) -> Exit {
    let t = o.figures.taken.as_ref();
    let snapshot = t.map(|t| t.id.clone());
    let unread = t.map(|t| t.unread.clone()).unwrap_or_default();
    let unread_list = if o.skipped {
        None
    } else {
        state::write_unread_list(p, &unread)
    };
    let result = if o.skipped {
        state::SKIPPED
    } else {
        state::result_word(o.code)
    };
    let ctx = hooks::RunContext {
        snapshot: snapshot.clone(),
        exit: Some(o.code),
        result: Some(result.to_string()),
        error: o.error.clone(),
        unread: unread_list
            .filter(|_| !unread.is_empty())
            .map(|l| (unread.len(), l)),
    };
    let code = if o.skipped {
        if let Err(e) = hooks::run_stage(p, hooks::Stage::Finally, &ctx) {
            warn!("{e:#}");
        }
        o.code
    } else {
        hooks::after_run(p, o.code, &ctx)
    };
    let result = if code != o.code {
        state::result_word(code)
    } else {
        result
    };
    let rec = state::record_last_run(
        p,
        &LastRun {
            command: "run".into(),
            started: started.into(),
            finished: super::now(),
            exit_code: code as i32,
            result: result.into(),
            error: o.error,
            snapshot: snapshot.clone(),
            teardown_complete: o.teardown_complete,
            files_transferred: t.and_then(|t| t.files_transferred),
            bytes_transferred: t.and_then(|t| t.bytes_transferred),
            duration_seconds: Some((clock.elapsed().as_secs_f64() * 10.0).round() / 10.0),
            container_size: o.figures.container_size,
            snapshot_count: o.figures.snapshot_count,
            container_full_needed: o.figures.container_full,
            partial_left: o.figures.partial_left && o.code != Exit::Ok && o.code != Exit::Warnings,
            resumed_from: t
                .and_then(|t| t.resumed.as_ref())
                .map(|r| r.first_id.clone()),
            resumed_bytes: t.and_then(|t| t.resumed.as_ref()).map(|r| r.bytes),
            resumed_total_bytes: t
                .and_then(|t| t.resumed.as_ref())
                .and_then(|r| r.total_bytes),
            source_entries: t.and_then(|t| t.entries),
            unread_files: unread,
            skipped_large_files: t.map(|t| t.skipped_large.clone()).unwrap_or_default(),
            ..Default::default()
        },
    );
    match code {
        Exit::Ok if o.skipped => warn!(
            "run skipped (target unavailable): {} in a row, monitoring.max_skips is {}",
            rec.consecutive_skips, p.monitoring.max_skips
        ),
        Exit::Ok => info!(
            "run finished: snapshot {} committed",
            snapshot.unwrap_or_default()
        ),
        Exit::Warnings => warn!("run finished with warnings (exit 3)"),
        _ => {}
    }
    monitor::report(p, &rec, pinger);
    code
}

fn work(p: &Profile, s: &mut Session<'_>, f: &mut Figures, allow_shrink: bool) -> Result<Exit> {
    // Before connecting (after the `before` hook, which may mount a source).
    let missing = crate::localpaths::source_problems(p);
    if !missing.is_empty() {
        anyhow::bail!(
            "{}: {} (nothing was touched)",
            p.source_file.display(),
            missing.join("; ")
        );
    }
    let kf = &p.container.keyfile.0;
    if std::fs::symlink_metadata(kf).is_err() {
        return Err(crate::error::usage(format!(
            "container.keyfile {} does not exist: run `e2ebackup init {}` first (it creates \
             the container and the keyfile; on another machine copy the keyfile, or use \
             `e2ebackup recover-key`). Nothing was touched.",
            kf.display(),
            p.name
        )));
    }
    if let Some(w) = crate::localpaths::textfile_problem(p) {
        warn!("{w}: this run's figures cannot be written");
    }
    let root = s.open_all("run", false)?;
    // An interrupted snapshot of this profile is continued; anything else left is removed.
    let resume = snapshots::settle_partials(p, &root)?;
    super::grow::auto_grow(p, s, &root)?;
    no_space::check_before(p, &root)?;
    f.partial_left = true;
    let guard = snapshots::Guard {
        allow_shrink,
        previous_entries: state::read_last_run(p).and_then(|r| r.source_entries),
    };
    let committed = s.snapshots().to_vec();
    let t = snapshots::take_guarded(p, &root, Some(&s.mapper()?), resume, &committed, &guard)?;
    let warnings = t.has_warnings();
    let id: crate::snapid::SnapshotId = t.id.parse().map_err(anyhow::Error::msg)?;
    s.snapshot_added(id);
    f.taken = Some(t);
    crate::signals::check()?;
    let committed = s.snapshots().to_vec();
    let removed: Vec<_> = snapshots::prune(p, &root, &committed, false)?
        .into_iter()
        .filter(|d| d.removed())
        .map(|d| d.id)
        .collect();
    s.snapshots_removed(&removed);
    let g = s.commit_generation(&root)?;
    crate::debug!("container generation {g}");
    if let Some(t) = &f.taken {
        t.report_committed();
    }
    f.snapshot_count = Some(s.snapshots().len() as u64);
    f.container_size = s
        .server_dir()
        .ok()
        .and_then(|d| d.len(&p.container.file.0).ok().flatten());
    Ok(if warnings { Exit::Warnings } else { Exit::Ok })
}
