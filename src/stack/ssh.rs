//! The SSH layer (libssh2 through the `ssh2` crate): a session to the backup server whose
//! host key must match the profile's pinned known_hosts, used for preflight checks and
//! server-side facts (free space, whether SFTP fsync is supported, allocation of a file).
//!
//! Host keys: an unknown key is as fatal as a changed one. There is no trust-on-first-use
//! from cron: the administrator pins the key (`ssh-keyscan` + verifying the fingerprint)
//! when writing the profile. `KnownHosts::check()` ignores the port, so `check_port` is
//! used. libssh2 may negotiate a host key type the file does not pin (the server has an
//! ECDSA and an Ed25519 key, the file only the latter), which would look like "unknown";
//! so the host key algorithms offered are limited to the types pinned for this host.
//!
//! sshfs runs OpenSSH, not libssh2, with the same known_hosts file and
//! `StrictHostKeyChecking=yes`, so both paths to the server check the same pin.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ssh2::{CheckResult, KnownHostFileKind, MethodType, Session};

use crate::error::Failure;
use crate::profile::Server;

/// The most a remote command (trim's probes: `stat`, `nbdkit --version`) may write to each
/// of stdout and stderr; their answers are a line.
pub const EXEC_OUTPUT_MAX: u64 = 64 << 10;

/// A connected, authenticated session.
pub struct Remote {
    session: Session,
    pub label: String,
}

/// What the preflight found out about the server.
#[derive(Debug, Clone)]
pub struct Facts {
    /// The server's SFTP advertises fsync@openssh.com: an fsync on sshfs reaches its disk.
    pub fsync_supported: bool,
    /// Free bytes for the user in `server.path` (SFTP statvfs@openssh.com: f_bavail x
    /// f_frsize; None if the server does not offer that extension).
    pub free_bytes: Option<u64>,
    /// Apparent size of the container file, if it exists.
    pub container_size: Option<u64>,
}

/// Whether a known_hosts host field matches `want` (`host` or `[host]:port`), including
/// OpenSSH's hashed form `|1|base64(salt)|base64(HMAC-SHA1(salt, want))`.
fn host_field_matches(field: &str, want: &str) -> bool {
    use base64::Engine as _;
    use hmac::Mac as _;
    if let Some(rest) = field.strip_prefix("|1|") {
        let Some((salt, hash)) = rest.split_once('|') else {
            return false;
        };
        let b64 = base64::engine::general_purpose::STANDARD;
        let (Ok(salt), Ok(hash)) = (b64.decode(salt), b64.decode(hash)) else {
            return false;
        };
        let Ok(mut m) = hmac::Hmac::<sha1::Sha1>::new_from_slice(&salt) else {
            return false;
        };
        m.update(want.as_bytes());
        return m.verify_slice(&hash).is_ok();
    }
    field.split(',').any(|h| h == want)
}

/// Key types pinned for `host`:`port` in a known_hosts file (plain and hashed entries).
pub fn pinned_key_types(known_hosts: &str, host: &str, port: u16) -> Vec<String> {
    let want = if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    };
    let mut types = Vec::new();
    for line in known_hosts.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('@') {
            continue;
        }
        let mut f = line.split_whitespace();
        let (Some(hosts), Some(kt)) = (f.next(), f.next()) else {
            continue;
        };
        if host_field_matches(hosts, &want) && !types.iter().any(|t| t == kt) {
            types.push(kt.to_string());
        }
    }
    types
}

/// A host key fingerprint the way `ssh-keygen -lf` and `ssh` print it: `SHA256:` and the
/// unpadded base64 of the SHA-256 of the key blob.
pub fn fingerprint(sha256: &[u8]) -> String {
    use base64::Engine as _;
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(sha256)
    )
}

/// Why `known_hosts` does not pin `host`:`port`, if it does not. One rule for `validate` and
/// every connection, OpenSSH's (sshfs runs OpenSSH with this file): for port 22 the entry
/// names `host`; for any other port it must name `[host]:port`. libssh2's `check_port` also
/// accepts a plain `host` entry for another port, which sshfs would then refuse.
pub fn pin_problem(known_hosts: &str, path: &Path, host: &str, port: u16) -> Option<String> {
    if !pinned_key_types(known_hosts, host, port).is_empty() {
        return None;
    }
    let mut msg = format!(
        "server.known_hosts {} pins no key for {host}:{port}",
        path.display()
    );
    if port != 22 && !pinned_key_types(known_hosts, host, 22).is_empty() {
        msg.push_str(&format!(
            ": its entry for `{host}` is for port 22; for port {port} OpenSSH (and so sshfs) \
             needs `[{host}]:{port}` (`ssh-keyscan -p {port} -t ed25519 {host}` writes that form)"
        ));
    } else {
        msg.push_str(&format!(
            " (pin it after checking its fingerprint: `ssh-keyscan{} -t ed25519 {host}`, \
             see docs/quick-start.md)",
            if port == 22 {
                String::new()
            } else {
                format!(" -p {port}")
            }
        ));
    }
    Some(msg)
}

