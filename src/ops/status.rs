//! `e2ebackup status PROFILE`: what is mounted or open, who holds the lock, the last run.
//! Read-only: it takes no lock (taking it would make a concurrent `run` exit 4).

use serde::Serialize;

use crate::error::Exit;
use crate::profile::Profile;
use crate::stack::{lock, luks, mount};
use crate::teardown::Journal;

#[derive(Debug, Serialize)]
pub struct Status {
    pub profile: String,
    pub lock_holder_pid: Option<u32>,
    pub sshfs_mounted: bool,
    pub luks_open: bool,
    pub filesystem_mounted: bool,
    pub pending_teardown: Vec<String>,
    pub mounted_by_mount_command: bool,
    pub last_run: Option<crate::state::LastRun>,
    /// Set when the last success is older than `monitoring.expected_interval`.
    pub stale: Option<String>,
    /// Set when `monitoring.max_skips` runs in a row were skipped by a `before` hook.
    pub skipped_too_often: Option<String>,
    /// The last snapshot this client committed (commit order, from its own record): what
    /// `restore latest` restores.
    #[serde(default)]
    pub latest_snapshot: Option<String>,
    /// Committed snapshots dated after this clock (a clock was ahead when they were taken).
    #[serde(default)]
    pub future_snapshots: Vec<String>,
    /// The pinned header records an unfinished `keys rotate --reencrypt`: no command opens
    /// the container, so no backup is taken, until it is run again.
    #[serde(default)]
    pub reencrypt_unfinished: bool,
}

pub fn gather(p: &Profile) -> Status {
    let holder = std::fs::read_to_string(crate::layout::local_lock_path(&p.name))
        .ok()
        .and_then(|s| {
            s.trim()
                .strip_prefix("pid ")
                .and_then(|x| x.parse::<u32>().ok())
        })
        .filter(|pid| lock::pid_start(*pid).is_some() && holder_has_lock(p));
    let journal = Journal::read(&p.journal_path()).ok().flatten();
    let last = crate::state::read_last_run(p);
    let now = crate::generation::trusted_now(p);
    let committed: Vec<crate::snapid::SnapshotId> = crate::generation::read_client_record(p)
        .ok()
        .flatten()
        .map(|r| r.snapshots.iter().filter_map(|s| s.parse().ok()).collect())
        .unwrap_or_default();
    Status {
        latest_snapshot: committed.last().map(|s| s.to_string()),
        future_snapshots: crate::retention::dated_in_future(&committed, now)
            .iter()
            .map(|s| s.to_string())
            .collect(),
        profile: p.name.clone(),
        reencrypt_unfinished: luks::reencrypt_unfinished(&p.header_backup()).unwrap_or(false),
        lock_holder_pid: holder,
        sshfs_mounted: mount::mounted_at(&p.sshfs_dir()).ok().flatten().is_some(),
        luks_open: luks::is_active(&p.mapping_name()),
        filesystem_mounted: mount::mounted_at(&p.fs_dir()).ok().flatten().is_some(),
        pending_teardown: journal
            .as_ref()
            .map(|j| j.records.iter().rev().map(|r| r.to_string()).collect())
            .unwrap_or_default(),
        mounted_by_mount_command: journal.as_ref().is_some_and(|j| j.persistent),
        stale: crate::monitor::staleness(p, last.as_ref(), crate::snapid::SnapshotId::now().unix()),
        skipped_too_often: crate::monitor::skip_alarm(p, last.as_ref()),
        last_run: last,
    }
}

/// Whether some process holds the local flock. Read from /proc/locks rather than probed
/// with a lock of our own: a probe, however short, could make a starting `run` exit 4.
fn holder_has_lock(p: &Profile) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(crate::layout::local_lock_path(&p.name)) else {
        return false;
    };
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    locks.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&"FLOCK")
            && f.get(5)
                .and_then(|d| d.rsplit(':').next())
                .and_then(|ino| ino.parse::<u64>().ok())
                == Some(meta.ino())
    })
}

