//! The server directory, mounted with sshfs (OpenSSH underneath, same pinned known_hosts).
//!
//! Options, each for a measured or documented reason (docs/design.md):
//! - no `reconnect`: after a reconnect, files that were open (the loop device's backing
//!   file) return EIO; better to fail the run cleanly than to write into a broken file.
//! - no `direct_io`, no writeback cache, no `auto_unmount`: loop-over-FUSE hangs were
//!   reported with them, and auto_unmount would pull the file from under a live loop device.
//! - the SSH options come from [`super::openssh`], shared with every ssh we start.
//! - `contain_symlinks`, passed explicitly: a server symlink that is absolute or contains
//!   `..` gets EPERM instead of being resolved against the CLIENT's root. Debian's 3.7.3-1.2
//!   turned it on by default (CVE-2026-47187); an sshfs that does not know it is refused
//!   with a clear message rather than silently mounting without it.
//! - `nosuid,nodev,noexec`: nothing the server stores is ever a device, a setuid program or
//!   an executable for this client.
//!
//! Process identity: sshfs normally daemonizes (libfuse's fuse_daemonize forks, the parent
//! exits), and then nothing reliable says which process serves the mount: matching argv
//! lets any local user plant a look-alike. So sshfs runs with `-f` (foreground), started
//! detached through [`Cmd::spawn_detached`]: the process we start IS the FUSE daemon, and
//! its pid and start time go into the journal's `UnmountSshfs` record. The teardown waits
//! for exactly that process to exit.

use std::io::{Read, Seek};
use std::os::fd::FromRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd::{Cmd, Proc};
use crate::profile::Server;
use crate::stack::{mount, openssh};
use crate::teardown::{Stack, Undo};
use crate::warn;

/// Mount options besides the SSH ones.
const FUSE_OPTS: &[&str] = &[
    // Numeric ownership is meaningless here: only root on the client touches the file.
    "idmap=none",
    "contain_symlinks",
    "nosuid",
    "nodev",
    "noexec",
];

/// The argv for mounting `server.path` at `target` (sshfs in the foreground: see above).
pub fn command(server: &Server, target: &Path) -> Result<Cmd> {
    Ok(Cmd::new("sshfs")?
        .arg("-f")
        .args(openssh::sshfs_args(server, FUSE_OPTS, target)?))
}

