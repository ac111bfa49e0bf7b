//! Two locks keep two runs of one container from ever overlapping.
//!
//! - Local: `flock` on `/run/e2ebackup/lock/<profile>.lock`. The kernel drops it when the
//!   process dies, so it can never go stale, and a second run learns at once (exit 4) before
//!   it touches anything. The directory is root-owned 0700 (verified, never followed
//!   through a link): in the world-writable /run/lock any user could plant the lock file as a
//!   link to a root-owned file (which root would then truncate) or hold it to block backups.
//! - Server: `<container>.lock` next to the container, created with O_EXCL through sshfs
//!   (SFTP `SSH_FXF_EXCL`, atomic on the server), holding host, boot id, pid, the pid's start
//!   time and a random token. It stops a second client (another host, or this host with a
//!   copied profile) from opening a container that is in use. Hosts are told apart by
//!   /etc/machine-id (two clients may share a hostname); the hostname is for messages. The
//!   fields come from the server, so they are escaped before they are printed. A lock from THIS host whose
//!   process is gone (dead pid, recycled pid with another start time, or an earlier boot) is
//!   stale and taken over; another host's lock is never broken automatically: the message
//!   says which host holds it and how to remove it once that is known to be safe.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::error::Failure;
use crate::fsutil::{printable, ServerDir};
use crate::teardown::{Stack, Undo};
use crate::{info, warn};

/// Held for the life of the command.
#[derive(Debug)]
pub struct LocalLock {
    _lock: nix::fcntl::Flock<File>,
    pub path: PathBuf,
}

/// Take the local lock without waiting; Locked (exit 4) if another process holds it.
pub fn lock_local(profile: &str) -> Result<LocalLock> {
    crate::fsutil::private_dir(&crate::layout::local_lock_dir())?;
    let path = crate::layout::local_lock_path(profile);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
        .with_context(|| format!("opening lock file {}", path.display()))?;
    let md = file.metadata()?;
    if !md.file_type().is_file() || md.uid() != nix::unistd::geteuid().as_raw() || md.nlink() != 1 {
        return Err(Failure::Security(format!(
            "lock file {} is not a private regular file of ours (uid {}, {} links); remove it",
            path.display(),
            md.uid(),
            md.nlink()
        ))
        .into());
    }
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
    /// For messages only (two clients may share a name).
    pub host: String,
    /// The client's machine id, hashed ([`machine_id`]; versions before recorded the raw
    /// /etc/machine-id, still recognised): what tells this host's locks from another's.
    #[serde(default)]
    pub machine_id: String,
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

/// The raw /etc/machine-id (never sent anywhere: see [`machine_id`]).
fn raw_machine_id() -> String {
    std::fs::read_to_string("/etc/machine-id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// e2ebackup's application id for [`app_specific_id`] (random, fixed for all versions).
const APP_ID: [u8; 16] = [
    0x08, 0x0b, 0x08, 0x82, 0xe2, 0xf9, 0x4b, 0x1c, 0x9f, 0x2c, 0xd9, 0x42, 0x49, 0x78, 0x39, 0x51,
];

/// What machine-id(5) asks for instead of the raw id whenever it leaves the machine: as
/// `sd_id128_get_machine_app_specific(3)` computes it, HMAC-SHA256 keyed with the 16-byte
/// machine id over the application's id, the first 16 bytes made a version-4 UUID, in hex.
/// Empty when the machine id is missing or malformed.
pub fn app_specific_id(raw: &str) -> String {
    use hmac::{Hmac, Mac};
    let raw = raw.trim();
    if raw.len() != 32 || !raw.bytes().all(|b| b.is_ascii_hexdigit()) {
        return String::new();
    }
    let key: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&raw[2 * i..2 * i + 2], 16).unwrap_or(0))
        .collect();
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&key).expect("any key length");
    m.update(&APP_ID);
    let h = m.finalize().into_bytes();
    let mut id = [0u8; 16];
    id.copy_from_slice(&h[..16]);
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// This machine's id as the server lock carries it: [`app_specific_id`] of /etc/machine-id,
/// so the server (which sees the lock) does not learn the machine's own id.
pub fn machine_id() -> String {
    app_specific_id(&raw_machine_id())
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
            machine_id: machine_id(),
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
        self.is_from_here()
            && (self.boot_id != boot_id() || pid_start(self.pid) != Some(self.pid_start))
    }

    /// Taken by this machine: same machine-id (locks written before machine-ids were
    /// recorded carry none, and are matched by hostname as they were then).
    /// Locks written by versions that recorded the raw /etc/machine-id are recognised too.
    fn is_from_here(&self) -> bool {
        let raw = raw_machine_id();
        let mine = app_specific_id(&raw);
        if self.machine_id.is_empty() || raw.is_empty() {
            self.host == hostname()
        } else {
            self.machine_id == mine || self.machine_id == raw
        }
    }

    /// For messages; every field but the numbers came from the server and is escaped.
    pub fn describe(&self) -> String {
        format!(
            "host {} pid {} (`{}`) since {}",
            printable(&self.host, 80),
            self.pid,
            printable(&self.command, 80),
            crate::snapid::SnapshotId::from_unix(self.since)
        )
    }
}

