//! The server's free space, before a snapshot and after a failed write.
//!
//! The container is a sparse file: its blocks are allocated on the server as ext4 first
//! writes them, so a run can fill the server's disk long after `init` checked. When it does,
//! nothing says so on the client: sftp-server answers a failed write with the generic
//! SSH_FX_FAILURE, sshfs turns it into an error, the loop device into EIO, and ext4
//! (errors=remount-ro) goes read-only; rsync then lists "Read-only file system" errors.
//! So the free space is read before the snapshot (warn or fail with numbers), and after a
//! failed run, where a nearly full server is named as the cause. Both read statfs on the
//! sshfs mount, which sshfs answers with statvfs@openssh.com: no shell on the server.

use std::path::Path;

use anyhow::Result;

use crate::profile::{Profile, Size};
use crate::stack::sshfs;
use crate::warn;

/// Below this the server is "out of space": metadata and the journal alone need some.
pub const MIN_FREE: u64 = 32 << 20;

/// The fix, in words.
fn fix(p: &Profile) -> String {
    format!(
        "free space on {} (under {}), give unused container blocks back with `e2ebackup trim {}`, \
         or keep fewer snapshots (retention)",
        p.server.host, p.server.path, p.name
    )
}

/// How much the container file can still grow at most: ext4's free space inside it (blocks
/// never written are not allocated on the server yet; blocks written once stay allocated,
/// so this is an upper bound).
fn possible_growth(root: &Path) -> Option<u64> {
    let v = nix::sys::statvfs::statvfs(root).ok()?;
    Some((v.blocks_free() as u64).saturating_mul(v.fragment_size() as u64))
}

/// What to do with a server that has `free` bytes for a container that can grow by `growth`.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

pub fn verdict(free: u64, growth: u64) -> Verdict {
    if free < MIN_FREE {
        Verdict::Fail
    } else if free < growth {
        Verdict::Warn
    } else {
        Verdict::Ok
    }
}

/// Before the snapshot: fail when the server is out of space, warn when the container could
/// outgrow what is free.
pub fn check_before(p: &Profile, root: &Path) -> Result<()> {
    let Some(free) = sshfs::free_bytes(&p.sshfs_dir()) else {
        warn!(
            "cannot tell the free space on {} (its SFTP server offers no statvfs@openssh.com)",
            p.server.host
        );
        return Ok(());
    };
    let growth = possible_growth(root).unwrap_or(0);
    match verdict(free, growth) {
        Verdict::Ok => {
            crate::info!(
                "{}:{} has {} free; the container can grow by up to {}",
                p.server.host,
                p.server.path,
                Size(free),
                Size(growth)
            );
            Ok(())
        }
        Verdict::Warn => {
            warn!(
                "{}:{} has {} free, but the container can still grow by up to {} (the free space inside it): \
                 a run that writes more than {} fails; {}",
                p.server.host,
                p.server.path,
                Size(free),
                Size(growth),
                Size(free),
                fix(p)
            );
            Ok(())
        }
        Verdict::Fail => anyhow::bail!(
            "the server {} is out of space: {} free under {} (a run needs at least {}); nothing was written. Fix: {}",
            p.server.host,
            Size(free),
            p.server.path,
            Size(MIN_FREE),
            fix(p)
        ),
    }
}

/// After a failed run, while the server is still mounted: if the server is (nearly) full,
/// that is the cause whatever the error chain says (EIO, read-only file system).
pub fn explain(p: &Profile, e: anyhow::Error) -> anyhow::Error {
    match sshfs::free_bytes(&p.sshfs_dir()) {
        Some(free) if free < MIN_FREE => e.context(format!(
            "the server {} ran out of space: {} free under {}; nothing was committed and older \
             snapshots are untouched. Fix: {}",
            p.server.host,
            Size(free),
            p.server.path,
            fix(p)
        )),
        _ => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        assert_eq!(verdict(0, 0), Verdict::Fail);
        assert_eq!(verdict(MIN_FREE - 1, 0), Verdict::Fail);
        assert_eq!(verdict(MIN_FREE, 0), Verdict::Ok);
        assert_eq!(verdict(1 << 30, 2 << 30), Verdict::Warn);
        assert_eq!(verdict(2 << 30, 2 << 30), Verdict::Ok);
    }
}
