//! Teardown as data: every acquired resource pushes an undo record, and the stack of records
//! is also written to `/run/e2ebackup/<profile>/undo.json` before the resource is acquired.
//!
//! Why before: an action that fails may have partly applied (a mount that returned an error
//! after the kernel attached it, a loop device configured but not reported), so the record
//! must exist whatever the action's result; every undo is an idempotent `ensure_*` that is
//! a no-op when the resource is already gone. Why on disk: a run killed with SIGKILL, or a
//! client process that dies, leaves mounts and mappings behind; the next command (or
//! `e2ebackup cleanup`) reads the journal and finishes the teardown before doing anything
//! else. The journal lives on tmpfs under /run, so after a reboot, when the kernel state it
//! describes is gone too, it is gone as well.
//!
//! Unwinding runs every record in reverse order even when one fails, and reports every
//! failure; records that failed stay in the journal so a later `cleanup` can retry them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::{info, warn};

/// One thing to undo. Each variant names the end state its undo ensures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "undo", rename_all = "snake_case")]
pub enum Undo {
    /// Ensure nothing is mounted at `target` (ext4 inside the container).
    Unmount { target: PathBuf },
    /// Ensure the device-mapper mapping `name` is closed. `header` is the client's pinned
    /// copy of the LUKS2 header it was opened with, if any: libcryptsetup reads the
    /// metadata from it instead of from the container across the network.
    CloseLuks {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        header: Option<PathBuf>,
    },
    /// Ensure `device` is no longer a loop device over `backing`.
    DetachLoop { device: PathBuf, backing: PathBuf },
    /// Ensure the lock file we wrote at `path` (through the sshfs mount) is gone, if ours.
    ReleaseServerLock { path: PathBuf, token: String },
    /// Ensure the sshfs mount at `target` is gone and its process has exited. `daemon` is
    /// the sshfs process we started (pid + start time), recorded once it runs; journals
    /// written before it existed, or a crash right after the push, leave it `None`.
    UnmountSshfs {
        target: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        daemon: Option<crate::cmd::Proc>,
    },
    /// Ensure a half-made file (an `init` that did not finish) is removed.
    RemoveFile { path: PathBuf },
    /// Ensure the NBD device is disconnected, if it is still our connection: `pid` is what
    /// the kernel recorded for it at connect time (`/sys/block/nbdN/pid`), recorded once
    /// connected, as the loop device is recorded with its backing file. A device connected
    /// with another pid is someone else's and is left alone. Journals written before it
    /// existed, or a crash between the connect and the record, leave it `None`.
    DisconnectNbd {
        device: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
    },
    /// Ensure the mount `id` (`e2ebackup mount`'s bind of the snapshots, first shown at
    /// `target`) is gone: found by its identity, never by the path, which a user may have
    /// swapped since.
    UnmountHeld {
        target: PathBuf,
        id: crate::stack::mount::MountIdentity,
    },
    /// Ensure a process we started (the ssh tunnel carrying the remote NBD server) has
    /// exited; `start` (clock ticks after boot) tells it apart from a recycled pid.
    StopProcess { pid: u32, start: u64, what: String },
}

impl std::fmt::Display for Undo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Undo::Unmount { target } => write!(f, "unmount {}", target.display()),
            Undo::CloseLuks { name, .. } => write!(f, "close LUKS mapping /dev/mapper/{name}"),
            Undo::DetachLoop { device, backing } => write!(
                f,
                "detach loop device {} ({})",
                device.display(),
                backing.display()
            ),
            Undo::ReleaseServerLock { path, .. } => {
                write!(f, "release server lock {}", path.display())
            }
            Undo::UnmountSshfs { target, .. } => {
                write!(f, "unmount sshfs {}", target.display())
            }
            Undo::RemoveFile { path } => write!(f, "remove unfinished {}", path.display()),
            Undo::DisconnectNbd { device, .. } => write!(f, "disconnect {}", device.display()),
            Undo::UnmountHeld { target, id } => {
                write!(f, "unmount {} (mount id {})", target.display(), id.mnt_id)
            }
            Undo::StopProcess { pid, what, .. } => write!(f, "stop {what} (pid {pid})"),
        }
    }
}

