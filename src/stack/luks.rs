//! LUKS2 through libcryptsetup (the `libcryptsetup-rs` crate, `mutex` feature: libcryptsetup
//! is not thread-safe and the crate panics on a second thread without it).
//!
//! Key derivation: the container is unlocked by a keyfile of 4096 random bytes, not by a
//! human passphrase. A slow KDF protects low-entropy secrets against guessing; against a
//! 32768-bit random key it buys nothing and costs seconds at every open (argon2id took ~3 s
//! to open and ~12 s to format under emulation; its memory cost can also fail on small
//! machines). So the keyslot uses PBKDF2-SHA256 with cryptsetup's minimum of 1000
//! iterations, the same trade systemd-cryptenroll makes for high-entropy keys.
//!
//! Cipher: aes-xts-plain64 with a 512-bit key and 4096-byte sectors (fewer, larger I/Os over
//! the network; the container size is always a multiple of 1 MiB). No `--integrity`: it
//! cannot be resized or discarded and needs a full wipe (see docs/design.md).
//!
//! The key only ever travels in memory: read from the keyfile into a buffer that is zeroed
//! when dropped, handed to libcryptsetup, never to a command line or environment.

use std::ffi::CStr;
use std::io::Read;
use std::os::raw::{c_char, c_int, c_void};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use libcryptsetup_rs::consts::flags::{CryptActivate, CryptDeactivate, CryptPbkdf, CryptVolumeKey};
use libcryptsetup_rs::consts::vals::{CryptKdf, CryptStatusInfo, EncryptionFormat};
use libcryptsetup_rs::{CryptInit, CryptParamsLuks2, CryptParamsLuks2Ref, CryptPbkdfType, Either};

use crate::debug;
use crate::teardown::{Stack, Undo};

/// Key material, zeroed on drop.
pub struct Key(Vec<u8>);

impl Key {
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A key from bytes (tests of modules that take a key).
#[cfg(test)]
pub fn tests_key(bytes: Vec<u8>) -> Key {
    Key(bytes)
}

/// Wrap recovered key material (escrow).
pub fn key_from_bytes(bytes: Vec<u8>) -> Key {
    Key(bytes)
}

/// Write a keyfile (mode 0400) that must not exist yet.
pub fn write_keyfile(path: &Path, key: &Key) -> Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        crate::fsutil::secret_dir(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(path)
        .with_context(|| format!("creating keyfile {}", path.display()))?;
    f.write_all(key.bytes()).and_then(|_| f.sync_all())?;
    Ok(())
}

impl Drop for Key {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({} bytes, redacted)", self.0.len())
    }
}

pub const KEYFILE_BYTES: usize = 4096;

/// Read a keyfile. Refused (exit 2, nothing touched) unless it is a regular file owned by
/// root (this user) with no access for group or others: a keyfile someone else can read
/// or replace is no secret. The read does not wait on a FIFO and is bounded in size.
///
/// The bytes are read into one buffer sized from the file's length before the read, so no
/// growing buffer leaves copies of the key behind in freed memory; the buffer is zeroed when
/// the [`Key`] is dropped.
pub fn read_keyfile(path: &Path) -> Result<Key> {
    use std::os::unix::fs::MetadataExt;
    const MAX: u64 = 1 << 20;
    let refuse = |why: String| -> anyhow::Error {
        crate::error::usage(format!(
            "keyfile {}: {why}; it must be a regular file owned by root with mode 0400 or 0600",
            path.display()
        ))
    };
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => crate::error::usage(format!(
                "keyfile {} does not exist: run `e2ebackup init PROFILE` first (on another \
                 machine: copy the keyfile there, or `e2ebackup recover-key`)",
                path.display()
            )),
            _ => refuse(format!("opening it: {e}")),
        })?;
    let md = f
        .metadata()
        .with_context(|| format!("examining keyfile {}", path.display()))?;
    if !md.file_type().is_file() {
        return Err(refuse("not a regular file".into()));
    }
    let mode = md.permissions().mode();
    if md.uid() != nix::unistd::geteuid().as_raw() {
        return Err(refuse(format!("owned by uid {}", md.uid())));
    }
    if mode & 0o077 != 0 {
        return Err(refuse(format!(
            "accessible to group or others (mode {:04o}); chmod 0400 it",
            mode & 0o7777
        )));
    }
    if md.len() > MAX {
        return Err(refuse(format!("larger than {MAX} bytes")));
    }
    let mut key = Key(vec![0u8; md.len() as usize]);
    f.read_exact(&mut key.0)
        .with_context(|| format!("reading keyfile {}", path.display()))?;
    let mut more = [0u8; 1];
    if f.read(&mut more)
        .with_context(|| format!("reading keyfile {}", path.display()))?
        != 0
    {
        bail!("keyfile {} changed while it was read", path.display());
    }
    if key.0.len() < 32 {
        bail!(
            "keyfile {} holds only {} bytes",
            path.display(),
            key.0.len()
        );
    }
    Ok(key)
}

/// Create a new keyfile of random bytes, mode 0400, never overwriting an existing file.
pub fn create_keyfile(path: &Path) -> Result<Key> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        crate::fsutil::secret_dir(dir)?;
    }
    let mut key = Key(vec![0u8; KEYFILE_BYTES]);
    std::fs::File::open("/dev/urandom")
        .and_then(|mut r| r.read_exact(&mut key.0))
        .context("reading /dev/urandom")?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(path)
        .with_context(|| format!("creating keyfile {}", path.display()))?;
    f.write_all(key.bytes()).and_then(|_| f.sync_all())?;
    Ok(key)
}

unsafe extern "C" fn log_cb(level: c_int, msg: *const c_char, _usr: *mut c_void) {
    if msg.is_null() {
        return;
    }
    // SAFETY: libcryptsetup passes a NUL-terminated string valid for the call.
    let s = unsafe { CStr::from_ptr(msg) }.to_string_lossy();
    debug!("libcryptsetup[{level}]: {}", s.trim_end());
}

/// Route libcryptsetup's messages to our log instead of its own stderr output.
pub fn install_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| libcryptsetup_rs::set_log_callback::<()>(Some(log_cb), None));
}

fn lerr(what: String) -> impl FnOnce(libcryptsetup_rs::LibcryptErr) -> anyhow::Error {
    move |e| anyhow!("{what}: {e}")
}

/// LUKS2 metadata area (each of the two copies): cryptsetup's default.
pub const METADATA_BYTES: u64 = 16 << 10;
/// Keyslot area. cryptsetup's default is 16 MiB, all of it written (and so allocated on the
/// server) at format; a keyslot for a 512-bit key takes 4000 anti-forensic stripes of 64
/// bytes, 256 KiB, so 1 MiB holds four of them (the keyfile's, and room for a passphrase or a
/// re-key), for 14 MiB less on the server per container.
pub const KEYSLOTS_BYTES: u64 = 1 << 20;
/// Where the data starts: both metadata copies and the keyslot area, aligned to 1 MiB.
pub const HEADER_BYTES: u64 = 2 << 20;

