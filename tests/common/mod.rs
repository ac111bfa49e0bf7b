//! Test fixture for the host-level tests: a private sshd on 127.0.0.1 (its own ed25519 host
//! key, a client key, a server directory), profiles pointing at it, and guards that tear
//! down whatever a test set up even when an assertion fails.
//!
//! Privileged tests are named `host_*`, are `#[ignore]`d with the reason (they need root),
//! and run as root with `--include-ignored --test-threads=1`, as CI does: they never pass
//! by skipping.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2ebackup::profile::Profile;
use e2ebackup::teardown::{Journal, Stack};

/// Deterministic incompressible bytes.
pub fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The e2ebackup binary built for these tests.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_e2ebackup"));
    c.stdin(Stdio::null());
    c
}

/// stdout and stderr of a finished command, for assertion messages.
pub fn show(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Create an ed25519 key pair (`path`, `path.pub`); returns the `TYPE BASE64` of the public key.
pub fn keygen(path: &Path, comment: &str) -> String {
    keygen_type(path, "ed25519", comment)
}

/// Like [`keygen`], for another key type (`ecdsa`, `rsa`).
pub fn keygen_type(path: &Path, kind: &str, comment: &str) -> String {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", kind, "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("running ssh-keygen (openssh-client)");
    assert!(out.status.success(), "ssh-keygen: {}", show(&out));
    let mut p = path.as_os_str().to_owned();
    p.push(".pub");
    let text = std::fs::read_to_string(PathBuf::from(p)).unwrap();
    let f: Vec<&str> = text.split_whitespace().take(2).collect();
    assert_eq!(f.len(), 2, "malformed public key {text:?}");
    format!("{} {}", f[0], f[1])
}

/// A private sshd on 127.0.0.1; killed (with its session processes) and its files removed
/// on drop.
pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// `ssh-ed25519 AAAA...` of the server's host key.
    pub host_key: String,
    child: Child,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Sshd {
    pub fn start() -> Sshd {
        Sshd::start_with(&[])
    }

    /// Start with more host keys (e.g. `ecdsa`) next to the ed25519 one, as a stock Debian
    /// server has. Only the ed25519 key is pinned in `known_hosts`.
    pub fn start_with(extra_host_key_types: &[&str]) -> Sshd {
        Sshd::start_full(extra_host_key_types, "internal-sftp")
    }

    /// With OpenSSH's external sftp-server: a process of its own, which a test can stop
    /// (SIGSTOP) while sshd keeps answering keepalives, as on a server with hung storage.
    pub fn start_external_sftp() -> Sshd {
        Sshd::start_full(&[], "/usr/lib/openssh/sftp-server")
    }

    fn start_full(extra_host_key_types: &[&str], sftp: &str) -> Sshd {
        let dir = tempfile::Builder::new()
            .prefix("e2eb-sshd.")
            .tempdir()
            .unwrap();
        let d = dir.path().to_path_buf();
        // Privilege separation directory; sshd refuses to start without it.
        std::fs::create_dir_all("/run/sshd").unwrap();
        let host_key = keygen(&d.join("host_key"), "e2eb-test-host");
        let mut extra_keys = String::new();
        for kind in extra_host_key_types {
            let f = d.join(format!("host_key_{kind}"));
            keygen_type(&f, kind, "e2eb-test-host");
            extra_keys.push_str(&format!("HostKey {}\n", f.display()));
        }
        let client = keygen(&d.join("client_key"), "e2eb-test-client");
        std::fs::write(d.join("authorized_keys"), format!("{client}\n")).unwrap();
        std::fs::create_dir(d.join("server")).unwrap();
        std::fs::create_dir(d.join("profiles")).unwrap();
        std::fs::create_dir(d.join("keys")).unwrap();

        // The port is free when probed, but another process may take it before sshd binds:
        // then sshd exits at once and we try another one.
        let mut last_log = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            let cfg = format!(
                "ListenAddress 127.0.0.1\n\
                 Port {port}\n\
                 HostKey {d}/host_key\n\
                 {extra_keys}\
                 PidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\n\
                 PubkeyAuthentication yes\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\n\
                 UsePAM no\n\
                 StrictModes no\n\
                 Subsystem sftp {sftp}\n\
                 LogLevel VERBOSE\n",
                d = d.display()
            );
            std::fs::write(d.join("sshd_config"), cfg).unwrap();
            let log = std::fs::File::create(d.join("sshd.log")).unwrap();
            let mut child = Command::new("/usr/sbin/sshd")
                .args(["-D", "-e", "-f"])
                .arg(d.join("sshd_config"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                // Its own process group, so that Drop also ends the per-connection children.
                .process_group(0)
                .spawn()
                .expect("starting /usr/sbin/sshd (openssh-server)");
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                // Ours (not another process that took the port) and accepting.
                let listening = std::fs::read_to_string(d.join("sshd.log"))
                    .unwrap_or_default()
                    .contains(&format!("Server listening on 127.0.0.1 port {port}."));
                if listening && TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    let kh = format!("[127.0.0.1]:{port} {host_key}\n");
                    std::fs::write(d.join("known_hosts"), kh).unwrap();
                    return Sshd {
                        dir,
                        port,
                        host_key,
                        child,
                    };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            last_log = std::fs::read_to_string(d.join("sshd.log")).unwrap_or_default();
        }
        panic!("sshd did not start on 127.0.0.1; its log:\n{last_log}");
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The directory the profiles' `server.path` points at.
    pub fn server_dir(&self) -> PathBuf {
        self.path("server")
    }

    pub fn known_hosts(&self) -> PathBuf {
        self.path("known_hosts")
    }

    /// The line that pins this server's key.
    pub fn known_hosts_line(&self) -> String {
        format!("[127.0.0.1]:{} {}", self.port, self.host_key)
    }

    /// The pid of sshd's listener (the test's child).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("sshd.log")).unwrap_or_default()
    }

    /// Write `profiles/<name>.yaml` for this server and return its path.
    pub fn profile(&self, name: &str, sources: &[&Path]) -> PathBuf {
        let srcs: Vec<String> = sources
            .iter()
            .map(|s| format!("\"{}\"", s.display()))
            .collect();
        let d = self.dir.path().display();
        let text = format!(
            "server:\n\
             \x20 host: 127.0.0.1\n\
             \x20 port: {port}\n\
             \x20 user: root\n\
             \x20 identity_file: {d}/client_key\n\
             \x20 known_hosts: {d}/known_hosts\n\
             \x20 path: {d}/server\n\
             \x20 timeout: 10\n\
             container:\n\
             \x20 file: test.luks\n\
             \x20 size: 256M\n\
             \x20 keyfile: {d}/keys/{name}.key\n\
             backup:\n\
             \x20 sources: [{srcs}]\n",
            port = self.port,
            srcs = srcs.join(", ")
        );
        let p = self.path("profiles").join(format!("{name}.yaml"));
        std::fs::write(&p, text).unwrap();
        // Root's own, 0600: the binary refuses a profile others can read or write.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    /// Write and load a profile.
    pub fn load_profile(&self, name: &str, sources: &[&Path]) -> Profile {
        let p = self.profile(name, sources);
        Profile::load(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()))
    }

    /// A profile named after `prefix` (made unique) backing up /etc, with its keyfile in
    /// place (4096 random bytes, mode 0400), so that a command gets past reading the key;
    /// with the guard that removes its real /run, /var/lib and lock paths.
    pub fn keyed_profile(&self, prefix: &str) -> (String, PathBuf, Profile, RemoveOnDrop) {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let name = unique_name(prefix);
        let state = real_state_paths(&name);
        let path = self.profile(&name, &[Path::new("/etc")]);
        let p = Profile::load(&path).unwrap();
        let kf = &p.container.keyfile.0;
        let mut key = vec![0u8; 4096];
        std::fs::File::open("/dev/urandom")
            .unwrap()
            .read_exact(&mut key)
            .unwrap();
        std::fs::write(kf, key).unwrap();
        std::fs::set_permissions(kf, std::fs::Permissions::from_mode(0o400)).unwrap();
        (name, path, p, state)
    }

    /// The names in the server directory, sorted.
    pub fn server_entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.server_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Whatever is left of the group (session processes), and the master if it lingers.
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Finishes the teardown recorded in an undo journal when dropped: what the next
/// `e2ebackup` command would do after a crash. Declare it right after the journal's
/// directory and before anything is acquired, so that it runs after the test's own values
/// (a [`e2ebackup::stack::loopdev::Loop`] must be closed first) and before the temporary
/// directories holding the mount points are removed. A test that unwinds by itself leaves
/// no journal, and then this does nothing.
pub struct Recover {
    pub journal: PathBuf,
}

impl Recover {
    pub fn new(journal: &Path) -> Recover {
        Recover {
            journal: journal.to_path_buf(),
        }
    }
}

impl Drop for Recover {
    fn drop(&mut self) {
        match Journal::read(&self.journal) {
            Ok(Some(j)) => {
                eprintln!(
                    "test guard: unwinding {} record(s) left in {}",
                    j.records.len(),
                    self.journal.display()
                );
                let mut s = Stack::adopt(self.journal.clone(), j);
                let r = s.unwind(&mut e2ebackup::stack::Real);
                for (u, e) in &r.failed {
                    eprintln!(
                        "test guard: could not {u}: {e}; by hand: {}",
                        u.manual_command()
                    );
                }
            }
            Ok(None) => {}
            Err(e) => eprintln!("test guard: {e:#}"),
        }
    }
}

/// Removes paths outside the temporary directories (the real `/run/e2ebackup/<profile>`,
/// `/var/lib/e2ebackup/<profile>`, `/run/lock/e2ebackup/<profile>.lock`) when dropped.
pub struct RemoveOnDrop(pub Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            let r = if p.is_dir() {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            };
            if let Err(e) = r {
                if e.kind() != std::io::ErrorKind::NotFound {
                    eprintln!("test guard: cannot remove {}: {e}", p.display());
                }
            }
        }
    }
}

/// The real per-profile paths a command may create for `name` (removed by the guard).
pub fn real_state_paths(name: &str) -> RemoveOnDrop {
    RemoveOnDrop(vec![
        Path::new(e2ebackup::layout::RUN_DIR).join(name),
        Path::new(e2ebackup::layout::STATE_DIR).join(name),
        e2ebackup::layout::local_lock_path(name),
    ])
}

/// A profile name no other test (or earlier run) uses.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A temporary directory with mode 0700: the tool keeps journals and state only in private
/// directories (fsutil::private_dir), and tempfile's default mode depends on the umask.
pub fn private_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    d
}
