//! Host test of `keys rotate --reencrypt`'s LUKS2 layer on a real loop device: a new volume
//! key for data that was encrypted with another, with the progress kept in a detached
//! header on the client and that header written over the device's header area after every
//! hot zone ([`luks::HeaderMirror`]); stopped after the first hot zone, then resumed.
//!
//! This host has no device-mapper, so nothing is mapped: the plaintext is encrypted and
//! decrypted again with cryptsetup's offline (userspace) encryption, which needs none. The
//! whole command, mapped, mounted and over sshfs, is vm-tests/scenarios/60-escrow.sh.
//!
//! Privileged (root): run with `--include-ignored --test-threads=1`.

mod common;

use std::path::Path;
use std::process::Command;

use e2ebackup::stack::luks;

/// Run cryptsetup, which must succeed; its stdout.
fn cryptsetup<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> Vec<u8> {
    let out = Command::new("cryptsetup").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "cryptsetup {args:?}: {}",
        common::show(&out)
    );
    out.stdout
}

/// A loop device over `file`, detached when dropped.
struct Loop(String);
impl Loop {
    fn attach(file: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup: {}", common::show(&out));
        Loop(String::from_utf8(out.stdout).unwrap().trim().to_string())
    }
}
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

const MIB: usize = 1 << 20;

#[test]
#[ignore = "needs root (loop devices); run as root with --include-ignored, as CI does"]
fn host_reencrypt_gives_a_new_volume_key_and_resumes() {
    let d = common::private_tempdir();
    let (file, pin, old_pin) = (
        d.path().join("container"),
        d.path().join("pinned.header"),
        d.path().join("old.header"),
    );
    // The container's layout: the header area (2 MiB, empty), then 40 MiB of data, which
    // takes five hot zones of 8 MiB.
    let plain = common::noise(40 * MIB, 7);
    let mut bytes = vec![0u8; luks::HEADER_BYTES as usize];
    bytes.extend_from_slice(&plain);
    std::fs::write(&file, &bytes).unwrap();
    let keyfile = d.path().join("key");
    let key = luks::create_keyfile(&keyfile).unwrap();
    let dev = Loop::attach(&file);
    let k = keyfile.to_str().unwrap();
    let devp = Path::new(&dev.0);
    // Encrypted in place with init's parameters, the header detached as the pinned copy is.
    cryptsetup(&[
        "reencrypt",
        "--encrypt",
        "-q",
        "--type",
        "luks2",
        "--header",
        pin.to_str().unwrap(),
        "--key-file",
        k,
        "--cipher",
        "aes-xts-plain64",
        "--key-size",
        "512",
        "--sector-size",
        "4096",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--luks2-metadata-size",
        "16k",
        "--luks2-keyslots-size",
        "1m",
        "--offset",
        "4096",
        &dev.0,
    ]);
    luks::check_params(&pin).expect("the encrypted container has init's parameters");
    std::fs::copy(&pin, &old_pin).unwrap();
    let cipher_before = std::fs::read(&file).unwrap()[luks::HEADER_BYTES as usize..].to_vec();
    assert_ne!(cipher_before, plain, "encrypted");
    assert!(!luks::reencrypt_unfinished(&pin).unwrap());

    luks::reencrypt_start(devp, &pin, &key).unwrap();
    assert!(luks::reencrypt_unfinished(&pin).unwrap());
    let e = format!("{:#}", luks::check_params(&pin).unwrap_err());
    assert!(
        e.contains("records an unfinished `keys rotate --reencrypt`"),
        "{e}"
    );
    // Stopped after the first hot zone: the header records it, the server's copy follows.
    // libcryptsetup calls back once before it starts, then after each hot zone with where
    // that hot zone began.
    let mut mirror = luks::HeaderMirror::new(devp).unwrap();
    assert!(
        mirror.write(&pin).unwrap() > luks::METADATA_BYTES,
        "first write: all of it"
    );
    let mut calls = Vec::new();
    let finished = luks::reencrypt_run(devp, &pin, &key, &mut |done, total| {
        calls.push((done, total));
        mirror.write(&pin).unwrap();
        calls.len() < 2
    })
    .unwrap();
    assert!(!finished, "stopped after {calls:?}");
    assert!(luks::reencrypt_unfinished(&pin).unwrap());
    assert_eq!(calls, [(0, plain.len() as u64); 2]);
    let done_first = luks::REENCRYPT_HOTZONE_BYTES;
    luks::verify_pinned_header(devp, &pin).expect("the device's header follows the pin");
    let now = std::fs::read(&file).unwrap();
    let data = &now[luks::HEADER_BYTES as usize..];
    let changed: Vec<usize> = data
        .chunks(MIB)
        .zip(cipher_before.chunks(MIB))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        changed,
        (0..(done_first as usize / MIB)).collect::<Vec<_>>(),
        "only the first hot zone ({done_first} bytes) was rewritten, MiB by MiB: {calls:?}"
    );

    // Resumed: from where it stopped, to the end.
    let mut calls = Vec::new();
    let mut mirrored = 0;
    let finished = luks::reencrypt_run(devp, &pin, &key, &mut |done, total| {
        calls.push((done, total));
        mirrored += mirror.write(&pin).unwrap();
        true
    })
    .unwrap();
    assert!(finished, "{calls:?}");
    assert_eq!(
        calls.first().unwrap().0,
        done_first,
        "resumed where it stopped: {calls:?}"
    );
    assert!(
        mirrored < (calls.len() as u64) * (luks::HEADER_BYTES / 4),
        "only the changed blocks of the header are written: {mirrored} bytes for {} steps",
        calls.len()
    );
    mirror.write(&pin).unwrap();
    assert!(!luks::reencrypt_unfinished(&pin).unwrap());
    luks::check_params(&pin).expect("a finished re-encryption leaves init's parameters");
    luks::verify_pinned_header(devp, &pin).unwrap();
    luks::keyslot_for(devp, Some(&pin), &key).expect("the keyfile opens the new header");
    let json = |h: &Path| -> serde_json::Value {
        let dump = cryptsetup(&[
            "luksDump".as_ref(),
            "--dump-json-metadata".as_ref(),
            h.as_os_str(),
        ]);
        serde_json::from_slice(&dump).unwrap()
    };
    let (new_j, old_j) = (json(&pin), json(&old_pin));
    assert_eq!(new_j["keyslots"].as_object().unwrap().len(), 1, "{new_j}");
    assert_eq!(new_j["segments"].as_object().unwrap().len(), 1, "{new_j}");
    assert_ne!(
        new_j["digests"], old_j["digests"],
        "a different volume key has a different digest"
    );

    // Every byte changed ciphertext; decrypted with the new header it is the plaintext, with
    // the old header (a copy the server kept) and the same keyfile it is not.
    let cipher_after = std::fs::read(&file).unwrap()[luks::HEADER_BYTES as usize..].to_vec();
    let same = cipher_after
        .chunks(4096)
        .zip(cipher_before.chunks(4096))
        .filter(|(a, b)| a == b)
        .count();
    assert_eq!(same, 0, "{same} sectors kept their old ciphertext");
    // Sampled sectors (the first of every MiB), decrypted here with AES-XTS: with the new
    // header's volume key they are the plaintext; with the old header's (a copy the server
    // kept, opened with the same keyfile) none is.
    let (new_vk, old_vk) = (volume_key(&pin, &keyfile), volume_key(&old_pin, &keyfile));
    assert_ne!(new_vk, old_vk);
    let sample = |vk: &[u8]| {
        (0..plain.len() / MIB)
            .filter(|i| {
                let s = i * MIB / 4096;
                xts_decrypt(vk, s as u64, &cipher_after[s * 4096..(s + 1) * 4096])
                    == plain[s * 4096..(s + 1) * 4096]
            })
            .count()
    };
    assert_eq!(
        sample(&new_vk),
        plain.len() / MIB,
        "the new volume key reads every sample"
    );
    assert_eq!(sample(&old_vk), 0, "the old volume key reads none");
}

