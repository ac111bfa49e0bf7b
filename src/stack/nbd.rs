//! NBD, for giving freed space back to the server (`trim`).
//!
//! sshfs has no way to punch holes, so discards cannot reach the server through it. For
//! `trim` the container is served by an NBD server started ON the server, bound to
//! 127.0.0.1 only, and reached through an SSH local forward (never plain NBD across a
//! network): one OpenSSH process carries both the forward and the remote server process, so
//! stopping it ends both (`nbdkit --exit-with-parent` dies with its sshd session).
//!
//! nbdkit, not nbd-server: Debian's nbd-server 3.24 silently ignores TRIM requests in the
//! upper half of an export (a length bug in its exptrim; reproduced in docs/design.md), so
//! fstrim through it frees almost nothing. nbdkit's file plugin punches every range.
//!
//! The tunnel is started in its own session and without a parent-death signal, like the
//! sshfs daemon: if e2ebackup is killed, the tunnel stays up so the next command's recovery
//! can still unmount and close cleanly before stopping it.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd::{which, Cmd};
use crate::profile::Server;
use crate::stack::ssh::shell_quote;

/// A local TCP port that is free right now.
pub fn free_local_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free local port")?;
    Ok(l.local_addr()?.port())
}

/// Start `ssh -L 127.0.0.1:LPORT:127.0.0.1:RPORT host 'exec nbdkit ...'` detached.
/// Returns the ssh pid. The caller pushes `StopProcess` with the pid right after.
pub fn start_tunnel(server: &Server, remote_file: &str, lport: u16, rport: u16) -> Result<u32> {
    let ssh = which("ssh")?;
    let remote = format!(
        "exec nbdkit --foreground --exit-with-parent -i 127.0.0.1 -p {rport} file file={}",
        shell_quote(remote_file)
    );
    let mut c2 = Command::new(ssh);
    // No -N: the session's command is the NBD server, which lives exactly as long as it.
    c2.args(["-F", "/dev/null", "-T"])
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .args([
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "ExitOnForwardFailure=yes",
        ])
        .args([
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=4",
        ])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            server.known_hosts.0.display()
        ))
        .arg("-o")
        .arg(format!("ConnectTimeout={}", server.timeout))
        .arg("-i")
        .arg(&server.identity_file.0)
        .arg("-p")
        .arg(server.port.to_string())
        .arg("-L")
        .arg(format!("127.0.0.1:{lport}:127.0.0.1:{rport}"))
        .arg(format!("{}@{}", server.user, server.host))
        .arg(remote)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe; it detaches the tunnel from our terminal's signals.
    unsafe {
        c2.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = c2.spawn().context("starting the ssh tunnel")?;
    Ok(child.id())
}

/// Wait until the NBD server answers through the tunnel (the NBD greeting arrives).
pub fn wait_ready(lport: u16, tunnel_pid: u32, timeout: Duration) -> Result<()> {
    use std::io::Read;
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", lport)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut magic = [0u8; 8];
            if s.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGIC" {
                return Ok(());
            }
        }
        if crate::stack::lock::pid_start(tunnel_pid).is_none() {
            bail!("the ssh tunnel exited: nbdkit could not start on the server (port {lport} forwarded; check `ssh SERVER nbdkit --version`, and that sshd allows TCP forwarding)");
        }
        if Instant::now() > deadline {
            bail!(
                "the NBD server did not answer through the tunnel within {:?}",
                timeout
            );
        }
        crate::signals::check()?;
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A free /dev/nbdN (no pid attached).
pub fn free_device() -> Result<PathBuf> {
    for n in 0..16 {
        let sys = PathBuf::from(format!("/sys/block/nbd{n}"));
        if sys.exists() && !sys.join("pid").exists() {
            return Ok(PathBuf::from(format!("/dev/nbd{n}")));
        }
    }
    bail!("no free /dev/nbd device (is the nbd module loaded? modprobe nbd)")
}

/// Connect `device` to the local end of the tunnel.
pub fn connect(device: &Path, lport: u16) -> Result<()> {
    Cmd::new("nbd-client")?
        .args(["127.0.0.1", &lport.to_string()])
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

/// Ensure `device` is disconnected.
pub fn ensure_disconnected(device: &Path) -> Result<()> {
    if !is_connected(device) {
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

/// Ensure process `pid` (started at `start` ticks) has exited: SIGTERM, then SIGKILL.
/// A pid that now belongs to another process (different start time) is left alone.
pub fn ensure_stopped(pid: u32, start: u64) -> Result<()> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let alive = || crate::stack::lock::pid_start(pid) == Some(start);
    if !alive() {
        return Ok(());
    }
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive() {
        // Reap it if it is our child (otherwise it lingers as a zombie with the same start).
        let _ = nix::sys::wait::waitpid(
            Pid::from_raw(pid as i32),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
        if Instant::now() > deadline {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            std::thread::sleep(Duration::from_millis(200));
            let _ = nix::sys::wait::waitpid(
                Pid::from_raw(pid as i32),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
            return if alive() {
                bail!("process {pid} did not exit")
            } else {
                Ok(())
            };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
