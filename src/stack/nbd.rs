//! NBD, for giving freed space back to the server (`trim`).
//!
//! sshfs has no way to punch holes, so discards cannot reach the server through it. For
//! `trim` the container is served by an NBD server started ON the server, listening on a
//! Unix socket beside the container (never a TCP port: on the server too, any local user
//! can reach 127.0.0.1, and NBD has no authentication), and reached through an SSH local
//! forward from socket to socket (never plain NBD across a network): one OpenSSH process
//! carries both the forward and the remote server process, so stopping it ends both
//! (`nbdkit --exit-with-parent` dies with its sshd session). nbdkit makes its socket 0755:
//! connecting needs write permission, so only the server account can; the socket stays
//! behind after the trim (nbdkit does not remove it) and the next trim replaces it.
//!
//! nbdkit, not nbd-server: Debian's nbd-server 3.24 silently ignores TRIM requests in the
//! upper half of an export (a length bug in its exptrim; reproduced in docs/design.md), so
//! fstrim through it frees almost nothing. nbdkit's file plugin punches every range.
//!
//! The tunnel's local end is a Unix socket in a root-owned 0700 directory, not a TCP port:
//! the NBD server has no authentication, and a 127.0.0.1 port is open to every local user
//! (who could then write to or discard the container during a trim). ssh creates the socket
//! with `StreamLocalBindMask=0177` (0600, root), inside a directory only root can enter.
//!
//! The tunnel is started through [`Cmd::spawn_detached`]: its own session and process
//! group, no parent-death signal, like the sshfs daemon. If e2ebackup is killed, the tunnel
//! stays up so the next command's recovery can still unmount and close cleanly before
//! stopping it, by the pid and start time recorded in the journal.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd::{Cmd, Proc};
use crate::profile::Server;
use crate::stack::openssh;
use crate::stack::ssh::shell_quote;
use crate::teardown::{Stack, Undo};

/// Create (or verify) `dir` as a root-owned 0700 directory for the tunnel's socket, and
/// remove a socket left there by an earlier tunnel. Returns the socket's path.
pub fn socket_in(dir: &Path) -> Result<PathBuf> {
    // Root-owned 0700, created or verified, never through a link (exit 6 otherwise).
    crate::fsutil::private_dir(dir)?;
    let sock = dir.join("nbd.sock");
    match std::fs::remove_file(&sock) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", sock.display())),
    }
    Ok(sock)
}

/// The longest path a Unix socket address holds (sun_path, less its NUL).
const SUN_PATH_MAX: usize = 107;

/// Check the server-side socket path before it goes into a command line: absolute (sshd
/// connects to it from no particular directory), printable, short enough for a socket
/// address, and without the `:` that separates the two ends of `-L`.
pub fn check_remote_socket(remote: &str) -> Result<()> {
    if !remote.starts_with('/') || remote.chars().any(|c| c.is_control() || c == ':') {
        bail!(
            "cannot put trim's NBD socket at {}: it must be an absolute path without `:` \
             (server.path, or the login directory the server reported)",
            crate::fsutil::printable(remote, 200)
        );
    }
    if remote.len() > SUN_PATH_MAX {
        bail!(
            "cannot put trim's NBD socket at {remote}: {} bytes, and a Unix socket's path holds \
             at most {SUN_PATH_MAX} (a shorter server.path fixes it)",
            remote.len()
        );
    }
    Ok(())
}

/// The ssh argv (after `ssh`) for the tunnel: `-L SOCK:REMOTE -- user@host 'rm -f -- REMOTE
/// && exec nbdkit -U REMOTE ...'`. The old socket goes first: nbdkit refuses a path that
/// exists ("Address already in use").
pub fn tunnel_args(
    server: &Server,
    remote_file: &str,
    sock: &Path,
    remote: &str,
) -> Result<Vec<String>> {
    check_remote_socket(remote)?;
    let q = shell_quote(remote);
    let command = format!(
        "rm -f -- {q} && exec nbdkit --foreground --exit-with-parent -U {q} file file={}",
        shell_quote(remote_file)
    );
    // No -N: the session's command is the NBD server, which lives exactly as long as it.
    let extra: Vec<String> = [
        "-T",
        "-o",
        "ExitOnForwardFailure=yes",
        "-o",
        "StreamLocalBindMask=0177",
        "-o",
        "StreamLocalBindUnlink=yes",
        "-L",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("{}:{remote}", sock.display())])
    .collect();
    let mut v = openssh::ssh_args(server, &extra)?;
    v.push(command);
    Ok(v)
}