/// The volume key that `keyfile` unlocks from `header` (cryptsetup luksDump).
fn volume_key(header: &Path, keyfile: &Path) -> Vec<u8> {
    let dump = cryptsetup(&[
        "luksDump".as_ref(),
        "-q".as_ref(),
        "--dump-volume-key".as_ref(),
        "--key-file".as_ref(),
        keyfile.as_os_str(),
        header.as_os_str(),
    ]);
    let text = String::from_utf8(dump).unwrap();
    let at = text
        .find("MK dump:")
        .or_else(|| text.find("Volume key:"))
        .unwrap_or_else(|| panic!("no key in {text}"));
    let hex: String = text[at..]
        .split_once(':')
        .unwrap()
        .1
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || c.is_whitespace())
        .filter(|c| c.is_ascii_hexdigit())
        .collect();
    let key: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    assert_eq!(key.len(), 64, "{text}");
    key
}

/// One 4096-byte sector of aes-xts-plain64, decrypted (the IV counts 512-byte sectors
/// whatever the sector size, as LUKS2 sets dm-crypt up without `iv_large_sectors`).
fn xts_decrypt(key: &[u8], sector: u64, data: &[u8]) -> Vec<u8> {
    use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
    let k1 = aes::Aes256::new_from_slice(&key[..32]).unwrap();
    let k2 = aes::Aes256::new_from_slice(&key[32..]).unwrap();
    let mut t = [0u8; 16];
    t[..8].copy_from_slice(&(sector * 8).to_le_bytes());
    let mut tb = t.into();
    k2.encrypt_block(&mut tb);
    let mut t: [u8; 16] = tb.into();
    let mut out = Vec::with_capacity(data.len());
    for c in data.chunks(16) {
        let mut b = [0u8; 16];
        for i in 0..16 {
            b[i] = c[i] ^ t[i];
        }
        let mut bb = b.into();
        k1.decrypt_block(&mut bb);
        let b: [u8; 16] = bb.into();
        out.extend(b.iter().zip(&t).map(|(x, y)| x ^ y));
        // The tweak times alpha in GF(2^128), little-endian.
        let carry = t[15] >> 7;
        for i in (1..16).rev() {
            t[i] = (t[i] << 1) | (t[i - 1] >> 7);
        }
        t[0] = (t[0] << 1) ^ (0x87 * carry);
    }
    out
}
