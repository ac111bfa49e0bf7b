//! `cleanup` (finish a killed run's teardown) and `validate` (check without touching).

use std::path::Path;

use crate::error::Exit;
use crate::profile::Profile;
use crate::session::Session;
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
    if let Some(why) = crate::localpaths::identity_problem(&p.server.identity_file.0) {
        problems.push(format!("server.identity_file {why}"));
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
    // A missing source fails `run` (after its `before` hook, before it connects); a hook
    // may be what creates it (mounts a disk), so then it is only a warning here.
    for pr in crate::localpaths::source_problems(p) {
        if p.hooks.before.0.is_empty() {
            problems.push(pr);
        } else {
            warn!("{pr}; a `before` hook may create it, else the run fails");
        }
    }
    problems.extend(crate::localpaths::textfile_problem(p));
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
/// server's if the client has none) with an offline identity, test that the recovered key
/// opens the container (a LUKS test activation through the whole stack, against the pinned
/// header when the client still has it), and only then write the keyfile. An existing
/// keyfile (with `--force`) is never lost: it is kept as `KEYFILE.old`, or the first free
/// `KEYFILE.old.N`.
pub fn recover_key(p: &Profile, identity: &Path, force: bool) -> Exit {
    let kf = &p.container.keyfile.0;
    if kf.exists() && !force {
        return super::fail(crate::error::usage(format!(
            "keyfile {} exists; pass --force to replace it (the old one is kept as .old, or .old.N)",
            kf.display()
        )));
    }
    let key = match recover_escrow(p, identity) {
        Ok(k) => k,
        Err(e) => return super::fail(e),
    };
    // Test the key against the container before anything is replaced.
    let mut s = match Session::begin(p, "recover-key") {
        Ok(s) => s,
        Err(e) => return super::fail(e),
    };
    let tested = (|| -> anyhow::Result<Exit> {
        s.connect()?;
        s.mount_server("recover-key")?;
        let dev = s.attach(&p.container.file.0, true)?;
        let header = s.pinned_header_for_key_test()?;
        let slot = crate::stack::luks::keyslot_for(&dev, Some(&header), &key).map_err(|e| {
            anyhow::Error::from(crate::error::Failure::Security(format!(
                "the recovered key does not open the container ({e:#}); nothing was replaced"
            )))
        })?;
        info!("the recovered key opens keyslot {slot} of the container");
        Ok(Exit::Ok)
    })();
    let (code, _) = super::finish(s, &tested);
    if code != Exit::Ok {
        return code;
    }
    let r = (|| -> anyhow::Result<()> {
        if let Some(old) = keep_old(kf)? {
            info!("the keyfile it replaces is kept as {}", old.display());
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

/// Decrypt the escrow: the client's own copy first. The server's copy is the fallback for a
/// client that lost everything; a server that knows the recovery public key could seal a
/// key of its own making, so using its copy is said out loud (and the key is tested against
/// the pinned header when there is one).
fn recover_escrow(p: &Profile, identity: &Path) -> anyhow::Result<crate::stack::luks::Key> {
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
    crate::escrow::open(&escrow, identity)
}

/// Move the keyfile `kf` aside, if there is one, to the first of `KF.old`, `KF.old.1`,
/// `KF.old.2`, ... that does not exist (a link, never over anything, then the old name
/// removed): every earlier key stays. Returns where it went.
pub fn keep_old(kf: &Path) -> anyhow::Result<Option<std::path::PathBuf>> {
    use anyhow::Context;
    match std::fs::symlink_metadata(kf) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", kf.display())),
        Ok(m) if !m.file_type().is_file() => anyhow::bail!(
            "keyfile {} is a {}, not a regular file: nothing replaced",
            kf.display(),
            crate::fsutil::kind_word(std::os::unix::fs::MetadataExt::mode(&m))
        ),
        Ok(_) => {}
    }
    for n in 0..10_000u32 {
        let mut old = kf.as_os_str().to_owned();
        old.push(if n == 0 {
            ".old".to_string()
        } else {
            format!(".old.{n}")
        });
        let old = std::path::PathBuf::from(old);
        match std::fs::hard_link(kf, &old) {
            Ok(()) => {
                std::fs::remove_file(kf).with_context(|| {
                    format!("removing {} (kept as {})", kf.display(), old.display())
                })?;
                return Ok(Some(old));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("keeping {} as {}", kf.display(), old.display()))
            }
        }
    }
    anyhow::bail!(
        "{}.old through .old.9999 all exist: nothing replaced",
        kf.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test `recover-key` makes before it replaces anything: a LUKS test activation
    /// (no mapping, no device-mapper needed) opens with the right key and refuses another.
    /// Against a pinned-header file, as `keyslot_for` is given it.
    #[test]
    fn the_key_test_tells_the_right_key_from_another() {
        let d = tempfile::tempdir().unwrap();
        let (img, good, bad) = (
            d.path().join("c.img"),
            d.path().join("good.key"),
            d.path().join("bad.key"),
        );
        std::fs::write(&good, [7u8; 64]).unwrap();
        std::fs::write(&bad, [8u8; 64]).unwrap();
        std::fs::File::create(&img)
            .unwrap()
            .set_len(20 << 20)
            .unwrap();
        let st = std::process::Command::new("cryptsetup")
            .args(["luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2"])
            .args(["--pbkdf-force-iterations", "1000", "--key-file"])
            .arg(&good)
            .arg(&img)
            .status()
            .unwrap();
        assert!(st.success());
        let key = |p: &Path| crate::stack::luks::key_from_bytes(std::fs::read(p).unwrap());
        assert_eq!(
            crate::stack::luks::keyslot_for(&img, None, &key(&good)).unwrap(),
            0
        );
        let e = crate::stack::luks::keyslot_for(&img, None, &key(&bad)).unwrap_err();
        assert!(format!("{e:#}").contains("does not open"), "{e:#}");
    }

    #[test]
    fn every_old_keyfile_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let kf = d.path().join("k.key");
        assert_eq!(keep_old(&kf).unwrap(), None, "nothing to keep");
        let mut kept = Vec::new();
        for gen in 0..4 {
            std::fs::write(&kf, format!("key {gen}")).unwrap();
            kept.push(keep_old(&kf).unwrap().unwrap());
            assert!(!kf.exists());
        }
        let names: Vec<String> = kept
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["k.key.old", "k.key.old.1", "k.key.old.2", "k.key.old.3"]
        );
        for (gen, p) in kept.iter().enumerate() {
            assert_eq!(std::fs::read_to_string(p).unwrap(), format!("key {gen}"));
        }
        // A link at the keyfile's name is not followed or moved.
        std::os::unix::fs::symlink("/etc/hostname", &kf).unwrap();
        assert!(keep_old(&kf).is_err());
        assert!(kf.symlink_metadata().is_ok());
    }
}