/// The client's side of a connection, checked before any: the pinned host keys
/// (`server.known_hosts`, returned) and the identity file. Missing either is a usage error.
pub fn local_files(server: &Server) -> Result<String> {
    let kh_path = &server.known_hosts.0;
    let kh_text = std::fs::read_to_string(kh_path).map_err(|e| {
        crate::error::usage(format!(
            "server.known_hosts {}: {e} (pin the server's key, see docs/quick-start.md)",
            kh_path.display()
        ))
    })?;

    if let Some(why) = crate::localpaths::identity_problem(&server.identity_file.0) {
        return Err(crate::error::usage(format!("server.identity_file {why}")));
    }
    Ok(kh_text)
}

impl Remote {
    pub fn connect(server: &Server) -> Result<Remote> {
        let label = format!("{}@{}:{}", server.user, server.host, server.port);
        let kh_text = local_files(server)?;
        let kh_path = &server.known_hosts.0;
        let timeout = Duration::from_secs(server.timeout as u64);
        let addrs: Vec<_> = (server.host.as_str(), server.port)
            .to_socket_addrs()
            .with_context(|| format!("resolving {}", server.host))?
            .collect();
        let mut last = None;
        let mut tcp = None;
        for a in &addrs {
            match TcpStream::connect_timeout(a, timeout) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let tcp = tcp.ok_or_else(|| {
            anyhow!(
                "cannot connect to {}:{}: {}",
                server.host,
                server.port,
                last.map(|e| e.to_string())
                    .unwrap_or_else(|| "no address".into())
            )
        })?;
        let mut session = Session::new().context("creating SSH session")?;
        session.set_tcp_stream(tcp);
        session.set_timeout(server.timeout * 1000);
        let types = pinned_key_types(&kh_text, &server.host, server.port);
        let supported = [
            "ssh-ed25519",
            "ecdsa-sha2-nistp256",
            "ecdsa-sha2-nistp384",
            "ecdsa-sha2-nistp521",
            "rsa-sha2-512",
            "rsa-sha2-256",
            "ssh-rsa",
        ];
        let mut prefs: Vec<&str> = Vec::new();
        for t in &types {
            if t == "ssh-rsa" {
                prefs.extend(["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]);
            } else if supported.contains(&t.as_str()) {
                prefs.push(t);
            }
        }
        if !prefs.is_empty() {
            // Ignore failure: an old libssh2 without some algorithm keeps its defaults.
            let _ = session.method_pref(MethodType::HostKey, &prefs.join(","));
        }
        session
            .handshake()
            .with_context(|| format!("SSH handshake with {label}"))?;

        let (key, _kind) = session
            .host_key()
            .ok_or_else(|| anyhow!("{label} sent no host key"))?;
        let mut kh = session.known_hosts()?;
        kh.read_file(kh_path, KnownHostFileKind::OpenSSH)
            .with_context(|| format!("parsing known_hosts {}", kh_path.display()))?;
        let fp = session
            .host_key_hash(ssh2::HashType::Sha256)
            .map(fingerprint)
            .unwrap_or_default();
        let check = match kh.check_port(&server.host, server.port, key) {
            // libssh2 matched a plain `host` entry for another port: OpenSSH's rule says no.
            CheckResult::Match => match pin_problem(&kh_text, kh_path, &server.host, server.port) {
                Some(why) => {
                    return Err(Failure::Security(format!(
                        "host key of {}:{} is not pinned (the server offers {fp}): {why}",
                        server.host, server.port
                    ))
                    .into())
                }
                None => CheckResult::Match,
            },
            other => other,
        };
        match check {
            CheckResult::Match => {}
            CheckResult::Mismatch => {
                return Err(Failure::Security(format!(
                    "host key of {}:{} CHANGED: it does not match {} (the server offers {fp}); \
                     refusing to connect. If the server was reinstalled, verify the new key out of band and update the file.",
                    server.host,
                    server.port,
                    kh_path.display()
                ))
                .into())
            }
            CheckResult::NotFound => {
                return Err(Failure::Security(format!(
                    "host key of {}:{} is not pinned in {} (the server offers {fp}); refusing to trust it on first use. \
                     Add it after comparing {fp} with the server's own \
                     `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` (docs/quick-start.md).",
                    server.host,
                    server.port,
                    kh_path.display()
                ))
                .into())
            }
            CheckResult::Failure => bail!("checking the host key of {label} failed"),
        }
        session
            .userauth_pubkey_file(&server.user, None, &server.identity_file.0, None)
            .with_context(|| {
                format!(
                    "authenticating to {label} with {}",
                    server.identity_file.0.display()
                )
            })?;
        session.set_keepalive(true, 15);
        Ok(Remote { session, label })
    }

    /// Run a shell command on the server; returns (exit status, stdout, stderr): stdout at
    /// most [`EXEC_OUTPUT_MAX`] bytes (more is an error), stderr always empty (discarded).
    /// Only `trim` may: every other command works on an SFTP-only account
    /// (`ForceCommand internal-sftp`), and a test below holds the callers to that.
    pub fn exec(&self, command: &str) -> Result<(i32, String, String)> {
        let mut ch = self.session.channel_session()?;
        // stderr is discarded as it arrives (no caller uses it): read after stdout, a
        // server's flood of it would fill the channel's window and stall stdout for ever.
        ch.handle_extended_data(ssh2::ExtendedData::Ignore)?;
        ch.exec(command)
            .with_context(|| format!("running `{command}` on {}", self.label))?;
        // The server chooses what it sends: read at most EXEC_OUTPUT_MAX of it.
        let mut out = Vec::new();
        (&mut ch).take(EXEC_OUTPUT_MAX + 1).read_to_end(&mut out)?;
        if out.len() as u64 > EXEC_OUTPUT_MAX {
            let _ = ch.close();
            bail!(
                "`{command}` on {} wrote more than {EXEC_OUTPUT_MAX} bytes; not read further",
                self.label
            );
        }
        ch.wait_close()?;
        Ok((
            ch.exit_status()?,
            String::from_utf8_lossy(&out).into_owned(),
            String::new(),
        ))
    }

    /// SFTP protocol extensions the server advertises (from its SSH_FXP_VERSION reply).
    /// libssh2 does not expose them, so this speaks the 9-byte INIT itself.
    pub fn sftp_extensions(&self) -> Result<Vec<String>> {
        let mut ch = self.session.channel_session()?;
        ch.subsystem("sftp")
            .with_context(|| format!("starting the sftp subsystem on {}", self.label))?;
        // uint32 length = 5, byte SSH_FXP_INIT = 1, uint32 version = 3
        ch.write_all(&[0, 0, 0, 5, 1, 0, 0, 0, 3])?;
        ch.flush()?;
        let mut len = [0u8; 4];
        ch.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len) as usize;
        if !(5..=1 << 20).contains(&len) {
            bail!("{}: malformed SFTP VERSION packet", self.label);
        }
        let mut body = vec![0u8; len];
        ch.read_exact(&mut body)?;
        let _ = ch.close();
        parse_sftp_version(&body)
    }

    /// statvfs@openssh.com of `path` on the server, over a fresh SFTP channel (libssh2
    /// exposes only the handle-based fstatvfs, and OpenSSH's sftp-server has no fd for a
    /// directory handle; this speaks the two packets itself, like [`Self::sftp_extensions`]).
    pub fn sftp_statvfs(&self, path: &str) -> Result<StatVfs> {
        let mut ch = self.session.channel_session()?;
        ch.subsystem("sftp")
            .with_context(|| format!("starting the sftp subsystem on {}", self.label))?;
        let read_packet = |ch: &mut ssh2::Channel| -> Result<Vec<u8>> {
            let mut len = [0u8; 4];
            ch.read_exact(&mut len)?;
            let len = u32::from_be_bytes(len) as usize;
            if !(5..=1 << 20).contains(&len) {
                bail!("{}: malformed SFTP packet", self.label);
            }
            let mut body = vec![0u8; len];
            ch.read_exact(&mut body)?;
            Ok(body)
        };
        ch.write_all(&[0, 0, 0, 5, 1, 0, 0, 0, 3])?;
        ch.flush()?;
        let exts = parse_sftp_version(&read_packet(&mut ch)?)?;
        if !exts.iter().any(|e| e == "statvfs@openssh.com") {
            bail!(
                "{}: the SFTP server does not offer statvfs@openssh.com",
                self.label
            );
        }
        ch.write_all(&statvfs_request(7, path))?;
        ch.flush()?;
        let reply = read_packet(&mut ch)?;
        let _ = ch.close();
        parse_statvfs_reply(&reply, 7)
            .with_context(|| format!("statvfs@openssh.com of {path} on {}", self.label))
    }

    /// Gather the facts `init` and `run` need.
    pub fn facts(&self, dir: &str, container: &str) -> Result<Facts> {
        let sftp = self.session.sftp()?;
        let st = sftp.stat(Path::new(dir)).map_err(|e| {
            anyhow!(
                "server directory {dir} on {}: {e} (server.path must exist and be writable by the user)",
                self.label
            )
        })?;
        if !st.is_dir() {
            bail!("server.path {dir} on {} is not a directory", self.label);
        }
        let container_size = sftp.stat(Path::new(container)).ok().and_then(|s| s.size);
        let fsync_supported = self
            .sftp_extensions()
            .map(|exts| exts.iter().any(|e| e == "fsync@openssh.com"))
            .unwrap_or(false);
        // Through SFTP, not a shell command: an SFTP-only account (ForceCommand
        // internal-sftp, hosted storage) runs no commands, and free space is exactly what
        // runs out there.
        let free_bytes = match self.sftp_statvfs(dir) {
            Ok(v) => Some(v.free_bytes()),
            Err(e) => {
                crate::debug!("statvfs@openssh.com of {dir} on {}: {e:#}", self.label);
                None
            }
        };
        Ok(Facts {
            fsync_supported,
            free_bytes,
            container_size,
        })
    }

    /// Read a (small) file from the server over SFTP.
    /// Read a server file over SFTP, at most `max` bytes (more is an error: the server
    /// chooses what it sends). The session's timeout bounds the wait.
    pub fn read_file(&self, path: &str, max: u64) -> Result<Vec<u8>> {
        let sftp = self.session.sftp()?;
        let f = sftp
            .open(Path::new(path))
            .map_err(|e| anyhow!("{path} on {}: {e}", self.label))?;
        let mut buf = Vec::new();
        f.take(max + 1).read_to_end(&mut buf)?;
        if buf.len() as u64 > max {
            bail!(
                "{path} on {} is larger than {max} bytes; not read",
                self.label
            );
        }
        Ok(buf)
    }

    /// Bytes the server has allocated for a file (st_blocks * 512), if it runs `stat`: a
    /// remote command, so for `trim` only. Neither SFTP (no allocation attribute in its file
    /// attributes) nor sshfs (st_blocks derived from the size: a 1 GiB file with 3 MiB
    /// written showed 2097152 blocks through sshfs, 6144 on the server) can tell it.
    pub fn allocated_bytes(&self, path: &str) -> Option<u64> {
        match self.exec(&format!("stat -c %b.%B -- {}", shell_quote(path))) {
            Ok((0, out, _)) => {
                let (b, s) = out.trim().split_once('.')?;
                Some(b.parse::<u64>().ok()? * s.parse::<u64>().ok()?)
            }
            _ => None,
        }
    }
}

fn parse_sftp_version(body: &[u8]) -> Result<Vec<String>> {
    if body.first() != Some(&2) {
        bail!("unexpected SFTP reply type {:?}", body.first());
    }
    let mut exts = Vec::new();
    let mut i = 5; // type + version
    let read_str = |i: &mut usize| -> Option<String> {
        let l = u32::from_be_bytes(body.get(*i..*i + 4)?.try_into().ok()?) as usize;
        let s = body.get(*i + 4..*i + 4 + l)?;
        *i += 4 + l;
        Some(String::from_utf8_lossy(s).into_owned())
    };
    while i < body.len() {
        let Some(name) = read_str(&mut i) else { break };
        if read_str(&mut i).is_none() {
            break;
        }
        exts.push(name);
    }
    Ok(exts)
}

/// The fields of an SFTP statvfs reply that we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatVfs {
    pub frsize: u64,
    pub blocks: u64,
    pub bavail: u64,
}

impl StatVfs {
    /// Bytes an unprivileged user may still write.
    pub fn free_bytes(&self) -> u64 {
        self.bavail.saturating_mul(self.frsize)
    }
}

/// SSH_FXP_EXTENDED (200), request id, "statvfs@openssh.com", path.
fn statvfs_request(id: u32, path: &str) -> Vec<u8> {
    let name = b"statvfs@openssh.com";
    let mut body = vec![200u8];
    body.extend_from_slice(&id.to_be_bytes());
    for s in [&name[..], path.as_bytes()] {
        body.extend_from_slice(&(s.len() as u32).to_be_bytes());
        body.extend_from_slice(s);
    }
    let mut pkt = (body.len() as u32).to_be_bytes().to_vec();
    pkt.extend_from_slice(&body);
    pkt
}

/// SSH_FXP_EXTENDED_REPLY (201), id, then 11 uint64 (bsize frsize blocks bfree bavail
/// files ffree favail fsid flag namemax); or SSH_FXP_STATUS (101) with an error.
fn parse_statvfs_reply(body: &[u8], id: u32) -> Result<StatVfs> {
    match body.first() {
        Some(201) => {}
        Some(101) => {
            let code = body
                .get(5..9)
                .map(|b| u32::from_be_bytes(b.try_into().unwrap()));
            bail!("the server answered with SFTP status {code:?}");
        }
        t => bail!("unexpected SFTP reply type {t:?}"),
    }
    if body.get(1..5) != Some(&id.to_be_bytes()[..]) {
        bail!("SFTP reply for another request");
    }
    let field = |i: usize| -> Result<u64> {
        let o = 5 + 8 * i;
        let b = body
            .get(o..o + 8)
            .ok_or_else(|| anyhow!("short statvfs reply"))?;
        Ok(u64::from_be_bytes(b.try_into().expect("8 bytes")))
    };
    Ok(StatVfs {
        frsize: field(1)?,
        blocks: field(2)?,
        bavail: field(4)?,
    })
}

/// Quote a string for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fingerprint is the one `ssh-keygen -lf` prints for the same key.
    #[test]
    fn fingerprint_is_what_ssh_keygen_prints() {
        use base64::Engine as _;
        use sha2::Digest as _;
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("k");
        let st = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .status()
            .unwrap();
        assert!(st.success());
        let pubkey = std::fs::read_to_string(d.path().join("k.pub")).unwrap();
        let blob = base64::engine::general_purpose::STANDARD
            .decode(pubkey.split_whitespace().nth(1).unwrap())
            .unwrap();
        let out = std::process::Command::new("ssh-keygen")
            .arg("-lf")
            .arg(d.path().join("k.pub"))
            .output()
            .unwrap();
        let want = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string();
        assert_eq!(fingerprint(&sha2::Sha256::digest(&blob)), want);
    }

