//! `cleanup` (finish a killed run's teardown) and `validate` (check without touching).

use std::path::Path;

use crate::error::Exit;
use crate::profile::Profile;
use crate::stack::ssh;
use crate::{info, session, warn};

pub fn cleanup(p: &Profile) -> Exit {
    match session::recover_all(p) {
        Ok(None) => {
            info!("nothing to clean up for profile `{}`", p.name);
            Exit::Ok
        }
        Ok(Some(r)) if r.complete() => {
            info!("teardown finished ({} step(s))", r.done.len());
            Exit::Ok
        }
        Ok(Some(_)) => Exit::TeardownIncomplete,
        Err(e) => super::fail(e),
    }
}

/// Checks that need no network; with `connect`, also the SSH preflight (read-only).
pub fn validate(p: &Profile, connect: bool, json: bool) -> Exit {
    let mut rep = super::CheckReport::new(p, "validate");
    let problems = &mut rep.problems;
    for prog in ["sshfs", "ssh", "rsync", "mkfs.ext4", "e2fsck"] {
        if let Err(e) = crate::cmd::which(prog) {
            problems.push(format!("{e:#}"));
        }
    }
    for dev in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(dev).exists() {
            problems.push(format!("{dev} is missing (kernel module not loaded?)"));
        }
    }
    if !Path::new("/dev/mapper/control").exists() {
        problems
            .push("/dev/mapper/control is missing: no device-mapper (modprobe dm_crypt)".into());
    }
    if !nix::unistd::geteuid().is_root() {
        problems
            .push("e2ebackup must run as root (it attaches loop devices and opens LUKS)".into());
    }
    problems.extend(crate::localpaths::problems(p));
    problems.extend(crate::snapshots::filters::exclude_from_problems(p));
    let kf = &p.container.keyfile.0;
    if kf.is_file() {
        if let Err(e) = crate::stack::luks::read_keyfile(kf) {
            problems.push(format!("container.keyfile: {e:#}"));
        }
    } else if !kf.exists() && crate::localpaths::check(kf, crate::localpaths::Kind::File).is_none()
    {
        warn!(
            "container.keyfile {} does not exist yet (`init` creates it)",
            kf.display()
        );
    }
    if !p.server.identity_file.0.is_file() {
        problems.push(format!(
            "server.identity_file {} does not exist",
            p.server.identity_file.0.display()
        ));
    }
    match std::fs::read_to_string(&p.server.known_hosts.0) {
        Ok(t) => {
            // The rule every connection applies (OpenSSH's: `[host]:port` for a port other
            // than 22); hashed entries are matched too.
            let s = &p.server;
            problems.extend(ssh::pin_problem(&t, &s.known_hosts.0, &s.host, s.port));
        }
        Err(e) => problems.push(format!(
            "server.known_hosts {}: {e}",
            p.server.known_hosts.0.display()
        )),
    }
    for s in &p.backup.sources {
        if !s.0.exists() {
            warn!(
                "backup source {} does not exist (a run would fail)",
                s.0.display()
            );
        }
    }
    for pr in problems.iter() {
        crate::logging::emit(
            -2,
            "ERROR: ",
            format_args!("{}: {pr}", p.source_file.display()),
        );
    }
    let local_ok = problems.is_empty();
    // The server is checked even when something local is wrong (a missing device-mapper
    // does not stop an SSH connection): a changed host key is the graver news, and its
    // exit code wins.
    let ssh_ready = p.server.identity_file.0.is_file() && p.server.known_hosts.0.is_file();
    if connect && ssh_ready {
        match ssh::Remote::connect(&p.server)
            .and_then(|r| r.facts(&p.server.path, &p.remote_container()))
        {
            Ok(f) => {
                rep.detail("container_exists", f.container_size.is_some());
                rep.detail("container_size", f.container_size);
                rep.detail("fsync_supported", f.fsync_supported);
                rep.detail("server_free_bytes", f.free_bytes);
                info!(
                    "server reachable; container {}; fsync@openssh.com {}; free {}",
                    if f.container_size.is_some() {
                        "exists"
                    } else {
                        "not created yet"
                    },
                    if f.fsync_supported {
                        "supported"
                    } else {
                        "NOT supported"
                    },
                    f.free_bytes
                        .map(|b| crate::profile::Size(b).to_string())
                        .unwrap_or_else(|| "unknown".into())
                );
            }
            Err(e) => {
                let code = super::fail_ref(&e);
                return rep.conclude(code, Some(&e), json);
            }
        }
    }
    if !local_ok {
        return rep.conclude(Exit::Usage, None, json);
    }
    if !json {
        println!("{}: OK", p.source_file.display());
    }
    rep.conclude(Exit::Ok, None, json)
}

/// `recover-key --identity FILE PROFILE`: decrypt the key escrow (the client's copy, or the
/// server's if the client has none) with an offline identity and write the keyfile.
pub fn recover_key(p: &Profile, identity: &Path, force: bool) -> Exit {
    let r = (|| -> anyhow::Result<()> {
        let kf = &p.container.keyfile.0;
        if kf.exists() && !force {
            return Err(crate::error::usage(format!(
                "keyfile {} exists; pass --force to replace it (the old one is kept as .old)",
                kf.display()
            )));
        }
        // The client's own copy first. The server's copy is the fallback for a client that
        // lost everything; a server that knows the recovery public key could seal a key of
        // its own making, so using its copy is said out loud.
        let escrow =
            match crate::fsutil::read_local_bounded(&p.escrow_client(), crate::escrow::MAX_BYTES) {
                Ok((b, _)) => {
                    info!("read the key escrow from {}", p.escrow_client().display());
                    b
                }
                Err(local) => {
                    warn!(
                        "no client copy of the key escrow ({local:#}); using the server's copy. \
                     Check what you restore: the server chose this escrow"
                    );
                    ssh::Remote::connect(&p.server)
                        .and_then(|r| {
                            let dir = p.server.path.trim_end_matches('/');
                            r.read_file(
                                &format!("{dir}/{}", p.escrow_server_name()),
                                crate::escrow::MAX_BYTES,
                            )
                        })
                        .map_err(|e| {
                            anyhow::anyhow!(
                                "no escrow: client {}: {local:#}; server: {e:#}",
                                p.escrow_client().display()
                            )
                        })?
                }
            };
        let key = crate::escrow::open(&escrow, identity)?;
        if kf.exists() {
            let mut old = kf.clone().into_os_string();
            old.push(".old");
            std::fs::rename(kf, &old)?;
        }
        crate::stack::luks::write_keyfile(kf, &key)?;
        info!(
            "keyfile {} recovered ({} bytes)",
            kf.display(),
            key.bytes().len()
        );
        Ok(())
    })();
    match r {
        Ok(()) => Exit::Ok,
        Err(e) => super::fail(e),
    }
}