/// A server lock is a small JSON file; anything larger is not one of ours.
const LOCK_MAX_BYTES: u64 = 4096;

pub fn read_server_lock(dir: &ServerDir, name: &str) -> Result<Option<ServerLock>> {
    match dir.read_bounded(name, LOCK_MAX_BYTES)? {
        Some(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
            format!(
                "server lock {} is not an e2ebackup lock file",
                dir.shown(name)
            )
        })?)),
        None => Ok(None),
    }
}

fn temp_name(name: &str, token: &str) -> String {
    format!(".{name}.{token}.tmp")
}

fn unreadable(dir: &ServerDir, name: &str) -> anyhow::Error {
    Failure::Locked(format!(
        "server lock {} exists but cannot be read: another client may be writing it right now, or it \
         is damaged. Try again; remove it only if no client can be using the container.",
        dir.shown(name)
    ))
    .into()
}

/// Take the server lock `name` for `lock`, recorded in `stack` (`ReleaseServerLock` is
/// pushed first: a lock written before an error is still released, and only if it is ours).
pub fn take_server_lock(
    stack: &mut Stack,
    dir: &ServerDir,
    name: &str,
    lock: &ServerLock,
) -> Result<()> {
    stack.push(Undo::ReleaseServerLock {
        path: dir.local_path(name),
        token: lock.token.clone(),
    })?;
    acquire_server_lock(dir, name, lock)
}