/// LUKS2-format `device` with one keyslot for `key` (a 1 MiB keyslot area: 2 MiB header).
pub fn format(device: &Path, key: &Key, label: &str) -> Result<()> {
    use libcryptsetup_rs::consts::vals::{KeyslotsSize, MetadataSize};
    install_logging();
    let mut dev = CryptInit::init(device).map_err(lerr(format!("opening {}", device.display())))?;
    dev.settings_handle()
        .set_metadata_size(
            MetadataSize::try_from(METADATA_BYTES).map_err(lerr("metadata size".into()))?,
            KeyslotsSize::try_from(KEYSLOTS_BYTES).map_err(lerr("keyslots size".into()))?,
        )
        .map_err(lerr("setting the LUKS2 metadata size".into()))?;
    let params = luks2_params(Some(label));
    let mut pref: CryptParamsLuks2Ref<'_> = (&params)
        .try_into()
        .map_err(lerr("LUKS2 parameters".into()))?;
    dev.context_handle()
        .format::<CryptParamsLuks2Ref<'_>>(
            EncryptionFormat::Luks2,
            ("aes", "xts-plain64"),
            None,
            Either::Right(64),
            Some(&mut pref),
        )
        .map_err(lerr(format!("luksFormat {}", device.display())))?;
    dev.keyslot_handle()
        .add_by_key(None, None, key.bytes(), CryptVolumeKey::empty())
        .map_err(lerr(format!(
            "adding the keyfile's keyslot on {}",
            device.display()
        )))?;
    Ok(())
}

/// The LUKS2 label of every container `init` makes. A fixed word: the label is stored in
/// the clear in the header on the server, and an earlier `e2ebackup-NAME` told the server
/// the profile's name. Older containers keep that label and open as before (the label is
/// not among the parameters checked, [`check_params`]).
pub const LABEL: &str = "e2ebackup";

/// Format the LUKS2 header on the client, never on the server: `img` (which must not
/// exist; in a root-only directory) is made a small sparse file laid out as the container
/// will be (header, then data from [`HEADER_BYTES`]), formatted there with one keyslot for
/// `key`, and its header backed up to `pinned`. `img` is removed again. The caller writes
/// the pinned bytes to the server ([`pinned_bytes`]) and checks them there against the
/// pinned copy, never the other way round: no byte the server returned becomes pinned.
pub fn format_on_client(img: &Path, pinned: &Path, key: &Key) -> Result<()> {
    struct Remove<'a>(&'a Path);
    impl Drop for Remove<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(img)
        .with_context(|| format!("creating {}", img.display()))?;
    let _remove = Remove(img);
    f.set_len(HEADER_BYTES + (1 << 20))
        .with_context(|| format!("sizing {}", img.display()))?;
    drop(f);
    format(img, key, LABEL)?;
    backup_header(img, pinned)?;
    check_params(pinned)?;
    Ok(())
}

/// The pinned header's bytes (metadata copies and keyslot area), to write to the server.
pub fn pinned_bytes(pinned: &Path) -> Result<Vec<u8>> {
    let (b, _) = crate::fsutil::read_local_bounded(pinned, HEADER_BYTES)
        .with_context(|| format!("reading the pinned header {}", pinned.display()))?;
    anyhow::ensure!(
        luks2_hdr_size(&b).is_some(),
        "{} is not a LUKS2 header backup",
        pinned.display()
    );
    Ok(b)
}

/// What `init` chose and what every open requires of the pinned header (both metadata
/// copies): one crypt segment with aes-xts-plain64, 4096-byte sectors and no integrity;
/// keyslots of a 512-bit volume key whose area is encrypted with aes-xts-plain64, with
/// PBKDF2 (SHA-256 or SHA-512, at least 1000 iterations: what `init` sets for the keyfile)
/// or argon2i/argon2id (a passphrase slot added by hand); no mandatory requirement (an
/// unfinished re-encryption). Anything else is refused (exit 6) naming what was found, before
/// libcryptsetup is given the header: a header forged with `cipher_null-ecb` and pinned on
/// trust (a rebuilt client) would otherwise hand the data to the server in the clear.
pub fn check_params(pinned: &Path) -> Result<()> {
    check_pinned(pinned, false)
}

/// [`check_params`], or with `reencrypt` the same check of a header that records an
/// unfinished `keys rotate --reencrypt` ([`check_params_json`]).
fn check_pinned(pinned: &Path, reencrypt: bool) -> Result<()> {
    let refuse = |why: String| -> anyhow::Error {
        crate::error::Failure::Security(format!(
            "the pinned LUKS header {}'s {why}; refusing to open it",
            pinned.display()
        ))
        .into()
    };
    let (b, _) = crate::fsutil::read_local_bounded(pinned, 64 << 20)
        .with_context(|| format!("reading the pinned header {}", pinned.display()))?;
    let jsons = header_jsons(&b).map_err(&refuse)?;
    if !reencrypt && jsons.iter().any(|(_, j)| reencrypt_required(j)) {
        return Err(reencrypt_unfinished_error(pinned, "PROFILE"));
    }
    for (copy, json) in jsons {
        check_params_json(json, reencrypt).map_err(|e| {
            refuse(if copy == 0 {
                e
            } else {
                format!("{e} (in its second metadata copy)")
            })
        })?;
    }
    Ok(())
}

/// The JSON text of both LUKS2 metadata copies in `b` (a header backup), after checking
/// each copy's binary header (magic, version, size, own offset).
fn header_jsons(b: &[u8]) -> std::result::Result<Vec<(usize, &str)>, String> {
    let hdr = luks2_hdr_size(b)
        .filter(|h| (8192..=4 << 20).contains(h) && *h % 4096 == 0)
        .ok_or("file is not a LUKS2 header")? as usize;
    let mut out = Vec::new();
    for copy in 0..2 {
        let at = copy * hdr;
        let area = b
            .get(at..at + hdr)
            .ok_or_else(|| format!("metadata copy {} is cut short", copy + 1))?;
        let magic: &[u8] = if copy == 0 {
            b"LUKS\xba\xbe"
        } else {
            b"SKUL\xba\xbe"
        };
        let size = u64::from_be_bytes(area[8..16].try_into().expect("8 bytes"));
        let offset = u64::from_be_bytes(area[256..264].try_into().expect("8 bytes"));
        if area[..6] != *magic || area[6..8] != [0, 2] || size != hdr as u64 || offset != at as u64
        {
            return Err(format!(
                "metadata copy {} has a bad binary header (magic, version, size or offset)",
                copy + 1
            ));
        }
        let json = &area[4096..];
        let json = &json[..json.iter().position(|&c| c == 0).unwrap_or(json.len())];
        let json = std::str::from_utf8(json)
            .map_err(|_| format!("metadata copy {} holds JSON that is not UTF-8", copy + 1))?;
        out.push((copy, json));
    }
    Ok(out)
}

/// Whether one copy's JSON has LUKS2 re-encryption among its mandatory requirements.
fn reencrypt_required(json: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| {
            v.pointer("/config/requirements/mandatory")
                .and_then(serde_json::Value::as_array)
                .map(|m| m.iter().any(is_reencrypt_requirement))
        })
        .unwrap_or(false)
}

/// Whether one of a header's mandatory requirements is LUKS2 re-encryption's.
fn is_reencrypt_requirement(r: &serde_json::Value) -> bool {
    r.as_str()
        .is_some_and(|r| r.starts_with("online-reencrypt"))
}

