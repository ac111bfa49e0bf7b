//! `e2ebackup keys rotate PROFILE`: replace the keyfile.
//!
//! In one session, with the container open read-write under the current keyfile (its pinned
//! header and its generation checked first):
//! 1. a new keyfile is written beside the keyfile as `<keyfile>.new`;
//! 2. on the server's LUKS2 header a keyslot for it is added (authorised by the current
//!    keyfile) and the current keyfile's keyslot is destroyed ([`luks::change_key`]);
//! 3. the header is pinned again (the new pin is checked: the new keyfile opens it, the old
//!    one does not) and renamed over the pinned copy;
//! 4. the keyfile is moved to `<keyfile>.old` and `<keyfile>.new` to the keyfile;
//! 5. the container's STATE is signed again, with the new keyfile (its MAC key is derived
//!    from the keyfile: [`crate::generation`]), as one more generation;
//! 6. the key escrows (server and client) are sealed again to the same recipients;
//! 7. once the new keyfile opens the container (a test activation), `<keyfile>.old` is
//!    removed.
//!
//! The volume key is not changed (no LUKS2 reencryption): whoever holds the old keyfile and
//! a copy of the old header (the server could have kept one) can still decrypt. Rotation
//! protects against an old keyfile only together with a server that never kept the old
//! header; against a leaked keyfile on a server you do not trust, make a new container.
//!
//! An interruption between steps 4 and 5 is carried by the generation check, which also
//! accepts a STATE signed by `<keyfile>.old`. One between steps 2 and 3 leaves the server's
//! header differing from the pin (every command then exits 6); docs/operations.md says how
//! to finish by hand. A leftover `<keyfile>.new` makes a new rotation refuse to start.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::error::{usage, Exit};
use crate::ops::{fail, finish};
use crate::profile::Profile;
use crate::session::Session;
use crate::stack::luks;
use crate::{info, signals};

pub fn rotate(p: &Profile) -> Exit {
    let new = p.keyfile_new();
    if std::fs::symlink_metadata(&new).is_ok() {
        return fail(usage(format!(
            "{} exists: an earlier `keys rotate` was interrupted. Finish it by hand (docs/operations.md, \
             key rotation), or remove it if it never reached the server",
            new.display()
        )));
    }
    let mut s = match Session::begin(p, "keys-rotate") {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let r = work(p, &mut s);
    finish(s, &r).0
}

fn sync_dir(of: &Path) -> Result<()> {
    let dir = of.parent().unwrap_or(Path::new("/"));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

fn work(p: &Profile, s: &mut Session<'_>) -> Result<Exit> {
    let root = s.open_all("keys-rotate", false)?;
    let dev = s.device()?;
    let pin = p.header_backup();
    let keyfile = &p.container.keyfile.0;
    let (key_new, key_old) = (p.keyfile_new(), p.keyfile_old());
    info!("creating the new keyfile {}", key_new.display());
    let new = luks::create_keyfile(&key_new)?;
    signals::check()?;
    let (old_slot, new_slot) = luks::change_key(&dev, s.key()?, &new)?;
    info!("keyslot {new_slot} added for the new keyfile, keyslot {old_slot} (the old keyfile's) destroyed");
    let pin_new = std::path::PathBuf::from(format!("{}.new", pin.display()));
    luks::backup_header(&dev, &pin_new)?;
    luks::verify_pinned_header(&dev, &pin_new)?;
    luks::keyslot_for(&dev, Some(&pin_new), &new)?;
    if luks::keyslot_for(&dev, Some(&pin_new), s.key()?).is_ok() {
        bail!(
            "the old keyfile still opens the new header {}",
            pin_new.display()
        );
    }
    std::fs::rename(&pin_new, &pin)
        .with_context(|| format!("renaming {} to {}", pin_new.display(), pin.display()))?;
    sync_dir(&pin)?;
    info!("pinned the new header at {}", pin.display());
    std::fs::rename(keyfile, &key_old)
        .with_context(|| format!("renaming {} to {}", keyfile.display(), key_old.display()))?;
    std::fs::rename(&key_new, keyfile)
        .with_context(|| format!("renaming {} to {}", key_new.display(), keyfile.display()))?;
    sync_dir(keyfile)?;
    s.use_key(new);
    let g = s.commit_generation(&root)?;
    info!("the container's STATE is signed with the new keyfile (generation {g})");
    let recipients: Vec<String> = p
        .container
        .recovery_recipients
        .iter()
        .map(|r| r.0.clone())
        .collect();
    if !recipients.is_empty() {
        let sealed = crate::escrow::seal(s.key()?, &recipients)?;
        s.server_dir()?.replace(&p.escrow_server_name(), &sealed)?;
        crate::fsutil::write_atomic(&p.escrow_client(), &sealed)?;
        info!(
            "key escrow sealed again for {} recipient(s): {} on the server, {} here",
            recipients.len(),
            p.escrow_server_name(),
            p.escrow_client().display()
        );
    }
    let slot = luks::keyslot_for(&dev, Some(&pin), s.key()?)?;
    std::fs::remove_file(&key_old)
        .with_context(|| format!("removing the old keyfile {}", key_old.display()))?;
    info!(
        "keys rotated: {} opens keyslot {slot}; the old keyfile is removed (the volume key is unchanged)",
        keyfile.display()
    );
    Ok(Exit::Ok)
}