    #[test]
    fn a_non_22_port_needs_the_bracketed_entry() {
        let kh = Path::new("/k/known_hosts");
        let plain = "backup.example.org ssh-ed25519 AAAA\n";
        assert_eq!(pin_problem(plain, kh, "backup.example.org", 22), None);
        let why = pin_problem(plain, kh, "backup.example.org", 2222).unwrap();
        assert!(why.contains("needs `[backup.example.org]:2222`"), "{why}");
        let bracketed = "[backup.example.org]:2222 ssh-ed25519 AAAA\n";
        assert_eq!(pin_problem(bracketed, kh, "backup.example.org", 2222), None);
        let why = pin_problem("", kh, "h", 22).unwrap();
        assert!(
            why.contains("pins no key for h:22") && why.contains("quick-start.md"),
            "{why}"
        );
    }

    #[test]
    fn key_types_for_host_and_port() {
        let kh = "127.0.0.1 ssh-ed25519 AAAA\n[127.0.0.1]:2222 ecdsa-sha2-nistp256 BBBB\n# c\nother,127.0.0.1 ssh-rsa CCCC\n";
        assert_eq!(
            pinned_key_types(kh, "127.0.0.1", 22),
            vec!["ssh-ed25519", "ssh-rsa"]
        );
        assert_eq!(
            pinned_key_types(kh, "127.0.0.1", 2222),
            vec!["ecdsa-sha2-nistp256"]
        );
        assert!(pinned_key_types(kh, "10.9.9.9", 22).is_empty());
    }