/// Start `ssh -L SOCK:REMOTE host 'exec nbdkit -U REMOTE ...'` detached, recorded in
/// `stack` (`StopProcess`) as soon as it runs.
pub fn start_tunnel(
    stack: &mut Stack,
    server: &Server,
    remote_file: &str,
    sock: &Path,
    remote: &str,
) -> Result<Proc> {
    let p = Cmd::new("ssh")?
        .args(tunnel_args(server, remote_file, sock, remote)?)
        .spawn_detached(Stdio::null(), Stdio::null())
        .context("starting the ssh tunnel")?;
    stack.push(Undo::StopProcess {
        pid: p.pid,
        start: p.start,
        what: "ssh tunnel with the remote nbdkit".into(),
    })?;
    Ok(p)
}

/// Wait until the NBD server answers through the tunnel (the NBD greeting arrives).
pub fn wait_ready(sock: &Path, tunnel: &Proc, timeout: Duration) -> Result<()> {
    use std::io::Read;
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(sock) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut magic = [0u8; 8];
            if s.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGIC" {
                return Ok(());
            }
        }
        if !tunnel.is_running() {
            bail!("the ssh tunnel exited: nbdkit could not start on the server (check `ssh SERVER nbdkit --version`, and that sshd allows local forwarding of a Unix socket: AllowTcpForwarding yes or local, which OpenSSH requires for it too, and AllowStreamLocalForwarding yes or local)");
        }
        if Instant::now() > deadline {
            bail!(
                "the NBD server did not answer through the tunnel {} within {:?}",
                sock.display(),
                timeout
            );
        }
        crate::signals::check()?;
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A free /dev/nbdN (no pid attached).
fn free_device() -> Result<PathBuf> {
    for n in 0..16 {
        let sys = PathBuf::from(format!("/sys/block/nbd{n}"));
        if sys.exists() && !sys.join("pid").exists() {
            return Ok(PathBuf::from(format!("/dev/nbd{n}")));
        }
    }
    bail!("no free /dev/nbd device (is the nbd module loaded? modprobe nbd)")
}

/// Connect a free NBD device to the local end of the tunnel, recorded in `stack`
/// (`DisconnectNbd` is pushed first, then amended with the connection's identity, the pid
/// the kernel recorded for it); returns the device.
pub fn connect(stack: &mut Stack, sock: &Path) -> Result<PathBuf> {
    let device = free_device()?;
    stack.push(Undo::DisconnectNbd {
        device: device.clone(),
        pid: None,
    })?;
    attach_client(&device, sock)?;
    // The kernel creates the pid attribute as it starts the device, before nbd-client
    // returns; a moment's grace all the same.
    let deadline = Instant::now() + Duration::from_secs(5);
    let pid = loop {
        match connection_pid(&device) {
            Some(pid) => break pid,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            None => bail!("{} is not connected after nbd-client", device.display()),
        }
    };
    stack.amend_last(Undo::DisconnectNbd {
        device: device.clone(),
        pid: Some(pid),
    })?;
    Ok(device)
}