impl Undo {
    /// The command a person runs to do this by hand (printed when teardown is incomplete).
    pub fn manual_command(&self) -> String {
        match self {
            Undo::Unmount { target } => format!("umount {}", target.display()),
            Undo::CloseLuks { name, .. } => format!("cryptsetup close {name}"),
            Undo::DetachLoop { device, .. } => format!("losetup -d {}", device.display()),
            Undo::ReleaseServerLock { path, .. } => format!("rm {}", path.display()),
            Undo::UnmountSshfs { target, .. } => format!("fusermount3 -u {}", target.display()),
            Undo::RemoveFile { path } => format!("rm {}", path.display()),
            Undo::DisconnectNbd { device, .. } => format!("nbd-client -d {}", device.display()),
            Undo::UnmountHeld { id, .. } => format!(
                "umount \"$(awk '$1 == {} {{print $5}}' /proc/self/mountinfo)\"",
                id.mnt_id
            ),
            Undo::StopProcess { pid, .. } => format!("kill {pid}"),
        }
    }
}

/// Carries out undo records. The real one lives in [`crate::stack`]; tests inject failures.
pub trait Undoer {
    fn undo(&mut self, record: &Undo) -> Result<()>;
}

/// What the journal file holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Journal {
    /// The command that owns these resources (`run`, `init`, `mount`, ...).
    pub command: String,
    pub pid: u32,
    /// Set by `mount`: the resources are meant to outlive the process.
    #[serde(default)]
    pub persistent: bool,
    pub records: Vec<Undo>,
}

