//! e2ebackup: end-to-end encrypted backups to an untrusted SSH server.
//!
//! The stack, bottom to top: an SSH session with a pinned host key ([`stack::ssh`]), the
//! server directory over SSHFS ([`stack::sshfs`]), locks ([`stack::lock`]), a direct-I/O
//! loop device over the sparse container file ([`stack::loopdev`]), LUKS2
//! ([`stack::luks`]), ext4 ([`stack::ext4`], [`stack::mount`]), and rsync `--link-dest`
//! snapshots inside ([`snapshots`]). A [`session::Session`] walks up the stack for one
//! command, recording every step in an undo journal ([`teardown`]) so that it can always
//! walk back down: on success, on error, on a signal, or in the next process after a kill.

pub mod assets;
pub mod cli;
pub mod cmd;
pub mod error;
pub mod escrow;
pub mod fsutil;
pub mod generation;
pub mod hooks;
pub mod layout;
pub mod localpaths;
pub mod logging;
pub mod manifest;
pub mod monitor;
pub mod ops;
pub mod profile;
pub mod progress;
pub mod retention;
pub mod session;
pub mod signals;
pub mod snapid;
pub mod snapshots;
pub mod stack;
pub mod state;
pub mod teardown;
pub mod watchdog;
