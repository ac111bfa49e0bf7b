//! Key escrow: the keyfile, encrypted with age to offline recovery recipients.
//!
//! Losing the keyfile loses every backup, so `init` can encrypt it to one or more
//! recipients whose private keys live offline (an age X25519 key, or an SSH ed25519/RSA
//! public key, as age supports) and store the result beside the container on the server and
//! beside the keyfile on the client. An age file is safe on untrusted storage: only a
//! recipient's private key opens it. `recover-key --identity FILE` writes the keyfile back.
//! We use the `age` crate (rage), the reference Rust implementation, rather than our own
//! construction.

use std::io::{BufReader, Read, Write};
use std::path::Path;

/// A sealed keyfile is about 4.5 KiB for a few recipients; a larger "escrow" is not one.
pub const MAX_BYTES: u64 = 256 * 1024;

use anyhow::{anyhow, bail, Context, Result};

use crate::stack::luks::Key;

/// Parse one recipient: `age1...` or an SSH public key line.
pub fn parse_recipient(s: &str) -> Result<Box<dyn age::Recipient + Send>, String> {
    let t = s.trim();
    if t.starts_with("age1") {
        t.parse::<age::x25519::Recipient>()
            .map(|r| Box::new(r) as Box<dyn age::Recipient + Send>)
            .map_err(|e| format!("`{t}`: not an age recipient ({e})"))
    } else if t.starts_with("ssh-") {
        t.parse::<age::ssh::Recipient>()
            .map(|r| Box::new(r) as Box<dyn age::Recipient + Send>)
            .map_err(|e| format!("`{t}`: not a usable SSH public key ({e:?})"))
    } else {
        Err(format!(
            "`{t}`: a recovery recipient is an age public key (age1...) or an SSH public key (ssh-ed25519 ...)"
        ))
    }
}

/// Encrypt the key to every recipient.
pub fn seal(key: &Key, recipients: &[String]) -> Result<Vec<u8>> {
    let rs: Vec<Box<dyn age::Recipient + Send>> = recipients
        .iter()
        .map(|r| parse_recipient(r).map_err(|e| anyhow!(e)))
        .collect::<Result<_>>()?;
    let enc = age::Encryptor::with_recipients(rs.iter().map(|r| r.as_ref() as &dyn age::Recipient))
        .map_err(|e| anyhow!("age: {e}"))?;
    let mut out = Vec::new();
    let mut w = enc.wrap_output(&mut out)?;
    w.write_all(key.bytes())?;
    w.finish()?;
    Ok(out)
}

/// Decrypt an escrow with the identity (age identity file or unencrypted SSH private key).
pub fn open(escrow: &[u8], identity_file: &Path) -> Result<Key> {
    let text = std::fs::read(identity_file)
        .with_context(|| format!("reading identity {}", identity_file.display()))?;
    let ids: Vec<Box<dyn age::Identity>> = if text.starts_with(b"-----BEGIN") {
        let id = age::ssh::Identity::from_buffer(
            BufReader::new(&text[..]),
            Some(identity_file.display().to_string()),
        )
        .with_context(|| format!("{} is not an SSH private key", identity_file.display()))?;
        if let age::ssh::Identity::Encrypted(_) = id {
            bail!(
                "{} is passphrase-protected: decrypt a copy first (ssh-keygen -p -N '' -f COPY)",
                identity_file.display()
            );
        }
        vec![Box::new(id)]
    } else {
        age::IdentityFile::from_buffer(BufReader::new(&text[..]))
            .with_context(|| format!("{} is not an age identity file", identity_file.display()))?
            .into_identities()
            .map_err(|e| anyhow!("{}: {e}", identity_file.display()))?
            .into_iter()
            .map(|b| b as Box<dyn age::Identity>)
            .collect()
    };
    let dec =
        age::Decryptor::new(escrow).map_err(|e| anyhow!("the escrow is not an age file: {e}"))?;
    let mut r = dec
        .decrypt(ids.iter().map(|i| i.as_ref()))
        .map_err(|e| anyhow!("{} does not open the escrow: {e}", identity_file.display()))?;
    let mut buf = Vec::new();
    r.read_to_end(&mut buf)?;
    Ok(crate::stack::luks::key_from_bytes(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_and_open_with_age_and_ssh_identities() {
        let d = tempfile::tempdir().unwrap();
        let age_id = age::x25519::Identity::generate();
        let age_file = d.path().join("age.txt");
        {
            use age::secrecy::ExposeSecret;
            std::fs::write(
                &age_file,
                format!("# test\n{}\n", age_id.to_string().expose_secret()),
            )
            .unwrap();
        }
        let ssh_key = d.path().join("id_ed25519");
        let st = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&ssh_key)
            .status()
            .unwrap();
        assert!(st.success());
        let ssh_pub = std::fs::read_to_string(ssh_key.with_extension("pub")).unwrap();
        let key = crate::stack::luks::key_from_bytes((0..4096).map(|i| (i % 251) as u8).collect());
        let sealed = seal(
            &key,
            &[age_id.to_public().to_string(), ssh_pub.trim().to_string()],
        )
        .unwrap();
        assert!(
            !sealed.windows(16).any(|w| w == &key.bytes()[100..116]),
            "plaintext leaked"
        );
        assert_eq!(open(&sealed, &age_file).unwrap().bytes(), key.bytes());
        assert_eq!(open(&sealed, &ssh_key).unwrap().bytes(), key.bytes());
        let other = age::x25519::Identity::generate();
        let other_file = d.path().join("other.txt");
        {
            use age::secrecy::ExposeSecret;
            std::fs::write(
                &other_file,
                format!("{}\n", other.to_string().expose_secret()),
            )
            .unwrap();
        }
        assert!(open(&sealed, &other_file).is_err());
        assert!(parse_recipient("bogus").is_err());
        assert!(parse_recipient("age1notvalid").is_err());
    }
}