/// What every command but `keys rotate --reencrypt` says of a pinned header that records an
/// unfinished one; `profile` names the profile in the command to run.
pub fn reencrypt_unfinished_error(pinned: &Path, profile: &str) -> anyhow::Error {
    anyhow!(
        "the pinned LUKS header {} records an unfinished `keys rotate --reencrypt`: run \
         `e2ebackup keys rotate {profile} --reencrypt` again to finish it (it goes on where it \
         stopped); nothing else opens the container until then",
        pinned.display()
    )
}

/// The parameter check of [`check_params`] on one copy's JSON; the error names what was
/// found. With `reencrypt`, the header of an unfinished `keys rotate --reencrypt` (which
/// `check_params` refuses): up to four crypt segments (the new volume key's and the old one's,
/// and the backups of both), each meeting the same rules, one keyslot of type
/// `reencrypt` (its area a checksum, journal or nothing) beside the luks2 keyslots, and the
/// requirement `online-reencrypt-v2`.
fn check_params_json(json: &str, reencrypt: bool) -> std::result::Result<(), String> {
    use serde_json::Value;
    const CIPHER: &str = "aes-xts-plain64";
    let v: Value = serde_json::from_str(json).map_err(|e| format!("JSON does not parse ({e})"))?;
    let obj =
        |v: &Value, what: &str| -> std::result::Result<serde_json::Map<String, Value>, String> {
            v.get(what)
                .and_then(Value::as_object)
                .cloned()
                .ok_or_else(|| format!("JSON has no `{what}` object"))
        };
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64);
    let segments = obj(&v, "segments")?;
    if reencrypt {
        if !(1..=4).contains(&segments.len()) {
            return Err(format!(
                "JSON has {} segments during a re-encryption, e2ebackup's makes at most four",
                segments.len()
            ));
        }
    } else if segments.len() != 1 {
        return Err(format!(
            "JSON has {} segments, e2ebackup makes exactly one",
            segments.len()
        ));
    }
    for (id, s) in &segments {
        if text(s, "type") != "crypt" {
            return Err(format!(
                "segment {id} is of type {:?}, not crypt",
                text(s, "type")
            ));
        }
        if text(s, "encryption") != CIPHER {
            return Err(format!(
                "segment cipher is {}, e2ebackup only opens {CIPHER}",
                text(s, "encryption")
            ));
        }
        if num(s, "sector_size") != Some(4096) {
            return Err(format!(
                "segment sector size is {}, e2ebackup only opens 4096-byte sectors",
                s.get("sector_size").unwrap_or(&Value::Null)
            ));
        }
        if s.get("integrity").is_some() {
            return Err("segment has an integrity section, e2ebackup makes none".into());
        }
    }
    let keyslots = obj(&v, "keyslots")?;
    if keyslots.is_empty() {
        return Err("JSON has no keyslot".into());
    }
    let mut reencrypt_slots = 0;
    for (id, k) in &keyslots {
        if reencrypt && text(k, "type") == "reencrypt" {
            let area = text(k.get("area").unwrap_or(&Value::Null), "type");
            if !matches!(area.as_str(), "checksum" | "journal" | "none") {
                return Err(format!(
                    "re-encryption keyslot {id}'s area is of type {area:?}"
                ));
            }
            reencrypt_slots += 1;
            continue;
        }
        if text(k, "type") != "luks2" {
            return Err(format!(
                "keyslot {id} is of type {:?}, not luks2",
                text(k, "type")
            ));
        }
        if num(k, "key_size") != Some(64) {
            return Err(format!(
                "keyslot {id} holds a {}-bit volume key, e2ebackup only opens 512-bit keys",
                num(k, "key_size").map_or("?".to_string(), |n| (n * 8).to_string())
            ));
        }
        let area = k.get("area").unwrap_or(&Value::Null);
        if text(area, "encryption") != CIPHER || num(area, "key_size") != Some(64) {
            return Err(format!(
                "keyslot {id}'s area cipher is {} with a {}-byte key, e2ebackup only opens {CIPHER} with 64",
                text(area, "encryption"),
                area.get("key_size").unwrap_or(&Value::Null)
            ));
        }
        let kdf = k.get("kdf").unwrap_or(&Value::Null);
        match text(kdf, "type").as_str() {
            "pbkdf2"
                if matches!(text(kdf, "hash").as_str(), "sha256" | "sha512")
                    && num(kdf, "iterations").is_some_and(|i| i >= 1000) => {}
            "argon2i" | "argon2id" => {}
            t => {
                return Err(format!(
                    "keyslot {id}'s KDF is {t:?} (hash {:?}, {} iterations), e2ebackup only opens \
                     pbkdf2 with sha256/sha512 and at least 1000 iterations, or argon2i/argon2id",
                    text(kdf, "hash"),
                    kdf.get("iterations").unwrap_or(&Value::Null)
                ))
            }
        }
    }
    let mandatory = v
        .get("config")
        .and_then(|c| c.get("requirements"))
        .and_then(|r| r.get("mandatory"))
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty());
    if reencrypt {
        let only_reencrypt = mandatory.is_some_and(|m| m.iter().all(is_reencrypt_requirement));
        if reencrypt_slots != 1 || !only_reencrypt {
            return Err(format!(
                "header does not record one re-encryption ({reencrypt_slots} re-encryption \
                 keyslots, requirements {mandatory:?})"
            ));
        }
        return Ok(());
    }
    if let Some(m) = mandatory {
        return Err(format!(
            "header has mandatory requirements {m:?} (an unfinished re-encryption?), e2ebackup opens none"
        ));
    }
    Ok(())
}

/// Write the header (and keyslots) of `device` to `dest` atomically, mode 0400.
pub fn backup_header(device: &Path, dest: &Path) -> Result<()> {
    install_logging();
    let tmp = PathBuf::from(format!("{}.tmp{}", dest.display(), std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut dev = CryptInit::init(device).map_err(lerr(format!("opening {}", device.display())))?;
    dev.context_handle()
        .load::<()>(Some(EncryptionFormat::Luks2), None)
        .map_err(lerr(format!(
            "reading the LUKS2 header of {}",
            device.display()
        )))?;
    dev.backup_handle()
        .header_backup(Some(EncryptionFormat::Luks2), &tmp)
        .map_err(lerr(format!(
            "backing up the header of {} to {}",
            device.display(),
            tmp.display()
        )))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o400))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dest).with_context(|| format!("renaming to {}", dest.display()))?;
    Ok(())
}

/// Read the size of one LUKS2 metadata copy (binary header + JSON) from its first bytes.
fn luks2_hdr_size(first: &[u8]) -> Option<u64> {
    if first.len() < 16 || first[..6] != *b"LUKS\xba\xbe" || first[6..8] != [0, 2] {
        return None;
    }
    Some(u64::from_be_bytes(first[8..16].try_into().ok()?))
}