/// Take the server lock unrecorded: what another client does (tests play one). Commands take
/// it through [`take_server_lock`].
///
/// The lock is written to a private temporary file and published with `link(2)` (SFTP
/// `hardlink@openssh.com`), which fails if the name exists: creation is atomic on the
/// server, and nobody ever reads a half-written lock. Every name is opened beneath the
/// server directory without following links ([`ServerDir`]): a planted link is exit 6.
pub fn acquire_server_lock(dir: &ServerDir, name: &str, lock: &ServerLock) -> Result<()> {
    let data = serde_json::to_vec_pretty(lock)?;
    let tmp = temp_name(name, &lock.token);
    {
        let mut f = dir.create_new(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
    }
    let r = publish(dir, name, &tmp);
    let _ = dir.remove(&tmp);
    r
}

fn publish(dir: &ServerDir, name: &str, tmp: &str) -> Result<()> {
    for _ in 0..3 {
        let err = match dir.link(tmp, name) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        // A link, FIFO or device at the lock's name is refused here (exit 6).
        if dir.stat(name)?.is_none() {
            // Not an "exists" failure (sshfs maps some SFTP failures to EPERM): retry once
            // the name is really free, else report the error itself.
            if err == nix::errno::Errno::ENOENT {
                return Err(err).with_context(|| format!("creating lock {}", dir.shown(name)));
            }
            continue;
        }
        match read_server_lock(dir, name) {
            Ok(Some(h)) if h.is_stale_here() => {
                info!("taking over a stale server lock ({})", h.describe());
                dir.remove(name)?;
            }
            Ok(Some(h)) => {
                return Err(Failure::Locked(format!(
                    "the container is in use: server lock {} held by {}. That may be \
                     another machine's restore drill or `mount`: wait for it to end. If that \
                     client is gone and the container closed, remove that file on the server.",
                    dir.shown(name),
                    h.describe()
                ))
                .into())
            }
            Ok(None) => continue,
            Err(e) if crate::error::exit_for(&e) == crate::error::Exit::Security => return Err(e),
            Err(_) => return Err(unreadable(dir, name)),
        }
    }
    Err(unreadable(dir, name))
}

/// Remove the server lock at `path` (the client-side path through sshfs) if it is ours
/// (same token). Idempotent; a lock we cannot read is not ours to remove (another client
/// may be writing it).
pub fn ensure_server_lock_released(path: &Path, token: &str) -> Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        anyhow::bail!("{} is not a lock path", path.display());
    };
    let name = name.to_string_lossy();
    let dir = ServerDir::open(parent, &parent.display().to_string())?;
    let _ = dir.remove(&temp_name(&name, token));
    match read_server_lock(&dir, &name) {
        Ok(Some(l)) if l.token == token => dir.remove(&name).map(|_| ()),
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
        other.machine_id = "another-machine".into();
        other.pid = 999_999;
        assert!(
            !other.is_stale_here(),
            "another host's lock is never stale for us"
        );
        let mut twin = ServerLock::mine("run");
        twin.machine_id = "another-machine-same-hostname".into();
        twin.pid_start += 1;
        assert!(!twin.is_stale_here(), "a namesake host's lock is not ours");
        let mut reboot = ServerLock::mine("run");
        reboot.boot_id = "old-boot".into();
        assert!(reboot.is_stale_here());
        // A dead lock written by an older version, with the raw machine id: still ours.
        let raw = raw_machine_id();
        if !raw.is_empty() {
            let mut old = ServerLock::mine("run");
            old.machine_id = raw.clone();
            old.pid_start += 1;
            assert!(old.is_stale_here());
            assert_ne!(ServerLock::mine("run").machine_id, raw, "the raw id leaks");
        }
    }

    /// The keyed hash of machine-id(5): 128 bits as a version-4 UUID in hex, stable, keyed
    /// (another machine id gives another value), and empty for a malformed id.
    #[test]
    fn the_lock_carries_an_app_specific_machine_id() {
        let a = app_specific_id("0123456789abcdef0123456789abcdef");
        assert_eq!(a.len(), 32);
        assert_eq!(a, app_specific_id("0123456789abcdef0123456789abcdef\n"));
        assert_eq!(&a[12..13], "4", "{a}");
        assert!(matches!(&a[16..17], "8" | "9" | "a" | "b"), "{a}");
        assert_ne!(a, app_specific_id("0123456789abcdef0123456789abcdee"));
        assert!(!a.contains("0123456789abcdef"));
        assert_eq!(app_specific_id("not-an-id"), "");
        assert_eq!(app_specific_id(""), "");
    }

    #[test]
    fn server_lock_create_takeover_refuse_release() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.luks.lock");
        let sd = ServerDir::open(d.path(), "server:/dir").unwrap();
        let n = "c.luks.lock";
        let mut dead = ServerLock::mine("run");
        dead.pid_start += 7;
        acquire_server_lock(&sd, n, &dead).unwrap();
        let me = ServerLock::mine("run");
        acquire_server_lock(&sd, n, &me).unwrap();
        assert_eq!(read_server_lock(&sd, n).unwrap().unwrap().token, me.token);
        let mut foreign = ServerLock::mine("run");
        foreign.host = "other-host".into();
        foreign.machine_id = "0123456789abcdef".into();
        let e = acquire_server_lock(&sd, n, &foreign).unwrap_err();
        assert_eq!(crate::error::exit_for(&e), crate::error::Exit::Locked);
        assert!(format!("{e}").contains(&hostname()), "{e}");
        assert!(format!("{e}").contains("server:/dir/c.luks.lock"), "{e}");
        ensure_server_lock_released(&p, "not-mine").unwrap();
        assert!(p.exists());
        ensure_server_lock_released(&p, &me.token).unwrap();
        assert!(!p.exists());
        ensure_server_lock_released(&p, &me.token).unwrap();
    }

    #[test]
    #[ignore = "needs root (/run/e2ebackup); CI runs it with --include-ignored"]
    fn local_lock_excludes_second_holder() {
        let name = format!("unit-test-{}", std::process::id());
        let a = lock_local(&name).unwrap();
        // flock locks belong to the open file description: a second open conflicts.
        let e = lock_local(&name).unwrap_err();
        assert_eq!(crate::error::exit_for(&e), crate::error::Exit::Locked);
        drop(a);
        let _b = lock_local(&name).unwrap();
        let _ = std::fs::remove_file(crate::layout::local_lock_path(&name));
    }
}
