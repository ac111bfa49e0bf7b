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
//! Without `--reencrypt` the volume key is not changed: whoever holds the old keyfile and a
//! copy of the old header (the server could have kept one) can still decrypt.
//!
//! `--reencrypt` first changes the volume key, in a session of its own, then rotates the
//! keyfile as above. LUKS2 re-encryption, offline (no mapping open) and in place:
//! 1. header, layout and generation are checked on a read-only mount, which is closed again;
//! 2. on a copy of the pinned header, a keyslot with a new random volume key is added for
//!    the keyfile and the re-encryption recorded (libcryptsetup's checksum resilience); the
//!    copy is renamed over the pinned header and written to the server's;
//! 3. libcryptsetup re-encrypts the data in hot zones of at most 8 MiB, keeping its
//!    progress in the pinned header (a detached header: the server never sees the progress
//!    before it is made, nor can it change it); after every hot zone the pinned header is
//!    written over the server's ([`luks::HeaderMirror`]), so the server's copy with the
//!    escrowed keyfile opens the container if this client is lost, short of at most the
//!    one hot zone being rewritten;
//! 4. at the end the old volume key's keyslots are gone; the final header is written to the
//!    server and checked there.
//!
//! Interrupted (a signal, `server.run_timeout`, a lost link, a crash), the pinned header
//! records how far it got; `keys rotate --reencrypt` again goes on from there, and no other
//! command opens the container until it has finished (their error says so).
//!
//! An interruption between steps 4 and 5 is carried by the generation check, which also
//! accepts a STATE signed by `<keyfile>.old`. One between steps 2 and 3 leaves the server's
//! header differing from the pin (every command then exits 6); docs/operations.md says how
//! to finish by hand. A leftover `<keyfile>.new` makes a new rotation refuse to start.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::error::{usage, Exit};
use crate::ops::{fail, finish};
use crate::profile::Profile;
use crate::session::Session;
use crate::stack::luks;
use crate::{info, signals, warn};

pub fn rotate(p: &Profile, reencrypt: bool) -> Exit {
    let new = p.keyfile_new();
    if std::fs::symlink_metadata(&new).is_ok() {
        return fail(usage(format!(
            "{} exists: an earlier `keys rotate` was interrupted. Finish it by hand (docs/operations.md, \
             key rotation), or remove it if it never reached the server",
            new.display()
        )));
    }
    let marker = p.reencrypted_marker();
    let pending = match reencrypted_with_this_keyfile(p) {
        Ok(b) => b,
        Err(e) => return fail(e),
    };
    if reencrypt && pending {
        info!(
            "the volume key was changed by an earlier `keys rotate --reencrypt` ({}): only the \
             keyfile rotation is left",
            marker.display()
        );
    } else if reencrypt {
        let mut s = match Session::begin(p, "keys-rotate") {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
        let r = reencrypt_work(p, &mut s).and_then(|c| {
            let mark = keyfile_mark(s.key()?);
            crate::fsutil::write_atomic(&marker, mark.as_bytes())?;
            Ok(c)
        });
        let code = finish(s, &r).0;
        if code != Exit::Ok {
            return code;
        }
    }
    let mut s = match Session::begin(p, "keys-rotate") {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let r = work(p, &mut s, reencrypt);
    let code = finish(s, &r).0;
    if code == Exit::Ok {
        if let Err(e) = std::fs::remove_file(&marker) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return fail(
                    anyhow::Error::new(e).context(format!("removing {}", marker.display())),
                );
            }
        }
    }
    code
}

/// What [`Profile::reencrypted_marker`] holds: the SHA-256 of the keyfile that the
/// re-encryption used (of 4096 random bytes: it tells nothing about them).
fn keyfile_mark(key: &luks::Key) -> String {
    use sha2::Digest as _;
    crate::manifest::hex(&sha2::Sha256::digest(key.bytes())) + "\n"
}

/// Whether an earlier `--reencrypt` changed the volume key and the keyfile rotation that
/// follows it has not finished: the marker is there and names the current keyfile (once
/// the rotation has replaced the keyfile, a marker left by a crash no longer matches, and
/// a new `--reencrypt` re-encrypts again).
fn reencrypted_with_this_keyfile(p: &Profile) -> Result<bool> {
    let marker = p.reencrypted_marker();
    let Ok(mark) = std::fs::read_to_string(&marker) else {
        return Ok(false);
    };
    let key = luks::read_keyfile(&p.container.keyfile.0)?;
    if mark == keyfile_mark(&key) {
        return Ok(true);
    }
    std::fs::remove_file(&marker).with_context(|| format!("removing {}", marker.display()))?;
    Ok(false)
}