/// Tamper check: the LUKS2 metadata on the server (both copies of the binary header and
/// JSON area: cipher, keyslot and segment definitions, digests) must be byte-identical to
/// the client's pinned header backup. A server could otherwise swap in weaker parameters or
/// a different volume. Activation then uses the client's copy (see [`open`]), so the
/// server's keyslot area is never trusted either.
pub fn verify_pinned_header(device: &Path, pinned: &Path) -> Result<()> {
    use std::io::Seek;
    let mut b = std::fs::File::open(pinned)
        .with_context(|| format!("opening pinned header {}", pinned.display()))?;
    let mut first = [0u8; 4096];
    b.read_exact(&mut first)
        .with_context(|| format!("reading pinned header {}", pinned.display()))?;
    let hdr = luks2_hdr_size(&first)
        .filter(|h| (4096..=4 << 20).contains(h))
        .ok_or_else(|| anyhow!("{} is not a LUKS2 header backup", pinned.display()))?;
    let n = (2 * hdr) as usize;
    let mut want = vec![0u8; n];
    b.rewind()?;
    b.read_exact(&mut want)?;
    let mut got = vec![0u8; n];
    let mut d =
        std::fs::File::open(device).with_context(|| format!("opening {}", device.display()))?;
    d.read_exact(&mut got)
        .with_context(|| format!("reading the LUKS2 header of {}", device.display()))?;
    if got != want {
        let first_diff = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
        return Err(crate::error::Failure::Security(format!(
            "the LUKS2 header of the container on the server differs from the pinned copy {} \
             (first difference at byte {first_diff}); refusing to open it. If the server's copy \
             was damaged, `cryptsetup luksHeaderRestore` with the pinned copy repairs it \
             (docs/operations.md)",
            pinned.display()
        ))
        .into());
    }
    Ok(())
}

/// Open `device` as `/dev/mapper/<name>`, recorded in `stack` (`CloseLuks` is pushed
/// first). With a pinned header, libcryptsetup reads the header (and keyslots) from the
/// client's copy and only the data from `device`.
pub fn open(
    stack: &mut Stack,
    device: &Path,
    header: Option<&Path>,
    name: &str,
    key: &Key,
    read_only: bool,
    discards: bool,
) -> Result<PathBuf> {
    if is_active(name) {
        bail!(
            "/dev/mapper/{name} is already open, but not by this command (see `e2ebackup status`)"
        );
    }
    stack.push(Undo::CloseLuks {
        name: name.into(),
        header: header.map(Path::to_path_buf),
    })?;
    let mut dev = load(device, header)?;
    let mut flags = CryptActivate::empty();
    if read_only {
        flags |= CryptActivate::READONLY;
    }
    if discards {
        flags |= CryptActivate::ALLOW_DISCARDS;
    }
    dev.activate_handle()
        .activate_by_passphrase(Some(name), None, key.bytes(), flags)
        .map_err(lerr(format!(
            "unlocking {} with the keyfile (wrong keyfile, or a damaged header?)",
            device.display()
        )))?;
    Ok(PathBuf::from(format!("/dev/mapper/{name}")))
}

/// A libcryptsetup context for `device` with its LUKS2 header loaded (from the pinned
/// `header` file when given: then only the data is read from `device`).
fn load(device: &Path, header: Option<&Path>) -> Result<libcryptsetup_rs::CryptDevice> {
    load_checked(device, header, false)
}

/// [`load`]; with `reencrypt`, of a header that records an unfinished re-encryption.
fn load_checked(
    device: &Path,
    header: Option<&Path>,
    reencrypt: bool,
) -> Result<libcryptsetup_rs::CryptDevice> {
    install_logging();
    if let Some(h) = header {
        check_pinned(h, reencrypt)?;
    }
    let mut dev = match header {
        Some(h) => CryptInit::init_with_data_device(Either::Right((h, device))),
        None => CryptInit::init(device),
    }
    .map_err(lerr(format!("opening {}", device.display())))?;
    dev.context_handle()
        .load::<()>(Some(EncryptionFormat::Luks2), None)
        .map_err(lerr(format!(
            "{} holds no readable LUKS2 header",
            device.display()
        )))?;
    Ok(dev)
}

/// Which keyslot `key` opens on `device` (with the pinned `header`): a test activation,
/// no mapping is created. What `keys verify` checks.
pub fn keyslot_for(device: &Path, header: Option<&Path>, key: &Key) -> Result<u32> {
    // A test activation of a header that records an unfinished re-encryption is allowed
    // (`recover-key` on a client rebuilt in the middle of one): nothing is mapped.
    let reencrypt = match header {
        Some(h) => reencrypt_unfinished(h)?,
        None => false,
    };
    load_checked(device, header, reencrypt)?
        .activate_handle()
        .activate_by_passphrase(None, None, key.bytes(), CryptActivate::empty())
        .map_err(lerr("the keyfile does not open the container".to_string()))
}

/// Read-ahead of the opened mapping, in KiB (the kernel's default is 128). Every read
/// travels dm-crypt -> direct-I/O loop -> sshfs -> SSH: a larger window is split into
/// requests that cross the connection together instead of one round trip after another.
/// Measured with vm-tests/bench/readahead.sh (docs/benchmarks.md).
pub const READ_AHEAD_KIB: u32 = 2048;

/// Set the read-ahead of the block device `dev` (a tuning: the caller only warns on error).
/// Found by device number under /sys/dev/block, which works without udev's symlinks.
pub fn set_read_ahead(dev: &Path, kib: u32) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dev).with_context(|| format!("stat {}", dev.display()))?;
    if !m.file_type().is_block_device() {
        bail!("{} is not a block device", dev.display());
    }
    let (major, minor) = (
        nix::sys::stat::major(m.rdev()),
        nix::sys::stat::minor(m.rdev()),
    );
    let knob = format!("/sys/dev/block/{major}:{minor}/queue/read_ahead_kb");
    std::fs::write(&knob, kib.to_string()).with_context(|| format!("writing {knob}"))?;
    debug!("{}: read_ahead_kb {kib}", dev.display());
    Ok(())
}

/// Grow the active mapping `name` to fill its (grown) underlying device. LUKS2 keeps the
/// volume key in the kernel keyring, not in the dm table, so libcryptsetup needs the key
/// again: unlocking without a name loads it into the context, then resize uses it.
pub fn resize_to_fill(name: &str, header: Option<&Path>, key: &Key) -> Result<()> {
    install_logging();
    let mut dev = CryptInit::init_by_name_and_header(name, header)
        .map_err(lerr(format!("finding the active mapping {name}")))?;
    dev.activate_handle()
        .activate_by_passphrase(None, None, key.bytes(), CryptActivate::KEYRING_KEY)
        .map_err(lerr(format!("loading the volume key of {name}")))?;
    dev.context_handle()
        .resize(name, 0)
        .map_err(lerr(format!("resizing {name}")))?;
    Ok(())
}

/// Where the encrypted data of the active mapping `name` starts in its underlying device, in
/// bytes (the LUKS2 data segment's offset; the mapping is linear from there: byte `x` of the
/// mapping is stored at byte `x + offset` of the device).
pub fn data_offset(name: &str, header: Option<&Path>) -> Result<u64> {
    install_logging();
    let mut dev = CryptInit::init_by_name_and_header(name, header)
        .map_err(lerr(format!("finding the active mapping {name}")))?;
    Ok(dev.status_handle().get_data_offset() * 512)
}

/// Whether the mapping `name` exists.
pub fn is_active(name: &str) -> bool {
    install_logging();
    matches!(
        libcryptsetup_rs::status(None, name),
        Ok(CryptStatusInfo::Active) | Ok(CryptStatusInfo::Busy)
    )
}

