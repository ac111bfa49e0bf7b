//! The storage stack, one module per layer, bottom to top:
//!
//! ```text
//!   ssh      pinned-host-key SSH session: preflight, server facts, remote commands
//!   openssh  the one set of OpenSSH options for every ssh and sshfs we start
//!   sshfs    the server directory mounted over SFTP
//!   lock     local flock + lock file on the server
//!   loopdev  loop device with direct I/O over the container file on sshfs
//!   luks     LUKS2 through libcryptsetup (format, header backup, open, close)
//!   ext4     mkfs / fsck / resize of the filesystem inside
//!   mount    mounting and (idempotently) unmounting, mountinfo parsing
//! ```
//!
//! Every layer has verbs that acquire a resource and an `ensure_*` that undoes it and is a
//! no-op when the resource is already gone. [`Real`] maps teardown records to those.

pub mod ext4;
pub mod lock;
pub mod loopdev;
pub mod luks;
pub mod mount;
pub mod nbd;
pub mod openssh;
pub mod ssh;
pub mod sshfs;

use anyhow::Result;

use crate::teardown::{Undo, Undoer};

/// Carries out undo records against the real system.
pub struct Real;

impl Undoer for Real {
    fn undo(&mut self, u: &Undo) -> Result<()> {
        match u {
            Undo::Unmount { target } => mount::ensure_unmounted(target),
            Undo::CloseLuks { name, header } => luks::ensure_closed(name, header.as_deref()),
            Undo::DetachLoop { device, backing } => loopdev::ensure_detached(device, backing),
            Undo::ReleaseServerLock { path, token } => {
                lock::ensure_server_lock_released(path, token)
            }
            Undo::UnmountSshfs { target, daemon } => {
                sshfs::ensure_unmounted(target, daemon.as_ref())
            }
            Undo::DisconnectNbd { device, pid } => nbd::ensure_disconnected(device, *pid),
            Undo::UnmountHeld { target, id } => mount::ensure_unmounted_held(target, id),
            Undo::StopProcess { pid, start, .. } => crate::cmd::Proc {
                pid: *pid,
                start: *start,
            }
            .ensure_stopped(),
            Undo::RemoveFile { path } => match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => {
                    Err(anyhow::Error::new(e).context(format!("removing {}", path.display())))
                }
            },
        }
    }
}
