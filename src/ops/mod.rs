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

/// Report the work's result, then tear down; teardown failures turn any status into 5.
pub fn finish(session: Session<'_>, result: &Result<Exit>) -> (Exit, bool) {
    if let Err(e) = result {
        print_error(e);
    }
    let report = session.close();
    let code = match result {
        Ok(c) => *c,
        Err(e) => exit_for(e),
    };
    if report.complete() {
        (code, true)
    } else {
        (Exit::TeardownIncomplete, false)
    }
}

/// What `status` shows about the last run; written to the state directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
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

pub fn record_last_run(p: &Profile, rec: &LastRun) {
    let r = crate::teardown::create_private_dir(&p.state_dir()).and_then(|_| {
        crate::teardown::write_synced(&last_run_path(p), &serde_json::to_vec_pretty(rec)?)
    });
    if let Err(e) = r {
        crate::warn!("cannot record the last run: {e:#}");
    }
}

pub fn read_last_run(p: &Profile) -> Option<LastRun> {
    serde_json::from_slice(&std::fs::read(last_run_path(p)).ok()?).ok()
}

pub fn now() -> String {
    SnapshotId::now().to_string()
}
