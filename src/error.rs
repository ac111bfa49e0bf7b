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

/// What the kernel's ext4 found, if `err` (anywhere in its chain) is its report of damaged
/// metadata: EFSBADCRC (= EBADMSG, a metadata checksum that does not match, as in
/// `iget: checksum invalid`) or EFSCORRUPTED (= EUCLEAN, a structure that cannot be). EIO is
/// not among them: it is also what a lost connection to the server gives.
pub fn fs_damage(err: &anyhow::Error) -> Option<&'static str> {
    err.chain().find_map(
        |c| match c.downcast_ref::<std::io::Error>()?.raw_os_error()? {
            libc::EBADMSG => Some("a metadata checksum does not match (EFSBADCRC)"),
            libc::EUCLEAN => Some("a metadata structure is corrupt (EFSCORRUPTED)"),
            _ => None,
        },
    )
}

/// Refusal (exit 6) of a container whose filesystem is damaged: what was found (`what`),
/// what it means, and what a person can do (`readable`: which snapshots still read, when
/// known).
pub fn damaged(what: impl std::fmt::Display, readable: &str) -> anyhow::Error {
    Failure::Security(format!(
        "the container's filesystem is damaged: {what}. Its ext4 metadata is no longer what \
         the client wrote (ext4 checks it against its checksums), so the server altered or \
         lost data of the container (a flipped, replayed or lost block). {readable}What you can do: `e2ebackup verify \
         PROFILE` names every damaged file it can reach; copy what still reads out of the \
         snapshots by hand, read-only with the pinned header, as docs/layout.md shows; then \
         create a new container for the next runs and keep this one as evidence"
    ))
    .into()
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

    #[test]
    fn kernel_damage_errnos_are_damage() {
        let bad = |n| anyhow::Error::from(std::io::Error::from_raw_os_error(n)).context("x");
        assert!(fs_damage(&bad(libc::EBADMSG))
            .unwrap()
            .contains("EFSBADCRC"));
        assert!(fs_damage(&bad(libc::EUCLEAN))
            .unwrap()
            .contains("EFSCORRUPTED"));
        assert_eq!(fs_damage(&bad(libc::EIO)), None);
        assert_eq!(fs_damage(&anyhow::anyhow!("plain")), None);
        let e = damaged("reading FORMAT", "");
        assert_eq!(exit_for(&e), Exit::Security);
        assert!(format!("{e}").contains("server altered or lost data"));
    }
}