    #[test]
    fn hashed_entries_match_only_their_host() {
        // `ssh-keygen -H` output for 127.0.0.1 with salt "0123456789abcdefghij" (20 bytes).
        use base64::Engine as _;
        use hmac::Mac as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let salt = b"0123456789abcdefghij";
        let mut m = hmac::Hmac::<sha1::Sha1>::new_from_slice(salt).unwrap();
        m.update(b"127.0.0.1");
        let field = format!(
            "|1|{}|{}",
            b64.encode(salt),
            b64.encode(m.finalize().into_bytes())
        );
        let kh = format!(
            "{field} ssh-ed25519 AAAA\n|1|{}|AAAA ecdsa-sha2-nistp256 BBBB\n",
            b64.encode(salt)
        );
        assert_eq!(pinned_key_types(&kh, "127.0.0.1", 22), vec!["ssh-ed25519"]);
        assert!(pinned_key_types(&kh, "127.0.0.2", 22).is_empty());
    }

    #[test]
    fn sftp_version_extensions() {
        let mut b = vec![2, 0, 0, 0, 3];
        for (n, d) in [
            ("posix-rename@openssh.com", "1"),
            ("fsync@openssh.com", "1"),
        ] {
            b.extend((n.len() as u32).to_be_bytes());
            b.extend(n.as_bytes());
            b.extend((d.len() as u32).to_be_bytes());
            b.extend(d.as_bytes());
        }
        assert_eq!(
            parse_sftp_version(&b).unwrap(),
            vec!["posix-rename@openssh.com", "fsync@openssh.com"]
        );
        assert!(parse_sftp_version(&[101]).is_err());
    }

