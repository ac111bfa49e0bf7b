//! `e2ebackup keys verify PROFILE [--identity FILE]`: will the keys still open the backup?
//!
//! Checked, without mounting anything: the keyfile unlocks the container's keyslot (a LUKS
//! test activation, no mapping is created), the client's pinned header matches the server's,
//! the server's and the client's key escrows are identical, and with `--identity`, that the
//! escrow decrypts to exactly this keyfile. Run it after changing recipients or moving keys,
//! and now and then from the timer: a key that no longer works is found before it is needed.

use std::path::Path;

use anyhow::{Context, Result};

use crate::error::{Exit, Failure};
use crate::ops::{fail_ref, finish, CheckReport};
use crate::profile::Profile;
use crate::session::Session;
use crate::stack::luks;
use crate::{info, warn};

pub fn verify(p: &Profile, identity: Option<&Path>, json: bool) -> Exit {
    let mut rep = CheckReport::new(p, "keys verify");
    let mut s = match Session::begin(p, "keys-verify") {
        Ok(s) => s,
        Err(e) => return rep.conclude(fail_ref(&e), Some(&e), json),
    };
    let r = work(p, &mut s, identity, &mut rep.problems);
    let code = finish(s, &r).0;
    rep.conclude(code, r.as_ref().err(), json)
}

fn work(
    p: &Profile,
    s: &mut Session<'_>,
    identity: Option<&Path>,
    problems: &mut Vec<String>,
) -> Result<Exit> {
    let mut untested = false;
    s.read_key()?;
    let facts = s.connect()?.clone();
    if facts.container_size.is_none() {
        return Err(crate::error::usage(format!(
            "no container {}",
            p.remote_container()
        )));
    }
    s.mount_server("keys-verify")?;
    let dev = s.attach(&p.container.file.0, true)?;
    let header = s.pinned_header()?;
    match &header {
        Some(h) => info!("pinned header {} matches the server's", h.display()),
        None => problems.push(format!(
            "no pinned header at {}",
            p.header_backup().display()
        )),
    }
    // A test activation: the keyslot is decrypted, no device-mapper mapping is created.
    let key = s.key()?;
    match luks::keyslot_for(&dev, header.as_deref(), key) {
        Ok(slot) => info!(
            "keyfile {} opens keyslot {slot}",
            p.container.keyfile.0.display()
        ),
        Err(e) => problems.push(format!("{e:#}")),
    }
    if !p.container.recovery_recipients.is_empty() {
        let server = s
            .server_dir()?
            .read_bounded(&p.escrow_server_name(), crate::escrow::MAX_BYTES)
            .and_then(|o| o.context("not there"));
        let client =
            crate::fsutil::read_local_bounded(&p.escrow_client(), crate::escrow::MAX_BYTES)
                .map(|(b, _)| b);
        match (&server, &client) {
            (Ok(a), Ok(b)) if a == b => {
                info!("the server's and the client's key escrows are identical")
            }
            (Ok(_), Ok(_)) => {
                problems.push("the server's and the client's key escrows differ".into())
            }
            (Err(e), _) => problems.push(format!("no key escrow on the server: {e:#}")),
            (_, Err(e)) => problems.push(format!(
                "no key escrow at {}: {e}",
                p.escrow_client().display()
            )),
        }
        // The client's own copy first: the server could hand over an escrow of its own
        // making (it may hold the recovery public key too).
        if let (Some(id), Ok(sealed)) = (identity, client.as_ref().or(server.as_ref())) {
            match crate::escrow::open(sealed, id) {
                Ok(k) if k.bytes() == key.bytes() => {
                    info!(
                        "{} opens the escrow, and it holds this keyfile",
                        id.display()
                    )
                }
                Ok(_) => problems.push("the escrow holds a DIFFERENT key than the keyfile".into()),
                Err(e) => problems.push(format!("{e:#}")),
            }
        } else if identity.is_none() {
            untested = true;
        }
    } else {
        warn!("no recovery_recipients: losing the keyfile would lose every backup");
    }
    if problems.is_empty() && untested {
        // Exit 3: nothing is wrong that was tested, but the one key that matters after a
        // lost client was not tried.
        warn!(
            "the recovery key was NOT tested: the escrow is intact, but nothing proved that \
             your offline identity opens it. Run `e2ebackup keys verify {} --identity FILE` \
             with the offline identity (age-keygen's file, or the SSH private key)",
            p.name
        );
        return Ok(Exit::Warnings);
    }
    if problems.is_empty() {
        info!("keys verify: all good");
        return Ok(Exit::Ok);
    }
    for pr in problems.iter() {
        crate::logging::emit(-2, "PROBLEM: ", format_args!("{pr}"));
    }
    Err(Failure::Security(format!("keys verify found {} problem(s)", problems.len())).into())
}

/// `e2ebackup keys export-kit PROFILE DIR`: the recovery kit, everything a new machine needs
/// to restore when this one is gone, written to DIR (a removable disk, to keep offline): the
/// profile, the keyfile, the pinned header, the SSH key, known_hosts, the client's escrow
/// copy, the recovery recipients (public) and a README with the restore steps. Files 0600,
/// DIR 0700; a DIR that others can read, or that is not empty, is refused. The recovery
/// identity (private) is not on this machine and is not written: keep it apart from the kit.
pub fn export_kit(p: &Profile, dir: &Path) -> Exit {
    match write_kit(p, dir) {
        Ok(n) => {
            info!(
                "recovery kit: {n} files in {}; keep it offline, and apart from the recovery identity",
                dir.display()
            );
            Exit::Ok
        }
        Err(e) => crate::ops::fail(e),
    }
}

