//! Two locks keep two runs of one container from ever overlapping.
//!
//! - Local: `flock` on `/run/lock/e2ebackup/<profile>.lock`. The kernel drops it when the
//!   process dies, so it can never go stale, and a second run learns at once (exit 4) before
//!   it touches anything.
//! - Server: `<container>.lock` next to the container, created with O_EXCL through sshfs
//!   (SFTP `SSH_FXF_EXCL`, atomic on the server), holding host, boot id, pid, the pid's start
//!   time and a random token. It stops a second client (another host, or this host with a
//!   copied profile) from opening a container that is in use. A lock from THIS host whose
//!   process is gone (dead pid, recycled pid with another start time, or an earlier boot) is
//!   stale and taken over; another host's lock is never broken automatically: the message
//!   says which host holds it and how to remove it once that is known to be safe.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::error::Failure;
use crate::{info, warn};

/// Held for the life of the command.
#[derive(Debug)]
pub struct LocalLock {
    _lock: nix::fcntl::Flock<File>,
    pub path: PathBuf,
}

pub const LOCAL_LOCK_DIR: &str = "/run/lock/e2ebackup";

pub fn local_lock_path(profile: &str) -> PathBuf {
    Path::new(LOCAL_LOCK_DIR).join(format!("{profile}.lock"))
}

/// Take the local lock without waiting; Locked (exit 4) if another process holds it.
pub fn lock_local(profile: &str) -> Result<LocalLock> {
    crate::teardown::create_private_dir(Path::new(LOCAL_LOCK_DIR))?;
    let path = local_lock_path(profile);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .with_context(|| format!("opening lock file {}", path.display()))?;
    let locked = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((mut f, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            return Err(Failure::Locked(format!(
                "profile `{profile}` is in use by another e2ebackup process ({}); nothing was touched",
                holder.trim()
            ))
            .into());
        }
        Err((_, e)) => return Err(e).with_context(|| format!("locking {}", path.display())),
    };
    locked.set_len(0)?;
    let _ = writeln!(&*locked, "pid {}", std::process::id());
    Ok(LocalLock {
        _lock: locked,
        path,
    })
}

/// Who holds the server lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerLock {
    pub host: String,
    pub boot_id: String,
    pub pid: u32,
    /// Start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat).
    pub pid_start: u64,
    /// Unix time the lock was taken.
    pub since: i64,
    pub command: String,
    pub token: String,
}

pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown-host".into())
}

pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Start time of a process, None if it does not exist.
pub fn pid_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

fn random_token() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl ServerLock {
    pub fn mine(command: &str) -> ServerLock {
        let pid = std::process::id();
        ServerLock {
            host: hostname(),
            boot_id: boot_id(),
            pid,
            pid_start: pid_start(pid).unwrap_or(0),
            since: crate::snapid::SnapshotId::now().unix(),
            command: command.to_string(),
            token: random_token(),
        }
    }

    /// A lock of this host whose process no longer exists.
    pub fn is_stale_here(&self) -> bool {
        self.host == hostname()
            && (self.boot_id != boot_id() || pid_start(self.pid) != Some(self.pid_start))
    }

    pub fn describe(&self) -> String {
        format!(
            "host {} pid {} (`{}`) since {}",
            self.host,
            self.pid,
            self.command,
            crate::snapid::SnapshotId::from_unix(self.since)
        )
    }
}

/// Path of the server lock as seen through the sshfs mount.
pub fn server_lock_path(sshfs_mount: &Path, container: &str) -> PathBuf {
    sshfs_mount.join(format!("{container}.lock"))
}

pub fn read_server_lock(path: &Path) -> Result<Option<ServerLock>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
            format!(
                "server lock {} is not an e2ebackup lock file",
                path.display()
            )
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn temp_path(path: &Path, token: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{token}.tmp"))
}

fn unreadable(shown: &str) -> anyhow::Error {
    Failure::Locked(format!(
        "server lock {shown} exists but cannot be read: another client may be writing it right now, or it \
         is damaged. Try again; remove it only if no client can be using the container."
    ))
    .into()
}

/// Take the server lock; the caller has pushed `ReleaseServerLock` with `lock.token` first.
///
/// The lock is written to a private temporary file and published with `link(2)` (SFTP
/// `hardlink@openssh.com`), which fails if the name exists: creation is atomic on the
/// server, and nobody ever reads a half-written lock.
pub fn acquire_server_lock(path: &Path, lock: &ServerLock) -> Result<()> {
    acquire_server_lock_shown(path, &path.display().to_string(), lock)
}

