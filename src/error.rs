//! Exit codes, and the few error kinds a caller has to tell apart.
//!
//! Application code uses `anyhow` with `.context()` naming the object (device, path, host).
//! Where the exit status must differ from the generic "failed" (1), the root cause is one of
//! the [`Failure`] variants below; `main` finds it with `downcast_ref` anywhere in the chain.
//! Teardown completeness is not an error kind: it is reported separately by the undo stack
//! and turns exit 1 into exit 5.

use std::process::ExitCode;

/// Documented exit statuses (README, docs/operations.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    Failed = 1,
    Usage = 2,
    Warnings = 3,
    Locked = 4,
    TeardownIncomplete = 5,
    Security = 6,
    Interrupted = 130,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

/// Error kinds that map to their own exit status.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Bad command line, profile or local prerequisite: nothing was touched.
    #[error("{0}")]
    Usage(String),
    /// Another run (or a `mount` session) holds the lock.
    #[error("{0}")]
    Locked(String),
    /// Host key unknown or changed, or a tamper check failed.
    #[error("{0}")]
    Security(String),
    /// SIGINT, SIGTERM or SIGHUP arrived.
    #[error("interrupted by {0}")]
    Interrupted(&'static str),
    /// The command's overall deadline passed, or the I/O watchdog gave up on the server.
    #[error("{0}")]
    TimedOut(String),
}

impl Failure {
    pub fn exit(&self) -> Exit {
        match self {
            Failure::Usage(_) => Exit::Usage,
            Failure::Locked(_) => Exit::Locked,
            Failure::Security(_) => Exit::Security,
            Failure::Interrupted(_) => Exit::Interrupted,
            Failure::TimedOut(_) => Exit::Failed,
        }
    }
}

/// Shorthand for a usage error.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    Failure::Usage(msg.into()).into()
}

/// The exit status an error maps to (1 unless a [`Failure`] is somewhere in its chain).
pub fn exit_for(err: &anyhow::Error) -> Exit {
    err.chain()
        .find_map(|e| e.downcast_ref::<Failure>())
        .map(Failure::exit)
        .unwrap_or(Exit::Failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn exit_code_found_below_context() {
        let e: anyhow::Result<()> = Err(Failure::Security("host key changed".into()).into());
        let e = e.context("connecting to 127.0.0.1").unwrap_err();
        assert_eq!(exit_for(&e), Exit::Security);
        let plain = anyhow::anyhow!("disk full");
        assert_eq!(exit_for(&plain), Exit::Failed);
        assert_eq!(exit_for(&usage("bad key")), Exit::Usage);
    }
}