/// Ensure the mapping `name` is closed; retries while busy. libcryptsetup loads the LUKS2
/// metadata to close a mapping: from `header` (the pinned copy the mapping was opened with)
/// when it is there, which saves reading it from the container across the network, a
/// few serial round trips (run 12 in docs/benchmarks.md); else from the device.
pub fn ensure_closed(name: &str, header: Option<&Path>) -> Result<()> {
    install_logging();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if !is_active(name) {
            // A process killed while libcryptsetup activated the mapping can leave the
            // device-mapper device created but without its crypt table: libcryptsetup does
            // not call that active and cannot deactivate it. Removed directly.
            if !dm_device_exists(name) {
                return Ok(());
            }
            match dm_remove(name) {
                Ok(()) => continue,
                Err(e) if Instant::now() < deadline => {
                    debug!("removing the incomplete mapping {name}: {e:#}; retrying");
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        let close = |h: Option<&Path>| {
            CryptInit::init_by_name_and_header(name, h).and_then(|mut d| {
                d.activate_handle()
                    .deactivate(name, CryptDeactivate::empty())
            })
        };
        let r = match header.filter(|h| h.is_file()) {
            Some(h) => close(Some(h)).or_else(|e| {
                debug!(
                    "closing {name} with the header {}: {e}; with the device's own",
                    h.display()
                );
                close(None)
            }),
            None => close(None),
        };
        match r {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                debug!("closing {name}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => bail!("closing LUKS mapping {name}: {e} (still mounted or open?)"),
        }
    }
}

/// Whether a device-mapper device called `name` exists, whatever its table (sysfs).
fn dm_device_exists(name: &str) -> bool {
    std::fs::read_dir("/sys/block")
        .map(|rd| {
            rd.flatten().any(|e| {
                std::fs::read_to_string(e.path().join("dm/name"))
                    .is_ok_and(|n| n.trim_end_matches('\n') == name)
            })
        })
        .unwrap_or(false)
}

/// struct dm_ioctl of linux/dm-ioctl.h (interface version 4).
#[repr(C)]
struct DmIoctl {
    version: [u32; 3],
    data_size: u32,
    data_start: u32,
    target_count: u32,
    open_count: i32,
    flags: u32,
    event_nr: u32,
    padding: u32,
    dev: u64,
    name: [u8; 128],
    uuid: [u8; 129],
    data: [u8; 7],
}

/// DM_DEV_REMOVE: _IOWR(0xfd, 4, struct dm_ioctl).
const DM_DEV_REMOVE: libc::c_ulong = 0xC138_FD04;

/// Remove the device-mapper device `name` (DM_DEV_REMOVE on /dev/mapper/control): what
/// `dmsetup remove` does, for a device libcryptsetup will not touch.
fn dm_remove(name: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    let b = name.as_bytes();
    anyhow::ensure!(
        !b.is_empty() && b.len() < 128,
        "mapping name {name:?} out of range"
    );
    let ctl = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")
        .context("opening /dev/mapper/control")?;
    let mut io = DmIoctl {
        version: [4, 0, 0],
        data_size: std::mem::size_of::<DmIoctl>() as u32,
        data_start: std::mem::size_of::<DmIoctl>() as u32,
        target_count: 0,
        open_count: 0,
        flags: 0,
        event_nr: 0,
        padding: 0,
        dev: 0,
        name: [0; 128],
        uuid: [0; 129],
        data: [0; 7],
    };
    io.name[..b.len()].copy_from_slice(b);
    // SAFETY: DM_DEV_REMOVE reads and writes a struct dm_ioctl of data_size bytes, which
    // `io` is and which outlives the call.
    let r = unsafe { libc::ioctl(ctl.as_raw_fd(), DM_DEV_REMOVE, &mut io as *mut DmIoctl) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(()); // gone meanwhile
        }
        return Err(e).with_context(|| format!("removing the device-mapper device {name}"));
    }
    debug!("removed the incomplete device-mapper device {name}");
    Ok(())
}

/// `keys rotate`: on `device`'s own header (the server's: the caller re-pins it after), add a
/// keyslot for `new`, authorised by `old`, with the same PBKDF as [`format`]'s, then destroy
/// the keyslot `old` opens. The volume key stays. Returns (old slot, new slot).
pub fn change_key(device: &Path, old: &Key, new: &Key) -> Result<(u32, u32)> {
    let (mut dev, old_slot) = for_new_keyslot(device, None, old)?;
    let new_slot = dev
        .keyslot_handle()
        .add_by_passphrase(None, old.bytes(), new.bytes())
        .map_err(lerr(format!(
            "adding the new keyfile's keyslot on {}",
            device.display()
        )))?;
    dev.keyslot_handle()
        .destroy(old_slot)
        .map_err(lerr(format!(
            "removing keyslot {old_slot} (the old keyfile's) on {}",
            device.display()
        )))?;
    Ok((old_slot, new_slot))
}

/// The largest hot zone of `keys rotate --reencrypt`: the data libcryptsetup rewrites in one
/// step, between two header writes. The client's header copy is written to the server
/// after every step ([`HeaderMirror`]), so the server's copy lags by at most one hot zone.
pub const REENCRYPT_HOTZONE_BYTES: u64 = 8 << 20;

/// Whether the pinned header records an unfinished `keys rotate --reencrypt`.
pub fn reencrypt_unfinished(pinned: &Path) -> Result<bool> {
    let (b, _) = crate::fsutil::read_local_bounded(pinned, 64 << 20)
        .with_context(|| format!("reading the pinned header {}", pinned.display()))?;
    let jsons =
        header_jsons(&b).map_err(|e| anyhow!("the pinned header {}: {e}", pinned.display()))?;
    Ok(jsons.iter().any(|(_, j)| reencrypt_required(j)))
}

/// `keys rotate --reencrypt`, first half: on the pinned header (the client's copy, used as
/// a detached header: libcryptsetup keeps the re-encryption's progress there, never on the
/// server), add a keyslot for `key` holding a new random volume key, and record a
/// re-encryption from the current volume key to it (aes-xts-plain64, 4096-byte sectors,
/// checksum resilience). Nothing of the data is touched yet; [`reencrypt_run`] does that.
/// `device` must not be open (an offline re-encryption).
pub fn reencrypt_start(device: &Path, pinned: &Path, key: &Key) -> Result<()> {
    use libcryptsetup_rs::consts::flags::CryptReencrypt;
    let (mut dev, old_slot) = for_new_keyslot(device, Some(pinned), key)?;
    let new_slot = dev
        .keyslot_handle()
        .add_by_key(
            None,
            Some(Either::Right(64)),
            key.bytes(),
            CryptVolumeKey::NO_SEGMENT,
        )
        .map_err(lerr(format!(
            "adding a keyslot with a new volume key to {}",
            pinned.display()
        )))?;
    dev.reencrypt_handle()
        .reencrypt_init_by_passphrase(
            None,
            key.bytes(),
            Some(old_slot),
            Some(new_slot),
            Some(("aes", "xts-plain64")),
            reencrypt_params(CryptReencrypt::INITIALIZE_ONLY),
        )
        .map_err(lerr(format!(
            "recording the re-encryption in {}",
            pinned.display()
        )))?;
    debug!("re-encryption recorded: keyslot {old_slot} -> {new_slot} (a new volume key)");
    Ok(())
}

/// The LUKS2 parameters of [`format`] and of a re-encryption's new segment: 4096-byte
/// sectors, no integrity, [`keyfile_pbkdf`].
fn luks2_params(label: Option<&str>) -> CryptParamsLuks2 {
    CryptParamsLuks2 {
        pbkdf: Some(keyfile_pbkdf()),
        integrity: None,
        integrity_params: None,
        data_alignment: 0,
        data_device: None,
        sector_size: 4096,
        label: label.map(str::to_string),
        subsystem: None,
    }
}

/// `device` (with `header`) loaded to add a keyslot: the keyslot that `key` opens (a test
/// activation), and [`keyfile_pbkdf`] set for the new one.
fn for_new_keyslot(
    device: &Path,
    header: Option<&Path>,
    key: &Key,
) -> Result<(libcryptsetup_rs::CryptDevice, u32)> {
    let mut dev = load(device, header)?;
    let slot = dev
        .activate_handle()
        .activate_by_passphrase(None, None, key.bytes(), CryptActivate::empty())
        .map_err(lerr(format!(
            "the current keyfile does not open {}{}",
            device.display(),
            header.map_or(String::new(), |h| format!(
                " with the header {}",
                h.display()
            ))
        )))?;
    dev.settings_handle()
        .set_pbkdf_type(&keyfile_pbkdf())
        .map_err(lerr("setting the keyslot's PBKDF".into()))?;
    Ok((dev, slot))
}

/// The PBKDF of the keyfile's keyslots ([`format`]'s): PBKDF2-SHA256, 1000 iterations.
fn keyfile_pbkdf() -> CryptPbkdfType {
    CryptPbkdfType {
        type_: CryptKdf::Pbkdf2,
        hash: Some("sha256".into()),
        time_ms: 0,
        iterations: 1000,
        max_memory_kb: 0,
        parallel_threads: 0,
        flags: CryptPbkdf::NO_BENCHMARK,
    }
}

fn reencrypt_params(
    flags: libcryptsetup_rs::consts::flags::CryptReencrypt,
) -> libcryptsetup_rs::CryptParamsReencrypt {
    use libcryptsetup_rs::consts::vals::{CryptReencryptDirectionInfo, CryptReencryptModeInfo};
    libcryptsetup_rs::CryptParamsReencrypt {
        mode: CryptReencryptModeInfo::Reencrypt,
        direction: CryptReencryptDirectionInfo::Forward,
        resilience: "checksum".into(),
        hash: "sha256".into(),
        data_shift: 0,
        max_hotzone_size: REENCRYPT_HOTZONE_BYTES / 512,
        device_size: 0,
        luks2: Some(luks2_params(None)),
        flags,
    }
}

/// `keys rotate --reencrypt`, second half: re-encrypt the data of `device` as the pinned
/// header records it ([`reencrypt_start`]), from where an earlier run stopped (after a
/// crash, libcryptsetup first repairs the hot zone from its checksums). `step(done, total)`
/// is called after every hot zone, in bytes; when it returns false the re-encryption
/// stops there, its progress recorded in the pinned header. Returns whether it finished:
/// then the pinned header holds the new volume key only (the old key's keyslots are
/// destroyed) and no longer records a re-encryption.
pub fn reencrypt_run(
    device: &Path,
    pinned: &Path,
    key: &Key,
    step: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<bool> {
    use libcryptsetup_rs::consts::flags::CryptReencrypt;
    let mut dev = load_checked(device, Some(pinned), true)?;
    dev.reencrypt_handle()
        .reencrypt_init_by_passphrase(
            None,
            key.bytes(),
            None,
            None,
            None,
            reencrypt_params(CryptReencrypt::RESUME_ONLY),
        )
        .map_err(lerr(format!(
            "resuming the re-encryption recorded in {}",
            pinned.display()
        )))?;
    /// libcryptsetup's progress callback: the caller's `step`, never unwinding into C.
    unsafe extern "C" fn progress(size: u64, offset: u64, usr: *mut c_void) -> c_int {
        // SAFETY: `usr` is the `&mut &mut dyn FnMut` passed to reencrypt2 below, alive
        // for the whole call, and libcryptsetup calls back on this thread only.
        let step = unsafe { &mut *(usr as *mut &mut dyn FnMut(u64, u64) -> bool) };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| step(offset, size))) {
            Ok(true) => 0,
            _ => 1,
        }
    }
    let mut step = step;
    dev.reencrypt_handle()
        .reencrypt2(Some(progress), Some(&mut step))
        .map_err(lerr(format!("re-encrypting {}", device.display())))?;
    drop(dev);
    Ok(!reencrypt_unfinished(pinned)?)
}

/// The client's header copy, written over the header area of the server's container
/// (before the data, which starts at [`HEADER_BYTES`]), so that the server holds a header
/// that opens the container with the escrowed keyfile while the client's changes it (`keys
/// rotate --reencrypt`). Only the 4 KiB blocks that changed since the last write are sent.
pub struct HeaderMirror {
    device: std::fs::File,
    shown: PathBuf,
    last: Option<Vec<u8>>,
}

impl HeaderMirror {
    pub fn new(device: &Path) -> Result<HeaderMirror> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(device)
            .with_context(|| format!("opening {} to write its header", device.display()))?;
        Ok(HeaderMirror {
            device: f,
            shown: device.to_path_buf(),
            last: None,
        })
    }

    /// Write `pinned`'s bytes where they differ from the last write (all of them the first
    /// time); returns the bytes written.
    pub fn write(&mut self, pinned: &Path) -> Result<u64> {
        use std::os::unix::fs::FileExt;
        // At most HEADER_BYTES: pinned_bytes refuses a larger file.
        let b = pinned_bytes(pinned)?;
        let mut written = 0;
        for (i, chunk) in b.chunks(4096).enumerate() {
            let at = i * 4096;
            let same = self
                .last
                .as_ref()
                .is_some_and(|l| l.get(at..at + chunk.len()) == Some(chunk));
            if !same {
                self.device
                    .write_all_at(chunk, at as u64)
                    .with_context(|| format!("writing the header to {}", self.shown.display()))?;
                written += chunk.len() as u64;
            }
        }
        self.device
            .sync_data()
            .with_context(|| format!("flushing the header to {}", self.shown.display()))?;
        self.last = Some(b);
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dm_ioctl_matches_the_kernel_header() {
        // sizeof(struct dm_ioctl) is 312 on every Linux ABI; the ioctl number encodes it.
        assert_eq!(std::mem::size_of::<DmIoctl>(), 312);
        assert_eq!(DM_DEV_REMOVE, (3 << 30) | (312 << 16) | (0xfd << 8) | 4);
        assert!(!dm_device_exists("e2ebackup-no-such-mapping-at-all"));
        // Names the kernel cannot hold are refused before /dev/mapper/control is opened.
        assert!(format!("{:#}", dm_remove("").unwrap_err()).contains("out of range"));
        assert!(format!("{:#}", dm_remove(&"x".repeat(128)).unwrap_err()).contains("out of range"));
    }

    #[test]
    fn read_ahead_needs_a_block_device() {
        let e = format!(
            "{:#}",
            set_read_ahead(Path::new("/dev/null"), 2048).unwrap_err()
        );
        assert!(e.contains("/dev/null is not a block device"), "{e}");
    }

    #[test]
    fn header_size_parsing() {
        let mut h = vec![0u8; 16];
        h[..6].copy_from_slice(b"LUKS\xba\xbe");
        h[7] = 2;
        h[8..16].copy_from_slice(&16384u64.to_be_bytes());
        assert_eq!(luks2_hdr_size(&h), Some(16384));
        h[7] = 1;
        assert_eq!(luks2_hdr_size(&h), None);
        assert_eq!(luks2_hdr_size(b"not luks at all!"), None);
    }

    #[test]
    fn keyfile_read_whole_and_refused_when_exposed() {
        let d = tempfile::tempdir().unwrap();
        let kf = d.path().join("k");
        let bytes: Vec<u8> = (0..4096u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&kf, &bytes).unwrap();
        std::fs::set_permissions(&kf, std::fs::Permissions::from_mode(0o400)).unwrap();
        let k = read_keyfile(&kf).unwrap();
        assert_eq!(k.bytes(), &bytes[..]);
        assert_eq!(k.0.capacity(), 4096, "one buffer of the file's size");
        std::fs::set_permissions(&kf, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_keyfile(&kf).unwrap_err();
        assert_eq!(crate::error::exit_for(&e), crate::error::Exit::Usage);
        assert!(
            format!("{e}").contains("accessible to group or others"),
            "{e}"
        );
        // A FIFO is refused at once (no wait for a writer), as is a directory.
        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(format!("{}", read_keyfile(&fifo).unwrap_err()).contains("not a regular file"));
        assert!(format!("{}", read_keyfile(d.path()).unwrap_err()).contains("not a regular file"));
        assert!(
            format!("{:#}", read_keyfile(&d.path().join("none")).unwrap_err())
                .contains("does not exist: run `e2ebackup init PROFILE` first")
        );
    }

    /// The JSON metadata of a container `init` makes (cryptsetup 2.6, luksDump
    /// --dump-json-metadata), salts and digest shortened.
    const INIT_JSON: &str = r#"{"keyslots":{"0":{"type":"luks2","key_size":64,"af":{"type":"luks1","stripes":4000,"hash":"sha256"},"area":{"type":"raw","offset":"32768","size":"258048","encryption":"aes-xts-plain64","key_size":64},"kdf":{"type":"pbkdf2","hash":"sha256","iterations":1000,"salt":"c2FsdA=="}}},"tokens":{},"segments":{"0":{"type":"crypt","offset":"2097152","size":"dynamic","iv_tweak":"0","encryption":"aes-xts-plain64","sector_size":4096}},"digests":{"0":{"type":"pbkdf2","keyslots":["0"],"segments":["0"],"hash":"sha256","iterations":1000,"salt":"c2FsdA==","digest":"ZGlnZXN0"}},"config":{"json_size":"12288","keyslots_size":"1015808"}}"#;

    /// A header backup as libcryptsetup writes it: two copies of `hdr` bytes (binary header
    /// then JSON), each with its magic, version, size and offset; checksums are not checked.
    fn built_header(hdr: usize, json: [&str; 2]) -> Vec<u8> {
        let mut b = vec![0u8; 2 * hdr + 4096];
        for (copy, magic) in [(0usize, b"LUKS\xba\xbe"), (1, b"SKUL\xba\xbe")] {
            let at = copy * hdr;
            b[at..at + 6].copy_from_slice(magic);
            b[at + 7] = 2;
            b[at + 8..at + 16].copy_from_slice(&(hdr as u64).to_be_bytes());
            b[at + 256..at + 264].copy_from_slice(&(at as u64).to_be_bytes());
            b[at + 4096..at + 4096 + json[copy].len()].copy_from_slice(json[copy].as_bytes());
        }
        b
    }

    #[test]
    fn params_of_an_init_header_pass() {
        check_params_json(INIT_JSON, false).unwrap();
        // A passphrase slot added by hand (argon2id) is accepted too.
        let j = INIT_JSON.replace(
            r#""kdf":{"type":"pbkdf2","hash":"sha256","iterations":1000,"#,
            r#""kdf":{"type":"argon2id","time":4,"memory":1048576,"cpus":2,"#,
        );
        check_params_json(&j, false).unwrap();
    }

    /// A header during `keys rotate --reencrypt` (cryptsetup 2.6, after the first hot zone):
    /// the new volume key's keyslot 1, the re-encryption keyslot 2, four segments.
    fn reencrypt_json() -> String {
        let slot1 = r#""1":{"type":"luks2","key_size":64,"af":{"type":"luks1","stripes":4000,"hash":"sha256"},"area":{"type":"raw","offset":"290816","size":"258048","encryption":"aes-xts-plain64","key_size":64},"kdf":{"type":"pbkdf2","hash":"sha256","iterations":1000,"salt":"c2FsdA=="}},"2":{"area":{"offset":"548864","size":"499712","type":"checksum","hash":"sha256","sector_size":4096},"type":"reencrypt","key_size":1,"mode":"reencrypt","direction":"forward","priority":0}},"tokens""#;
        let seg = |id: u32, offset: &str, size: &str, flag: &str| {
            format!(
                r#""{id}":{{"type":"crypt","offset":"{offset}","size":"{size}","iv_tweak":"0","encryption":"aes-xts-plain64","sector_size":4096{flag}}}"#
            )
        };
        let segments = [
            seg(0, "2097152", "8388608", ""),
            seg(1, "10485760", "dynamic", ""),
            seg(2, "2097152", "dynamic", r#","flags":["backup-previous"]"#),
            seg(3, "2097152", "dynamic", r#","flags":["backup-final"]"#),
        ]
        .join(",");
        let j = INIT_JSON
            .replacen(r#"}}},"tokens""#, &format!("}}}},{slot1}"), 1)
            .replacen(
                r#""segments":{"0":{"type":"crypt","offset":"2097152","size":"dynamic","iv_tweak":"0","encryption":"aes-xts-plain64","sector_size":4096}}"#,
                &format!(r#""segments":{{{segments}}}"#),
                1,
            )
            .replacen(
                r#""keyslots_size":"1015808"}"#,
                r#""keyslots_size":"1015808","requirements":{"mandatory":["online-reencrypt-v2"]}}"#,
                1,
            );
        assert!(
            j.contains("backup-final")
                && j.contains(r#""type":"reencrypt""#)
                && j.contains("requirements"),
            "{j}"
        );
        j
    }

    #[test]
    fn params_of_an_unfinished_reencryption() {
        let j = reencrypt_json();
        assert!(reencrypt_required(&j) && !reencrypt_required(INIT_JSON));
        check_params_json(&j, true).unwrap();
        // Every other command refuses it (check_params names `keys rotate --reencrypt`).
        assert!(check_params_json(&j, false)
            .unwrap_err()
            .contains("JSON has 4 segments"));
        // The same rules hold for every segment during the re-encryption...
        let forged = j.replacen(
            r#""10485760","size":"dynamic","iv_tweak":"0","encryption":"aes-xts-plain64""#,
            r#""10485760","size":"dynamic","iv_tweak":"0","encryption":"cipher_null-ecb""#,
            1,
        );
        assert_ne!(forged, j);
        let e = check_params_json(&forged, true).unwrap_err();
        assert!(e.contains("segment cipher is cipher_null-ecb"), "{e}");
        // ...and a header that records no re-encryption is not taken for one.
        let e = check_params_json(INIT_JSON, true).unwrap_err();
        assert!(e.contains("does not record one re-encryption"), "{e}");
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("h");
        std::fs::write(&f, built_header(16384, [&j, &j])).unwrap();
        assert!(reencrypt_unfinished(&f).unwrap());
        let e = format!("{:#}", check_params(&f).unwrap_err());
        assert!(
            e.contains("records an unfinished `keys rotate --reencrypt`"),
            "{e}"
        );
        check_pinned(&f, true).unwrap();
    }

    #[test]
    fn params_refused_name_what_was_found() {
        let cases = [
            (
                r#""sector_size":4096}},"digests""#.to_string(),
                r#""sector_size":512}},"digests""#.to_string(),
                "segment sector size is 512, e2ebackup only opens 4096-byte sectors",
            ),
            (
                r#""iv_tweak":"0","encryption":"aes-xts-plain64""#.into(),
                r#""iv_tweak":"0","encryption":"cipher_null-ecb""#.into(),
                "segment cipher is cipher_null-ecb, e2ebackup only opens aes-xts-plain64",
            ),
            (
                r#"{"type":"luks2","key_size":64,"#.into(),
                r#"{"type":"luks2","key_size":32,"#.into(),
                "keyslot 0 holds a 256-bit volume key, e2ebackup only opens 512-bit keys",
            ),
            (
                r#""size":"258048","encryption":"aes-xts-plain64""#.into(),
                r#""size":"258048","encryption":"cipher_null-ecb""#.into(),
                "keyslot 0's area cipher is cipher_null-ecb",
            ),
            (
                r#""hash":"sha256","iterations":1000,"salt":"c2FsdA=="}}}"#.into(),
                r#""hash":"md5","iterations":1000,"salt":"c2FsdA=="}}}"#.into(),
                r#"keyslot 0's KDF is "pbkdf2" (hash "md5", 1000 iterations)"#,
            ),
            (
                r#""keyslots_size":"1015808"}"#.into(),
                r#""keyslots_size":"1015808","requirements":{"mandatory":["online-reencrypt-v2"]}}"#
                    .into(),
                "mandatory requirements",
            ),
            (
                r#""sector_size":4096}},"#.into(),
                r#""sector_size":4096},"1":{"type":"crypt","offset":"4194304","size":"dynamic","iv_tweak":"0","encryption":"aes-xts-plain64","sector_size":4096}},"#.into(),
                "JSON has 2 segments, e2ebackup makes exactly one",
            ),
        ];
        for (from, to, want) in cases {
            let j = INIT_JSON.replacen(&from, &to, 1);
            assert_ne!(j, INIT_JSON, "the case {want:?} changed nothing");
            let e = check_params_json(&j, false).unwrap_err();
            assert!(e.contains(want), "{want:?} not in {e:?}");
        }
        assert!(check_params_json("{", false)
            .unwrap_err()
            .contains("does not parse"));
    }

    #[test]
    fn params_checked_in_both_copies_of_a_header_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("h");
        let forged = INIT_JSON.replacen(
            r#""iv_tweak":"0","encryption":"aes-xts-plain64""#,
            r#""iv_tweak":"0","encryption":"cipher_null-ecb""#,
            1,
        );
        std::fs::write(&f, built_header(16384, [INIT_JSON, INIT_JSON])).unwrap();
        check_params(&f).unwrap();
        for (json, second) in [
            ([&*forged, INIT_JSON], false),
            ([INIT_JSON, &*forged], true),
        ] {
            std::fs::write(&f, built_header(16384, json)).unwrap();
            let e = check_params(&f).unwrap_err();
            assert_eq!(crate::error::exit_for(&e), crate::error::Exit::Security);
            let m = format!("{e}");
            assert!(m.contains("segment cipher is cipher_null-ecb"), "{m}");
            assert_eq!(m.contains("second metadata copy"), second, "{m}");
        }
        // A second copy whose binary header is not one (wrong magic) is refused too.
        let mut b = built_header(16384, [INIT_JSON, INIT_JSON]);
        b[16384] = b'X';
        std::fs::write(&f, &b).unwrap();
        let m = format!("{}", check_params(&f).unwrap_err());
        assert!(m.contains("metadata copy 2 has a bad binary header"), "{m}");
        std::fs::write(&f, b"not a header").unwrap();
        let m = format!("{}", check_params(&f).unwrap_err());
        assert!(m.contains("is not a LUKS2 header"), "{m}");
    }

    /// Real libcryptsetup: the header `init` makes on the client has the parameters every
    /// open requires, the data where the container's data starts, the fixed label, and its
    /// first bytes are what is written to the server.
    #[test]
    #[ignore = "needs root (libcryptsetup); run as root with --include-ignored, as CI does"]
    fn host_format_on_client_pins_what_init_chose() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("h.format");
        let pinned = d.path().join("h.new");
        let key = Key(vec![9u8; 4096]);
        format_on_client(&img, &pinned, &key).unwrap();
        assert!(!img.exists(), "the formatting image is removed");
        check_params(&pinned).unwrap();
        let b = pinned_bytes(&pinned).unwrap();
        let json = header_jsons(&b).unwrap()[0].1.to_string();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["segments"]["0"]["offset"], HEADER_BYTES.to_string());
        assert_eq!(
            &b[24..24 + LABEL.len() + 1],
            format!("{LABEL}\0").as_bytes()
        );
        // The keyfile opens it (a test activation reads only the header and keyslots).
        let data = d.path().join("c");
        std::fs::write(&data, &b).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&data)
            .unwrap()
            .set_len(HEADER_BYTES + (8 << 20))
            .unwrap();
        verify_pinned_header(&data, &pinned).unwrap();
        assert_eq!(keyslot_for(&data, Some(&pinned), &key).unwrap(), 0);
    }

    /// Real libcryptsetup on a file (it attaches its own loop device; no dm-crypt needed to
    /// format or back up a header): the pinned check passes on the untouched container and
    /// refuses one with a single flipped byte in its JSON area.
    #[test]
    #[ignore = "needs root and loop devices; run as root with --include-ignored, as CI does"]
    fn host_pinned_header_detects_a_flipped_byte() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("c.luks");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        let key = Key(vec![7u8; 64]);
        format(&img, &key, LABEL).unwrap();
        let pinned = d.path().join("c.header");
        backup_header(&img, &pinned).unwrap();
        verify_pinned_header(&img, &pinned).unwrap();
        let mut bytes = std::fs::read(&img).unwrap();
        bytes[4096 + 100] ^= 0x20;
        std::fs::write(&img, &bytes).unwrap();
        let e = verify_pinned_header(&img, &pinned).unwrap_err();
        assert_eq!(crate::error::exit_for(&e), crate::error::Exit::Security);
        assert!(
            format!("{e}").contains("differs from the pinned copy"),
            "{e}"
        );
    }
}
