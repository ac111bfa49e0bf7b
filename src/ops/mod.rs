//! The commands. Each returns the process exit status; errors are printed here, once, before
//! the teardown runs (so the cause is the first thing a reader sees, and the teardown's own
//! messages follow it).

pub mod grow;
pub mod history;
pub mod init;
pub mod keys;
pub mod maintenance;
pub mod prune;
pub mod restore;
pub mod rotate;
pub mod run;
pub mod schedule;
pub mod status;
pub mod trim;
pub mod verify;

use anyhow::Result;
use serde::Serialize;

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
///
/// A read that the kernel's ext4 refused as damaged metadata (a checksum that does not
/// match, [`crate::error::fs_damage`]) is exit 6 wherever it happened, and said to be damage.
pub fn finish(session: Session<'_>, result: &Result<Exit>) -> (Exit, bool) {
    let damage = match result {
        Err(e) if crate::error::exit_for(e) == Exit::Failed => crate::error::fs_damage(e),
        _ => None,
    };
    if let Err(e) = result {
        print_error(e);
    }
    if let Some(why) = damage {
        print_error(&crate::error::damaged(why, ""));
    }
    let report = session.close();
    let code = match result {
        Ok(_) | Err(_) if damage.is_some() => Exit::Security,
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

/// A path's bytes for a line of output: as rsync prints names, every control character,
/// backslash and byte that is not UTF-8 as `\#` and three octal digits.
pub fn show_path(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        for ch in chunk.valid().chars() {
            if ch.is_control() || ch == '\\' {
                let mut buf = [0u8; 4];
                for byte in ch.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("\\#{byte:03o}"));
                }
            } else {
                out.push(ch);
            }
        }
        for byte in chunk.invalid() {
            out.push_str(&format!("\\#{byte:03o}"));
        }
    }
    out
}

pub fn now() -> String {
    SnapshotId::now().to_string()
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