/// [`acquire_server_lock`], naming the lock as `shown` in a "locked" message: the path on
/// the server (`host:/srv/backup/c.luks.lock`), which is where a user would look for it,
/// not the client's sshfs view of it.
pub fn acquire_server_lock_shown(path: &Path, shown: &str, lock: &ServerLock) -> Result<()> {
    let data = serde_json::to_vec_pretty(lock)?;
    let tmp = temp_path(path, &lock.token);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&data)?;
        f.sync_all()?;
    }
    let r = publish(path, &tmp, shown);
    let _ = std::fs::remove_file(&tmp);
    r
}

fn publish(path: &Path, tmp: &Path, shown: &str) -> Result<()> {
    for _ in 0..3 {
        let err = match std::fs::hard_link(tmp, path) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if std::fs::symlink_metadata(path).is_err() {
            // Not an "exists" failure (sshfs maps some SFTP failures to EPERM): retry once
            // the name is really free, else report the error itself.
            if err.kind() == std::io::ErrorKind::NotFound {
                return Err(err).with_context(|| format!("creating lock {}", path.display()));
            }
            continue;
        }
        match read_server_lock(path) {
            Ok(Some(h)) if h.is_stale_here() => {
                info!("taking over a stale server lock ({})", h.describe());
                std::fs::remove_file(path)
                    .with_context(|| format!("removing stale lock {}", path.display()))?;
            }
            Ok(Some(h)) => {
                return Err(Failure::Locked(format!(
                    "the container is in use: server lock {shown} held by {}. If that host is \
                     gone and the container closed, remove that file on the server.",
                    h.describe()
                ))
                .into())
            }
            Ok(None) => continue,
            Err(_) => return Err(unreadable(shown)),
        }
    }
    Err(unreadable(shown))
}

/// Remove the server lock if it is ours (same token). Idempotent; a lock we cannot read is
/// not ours to remove (another client may be writing it).
pub fn ensure_server_lock_released(path: &Path, token: &str) -> Result<()> {
    let _ = std::fs::remove_file(temp_path(path, token));
    match read_server_lock(path) {
        Ok(Some(l)) if l.token == token => std::fs::remove_file(path)
            .with_context(|| format!("removing server lock {}", path.display())),
        Ok(Some(l)) => {
            warn!(
                "server lock {} is no longer ours ({}); leaving it",
                path.display(),
                l.describe()
            );
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => {
            warn!(
                "server lock {} is unreadable ({e:#}); leaving it",
                path.display()
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_live_lock_is_not_stale_dead_one_is() {
        let mut l = ServerLock::mine("run");
        assert!(!l.is_stale_here());
        l.pid_start += 1; // a recycled pid
        assert!(l.is_stale_here());
        let mut other = ServerLock::mine("run");
        other.host = "elsewhere.example".into();
        other.pid = 999_999;
        assert!(
            !other.is_stale_here(),
            "another host's lock is never stale for us"
        );
        let mut reboot = ServerLock::mine("run");
        reboot.boot_id = "old-boot".into();
        assert!(reboot.is_stale_here());
    }

    #[test]
    fn server_lock_create_takeover_refuse_release() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.luks.lock");
        let mut dead = ServerLock::mine("run");
        dead.pid_start += 7;
        acquire_server_lock(&p, &dead).unwrap();
        let me = ServerLock::mine("run");
        acquire_server_lock(&p, &me).unwrap();
        assert_eq!(read_server_lock(&p).unwrap().unwrap().token, me.token);
        let mut foreign = ServerLock::mine("run");
        foreign.host = "other-host".into();
        let e = acquire_server_lock(&p, &foreign).unwrap_err();
        assert_eq!(crate::error::exit_for(&e), crate::error::Exit::Locked);
        assert!(format!("{e}").contains(&hostname()), "{e}");
        ensure_server_lock_released(&p, "not-mine").unwrap();
        assert!(p.exists());
        ensure_server_lock_released(&p, &me.token).unwrap();
        assert!(!p.exists());
        ensure_server_lock_released(&p, &me.token).unwrap();
    }

    #[test]
    fn local_lock_excludes_second_holder() {
        let name = format!("unit-test-{}", std::process::id());
        if std::fs::create_dir_all(LOCAL_LOCK_DIR).is_err() {
            eprintln!("skipping: cannot create {LOCAL_LOCK_DIR} (not root)");
            return;
        }
        let a = lock_local(&name).unwrap();
        // flock locks belong to the open file description: a second open conflicts.
        let e = lock_local(&name).unwrap_err();
        assert_eq!(crate::error::exit_for(&e), crate::error::Exit::Locked);
        drop(a);
        let _b = lock_local(&name).unwrap();
        let _ = std::fs::remove_file(local_lock_path(&name));
    }
}
