//! The server directory, mounted with sshfs (OpenSSH underneath, same pinned known_hosts).
//!
//! Options, each for a measured or documented reason (docs/design.md):
//! - no `reconnect`: after a reconnect, files that were open (the loop device's backing
//!   file) return EIO; better to fail the run cleanly than to write into a broken file.
//! - no `direct_io`, no writeback cache, no `auto_unmount`: loop-over-FUSE hangs were
//!   reported with them, and auto_unmount would pull the file from under a live loop device.
//! - `BatchMode`, `StrictHostKeyChecking=yes`, the profile's known_hosts only, `-F /dev/null`
//!   (root's ssh_config must not change what we connect to), keepalives so a dead server
//!   fails the run instead of hanging it forever.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::cmd::Cmd;
use crate::profile::Server;
use crate::stack::mount;

/// The argv for mounting `server.path` at `target`.
pub fn command(server: &Server, target: &Path) -> Result<Cmd> {
    for (key, p) in [
        ("server.identity_file", &server.identity_file.0),
        ("server.known_hosts", &server.known_hosts.0),
    ] {
        if p.to_string_lossy().contains(',') {
            bail!(
                "{key} {}: sshfs cannot take a path containing a comma",
                p.display()
            );
        }
    }
    let host = if server.host.contains(':') {
        format!("[{}]", server.host)
    } else {
        server.host.clone()
    };
    let alive = 15;
    let opts = [
        format!("IdentityFile={}", server.identity_file.0.display()),
        "IdentitiesOnly=yes".into(),
        format!("UserKnownHostsFile={}", server.known_hosts.0.display()),
        "GlobalKnownHostsFile=/dev/null".into(),
        "StrictHostKeyChecking=yes".into(),
        "BatchMode=yes".into(),
        "PasswordAuthentication=no".into(),
        format!("ConnectTimeout={}", server.timeout),
        format!("ServerAliveInterval={alive}"),
        format!("ServerAliveCountMax={}", (server.timeout / alive).max(2)),
        // Numeric ownership is meaningless here: only root on the client touches the file.
        "idmap=none".into(),
    ];
    Ok(Cmd::new("sshfs")?
        .args(["-F", "/dev/null", "-p"])
        .arg(server.port.to_string())
        .args(["-o", &opts.join(",")])
        .arg(format!("{}@{}:{}", server.user, host, server.path))
        .arg(target))
}

/// Mount; the caller has pushed `UnmountSshfs` first.
pub fn mount(server: &Server, target: &Path) -> Result<()> {
    std::fs::create_dir_all(target)?;
    if let Some(m) = mount::mounted_at(target)? {
        bail!(
            "{} is already mounted ({} from {})",
            target.display(),
            m.fstype,
            m.source
        );
    }
    // sshfs returns once the SFTP session is up; on a server whose storage hangs, its
    // sftp-server may never answer the handshake, so the wait is bounded like the watchdog's.
    command(server, target)?
        .time_limit(server.stall_limit())
        .run()?;
    match mount::mounted_at(target)? {
        Some(m) if m.fstype == "fuse.sshfs" => Ok(()),
        _ => bail!("sshfs exited without mounting {}", target.display()),
    }
}

/// Ensure the sshfs mount at `target` is gone and its sshfs process has exited (so the
/// server side has closed the file before anything else touches it).
pub fn ensure_unmounted(target: &Path) -> Result<()> {
    mount::ensure_unmounted(target)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Some(pid) = sshfs_process_for(target) {
        if Instant::now() > deadline {
            bail!(
                "sshfs (pid {pid}) for {} did not exit after unmount",
                target.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// An sshfs process whose argv names `target`.
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