impl Journal {
    pub fn read(path: &Path) -> Result<Option<Journal>> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                format!("undo journal {} is unreadable", path.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

/// Outcome of unwinding.
#[derive(Debug, Default)]
pub struct Report {
    pub done: Vec<Undo>,
    pub failed: Vec<(Undo, String)>,
}

impl Report {
    pub fn complete(&self) -> bool {
        self.failed.is_empty()
    }

    /// Log every failure and the manual commands that finish the job.
    pub fn print(&self) {
        if self.complete() {
            return;
        }
        warn!("teardown INCOMPLETE; manual action needed, in this order:");
        for (u, e) in &self.failed {
            warn!("  {u}: {e}");
            warn!("    by hand: {}", u.manual_command());
        }
        warn!("or run `e2ebackup cleanup PROFILE` once the cause is fixed");
    }
}

/// The undo stack, mirrored to its journal file (if any) after every change.
#[derive(Debug)]
pub struct Stack {
    journal_path: Option<PathBuf>,
    journal: Journal,
}

impl Stack {
    /// A stack persisted at `path` (created with its parent directory, mode 0700).
    pub fn persistent(path: PathBuf, command: &str) -> Result<Stack> {
        if let Some(dir) = path.parent() {
            crate::fsutil::private_dir(dir)?;
        }
        let s = Stack {
            journal_path: Some(path),
            journal: Journal {
                command: command.to_string(),
                pid: std::process::id(),
                persistent: false,
                records: Vec::new(),
            },
        };
        s.save()?;
        Ok(s)
    }

    /// Resume the records of an earlier, interrupted process.
    pub fn adopt(path: PathBuf, journal: Journal) -> Stack {
        Stack {
            journal_path: Some(path),
            journal,
        }
    }

    /// An in-memory stack (tests, and read-only helpers that need no recovery).
    pub fn in_memory() -> Stack {
        Stack {
            journal_path: None,
            journal: Journal::default(),
        }
    }

    pub fn records(&self) -> &[Undo] {
        &self.journal.records
    }

    pub fn len(&self) -> usize {
        self.journal.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.journal.records.is_empty()
    }

    /// Record an undo BEFORE acquiring the resource it undoes.
    pub fn push(&mut self, u: Undo) -> Result<()> {
        self.journal.records.push(u);
        self.save()
    }

    /// Replace the newest record with a more precise one for the same resource (the sshfs
    /// daemon's identity is known only after the record had to be pushed).
    pub fn amend_last(&mut self, u: Undo) -> Result<()> {
        if let Some(last) = self.journal.records.last_mut() {
            *last = u;
        }
        self.save()
    }

    /// Mark the resources as meant to outlive this process (`e2ebackup mount`).
    pub fn set_persistent(&mut self, persistent: bool) -> Result<()> {
        self.journal.persistent = persistent;
        self.save()
    }

    fn save(&self) -> Result<()> {
        let Some(path) = &self.journal_path else {
            return Ok(());
        };
        let data = serde_json::to_vec_pretty(&self.journal)?;
        crate::fsutil::write_atomic(path, &data)
    }

    /// Undo records down to `mark` records (0 = everything), newest first. Every record is
    /// attempted even if an earlier one failed; failed records stay in the journal.
    pub fn unwind_to(&mut self, mark: usize, undoer: &mut dyn Undoer) -> Report {
        let mut report = Report::default();
        let mut kept = Vec::new();
        while self.journal.records.len() > mark {
            let u = self.journal.records.pop().expect("len > mark");
            // The server lock says "a client has this container open". If a layer above it
            // (mount, mapping, loop device) could not be released, the container may still
            // be open read-write: keep the lock, so that no second client opens it too.
            if matches!(u, Undo::ReleaseServerLock { .. }) && !report.failed.is_empty() {
                warn!("keeping {u}: the container may still be open (teardown above it failed)");
                report.failed.push((
                    u.clone(),
                    "kept: a layer above it is still acquired".to_string(),
                ));
                kept.push(u);
                continue;
            }
            match undoer.undo(&u) {
                Ok(()) => {
                    crate::debug!("undone: {u}");
                    report.done.push(u);
                }
                Err(e) => {
                    warn!("teardown step failed: {u}: {e:#}");
                    report.failed.push((u.clone(), format!("{e:#}")));
                    kept.push(u);
                }
            }
        }
        kept.reverse();
        self.journal.records.extend(kept);
        if let Err(e) = self.save() {
            warn!("cannot update undo journal: {e:#}");
        }
        report
    }

    /// Undo everything; remove the journal when nothing is left.
    pub fn unwind(&mut self, undoer: &mut dyn Undoer) -> Report {
        let report = self.unwind_to(0, undoer);
        if report.complete() {
            self.remove_journal();
        }
        report
    }

    /// Forget the journal without undoing (after a complete unwind, or a `mount` handing
    /// its resources to a later `umount`).
    pub fn remove_journal(&mut self) {
        if let Some(p) = &self.journal_path {
            if let Err(e) = std::fs::remove_file(p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!("cannot remove {}: {e}", p.display());
                }
            }
        }
    }
}

impl Drop for Stack {
    /// Backstop: a stack dropped with records left means a code path forgot to unwind.
    /// Log it; the journal on disk lets `cleanup` finish the job. Never panic here.
    fn drop(&mut self) {
        if !self.journal.records.is_empty() && !self.journal.persistent {
            if let Some(p) = &self.journal_path {
                warn!(
                    "{} resource(s) left acquired; `e2ebackup cleanup` will release them (journal {})",
                    self.journal.records.len(),
                    p.display()
                );
            }
        }
    }
}

/// Log an informational line about a recovered journal.
pub fn announce_recovery(j: &Journal) {
    if j.persistent {
        info!(
            "tearing down what `{}` (pid {}) left mounted",
            j.command, j.pid
        );
        return;
    }
    info!(
        "finishing the teardown of an earlier `{}` (pid {}) that did not complete: {} step(s)",
        j.command,
        j.pid,
        j.records.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every undo it is asked to do and fails the ones listed.
    struct Recorder {
        calls: Vec<Undo>,
        fail: Vec<Undo>,
    }

    impl Undoer for Recorder {
        fn undo(&mut self, r: &Undo) -> Result<()> {
            self.calls.push(r.clone());
            if self.fail.contains(r) {
                anyhow::bail!("device or resource busy");
            }
            Ok(())
        }
    }

    fn full_stack() -> Vec<Undo> {
        vec![
            Undo::UnmountSshfs {
                target: "/run/e2ebackup/p/server".into(),
                daemon: Some(crate::cmd::Proc {
                    pid: 4242,
                    start: 99,
                }),
            },
            Undo::ReleaseServerLock {
                path: "/run/e2ebackup/p/server/c.lock".into(),
                token: "t".into(),
            },
            Undo::DetachLoop {
                device: "/dev/loop3".into(),
                backing: "/run/e2ebackup/p/server/c".into(),
            },
            Undo::CloseLuks {
                name: "e2ebackup-p".into(),
                header: Some("/etc/e2ebackup/p.key.header".into()),
            },
            Undo::Unmount {
                target: "/run/e2ebackup/p/fs".into(),
            },
        ]
    }

    /// The journal's directory must be private (fsutil::private_dir).
    fn private_tempdir() -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        d
    }

    fn stack_in(dir: &Path) -> Stack {
        let mut s = Stack::persistent(dir.join("undo.json"), "run").unwrap();
        for u in full_stack() {
            s.push(u).unwrap();
        }
        s
    }

    /// Fields added to records later are optional: a journal an older version left behind
    /// (after a crash) still reads, and the new fields round-trip.
    #[test]
    fn older_journals_without_the_later_fields_still_read() {
        let old = r#"{"command":"run","pid":7,"records":[
            {"undo":"unmount_sshfs","target":"/run/e2ebackup/p/server"},
            {"undo":"close_luks","name":"e2ebackup-p"}]}"#;
        let j: Journal = serde_json::from_str(old).unwrap();
        assert_eq!(
            j.records,
            [
                Undo::UnmountSshfs {
                    target: "/run/e2ebackup/p/server".into(),
                    daemon: None
                },
                Undo::CloseLuks {
                    name: "e2ebackup-p".into(),
                    header: None
                }
            ]
        );
        for (u, field) in full_stack().iter().zip([
            r#""daemon":{"pid":4242,"start":99}"#,
            "",
            "",
            r#""header":"/etc/e2ebackup/p.key.header""#,
            "",
        ]) {
            let new = serde_json::to_string(u).unwrap();
            assert!(new.contains(field), "{new}");
            assert_eq!(&serde_json::from_str::<Undo>(&new).unwrap(), u);
        }
    }

    #[test]
    fn unwinds_in_reverse_and_removes_journal() {
        let dir = private_tempdir();
        let mut s = stack_in(dir.path());
        let mut r = Recorder {
            calls: vec![],
            fail: vec![],
        };
        let rep = s.unwind(&mut r);
        assert!(rep.complete());
        let mut expected = full_stack();
        expected.reverse();
        assert_eq!(r.calls, expected);
        assert!(!dir.path().join("undo.json").exists());
    }

    #[test]
    fn a_failure_does_not_stop_the_rest_and_is_kept() {
        let dir = private_tempdir();
        let mut s = stack_in(dir.path());
        let busy = Undo::CloseLuks {
            name: "e2ebackup-p".into(),
            header: Some("/etc/e2ebackup/p.key.header".into()),
        };
        let mut r = Recorder {
            calls: vec![],
            fail: vec![busy.clone()],
        };
        let rep = s.unwind(&mut r);
        assert!(!rep.complete());
        let all = full_stack();
        // Every undo is attempted but the server lock's: with the mapping still open, the
        // lock stays, so that no other client opens the container meanwhile.
        assert_eq!(r.calls.len(), 4);
        assert!(!r.calls.contains(&all[1]));
        assert_eq!(rep.failed.len(), 2);
        assert_eq!(rep.failed[0].0, busy);
        assert_eq!(rep.failed[1].0, all[1]);
        // The journal keeps the failed record and the lock for a later cleanup.
        let j = Journal::read(&dir.path().join("undo.json"))
            .unwrap()
            .unwrap();
        assert_eq!(j.records, vec![all[1].clone(), busy.clone()]);
        // A later cleanup adopts it and finishes.
        let mut again = Stack::adopt(dir.path().join("undo.json"), j);
        let mut ok = Recorder {
            calls: vec![],
            fail: vec![],
        };
        assert!(again.unwind(&mut ok).complete());
        assert_eq!(ok.calls, vec![busy, all[1].clone()]);
        assert!(!dir.path().join("undo.json").exists());
    }

    #[test]
    fn several_failures_keep_their_order() {
        let dir = private_tempdir();
        let mut s = stack_in(dir.path());
        let all = full_stack();
        let mut r = Recorder {
            calls: vec![],
            fail: vec![all[0].clone(), all[3].clone(), all[4].clone()],
        };
        let rep = s.unwind(&mut r);
        assert_eq!(rep.failed.len(), 4, "three failures and the lock kept");
        assert_eq!(
            s.records(),
            &[
                all[0].clone(),
                all[1].clone(),
                all[3].clone(),
                all[4].clone()
            ]
        );
    }

    #[test]
    fn unwind_to_mark_keeps_outer_layers() {
        let dir = private_tempdir();
        let mut s = stack_in(dir.path());
        let mut r = Recorder {
            calls: vec![],
            fail: vec![],
        };
        let rep = s.unwind_to(2, &mut r);
        assert!(rep.complete());
        assert_eq!(r.calls.len(), 3);
        assert_eq!(s.records(), &full_stack()[..2]);
        let j = Journal::read(&dir.path().join("undo.json"))
            .unwrap()
            .unwrap();
        assert_eq!(j.records.len(), 2);
        s.unwind(&mut r);
    }

    #[test]
    fn journal_round_trips_and_records_before_acquire() {
        let dir = private_tempdir();
        let mut s = Stack::persistent(dir.path().join("undo.json"), "init").unwrap();
        s.push(full_stack()[0].clone()).unwrap();
        let j = Journal::read(&dir.path().join("undo.json"))
            .unwrap()
            .unwrap();
        assert_eq!(j.command, "init");
        assert_eq!(j.pid, std::process::id());
        assert_eq!(j.records, vec![full_stack()[0].clone()]);
        s.remove_journal();
        s.journal.records.clear();
    }
}