    #[test]
    fn statvfs_packets_and_quote() {
        let req = statvfs_request(7, "/srv/b");
        assert_eq!(&req[..4], &((req.len() - 4) as u32).to_be_bytes());
        assert_eq!(req[4], 200);
        assert_eq!(&req[5..9], &7u32.to_be_bytes());
        assert_eq!(&req[9..13], &19u32.to_be_bytes());
        assert_eq!(&req[13..32], b"statvfs@openssh.com");
        assert_eq!(&req[32..36], &6u32.to_be_bytes());
        assert_eq!(&req[36..], b"/srv/b");
        let mut rep = vec![201u8];
        rep.extend_from_slice(&7u32.to_be_bytes());
        for v in [4096u64, 4096, 1000, 300, 200, 10, 9, 8, 1, 0, 255] {
            rep.extend_from_slice(&v.to_be_bytes());
        }
        let st = parse_statvfs_reply(&rep, 7).unwrap();
        assert_eq!(
            st,
            StatVfs {
                frsize: 4096,
                blocks: 1000,
                bavail: 200
            }
        );
        assert_eq!(st.free_bytes(), 200 * 4096);
        assert!(parse_statvfs_reply(&rep, 8).is_err(), "wrong id");
        assert!(parse_statvfs_reply(&rep[..40], 7).is_err(), "short");
        let mut status = vec![101u8];
        status.extend_from_slice(&7u32.to_be_bytes());
        status.extend_from_slice(&8u32.to_be_bytes());
        let e = parse_statvfs_reply(&status, 7).unwrap_err().to_string();
        assert!(e.contains("Some(8)"), "{e}");
        assert_eq!(shell_quote("a'b"), "'a'\\''b'");
    }