/// The pid the kernel recorded for `device`'s connection (the process that connected it),
/// None when it is not connected.
pub fn connection_pid(device: &Path) -> Option<u32> {
    let name = device.file_name()?.to_string_lossy().into_owned();
    std::fs::read_to_string(Path::new("/sys/block").join(name).join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn attach_client(device: &Path, sock: &Path) -> Result<()> {
    Cmd::new("nbd-client")?
        .arg("-unix")
        .arg(sock)
        .arg(device)
        .args(["-b", "4096", "-t", "60", "-N", ""])
        .run()?;
    Ok(())
}

pub fn is_connected(device: &Path) -> bool {
    let name = device
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Path::new("/sys/block").join(name).join("pid").exists()
}

/// Ensure `device` is disconnected, if it is still the connection `pid` (see
/// [`Undo::DisconnectNbd`]): a device connected by another pid is someone else's now (ours
/// went away and the device was reused) and is left alone. Without a recorded pid (an older
/// journal, or a crash right after the connect) it is disconnected as before.
pub fn ensure_disconnected(device: &Path, pid: Option<u32>) -> Result<()> {
    let Some(now) = connection_pid(device) else {
        return Ok(());
    };
    if let Some(ours) = pid.filter(|p| *p != now) {
        crate::debug!(
            "{} is connected by pid {now}, not ours ({ours}): left alone",
            device.display()
        );
        return Ok(());
    }
    Cmd::new("nbd-client")?
        .arg("-d")
        .arg(device)
        .run_uninterruptible()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_connected(device) {
        if Instant::now() > deadline {
            bail!("{} is still connected", device.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::AbsPath;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn the_tunnel_forwards_a_unix_socket_and_shares_the_ssh_options() {
        let server = Server {
            host: "srv".into(),
            port: 22,
            user: "b".into(),
            identity_file: AbsPath("/k".into()),
            known_hosts: AbsPath("/kh".into()),
            path: "/srv/b".into(),
            timeout: 30,
            run_timeout: crate::profile::Duration(86400),
        };
        let sock = Path::new("/run/e2ebackup/p/nbd/nbd.sock");
        let a = tunnel_args(&server, "/srv/b/c img", sock, "/srv/b/.c img.nbd").unwrap();
        let base = openssh::ssh_args(&server, &[]).unwrap();
        // Every shared option, in the same order, before the tunnel's own.
        assert_eq!(&a[..base.len() - 2], &base[..base.len() - 2]);
        let l = a.iter().position(|x| x == "-L").unwrap();
        assert_eq!(a[l + 1], "/run/e2ebackup/p/nbd/nbd.sock:/srv/b/.c img.nbd");
        assert!(a.contains(&"StreamLocalBindMask=0177".to_string()), "{a:?}");
        let dd = a.iter().position(|x| x == "--").unwrap();
        assert!(dd > l);
        assert_eq!(a[dd + 1], "b@srv");
        assert_eq!(
            a[dd + 2],
            "rm -f -- '/srv/b/.c img.nbd' && exec nbdkit --foreground --exit-with-parent \
             -U '/srv/b/.c img.nbd' file file='/srv/b/c img'"
        );
        assert_eq!(a.len(), dd + 3);
        // No TCP anywhere: neither a port on either end nor nbdkit's -i/-p.
        assert!(!a.iter().any(|x| x.contains("127.0.0.1")), "{a:?}");
        // The server-side path is checked before it reaches a command line.
        for bad in [
            "relative/.c.nbd",
            "/srv/with:colon/.c.nbd",
            "/srv/new\nline/.c.nbd",
            &format!("/{}/.c.nbd", "d".repeat(120)),
        ] {
            assert!(
                tunnel_args(&server, "/srv/b/c", sock, bad).is_err(),
                "{bad:?}"
            );
        }
    }

    /// The undo record names the connection by its pid; older journals without it still
    /// read; a device that is not connected (or does not exist) is done.
    #[test]
    fn the_nbd_record_carries_the_connection_pid() {
        let u = Undo::DisconnectNbd {
            device: "/dev/nbd3".into(),
            pid: Some(4242),
        };
        let j = serde_json::to_string(&u).unwrap();
        assert!(j.contains(r#""pid":4242"#), "{j}");
        assert_eq!(serde_json::from_str::<Undo>(&j).unwrap(), u);
        let old: Undo =
            serde_json::from_str(r#"{"undo":"disconnect_nbd","device":"/dev/nbd3"}"#).unwrap();
        assert_eq!(
            old,
            Undo::DisconnectNbd {
                device: "/dev/nbd3".into(),
                pid: None
            }
        );
        assert_eq!(connection_pid(Path::new("/dev/nbd-none-here")), None);
        ensure_disconnected(Path::new("/dev/nbd-none-here"), Some(1)).unwrap();
    }

    #[test]
    fn the_socket_directory_is_private() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("nbd");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A directory others can enter is refused, not repaired: someone may be in it.
        let e = socket_in(&dir).unwrap_err();
        assert_eq!(crate::error::exit_for(&e), crate::error::Exit::Security);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(dir.join("nbd.sock"), b"stale").unwrap();
        let sock = socket_in(&dir).unwrap();
        assert_eq!(sock, dir.join("nbd.sock"));
        assert!(!sock.exists());
        let m = std::fs::metadata(&dir).unwrap();
        assert_eq!(m.mode() & 0o777, 0o700);
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(socket_in(&link).is_err());
    }
}
