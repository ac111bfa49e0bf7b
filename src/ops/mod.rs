//! The commands. Each returns the process exit status; errors are printed here, once, before
//! the teardown runs (so the cause is the first thing a reader sees, and the teardown's own
//! messages follow it).

pub mod grow;
pub mod init;
pub mod keys;
pub mod maintenance;
pub mod restore;
pub mod run;
pub mod schedule;
pub mod status;
pub mod trim;
pub mod verify;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::error::{exit_for, Exit};
use crate::profile::Profile;
use crate::session::Session;
use crate::snapid::SnapshotId;

/// Print an error the way every command does.
pub fn print_error(e: &anyhow::Error) {
    crate::logging::emit(-2, "ERROR: ", format_args!("{e:#}"));
}

/// Exit status for an error raised before anything was acquired.
pub fn fail(e: anyhow::Error) -> Exit {
    print_error(&e);
    exit_for(&e)
}

/// Like [`fail`], for an error the caller still needs (to report it as JSON).
pub fn fail_ref(e: &anyhow::Error) -> Exit {
    print_error(e);
    exit_for(e)
}

/// Report the work's result, then tear down. An incomplete teardown turns the status into 5,
/// except a security refusal: that cause stays 6 (the teardown's failures and the commands
/// to finish it are printed either way, and the status file records both).
pub fn finish(session: Session<'_>, result: &Result<Exit>) -> (Exit, bool) {
    if let Err(e) = result {
        print_error(e);
    }
    let report = session.close();
    let code = match result {
        Ok(c) => *c,
        Err(e) => exit_for(e),
    };
    (combine(code, report.complete()), report.complete())
}

/// The exit status for a work result `code` and whether the teardown completed.
pub fn combine(code: Exit, teardown_complete: bool) -> Exit {
    match (code, teardown_complete) {
        (c, true) => c,
        (Exit::Security, false) => {
            crate::warn!("exit 6 (refused for security); the teardown is incomplete as well");
            Exit::Security
        }
        (_, false) => Exit::TeardownIncomplete,
    }
}

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
    /// Apparent size of the container file, and what the server allocated for it.
    #[serde(default)]
    pub container_size: Option<u64>,
    #[serde(default)]
    pub container_allocated: Option<u64>,
    #[serde(default)]
    pub snapshot_count: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incomplete_teardown_keeps_a_security_refusal() {
        assert_eq!(combine(Exit::Ok, true), Exit::Ok);
        assert_eq!(combine(Exit::Failed, false), Exit::TeardownIncomplete);
        assert_eq!(combine(Exit::Ok, false), Exit::TeardownIncomplete);
        assert_eq!(combine(Exit::Security, false), Exit::Security);
        assert_eq!(combine(Exit::Security, true), Exit::Security);
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

pub fn last_run_path(p: &Profile) -> std::path::PathBuf {
    p.state_dir().join("last-run.json")
}

/// Write the record; fills in the time fields and carries the last success over from the
/// previous record unless this was a successful `run`. Returns what was written.
pub fn record_last_run(p: &Profile, rec: &LastRun) -> LastRun {
    let mut rec = rec.clone();
    let now = SnapshotId::now();
    rec.finished_unix = Some(now.unix());
    let ok = rec.command == "run" && (rec.exit_code == 0 || rec.exit_code == 3);
    if ok && rec.result != SKIPPED {
        rec.last_success = Some(rec.finished.clone());
        rec.last_success_unix = Some(now.unix());
    } else if let Some(prev) = read_last_run(p) {
        rec.last_success = prev.last_success;
        rec.last_success_unix = prev.last_success_unix;
        rec.container_size = rec.container_size.or(prev.container_size);
        rec.container_allocated = rec.container_allocated.or(prev.container_allocated);
        rec.snapshot_count = rec.snapshot_count.or(prev.snapshot_count);
    }
    let r = crate::fsutil::private_dir(&p.state_dir()).and_then(|_| {
        crate::fsutil::write_atomic(&last_run_path(p), &serde_json::to_vec_pretty(&rec)?)
    });
    if let Err(e) = r {
        crate::warn!("cannot record the last run: {e:#}");
    }
    rec
}

/// `result` of a run skipped by a `before` hook exiting 75.
pub const SKIPPED: &str = "skipped: target unavailable";

pub fn read_last_run(p: &Profile) -> Option<LastRun> {
    serde_json::from_slice(&std::fs::read(last_run_path(p)).ok()?).ok()
}

/// What `validate`, `verify` and `keys verify` print with `--json`: the verdict and every
/// problem found (the human output prints the same problems on stderr).
#[derive(Debug, Default, Serialize)]
pub struct CheckReport {
    pub profile: String,
    pub command: String,
    pub exit_code: i32,
    pub ok: bool,
    pub problems: Vec<String>,
    /// The error that stopped the check, if one did.
    pub error: Option<String>,
    /// Command-specific figures (files verified, server facts).
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl CheckReport {
    pub fn new(p: &Profile, command: &str) -> CheckReport {
        CheckReport {
            profile: p.name.clone(),
            command: command.into(),
            ..Default::default()
        }
    }

    pub fn detail(&mut self, key: &str, v: impl Serialize) {
        if let Ok(v) = serde_json::to_value(v) {
            self.details.insert(key.into(), v);
        }
    }

    /// Fill in the verdict; print the report on stdout if `json`; return `code`.
    pub fn conclude(mut self, code: Exit, err: Option<&anyhow::Error>, json: bool) -> Exit {
        self.exit_code = code as i32;
        self.ok = code == Exit::Ok;
        self.error = err.map(|e| format!("{e:#}"));
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&self).unwrap_or_default()
            );
        }
        code
    }
}

pub fn now() -> String {
    SnapshotId::now().to_string()
}