    /// Issue 14: no command but `trim` runs a command on the server, so that an SFTP-only
    /// account serves every other one. Remote commands go through `Remote::exec` (and
    /// `allocated_bytes`, which uses it); this holds their callers to src/ops/trim.rs.
    #[test]
    fn only_trim_runs_commands_on_the_server() {
        fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let path = e.unwrap().path();
                if path.is_dir() {
                    walk(&path, out);
                } else if path.extension().is_some_and(|x| x == "rs") {
                    out.push(path);
                }
            }
        }
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        walk(&src, &mut files);
        // Spelt in two halves, so that this test's own lines do not match.
        let (alloc, exec) = (concat!(".allocated", "_bytes("), concat!(".ex", "ec("));
        let mut callers = Vec::new();
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            let rel = f.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                let calls = code.contains(alloc) || code.contains(exec);
                // The channel's own exec inside `Remote::exec`, and its use by `allocated_bytes`.
                let inside = code.contains(concat!("ch", ".ex", "ec("))
                    || code.contains(concat!("self", ".ex", "ec("));
                if calls && !inside && rel != "ops/trim.rs" {
                    callers.push(format!("src/{rel}:{}: {}", n + 1, line.trim()));
                }
            }
        }
        assert!(
            files.len() > 20,
            "walked {} files under {}",
            files.len(),
            src.display()
        );
        assert!(
            callers.is_empty(),
            "remote commands outside trim:\n{}",
            callers.join("\n")
        );
    }
}