/// An anonymous in-memory file for the daemon's stderr: read if it fails to mount, and
/// never a path anyone else could open.
fn stderr_file() -> Result<std::fs::File> {
    // SAFETY: memfd_create takes a NUL-terminated name and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"sshfs-stderr".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("memfd_create for sshfs's stderr");
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

fn read_all(f: &mut std::fs::File) -> String {
    let mut s = String::new();
    let _ = f
        .rewind()
        .and_then(|_| f.take(64 * 1024).read_to_string(&mut s));
    s
}

/// Mount the server directory at `target`, recorded in `stack`: `UnmountSshfs` is pushed
/// before the daemon starts (sshfs mounts before it connects, so a failure can leave a mount)
/// and amended with the daemon's identity once it runs.
pub fn mount(stack: &mut Stack, server: &Server, target: &Path) -> Result<Proc> {
    stack.push(Undo::UnmountSshfs {
        target: target.to_path_buf(),
        daemon: None,
    })?;
    let daemon = start(server, target)?;
    stack.amend_last(Undo::UnmountSshfs {
        target: target.to_path_buf(),
        daemon: Some(daemon),
    })?;
    if let Err(e) = set_read_ahead(target) {
        crate::debug!("read-ahead of {} left as it was: {e:#}", target.display());
    }
    Ok(daemon)
}

/// Read-ahead of the sshfs mount's page cache, in KiB (the kernel gives a FUSE mount 128).
/// A buffered read through sshfs is cut into read-ahead windows, each waited for before the
/// next is sent, so at 128 KiB a reader has 128 KiB in flight per round trip. Buffered
/// reads are restore's: its read-only loop device, and the bulk reads of the container
/// beneath it. Measured on the host tier (25 ms each way, a restore of 20000 files, 83 MiB):
/// the bulk read 6.1 -> 3.1 s, the metadata read 1.5 -> 0.6 s (docs/benchmarks.md, run 7).
/// `run`'s loop device reads and writes with direct I/O, which has no read-ahead.
pub const READ_AHEAD_KIB: u32 = 1024;

/// Set [`READ_AHEAD_KIB`] on the FUSE mount at `target` (its backing device info, named by
/// the mount's device number, which the kernel gave our mount: nothing from the server).
fn set_read_ahead(target: &Path) -> Result<()> {
    let (major, minor) = mount::device_of(target)?
        .with_context(|| format!("{} is not mounted", target.display()))?;
    let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    std::fs::write(&knob, READ_AHEAD_KIB.to_string()).with_context(|| format!("writing {knob}"))
}

/// Start the daemon and wait until the mount answers. On any error the daemon has been
/// stopped already.
fn start(server: &Server, target: &Path) -> Result<Proc> {
    std::fs::create_dir_all(target)?;
    if let Some(m) = mount::mounted_at(target)? {
        bail!(
            "{} is already mounted ({} from {})",
            target.display(),
            m.fstype,
            m.source
        );
    }
    let cmd = command(server, target)?;
    let mut err = stderr_file()?;
    let daemon = cmd.spawn_detached(std::process::Stdio::null(), err.try_clone()?.into())?;
    // The SSH handshake is bounded by ConnectTimeout and the keepalives; allow that twice.
    let deadline = Instant::now() + Duration::from_secs(2 * u64::from(server.timeout) + 10);
    let mut answered = None;
    loop {
        // sshfs mounts BEFORE it connects (fuse_mount, then ssh_connect, then the FUSE loop;
        // on a failed connect it unmounts again), so the mount alone says nothing. Ready is:
        // mounted, and a statfs through the mount answered, which the daemon does only once
        // its FUSE loop runs, after the connection and the check of the remote directory.
        // The statfs runs on a thread: until then it waits in the kernel's FUSE queue.
        if answered.is_none() {
            if let Some(m) = mount::mounted_at(target)? {
                if m.fstype == "fuse.sshfs" {
                    let (tx, rx) = std::sync::mpsc::channel();
                    let t = target.to_path_buf();
                    std::thread::spawn(move || {
                        let _ = tx.send(nix::sys::statfs::statfs(&t).map(|s| s.filesystem_type()));
                    });
                    answered = Some(rx);
                }
            }
        }
        if let Some(rx) = &answered {
            match rx.try_recv() {
                Ok(Ok(t)) if t == nix::sys::statfs::FUSE_SUPER_MAGIC => return Ok(daemon),
                Ok(_) | Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    // Unmounted again under the statfs (a failed connect): the daemon exits.
                    let _ = daemon.wait_exit(Duration::from_secs(5));
                    answered = None;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
            }
        }
        if !daemon.is_running() {
            let stderr = read_all(&mut err);
            if stderr.contains("unknown option") && stderr.contains("contain_symlinks") {
                bail!(
                    "the installed sshfs does not know the option contain_symlinks: it would                      resolve a server's absolute or `..` symlinks against this client's root                      (CVE-2026-47187). Upgrade sshfs (Debian 12: 3.7.3-1.2~deb12u1 or later).                      sshfs said: {}",
                    crate::cmd::tail(&stderr, 4)
                );
            }
            bail!(
                "sshfs exited without mounting {} ({}): {}",
                target.display(),
                cmd.argv().join(" "),
                crate::cmd::tail(&stderr, 12)
            );
        }
        if Instant::now() > deadline || crate::signals::check().is_err() {
            let _ = daemon.ensure_stopped();
            let _ = mount::ensure_unmounted(target);
            crate::signals::check()?;
            bail!(
                "sshfs did not mount {} within {:?}",
                target.display(),
                deadline.elapsed()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Ensure the sshfs mount at `target` is gone and, when we know it, that its daemon has
/// exited (so the server side has closed the file before anything else touches it).
///
/// `daemon` is the process we recorded, never one found by name. Without a record (a
/// journal from before it existed) only the mount is ensured gone: an sshfs in the
/// foreground exits on its own once its mount is.
pub fn ensure_unmounted(target: &Path, daemon: Option<&Proc>) -> Result<()> {
    mount::ensure_unmounted(target)?;
    let Some(d) = daemon else {
        return Ok(());
    };
    if d.wait_exit(Duration::from_secs(10)) {
        return Ok(());
    }
    warn!(
        "sshfs (pid {}) for {} did not exit after unmount; stopping it",
        d.pid,
        target.display()
    );
    d.ensure_stopped()
        .with_context(|| format!("stopping sshfs (pid {}) for {}", d.pid, target.display()))
}

/// Any process whose argv[0] ends in "sshfs" and whose arguments name `target`. For tests
/// and diagnostics only: never used to choose a process to wait for or to signal, since any
/// local user can start a process that looks like this.
pub fn sshfs_process_for(target: &Path) -> Option<u32> {
    let want = target.as_os_str().as_encoded_bytes();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let mut args = cmdline.split(|b| *b == 0);
        let is_sshfs = args.next().is_some_and(|a0| a0.ends_with(b"sshfs"));
        if is_sshfs && cmdline.split(|b| *b == 0).any(|a| a == want) {
            return Some(pid);
        }
    }
    None
}

/// Free bytes for the server user under the sshfs mount at `target`: statfs on sshfs asks
/// the server with statvfs@openssh.com (no shell command). None if it cannot tell.
pub fn free_bytes(target: &Path) -> Option<u64> {
    let v = nix::sys::statvfs::statvfs(target).ok()?;
    // sshfs reports f_blocks 0 when the server lacks the extension.
    if v.blocks() == 0 {
        return None;
    }
    Some((v.blocks_available() as u64).saturating_mul(v.fragment_size() as u64))
}