pub fn status(p: &Profile, json: bool) -> Exit {
    let st = gather(p);
    // A stale backup is worth a non-zero status: monitoring scripts can test for 3. So is a
    // re-encryption left unfinished: it stops every backup.
    let code = if st.stale.is_some() || st.skipped_too_often.is_some() || st.reencrypt_unfinished {
        Exit::Warnings
    } else {
        Exit::Ok
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&st).unwrap_or_default());
        return code;
    }
    println!(
        "profile:        {} ({})",
        st.profile,
        p.source_file.display()
    );
    println!(
        "container:      {}@{}:{}",
        p.server.user,
        p.server.host,
        p.remote_container()
    );
    println!(
        "lock:           {}",
        match st.lock_holder_pid {
            Some(pid) => format!("held by pid {pid}"),
            None => "free".into(),
        }
    );
    println!("sshfs mounted:  {}", yes(st.sshfs_mounted));
    println!("LUKS open:      {}", yes(st.luks_open));
    println!(
        "fs mounted:     {}{}",
        yes(st.filesystem_mounted),
        if st.mounted_by_mount_command {
            " (by `e2ebackup mount`)"
        } else {
            ""
        }
    );
    if st.reencrypt_unfinished {
        println!(
            "key rotation:   an unfinished `keys rotate --reencrypt`: no backup is taken until \
             `e2ebackup keys rotate {} --reencrypt` has finished it",
            p.name
        );
    }
    if !st.pending_teardown.is_empty() && st.lock_holder_pid.is_none() {
        println!("pending teardown (run `e2ebackup cleanup {}`):", p.name);
        for r in &st.pending_teardown {
            println!("  - {r}");
        }
    }
    match &st.last_run {
        Some(l) => {
            println!(
                "last run:       {} {} -> {} (exit {})",
                l.command, l.started, l.result, l.exit_code
            );
            if let Some(s) = &l.snapshot {
                println!("last snapshot:  {s}");
            }
            if let Some(e) = &l.error {
                println!("last error:     {e}");
            }
            if let Some(first) = &l.resumed_from {
                let size = |b: Option<u64>| {
                    b.map(|b| crate::profile::Size(b).to_string())
                        .unwrap_or_else(|| "?".into())
                };
                println!(
                    "resumed:        an interrupted backup (first started {first}): {} of {} already there",
                    size(l.resumed_bytes),
                    size(l.resumed_total_bytes)
                );
            }
            if l.partial_left {
                println!(
                    "interrupted:    the next run resumes this run's snapshot (kept for up to backup.resume_max_age)"
                );
            }
            if l.container_full_needed.is_some() {
                println!(
                    "container full: the last run ran out of room inside the container; {}",
                    if p.container.auto_grow.is_some() {
                        "the next run grows it (auto_grow)"
                    } else {
                        "grow it (`e2ebackup grow`) or set container.auto_grow"
                    }
                );
            }
            if !l.unread_files.is_empty() {
                println!(
                    "not read:       {} files (not in the snapshot)",
                    l.unread_files.len()
                );
                for f in &l.unread_files {
                    println!("  - {f}");
                }
            }
            if !l.skipped_large_files.is_empty() {
                println!(
                    "skipped:        {} files over backup.max_file_size",
                    l.skipped_large_files.len()
                );
                for f in &l.skipped_large_files {
                    println!("  - {f}");
                }
            }
        }
        None => println!("last run:       never"),
    }
    if let Some(l) = st.last_run.as_ref().and_then(|l| l.last_success.as_ref()) {
        println!("last success:   {l}");
    }
    if let Some(l) = st.last_run.as_ref().filter(|l| l.consecutive_skips > 0) {
        println!(
            "skipped:        the last {} run(s) in a row (before hook: target unavailable)",
            l.consecutive_skips
        );
    }
    if let Some(l) = &st.latest_snapshot {
        println!("latest:         {l} (last committed)");
    }
    if !st.future_snapshots.is_empty() {
        println!(
            "dated in future: {} (this clock reads {}; `latest` is the last committed)",
            st.future_snapshots.join(", "),
            crate::snapid::SnapshotId::now()
        );
        crate::warn!(
            "{}: snapshot(s) {} are dated in the future: a clock was ahead when they were taken \
             (docs/operations.md, clock jumps)",
            p.name,
            st.future_snapshots.join(", ")
        );
    }
    if let Some(w) = &st.stale {
        crate::warn!("{}: {w}", p.name);
    }
    if let Some(w) = &st.skipped_too_often {
        crate::warn!("{}: {w}", p.name);
    }
    code
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