/// `--reencrypt`: a new volume key for the container (module documentation, steps 1-4).
fn reencrypt_work(p: &Profile, s: &mut Session<'_>) -> Result<Exit> {
    use crate::progress::human_bytes;
    let dev = s.attach_container("keys-rotate", false)?;
    // A client rebuilt in the middle of a re-encryption pins the server's header (which
    // follows the client's after every hot zone) as any rebuilt client does, and goes on.
    let pin = s.pin_or_trust()?;
    let resuming = luks::reencrypt_unfinished(&pin)?;
    let size = s.facts()?.container_size.unwrap_or(0);
    if resuming {
        info!(
            "the pinned header {} records an unfinished re-encryption: going on with it",
            pin.display()
        );
    } else {
        // What is about to be rewritten is checked first, as for any writing command: the
        // header against the pin, the layout and the authenticated generation (a read-only
        // mount of a read-write mapping, which replays a journal left by a crash).
        let mark = s.mark();
        s.unlock(false, false)?;
        s.mount_checked(true)?;
        s.relock_to(mark)?;
        if let Some(free) = s.facts()?.free_bytes.filter(|f| *f < size) {
            warn!(
                "the server has {} free: the re-encryption writes every block of the {} \
                 container, so the server ends up holding all of it (`e2ebackup trim {}` gives \
                 the unused part back afterwards). If the server's disk fills, the \
                 re-encryption stops and goes on when run again",
                human_bytes(free),
                human_bytes(size),
                p.name
            );
        }
        info!(
            "re-encrypting the container with a new volume key: all {} of it is read from and \
             written back to the server once (it can be stopped; running it again goes on)",
            human_bytes(size)
        );
        // The header must fit the area the mirror writes (every container `init` makes
        // does): found now, not after the re-encryption is recorded.
        luks::pinned_bytes(&pin)?;
        let work = p.header_reencrypt_work();
        let _ = std::fs::remove_file(&work);
        std::fs::copy(&pin, &work)
            .with_context(|| format!("copying {} to {}", pin.display(), work.display()))?;
        std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o600))?;
        let started = luks::reencrypt_start(&dev, &work, s.key()?).and_then(|()| {
            std::fs::File::open(&work)?.sync_all()?;
            std::fs::rename(&work, &pin)
                .with_context(|| format!("renaming {} to {}", work.display(), pin.display()))?;
            sync_dir(&pin)
        });
        if let Err(e) = started {
            let _ = std::fs::remove_file(&work);
            return Err(e);
        }
    }
    signals::check()?;
    let mut mirror = luks::HeaderMirror::new(&dev)?;
    mirror.write(&pin)?;
    let mut mirror_err = None;
    let mut last_said = (Instant::now(), 0u64);
    let mut first = true;
    let mut at = (0u64, size);
    let finished = {
        let mut step = |done: u64, total: u64| -> bool {
            at = (done, total);
            if let Err(e) = mirror.write(&pin) {
                mirror_err = Some(e);
                return false;
            }
            // libcryptsetup calls back once before the first hot zone, with where it starts,
            // then after each one with where that one began.
            let pct = |n: u64| n.saturating_mul(100) / total.max(1);
            if first {
                if done > 0 {
                    info!(
                        "going on from {} of {} ({}%), where the last attempt stopped",
                        human_bytes(done),
                        human_bytes(total),
                        pct(done)
                    );
                }
                last_said.1 = done;
            } else if pct(done) >= pct(last_said.1) + 10
                || last_said.0.elapsed() >= Duration::from_secs(300)
            {
                info!(
                    "re-encrypted {} of {} ({}%)",
                    human_bytes(done),
                    human_bytes(total),
                    pct(done)
                );
                last_said = (Instant::now(), done);
            }
            first = false;
            signals::check().is_ok()
        };
        luks::reencrypt_run(&dev, &pin, s.key()?, &mut step)
    };
    // Once more whatever the outcome: libcryptsetup may write the header as it stops.
    let last_mirror = mirror.write(&pin);
    let again = format!(
        "the re-encryption stopped after about {} of {}: `e2ebackup keys rotate {} \
         --reencrypt` goes on from there. Until it has finished, no other command opens the \
         container",
        human_bytes(at.0),
        human_bytes(at.1),
        p.name
    );
    let finished = finished.map_err(|e| e.context(again.clone()))?;
    if let Some(e) = mirror_err.or(last_mirror.err()) {
        return Err(e
            .context("writing the client's header to the server")
            .context(again));
    }
    if !finished {
        signals::check().map_err(|e| e.context(again.clone()))?;
        bail!("libcryptsetup stopped early: {again}");
    }
    luks::check_params(&pin)?;
    luks::verify_pinned_header(&dev, &pin)?;
    let slot = luks::keyslot_for(&dev, Some(&pin), s.key()?)?;
    info!(
        "re-encrypted: the container has a new volume key (keyslot {slot}); the old keyslots \
         are gone, and the server's header is the new one"
    );
    Ok(Exit::Ok)
}

fn sync_dir(of: &Path) -> Result<()> {
    let dir = of.parent().unwrap_or(Path::new("/"));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

fn work(p: &Profile, s: &mut Session<'_>, reencrypted: bool) -> Result<Exit> {
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
        "keys rotated: {} opens keyslot {slot}; the old keyfile is removed ({})",
        keyfile.display(),
        if reencrypted {
            "and the volume key is new: the old keyfile and an old header read nothing now. \
             Write a new recovery kit (`keys export-kit`)"
        } else {
            "the volume key is unchanged"
        }
    );
    Ok(Exit::Ok)
}