fn write_kit(p: &Profile, dir: &Path) -> Result<usize> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
    let usage = crate::error::usage;
    match std::fs::symlink_metadata(dir) {
        Ok(m) => {
            if !m.is_dir() {
                return Err(usage(format!("{} is not a directory", dir.display())));
            }
            if m.mode() & 0o077 != 0 || m.uid() != nix::unistd::geteuid().as_raw() {
                return Err(usage(format!(
                    "{} is readable by others (mode {:o}, uid {}): the kit holds the keyfile; \
                     use a directory of your own with mode 0700",
                    dir.display(),
                    m.mode() & 0o7777,
                    m.uid()
                )));
            }
            if std::fs::read_dir(dir)?.next().is_some() {
                return Err(usage(format!(
                    "{} is not empty: give an empty directory",
                    dir.display()
                )));
            }
        }
        Err(_) => std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?,
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let write = |name: &str, data: &[u8]| -> Result<()> {
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        f.write_all(data)?;
        f.sync_all()?;
        Ok(())
    };
    let read = |what: &str, path: &Path| -> Result<Vec<u8>> {
        std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
    };
    let file = |path: &Path| {
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let mut items: Vec<(String, String, Vec<u8>)> = vec![
        (
            "the profile".into(),
            format!("{}.yaml", p.name),
            read("the profile", &p.source_file)?,
        ),
        (
            "the keyfile".into(),
            file(&p.container.keyfile.0),
            read("the keyfile", &p.container.keyfile.0)?,
        ),
        (
            "the pinned LUKS header".into(),
            file(&p.header_backup()),
            read("the pinned header", &p.header_backup())?,
        ),
        (
            "the SSH key".into(),
            file(&p.server.identity_file.0),
            read("the SSH key", &p.server.identity_file.0)?,
        ),
        (
            "known_hosts".into(),
            file(&p.server.known_hosts.0),
            read("known_hosts", &p.server.known_hosts.0)?,
        ),
    ];
    if !p.container.recovery_recipients.is_empty() {
        items.push((
            "the key escrow (client copy)".into(),
            file(&p.escrow_client()),
            read("the key escrow", &p.escrow_client())?,
        ));
        let r: String = p
            .container
            .recovery_recipients
            .iter()
            .map(|r| format!("{}\n", r.0))
            .collect();
        items.push((
            "the recovery recipients (public)".into(),
            "recovery-recipients.txt".into(),
            r.into_bytes(),
        ));
    }
    let mut names = std::collections::BTreeSet::new();
    for (what, name, _) in &items {
        if !names.insert(name.clone()) {
            return Err(usage(format!(
                "two files of the kit would both be named {name} ({what}): rename one in the profile"
            )));
        }
    }
    let mut readme = format!(
        "e2ebackup recovery kit for profile {name}, written {now}\n\n\
         KEEP OFFLINE. This holds the keyfile: whoever has it and the server's container reads\n\
         every backup. Keep the recovery identity (the private half of the recipients) apart.\n\n\
         Files, and where the profile expects them on a new machine:\n",
        name = p.name,
        now = crate::ops::now()
    );
    let dest = |what: &str| -> String {
        match what {
            "the profile" => format!("/etc/e2ebackup/profiles/{}.yaml", p.name),
            "the keyfile" => p.container.keyfile.0.display().to_string(),
            "the pinned LUKS header" => p.header_backup().display().to_string(),
            "the SSH key" => p.server.identity_file.0.display().to_string(),
            "known_hosts" => p.server.known_hosts.0.display().to_string(),
            "the key escrow (client copy)" => p.escrow_client().display().to_string(),
            _ => "(reference only)".into(),
        }
    };
    for (what, name, _) in &items {
        readme.push_str(&format!("  {name:<32} {what}: {}\n", dest(what)));
    }
    readme.push_str(&format!(
        "\nRestore on a new machine (as root, e2ebackup installed: docs/install.md):\n\
         1. install -d -m 0700 /etc/e2ebackup/keys; copy each file above to its place, mode 0600\n\
            (the keyfile 0400).\n\
         2. e2ebackup validate {n} --connect      # host key, login, the container is there\n\
         3. e2ebackup keys verify {n}              # the keyfile opens it, the header matches\n\
         4. e2ebackup restore {n} latest /srv/restored --path /etc   # a small drill first\n\
         Without the keyfile: e2ebackup recover-key {n} --identity YOUR-OFFLINE-IDENTITY.\n\
         A drill on another machine takes the server lock for its duration: run it when the\n\
         real client is not running (its run would exit 4). Never run `run` from the drill\n\
         machine while the real client is alive: two writers of one container.\n\
         Without e2ebackup at all: cryptsetup open --header <header> --key-file <keyfile>\n\
         (docs/layout.md, restoring by hand).\n",
        n = p.name
    ));
    for (_, name, data) in &items {
        write(name, data)?;
    }
    write("README.txt", readme.as_bytes())?;
    Ok(items.len() + 1)
}
