//! `e2ebackup trim PROFILE`: give the space of deleted data back to the server.
//!
//! ```text
//!   server lock (via sshfs, as every command) -> ssh tunnel + remote nbdkit on a Unix socket
//!   -> nbd-client -> LUKS with discards allowed (this command only) -> ext4 -> fstrim
//! ```
//! Discards are allowed only here: on a normal run they would tell the server which blocks
//! are free, a (small) leak we accept only when the user asks to reclaim space. The server's
//! allocation of the container file is reported before and after.

use anyhow::{Context, Result};

use crate::cmd::Cmd;
use crate::error::Exit;
use crate::ops::{fail, finish};
use crate::profile::{Profile, Size};
use crate::session::Session;
use crate::{info, warn};

pub fn trim(p: &Profile) -> Exit {
    let mut s = match Session::begin(p, "trim") {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let r = work(p, &mut s);
    finish(s, &r).0
}

fn work(p: &Profile, s: &mut Session<'_>) -> Result<Exit> {
    s.read_key()?;
    let facts = s.connect()?.clone();
    if facts.container_size.is_none() {
        return Err(crate::error::usage(format!(
            "no container {} on {}",
            p.remote_container(),
            p.server.host
        )));
    }
    let remote = s.remote()?;
    // The marker tells "no shell at all" (an SFTP-only account: ForceCommand internal-sftp
    // answers every command with an SFTP server) from "a shell without nbdkit".
    // It also reports the login directory, where a relative server.path starts: nbdkit's
    // socket lies beside the container, and sshd needs its absolute path.
    let probe = remote.exec("echo e2ebackup-shell; echo \"login-dir=$(pwd)\"; command -v nbdkit");
    let login_dir = match probe {
        Ok((0, ref out, _)) if out.contains("e2ebackup-shell") => out
            .lines()
            .find_map(|l| l.strip_prefix("login-dir="))
            .unwrap_or_default()
            .to_string(),
        Ok((_, ref out, _)) if out.contains("e2ebackup-shell") => anyhow::bail!(
            "the server {} has no nbdkit: install it there (Debian/Ubuntu: apt install nbdkit). \
             nbd-server is not used: version 3.24 silently ignores half of the trim requests",
            p.server.host
        ),
        _ => anyhow::bail!(
            "the account {}@{} cannot run commands (an SFTP-only account?): trim needs a shell and \
             nbdkit on the server; every other command works over SFTP alone",
            p.server.user,
            p.server.host
        ),
    };
    let socket = p.remote_nbd_socket(&login_dir);
    crate::stack::nbd::check_remote_socket(&socket)?;
    let before = remote.allocated_bytes(&p.remote_container());
    // The server lock, through sshfs like every other command.
    s.mount_server("trim")?;

    let mark = s.mark();
    // The NBD device takes the loop device's place under LUKS; discards allowed.
    s.open_nbd(&socket)?;
    s.unlock(false, true)?;
    // Layout and the authenticated generation, as every command that opens the container
    // read-write checks them: a rolled-back container is refused here too.
    let root = s.mount_checked(false)?;
    crate::signals::check()?;
    info!("fstrim {}", root.display());
    let out = Cmd::new("fstrim")?.arg("-v").arg(&root).run()?;
    info!("{}", out.stdout.trim());
    crate::stack::mount::syncfs(&root)?;
    // Tear down the NBD path now, so the allocation below is measured after the last discard.
    s.close_to(mark)
        .context("could not close the NBD path cleanly")?;
    let after = s
        .remote()
        .ok()
        .and_then(|r| r.allocated_bytes(&p.remote_container()));
    match (before, after) {
        (Some(b), Some(a)) => info!(
            "server allocation of {}: {} before, {} after ({} given back)",
            p.remote_container(),
            Size(b),
            Size(a),
            Size(b.saturating_sub(a))
        ),
        _ => warn!("cannot read the container's allocation on the server (no shell access?)"),
    }
    Ok(Exit::Ok)
}
