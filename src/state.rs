//! What the client records about its commands: the last run's record
//! (`/var/lib/e2ebackup/NAME/last-run.json`), read by `status`, hooks and monitoring. It
//! sits below them and below the commands, so that each of them can use it without reaching
//! into `ops`.

use serde::{Deserialize, Serialize};

use crate::error::Exit;
use crate::profile::Profile;
use crate::snapid::SnapshotId;

/// What `status` shows about the last run; written to the state directory as the JSON status
/// file `/var/lib/e2ebackup/NAME/last-run.json` (fields added later are optional, so an older
/// file still reads).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LastRun {
    pub command: String,
    pub started: String,
    pub finished: String,
    pub exit_code: i32,
    pub result: String,
    pub error: Option<String>,
    pub snapshot: Option<String>,
    pub teardown_complete: bool,
    pub files_transferred: Option<u64>,
    pub bytes_transferred: Option<u64>,
    #[serde(default)]
    pub finished_unix: Option<i64>,
    #[serde(default)]
    pub duration_seconds: Option<f64>,
    /// When the last successful `run` finished (carried over by runs that fail).
    #[serde(default)]
    pub last_success: Option<String>,
    #[serde(default)]
    pub last_success_unix: Option<i64>,
    /// Apparent size of the container file. What the server allocated for it is not
    /// recorded: SFTP has no allocated-blocks attribute and sshfs reports st_blocks derived
    /// from the size (measured: a 1 GiB file with 3 MiB written shows 2097152 blocks through
    /// sshfs, 6144 on the server), so only a command on the server (`stat`) could tell, and
    /// only `trim` runs commands there (it prints the allocation before and after).
    #[serde(default)]
    pub container_size: Option<u64>,
    #[serde(default)]
    pub snapshot_count: Option<u64>,
    /// How many `run`s in a row ended skipped by a `before` hook (0 after any other run).
    #[serde(default)]
    pub consecutive_skips: u64,
    /// `run` failed because the container's filesystem was full (ENOSPC inside it): the
    /// bytes rsync still had to write by the estimate of its progress (0: unknown). The
    /// next run's `auto_grow` grows by at least this, whatever the free-space threshold.
    #[serde(default)]
    pub container_full_needed: Option<u64>,
    /// A failed `run` that left an interrupted snapshot: the next run resumes it.
    #[serde(default)]
    pub partial_left: bool,
    /// A `run` that completed an interrupted snapshot: the id its first attempt gave it,
    /// and the bytes already there of all the sources' bytes.
    #[serde(default)]
    pub resumed_from: Option<String>,
    #[serde(default)]
    pub resumed_bytes: Option<u64>,
    #[serde(default)]
    pub resumed_total_bytes: Option<u64>,
    /// Entries rsync counted in the sources for the last committed snapshot (carried over
    /// by runs that commit none): the next run's shrink check (`backup.max_shrink`).
    #[serde(default)]
    pub source_entries: Option<u64>,
    /// Source files this run could not read (committed without them, exit 3), as rsync
    /// names them (control characters escaped as `\#ooo`). Also in [`UNREAD_LIST`].
    #[serde(default)]
    pub unread_files: Vec<String>,
    /// Files this run skipped for `backup.max_file_size`, as rsync names them.
    #[serde(default)]
    pub skipped_large_files: Vec<String>,
}

/// The file in the state directory that lists the last run's unread files, one a line
/// (rewritten by every run; empty when it read everything): `E2EBACKUP_UNREAD_LIST`.
pub const UNREAD_LIST: &str = "unread-files";

/// Write the last run's list of unread files; returns its path.
pub fn write_unread_list(p: &Profile, files: &[String]) -> Option<std::path::PathBuf> {
    let path = p.state_dir().join(UNREAD_LIST);
    let text: String = files.iter().map(|f| format!("{f}\n")).collect();
    let r = crate::fsutil::private_dir(&p.state_dir())
        .and_then(|_| crate::fsutil::write_atomic(&path, text.as_bytes()));
    match r {
        Ok(()) => Some(path),
        Err(e) => {
            crate::warn!("cannot write {}: {e:#}", path.display());
            None
        }
    }
}

pub fn result_word(code: Exit) -> &'static str {
    match code {
        Exit::Ok => "success",
        Exit::Warnings => "success with warnings",
        Exit::Locked => "skipped: locked",
        Exit::Interrupted => "interrupted",
        Exit::Security => "refused for security",
        Exit::TeardownIncomplete => "failed, teardown incomplete",
        Exit::Usage => "invalid usage",
        Exit::Failed => "failed",
    }
}

/// Write the record; fills in the time fields and carries the last success over from the
/// previous record unless this was a successful `run`. Returns what was written.
pub fn record_last_run(p: &Profile, rec: &LastRun) -> LastRun {
    let mut rec = rec.clone();
    let now = SnapshotId::now();
    rec.finished_unix = Some(now.unix());
    let ok = rec.command == "run" && (rec.exit_code == 0 || rec.exit_code == 3);
    let prev = read_last_run(p);
    if rec.command == "run" && rec.result == SKIPPED {
        rec.consecutive_skips = prev.as_ref().map_or(0, |p| p.consecutive_skips) + 1;
    } else if rec.command != "run" {
        rec.consecutive_skips = prev.as_ref().map_or(0, |p| p.consecutive_skips);
    }
    if rec.source_entries.is_none() || !ok {
        rec.source_entries = prev.as_ref().and_then(|r| r.source_entries);
    }
    if ok && rec.result != SKIPPED {
        rec.last_success = Some(rec.finished.clone());
        rec.last_success_unix = Some(now.unix());
    } else if let Some(prev) = prev {
        rec.last_success = prev.last_success;
        rec.last_success_unix = prev.last_success_unix;
        rec.container_size = rec.container_size.or(prev.container_size);
        rec.snapshot_count = rec.snapshot_count.or(prev.snapshot_count);
    }
    let r = crate::fsutil::private_dir(&p.state_dir()).and_then(|_| {
        crate::fsutil::write_atomic(&p.last_run_path(), &serde_json::to_vec_pretty(&rec)?)
    });
    if let Err(e) = r {
        crate::warn!("cannot record the last run: {e:#}");
    }
    rec
}

/// `result` of a run skipped by a `before` hook exiting 75.
pub const SKIPPED: &str = "skipped: target unavailable";

pub fn read_last_run(p: &Profile) -> Option<LastRun> {
    serde_json::from_slice(&std::fs::read(p.last_run_path()).ok()?).ok()
}
